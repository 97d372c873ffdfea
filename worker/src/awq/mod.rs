//! The AWQ engine (Lin et al. 2024, "AWQ: Activation-aware Weight Quantization"), as AutoAWQ 0.2.9
//! implements it, one decoder block at a time.
//!
//! For a block with input activations `x` (the ORIGINAL output of the previous block):
//! 1. run the block forward once, recording the input of every linear ([`LinearInputs`]); the
//!    block's output is the next block's input;
//! 2. for each scaling group of the architecture ([`ScalingGroup`]), search the per-channel scales
//!    ([`scale_search`]) against the original weights;
//! 3. fold each group's scales into the op before it (norm weight or previous linear's rows),
//!    multiply them into the group's linears, divide them out of the recorded inputs;
//! 4. search a clip threshold per output row and group for every linear the descriptor does not
//!    exempt ([`clip_search`]) and clamp;
//! 5. quantize every linear group-wise and pack it in AutoAWQ's GEMM layout.
//!
//! `Method::Rtn` is step 5 alone ([`quantize_rtn`]): no calibration, no forward pass. The result
//! depends only on the block's weights and input, so any partition of blocks over workers gives the
//! same bytes.
//!
//! The groups come from the descriptor with every linear named (`ArchDescriptor::block_groups`): a
//! sparse block's MLP norm -> every expert's gate and up (searched on the whole MoE input, the
//! router reading it unscaled), then each expert's up -> its down on that expert's tokens. An expert
//! no calibration token reached saw no input: AutoAWQ stops there (`cat_and_assert`); here its up ->
//! down group keeps scales of 1 (nothing folded), none of its linears is clipped (no rows to clip
//! on), it is quantized as it is, and the block's report (`unrouted_experts`) and a warning say so.
//! The router is never scaled, clipped or quantized: it is stored in f16 as it was (see
//! `awq_model::arch::mixtral`'s docs for why AutoAWQ leaves it unscaled).

pub mod calib;
pub mod clip_search;
pub mod scale_search;

use std::borrow::Cow;
use std::time::Instant;

use awq_kernels::ops::{self, QuantSpec};
use awq_kernels::{DType, Device, Tensor};
use awq_model::arch::{ArchDescriptor, BlockGroup, BlockPrev, LinearId, NormForm, NormRole};
use awq_model::awq_format::PackedLinear;
use awq_model::safetensors::RawTensor;
use awq_model::{BlockWeights, ModelConfig};
pub use awq_job::Method;
use serde::Serialize;

pub use clip_search::ClipOptions;
use clip_search::search_clip;
use scale_search::search_scale;

use crate::forward::{block_forward, BlockShape, LinearInputs, MlpInputs};
use crate::Result;

/// Everything that decides how a block is quantized.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AwqOptions {
    pub spec: QuantSpec,
    pub method: Method,
    /// Ratios tried by the scale search (AutoAWQ: 20).
    pub n_grid: usize,
    pub clip: ClipOptions,
}

impl AwqOptions {
    pub fn new(spec: QuantSpec, method: Method) -> AwqOptions {
        AwqOptions { spec, method, n_grid: 20, clip: ClipOptions::default() }
    }
}

/// What the search chose for one scaling group.
#[derive(Clone, Debug, Serialize)]
pub struct GroupReport {
    /// The linears of the group, e.g. `["Q", "K", "V"]`.
    pub linears: Vec<String>,
    pub best_ratio: f32,
    /// MSE of the inspected module's output at ratio 0 and at the chosen ratio.
    pub loss_ratio0: f64,
    pub loss_best: f64,
}

/// What the clip search chose for one linear.
#[derive(Clone, Debug, Serialize)]
pub struct ClipReport {
    pub linear: String,
    /// Mean of threshold / max|w| over all (row, group) pairs; 1 means nothing was clipped.
    pub mean_clip_fraction: f64,
}

/// The per-block report: the raw material of quality reports.
#[derive(Clone, Debug, Serialize)]
pub struct BlockReport {
    pub block_idx: usize,
    pub groups: Vec<GroupReport>,
    pub clips: Vec<ClipReport>,
    /// A sparse block's experts no calibration token was routed to (scales 1, not clipped).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unrouted_experts: Vec<usize>,
    #[serde(skip)]
    pub seconds: f64,
}

/// A quantized block: packed linears (with biases) in block order, the norms in f16 as stored
/// (those a scaling group follows with AWQ's scales folded in; the per-head q/k norms and the output
/// norms as they were), and a sparse block's router in f16, as it was.
#[derive(Clone, Debug)]
pub struct QuantizedBlock {
    pub block_idx: usize,
    pub linears: Vec<(LinearId, PackedLinear, Option<Tensor>)>,
    pub norms: Vec<(NormRole, Tensor)>,
    pub router: Option<Tensor>,
    pub report: BlockReport,
}

/// The tensors outside the blocks (embeddings, final norm, untied head), in f16 as the AWQ
/// checkpoint stores them.
pub fn tail_tensors(checkpoint: &awq_model::Checkpoint) -> Result<Vec<RawTensor>> {
    let (config, arch) = (checkpoint.config(), checkpoint.arch());
    let mut tensors = vec![checkpoint.tensor_as_f16(arch.embed_tokens)?, checkpoint.tensor_as_f16(arch.final_norm)?];
    if !config.tie_word_embeddings {
        tensors.push(checkpoint.tensor_as_f16(arch.lm_head)?);
    }
    Ok(tensors)
}

impl QuantizedBlock {
    /// The block's tensors under their checkpoint names, in the manifest's order
    /// (`awq_model::manifest`): norms, packed linears and biases, a sparse block's router (f16)
    /// before its experts. The parts of a fused linear (Phi-3's q, k, v) are joined along their
    /// outputs into the one stored tensor (`qkv_proj.qweight`, ...), the layout AutoAWQ writes and
    /// vLLM loads.
    pub fn raw_tensors(&self, arch: &ArchDescriptor) -> Result<Vec<RawTensor>> {
        let b = self.block_idx;
        let mut tensors = Vec::new();
        for (role, norm) in &self.norms {
            tensors.push(RawTensor::from_tensor(arch.norm_name(b, *role), norm)?);
        }
        let of = |id: LinearId| self.linears.iter().find(|(i, _, _)| *i == id);
        // The block's own linears as stored (a sparse block has no dense MLP), then the router, then
        // the experts one by one.
        let own = arch.stored_linears().filter(|parts| of(parts[0].into()).is_some());
        let own: Vec<Vec<LinearId>> = own.map(|parts| parts.iter().map(|&r| LinearId::from(r)).collect()).collect();
        let experts = self.linears.iter().filter(|(id, _, _)| id.expert.is_some()).map(|(id, _, _)| vec![*id]);
        let mut stored: Vec<Vec<LinearId>> = own;
        let n_own = stored.len();
        stored.extend(experts);
        for (i, parts) in stored.iter().enumerate() {
            if i == n_own {
                if let Some(router) = &self.router {
                    tensors.push(RawTensor::from_tensor(arch.router_name(b), router)?);
                }
            }
            let of = |id: LinearId| of(id).expect("a quantized block holds every part of its stored linears");
            let role = parts[0];
            let (packed, bias) = match parts.as_slice() {
                [_] => (Cow::Borrowed(&of(role).1), of(role).2.clone()),
                _ => {
                    let packed = PackedLinear::concat_outputs(&parts.iter().map(|&r| &of(r).1).collect::<Vec<_>>())?;
                    (Cow::Owned(packed), joined_bias(parts.iter().map(|&r| of(r).2.as_ref()))?)
                }
            };
            let (i, o, g) = (packed.in_features, packed.out_features, packed.group_size);
            tensors.push(RawTensor::from_i32(arch.packed_name(b, role, "qweight"), &[i, o / 8], &packed.qweight));
            tensors.push(RawTensor::from_i32(arch.packed_name(b, role, "qzeros"), &[i / g, o / 8], &packed.qzeros));
            let scales = Tensor::from_f16(&[i / g, o], packed.scales.clone())?;
            tensors.push(RawTensor::from_tensor(arch.packed_name(b, role, "scales"), &scales)?);
            if let Some(bias) = bias {
                tensors.push(RawTensor::from_tensor(arch.bias_name(b, role), &bias)?);
            }
        }
        Ok(tensors)
    }
}

/// The biases of a fused linear's parts, one after another in f16; `None` when the parts have none
/// (they share a bias rule: all or none).
fn joined_bias<'a>(biases: impl Iterator<Item = Option<&'a Tensor>>) -> Result<Option<Tensor>> {
    let mut values = Vec::new();
    for bias in biases {
        let Some(bias) = bias else { return Ok(None) };
        values.extend_from_slice(&bias.f32_values()?);
    }
    Ok(Some(Tensor::from_f32_as(&[values.len()], values, DType::F16)?))
}

/// `t[n] / s[n]` elementwise (a norm weight or a bias), where `t` is.
fn divide_vector(t: &Tensor, s: &[f32]) -> Result<Tensor> {
    let column = t.clone().reshape(&[t.elem_count(), 1])?;
    Ok(ops::divide_rows(&column, s)?.reshape(t.shape())?)
}

/// A norm's stored weight `w` with `scales` folded in, so that its factor is divided by them: `w / s`
/// (`Plain`), or `(1 + w) / s - 1` (`OnePlus`: AutoAWQ's `scale_ln_fcs` for Gemma norms, `weight +=
/// 1; weight /= s; weight -= 1`), in f32, then in `w`'s dtype on its device.
fn fold_into_norm(w: &Tensor, scales: &[f32], form: NormForm) -> Result<Tensor> {
    match form {
        NormForm::Plain => divide_vector(w, scales),
        NormForm::OnePlus => {
            let folded: Vec<f32> = w.f32_values()?.iter().zip(scales).map(|(&v, &s)| (1.0 + v) / s - 1.0).collect();
            Ok(Tensor::from_f32_as(w.shape(), folded, w.dtype())?.to_device(w.device())?)
        }
    }
}

/// Folds `scales` of `group` into the block (AutoAWQ's `apply_scale`; a norm by `form`) and divides
/// them out of the recorded input the group's linears share.
fn apply_scales(
    group: &BlockGroup,
    scales: &[f32],
    form: NormForm,
    w: &mut BlockWeights,
    inputs: &mut LinearInputs,
) -> Result<()> {
    let inverse: Vec<f32> = scales.iter().map(|s| 1.0 / s).collect();
    match group.prev {
        BlockPrev::Norm(role) => *w.norm_mut(role) = fold_into_norm(w.norm(role), scales, form)?,
        BlockPrev::Linear(id) => {
            let prev = w.linear_mut(id);
            prev.weight = ops::divide_rows(&prev.weight, scales)?;
            if let Some(b) = &prev.bias {
                prev.bias = Some(divide_vector(b, scales)?);
            }
        }
    }
    for &id in &group.linears {
        let l = w.linear_mut(id);
        l.weight = ops::scale_columns(&l.weight, scales)?;
    }
    if let Some(input) = inputs.of_mut(group.linears[0]) {
        *input = ops::scale_columns(input, &inverse)?;
    }
    Ok(())
}

/// Quantizes one block whose weights `w` are f32, on input `x[rows, hidden]` of sequences of
/// `seq_len`, of the model `arch` describes under `config`. Returns the quantized block and the
/// block's original output (the next block's input).
pub fn quantize_block(
    mut w: BlockWeights,
    x: &Tensor,
    shape: &BlockShape,
    seq_len: usize,
    arch: &ArchDescriptor,
    config: &ModelConfig,
    options: &AwqOptions,
) -> Result<(QuantizedBlock, Tensor)> {
    let start = Instant::now();
    let device = x.device();
    // Seconds since the previous lap, with the device's queued work finished (phase timings).
    let mut last = start;
    let mut lap = || -> Result<f64> {
        device.synchronize()?;
        let now = Instant::now();
        Ok((now - std::mem::replace(&mut last, now)).as_secs_f64())
    };
    let spec = options.spec;
    let (next, inputs) = block_forward(x, &w, shape, seq_len, true)?;
    let forward_s = lap()?;
    let mut inputs = inputs.expect("capture was requested");
    let mut groups = Vec::new();
    let mut choices = Vec::new();
    let block_groups = arch.block_groups(config, w.block_idx);
    // Experts no calibration token reached: no input to search or clip on (see the module docs).
    let unrouted: Vec<usize> = match &inputs.mlp {
        MlpInputs::Experts(experts) => (0..experts.len()).filter(|&e| experts[e].down_in.is_none()).collect(),
        MlpInputs::Dense { .. } => Vec::new(),
    };
    for &expert in &unrouted {
        tracing::warn!(
            block = w.block_idx,
            expert,
            "no calibration token was routed to expert {expert}: its scales stay 1 and it is not clipped \
             (more calibration text reaches more experts)"
        );
    }
    // Per-group times only at debug level: each costs a device synchronisation. The experts'
    // share (a mixture of experts: groups and clips that hold an expert's linears) is summed there.
    let timed = tracing::enabled!(tracing::Level::DEBUG);
    let (mut group_times, mut scale_s, mut expert_scale_s) = (Vec::new(), 0.0, 0.0);
    for group in &block_groups {
        let Some(input) = inputs.of(group.linears[0]).cloned() else { continue };
        let choice = search_scale(group, &input, &mut w, shape, seq_len, spec, options.n_grid)?;
        if timed {
            let seconds = lap()?;
            scale_s += seconds;
            if group.linears.iter().any(|id| id.expert.is_some()) {
                expert_scale_s += seconds;
            }
            group_times.push(format!("{} {seconds:.3} s", group_name(group)));
        }
        groups.push(GroupReport {
            linears: group.linears.iter().map(|id| id.to_string()).collect(),
            best_ratio: choice.best_ratio,
            loss_ratio0: choice.loss_ratio0,
            loss_best: choice.best_loss,
        });
        choices.push((group, choice.scales));
    }
    for (group, scales) in &choices {
        apply_scales(group, scales, arch.norm_form, &mut w, &mut inputs)?;
    }
    scale_s += lap()?;
    tracing::debug!(block = w.block_idx, "scale search by group (the last includes folding the scales): {}", group_times.join(", "));
    let mut clips = Vec::new();
    let (mut clip_s, mut expert_clip_s) = (0.0, 0.0);
    let clipped: Vec<LinearId> = w.linears().map(|(id, _)| id).filter(|&id| arch.clips(id)).collect();
    for id in clipped {
        let Some(x) = inputs.seen_by(id)? else { continue };
        let weight = &w.linear(id).weight;
        let max_val = search_clip(weight, &x, spec, options.clip)?;
        let org_max = ops::max_abs_groups(weight, spec.group_size.get())?;
        let fraction = max_val.iter().zip(&org_max).map(|(m, o)| if *o > 0.0 { (m / o) as f64 } else { 1.0 }).sum::<f64>()
            / max_val.len().max(1) as f64;
        clips.push(ClipReport { linear: id.to_string(), mean_clip_fraction: fraction });
        w.linear_mut(id).weight = ops::clamp_groups(weight, &max_val, spec.group_size.get())?;
        if timed {
            let seconds = lap()?;
            clip_s += seconds;
            if id.expert.is_some() {
                expert_clip_s += seconds;
            }
        }
    }
    clip_s += lap()?;
    if timed && w.router().is_some() {
        tracing::debug!(
            block = w.block_idx,
            "experts' share: scale search {expert_scale_s:.2} of {scale_s:.2} s, clip search {expert_clip_s:.2} of {clip_s:.2} s"
        );
    }
    let mut block = quantize_rtn(&w, spec)?;
    let quantize_s = lap()?;
    tracing::info!(
        block = w.block_idx,
        %device,
        "forward {forward_s:.2} s, scale search {scale_s:.2} s, clip search {clip_s:.2} s, quantize {quantize_s:.2} s"
    );
    block.report.groups = groups;
    block.report.clips = clips;
    block.report.unrouted_experts = unrouted;
    block.report.seconds = start.elapsed().as_secs_f64();
    Ok((block, next))
}

/// Quantizes and packs every linear of `w` as it is (round-to-nearest); norms pass through in f16.
/// This is the whole of `Method::Rtn`, and the last step of AWQ.
pub fn quantize_rtn(w: &BlockWeights, spec: QuantSpec) -> Result<QuantizedBlock> {
    let start = Instant::now();
    let linears = w
        .linears()
        .map(|(id, l)| {
            let packed = ops::quantize_packed(&l.weight, spec)?;
            let bias = l.bias.as_ref().map(|b| b.to_device(Device::Cpu)).transpose()?;
            Ok((id, packed, bias.map(|b| b.into_dtype(DType::F16))))
        })
        .collect::<Result<_>>()?;
    let f16 = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(Device::Cpu)?.into_dtype(DType::F16)) };
    let norms = w.norms().map(|(r, n)| Ok((r, f16(n)?))).collect::<Result<_>>()?;
    let router = w.router().map(f16).transpose()?;
    let block_idx = w.block_idx;
    let seconds = start.elapsed().as_secs_f64();
    let (groups, clips, unrouted_experts) = (Vec::new(), Vec::new(), Vec::new());
    let report = BlockReport { block_idx, groups, clips, unrouted_experts, seconds };
    Ok(QuantizedBlock { block_idx, linears, norms, router, report })
}

/// A group as logs name it: its linears, an expert group's by expert range.
fn group_name(group: &BlockGroup) -> String {
    match (group.linears.first(), group.linears.last()) {
        (Some(first), Some(last)) if group.linears.len() > 4 => format!("[{first} .. {last}]"),
        _ => format!("{:?}", group.linears.iter().map(|id| id.to_string()).collect::<Vec<_>>()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use awq_kernels::rng::SplitMix64;
    use awq_model::synthetic::{write_checkpoint, SyntheticSpec};
    use awq_model::Checkpoint;

    /// Folding scales into a norm and multiplying them into the group's linears leaves the block's
    /// output as it was (in f32, up to rounding), for `Plain` norms (Llama) and `1 + w` ones (Gemma
    /// 3); folding a Gemma norm as a plain one does not. Scales far from 1 (0.25 to 4), which AWQ's
    /// search on random activations rarely reaches.
    #[test]
    fn folding_scales_into_either_norm_form_keeps_the_block_output() {
        let cases = [(SyntheticSpec::tiny_llama(), NormForm::Plain), (SyntheticSpec::tiny_gemma3(), NormForm::OnePlus)];
        for (spec, form) in cases {
            let dir = tempfile::tempdir().unwrap();
            write_checkpoint(dir.path(), &spec).unwrap();
            let ck = Checkpoint::open(dir.path()).unwrap();
            assert_eq!(ck.arch().norm_form, form);
            let shape = BlockShape::of(&ck);
            let (seq_len, h) = (12, ck.config().hidden_size);
            let mut rng = SplitMix64::new(9);
            let x = Tensor::from_f32(&[seq_len, h], rng.normal_vec(seq_len * h, 1.0)).unwrap();
            let w = ck.load_block(0).unwrap().into_dtype(DType::F32);
            let (want, inputs) = block_forward(&x, &w, &shape, seq_len, true).unwrap();
            let scales: Vec<f32> = (0..h).map(|_| 4f32.powf(rng.uniform(-1.0, 1.0))).collect();
            let fold = |form: NormForm| {
                let (mut w, mut inputs) = (w.clone(), inputs.clone().unwrap());
                let groups = ck.arch().block_groups(ck.config(), 0);
                for group in groups.iter().filter(|g| matches!(g.prev, BlockPrev::Norm(_))) {
                    apply_scales(group, &scales, form, &mut w, &mut inputs).unwrap();
                }
                ops::relative_error(&block_forward(&x, &w, &shape, seq_len, false).unwrap().0, &want).unwrap()
            };
            let e = fold(form);
            assert!(e < 1e-5, "{form:?}: relative error {e}");
            if form == NormForm::OnePlus {
                let wrong = fold(NormForm::Plain);
                assert!(wrong > 1e-2, "a 1 + w norm folded as w / s: relative error {wrong}");
            }
        }
    }
}
