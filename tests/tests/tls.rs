//! TLS end to end (issue 20, "Security"), with real processes on loopback and certificates made at
//! test time (`rcgen`: a CA, and a certificate it signs for 127.0.0.1 and localhost that the
//! coordinator and both workers serve).
//!
//! - A coordinator over TLS (and tokens), two workers over TLS: a job runs over both (activations
//!   between the workers over TLS) and its output is deployed as a replica pipelined over both
//!   (the first stage calls the second over TLS, the coordinator's gateway calls the first over
//!   TLS) and answers a completion over HTTPS (the coordinator's certificate serves its HTTP API).
//! - Client commands with `https://` and `--tls-ca` work; without `--tls-ca` the certificate is
//!   refused, and with `http://` the client is told the coordinator speaks TLS; an `https://`
//!   client of a plain coordinator is told it does not. Each within seconds, exit code 1.
//! - A worker without a certificate cannot join a TLS coordinator; one dialling `http://` logs
//!   that the coordinator speaks TLS.

use std::path::Path;
use std::time::{Duration, Instant};

use awq_e2e::cluster::{
    awq_within, free_port, start_coordinator, start_worker, Cluster, TlsFiles, Tokens, START_TIMEOUT,
};
use awq_e2e::*;
use serde_json::{json, Value};

const ADMIN: &str = "adm-T1s9Kw3e5Rb7";
const WORKER: &str = "wrk-L4u8Vn2c6Xz0";

/// How long the job, or loading the replica, may take (seconds on the tiny model).
const TIMEOUT: Duration = Duration::from_secs(300);
/// How long a client whose TLS disagrees with the server's may take to fail.
const FAILS_WITHIN: Duration = Duration::from_secs(10);

fn arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// A CA and a certificate it signs for 127.0.0.1 and localhost, as PEM files in `dir`.
fn certificates(dir: &Path) -> TlsFiles {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("a CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "awq test CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("a self-signed CA");
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("a server key");
    let params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).expect("parameters");
    let cert = params.signed_by(&key, &issuer).expect("a certificate signed by the CA");
    let files = TlsFiles { cert: dir.join("server.pem"), key: dir.join("server-key.pem"), ca: dir.join("ca.pem") };
    for (path, pem) in [(&files.cert, cert.pem()), (&files.key, key.serialize_pem()), (&files.ca, ca_cert.pem())] {
        std::fs::write(path, pem).expect("the scratch folder is writable");
    }
    files
}

/// `awq ARGS...`, which must fail with exit code 1 within [`FAILS_WITHIN`]; its stderr.
fn fails_fast(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let start = Instant::now();
    let out = awq_within(&args, Duration::from_secs(60)).unwrap_or_else(|| panic!("awq {args:?} hung"));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "awq {args:?}: {stderr}");
    assert!(start.elapsed() < FAILS_WITHIN, "awq {args:?} took {:?} to fail: {stderr}", start.elapsed());
    assert!(stderr.starts_with("error: ") && !stderr.contains("panicked"), "awq {args:?}: {stderr}");
    stderr
}

#[test]
fn a_cluster_over_tls_runs_and_serves_and_mismatched_clients_fail_clearly() {
    let s = scratch();
    let dir = s.path();
    let tls = certificates(dir);
    let model = dir.join("tiny");
    awq_ok(["synthetic", &arg(&model), "--seed", "7"]);
    let http = format!("127.0.0.1:{}", free_port());
    let tokens = Tokens { admin: ADMIN.into(), worker: WORKER.into() };
    let cluster = Cluster::start_tls(dir, &["a", "b"], &["--http-listen", &http], tokens, &tls);
    let url = cluster.url().to_string();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    assert_eq!(cluster.workers_json().len(), 2, "both workers joined over TLS");

    // A job over both workers (RTN: no calibration, seconds).
    let (model_arg, out) = (arg(&model), dir.join("tiny-rtn"));
    let out_arg = arg(&out);
    let job = cluster.json_within(&["submit", &model_arg, "-o", &out_arg, "--method", "rtn", "--wait"], TIMEOUT);
    assert_eq!(job["state"], "done", "{job}");
    let job_id = job["id"].as_str().unwrap_or_else(|| panic!("no job id: {job}"));
    assert_eq!(cluster.status(job_id)["state"], "done");

    // Served by a replica pipelined over both workers, through the coordinator's gateway.
    let deploy = ["deploy", &out_arg, "--name", "tiny", "--pp", "2", "--max-model-len", "128"];
    let mut deploy = deploy.to_vec();
    deploy.extend(["--kv-cache-bytes", "8388608", "--wait", "--timeout", "120"]);
    let d = cluster.json_within(&deploy, TIMEOUT);
    assert_eq!(d["replicas"][0]["stage_workers"].as_array().map(Vec::len), Some(2), "{d}");
    // The coordinator's certificate makes its HTTP API HTTPS too.
    let completion = json!({"model": "tiny", "prompt": "The lighthouse", "max_tokens": 2, "temperature": 0});
    let (ca, https) = (arg(&tls.ca), format!("https://{http}/v1/completions"));
    let json_body = ["-H", "Content-Type: application/json", "-d", &completion.to_string()];
    let (code, body) = curl(&[&["--cacert", &ca][..], &json_body, &[&https]].concat());
    assert_eq!(code, Some(0), "a completion over HTTPS: {body}\n{}", cluster.logs());
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    assert!(v["usage"]["completion_tokens"].as_u64().is_some_and(|n| (1..=2).contains(&n)), "{body}");

    // Clients that disagree with the coordinator about TLS fail within seconds, saying what to change.
    let plain_url = url.replacen("https://", "http://", 1);
    let untrusted = fails_fast(&["jobs", "--coordinator", &url, "--token", ADMIN]);
    assert!(untrusted.contains("not trusted") && untrusted.contains("--tls-ca"), "{untrusted}");
    for args in [
        &["jobs", "--coordinator", &plain_url, "--token", ADMIN][..],
        &["status", "x", "--coordinator", &plain_url, "--tls-ca", &ca],
    ] {
        let plain = fails_fast(args);
        assert!(
            plain.contains(&format!("the coordinator at {plain_url} speaks TLS: use https:// and --tls-ca")),
            "{plain}"
        );
    }
    std::fs::create_dir_all(dir.join("plain")).expect("the scratch folder is writable");
    let (mut plain_coordinator, plain_coordinator_url) = start_coordinator(&dir.join("plain"), "memory", &[]);
    let https_of_plain = plain_coordinator_url.replacen("http://", "https://", 1);
    let not_tls = fails_fast(&["jobs", "--coordinator", &https_of_plain, "--tls-ca", &ca]);
    assert!(not_tls.contains("does not speak TLS: use http://"), "{not_tls}");
    plain_coordinator.kill();

    // A worker without a certificate is stopped before it dials; one that dials http:// is told why.
    let no_cert = fails_fast(&["worker", "--coordinator", &url, "--name", "c", "--tls-ca", &ca]);
    assert!(no_cert.contains("needs --tls-cert and --tls-key"), "{no_cert}");
    let mut plain_worker = start_worker(dir, &plain_url, "d");
    cluster.wait_until("worker d to log the coordinator speaks TLS", START_TIMEOUT, || {
        plain_worker.log().contains("speaks TLS: use https://").then_some(())
    });
    plain_worker.kill();

    // No process wrote a token or a key into its log.
    for proc in cluster.procs() {
        let log = proc.log();
        assert!(!log.contains(ADMIN) && !log.contains(WORKER), "{} logged a token:\n{log}", proc.name());
        assert!(!log.contains("PRIVATE KEY"), "{} logged a key:\n{log}", proc.name());
    }
}

/// `curl ARGS...` (bounded); its exit code and stdout.
fn curl(args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new("curl")
        .args(["--silent", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl runs (.ci/run installs it)");
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `awq serve` with --tls-cert and --tls-key speaks HTTPS only: the official `openai` client,
/// trusting the test CA, gets a completion (with an API key, which now travels encrypted); curl
/// without the CA refuses the certificate; a plaintext HTTP request gets no HTTP answer. Each
/// refusal within seconds.
#[test]
fn awq_serve_speaks_https_to_the_openai_client_and_nothing_else() {
    let s = scratch();
    let dir = s.path();
    let tls = certificates(dir);
    let model = dir.join("tiny");
    awq_ok(["synthetic", &arg(&model), "--seed", "7"]);
    let addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = std::process::Command::new(awq_bin());
    cmd.arg("serve").arg(&model).args(["--listen", &addr, "--served-model-name", "tiny", "--api-key", "sk-https-7"]);
    cmd.args(["--max-model-len", "256", "--kv-cache-bytes", "50000000"]);
    cmd.args(["--tls-cert", &arg(&tls.cert), "--tls-key", &arg(&tls.key)]);
    let server = awq_e2e::cluster::Proc::spawn("awq serve", cmd, dir.join("serve.log"));
    let (ca, base) = (arg(&tls.ca), format!("https://{addr}"));
    awq_e2e::cluster::wait_until("/health over HTTPS", START_TIMEOUT, &[&server], || {
        let (code, body) = curl(&["--cacert", &ca, &format!("{base}/health")]);
        (code == Some(0) && body.contains("ok")).then_some(())
    });
    assert!(server.log().contains(&format!("listening on https://{addr}")), "{}", server.log());

    let script = r#"
import json, sys, httpx, openai
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="sk-https-7", http_client=httpx.Client(verify=sys.argv[2]))
c = client.completions.create(model="tiny", prompt="The lighthouse", max_tokens=2, temperature=0)
print(json.dumps({"tokens": c.usage.completion_tokens, "model": c.model}))
"#;
    let out = awq_e2e::serve::run_openai_script(script, &[&base, &ca]);
    assert_eq!(out["model"], "tiny", "{out}");
    assert!(out["tokens"].as_u64().is_some_and(|n| (1..=2).contains(&n)), "{out}");

    let start = Instant::now();
    let (code, _) = curl(&[&format!("{base}/health")]);
    assert_eq!(code, Some(60), "curl without the CA: the certificate is not trusted");
    let (code, body) = curl(&["--include", &format!("http://{addr}/health")]);
    assert!(code != Some(0) && !body.contains("HTTP/1.1 200"), "plain HTTP answered: {code:?} {body}");
    assert!(start.elapsed() < FAILS_WITHIN * 2, "refusals took {:?}", start.elapsed());
}

/// Mutual TLS: a coordinator started with --tls-client-ca takes workers that present a
/// certificate the CA signed (the cluster's workers present their own), refuses a client command
/// without one, saying so within seconds, and answers it with one (--tls-cert, --tls-key).
#[test]
fn mutual_tls_lets_in_clients_with_a_certificate_and_tells_the_others() {
    let s = scratch();
    let dir = s.path();
    let tls = certificates(dir);
    let ca = arg(&tls.ca);
    let tokens = Tokens { admin: ADMIN.into(), worker: WORKER.into() };
    let cluster = Cluster::start_tls(dir, &["a"], &["--tls-client-ca", &ca], tokens, &tls);
    let url = cluster.url().to_string();
    let refused = fails_fast(&["workers", "--coordinator", &url, "--tls-ca", &ca, "--token", ADMIN]);
    assert!(refused.contains("requires a client certificate") && refused.contains("--tls-cert"), "{refused}");
    let (cert, key) = (arg(&tls.cert), arg(&tls.key));
    let args =
        ["workers", "--coordinator", &url, "--tls-ca", &ca, "--token", ADMIN, "--tls-cert", &cert, "--tls-key", &key];
    let listed = awq_ok(args.iter().copied().chain(["--json"]));
    let listed: Value = serde_json::from_str(&listed).unwrap_or_else(|e| panic!("not JSON ({e}): {listed}"));
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "the worker joined with its certificate: {listed}");
    // A server of mutual TLS needs a certificate of its own.
    let alone = fails_fast(&["coordinator", "--listen", "127.0.0.1:0", "--tls-client-ca", &ca]);
    assert!(alone.contains("--tls-client-ca is given without --tls-cert and --tls-key"), "{alone}");
}
