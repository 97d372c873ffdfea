//! tokenizer.json, tokenizer_config.json and generation_config.json from a GGUF file's
//! `tokenizer.ggml.*` keys.
//!
//! Only byte-level BPE vocabularies (`tokenizer.ggml.model = gpt2`) are imported: the tokens are
//! already in GPT-2's byte-to-character form, merges are `"left right"` strings ranked by position,
//! and control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added
//! tokens. What llama.cpp keeps as a name, `tokenizer.ggml.pre`, stands for a pre-tokenizer that we
//! write out in full: the table [`PRE_TOKENIZERS`] follows `../shared/assets/gguf2hf.py` and the
//! upstream tokenizer.json files (SmolLM2's individual digits + GPT-2 regex, Qwen2's NFC + split
//! regex). Any other model or pre-tokenizer is an error naming the key. The tokenizer.json we build
//! is loaded through the `tokenizers` crate before it is written, so a vocabulary whose merges do
//! not fit it is refused here, not at the first `awq eval`.

use serde_json::{json, Map, Value};

use super::GgufFile;
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
    if model != "gpt2" {
        return Err(key_error(
            "tokenizer.ggml.model",
            format!("`{model}` is not supported: only byte-level BPE vocabularies (`gpt2`) can be imported"),
        ));
    }
    let known = || PRE_TOKENIZERS.iter().map(|p| p.0).collect::<Vec<_>>().join(", ");
    let pre_name = file.str("tokenizer.ggml.pre")?.ok_or_else(|| {
        key_error("tokenizer.ggml.pre", format!("required key is missing (it names the pre-tokenizer: {})", known()))
    })?;
    let pre = PRE_TOKENIZERS.iter().find(|(name, _)| *name == pre_name).map(|p| p.1).ok_or_else(|| {
        key_error("tokenizer.ggml.pre", format!("pre-tokenizer `{pre_name}` is not supported (supported: {})", known()))
    })?;

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
    let mut vocab = Map::new();
    for (id, token) in tokens.iter().enumerate() {
        if let Some(first) = vocab.insert(token.to_string(), json!(id)) {
            return Err(key_error("tokenizer.ggml.tokens", format!("token {token:?} appears twice (ids {first} and {id})")));
        }
    }
    let merges = file.required("tokenizer.ggml.merges", file.str_array("tokenizer.ggml.merges")?)?;
    let merges = merges
        .iter()
        .enumerate()
        .map(|(i, m)| match m.split_once(' ') {
            Some((left, right)) => Ok(json!([left, right])),
            None => Err(key_error("tokenizer.ggml.merges", format!("merge #{i} {m:?} is not two tokens separated by a space"))),
        })
        .collect::<Result<Vec<_>>>()?;

    let added: Vec<Value> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, &ty))| ty == CONTROL || ty == USER_DEFINED)
        .map(|(id, (token, &ty))| {
            json!({"id": id, "content": token, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": ty == CONTROL})
        })
        .collect();

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
    let token_name = |key: &str| -> Result<Option<String>> {
        Ok(file.uint(key)?.and_then(|id| tokens.get(id as usize)).map(|t| t.to_string()))
    };
    let bos = file.uint("tokenizer.ggml.bos_token_id")?;
    let add_bos = file.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
    let post_processor = match (add_bos, bos.and_then(|id| tokens.get(id as usize).map(|t| (id, t)))) {
        (true, Some((id, bos))) => {
            let special = json!({"SpecialToken": {"id": bos, "type_id": 0}});
            let seq = |s: &str| json!({"Sequence": {"id": s, "type_id": 0}});
            json!({"type": "TemplateProcessing", "single": [special, seq("A")],
                   "pair": [special, seq("A"), special, seq("B")],
                   "special_tokens": {*bos: {"id": bos, "ids": [id], "tokens": [bos]}}})
        }
        _ => json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}),
    };
    let tokenizer_json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
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
    use super::super::fixture::{with_vocab, Gguf, Value as V};
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
        std::fs::write(dir.join("tokenizer.json"), files.tokenizer_json.to_string()).unwrap();
        std::fs::write(dir.join("tokenizer_config.json"), files.tokenizer_config.to_string()).unwrap();
        let config = crate::ModelConfig::parse(
            &dir.join("config.json"),
            r#"{"model_type": "llama", "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
                "num_attention_heads": 1, "vocab_size": 263, "bos_token_id": 260}"#,
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
        g.set("tokenizer.ggml.model", V::Str("llama".into()));
        check(g, "tokenizer.ggml.model", "`llama` is not supported: only byte-level BPE");
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
}
