//! SentencePiece-style vocabularies (`tokenizer.ggml.model = llama`: Gemma's, Llama 2's) as a
//! Hugging Face BPE model.
//!
//! A GGUF file keeps such a vocabulary as pieces with scores and no merges: llama.cpp's tokenizer
//! (`llm_tokenizer_spm`) repeatedly joins the adjacent pair whose joined piece is in the vocabulary
//! with the highest score. A BPE model does the same when each way of cutting a piece into two
//! pieces of the vocabulary is a merge, ranked by the score of the piece it makes
//! ([`merges_from_scores`]): this is how transformers' SentencePiece converters and
//! `../shared/assets/gguf2hf.py` rebuild the merges, and what the e2e tests compare against.
//!
//! Around the model: every space becomes `▁` (U+2581), with one `▁` put before the text when
//! `tokenizer.ggml.add_space_prefix` says so; there is no pre-tokenizer (SentencePiece sees the
//! whole text); a character no piece covers falls back to its UTF-8 bytes as the `<0xXX>` pieces
//! (`byte_fallback`), or to the unknown piece, runs of which fuse into one; the decoder undoes each
//! step. Without a key, llama.cpp's defaults for this kind of vocabulary apply (`llama-vocab.cpp`,
//! `LLAMA_VOCAB_TYPE_SPM`): a space prefix, BOS added, unknown id 0.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use super::tokenizer::Pipeline;
use super::GgufFile;
use crate::{Error, Result};

/// SentencePiece's meta symbol for a space.
const SPACE: &str = "\u{2581}";

/// The BPE model and the steps around it for the vocabulary `tokens` (ids by position; `ids` is the
/// same as a map, `vocab` as tokenizer.json's object).
pub(super) fn pipeline(
    file: &GgufFile,
    tokens: &[&str],
    ids: &HashMap<&str, u32>,
    vocab: Map<String, Value>,
) -> Result<Pipeline> {
    let key_error = |key: &str, detail: String| Error::GgufKey { path: file.path().into(), key: key.into(), detail };
    let scores = file.required("tokenizer.ggml.scores", file.f32_array("tokenizer.ggml.scores")?)?;
    if scores.len() != tokens.len() {
        return Err(key_error("tokenizer.ggml.scores", format!("{} scores for {} tokens", scores.len(), tokens.len())));
    }
    if let Some(id) = scores.iter().position(|s| s.is_nan()) {
        return Err(key_error("tokenizer.ggml.scores", format!("the score of token {id} ({:?}) is NaN", tokens[id])));
    }
    // llama.cpp's `special_unk_id = 0` for SentencePiece vocabularies.
    let unk_id = file.uint("tokenizer.ggml.unknown_token_id")?.unwrap_or(0);
    let unk = usize::try_from(unk_id).ok().and_then(|id| tokens.get(id)).ok_or_else(|| {
        key_error(
            "tokenizer.ggml.unknown_token_id",
            format!("{unk_id} is not a token id (the vocabulary has {})", tokens.len()),
        )
    })?;
    // llama.cpp's `tokenizer_add_space_prefix = true` for SentencePiece vocabularies.
    let space_prefix = file.bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);

    let merges: Vec<Value> = merges_from_scores(tokens, &scores, ids)
        .into_iter()
        .map(|(l, r)| json!([tokens[l as usize], tokens[r as usize]]))
        .collect();
    let mut normalizers = vec![json!({"type": "Replace", "pattern": {"String": " "}, "content": SPACE})];
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": SPACE}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if space_prefix {
        normalizers.insert(0, json!({"type": "Prepend", "prepend": SPACE}));
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Ok(Pipeline {
        model: json!({"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                      "vocab": vocab, "merges": merges}),
        normalizer: json!({"type": "Sequence", "normalizers": normalizers}),
        pre_tokenizer: Value::Null,
        decoder: json!({"type": "Sequence", "decoders": decoders}),
        post_processor: Value::Null,
        // llama.cpp's `tokenizer_add_bos = true` for SentencePiece vocabularies.
        add_bos_default: true,
    })
}

/// BPE merges `(left id, right id)` for a vocabulary of scored pieces, first applied first: every
/// cut of a piece into two pieces of the vocabulary, ranked by the score of the whole piece
/// (highest first); ties in score go by the whole piece's id, then by the left and right ids (the
/// order gguf2hf.py's stable sort leaves them in). Pieces are cut between characters, not bytes.
/// `scores` holds no NaN (the caller checks).
pub(super) fn merges_from_scores(tokens: &[&str], scores: &[f32], ids: &HashMap<&str, u32>) -> Vec<(u32, u32)> {
    struct Ranked {
        score: f32,
        piece: usize,
        left: u32,
        right: u32,
    }
    let mut ranked = Vec::new();
    for (piece, (token, &score)) in tokens.iter().zip(scores).enumerate() {
        for (at, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(at);
            if let (Some(&left), Some(&right)) = (ids.get(left), ids.get(right)) {
                ranked.push(Ranked { score, piece, left, right });
            }
        }
    }
    // partial_cmp, not total_cmp: -0.0 and 0.0 are the same score, as in Python.
    ranked.sort_unstable_by(|a, b| {
        b.score
            .partial_cmp(&a.score)
            .expect("scores hold no NaN")
            .then((a.piece, a.left, a.right).cmp(&(b.piece, b.left, b.right)))
    });
    ranked.into_iter().map(|m| (m.left, m.right)).collect()
}
