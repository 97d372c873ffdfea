//! Scoring text on the model runner: what `awq eval ppl` and `awq eval kl` compute.
//!
//! The caller cuts the text into windows (`awq_worker::Windows`, check-model.py's rule): each window
//! is one sequence, `(input ids, target ids)`, whose logits at positions `0..targets.len()` predict
//! its targets. [`EvalSchedule`] packs the windows, in order, into steps of at most
//! `max_step_tokens` computed positions: a window that does not fit in what is left of a step is cut
//! there and continues in the next one (a prefill chunk; its earlier positions are already in the
//! KV cache), and every computed position that scores a target is asked for through the plan's
//! `prompt_logprob_positions`. A window takes fresh KV blocks at its first chunk and gives them back
//! after the step of its last, so the cache holds only the windows one step touches
//! ([`EvalSchedule::n_cache_blocks`]; load the runner with that many). The steps are plain
//! [`StepPlan`]s, so the same plans can run on two runners ([`kl_divergence`]).
//!
//! [`perplexity`] sums each target's negative log-likelihood, log-softmax in f64 ([`PerplexityReport`]);
//! [`kl_divergence`] runs every step on a quantized model's runner and on its reference's, and per
//! scored position computes `KL(P_ref || P_quant) = sum_v p_ref(v) (log p_ref(v) - log p_quant(v))` of
//! the next-token distributions in f64 ([`KlReport`], with both models' perplexities from the same
//! rows). Both models stay loaded and go through the text step by step: storing the reference's
//! log-probabilities instead would take `vocab x tokens x 4` bytes (800 MB for SmolLM2's 49152-token
//! vocabulary over 4096 tokens).
//!
//! Per-row values are computed in parallel and added in row order, so results do not depend on the
//! thread count; they depend on the plans only at the level of f32 rounding (the runner's logits are
//! the same whether a window is computed whole or in chunks, within 1e-4), and the plans depend only
//! on the windows, the block size and the vocabulary ([`step_tokens`]). Not here: tokenization,
//! windowing, devices (the runner's).

use std::ops::Range;

use rayon::prelude::*;

use crate::kv_cache::BlockId;
use crate::runner::{ModelRunner, StepLogits};
use crate::scheduler::{ScheduledSeq, StepPlan};
use crate::{Error, RequestId, Result};

/// Bytes of f32 logits one step may return per runner. The runner returns every scored row's logits
/// at once (and the LM head's output is copied once more on the way), so this bounds the step's
/// memory on top of the weights: 256 MiB is 1365 rows of SmolLM2's 49152-token vocabulary, 523 of
/// Llama 3's 128256.
const LOGITS_BYTES_PER_STEP: usize = 256 << 20;

/// At most this many positions per step, whatever the vocabulary: beyond it the GEMMs are as
/// efficient and only the activations grow.
const MAX_STEP_TOKENS: usize = 8192;

/// Positions per step for a model with `vocab_size` tokens: what [`LOGITS_BYTES_PER_STEP`] of logits
/// allows, between 16 and 8192. `awq eval ppl` and `awq eval kl` both use this, so that they run the
/// same plans and report the same perplexity for a model.
pub fn step_tokens(vocab_size: usize) -> usize {
    (LOGITS_BYTES_PER_STEP / (vocab_size.max(1) * 4)).clamp(16, MAX_STEP_TOKENS)
}

/// A window's share of one step.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Piece {
    window: usize,
    positions: Range<usize>,
}

/// The windows of a text cut into step plans, with the KV blocks each window uses (module docs).
#[derive(Clone, Debug)]
pub struct EvalSchedule<'a> {
    windows: &'a [(Vec<u32>, Vec<u32>)],
    steps: Vec<Vec<Piece>>,
    /// Per window: its block table, covering its whole input.
    tables: Vec<Vec<BlockId>>,
    block_size: usize,
    n_cache_blocks: usize,
}

impl<'a> EvalSchedule<'a> {
    /// Plans `windows` (input ids, target ids; `1 <= targets.len() <= inputs.len()`) in steps of at
    /// most `max_step_tokens` positions over a cache of blocks of `block_size` tokens. Errors:
    /// `InvalidConfig` naming the window or the setting that is out of range.
    pub fn new(windows: &'a [(Vec<u32>, Vec<u32>)], block_size: usize, max_step_tokens: usize) -> Result<Self> {
        let bad = |field, expected: String, got: usize| Error::InvalidConfig { field, expected, got: got.to_string() };
        if block_size == 0 {
            return Err(bad("block_size", "at least 1".into(), 0));
        }
        if max_step_tokens == 0 {
            return Err(bad("max_step_tokens", "at least 1".into(), 0));
        }
        if windows.is_empty() {
            return Err(bad("windows", "at least one window".into(), 0));
        }
        for (w, (input, targets)) in windows.iter().enumerate() {
            if targets.is_empty() || targets.len() > input.len() {
                let expected = format!("window {w}'s targets: between 1 and its {} input tokens", input.len());
                return Err(bad("windows", expected, targets.len()));
            }
        }

        let mut steps = Vec::new();
        let mut step = Vec::new();
        let mut room = max_step_tokens;
        for (window, (input, _)) in windows.iter().enumerate() {
            let mut start = 0;
            while start < input.len() {
                let n = room.min(input.len() - start);
                step.push(Piece { window, positions: start..start + n });
                start += n;
                room -= n;
                if room == 0 {
                    steps.push(std::mem::take(&mut step));
                    room = max_step_tokens;
                }
            }
        }
        if !step.is_empty() {
            steps.push(step);
        }

        // Blocks: taken at a window's first chunk, given back after the step of its last (not at
        // once: a window later in the same step would overwrite K and V that this step still reads).
        let mut tables = vec![Vec::new(); windows.len()];
        let mut free: Vec<BlockId> = Vec::new();
        let mut n_cache_blocks = 0u32;
        for step in &steps {
            let mut finished = Vec::new();
            for piece in step {
                let len = windows[piece.window].0.len();
                if piece.positions.start == 0 {
                    tables[piece.window] = (0..len.div_ceil(block_size))
                        .map(|_| {
                            free.pop().unwrap_or_else(|| {
                                n_cache_blocks += 1;
                                BlockId(n_cache_blocks - 1)
                            })
                        })
                        .collect();
                }
                if piece.positions.end == len {
                    finished.push(piece.window);
                }
            }
            for w in finished {
                free.extend(tables[w].iter().rev());
            }
        }
        Ok(EvalSchedule { windows, steps, tables, block_size, n_cache_blocks: n_cache_blocks as usize })
    }

    /// KV blocks the runner's cache needs: the most that the windows of one step hold at once.
    pub fn n_cache_blocks(&self) -> usize {
        self.n_cache_blocks
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn n_steps(&self) -> usize {
        self.steps.len()
    }

    pub fn n_windows(&self) -> usize {
        self.windows.len()
    }

    /// Target tokens over all windows.
    pub fn tokens_scored(&self) -> usize {
        self.windows.iter().map(|(_, t)| t.len()).sum()
    }

    /// Positions computed over all windows (inputs, scored or not).
    pub fn tokens_computed(&self) -> usize {
        self.windows.iter().map(|(i, _)| i.len()).sum()
    }

    /// The plan of step `step` (`< n_steps()`): one sequence per window piece, request id = the
    /// window's index, nothing sampled, every position that scores a target asked for.
    pub fn plan(&self, step: usize) -> StepPlan {
        let seqs: Vec<ScheduledSeq> = self.steps[step]
            .iter()
            .map(|piece| {
                let (input, targets) = &self.windows[piece.window];
                let p = &piece.positions;
                ScheduledSeq {
                    id: RequestId(piece.window as u64),
                    positions: p.clone(),
                    token_ids: input[p.clone()].to_vec(),
                    block_table: self.tables[piece.window].clone(),
                    sample: false,
                    prompt_logprob_positions: p.start.min(targets.len())..p.end.min(targets.len()),
                }
            })
            .collect();
        StepPlan { n_tokens: seqs.iter().map(|s| s.positions.len()).sum(), seqs, preempted: Vec::new() }
    }

    /// `(row of logits, target token)` of every position `plan` scores, in text order, as `logits`
    /// (what the runner returned for `plan`) lays them out.
    fn scored_rows(&self, plan: &StepPlan, logits: &StepLogits) -> Result<Vec<(usize, u32)>> {
        if logits.seqs.len() != plan.seqs.len() {
            let id = plan.seqs.first().map_or(RequestId(0), |s| s.id);
            return Err(Error::StepResultMismatch {
                id,
                problem: "the runner returned logits for another number of sequences",
            });
        }
        let mut rows = Vec::new();
        for (seq, seq_logits) in plan.seqs.iter().zip(&logits.seqs) {
            let scoring = &seq.prompt_logprob_positions;
            if seq_logits.prompt_rows.len() != scoring.len() {
                return Err(Error::StepResultMismatch {
                    id: seq.id,
                    problem: "the runner returned another number of prompt rows",
                });
            }
            let targets = &self.windows[seq.id.0 as usize].1;
            rows.extend(seq_logits.prompt_rows.clone().zip(&targets[scoring.clone()]).map(|(r, &t)| (r, t)));
        }
        Ok(rows)
    }

    /// Refuses a runner whose cache does not fit these plans, a window longer than its positions, or a
    /// window token outside its vocabulary.
    fn check_runner(&self, runner: &ModelRunner) -> Result<()> {
        if runner.block_size() != self.block_size {
            let expected = format!("{} (the schedule's)", self.block_size);
            return Err(Error::InvalidConfig { field: "block_size", expected, got: runner.block_size().to_string() });
        }
        if runner.n_cache_blocks() < self.n_cache_blocks {
            let expected = format!("at least {} (what the schedule's steps hold at once)", self.n_cache_blocks);
            return Err(Error::InvalidConfig {
                field: "n_cache_blocks",
                expected,
                got: runner.n_cache_blocks().to_string(),
            });
        }
        let longest = self.windows.iter().map(|(input, _)| input.len()).max().unwrap_or(0);
        if longest > runner.max_positions() {
            let expected = format!("at most {} (the positions the model's RoPE table covers)", runner.max_positions());
            return Err(Error::InvalidConfig { field: "window length", expected, got: longest.to_string() });
        }
        let vocab_size = runner.vocab_size();
        // A target sits one position after the input it is predicted from (window docs).
        for (input, targets) in self.windows {
            let inputs = input.iter().enumerate();
            let targets = targets.iter().enumerate().map(|(i, t)| (i + 1, t));
            if let Some((index, &token)) = inputs.chain(targets).find(|(_, &t)| t as usize >= vocab_size) {
                return Err(Error::TokenOutOfVocabulary { index, token, vocab_size });
            }
        }
        Ok(())
    }
}

/// Where a run is, for progress bars.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EvalProgress {
    pub steps_done: usize,
    pub steps_total: usize,
    pub tokens_scored: usize,
}

/// Perplexity of one model over the windows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PerplexityReport {
    /// Sum over scored tokens of `-log p(target)`, in nats.
    pub nll_sum: f64,
    pub tokens_scored: usize,
    pub windows: usize,
}

impl PerplexityReport {
    /// `exp(nll_sum / tokens_scored)`.
    pub fn perplexity(&self) -> f64 {
        (self.nll_sum / self.tokens_scored as f64).exp()
    }
}

/// `log sum_v exp(row[v])` in f64, shifted by the row's maximum. Plain loops rather than iterator
/// chains: this crate is not optimised in the dev profile, where a chain of closures per logit
/// costs several times the loop (tests score thousands of rows of 49152 logits).
fn log_sum_exp(row: &[f32]) -> f64 {
    let mut max = f64::NEG_INFINITY;
    for &x in row {
        if x as f64 > max {
            max = x as f64;
        }
    }
    let mut sum = 0.0;
    for &x in row {
        sum += (x as f64 - max).exp();
    }
    max + sum.ln()
}

/// `-log softmax(row)[target]` in f64.
fn nll(row: &[f32], target: u32) -> f64 {
    log_sum_exp(row) - row[target as usize] as f64
}

/// `KL(P || Q) = sum_v p(v) (log p(v) - log q(v))` for `P = softmax(p_row)`, `Q = softmax(q_row)`, in
/// f64; exactly 0 when the rows are equal (every term is 0).
fn kl_row(p_row: &[f32], q_row: &[f32]) -> f64 {
    let (lse_p, lse_q) = (log_sum_exp(p_row), log_sum_exp(q_row));
    let mut kl = 0.0;
    for (&a, &b) in p_row.iter().zip(q_row) {
        let log_p = a as f64 - lse_p;
        let p = log_p.exp();
        // A token with p = 0 adds nothing (and would give 0 * inf if q also underflowed).
        if p != 0.0 {
            kl += p * (log_p - (b as f64 - lse_q));
        }
    }
    kl
}

/// The first non-finite value of `values` as an error naming the scored token's index in text order.
fn check_finite(values: &[f64], first_token: usize, what: &'static str) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::InvalidLogits { index: first_token + i, problem: what }),
    }
}

/// Perplexity of the model in `runner` over `schedule`'s windows, reporting progress after every
/// step. The runner must have been loaded with the schedule's block size and at least its
/// `n_cache_blocks` (else `InvalidConfig`). Errors: the runner's; `InvalidLogits` when a row's
/// log-likelihood is not finite (NaN or infinite logits).
pub fn perplexity(
    runner: &mut ModelRunner,
    schedule: &EvalSchedule<'_>,
    mut progress: impl FnMut(EvalProgress),
) -> Result<PerplexityReport> {
    schedule.check_runner(runner)?;
    let mut report = PerplexityReport { nll_sum: 0.0, tokens_scored: 0, windows: schedule.n_windows() };
    for step in 0..schedule.n_steps() {
        let plan = schedule.plan(step);
        let logits = runner.execute(&plan)?;
        let rows = schedule.scored_rows(&plan, &logits)?;
        let nlls: Vec<f64> = rows.par_iter().map(|&(r, t)| nll(logits.row(r), t)).collect();
        check_finite(&nlls, report.tokens_scored, "the log-likelihood of the target is not finite")?;
        report.nll_sum += nlls.iter().sum::<f64>();
        report.tokens_scored += nlls.len();
        progress(EvalProgress {
            steps_done: step + 1,
            steps_total: schedule.n_steps(),
            tokens_scored: report.tokens_scored,
        });
    }
    Ok(report)
}

/// What [`kl_divergence`] measured.
#[derive(Clone, Debug, PartialEq)]
pub struct KlReport {
    /// `KL(P_ref || P_quant)` in nats, per scored token in text order.
    pub per_token: Vec<f64>,
    pub quantized: PerplexityReport,
    pub reference: PerplexityReport,
}

/// Mean, median, 99th percentile and maximum of the per-token KL divergences, in nats.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KlSummary {
    pub mean: f64,
    pub median: f64,
    pub p99: f64,
    pub max: f64,
}

impl KlReport {
    pub fn summary(&self) -> KlSummary {
        let mut sorted = self.per_token.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        KlSummary {
            mean: sorted.iter().sum::<f64>() / n as f64,
            median: quantile(&sorted, 0.5),
            p99: quantile(&sorted, 0.99),
            max: sorted.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// The `q` quantile of ascending `sorted` values, interpolating linearly between the two nearest
/// ranks (numpy.quantile's default); NaN when empty.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let at = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (at - lo as f64)
}

/// KL divergence of `quantized`'s next-token distributions from `reference`'s over `schedule`'s
/// windows (module docs), and both perplexities, reporting progress after every step. Both runners
/// run every plan; they must share the vocabulary (else `InvalidConfig` naming `vocab_size`) and
/// fit the schedule as for [`perplexity`]. Errors: the runners'; `InvalidLogits` when a value is
/// not finite.
pub fn kl_divergence(
    quantized: &mut ModelRunner,
    reference: &mut ModelRunner,
    schedule: &EvalSchedule<'_>,
    mut progress: impl FnMut(EvalProgress),
) -> Result<KlReport> {
    if quantized.vocab_size() != reference.vocab_size() {
        let expected = format!("{} (the reference model's)", reference.vocab_size());
        return Err(Error::InvalidConfig { field: "vocab_size", expected, got: quantized.vocab_size().to_string() });
    }
    schedule.check_runner(quantized)?;
    schedule.check_runner(reference)?;
    let windows = schedule.n_windows();
    let mut report = KlReport {
        per_token: Vec::with_capacity(schedule.tokens_scored()),
        quantized: PerplexityReport { nll_sum: 0.0, tokens_scored: 0, windows },
        reference: PerplexityReport { nll_sum: 0.0, tokens_scored: 0, windows },
    };
    for step in 0..schedule.n_steps() {
        let plan = schedule.plan(step);
        let q_logits = quantized.execute(&plan)?;
        let p_logits = reference.execute(&plan)?;
        let q_rows = schedule.scored_rows(&plan, &q_logits)?;
        // Same plan, same layout: the reference's rows are the quantized model's.
        if schedule.scored_rows(&plan, &p_logits)? != q_rows {
            let id = plan.seqs.first().map_or(RequestId(0), |s| s.id);
            return Err(Error::StepResultMismatch {
                id,
                problem: "the two runners laid out a step's logits differently",
            });
        }
        let per_row: Vec<(f64, f64, f64)> = q_rows
            .par_iter()
            .map(|&(r, t)| {
                let (p_row, q_row) = (p_logits.row(r), q_logits.row(r));
                (kl_row(p_row, q_row), nll(q_row, t), nll(p_row, t))
            })
            .collect();
        let first = report.per_token.len();
        let (kl, (q_nll, p_nll)): (Vec<f64>, (Vec<f64>, Vec<f64>)) =
            per_row.into_iter().map(|(k, q, p)| (k, (q, p))).unzip();
        check_finite(&kl, first, "KL divergence is not finite")?;
        check_finite(&q_nll, first, "the quantized model's log-likelihood of the target is not finite")?;
        check_finite(&p_nll, first, "the reference model's log-likelihood of the target is not finite")?;
        report.per_token.extend(&kl);
        report.quantized.nll_sum += q_nll.iter().sum::<f64>();
        report.reference.nll_sum += p_nll.iter().sum::<f64>();
        report.quantized.tokens_scored += q_nll.len();
        report.reference.tokens_scored += p_nll.len();
        progress(EvalProgress {
            steps_done: step + 1,
            steps_total: schedule.n_steps(),
            tokens_scored: report.per_token.len(),
        });
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use awq_kernels::rng::SplitMix64;
    use awq_kernels::{ops, Device, Tensor};
    use awq_model::synthetic::{write_checkpoint, SyntheticSpec};
    use awq_model::Checkpoint;

    use super::*;

    /// Windows of random tokens: lengths `lens`, each scoring all but its last position (as windows
    /// without BOS do), the last one scoring two fewer.
    fn windows(lens: &[usize], vocab: usize, seed: u64) -> Vec<(Vec<u32>, Vec<u32>)> {
        let mut rng = SplitMix64::new(seed);
        let n = lens.len();
        lens.iter()
            .enumerate()
            .map(|(i, &len)| {
                let ids: Vec<u32> = (0..len + 1).map(|_| rng.below(vocab) as u32).collect();
                let scored = if i + 1 == n { len.saturating_sub(2).max(1) } else { len };
                (ids[..len].to_vec(), ids[1..scored + 1].to_vec())
            })
            .collect()
    }

    #[test]
    fn schedule_covers_every_position_once_and_never_shares_a_block_within_a_step() {
        let ws = windows(&[7, 7, 7, 3, 12, 1], 50, 1);
        for (block_size, max_step_tokens) in [(4, 5), (4, 100), (1, 1), (16, 7), (3, 12)] {
            let s = EvalSchedule::new(&ws, block_size, max_step_tokens).unwrap();
            let mut next = vec![0usize; ws.len()];
            let mut scored = vec![0usize; ws.len()];
            for step in 0..s.n_steps() {
                let plan = s.plan(step);
                assert!(plan.n_tokens <= max_step_tokens && plan.n_tokens > 0);
                let mut blocks = std::collections::HashSet::new();
                for seq in &plan.seqs {
                    let w = seq.id.0 as usize;
                    assert_eq!(seq.positions.start, next[w], "window {w} continues where it stopped");
                    next[w] = seq.positions.end;
                    assert_eq!(seq.token_ids, ws[w].0[seq.positions.clone()]);
                    assert!(seq.block_table.len() * block_size >= ws[w].0.len());
                    assert!(seq.block_table.iter().all(|b| (b.0 as usize) < s.n_cache_blocks()));
                    assert!(seq.block_table.iter().all(|b| blocks.insert(*b)), "a block shared in step {step}");
                    let p = &seq.prompt_logprob_positions;
                    assert!(p.start >= seq.positions.start && p.end <= seq.positions.end || p.is_empty());
                    assert_eq!(p.start, scored[w].max(seq.positions.start).min(ws[w].1.len()));
                    scored[w] = scored[w].max(p.end);
                }
            }
            assert_eq!(next, ws.iter().map(|(i, _)| i.len()).collect::<Vec<_>>());
            assert_eq!(scored, ws.iter().map(|(_, t)| t.len()).collect::<Vec<_>>());
        }
        // One window per step, blocks reused: the cache needs only the largest window's.
        let s = EvalSchedule::new(&ws[..3], 4, 7).unwrap();
        assert_eq!((s.n_steps(), s.n_cache_blocks()), (3, 2));
    }

    #[test]
    fn schedule_refuses_what_it_cannot_plan() {
        let ws = windows(&[5], 10, 2);
        assert!(matches!(EvalSchedule::new(&ws, 0, 4), Err(Error::InvalidConfig { field: "block_size", .. })));
        assert!(matches!(EvalSchedule::new(&ws, 4, 0), Err(Error::InvalidConfig { field: "max_step_tokens", .. })));
        assert!(matches!(EvalSchedule::new(&[], 4, 4), Err(Error::InvalidConfig { field: "windows", .. })));
        let too_many = vec![(vec![1, 2], vec![2, 3, 4])];
        assert!(matches!(EvalSchedule::new(&too_many, 4, 4), Err(Error::InvalidConfig { field: "windows", .. })));
    }

    #[test]
    fn kl_and_nll_against_direct_formulas() {
        let p = [1.0f32, -2.0, 0.5, 3.0];
        let q = [0.5f32, -1.0, 0.5, 2.0];
        let softmax = |r: &[f32]| {
            let z: f64 = r.iter().map(|&x| (x as f64).exp()).sum();
            r.iter().map(|&x| (x as f64).exp() / z).collect::<Vec<_>>()
        };
        let (sp, sq) = (softmax(&p), softmax(&q));
        let want: f64 = sp.iter().zip(&sq).map(|(a, b)| a * (a / b).ln()).sum();
        assert!((kl_row(&p, &q) - want).abs() < 1e-12, "{} vs {want}", kl_row(&p, &q));
        assert_eq!(kl_row(&p, &p), 0.0);
        assert!((nll(&p, 3) + sp[3].ln()).abs() < 1e-12);
        // Far-apart logits do not overflow.
        assert!((nll(&[1000.0, 0.0], 0) - (1.0 + (-1000f64).exp()).ln()).abs() < 1e-12);
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.5);
        assert_eq!(quantile(&[5.0], 0.99), 5.0);
        assert!((quantile(&[0.0, 10.0], 0.99) - 9.9).abs() < 1e-12);
    }

    fn runner(dir: &std::path::Path, schedule: &EvalSchedule<'_>) -> ModelRunner {
        let ck = Checkpoint::open(dir).unwrap();
        ModelRunner::load(&ck, &[Device::Cpu], 1, schedule.block_size(), schedule.n_cache_blocks()).unwrap()
    }

    /// On a synthetic model: the perplexity does not depend on how windows are cut into steps
    /// (whole, batched, in chunks across steps), equals each window computed alone with
    /// `ops::nll_sum`, and KL of a model against itself is exactly 0, against another model positive.
    #[test]
    fn perplexity_and_kl_on_a_synthetic_model() {
        let spec = SyntheticSpec::tiny_llama();
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &spec).unwrap();
        let vocab = Checkpoint::open(dir.path()).unwrap().config().vocab_size;
        let ws = windows(&[19, 19, 19, 6], vocab, 3);

        let whole = EvalSchedule::new(&ws, 4, 1000).unwrap();
        let want = perplexity(&mut runner(dir.path(), &whole), &whole, |_| {}).unwrap();
        assert_eq!((want.tokens_scored, want.windows), (19 * 3 + 4, 4));
        let mut direct = 0.0;
        let mut alone_runner = runner(dir.path(), &EvalSchedule::new(&ws[..1], 4, 1000).unwrap());
        for w in &ws {
            let one = std::slice::from_ref(w);
            let s = EvalSchedule::new(one, 4, 1000).unwrap();
            let logits = alone_runner.execute(&s.plan(0)).unwrap();
            let rows = Tensor::from_f32(&[w.1.len(), vocab], logits.logits).unwrap();
            direct += ops::nll_sum(&rows, &w.1).unwrap();
        }
        assert!((want.nll_sum - direct).abs() < 1e-9 * direct, "{} vs {direct}", want.nll_sum);

        let mut steps_seen = 0;
        for max_step_tokens in [5, 19, 24] {
            let s = EvalSchedule::new(&ws, 4, max_step_tokens).unwrap();
            let got = perplexity(&mut runner(dir.path(), &s), &s, |p| steps_seen = p.steps_done).unwrap();
            assert_eq!(steps_seen, s.n_steps());
            let e = (got.nll_sum - want.nll_sum).abs() / want.nll_sum;
            assert!(
                e < 1e-6,
                "{max_step_tokens} positions per step: nll {} vs {} (relative {e})",
                got.nll_sum,
                want.nll_sum
            );
        }

        let s = EvalSchedule::new(&ws, 4, 24).unwrap();
        let same = kl_divergence(&mut runner(dir.path(), &s), &mut runner(dir.path(), &s), &s, |_| {}).unwrap();
        assert_eq!(same.per_token.len(), want.tokens_scored);
        assert!(same.per_token.iter().all(|&k| k == 0.0), "{:?}", same.summary());
        assert_eq!(same.quantized, same.reference);
        let alone = perplexity(&mut runner(dir.path(), &s), &s, |_| {}).unwrap();
        assert_eq!(same.quantized, alone, "kl's perplexity is ppl's, bit for bit");

        let other_dir = tempfile::tempdir().unwrap();
        write_checkpoint(other_dir.path(), &SyntheticSpec { seed: spec.seed + 1, ..spec }).unwrap();
        let kl = kl_divergence(&mut runner(other_dir.path(), &s), &mut runner(dir.path(), &s), &s, |_| {}).unwrap();
        let sum = kl.summary();
        assert!(kl.per_token.iter().all(|&k| k > 0.0), "{sum:?}");
        assert!(sum.max >= sum.p99 && sum.p99 >= sum.median && sum.mean > 0.0, "{sum:?}");
        assert_eq!(kl.reference, alone);
    }
}
