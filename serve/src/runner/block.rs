//! What a decoder block's forward pass is made of, shared by the serving runner (serving, `awq eval`)
//! and the worker's `block_forward` (quantization): the per-model constants ([`BlockShape`]), a linear
//! layer as the forward pass applies it ([`ApplyLinear`]), the gated MLP ([`gated_mlp`]) and the
//! per-head RMSNorm of q and k that some architectures have ([`head_rms_norm`]: Qwen3).
//!
//! The attention halves differ: the worker attends over whole sequences (`ops::causal_attention`),
//! the runner over the paged KV cache (`ops::paged_attention`); everything else is these functions.

use awq_kernels::ops::{self, AttentionShape, GatedActivation, PagedAttentionShape, RopeTable};
use awq_kernels::Tensor;
use awq_model::arch::NormRole;
use awq_model::{Checkpoint, LinearWeights};

/// The per-model constants of a block forward, resolved once from config and descriptor.
#[derive(Clone, Debug)]
pub struct BlockShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub activation: GatedActivation,
    pub sliding_window: Option<usize>,
    pub rope: RopeTable,
    /// Whether each head of q and k goes through an RMSNorm (the block's `QHead` / `KHead` norms,
    /// with `rms_norm_eps`) between its projection and RoPE: the descriptor lists those norms.
    pub qk_norm: bool,
}

impl BlockShape {
    pub fn of(checkpoint: &Checkpoint) -> BlockShape {
        let c = checkpoint.config();
        BlockShape {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            rms_norm_eps: c.rms_norm_eps as f32,
            activation: c.activation,
            sliding_window: checkpoint.arch().sliding_window(c),
            rope: RopeTable::from_inv_freq(c.rope_inv_freq()),
            qk_norm: checkpoint.arch().has_norm(NormRole::QHead),
        }
    }

    /// The attention layout of whole sequences of `seq_len` tokens.
    pub fn attention_shape(&self, seq_len: usize) -> AttentionShape {
        AttentionShape {
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            seq_len,
            sliding_window: self.sliding_window,
        }
    }

    /// The attention layout over a paged cache of `block_size`-token blocks.
    pub fn paged_shape(&self, block_size: usize) -> PagedAttentionShape {
        PagedAttentionShape {
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            block_size,
            sliding_window: self.sliding_window,
        }
    }

    /// `1 / sqrt(head_dim)`, the attention scores' scale.
    pub fn attention_scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// Every head of `x[rows, heads * head_dim]` normalised on its own and scaled by `weight[head_dim]`,
/// which all heads share (transformers' `Qwen3Attention`: `q_norm` over each query head, `k_norm`
/// over each key head, before RoPE): `ops::rms_norm` over the `[rows * heads, head_dim]` view of
/// the same values. Output in `x`'s dtype.
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
