//! Linear layers: `y = x W^T + b`, the op that carries nearly all of a decoder's FLOPs.
//!
//! The CPU path converts operands to f32 (a no-op for f32 tensors) and calls the `gemm` crate, which
//! packs panels and runs SIMD micro-kernels across rayon threads.

use gemm::Parallelism;

use super::cpu_only;
use crate::{Error, Result, Tensor};

/// `y[M, N] = x[M, K] · w[N, K]^T (+ bias[N])`, output in `x`'s dtype.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    cpu_only(&[x, w])?;
    let (m, k) = x.dims2("linear")?;
    let (n, kw) = w.dims2("linear")?;
    if k != kw {
        return Err(Error::Shape {
            op: "linear",
            detail: format!("input has {k} features, weight [{n}, {kw}] expects {kw}"),
        });
    }
    let bias_values = match bias {
        Some(b) if b.shape() != [n] => {
            return Err(Error::Shape {
                op: "linear",
                detail: format!("bias has shape {:?}, weight has {n} outputs", b.shape()),
            })
        }
        Some(b) => Some(b.f32_values()),
        None => None,
    };
    let (xv, wv) = (x.f32_values(), w.f32_values());
    let mut out = vec![0.0f32; m * n];
    if let Some(b) = &bias_values {
        for row in out.chunks_exact_mut(n) {
            row.copy_from_slice(b);
        }
    }
    // rhs[k, n] = w[n, k]: row stride 1, column stride k.
    let rhs = StridedMatrix { data: &wv, row_stride: 1, col_stride: k as isize };
    let lhs = StridedMatrix { data: &xv, row_stride: k as isize, col_stride: 1 };
    matmul_f32(m, n, k, lhs, rhs, &mut out, n, bias_values.is_some(), true);
    Tensor::from_f32_as(&[m, n], out, x.dtype())
}

/// A read-only f32 matrix view with arbitrary strides (in elements).
#[derive(Clone, Copy)]
pub struct StridedMatrix<'a> {
    pub data: &'a [f32],
    pub row_stride: isize,
    pub col_stride: isize,
}

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]` on strided f32 views; `dst` is row-major with row stride
/// `dst_row_stride`. `accumulate` adds to what `dst` holds; `parallel` lets gemm use the rayon pool
/// (pass `false` when already inside a parallel loop).
#[allow(clippy::too_many_arguments)]
pub fn matmul_f32(
    m: usize,
    n: usize,
    k: usize,
    lhs: StridedMatrix<'_>,
    rhs: StridedMatrix<'_>,
    dst: &mut [f32],
    dst_row_stride: usize,
    accumulate: bool,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |v: &StridedMatrix<'_>, rows: usize, cols: usize| {
        (rows as isize - 1) * v.row_stride + (cols as isize - 1) * v.col_stride
    };
    // The views must cover every element the kernel will read; these hold for all callers in this
    // crate, which derive strides from checked shapes.
    assert!(k == 0 || (last(&lhs, m, k) as usize) < lhs.data.len(), "lhs view out of bounds");
    assert!(k == 0 || (last(&rhs, k, n) as usize) < rhs.data.len(), "rhs view out of bounds");
    assert!((m - 1) * dst_row_stride + n <= dst.len(), "dst view out of bounds");
    let threads = rayon::current_num_threads();
    let parallelism = if parallel && threads > 1 && m * n * k > 64 * 64 * 64 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the asserts above keep every access inside the three slices; dst is borrowed mutably,
    // so it cannot alias lhs or rhs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_row_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride,
            lhs.row_stride,
            rhs.data.as_ptr(),
            rhs.col_stride,
            rhs.row_stride,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{randn, rel};
    use crate::rng::SplitMix64;
    use crate::DType;

    fn reference(x: &[f32], w: &[f32], b: Option<&[f32]>, m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut out = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = b.map_or(0.0, |b| b[j] as f64);
                for l in 0..k {
                    s += x[i * k + l] as f64 * w[j * k + l] as f64;
                }
                out[i * n + j] = s;
            }
        }
        out
    }

    #[test]
    fn matches_f64_reference_across_shapes_and_dtypes() {
        let mut rng = SplitMix64::new(7);
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (17, 33, 65), (128, 96, 200), (1, 300, 129)] {
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let x = randn(&mut rng, &[m, k], 1.0, dtype);
                let w = randn(&mut rng, &[n, k], 0.2, dtype);
                let b = randn(&mut rng, &[n], 0.5, dtype);
                for bias in [None, Some(&b)] {
                    let y = linear(&x, &w, bias).unwrap();
                    assert_eq!(y.shape(), &[m, n]);
                    assert_eq!(y.dtype(), dtype);
                    let bv = bias.map(|b| b.to_f32_vec());
                    let r = reference(&x.to_f32_vec(), &w.to_f32_vec(), bv.as_deref(), m, n, k);
                    // f32 accumulation: ~1e-6; the output rounding dominates for f16 (2^-11) and
                    // bf16 (2^-8).
                    let tol = match dtype {
                        DType::F32 => 1e-5,
                        DType::F16 => 1e-3,
                        DType::BF16 => 8e-3,
                    };
                    let e = rel(&y.to_f32_vec(), &r);
                    assert!(e < tol, "{m}x{n}x{k} {dtype}: rel err {e}");
                }
            }
        }
    }

    #[test]
    fn rejects_mismatched_shapes() {
        let x = Tensor::zeros(&[2, 3], DType::F32);
        let w = Tensor::zeros(&[4, 5], DType::F32);
        assert!(matches!(linear(&x, &w, None), Err(Error::Shape { op: "linear", .. })));
        let w = Tensor::zeros(&[4, 3], DType::F32);
        let b = Tensor::zeros(&[3], DType::F32);
        assert!(matches!(linear(&x, &w, Some(&b)), Err(Error::Shape { .. })));
    }
}
