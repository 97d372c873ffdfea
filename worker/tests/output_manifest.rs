//! What the engine produces against the manifest of the AWQ output checkpoint
//! (`awq_model::manifest::AwqManifest`): the coordinator lays the output's files out from that
//! manifest before any result exists and refuses a result that differs from it, so every tensor
//! the engine writes (a block's `raw_tensors`, the `tail_tensors`) must be in it with exactly its
//! name, dtype and shape, in its order, for every registered architecture.

use awq_kernels::rng::SplitMix64;
use awq_kernels::{DType, Tensor};
use awq_model::arch::REGISTRY;
use awq_kernels::ops::{GroupSize, QuantSpec};
use awq_model::manifest::{AwqManifest, ModelPart};
use awq_model::safetensors::{RawTensor, TensorSpec};
use awq_model::synthetic::{write_checkpoint, SyntheticSpec};
use awq_model::Checkpoint;
use awq_worker::awq::{quantize_block, quantize_rtn, tail_tensors, AwqOptions, BlockReport, Method};
use awq_worker::BlockShape;

/// Names, dtypes and shapes of `tensors`, checking each holds the bytes they imply.
fn specs(tensors: &[RawTensor]) -> Vec<TensorSpec> {
    for t in tensors {
        assert_eq!(t.data.len() as u64, t.spec().len_bytes(), "{}: byte count", t.name);
    }
    tensors.iter().map(RawTensor::spec).collect()
}

/// Quantizes every block of `spec`'s synthetic model with RTN (and block 0 with AWQ too) and
/// compares each part with the manifest. Returns block 0's AWQ report.
fn check(label: &str, spec: SyntheticSpec) -> BlockReport {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &spec).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    let awq = QuantSpec { bits: 4, group_size: GroupSize::G64, zero_point: true };
    let manifest = AwqManifest::new(ck.arch(), ck.config(), awq);
    assert_eq!(manifest.n_blocks(), spec.n_blocks, "{label}");

    assert_eq!(specs(&tail_tensors(&ck).unwrap()), manifest.part(ModelPart::Tail).unwrap(), "{label}: the tail");
    for b in 0..spec.n_blocks {
        let block = quantize_rtn(&ck.load_block(b).unwrap().into_dtype(DType::F32), awq).unwrap();
        let got = specs(&block.raw_tensors(ck.arch()).unwrap());
        assert_eq!(got, manifest.part(ModelPart::Block(b)).unwrap(), "{label}: block {b} (rtn)");
    }

    // AWQ ends in the same packing, with scaled norms; same tensors.
    let (n_seq, seq_len) = (2, 16);
    let x = Tensor::from_f32(&[n_seq * seq_len, ck.config().hidden_size], SplitMix64::new(3).normal_vec(n_seq * seq_len * ck.config().hidden_size, 1.0))
        .unwrap();
    let options = AwqOptions::new(awq, Method::Awq);
    let weights = ck.load_block(0).unwrap().into_dtype(DType::F32);
    let (block, _) = quantize_block(weights, &x, &BlockShape::of(&ck), seq_len, ck.arch(), &options).unwrap();
    let got = specs(&block.raw_tensors(ck.arch()).unwrap());
    assert_eq!(got, manifest.part(ModelPart::Block(0)).unwrap(), "{label}: block 0 (awq)");
    block.report
}

#[test]
fn engine_output_is_exactly_the_manifest_for_every_architecture() {
    for arch in REGISTRY {
        let base = SyntheticSpec { model_type: arch.model_type, n_blocks: 2, ..SyntheticSpec::tiny_llama() };
        // Qwen2 (biases on q, k, v) with its own shapes: one kv head, intermediate size 384; Qwen3
        // (per-head q/k norms, kept f16 and unscaled) with heads of 64 in a hidden size of 128.
        let spec = match arch.model_type {
            "qwen2" => SyntheticSpec::tiny_qwen2(),
            "qwen3" => SyntheticSpec::tiny_qwen3(),
            "phi3" => SyntheticSpec::tiny_phi3(),
            "gemma3_text" => SyntheticSpec::tiny_gemma3(),
            _ => base,
        };
        check(arch.model_type, spec.clone());
        // Tied embeddings (no lm_head) and a bf16 source: the output is F16 all the same.
        check(&format!("{} tied, bf16", arch.model_type), SyntheticSpec { tie_word_embeddings: true, dtype: DType::BF16, ..spec });
    }
}

/// Phi-3's fused qkv_proj and gate_up_proj (in the manifest once each, the parts' packed columns
/// side by side) under AWQ: with as many KV heads as heads the v -> o group applies, with grouped-
/// query attention it is skipped (AutoAWQ would divide k's and q's rows of qkv_proj there); q and k
/// are clipped, as AutoAWQ clips the fused qkv_proj.
#[test]
fn phi3_output_is_fused_and_skips_v_to_o_under_gqa() {
    let groups = |r: &BlockReport| r.groups.iter().map(|g| g.linears.join(" ")).collect::<Vec<_>>();
    let mha = check("phi3 4/4 heads", SyntheticSpec::tiny_phi3());
    assert_eq!(groups(&mha), ["Q K V", "O", "Gate Up", "Down"]);
    let clipped: Vec<&str> = mha.clips.iter().map(|c| c.linear.as_str()).collect();
    assert_eq!(clipped, ["Q", "K", "V", "O", "Gate", "Up", "Down"]);
    let gqa = check("phi3 4/2 heads", SyntheticSpec { n_kv_heads: 2, ..SyntheticSpec::tiny_phi3() });
    assert_eq!(groups(&gqa), ["Q K V", "Gate Up", "Down"]);
}

/// Gemma 3 under AWQ: Llama's four groups, the MLP's behind pre_feedforward_layernorm (v -> o
/// skipped: 4 heads over 2 KV heads); the output and q/k norms come out as they went in (the fold
/// into the `1 + w` norms is checked in `awq::tests`).
#[test]
fn gemma3_scales_only_the_input_norms() {
    use awq_model::arch::NormRole;
    let report = check("gemma3", SyntheticSpec::tiny_gemma3());
    let groups: Vec<String> = report.groups.iter().map(|g| g.linears.join(" ")).collect();
    assert_eq!(groups, ["Q K V", "Gate Up", "Down"]);

    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &SyntheticSpec::tiny_gemma3()).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    let awq = QuantSpec { bits: 4, group_size: GroupSize::G64, zero_point: true };
    let (n_seq, seq_len, h) = (2, 16, ck.config().hidden_size);
    let x = Tensor::from_f32(&[n_seq * seq_len, h], SplitMix64::new(4).normal_vec(n_seq * seq_len * h, 1.0)).unwrap();
    let original = ck.load_block(1).unwrap().into_dtype(DType::F32);
    let options = AwqOptions::new(awq, Method::Awq);
    let (block, _) = quantize_block(original.clone(), &x, &BlockShape::of(&ck), seq_len, ck.arch(), &options).unwrap();
    let out = |r: NormRole| block.norms.iter().find(|(role, _)| *role == r).unwrap().1.to_f32_vec().unwrap();
    for r in [NormRole::QHead, NormRole::KHead, NormRole::AttnOut, NormRole::MlpOut] {
        assert_eq!(out(r), original.norm(r).to_f32_vec().unwrap(), "{r:?}");
    }
    for r in [NormRole::Attn, NormRole::Mlp] {
        assert_ne!(out(r), original.norm(r).to_f32_vec().unwrap(), "{r:?}");
    }
}
