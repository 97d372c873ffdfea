//! Sampling parameters: the raw values a request brings, checked once into [`SamplingParams`].
//!
//! [`RawSamplingParams`] holds what the gateway parsed from the JSON body, with wide types (f64,
//! i64) so that a value out of range gets our error naming the OpenAI field, the accepted range and
//! the value ("temperature must be in [0, 2], got 3"), as TGI's `validation.rs` does, rather than a
//! JSON type error. [`SamplingParams::new`] is the only way to a `SamplingParams`, so everything
//! after it (sampler, detokenizer, scheduler limits) takes valid values. Ranges are OpenAI's where
//! OpenAI has the field, vLLM's for its extensions (top_k, min_p, repetition_penalty,
//! stop_token_ids, ignore_eos). Not here: the vocabulary (token ids are checked by the runner,
//! which knows its size), the model length (see [`SamplingParams::max_new_tokens`]).

use crate::{Error, Result, StopCause};

/// The most `top_logprobs` a request may ask for (OpenAI's limit; vLLM's default cap).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Below this temperature, sampling is greedy (vLLM's `_SAMPLING_EPS`).
pub const GREEDY_TEMPERATURE: f32 = 1e-5;

/// Sampling fields as a request gave them; `None` means the default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RawSamplingParams {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub max_tokens: Option<i64>,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Return the sampled token's logprob (chat's `logprobs: true`; completions' `logprobs: n`
    /// sets this and `top_logprobs = n`).
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
}

/// Checked sampling parameters of one request (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    temperature: f32,
    top_p: f32,
    top_k: Option<usize>,
    min_p: f32,
    seed: Option<u64>,
    presence_penalty: f32,
    frequency_penalty: f32,
    repetition_penalty: f32,
    max_tokens: Option<usize>,
    stop: Vec<String>,
    stop_token_ids: Vec<u32>,
    ignore_eos: bool,
    logprobs: Option<usize>,
}

impl Default for SamplingParams {
    /// OpenAI's defaults: temperature 1, no truncation, no penalties, no limits beyond the model's.
    fn default() -> Self {
        SamplingParams::new(RawSamplingParams::default()).expect("the defaults are in range")
    }
}

/// `value` if it lies in `range`, as f32; else the error naming `field`. NaN is never in range,
/// and neither is a value whose f32 is not (1e-300 becomes 0, 1e300 infinite).
fn in_range(
    field: &str,
    value: Option<f64>,
    default: f64,
    ok: impl Fn(f64) -> bool,
    expected: &'static str,
) -> Result<f32> {
    let v = value.unwrap_or(default);
    if ok(v) && ok(v as f32 as f64) {
        Ok(v as f32)
    } else {
        Err(Error::invalid(field, expected, v))
    }
}

impl SamplingParams {
    pub fn new(raw: RawSamplingParams) -> Result<SamplingParams> {
        let temperature = in_range("temperature", raw.temperature, 1.0, |t| (0.0..=2.0).contains(&t), "in [0, 2]")?;
        let top_p = in_range("top_p", raw.top_p, 1.0, |p| p > 0.0 && p <= 1.0, "in (0, 1]")?;
        let min_p = in_range("min_p", raw.min_p, 0.0, |p| (0.0..=1.0).contains(&p), "in [0, 1]")?;
        let penalty = |field, v| in_range(field, v, 0.0, |p| (-2.0..=2.0).contains(&p), "in [-2, 2]");
        let presence_penalty = penalty("presence_penalty", raw.presence_penalty)?;
        let frequency_penalty = penalty("frequency_penalty", raw.frequency_penalty)?;
        let repetition_penalty = in_range(
            "repetition_penalty",
            raw.repetition_penalty,
            1.0,
            |r| r > 0.0 && r.is_finite(),
            "a finite number greater than 0",
        )?;
        let top_k = match raw.top_k {
            None | Some(-1) | Some(0) => None,
            Some(k) if k >= 1 => Some(usize::try_from(k).unwrap_or(usize::MAX)),
            Some(k) => return Err(Error::invalid("top_k", "-1 or 0 (disabled) or at least 1", k)),
        };
        let max_tokens = match raw.max_tokens {
            None => None,
            Some(n) if n >= 1 => Some(usize::try_from(n).unwrap_or(usize::MAX)),
            Some(n) => return Err(Error::invalid("max_tokens", "at least 1", n)),
        };
        if let Some(i) = raw.stop.iter().position(String::is_empty) {
            return Err(Error::invalid(format!("stop[{i}]"), "a non-empty string", "\"\""));
        }
        let logprobs = match (raw.logprobs, raw.top_logprobs) {
            (_, Some(n)) if !(0..=MAX_TOP_LOGPROBS as i64).contains(&n) => {
                return Err(Error::invalid("top_logprobs", "in [0, 20]", n))
            }
            (false, Some(_)) => return Err(Error::invalid("logprobs", "true when top_logprobs is set", false)),
            (false, None) => None,
            (true, n) => Some(n.unwrap_or(0) as usize),
        };
        Ok(SamplingParams {
            temperature,
            top_p,
            top_k,
            min_p,
            // Any integer is a seed; negative ones keep their bits.
            seed: raw.seed.map(|s| s as u64),
            presence_penalty,
            frequency_penalty,
            repetition_penalty,
            max_tokens,
            stop: raw.stop,
            stop_token_ids: raw.stop_token_ids,
            ignore_eos: raw.ignore_eos,
            logprobs,
        })
    }

    pub fn temperature(&self) -> f32 {
        self.temperature
    }

    /// Greedy decoding: temperature (near) 0; top-k, top-p, min-p and the seed do not matter then.
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE
    }

    pub fn top_p(&self) -> f32 {
        self.top_p
    }

    /// None: no top-k truncation.
    pub fn top_k(&self) -> Option<usize> {
        self.top_k
    }

    pub fn min_p(&self) -> f32 {
        self.min_p
    }

    pub fn seed(&self) -> Option<u64> {
        self.seed
    }

    pub fn presence_penalty(&self) -> f32 {
        self.presence_penalty
    }

    pub fn frequency_penalty(&self) -> f32 {
        self.frequency_penalty
    }

    pub fn repetition_penalty(&self) -> f32 {
        self.repetition_penalty
    }

    pub fn has_penalties(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 || self.repetition_penalty != 1.0
    }

    pub fn max_tokens(&self) -> Option<usize> {
        self.max_tokens
    }

    pub fn stop(&self) -> &[String] {
        &self.stop
    }

    pub fn stop_token_ids(&self) -> &[u32] {
        &self.stop_token_ids
    }

    pub fn ignore_eos(&self) -> bool {
        self.ignore_eos
    }

    /// These parameters unchecked again (what travels to a remote engine, which checks them at its
    /// own edge): `SamplingParams::new(p.to_raw())` gives `p` back.
    pub fn to_raw(&self) -> RawSamplingParams {
        let wide = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        RawSamplingParams {
            temperature: Some(self.temperature as f64),
            top_p: Some(self.top_p as f64),
            top_k: self.top_k.map(wide),
            min_p: Some(self.min_p as f64),
            seed: self.seed.map(|s| s as i64),
            presence_penalty: Some(self.presence_penalty as f64),
            frequency_penalty: Some(self.frequency_penalty as f64),
            repetition_penalty: Some(self.repetition_penalty as f64),
            max_tokens: self.max_tokens.map(wide),
            stop: self.stop.clone(),
            stop_token_ids: self.stop_token_ids.clone(),
            ignore_eos: self.ignore_eos,
            logprobs: self.logprobs.is_some(),
            top_logprobs: self.logprobs.map(wide),
        }
    }

    /// None: no logprobs; Some(n): the sampled token's logprob and the `n` most likely tokens'.
    pub fn logprobs(&self) -> Option<usize> {
        self.logprobs
    }

    /// The scheduler's `max_new_tokens` for a prompt of `prompt_len` tokens: `max_tokens`, capped
    /// by what the model length leaves (all of it when `max_tokens` is unset, as vLLM does).
    pub fn max_new_tokens(&self, prompt_len: usize, max_model_len: usize) -> usize {
        let room = max_model_len.saturating_sub(prompt_len);
        self.max_tokens.map_or(room, |m| m.min(room))
    }

    /// Whether sampling `token` ends the sequence: one of `stop_token_ids` (always), or one of the
    /// model's end-of-sequence ids unless `ignore_eos`. Stop strings are the detokenizer's.
    pub fn stop_for_token(&self, token: u32, eos_token_ids: &[u32]) -> Option<StopCause> {
        if self.stop_token_ids.contains(&token) {
            Some(StopCause::StopToken(token))
        } else if !self.ignore_eos && eos_token_ids.contains(&token) {
            Some(StopCause::Eos(token))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(raw: RawSamplingParams, expected: &str) {
        assert_eq!(SamplingParams::new(raw).unwrap_err().to_string(), expected);
    }

    #[test]
    fn out_of_range_values_name_the_field_the_range_and_the_value() {
        let raw = RawSamplingParams::default;
        check(RawSamplingParams { temperature: Some(3.0), ..raw() }, "temperature must be in [0, 2], got 3");
        check(RawSamplingParams { temperature: Some(f64::NAN), ..raw() }, "temperature must be in [0, 2], got NaN");
        check(RawSamplingParams { top_p: Some(0.0), ..raw() }, "top_p must be in (0, 1], got 0");
        check(RawSamplingParams { top_p: Some(1.5), ..raw() }, "top_p must be in (0, 1], got 1.5");
        check(RawSamplingParams { top_k: Some(-2), ..raw() }, "top_k must be -1 or 0 (disabled) or at least 1, got -2");
        check(RawSamplingParams { min_p: Some(-0.1), ..raw() }, "min_p must be in [0, 1], got -0.1");
        check(
            RawSamplingParams { presence_penalty: Some(2.5), ..raw() },
            "presence_penalty must be in [-2, 2], got 2.5",
        );
        check(
            RawSamplingParams { frequency_penalty: Some(-3.0), ..raw() },
            "frequency_penalty must be in [-2, 2], got -3",
        );
        check(
            RawSamplingParams { repetition_penalty: Some(0.0), ..raw() },
            "repetition_penalty must be a finite number greater than 0, got 0",
        );
        check(RawSamplingParams { max_tokens: Some(0), ..raw() }, "max_tokens must be at least 1, got 0");
        check(RawSamplingParams { max_tokens: Some(-5), ..raw() }, "max_tokens must be at least 1, got -5");
        check(
            RawSamplingParams { stop: vec!["a".into(), "".into()], ..raw() },
            "stop[1] must be a non-empty string, got \"\"",
        );
        check(
            RawSamplingParams { logprobs: true, top_logprobs: Some(21), ..raw() },
            "top_logprobs must be in [0, 20], got 21",
        );
        check(
            RawSamplingParams { top_logprobs: Some(2), ..raw() },
            "logprobs must be true when top_logprobs is set, got false",
        );
    }

    #[test]
    fn defaults_and_accepted_values() {
        let p = SamplingParams::default();
        assert_eq!((p.temperature(), p.top_p(), p.top_k(), p.min_p()), (1.0, 1.0, None, 0.0));
        assert!(!p.is_greedy() && !p.has_penalties() && p.logprobs().is_none());
        let p = SamplingParams::new(RawSamplingParams {
            temperature: Some(0.0),
            top_k: Some(-1),
            seed: Some(-1),
            max_tokens: Some(7),
            logprobs: true,
            repetition_penalty: Some(1.2),
            ..Default::default()
        })
        .unwrap();
        assert!(p.is_greedy() && p.has_penalties());
        assert_eq!((p.top_k(), p.seed(), p.logprobs()), (None, Some(u64::MAX), Some(0)));
        assert_eq!((p.max_new_tokens(10, 100), p.max_new_tokens(95, 100)), (7, 5));
        assert_eq!(SamplingParams::default().max_new_tokens(10, 100), 90);
    }

    #[test]
    fn stop_tokens_and_eos() {
        let p = SamplingParams::new(RawSamplingParams { stop_token_ids: vec![7], ..Default::default() }).unwrap();
        assert_eq!(p.stop_for_token(7, &[2]), Some(StopCause::StopToken(7)));
        assert_eq!(p.stop_for_token(2, &[2]), Some(StopCause::Eos(2)));
        assert_eq!(p.stop_for_token(3, &[2]), None);
        let p =
            SamplingParams::new(RawSamplingParams { stop_token_ids: vec![7], ignore_eos: true, ..Default::default() })
                .unwrap();
        assert_eq!(p.stop_for_token(2, &[2]), None);
        assert_eq!(p.stop_for_token(7, &[2]), Some(StopCause::StopToken(7)), "stop_token_ids apply with ignore_eos");
    }
}
