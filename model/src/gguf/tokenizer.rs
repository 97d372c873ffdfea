//! tokenizer.json, tokenizer_config.json and generation_config.json from a GGUF file's
//! `tokenizer.ggml.*` keys.
//!
//! Two kinds of vocabulary (`tokenizer.ggml.model`) are imported, both as a Hugging Face BPE model;
//! a [`Pipeline`] holds what differs between them:
//! - `gpt2`, byte-level BPE: the tokens are already in GPT-2's byte-to-character form, merges are
//!   `"left right"` strings ranked by position. What llama.cpp keeps as a name,
//!   `tokenizer.ggml.pre`, stands for a pre-tokenizer that we write out in full: the table
//!   [`PRE_TOKENIZERS`] follows `../shared/assets/gguf2hf.py` and the upstream tokenizer.json files
//!   (SmolLM2's individual digits + GPT-2 regex, Qwen2's NFC + split regex).
//! - `llama`, SentencePiece-style BPE with byte fallback (Gemma's): merges rebuilt from the
//!   tokens' scores, see [`super::spm`].
//!
//! In both, control tokens (type 3) become special added tokens and user-defined ones (type 4) plain
//! added tokens, matched in the raw text before the model sees it; when `add_bos_token` holds, a
//! template post-processor puts BOS first. Any other model or pre-tokenizer is an error naming the
//! key. The tokenizer.json we build is loaded through the `tokenizers` crate before it is written,
//! so a vocabulary whose merges do not fit it is refused here, not at the first `awq eval`.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use super::{spm, GgufFile};
use crate::{Error, Result};

/// llama.cpp's token types (`enum llama_token_type`).
const CONTROL: i128 = 3;
const USER_DEFINED: i128 = 4;

/// The pre-tokenizers we can spell out, by `tokenizer.ggml.pre`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PreTokenizer {
    /// Each digit on its own, then GPT-2's byte-level regex (StarCoder's tokenizer, reused by
    /// SmolLM/SmolLM2).
    DigitsThenByteLevel,
    /// NFC, then Qwen2's split regex (digits one at a time, letters with one leading non-letter),
    /// then byte-level without its own regex.
    Qwen2,
}

const PRE_TOKENIZERS: &[(&str, PreTokenizer)] = &[
    ("smollm", PreTokenizer::DigitsThenByteLevel),
    ("starcoder", PreTokenizer::DigitsThenByteLevel),
    ("refact", PreTokenizer::DigitsThenByteLevel),
    ("codeshell", PreTokenizer::DigitsThenByteLevel),
    ("qwen2", PreTokenizer::Qwen2),
];

/// Qwen2's pre-tokenizer split regex, as in its tokenizer.json.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// At most this many control tokens are listed in tokenizer_config.json's
/// `additional_special_tokens` (as gguf2hf.py; every one of them is a special token in
/// tokenizer.json regardless).
const MAX_LISTED_SPECIAL: usize = 64;

/// What a kind of vocabulary puts into tokenizer.json (JSON null for a step it does not have).
pub(super) struct Pipeline {
    /// The `BPE` model, vocabulary and merges included.
    pub model: Value,
    pub normalizer: Value,
    pub pre_tokenizer: Value,
    pub decoder: Value,
    /// The post-processor unless BOS is added (a template then takes its place).
    pub post_processor: Value,
    /// `add_bos_token` when the file does not set `tokenizer.ggml.add_bos_token` (llama.cpp's
    /// default for the kind).
    pub add_bos_default: bool,
}

/// The tokenizer files of an imported checkpoint.
pub(crate) struct TokenizerFiles {
    pub tokenizer_json: Value,
    pub tokenizer_config: Value,
    /// Tokens in the vocabulary.
    pub n_tokens: usize,
}

/// Builds tokenizer.json and tokenizer_config.json; `context_length` is the model's
/// (`model_max_length`).
pub(crate) fn tokenizer_files(file: &GgufFile, context_length: u64) -> Result<TokenizerFiles> {
    let key_error = |key: &str, detail: String| Error::GgufKey { path: file.path().into(), key: key.into(), detail };
    let model = file.required("tokenizer.ggml.model", file.str("tokenizer.ggml.model")?)?;
    let tokens = file.required("tokenizer.ggml.tokens", file.str_array("tokenizer.ggml.tokens")?)?;
    let types = match file.int_array("tokenizer.ggml.token_type")? {
        Some(t) if t.len() != tokens.len() => {
            return Err(key_error(
                "tokenizer.ggml.token_type",
                format!("{} types for {} tokens", t.len(), tokens.len()),
            ))
        }
        Some(t) => t,
        None => vec![1; tokens.len()],
    };
    let mut ids = HashMap::with_capacity(tokens.len());
    let mut vocab = Map::new();
    for (id, token) in tokens.iter().enumerate() {
        if let Some(first) = ids.insert(*token, id as u32) {
            return Err(key_error("tokenizer.ggml.tokens", format!("token {token:?} appears twice (ids {first} and {id})")));
        }
        vocab.insert(token.to_string(), json!(id));
    }
    let pipeline = match model {
        "gpt2" => byte_level(file, vocab)?,
        "llama" => spm::pipeline(file, &tokens, &ids, vocab)?,
        other => {
            return Err(key_error(
                "tokenizer.ggml.model",
                format!("`{other}` is not supported (supported: gpt2, byte-level BPE; llama, SentencePiece-style BPE)"),
            ))
        }
    };

    // Control and user-defined tokens become added tokens: bounded as tokenizer.json's are.
    let max = crate::tokenizer::MAX_ADDED_TOKEN_BYTES;
    let added_ids: Vec<usize> =
        (0..tokens.len()).filter(|&id| types[id] == CONTROL || types[id] == USER_DEFINED).collect();
    if let Some(&id) = added_ids.iter().find(|&&id| tokens[id].len() > max) {
        let len = tokens[id].len();
        return Err(key_error(
            "tokenizer.ggml.tokens",
            format!("token {id} (a control or user-defined token) has {len} bytes, more than the {max} an added token may have"),
        ));
    }
    let added: Vec<Value> = added_ids
        .iter()
        .map(|&id| {
            json!({"id": id, "content": tokens[id], "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types[id] == CONTROL})
        })
        .collect();

    let token_name = |key: &str| -> Result<Option<String>> {
        Ok(file.uint(key)?.and_then(|id| tokens.get(id as usize)).map(|t| t.to_string()))
    };
    let add_bos = file.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(pipeline.add_bos_default);
    let post_processor = if add_bos {
        let id = file.uint("tokenizer.ggml.bos_token_id")?;
        let bos = id.and_then(|id| tokens.get(id as usize)).ok_or_else(|| {
            let detail = match id {
                None => "required key is missing (BOS is added to every sequence)".to_string(),
                Some(id) => format!("{id} is not a token id (the vocabulary has {})", tokens.len()),
            };
            key_error("tokenizer.ggml.bos_token_id", detail)
        })?;
        let special = json!({"SpecialToken": {"id": bos, "type_id": 0}});
        let seq = |s: &str| json!({"Sequence": {"id": s, "type_id": 0}});
        json!({"type": "TemplateProcessing", "single": [special, seq("A")],
               "pair": [special, seq("A"), special, seq("B")],
               "special_tokens": {*bos: {"id": bos, "ids": [id], "tokens": [bos]}}})
    } else {
        pipeline.post_processor
    };
    let tokenizer_json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": pipeline.normalizer,
        "pre_tokenizer": pipeline.pre_tokenizer,
        "post_processor": post_processor,
        "decoder": pipeline.decoder,
        "model": pipeline.model,
    });
    tokenizers::Tokenizer::from_bytes(tokenizer_json.to_string().as_bytes()).map_err(|e| Error::Tokenizer {
        path: file.path().into(),
        detail: format!("the tokenizer.json built from the tokenizer.ggml.* keys does not load: {e}"),
    })?;

    let special: Vec<&str> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &ty)| ty == CONTROL)
        .map(|(t, _)| *t)
        .take(MAX_LISTED_SPECIAL)
        .collect();
    let mut tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token_name("tokenizer.ggml.bos_token_id")?,
        "eos_token": token_name("tokenizer.ggml.eos_token_id")?,
        "unk_token": token_name("tokenizer.ggml.unknown_token_id")?,
        "pad_token": token_name("tokenizer.ggml.padding_token_id")?,
        "add_bos_token": add_bos,
        "add_eos_token": file.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
        "clean_up_tokenization_spaces": false,
        "model_max_length": context_length,
        "additional_special_tokens": special,
    });
    if let Some(template) = file.str("tokenizer.chat_template")?.filter(|t| !t.is_empty()) {
        tokenizer_config["chat_template"] = json!(template);
    }
    Ok(TokenizerFiles { tokenizer_json, tokenizer_config, n_tokens: tokens.len() })
}

/// A byte-level BPE vocabulary (`gpt2`): its merges as stored, the pre-tokenizer
/// `tokenizer.ggml.pre` names ([`PRE_TOKENIZERS`]), GPT-2's byte-level decoder.
fn byte_level(file: &GgufFile, vocab: Map<String, Value>) -> Result<Pipeline> {
    let key_error = |key: &str, detail: String| Error::GgufKey { path: file.path().into(), key: key.into(), detail };
    let known = || PRE_TOKENIZERS.iter().map(|p| p.0).collect::<Vec<_>>().join(", ");
    let pre_name = file.str("tokenizer.ggml.pre")?.ok_or_else(|| {
        key_error("tokenizer.ggml.pre", format!("required key is missing (it names the pre-tokenizer: {})", known()))
    })?;
    let pre = PRE_TOKENIZERS.iter().find(|(name, _)| *name == pre_name).map(|p| p.1).ok_or_else(|| {
        key_error("tokenizer.ggml.pre", format!("pre-tokenizer `{pre_name}` is not supported (supported: {})", known()))
    })?;
    let merges = file.required("tokenizer.ggml.merges", file.str_array("tokenizer.ggml.merges")?)?;
    let merges = merges
        .iter()
        .enumerate()
        .map(|(i, m)| match m.split_once(' ') {
            Some((left, right)) => Ok(json!([left, right])),
            None => Err(key_error("tokenizer.ggml.merges", format!("merge #{i} {m:?} is not two tokens separated by a space"))),
        })
        .collect::<Result<Vec<_>>>()?;
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let (normalizer, pre_tokenizer) = match pre {
        PreTokenizer::DigitsThenByteLevel => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        ),
        PreTokenizer::Qwen2 => (
            json!({"type": "NFC"}),
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
                byte_level(false)]}),
        ),
    };
    Ok(Pipeline {
        model: json!({"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges}),
        normalizer,
        pre_tokenizer,
        decoder: json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
        post_processor: json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}),
        add_bos_default: false,
    })
}

/// generation_config.json: the special token ids config.json carries, where set.
pub(crate) fn generation_config(config: &Map<String, Value>) -> Value {
    let ids: Map<String, Value> = ["bos_token_id", "eos_token_id", "pad_token_id"]
        .iter()
        .filter_map(|k| config.get(*k).filter(|v| !v.is_null()).map(|v| (k.to_string(), v.clone())))
        .collect();
    Value::Object(ids)
}

#[cfg(test)]
mod tests {
    use super::super::fixture::{with_spm_vocab, with_vocab, Gguf, Value as V};
    use super::*;

    fn build(g: &Gguf) -> (tempfile::TempDir, Result<TokenizerFiles>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        std::fs::write(&path, g.bytes()).unwrap();
        let file = GgufFile::open(&path).unwrap();
        let r = tokenizer_files(&file, 2048);
        (dir, r)
    }

    /// Writes tokenizer.json (+ a minimal config) into `dir` and loads it as the rest of the system does.
    fn load(dir: &std::path::Path, files: &TokenizerFiles) -> crate::Tokenizer {
        load_with_bos(dir, files, 260)
    }

    fn load_with_bos(dir: &std::path::Path, files: &TokenizerFiles, bos: u32) -> crate::Tokenizer {
        std::fs::write(dir.join("tokenizer.json"), files.tokenizer_json.to_string()).unwrap();
        std::fs::write(dir.join("tokenizer_config.json"), files.tokenizer_config.to_string()).unwrap();
        let config = crate::ModelConfig::parse(
            &dir.join("config.json"),
            &format!(
                r#"{{"model_type": "llama", "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
                    "num_attention_heads": 1, "vocab_size": {}, "bos_token_id": {bos}}}"#,
                files.n_tokens
            ),
        )
        .unwrap();
        crate::Tokenizer::from_dir(dir, &config).unwrap()
    }

    #[test]
    fn smollm_style_vocab_splits_digits_and_keeps_special_tokens_whole() {
        let (dir, files) = build(&with_vocab("smollm"));
        let files = files.unwrap();
        let tok = load(dir.path(), &files);
        // " the" merges through "Ġt" + "he"; digits stay single; special tokens are one id each.
        assert_eq!(tok.encode(" the").unwrap(), vec![258]);
        assert_eq!(tok.encode("12").unwrap(), vec![b'1' as u32, b'2' as u32]);
        assert_eq!(tok.encode("<|im_start|>x<tool>").unwrap(), vec![260, b'x' as u32, 262]);
        assert_eq!(files.n_tokens, 263);
        let c = &files.tokenizer_config;
        assert_eq!((c["bos_token"].as_str(), c["eos_token"].as_str()), (Some("<|im_start|>"), Some("<|im_end|>")));
        assert_eq!(c["additional_special_tokens"], json!(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]));
        assert_eq!((c["model_max_length"].as_u64(), c["chat_template"].as_str()), (Some(2048), Some("{{ messages }}")));
        let added = files.tokenizer_json["added_tokens"].as_array().unwrap();
        assert_eq!(added.len(), 4);
        assert_eq!((added[3]["content"].as_str(), added[3]["special"].as_bool()), (Some("<tool>"), Some(false)));
    }

    #[test]
    fn qwen2_vocab_normalizes_and_splits_with_its_regex() {
        let (dir, files) = build(&with_vocab("qwen2"));
        let files = files.unwrap();
        assert_eq!(files.tokenizer_json["normalizer"], json!({"type": "NFC"}));
        let tok = load(dir.path(), &files);
        // NFC composes e + U+0301 into é (2 bytes: c3 a9), which byte-level maps to two tokens.
        assert_eq!(tok.encode("e\u{301}").unwrap().len(), 2);
        assert_eq!(tok.encode(" the").unwrap(), vec![258]);
    }

    #[test]
    fn add_bos_token_becomes_a_template_and_the_config_flag() {
        let mut g = with_vocab("smollm");
        g.kv("tokenizer.ggml.add_bos_token", V::Bool(true));
        let (dir, files) = build(&g);
        let files = files.unwrap();
        assert_eq!(files.tokenizer_json["post_processor"]["type"], "TemplateProcessing");
        assert_eq!(files.tokenizer_config["add_bos_token"], true);
        assert_eq!(load(dir.path(), &files).bos(), Some(260));
    }

    #[test]
    fn unsupported_vocabularies_name_the_key() {
        let check = |g: Gguf, key: &str, says: &str| {
            let (_dir, r) = build(&g);
            let err = r.err().expect("must be refused");
            let msg = err.to_string();
            assert!(matches!(&err, Error::GgufKey { key: k, .. } if k == key), "{msg}");
            assert!(msg.contains("t.gguf") && msg.contains(says), "{msg}");
        };
        let mut g = with_vocab("smollm");
        g.set("tokenizer.ggml.model", V::Str("bert".into()));
        let says = "`bert` is not supported (supported: gpt2, byte-level BPE; llama, SentencePiece";
        check(g, "tokenizer.ggml.model", says);
        check(with_vocab("llama-bpe"), "tokenizer.ggml.pre", "pre-tokenizer `llama-bpe` is not supported (supported: smollm");
        let mut g = with_vocab("smollm");
        g.remove_key("tokenizer.ggml.pre");
        check(g, "tokenizer.ggml.pre", "required key is missing (it names the pre-tokenizer: smollm, starcoder");
        let mut g = with_vocab("smollm");
        g.remove_key("tokenizer.ggml.merges");
        check(g, "tokenizer.ggml.merges", "required key is missing");
        let mut g = with_vocab("smollm");
        g.set("tokenizer.ggml.merges", V::StrArray(vec!["Ġ t".into(), "he".into()]));
        check(g, "tokenizer.ggml.merges", "merge #1 \"he\" is not two tokens");
        let mut g = with_vocab("smollm");
        g.set("tokenizer.ggml.token_type", V::I32Array(vec![1; 3]));
        check(g, "tokenizer.ggml.token_type", "3 types for 263 tokens");
    }

    #[test]
    fn merges_outside_the_vocabulary_are_refused_before_writing() {
        let mut g = with_vocab("smollm");
        g.set("tokenizer.ggml.merges", V::StrArray(vec!["Ġ q".into()]));
        let (_dir, r) = build(&g);
        let err = r.err().expect("Ġq is not in the vocabulary").to_string();
        assert!(err.contains("t.gguf: tokenizer: the tokenizer.json built from the tokenizer.ggml.* keys does not load"), "{err}");
    }

    /// The ids of the SentencePiece fixture's pieces (see `with_spm_vocab`).
    const BOS: u32 = 2;
    const SPACE: u32 = 260;
    const TH: u32 = 266;
    const THE: u32 = 267;
    const SPACE_THE: u32 = 268;
    const START_OF_TURN: u32 = 269;
    const NEWLINES: u32 = 270;
    const A: u32 = 271;
    /// The byte piece `<0xXX>` of byte `b`.
    fn byte(b: u8) -> u32 {
        4 + u32::from(b)
    }

    #[test]
    fn sentencepiece_merges_are_ranked_by_the_merged_piece_score() {
        let (_dir, files) = build(&with_spm_vocab());
        let files = files.unwrap();
        let model = &files.tokenizer_json["model"];
        // Highest score first: th (-2), ▁t (-3), the (-4: both of its cuts, by left id), he (-5), ▁the
        // (-6: ▁ + the, then ▁t + he); pieces of one character, bytes and specials have no cut.
        let want =
            json!([["t", "h"], ["▁", "t"], ["t", "he"], ["th", "e"], ["h", "e"], ["▁", "the"], ["▁t", "he"]]);
        assert_eq!(model["merges"], want);
        assert_eq!((model["unk_token"].as_str(), model["byte_fallback"].as_bool()), (Some("<unk>"), Some(true)));
        assert_eq!(model["vocab"]["▁the"], json!(SPACE_THE));
        assert_eq!(files.tokenizer_json["pre_tokenizer"], Value::Null);
    }

    #[test]
    fn sentencepiece_vocab_tokenizes_as_its_scores_say() {
        let (dir, files) = build(&with_spm_vocab());
        let files = files.unwrap();
        let tok = load_with_bos(dir.path(), &files, BOS);
        let encode = |text: &str| tok.encode(text).unwrap();
        assert_eq!(encode("the"), vec![THE]);
        // Spaces are ▁; no space prefix (add_space_prefix is false, as in Gemma's file).
        assert_eq!(encode(" the"), vec![SPACE_THE]);
        // th (-2) merges before ▁t (-3) although ▁t has the smaller id.
        assert_eq!(encode(" th"), vec![SPACE, TH]);
        // No piece for é or q: their UTF-8 bytes.
        assert_eq!(encode("é"), vec![byte(0xC3), byte(0xA9)]);
        assert_eq!(encode("q the"), vec![byte(b'q'), SPACE_THE]);
        // Control and user-defined tokens match in the raw text.
        assert_eq!(encode("<start_of_turn>the"), vec![START_OF_TURN, THE]);
        assert_eq!(encode("a\n\nthe"), vec![A, NEWLINES, THE]);
        assert_eq!(tok.decode(&[byte(0xC3), byte(0xA9), SPACE_THE]).unwrap(), "é the");
        // add_bos_token: BOS before the text when special tokens are added, and the config flag.
        assert_eq!(tok.bos(), Some(BOS));
        assert_eq!(tok.inner().encode("the", true).unwrap().get_ids(), &[BOS, THE]);
        let c = &files.tokenizer_config;
        assert_eq!((c["add_bos_token"].as_bool(), c["unk_token"].as_str()), (Some(true), Some("<unk>")));
        assert_eq!(c["additional_special_tokens"], json!(["<pad>", "<eos>", "<bos>", "<start_of_turn>"]));
        let added = files.tokenizer_json["added_tokens"].as_array().unwrap();
        let special: Vec<(u64, bool)> =
            added.iter().map(|a| (a["id"].as_u64().unwrap(), a["special"].as_bool().unwrap())).collect();
        assert_eq!(special, vec![(0, true), (1, true), (2, true), (269, true), (270, false)]);
    }

    #[test]
    fn sentencepiece_space_prefix_and_bos_follow_the_keys_then_llama_cpp() {
        // add_space_prefix: ▁ before the text, stripped again when decoding.
        let mut g = with_spm_vocab();
        g.set("tokenizer.ggml.add_space_prefix", V::Bool(true)).set("tokenizer.ggml.add_bos_token", V::Bool(false));
        let (dir, files) = build(&g);
        let files = files.unwrap();
        assert_eq!(files.tokenizer_json["post_processor"], Value::Null);
        assert_eq!(files.tokenizer_config["add_bos_token"], false);
        let tok = load_with_bos(dir.path(), &files, BOS);
        assert_eq!(tok.encode("the").unwrap(), vec![SPACE_THE]);
        assert_eq!(tok.decode(&[SPACE_THE]).unwrap(), "the");
        assert_eq!(tok.bos(), None);
        // Without the keys, llama.cpp's defaults for SentencePiece vocabularies: prefix and BOS.
        let mut g = with_spm_vocab();
        g.remove_key("tokenizer.ggml.add_space_prefix").remove_key("tokenizer.ggml.add_bos_token");
        let (dir, files) = build(&g);
        let files = files.unwrap();
        let tok = load_with_bos(dir.path(), &files, BOS);
        assert_eq!((tok.encode("the").unwrap(), tok.bos()), (vec![SPACE_THE], Some(BOS)));
    }

    #[test]
    fn bad_sentencepiece_vocabularies_name_the_key() {
        let check = |edit: &dyn Fn(&mut Gguf), key: &str, says: &str| {
            let mut g = with_spm_vocab();
            edit(&mut g);
            let (_dir, r) = build(&g);
            let err = r.err().expect("must be refused");
            let msg = err.to_string();
            assert!(matches!(&err, Error::GgufKey { key: k, .. } if k == key), "expected key {key}: {msg}");
            assert!(msg.contains("t.gguf") && msg.contains(says), "expected {says:?} in: {msg}");
        };
        let (scores, tokens) = ("tokenizer.ggml.scores", "tokenizer.ggml.tokens");
        let (unk, bos) = ("tokenizer.ggml.unknown_token_id", "tokenizer.ggml.bos_token_id");
        check(&|g| { g.remove_key(scores); }, scores, "required key is missing");
        check(&|g| { g.set(scores, V::F32Array(vec![0.0; 3])); }, scores, "3 scores for 272 tokens");
        check(&|g| { g.set(scores, V::I32Array(vec![0; 272])); }, scores, "expected an array of float32");
        let mut nan = vec![0.0; 272];
        nan[TH as usize] = f32::NAN;
        check(&|g| { g.set(scores, V::F32Array(nan.clone())); }, scores, "the score of token 266 (\"th\") is NaN");
        check(&|g| { g.set(unk, V::U32(272)); }, unk, "272 is not a token id (the vocabulary has 272)");
        check(&|g| { g.remove_key(bos); }, bos, "required key is missing (BOS is added to every sequence)");
        check(&|g| { g.set(bos, V::U32(1000)); }, bos, "1000 is not a token id");
        let twice = "token \"a\" appears twice (ids 0 and 1)";
        check(&|g| { g.set(tokens, V::StrArray(vec!["a".into(); 272])); }, tokens, twice);
    }

    /// A control token of 32 KiB would take the added-token matcher minutes to build: refused at
    /// once, naming the token; one at the bound builds.
    #[test]
    fn an_overlong_control_token_is_refused_naming_it() {
        let with_last = |content: String| {
            let mut g = with_vocab("smollm");
            let mut tokens: Vec<String> = crate::synthetic::byte_level_vocab();
            tokens.extend(["Ġt", "he", "Ġthe", "<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from));
            tokens.push(content);
            g.set("tokenizer.ggml.tokens", V::StrArray(tokens));
            g
        };
        let started = std::time::Instant::now();
        let (_dir, r) = build(&with_last("x".repeat(32 << 10)));
        let err = r.err().expect("refused").to_string();
        assert!(err.contains("tokenizer.ggml.tokens") && err.contains("token 262") && err.contains("32768 bytes"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "took {:?}", started.elapsed());
        let (_dir, r) = build(&with_last("x".repeat(crate::tokenizer::MAX_ADDED_TOKEN_BYTES)));
        assert!(r.is_ok(), "{:?}", r.err());
    }
}
