//! Tokens and API keys end to end (issue 20, "Security"), with real processes on loopback: a
//! coordinator that requires an admin token and a worker token (read from files), two workers that
//! send the worker token (AWQ_WORKER_TOKEN), the client commands with `--token`, and the
//! coordinator's HTTP API behind keys from a file.
//!
//! - A worker without the worker token, or with a wrong one, cannot join: it exits with an error
//!   that says the coordinator refused its token, and the coordinator logs the refusal (the peer,
//!   the call, which token), without the secret.
//! - Every client command (submits, cancels, deploys, undeploys and the reads) without the admin
//!   token or with a wrong one fails with the clear error, exit code 1, no panic; a refused submit
//!   creates no job and no output.
//! - With the tokens, a job runs over both workers (activations pass from one worker's stage to the
//!   other's, through the stage transport that requires the worker token), and its output is
//!   deployed as a replica pipelined over both (the first stage calls the second over its
//!   `ReplicaService`, the coordinator's gateway calls the first): every hop carries the token.
//! - A worker's own port (its replicas, its stage service) refuses calls without the worker token.
//! - Each key of the file opens the HTTP API; a wrong key or none gets 401 in OpenAI's JSON.
//! - No process logs a token or a key.

use std::path::Path;
use std::time::Duration;

use awq_e2e::cluster::{free_port, start_worker_with, Cluster, StoreKind, Tokens, START_TIMEOUT};
use awq_e2e::serve::Endpoint;
use awq_e2e::*;
use awq_proto::v1 as pb;
use awq_proto::v1::replica_service_client::ReplicaServiceClient;
use awq_proto::v1::stage_service_client::StageServiceClient;
use serde_json::{json, Value};
use tonic::Code::Unauthenticated;

const ADMIN: &str = "adm-Z8q4Lx2v9TnR7c";
const WORKER: &str = "wrk-P3m6Hs1k8YdQ5b";
const KEYS: [&str; 2] = ["key-one-Jf93Kd", "key-two-Qm27Xa"];

/// How long the job, or loading the replica, may take (seconds on the tiny model).
const TIMEOUT: Duration = Duration::from_secs(300);


fn arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Runs `call` on a channel to `address` ("host:port") with `token` as its bearer (within 10 s).
fn grpc<F, Fut>(address: &str, token: Option<&str>, call: F) -> Result<(), tonic::Code>
where
    F: FnOnce(tonic::transport::Channel, tonic::metadata::MetadataMap) -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
    let url = format!("http://{address}");
    runtime.block_on(async move {
        let channel = tonic::transport::Endpoint::from_shared(url).expect("a URL").connect().await.expect("connects");
        let mut metadata = tonic::metadata::MetadataMap::new();
        if let Some(token) = token {
            metadata.insert("authorization", format!("Bearer {token}").parse().expect("a header value"));
        }
        let called = tokio::time::timeout(Duration::from_secs(10), call(channel, metadata)).await;
        called.expect("an answer within 10 s").map_err(|s| s.code())
    })
}

/// `ReplicaService.Describe` of replica 0 of `tiny` at `address`.
fn describe(address: &str, token: Option<&str>) -> Result<(), tonic::Code> {
    grpc(address, token, |channel, metadata| async move {
        let request = pb::ReplicaRef { deployment: "tiny".into(), replica: 0 };
        let request = tonic::Request::from_parts(metadata, Default::default(), request);
        ReplicaServiceClient::new(channel).describe(request).await.map(drop)
    })
}

/// `StageService.PushActivations` of activations nobody waits for, to `address`.
fn push_activations(address: &str, token: Option<&str>) -> Result<(), tonic::Code> {
    grpc(address, token, |channel, metadata| async move {
        let header = pb::ActivationHeader { job_id: "nobody's".into(), rows: 1, cols: 1, ..Default::default() };
        let part = Some(pb::activation_message::Part::Header(header));
        let messages = tonic::codegen::tokio_stream::iter([pb::ActivationMessage { part }]);
        let request = tonic::Request::from_parts(metadata, Default::default(), messages);
        StageServiceClient::new(channel).push_activations(request).await.map(drop)
    })
}

/// The refusal a client command prints without the right admin token.
fn assert_token_refused(stderr: &str, what: &str) {
    assert!(stderr.contains("the coordinator refused the token: set --token"), "{what}: {stderr}");
    assert!(stderr.contains("admin token"), "{what}: {stderr}");
    assert!(!stderr.contains(ADMIN) && !stderr.contains(WORKER), "{what} shows a token: {stderr}");
}

#[test]
fn tokens_guard_every_grpc_api_and_keys_guard_the_http_api() {
    let s = scratch();
    let dir = s.path();
    let model = dir.join("tiny");
    awq_ok(["synthetic", &arg(&model), "--seed", "7"]);
    let calib = dir.join("calib.txt");
    std::fs::write(&calib, short_lines(6)).expect("the scratch folder is writable");
    let keys = dir.join("api-keys");
    std::fs::write(&keys, format!("# the HTTP API's keys\n{}\n\n   {}  \n#not-a-key\n", KEYS[0], KEYS[1]))
        .expect("the scratch folder is writable");
    let http = format!("127.0.0.1:{}", free_port());
    let tokens = Tokens { admin: ADMIN.into(), worker: WORKER.into() };
    let coordinator_args = ["--http-listen", &http, "--api-key-file", &arg(&keys)];
    let cluster = Cluster::start_secured(dir, StoreKind::Memory, &[], &["a", "b"], &coordinator_args, tokens);

    // Workers without the worker token, or with a wrong one, are refused and stop.
    for (name, extra, refused) in [
        ("nobody", &[][..], "no token"),
        ("intruder", &["--worker-token", "wrk-P3m6Hs1k8YdQ5c"][..], "a wrong token"),
        ("admin", &["--worker-token", ADMIN][..], "a wrong token"),
    ] {
        let mut worker = start_worker_with(dir, cluster.url(), name, extra);
        let status = cluster.wait_until(&format!("worker {name} to stop"), START_TIMEOUT, || worker.exited());
        let log = worker.log();
        assert_eq!(status.code(), Some(1), "worker {name}: {log}");
        assert!(log.contains("refused the worker token") && log.contains(refused), "worker {name}: {log}");
        assert!(log.contains("set --worker-token"), "worker {name}: {log}");
    }
    let joined: Vec<String> = cluster.workers_json().iter().map(|w| w["name"].as_str().unwrap_or("").into()).collect();
    assert_eq!(joined.len(), 2, "only a and b joined: {joined:?}");
    let coordinator_log = cluster.procs().iter().find(|p| p.name() == "coordinator").expect("the coordinator").log();
    for refusal in
        ["refused: no token where the worker token is required", "refused: a wrong token where the worker token"]
    {
        let line = coordinator_log.lines().find(|l| l.contains(refusal));
        let line = line.unwrap_or_else(|| panic!("the coordinator did not log {refusal:?}:\n{coordinator_log}"));
        assert!(line.contains("peer=127.0.0.1:") && line.contains("/awq.v1.WorkerService/Join"), "{line}");
    }

    // Client commands without the admin token, or with a wrong one (the worker's), are refused.
    let (model_arg, out) = (arg(&model), dir.join("tiny-awq"));
    let out_arg = arg(&out);
    let job_flags = ["--calib", &arg(&calib), "--seqlen", "128", "--n-samples", "6", "--group-size", "64"];
    let mut submit = vec!["submit", &model_arg, "-o", &out_arg];
    submit.extend(job_flags);
    let refused_commands: [&[&str]; 9] = [
        &submit,
        &["jobs"],
        &["workers"],
        &["status", "some-job"],
        &["watch", "some-job"],
        &["cancel", "some-job"],
        &["deployments"],
        &["deploy", &out_arg, "--name", "tiny"],
        &["undeploy", "tiny"],
    ];
    for token in [None, Some(WORKER), Some("adm-Z8q4Lx2v9TnR7")] {
        for args in refused_commands {
            assert_token_refused(&cluster.err_as(args, token), &format!("awq {} with {token:?}", args.join(" ")));
        }
    }
    assert_eq!(cluster.json(&["jobs"]), json!([]), "a refused submit created a job");
    assert!(!out.exists(), "a refused submit wrote {}", out.display());
    let coordinator_log = cluster.procs().iter().find(|p| p.name() == "coordinator").expect("the coordinator").log();
    assert!(
        coordinator_log
            .lines()
            .any(|l| l.contains("where the admin token is required") && l.contains("JobService/Submit")),
        "the coordinator did not log a refused submit:\n{coordinator_log}"
    );

    // With the token, a job over both workers: the first stage pushes its activations to the
    // second's worker.
    let mut args = submit.clone();
    args.push("--wait");
    let job = cluster.json_within(&args, TIMEOUT);
    assert_eq!(job["state"], "done", "{job}");
    let stage_workers: Vec<&str> =
        job["stages"].as_array().into_iter().flatten().filter_map(|s| s["worker"].as_str()).collect();
    assert!(
        stage_workers.iter().any(|w| w.starts_with("a-")) && stage_workers.iter().any(|w| w.starts_with("b-")),
        "{job}"
    );

    // Its output served by a replica pipelined over both workers, through the coordinator's gateway.
    let deploy = [
        "deploy",
        &out_arg,
        "--name",
        "tiny",
        "--pp",
        "2",
        "--max-model-len",
        "128",
        "--kv-cache-bytes",
        "8388608",
        "--wait",
        "--timeout",
        "120",
    ];
    let d = cluster.json_within(&deploy, TIMEOUT);
    assert_eq!(d["replicas"][0]["stage_workers"].as_array().map(Vec::len), Some(2), "{d}");

    // The first stage's worker answers its replica's calls only with the worker token, and so does
    // its stage service; it logs the refusals.
    let address = d["replicas"][0]["address"].as_str().unwrap_or_else(|| panic!("no replica address: {d}"));
    for (token, want) in [(None, Err(Unauthenticated)), (Some(ADMIN), Err(Unauthenticated)), (Some(WORKER), Ok(()))] {
        assert_eq!(describe(address, token), want, "Describe with {token:?}");
    }
    assert_eq!(push_activations(address, None), Err(Unauthenticated));
    let first = d["replicas"][0]["worker"].as_str().and_then(|w| w.split('-').next()).unwrap_or("?");
    let log = cluster.worker_log(first);
    for call in ["ReplicaService/Describe", "StageService/PushActivations"] {
        assert!(
            log.lines().any(|l| l.contains("where the worker token is required") && l.contains(call)),
            "{call}: {log}"
        );
    }

    let completion = json!({"model": "tiny", "prompt": "The lighthouse", "max_tokens": 2, "temperature": 0});
    for key in KEYS {
        let api = Endpoint { addr: http.clone(), api_key: Some(key.into()) };
        let (status, body) = api.get("/v1/models");
        assert!(status == 200 && body.contains("\"tiny\""), "/v1/models with {key}: {status} {body}");
        let (status, body) = api.post("/v1/completions", &completion);
        assert_eq!(status, 200, "a completion with {key}: {body}\n{}", cluster.logs());
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
        assert!(v["usage"]["completion_tokens"].as_u64().is_some_and(|n| (1..=2).contains(&n)), "{body}");
    }
    for key in [None, Some("key-one-Jf93K"), Some("#not-a-key"), Some(WORKER)] {
        let api = Endpoint { addr: http.clone(), api_key: key.map(String::from) };
        let (status, body) = api.post("/v1/completions", &completion);
        assert_eq!(status, 401, "with {key:?}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
        assert_eq!(
            (v["error"]["type"].as_str(), v["error"]["code"].as_str()),
            (Some("authentication_error"), Some("invalid_api_key")),
            "{body}"
        );
    }
    // /health and /metrics stay open (probes and scrapers carry no key).
    let open = Endpoint { addr: http.clone(), api_key: None };
    assert_eq!(open.get("/health").0, 200);
    assert_eq!(open.get("/metrics").0, 200);

    let undeployed = cluster.json(&["undeploy", "tiny"]);
    assert_eq!(undeployed["undeployed"], "tiny", "{undeployed}");

    // No process wrote a token or a key into its log.
    for proc in cluster.procs() {
        let log = proc.log();
        for secret in [ADMIN, WORKER, KEYS[0], KEYS[1]] {
            assert!(!log.contains(secret), "{} logged a secret:\n{log}", proc.name());
        }
    }
}
