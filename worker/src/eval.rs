//! The windows that perplexity scores, cut the way ../shared/assets/check-model.py and most
//! quantization papers cut them.
//!
//! The token stream is cut into windows of `ctx` tokens. Without BOS, window k feeds
//! `ids[k*ctx .. k*ctx+ctx]` and scores each next token `ids[k*ctx+1 .. k*ctx+ctx+1]`; when the
//! tokenizer asks for BOS, window k feeds `[BOS] + ids[k*ctx .. k*ctx+ctx-1]` and scores
//! `ids[k*ctx .. k*ctx+ctx]`. Perplexity is `exp(total NLL / scored tokens)`. The scoring itself runs
//! on the serving engine's model runner (`awq_serve::eval`, what `awq eval ppl` and `awq eval kl`
//! call); this module only cuts.

use crate::{Error, Result};

/// The windows to score: inputs and targets, cut as the module docs describe.
#[derive(Clone, Debug, PartialEq)]
pub struct Windows {
    /// (input ids, target ids); `targets.len() <= inputs.len()`, and logits of the first
    /// `targets.len()` inputs are scored.
    pub windows: Vec<(Vec<u32>, Vec<u32>)>,
}

impl Windows {
    pub fn new(ids: &[u32], ctx: usize, bos: Option<u32>) -> Result<Windows> {
        if ctx < 2 {
            return Err(Error::Input(format!("context length {ctx} is too short (at least 2 tokens)")));
        }
        let mut windows = Vec::new();
        match bos {
            None => {
                let mut s = 0;
                while s + 1 < ids.len() {
                    let end = (s + ctx).min(ids.len());
                    windows.push((ids[s..end].to_vec(), ids[s + 1..(s + ctx + 1).min(ids.len())].to_vec()));
                    s += ctx;
                }
            }
            Some(bos) => {
                for s in (0..ids.len()).step_by(ctx) {
                    let mut input = vec![bos];
                    input.extend_from_slice(&ids[s..(s + ctx - 1).min(ids.len())]);
                    windows.push((input, ids[s..(s + ctx).min(ids.len())].to_vec()));
                }
            }
        }
        if windows.is_empty() {
            return Err(Error::Input(format!(
                "the text has {} token{}: too few to score anything (at least 2 are needed)",
                ids.len(),
                if ids.len() == 1 { "" } else { "s" }
            )));
        }
        Ok(Windows { windows })
    }

    pub fn scored_tokens(&self) -> usize {
        self.windows.iter().map(|(_, t)| t.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_follow_the_reference_rule() {
        let ids: Vec<u32> = (0..10).collect();
        let w = Windows::new(&ids, 4, None).unwrap().windows;
        assert_eq!(w[0], (vec![0, 1, 2, 3], vec![1, 2, 3, 4]));
        assert_eq!(w[2], (vec![8, 9], vec![9]));
        assert_eq!(w.len(), 3);
        let w = Windows::new(&ids, 4, Some(99)).unwrap().windows;
        assert_eq!(w[0], (vec![99, 0, 1, 2], vec![0, 1, 2, 3]));
        assert_eq!(w[2], (vec![99, 8, 9], vec![8, 9]));
        assert!(Windows::new(&[5], 4, None).is_err());
        assert!(Windows::new(&ids, 1, None).is_err());
    }
}
