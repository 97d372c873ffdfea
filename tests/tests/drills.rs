//! Issue 20's drills on what a job depends on besides its workers (tests/tests/cluster.rs kills
//! workers, cuts their links and silences etcd): the coordinator SIGKILLed while it assembles a
//! job's output, and etcd SIGKILLed and restarted from its data directory mid-job. Real etcd, real
//! `awq coordinator` and `awq worker` processes on loopback; every job must end `done` with the
//! bytes of `awq quantize` in one process, and nothing half-written may ever be visible at the
//! output path ([`OutputWatch`] looks at it every few milliseconds throughout).
//!
//! The model is `awq synthetic`'s SmolLM2-135M shapes cut to [`BLOCKS`] blocks, quantized with
//! round-to-nearest (no calibration: seconds of compute): 90 MB of output, so that writing it
//! from the staged results (what a restarted coordinator's assembly does) takes long enough to be
//! interrupted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use awq_e2e::cluster::{Cluster, StoreKind};
use awq_e2e::serve::Endpoint;
use awq_e2e::*;
use awq_model::writer::FolderId;
use serde_json::{json, Value};

/// How long a job may take (seconds here; the margin is for a loaded CI machine).
const JOB_TIMEOUT: Duration = Duration::from_secs(300);
/// Blocks of the drills' model.
const BLOCKS: u64 = 20;
/// The jobs' options, for `awq submit` and `awq quantize` alike.
const OPTIONS: [&str; 4] = ["--method", "rtn", "--group-size", "64"];

fn arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The drills' model in `dir/smol`, and its reference output (`awq quantize`) in `dir/reference`.
fn model_and_reference(dir: &Path) -> (PathBuf, PathBuf) {
    let model = dir.join("smol");
    let blocks = BLOCKS.to_string();
    awq_ok(["synthetic", &arg(&model), "--preset", "smollm2135m", "--blocks", &blocks, "--seed", "7"]);
    let reference = dir.join("reference");
    let mut args = vec!["quantize".to_string(), arg(&model), "-o".into(), arg(&reference)];
    args.extend(OPTIONS.map(String::from));
    awq_ok(&args);
    (model, reference)
}

/// `awq submit MODEL -o OUT OPTIONS --json` against `c`: the job's id.
fn submit(c: &Cluster, model: &Path, out: &Path) -> String {
    let (model, out) = (arg(model), arg(out));
    let mut args = vec!["submit", &model, "-o", &out];
    args.extend(OPTIONS);
    let job = c.json_within(&args, Duration::from_secs(60));
    job["id"].as_str().unwrap_or_else(|| panic!("no job id in {job}")).to_string()
}

fn state(job: &Value) -> &str {
    job["state"].as_str().unwrap_or_else(|| panic!("no state in {job}"))
}

fn blocks_done(job: &Value) -> u64 {
    job["blocks_done"].as_u64().unwrap_or_else(|| panic!("no blocks_done in {job}"))
}

fn is_terminal(job: &Value) -> bool {
    ["done", "failed", "cancelled"].contains(&state(job))
}

/// What the output path showed: its folder's identity and each file's length.
#[derive(Clone, Debug, PartialEq)]
struct Sight {
    id: FolderId,
    files: BTreeMap<String, u64>,
}

impl Sight {
    /// What `path` holds now; `None` while nothing is there (or it vanished while being listed).
    fn of(path: &Path) -> Option<Sight> {
        let id = FolderId::of(path).ok()??;
        let mut files = BTreeMap::new();
        for entry in std::fs::read_dir(path).ok()? {
            let entry = entry.ok()?;
            files.insert(entry.file_name().to_string_lossy().into_owned(), entry.metadata().ok()?.len());
        }
        Some(Sight { id, files })
    }
}

/// A thread that looks at an output path every 2 ms until dropped, keeping every different thing
/// it saw there. An atomic rename means it sees nothing, then the complete output, which never
/// changes afterwards: one sight.
struct OutputWatch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Sight>>>,
    looks: Arc<Mutex<u64>>,
}

impl OutputWatch {
    fn start(path: &Path) -> OutputWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Arc<Mutex<Vec<Sight>>> = Arc::default();
        let looks: Arc<Mutex<u64>> = Arc::default();
        let (path, s, seen2, looks2) = (path.to_path_buf(), Arc::clone(&stop), Arc::clone(&seen), Arc::clone(&looks));
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(sight) = Sight::of(&path) {
                    let mut seen = seen2.lock().expect("no panic under this lock");
                    if seen.last() != Some(&sight) {
                        seen.push(sight);
                    }
                }
                *looks2.lock().expect("no panic under this lock") += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        OutputWatch { stop, seen, looks }
    }

    /// Asserts that whatever the path showed was `complete` (what it holds at the end), and says
    /// how many looks that took.
    fn assert_only_saw(&self, complete: &Sight) -> u64 {
        let seen = self.seen.lock().expect("no panic under this lock").clone();
        for sight in &seen {
            assert_eq!(sight, complete, "the output path showed something other than the complete output: {seen:#?}");
        }
        *self.looks.lock().expect("no panic under this lock")
    }
}

impl Drop for OutputWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Where the killed coordinator's assembly of `job` was, from what it left on disk.
fn assembly_phase(dir: &Path, job: &str, out: &Path) -> &'static str {
    let temp = dir.join(format!(".out.tmp-{job}"));
    match (out.exists(), temp.join("config.json").exists(), temp.exists()) {
        (true, _, _) => "after the rename",
        (false, true, _) => "writing the small files",
        (false, false, true) => "writing or syncing the shards",
        (false, false, false) => "before creating the output",
    }
}

/// Waits (polling every 2 ms: the assembly takes a fraction of a second) until `ready` holds for
/// the log of the coordinator running now, then SIGKILLs it at once; asserts that its assembly
/// had not ended. Returns how long that took.
fn kill_coordinator_when(c: &mut Cluster, what: &str, mut ready: impl FnMut(&str) -> bool) -> Duration {
    let started = Instant::now();
    loop {
        let log = c.coordinator_log();
        assert!(!log.contains("assembled in"), "the coordinator assembled the job before {what}\n{}", c.logs());
        if ready(&log) {
            break;
        }
        assert!(started.elapsed() < JOB_TIMEOUT, "timed out waiting for {what}\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(2));
    }
    c.kill_coordinator();
    started.elapsed()
}

/// The coordinator SIGKILLed three times around one job's assembly: while it writes the blocks it
/// had staged before an earlier restart (the results since then were written as they came), while
/// its successor writes the whole output from the staged results, and as soon as the third
/// renamed the output into place (before the job's record says done: the fourth must take the
/// output as it is, not assemble it again). The fourth coordinator on the same etcd ends the job
/// `done`, with the bytes of `awq quantize`; the output path showed nothing until it showed the
/// complete output, and no working folder is left.
#[test]
fn the_coordinator_killed_during_assembly_leaves_no_half_written_output_and_the_job_completes() {
    let s = scratch();
    let dir = s.path();
    let (model, reference) = model_and_reference(dir);
    let mut c = Cluster::start(dir, StoreKind::Etcd, &[], &["w0"]);
    let out = dir.join("out");
    let watch = OutputWatch::start(&out);
    let started = Instant::now();
    let job = submit(&c, &model, &out);
    let assembling = format!("assembling the checkpoint job={job}");

    // A restart mid-job: what was staged before it is written into the output at the assembly.
    let before =
        c.wait_job(&job, "a third of the blocks done", JOB_TIMEOUT, |j| blocks_done(j) >= BLOCKS / 3 || is_terminal(j));
    assert_eq!(state(&before), "running", "the job ended before the first restart: {before}");
    c.restart_coordinator();
    let mut phases = Vec::new();
    kill_coordinator_when(&mut c, "the restarted coordinator to assemble", |log| log.contains(&assembling));
    phases.push(assembly_phase(dir, &job, &out));
    // Its successor reads the job back assembling and writes everything from the staged results.
    c.restart_coordinator();
    kill_coordinator_when(&mut c, "the second successor to assemble", |log| log.contains(&assembling));
    phases.push(assembly_phase(dir, &job, &out));
    // The third is killed once the output is in place: the window between the rename and the
    // job's record, where a successor used to assemble again and fail on the existing output.
    c.restart_coordinator();
    kill_coordinator_when(&mut c, "the output to be renamed into place", |_| out.exists());
    phases.push(assembly_phase(dir, &job, &out));
    let recorded_done = c.coordinator_log().contains(&format!("state: done job={job}"));
    let killed_at = Instant::now();
    c.restart_coordinator();
    let end = c.wait_job(&job, "the job to end", JOB_TIMEOUT, is_terminal);
    let recovered = killed_at.elapsed();
    assert_eq!(state(&end), "done", "{end}\n{}", c.logs());
    let took = started.elapsed();

    assert_same_files(&reference, &out);
    let complete = Sight::of(&out).expect("the output exists");
    let looks = watch.assert_only_saw(&complete);
    assert_eq!(leftovers(dir, "out"), Vec::<String>::new(), "working folders left beside the output");
    if !recorded_done {
        let log = c.coordinator_log();
        assert!(log.contains("not assembled again"), "the last coordinator did not take the output in place:\n{log}");
    }
    eprintln!(
        "drill: coordinator killed during assembly: {phases:?}; the fourth ended the job done {:.2} s after the \
         last kill (the job recorded done before it: {recorded_done}); job {:.1} s in all; the output path looked \
         at {looks} times, only ever complete",
        recovered.as_secs_f64(),
        took.as_secs_f64()
    );
}

/// etcd SIGKILLed mid-job (a crash: no clean shutdown) and restarted from its data directory on
/// the same ports 6 s later, as a supervisor would. While it is down, a submission is
/// refused naming the store (never accepted into memory only) and the worker's uploads that the
/// coordinator cannot record are sent again; once it is back, the coordinator (the same process:
/// it neither exits nor loses its leadership) records them and the job ends `done` with the bytes
/// of `awq quantize`.
#[test]
fn etcd_killed_and_restarted_from_its_data_mid_job_the_job_completes_with_the_same_bytes() {
    let s = scratch();
    let dir = s.path();
    let (model, reference) = model_and_reference(dir);
    let mut c = Cluster::start(dir, StoreKind::Etcd, &[], &["w0"]);
    let out = dir.join("out");
    let watch = OutputWatch::start(&out);
    let started = Instant::now();
    let job = submit(&c, &model, &out);
    let before = c.wait_job(&job, "2 blocks done", JOB_TIMEOUT, |j| blocks_done(j) >= 2 || is_terminal(j));
    assert_eq!(state(&before), "running", "the job ended before etcd could be killed: {before}");

    c.etcd_mut().kill();
    let killed = Instant::now();
    let (model_arg, second) = (arg(&model), arg(&dir.join("second")));
    let err = c.err(&[&["submit", model_arg.as_str(), "-o", second.as_str()][..], &OPTIONS[..]].concat());
    let refused_in = killed.elapsed();
    assert!(err.contains("the job was not submitted") && err.contains("etcd"), "{err}");
    c.wait_until("an upload refused while etcd is down", Duration::from_secs(60), || {
        c.worker_log("w0").contains("sending it again").then_some(())
    });
    // Down for longer than the coordinator's leadership lease (5 s), which must not cost it its
    // leadership: no other coordinator could have taken over meanwhile.
    std::thread::sleep(Duration::from_secs(6).saturating_sub(killed.elapsed()));
    let refused_blocks = blocks_done(&c.status(&job));
    c.etcd_mut().restart();
    let down = killed.elapsed();
    let back = Instant::now();

    let end = c.wait_job(&job, "the job to end", JOB_TIMEOUT, is_terminal);
    let after_back = back.elapsed();
    assert_eq!(state(&end), "done", "{end}\n{}", c.logs());
    assert_same_files(&reference, &out);
    let looks = watch.assert_only_saw(&Sight::of(&out).expect("the output exists"));
    assert_eq!(leftovers(dir, "out"), Vec::<String>::new(), "working folders left beside the output");
    let jobs = c.json(&["jobs"]);
    assert_eq!(jobs.as_array().map(Vec::len), Some(1), "a refused submission became a job: {jobs}");
    assert!(!dir.join("second").exists(), "a refused submission wrote its output");
    let log = c.coordinator_log();
    assert_eq!(log.matches("elected leader").count(), 1, "the coordinator lost its leadership:\n{log}");
    assert_eq!(c.etcd().count_keys("/awq/v1/leader"), 1, "the leader's key did not survive the restart");
    let workers = c.workers_json();
    assert!(workers.iter().any(|w| w["name"] == "w0"), "the worker is no longer joined: {workers:?}");
    eprintln!(
        "drill: etcd killed after {} blocks, down {:.1} s (a submission refused in {:.2} s; {refused_blocks} blocks \
         recorded when it came back), the job done {:.1} s after it was back ({:.1} s in all); the output path \
         looked at {looks} times, only ever complete",
        blocks_done(&before),
        down.as_secs_f64(),
        refused_in.as_secs_f64(),
        after_back.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

/// `awq:num_requests_running` of the gateway's /metrics (the replicas' engines, asked through the
/// link), or `None` while it cannot say.
fn running_requests(api: &Endpoint) -> Option<f64> {
    let (status, text) = api.get("/metrics");
    (status == 200).then(|| awq_e2e::serve::metric_value(&text, "awq:num_requests_running")).flatten()
}

/// Reads a completion stream to its end: the payloads before `[DONE]` and when it ended (`None`
/// for a stream that ended without `[DONE]`).
fn read_to_end(mut stream: awq_e2e::serve::SseStream) -> (Vec<Value>, Option<Instant>) {
    let mut payloads = Vec::new();
    while let Some(data) = stream.next_data() {
        if data == "[DONE]" {
            return (payloads, Some(Instant::now()));
        }
        payloads.push(serde_json::from_str(&data).unwrap_or_else(|e| panic!("not JSON ({e}): {data}")));
    }
    (payloads, None)
}

/// The link between the coordinator's HTTP gateway and a replica (the worker's port, which it
/// advertises as a proxy's: `awq_e2e::proxy`), broken under a streaming completion: cut (every
/// connection reset), then silent (open, nothing passes). Each time the request in flight ends
/// with an error event and `[DONE]` within a bound, never hangs; once the link passes again, new
/// requests succeed with the greedy text of before; the replica's engine ends the orphaned
/// requests (nothing left running).
#[test]
fn a_cut_or_silent_link_to_a_replica_ends_the_request_in_flight_and_new_ones_succeed_once_it_heals() {
    use awq_e2e::cluster::{free_port, start_worker_with};
    use awq_e2e::proxy::Proxy;
    let s = scratch();
    let dir = s.path();
    let model = dir.join("smol");
    awq_ok(["synthetic", &arg(&model), "--preset", "smollm2135m", "--blocks", "8", "--seed", "5"]);
    let http = format!("127.0.0.1:{}", free_port());
    let c = Cluster::start_with(dir, StoreKind::Memory, &[], &[], &["--http-listen", &http]);
    let port = free_port();
    let proxy = Proxy::start(format!("127.0.0.1:{port}").parse().expect("an address"));
    let (listen, advertise) = (format!("127.0.0.1:{port}"), proxy.addr.to_string());
    let _worker = start_worker_with(dir, c.url(), "w0", &["--listen", &listen, "--advertise", &advertise]);
    c.wait_until("the worker to join", Duration::from_secs(60), || (c.workers_json().len() == 1).then_some(()));
    let deploy = ["deploy", &arg(&model), "--name", "m", "--max-model-len", "512", "--kv-cache-bytes", "64000000"];
    c.json_within(&[&deploy[..], &["--wait", "--timeout", "120"]].concat(), Duration::from_secs(180));
    let api = Endpoint { addr: http, api_key: None };
    let greedy = || {
        let body = json!({"model": "m", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0});
        let (status, text) = api.post("/v1/completions", &body);
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        (status == 200).then(|| v["choices"][0]["text"].as_str().map(String::from)).flatten()
    };
    let want = c.wait_until("a completion through the gateway", Duration::from_secs(30), greedy);
    let long = json!({"model": "m", "prompt": "Tell me a story.", "max_tokens": 400, "temperature": 0,
                      "ignore_eos": true, "stream": true});
    let through = proxy.accepted();

    let mut figures = Vec::new();
    for (fault, bound) in [("cut", Duration::from_secs(10)), ("silent", Duration::from_secs(30))] {
        let mut stream = api.stream("/v1/completions", &long);
        assert_eq!(stream.status, 200, "{fault}: the stream did not start");
        assert!(stream.next_data().is_some(), "{fault}: no first chunk");
        let broken = Instant::now();
        match fault {
            "cut" => proxy.cut(),
            _ => proxy.set_black_hole(true),
        }
        let reader = std::thread::spawn(move || read_to_end(stream));
        let deadline = broken + bound;
        while !reader.is_finished() {
            assert!(
                Instant::now() < deadline,
                "{fault}: the request in flight still runs {bound:?} after the link broke"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let (payloads, done) = reader.join().expect("the reader ends");
        let ended = done.map(|t| t - broken).unwrap_or_else(|| panic!("{fault}: the stream ended without [DONE]"));
        let last = payloads.last().cloned().unwrap_or(Value::Null);
        let message = last["error"]["message"].as_str().unwrap_or_else(|| panic!("{fault}: no error event: {last}"));
        assert!(message.contains("lost"), "{fault}: the error does not say the replica was lost: {message}");
        let tokens = payloads.iter().filter(|p| p["choices"].is_array()).count();
        assert!(tokens < 400, "{fault}: the request finished although its link broke");
        proxy.set_black_hole(false);
        let healed = Instant::now();
        let text =
            c.wait_until(&format!("a completion after the {fault} link healed"), Duration::from_secs(60), greedy);
        assert_eq!(text, want, "{fault}: another text after the link healed");
        figures.push(format!(
            "{fault}: the stream in flight ended with an error {:.2} s after the link broke ({tokens} chunks \
             after the first); a new request succeeded {:.2} s after it healed",
            ended.as_secs_f64(),
            healed.elapsed().as_secs_f64()
        ));
    }
    assert!(proxy.accepted() > through, "the gateway did not connect again through the proxy");
    // The replica ended the requests whose link broke (its side of the connection closed too).
    c.wait_until("the replica to end the orphaned requests", Duration::from_secs(60), || {
        (running_requests(&api) == Some(0.0)).then_some(())
    });
    eprintln!("drill: gateway to replica link: {}", figures.join("; "));
}

/// SIGTERM to a coordinator serving the OpenAI API (what Kubernetes sends a pod it stops): the
/// gateway drains as `awq serve`'s does. A stream running at the signal finishes with every token;
/// meanwhile /health and new completions get 503 (`server_shutting_down`); then the coordinator
/// exits 0, within its --shutdown-timeout.
#[test]
fn a_coordinator_given_sigterm_drains_its_gateway_and_exits() {
    const TOKENS: u64 = 200;
    let s = scratch();
    let dir = s.path();
    let model = dir.join("smol");
    awq_ok(["synthetic", &arg(&model), "--preset", "smollm2135m", "--blocks", "8", "--seed", "5"]);
    let http = format!("127.0.0.1:{}", awq_e2e::cluster::free_port());
    let coordinator_args = ["--http-listen", http.as_str(), "--shutdown-timeout", "60"];
    let mut c = Cluster::start_with(dir, StoreKind::Memory, &[], &["w0"], &coordinator_args);
    let deploy = ["deploy", &arg(&model), "--name", "m", "--max-model-len", "512", "--kv-cache-bytes", "64000000"];
    c.json_within(&[&deploy[..], &["--wait", "--timeout", "120"]].concat(), Duration::from_secs(180));
    let api = Endpoint { addr: http, api_key: None };
    c.wait_until("the gateway to answer /health", Duration::from_secs(30), || (api.get("/health").0 == 200).then_some(()));
    let long = json!({"model": "m", "prompt": "Once upon a time", "max_tokens": TOKENS, "temperature": 0,
                      "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}});
    let mut stream = api.stream("/v1/completions", &long);
    assert_eq!(stream.status, 200, "the stream did not start");
    assert!(stream.next_data().is_some(), "no first chunk");
    let reader = std::thread::spawn(move || read_to_end(stream));

    c.coordinator_mut().terminate();
    let signalled = Instant::now();
    c.wait_until("/health to answer 503 after SIGTERM", Duration::from_secs(10), || {
        (api.get("/health").0 == 503).then_some(())
    });
    let drain_seen = signalled.elapsed();
    let (status, body) = api.post("/v1/completions", &json!({"model": "m", "prompt": "x", "max_tokens": 1}));
    assert_eq!(status, 503, "a new request during the drain: {body}");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    assert_eq!(v["error"]["code"], "server_shutting_down", "{body}");
    let refused_at = Instant::now();

    let (payloads, done_at) = reader.join().expect("the reader ends");
    let done_at = done_at.unwrap_or_else(|| panic!("the stream running at SIGTERM ended without [DONE]:\n{}", c.logs()));
    let usage = payloads.iter().rev().find_map(|p| p["usage"]["completion_tokens"].as_u64());
    assert_eq!(usage, Some(TOKENS), "the stream running at SIGTERM lost tokens:\n{}", c.logs());
    assert!(done_at > refused_at, "the stream ended before the refusal: nothing was checked during the drain");
    let exit_by = Instant::now() + Duration::from_secs(20);
    let exited = loop {
        if let Some(status) = c.coordinator_mut().exited() {
            break status;
        }
        assert!(Instant::now() < exit_by, "the coordinator still runs 20 s after its drain:\n{}", c.coordinator_log());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exited.success(), "the coordinator's exit after SIGTERM: {exited}\n{}", c.coordinator_log());
    eprintln!(
        "coordinator drain: /health 503 {:.0} ms after SIGTERM; the running stream ended {:.1} s after it with all \
         {TOKENS} tokens; the process exited {:.1} s after that",
        drain_seen.as_secs_f64() * 1e3,
        (done_at - signalled).as_secs_f64(),
        done_at.elapsed().as_secs_f64()
    );
}
