//! Negative log-likelihood of target tokens under logits: the sum behind perplexity.

use rayon::prelude::*;

use super::cpu_only;
use crate::{Error, Result, Tensor};

/// `-sum_i log softmax(logits[i])[targets[i]]` in f64, for `logits[T, V]` and `T` targets.
pub fn nll_sum(logits: &Tensor, targets: &[u32]) -> Result<f64> {
    cpu_only("nll", &[logits])?;
    let (t, v) = logits.dims2("nll")?;
    if targets.len() != t {
        return Err(Error::Shape { op: "nll", detail: format!("{t} rows of logits, {} targets", targets.len()) });
    }
    if let Some(&bad) = targets.iter().find(|&&id| id as usize >= v) {
        return Err(Error::Index { op: "nll", index: bad as usize, len: v });
    }
    let values = logits.f32_values();
    Ok(values
        .par_chunks(v.max(1))
        .zip(targets.par_iter())
        .map(|(row, &target)| {
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let log_z = row.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln() + max;
            log_z - row[target as usize] as f64
        })
        .sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_logits_give_log_vocab() {
        let logits = Tensor::from_f32(&[2, 4], vec![0.5; 8]).unwrap();
        let nll = nll_sum(&logits, &[1, 3]).unwrap();
        assert!((nll - 2.0 * 4f64.ln()).abs() < 1e-12);
        let peaked = Tensor::from_f32(&[1, 3], vec![0.0, 50.0, 0.0]).unwrap();
        assert!(nll_sum(&peaked, &[1]).unwrap() < 1e-20);
        assert!(nll_sum(&peaked, &[3]).is_err());
        assert!(nll_sum(&peaked, &[0, 1]).is_err());
    }
}
