//! Embedding lookup: one table row per token id.

use super::cpu_only;
use crate::{DType, Error, Result, Tensor};

/// Gathers rows of `table[V, D]` for `ids`, returning `[ids.len(), D]` in `out_dtype`.
pub fn embedding(table: &Tensor, ids: &[u32], out_dtype: DType) -> Result<Tensor> {
    cpu_only("embedding", &[table])?;
    let (v, d) = table.dims2("embedding")?;
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= v) {
        return Err(Error::Index { op: "embedding", index: bad as usize, len: v });
    }
    let mut out = Vec::with_capacity(ids.len() * d);
    for &id in ids {
        out.extend_from_slice(&table.rows(id as usize, id as usize + 1)?.f32_values());
    }
    Tensor::from_f32_as(&[ids.len(), d], out, out_dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathers_rows_and_checks_ids() {
        let t = Tensor::from_f32(&[3, 2], vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]).unwrap().into_dtype(DType::F16);
        let e = embedding(&t, &[2, 0, 2], DType::F32).unwrap();
        assert_eq!(e.to_f32_vec(), vec![4.0, 5.0, 0.0, 1.0, 4.0, 5.0]);
        assert!(matches!(embedding(&t, &[3], DType::F32), Err(Error::Index { index: 3, len: 3, .. })));
    }
}
