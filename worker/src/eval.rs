//! Perplexity over non-overlapping windows, the way ../shared/assets/check-model.py and most
//! quantization papers measure it.
//!
//! The token stream is cut into windows of `ctx` tokens. Without BOS, window k feeds
//! `ids[k*ctx .. k*ctx+ctx]` and scores each next token `ids[k*ctx+1 .. k*ctx+ctx+1]`; when the
//! tokenizer asks for BOS, window k feeds `[BOS] + ids[k*ctx .. k*ctx+ctx-1]` and scores
//! `ids[k*ctx .. k*ctx+ctx]`. Perplexity is `exp(total NLL / scored tokens)`.
//!
//! The model is streamed block by block: a batch of windows goes through block 0, then block 1, and
//! so on, so only one block's weights (converted to f32) are in memory at a time, plus the batch's
//! activations. Batches are sized to a fixed activation budget; the result does not depend on it.

use awq_kernels::{ops, DType};
use awq_model::Checkpoint;

use crate::forward::{block_forward, BlockShape};
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

/// Where a perplexity run is, for progress bars.
#[derive(Clone, Copy, Debug)]
pub struct EvalProgress {
    /// Block steps done and in total (a step is one batch through one block, or through the head).
    pub steps_done: usize,
    pub steps_total: usize,
    /// Tokens scored so far.
    pub tokens_scored: usize,
}

/// The result of a perplexity run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PerplexityReport {
    pub nll_sum: f64,
    pub tokens_scored: usize,
    pub windows: usize,
}

impl PerplexityReport {
    pub fn perplexity(&self) -> f64 {
        (self.nll_sum / self.tokens_scored as f64).exp()
    }
}

/// Bytes of activations a batch of windows may use; beyond this, windows are split into batches.
const ACTIVATION_BUDGET_BYTES: usize = 1 << 30;

/// Scores `windows` with the model in `checkpoint`, reporting progress after every block step.
pub fn perplexity(
    checkpoint: &Checkpoint,
    windows: &Windows,
    mut progress: impl FnMut(EvalProgress),
) -> Result<PerplexityReport> {
    let c = checkpoint.config();
    let shape = BlockShape::of(checkpoint);
    // Batches hold windows of one length (only the last window can be shorter).
    let per_window_bytes = windows.windows[0].0.len() * (6 * c.hidden_size + 3 * c.intermediate_size + c.q_dim()) * 4;
    let max_batch = (ACTIVATION_BUDGET_BYTES / per_window_bytes.max(1)).max(1);
    let mut batches: Vec<&[(Vec<u32>, Vec<u32>)]> = Vec::new();
    let mut rest = &windows.windows[..];
    while !rest.is_empty() {
        let len = rest[0].0.len();
        let n = rest.iter().take(max_batch).take_while(|(i, _)| i.len() == len).count();
        batches.push(&rest[..n]);
        rest = &rest[n..];
    }

    let embed = checkpoint.embed_tokens()?;
    let final_norm = checkpoint.final_norm()?;
    let lm_head = checkpoint.lm_head()?.into_dtype(DType::F32);
    let steps_total = batches.len() * (c.n_blocks + 1);
    let mut report = PerplexityReport { nll_sum: 0.0, tokens_scored: 0, windows: windows.windows.len() };
    let mut steps_done = 0;
    for batch in batches {
        let seq_len = batch[0].0.len();
        let ids: Vec<u32> = batch.iter().flat_map(|(i, _)| i.iter().copied()).collect();
        let mut x = ops::embedding(&embed, &ids, DType::F32)?;
        for block_idx in 0..c.n_blocks {
            let weights = checkpoint.load_block(block_idx)?.into_dtype(DType::F32);
            x = block_forward(&x, &weights, &shape, seq_len, false)?.0;
            steps_done += 1;
            progress(EvalProgress { steps_done, steps_total, tokens_scored: report.tokens_scored });
        }
        let x = ops::rms_norm(&x, &final_norm, shape.rms_norm_eps)?;
        for (w, (_, targets)) in batch.iter().enumerate() {
            let rows = x.rows(w * seq_len, w * seq_len + targets.len())?;
            let logits = ops::linear(&rows, &lm_head, None)?;
            report.nll_sum += ops::nll_sum(&logits, targets)?;
            report.tokens_scored += targets.len();
        }
        steps_done += 1;
        progress(EvalProgress { steps_done, steps_total, tokens_scored: report.tokens_scored });
    }
    Ok(report)
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
