//! The decoder block forward pass, as the Llama paper and transformers' `LlamaDecoderLayer` write it:
//!
//! ```text
//! h   = x + o_proj( attention( rope(q_proj(n1(x))), rope(k_proj(n1(x))), v_proj(n1(x)) ) )
//! out = h + down_proj( act(gate_proj(n2(h))) * up_proj(n2(h)) )
//! ```
//!
//! with RMSNorm `n1`, `n2`, causal grouped-query attention and a gated MLP; where the architecture
//! has them (Qwen3, Gemma 3), q and k pass each head through an RMSNorm of its own between
//! projection and RoPE, and (Gemma 3) the attention's and the MLP's outputs pass through one before
//! their residual adds: `h = x + n3(o_proj(..))`, `out = h + n4(down_proj(..))`. Everything that
//! varies between architectures (biases, activation, each block's sliding window and RoPE, the
//! scores' scale, which norms there are and how they apply their weights) comes from the
//! descriptor and config as data in [`BlockShape`]; there is no per-architecture branch here.
//! [`BlockShape`], the linear application and the gated MLP are the serving runner's too
//! (`awq_serve::runner::block`): one definition for quantization, evaluation and serving.
//!
//! A sparse block (Mixtral, Qwen3-MoE) has a mixture of experts in place of the gated MLP
//! (`awq_serve::runner::moe`: router, top-k, each expert on its tokens' rows only), the one
//! implementation the runner uses too.
//!
//! The two halves ([`attention`], [`mlp`]) are public on their own because AWQ's scale search
//! compares exactly their outputs, and [`block_forward`] can record the input of every linear
//! ([`LinearInputs`]): the calibration activations.

use std::borrow::Cow;

use awq_kernels::ops;
use awq_kernels::{DType, Device, Indices, Tensor};
use awq_model::arch::{LinearId, LinearRole, NormRole};
use awq_model::{BlockWeights, Checkpoint, LinearWeights};
pub use awq_serve::runner::BlockShape;
use awq_serve::runner::{gated_mlp, head_rms_norm, moe_mlp, norm_weight, ApplyLinear};

use crate::{Error, Result};

/// The inputs each linear of a block saw, recorded during a forward pass. Linears that share an
/// input (q, k, v; gate, up) share one tensor.
#[derive(Clone, Debug)]
pub struct LinearInputs {
    /// n1(x): the input of q, k and v.
    pub attn_in: Tensor,
    /// The attention output before o_proj.
    pub o_in: Tensor,
    /// n2(h): the input of gate and up (a sparse block's: of its router and of every expert's gate
    /// and up, each of which sees its own tokens' rows of it).
    pub mlp_in: Tensor,
    /// What the down projections saw.
    pub mlp: MlpInputs,
}

/// The down projections' inputs: a dense block's one, or each expert's.
#[derive(Clone, Debug)]
pub enum MlpInputs {
    /// act(gate) * up.
    Dense { down_in: Tensor },
    /// By expert index.
    Experts(Vec<ExpertInputs>),
}

/// What one expert of a sparse block saw.
#[derive(Clone, Debug)]
pub struct ExpertInputs {
    /// The tokens routed to it: rows of `mlp_in`, ascending.
    pub rows: Vec<u32>,
    /// act(gate) * up on those rows; `None` when no token was routed to it.
    pub down_in: Option<Tensor>,
}

impl LinearInputs {
    /// The input AWQ searches `id`'s scaling group on and divides its scales out of: the input its
    /// group shares (for an expert's gate and up, the whole `mlp_in`, which the mixture of experts
    /// reads); `None` for the down projection of an expert no token reached.
    ///
    /// # Panics
    /// For an expert of a dense block, or a dense MLP role of a sparse one.
    pub fn of(&self, id: impl Into<LinearId>) -> Option<&Tensor> {
        let id = id.into();
        match (id.role, id.expert, &self.mlp) {
            (LinearRole::Q | LinearRole::K | LinearRole::V, _, _) => Some(&self.attn_in),
            (LinearRole::O, _, _) => Some(&self.o_in),
            (LinearRole::Gate | LinearRole::Up, _, _) => Some(&self.mlp_in),
            (LinearRole::Down, None, MlpInputs::Dense { down_in }) => Some(down_in),
            (LinearRole::Down, Some(e), MlpInputs::Experts(experts)) => experts[e].down_in.as_ref(),
            (LinearRole::Down, _, _) => panic!("{id}: the block's MLP is of the other kind"),
        }
    }

    /// Mutable access to [`LinearInputs::of`] (AWQ divides its scales out of it).
    pub fn of_mut(&mut self, id: impl Into<LinearId>) -> Option<&mut Tensor> {
        let id = id.into();
        match (id.role, id.expert, &mut self.mlp) {
            (LinearRole::Q | LinearRole::K | LinearRole::V, _, _) => Some(&mut self.attn_in),
            (LinearRole::O, _, _) => Some(&mut self.o_in),
            (LinearRole::Gate | LinearRole::Up, _, _) => Some(&mut self.mlp_in),
            (LinearRole::Down, None, MlpInputs::Dense { down_in }) => Some(down_in),
            (LinearRole::Down, Some(e), MlpInputs::Experts(experts)) => experts[e].down_in.as_mut(),
            (LinearRole::Down, _, _) => panic!("{id}: the block's MLP is of the other kind"),
        }
    }

    /// The rows linear `id` itself saw (AWQ's clip search samples them): [`LinearInputs::of`],
    /// except for an expert's gate and up, which saw only their tokens' rows of `mlp_in` (gathered
    /// here); `None` for an expert no token reached.
    pub fn seen_by(&self, id: impl Into<LinearId>) -> Result<Option<Cow<'_, Tensor>>> {
        let id = id.into();
        match (id.role, id.expert, &self.mlp) {
            (LinearRole::Gate | LinearRole::Up, Some(e), MlpInputs::Experts(experts)) => {
                let rows = &experts[e].rows;
                if rows.is_empty() {
                    return Ok(None);
                }
                let rows = Indices::new(rows.clone(), self.mlp_in.device())?;
                Ok(Some(Cow::Owned(ops::gather_rows(&self.mlp_in, &rows)?)))
            }
            _ => Ok(self.of(id).map(Cow::Borrowed)),
        }
    }
}

fn linear(x: &Tensor, l: &LinearWeights) -> Result<Tensor> {
    Ok(l.apply(x)?)
}

/// RMSNorm of `x` with the block's norm `role`, applying its weight as the architecture does.
fn norm(x: &Tensor, w: &BlockWeights, role: NormRole, shape: &BlockShape) -> Result<Tensor> {
    let weight = norm_weight(w.norm(role), shape.norm_form)?;
    Ok(ops::rms_norm(x, &weight, shape.rms_norm_eps)?)
}

/// The first block's input for token `ids`: their embeddings in `dtype` on `device`, times the
/// architecture's embedding scale (`ArchDescriptor::embedding_scale`: Gemma's `sqrt(hidden_size)`,
/// applied in `dtype`; nothing for the others).
pub fn embeddings(checkpoint: &Checkpoint, ids: &[u32], dtype: DType, device: Device) -> Result<Tensor> {
    let x = checkpoint.embedding_rows(ids)?.into_dtype(dtype).to_device(device)?;
    let scale = checkpoint.arch().embedding_scale(checkpoint.config());
    if scale == 1.0 {
        return Ok(x);
    }
    Ok(ops::scale_columns(&x, &vec![scale; checkpoint.config().hidden_size])?)
}

/// Self-attention of block `w.block_idx` on already-normalised input `h[rows, hidden]`, returning
/// `(o_proj input, output)`: the output before any output norm (what AWQ's search inspects, as
/// AutoAWQ's `self_attn` returns it).
pub fn attention(h: &Tensor, w: &BlockWeights, shape: &BlockShape, seq_len: usize) -> Result<(Tensor, Tensor)> {
    let (heads, kv_heads, hd) = (shape.n_heads, shape.n_kv_heads, shape.head_dim);
    let (mut q, mut k) = (linear(h, w.linear(LinearRole::Q))?, linear(h, w.linear(LinearRole::K))?);
    if shape.qk_norm {
        let q_norm = norm_weight(w.norm(NormRole::QHead), shape.norm_form)?;
        let k_norm = norm_weight(w.norm(NormRole::KHead), shape.norm_form)?;
        q = head_rms_norm(q, &q_norm, hd, shape.rms_norm_eps)?;
        k = head_rms_norm(k, &k_norm, hd, shape.rms_norm_eps)?;
    }
    let rope = shape.rope(w.block_idx);
    let q = ops::apply_rope(&q, heads, hd, seq_len, rope)?;
    let k = ops::apply_rope(&k, kv_heads, hd, seq_len, rope)?;
    let v = linear(h, w.linear(LinearRole::V))?;
    let o_in = ops::causal_attention(&q, &k, &v, shape.attention_shape(w.block_idx, seq_len), shape.score_scale)?;
    let out = linear(&o_in, w.linear(LinearRole::O))?;
    Ok((o_in, out))
}

/// The block's MLP on already-normalised input `h[rows, hidden]`: the gated MLP, or a sparse block's
/// mixture of experts (`shape.moe` routes it; the block's weights say which it has). Returns the
/// output before any output norm and, with `capture`, what its down projections saw.
pub fn mlp(h: &Tensor, w: &BlockWeights, shape: &BlockShape, capture: bool) -> Result<(Option<MlpInputs>, Tensor)> {
    let act = shape.activation;
    let Some(router) = w.router() else {
        let (gate, up, down) = (w.linear(LinearRole::Gate), w.linear(LinearRole::Up), w.linear(LinearRole::Down));
        let (down_in, out) = gated_mlp(h, gate, up, down, act)?;
        return Ok((capture.then_some(MlpInputs::Dense { down_in }), out));
    };
    let routing = shape.moe.as_ref().ok_or_else(|| {
        Error::Input(format!("block {} has a router, but the model has no routing rule", w.block_idx))
    })?;
    let expert = |e: usize, x: &Tensor| {
        let l = |role| w.linear(LinearId::expert(e, role));
        gated_mlp(x, l(LinearRole::Gate), l(LinearRole::Up), l(LinearRole::Down), act)
    };
    let moe = moe_mlp(h, router, routing, expert, capture)?;
    let inputs = capture.then(|| {
        let inputs = moe.routes.into_iter().zip(moe.down_inputs);
        MlpInputs::Experts(inputs.map(|(route, down_in)| ExpertInputs { rows: route.rows, down_in }).collect())
    });
    Ok((inputs, moe.out))
}

/// One decoder block on `x[batch * seq_len, hidden]` (f32). Returns the block output and, when
/// `capture` is set, the inputs of its linears.
pub fn block_forward(
    x: &Tensor,
    w: &BlockWeights,
    shape: &BlockShape,
    seq_len: usize,
    capture: bool,
) -> Result<(Tensor, Option<LinearInputs>)> {
    let wrap = |e: Error| match e {
        Error::Kernel(source) => Error::Block { block_idx: w.block_idx, source },
        other => other,
    };
    let run = || -> Result<_> {
        let attn_in = norm(x, w, NormRole::Attn, shape)?;
        let (o_in, mut attn_out) = attention(&attn_in, w, shape, seq_len)?;
        if shape.post_norms {
            attn_out = norm(&attn_out, w, NormRole::AttnOut, shape)?;
        }
        let mut h = ops::add(x, &attn_out)?;
        let mlp_in = norm(&h, w, NormRole::Mlp, shape)?;
        let (mlp_inputs, mut mlp_out) = mlp(&mlp_in, w, shape, capture)?;
        if shape.post_norms {
            mlp_out = norm(&mlp_out, w, NormRole::MlpOut, shape)?;
        }
        if h.dtype() == DType::F32 {
            ops::add_assign(&mut h, &mlp_out)?; // in place: the f32 residual stream of the CPU engine
        } else {
            h = ops::add(&h, &mlp_out)?;
        }
        let inputs = mlp_inputs.map(|mlp| LinearInputs { attn_in, o_in, mlp_in, mlp });
        Ok((h, inputs))
    };
    run().map_err(wrap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use awq_kernels::rng::SplitMix64;
    use awq_kernels::DType;
    use awq_model::synthetic::{write_checkpoint, SyntheticSpec};
    use awq_model::Checkpoint;

    fn tiny(model_type: &'static str) -> (tempfile::TempDir, Checkpoint) {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &SyntheticSpec { model_type, ..SyntheticSpec::tiny_llama() }).unwrap();
        let ck = Checkpoint::open(dir.path()).unwrap();
        (dir, ck)
    }

    #[test]
    fn sequences_in_a_batch_do_not_see_each_other() {
        let (_dir, ck) = tiny("qwen2");
        let shape = BlockShape::of(&ck);
        let w = ck.load_block(1).unwrap().into_dtype(DType::F32);
        let (t, h) = (7, ck.config().hidden_size);
        let mut rng = SplitMix64::new(5);
        let x = Tensor::from_f32(&[2 * t, h], rng.normal_vec(2 * t * h, 1.0)).unwrap();
        let (both, _) = block_forward(&x, &w, &shape, t, false).unwrap();
        for s in 0..2 {
            let (alone, _) = block_forward(&x.rows(s * t, (s + 1) * t).unwrap(), &w, &shape, t, false).unwrap();
            let e = ops::relative_error(&both.rows(s * t, (s + 1) * t).unwrap(), &alone).unwrap();
            assert!(e < 1e-6, "sequence {s}: {e}");
        }
    }

    /// A sparse block (Qwen3-MoE's block 1, Mixtral's every block): its output is the attention's
    /// plus each expert's down projection of its captured input, scattered into its tokens' rows
    /// times their routing weights; every expert's rows are the tokens it saw; a batch of two
    /// sequences routes each token as it routes alone.
    #[test]
    fn captured_expert_inputs_reproduce_a_sparse_block_and_sequences_stay_apart() {
        for (spec, block) in [(SyntheticSpec::tiny_qwen3_moe(), 1), (SyntheticSpec::tiny_mixtral(), 0)] {
            let dir = tempfile::tempdir().unwrap();
            write_checkpoint(dir.path(), &spec).unwrap();
            let ck = Checkpoint::open(dir.path()).unwrap();
            let shape = BlockShape::of(&ck);
            let w = ck.load_block(block).unwrap().into_dtype(DType::F32);
            assert!(w.router().is_some(), "{} block {block} is sparse", spec.model_type);
            let (t, h) = (11, ck.config().hidden_size);
            let mut rng = SplitMix64::new(7);
            let x = Tensor::from_f32(&[2 * t, h], rng.normal_vec(2 * t * h, 1.0)).unwrap();
            let (out, inputs) = block_forward(&x, &w, &shape, t, true).unwrap();
            let inputs = inputs.expect("capture was requested");
            let MlpInputs::Experts(experts) = &inputs.mlp else { panic!("a sparse block captures its experts") };
            assert_eq!(experts.len(), spec.n_experts);
            let routed: usize = experts.iter().map(|e| e.rows.len()).sum();
            assert_eq!(routed, 2 * t * spec.experts_per_token, "every token takes k experts");
            let attn = ops::linear(inputs.of(LinearRole::O).unwrap(), &w.linear(LinearRole::O).weight, None).unwrap();
            let mut rebuilt = ops::add(&x, &attn).unwrap();
            // The weights the block used: routed again from the captured MoE input.
            let logits = ops::linear_to(&inputs.mlp_in, w.router().unwrap(), None, DType::F32).unwrap();
            let routes = shape.moe.unwrap().route(&logits.to_f32_vec().unwrap());
            for (e, (seen, route)) in experts.iter().zip(&routes).enumerate() {
                assert_eq!(seen.rows, route.rows, "expert {e}");
                let Some(down_in) = &seen.down_in else { continue };
                let down = &w.linear(LinearId::expert(e, LinearRole::Down)).weight;
                let y = ops::linear(down_in, down, None).unwrap();
                let rows = Indices::host(route.rows.clone());
                ops::scatter_add_rows(&mut rebuilt, &y, &rows, &route.weights).unwrap();
                assert_eq!(
                    inputs.seen_by(LinearId::expert(e, LinearRole::Up)).unwrap().unwrap().shape(),
                    [rows.len(), h]
                );
            }
            let e = ops::relative_error(&rebuilt, &out).unwrap();
            assert!(e < 1e-5, "{}: relative error {e}", spec.model_type);
            for s in 0..2 {
                let (alone, _) = block_forward(&x.rows(s * t, (s + 1) * t).unwrap(), &w, &shape, t, false).unwrap();
                let e = ops::relative_error(&out.rows(s * t, (s + 1) * t).unwrap(), &alone).unwrap();
                assert!(e < 1e-6, "{} sequence {s}: {e}", spec.model_type);
            }
        }
    }

    #[test]
    fn captured_inputs_reproduce_the_block_output() {
        let (_dir, ck) = tiny("llama");
        let shape = BlockShape::of(&ck);
        let w = ck.load_block(0).unwrap().into_dtype(DType::F32);
        let (t, h) = (9, ck.config().hidden_size);
        let mut rng = SplitMix64::new(6);
        let x = Tensor::from_f32(&[t, h], rng.normal_vec(t * h, 1.0)).unwrap();
        let (out, inputs) = block_forward(&x, &w, &shape, t, true).unwrap();
        let inputs = inputs.expect("capture was requested");
        // out = x + o(o_in) + down(down_in): rebuild it from the captured linear inputs alone.
        let attn = ops::linear(inputs.of(LinearRole::O).unwrap(), &w.linear(LinearRole::O).weight, None).unwrap();
        let mlp = ops::linear(inputs.of(LinearRole::Down).unwrap(), &w.linear(LinearRole::Down).weight, None).unwrap();
        let rebuilt = ops::add(&ops::add(&x, &attn).unwrap(), &mlp).unwrap();
        assert!(ops::relative_error(&rebuilt, &out).unwrap() < 1e-6);
        assert_eq!(inputs.of(LinearRole::Gate), inputs.of(LinearRole::Up));
        assert_eq!(inputs.of(LinearRole::Q).unwrap().shape(), &[t, h]);
    }
}
