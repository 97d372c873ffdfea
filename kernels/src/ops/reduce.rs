//! Reductions: per-column means, maxima and the relative error used by every numeric test.

use super::cpu_only;
use crate::{Error, Result, Tensor};

/// Mean of |x| over the rows of `x[R, C]`, per column, accumulated in f64 (AWQ's `x_mean`).
pub fn mean_abs_columns(x: &Tensor) -> Result<Vec<f32>> {
    cpu_only(&[x])?;
    let (r, c) = x.dims2("mean_abs_columns")?;
    let mut sums = vec![0.0f64; c];
    for row in x.f32_values().chunks_exact(c.max(1)) {
        sums.iter_mut().zip(row).for_each(|(s, v)| *s += v.abs() as f64);
    }
    Ok(sums.into_iter().map(|s| (s / r.max(1) as f64) as f32).collect())
}

/// Largest |x| over all values (0 for an empty tensor).
pub fn max_abs(x: &Tensor) -> Result<f32> {
    cpu_only(&[x])?;
    Ok(x.f32_values().iter().fold(0.0f32, |m, v| m.max(v.abs())))
}

/// `||out - reference|| / ||reference||` in f64: how numeric tests and benchmarks compare results.
pub fn relative_error(out: &Tensor, reference: &Tensor) -> Result<f64> {
    if out.shape() != reference.shape() {
        return Err(Error::Shape {
            op: "relative_error",
            detail: format!("{:?} vs {:?}", out.shape(), reference.shape()),
        });
    }
    let (a, b) = (out.f32_values(), reference.f32_values());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b.iter()) {
        let (x, y) = (*x as f64, *y as f64);
        num += (x - y) * (x - y);
        den += y * y;
    }
    Ok(if den == 0.0 { num.sqrt() } else { (num / den).sqrt() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reductions_match_hand_values() {
        let x = Tensor::from_f32(&[2, 3], vec![1.0, -2.0, 3.0, -3.0, 2.0, 0.0]).unwrap();
        assert_eq!(mean_abs_columns(&x).unwrap(), vec![2.0, 2.0, 1.5]);
        assert_eq!(max_abs(&x).unwrap(), 3.0);
        let y = Tensor::from_f32(&[2, 3], vec![1.0, -2.0, 3.0, -3.0, 2.0, 1.0]).unwrap();
        let e = relative_error(&x, &y).unwrap();
        assert!((e - (1.0f64 / 28.0).sqrt()).abs() < 1e-12);
    }
}
