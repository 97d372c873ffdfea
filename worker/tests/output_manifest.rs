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

/// Quantizes every block of `spec`'s synthetic model with RTN (and block 0, or the first sparse
/// block, with AWQ too) and compares each part with the manifest. Returns that block's AWQ report.
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
    let b = (0..spec.n_blocks).find(|&b| ck.arch().is_sparse(ck.config(), b)).unwrap_or(0);
    let weights = ck.load_block(b).unwrap().into_dtype(DType::F32);
    let (arch, config) = (ck.arch(), ck.config());
    let (block, _) = quantize_block(weights, &x, &BlockShape::of(&ck), seq_len, arch, config, &options).unwrap();
    let got = specs(&block.raw_tensors(ck.arch()).unwrap());
    assert_eq!(got, manifest.part(ModelPart::Block(b)).unwrap(), "{label}: block {b} (awq)");
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
            "mixtral" => SyntheticSpec::tiny_mixtral(),
            "qwen3_moe" => SyntheticSpec::tiny_qwen3_moe(),
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
    let (arch, config) = (ck.arch(), ck.config());
    let shape = BlockShape::of(&ck);
    let (block, _) = quantize_block(original.clone(), &x, &shape, seq_len, arch, config, &options).unwrap();
    let out = |r: NormRole| block.norms.iter().find(|(role, _)| *role == r).unwrap().1.to_f32_vec().unwrap();
    for r in [NormRole::QHead, NormRole::KHead, NormRole::AttnOut, NormRole::MlpOut] {
        assert_eq!(out(r), original.norm(r).to_f32_vec().unwrap(), "{r:?}");
    }
    for r in [NormRole::Attn, NormRole::Mlp] {
        assert_ne!(out(r), original.norm(r).to_f32_vec().unwrap(), "{r:?}");
    }
}

/// A sparse block under AWQ (AutoAWQ's Mixtral / Qwen3-MoE groups): the attention's groups, one
/// group over every expert's gate and up, then each expert's up -> down; Mixtral clips no expert
/// (AutoAWQ's `k_` in `block_sparse_moe`), Qwen3-MoE clips them all; the router comes out as it
/// went in (f16, unscaled, unquantized).
#[test]
fn moe_blocks_scale_every_expert_and_keep_the_router() {
    let groups = |r: &BlockReport| r.groups.iter().map(|g| g.linears.join(" ")).collect::<Vec<_>>();
    let clipped = |r: &BlockReport| r.clips.iter().map(|c| c.linear.clone()).collect::<Vec<_>>();
    let all_gate_up =
        |n: usize| (0..n).map(|e| format!("experts.{e}.Gate experts.{e}.Up")).collect::<Vec<_>>().join(" ");
    let downs = |n: usize| (0..n).map(|e| format!("experts.{e}.Down")).collect::<Vec<_>>();

    let mixtral = check("mixtral", SyntheticSpec::tiny_mixtral());
    let mut want = vec!["Q K V".to_string(), all_gate_up(4)];
    want.extend(downs(4));
    assert_eq!(groups(&mixtral), want, "v -> o skipped: 2 KV heads of 32");
    assert_eq!(clipped(&mixtral), ["V", "O"]);
    assert!(mixtral.unrouted_experts.is_empty(), "32 tokens reach every one of 4 experts");

    let qwen3_moe = check("qwen3_moe", SyntheticSpec::tiny_qwen3_moe());
    let mut want = vec!["Q K V".to_string(), all_gate_up(8)];
    want.extend(downs(8));
    assert_eq!(groups(&qwen3_moe), want);
    let mut want = vec!["V".to_string(), "O".to_string()];
    want.extend((0..8).flat_map(|e| ["Gate", "Up", "Down"].map(|r| format!("experts.{e}.{r}"))));
    assert_eq!(clipped(&qwen3_moe), want);
}

/// An expert the router never picks (its logit 0 while two others are always positive) gets no
/// calibration token: AutoAWQ stops there; the engine keeps its up -> down scales at 1 and does not
/// clip it, so its down projection is packed exactly as round-to-nearest packs the original, and the
/// report names it. The router is stored as it was, bit for bit.
#[test]
fn an_expert_without_calibration_tokens_keeps_scales_of_one_and_is_not_clipped() {
    use awq_model::arch::{LinearId, LinearRole};
    use awq_model::BlockWeights;
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &SyntheticSpec { n_experts: 5, ..SyntheticSpec::tiny_qwen3_moe() }).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    let h = ck.config().hidden_size;
    let w = ck.load_block(1).unwrap().into_dtype(DType::F32);
    // Experts 0 and 1 score +-50 x[0], 2 and 3 +-50 x[1]: one of each pair is positive for every
    // token, so top-2 never reaches expert 4, whose logits are 0.
    let mut router = vec![0.0f32; 5 * h];
    for (e, sign) in [(0, 1.0), (1, -1.0), (2, 1.0), (3, -1.0)] {
        router[e * h + e / 2] = 50.0 * sign;
    }
    let router = Tensor::from_f32(&[5, h], router).unwrap();
    let linears: Vec<(LinearId, _)> = w.linears().map(|(id, l)| (id, l.clone())).collect();
    let norms: Vec<_> = w.norms().map(|(r, n)| (r, n.clone())).collect();
    let w = BlockWeights::new(1, linears, norms, Some(router.clone()));
    let (n_seq, seq_len) = (2, 16);
    let x = Tensor::from_f32(&[n_seq * seq_len, h], SplitMix64::new(5).normal_vec(n_seq * seq_len * h, 1.0)).unwrap();
    let awq = QuantSpec { bits: 4, group_size: GroupSize::G64, zero_point: true };
    let options = AwqOptions::new(awq, Method::Awq);
    let (arch, config) = (ck.arch(), ck.config());
    let (block, _) = quantize_block(w.clone(), &x, &BlockShape::of(&ck), seq_len, arch, config, &options).unwrap();
    assert_eq!(block.report.unrouted_experts, [4]);
    let names: Vec<&str> = block.report.groups.iter().flat_map(|g| g.linears.iter().map(String::as_str)).collect();
    assert!(names.contains(&"experts.4.Gate") && !names.contains(&"experts.4.Down"), "{names:?}");
    assert!(block.report.clips.iter().all(|c| !c.linear.starts_with("experts.4.")), "{:?}", block.report.clips);
    assert!(block.report.clips.iter().any(|c| c.linear == "experts.3.Down"));
    let down = LinearId::expert(4, LinearRole::Down);
    let packed = &block.linears.iter().find(|(id, _, _)| *id == down).unwrap().1;
    assert_eq!(packed, &awq_kernels::ops::quantize_packed(&w.linear(down).weight, awq).unwrap());
    assert_eq!(block.router.as_ref().unwrap(), &router.into_dtype(DType::F16));
    let json = serde_json::to_value(&block.report).unwrap();
    assert_eq!(json["unrouted_experts"], serde_json::json!([4]));
}
