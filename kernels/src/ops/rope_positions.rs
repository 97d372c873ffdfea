//! Rotary position embedding at given positions: [`super::apply_rope`]'s formula, for rows whose
//! positions are not `0..seq_len` (a serving step mixes prefill chunks that start mid-sequence and
//! decodes, one row each).
//!
//! Row `r` of `x` is rotated by the angle `positions[r] * inv_freq[i]`, computed in f64 and rounded
//! to f32 exactly as `apply_rope` does, so a token gets bit-identical values from either op. CUDA
//! answers [`Error::NoCudaImplementation`] for now.

use rayon::prelude::*;

use super::{operands, Operands, RopeTable};
use crate::{Error, Result, Tensor};

/// Rotates `x[rows, n_heads * head_dim]`, row `r` at position `positions[r]`; output in `x`'s dtype.
///
/// Errors: [`Error::Shape`] when `positions` does not have one entry per row or the heads do not
/// fit the width, [`Error::NoCudaImplementation`] on a CUDA device.
pub fn apply_rope_at(
    x: &Tensor,
    n_heads: usize,
    head_dim: usize,
    positions: &[usize],
    table: &RopeTable,
) -> Result<Tensor> {
    let (rows, width) = x.dims2("rope_at")?;
    let rot = table.rotary_dim();
    if width != n_heads * head_dim || rot > head_dim || rows != positions.len() {
        return Err(Error::Shape {
            op: "rope_at",
            detail: format!(
                "x is [{rows}, {width}], {n_heads} heads of {head_dim}, rotary dim {rot}, {} positions",
                positions.len()
            ),
        });
    }
    match operands("rope_at", [x])? {
        Operands::Cpu => {}
        #[cfg(feature = "cuda")]
        Operands::Cuda(..) => return Err(Error::NoCudaImplementation { op: "rope_at", device: x.device() }),
    }
    let half = rot / 2;
    let mut out = x.to_f32_vec()?;
    out.par_chunks_mut(width.max(1)).zip(positions.par_iter()).for_each(|(row, &pos)| {
        let (cos, sin): (Vec<f32>, Vec<f32>) = table
            .inv_freq()
            .iter()
            .map(|&f| {
                let angle = pos as f64 * f;
                (angle.cos() as f32, angle.sin() as f32)
            })
            .unzip();
        for head in row.chunks_exact_mut(head_dim) {
            let (x1, rest) = head.split_at_mut(half);
            let x2 = &mut rest[..half];
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                x1[i] = a * cos[i] - b * sin[i];
                x2[i] = b * cos[i] + a * sin[i];
            }
        }
    });
    Tensor::from_f32_as(&[rows, width], out, x.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::apply_rope;
    use crate::ops::test_util::rel;
    use crate::rng::SplitMix64;

    #[test]
    fn rope_at_positions_matches_the_f64_formula_and_apply_rope() {
        let mut rng = SplitMix64::new(3);
        let (heads, hd) = (3, 10);
        // Partial rotary (8 of 10) and a llama-like base.
        let table = RopeTable::new(8, 10_000.0);
        let positions = [0, 5, 1, 1000, 7, 7];
        let x = Tensor::from_f32(&[6, heads * hd], rng.normal_vec(6 * heads * hd, 1.0)).unwrap();
        let got = apply_rope_at(&x, heads, hd, &positions, &table).unwrap();
        let xv = x.f32_values().unwrap();
        let mut want = Vec::new();
        for (r, &p) in positions.iter().enumerate() {
            for h in 0..heads {
                let head = &xv[(r * heads + h) * hd..][..hd];
                for i in 0..hd {
                    let v = if i < 4 {
                        let a = p as f64 * table.inv_freq()[i];
                        head[i] as f64 * a.cos() - head[i + 4] as f64 * a.sin()
                    } else if i < 8 {
                        let a = p as f64 * table.inv_freq()[i - 4];
                        head[i] as f64 * a.cos() + head[i - 4] as f64 * a.sin()
                    } else {
                        head[i] as f64
                    };
                    want.push(v);
                }
            }
        }
        let e = rel(&got.f32_values().unwrap(), &want);
        assert!(e < 1e-6, "relative error {e}");

        // Positions 0..T give apply_rope's values bit for bit.
        let t = 9;
        let x = Tensor::from_f32(&[t, heads * hd], rng.normal_vec(t * heads * hd, 1.0)).unwrap();
        let positions: Vec<usize> = (0..t).collect();
        assert_eq!(
            apply_rope_at(&x, heads, hd, &positions, &table).unwrap(),
            apply_rope(&x, heads, hd, t, &table).unwrap()
        );

        let err = apply_rope_at(&x, heads, hd, &positions[1..], &table).unwrap_err();
        assert!(matches!(err, Error::Shape { op: "rope_at", .. }), "{err}");
    }
}
