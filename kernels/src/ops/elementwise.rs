//! Elementwise arithmetic: residual adds and per-column scaling.

use rayon::prelude::*;

use super::cpu_only;
use crate::{DType, Error, Result, Tensor};

fn same_shape(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(Error::Shape { op, detail: format!("{:?} vs {:?}", a.shape(), b.shape()) });
    }
    Ok(())
}

/// `a + b`, output in `a`'s dtype.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    cpu_only(&[a, b])?;
    same_shape("add", a, b)?;
    let (x, y) = (a.f32_values(), b.f32_values());
    let out = x.par_iter().zip(y.par_iter()).map(|(x, y)| x + y).collect();
    Tensor::from_f32_as(a.shape(), out, a.dtype())
}

/// `a += b` for an f32 `a` (the residual stream), without a new allocation.
pub fn add_assign(a: &mut Tensor, b: &Tensor) -> Result<()> {
    cpu_only(&[a, b])?;
    same_shape("add_assign", a, b)?;
    let y = b.f32_values();
    let x = a.f32_values_mut().ok_or(Error::DType { op: "add_assign", dtype: DType::F16 })?;
    x.par_iter_mut().zip(y.par_iter()).for_each(|(x, y)| *x += y);
    Ok(())
}

/// `x[R, C] * s[C]`: multiplies column `c` by `s[c]` (how AWQ applies per-channel scales).
pub fn scale_columns(x: &Tensor, s: &[f32]) -> Result<Tensor> {
    cpu_only(&[x])?;
    let (r, c) = x.dims2("scale_columns")?;
    if s.len() != c {
        return Err(Error::Shape { op: "scale_columns", detail: format!("{c} columns, {} scales", s.len()) });
    }
    let mut out = x.to_f32_vec();
    out.par_chunks_mut(c.max(1)).for_each(|row| row.iter_mut().zip(s).for_each(|(v, s)| *v *= s));
    Tensor::from_f32_as(&[r, c], out, x.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_and_scales() {
        let a = Tensor::from_f32(&[2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let b = Tensor::from_f32(&[2, 2], vec![0.5, -2.0, 1.0, 0.25]).unwrap();
        assert_eq!(add(&a, &b).unwrap().to_f32_vec(), vec![1.5, 0.0, 4.0, 4.25]);
        let mut c = a.clone();
        add_assign(&mut c, &b).unwrap();
        assert_eq!(c.to_f32_vec(), vec![1.5, 0.0, 4.0, 4.25]);
        assert_eq!(scale_columns(&a, &[2.0, -1.0]).unwrap().to_f32_vec(), vec![2.0, -2.0, 6.0, -4.0]);
        assert!(add(&a, &Tensor::zeros(&[4], DType::F32)).is_err());
        assert!(scale_columns(&a, &[1.0]).is_err());
        let mut h = a.clone().into_dtype(DType::F16);
        assert!(matches!(add_assign(&mut h, &b), Err(Error::DType { .. })));
    }
}
