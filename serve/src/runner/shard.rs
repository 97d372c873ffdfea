//! Tensor parallelism (Megatron-LM): how a block's weights split over `tp` ranks.
//!
//! Every rank holds `n_heads / tp` query heads and the KV heads they read: `n_kv_heads / tp` of them
//! when `tp` divides `n_kv_heads`, else (when `n_kv_heads` divides `tp`) one KV head replicated on
//! `tp / n_kv_heads` ranks. The descriptor's [`Split`] of each linear says how it is cut: `Column`
//! linears (q, k, v, gate, up) keep the output rows of their rank's heads or MLP columns, with the
//! matching bias rows; `Row` linears (o, down) keep the input columns, and rank 0 alone keeps the
//! bias (added once). A block's attention and MLP outputs are then the sum of the ranks' partial
//! outputs, added in rank order (the all-reduce; fixed order, so results do not depend on thread
//! timing). Embeddings, norms and the LM head stay replicated. A sparse block's experts split as the
//! dense MLP does, each over its own width (`expert_mlp`: gate and up by rows, down by columns, all
//! of them summed by the same all-reduce after the block); its router is replicated (every rank
//! routes every token alike, `runner::moe`).

use std::ops::Range;

use awq_kernels::ops::PackedLinear;
use awq_kernels::Tensor;
use awq_model::arch::{ArchDescriptor, LinearId, LinearRole, Split};
use awq_model::{LinearWeights, ModelConfig};

use crate::{Error, Result};

/// What rank `rank` of `tp` holds of a block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankSlice {
    pub rank: usize,
    /// Query heads `q_heads` (global indices).
    pub q_heads: Range<usize>,
    /// KV heads `kv_heads` (global indices).
    pub kv_heads: Range<usize>,
    /// MLP columns (`intermediate_size` indices).
    pub mlp: Range<usize>,
    /// Each expert's MLP columns (indices into one expert's width; empty without experts).
    pub expert_mlp: Range<usize>,
}

impl RankSlice {
    /// The slices of every rank of `tp`. Errors (`InvalidConfig` naming `tp`) when `tp` does not
    /// divide the query heads or the MLP, or neither divides the other with the KV heads.
    pub fn all(config: &ModelConfig, tp: usize) -> Result<Vec<RankSlice>> {
        let (h, kv, inter) = (config.n_heads, config.n_kv_heads, config.intermediate_size);
        let expert = config.moe.as_ref().map_or(0, |m| m.expert_intermediate_size);
        let fits = tp >= 1
            && h % tp == 0
            && inter % tp == 0
            && expert.is_multiple_of(tp)
            && (kv.is_multiple_of(tp) || tp.is_multiple_of(kv));
        if !fits {
            let experts = if expert > 0 { format!(", {expert} columns of each expert") } else { String::new() };
            return Err(Error::InvalidConfig {
                field: "tp",
                expected: format!(
                    "a divisor of {h} attention heads and {inter} MLP columns{experts} that divides or is a multiple \
                     of {kv} KV heads"
                ),
                got: tp.to_string(),
            });
        }
        let (hpr, ipr, epr) = (h / tp, inter / tp, expert / tp);
        Ok((0..tp)
            .map(|rank| {
                let kv_heads = if kv >= tp {
                    let n = kv / tp;
                    rank * n..(rank + 1) * n
                } else {
                    let k = rank / (tp / kv);
                    k..k + 1
                };
                RankSlice {
                    rank,
                    q_heads: rank * hpr..(rank + 1) * hpr,
                    kv_heads,
                    mlp: rank * ipr..(rank + 1) * ipr,
                    expert_mlp: rank * epr..(rank + 1) * epr,
                }
            })
            .collect())
    }

    /// Which part of `role`'s weights this rank keeps, and along which side: output rows (`Column`)
    /// or input columns (`Row`). Errors (`InvalidConfig` naming `tp`) for a split the runner does
    /// not know.
    fn cut(&self, arch: &ArchDescriptor, config: &ModelConfig, id: LinearId) -> Result<(Range<usize>, Split)> {
        let hd = config.head_dim;
        let heads = |r: &Range<usize>| r.start * hd..r.end * hd;
        if id.expert.is_some() {
            return match (id.role, arch.linear_spec(id).split) {
                (LinearRole::Gate | LinearRole::Up, Split::Column) | (LinearRole::Down, Split::Row) => {
                    Ok((self.expert_mlp.clone(), arch.linear_spec(id).split))
                }
                (role, split) => Err(Error::InvalidConfig {
                    field: "tp",
                    expected: "1 for this architecture (its experts split in a way the runner does not)".into(),
                    got: format!("{role:?} split {split:?}"),
                }),
            };
        }
        let role = id.role;
        Ok(match (role, arch.linear(role).split) {
            (LinearRole::Q, Split::Column) | (LinearRole::O, Split::Row) => {
                (heads(&self.q_heads), arch.linear(role).split)
            }
            (LinearRole::K | LinearRole::V, Split::Column) => (heads(&self.kv_heads), Split::Column),
            (LinearRole::Gate | LinearRole::Up, Split::Column) | (LinearRole::Down, Split::Row) => {
                (self.mlp.clone(), arch.linear(role).split)
            }
            (role, split) => {
                return Err(Error::InvalidConfig {
                    field: "tp",
                    expected: "1 for this architecture (its descriptor splits a linear in a way the runner does not)"
                        .into(),
                    got: format!("{role:?} split {split:?}"),
                })
            }
        })
    }

    /// The weights of `role` this rank keeps (see the module docs).
    pub fn linear(
        &self,
        arch: &ArchDescriptor,
        config: &ModelConfig,
        id: impl Into<LinearId>,
        full: &LinearWeights,
    ) -> Result<LinearWeights> {
        let (range, split) = self.cut(arch, config, id.into())?;
        Ok(match split {
            Split::Column => LinearWeights {
                weight: full.weight.rows(range.start, range.end)?,
                bias: full.bias.as_ref().map(|b| slice_1d(b, range.clone())).transpose()?,
            },
            Split::Row => LinearWeights {
                weight: columns(&full.weight, range)?,
                bias: if self.rank == 0 { full.bias.clone() } else { None },
            },
        })
    }

    /// [`RankSlice::linear`] of an INT4 linear in AutoAWQ's packing (cut along whole packed words
    /// and whole groups) and its bias.
    pub fn packed(
        &self,
        arch: &ArchDescriptor,
        config: &ModelConfig,
        id: impl Into<LinearId>,
        full: &PackedLinear,
        bias: Option<Tensor>,
    ) -> Result<(PackedLinear, Option<Tensor>)> {
        let (range, split) = self.cut(arch, config, id.into())?;
        Ok(match split {
            Split::Column => (full.slice_outputs(range.clone())?, bias.map(|b| slice_1d(&b, range)).transpose()?),
            Split::Row => (full.slice_inputs(range)?, bias.filter(|_| self.rank == 0)),
        })
    }
}

/// Columns `range` of a matrix, in its dtype.
fn columns(t: &Tensor, range: Range<usize>) -> awq_kernels::Result<Tensor> {
    let (rows, cols) = t.dims2("tp columns")?;
    let v = t.f32_values()?;
    let mut out = Vec::with_capacity(rows * range.len());
    for r in 0..rows {
        out.extend_from_slice(&v[r * cols + range.start..r * cols + range.end]);
    }
    Tensor::from_f32_as(&[rows, range.len()], out, t.dtype())
}

/// Entries `range` of a vector, in its dtype.
fn slice_1d(t: &Tensor, range: Range<usize>) -> awq_kernels::Result<Tensor> {
    Tensor::from_f32_as(&[range.len()], t.f32_values()?[range].to_vec(), t.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(h: usize, kv: usize, inter: usize) -> ModelConfig {
        let text = format!(
            r#"{{"model_type": "llama", "hidden_size": {}, "intermediate_size": {inter}, "num_hidden_layers": 1,
                "num_attention_heads": {h}, "num_key_value_heads": {kv}, "vocab_size": 10}}"#,
            h * 8
        );
        ModelConfig::parse(std::path::Path::new("config.json"), &text).unwrap()
    }

    #[test]
    fn heads_split_or_replicate_as_the_kv_heads_allow() {
        let c = config(9, 3, 24);
        let s = RankSlice::all(&c, 3).unwrap();
        assert_eq!(s[1], RankSlice { rank: 1, q_heads: 3..6, kv_heads: 1..2, mlp: 8..16, expert_mlp: 0..0 });
        let c = config(8, 2, 16);
        let s = RankSlice::all(&c, 4).unwrap();
        // Two ranks share each KV head; query head h still reads KV head h / 4.
        let kv: Vec<_> = s.iter().map(|r| r.kv_heads.clone()).collect();
        assert_eq!(kv, [0..1, 0..1, 1..2, 1..2]);
        assert_eq!(s[3].q_heads, 6..8);
        for bad in [0, 3, 5] {
            let err = RankSlice::all(&c, bad).unwrap_err();
            assert!(matches!(err, Error::InvalidConfig { field: "tp", .. }), "{err}");
        }
    }
}
