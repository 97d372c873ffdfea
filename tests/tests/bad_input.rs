//! Broken checkpoints and texts through the CLI: `awq inspect` and `awq eval ppl` must fail with
//! exit code 1 (not a panic) and a message that names the file and the tensor or config field, so
//! the user knows what to look at.
//!
//! Every case starts from a synthetic checkpoint that both commands accept, breaks one thing and
//! runs through [`check`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use awq_e2e::*;
use awq_kernels::{DType, Tensor};
use awq_model::safetensors::{self, RawTensor, SafetensorsFile};
use awq_model::synthetic::{write_checkpoint, SyntheticSpec};
use serde_json::Value;

/// What a case runs on; a case may break the files, point elsewhere or change the window length.
struct Fixture {
    model: PathBuf,
    text: PathBuf,
    ctx: usize,
}

/// Which command a case runs.
#[derive(Clone, Copy, Debug)]
enum Via {
    Inspect,
    EvalPpl,
}

const BOTH: &[Via] = &[Via::Inspect, Via::EvalPpl];

/// Writes `spec` as a checkpoint, checks that `via` accepts it, applies `corrupt`, then checks that
/// every command in `via` fails the way [`awq_err`] requires and that its stderr contains each of
/// `expected`, where `{model}` stands for the checkpoint folder.
fn check(spec: SyntheticSpec, via: &[Via], corrupt: impl FnOnce(&mut Fixture), expected: &[&str]) {
    let scratch = scratch();
    let mut fx = Fixture { model: scratch.path().join("model"), text: write_sample_text(scratch.path()), ctx: 512 };
    write_checkpoint(&fx.model, &spec).unwrap_or_else(|e| panic!("cannot write {spec:?}: {e}"));
    let args = |fx: &Fixture, via: Via| -> Vec<String> {
        let model = fx.model.to_string_lossy().into_owned();
        match via {
            Via::Inspect => vec!["inspect".into(), model],
            Via::EvalPpl => {
                let text = fx.text.to_string_lossy().into_owned();
                vec!["eval".into(), "ppl".into(), model, "--text".into(), text, "--ctx".into(), fx.ctx.to_string()]
            }
        }
    };
    for &v in via {
        awq_ok(args(&fx, v));
    }
    corrupt(&mut fx);
    for &v in via {
        let stderr = awq_err(args(&fx, v));
        for e in expected {
            let e = e.replace("{model}", &fx.model.to_string_lossy());
            assert!(stderr.contains(&e), "{v:?}: expected {e:?} in the message:\n{stderr}");
        }
    }
}

/// Rewrites one safetensors file with `edit` applied to each tensor (read fully before the file is
/// replaced, since it is memory-mapped).
fn rewrite_tensors(path: &Path, mut edit: impl FnMut(&mut RawTensor)) {
    let file = SafetensorsFile::open(path).unwrap_or_else(|e| panic!("{e}"));
    let mut tensors: Vec<RawTensor> = file
        .tensors()
        .keys()
        .map(|name| RawTensor::from_tensor(name.clone(), &file.tensor(name).unwrap_or_else(|e| panic!("{e}"))).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    drop(file);
    tensors.iter_mut().for_each(&mut edit);
    safetensors::write(path, &tensors, &BTreeMap::new()).unwrap_or_else(|e| panic!("{e}"));
}

/// Sets element 5 of tensor `name` in `path` to `value` (keeping its dtype).
fn poison(path: &Path, name: &str, value: f32) {
    let mut found = false;
    rewrite_tensors(path, |t| {
        if t.name == name {
            let dtype = t.dtype.float().expect("synthetic tensors are floats");
            let mut values = Tensor::from_le_bytes(dtype, &t.shape, &t.data).expect("valid tensor").to_f32_vec().expect("a host tensor");
            values[5] = value;
            *t = RawTensor::from_tensor(name, &Tensor::from_f32_as(&t.shape, values, dtype).expect("same shape")).expect("a host tensor");
            found = true;
        }
    });
    assert!(found, "{name} is not in {}", path.display());
}

fn edit_bytes(path: &Path, edit: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    edit(&mut bytes);
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

fn edit_index(model: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let path = model.join(awq_model::INDEX_FILE);
    let mut index: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("index exists")).expect("index is JSON");
    edit(index["weight_map"].as_object_mut().expect("weight_map is an object"));
    std::fs::write(&path, index.to_string()).expect("index is writable");
}

fn tiny() -> SyntheticSpec {
    SyntheticSpec::tiny_llama()
}

fn sharded() -> SyntheticSpec {
    SyntheticSpec { shards: 3, ..SyntheticSpec::tiny_llama() }
}

#[test]
fn truncated_safetensors_names_the_file_and_the_tensor_cut_short() {
    // lm_head.weight is the last tensor in the file, so losing 3 bytes cuts it.
    check(
        tiny(),
        BOTH,
        |fx| edit_bytes(&fx.model.join("model.safetensors"), |b| b.truncate(b.len() - 3)),
        &["{model}/model.safetensors: truncated: tensor lm_head.weight: data ends at byte"],
    );
}

#[test]
fn header_length_beyond_the_file_is_refused() {
    check(
        tiny(),
        BOTH,
        |fx| {
            edit_bytes(&fx.model.join("model.safetensors"), |b| {
                let len = b.len() as u64;
                b[..8].copy_from_slice(&len.to_le_bytes());
            })
        },
        &["{model}/model.safetensors: truncated: header length", "reaches past the end of the file"],
    );
}

#[test]
fn index_pointing_at_the_wrong_shard_names_the_shard_and_the_tensor() {
    // Block 1 lives in the second of three shards.
    check(
        sharded(),
        BOTH,
        |fx| {
            edit_index(&fx.model, |map| {
                map.insert("model.layers.1.mlp.down_proj.weight".into(), "model-00001-of-00003.safetensors".into());
            })
        },
        &[
            "{model}/model-00001-of-00003.safetensors: tensor model.layers.1.mlp.down_proj.weight is missing",
            "the index model.safetensors.index.json says it is in this file",
        ],
    );
}

#[test]
fn index_without_a_needed_tensor_names_the_index_and_the_tensor() {
    check(
        sharded(),
        BOTH,
        |fx| {
            edit_index(&fx.model, |map| {
                map.remove("model.layers.2.self_attn.v_proj.weight").expect("the tensor is listed");
            })
        },
        &["{model}/model.safetensors.index.json: tensor model.layers.2.self_attn.v_proj.weight is missing from the weight_map"],
    );
}

#[test]
fn index_naming_a_missing_shard_names_that_file() {
    check(
        sharded(),
        BOTH,
        |fx| std::fs::remove_file(fx.model.join("model-00003-of-00003.safetensors")).expect("shard 3 exists"),
        &["{model}/model-00003-of-00003.safetensors: "],
    );
}

#[test]
fn weight_dtype_differing_from_torch_dtype_names_the_tensor() {
    check(
        tiny(),
        BOTH,
        |fx| {
            rewrite_tensors(&fx.model.join("model.safetensors"), |t| {
                if t.name == "model.layers.0.self_attn.k_proj.weight" {
                    let f32 =
                        Tensor::from_le_bytes(DType::F16, &t.shape, &t.data).expect("valid").into_dtype(DType::F32);
                    *t = RawTensor::from_tensor(t.name.clone(), &f32).expect("a host tensor");
                }
            })
        },
        &["{model}/model.safetensors: tensor model.layers.0.self_attn.k_proj.weight: dtype F32, expected F16"],
    );
}

#[test]
fn shape_mismatching_config_names_the_tensor_and_both_shapes() {
    // The first tensor whose shape involves intermediate_size (256 in the checkpoint).
    check(
        tiny(),
        BOTH,
        |fx| edit_config(&fx.model, |c| drop(c.insert("intermediate_size".into(), 384.into()))),
        &["{model}/model.safetensors: tensor model.layers.0.mlp.gate_proj.weight: shape [256, 128] does not match config.json, which implies [384, 128]"],
    );
}

#[test]
fn config_without_a_required_field_names_the_field() {
    check(
        tiny(),
        BOTH,
        |fx| edit_config(&fx.model, |c| drop(c.remove("num_hidden_layers").expect("the field is there"))),
        &["{model}/config.json: field `num_hidden_layers`: required field is missing"],
    );
}

#[test]
fn unknown_model_type_names_it_and_the_supported_ones() {
    check(
        tiny(),
        BOTH,
        |fx| edit_config(&fx.model, |c| drop(c.insert("model_type".into(), "gpt2".into()))),
        &["{model}/config.json: model_type `gpt2` is not supported (supported: llama, mistral, qwen2, qwen3, phi3, gemma3_text, mixtral, qwen3_moe)"],
    );
}

/// Values are checked when a block is loaded, which `eval ppl` does and `inspect` (headers only)
/// does not.
#[test]
fn nan_in_a_block_weight_names_the_tensor() {
    check(
        tiny(),
        &[Via::EvalPpl],
        |fx| poison(&fx.model.join("model.safetensors"), "model.layers.1.mlp.up_proj.weight", f32::NAN),
        &["{model}/model.safetensors: tensor model.layers.1.mlp.up_proj.weight: contains NaN or infinite values"],
    );
}

#[test]
fn infinity_in_a_sharded_embedding_names_the_shard_and_the_tensor() {
    check(
        sharded(),
        &[Via::EvalPpl],
        |fx| poison(&fx.model.join("model-00001-of-00003.safetensors"), "model.embed_tokens.weight", f32::INFINITY),
        &["{model}/model-00001-of-00003.safetensors: tensor model.embed_tokens.weight: contains NaN or infinite values"],
    );
}

#[test]
fn missing_tokenizer_names_the_file() {
    check(
        tiny(),
        &[Via::EvalPpl],
        |fx| std::fs::remove_file(fx.model.join("tokenizer.json")).expect("tokenizer.json exists"),
        &["{model}/tokenizer.json: "],
    );
}

#[test]
fn garbage_tokenizer_names_the_file() {
    check(
        tiny(),
        &[Via::EvalPpl],
        |fx| {
            std::fs::write(fx.model.join("tokenizer.json"), b"{\"version\": \"1.0\", \"model\": 7}").expect("writable")
        },
        &["{model}/tokenizer.json: tokenizer: "],
    );
}

#[test]
fn missing_model_folder_names_it() {
    check(
        tiny(),
        BOTH,
        |fx| fx.model = fx.model.with_file_name("no-such-model"),
        &["cannot load model {model}: {model}/config.json: "],
    );
}

#[test]
fn missing_text_file_names_it() {
    check(
        tiny(),
        &[Via::EvalPpl],
        |fx| fx.text = fx.text.with_file_name("no-such-text.txt"),
        &["cannot read text ", "no-such-text.txt"],
    );
}

#[test]
fn text_too_short_to_score_says_so() {
    // One byte is one token of the synthetic tokenizer: nothing to predict.
    check(
        tiny(),
        &[Via::EvalPpl],
        |fx| std::fs::write(&fx.text, "a").expect("writable"),
        &["cannot score ", "the text has 1 token: too few to score anything"],
    );
    check(
        tiny(),
        &[Via::EvalPpl],
        |fx| std::fs::write(&fx.text, "").expect("writable"),
        &["cannot score ", "the text has 0 tokens: too few to score anything"],
    );
}

#[test]
fn context_of_one_token_is_refused() {
    check(tiny(), &[Via::EvalPpl], |fx| fx.ctx = 1, &["context length 1 is too short (at least 2 tokens)"]);
}

#[test]
fn regress_io_error_printed_twice() {
    // The OS message used to appear twice: once in our error, once again as its `source`.
    let scratch = scratch();
    let model = scratch.path().join("model");
    write_checkpoint(&model, &tiny()).unwrap_or_else(|e| panic!("{e}"));
    std::fs::remove_file(model.join("tokenizer.json")).expect("tokenizer.json exists");
    let text = write_sample_text(scratch.path());
    let stderr = awq_err(["eval", "ppl", &model.to_string_lossy(), "--text", &text.to_string_lossy()]);
    assert_eq!(stderr.matches("No such file or directory").count(), 1, "{stderr}");
}
