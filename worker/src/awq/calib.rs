//! Calibration data: where the activations AWQ looks at come from.
//!
//! A calibration set is a list of texts, sampled by AutoAWQ's rule (`get_calib_dataset` in
//! awq/utils/calib_data.py): texts in a seeded random order; each is stripped and tokenized (with
//! BOS when the tokenizer adds one); empty texts and texts longer than `seqlen` tokens are skipped;
//! the first `n_samples` that remain are concatenated and cut into rows of `seqlen` tokens (the
//! remainder is dropped). The default texts ship inside the binary: 1184 paragraphs of four Jane
//! Austen novels (public domain), built by `worker/calib/make-default.py` from
//! `../shared/assets/fetch-text`; Pride and Prejudice, the evaluation text, is not among them.

use std::path::Path;

pub use awq_job::CalibOptions;
use awq_kernels::rng::SplitMix64;
use awq_model::Tokenizer;
use serde_json::Value;

use crate::{Error, Result};

/// The built-in calibration texts, one paragraph per line.
pub const DEFAULT_TEXTS: &str = include_str!("../../calib/default.txt");

/// Token rows ready for the forward pass.
#[derive(Clone, Debug, PartialEq)]
pub struct CalibrationSet {
    /// `n_rows` rows of exactly `seqlen` tokens.
    pub rows: Vec<Vec<u32>>,
    pub seqlen: usize,
    /// Texts used, and texts skipped for being longer than `seqlen` tokens.
    pub samples_used: usize,
    pub samples_too_long: usize,
}

impl CalibrationSet {
    pub fn n_tokens(&self) -> usize {
        self.rows.len() * self.seqlen
    }
}

/// The default texts, one per line.
pub fn default_texts() -> Vec<String> {
    DEFAULT_TEXTS.lines().map(str::to_string).collect()
}

/// Reads calibration texts from a file: JSON Lines with a `"text"` field when the name ends in
/// `.jsonl`; otherwise plain text, one sample per paragraph (blank-line separated), or per line when
/// the file has no blank lines.
pub fn load_texts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
    let texts: Vec<String> = if path.extension().is_some_and(|e| e == "jsonl") {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, line)| {
                let v: Value = serde_json::from_str(line)
                    .map_err(|e| Error::Input(format!("{}: line {}: not JSON: {e}", path.display(), i + 1)))?;
                v.get("text").and_then(Value::as_str).map(str::to_string).ok_or_else(|| {
                    Error::Input(format!("{}: line {}: no string field \"text\"", path.display(), i + 1))
                })
            })
            .collect::<Result<_>>()?
    } else if text.contains("\n\n") {
        text.split("\n\n").map(|p| p.split_whitespace().collect::<Vec<_>>().join(" ")).collect()
    } else {
        text.lines().map(str::to_string).collect()
    };
    let texts: Vec<String> = texts.into_iter().filter(|t| !t.trim().is_empty()).collect();
    if texts.is_empty() {
        return Err(Error::Input(format!("{}: no calibration texts in the file", path.display())));
    }
    Ok(texts)
}

/// Samples calibration rows from `texts`; see the module docs.
pub fn build(texts: &[String], tokenizer: &Tokenizer, options: CalibOptions) -> Result<CalibrationSet> {
    let mut order: Vec<usize> = (0..texts.len()).collect();
    let mut rng = SplitMix64::new(options.seed);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let mut tokens = Vec::new();
    let (mut used, mut too_long) = (0, 0);
    for i in order {
        if used == options.n_samples {
            break;
        }
        let mut ids: Vec<u32> = tokenizer.bos().into_iter().collect();
        ids.extend(tokenizer.encode(texts[i].trim())?);
        if ids.len() > options.seqlen {
            too_long += 1;
            continue;
        }
        if ids.is_empty() || ids.len() == tokenizer.bos().iter().count() {
            continue;
        }
        tokens.extend(ids);
        used += 1;
    }
    let rows: Vec<Vec<u32>> = tokens.chunks_exact(options.seqlen).map(<[u32]>::to_vec).collect();
    if rows.is_empty() {
        return Err(Error::Input(format!(
            "calibration data gave {} tokens from {used} texts ({too_long} longer than {} tokens skipped): not one row of {} tokens",
            tokens.len(),
            options.seqlen,
            options.seqlen
        )));
    }
    Ok(CalibrationSet { rows, seqlen: options.seqlen, samples_used: used, samples_too_long: too_long })
}

#[cfg(test)]
mod tests {
    use super::*;
    use awq_model::synthetic::{write_checkpoint, SyntheticSpec};
    use awq_model::ModelConfig;

    fn byte_tokenizer() -> (tempfile::TempDir, Tokenizer) {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &SyntheticSpec::tiny_llama()).unwrap();
        let config = ModelConfig::from_dir(dir.path()).unwrap();
        let tok = Tokenizer::from_dir(dir.path(), &config).unwrap();
        (dir, tok)
    }

    #[test]
    fn follows_autoawq_sampling_rule() {
        let (_dir, tok) = byte_tokenizer();
        // One token per byte: lengths 3, 12 (too long for seqlen 8), 5, 0 (skipped), 4, 6.
        let texts: Vec<String> = ["abc", "abcdefghijkl", "  vwxyz ", "", "klmn", "opqrst"].map(String::from).to_vec();
        let options = CalibOptions { n_samples: 4, seqlen: 8, seed: 7 };
        let set = build(&texts, &tok, options).unwrap();
        // 4 texts of total length 3 + 5 + 4 + 6 = 18 -> 2 rows of 8, 2 tokens dropped.
        assert_eq!(set.samples_used, 4);
        assert_eq!(set.rows.len(), 2);
        assert!(set.rows.iter().all(|r| r.len() == 8));
        // Rows are the used texts, stripped, concatenated in the sampled order.
        let joined: Vec<u8> = set.rows.concat().iter().map(|&id| id as u8).collect();
        let text = String::from_utf8(joined).unwrap();
        let used = ["abc", "vwxyz", "klmn", "opqrst"];
        let mut prefixes = Vec::new();
        for a in 0..4 {
            for b in 0..4 {
                for c in 0..4 {
                    for d in 0..4 {
                        let order = [a, b, c, d];
                        if (0..4).all(|i| order.contains(&i)) {
                            prefixes.push(order.iter().map(|&i| used[i]).collect::<String>()[..16].to_string());
                        }
                    }
                }
            }
        }
        assert!(prefixes.contains(&text), "{text} is not 16 tokens of the 4 stripped short texts in some order");
        // Same seed, same rows; another seed, another order.
        assert_eq!(build(&texts, &tok, options).unwrap(), set);
        let other = (1..20).map(|seed| build(&texts, &tok, CalibOptions { seed, ..options }).unwrap()).any(|s| s.rows != set.rows);
        assert!(other, "the seed must change the order");
    }

    #[test]
    fn too_little_text_is_an_error_and_files_parse() {
        let (dir, tok) = byte_tokenizer();
        let err = build(&["abc".to_string()], &tok, CalibOptions { n_samples: 4, seqlen: 8, seed: 1 }).unwrap_err();
        assert!(err.to_string().contains("not one row of 8 tokens"), "{err}");

        let plain = dir.path().join("c.txt");
        std::fs::write(&plain, "first para\nstill first\n\nsecond\n").unwrap();
        assert_eq!(load_texts(&plain).unwrap(), vec!["first para still first", "second"]);
        std::fs::write(&plain, "line one\nline two\n").unwrap();
        assert_eq!(load_texts(&plain).unwrap(), vec!["line one", "line two"]);
        let jsonl = dir.path().join("c.jsonl");
        std::fs::write(&jsonl, "{\"text\": \"a\"}\n\n{\"text\": \"b\", \"id\": 2}\n").unwrap();
        assert_eq!(load_texts(&jsonl).unwrap(), vec!["a", "b"]);
        std::fs::write(&jsonl, "{\"text\": \"a\"}\n{\"body\": \"b\"}\n").unwrap();
        let err = load_texts(&jsonl).unwrap_err().to_string();
        assert!(err.contains("c.jsonl: line 2: no string field \"text\""), "{err}");
        assert!(default_texts().len() > 1000);
    }
}
