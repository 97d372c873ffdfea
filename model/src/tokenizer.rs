//! tokenizer.json through the `tokenizers` crate, plus the one tokenizer_config.json fact evaluation
//! needs: whether a BOS token starts every sequence.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{Error, ModelConfig, Result};

/// The longest added token a tokenizer.json may hold, in bytes. Real ones are markers and runs of
/// whitespace (tens of bytes). The `tokenizers` crate builds its matcher of added tokens in time
/// quadratic in the longest one (seconds for 8 KiB, minutes for 32 KiB, in the tests' build), so a
/// longer one is refused before it is built.
pub const MAX_ADDED_TOKEN_BYTES: usize = 1024;

/// The first of `contents` (added tokens' texts) longer than [`MAX_ADDED_TOKEN_BYTES`]: its index
/// and length.
fn overlong_added_token<'a>(contents: impl IntoIterator<Item = &'a str>) -> Option<(usize, usize)> {
    contents.into_iter().enumerate().map(|(i, c)| (i, c.len())).find(|&(_, len)| len > MAX_ADDED_TOKEN_BYTES)
}

/// What the `tokenizers` crate would panic on instead of failing, refused first: BPE merges whose
/// second token does not start with the model's `continuing_subword_prefix` (it slices the prefix
/// off without looking). The error names the merge.
fn check_bpe_merges(model: &Value) -> std::result::Result<(), String> {
    let prefix = model.get("continuing_subword_prefix").and_then(Value::as_str).unwrap_or_default();
    if prefix.is_empty() {
        return Ok(());
    }
    let merges = model.get("merges").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    for (i, merge) in merges.iter().enumerate() {
        let second = match merge {
            Value::Array(pair) => pair.get(1).and_then(Value::as_str),
            Value::String(pair) => pair.split_once(' ').map(|(_, b)| b),
            _ => None,
        };
        if let Some(b) = second.filter(|b| !b.starts_with(prefix)) {
            return Err(format!("model.merges[{i}]: {b:?} does not start with continuing_subword_prefix {prefix:?}"));
        }
    }
    Ok(())
}

/// The most steps a tokenizer.json's normalizer, pre-tokenizer or decoder may chain (sequences
/// within sequences counted out). Real ones chain a handful.
pub const MAX_PIPELINE_STEPS: usize = 16;

/// The steps of `section` (a normalizer, pre-tokenizer or decoder), sequences flattened.
fn pipeline_steps<'a>(section: &'a Value, steps: &mut Vec<&'a Value>) {
    let children = ["normalizers", "pretokenizers", "decoders"].iter().find_map(|k| section.get(*k));
    match (section.get("type").and_then(Value::as_str), children.and_then(Value::as_array)) {
        (Some("Sequence"), Some(children)) => children.iter().for_each(|c| pipeline_steps(c, steps)),
        _ if section.is_null() => {}
        _ => steps.push(section),
    }
}

/// Pipelines whose cost grows without bound, refused before the `tokenizers` crate runs them: more
/// than [`MAX_PIPELINE_STEPS`] steps, or a pre-tokenizer that maps bytes to characters more than
/// once (each ByteLevel pass turns a byte into a character of up to two bytes, so the text grows
/// geometrically with the passes).
fn check_pipelines(json: &Value) -> std::result::Result<(), String> {
    for section in ["normalizer", "pre_tokenizer", "decoder"] {
        let mut steps = Vec::new();
        pipeline_steps(json.get(section).unwrap_or(&Value::Null), &mut steps);
        if steps.len() > MAX_PIPELINE_STEPS {
            return Err(format!("{section}: {} steps, more than {MAX_PIPELINE_STEPS}", steps.len()));
        }
        let byte_level = steps.iter().filter(|s| s.get("type").and_then(Value::as_str) == Some("ByteLevel")).count();
        if section == "pre_tokenizer" && byte_level > 1 {
            return Err(format!("{section}: {byte_level} ByteLevel steps; one maps bytes to characters, more grow the text"));
        }
    }
    Ok(())
}

/// A loaded tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    bos: Option<u32>,
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json`; reads `add_bos_token` from `dir/tokenizer_config.json` if present.
    pub fn from_dir(dir: &Path, config: &ModelConfig) -> Result<Tokenizer> {
        let path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&path).map_err(Error::io(&path))?;
        // JSON first, then the tokenizer from the parsed value: `tokenizers` panics (instead of
        // failing) on some syntax errors met inside its components (a `decoder` that is not JSON).
        let json: Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Tokenizer { path: path.clone(), detail: format!("not JSON: {e}") })?;
        let added = json.get("added_tokens").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        if let Some((i, len)) = overlong_added_token(added.iter().map(|t| t["content"].as_str().unwrap_or_default())) {
            return Err(Error::Tokenizer {
                path,
                detail: format!(
                    "added_tokens[{i}].content: {len} bytes, more than the {MAX_ADDED_TOKEN_BYTES} an added token may have"
                ),
            });
        }
        if let Some(model) = json.get("model") {
            check_bpe_merges(model).map_err(|detail| Error::Tokenizer { path: path.clone(), detail })?;
        }
        check_pipelines(&json).map_err(|detail| Error::Tokenizer { path: path.clone(), detail })?;
        let inner: tokenizers::Tokenizer = serde_json::from_value(json)
            .map_err(|e| Error::Tokenizer { path: path.clone(), detail: e.to_string() })?;
        let config_path = dir.join("tokenizer_config.json");
        let add_bos = match std::fs::read_to_string(&config_path) {
            Ok(text) => {
                let v: Value = serde_json::from_str(&text).map_err(|e| Error::ConfigField {
                    path: config_path.clone(),
                    field: "(file)".into(),
                    detail: format!("not JSON: {e}"),
                })?;
                v.get("add_bos_token").and_then(Value::as_bool).unwrap_or(false)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(Error::Io { path: config_path, cause: e }),
        };
        let bos = match (add_bos, config.bos_token_id) {
            (false, _) => None,
            (true, Some(id)) => Some(id),
            (true, None) => {
                return Err(Error::ConfigField {
                    path: config.path.clone(),
                    field: "bos_token_id".into(),
                    detail: "tokenizer_config.json sets add_bos_token, so a BOS id is required".into(),
                })
            }
        };
        Ok(Tokenizer { inner, path, bos })
    }

    /// Token ids of `text`, without special tokens (BOS is the caller's business, see [`Self::bos`]).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer { path: self.path.clone(), detail: e.to_string() })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, with special tokens kept.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| Error::Tokenizer { path: self.path.clone(), detail: e.to_string() })
    }

    /// The BOS id to put before every sequence, when tokenizer_config.json asks for one.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// The `tokenizers` tokenizer itself (what the serving engine detokenizes with).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Size of the vocabulary including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// What a server needs from tokenizer_config.json beyond BOS: the special tokens' text and the chat
/// template. Tokens may be written as strings or as `{"content": ...}` objects (AddedToken).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenizerConfig {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub chat_template: Option<String>,
}

impl TokenizerConfig {
    /// Reads `dir/tokenizer_config.json`; a missing file gives the empty config.
    pub fn from_dir(dir: &Path) -> Result<TokenizerConfig> {
        let path = dir.join("tokenizer_config.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(TokenizerConfig::default()),
            Err(e) => return Err(Error::Io { path, cause: e }),
        };
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::ConfigField {
            path: path.clone(),
            field: "(file)".into(),
            detail: format!("not JSON: {e}"),
        })?;
        let token = |field: &str| match v.get(field) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_string),
            _ => None,
        };
        // A list of named templates ([{"name": "default", "template": ...}]) gives the default one.
        let chat_template = match v.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_string),
            _ => None,
        };
        Ok(TokenizerConfig { bos_token: token("bos_token"), eos_token: token("eos_token"), chat_template })
    }
}
