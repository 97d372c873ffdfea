//! Checkpoint reading against synthetic checkpoints the tests write themselves: every architecture
//! round-trips, sharded equals single-file, and each kind of malformed input is an error naming the
//! file and the tensor or field.

use std::path::Path;

use awq_kernels::{DType, Device, HostStaging};
use awq_model::arch::{LinearId, LinearRole, NormRole, REGISTRY};
use awq_model::safetensors::{self, RawTensor, SafetensorsFile};
use awq_model::synthetic::{write_checkpoint, SyntheticSpec};
use awq_model::{Checkpoint, Error, ModelConfig, Tokenizer};

fn spec(model_type: &'static str, shards: usize) -> SyntheticSpec {
    SyntheticSpec { model_type, shards, ..SyntheticSpec::tiny_llama() }
}

#[test]
fn every_architecture_round_trips_single_and_sharded() {
    for arch in REGISTRY {
        let (single, sharded) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        write_checkpoint(single.path(), &spec(arch.model_type, 1)).unwrap();
        write_checkpoint(sharded.path(), &spec(arch.model_type, 3)).unwrap();
        assert!(sharded.path().join("model.safetensors.index.json").exists());
        let (a, b) = (Checkpoint::open(single.path()).unwrap(), Checkpoint::open(sharded.path()).unwrap());
        assert_eq!(a.arch().model_type, arch.model_type);
        assert_eq!(a.n_blocks(), 3);
        for block in 0..a.n_blocks() {
            let (wa, wb) = (a.load_block(block).unwrap(), b.load_block(block).unwrap());
            let ids = arch.block_linears(a.config(), block);
            assert_eq!(wa.linears().map(|(id, _)| id).collect::<Vec<_>>(), ids, "{} block {block}", arch.model_type);
            for &id in &ids {
                let (la, lb) = (wa.linear(id), wb.linear(id));
                assert_eq!(la.weight, lb.weight, "{} block {block} {id}", arch.model_type);
                assert_eq!(la.weight.shape(), arch.linear_shape(id, a.config()));
                assert_eq!(la.weight.dtype(), DType::F16);
                assert_eq!(la.bias, lb.bias);
                assert_eq!(la.bias.is_some(), arch.has_bias(id, a.config()));
            }
            // A sparse block's router, [experts, hidden].
            assert_eq!(wa.router().is_some(), arch.is_sparse(a.config(), block), "{} block {block}", arch.model_type);
            if let Some(router) = wa.router() {
                assert_eq!(router.shape(), [wa.n_experts(), a.config().hidden_size]);
                assert_eq!(Some(router), wb.router());
            }
            // The norms the descriptor lists, each of its length (a per-head norm: head_dim).
            let roles: Vec<NormRole> = wa.norms().map(|(role, _)| role).collect();
            assert_eq!(roles, arch.norms.iter().map(|n| n.role).collect::<Vec<_>>(), "{}", arch.model_type);
            for ((role, na), (_, nb)) in wa.norms().zip(wb.norms()) {
                assert_eq!(na, nb, "{} block {block} {role:?}", arch.model_type);
                assert_eq!(na.shape(), [arch.norm_len(role, a.config())], "{} {role:?}", arch.model_type);
            }
            let elements: usize = wa
                .linears()
                .map(|(_, l)| l.weight.elem_count() + l.bias.as_ref().map_or(0, |b| b.elem_count()))
                .chain(wa.norms().map(|(_, n)| n.elem_count()))
                .chain(wa.router().map(|r| r.elem_count()))
                .sum();
            assert_eq!(a.block_elements_of(block), elements, "{} block {block}", arch.model_type);
            // Stored tensors: a fused one (Phi-3's gate_up_proj) is read whole.
            let stored = ids.iter().map(|&id| arch.stored_shape(id, a.config()).iter().product::<usize>());
            let largest = stored.max().unwrap() * 2;
            assert_eq!(a.largest_block_tensor_bytes(block), largest, "{} block {block}: f16 values", arch.model_type);
        }
        assert_eq!(a.lm_head().unwrap(), b.lm_head().unwrap());
    }
}

/// Mixtral and Qwen3-MoE (with a dense block between sparse ones): each expert's linears and the
/// router read back from their own tensors (names spelled out here from transformers' modules), and
/// the largest block sizes what a block takes; a missing expert tensor is refused naming it.
#[test]
fn moe_blocks_read_their_router_and_experts() {
    for (spec, router, expert) in [
        (SyntheticSpec::tiny_mixtral(), "block_sparse_moe.gate", "block_sparse_moe.experts.3.w2"),
        (SyntheticSpec::tiny_qwen3_moe(), "mlp.gate", "mlp.experts.7.down_proj"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &spec).unwrap();
        let ck = Checkpoint::open(dir.path()).unwrap();
        let file = SafetensorsFile::open(dir.path().join("model.safetensors")).unwrap();
        let block = ck.load_block(1).unwrap();
        assert_eq!(block.n_experts(), spec.n_experts);
        assert_eq!(block.router(), Some(&file.tensor(&format!("model.layers.1.{router}.weight")).unwrap()));
        let last = LinearId::expert(spec.n_experts - 1, LinearRole::Down);
        let want = file.tensor(&format!("model.layers.1.{expert}.weight")).unwrap();
        assert_eq!(block.linear(last).weight, want, "{}", spec.model_type);
        assert_eq!(want.shape(), [128, spec.expert_intermediate_size]);
        if spec.model_type == "qwen3_moe" {
            // decoder_sparse_step 2: block 0 is dense, with the 256-wide MLP.
            let dense = ck.load_block(0).unwrap();
            assert_eq!((dense.router(), dense.n_experts()), (None, 0));
            let down = file.tensor("model.layers.0.mlp.down_proj.weight").unwrap();
            assert_eq!(dense.linear(LinearRole::Down).weight, down);
            assert_eq!(ck.block_elements(), ck.block_elements_of(1).max(ck.block_elements_of(0)));
        }
        let name = format!("model.layers.1.{expert}.weight");
        drop(file);
        let path = dir.path().join("model.safetensors");
        let file = SafetensorsFile::open(&path).unwrap();
        let kept: Vec<RawTensor> = file.raw_tensors().into_iter().filter(|t| t.name != name).collect();
        drop(file);
        safetensors::write(&path, &kept, &Default::default()).unwrap();
        let err = Checkpoint::open(dir.path()).unwrap_err();
        assert!(matches!(err, Error::MissingTensor { ref tensor, .. } if *tensor == name), "{err}");
    }
}

#[test]
fn qwen2_has_qkv_biases_and_tied_embeddings_share_the_table() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &spec("qwen2", 1)).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    let block = ck.load_block(0).unwrap();
    assert!(block.linear(LinearRole::Q).bias.is_some() && block.linear(LinearRole::O).bias.is_none());

    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &SyntheticSpec { tie_word_embeddings: true, ..SyntheticSpec::tiny_llama() }).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ck.lm_head().unwrap(), ck.embed_tokens().unwrap());
}

/// Gemma 3: six norms per block (the per-head ones of `head_dim`), stored as offsets from 1 (the
/// synthetic weights centre on 0), tied embeddings, and a config.json whose blocks are
/// sliding / full / sliding; a missing post_feedforward_layernorm is refused naming it.
#[test]
fn gemma3_round_trips_its_six_norms_and_layer_types() {
    use awq_model::LayerType::{Full, Sliding};
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &SyntheticSpec::tiny_gemma3()).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    let c = ck.config();
    assert_eq!(c.layer_types, awq_model::LayerTypes::Listed(vec![Sliding, Full, Sliding]));
    assert_eq!((c.sliding_window, c.query_pre_attn_scalar), (Some(8), Some(32.0)));
    assert_eq!((c.rope_theta, c.sliding_rope.as_ref().map(|r| r.theta)), (1e6, Some(1e4)));
    assert_eq!(ck.lm_head().unwrap(), ck.embed_tokens().unwrap());
    let block = ck.load_block(2).unwrap();
    let roles: Vec<NormRole> = block.norms().map(|(r, _)| r).collect();
    use NormRole::*;
    assert_eq!(roles, [Attn, Mlp, QHead, KHead, AttnOut, MlpOut]);
    assert_eq!((block.norm(QHead).shape(), block.norm(MlpOut).shape()), ([64].as_slice(), [128].as_slice()));
    let mean = |r| block.norm(r).f32_values().unwrap().iter().sum::<f32>() / 128.0;
    assert!(mean(Attn).abs() < 0.05 && mean(AttnOut).abs() < 0.05, "{} {}", mean(Attn), mean(AttnOut));
    assert!(LinearRole::ALL.iter().all(|&r| block.linear(r).bias.is_none()));

    let name = "model.layers.1.post_feedforward_layernorm.weight";
    let path = dir.path().join("model.safetensors");
    let file = SafetensorsFile::open(&path).unwrap();
    let kept: Vec<RawTensor> = file.raw_tensors().into_iter().filter(|t| t.name != name).collect();
    drop(file);
    safetensors::write(&path, &kept, &Default::default()).unwrap();
    let err = Checkpoint::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains(name), "{err}");
}

/// Qwen3: per-head q/k norms of `head_dim` values (64, twice `hidden / heads`), no attention
/// biases; a q_norm stored with the hidden size's length is refused naming it.
#[test]
fn qwen3_has_per_head_norms_of_its_head_dim() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &SyntheticSpec::tiny_qwen3()).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert_eq!((ck.config().head_dim, ck.config().hidden_size / ck.config().n_heads), (64, 32));
    let block = ck.load_block(1).unwrap();
    assert_eq!(block.norm(NormRole::QHead).shape(), [64]);
    assert_ne!(block.norm(NormRole::QHead), block.norm(NormRole::KHead));
    assert_eq!(block.linear(LinearRole::Q).weight.shape(), [4 * 64, 128]);
    assert!(LinearRole::ALL.iter().all(|&r| block.linear(r).bias.is_none()));

    let name = "model.layers.1.self_attn.q_norm.weight";
    rewrite_tensor(&dir.path().join("model.safetensors"), name, |t| RawTensor {
        shape: vec![128],
        data: [t.data.clone(), t.data].concat(),
        ..t
    });
    let err = Checkpoint::open(dir.path()).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { ref tensor, .. } if tensor == name), "{err}");
}

/// Phi-3 stores q|k|v in `qkv_proj` and gate|up in `gate_up_proj`: each role reads back its own
/// rows of the tensor in the file (offsets spelled out here from the layout transformers reads:
/// q's `heads * head_dim` rows, then k's and v's `kv_heads * head_dim`; gate's half, then up's), with
/// as many KV heads as heads and with grouped-query attention.
#[test]
fn phi3_roles_read_back_their_rows_of_the_fused_tensors() {
    for spec in [SyntheticSpec::tiny_phi3(), SyntheticSpec { n_kv_heads: 2, ..SyntheticSpec::tiny_phi3() }] {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &spec).unwrap();
        let ck = Checkpoint::open(dir.path()).unwrap();
        let file = SafetensorsFile::open(dir.path().join("model.safetensors")).unwrap();
        let names: Vec<&String> = file.tensors().keys().filter(|n| n.starts_with("model.layers.1.")).collect();
        assert_eq!(names.len(), 6, "2 norms and 4 stored linears: {names:?}");
        let (q, kv, inter) = (4 * 32, spec.n_kv_heads * 32, spec.intermediate_size);
        let qkv = file.tensor("model.layers.1.self_attn.qkv_proj.weight").unwrap();
        let gate_up = file.tensor("model.layers.1.mlp.gate_up_proj.weight").unwrap();
        assert_eq!((qkv.shape(), gate_up.shape()), (&[q + 2 * kv, 128][..], &[2 * inter, 128][..]));
        let block = ck.load_block(1).unwrap();
        let rows = [
            (LinearRole::Q, &qkv, 0..q),
            (LinearRole::K, &qkv, q..q + kv),
            (LinearRole::V, &qkv, q + kv..q + 2 * kv),
            (LinearRole::Gate, &gate_up, 0..inter),
            (LinearRole::Up, &gate_up, inter..2 * inter),
        ];
        for (role, stored, r) in rows {
            let want = stored.rows(r.start, r.end).unwrap();
            assert_eq!(block.linear(role).weight, want, "kv heads {} {role:?}", spec.n_kv_heads);
        }
        assert_eq!(block.linear(LinearRole::Down).weight, file.tensor("model.layers.1.mlp.down_proj.weight").unwrap());
        let no_bias = |r: LinearRole| block.linear(r).bias.is_none() && ck.linear_bias(1, r).unwrap().is_none();
        assert!(LinearRole::ALL.into_iter().all(no_bias));
    }
}

/// An AWQ checkpoint of Phi-3 as AutoAWQ lays it out (each role quantized, the parts' packed
/// columns side by side in `qkv_proj.qweight`, ...; built here from the kernels' packing): each
/// role reads back its own packing, bit for bit, and dequantizes to it. A config whose k part is
/// not a multiple of 8 outputs cannot be cut into whole packed columns: refused naming the qweight.
#[test]
fn phi3_awq_roles_read_back_their_columns_of_the_fused_packing() {
    use awq_kernels::ops::{quantize_packed, GroupSize, PackedLinear, QuantSpec};
    let (fp16, awq) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_checkpoint(fp16.path(), &SyntheticSpec { n_kv_heads: 2, ..SyntheticSpec::tiny_phi3() }).unwrap();
    let source = Checkpoint::open(fp16.path()).unwrap();
    let spec = QuantSpec { bits: 4, group_size: GroupSize::G64, zero_point: true };
    let file = SafetensorsFile::open(fp16.path().join("model.safetensors")).unwrap();
    let mut tensors: Vec<RawTensor> = Vec::new();
    let mut packed_roles = Vec::new();
    for (name, info) in file.tensors() {
        if !name.ends_with("_proj.weight") {
            let data = file.bytes(name).unwrap().to_vec();
            tensors.push(RawTensor { name: name.clone(), dtype: info.dtype, shape: info.shape.clone(), data });
        }
    }
    let fused: [(&str, &[LinearRole]); 4] = [
        ("self_attn.qkv_proj", &[LinearRole::Q, LinearRole::K, LinearRole::V]),
        ("self_attn.o_proj", &[LinearRole::O]),
        ("mlp.gate_up_proj", &[LinearRole::Gate, LinearRole::Up]),
        ("mlp.down_proj", &[LinearRole::Down]),
    ];
    for b in 0..source.n_blocks() {
        let weights = source.load_block(b).unwrap();
        for (module, roles) in fused {
            let pack = |r: LinearRole| quantize_packed(&weights.linear(r).weight.clone().into_dtype(DType::F32), spec);
            let parts: Vec<PackedLinear> = roles.iter().map(|&r| pack(r).unwrap()).collect();
            let all = PackedLinear::concat_outputs(&parts.iter().collect::<Vec<_>>()).unwrap();
            let (i, o, g) = (all.in_features, all.out_features, all.in_features / 64);
            let name = |part: &str| format!("model.layers.{b}.{module}.{part}");
            tensors.push(RawTensor::from_i32(name("qweight"), &[i, o / 8], &all.qweight));
            tensors.push(RawTensor::from_i32(name("qzeros"), &[g, o / 8], &all.qzeros));
            let scales = awq_kernels::Tensor::from_f16(&[g, o], all.scales.clone()).unwrap();
            tensors.push(RawTensor::from_tensor(name("scales"), &scales).unwrap());
            packed_roles.extend(roles.iter().copied().zip(parts).map(|(r, p)| ((b, r), p)));
        }
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    safetensors::write(&awq.path().join("model.safetensors"), &tensors, &Default::default()).unwrap();
    let config = awq_model::awq_format::output_config(source.arch(), source.config(), spec);
    std::fs::write(awq.path().join("config.json"), serde_json::to_string(&config).unwrap()).unwrap();

    let ck = Checkpoint::open(awq.path()).unwrap();
    for ((b, role), want) in &packed_roles {
        assert_eq!(&ck.packed_linear(*b, *role, spec).unwrap(), want, "block {b} {role:?}");
        assert_eq!(ck.load_block(*b).unwrap().linear(*role).weight, want.dequantize(), "block {b} {role:?}");
    }

    // Heads of 6: q 4 x 6 = 24 outputs, k 2 x 6 = 12.
    let mut config = config;
    config.insert("head_dim".into(), 6.into());
    std::fs::write(awq.path().join("config.json"), serde_json::to_string(&config).unwrap()).unwrap();
    let err = Checkpoint::open(awq.path()).unwrap_err();
    let msg = err.to_string();
    let qweight = "model.layers.0.self_attn.qkv_proj.qweight";
    assert!(matches!(err, Error::BadTensor { ref tensor, .. } if tensor == qweight), "{msg}");
    assert!(msg.contains("its K part (of [Q, K, V]) has 12 outputs (rows 24..36), not a multiple of 8"), "{msg}");
}

#[test]
fn synthetic_tokenizer_is_byte_level() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &SyntheticSpec::tiny_llama()).unwrap();
    let config = ModelConfig::from_dir(dir.path()).unwrap();
    let tok = Tokenizer::from_dir(dir.path(), &config).unwrap();
    let text = "Hé llo\n\t1";
    let ids = tok.encode(text).unwrap();
    assert_eq!(ids.len(), text.len(), "one token per byte");
    assert_eq!(tok.decode(&ids).unwrap(), text);
    assert_eq!(tok.bos(), None);
}

/// Writes a tiny checkpoint, lets `edit` break it, opens it and returns the error.
fn open_broken(shards: usize, edit: impl FnOnce(&Path)) -> Error {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &spec("llama", shards)).unwrap();
    edit(dir.path());
    Checkpoint::open(dir.path()).expect_err("a broken checkpoint must not open")
}

/// Rewrites one tensor of a safetensors file through `change`.
fn rewrite_tensor(file: &Path, name: &str, change: impl FnOnce(RawTensor) -> RawTensor) {
    let st = SafetensorsFile::open(file).unwrap();
    let mut tensors: Vec<RawTensor> = st
        .tensors()
        .iter()
        .map(|(n, info)| RawTensor { name: n.clone(), dtype: info.dtype, shape: info.shape.clone(), data: st.bytes(n).unwrap().to_vec() })
        .collect();
    drop(st);
    let i = tensors.iter().position(|t| t.name == name).expect("tensor exists");
    tensors[i] = change(tensors[i].clone());
    safetensors::write(file, &tensors, &Default::default()).unwrap();
}

#[test]
fn truncated_file_names_file_and_tensor() {
    let err = open_broken(1, |d| {
        let f = d.join("model.safetensors");
        let len = std::fs::metadata(&f).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(len - 100).unwrap();
    });
    let msg = err.to_string();
    assert!(matches!(err, Error::Truncated { .. }), "{msg}");
    assert!(msg.contains("model.safetensors") && msg.contains("tensor lm_head.weight"), "{msg}");
}

#[test]
fn header_length_beyond_file_is_named() {
    let err = open_broken(1, |d| {
        let f = d.join("model.safetensors");
        let mut bytes = std::fs::read(&f).unwrap();
        let len = bytes.len() as u64;
        bytes[..8].copy_from_slice(&len.to_le_bytes());
        std::fs::write(&f, bytes).unwrap();
    });
    assert!(matches!(err, Error::Truncated { ref path, .. } if path.ends_with("model.safetensors")), "{err}");
    assert!(err.to_string().contains("reaches past the end of the file"), "{err}");
}

#[test]
fn tensor_missing_from_index_is_named() {
    let err = open_broken(2, |d| {
        let f = d.join("model.safetensors.index.json");
        let text = std::fs::read_to_string(&f).unwrap();
        let mut index: serde_json::Value = serde_json::from_str(&text).unwrap();
        index["weight_map"].as_object_mut().unwrap().remove("model.layers.1.mlp.up_proj.weight");
        std::fs::write(&f, index.to_string()).unwrap();
    });
    assert!(
        matches!(err, Error::MissingTensor { ref tensor, ref path, .. }
            if tensor == "model.layers.1.mlp.up_proj.weight" && path.ends_with("model.safetensors.index.json")),
        "{err}"
    );
}

#[test]
fn index_pointing_at_the_wrong_file_is_named() {
    let err = open_broken(2, |d| {
        let f = d.join("model.safetensors.index.json");
        let text = std::fs::read_to_string(&f).unwrap();
        let text = text.replacen(
            r#""model.layers.1.mlp.up_proj.weight": "model-00002-of-00002.safetensors""#,
            r#""model.layers.1.mlp.up_proj.weight": "model-00001-of-00002.safetensors""#,
            1,
        );
        std::fs::write(&f, text).unwrap();
    });
    assert!(
        matches!(err, Error::MissingTensor { ref tensor, ref path, .. }
            if tensor == "model.layers.1.mlp.up_proj.weight" && path.ends_with("model-00001-of-00002.safetensors")),
        "{err}"
    );
}

#[test]
fn dtype_differing_from_config_is_named() {
    let err = open_broken(1, |d| {
        rewrite_tensor(&d.join("model.safetensors"), "model.layers.2.self_attn.k_proj.weight", |t| {
            let values = awq_kernels::Tensor::from_le_bytes(DType::F16, &t.shape, &t.data).unwrap();
            RawTensor::from_tensor(t.name, &values.into_dtype(DType::F32)).unwrap()
        });
    });
    let msg = err.to_string();
    assert!(matches!(err, Error::DTypeMismatch { .. }), "{msg}");
    assert!(msg.contains("model.layers.2.self_attn.k_proj.weight") && msg.contains("F32") && msg.contains("torch_dtype"), "{msg}");
}

#[test]
fn shape_differing_from_config_is_named() {
    let err = open_broken(1, |d| {
        let f = d.join("config.json");
        let text = std::fs::read_to_string(&f).unwrap().replace(r#""intermediate_size": 256"#, r#""intermediate_size": 384"#);
        std::fs::write(&f, text).unwrap();
    });
    assert!(
        matches!(err, Error::ShapeMismatch { ref tensor, ref expected, ref got, .. }
            if tensor == "model.layers.0.mlp.gate_proj.weight" && expected == &[384, 128] && got == &[256, 128]),
        "{err}"
    );
}

#[test]
fn config_missing_a_field_or_architecture_is_named() {
    let err = open_broken(1, |d| {
        let f = d.join("config.json");
        let text = std::fs::read_to_string(&f).unwrap().replace(r#""num_hidden_layers": 3,"#, "");
        std::fs::write(&f, text).unwrap();
    });
    assert!(matches!(err, Error::ConfigField { ref field, .. } if field == "num_hidden_layers"), "{err}");
    assert!(err.to_string().contains("config.json"), "{err}");

    let err = open_broken(1, |d| {
        let f = d.join("config.json");
        let text = std::fs::read_to_string(&f).unwrap().replace(r#""model_type": "llama""#, r#""model_type": "gpt_neox""#);
        std::fs::write(&f, text).unwrap();
    });
    assert!(matches!(err, Error::UnsupportedArchitecture { ref model_type, .. } if model_type == "gpt_neox"), "{err}");
}

#[test]
fn nan_weights_are_refused_when_loaded() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &SyntheticSpec::tiny_llama()).unwrap();
    rewrite_tensor(&dir.path().join("model.safetensors"), "model.layers.1.self_attn.v_proj.weight", |mut t| {
        t.data[6..8].copy_from_slice(&awq_kernels::f16::NAN.to_bits().to_le_bytes());
        t
    });
    let ck = Checkpoint::open(dir.path()).unwrap();
    ck.load_block(0).unwrap();
    let mut staging = HostStaging::new(Device::Cpu);
    ck.load_block_staged(0, &mut staging).unwrap();
    for err in [ck.load_block(1).unwrap_err(), ck.load_block_staged(1, &mut staging).unwrap_err()] {
        assert!(
            matches!(err, Error::BadTensor { ref tensor, .. } if tensor == "model.layers.1.self_attn.v_proj.weight"),
            "{err}"
        );
        assert!(err.to_string().contains("NaN"), "{err}");
    }
    // Infinities too, in every float dtype the staged check reads bits of.
    for (dtype, inf) in [(DType::F32, f32::INFINITY.to_le_bytes().to_vec()), (DType::BF16, awq_kernels::bf16::NEG_INFINITY.to_bits().to_le_bytes().to_vec())] {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &SyntheticSpec { dtype, ..SyntheticSpec::tiny_llama() }).unwrap();
        rewrite_tensor(&dir.path().join("model.safetensors"), "model.layers.0.mlp.down_proj.weight", |mut t| {
            let at = t.data.len() - inf.len();
            t.data[at..].copy_from_slice(&inf);
            t
        });
        let ck = Checkpoint::open(dir.path()).unwrap();
        let err = ck.load_block_staged(0, &mut staging).unwrap_err();
        assert!(matches!(err, Error::BadTensor { ref tensor, .. } if tensor == "model.layers.0.mlp.down_proj.weight"), "{dtype}: {err}");
    }
}

#[test]
fn staged_blocks_equal_mapped_ones_in_every_dtype() {
    let mut staging = HostStaging::new(Device::Cpu);
    for dtype in [DType::F16, DType::BF16, DType::F32] {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &SyntheticSpec { dtype, shards: 2, ..SyntheticSpec::tiny_llama() }).unwrap();
        let ck = Checkpoint::open(dir.path()).unwrap();
        for block in 0..ck.n_blocks() {
            let (mapped, staged) = (ck.load_block(block).unwrap(), ck.load_block_staged(block, &mut staging).unwrap());
            for role in LinearRole::ALL {
                assert_eq!(mapped.linear(role).weight, staged.linear(role).weight, "{dtype} block {block} {role:?}");
                assert_eq!(staged.linear(role).weight.dtype(), dtype);
            }
            assert!(mapped.norms().eq(staged.norms()), "{dtype} block {block}: norms");
        }
    }
}

#[test]
fn embedding_rows_are_the_table_s_rows_and_ids_beyond_it_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &SyntheticSpec::tiny_llama()).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    let table = ck.embed_tokens().unwrap();
    let vocab = table.shape()[0];
    let ids = [3u32, 0, 3, vocab as u32 - 1];
    let rows = ck.embedding_rows(&ids).unwrap();
    assert_eq!((rows.shape(), rows.dtype()), (&[4, table.shape()[1]][..], table.dtype()));
    for (i, &id) in ids.iter().enumerate() {
        assert_eq!(rows.rows(i, i + 1).unwrap(), table.rows(id as usize, id as usize + 1).unwrap(), "row {i}");
    }
    let err = ck.embedding_rows(&[1, vocab as u32]).unwrap_err().to_string();
    assert!(err.contains("model.embed_tokens.weight") && err.contains(&format!("token id {vocab}")), "{err}");
}

/// Kept tensors (a worker's blocks held in memory) are read in place of the files' once their
/// dtypes and shapes match; a mismatch or a stranger is refused, naming the tensor.
#[test]
fn kept_tensors_are_read_from_memory_and_must_match_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &spec("llama", 1)).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    let arch = ck.arch();
    let name = arch.linear_name(1, LinearRole::Up);
    let [o, i] = arch.linear_shape(LinearRole::Up, ck.config());
    let values: Vec<f32> = (0..o * i).map(|k| (k % 7) as f32 - 3.0).collect();
    let kept = |name: &str, shape: &[usize], values: Vec<f32>| {
        let t = awq_kernels::Tensor::from_f32_as(shape, values, DType::F16).unwrap();
        let bytes = safetensors::serialize(Path::new("block-1"), &[RawTensor::from_tensor(name, &t).unwrap()], &Default::default());
        SafetensorsFile::from_shared("kept block-1", std::sync::Arc::new(bytes.unwrap())).unwrap()
    };
    let before = ck.load_block(1).unwrap().linear(LinearRole::Up).weight.clone();
    let (ck, moved) = ck.with_kept(vec![kept(&name, &[o, i], values.clone())]).unwrap();
    assert_eq!(moved, 1);
    let after = ck.load_block(1).unwrap().linear(LinearRole::Up).weight.clone();
    assert_ne!(after, before);
    assert_eq!(after.f32_values().unwrap(), values, "block 1's up_proj comes from memory");
    assert_eq!(ck.load_block(0).unwrap().linear(LinearRole::Up).weight.shape(), [o, i]);

    let ck = Checkpoint::open(dir.path()).unwrap();
    let err = ck.with_kept(vec![kept(&name, &[i, o], values.clone())]).err().unwrap().to_string();
    assert!(err.contains(&name) && err.contains("in memory but") && err.contains(&format!("{:?}", [o, i])), "{err}");
    let ck = Checkpoint::open(dir.path()).unwrap();
    let err = ck.with_kept(vec![kept("model.layers.9.mlp.up_proj.weight", &[o, i], values)]).err().unwrap().to_string();
    assert!(err.contains("model.layers.9.mlp.up_proj.weight") && err.contains("is not in"), "{err}");
}
