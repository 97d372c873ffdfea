//! `awq import gguf` against independent references:
//!
//! - SmolLM2-135M and Gemma-3-270M: importing the GGUF that `../shared/assets/fetch-model` converts
//!   with `gguf2hf.py` gives that very checkpoint: every tensor bit-identical in float16 (both
//!   dequantize with llama.cpp's formulas in float32, Gemma's norms less 1 in float32, and round
//!   once to nearest even, so there is nothing to tolerate), the same config.json, tokenizer.json
//!   and tokenizer_config.json, the same token ids on tricky strings and Pride and Prejudice, and
//!   the same perplexity (SmolLM2: `awq eval ppl` on both; Gemma: ours against check-model.py).
//! - Tiny llama, qwen2 and gemma3 GGUFs written by the Python `gguf` package
//!   (`tests/py/gguf_fixtures.py`) with every block format we import: our import equals gguf2hf.py's
//!   conversion of the same file.
//! - Every block format on random blocks (any finite scale, any bits): our dequantization equals
//!   `gguf.quants.dequantize` bit for bit.
//! - Broken files through the CLI: exit code 1, a message naming the file and the metadata key or
//!   tensor, and no output folder left behind.

use std::path::{Path, PathBuf};
use std::process::Command;

use awq_e2e::*;
use awq_kernels::rng::SplitMix64;
use awq_kernels::{bf16, f16};
use awq_model::gguf::{dequant, GgmlType};
use awq_model::safetensors::SafetensorsFile;
use awq_model::{ModelConfig, Tokenizer};
use serde_json::Value;

/// Runs the assets' Python on `args` and returns its stdout; panics with its stderr on failure.
fn python<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    let mut cmd = Command::new(reference_python());
    cmd.args(args);
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

fn fixtures_script() -> PathBuf {
    repo_root().join("tests").join("py").join("gguf_fixtures.py")
}

/// A tiny GGUF of `arch` written by the Python `gguf` package (see gguf_fixtures.py).
fn tiny_gguf(dir: &Path, arch: &str) -> PathBuf {
    let path = dir.join(format!("tiny-{arch}.gguf"));
    python(&[fixtures_script().as_os_str(), "model".as_ref(), path.as_os_str(), arch.as_ref()]);
    path
}

/// `awq import gguf GGUF -o OUT --json ARGS...`, parsed.
fn import(gguf: &Path, out: &Path, args: &[&str]) -> Value {
    let mut all = vec!["import".to_string(), "gguf".into(), path_arg(gguf), "-o".into(), path_arg(out), "--json".into()];
    all.extend(args.iter().map(|a| a.to_string()));
    let stdout = awq_ok(&all);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("awq import printed no JSON ({e}): {stdout}"))
}

fn path_arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Asserts that two checkpoint folders hold the same tensors (names, dtypes, shapes, bytes) and the
/// same config.json, tokenizer.json and tokenizer_config.json (as JSON values), and the same token
/// ids in generation_config.json.
fn assert_same_checkpoint(ours: &Path, reference: &Path) {
    let (a, b) = (SafetensorsFile::open(ours.join("model.safetensors")), SafetensorsFile::open(reference.join("model.safetensors")));
    let (a, b) = (a.unwrap_or_else(|e| panic!("{e}")), b.unwrap_or_else(|e| panic!("{e}")));
    let names = |f: &SafetensorsFile| f.tensors().keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&a), names(&b), "tensor names of {} and {}", ours.display(), reference.display());
    let mut differing = Vec::new();
    for (name, info) in a.tensors() {
        let other = b.info(name).expect("same names");
        assert_eq!((info.dtype, &info.shape), (other.dtype, &other.shape), "{name}");
        let (x, y) = (a.bytes(name).expect("listed"), b.bytes(name).expect("listed"));
        if x != y {
            let n = x.chunks(2).zip(y.chunks(2)).filter(|(p, q)| p != q).count();
            differing.push(format!("{name}: {n} of {} elements differ", x.len() / 2));
        }
    }
    assert!(differing.is_empty(), "tensors differ from {}:\n{}", reference.display(), differing.join("\n"));
    for file in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        let (x, y) = (read_json(&ours.join(file)), read_json(&reference.join(file)));
        if x != y {
            let (x, y) = (x.as_object().expect("object"), y.as_object().expect("object"));
            let keys: Vec<&String> = x.keys().chain(y.keys()).filter(|k| x.get(*k) != y.get(*k)).collect();
            panic!("{file} differs from {}'s in {keys:?}", reference.display());
        }
    }
    let (x, y) = (read_json(&ours.join("generation_config.json")), read_json(&reference.join("generation_config.json")));
    for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
        assert_eq!(x.get(key), y.get(key), "generation_config.json {key}");
    }
}

/// Asserts that both checkpoints' tokenizers (loaded as `awq eval` loads them) give the same ids
/// on every text; returns the ids.
fn assert_same_ids(ours: &Path, reference: &Path, texts: &[String]) -> Vec<Vec<u32>> {
    let load = |dir: &Path| {
        let config = ModelConfig::from_dir(dir).unwrap_or_else(|e| panic!("{e}"));
        Tokenizer::from_dir(dir, &config).unwrap_or_else(|e| panic!("{e}"))
    };
    let (a, b) = (load(ours), load(reference));
    assert_eq!(a.bos(), b.bos());
    texts
        .iter()
        .map(|t| {
            let (x, y) = (a.encode(t).unwrap_or_else(|e| panic!("{e}")), b.encode(t).unwrap_or_else(|e| panic!("{e}")));
            assert_eq!(x, y, "{:?}", t.chars().take(100).collect::<String>());
            x
        })
        .collect()
}

#[test]
fn smollm2_import_equals_the_fetch_model_checkpoint() {
    let reference = smollm2_135m();
    let gguf = smollm2_135m_gguf();
    let scratch = scratch();
    let ours = scratch.path().join("smollm2");
    let report = import(&gguf, &ours, &[]);
    eprintln!("awq import gguf smollm2-135m: {report}");
    assert_eq!(json_usize(&report, "tensors"), 272);
    assert_eq!(report["source_types"], serde_json::json!({"F32": 61, "Q4_1": 210, "Q8_0": 1}));
    assert_eq!((report["architecture"].as_str(), report["tied_embeddings"].as_bool()), (Some("llama"), Some(true)));
    assert_same_checkpoint(&ours, &reference);

    let austen = text_dir().join("austen").join("pride-and-prejudice.txt");
    let mut texts: Vec<String> = TRICKY_TEXTS.iter().map(|s| s.to_string()).collect();
    let prose = std::fs::read_to_string(&austen).unwrap_or_else(|e| panic!("cannot read {}: {e}", austen.display()));
    texts.push(prose.chars().take(50_000).collect());
    let ids = assert_same_ids(&ours, &reference, &texts);
    assert_eq!(ids[TRICKY_TEXTS.iter().position(|t| *t == "<|im_start|>user").expect("listed")], vec![1, 4093]);

    let (a, b) = (awq_ppl_json(&ours, &austen, Some(1024), 512), awq_ppl_json(&reference, &austen, Some(1024), 512));
    assert_eq!(json_usize(&a, "tokens_scored"), json_usize(&b, "tokens_scored"));
    assert!(json_usize(&a, "tokens_scored") > 1000, "{a}");
    assert_eq!(json_f64(&a, "nll_sum"), json_f64(&b, "nll_sum"), "perplexity {} vs {}", a["perplexity"], b["perplexity"]);
}

/// Our import and gguf2hf.py's conversion of the same tiny GGUF, which holds every supported block
/// format: the same checkpoint, the same ids on [`TRICKY_TEXTS`] (returned), and awq eval reads it.
fn tiny_matches_gguf2hf(arch: &str) -> Vec<Vec<u32>> {
    let scratch = scratch();
    let gguf = tiny_gguf(scratch.path(), arch);
    let reference = scratch.path().join("reference");
    python(&[shared_assets_dir().join("gguf2hf.py").as_os_str(), gguf.as_os_str(), reference.as_os_str()]);
    let ours = scratch.path().join("ours");
    let report = import(&gguf, &ours, &[]);
    let types = report["source_types"].as_object().expect("source_types").len();
    assert_eq!(types, 13, "the fixture holds every supported type: {report}");
    assert_same_checkpoint(&ours, &reference);
    let texts: Vec<String> = TRICKY_TEXTS.iter().map(|s| s.to_string()).collect();
    let ids = assert_same_ids(&ours, &reference, &texts);
    // The imported checkpoint is usable as it is: awq eval reads it.
    let sample = write_sample_text(scratch.path());
    let ppl = awq_ppl_json(&ours, &sample, Some(200), 64);
    assert!(json_f64(&ppl, "perplexity").is_finite(), "{ppl}");
    ids
}

/// The ids of `text`, one of [`TRICKY_TEXTS`], in `ids` (one list per tricky text).
fn ids_of<'a>(ids: &'a [Vec<u32>], text: &str) -> &'a [u32] {
    &ids[TRICKY_TEXTS.iter().position(|t| *t == text).expect("listed")]
}

#[test]
fn tiny_llama_with_every_block_format_matches_gguf2hf() {
    let ids = tiny_matches_gguf2hf("llama");
    assert_eq!(ids_of(&ids, "12345").len(), 5, "one token per digit");
}

#[test]
fn tiny_qwen2_with_biases_and_every_block_format_matches_gguf2hf() {
    let ids = tiny_matches_gguf2hf("qwen2");
    assert_eq!(ids_of(&ids, "12345").len(), 5, "one token per digit");
}

/// Gemma 3's layout (q/k and output norms stored as 1 + w, a global block among sliding ones) with
/// a SentencePiece-style vocabulary that has a space prefix, unlike Gemma-3-270M's.
#[test]
fn tiny_gemma3_with_a_sentencepiece_vocabulary_matches_gguf2hf() {
    let ids = tiny_matches_gguf2hf("gemma3");
    // The space prefix, then the piece `12` (gguf_fixtures.py's SPM_PIECES), then single digits.
    assert_eq!(ids_of(&ids, "12345").len(), 5, "{:?}", ids_of(&ids, "12345"));
    assert!(ids_of(&ids, "").is_empty());
}

/// Gemma-3-270M (gemma3 architecture; Q5_0, Q4_K, Q6_K, Q8_0 and F32 tensors; a 262,144-piece
/// SentencePiece-style vocabulary). The two forward passes run on threads of their own beside the
/// file and token comparisons: check-model.py on fetch-model's checkpoint from the start (18 s
/// alone), `awq eval ppl` on the import once it is written (13 s alone). About 30 s on the 2-core
/// machine once the assets are fetched.
#[test]
fn gemma3_import_equals_the_fetch_model_checkpoint() {
    let (reference, gguf) = (gemma3_270m(), gemma3_270m_gguf());
    let austen = text_dir().join("austen").join("pride-and-prejudice.txt");
    let scratch = scratch();
    let ours = scratch.path().join("gemma3");
    // 256 tokens in one window (BOS first): both sides compute in float32.
    let (tokens, ctx) = (256, 256);
    std::thread::scope(|threads| {
        let check = threads.spawn(|| check_model(&reference, &austen, tokens, ctx));
        let report = import(&gguf, &ours, &[]);
        eprintln!("awq import gguf gemma3-270m: {report}");
        let ppl = threads.spawn(|| awq_ppl_json(&ours, &austen, Some(tokens), ctx));
        assert_eq!((json_usize(&report, "tensors"), json_usize(&report, "tokens")), (236, 262_144));
        let types = serde_json::json!({"F32": 109, "Q4_K": 27, "Q5_0": 81, "Q6_K": 9, "Q8_0": 10});
        assert_eq!(report["source_types"], types);
        assert_eq!(report["architecture"].as_str(), Some("gemma3"));
        assert_eq!(report["tied_embeddings"].as_bool(), Some(true));
        assert_same_checkpoint(&ours, &reference);

        // Our tokenizer on our tokenizer.json against Python's on gguf2hf.py's.
        let mut texts: Vec<String> = TRICKY_TEXTS.iter().map(|s| s.to_string()).collect();
        let prose =
            std::fs::read_to_string(&austen).unwrap_or_else(|e| panic!("cannot read {}: {e}", austen.display()));
        texts.push(prose.chars().take(20_000).collect());
        let config = ModelConfig::from_dir(&ours).unwrap_or_else(|e| panic!("{e}"));
        let tokenizer = Tokenizer::from_dir(&ours, &config).unwrap_or_else(|e| panic!("{e}"));
        let ids: Vec<Vec<u32>> = texts.iter().map(|t| tokenizer.encode(t).unwrap_or_else(|e| panic!("{e}"))).collect();
        let theirs = python_token_ids(&reference, &texts);
        for ((text, ours), theirs) in texts.iter().zip(&ids).zip(&theirs) {
            assert_eq!(ours, theirs, "{:?}", text.chars().take(100).collect::<String>());
        }
        // Not trivial: BOS (2) is added, "\n\n" is a user-defined token (108), English merges well.
        assert_eq!(tokenizer.bos(), Some(2));
        assert_eq!(ids_of(&ids, "\n\n"), [108]);
        let austen_ids = &ids[TRICKY_TEXTS.len()];
        assert!(austen_ids.len() * 3 < 20_000, "{} tokens for 20k characters", austen_ids.len());

        let ppl = ppl.join().expect("awq eval ppl succeeds");
        let expected = check.join().expect("check-model.py succeeds");
        assert_eq!(ppl["bos"], true, "{ppl}");
        assert_eq!(json_usize(&ppl, "tokens"), expected.tokens, "{ppl}");
        assert_eq!(json_usize(&ppl, "tokens_scored"), expected.scored, "{ppl}");
        let got = json_f64(&ppl, "perplexity");
        let says = format!("awq eval ppl {got} on the import, check-model.py {} on fetch-model's", expected.ppl);
        assert!(rel_diff(got, expected.ppl) < 1e-4, "{says}");
    });
}

/// Byte offsets of a block's f16 fields (scales and mins) in the block structs of ggml-common.h.
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    use GgmlType::*;
    match ty {
        Q4_0 | Q5_0 | Q8_0 => &[0],
        Q4_1 | Q5_1 | Q4_K | Q5_K => &[0, 2],
        Q2_K => &[80, 82],
        Q3_K => &[108],
        Q6_K => &[208],
        _ => &[],
    }
}

/// Random finite bits of `bytes_per_value` (2 for f16/bf16, 4 for f32) with exponent mask `exp`.
fn random_finite(rng: &mut SplitMix64, bytes_per_value: usize, exp: u32) -> Vec<u8> {
    loop {
        let bits = rng.next_u64() as u32;
        let bits = if bytes_per_value == 2 { bits & 0xFFFF } else { bits };
        if bits & exp != exp {
            return bits.to_le_bytes()[..bytes_per_value].to_vec();
        }
    }
}

#[test]
fn every_block_format_dequantizes_as_gguf_py_bit_for_bit() {
    let scratch = scratch();
    let mut rng = SplitMix64::new(2024);
    let mut ours = Vec::new();
    for ty in dequant::SUPPORTED {
        let n_blocks = 4096 / ty.block_len() + 7;
        let mut data: Vec<u8> = (0..n_blocks * ty.block_bytes()).map(|_| rng.next_u64() as u8).collect();
        match ty {
            // Any finite value, subnormals and negative zero included.
            GgmlType::F32 => data = (0..n_blocks).flat_map(|_| random_finite(&mut rng, 4, 0x7F80_0000)).collect(),
            GgmlType::F16 => data = (0..n_blocks).flat_map(|_| random_finite(&mut rng, 2, 0x7C00)).collect(),
            GgmlType::BF16 => data = (0..n_blocks).flat_map(|_| random_finite(&mut rng, 2, 0x7F80)).collect(),
            _ => {
                for block in data.chunks_mut(ty.block_bytes()) {
                    for &at in f16_fields(ty) {
                        block[at..at + 2].copy_from_slice(&random_finite(&mut rng, 2, 0x7C00));
                    }
                }
            }
        }
        let mut values = vec![0f32; n_blocks * ty.block_len()];
        dequant::dequantize(ty, &data, &mut values).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(scratch.path().join(format!("{ty}.bin")), &data).expect("scratch is writable");
        ours.push((ty, values));
    }
    python(&[fixtures_script().as_os_str(), "dequant".as_ref(), scratch.path().as_os_str()]);
    for (ty, values) in ours {
        let path = scratch.path().join(format!("{ty}.f32"));
        let theirs: Vec<f32> = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("gguf_fixtures.py wrote no {}: {e}", path.display()))
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        assert_eq!(values.len(), theirs.len(), "{ty}");
        let differing: Vec<String> = values
            .iter()
            .zip(&theirs)
            .enumerate()
            .filter(|(_, (a, b))| a.to_bits() != b.to_bits())
            .take(5)
            .map(|(i, (a, b))| format!("element {i}: ours {a:e}, gguf-py {b:e}"))
            .collect();
        assert!(differing.is_empty(), "{ty}: dequantization differs from gguf.quants.dequantize:\n{}", differing.join("\n"));
        // Not all zeros or all equal: the blocks exercised the format.
        assert!(values.iter().filter(|v| **v != 0.0).count() > values.len() / 2, "{ty}");
    }
    // Rounding to the output dtypes is round-to-nearest-even, as numpy's astype.
    assert_eq!(f16::from_f32(1.0 + 2f32.powi(-11)), f16::ONE);
    assert_eq!(bf16::from_f32(1.0 + 2f32.powi(-8)), bf16::ONE);
}

#[test]
fn ggml_type_sizes_match_gguf_py() {
    let sizes: Value = serde_json::from_str(&python(&[fixtures_script().as_os_str(), "sizes".as_ref()])).expect("JSON");
    // gguf-py still lists Q8_1 with the float32 d and s of old ggml (40 bytes); ggml-common.h has
    // had two f16s (36 bytes, `static_assert(sizeof(block_q8_1) == 2*sizeof(ggml_half) + QK8_1)`)
    // since 2024. No GGUF file stores Q8_1 (it is a matmul operand), so only its size is at stake.
    for ty in GgmlType::all().filter(|t| *t != GgmlType::Q8_1) {
        let want = sizes.get(ty.name()).unwrap_or_else(|| panic!("gguf-py has no type {ty}"));
        assert_eq!(want, &serde_json::json!([ty.block_len(), ty.block_bytes()]), "{ty}");
    }
}

/// Where, in a GGUF file's bytes, tensor `name`'s info keeps its type id (the offset follows it).
fn tensor_type_at(bytes: &[u8], name: &str) -> usize {
    let mut needle = (name.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(name.as_bytes());
    let at = bytes.windows(needle.len()).position(|w| w == needle).unwrap_or_else(|| panic!("no tensor info {name}"));
    let dims_at = at + needle.len();
    let n_dims = u32::from_le_bytes(bytes[dims_at..dims_at + 4].try_into().expect("4 bytes")) as usize;
    dims_at + 4 + 8 * n_dims
}

/// Breaks a copy of the tiny llama GGUF with `edit`, runs `awq import gguf` on it and checks that
/// it fails as a user error whose message contains each of `expected` (`{file}` stands for the
/// GGUF's path), leaving no output behind.
fn check_refused(arch: &str, edit: impl FnOnce(&mut Vec<u8>), expected: &[&str]) {
    let scratch = scratch();
    let gguf = tiny_gguf(scratch.path(), arch);
    let mut bytes = std::fs::read(&gguf).expect("the fixture exists");
    edit(&mut bytes);
    std::fs::write(&gguf, &bytes).expect("scratch is writable");
    let out = scratch.path().join("out");
    let stderr = awq_err(["import", "gguf", &path_arg(&gguf), "-o", &path_arg(&out)]);
    for e in expected {
        let e = e.replace("{file}", &path_arg(&gguf));
        assert!(stderr.contains(&e), "expected {e:?} in the message:\n{stderr}");
    }
    let left: Vec<String> = std::fs::read_dir(scratch.path())
        .expect("scratch is readable")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".gguf"))
        .collect();
    assert!(left.is_empty(), "a failed import left {left:?}");
}

#[test]
fn truncated_file_names_the_tensor_cut_short() {
    // output.weight is the last tensor the Python writer lays out.
    check_refused(
        "llama",
        |b| b.truncate(b.len() - 1000),
        &["{file}: truncated: tensor output.weight: BF16 data of", "but the file has"],
    );
}

#[test]
fn file_cut_inside_the_metadata_names_the_key() {
    check_refused(
        "llama",
        |b| {
            let at = b.windows(21).position(|w| w == b"tokenizer.ggml.tokens").expect("the key is there");
            b.truncate(at + 100);
        },
        &["{file}: truncated: metadata key `tokenizer.ggml.tokens`: needs"],
    );
}

#[test]
fn bad_magic_is_refused() {
    check_refused("llama", |b| b[..4].copy_from_slice(b"GGJT"), &["{file}: malformed header: magic: not a GGUF file"]);
}

#[test]
fn unsupported_version_is_refused() {
    check_refused(
        "llama",
        |b| b[4..8].copy_from_slice(&1u32.to_le_bytes()),
        &["{file}: malformed header: version: GGUF version 1 is not supported (supported: 2, 3)"],
    );
}

#[test]
fn tensor_data_beyond_the_end_names_the_tensor() {
    check_refused(
        "llama",
        |b| {
            let offset_at = tensor_type_at(b, "blk.1.ffn_down.weight") + 4;
            b[offset_at..offset_at + 8].copy_from_slice(&(1u64 << 32).to_le_bytes());
        },
        &["{file}: truncated: tensor blk.1.ffn_down.weight: Q5_K data of 90112 bytes at offset 4294967296"],
    );
}

#[test]
fn unknown_tensor_type_names_the_tensor() {
    check_refused(
        "llama",
        |b| {
            let at = tensor_type_at(b, "blk.0.attn_q.weight");
            b[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
        },
        &["{file}: tensor blk.0.attn_q.weight: unknown GGML type id 99"],
    );
}

#[test]
fn known_but_unsupported_tensor_type_names_the_tensor_and_the_supported_types() {
    // IQ4_XS blocks (256 values in 136 bytes) fit where the Q4_K blocks (144 bytes) were.
    check_refused(
        "llama",
        |b| {
            let at = tensor_type_at(b, "blk.0.attn_q.weight");
            b[at..at + 4].copy_from_slice(&GgmlType::IQ4_XS.id().to_le_bytes());
        },
        &["{file}: tensor blk.0.attn_q.weight: tensor type IQ4_XS is not supported (supported: F32, F16, BF16, Q4_0"],
    );
}

#[test]
fn unsupported_architecture_is_named() {
    check_refused("gpt2", |_| {}, &["{file}: general.architecture `gpt2` is not supported (supported: llama, qwen2, qwen3, gemma3)"]);
}
