//! What one concurrency level measured, summed up as `vllm bench serve` does (its
//! `calculate_metrics` in vllm/benchmarks/serve.py): throughputs over the level's wall time, and
//! mean, median and p99 of TTFT, TPOT, ITL and end-to-end latency over the completed requests.
//!
//! Pure: the requests' timings come in, numbers go out; no clock, no I/O. Percentiles interpolate
//! linearly between the two nearest ranks, numpy's default, so the numbers compare with vLLM's.

use serde_json::{json, Value};

/// What one completed request measured; times in seconds from the moment it was sent.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestTiming {
    /// The first chunk that carried text (time to first token).
    pub ttft: f64,
    /// Gaps between successive chunks that carried text (inter-token latencies).
    pub itl: Vec<f64>,
    /// The end of the stream (`data: [DONE]`).
    pub e2e: f64,
    /// Prompt tokens (the usage chunk's, else the prompt's length as sent).
    pub input_tokens: usize,
    /// Generated tokens (the usage chunk's, else the number of chunks that carried text).
    pub output_tokens: usize,
    /// Prompt tokens the server found in its prefix cache (usage's `prompt_tokens_details`; 0 when
    /// it does not say).
    pub cached_tokens: usize,
}

impl RequestTiming {
    /// Time per output token after the first: `(e2e - ttft) / (output_tokens - 1)`; `None` for a
    /// request of one token or none, which has no such time (vLLM leaves it out too).
    pub fn tpot(&self) -> Option<f64> {
        (self.output_tokens > 1).then(|| (self.e2e - self.ttft) / (self.output_tokens - 1) as f64)
    }
}

/// A request's result: its timing, or why it failed (an HTTP status and message, a broken stream,
/// a timeout).
pub type Outcome = Result<RequestTiming, String>;

/// Mean, median and 99th percentile of one latency, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub mean: f64,
    pub median: f64,
    pub p99: f64,
}

impl Spread {
    /// The spread of `seconds`, in milliseconds; `None` when there is no value.
    pub fn of_seconds(seconds: &[f64]) -> Option<Spread> {
        let mut ms: Vec<f64> = seconds.iter().map(|s| s * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        Some(Spread {
            mean: ms.iter().sum::<f64>() / ms.len().max(1) as f64,
            median: percentile(&ms, 50.0)?,
            p99: percentile(&ms, 99.0)?,
        })
    }
}

/// The `q`-th percentile (0..=100) of sorted values, interpolated linearly between the nearest
/// ranks (numpy's `percentile` default); `None` for no values.
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let rank = q.clamp(0.0, 100.0) / 100.0 * last as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64))
}

/// One concurrency level, summed up.
#[derive(Clone, Debug, PartialEq)]
pub struct LevelSummary {
    pub concurrency: usize,
    pub completed: usize,
    pub failed: usize,
    /// The first failure's message, to print once.
    pub first_error: Option<String>,
    /// Seconds from the first request sent to the last one answered.
    pub duration: f64,
    pub total_input_tokens: usize,
    pub total_output_tokens: usize,
    pub cached_input_tokens: usize,
    /// Completed requests per second.
    pub request_throughput: f64,
    /// Generated tokens per second.
    pub output_throughput: f64,
    /// Prompt and generated tokens per second.
    pub total_token_throughput: f64,
    /// `None` where no completed request gave a value (no request completed; every request
    /// generated one token, for TPOT and ITL).
    pub ttft: Option<Spread>,
    pub tpot: Option<Spread>,
    pub itl: Option<Spread>,
    pub e2el: Option<Spread>,
}

/// Sums up the outcomes of one level that took `duration` seconds of wall time.
pub fn summarize(concurrency: usize, outcomes: &[Outcome], duration: f64) -> LevelSummary {
    let done: Vec<&RequestTiming> = outcomes.iter().filter_map(|o| o.as_ref().ok()).collect();
    let first_error = outcomes.iter().find_map(|o| o.as_ref().err().cloned());
    let total_input_tokens = done.iter().map(|t| t.input_tokens).sum::<usize>();
    let total_output_tokens = done.iter().map(|t| t.output_tokens).sum::<usize>();
    // A level that took no measurable time (impossible over a network, but a zero must not become
    // an infinite rate in the JSON).
    let per_second = |n: usize| if duration > 0.0 { n as f64 / duration } else { 0.0 };
    let seconds = |f: fn(&RequestTiming) -> Option<f64>| done.iter().filter_map(|t| f(t)).collect::<Vec<f64>>();
    LevelSummary {
        concurrency,
        completed: done.len(),
        failed: outcomes.len() - done.len(),
        first_error,
        duration,
        total_input_tokens,
        total_output_tokens,
        cached_input_tokens: done.iter().map(|t| t.cached_tokens).sum(),
        request_throughput: per_second(done.len()),
        output_throughput: per_second(total_output_tokens),
        total_token_throughput: per_second(total_input_tokens + total_output_tokens),
        ttft: Spread::of_seconds(&seconds(|t| Some(t.ttft))),
        tpot: Spread::of_seconds(&seconds(RequestTiming::tpot)),
        itl: Spread::of_seconds(&done.iter().flat_map(|t| t.itl.iter().copied()).collect::<Vec<_>>()),
        e2el: Spread::of_seconds(&seconds(|t| Some(t.e2e))),
    }
}

impl LevelSummary {
    /// The level as JSON, with `vllm bench serve`'s key names (`mean_ttft_ms`, `p99_itl_ms`, ...)
    /// so that scripts written for its results read ours; a latency nobody measured is null.
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "max_concurrency": self.concurrency,
            "num_prompts": self.completed + self.failed,
            "completed": self.completed,
            "failed": self.failed,
            "first_error": self.first_error,
            "duration": self.duration,
            "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens,
            "cached_input_tokens": self.cached_input_tokens,
            "request_throughput": self.request_throughput,
            "output_throughput": self.output_throughput,
            "total_token_throughput": self.total_token_throughput,
        });
        for (name, spread) in [("ttft", self.ttft), ("tpot", self.tpot), ("itl", self.itl), ("e2el", self.e2el)] {
            for (stat, value) in
                [("mean", spread.map(|s| s.mean)), ("median", spread.map(|s| s.median)), ("p99", spread.map(|s| s.p99))]
            {
                v[format!("{stat}_{name}_ms")] = json!(value);
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(ttft: f64, e2e: f64, output_tokens: usize) -> RequestTiming {
        RequestTiming { ttft, itl: Vec::new(), e2e, input_tokens: 10, output_tokens, cached_tokens: 0 }
    }

    #[test]
    fn percentiles_interpolate_as_numpy() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        // numpy.percentile(range(1, 101), 99) == 99.01
        assert!((percentile(&v, 99.0).unwrap() - 99.01).abs() < 1e-9);
        assert_eq!(percentile(&v, 50.0), Some(50.5));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        // An even count's median is the mean of the two middle values; one value is every percentile.
        assert_eq!(percentile(&[1.0, 2.0, 4.0, 10.0], 50.0), Some(3.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn spread_sorts_and_converts_to_milliseconds() {
        let s = Spread::of_seconds(&[0.004, 0.001, 0.003, 0.002]).unwrap();
        assert!((s.mean - 2.5).abs() < 1e-9 && (s.median - 2.5).abs() < 1e-9);
        assert!((s.p99 - 3.97).abs() < 1e-9, "{s:?}");
        assert_eq!(Spread::of_seconds(&[]), None);
    }

    #[test]
    fn tpot_needs_two_tokens() {
        assert_eq!(timing(0.1, 0.5, 1).tpot(), None);
        assert_eq!(timing(0.1, 0.5, 0).tpot(), None);
        assert!((timing(0.1, 0.5, 5).tpot().unwrap() - 0.1).abs() < 1e-12);
    }

    #[test]
    fn summary_counts_failures_and_rates() {
        let mut a = timing(0.1, 1.1, 11);
        a.itl = vec![0.1; 10];
        a.cached_tokens = 4;
        let b = timing(0.3, 0.3, 1);
        let outcomes = vec![Ok(a), Err("HTTP 500: boom".to_string()), Ok(b), Err("second".to_string())];
        let s = summarize(8, &outcomes, 2.0);
        assert_eq!((s.completed, s.failed, s.first_error.as_deref()), (2, 2, Some("HTTP 500: boom")));
        assert_eq!((s.total_input_tokens, s.total_output_tokens, s.cached_input_tokens), (20, 12, 4));
        assert_eq!((s.request_throughput, s.output_throughput, s.total_token_throughput), (1.0, 6.0, 16.0));
        let ttft = s.ttft.unwrap();
        assert!((ttft.mean - 200.0).abs() < 1e-9 && (ttft.median - 200.0).abs() < 1e-9);
        // b's one token has no TPOT: only a's 100 ms counts.
        assert!((s.tpot.unwrap().median - 100.0).abs() < 1e-9);
        assert!((s.itl.unwrap().p99 - 100.0).abs() < 1e-9);
        assert!((s.e2el.unwrap().mean - 700.0).abs() < 1e-9);
        let v = s.to_json();
        assert_eq!(v["num_prompts"], 4);
        assert!((v["median_tpot_ms"].as_f64().unwrap() - 100.0).abs() < 1e-9);
    }

    #[test]
    fn a_level_without_completions_has_no_latencies() {
        let s = summarize(1, &[Err("refused".to_string())], 0.0);
        assert_eq!((s.completed, s.failed, s.request_throughput), (0, 1, 0.0));
        assert_eq!((s.ttft, s.tpot, s.itl, s.e2el), (None, None, None, None));
        assert!(s.to_json()["p99_e2el_ms"].is_null());
    }
}
