//! Our tokenizer (`awq_model::Tokenizer`, the `tokenizers` crate behind it) against the Python
//! `tokenizers` package of the assets' venv, which check-model.py uses and which the assets README
//! checked against independent BPE re-implementations. Token ids must be identical: a perplexity
//! over different ids is a perplexity of a different text.

use std::path::Path;

use awq_e2e::*;
use awq_model::{ModelConfig, Tokenizer};

/// Encodes every text with our tokenizer and with Python's, asserts the ids are identical (listing
/// every text that differs, with both tokenizations and where they part), and returns our ids.
fn check(dir: &Path, texts: &[String]) -> Vec<Vec<u32>> {
    let config = ModelConfig::from_dir(dir).unwrap_or_else(|e| panic!("{e}"));
    let tokenizer = Tokenizer::from_dir(dir, &config).unwrap_or_else(|e| panic!("{e}"));
    let ours: Vec<Vec<u32>> =
        texts.iter().map(|t| tokenizer.encode(t).unwrap_or_else(|e| panic!("{t:?}: {e}"))).collect();
    let theirs = python_token_ids(dir, texts);
    assert_eq!(theirs.len(), texts.len());
    let mut diffs = Vec::new();
    for ((text, ours), theirs) in texts.iter().zip(&ours).zip(&theirs) {
        if ours != theirs {
            let at = ours.iter().zip(theirs).position(|(a, b)| a != b).unwrap_or(ours.len().min(theirs.len()));
            let shown: String = text.chars().take(200).collect();
            let (o, t) = (&ours[at..ours.len().min(at + 12)], &theirs[at..theirs.len().min(at + 12)]);
            diffs.push(format!(
                "text {shown:?} ({} chars): {} ids vs python's {}, first difference at id {at}: ours {o:?}..., python {t:?}...",
                text.chars().count(),
                ours.len(),
                theirs.len()
            ));
        }
    }
    assert!(
        diffs.is_empty(),
        "{} of {} texts tokenize differently in {}:\n{}",
        diffs.len(),
        texts.len(),
        dir.display(),
        diffs.join("\n")
    );
    ours
}

/// The first `n` characters of a text asset.
fn text_prefix(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.chars().take(n).collect()
}

#[test]
fn smollm2_tokenizer_matches_python_tokenizers() {
    let dir = smollm2_135m();
    let mut texts: Vec<String> = TRICKY_TEXTS.iter().map(|s| s.to_string()).collect();
    texts.push(text_prefix(&text_dir().join("austen").join("pride-and-prejudice.txt"), 50_000));
    texts.push(text_prefix(&text_dir().join("kjv.txt"), 50_000));
    let ids = check(&dir, &texts);

    // The cases are not trivial: SmolLM2 splits digits one per token, keeps special-token text as
    // one id, and merges English into far fewer tokens than bytes.
    let id_of = |s: &str| ids[texts.iter().position(|t| t == s).expect("the text is in the list")].clone();
    assert_eq!(id_of("12345").len(), 5, "{:?}", id_of("12345"));
    assert_eq!(id_of("12345 67.89 1,000,000").len(), 21, "{:?}", id_of("12345 67.89 1,000,000"));
    assert_eq!(id_of("<|im_start|>user"), vec![1, 4093], "<|im_start|> is id 1 in SmolLM2's vocabulary");
    assert!(id_of("").is_empty());
    let austen = &ids[TRICKY_TEXTS.len()];
    assert!(austen.len() * 3 < texts[TRICKY_TEXTS.len()].len(), "{} tokens for 50k characters", austen.len());
}

/// The synthetic checkpoints' byte-level tokenizer, which the synthetic perplexity tests rely on:
/// Python agrees with us, and every byte is one token whose id is the byte's value.
#[test]
fn synthetic_byte_level_tokenizer_matches_python_tokenizers() {
    let dir = scratch();
    awq_model::synthetic::write_checkpoint(dir.path(), &awq_model::synthetic::SyntheticSpec::tiny_llama())
        .unwrap_or_else(|e| panic!("{e}"));
    let texts: Vec<String> = TRICKY_TEXTS.iter().filter(|s| !s.contains("<|")).map(|s| s.to_string()).collect();
    let ids = check(dir.path(), &texts);
    for (text, ids) in texts.iter().zip(&ids) {
        let bytes: Vec<u32> = text.bytes().map(u32::from).collect();
        assert_eq!(ids, &bytes, "{text:?}");
    }
    let special = check(dir.path(), &["a<|endoftext|>b".to_string()]);
    assert_eq!(special[0], vec![97, 256, 98], "<|endoftext|> is the one special token, id 256");
}
