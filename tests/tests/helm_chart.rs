//! The Helm chart (`charts/awq-cluster`) and the container image (`Dockerfile`), checked without a
//! Kubernetes cluster and without pulling an image:
//!
//! - `helm lint --strict` and `helm template` on every example values file, every manifest
//!   validated with kubernetes-validate (strict: unknown fields fail) against [`KUBE_VERSION`];
//! - unit checks on the rendered manifests (parsed with serde_yaml): GPU counts, addresses, the
//!   schema's refusals, security contexts, TLS inside the cluster (flags, mounts, probes, https://),
//!   and that every `awq` command line uses only subcommands and flags the binary has;
//! - the rendered commands run: the chart rendered with `ci/loopback-values.yaml` (every address on
//!   loopback), each container's command, args and env taken from the manifests (env resolved and
//!   `$(VAR)` expanded as the kubelet does, volumes as folders of a scratch directory, each worker
//!   pod on its own loopback address as its pod IP) and started as a local process: etcd, the
//!   coordinator (with its HTTP API), two CPU workers and the server. A job submitted to them must
//!   complete on both workers; the deployments Job's `awq deploy` must serve its output on a worker
//!   through the coordinator's HTTP API (`helm test`'s `/v1/models`, a completion), keep it as it
//!   is when run again with the same values and replace it when the values change (a helm upgrade);
//!   the server must serve the output to the `helm test` pod's request. Again with mutual TLS on
//!   (a CA and certificate made at test time as the Secret): the coordinator, two workers, a job
//!   on both and `helm test`'s `awq workers` and HTTPS curl.
//!
//! helm and kubernetes-validate come from `tools/fetch-helm` (into target/tools/bin; `.ci/run` runs
//! it), or from PATH. A missing tool is a failure that says so, never a skip.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use awq_e2e::cluster::{awq_within, etcd_bin, free_ports, logs, wait_until, Proc, CLIENT_TIMEOUT, START_TIMEOUT};
use awq_e2e::{awq_bin, awq_ok, repo_root, scratch, short_lines};
use serde_json::{json, Value};
use serde_yaml::Value as Yaml;

/// The Kubernetes version manifests are rendered for and validated against (the kubectl that the
/// helm package ships is 1.35).
const KUBE_VERSION: &str = "1.35.0";
const RELEASE: &str = "rel";
const NAMESPACE: &str = "awq-test";
/// How long a quantization job of the tiny synthetic model may take (seconds; margin for a busy CI).
const JOB_TIMEOUT: Duration = Duration::from_secs(300);

fn chart_dir() -> PathBuf {
    repo_root().join("charts").join("awq-cluster")
}

fn loopback_values() -> PathBuf {
    chart_dir().join("ci").join("loopback-values.yaml")
}

/// Every `charts/awq-cluster/examples/*.yaml`, sorted.
fn examples() -> Vec<PathBuf> {
    let dir = chart_dir().join("examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

fn file_name(p: &Path) -> String {
    p.file_name().expect("a file name").to_string_lossy().into_owned()
}

// ---------------------------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------------------------

/// `target/tools/bin/NAME` (what tools/fetch-helm installs), else NAME on PATH; a failure that
/// points at tools/fetch-helm otherwise.
fn tool(name: &str) -> PathBuf {
    let installed = repo_root().join("target").join("tools").join("bin").join(name);
    if installed.is_file() {
        return installed;
    }
    let on_path = std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file()));
    on_path.unwrap_or_else(|| {
        panic!(
            "{name} is neither in {} nor on PATH: run tools/fetch-helm (it installs helm and kubernetes-validate \
             into target/tools/bin; .ci/run does this before the tests)",
            installed.display()
        )
    })
}

fn helm_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| tool("helm"))
}

fn run(mut cmd: Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `helm ARGS...`; `Ok(stdout)` or `Err(stdout + stderr)`.
fn helm(args: &[String]) -> Result<String, String> {
    let mut cmd = Command::new(helm_bin());
    cmd.args(args).current_dir(repo_root());
    let out = run(cmd);
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(format!("helm {} ({}):\n{}{}", args.join(" "), out.status, text(&out.stdout), text(&out.stderr)))
    }
}

/// What a render is given: values files and `--set` assignments.
#[derive(Clone, Default)]
struct Values {
    files: Vec<PathBuf>,
    sets: Vec<String>,
}

impl Values {
    fn file(path: &Path) -> Values {
        Values { files: vec![path.to_path_buf()], sets: Vec::new() }
    }

    fn set(mut self, assignment: &str) -> Values {
        self.sets.push(assignment.to_string());
        self
    }

    fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for f in &self.files {
            args.extend(["-f".to_string(), f.to_string_lossy().into_owned()]);
        }
        for s in &self.sets {
            args.extend(["--set".to_string(), s.clone()]);
        }
        args
    }
}

fn template_args(values: &Values) -> Vec<String> {
    let chart = chart_dir().to_string_lossy().into_owned();
    let mut args: Vec<String> = ["template", RELEASE, &chart, "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
        .map(String::from)
        .into();
    args.extend(values.args());
    args
}

fn lint_args(values: &Values) -> Vec<String> {
    let chart = chart_dir().to_string_lossy().into_owned();
    let mut args: Vec<String> = ["lint", "--strict", &chart, "--namespace", NAMESPACE].map(String::from).into();
    args.extend(values.args());
    args
}

/// `helm template` of the chart with `values`, split into its documents.
fn render(values: &Values) -> Vec<Yaml> {
    render_with_text(values).into_iter().map(|(_, doc)| doc).collect()
}

/// The documents of a multi-document YAML stream (helm separates them with `---` lines), each as
/// its text and parsed.
fn split_documents(text: &str) -> Vec<(String, Yaml)> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line == "---" || line.starts_with("--- ") {
            docs.push(String::new());
        } else {
            let doc = docs.last_mut().expect("at least one document");
            doc.push_str(line);
            doc.push('\n');
        }
    }
    docs.into_iter()
        .map(|doc| {
            let parsed = serde_yaml::from_str::<Yaml>(&doc)
                .unwrap_or_else(|e| panic!("helm rendered YAML that does not parse: {e}\n{doc}"));
            (doc, parsed)
        })
        .filter(|(_, parsed)| !parsed.is_null())
        .collect()
}

/// [`render`], each document with its text as helm wrote it.
fn render_with_text(values: &Values) -> Vec<(String, Yaml)> {
    split_documents(&helm(&template_args(values)).unwrap_or_else(|e| panic!("{e}")))
}

// ---------------------------------------------------------------------------------------------
// Reading manifests
// ---------------------------------------------------------------------------------------------

fn get<'a>(v: &'a Yaml, path: &str) -> Option<&'a Yaml> {
    path.split('.').try_fold(v, |v, key| v.get(key))
}

fn str_at<'a>(v: &'a Yaml, path: &str) -> &'a str {
    get(v, path).and_then(Yaml::as_str).unwrap_or_else(|| panic!("no string at {path} in {}", yaml(v)))
}

fn list_at<'a>(v: &'a Yaml, path: &str) -> &'a [Yaml] {
    get(v, path).and_then(Yaml::as_sequence).map_or(&[], Vec::as_slice)
}

fn yaml(v: &Yaml) -> String {
    serde_yaml::to_string(v).unwrap_or_default()
}

fn kind(doc: &Yaml) -> &str {
    str_at(doc, "kind")
}

fn name(doc: &Yaml) -> &str {
    str_at(doc, "metadata.name")
}

fn find<'a>(docs: &'a [Yaml], kind_: &str, name_: &str) -> &'a Yaml {
    docs.iter().find(|d| kind(d) == kind_ && name(d) == name_).unwrap_or_else(|| {
        let have: Vec<String> = docs.iter().map(|d| format!("{}/{}", kind(d), name(d))).collect();
        panic!("no {kind_} {name_} among the rendered manifests: {have:?}")
    })
}

fn full(suffix: &str) -> String {
    format!("{RELEASE}-awq-cluster-{suffix}")
}

/// The pod spec of a workload (Deployment, StatefulSet, Job) or of a Pod; None for other kinds.
fn pod_spec(doc: &Yaml) -> Option<&Yaml> {
    match kind(doc) {
        "Deployment" | "StatefulSet" | "Job" | "DaemonSet" => get(doc, "spec.template.spec"),
        "Pod" => get(doc, "spec"),
        _ => None,
    }
}

/// Every container and init container of a pod spec.
fn containers(spec: &Yaml) -> Vec<&Yaml> {
    list_at(spec, "initContainers").iter().chain(list_at(spec, "containers")).collect()
}

fn container<'a>(doc: &'a Yaml, container_name: &str) -> &'a Yaml {
    let spec = pod_spec(doc).unwrap_or_else(|| panic!("{} {} has no pods", kind(doc), name(doc)));
    containers(spec)
        .into_iter()
        .find(|c| str_at(c, "name") == container_name)
        .unwrap_or_else(|| panic!("{} {} has no container {container_name}", kind(doc), name(doc)))
}

/// command + args of a container.
fn command_line(c: &Yaml) -> Vec<String> {
    list_at(c, "command")
        .iter()
        .chain(list_at(c, "args"))
        .map(|a| match a {
            Yaml::String(s) => s.clone(),
            other => panic!("a command-line word that is not a string: {}", yaml(other)),
        })
        .collect()
}

/// The value after `flag` in a command line (`--flag value` or `--flag=value`).
fn flag_value<'a>(line: &'a [String], flag: &str) -> &'a str {
    let prefix = format!("{flag}=");
    line.iter()
        .enumerate()
        .find_map(|(i, a)| if a == flag { line.get(i + 1).map(String::as_str) } else { a.strip_prefix(&prefix) })
        .unwrap_or_else(|| panic!("no {flag} in {line:?}"))
}

/// A container's port number by name.
fn container_port(c: &Yaml, port_name: &str) -> u64 {
    list_at(c, "ports")
        .iter()
        .find(|p| str_at(p, "name") == port_name)
        .and_then(|p| get(p, "containerPort").and_then(Yaml::as_u64))
        .unwrap_or_else(|| panic!("container {} has no port {port_name}", str_at(c, "name")))
}

/// The Service whose selector picks the pods of `workload`.
fn service_of<'a>(docs: &'a [Yaml], workload: &Yaml, headless: bool) -> &'a Yaml {
    let pod_labels = get(workload, "spec.template.metadata.labels").and_then(Yaml::as_mapping).expect("pod labels");
    docs.iter()
        .filter(|d| kind(d) == "Service")
        .filter(|s| (str_at_opt(s, "spec.clusterIP") == Some("None")) == headless)
        .find(|s| {
            get(s, "spec.selector")
                .and_then(Yaml::as_mapping)
                .is_some_and(|sel| sel.iter().all(|(k, v)| pod_labels.get(k) == Some(v)))
        })
        .unwrap_or_else(|| {
            panic!("no {}Service selects the pods of {}", if headless { "headless " } else { "" }, name(workload))
        })
}

fn str_at_opt<'a>(v: &'a Yaml, path: &str) -> Option<&'a str> {
    get(v, path).and_then(Yaml::as_str)
}

fn service_port(svc: &Yaml, port_name: &str) -> u64 {
    list_at(svc, "spec.ports")
        .iter()
        .find(|p| str_at(p, "name") == port_name)
        .and_then(|p| get(p, "port").and_then(Yaml::as_u64))
        .unwrap_or_else(|| panic!("Service {} has no port {port_name}", name(svc)))
}

/// Standard base64 (Secret data).
fn base64_decode(s: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {s}"),
        }
    };
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=' && !c.is_ascii_whitespace()).collect();
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &c)| n | value(c) << (18 - 6 * i));
        out.extend(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// 1. Lint, render, validate every example
// ---------------------------------------------------------------------------------------------

/// Chart.yaml's appVersion is the workspace's version (the image tag the chart pulls by default).
#[test]
fn chart_app_version_is_the_workspace_version() {
    let cargo = std::fs::read_to_string(repo_root().join("Cargo.toml")).expect("Cargo.toml");
    let section = cargo.split("[workspace.package]").nth(1).expect("Cargo.toml has [workspace.package]");
    let version = section
        .lines()
        .find_map(|l| {
            l.trim().strip_prefix("version").map(|v| v.trim().trim_start_matches('=').trim().trim_matches('"'))
        })
        .expect("[workspace.package] has a version");
    let chart: Yaml =
        serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("Chart.yaml")).expect("Chart.yaml"))
            .expect("YAML");
    assert_eq!(str_at(&chart, "appVersion"), version, "Chart.yaml's appVersion is not the workspace version");
}

/// The examples the chart promises exist, and `helm lint --strict` passes on each (and on the
/// loopback values of the run test).
#[test]
fn helm_lint_strict_passes_on_every_example() {
    let names: BTreeSet<String> = examples().iter().map(|p| file_name(p)).collect();
    let expected = [
        "default.yaml",
        "cpu-only.yaml",
        "2-nodes-8-gpus-external-etcd.yaml",
        "tls-apikeys.yaml",
        "tls-in-cluster.yaml",
        "with-deployments.yaml",
    ];
    for expected in expected {
        assert!(names.contains(expected), "charts/awq-cluster/examples/{expected} is missing (have {names:?})");
    }
    for file in examples().iter().chain([&loopback_values()]) {
        let out = helm(&lint_args(&Values::file(file))).unwrap_or_else(|e| panic!("{}: {e}", file_name(file)));
        assert!(out.contains("0 chart(s) failed"), "{}: {out}", file_name(file));
    }
}

/// ServiceMonitor is a CRD of the Prometheus operator: kubernetes-validate has no schema for it.
const SKIPPED_KINDS: &[&str] = &["ServiceMonitor"];

/// The renders every check below looks at: each example (with-deployments.yaml,
/// tls-apikeys.yaml and tls-in-cluster.yaml render the deployments Job), tls-in-cluster.yaml with
/// the server (`awq serve` over HTTPS) and the loopback values (the server too).
fn every_render() -> Vec<(String, Values)> {
    let mut renders: Vec<(String, Values)> = examples().iter().map(|p| (file_name(p), Values::file(p))).collect();
    renders.push(("tls-in-cluster.yaml + server".into(), tls_example().set(WITH_SERVER)));
    renders.push(("ci/loopback-values.yaml".into(), Values::file(&loopback_values())));
    renders
}

fn tls_example() -> Values {
    Values::file(&chart_dir().join("examples").join("tls-in-cluster.yaml"))
}

/// The standalone server on, for renders that check it.
const WITH_SERVER: &str = "server.enabled=true,server.model=m";

#[test]
fn every_rendered_manifest_validates_against_kubernetes_strictly() {
    let s = scratch();
    let mut files = Vec::new();
    let mut expected_passes = 0;
    for (i, (label, values)) in every_render().iter().enumerate() {
        // As helm wrote them (YAML 1.1 readers, as kubectl's, see `off` differently from serde_yaml).
        let docs = render_with_text(values);
        let kept: Vec<&str> =
            docs.iter().filter(|(_, d)| !SKIPPED_KINDS.contains(&kind(d))).map(|(t, _)| t.as_str()).collect();
        assert!(kept.len() >= 8, "{label}: only {} manifests rendered", kept.len());
        expected_passes += kept.len();
        let file = s.path().join(format!("render-{i}.yaml"));
        std::fs::write(&file, kept.join("---\n")).expect("the scratch folder is writable");
        files.push((label.clone(), file));
    }
    let mut cmd = Command::new(tool("kubernetes-validate"));
    cmd.args(["--strict", "--kubernetes-version", KUBE_VERSION]).args(files.iter().map(|(_, f)| f));
    let out = run(cmd);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    let legend: Vec<String> = files.iter().map(|(l, f)| format!("{} = {l}", file_name(f))).collect();
    assert!(out.status.success(), "kubernetes-validate failed ({}):\n{stdout}{stderr}\n{legend:#?}", out.status);
    let report = format!("{stdout}{stderr}");
    assert!(!report.contains("ERROR") && !report.contains("WARN"), "{report}\n{legend:#?}");
    assert_eq!(report.matches(" passed for resource ").count(), expected_passes, "{report}");
}

// ---------------------------------------------------------------------------------------------
// 2. Unit checks on rendered manifests
// ---------------------------------------------------------------------------------------------

/// `check_gpus(n)`: with `workers.gpus = n` (and the server's), nvidia.com/gpu is n in requests
/// and in limits, and `--device` names exactly cuda:0..n-1 (`cpu` and no GPU resource for 0).
/// The worker pod runs one worker per device, GPU i's on stagePort + i: its container declares
/// exactly those max(1, n) stage ports (`stage`, `stage-1`, ...; `--listen` and `--advertise` on
/// the first, where the probes connect), its headless Service publishes each, and the workers'
/// NetworkPolicy lets the coordinator reach each.
fn check_gpus(n: u64) {
    const STAGE_PORT: u64 = 50300;
    let values = Values::default()
        .set(&format!("workers.gpus={n}"))
        .set(&format!("workers.stagePort={STAGE_PORT}"))
        .set(&format!("server.gpus={n}"))
        .set("server.enabled=true")
        .set("server.model=m");
    let docs = render(&values);
    let device =
        if n == 0 { "cpu".to_string() } else { (0..n).map(|i| format!("cuda:{i}")).collect::<Vec<_>>().join(",") };
    for (workload, kind_, c) in [(full("workers"), "StatefulSet", "worker"), (full("server"), "Deployment", "server")] {
        let c = container(find(&docs, kind_, &workload), c);
        for part in ["requests", "limits"] {
            let gpus =
                get(c, &format!("resources.{part}")).and_then(|r| r.get("nvidia.com/gpu")).and_then(Yaml::as_u64);
            let expected = (n > 0).then_some(n);
            assert_eq!(gpus, expected, "{workload}: {part}.nvidia.com/gpu with gpus={n}");
        }
        assert_eq!(flag_value(&command_line(c), "--device"), device, "{workload}: --device with gpus={n}");
    }

    let workers = find(&docs, "StatefulSet", &full("workers"));
    let c = container(workers, "worker");
    let expected: Vec<(String, u64)> = (0..n.max(1))
        .map(|i| (if i == 0 { "stage".to_string() } else { format!("stage-{i}") }, STAGE_PORT + i))
        .collect();
    let declared: Vec<(String, u64)> = list_at(c, "ports")
        .iter()
        .filter(|p| str_at(p, "name").starts_with("stage"))
        .map(|p| (str_at(p, "name").to_string(), get(p, "containerPort").and_then(Yaml::as_u64).unwrap_or(0)))
        .collect();
    assert_eq!(declared, expected, "the worker container's stage ports with gpus={n}");
    for (port_name, _) in &expected {
        assert!(port_name.len() <= 15, "port name {port_name} is longer than 15 characters");
    }
    let line = command_line(c);
    for flag in ["--listen", "--advertise"] {
        assert_eq!(flag_value(&line, flag), format!("$(POD_IP):{STAGE_PORT}"), "{flag} with gpus={n}");
    }
    let started = get(c, "startupProbe").and_then(|p| get(p, "tcpSocket.port")).and_then(Yaml::as_str);
    assert_eq!(started, Some("stage"), "the workers' startupProbe with gpus={n}");
    let ready = get(c, "readinessProbe").and_then(|p| get(p, "grpc.port")).and_then(Yaml::as_u64);
    assert_eq!(ready, Some(STAGE_PORT), "the workers' readinessProbe (gRPC health) with gpus={n}");

    let svc = service_of(&docs, workers, true);
    let published: Vec<(String, u64, String)> = list_at(svc, "spec.ports")
        .iter()
        .map(|p| {
            let number = get(p, "port").and_then(Yaml::as_u64).unwrap_or(0);
            (str_at(p, "name").to_string(), number, str_at(p, "targetPort").to_string())
        })
        .collect();
    let expected_published: Vec<(String, u64, String)> =
        expected.iter().map(|(name_, port)| (name_.clone(), *port, name_.clone())).collect();
    assert_eq!(published, expected_published, "the workers' headless Service with gpus={n}");

    // The coordinator's rule names each port (or covers it with port..endPort).
    let policy = find(&docs, "NetworkPolicy", &full("workers"));
    let from_coordinator = |r: &Yaml| {
        list_at(r, "from").iter().any(|f| {
            get(f, "podSelector.matchLabels").and_then(|l| l.get("app.kubernetes.io/component")).and_then(Yaml::as_str)
                == Some("coordinator")
        })
    };
    let admitted = |number: u64| {
        list_at(policy, "spec.ingress").iter().filter(|r| from_coordinator(r)).any(|r| {
            let ports = list_at(r, "ports");
            ports.is_empty()
                || ports.iter().any(|q| match get(q, "port") {
                    Some(Yaml::String(named)) => expected.iter().any(|(e, p)| e == named && *p == number),
                    Some(port) => {
                        let first = port.as_u64().unwrap_or(u64::MAX);
                        let last = get(q, "endPort").and_then(Yaml::as_u64).unwrap_or(first);
                        (first..=last).contains(&number)
                    }
                    None => true,
                })
        })
    };
    for (port_name, number) in &expected {
        assert!(admitted(*number), "the coordinator cannot reach the workers' {port_name} ({number}) with gpus={n}");
    }
}

#[test]
fn gpu_count_reaches_requests_limits_and_device() {
    for n in [0, 1, 2, 8] {
        check_gpus(n);
    }
}

/// The workers' and the `helm test` pod's `--coordinator` is the coordinator Service's DNS name
/// and port, and that Service reaches the coordinator's gRPC port; the coordinator's `--store` is
/// the etcd Service's, which reaches etcd's client port.
#[test]
fn components_find_each_other_through_their_services() {
    let docs = render(&Values::default());
    let coordinator = find(&docs, "Deployment", &full("coordinator"));
    let svc = service_of(&docs, coordinator, false);
    let c = container(coordinator, "coordinator");
    let grpc = container_port(c, "grpc");
    assert_eq!(service_port(svc, "grpc"), grpc, "the coordinator Service's port");
    assert!(flag_value(&command_line(c), "--listen").ends_with(&format!(":{grpc}")), "--listen is not the grpc port");
    let url = format!("http://{}.{NAMESPACE}.svc.cluster.local:{grpc}", name(svc));

    let workers = find(&docs, "StatefulSet", &full("workers"));
    assert_eq!(
        flag_value(&command_line(container(workers, "worker")), "--coordinator"),
        url,
        "the workers' --coordinator"
    );
    let test_pod = find(&docs, "Pod", &full("test"));
    assert_eq!(
        flag_value(&command_line(container(test_pod, "workers")), "--coordinator"),
        url,
        "helm test's --coordinator"
    );
    // Stable names: the StatefulSet's serviceName is a headless Service selecting its pods.
    assert_eq!(str_at(workers, "spec.serviceName"), name(service_of(&docs, workers, true)));

    let etcd = find(&docs, "StatefulSet", &full("etcd"));
    let etcd_svc = service_of(&docs, etcd, false);
    let client = container_port(container(etcd, "etcd"), "client");
    assert_eq!(service_port(etcd_svc, "client"), client);
    let store = format!("etcd://{}.{NAMESPACE}.svc.cluster.local:{client}", name(etcd_svc));
    assert_eq!(flag_value(&command_line(c), "--store"), store, "the coordinator's --store");
    assert_eq!(str_at(etcd, "spec.serviceName"), name(service_of(&docs, etcd, true)));

    // External etcd: no StatefulSet, and --store is the endpoint.
    let docs = render(&Values::default().set("etcd.mode=external").set("etcd.externalEndpoint=etcd.example:2379"));
    assert!(!docs.iter().any(|d| name(d).contains("etcd")), "an etcd resource rendered with an external etcd");
    let c = container(find(&docs, "Deployment", &full("coordinator")), "coordinator");
    assert_eq!(flag_value(&command_line(c), "--store"), "etcd://etcd.example:2379");
}

/// The HTTP API is the coordinator's: `--http-listen` is its `http` port, which its Service, the
/// Ingress, the ServiceMonitor and `helm test`'s `/v1/models` reach; the API key of the chart's
/// Secret mechanism is its AWQ_API_KEY (and `helm test`'s); its probes stay on the gRPC port (its
/// /health reports the deployments, not the coordinator); the NetworkPolicies let the HTTP port in
/// and the coordinator reach the workers' stage port (where replicas serve the gateway).
#[test]
fn the_http_api_is_the_coordinators() {
    let docs = render(&Values::file(&chart_dir().join("examples").join("tls-apikeys.yaml")));
    let coordinator = find(&docs, "Deployment", &full("coordinator"));
    let c = container(coordinator, "coordinator");
    let http = container_port(c, "http");
    assert_eq!(http, 8000, "coordinator.httpPort's default");
    assert_eq!(flag_value(&command_line(c), "--http-listen"), format!("0.0.0.0:{http}"));
    let svc = service_of(&docs, coordinator, false);
    assert_eq!(service_port(svc, "http"), http, "the coordinator Service's http port");
    for probe in ["startupProbe", "readinessProbe"] {
        let port = get(c, probe).and_then(|p| get(p, "grpc.port")).and_then(Yaml::as_u64);
        assert_eq!(port, Some(container_port(c, "grpc")), "the coordinator's {probe} is not gRPC health on grpc");
    }
    let key = list_at(c, "env").iter().find(|e| str_at(e, "name") == "AWQ_API_KEY").expect("AWQ_API_KEY");
    assert_eq!(str_at(key, "valueFrom.secretKeyRef.name"), "awq-api-key", "apiKey.existingSecret");
    assert_eq!(str_at(key, "valueFrom.secretKeyRef.key"), "api-key", "apiKey.secretKey");

    let ingress = find(&docs, "Ingress", &format!("{RELEASE}-awq-cluster"));
    for rule in list_at(ingress, "spec.rules") {
        for path in list_at(rule, "http.paths") {
            assert_eq!(str_at(path, "backend.service.name"), name(svc), "the Ingress' backend");
            assert_eq!(str_at(path, "backend.service.port.name"), "http", "the Ingress' backend port");
        }
    }
    let monitor = find(&docs, "ServiceMonitor", &full("coordinator"));
    let selector = get(monitor, "spec.selector.matchLabels").and_then(Yaml::as_mapping).expect("a selector");
    let svc_labels = get(svc, "metadata.labels").and_then(Yaml::as_mapping).expect("Service labels");
    assert!(selector.iter().all(|(k, v)| svc_labels.get(k) == Some(v)), "the ServiceMonitor misses {}", name(svc));
    let endpoint = &list_at(monitor, "spec.endpoints")[0];
    assert_eq!((str_at(endpoint, "port"), str_at(endpoint, "path")), ("http", "/metrics"));

    let test_pod = find(&docs, "Pod", &full("test"));
    let gateway = container(test_pod, "gateway");
    let line = command_line(gateway);
    let url = format!("http://{}.{NAMESPACE}.svc.cluster.local:{http}/v1/models", name(svc));
    assert_eq!(line.last(), Some(&url), "helm test's request");
    assert!(line.iter().any(|w| w == "Authorization: Bearer $(AWQ_API_KEY)"), "helm test sends no key: {line:?}");
    let key = list_at(gateway, "env").iter().find(|e| str_at(e, "name") == "AWQ_API_KEY").expect("the test's key");
    assert_eq!(str_at(key, "valueFrom.secretKeyRef.name"), "awq-api-key");

    let policy = find(&docs, "NetworkPolicy", &full("coordinator"));
    let opens = |p: &Yaml, port: &str| {
        list_at(p, "spec.ingress").iter().any(|r| list_at(r, "ports").iter().any(|q| str_at(q, "port") == port))
    };
    assert!(opens(policy, "http"), "the coordinator's NetworkPolicy keeps its HTTP port closed");
    let workers_policy = find(&docs, "NetworkPolicy", &full("workers"));
    let coordinator_in = list_at(workers_policy, "spec.ingress").iter().any(|r| {
        list_at(r, "ports").iter().any(|q| str_at(q, "port") == "stage")
            && list_at(r, "from").iter().any(|f| {
                get(f, "podSelector.matchLabels")
                    .and_then(|l| l.get("app.kubernetes.io/component"))
                    .and_then(Yaml::as_str)
                    == Some("coordinator")
            })
    });
    assert!(coordinator_in, "the coordinator cannot reach the workers' stage port (its gateway's replicas)");

    // Without deployments in values, /v1/models is 503 (nothing served): `helm test` GETs /metrics.
    let docs = render(&Values::default());
    let line = command_line(container(find(&docs, "Pod", &full("test")), "gateway"));
    assert!(line.last().is_some_and(|u| u.ends_with(&format!(":{http}/metrics"))), "{line:?}");
}

/// The gRPC tokens reach each pod as files, only those it uses: the coordinator both (its
/// `--admin-token-file` and `--worker-token-file`), the workers the worker token, the client pods
/// (the deployments Job, `helm test`'s `awq workers`) the admin token, the server none; the chart's
/// Secret holds generated tokens unless values give them, none with `tokens.existingSecret` (used
/// as it is), and nothing of it with `tokens.enabled: false`.
#[test]
fn tokens_reach_each_pod_as_the_files_it_uses() {
    let secret = full("tokens");
    let dir = "/var/run/secrets/awq";
    // (workload kind, name, container, the token files it gets, the flags naming them).
    let expected: [(&str, String, &str, &[&str], &[(&str, &str)]); 4] = [
        (
            "Deployment",
            full("coordinator"),
            "coordinator",
            &["admin-token", "worker-token"],
            &[("--admin-token-file", "admin-token"), ("--worker-token-file", "worker-token")],
        ),
        ("StatefulSet", full("workers"), "worker", &["worker-token"], &[("--worker-token-file", "worker-token")]),
        ("Job", full("deployments"), "deploy-llama3", &["admin-token"], &[("--token-file", "admin-token")]),
        ("Pod", full("test"), "workers", &["admin-token"], &[("--token-file", "admin-token")]),
    ];
    let with_deployments = Values::file(&chart_dir().join("examples").join("with-deployments.yaml"));
    let server = "server.enabled=true,server.model=m";
    let check = |values: &Values, secret_name: &str| {
        let docs = render(&values.clone().set(server));
        for (kind_, workload, c, files, flags) in &expected {
            let doc = find(&docs, kind_, workload);
            let spec = pod_spec(doc).expect("a pod spec");
            let volume = list_at(spec, "volumes").iter().find(|v| str_at(v, "name") == "tokens");
            let volume = volume.unwrap_or_else(|| panic!("{workload}: no tokens volume"));
            assert_eq!(str_at(volume, "secret.secretName"), secret_name, "{workload}");
            let items: Vec<&str> = list_at(volume, "secret.items").iter().map(|i| str_at(i, "path")).collect();
            assert_eq!(&items, files, "{workload}: the token files");
            let container = container(doc, c);
            let mount = list_at(container, "volumeMounts").iter().find(|m| str_at(m, "name") == "tokens");
            let mount = mount.unwrap_or_else(|| panic!("{workload}/{c}: tokens not mounted"));
            assert_eq!((str_at(mount, "mountPath"), get(mount, "readOnly").and_then(Yaml::as_bool)), (dir, Some(true)));
            let line = command_line(container);
            for (flag, file) in *flags {
                assert_eq!(flag_value(&line, flag), format!("{dir}/{file}"), "{workload}/{c}: {line:?}");
            }
        }
        let server = pod_spec(find(&docs, "Deployment", &full("server"))).expect("a pod spec");
        assert!(!list_at(server, "volumes").iter().any(|v| str_at(v, "name") == "tokens"), "the server has tokens");
        docs
    };

    // Generated: 48 characters each, different.
    let docs = check(&with_deployments, &secret);
    let generated = find(&docs, "Secret", &secret);
    let tokens: Vec<Vec<u8>> = ["admin-token", "worker-token"]
        .iter()
        .map(|k| base64_decode(get(generated, "data").and_then(|d| d.get(*k)).and_then(Yaml::as_str).expect(k)))
        .collect();
    assert!(tokens.iter().all(|t| t.len() == 48 && t.iter().all(u8::is_ascii_alphanumeric)), "{tokens:?}");
    assert_ne!(tokens[0], tokens[1], "the admin and worker tokens are the same");
    // Given in values.
    let given = with_deployments.clone().set("tokens.adminToken=adm1n,tokens.workerToken=w0rker");
    let docs = check(&given, &secret);
    let data = get(find(&docs, "Secret", &secret), "data").cloned().expect("data");
    assert_eq!(base64_decode(data["admin-token"].as_str().expect("admin-token")), b"adm1n");
    assert_eq!(base64_decode(data["worker-token"].as_str().expect("worker-token")), b"w0rker");
    // An existing Secret, with other keys.
    let existing =
        with_deployments.clone().set("tokens.existingSecret=mine,tokens.adminTokenKey=a,tokens.workerTokenKey=w");
    let docs = check(&existing, "mine");
    assert!(!docs.iter().any(|d| kind(d) == "Secret" && name(d) == secret), "a Secret beside tokens.existingSecret");
    let coordinator = pod_spec(find(&docs, "Deployment", &full("coordinator"))).expect("a pod spec");
    let volume = list_at(coordinator, "volumes").iter().find(|v| str_at(v, "name") == "tokens").expect("tokens");
    let keys: Vec<&str> = list_at(volume, "secret.items").iter().map(|i| str_at(i, "key")).collect();
    assert_eq!(keys, ["a", "w"]);
    // Off: no Secret, no volume, no flag.
    let docs = render(&with_deployments.clone().set("tokens.enabled=false").set(server));
    for doc in &docs {
        assert!(!(kind(doc) == "Secret" && name(doc) == secret), "a tokens Secret with tokens.enabled=false");
        let Some(spec) = pod_spec(doc) else { continue };
        assert!(!list_at(spec, "volumes").iter().any(|v| str_at(v, "name") == "tokens"), "{}", name(doc));
        for c in containers(spec) {
            assert!(!command_line(c).iter().any(|w| w.ends_with("token-file")), "{}: {:?}", name(doc), command_line(c));
        }
    }
}

/// `check_rejected(set, names)`: `--set set` fails both `helm lint --strict` and `helm template`,
/// with a message naming `names`.
fn check_rejected(set: &str, names: &str) {
    let values = Values::default().set(set);
    check_refused(&[lint_args(&values), template_args(&values)], set, names);
}

/// `check_refused_by_templates(set, names)`: as [`check_rejected`], for the checks across values
/// that the templates make (`fail` in `awq.validate`): `helm template` (and install, upgrade) fail,
/// while `helm lint` only logs a template's `fail` at INFO level.
fn check_refused_by_templates(set: &str, names: &str) {
    check_refused(&[template_args(&Values::default().set(set))], set, names);
}

fn check_refused(commands: &[Vec<String>], set: &str, names: &str) {
    for args in commands {
        match helm(&args) {
            Ok(out) => panic!("helm {} accepted --set {set}:\n{out}", args[0]),
            Err(e) => assert!(e.contains(names), "helm {} refused --set {set} without naming {names}:\n{e}", args[0]),
        }
    }
}

#[test]
fn bad_values_are_refused_by_name() {
    check_rejected("workers.gpus=two", "/workers/gpus");
    check_rejected("workers.gpu=2", "'gpu'");
    check_rejected("etcd.mode=sideways", "/etcd/mode");
    check_rejected("etcd.replicas=2", "/etcd/replicas");
    check_rejected("workers.nccl.GLOO_SOCKET_IFNAME=eth0", "GLOO_SOCKET_IFNAME");
    check_rejected("securityContext.runAsUser=0", "/securityContext/runAsUser");
    check_rejected("modelStore.mountPath=models", "/modelStore/mountPath");
    check_rejected("workers.shmSize=lots", "/workers/shmSize");
    // GPU i's worker listens on stagePort + i: the last one must be a port.
    check_refused_by_templates("workers.gpus=8,workers.stagePort=65530", "workers.stagePort + workers.gpus - 1");
    // Checks across values (if/then rules of the schema).
    check_rejected("etcd.mode=external", "/etcd/externalEndpoint");
    check_rejected("server.enabled=true", "/server/model");
    check_rejected("coordinator.httpPort=0", "/coordinator/httpPort");
    check_rejected("networkPolicy.serverFrom[0].podSelector.x=y", "'serverFrom'");
    // Deployments: typed fields, unknown keys, pp of at least 1, unique names (the templates).
    let deployment = "deployments[0].name=a,deployments[0].model=m";
    check_rejected(&format!("{deployment},deployments[0].pp=0"), "/deployments/0/pp");
    check_rejected(&format!("{deployment},deployments[0].kvCacheBytes=lots"), "/deployments/0/kvCacheBytes");
    check_rejected(
        &format!("{deployment},deployments[0].gpuMemoryUtilization=1.5"),
        "/deployments/0/gpuMemoryUtilization",
    );
    check_rejected(&format!("{deployment},deployments[0].maxModelLen=0"), "/deployments/0/maxModelLen");
    check_rejected(&format!("{deployment},deployments[0].servedModelName="), "/deployments/0/servedModelName");
    check_rejected(&format!("{deployment},deployments[0].replica=2"), "'replica'");
    check_refused_by_templates(
        &format!("{deployment},deployments[1].name=a,deployments[1].model=n"),
        "the name a is given twice",
    );
    check_refused_by_templates(
        &format!("{deployment},deployments[1].name=b,deployments[1].model=n,deployments[1].servedModelName=a"),
        "both served as a",
    );
    check_rejected("deploymentsJob.waitSeconds=0", "/deploymentsJob/waitSeconds");
    check_rejected("tokens.adminToken=two words", "/tokens/adminToken");
    check_rejected("tokens.enable=true", "'enable'");
    check_refused_by_templates("tokens.existingSecret=mine,tokens.workerToken=w", "tokens: set either existingSecret");
    check_refused_by_templates(&format!("{deployment},modelStore.type=none"), "deployments: their models");
    // TLS needs the Secret: the schema names it, and the templates too where the schema is skipped.
    check_rejected("tls.enabled=true", "/tls/existingSecret");
    check_rejected("tls.mutal=true", "'mutal'");
    check_rejected("tls.enabled=true,tls.existingSecret=t,tls.caKey=", "/tls/caKey");
    let unchecked = Values::default().set("tls.enabled=true");
    let mut args = template_args(&unchecked);
    args.push("--skip-schema-validation".into());
    check_refused(&[args], "tls.enabled=true", "tls.enabled: set tls.existingSecret");
}

/// The Ingress annotation that has ingress-nginx call its backend over HTTPS.
const BACKEND_PROTOCOL: &str = "nginx.ingress.kubernetes.io/backend-protocol";

/// With `tls.enabled` (examples/tls-in-cluster.yaml: mutual TLS, the Secret awq-tls; the server
/// on): the Secret is mounted read-only at /etc/awq/tls into every pod that serves TLS or dials
/// another, each getting only the files it uses, and each process gets exactly its TLS flags: the
/// coordinator and the workers serve (`--tls-cert`, `--tls-key`), check whom they dial (`--tls-ca`)
/// and, mutual, require client certificates (`--tls-client-ca`); the server only serves HTTPS
/// (`awq serve` takes no CA); the client pods (the deployments Job, `helm test`'s `awq workers`)
/// check the coordinator and, mutual, present the certificate. Workers and clients dial
/// `https://` the coordinator's Service; the workers advertise their DNS name under their headless
/// Service (what the certificate names, not a pod IP); the gRPC ports' probes are TCP connects
/// (the kubelet's gRPC probe speaks no TLS) and the server's /health probes HTTPS; `helm test`'s
/// curls call `https://` with `--cacert`; the Ingress calls its backend over HTTPS (unless values
/// say otherwise) and the ServiceMonitors scrape over HTTPS, checking the CA and the Service's
/// name. Without `tls.mutual` no client certificate is required or presented.
#[test]
fn tls_reaches_every_pod_that_serves_or_dials() {
    let dir = "/etc/awq/tls";
    let coordinator_host = format!("{}.{NAMESPACE}.svc.cluster.local", full("coordinator"));
    let check = |values: &Values, mutual: bool| {
        let docs = render(values);
        let serves: &[(&str, &str)] = &[("--tls-cert", "tls.crt"), ("--tls-key", "tls.key")];
        let checks: &[(&str, &str)] = &[("--tls-ca", "ca.crt")];
        let requires: &[(&str, &str)] = if mutual { &[("--tls-client-ca", "ca.crt")] } else { &[] };
        let presents: &[(&str, &str)] = if mutual { serves } else { &[] };
        // (kind, workload, container, its TLS flags and the files they name).
        let expected: [(&str, String, &str, Vec<(&str, &str)>); 5] = [
            ("Deployment", full("coordinator"), "coordinator", [serves, checks, requires].concat()),
            ("StatefulSet", full("workers"), "worker", [serves, checks, requires].concat()),
            ("Deployment", full("server"), "server", serves.to_vec()),
            ("Job", full("deployments"), "deploy-llama3", [presents, checks].concat()),
            ("Pod", full("test"), "workers", [presents, checks].concat()),
        ];
        for (kind_, workload, c, flags) in &expected {
            let doc = find(&docs, kind_, workload);
            let spec = pod_spec(doc).expect("a pod spec");
            let volume = list_at(spec, "volumes").iter().find(|v| str_at(v, "name") == "tls");
            let volume = volume.unwrap_or_else(|| panic!("{workload}: no tls volume"));
            assert_eq!(str_at(volume, "secret.secretName"), "awq-tls", "{workload}: tls.existingSecret");
            let mut files: Vec<&str> = list_at(volume, "secret.items").iter().map(|i| str_at(i, "path")).collect();
            let mut named: Vec<&str> = flags.iter().map(|(_, file)| *file).collect();
            files.sort_unstable();
            named.sort_unstable();
            named.dedup();
            assert_eq!(files, named, "{workload}: the Secret's files are not those its flags name");
            let container = container(doc, c);
            let mount = list_at(container, "volumeMounts").iter().find(|m| str_at(m, "name") == "tls");
            let mount = mount.unwrap_or_else(|| panic!("{workload}/{c}: tls not mounted"));
            assert_eq!((str_at(mount, "mountPath"), get(mount, "readOnly").and_then(Yaml::as_bool)), (dir, Some(true)));
            let line = command_line(container);
            let given: Vec<(String, String)> = line
                .iter()
                .enumerate()
                .filter(|(_, w)| w.starts_with("--tls-"))
                .map(|(i, w)| (w.clone(), line.get(i + 1).cloned().unwrap_or_default()))
                .collect();
            let want: Vec<(String, String)> =
                flags.iter().map(|(flag, file)| (flag.to_string(), format!("{dir}/{file}"))).collect();
            assert_eq!(given, want, "{workload}/{c}: the TLS flags of {line:?}");
        }

        // Every client of the coordinator dials https:// its Service.
        let url = format!("https://{coordinator_host}:50151");
        for (kind_, workload, c) in [
            ("StatefulSet", full("workers"), "worker"),
            ("Job", full("deployments"), "deploy-llama3"),
            ("Pod", full("test"), "workers"),
        ] {
            let line = command_line(container(find(&docs, kind_, &workload), c));
            assert_eq!(flag_value(&line, "--coordinator"), url, "{workload}/{c}'s --coordinator");
        }
        // Workers advertise the name the certificate holds (*.<headless Service>...).
        let workers = find(&docs, "StatefulSet", &full("workers"));
        let headless = name(service_of(&docs, workers, true));
        let worker = container(workers, "worker");
        let advertised = format!("$(POD_NAME).{headless}.{NAMESPACE}.svc.cluster.local:50152");
        assert_eq!(flag_value(&command_line(worker), "--advertise"), advertised, "the workers' --advertise");

        // Probes: TCP on the gRPC ports, HTTPS on the HTTP ones.
        let coordinator = container(find(&docs, "Deployment", &full("coordinator")), "coordinator");
        for (c, probe, port) in [
            (coordinator, "startupProbe", "grpc"),
            (coordinator, "readinessProbe", "grpc"),
            (worker, "readinessProbe", "stage"),
        ] {
            let p = get(c, probe).unwrap_or_else(|| panic!("{}: no {probe}", str_at(c, "name")));
            assert_eq!(str_at_opt(p, "tcpSocket.port"), Some(port), "{}'s {probe}: {}", str_at(c, "name"), yaml(p));
            assert!(get(p, "grpc").is_none(), "{}'s {probe} is a gRPC probe, which speaks no TLS", str_at(c, "name"));
        }
        let server = container(find(&docs, "Deployment", &full("server")), "server");
        for probe in ["startupProbe", "readinessProbe"] {
            assert_eq!(str_at_opt(server, &format!("{probe}.httpGet.scheme")), Some("HTTPS"), "the server's {probe}");
        }

        // `helm test`'s curls: https:// and the CA.
        let test_pod = find(&docs, "Pod", &full("test"));
        for c in ["gateway", "server-models"] {
            let curl = container(test_pod, c);
            let line = command_line(curl);
            assert!(line.last().is_some_and(|u| u.starts_with("https://")), "helm test's {c}: {line:?}");
            assert_eq!(flag_value(&line, "--cacert"), format!("{dir}/ca.crt"), "helm test's {c}");
            let mounted = list_at(curl, "volumeMounts").iter().any(|m| str_at(m, "mountPath") == dir);
            assert!(mounted, "helm test's {c} has no {dir}");
        }
        let gateway = command_line(container(test_pod, "gateway"));
        assert!(gateway.last().is_some_and(|u| u.starts_with(&format!("https://{coordinator_host}:8000/"))));

        let ingress = find(&docs, "Ingress", &format!("{RELEASE}-awq-cluster"));
        let backend = get(ingress, "metadata.annotations").and_then(|a| a.get(BACKEND_PROTOCOL));
        assert_eq!(backend.and_then(Yaml::as_str), Some("HTTPS"), "the Ingress' backend protocol");
        for component in ["coordinator", "server"] {
            let monitor = find(&docs, "ServiceMonitor", &full(component));
            let endpoint = &list_at(monitor, "spec.endpoints")[0];
            assert_eq!(str_at_opt(endpoint, "scheme"), Some("https"), "{component}'s ServiceMonitor");
            let ca = (str_at(endpoint, "tlsConfig.ca.secret.name"), str_at(endpoint, "tlsConfig.ca.secret.key"));
            assert_eq!(ca, ("awq-tls", "ca.crt"), "{component}'s ServiceMonitor's CA");
            let server_name = format!("{}.{NAMESPACE}.svc.cluster.local", full(component));
            assert_eq!(str_at(endpoint, "tlsConfig.serverName"), server_name, "{component}'s ServiceMonitor");
        }
    };
    check(&tls_example().set(WITH_SERVER), true);
    check(&tls_example().set(WITH_SERVER).set("tls.mutual=false"), false);

    // The Secret's keys as values name them; an Ingress annotation of values wins.
    let docs = render(
        &tls_example()
            .set("tls.certKey=cert.pem,tls.privateKeyKey=key.pem,tls.caKey=ca.pem")
            .set(r"ingress.annotations.nginx\.ingress\.kubernetes\.io/backend-protocol=GRPCS"),
    );
    let spec = pod_spec(find(&docs, "Deployment", &full("coordinator"))).expect("a pod spec");
    let volume = list_at(spec, "volumes").iter().find(|v| str_at(v, "name") == "tls").expect("a tls volume");
    let items: Vec<(&str, &str)> =
        list_at(volume, "secret.items").iter().map(|i| (str_at(i, "key"), str_at(i, "path"))).collect();
    assert_eq!(items, [("cert.pem", "tls.crt"), ("key.pem", "tls.key"), ("ca.pem", "ca.crt")]);
    let ingress = find(&docs, "Ingress", &format!("{RELEASE}-awq-cluster"));
    let backend = get(ingress, "metadata.annotations").and_then(|a| a.get(BACKEND_PROTOCOL));
    assert_eq!(backend.and_then(Yaml::as_str), Some("GRPCS"), "ingress.annotations' backend-protocol");
    let monitor = find(&docs, "ServiceMonitor", &full("coordinator"));
    assert_eq!(str_at(&list_at(monitor, "spec.endpoints")[0], "tlsConfig.ca.secret.key"), "ca.pem");
}

/// Without `tls.enabled` (the default, and examples with an Ingress, a ServiceMonitor, the
/// deployments Job and the server) nothing of TLS renders: no tls volume, no `--tls-*` flag or
/// `--cacert`, no `https://` address, gRPC probes on the gRPC ports, plain HTTP probes, no backend
/// protocol on the Ingress, plain scrapes.
#[test]
fn without_tls_nothing_of_it_renders() {
    for example in ["default.yaml", "tls-apikeys.yaml"] {
        let values = Values::file(&chart_dir().join("examples").join(example)).set(WITH_SERVER);
        let docs = render(&values);
        for doc in &docs {
            let what = format!("{example}: {} {}", kind(doc), name(doc));
            if kind(doc) == "Ingress" {
                let annotations = get(doc, "metadata.annotations");
                let backend = annotations.and_then(|a| a.get(BACKEND_PROTOCOL));
                assert!(backend.is_none(), "{what}: a backend protocol without TLS");
            }
            if kind(doc) == "ServiceMonitor" {
                let endpoint = &list_at(doc, "spec.endpoints")[0];
                assert!(
                    get(endpoint, "scheme").is_none() && get(endpoint, "tlsConfig").is_none(),
                    "{what}: {}",
                    yaml(endpoint)
                );
            }
            let Some(spec) = pod_spec(doc) else { continue };
            assert!(!list_at(spec, "volumes").iter().any(|v| str_at(v, "name") == "tls"), "{what}: a tls volume");
            for c in containers(spec) {
                let line = command_line(c);
                let tls_words =
                    line.iter().filter(|w| w.starts_with("--tls") || *w == "--cacert" || w.contains("https://"));
                assert_eq!(tls_words.count(), 0, "{what}, container {}: {line:?}", str_at(c, "name"));
                for probe in ["startupProbe", "readinessProbe"] {
                    assert!(str_at_opt(c, &format!("{probe}.httpGet.scheme")).is_none(), "{what}: an HTTPS {probe}");
                }
            }
        }
        let coordinator = container(find(&docs, "Deployment", &full("coordinator")), "coordinator");
        let grpc = container_port(coordinator, "grpc");
        for probe in ["startupProbe", "readinessProbe"] {
            assert_eq!(get(coordinator, &format!("{probe}.grpc.port")).and_then(Yaml::as_u64), Some(grpc), "{probe}");
        }
        let worker = container(find(&docs, "StatefulSet", &full("workers")), "worker");
        assert!(flag_value(&command_line(worker), "--advertise").starts_with("$(POD_IP):"), "{example}: --advertise");
    }
}

/// Every pod runs as non-root with seccomp RuntimeDefault, and every container with a read-only
/// root filesystem, no privilege escalation and no capabilities; as the image's user.
#[test]
fn every_container_runs_restricted() {
    let image_uid = dockerfile_uid();
    for (label, values) in every_render() {
        let docs = render(&values);
        let mut seen = 0;
        for doc in &docs {
            let Some(spec) = pod_spec(doc) else { continue };
            let what = format!("{label}: {} {}", kind(doc), name(doc));
            let pod = get(spec, "securityContext").unwrap_or_else(|| panic!("{what}: no pod securityContext"));
            assert_eq!(get(pod, "runAsNonRoot").and_then(Yaml::as_bool), Some(true), "{what}: runAsNonRoot");
            assert_eq!(str_at_opt(pod, "seccompProfile.type"), Some("RuntimeDefault"), "{what}: seccomp");
            assert_eq!(get(pod, "runAsUser").and_then(Yaml::as_u64), Some(image_uid), "{what}: not the image's user");
            for c in containers(spec) {
                let what = format!("{what}, container {}", str_at(c, "name"));
                let sc = get(c, "securityContext").unwrap_or_else(|| panic!("{what}: no securityContext"));
                let flag = |key: &str| get(sc, key).and_then(Yaml::as_bool);
                assert_eq!(flag("runAsNonRoot"), Some(true), "{what}: runAsNonRoot");
                assert_eq!(flag("readOnlyRootFilesystem"), Some(true), "{what}: readOnlyRootFilesystem");
                assert_eq!(flag("allowPrivilegeEscalation"), Some(false), "{what}: allowPrivilegeEscalation");
                let drop: Vec<&str> = list_at(sc, "capabilities.drop").iter().filter_map(Yaml::as_str).collect();
                assert_eq!(drop, ["ALL"], "{what}: capabilities.drop");
                assert!(get(sc, "capabilities.add").is_none(), "{what}: adds capabilities");
                assert_eq!(str_at_opt(sc, "seccompProfile.type"), Some("RuntimeDefault"), "{what}: seccomp");
                seen += 1;
            }
        }
        assert!(seen >= 3, "{label}: only {seen} containers rendered");
    }
}

/// `awq --help`'s subcommands, and `awq SUB --help`'s flags.
fn awq_help(sub: Option<&str>) -> String {
    let mut args: Vec<&str> = sub.into_iter().collect();
    args.push("--help");
    awq_ok(&args)
}

/// Every container that runs `awq` uses a subcommand `awq --help` lists and only flags that
/// `awq SUBCOMMAND --help` lists, in every example (the deployments Job's `awq deploy` included).
#[test]
fn rendered_awq_commands_use_only_subcommands_and_flags_the_binary_has() {
    let top = awq_help(None);
    let mut helps: BTreeMap<String, String> = BTreeMap::new();
    let mut checked = BTreeSet::new();
    for (label, values) in every_render() {
        for doc in render(&values) {
            let Some(spec) = pod_spec(&doc) else { continue };
            for c in containers(spec) {
                let line = command_line(c);
                if line.first().map(String::as_str) != Some("awq") {
                    continue;
                }
                let what = format!("{label}: {} {}, container {}", kind(&doc), name(&doc), str_at(c, "name"));
                let sub = line.get(1).unwrap_or_else(|| panic!("{what}: `awq` without a subcommand"));
                assert!(
                    top.lines().any(|l| l.trim_start().starts_with(&format!("{sub} "))),
                    "{what}: `awq --help` lists no subcommand {sub}"
                );
                let help = helps.entry(sub.clone()).or_insert_with(|| awq_help(Some(sub)));
                for word in line.iter().filter(|w| w.starts_with("--")) {
                    let flag = word.split('=').next().expect("a flag");
                    // An option's line starts with its flags (`-h, --help`, `--tp <T>`), whatever
                    // clap's layout (the description on that line or on the next).
                    let listed = help
                        .lines()
                        .map(str::trim_start)
                        .filter(|l| l.starts_with('-'))
                        .any(|l| l.split([' ', ',']).any(|w| w == flag));
                    assert!(listed, "{what}: `awq {sub} --help` has no {flag}");
                    checked.insert(format!("awq {sub} {flag}"));
                }
            }
        }
    }
    let expected = [
        "awq coordinator --store",
        "awq coordinator --http-listen",
        "awq worker --device",
        "awq worker --advertise",
        "awq serve --listen",
        "awq deploy --served-model-name",
        "awq deploy --max-model-len",
        "awq deploy --max-num-seqs",
        "awq deploy --kv-cache-bytes",
        "awq deploy --gpu-memory-utilization",
        "awq deploy --enforce-eager",
        "awq deploy --if-exists",
        "awq deploy --wait",
        "awq deploy --timeout",
        "awq coordinator --tls-cert",
        "awq coordinator --tls-client-ca",
        "awq worker --tls-ca",
        "awq worker --tls-client-ca",
        "awq serve --tls-key",
        "awq deploy --tls-cert",
        "awq workers --tls-ca",
    ];
    for expected in expected {
        assert!(checked.contains(expected), "no render used {expected}: {checked:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// 3. The image
// ---------------------------------------------------------------------------------------------

fn dockerfile() -> String {
    std::fs::read_to_string(repo_root().join("Dockerfile")).expect("the Dockerfile is at the repository root")
}

/// The user id the image runs as (`USER uid:gid`).
fn dockerfile_uid() -> u64 {
    let df = dockerfile();
    let user = df.lines().rev().find_map(|l| l.strip_prefix("USER ")).expect("the Dockerfile sets USER");
    user.trim()
        .split(':')
        .next()
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("USER {user}: not a numeric uid"))
}

/// The Dockerfile builds the one `awq` binary (release, `cuda` feature: what `.ci/run` compiles
/// with `cargo check -p awq-cli --features cuda`), runs it as the non-root user the chart runs
/// as, on NVIDIA's CUDA runtime image with NCCL, with `awq` as the entrypoint the chart's
/// `command` names; `.dockerignore` keeps the build outputs out and every source the build needs in.
#[test]
fn dockerfile_builds_the_binary_the_chart_runs() {
    let df = dockerfile();
    let build = df.lines().find(|l| l.contains("cargo build")).expect("the Dockerfile runs cargo build");
    for part in ["--release", "--locked", "--features cuda", "-p awq-cli", "--bin awq"] {
        assert!(build.contains(part), "the Dockerfile's cargo build lacks {part}: {build}");
    }
    let froms: Vec<&str> = df.lines().filter(|l| l.starts_with("FROM ")).collect();
    let last = froms.last().expect("the Dockerfile has FROM lines");
    assert!(
        last.contains("nvidia/cuda:") && last.contains("-runtime-"),
        "the final stage is not a CUDA runtime: {last}"
    );
    assert!(df.contains("libnccl"), "the Dockerfile does not check for libnccl");
    assert!(df.lines().any(|l| l.trim() == r#"ENTRYPOINT ["awq"]"#), "the entrypoint is not awq");
    let uid = dockerfile_uid();
    assert_ne!(uid, 0, "the image runs as root");
    let values: Yaml =
        serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("values.yaml")).expect("values.yaml"))
            .expect("values.yaml parses");
    assert_eq!(
        get(&values, "securityContext.runAsUser").and_then(Yaml::as_u64),
        Some(uid),
        "chart and image users differ"
    );

    let ignore = std::fs::read_to_string(repo_root().join(".dockerignore")).expect(".dockerignore");
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/'))
        .collect();
    for excluded in ["target", ".git"] {
        assert!(patterns.contains(&excluded), ".dockerignore does not exclude {excluded}/");
    }
    let cargo = std::fs::read_to_string(repo_root().join("Cargo.toml")).expect("Cargo.toml");
    let members = cargo
        .split("members")
        .nth(1)
        .and_then(|s| s.split_once('[').map(|(_, list)| list))
        .and_then(|s| s.split(']').next())
        .expect("workspace members");
    let needed: Vec<String> = members
        .split(',')
        .map(|m| m.trim().trim_matches('"').to_string())
        .filter(|m| !m.is_empty())
        .chain(["Cargo.toml", "Cargo.lock", ".cargo", "tools"].map(String::from))
        .collect();
    assert!(needed.len() > 8, "{needed:?}");
    for path in &needed {
        assert!(repo_root().join(path).exists(), "{path} is not in the repository");
        assert!(!patterns.contains(&path.as_str()), ".dockerignore leaves {path} out of the build");
    }
}

// ---------------------------------------------------------------------------------------------
// 4. The rendered commands run
// ---------------------------------------------------------------------------------------------

/// A pod of the rendered manifests, run here: its name (as Kubernetes would give it), its IP (a
/// loopback address) and its spec.
struct LocalPod<'a> {
    name: String,
    ip: String,
    doc: &'a Yaml,
}

impl LocalPod<'_> {
    fn spec(&self) -> &Yaml {
        pod_spec(self.doc).expect("a workload")
    }
}

/// The rendered manifests and the scratch folder their pods run in.
struct Rendered {
    docs: Vec<Yaml>,
    dir: PathBuf,
    /// The model store's mountPath: a path under it in a pod that does not mount the store (the
    /// deployments Job's MODEL) names a file of the pods that do, and is passed as it is.
    model_store: String,
}

impl Rendered {
    /// Pod `ordinal` of workload `kind_/name_`: StatefulSet pods are NAME-N; a Deployment's one pod
    /// gets NAME-local. Pods of the workers StatefulSet each get their own loopback address (they
    /// bind their pod IP); the others share 127.0.0.1, where `listenHost` binds them.
    fn pod(&self, kind_: &str, name_: &str, ordinal: usize) -> LocalPod<'_> {
        let doc = find(&self.docs, kind_, name_);
        let (pod_name, ip) = match kind_ {
            "StatefulSet" if name_ == full("workers") => {
                (format!("{name_}-{ordinal}"), format!("127.0.0.{}", 10 + ordinal))
            }
            "StatefulSet" => (format!("{name_}-{ordinal}"), "127.0.0.1".to_string()),
            _ => (format!("{name_}-local"), "127.0.0.1".to_string()),
        };
        LocalPod { name: pod_name, ip, doc }
    }

    /// A Secret's value, as a secretKeyRef reads it.
    fn secret(&self, secret: &str, key: &str) -> String {
        let doc = find(&self.docs, "Secret", secret);
        if let Some(v) = get(doc, "stringData").and_then(|d| d.get(key)).and_then(Yaml::as_str) {
            return v.to_string();
        }
        let data = get(doc, "data").and_then(|d| d.get(key)).and_then(Yaml::as_str);
        let data = data.unwrap_or_else(|| panic!("Secret {secret} has no key {key}"));
        String::from_utf8(base64_decode(data)).expect("a UTF-8 secret")
    }

    /// The local folder behind each volume mount of `c` (mount path -> folder): hostPath as is (the
    /// one node is this machine), a claim as a folder per claim, an emptyDir as a folder per pod.
    fn mounts(&self, pod: &LocalPod, c: &Yaml) -> Vec<(String, PathBuf)> {
        let mut mounts = Vec::new();
        for m in list_at(c, "volumeMounts") {
            let volume_name = str_at(m, "name");
            let volume = list_at(pod.spec(), "volumes").iter().find(|v| str_at(v, "name") == volume_name);
            let claim_template =
                list_at(pod.doc, "spec.volumeClaimTemplates").iter().any(|t| str_at(t, "metadata.name") == volume_name);
            let dir = match volume {
                Some(v) if v.get("hostPath").is_some() => PathBuf::from(str_at(v, "hostPath.path")),
                Some(v) if v.get("persistentVolumeClaim").is_some() => {
                    self.dir.join("claims").join(str_at(v, "persistentVolumeClaim.claimName"))
                }
                Some(v) if v.get("emptyDir").is_some() => self.dir.join("pods").join(&pod.name).join(volume_name),
                // A Secret's items as files, as the kubelet mounts them.
                Some(v) if v.get("secret").is_some() => {
                    let dir = self.dir.join("pods").join(&pod.name).join(volume_name);
                    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
                    let secret = str_at(v, "secret.secretName");
                    for item in list_at(v, "secret.items") {
                        let value = self.secret(secret, str_at(item, "key"));
                        std::fs::write(dir.join(str_at(item, "path")), value).expect("the scratch folder is writable");
                    }
                    dir
                }
                Some(v) => {
                    panic!("{}: volume {volume_name} is of a kind this test cannot emulate: {}", pod.name, yaml(v))
                }
                None if claim_template => self.dir.join("claims").join(format!("{volume_name}-{}", pod.name)),
                None => panic!("{}: volume {volume_name} is mounted but not declared", pod.name),
            };
            std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
            mounts.push((str_at(m, "mountPath").to_string(), dir));
        }
        // Longest mount path first, so that a nested mount wins.
        mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
        mounts
    }

    /// The command line and environment of container `c` of `pod`, as the kubelet would run them
    /// (env resolved in order, `$(VAR)` expanded), with every path under a volume mount moved to
    /// that volume's local folder. A path outside every mount fails: the root filesystem is
    /// read-only.
    fn command(&self, pod: &LocalPod, container_name: &str) -> Command {
        let c = container(pod.doc, container_name);
        let what = format!("{}/{container_name}", pod.name);
        let mounts = self.mounts(pod, c);
        let localize = |word: &str| -> String {
            let (head, path) = match word.split_once('=') {
                Some((flag, path)) if flag.starts_with("--") => (format!("{flag}="), path),
                _ => (String::new(), word),
            };
            if !path.starts_with('/') {
                return word.to_string();
            }
            let under = |root: &str| path == root || path.starts_with(&format!("{root}/"));
            let mount = mounts.iter().find(|(m, _)| under(m));
            // Under the model store, but not through a mount of it (a pod without the store, where
            // the store's path may lie under another mount such as /tmp): the other pods' file.
            let remote = under(&self.model_store) && mount.is_none_or(|(m, _)| m.len() < self.model_store.len());
            if remote {
                return word.to_string();
            }
            let (mount, dir) = mount.unwrap_or_else(|| {
                panic!("{what}: {path} is under no volume mount (the root filesystem is read-only)")
            });
            format!("{head}{}{}", dir.display(), &path[mount.len()..])
        };
        let mut env: Vec<(String, String)> = Vec::new();
        for var in list_at(c, "env") {
            let var_name = str_at(var, "name").to_string();
            let value = if let Some(v) = get(var, "value") {
                expand(v.as_str().unwrap_or_else(|| panic!("{what}: env {var_name} is not a string")), &env)
            } else if let Some(field) = str_at_opt(var, "valueFrom.fieldRef.fieldPath") {
                match field {
                    "metadata.name" => pod.name.clone(),
                    "metadata.namespace" => NAMESPACE.to_string(),
                    "status.podIP" => pod.ip.clone(),
                    other => panic!("{what}: env {var_name} from field {other}, which this test does not emulate"),
                }
            } else if let Some(secret) = str_at_opt(var, "valueFrom.secretKeyRef.name") {
                self.secret(secret, str_at(var, "valueFrom.secretKeyRef.key"))
            } else {
                panic!("{what}: env {var_name} has a source this test does not emulate: {}", yaml(var))
            };
            env.push((var_name, value));
        }
        let line: Vec<String> = command_line(c).iter().map(|w| localize(&expand(w, &env))).collect();
        let program = match line[0].as_str() {
            "awq" => awq_bin().to_path_buf(),
            "etcd" => etcd_bin().to_path_buf(),
            other => PathBuf::from(other),
        };
        let mut cmd = Command::new(program);
        cmd.args(&line[1..]).env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
        for (k, v) in &env {
            cmd.env(k, localize(v));
        }
        cmd
    }

    /// Starts container `c` of `pod` as a local process logging to the scratch folder.
    fn start(&self, pod: &LocalPod, c: &str) -> Proc {
        let cmd = self.command(pod, c);
        Proc::spawn(&format!("{}/{c}", pod.name), cmd, self.dir.join(format!("{}-{c}.log", pod.name)))
    }

    /// Waits until container `c`'s startupProbe succeeds (at most the probe's own budget, and
    /// [`START_TIMEOUT`] x 2 on this machine).
    fn wait_started(&self, pod: &LocalPod, c: &str, procs: &[&Proc]) {
        let spec = container(pod.doc, c);
        let probe = get(spec, "startupProbe").unwrap_or_else(|| panic!("{}/{c} has no startupProbe", pod.name));
        let port_of = |p: &Yaml| match p {
            Yaml::String(port_name) => container_port(spec, port_name),
            other => other.as_u64().expect("a port number"),
        };
        let seconds = |key: &str| get(probe, key).and_then(Yaml::as_u64).unwrap_or(1);
        let budget = Duration::from_secs(seconds("periodSeconds") * seconds("failureThreshold")).min(START_TIMEOUT * 2);
        let what = format!("{}/{c}'s startupProbe", pod.name);
        if let Some(tcp) = get(probe, "tcpSocket") {
            let addr: SocketAddr = format!("{}:{}", pod.ip, port_of(&tcp["port"])).parse().expect("an address");
            wait_until(&what, budget, procs, || {
                TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok().map(|_| ())
            });
        } else if let Some(http) = get(probe, "httpGet") {
            let addr = format!("{}:{}", pod.ip, port_of(&http["port"]));
            let path = str_at(http, "path");
            wait_until(&what, budget, procs, || {
                http_get(&addr, path, None).ok().filter(|(status, _)| (200..400).contains(status)).map(|_| ())
            });
        } else if let Some(grpc) = get(probe, "grpc") {
            let addr = format!("{}:{}", pod.ip, port_of(&grpc["port"]));
            wait_until(&what, budget, procs, || grpc_serving(&addr).then_some(()));
        } else {
            panic!("{what}: neither tcpSocket, httpGet nor grpc: {}", yaml(probe));
        }
    }

    /// Waits until container `c`'s readinessProbe (gRPC health) says SERVING, within `timeout`.
    fn wait_ready(&self, pod: &LocalPod, c: &str, timeout: Duration, procs: &[&Proc]) {
        let spec = container(pod.doc, c);
        let probe = get(spec, "readinessProbe").unwrap_or_else(|| panic!("{}/{c} has no readinessProbe", pod.name));
        let port = get(probe, "grpc.port").and_then(Yaml::as_u64).unwrap_or_else(|| {
            panic!("{}/{c}'s readinessProbe is not gRPC health: {}", pod.name, yaml(probe));
        });
        let addr = format!("{}:{port}", pod.ip);
        wait_until(&format!("{}/{c}'s readinessProbe", pod.name), timeout, procs, || grpc_serving(&addr).then_some(()));
    }

    /// Runs container `c` of `pod` to its end, for at most `timeout`.
    fn run_to_end(&self, pod: &LocalPod, c: &str, timeout: Duration, procs: &[&Proc]) -> Output {
        let mut cmd = self.command(pod, c);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let start = Instant::now();
        loop {
            if child.try_wait().expect("the child can be polled").is_some() {
                return child.wait_with_output().expect("its output");
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let out = child.wait_with_output().expect("its output");
                panic!(
                    "{}/{c} did not end within {timeout:?}:\n{}{}\n{}",
                    pod.name,
                    text(&out.stdout),
                    text(&out.stderr),
                    logs(procs)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `$(NAME)` replaced by NAME's value where NAME is defined in `env`, `$$(` kept as `$(`, as the
/// kubelet expands command, args and env values.
fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(t) = tail.strip_prefix("$$") {
            out.push('$');
            rest = t;
        } else if let Some((var, after)) = tail.strip_prefix("$(").and_then(|t| t.split_once(')')) {
            match env.iter().rev().find(|(k, _)| k == var) {
                Some((_, v)) => out.push_str(v),
                None => out.push_str(&tail[..var.len() + 3]),
            }
            rest = after;
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// `GET path` over HTTP/1.0 with an optional bearer key: (status, body).
/// Whether the gRPC health service (grpc.health.v1, as Kubernetes' `grpc` probe asks it) at `addr`
/// says SERVING for the whole server, within a second.
fn grpc_serving(addr: &str) -> bool {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
    let url = format!("http://{addr}");
    runtime.block_on(async move {
        let check = async {
            let channel = tonic::transport::Endpoint::from_shared(url).ok()?.connect().await.ok()?;
            let mut client = HealthClient::new(channel);
            let status = client.check(HealthCheckRequest { service: String::new() }).await.ok()?.into_inner().status;
            Some(status == ServingStatus::Serving as i32)
        };
        tokio::time::timeout(Duration::from_secs(1), check).await.ok().flatten().unwrap_or(false)
    })
}

fn http_get(addr: &str, path: &str, key: Option<&str>) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, key, None)
}

/// `POST path` of a JSON body over HTTP/1.0 with an optional bearer key: (status, body).
fn http_post(addr: &str, path: &str, key: Option<&str>, body: &Value) -> std::io::Result<(u16, String)> {
    http_request(addr, "POST", path, key, Some(body))
}

/// One HTTP/1.0 request (its answer read within 10 s at most per read): (status, body).
fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    let body = body.map(Value::to_string).unwrap_or_default();
    let content = if body.is_empty() {
        String::new()
    } else {
        format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len())
    };
    s.write_all(format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}{content}\r\n{body}").as_bytes())?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    let status = reply.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, reply.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_string())))
}


#[test]
fn rendered_commands_run_as_local_processes_quantize_and_serve_a_model() {
    let s = scratch();
    let dir = s.path();
    let models = dir.join("models");
    std::fs::create_dir_all(&models).expect("the scratch folder is writable");
    let models_arg = models.to_string_lossy().into_owned();
    let [grpc, etcd_client, etcd_peer, stage, http, gateway] = free_ports();
    let values = Values::file(&loopback_values())
        .set(&format!("coordinator.grpcPort={grpc}"))
        .set(&format!("etcd.clientPort={etcd_client}"))
        .set(&format!("etcd.peerPort={etcd_peer}"))
        .set(&format!("workers.stagePort={stage}"))
        .set(&format!("server.port={http}"))
        .set(&format!("coordinator.httpPort={gateway}"))
        .set(&format!("modelStore.mountPath={models_arg}"))
        .set(&format!("modelStore.hostPath.path={models_arg}"));
    let r = Rendered { docs: render(&values), dir: dir.to_path_buf(), model_store: models_arg.clone() };

    // The model and the calibration texts, in the model store (the coordinator's --root).
    let model = models.join("tiny");
    awq_ok(["synthetic", &model.to_string_lossy(), "--seed", "7"]);
    std::fs::write(models.join("calib.txt"), short_lines(8)).expect("the model store is writable");

    let etcd = r.pod("StatefulSet", &full("etcd"), 0);
    let coordinator = r.pod("Deployment", &full("coordinator"), 0);
    let workers = [r.pod("StatefulSet", &full("workers"), 0), r.pod("StatefulSet", &full("workers"), 1)];
    let test_pod = r.pod("Pod", &full("test"), 0);
    let server = r.pod("Deployment", &full("server"), 0);
    let deployments_job = r.pod("Job", &full("deployments"), 0);
    let replicas = get(workers[0].doc, "spec.replicas").and_then(Yaml::as_u64);
    assert_eq!(replicas, Some(2), "the loopback values run two workers");

    let etcd_proc = r.start(&etcd, "etcd");
    r.wait_started(&etcd, "etcd", &[&etcd_proc]);
    let coordinator_proc = r.start(&coordinator, "coordinator");
    r.wait_started(&coordinator, "coordinator", &[&etcd_proc, &coordinator_proc]);
    let worker_procs: Vec<Proc> = workers.iter().map(|w| r.start(w, "worker")).collect();
    let mut procs: Vec<&Proc> = vec![&etcd_proc, &coordinator_proc];
    procs.extend(worker_procs.iter());
    for w in &workers {
        r.wait_started(w, "worker", &procs);
    }
    // Ready (gRPC health SERVING) once joined to the coordinator.
    for w in &workers {
        r.wait_ready(w, "worker", START_TIMEOUT * 2, &procs);
    }

    // `helm test`'s first container lists both workers, each at its pod IP and stage port.
    wait_until("helm test's `awq workers` to list both workers", START_TIMEOUT * 2, &procs, || {
        let out = r.run_to_end(&test_pod, "workers", CLIENT_TIMEOUT, &procs);
        let listed = text(&out.stdout);
        (out.status.success()
            && workers.iter().all(|w| {
                listed
                    .lines()
                    .any(|l| l.starts_with(&format!("{}-", w.name)) && l.contains(&format!("{}:{stage}", w.ip)))
            }))
        .then_some(())
    });

    // A job through the coordinator's address as the workers have it, on both workers, with the
    // admin token of the chart's Secret (refused without it).
    let url = flag_value(&command_line(container(workers[0].doc, "worker")), "--coordinator").to_string();
    assert_eq!(url, format!("http://127.0.0.1:{grpc}"), "the loopback values' coordinator address");
    let admin_token = r.secret(&full("tokens"), "admin-token");
    let worker_token = r.secret(&full("tokens"), "worker-token");
    let out = awq_within(&["jobs".to_string(), "--coordinator".to_string(), url.clone()], CLIENT_TIMEOUT)
        .unwrap_or_else(|| panic!("awq jobs did not end\n{}", logs(&procs)));
    assert_eq!(out.status.code(), Some(1), "awq jobs without the admin token: {}", text(&out.stdout));
    assert!(text(&out.stderr).contains("refused the token"), "{}", text(&out.stderr));
    let output = models.join("tiny-awq");
    let args: Vec<String> = [
        "submit",
        &model.to_string_lossy(),
        "-o",
        &output.to_string_lossy(),
        "--calib",
        &models.join("calib.txt").to_string_lossy(),
        "--seqlen",
        "128",
        "--n-samples",
        "8",
        "--group-size",
        "64",
        "--coordinator",
        &url,
        "--token",
        &admin_token,
        "--wait",
        "--json",
    ]
    .map(String::from)
    .into();
    let out = awq_within(&args, JOB_TIMEOUT)
        .unwrap_or_else(|| panic!("awq submit --wait did not end within {JOB_TIMEOUT:?}\n{}", logs(&procs)));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "awq {} failed:\n{stdout}{}\n{}", args.join(" "), text(&out.stderr), logs(&procs));
    let job: Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("awq submit printed no JSON ({e}): {stdout}"));
    assert_eq!(job["state"], "done", "{job}\n{}", logs(&procs));
    let stage_workers: BTreeSet<&str> = job["stages"]
        .as_array()
        .unwrap_or_else(|| panic!("no stages in {job}"))
        .iter()
        .map(|s| s["worker"].as_str().expect("a worker id"))
        .collect();
    for w in &workers {
        assert!(
            stage_workers.iter().any(|id| id.starts_with(&format!("{}-", w.name))),
            "worker pod {} ran no stage of {job}",
            w.name
        );
    }
    let config: Value =
        serde_json::from_slice(&std::fs::read(output.join("config.json")).expect("the output has config.json"))
            .expect("JSON");
    assert_eq!(config["quantization_config"]["quant_method"], "awq", "{config}");

    // The deployments Job serves the job's output on a worker, through the coordinator's HTTP API
    // (the API key of the chart's Secret), as a post-install hook would once the model is there.
    let key = r.secret(&full("api-key"), "api-key");
    let api = format!("127.0.0.1:{gateway}");
    let deploy_job = |r: &Rendered, job: &LocalPod, procs: &[&Proc]| -> (String, String) {
        let c = container(job.doc, "deploy-tiny");
        let timeout = flag_value(&command_line(c), "--timeout").parse::<u64>().expect("--timeout is seconds");
        let out = r.run_to_end(job, "deploy-tiny", Duration::from_secs(timeout + 30), procs);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(
            out.status.success(),
            "the deployments Job failed ({}):\n{stdout}{stderr}\n{}",
            out.status,
            logs(procs)
        );
        (stdout, stderr)
    };
    // Replica loads started on the workers since the job (a worker logs one `loading` line each).
    let load_lines = || -> usize {
        worker_procs
            .iter()
            .map(|p| p.log().lines().filter(|l| l.contains("loading") && l.contains("deployment=tiny")).count())
            .sum()
    };
    let before = load_lines();
    let loads = || load_lines() - before;
    let (stdout, _) = deploy_job(&r, &deployments_job, &procs);
    assert!(stdout.contains("1/1 ready"), "awq deploy --wait ended before its replica was ready: {stdout}");
    assert_eq!(loads(), 1, "the deployment's replica was not loaded once\n{}", logs(&procs));

    // `helm test`'s gateway container lists it, with the key, at the coordinator's Service address.
    let out = r.run_to_end(&test_pod, "gateway", CLIENT_TIMEOUT, &procs);
    let listed = text(&out.stdout);
    assert!(
        out.status.success(),
        "helm test's gateway curl failed ({}): {listed}{}\n{}",
        out.status,
        text(&out.stderr),
        logs(&procs)
    );
    let models_json: Value =
        serde_json::from_str(&listed).unwrap_or_else(|e| panic!("/v1/models answered {listed}: {e}"));
    assert_eq!(models_json["data"][0]["id"], "loopback/tiny-awq", "{models_json}");
    assert_eq!(models_json["data"][0]["max_model_len"], 128, "deployments[0].maxModelLen: {models_json}");
    let (status, body) = http_get(&api, "/v1/models", None).expect("the coordinator's HTTP API answers");
    assert_eq!(status, 401, "the coordinator answered {status} without the API key: {body}");
    let completion = |what: &str| {
        let request =
            json!({"model": "loopback/tiny-awq", "prompt": "The lighthouse", "max_tokens": 2, "temperature": 0});
        let (status, body) = http_post(&api, "/v1/completions", Some(&key), &request)
            .unwrap_or_else(|e| panic!("{what}: the coordinator's HTTP API does not answer: {e}"));
        assert_eq!(status, 200, "{what}: /v1/completions answered {body}\n{}", logs(&procs));
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {body}"));
        let tokens = v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
        assert!((1..=2).contains(&tokens) && v["choices"][0]["text"].is_string(), "{what}: {body}");
    };
    completion("after install");

    // A helm upgrade with the same values runs the Job again: the deployment is kept, not reloaded.
    let (_, stderr) = deploy_job(&r, &deployments_job, &procs);
    assert!(stderr.contains("exists already with this spec; kept"), "{stderr}");
    assert_eq!(loads(), 1, "the Job of an unchanged deployment reloaded it\n{}", logs(&procs));

    // A helm upgrade that changes the deployment's values: the Job replaces it (one more load).
    let upgraded_values = dir.join("upgrade.yaml");
    let upgrade = "deployments:\n  - {name: tiny, model: tiny-awq, servedModelName: loopback/tiny-awq, \
                   maxModelLen: 64, kvCacheBytes: 8388608}\n";
    std::fs::write(&upgraded_values, upgrade).expect("the scratch folder is writable");
    let upgraded = Values { files: vec![loopback_values(), upgraded_values], sets: values.sets.clone() };
    let u = Rendered { docs: render(&upgraded), dir: dir.to_path_buf(), model_store: models_arg.clone() };
    let upgraded_job = u.pod("Job", &full("deployments"), 0);
    let args = command_line(container(upgraded_job.doc, "deploy-tiny"));
    assert_eq!(flag_value(&args, "--max-model-len"), "64", "the upgrade's values: {args:?}");
    let (stdout, stderr) = deploy_job(&u, &upgraded_job, &procs);
    assert!(stderr.contains("replacing it") && stdout.contains("1/1 ready"), "{stdout}{stderr}");
    assert_eq!(loads(), 2, "the Job of a changed deployment did not reload it\n{}", logs(&procs));
    completion("after the upgrade");

    // The server serves the job's output too, with the same API key; `helm test`'s server-models
    // container lists the model through the server's Service address.
    let server_proc = r.start(&server, "server");
    procs.push(&server_proc);
    r.wait_started(&server, "server", &procs);
    let out = r.run_to_end(&test_pod, "server-models", CLIENT_TIMEOUT, &procs);
    let listed = text(&out.stdout);
    assert!(
        out.status.success(),
        "helm test's curl failed ({}): {listed}{}\n{}",
        out.status,
        text(&out.stderr),
        logs(&procs)
    );
    let models_json: Value =
        serde_json::from_str(&listed).unwrap_or_else(|e| panic!("/v1/models answered {listed}: {e}"));
    assert_eq!(models_json["data"][0]["id"], "tiny-awq", "{models_json}");
    let (status, body) = http_get(&format!("127.0.0.1:{http}"), "/v1/models", None).expect("the server answers");
    assert_eq!(status, 401, "the server answered {status} without the API key: {body}");

    // No process logged a token or the key.
    for p in &procs {
        let log = p.log();
        for secret in [&admin_token, &worker_token, &key] {
            assert!(!log.contains(secret.as_str()), "{} logged a secret:\n{log}", p.name());
        }
    }
}

/// A CA and a certificate it signs for `names` (DNS names or IP addresses), as PEM: (tls.crt,
/// tls.key, ca.crt), what a cert-manager Secret holds.
fn certificate_pems(names: &[&str]) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("a CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "awq chart test CA");
    let ca = ca_params.self_signed(&ca_key).expect("a self-signed CA");
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("a key");
    let params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("parameters");
    let cert = params.signed_by(&key, &issuer).expect("a certificate signed by the CA");
    (cert.pem(), key.serialize_pem(), ca.pem())
}

/// The rendered commands of the loopback values with mutual TLS on (`tls.existingSecret` emulated
/// as a Secret of a CA and a certificate for the loopback addresses the pods use): the coordinator
/// and both workers start with the chart's TLS flags and files (their probes now TCP connects);
/// `helm test`'s `awq workers` lists both over mutual TLS, and its curl GETs the coordinator's
/// HTTP API over HTTPS with `--cacert`; a job runs on both workers (stages over TLS); a client
/// without a certificate is refused, plain HTTP gets no answer from the HTTP API.
#[test]
fn rendered_commands_run_over_mutual_tls() {
    let s = scratch();
    let dir = s.path();
    let models = dir.join("models");
    std::fs::create_dir_all(&models).expect("the scratch folder is writable");
    let models_arg = models.to_string_lossy().into_owned();
    let [grpc, stage, gateway] = free_ports();
    // No etcd, no server, no deployments (helm test then GETs /metrics): the TLS links only.
    let overlay = dir.join("tls.yaml");
    let tls_values = "tls: {enabled: true, existingSecret: awq-tls, mutual: true}\netcd: {mode: none}\n\
                      server: {enabled: false}\ndeployments: []\n";
    std::fs::write(&overlay, tls_values).expect("the scratch folder is writable");
    let values = Values { files: vec![loopback_values(), overlay], sets: Vec::new() }
        .set(&format!("coordinator.grpcPort={grpc}"))
        .set(&format!("workers.stagePort={stage}"))
        .set(&format!("coordinator.httpPort={gateway}"))
        .set(&format!("modelStore.mountPath={models_arg}"))
        .set(&format!("modelStore.hostPath.path={models_arg}"));
    let mut docs = render(&values);
    // The Secret tls.existingSecret names, for the certificate the loopback pods are reached at:
    // the coordinator at 127.0.0.1 (addressHost), each worker at its pod IP.
    let (cert, key, ca) = certificate_pems(&["127.0.0.1", "127.0.0.10", "127.0.0.11", "localhost"]);
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "awq-tls"},
                        "stringData": {"tls.crt": cert, "tls.key": key, "ca.crt": ca}});
    docs.push(serde_yaml::to_value(&secret).expect("a Secret"));
    let r = Rendered { docs, dir: dir.to_path_buf(), model_store: models_arg.clone() };
    let model = models.join("tiny");
    awq_ok(["synthetic", &model.to_string_lossy(), "--seed", "7"]);

    let coordinator = r.pod("Deployment", &full("coordinator"), 0);
    let workers = [r.pod("StatefulSet", &full("workers"), 0), r.pod("StatefulSet", &full("workers"), 1)];
    let test_pod = r.pod("Pod", &full("test"), 0);
    let coordinator_proc = r.start(&coordinator, "coordinator");
    r.wait_started(&coordinator, "coordinator", &[&coordinator_proc]);
    let worker_procs: Vec<Proc> = workers.iter().map(|w| r.start(w, "worker")).collect();
    let mut procs: Vec<&Proc> = vec![&coordinator_proc];
    procs.extend(worker_procs.iter());
    for w in &workers {
        r.wait_started(w, "worker", &procs);
    }

    // `helm test`'s `awq workers` (the CA, and its certificate: mutual) lists both workers.
    wait_until("helm test's `awq workers` to list both workers over TLS", START_TIMEOUT * 2, &procs, || {
        let out = r.run_to_end(&test_pod, "workers", CLIENT_TIMEOUT, &procs);
        let listed = text(&out.stdout);
        (out.status.success() && workers.iter().all(|w| listed.contains(&format!("{}:{stage}", w.ip)))).then_some(())
    });
    // Its curl: the coordinator's HTTP API over HTTPS, checked against the CA.
    let out = r.run_to_end(&test_pod, "gateway", CLIENT_TIMEOUT, &procs);
    assert!(
        out.status.success() && text(&out.stdout).contains("awq:"),
        "helm test's curl over HTTPS failed ({}): {}{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr),
        logs(&procs)
    );
    let plain = http_get(&format!("127.0.0.1:{gateway}"), "/metrics", None);
    assert!(!matches!(plain, Ok((200, _))), "the HTTP API answered plain HTTP with TLS on: {plain:?}");

    // A job over both workers, from a client with the chart's files (RTN: no calibration).
    let url = flag_value(&command_line(container(workers[0].doc, "worker")), "--coordinator").to_string();
    assert_eq!(url, format!("https://127.0.0.1:{grpc}"), "the workers' --coordinator");
    let files = dir.join("client");
    std::fs::create_dir_all(&files).expect("the scratch folder is writable");
    for (name_, pem) in [("tls.crt", &cert), ("tls.key", &key), ("ca.crt", &ca)] {
        std::fs::write(files.join(name_), pem).expect("the scratch folder is writable");
    }
    let file = |name_: &str| files.join(name_).to_string_lossy().into_owned();
    let admin_token = r.secret(&full("tokens"), "admin-token");
    let client = ["--coordinator", &url, "--token", &admin_token, "--tls-ca", &file("ca.crt")].map(String::from);
    let mut args: Vec<String> =
        ["submit", &model.to_string_lossy(), "-o", &models.join("tiny-rtn").to_string_lossy()].map(String::from).into();
    args.extend(
        ["--method", "rtn", "--wait", "--json", "--tls-cert", &file("tls.crt"), "--tls-key", &file("tls.key")]
            .map(String::from),
    );
    args.extend(client.iter().cloned());
    let out = awq_within(&args, JOB_TIMEOUT)
        .unwrap_or_else(|| panic!("awq submit --wait did not end within {JOB_TIMEOUT:?}\n{}", logs(&procs)));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "awq {} failed:\n{stdout}{}\n{}", args.join(" "), text(&out.stderr), logs(&procs));
    let job: Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("awq submit printed no JSON ({e}): {stdout}"));
    assert_eq!(job["state"], "done", "{job}\n{}", logs(&procs));
    let stage_workers: BTreeSet<&str> =
        job["stages"].as_array().into_iter().flatten().filter_map(|s| s["worker"].as_str()).collect();
    for w in &workers {
        assert!(
            stage_workers.iter().any(|id| id.starts_with(&format!("{}-", w.name))),
            "{} ran no stage of {job}",
            w.name
        );
    }

    // Mutual: a client without a certificate is refused, saying what to pass.
    let mut args: Vec<String> = vec!["workers".into()];
    args.extend(client.iter().cloned());
    let out = awq_within(&args, CLIENT_TIMEOUT).unwrap_or_else(|| panic!("awq workers did not end\n{}", logs(&procs)));
    assert_eq!(out.status.code(), Some(1), "awq workers without a client certificate: {}", text(&out.stdout));
    assert!(text(&out.stderr).contains("requires a client certificate"), "{}", text(&out.stderr));
}
