//! The tensors of a checkpoint, known from its architecture and config alone: every name, its
//! shape, and what the tensor is (which decides its dtype).
//!
//! One enumeration, `checkpoint_tensors` (a block's share: `block_tensors`), serves three users:
//! - [`crate::Checkpoint`] checks a checkpoint it opens against it, loosely where Hugging Face
//!   checkpoints vary (norms and biases in any float type, linears and embeddings in config.json's
//!   `torch_dtype`);
//! - [`AwqManifest`] is the exact content of an AWQ checkpoint as this project writes it: every
//!   tensor's name, safetensors dtype and shape, grouped by the [`ModelPart`] that produces it. The
//!   checkpoint writer lays its files out from it before the first result exists
//!   ([`crate::writer::WeightsWriter`]), and the coordinator checks each uploaded result against
//!   it;
//! - [`crate::Checkpoint::largest_block_tensor_bytes`] sizes a weight reader's staging buffer.
//!
//! What the AWQ engine writes (awq-worker: `tail_tensors`, `QuantizedBlock::raw_tensors`; a test
//! there compares them with this manifest for every registered architecture): embeddings, the
//! final norm and an untied lm_head in F16; per block the norms in F16 (the per-head q/k norms of
//! the architectures that have them too: never scaled nor quantized), then per linear `qweight`
//! I32 `[in, out / 8]`, `qzeros` I32 `[in / g, out / 8]`, `scales` F16 `[in / g, out]` and the bias in
//! F16 where the architecture has one (the layout is in [`crate::awq_format`]). Within a part,
//! tensors are listed in that order. Linears are listed as stored: a fused one (Phi-3's
//! `qkv_proj`, `gate_up_proj`) once, with its parts' outputs concatenated, as AutoAWQ and vLLM load it.
//! A sparse block (Mixtral, Qwen3-MoE) lists its attention's linears, then its router's weight
//! (F16, never quantized), then each expert's gate, up and down, expert by expert.

use crate::arch::{ArchDescriptor, LinearId, LinearRole};
use awq_kernels::ops::QuantSpec;
use crate::safetensors::{StDtype, TensorSpec};
use crate::ModelConfig;

/// What a tensor of a checkpoint is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorRole {
    /// `embed_tokens` or `lm_head`, `[vocab, hidden]`.
    Embedding,
    Norm,
    /// A full-precision linear weight `[out, in]` (never in an AWQ checkpoint).
    LinearWeight,
    /// A mixture of experts' router `[n_experts, hidden]`: full precision in every checkpoint.
    Router,
    Bias,
    /// The packed parts of an AWQ linear.
    QWeight,
    QZeros,
    Scales,
}

impl TensorRole {
    /// The dtype an AWQ checkpoint stores this role in: the packed codes I32, everything else F16.
    fn awq_dtype(self) -> StDtype {
        match self {
            TensorRole::QWeight | TensorRole::QZeros => StDtype::I32,
            TensorRole::Embedding
            | TensorRole::Norm
            | TensorRole::LinearWeight
            | TensorRole::Router
            | TensorRole::Bias
            | TensorRole::Scales => StDtype::F16,
        }
    }
}

/// Which part of a model a tensor belongs to: a decoder block, or the tail (everything outside the
/// blocks: embeddings, final norm, lm_head). A quantization job produces its output part by part.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ModelPart {
    Block(usize),
    Tail,
}

impl std::fmt::Display for ModelPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelPart::Block(b) => write!(f, "block {b}"),
            ModelPart::Tail => f.write_str("the tail"),
        }
    }
}

/// One tensor a checkpoint must hold.
pub(crate) struct CheckpointTensor {
    pub part: ModelPart,
    pub name: String,
    pub shape: Vec<usize>,
    pub role: TensorRole,
}

/// Every tensor `a` needs under config `c` (packed linears when `awq` is set): the tail first
/// (embeddings, final norm, untied lm_head), then each block in order.
pub(crate) fn checkpoint_tensors(a: &ArchDescriptor, c: &ModelConfig, awq: Option<QuantSpec>) -> Vec<CheckpointTensor> {
    let tensor = |part, name: String, shape: Vec<usize>, role| CheckpointTensor { part, name, shape, role };
    let tail = ModelPart::Tail;
    let mut out = vec![
        tensor(tail, a.embed_tokens.into(), vec![c.vocab_size, c.hidden_size], TensorRole::Embedding),
        tensor(tail, a.final_norm.into(), vec![c.hidden_size], TensorRole::Norm),
    ];
    if !c.tie_word_embeddings {
        out.push(tensor(tail, a.lm_head.into(), vec![c.vocab_size, c.hidden_size], TensorRole::Embedding));
    }
    for b in 0..c.n_blocks {
        out.extend(block_tensors(a, c, awq, b));
    }
    out
}

/// The tensors of block `b` alone, as [`checkpoint_tensors`] lists them.
pub(crate) fn block_tensors(a: &ArchDescriptor, c: &ModelConfig, awq: Option<QuantSpec>, b: usize) -> Vec<CheckpointTensor> {
    let part = ModelPart::Block(b);
    let tensor = |name: String, shape: Vec<usize>, role| CheckpointTensor { part, name, shape, role };
    let mut out = Vec::new();
    for n in a.norms {
        out.push(tensor(a.norm_name(b, n.role), vec![n.dim.resolve(c)], TensorRole::Norm));
    }
    // One entry per stored tensor: a fused linear (Phi-3's qkv_proj) under its first role's name,
    // with its parts' outputs together; a sparse block's router before its experts.
    let sparse = a.is_sparse(c, b);
    for parts in a.block_stored(c, b) {
        let id = parts[0];
        if sparse && id == LinearId::expert(0, LinearRole::Gate) {
            let n_experts = c.moe.as_ref().map_or(0, |m| m.n_experts);
            out.push(tensor(a.router_name(b), vec![n_experts, c.hidden_size], TensorRole::Router));
        }
        let [o, i] = a.stored_shape(id, c);
        match awq {
            None => out.push(tensor(a.linear_name(b, id), vec![o, i], TensorRole::LinearWeight)),
            Some(q) => {
                let g = i / q.group_size.get();
                out.push(tensor(a.packed_name(b, id, "qweight"), vec![i, o / 8], TensorRole::QWeight));
                out.push(tensor(a.packed_name(b, id, "qzeros"), vec![g, o / 8], TensorRole::QZeros));
                out.push(tensor(a.packed_name(b, id, "scales"), vec![g, o], TensorRole::Scales));
            }
        }
        if a.has_bias(id, c) {
            out.push(tensor(a.bias_name(b, id), vec![o], TensorRole::Bias));
        }
    }
    out
}

/// Every tensor of an AWQ checkpoint of one model, exactly (name, dtype, shape), by part; see the
/// module docs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AwqManifest {
    tail: Vec<TensorSpec>,
    blocks: Vec<Vec<TensorSpec>>,
}

impl AwqManifest {
    /// The manifest of `config`'s model quantized with `awq`. Shapes assume the model passed
    /// [`crate::awq_format::check_quantizable`].
    pub fn new(arch: &ArchDescriptor, config: &ModelConfig, awq: QuantSpec) -> AwqManifest {
        let mut manifest = AwqManifest { tail: Vec::new(), blocks: vec![Vec::new(); config.n_blocks] };
        for t in checkpoint_tensors(arch, config, Some(awq)) {
            let spec = TensorSpec { name: t.name, dtype: t.role.awq_dtype(), shape: t.shape };
            match t.part {
                ModelPart::Tail => manifest.tail.push(spec),
                ModelPart::Block(b) => manifest.blocks[b].push(spec),
            }
        }
        manifest
    }

    pub fn n_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// The tensors of `part`, in the engine's order; `None` for a block the model does not have.
    pub fn part(&self, part: ModelPart) -> Option<&[TensorSpec]> {
        match part {
            ModelPart::Tail => Some(&self.tail),
            ModelPart::Block(b) => self.blocks.get(b).map(Vec::as_slice),
        }
    }

    /// Every part: the tail, then the blocks in order.
    pub fn parts(&self) -> impl Iterator<Item = ModelPart> {
        std::iter::once(ModelPart::Tail).chain((0..self.blocks.len()).map(ModelPart::Block))
    }

    /// Every tensor: the tail's, then each block's.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorSpec> {
        self.tail.iter().chain(self.blocks.iter().flatten())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::descriptor_for;
    use std::path::Path;

    #[test]
    fn llama_manifest_has_awq_gemm_shapes_and_dtypes() {
        let text = r#"{"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": true, "torch_dtype": "bfloat16"}"#;
        let config = ModelConfig::parse(Path::new("config.json"), text).unwrap();
        let arch = descriptor_for("llama", Path::new("config.json")).unwrap();
        let m = AwqManifest::new(arch, &config, QuantSpec { bits: 4, group_size: awq_kernels::ops::GroupSize::G64, zero_point: true });
        let spec = |name: &str, dtype, shape: &[usize]| TensorSpec { name: name.into(), dtype, shape: shape.to_vec() };
        // Tied embeddings: no lm_head.
        assert_eq!(
            m.part(ModelPart::Tail).unwrap(),
            [spec("model.embed_tokens.weight", StDtype::F16, &[300, 256]), spec("model.norm.weight", StDtype::F16, &[256])]
        );
        let block1 = m.part(ModelPart::Block(1)).unwrap();
        assert_eq!(block1.len(), 2 + 7 * 3);
        assert_eq!(block1[0], spec("model.layers.1.input_layernorm.weight", StDtype::F16, &[256]));
        // k_proj: out = 2 kv heads x 64 = 128, in = 256, 4 groups of 64.
        assert_eq!(block1[5..8], [
            spec("model.layers.1.self_attn.k_proj.qweight", StDtype::I32, &[256, 16]),
            spec("model.layers.1.self_attn.k_proj.qzeros", StDtype::I32, &[4, 16]),
            spec("model.layers.1.self_attn.k_proj.scales", StDtype::F16, &[4, 128]),
        ]);
        // down_proj: in = intermediate.
        assert_eq!(block1[22], spec("model.layers.1.mlp.down_proj.scales", StDtype::F16, &[8, 256]));
        assert_eq!(m.part(ModelPart::Block(2)), None);
        assert_eq!(m.parts().collect::<Vec<_>>(), [ModelPart::Tail, ModelPart::Block(0), ModelPart::Block(1)]);
        assert_eq!(m.tensors().count(), 2 + 2 * 23);
    }

    /// Gemma 3's six norms per block, in role order and f16 (AWQ scales two of them; none is
    /// quantized), before the linears.
    #[test]
    fn gemma3_manifest_lists_six_norms_per_block() {
        let text = r#"{"model_type": "gemma3_text", "hidden_size": 256, "intermediate_size": 512,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 128,
            "vocab_size": 300}"#;
        let config = ModelConfig::parse(Path::new("config.json"), text).unwrap();
        let arch = descriptor_for("gemma3_text", Path::new("config.json")).unwrap();
        let quant = QuantSpec { bits: 4, group_size: awq_kernels::ops::GroupSize::G128, zero_point: true };
        let m = AwqManifest::new(arch, &config, quant);
        let spec =
            |name: &str, shape: &[usize]| TensorSpec { name: name.into(), dtype: StDtype::F16, shape: shape.to_vec() };
        let block = m.part(ModelPart::Block(0)).unwrap();
        assert_eq!(block.len(), 6 + 7 * 3);
        let norm = |module: &str, len| spec(&format!("model.layers.0.{module}.weight"), &[len]);
        assert_eq!(
            block[..6],
            [
                norm("input_layernorm", 256),
                norm("pre_feedforward_layernorm", 256),
                norm("self_attn.q_norm", 128),
                norm("self_attn.k_norm", 128),
                norm("post_attention_layernorm", 256),
                norm("post_feedforward_layernorm", 256),
            ]
        );
        assert_eq!(block[6].name, "model.layers.0.self_attn.q_proj.qweight");
        // Tied by default (Gemma3TextConfig): no lm_head.
        assert_eq!(m.part(ModelPart::Tail).unwrap().len(), 2);
    }

    #[test]
    fn qwen3_manifest_keeps_the_per_head_norms_in_f16() {
        let text = r#"{"model_type": "qwen3", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128, "vocab_size": 300,
            "tie_word_embeddings": true}"#;
        let config = ModelConfig::parse(Path::new("config.json"), text).unwrap();
        let arch = descriptor_for("qwen3", Path::new("config.json")).unwrap();
        let m = AwqManifest::new(
            arch,
            &config,
            QuantSpec { bits: 4, group_size: awq_kernels::ops::GroupSize::G128, zero_point: true },
        );
        let spec = |name: &str, dtype, shape: &[usize]| TensorSpec { name: name.into(), dtype, shape: shape.to_vec() };
        let block = m.part(ModelPart::Block(0)).unwrap();
        assert_eq!(block.len(), 4 + 7 * 3);
        assert_eq!(
            block[2..4],
            [
                spec("model.layers.0.self_attn.q_norm.weight", StDtype::F16, &[128]),
                spec("model.layers.0.self_attn.k_norm.weight", StDtype::F16, &[128]),
            ]
        );
        // q_proj: out = 4 heads x 128 = 512 (not hidden_size), in = 256; o_proj the other way round.
        assert_eq!(block[4], spec("model.layers.0.self_attn.q_proj.qweight", StDtype::I32, &[256, 64]));
        assert_eq!(block[13], spec("model.layers.0.self_attn.o_proj.qweight", StDtype::I32, &[512, 32]));
    }

    /// A Mixtral block: norms, the attention's linears, the router in F16 (never quantized), then
    /// each expert's w1, w3, w2 packed; a Qwen3-MoE model's dense block keeps its dense MLP.
    #[test]
    fn moe_manifests_list_the_router_then_every_expert() {
        let q = QuantSpec { bits: 4, group_size: awq_kernels::ops::GroupSize::G64, zero_point: true };
        let spec = |name: &str, dtype, shape: &[usize]| TensorSpec { name: name.into(), dtype, shape: shape.to_vec() };
        let text = r#"{"model_type": "mixtral", "hidden_size": 128, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 300, "num_local_experts": 3,
            "num_experts_per_tok": 2}"#;
        let config = ModelConfig::parse(Path::new("config.json"), text).unwrap();
        let m = AwqManifest::new(descriptor_for("mixtral", Path::new("config.json")).unwrap(), &config, q);
        let block = m.part(ModelPart::Block(1)).unwrap();
        assert_eq!(block.len(), 2 + 4 * 3 + 1 + 3 * 3 * 3);
        assert_eq!(block[14], spec("model.layers.1.block_sparse_moe.gate.weight", StDtype::F16, &[3, 128]));
        assert_eq!(block[15], spec("model.layers.1.block_sparse_moe.experts.0.w1.qweight", StDtype::I32, &[128, 8]));
        assert_eq!(block[21], spec("model.layers.1.block_sparse_moe.experts.0.w2.qweight", StDtype::I32, &[64, 16]));
        assert_eq!(block[23], spec("model.layers.1.block_sparse_moe.experts.0.w2.scales", StDtype::F16, &[1, 128]));
        assert_eq!(block.last().unwrap().name, "model.layers.1.block_sparse_moe.experts.2.w2.scales");

        let text = r#"{"model_type": "qwen3_moe", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "num_experts": 2,
            "num_experts_per_tok": 1, "moe_intermediate_size": 64, "decoder_sparse_step": 2}"#;
        let config = ModelConfig::parse(Path::new("config.json"), text).unwrap();
        let arch = descriptor_for("qwen3_moe", Path::new("config.json")).unwrap();
        let m = AwqManifest::new(arch, &config, q);
        let dense = m.part(ModelPart::Block(0)).unwrap();
        assert_eq!(dense.len(), 4 + 7 * 3);
        assert_eq!(dense[22], spec("model.layers.0.mlp.down_proj.qweight", StDtype::I32, &[256, 16]));
        let sparse = m.part(ModelPart::Block(1)).unwrap();
        assert_eq!(sparse.len(), 4 + 4 * 3 + 1 + 2 * 3 * 3);
        assert_eq!(sparse[16], spec("model.layers.1.mlp.gate.weight", StDtype::F16, &[2, 128]));
        assert_eq!(sparse[17].name, "model.layers.1.mlp.experts.0.gate_proj.qweight");
        let fp16: Vec<String> = block_tensors(arch, &config, None, 1).into_iter().map(|t| t.name).collect();
        let router_then_expert_0 = [
            "model.layers.1.mlp.gate.weight",
            "model.layers.1.mlp.experts.0.gate_proj.weight",
            "model.layers.1.mlp.experts.0.up_proj.weight",
        ];
        assert_eq!(fp16[8..11], router_then_expert_0);
    }

    /// Phi-3 stores q|k|v and gate|up fused: 4 stored linears, whose packed tensors hold the parts'
    /// outputs side by side, as AutoAWQ writes them; a float checkpoint lists the fused weights.
    #[test]
    fn phi3_manifest_lists_the_fused_tensors_once() {
        let text = r#"{"model_type": "phi3", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300}"#;
        let config = ModelConfig::parse(Path::new("config.json"), text).unwrap();
        let arch = descriptor_for("phi3", Path::new("config.json")).unwrap();
        let q = QuantSpec { bits: 4, group_size: awq_kernels::ops::GroupSize::G64, zero_point: true };
        let m = AwqManifest::new(arch, &config, q);
        let spec = |name: &str, dtype, shape: &[usize]| TensorSpec { name: name.into(), dtype, shape: shape.to_vec() };
        let block = m.part(ModelPart::Block(0)).unwrap();
        assert_eq!(block.len(), 2 + 4 * 3);
        // q 4 x 64 + k 2 x 64 + v 2 x 64 = 512 outputs; gate + up 2 x 512.
        assert_eq!(
            block[2..5],
            [
                spec("model.layers.0.self_attn.qkv_proj.qweight", StDtype::I32, &[256, 64]),
                spec("model.layers.0.self_attn.qkv_proj.qzeros", StDtype::I32, &[4, 64]),
                spec("model.layers.0.self_attn.qkv_proj.scales", StDtype::F16, &[4, 512]),
            ]
        );
        assert_eq!(block[5], spec("model.layers.0.self_attn.o_proj.qweight", StDtype::I32, &[256, 32]));
        assert_eq!(block[8], spec("model.layers.0.mlp.gate_up_proj.qweight", StDtype::I32, &[256, 128]));
        assert_eq!(block[13], spec("model.layers.0.mlp.down_proj.scales", StDtype::F16, &[8, 256]));
        let fp16: Vec<(String, Vec<usize>)> =
            block_tensors(arch, &config, None, 0).into_iter().map(|t| (t.name, t.shape)).collect();
        assert_eq!(
            fp16[2..],
            [
                ("model.layers.0.self_attn.qkv_proj.weight".to_string(), vec![512, 256]),
                ("model.layers.0.self_attn.o_proj.weight".to_string(), vec![256, 256]),
                ("model.layers.0.mlp.gate_up_proj.weight".to_string(), vec![1024, 256]),
                ("model.layers.0.mlp.down_proj.weight".to_string(), vec![256, 512]),
            ]
        );
    }
}
