//! Row-wise softmax, stabilised by subtracting the row maximum.

use rayon::prelude::*;

use super::cpu_only;
use crate::{Result, Tensor};

/// Softmax over the last dimension of a matrix; output in `x`'s dtype.
pub fn softmax_rows(x: &Tensor) -> Result<Tensor> {
    cpu_only("softmax", &[x])?;
    let (r, c) = x.dims2("softmax")?;
    let mut out = x.to_f32_vec();
    out.par_chunks_mut(c.max(1)).for_each(|row| {
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f64;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v as f64;
        }
        let inv = (1.0 / sum) as f32;
        row.iter_mut().for_each(|v| *v *= inv);
    });
    Tensor::from_f32_as(&[r, c], out, x.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_sum_to_one_and_match_formula() {
        let x = Tensor::from_f32(&[2, 3], vec![1.0, 2.0, 3.0, 1000.0, 1000.0, -1000.0]).unwrap();
        let y = softmax_rows(&x).unwrap().to_f32_vec();
        let z: f64 = [1.0f64, 2.0, 3.0].iter().map(|v| v.exp()).sum();
        for (i, v) in [1.0f64, 2.0, 3.0].iter().enumerate() {
            assert!((y[i] as f64 - v.exp() / z).abs() < 1e-7);
        }
        assert_eq!(&y[3..], &[0.5, 0.5, 0.0]);
    }
}
