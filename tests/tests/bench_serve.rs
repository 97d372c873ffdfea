//! `awq bench serve` end to end against a real CPU `awq serve` of SmolLM2-135M: the sweep's JSON
//! counts exactly the tokens asked for, its latencies are ordered as they must be (a first token
//! never after the end), and the server's own counter saw at least the tokens the bench reports;
//! the text dataset and the table; setup errors (a prompt longer than the model, a wrong key, no
//! server) end with one `error:` line, never a panic.

use awq_e2e::serve::Server;
use awq_e2e::*;
use serde_json::Value;

const KEY: &str = "bench-key";

/// Prompt tokens, generated tokens and requests per level: small, since CI has two cores.
const INPUT_LEN: usize = 32;
const OUTPUT_LEN: usize = 8;
const PROMPTS: usize = 6;

/// `awq bench serve --url URL --api-key KEY FLAGS...`'s arguments.
fn bench(url: &str, key: &str, flags: &str) -> Vec<String> {
    let mut args: Vec<String> = ["bench", "serve", "--url", url, "--api-key", key].map(String::from).into();
    args.extend(flags.split_whitespace().map(String::from));
    args
}

#[test]
fn sweep_counts_every_token_and_orders_latencies() {
    let model = smollm2_135m();
    let server = Server::start(&model, &["--api-key", KEY, "--max-model-len", "512", "--kv-cache-bytes", "200000000"]);
    let url = server.url();
    let generated_before = server.metric("awq:generation_tokens_total");

    let flags = format!(
        "--input-len {INPUT_LEN} --output-len {OUTPUT_LEN} --num-prompts {PROMPTS} --concurrency 1,3 --ignore-eos --json"
    );
    let stdout = awq_ok(bench(&url, KEY, &flags));
    let v: Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not one JSON object ({e}): {stdout}"));
    // The first (only) id of GET /v1/models: `awq serve` names the model by the path it was given.
    let model_id = model.to_string_lossy();
    assert_eq!(v["model"].as_str(), Some(&*model_id), "{v}");
    assert_eq!((json_usize(&v, "input_len"), json_usize(&v, "output_len")), (INPUT_LEN, OUTPUT_LEN));
    let levels = v["levels"].as_array().unwrap_or_else(|| panic!("no levels: {v}"));
    assert_eq!(levels.iter().map(|l| json_usize(l, "max_concurrency")).collect::<Vec<_>>(), [1, 3]);
    let mut reported = 0;
    for level in levels {
        assert_eq!((json_usize(level, "completed"), json_usize(level, "failed")), (PROMPTS, 0), "{level}");
        assert!(level["first_error"].is_null(), "{level}");
        // Token-id prompts reach the model as sent, and ignore_eos makes every answer full length.
        assert_eq!(json_usize(level, "total_input_tokens"), PROMPTS * INPUT_LEN, "{level}");
        assert_eq!(json_usize(level, "total_output_tokens"), PROMPTS * OUTPUT_LEN, "{level}");
        for key in ["duration", "request_throughput", "output_throughput", "total_token_throughput"] {
            assert!(json_f64(level, key) > 0.0, "{key}: {level}");
        }
        // Each request's first token comes no later than its end, so every order statistic and the
        // mean of TTFT are at most E2E's.
        for stat in ["mean", "median", "p99"] {
            let (ttft, e2e) =
                (json_f64(level, &format!("{stat}_ttft_ms")), json_f64(level, &format!("{stat}_e2el_ms")));
            assert!(0.0 < ttft && ttft <= e2e, "{stat}: ttft {ttft} ms, e2e {e2e} ms: {level}");
            assert!(json_f64(level, &format!("{stat}_tpot_ms")) > 0.0, "{stat} tpot: {level}");
            assert!(json_f64(level, &format!("{stat}_itl_ms")) >= 0.0, "{stat} itl: {level}");
        }
        reported += json_usize(level, "total_output_tokens");
    }
    // The warm-up requests generated more on top of what the bench counts.
    server.wait_metric("awq:generation_tokens_total", &format!(">= {reported} more than before"), |after| {
        after - generated_before >= reported as f64
    });

    // The text dataset and the table: a header naming the model and lengths, one row per level.
    let dir = scratch();
    let text = write_sample_text(dir.path());
    let text = text.to_string_lossy().into_owned();
    let mut args = bench(&url, KEY, "--dataset text --input-len 32 --output-len 4 --num-prompts 3 --concurrency 2");
    args.extend(["--ignore-eos".into(), "--warmup".into(), "0".into(), "--text".into(), text]);
    let table = awq_ok(&args);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "header, column names, one row:\n{table}");
    assert!(lines[0].contains(&*model_id) && lines[0].contains("text prompts of 32 tokens"), "{table}");
    let row: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(row[..3], ["2", "3", "0"], "concurrency 2, 3 done, 0 failed:\n{table}");

    // Setup errors end the command before any load.
    let err = awq_err(bench(&url, KEY, "--input-len 600"));
    assert!(err.contains("max_model_len 512"), "{err}");
    let err = awq_err(bench(&url, "wrong", ""));
    assert!(err.contains("HTTP 401"), "{err}");
}

#[test]
fn no_server_is_an_error_not_a_panic() {
    // A port nobody listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    let err = awq_err(bench(&format!("http://127.0.0.1:{port}"), KEY, "--timeout 10"));
    assert!(err.contains("/v1/models"), "{err}");
    let err = awq_err(bench("https://127.0.0.1:1", KEY, ""));
    assert!(err.contains("plain http://"), "{err}");
}
