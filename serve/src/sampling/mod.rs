//! Choosing the next token from one sequence's logits, on the CPU.
//!
//! [`SamplingParams`] (checked once, [`params`]) configure a [`Sampler`], one per request, which
//! remembers the tokens the penalties look at and owns the request's RNG (seeded from `seed`: same
//! seed, same logits, same tokens). [`Sampler::sample`] follows vLLM v1's `sampler.py` order:
//! logprobs of the raw logits (vLLM's default `raw_logprobs`: before penalties and temperature;
//! [`LogprobsMode::Penalized`] takes them after penalties), then penalties (repetition: HF/vLLM,
//! positive logits divided and negative multiplied, over prompt + output tokens; frequency and
//! presence: OpenAI, subtracted over output tokens), then either greedy argmax (lowest index on
//! ties) or temperature, min-p, top-k, top-p and one draw. Probabilities are computed in f64 from
//! the f32 logits. This is the reference the device sampler (later, beside the model runner) is
//! tested against; it knows no tensors, devices or tokenizer.

pub mod params;

use std::collections::{HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub use params::{RawSamplingParams, SamplingParams, MAX_TOP_LOGPROBS};

use crate::{Error, Result};

/// One token with its log-probability.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
}

/// What [`Sampler::sample`] chose.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub token: u32,
    /// The chosen token's logprob, when the request asked for logprobs.
    pub logprob: Option<f32>,
    /// The `top_logprobs` most likely tokens, most likely first (ties: lower id first).
    pub top_logprobs: Vec<TokenLogprob>,
}

/// Which logits the reported logprobs come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogprobsMode {
    /// The model's logits as they are (vLLM v1's default): what `echo` scoring and evaluation need.
    #[default]
    Raw,
    /// After the penalties, before temperature (vLLM v0 reported these, after temperature too).
    Penalized,
}

/// The sampler of one request (see the module docs).
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    mode: LogprobsMode,
    rng: StdRng,
    /// Prompt and output tokens: the repetition penalty's set.
    seen: HashSet<u32>,
    /// Output tokens and how often each was sampled: frequency and presence penalties.
    output_counts: HashMap<u32, u32>,
}

impl Sampler {
    /// A sampler for a request with `prompt`; its RNG is seeded from `params.seed()` or, without a
    /// seed, from the operating system.
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Sampler {
        let rng = match params.seed() {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        let seen = if params.repetition_penalty() != 1.0 { prompt.iter().copied().collect() } else { HashSet::new() };
        Sampler { params, mode: LogprobsMode::Raw, rng, seen, output_counts: HashMap::new() }
    }

    pub fn with_logprobs_mode(mut self, mode: LogprobsMode) -> Sampler {
        self.mode = mode;
        self
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Chooses the next token from `logits` (one per vocabulary entry) and records it as output.
    /// Error: `InvalidLogits` for a NaN or +inf entry, or when every entry is -inf.
    pub fn sample(&mut self, logits: &[f32]) -> Result<Sample> {
        check_logits(logits)?;
        let mut work = logits.to_vec();
        self.apply_penalties(&mut work);
        let logprob_source = match self.mode {
            LogprobsMode::Raw => logits,
            LogprobsMode::Penalized => &work,
        };
        let token = if self.params.is_greedy() {
            argmax(&work)
        } else {
            let candidates = candidates(&work, &self.params);
            draw(&candidates, self.rng.random::<f64>())
        };
        let (logprob, top_logprobs) = match self.params.logprobs() {
            None => (None, Vec::new()),
            Some(n) => {
                let (lp, top) = score_token(logprob_source, token, n)?;
                (Some(lp), top)
            }
        };
        self.record_output(token);
        Ok(Sample { token, logprob, top_logprobs })
    }

    /// Whether this request's next token is just the argmax of its raw logits (greedy, no
    /// penalties, no logprobs): then the runner may pick it where the logits are
    /// ([`Sampler::take_argmax`]) instead of handing over the row.
    pub fn picks_argmax(&self) -> bool {
        self.params.is_greedy() && !self.params.has_penalties() && self.params.logprobs().is_none()
    }

    /// The sample for a token the runner picked as the argmax (see [`Sampler::picks_argmax`]);
    /// `awq_kernels::ops::NOT_FINITE` (or any id past the vocabulary) means the row held a NaN or
    /// an infinity, the error [`Sampler::sample`] reports for such logits.
    pub fn take_argmax(&mut self, token: u32, vocab_size: usize) -> Result<Sample> {
        if token as usize >= vocab_size {
            return Err(Error::InvalidLogits { index: 0, problem: "NaN or infinity (found by the device argmax)" });
        }
        self.record_output(token);
        Ok(Sample { token, logprob: None, top_logprobs: Vec::new() })
    }

    /// Counts `token` as generated output for the penalties.
    pub(crate) fn record_output(&mut self, token: u32) {
        *self.output_counts.entry(token).or_insert(0) += 1;
        if self.params.repetition_penalty() != 1.0 {
            self.seen.insert(token);
        }
    }

    /// Repetition penalty over prompt + output, then frequency and presence over output. Each token
    /// is adjusted on its own, so the set's iteration order does not matter. Ids beyond the
    /// vocabulary (a prompt from another tokenizer) are skipped.
    pub(crate) fn apply_penalties(&self, work: &mut [f32]) {
        let rp = self.params.repetition_penalty();
        if rp != 1.0 {
            for &t in &self.seen {
                if let Some(l) = work.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / rp } else { *l * rp };
                }
            }
        }
        let (fp, pp) = (self.params.frequency_penalty(), self.params.presence_penalty());
        if fp != 0.0 || pp != 0.0 {
            for (&t, &count) in &self.output_counts {
                if let Some(l) = work.get_mut(t as usize) {
                    *l -= fp * count as f32 + pp;
                }
            }
        }
    }
}

/// The logprob of `token` under `logits` (log-softmax) and the `top_n` most likely tokens: what a
/// sampled token reports, and what `echo` scoring reports for each prompt token.
pub fn score_token(logits: &[f32], token: u32, top_n: usize) -> Result<(f32, Vec<TokenLogprob>)> {
    check_logits(logits)?;
    let l = *logits
        .get(token as usize)
        .ok_or(Error::InvalidLogits { index: token as usize, problem: "token id beyond the vocabulary" })?;
    let lse = log_sum_exp(logits);
    let top = top_n_indices(logits, top_n)
        .into_iter()
        .map(|t| TokenLogprob { token: t, logprob: (logits[t as usize] as f64 - lse) as f32 })
        .collect();
    Ok(((l as f64 - lse) as f32, top))
}

fn check_logits(logits: &[f32]) -> Result<()> {
    if let Some(index) = logits.iter().position(|l| l.is_nan() || *l == f32::INFINITY) {
        return Err(Error::InvalidLogits { index, problem: "NaN or +inf" });
    }
    if !logits.iter().any(|l| l.is_finite()) {
        return Err(Error::InvalidLogits { index: 0, problem: "no finite logit (empty, or all -inf)" });
    }
    Ok(())
}

/// log(sum(exp(l))) in f64, shifted by the maximum so nothing overflows.
fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    max + sum.ln()
}

/// The first index of the largest value.
fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Indices of the `n` largest values, largest first, lower index first among equals.
fn top_n_indices(values: &[f32], n: usize) -> Vec<u32> {
    let by_rank = |a: &u32, b: &u32| values[*b as usize].total_cmp(&values[*a as usize]).then(a.cmp(b));
    let mut idx: Vec<u32> = (0..values.len() as u32).collect();
    let n = n.min(idx.len());
    if n == 0 {
        return Vec::new();
    }
    if n < idx.len() {
        idx.select_nth_unstable_by(n - 1, by_rank);
        idx.truncate(n);
    }
    idx.sort_unstable_by(by_rank);
    idx
}

/// The distribution sampling draws from, as (token, probability) pairs summing to 1: softmax of
/// `work / temperature`, then min-p (drop p < min_p * max p), top-k (keep values at least the k-th
/// largest: ties at the boundary stay, as vLLM), top-p (keep the most likely tokens while the mass
/// before them is below top_p, at least one). Order: by token id, or most likely first when top-p
/// sorted them; drawing walks it, so it is part of the seeded result.
pub(crate) fn candidates(work: &[f32], params: &SamplingParams) -> Vec<(u32, f64)> {
    let t = params.temperature() as f64;
    let max = work.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    // Weights relative to the most likely token (weight 1), so min-p compares weights directly.
    let min_p = params.min_p() as f64;
    let mut c: Vec<(u32, f64)> = work
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l as f64 - max) / t).exp()))
        .filter(|&(_, w)| w > 0.0 && w >= min_p)
        .collect();
    if let Some(k) = params.top_k().filter(|&k| k < c.len()) {
        let mut weights: Vec<f64> = c.iter().map(|&(_, w)| w).collect();
        let (_, kth, _) = weights.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        let kth = *kth;
        c.retain(|&(_, w)| w >= kth);
    }
    if params.top_p() < 1.0 {
        c.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let limit = params.top_p() as f64 * c.iter().map(|&(_, w)| w).sum::<f64>();
        let mut before = 0.0;
        let keep = c
            .iter()
            .take_while(|&&(_, w)| {
                let inside = before < limit;
                before += w;
                inside
            })
            .count();
        c.truncate(keep.max(1));
    }
    let total: f64 = c.iter().map(|&(_, w)| w).sum();
    c.iter_mut().for_each(|(_, w)| *w /= total);
    c
}

/// The candidate where the cumulative probability first exceeds `u` in [0, 1).
fn draw(candidates: &[(u32, f64)], u: f64) -> u32 {
    let mut cumulative = 0.0;
    for &(token, p) in candidates {
        cumulative += p;
        if u < cumulative {
            return token;
        }
    }
    // Rounding left the sum a hair below u.
    candidates.last().expect("at least the most likely token is a candidate").0
}

#[cfg(test)]
mod tests;
