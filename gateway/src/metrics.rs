//! GET /metrics: Prometheus text exposition (format 0.0.4), vLLM's metric names under `awq:`.
//!
//! Two sources: the engine's counters and gauges ([`EngineStats`], read at each scrape) and the
//! latency histograms the gateway measures itself per request ([`Metrics`]: time to first token,
//! inter-token latency, end-to-end latency; vLLM's buckets). Written by hand rather than through a
//! metrics registry: a dozen series, one label (`model_name`), and the format is a few lines.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use awq_serve::engine::EngineStats;

/// vLLM's buckets (seconds).
const TTFT_BUCKETS: &[f64] =
    &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
const ITL_BUCKETS: &[f64] =
    &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
const E2E_BUCKETS: &[f64] =
    &[0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0];

/// A histogram: cumulative on output, per bucket inside.
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound, plus +Inf.
    counts: Vec<AtomicU64>,
    sum_seconds: Mutex<f64>,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_seconds: Mutex::new(0.0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = self.bounds.iter().position(|&b| s <= b).unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        *self.sum_seconds.lock().expect("no code panics holding this lock") += s;
    }

    fn write(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let le = self.bounds.get(i).map_or("+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        let sum = *self.sum_seconds.lock().expect("no code panics holding this lock");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}\n{name}_count{{{labels}}} {cumulative}");
    }
}

/// What the gateway measures per request.
pub struct Metrics {
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub e2e_request_latency: Histogram,
    /// Finished requests by OpenAI's finish_reason (stop, length, abort) and errors.
    finished: [AtomicU64; 4],
}

/// How a request ended, for `awq:request_success_total{finished_reason}`.
#[derive(Clone, Copy, Debug)]
pub enum Ending {
    Stop = 0,
    Length = 1,
    Abort = 2,
    Error = 3,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            time_to_first_token: Histogram::new(TTFT_BUCKETS),
            inter_token_latency: Histogram::new(ITL_BUCKETS),
            e2e_request_latency: Histogram::new(E2E_BUCKETS),
            finished: Default::default(),
        }
    }
}

impl Metrics {
    pub fn finished(&self, ending: Ending) {
        self.finished[ending as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The exposition of `stats` and these histograms, every series labelled with `model_name`.
    pub fn render(&self, stats: &EngineStats, model_name: &str) -> String {
        let labels = format!("model_name=\"{}\"", escape_label(model_name));
        let mut out = String::new();
        let mut series = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{labels}}} {value}");
        };
        series(
            "awq:num_requests_running",
            "gauge",
            "Requests in the running batch.",
            stats.num_requests_running.to_string(),
        );
        series(
            "awq:num_requests_waiting",
            "gauge",
            "Requests waiting to be scheduled.",
            stats.num_requests_waiting.to_string(),
        );
        series(
            "awq:kv_cache_usage_perc",
            "gauge",
            "Fraction of KV-cache blocks in use (1 = full).",
            stats.kv_cache_usage.to_string(),
        );
        series(
            "awq:kv_cache_capacity_tokens",
            "gauge",
            "Tokens the KV cache holds.",
            stats.kv_capacity_tokens.to_string(),
        );
        series("awq:prompt_tokens_total", "counter", "Prompt tokens processed.", stats.prompt_tokens_total.to_string());
        series(
            "awq:generation_tokens_total",
            "counter",
            "Tokens generated.",
            stats.generation_tokens_total.to_string(),
        );
        series(
            "awq:prefix_cache_queries_total",
            "counter",
            "Prompt tokens looked up in the prefix cache.",
            stats.prefix_cache_queries_tokens.to_string(),
        );
        series(
            "awq:prefix_cache_hits_total",
            "counter",
            "Prompt tokens found in the prefix cache.",
            stats.prefix_cache_hits_tokens.to_string(),
        );
        series(
            "awq:num_preemptions_total",
            "counter",
            "Sequences preempted (recomputed later).",
            stats.num_preemptions_total.to_string(),
        );
        let _ = writeln!(
            out,
            "# HELP awq:request_success_total Finished requests by finish reason.\n# TYPE awq:request_success_total counter"
        );
        for (i, reason) in ["stop", "length", "abort", "error"].iter().enumerate() {
            let n = self.finished[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "awq:request_success_total{{{labels},finished_reason=\"{reason}\"}} {n}");
        }
        self.time_to_first_token.write(
            &mut out,
            "awq:time_to_first_token_seconds",
            "Time to the first token (gateway).",
            &labels,
        );
        self.inter_token_latency.write(
            &mut out,
            "awq:inter_token_latency_seconds",
            "Time between tokens (gateway).",
            &labels,
        );
        self.e2e_request_latency.write(
            &mut out,
            "awq:e2e_request_latency_seconds",
            "Request latency, submit to end (gateway).",
            &labels,
        );
        out
    }
}

/// A label value as the text format wants it: backslash, quote and newline escaped.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_every_series_and_cumulative_buckets() {
        let m = Metrics::default();
        m.time_to_first_token.observe(Duration::from_millis(3));
        m.time_to_first_token.observe(Duration::from_millis(30));
        m.time_to_first_token.observe(Duration::from_secs(100));
        m.finished(Ending::Stop);
        let stats = EngineStats {
            num_requests_running: 2,
            kv_cache_usage: 0.25,
            prefix_cache_hits_tokens: 16,
            ..Default::default()
        };
        let text = m.render(&stats, "my \"model\"");
        let l = "model_name=\"my \\\"model\\\"\"";
        for line in [
            format!("awq:num_requests_running{{{l}}} 2"),
            format!("awq:kv_cache_usage_perc{{{l}}} 0.25"),
            format!("awq:prefix_cache_hits_total{{{l}}} 16"),
            format!("awq:request_success_total{{{l},finished_reason=\"stop\"}} 1"),
            format!("awq:time_to_first_token_seconds_bucket{{{l},le=\"0.001\"}} 0"),
            format!("awq:time_to_first_token_seconds_bucket{{{l},le=\"0.005\"}} 1"),
            format!("awq:time_to_first_token_seconds_bucket{{{l},le=\"0.04\"}} 2"),
            format!("awq:time_to_first_token_seconds_bucket{{{l},le=\"80\"}} 2"),
            format!("awq:time_to_first_token_seconds_bucket{{{l},le=\"+Inf\"}} 3"),
            format!("awq:time_to_first_token_seconds_count{{{l}}} 3"),
            format!("awq:e2e_request_latency_seconds_count{{{l}}} 0"),
            "# TYPE awq:generation_tokens_total counter".to_string(),
        ] {
            assert!(text.lines().any(|x| x == line), "no line {line:?} in\n{text}");
        }
    }
}
