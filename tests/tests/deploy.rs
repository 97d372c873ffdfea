//! Deployments on the cluster (issue 17), with real processes on loopback and a real etcd: `awq
//! deploy` places replicas of SmolLM2-135M on CPU workers (tp 3: ranks on threads), and the
//! coordinator's HTTP gateway answers for them with the greedy text of `awq serve` on one process;
//! a worker killed mid-request ends that request with an error within seconds while new requests
//! go to the other replica; the lost replica is placed again on the next worker that joins; a
//! coordinator killed and restarted on etcd takes the replicas back from the workers that rejoin it
//! without reloading them, and serves again; `awq undeploy` stops them. Every wait is bounded and
//! names what it waited for.

use std::time::Duration;

use awq_e2e::cluster::{free_port, Cluster, StoreKind};
use awq_e2e::serve::{Endpoint, Server};
use awq_e2e::*;
use serde_json::{json, Value};

/// How long a replica may take to load SmolLM2 on a CPU worker.
const LOAD: Duration = Duration::from_secs(120);

/// `awq deployments --json`'s entry for `name`.
fn deployment(cluster: &Cluster, name: &str) -> Value {
    let list = cluster.json(&["deployments"]);
    list.as_array().and_then(|l| l.iter().find(|d| d["name"] == name).cloned()).unwrap_or(Value::Null)
}

/// Each replica's (state, worker) of deployment `name`.
fn replicas(cluster: &Cluster, name: &str) -> Vec<(String, String)> {
    let d = deployment(cluster, name);
    let list = d["replicas"].as_array().cloned().unwrap_or_default();
    list.iter()
        .map(|r| (r["state"].as_str().unwrap_or("").to_string(), r["worker"].as_str().unwrap_or("").to_string()))
        .collect()
}

fn wait_ready(cluster: &Cluster, name: &str, what: &str) -> Vec<String> {
    cluster.wait_until(what, LOAD, || {
        let r = replicas(cluster, name);
        (!r.is_empty() && r.iter().all(|(state, _)| state == "ready")).then(|| r.into_iter().map(|(_, w)| w).collect())
    })
}

const PROMPTS: &[&str] = &["The capital of France is", "def fibonacci(n):", "Once upon a time"];

/// The greedy completion of `prompt` (16 tokens) from `api` as `model`, expecting 200.
fn greedy(api: &Endpoint, model: &str, prompt: &str) -> String {
    let (status, body) =
        api.post("/v1/completions", &json!({"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0}));
    assert_eq!(status, 200, "{prompt:?}: {body}");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    v["choices"][0]["text"].as_str().unwrap_or_else(|| panic!("no text: {body}")).to_string()
}

/// Kills worker `victim` while a long request to `model` runs: the request must end without
/// success within seconds (its replica, or a stage of it, died mid-way), never hang.
fn kill_mid_request(cluster: &mut Cluster, api: &Endpoint, model: &str, victim: &str) {
    let long = {
        let (api, model) = (api.clone(), model.to_string());
        std::thread::spawn(move || {
            let started = std::time::Instant::now();
            let body = json!({"model": model, "prompt": "Tell me a story.", "max_tokens": 240, "temperature": 0, "ignore_eos": true});
            let (status, text) = api.post("/v1/completions", &body);
            (status, text, started.elapsed())
        })
    };
    cluster.wait_until("the long request to run", Duration::from_secs(30), || {
        let (_, metrics) = api.get("/metrics");
        metrics.lines().any(|l| l.starts_with("awq:num_requests_running") && !l.ends_with(" 0")).then_some(())
    });
    cluster.kill_worker(victim);
    let (status, text, took) = long.join().expect("the request's thread");
    assert_ne!(status, 200, "a request whose replica died mid-way cannot succeed: {text}");
    assert!(took < Duration::from_secs(30), "the failed request took {took:?}");
}

/// How many times worker `name` started loading a replica.
fn loads(cluster: &Cluster, name: &str) -> usize {
    cluster.worker_log(name).matches("loading").count()
}

#[test]
fn replicas_are_placed_recovered_taken_back_after_a_coordinator_restart_and_undeployed() {
    let model = smollm2_135m();
    let dir = tempfile::tempdir().unwrap();
    let http = format!("127.0.0.1:{}", free_port());
    let mut cluster = Cluster::start_with(dir.path(), StoreKind::Etcd, &[], &["a", "b"], &["--http-listen", &http]);
    let api = Endpoint { addr: http.clone(), api_key: None };
    let model_arg = model.to_string_lossy().into_owned();
    let deploy = [
        "deploy",
        &model_arg,
        "--name",
        "smol",
        "--tp",
        "3",
        "--replicas",
        "2",
        "--max-model-len",
        "256",
        "--kv-cache-bytes",
        "50000000",
        "--wait",
        "--timeout",
        "120",
    ];
    let d = cluster.json_within(&deploy, LOAD);
    assert_eq!(d["name"], "smol", "{d}");
    let mut workers: Vec<String> =
        d["replicas"].as_array().unwrap().iter().map(|r| r["worker"].as_str().unwrap().to_string()).collect();
    workers.sort();
    assert_eq!(workers.len(), 2);
    assert_ne!(workers[0], workers[1], "two replicas, two workers");

    // A second deployment of the same name is refused; a bad field is named.
    let err = cluster.err(&["deploy", &model_arg, "--name", "smol"]);
    assert!(err.contains("exists"), "{err}");
    let err = cluster.err(&["deploy", &model_arg, "--name", "x", "--tp", "2"]);
    assert!(err.contains("tp"), "{err}");
    let err = cluster.err(&["deploy", &model_arg, "--name", "Bad Name"]);
    assert!(err.contains("name"), "{err}");
    let err = cluster.err(&["deploy", &model_arg, "--name", "other", "--served-model-name", "smol"]);
    assert!(err.contains("serves the model name \"smol\""), "{err}");

    // Through the coordinator's gateway, the greedy text of `awq serve` on one process.
    let (status, body) = api.get("/v1/models");
    assert!(status == 200 && body.contains("\"smol\""), "/v1/models: {status} {body}");
    let alone = Server::start(&model, &["--max-model-len", "256", "--kv-cache-bytes", "50000000", "--tp", "3"]);
    let want: Vec<String> = PROMPTS.iter().map(|p| greedy(&alone.endpoint(), &alone_name(&alone), p)).collect();
    drop(alone);
    for (prompt, want) in PROMPTS.iter().zip(&want) {
        assert_eq!(&greedy(&api, "smol", prompt), want, "{prompt:?} through the deployment");
    }
    let (status, body) = api.post("/v1/completions", &json!({"model": "nope", "prompt": "x", "max_tokens": 1}));
    assert_eq!(status, 404, "{body}");

    // The worker of replica 0 (the least loaded on a tie) killed mid-request: that request ends
    // with an error within seconds, never hangs; the next requests go to the other replica.
    let replica0 = replicas(&cluster, "smol")[0].1.clone();
    let victim = if replica0.starts_with("a-") { "a" } else { "b" };
    kill_mid_request(&mut cluster, &api, "smol", victim);
    cluster.wait_until("the lost replica to be pending", Duration::from_secs(30), || {
        replicas(&cluster, "smol").iter().any(|(state, _)| state == "pending").then_some(())
    });
    // The gateway drops its connection to the lost replica at its next refresh (500 ms).
    std::thread::sleep(Duration::from_secs(1));
    for (prompt, want) in PROMPTS.iter().zip(&want) {
        assert_eq!(&greedy(&api, "smol", prompt), want, "{prompt:?} on the surviving replica");
    }

    // Its replica loads on worker c when it joins.
    cluster.wait_until("a's replica to be pending", Duration::from_secs(30), || {
        replicas(&cluster, "smol").iter().any(|(state, _)| state == "pending").then_some(())
    });
    let survivor = if victim == "a" { "b" } else { "a" };
    cluster.add_worker("c");
    let on = wait_ready(&cluster, "smol", "both replicas ready again, one on c");
    assert!(on.iter().any(|w| w.starts_with("c-")), "{on:?}");

    // The coordinator killed and restarted on etcd: the deployment is read back and the workers'
    // replicas are taken back as they run, without loading again.
    let before = (loads(&cluster, survivor), loads(&cluster, "c"));
    cluster.restart_coordinator();
    wait_ready(&cluster, "smol", "the replicas taken back after the restart");
    assert_eq!(
        (loads(&cluster, survivor), loads(&cluster, "c")),
        before,
        "a replica was loaded again\n{}",
        cluster.logs()
    );
    let answered = cluster.wait_until("the restarted gateway to answer", Duration::from_secs(30), || {
        let (status, _) = api.post("/v1/completions", &json!({"model": "smol", "prompt": PROMPTS[0], "max_tokens": 1}));
        (status == 200).then_some(())
    });
    let () = answered;
    assert_eq!(greedy(&api, "smol", PROMPTS[0]), want[0], "after the restart");

    // Undeployed: the replicas stop, the workers are free again.
    cluster.json(&["undeploy", "smol"]);
    assert_eq!(cluster.json(&["deployments"]), Value::Array(vec![]));
    cluster.wait_until("both workers to stop their replicas", Duration::from_secs(30), || {
        (cluster.worker_log(survivor).contains("stopped") && cluster.worker_log("c").contains("stopped")).then_some(())
    });
    let err = cluster.err(&["undeploy", "smol"]);
    assert!(err.contains("does not exist"), "{err}");
}

/// The model name `awq serve` serves (the model path as given).
fn alone_name(server: &Server) -> String {
    let (_, body) = server.endpoint().get("/v1/models");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("/v1/models: not JSON ({e}): {body}"));
    v["data"][0]["id"].as_str().unwrap_or_else(|| panic!("/v1/models: no model: {body}")).to_string()
}

/// `awq submit --deploy`: a name already served is refused at submission; the job's output is
/// served as soon as the job is done, on the worker that quantized it, from the blocks it kept in
/// memory, and answers as `awq serve` of that output (read from disk) does. Prints the time from submission to the first served token (BENCHMARKS.md).
#[test]
fn a_job_submitted_with_deploy_is_served_on_its_worker_when_done() {
    let model = smollm2_135m();
    let dir = tempfile::tempdir().unwrap();
    let http = format!("127.0.0.1:{}", free_port());
    let cluster = Cluster::start_with(dir.path(), StoreKind::Memory, &[], &["a"], &["--http-listen", &http]);
    let api = Endpoint { addr: http, api_key: None };
    let out = dir.path().join("smol-awq");
    let (model_arg, out_arg) = (model.to_string_lossy().into_owned(), out.to_string_lossy().into_owned());
    // Round-to-nearest: the deployment path is under test, not the scale search (seconds, not a
    // minute, on 2 cores).
    let quant = ["--method", "rtn", "--group-size", "64"];
    let serve = ["--max-model-len", "256", "--kv-cache-bytes", "50000000", "--served-model-name", "smol-awq"];

    // Flags of a deployment without --deploy are refused; so is a bad deployment field, before
    // anything runs.
    let mut args = vec!["submit", &model_arg, "-o", &out_arg, "--group-size", "64", "--tp", "2"];
    let err = cluster.err(&args);
    assert!(err.contains("need --deploy NAME"), "{err}");
    args.extend(["--deploy", "q"]);
    let err = cluster.err(&args);
    assert!(err.contains("deploy.tp"), "{err}");
    assert_eq!(cluster.json(&["jobs"]), Value::Array(vec![]), "a refused submission left a job");

    let started = std::time::Instant::now();
    let mut args = vec!["submit", &model_arg, "-o", &out_arg, "--deploy", "q"];
    args.extend(quant);
    args.extend(serve);
    let job = cluster.json(&args);
    let first = cluster.wait_until("the job's output to be served", LOAD, || {
        let body = json!({"model": "smol-awq", "prompt": PROMPTS[0], "max_tokens": 1, "temperature": 0});
        let (status, _) = api.post("/v1/completions", &body);
        (status == 200).then(|| started.elapsed())
    });
    let job = cluster.json(&["status", job["id"].as_str().unwrap()]);
    assert_eq!(job["state"], "done", "{job}");
    let d = deployment(&cluster, "q");
    assert_eq!(d["model"], out_arg.as_str(), "{d}");
    assert_eq!(d["served_model_name"], "smol-awq", "{d}");
    assert_eq!(
        replicas(&cluster, "q"),
        [("ready".to_string(), job["stages"][0]["worker"].as_str().unwrap_or("?").to_string())],
        "served on the worker that quantized it: {job}"
    );
    // ... from the blocks it kept in memory, all 30 of them, none read back from the output.
    let log = cluster.worker_log("a");
    assert!(
        log.lines().any(|l| l.contains("30 blocks (") && l.contains("served from memory")),
        "worker a did not serve its kept blocks:\n{log}"
    );
    eprintln!("submit to first served token: {:.1} s (SmolLM2-135M, 1 CPU worker, RTN g64)", first.as_secs_f64());

    // The same answers as `awq serve` of the output.
    let alone = Server::start(&out, &serve);
    let want = greedy(&alone.endpoint(), "smol-awq", PROMPTS[1]);
    drop(alone);
    assert_eq!(greedy(&api, "smol-awq", PROMPTS[1]), want);

    // A second job asking for the same name is refused at submission.
    let other = dir.path().join("smol-awq-2").to_string_lossy().into_owned();
    let err = cluster.err(&["submit", &model_arg, "-o", &other, "--group-size", "64", "--deploy", "q"]);
    assert!(err.contains("a deployment named q exists"), "{err}");
}

/// A replica pipelined over two workers (`--pp 2`: blocks 0..15 and 15..30 of SmolLM2, each stage
/// 3 ranks on threads) answers with the greedy text of `awq serve`; its second stage's worker
/// killed mid-request: that request fails within seconds, the replica waits for workers, and when
/// worker c joins it is placed again whole and answers the same; the coordinator restarted on etcd
/// takes it back from its two stages' workers without a reload.
#[test]
fn a_replica_pipelined_over_two_workers_serves_and_is_placed_again_whole() {
    let model = smollm2_135m();
    let dir = tempfile::tempdir().unwrap();
    let http = format!("127.0.0.1:{}", free_port());
    let mut cluster = Cluster::start_with(dir.path(), StoreKind::Etcd, &[], &["a", "b"], &["--http-listen", &http]);
    let api = Endpoint { addr: http, api_key: None };
    let model_arg = model.to_string_lossy().into_owned();
    let engine = ["--max-model-len", "256", "--kv-cache-bytes", "50000000"];
    let mut deploy =
        vec!["deploy", &model_arg, "--name", "piped", "--pp", "2", "--tp", "3", "--wait", "--timeout", "120"];
    deploy.extend(engine);
    let d = cluster.json_within(&deploy, LOAD);
    let stages: Vec<String> = d["replicas"][0]["stage_workers"]
        .as_array()
        .unwrap_or_else(|| panic!("no stage workers: {d}"))
        .iter()
        .map(|w| w.as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(stages.len(), 2, "{d}");
    assert_ne!(stages[0], stages[1], "two stages, two workers: {d}");

    let alone = Server::start(&model, &engine);
    let want: Vec<String> = PROMPTS[..2].iter().map(|p| greedy(&alone.endpoint(), &alone_name(&alone), p)).collect();
    drop(alone);
    for (prompt, want) in PROMPTS.iter().zip(&want) {
        assert_eq!(&greedy(&api, "piped", prompt), want, "{prompt:?} through two stages");
    }

    // The second stage's worker killed while a request runs.
    let victim = if stages[1].starts_with("a-") { "a" } else { "b" };
    kill_mid_request(&mut cluster, &api, "piped", victim);
    cluster.wait_until("the replica to be pending", Duration::from_secs(30), || {
        replicas(&cluster, "piped").iter().all(|(state, _)| state == "pending").then_some(())
    });

    cluster.add_worker("c");
    wait_ready(&cluster, "piped", "the replica placed again on the survivor and c");
    let d = deployment(&cluster, "piped");
    let stages = d["replicas"][0]["stage_workers"].to_string();
    assert!(stages.contains("\"c-") && !stages.contains(&format!("\"{victim}-")), "{d}");
    for (prompt, want) in PROMPTS.iter().zip(&want) {
        assert_eq!(&greedy(&api, "piped", prompt), want, "{prompt:?} after the new placement");
    }

    // The coordinator killed and restarted on etcd: both stages rejoin and the replica is taken back
    // whole, on the same workers, without a reload.
    let survivor = if victim == "a" { "b" } else { "a" };
    let before = (loads(&cluster, survivor), loads(&cluster, "c"));
    cluster.restart_coordinator();
    wait_ready(&cluster, "piped", "the pipelined replica taken back after the restart");
    // Worker ids are given anew at each join: the names before their `-N` say which worker it is.
    let names = |stages: &Value| -> Vec<String> {
        let list = stages.as_array().cloned().unwrap_or_default();
        list.iter().map(|w| w.as_str().unwrap_or_default().split('-').next().unwrap_or_default().to_string()).collect()
    };
    assert_eq!(
        names(&deployment(&cluster, "piped")["replicas"][0]["stage_workers"]),
        names(&d["replicas"][0]["stage_workers"])
    );
    assert_eq!(
        (loads(&cluster, survivor), loads(&cluster, "c")),
        before,
        "a stage was loaded again\n{}",
        cluster.logs()
    );
    cluster.wait_until("the restarted gateway to answer", Duration::from_secs(30), || {
        let (status, _) =
            api.post("/v1/completions", &json!({"model": "piped", "prompt": PROMPTS[0], "max_tokens": 1}));
        (status == 200).then_some(())
    });
    assert_eq!(greedy(&api, "piped", PROMPTS[1]), want[1], "after the restart");
}
