//! Elementwise arithmetic: residual adds, per-column scaling, per-row division and tanh soft-capping.

use rayon::prelude::*;

use super::{common_device, operands, Operands};
use crate::{Error, Result, Tensor};

fn same_shape(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(Error::Shape { op, detail: format!("{:?} vs {:?}", a.shape(), b.shape()) });
    }
    Ok(())
}

/// `a + b`, output in `a`'s dtype.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    same_shape("add", a, b)?;
    match operands("add", [a, b])? {
        Operands::Cpu => {
            let (x, y) = (a.f32_values()?, b.f32_values()?);
            let out = x.par_iter().zip(y.par_iter()).map(|(x, y)| x + y).collect();
            Tensor::from_f32_as(a.shape(), out, a.dtype())
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda([sa, sb], _) => cuda::add(sa, sb, a.shape()),
    }
}

/// `a += b` in place (the residual stream), without a new allocation (on CUDA, unless `a`'s buffer
/// is shared with a clone, which then keeps the old values); the sum in f32, rounded to `a`'s dtype.
pub fn add_assign(a: &mut Tensor, b: &Tensor) -> Result<()> {
    same_shape("add_assign", a, b)?;
    common_device("add_assign", &[a, b])?;
    // Both on one device (checked above): both on CUDA, or both on the host.
    #[cfg(feature = "cuda")]
    if let (Some(sa), Some(sb)) = (a.cuda_storage_mut(), b.cuda_storage()) {
        return cuda::add_assign(sa, sb);
    }
    let y = b.f32_values()?;
    match a.f32_values_mut() {
        Some(x) => x.par_iter_mut().zip(y.par_iter()).for_each(|(x, y)| *x += y),
        // A half-precision target: the sums rounded once, as on CUDA.
        None => *a = add(a, b)?,
    }
    Ok(())
}

/// `x[R, C] * s[C]`: multiplies column `c` by `s[c]` (how AWQ applies per-channel scales).
pub fn scale_columns(x: &Tensor, s: &[f32]) -> Result<Tensor> {
    let (r, c) = x.dims2("scale_columns")?;
    if s.len() != c {
        return Err(Error::Shape { op: "scale_columns", detail: format!("{c} columns, {} scales", s.len()) });
    }
    match operands("scale_columns", [x])? {
        Operands::Cpu => {
            let mut out = x.to_f32_vec()?;
            out.par_chunks_mut(c.max(1)).for_each(|row| row.iter_mut().zip(s).for_each(|(v, s)| *v *= s));
            Tensor::from_f32_as(&[r, c], out, x.dtype())
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda([sx], _) => cuda::by_vector("scale_columns", sx, x.shape(), s, c),
    }
}

/// `x[R, C] / s[R]`: divides row `r` by `s[r]` (how AWQ folds scales into the op before a group:
/// AutoAWQ's `weight.div_(scales.view(-1, 1))`; a vector is a `[n, 1]` matrix here). A division,
/// not a product with `1 / s`, so the rounding is AutoAWQ's.
pub fn divide_rows(x: &Tensor, s: &[f32]) -> Result<Tensor> {
    let (r, c) = x.dims2("divide_rows")?;
    if s.len() != r {
        return Err(Error::Shape { op: "divide_rows", detail: format!("{r} rows, {} divisors", s.len()) });
    }
    match operands("divide_rows", [x])? {
        Operands::Cpu => {
            let mut out = x.to_f32_vec()?;
            out.par_chunks_mut(c.max(1)).zip(s.par_iter()).for_each(|(row, s)| row.iter_mut().for_each(|v| *v /= s));
            Tensor::from_f32_as(&[r, c], out, x.dtype())
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda([sx], _) => cuda::by_vector("divide_rows", sx, x.shape(), s, c),
    }
}

/// `tanh(x / cap) * cap` elementwise, output in `x`'s dtype: Gemma's logit soft-capping
/// (transformers' `final_logit_softcapping`), which bounds every value to `(-cap, cap)` and keeps
/// their order. A scalar argument, not a tensor, so a recorded CUDA graph can hold it.
pub fn softcap(x: &Tensor, cap: f32) -> Result<Tensor> {
    if !(cap.is_finite() && cap > 0.0) {
        return Err(Error::Shape { op: "softcap", detail: format!("the cap must be a positive number, got {cap}") });
    }
    match operands("softcap", [x])? {
        Operands::Cpu => {
            let out = x.f32_values()?.par_iter().map(|v| (v / cap).tanh() * cap).collect();
            Tensor::from_f32_as(x.shape(), out, x.dtype())
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda([sx], _) => cuda::softcap(sx, x.shape(), cap),
    }
}

#[cfg(feature = "cuda")]
pub(crate) const CUDA_SOURCE: crate::cuda::CudaSource = crate::cuda::CudaSource {
    file: "ops/elementwise.cu",
    code: include_str!("elementwise.cu"),
    headers: &[],
    kernels: &[
        "add_f32_f32", "add_f32_f16", "add_f32_bf16",
        "add_f16_f32", "add_f16_f16", "add_f16_bf16",
        "add_bf16_f32", "add_bf16_f16", "add_bf16_bf16",
        "add_assign_f32_f32", "add_assign_f32_f16", "add_assign_f32_bf16",
        "add_assign_f16_f32", "add_assign_f16_f16", "add_assign_f16_bf16",
        "add_assign_bf16_f32", "add_assign_bf16_f16", "add_assign_bf16_bf16",
        "scale_columns_f32", "scale_columns_f16", "scale_columns_bf16",
        "divide_rows_f32", "divide_rows_f16", "divide_rows_bf16",
        "softcap_f32", "softcap_f16", "softcap_bf16",
    ],
};

#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::PushKernelArg;

    use super::CUDA_SOURCE;
    use crate::cuda::{grid_for, kernel_dim, CudaStorage};
    use crate::{Result, Tensor};

    pub(super) fn add(sa: &CudaStorage, sb: &CudaStorage, shape: &[usize]) -> Result<Tensor> {
        let dev = sa.dev();
        let n = sa.len();
        let mut out = dev.alloc_buf(sa.dtype(), n)?;
        if n > 0 {
            let n64 = n as u64;
            let kernel = dev.kernel(&CUDA_SOURCE, &format!("add_{}_{}", sa.dtype(), sb.dtype()))?;
            let mut args = kernel.args();
            sa.buf().arg(&mut args);
            sb.buf().arg(&mut args);
            out.arg_mut(&mut args);
            args.arg(&n64);
            // SAFETY: add_<a>_<b>(const A* a, const B* b, A* out, u64 n), the dtypes those of a, b
            // and out; all three hold n values (`add` checked the shapes), and the grid-stride loop
            // stops at n.
            unsafe { kernel.launch(args, grid_for(n, 256)) }?;
        }
        Ok(Tensor::from_cuda(shape, CudaStorage::new(dev.clone(), out)))
    }

    pub(super) fn add_assign(sa: &mut CudaStorage, sb: &CudaStorage) -> Result<()> {
        let n = sa.len();
        if n == 0 {
            return Ok(());
        }
        let dev = sa.dev().clone();
        let kernel = dev.kernel(&CUDA_SOURCE, &format!("add_assign_{}_{}", sa.dtype(), sb.dtype()))?;
        let target = sa.buf_mut()?;
        let n64 = n as u64;
        let mut args = kernel.args();
        target.arg_mut(&mut args);
        sb.buf().arg(&mut args);
        args.arg(&n64);
        // SAFETY: add_assign_<a>_<b>(A* a, const B* b, u64 n), the dtypes those of the target and
        // b: the target is not shared with another tensor (`buf_mut`); both hold n values (same
        // shape, checked by `add_assign`), and the grid-stride loop stops at n.
        unsafe { kernel.launch(args, grid_for(n, 256)) }
    }

    pub(super) fn softcap(sx: &CudaStorage, shape: &[usize], cap: f32) -> Result<Tensor> {
        let dev = sx.dev();
        let n = sx.len();
        let mut out = dev.alloc_buf(sx.dtype(), n)?;
        if n > 0 {
            let n64 = n as u64;
            let kernel = dev.kernel(&CUDA_SOURCE, &format!("softcap_{}", sx.dtype()))?;
            let mut args = kernel.args();
            sx.buf().arg(&mut args);
            out.arg_mut(&mut args);
            args.arg(&n64);
            args.arg(&cap);
            // SAFETY: softcap_<t>(const T* x, T* out, u64 n, float cap), the dtype that of x and
            // out, which both hold n values; the grid-stride loop stops at n.
            unsafe { kernel.launch(args, grid_for(n, 256)) }?;
        }
        Ok(Tensor::from_cuda(shape, CudaStorage::new(dev.clone(), out)))
    }

    /// Launches `<kernel>_<dtype>(x, s, out, n, cols)`: an elementwise op with a per-row
    /// (`divide_rows`) or per-column (`scale_columns`) vector.
    pub(super) fn by_vector(kernel: &'static str, sx: &CudaStorage, shape: &[usize], s: &[f32], c: usize) -> Result<Tensor> {
        let dev = sx.dev();
        let n = sx.len();
        let mut out = dev.alloc_buf(sx.dtype(), n)?;
        if n > 0 {
            let scales = dev.upload(s)?;
            let (n64, cols) = (n as u64, kernel_dim(kernel, c)?);
            let name = format!("{kernel}_{}", sx.dtype());
            let kernel = dev.kernel(&CUDA_SOURCE, &name)?;
            let mut args = kernel.args();
            sx.buf().arg(&mut args);
            args.arg(&scales);
            out.arg_mut(&mut args);
            args.arg(&n64);
            args.arg(&cols);
            // SAFETY: scale_columns_<t> / divide_rows_<t>(const T* x, const float* s, T* out, u64
            // n, u32 cols): x and out hold n = rows * cols values of x's dtype, s one f32 per column
            // or per row (checked by the op), indexed i % cols or i / cols for i < n.
            unsafe { kernel.launch(args, grid_for(n, 256)) }?;
        }
        Ok(Tensor::from_cuda(shape, CudaStorage::new(dev.clone(), out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    #[test]
    fn adds_and_scales() {
        let a = Tensor::from_f32(&[2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let b = Tensor::from_f32(&[2, 2], vec![0.5, -2.0, 1.0, 0.25]).unwrap();
        assert_eq!(add(&a, &b).unwrap().to_f32_vec().unwrap(), vec![1.5, 0.0, 4.0, 4.25]);
        let mut c = a.clone();
        add_assign(&mut c, &b).unwrap();
        assert_eq!(c.to_f32_vec().unwrap(), vec![1.5, 0.0, 4.0, 4.25]);
        assert_eq!(scale_columns(&a, &[2.0, -1.0]).unwrap().to_f32_vec().unwrap(), vec![2.0, -2.0, 6.0, -4.0]);
        assert!(add(&a, &Tensor::zeros(&[4], DType::F32)).is_err());
        assert!(scale_columns(&a, &[1.0]).is_err());
        assert_eq!(divide_rows(&a, &[2.0, -0.5]).unwrap().to_f32_vec().unwrap(), vec![0.5, 1.0, -6.0, -8.0]);
        assert!(divide_rows(&a, &[1.0; 3]).is_err());
        // A half-precision target: the f32 sum rounded once.
        let mut h = Tensor::from_f32(&[1, 2], vec![1.0, 1000.0]).unwrap().into_dtype(DType::F16);
        add_assign(&mut h, &Tensor::from_f32(&[1, 2], vec![0.25, 0.3]).unwrap()).unwrap();
        assert_eq!((h.dtype(), h.to_f32_vec().unwrap()), (DType::F16, vec![1.25, 1000.5]));
    }

    #[test]
    fn softcap_bounds_values_by_tanh() {
        let x = Tensor::from_f32(&[1, 4], vec![0.0, 3.0, -60.0, 1e6]).unwrap();
        let got = softcap(&x, 30.0).unwrap().to_f32_vec().unwrap();
        let want: Vec<f32> = [0.0f64, 3.0, -60.0, 1e6].iter().map(|v| ((v / 30.0).tanh() * 30.0) as f32).collect();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{got:?} vs {want:?}");
        }
        assert!(got[3] <= 30.0 && got[2] > -30.0);
        assert!(softcap(&x, 0.0).is_err() && softcap(&x, f32::NAN).is_err());
    }
}
