//! Deployments on the cluster (issue 17), with real processes on loopback and a real etcd: `awq
//! deploy` places replicas of SmolLM2-135M on CPU workers (tp 3: ranks on threads), a lost worker's
//! replica is placed again on the next worker that joins, a coordinator killed and restarted on
//! etcd takes the replicas back from the workers that rejoin it without reloading them, and `awq
//! undeploy` stops them. Every wait is bounded and names what it waited for.

use std::time::Duration;

use awq_e2e::cluster::{Cluster, StoreKind};
use awq_e2e::*;
use serde_json::Value;

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

/// How many times worker `name` started loading a replica.
fn loads(cluster: &Cluster, name: &str) -> usize {
    cluster.worker_log(name).matches("loading").count()
}

#[test]
fn replicas_are_placed_recovered_taken_back_after_a_coordinator_restart_and_undeployed() {
    let model = smollm2_135m();
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(dir.path(), StoreKind::Etcd, &[], &["a", "b"]);
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

    // A serving worker takes no quantization stage: the workers list what they serve.
    let listed = cluster.workers_json();
    assert_eq!(listed.len(), 2, "{listed:?}");

    // Worker a lost: its replica waits, then loads on worker c.
    cluster.kill_worker("a");
    cluster.wait_until("a's replica to be pending", Duration::from_secs(30), || {
        replicas(&cluster, "smol").iter().any(|(state, _)| state == "pending").then_some(())
    });
    cluster.add_worker("c");
    let on = wait_ready(&cluster, "smol", "both replicas ready again, one on c");
    assert!(on.iter().any(|w| w.starts_with("c-")), "{on:?}");

    // The coordinator killed and restarted on etcd: the deployment is read back and the workers'
    // replicas are taken back as they run, without loading again.
    let before = (loads(&cluster, "b"), loads(&cluster, "c"));
    cluster.restart_coordinator();
    wait_ready(&cluster, "smol", "the replicas taken back after the restart");
    assert_eq!((loads(&cluster, "b"), loads(&cluster, "c")), before, "a replica was loaded again\n{}", cluster.logs());

    // Undeployed: the replicas stop, the workers are free again.
    cluster.json(&["undeploy", "smol"]);
    assert_eq!(cluster.json(&["deployments"]), Value::Array(vec![]));
    cluster.wait_until("both workers to stop their replicas", Duration::from_secs(30), || {
        (cluster.worker_log("b").contains("stopped") && cluster.worker_log("c").contains("stopped")).then_some(())
    });
    let err = cluster.err(&["undeploy", "smol"]);
    assert!(err.contains("does not exist"), "{err}");
}
