//! What a decoder block's forward pass is made of, shared by the serving runner (serving, `awq eval`)
//! and the worker's `block_forward` (quantization): the per-model constants ([`BlockShape`], with each
//! block's attention span and RoPE, [`BlockAttention`]), a linear layer as the forward pass applies it
//! ([`ApplyLinear`]), the gated MLP ([`gated_mlp`]), the per-head RMSNorm of q and k that some
//! architectures have ([`head_rms_norm`]: Qwen3, Gemma 3) and the factor an RMSNorm applies
//! ([`norm_weight`]: the stored weight, or Gemma's `1 + w`). A sparse block's mixture of experts is
//! [`super::moe`]'s, shared the same way.
//!
//! The attention halves differ: the worker attends over whole sequences (`ops::causal_attention`),
//! the runner over the paged KV cache (`ops::paged_attention`); everything else is these functions.

use std::borrow::Cow;

use awq_kernels::ops::{self, AttentionShape, GatedActivation, PagedAttentionShape, RopeTable};
use awq_kernels::{DType, Tensor};
use awq_model::arch::{NormForm, NormRole};
use awq_model::{Checkpoint, LinearWeights};

use super::moe::MoeRouting;

/// The per-model constants of a block forward, resolved once from config and descriptor.
#[derive(Clone, Debug)]
pub struct BlockShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub activation: GatedActivation,
    /// The RoPE tables of the model's blocks, each once (one for most models; Gemma 3: its global
    /// blocks' and its sliding ones'), which [`BlockAttention::rope`] indexes.
    pub ropes: Vec<RopeTable>,
    /// Each block's attention, by block index.
    pub blocks: Vec<BlockAttention>,
    /// Whether each head of q and k goes through an RMSNorm (the block's `QHead` / `KHead` norms,
    /// with `rms_norm_eps`) between its projection and RoPE: the descriptor lists those norms.
    pub qk_norm: bool,
    /// Whether the attention's and the MLP's outputs go through an RMSNorm (the block's `AttnOut` /
    /// `MlpOut` norms) before the residual adds: the descriptor lists those norms.
    pub post_norms: bool,
    /// How every norm applies its weight ([`norm_weight`]).
    pub norm_form: NormForm,
    /// The attention scores' factor (`ArchDescriptor::score_scale`: `1 / sqrt(head_dim)`, or
    /// Gemma's `1 / sqrt(query_pre_attn_scalar)`).
    pub score_scale: f32,
    /// How a sparse block routes its tokens (`ModelConfig::moe`), for architectures with experts;
    /// which blocks are sparse is their weights' business (a router, experts).
    pub moe: Option<MoeRouting>,
}

/// One block's attention: how far back it looks and which RoPE it rotates with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockAttention {
    /// The last this many positions (including its own), or all of them.
    pub sliding_window: Option<usize>,
    /// Index into [`BlockShape::ropes`].
    pub rope: usize,
}

impl BlockShape {
    pub fn of(checkpoint: &Checkpoint) -> BlockShape {
        let (c, arch) = (checkpoint.config(), checkpoint.arch());
        let mut ropes: Vec<RopeTable> = Vec::new();
        let blocks = (0..c.n_blocks)
            .map(|b| {
                let table = RopeTable::from_inv_freq(c.block_rope_inv_freq(b));
                let rope = match ropes.iter().position(|r| *r == table) {
                    Some(i) => i,
                    None => {
                        ropes.push(table);
                        ropes.len() - 1
                    }
                };
                BlockAttention { sliding_window: arch.sliding_window(c, b), rope }
            })
            .collect();
        if ropes.is_empty() {
            // A model of no blocks still has a RoPE (what the runner's position table covers).
            ropes.push(RopeTable::from_inv_freq(c.rope_inv_freq()));
        }
        BlockShape {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            rms_norm_eps: c.rms_norm_eps as f32,
            activation: c.activation,
            ropes,
            blocks,
            qk_norm: arch.has_norm(NormRole::QHead),
            post_norms: arch.has_norm(NormRole::AttnOut),
            norm_form: arch.norm_form,
            score_scale: arch.score_scale(c),
            moe: c.moe.as_ref().filter(|_| arch.moe.is_some()).map(|m| MoeRouting {
                n_experts: m.n_experts,
                top_k: m.experts_per_token,
                renormalize: m.renormalize,
            }),
        }
    }

    /// Block `block_idx`'s sliding window, if it has one.
    ///
    /// # Panics
    /// For a block the model does not have (blocks come from its checkpoint, which checks them).
    pub fn window(&self, block_idx: usize) -> Option<usize> {
        self.blocks[block_idx].sliding_window
    }

    /// The RoPE block `block_idx` rotates with.
    ///
    /// # Panics
    /// As [`BlockShape::window`].
    pub fn rope(&self, block_idx: usize) -> &RopeTable {
        &self.ropes[self.blocks[block_idx].rope]
    }

    /// Block `block_idx`'s attention layout over whole sequences of `seq_len` tokens.
    ///
    /// # Panics
    /// As [`BlockShape::window`].
    pub fn attention_shape(&self, block_idx: usize, seq_len: usize) -> AttentionShape {
        AttentionShape {
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            seq_len,
            sliding_window: self.window(block_idx),
        }
    }

    /// The layout of a paged cache of `block_size`-token blocks (no window: what the cache holds is
    /// the same for every block; [`BlockShape::window`] restricts what a block's attention reads).
    pub fn paged_shape(&self, block_size: usize) -> PagedAttentionShape {
        PagedAttentionShape {
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            block_size,
            sliding_window: None,
        }
    }
}

/// The factor an RMSNorm of `form` multiplies the normalised values by, from its `stored` weight:
/// the weight itself (`Plain`), or `1 + w` (`OnePlus`, Gemma) computed in f32 and kept in f32 on the
/// weight's device: rounded to f16, `1 + w` would lose the small offsets that make up the weight
/// (steps of 2^-10 near 1), and `ops::rms_norm` takes a weight of any dtype.
pub fn norm_weight(stored: &Tensor, form: NormForm) -> awq_kernels::Result<Cow<'_, Tensor>> {
    match form {
        NormForm::Plain => Ok(Cow::Borrowed(stored)),
        NormForm::OnePlus => {
            let ones = Tensor::from_f32(stored.shape(), vec![1.0; stored.elem_count()])?.to_device(stored.device())?;
            Ok(Cow::Owned(ops::add(&ones, stored)?))
        }
    }
}

/// [`norm_weight`] as a forward pass keeps it: in `dtype` for `Plain` norms (the weights' dtype on
/// the device), in f32 for `OnePlus` ones (see [`norm_weight`]).
pub fn norm_weight_as(stored: Tensor, form: NormForm, dtype: DType) -> awq_kernels::Result<Tensor> {
    match form {
        NormForm::Plain => Ok(stored.into_dtype(dtype)),
        NormForm::OnePlus => Ok(norm_weight(&stored, form)?.into_owned()),
    }
}

/// Every head of `x[rows, heads * head_dim]` normalised on its own and scaled by `weight[head_dim]`
/// (the factor, [`norm_weight`]), which all heads share (transformers' `Qwen3Attention`: `q_norm`
/// over each query head, `k_norm` over each key head, before RoPE; Gemma 3's likewise):
/// `ops::rms_norm` over the `[rows * heads, head_dim]` view of the same values. Output in `x`'s dtype.
pub fn head_rms_norm(x: Tensor, weight: &Tensor, head_dim: usize, eps: f32) -> awq_kernels::Result<Tensor> {
    let (rows, width) = x.dims2("head_rms_norm")?;
    if head_dim == 0 || width % head_dim != 0 {
        return Err(awq_kernels::Error::Shape {
            op: "head_rms_norm",
            detail: format!("rows of {width} values are not whole heads of {head_dim}"),
        });
    }
    let heads = ops::rms_norm(&x.reshape(&[rows * (width / head_dim), head_dim])?, weight, eps)?;
    heads.reshape(&[rows, width])
}

/// A linear layer `y = x W^T + b` as the forward pass applies it, whatever its storage.
pub trait ApplyLinear {
    fn apply(&self, x: &Tensor) -> awq_kernels::Result<Tensor>;
}

impl ApplyLinear for LinearWeights {
    fn apply(&self, x: &Tensor) -> awq_kernels::Result<Tensor> {
        ops::linear(x, &self.weight, self.bias.as_ref())
    }
}

/// The gated MLP `down(act(gate(h)) * up(h))` on already-normalised input `h[rows, hidden]`,
/// returning `(down input, output)` (AWQ's search compares both).
pub fn gated_mlp<L: ApplyLinear + ?Sized>(
    h: &Tensor,
    gate: &L,
    up: &L,
    down: &L,
    activation: GatedActivation,
) -> awq_kernels::Result<(Tensor, Tensor)> {
    let gate = gate.apply(h)?;
    let up = up.apply(h)?;
    let down_in = ops::gated_activation(activation, &gate, &up)?;
    let out = down.apply(&down_in)?;
    Ok((down_in, out))
}
