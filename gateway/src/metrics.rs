//! GET /metrics: Prometheus text exposition (format 0.0.4), vLLM's metric names under `awq:`.
//!
//! Two sources: each model's engine counters and gauges ([`EngineStats`], read at each scrape from
//! the gateway's `Models`: a model of several replicas sums them) and the latency histograms the
//! gateway measures itself per request and per model ([`ModelMetrics`]: time to first token,
//! inter-token latency, end-to-end latency; vLLM's buckets). Every series of a model carries two
//! labels of the same value: `model` (the name requests give: a deployment on the cluster) and
//! `model_name` (vLLM's label, so dashboards built for vLLM read ours). Written by hand rather than
//! through a metrics registry: a dozen series per model, and the format is a few lines.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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

    /// The samples (`_bucket`, `_sum`, `_count`) of this histogram under `labels`.
    fn write(&self, out: &mut String, name: &str, labels: &str) {
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

/// What the gateway measures per request, for one model.
pub struct ModelMetrics {
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

impl Default for ModelMetrics {
    fn default() -> Self {
        ModelMetrics {
            time_to_first_token: Histogram::new(TTFT_BUCKETS),
            inter_token_latency: Histogram::new(ITL_BUCKETS),
            e2e_request_latency: Histogram::new(E2E_BUCKETS),
            finished: Default::default(),
        }
    }
}

impl ModelMetrics {
    pub fn finished(&self, ending: Ending) {
        self.finished[ending as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// The gauges and counters of [`EngineStats`]: name, type, help, value.
type EngineSeries = (&'static str, &'static str, &'static str, fn(&EngineStats) -> String);

const ENGINE_SERIES: &[EngineSeries] = &[
    ("awq:num_requests_running", "gauge", "Requests in the running batch.", |s| s.num_requests_running.to_string()),
    ("awq:num_requests_waiting", "gauge", "Requests waiting to be scheduled.", |s| s.num_requests_waiting.to_string()),
    ("awq:kv_cache_usage_perc", "gauge", "Fraction of KV-cache blocks in use (1 = full).", |s| {
        s.kv_cache_usage.to_string()
    }),
    ("awq:kv_cache_capacity_tokens", "gauge", "Tokens the KV cache holds.", |s| s.kv_capacity_tokens.to_string()),
    ("awq:prompt_tokens_total", "counter", "Prompt tokens processed.", |s| s.prompt_tokens_total.to_string()),
    ("awq:generation_tokens_total", "counter", "Tokens generated.", |s| s.generation_tokens_total.to_string()),
    ("awq:prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.", |s| {
        s.prefix_cache_queries_tokens.to_string()
    }),
    ("awq:prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.", |s| {
        s.prefix_cache_hits_tokens.to_string()
    }),
    ("awq:num_preemptions_total", "counter", "Sequences preempted (recomputed later).", |s| {
        s.num_preemptions_total.to_string()
    }),
];

/// The histograms of [`ModelMetrics`]: name, help, which.
type HistogramSeries = (&'static str, &'static str, fn(&ModelMetrics) -> &Histogram);

const HISTOGRAMS: &[HistogramSeries] = &[
    ("awq:time_to_first_token_seconds", "Time to the first token (gateway).", |m| &m.time_to_first_token),
    ("awq:inter_token_latency_seconds", "Time between tokens (gateway).", |m| &m.inter_token_latency),
    ("awq:e2e_request_latency_seconds", "Request latency, submit to end (gateway).", |m| &m.e2e_request_latency),
];

/// Every model's [`ModelMetrics`], by the name served (kept after a model goes away: its counters
/// must not go back).
#[derive(Default)]
pub struct Metrics {
    models: Mutex<BTreeMap<String, Arc<ModelMetrics>>>,
}

impl Metrics {
    /// The histograms of the model served as `name`.
    pub fn of(&self, name: &str) -> Arc<ModelMetrics> {
        let mut models = self.models.lock().expect("no code panics holding this lock");
        match models.get(name) {
            Some(m) => m.clone(),
            None => models.entry(name.to_string()).or_default().clone(),
        }
    }

    /// The exposition: the engine series of each model in `stats`, the gateway's series of every
    /// model it measured or that `stats` names. Each family's HELP and TYPE come once, its samples
    /// after them, models in name order.
    pub fn render(&self, stats: &[(String, EngineStats)]) -> String {
        for (name, _) in stats {
            self.of(name);
        }
        let models: Vec<(String, Arc<ModelMetrics>)> = {
            let models = self.models.lock().expect("no code panics holding this lock");
            models.iter().map(|(name, m)| (name.clone(), m.clone())).collect()
        };
        let labels = |name: &str| {
            let v = escape_label(name);
            format!("model_name=\"{v}\",model=\"{v}\"")
        };
        let mut stats: Vec<&(String, EngineStats)> = stats.iter().collect();
        stats.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out = String::new();
        for (name, kind, help, value) in ENGINE_SERIES {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (model, s) in &stats {
                let _ = writeln!(out, "{name}{{{}}} {}", labels(model), value(s));
            }
        }
        let _ = writeln!(
            out,
            "# HELP awq:request_success_total Finished requests by finish reason.\n# TYPE awq:request_success_total counter"
        );
        for (model, m) in &models {
            for (i, reason) in ["stop", "length", "abort", "error"].iter().enumerate() {
                let n = m.finished[i].load(Ordering::Relaxed);
                let _ =
                    writeln!(out, "awq:request_success_total{{{},finished_reason=\"{reason}\"}} {n}", labels(model));
            }
        }
        for (name, help, histogram) in HISTOGRAMS {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            for (model, m) in &models {
                histogram(m).write(&mut out, name, &labels(model));
            }
        }
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
        let quoted = m.of("my \"model\"");
        quoted.time_to_first_token.observe(Duration::from_millis(3));
        quoted.time_to_first_token.observe(Duration::from_millis(30));
        quoted.time_to_first_token.observe(Duration::from_secs(100));
        quoted.finished(Ending::Stop);
        m.of("a").finished(Ending::Error);
        let stats = EngineStats {
            num_requests_running: 2,
            kv_cache_usage: 0.25,
            prefix_cache_hits_tokens: 16,
            ..Default::default()
        };
        // "b" only has engine counters (no request yet), "a" only the gateway's (its replicas did
        // not answer this scrape).
        let text = m.render(&[("my \"model\"".into(), stats), ("b".into(), EngineStats::default())]);
        let l = "model_name=\"my \\\"model\\\"\",model=\"my \\\"model\\\"\"";
        let (a, b) = ("model_name=\"a\",model=\"a\"", "model_name=\"b\",model=\"b\"");
        for line in [
            format!("awq:num_requests_running{{{l}}} 2"),
            format!("awq:num_requests_running{{{b}}} 0"),
            format!("awq:kv_cache_usage_perc{{{l}}} 0.25"),
            format!("awq:prefix_cache_hits_total{{{l}}} 16"),
            format!("awq:request_success_total{{{l},finished_reason=\"stop\"}} 1"),
            format!("awq:request_success_total{{{a},finished_reason=\"error\"}} 1"),
            format!("awq:request_success_total{{{b},finished_reason=\"error\"}} 0"),
            format!("awq:time_to_first_token_seconds_bucket{{{l},le=\"0.001\"}} 0"),
            format!("awq:time_to_first_token_seconds_bucket{{{l},le=\"0.005\"}} 1"),
            format!("awq:time_to_first_token_seconds_bucket{{{l},le=\"0.04\"}} 2"),
            format!("awq:time_to_first_token_seconds_bucket{{{l},le=\"80\"}} 2"),
            format!("awq:time_to_first_token_seconds_bucket{{{l},le=\"+Inf\"}} 3"),
            format!("awq:time_to_first_token_seconds_count{{{l}}} 3"),
            format!("awq:time_to_first_token_seconds_count{{{a}}} 0"),
            format!("awq:e2e_request_latency_seconds_count{{{l}}} 0"),
            "# TYPE awq:generation_tokens_total counter".to_string(),
        ] {
            assert!(text.lines().any(|x| x == line), "no line {line:?} in\n{text}");
        }
        assert!(!text.contains(&format!("awq:num_requests_running{{{a}}}")), "{text}");
        // The text format: a family's samples follow its one TYPE line, never interleaved.
        let mut seen = std::collections::HashSet::new();
        let mut current = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                current = rest.split(' ').next().unwrap().to_string();
                assert!(seen.insert(current.clone()), "{current} typed twice:\n{text}");
            } else if !line.starts_with('#') {
                let name = line.split('{').next().unwrap();
                assert!(name.starts_with(&current), "{name} outside its family {current}:\n{text}");
            }
        }
        assert_eq!(seen.len(), ENGINE_SERIES.len() + 4);
    }
}
