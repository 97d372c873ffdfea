//! The cluster end to end: a real etcd, `awq coordinator` and `awq worker` processes on loopback,
//! driven through the CLI (`awq submit`, `status`, `watch`, `cancel`, `jobs`, `workers`).
//!
//! The reference everywhere is `awq quantize` of the same model with the same options (one process,
//! one worker): a job must give the same bytes on 2 and 3 workers, with uneven stage ranges, after a
//! coordinator restart (etcd keeps the finished blocks) and after a worker is killed (another one
//! recomputes its blocks from the embeddings). Bad submissions fail at once with a message naming
//! the field and the file.
//!
//! Synthetic models are `awq synthetic`'s tiny llama (hidden 128, byte-level tokenizer: one token per
//! byte). The "slow" job ([`slow_job`]: 12 blocks, 10 calibration texts of ~240 bytes in rows of 256
//! tokens) takes 0.4 to 1 s per block per worker on a 2-core machine, long enough to interrupt
//! between blocks; the tests that run it take 4 to 15 s.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use awq_e2e::cluster::{free_port, Cluster, StoreKind};
use awq_e2e::*;
use serde_json::Value;

/// How long a job on synthetic models may take (they take seconds; the margin is for loaded CI).
const JOB_TIMEOUT: Duration = Duration::from_secs(300);


fn arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// `awq synthetic DIR/NAME --seed 7 EXTRA...` (a tiny llama unless `extra` says otherwise).
fn synthetic(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let model = dir.join(name);
    let mut args = vec!["synthetic".to_string(), arg(&model), "--seed".into(), "7".into()];
    args.extend(extra.iter().map(|s| s.to_string()));
    awq_ok(&args);
    model
}

/// Quantization options of a job: `awq quantize` and `awq submit` get exactly these.
struct Options(Vec<String>);

impl Options {
    fn new(flags: &[&str]) -> Options {
        Options(flags.iter().map(|s| s.to_string()).collect())
    }

    /// Calibration from `calib`, `n_samples` texts in rows of `seqlen`, group size 64.
    fn calibrated(calib: &Path, seqlen: u32, n_samples: u32) -> Options {
        let (seqlen, n_samples) = (seqlen.to_string(), n_samples.to_string());
        Options::new(&["--calib", &arg(calib), "--seqlen", &seqlen, "--n-samples", &n_samples, "--group-size", "64"])
    }
}

/// The short-lines job of the identity tests: [`SHORT_LINES`] (`awq_e2e`) in `dir/calib.txt`.
fn short_job(dir: &Path) -> Options {
    let calib = dir.join("calib.txt");
    std::fs::write(&calib, short_lines(SHORT_LINES.len())).expect("the scratch folder is writable");
    Options::calibrated(&calib, 128, 16)
}

/// The slow job: 40 texts of at most 240 bytes (runs of [`ENGLISH_SAMPLE`]'s words, each starting
/// 13 words after the previous one) in `dir/calib-long.txt`, 10 of them used, rows of 256 tokens.
fn slow_job(dir: &Path) -> Options {
    let words: Vec<&str> = ENGLISH_SAMPLE.split_whitespace().collect();
    let lines: Vec<String> = (0..40)
        .map(|i| {
            let mut line = String::new();
            for w in words.iter().cycle().skip(i * 13) {
                if line.len() + 1 + w.len() > 240 {
                    break;
                }
                if !line.is_empty() {
                    line.push(' ');
                }
                line.push_str(w);
            }
            line
        })
        .collect();
    let calib = dir.join("calib-long.txt");
    std::fs::write(&calib, lines.join("\n") + "\n").expect("the scratch folder is writable");
    Options::calibrated(&calib, 256, 10)
}

/// The 12-block model of the slow job.
const SLOW_BLOCKS: u64 = 12;

/// `awq quantize MODEL -o OUT OPTIONS` (the single-process reference).
fn reference(model: &Path, out: &Path, options: &Options) {
    let mut args = vec!["quantize".to_string(), arg(model), "-o".into(), arg(out)];
    args.extend(options.0.iter().cloned());
    awq_ok(&args);
}

/// `awq submit MODEL -o OUT OPTIONS EXTRA... --json` against `c`, parsed (the job as submitted, or
/// as it ended with `--wait`).
fn submit(c: &Cluster, model: &Path, out: &Path, options: &Options, extra: &[&str], timeout: Duration) -> Value {
    let (model, out) = (arg(model), arg(out));
    let mut args: Vec<&str> = vec!["submit", &model, "-o", &out];
    args.extend(options.0.iter().map(String::as_str));
    args.extend(extra);
    c.json_within(&args, timeout)
}

fn id(job: &Value) -> String {
    job["id"].as_str().unwrap_or_else(|| panic!("no job id in {job}")).to_string()
}

fn state(job: &Value) -> &str {
    job["state"].as_str().unwrap_or_else(|| panic!("no state in {job}"))
}

fn count(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no count `{key}` in {v}"))
}

fn is_terminal(job: &Value) -> bool {
    ["done", "failed", "cancelled"].contains(&state(job))
}

fn stages(job: &Value) -> &Vec<Value> {
    job["stages"].as_array().unwrap_or_else(|| panic!("no stage list in {job}"))
}

/// (block_start, block_end) of each stage, in stage order.
fn ranges(stages: &[&Value]) -> Vec<(u64, u64)> {
    stages.iter().map(|s| (count(s, "block_start"), count(s, "block_end"))).collect()
}

/// The worker id a stage ran on (empty once its worker was lost).
fn worker_of(stage: &Value) -> &str {
    stage["worker"].as_str().unwrap_or_else(|| panic!("no worker in {stage}"))
}

/// The worker name (`--name`) in a coordinator-given worker id (`NAME-N`).
fn name_of(worker_id: &str) -> &str {
    worker_id.rsplit_once('-').map_or(worker_id, |(name, _)| name)
}

/// The blocks a job's status shows finished: a stage computes its blocks in order, so a stage
/// with `blocks_done` k has finished its first k blocks.
fn finished_blocks(job: &Value) -> BTreeSet<u64> {
    stages(job)
        .iter()
        .flat_map(|s| count(s, "block_start")..count(s, "block_start") + count(s, "blocks_done"))
        .collect()
}

/// Submits `model` with `options` to `c` and waits; asserts the job is done, that it ran as
/// `expected` stages (block ranges) each on its own worker, all of them in `awq workers`, and that
/// its output holds the same bytes as `reference_dir`.
fn check_identical(
    c: &Cluster,
    dir: &Path,
    model: &Path,
    options: &Options,
    reference_dir: &Path,
    expected: &[(u64, u64)],
) {
    let label = format!("{}-on-{}", model.file_name().unwrap().to_string_lossy(), expected.len());
    let out = dir.join(format!("cluster-{label}"));
    let waited = submit(c, model, &out, options, &["--wait"], JOB_TIMEOUT);
    assert_eq!(state(&waited), "done", "{waited}");

    let job = c.status(&id(&waited));
    assert_eq!(state(&job), "done", "{job}");
    assert_eq!(count(&job, "blocks_done"), count(&job, "n_blocks"), "{job}");
    let list: Vec<&Value> = stages(&job).iter().collect();
    assert_eq!(ranges(&list), expected, "{label}: stage ranges of {job}");
    let workers: BTreeSet<&str> = list.iter().map(|s| worker_of(s)).collect();
    assert_eq!(workers.len(), expected.len(), "{label}: stages share a worker: {job}");
    let joined: BTreeSet<String> =
        c.workers_json().iter().map(|w| w["id"].as_str().expect("worker id").to_string()).collect();
    for s in &list {
        assert_eq!(count(s, "attempt"), 0, "{label}: a stage was planned again: {job}");
        assert_eq!(count(s, "blocks_done"), count(s, "block_end") - count(s, "block_start"), "{job}");
        let w = worker_of(s);
        assert!(joined.contains(w), "{label}: stage worker {w} is not in awq workers ({joined:?})");
    }
    assert_same_files(reference_dir, &out);
    assert_eq!(leftovers(dir, &format!("cluster-{label}")), Vec::<String>::new(), "{label}: working folders left");
}

/// `awq workers --json` of `c`: (names, ids, stage addresses, jobs they are busy with), sorted by name.
fn workers_table(c: &Cluster) -> Vec<(String, String, String, String)> {
    let mut rows: Vec<(String, String, String, String)> = c
        .workers_json()
        .iter()
        .map(|w| {
            let field = |k: &str| w[k].as_str().unwrap_or_else(|| panic!("no `{k}` in {w}")).to_string();
            (field("name"), field("id"), field("stage_address"), field("busy_with_job"))
        })
        .collect();
    rows.sort();
    rows
}

// ---------------------------------------------------------------------------------------------
// 1. Same bytes on 2 and 3 workers, with even and uneven stages, as `awq quantize`.
// ---------------------------------------------------------------------------------------------

#[test]
fn etcd_cluster_of_2_and_3_workers_writes_the_bytes_of_awq_quantize() {
    let s = scratch();
    let dir = s.path();
    let options = short_job(dir);
    let (m3, m7) = (synthetic(dir, "tiny3", &[]), synthetic(dir, "tiny7", &["--blocks", "7"]));
    let (ref3, ref7) = (dir.join("reference-tiny3"), dir.join("reference-tiny7"));
    reference(&m3, &ref3, &options);
    reference(&m7, &ref7, &options);
    let report: Value =
        serde_json::from_slice(&std::fs::read(ref3.join("awq_report.json")).expect("report")).expect("JSON");
    assert!(count(&report["calibration"], "rows") >= 4, "too few calibration rows to mean much: {report}");

    let mut c = Cluster::start(dir, StoreKind::Etcd, &[], &["w0", "w1"]);
    let table = workers_table(&c);
    assert_eq!(table.iter().map(|w| w.0.as_str()).collect::<Vec<_>>(), ["w0", "w1"], "{table:?}");
    assert!(table.iter().all(|w| !w.2.is_empty() && w.3.is_empty()), "{table:?}");
    assert_ne!(table[0].1, table[1].1, "two workers got one id");

    check_identical(&c, dir, &m3, &options, &ref3, &[(0, 2), (2, 3)]);
    check_identical(&c, dir, &m7, &options, &ref7, &[(0, 4), (4, 7)]);
    c.add_worker("w2");
    check_identical(&c, dir, &m3, &options, &ref3, &[(0, 1), (1, 2), (2, 3)]);
    check_identical(&c, dir, &m7, &options, &ref7, &[(0, 3), (3, 5), (5, 7)]);

    let table = workers_table(&c);
    assert_eq!(table.iter().map(|w| w.0.as_str()).collect::<Vec<_>>(), ["w0", "w1", "w2"], "{table:?}");
    assert!(table.iter().all(|w| w.3.is_empty()), "workers still busy after every job ended: {table:?}");
    let jobs = c.json(&["jobs"]);
    let states: Vec<&str> = jobs.as_array().expect("a job list").iter().map(state).collect();
    assert_eq!(states, ["done"; 4], "{jobs}");
}

/// Mixtures of experts and Gemma 3 on 2 workers (a worker's stage computes its blocks' experts,
/// routing and all, or Gemma's blocks, from the activations the other passes it): `awq
/// synthetic`'s tiny Mixtral (every block sparse), Qwen3-MoE (a sparse block between dense ones)
/// and Gemma 3 (`1 + w` norms folded with AWQ's scales, output norms, scaled embeddings, sliding
/// and global blocks), each the bytes of `awq quantize`.
#[test]
fn moe_and_gemma3_on_2_workers_write_the_bytes_of_awq_quantize() {
    let s = scratch();
    let dir = s.path();
    let options = short_job(dir);
    // Gemma: blocks 1 and 3 global, 0 and 2 through a window of 16 positions (the job's rows are longer).
    let gemma = ["--sliding-window", "16", "--full-attention-every", "2"];
    let models = [("mixtral", &[][..]), ("qwen3_moe", &[]), ("gemma3_text", &gemma)].map(|(t, extra)| {
        let model = synthetic(dir, t, &[&["--model-type", t, "--blocks", "4"][..], extra].concat());
        let reference_dir = dir.join(format!("reference-{t}"));
        reference(&model, &reference_dir, &options);
        (model, reference_dir)
    });
    let c = Cluster::start(dir, StoreKind::Memory, &[], &["w0", "w1"]);
    for (model, reference_dir) in &models {
        check_identical(&c, dir, model, &options, reference_dir, &[(0, 2), (2, 4)]);
    }
}

// ---------------------------------------------------------------------------------------------
// 2. SmolLM2-135M on 2 workers.
// ---------------------------------------------------------------------------------------------

#[test]
fn smollm2_on_2_workers_writes_the_bytes_of_awq_quantize() {
    let model = smollm2_135m();
    let s = scratch();
    let dir = s.path();
    // 2 rows of 128 tokens: the smallest calibration that still has several rows, to keep the test
    // near 1.5 minutes on 2 idle cores (the job runs twice: on the cluster, then in one process).
    let options = Options::new(&["--group-size", "64", "--n-samples", "4", "--seqlen", "128"]);
    let c = Cluster::start(dir, StoreKind::Memory, &[], &["w0", "w1"]);

    let start = Instant::now();
    let out = dir.join("cluster");
    let job = submit(&c, &model, &out, &options, &["--wait"], Duration::from_secs(900));
    let cluster_s = start.elapsed().as_secs_f64();
    assert_eq!(state(&job), "done", "{job}");
    let list: Vec<&Value> = stages(&job).iter().collect();
    assert_eq!(ranges(&list), [(0, 15), (15, 30)], "{job}");

    let start = Instant::now();
    let reference_dir = dir.join("reference");
    reference(&model, &reference_dir, &options);
    let single_s = start.elapsed().as_secs_f64();
    eprintln!(
        "SmolLM2-135M AWQ g64, 2 rows x 128 tokens: {cluster_s:.1} s on 2 workers, {single_s:.1} s in one process"
    );
    assert_same_files(&reference_dir, &out);
}

// ---------------------------------------------------------------------------------------------
// 3. Bad submissions fail at once, naming the field and the file.
// ---------------------------------------------------------------------------------------------

/// Asserts that `awq ARGS...` against `c` fails with a message containing each of `expected`.
fn check_refused(c: &Cluster, args: &[&str], expected: &[&str]) {
    let stderr = c.err(args);
    for e in expected {
        assert!(stderr.contains(e), "expected {e:?} in the error of `awq {}`:\n{stderr}", args.join(" "));
    }
}

#[test]
fn bad_submissions_are_refused_naming_the_field() {
    let s = scratch();
    let dir = s.path();
    let allowed = dir.join("allowed");
    std::fs::create_dir(&allowed).expect("scratch is writable");
    let tiny = synthetic(&allowed, "tiny", &[]);
    let gpt2 = synthetic(&allowed, "gpt2", &[]);
    edit_config(&gpt2, |c| {
        c.insert("model_type".into(), "gpt2".into());
    });
    let smol = synthetic(&allowed, "smol-1-block", &["--preset", "smollm2135m", "--blocks", "1"]);
    let c = Cluster::start(dir, StoreKind::Memory, std::slice::from_ref(&allowed), &[]);
    let out = arg(&allowed.join("out"));

    let missing = arg(&allowed.join("missing"));
    // The CLI names request fields by the arguments that set them (model_path: `model:`).
    check_refused(&c, &["submit", &missing, "-o", &out], &["model: ", &missing]);
    check_refused(&c, &["submit", &arg(&gpt2), "-o", &out], &["model: ", "gpt2", "config.json"]);
    check_refused(
        &c,
        &["submit", &arg(&smol), "-o", &out, "--group-size", "128"],
        &["--group-size: ", "tensor model.layers.0.", "groups of 128"],
    );
    let outside = arg(&dir.join("elsewhere").join("out"));
    check_refused(
        &c,
        &["submit", &arg(&tiny), "-o", &outside],
        &["output: ", &outside, "allowed roots", &arg(&allowed)],
    );
    check_refused(&c, &["status", "j-no-such-job"], &["j-no-such-job", "does not exist"]);
    check_refused(&c, &["cancel", "j-no-such-job"], &["j-no-such-job", "does not exist"]);

    let jobs = c.json(&["jobs"]);
    assert_eq!(jobs, Value::Array(vec![]), "a refused submission left a job");
    assert_eq!(file_names(&allowed), ["gpt2", "smol-1-block", "tiny"], "a refused submission wrote something");
    assert!(!dir.join("elsewhere").exists(), "a refused submission wrote outside the roots");

    // A worker of several devices takes each once.
    let stderr = awq_err(["worker", "--device", "cpu,cpu", "--coordinator", c.url()]);
    assert!(stderr.contains("--device: cpu is given twice"), "{stderr}");
    // Several devices per worker are GPUs.
    let stderr = awq_err(["worker", "--device", "cpu", "--gpus-per-worker", "2", "--coordinator", c.url()]);
    assert!(stderr.contains("--gpus-per-worker 2 with --device cpu: GPUs only"), "{stderr}");

    // Nothing listens on a port that was just free.
    let url = format!("http://127.0.0.1:{}", free_port());
    for command in [vec!["submit", &arg(&tiny), "-o", &out], vec!["status", "j1"], vec!["workers"]] {
        let mut args = command.clone();
        args.extend(["--coordinator", &url]);
        let stderr = awq_err(&args);
        let expected = format!("cannot reach the coordinator at {url}");
        assert!(
            stderr.contains(&expected),
            "expected {expected:?} in the error of `awq {}`:\n{stderr}",
            args.join(" ")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 4. A coordinator killed mid-job comes back from etcd and finishes it, without redoing blocks.
// ---------------------------------------------------------------------------------------------

#[test]
fn coordinator_restart_resumes_the_job_from_etcd() {
    let s = scratch();
    let dir = s.path();
    let options = slow_job(dir);
    let model = synthetic(dir, "tiny12", &["--blocks", &SLOW_BLOCKS.to_string()]);
    let mut c = Cluster::start(dir, StoreKind::Etcd, &[], &["w0", "w1"]);
    let out = dir.join("cluster");
    let job_id = id(&submit(&c, &model, &out, &options, &[], Duration::from_secs(60)));

    let before = c.wait_job(&job_id, "2 blocks done", JOB_TIMEOUT, |j| count(j, "blocks_done") >= 2 || is_terminal(j));
    assert!(
        state(&before) == "running" && count(&before, "blocks_done") < SLOW_BLOCKS,
        "the job ended before it could be interrupted (make slow_job slower): {before}"
    );
    c.kill_coordinator();
    let recorded = count(&before, "blocks_done");
    let finished_before = finished_blocks(&before);
    assert_eq!(finished_before.len() as u64, recorded, "{before}");
    std::thread::sleep(Duration::from_millis(500));
    c.restart_coordinator();

    // The job survived: same id, its blocks, its first plan.
    let after = c.status(&job_id);
    assert_eq!(id(&after), job_id);
    assert!(!is_terminal(&after), "the restarted coordinator ended the job: {after}");
    assert!(count(&after, "blocks_done") >= recorded, "finished blocks were forgotten: {before}\nthen {after}");
    let first_plan = |j: &Value| ranges(&stages(j).iter().filter(|s| count(s, "attempt") == 0).collect::<Vec<_>>());
    assert_eq!(first_plan(&after), first_plan(&before), "{after}");
    let listed = c.json(&["jobs"]);
    assert!(listed.as_array().expect("a job list").iter().any(|j| id(j) == job_id), "{listed}");

    let end = c.json_within(&["watch", &job_id], JOB_TIMEOUT);
    assert_eq!((id(&end), state(&end)), (job_id.clone(), "done"), "{end}");
    let end = c.status(&job_id);
    assert_eq!(count(&end, "blocks_done"), SLOW_BLOCKS, "{end}");

    // Only unfinished blocks were planned again.
    let replanned: Vec<&Value> = stages(&end).iter().filter(|s| count(s, "attempt") > 0).collect();
    assert!(!replanned.is_empty(), "nothing was planned after the restart: {end}");
    let again: Vec<u64> = ranges(&replanned).into_iter().flat_map(|(a, b)| a..b).collect();
    assert!(
        again.iter().all(|b| !finished_before.contains(b)),
        "blocks {finished_before:?} were finished before the restart, yet planned again: {end}"
    );
    assert!(again.len() as u64 <= SLOW_BLOCKS - recorded, "more blocks planned again than were missing: {end}");
    assert_eq!(again.len(), again.iter().collect::<BTreeSet<_>>().len(), "a block was planned twice: {end}");

    eprintln!(
        "blocks {finished_before:?} finished before the restart; planned again after it: {:?}",
        ranges(&replanned)
    );

    let reference_dir = dir.join("reference");
    reference(&model, &reference_dir, &options);
    assert_same_files(&reference_dir, &out);
    assert_eq!(leftovers(dir, "cluster"), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------------
// 5. Cancel: nothing left behind, workers free for the next job.
// ---------------------------------------------------------------------------------------------

#[test]
fn cancelled_job_leaves_nothing_and_frees_the_workers() {
    let s = scratch();
    let dir = s.path();
    let options = slow_job(dir);
    let model = synthetic(dir, "tiny12", &["--blocks", &SLOW_BLOCKS.to_string()]);
    let c = Cluster::start(dir, StoreKind::Etcd, &[], &["w0", "w1"]);
    let out = dir.join("cancelled");
    let job_id = id(&submit(&c, &model, &out, &options, &[], Duration::from_secs(60)));

    let running = c.wait_job(&job_id, "1 block done", JOB_TIMEOUT, |j| count(j, "blocks_done") >= 1 || is_terminal(j));
    assert_eq!(state(&running), "running", "the job ended before it could be cancelled: {running}");
    let staging = dir.join(format!(".cancelled.parts-{job_id}"));
    assert!(staging.is_dir(), "no staging folder {} while the job runs", staging.display());
    // The output is written while the job runs, in a temporary folder named after the job.
    let temp_output = dir.join(format!(".cancelled.tmp-{job_id}"));
    assert!(temp_output.is_dir(), "no temporary output {} while the job runs", temp_output.display());
    let block_keys = format!("/awq/v1/blocks/{job_id}/");
    assert!(c.etcd().count_keys(&block_keys) >= 1, "no block key in etcd after a block was done");

    let cancelled = c.json(&["cancel", &job_id]);
    assert_eq!((id(&cancelled), state(&cancelled)), (job_id.clone(), "cancelled"), "{cancelled}");
    assert!(
        !staging.exists() && !temp_output.exists(),
        "working folders left once the cancel returned: {:?}",
        leftovers(dir, "cancelled")
    );
    assert_eq!(state(&c.status(&job_id)), "cancelled");
    let stderr = c.err(&["watch", &job_id]);
    assert!(stderr.contains("cancelled"), "awq watch of a cancelled job: {stderr}");
    c.wait_until("the workers to be idle", Duration::from_secs(30), || {
        workers_table(&c).iter().all(|w| w.3.is_empty()).then_some(())
    });

    // The next job runs on both workers. Each worker runs its assignments in order, so once this
    // job is done, the cancelled stages have stopped and uploaded whatever they were computing.
    let (small, next) = (synthetic(dir, "tiny3", &[]), short_job(dir));
    let done = submit(&c, &small, &dir.join("next"), &next, &["--wait"], JOB_TIMEOUT);
    assert_eq!(state(&done), "done", "{done}");
    let workers: BTreeSet<&str> = stages(&done).iter().map(worker_of).collect();
    assert_eq!(workers.len(), 2, "the next job did not run on both workers: {done}");
    reference(&small, &dir.join("reference-next"), &next);
    assert_same_files(&dir.join("reference-next"), &dir.join("next"));

    assert_eq!(state(&c.status(&job_id)), "cancelled", "the cancelled job came back");
    assert!(!out.exists(), "the cancelled job wrote its output {}", out.display());
    assert_eq!(leftovers(dir, "cancelled"), Vec::<String>::new(), "the cancelled job left working folders");
    assert_eq!(c.etcd().count_keys(&block_keys), 0, "the cancelled job's block keys stayed in etcd");
    assert_eq!(c.etcd().count_keys(&format!("/awq/v1/jobs/{job_id}")), 1, "the job record must stay");
}

// ---------------------------------------------------------------------------------------------
// 6. A worker killed mid-job: the other one takes over its blocks.
// ---------------------------------------------------------------------------------------------

#[test]
fn killed_worker_s_blocks_are_recomputed_by_the_other_one() {
    let s = scratch();
    let dir = s.path();
    let options = slow_job(dir);
    let model = synthetic(dir, "tiny12", &["--blocks", &SLOW_BLOCKS.to_string()]);
    let mut c = Cluster::start(dir, StoreKind::Memory, &[], &["w0", "w1"]);
    let out = dir.join("cluster");
    let job_id = id(&submit(&c, &model, &out, &options, &[], Duration::from_secs(60)));

    let running = c.wait_job(&job_id, "1 block done", JOB_TIMEOUT, |j| count(j, "blocks_done") >= 1 || is_terminal(j));
    assert_eq!(state(&running), "running", "the job ended before a worker could be killed: {running}");
    let first = stages(&running).iter().find(|s| count(s, "index") == 0).expect("stage 0").clone();
    let (lost, lost_name) = (worker_of(&first).to_string(), name_of(worker_of(&first)).to_string());
    let survivor = if lost_name == "w0" { "w1" } else { "w0" };
    // The first stage's worker: the second stage, waiting for or using its activations, is planned
    // again too.
    c.kill_worker(&lost_name);

    let end = c.json_within(&["watch", &job_id], JOB_TIMEOUT);
    assert_eq!(state(&end), "done", "{end}");
    let end = c.status(&job_id);
    let stage0 = stages(&end).iter().find(|s| count(s, "index") == 0).expect("stage 0");
    assert_eq!(worker_of(stage0), "", "the lost worker {lost} still holds stage 0: {end}");
    let replanned: Vec<&Value> = stages(&end).iter().filter(|s| count(s, "attempt") > 0).collect();
    assert!(!replanned.is_empty(), "nothing was planned again: {end}");
    assert!(
        replanned.iter().all(|s| name_of(worker_of(s)) == survivor),
        "re-planned stages not all on {survivor}: {end}"
    );
    let table = workers_table(&c);
    assert_eq!(table.iter().map(|w| w.0.as_str()).collect::<Vec<_>>(), [survivor], "{table:?}");
    eprintln!(
        "killed {lost} after blocks {:?}; planned again on {survivor}: {:?}",
        finished_blocks(&running),
        ranges(&replanned)
    );

    let reference_dir = dir.join("reference");
    reference(&model, &reference_dir, &options);
    assert_same_files(&reference_dir, &out);
    assert_eq!(leftovers(dir, "cluster"), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------------
// 7. A device fault in a stage is the worker's, not the job's: the stage is planned again.
// ---------------------------------------------------------------------------------------------

#[test]
fn a_device_fault_plans_the_stage_again_and_the_bytes_do_not_change() {
    let s = scratch();
    let dir = s.path();
    let options = short_job(dir);
    let model = synthetic(dir, "tiny4", &["--blocks", "4"]);
    // Both workers carry the switch: whichever holds block 1 fails there once, as a GPU that ran
    // out of memory would, and the other plan goes on.
    let mut c = Cluster::start(dir, StoreKind::Memory, &[], &[]);
    for name in ["w0", "w1"] {
        c.add_worker_with(name, &["--inject-fault-at-block", "1"]);
    }
    let out = dir.join("cluster");
    let end = submit(&c, &model, &out, &options, &["--wait"], JOB_TIMEOUT);
    assert_eq!(state(&end), "done", "a fault failed the job: {end}\n{}", c.logs());
    let end = c.status(&id(&end));
    let replanned: Vec<&Value> = stages(&end).iter().filter(|s| count(s, "attempt") > 0).collect();
    assert!(
        replanned.iter().any(|s| (count(s, "block_start")..count(s, "block_end")).contains(&1)),
        "block 1 was not planned again: {end}"
    );
    let logs = c.worker_log("w0") + &c.worker_log("w1");
    assert_eq!(logs.matches("injected device fault").count(), 1, "one fault, once:\n{logs}");
    // Both workers stay joined: a fault does not lose the worker.
    assert_eq!(workers_table(&c).iter().map(|w| w.0.as_str()).collect::<Vec<_>>(), ["w0", "w1"]);

    let reference_dir = dir.join("reference");
    reference(&model, &reference_dir, &options);
    assert_same_files(&reference_dir, &out);
    assert_eq!(leftovers(dir, "cluster"), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------------
// 8. The kill drill (issue 20): trial after trial, a random worker of a 3-worker job SIGKILLed at a
//    random moment; every job completes with the bytes of the undisturbed run.
// ---------------------------------------------------------------------------------------------

/// One run of the slow job on a fresh 3-worker cluster in `dir`, killing worker `kill.1` after
/// `kill.0` when asked; the job's wall time from submission to its end, and the worker killed while
/// the job still ran (`None` when it had ended or nobody was killed).
fn drill_trial(
    dir: &Path,
    model: &Path,
    options: &Options,
    kill: Option<(Duration, &str)>,
) -> (Duration, Option<String>) {
    std::fs::create_dir_all(dir).expect("the scratch folder is writable");
    let mut c = Cluster::start(dir, StoreKind::Memory, &[], &["w0", "w1", "w2"]);
    let out = dir.join("out");
    let started = Instant::now();
    let job_id = id(&submit(&c, model, &out, options, &[], Duration::from_secs(60)));
    let mut killed = None;
    if let Some((after, victim)) = kill {
        std::thread::sleep(after.saturating_sub(started.elapsed()));
        if !is_terminal(&c.status(&job_id)) {
            c.kill_worker(victim);
            killed = Some(victim.to_string());
        }
    }
    let end = c.wait_job(&job_id, "the job to end", JOB_TIMEOUT, is_terminal);
    let took = started.elapsed();
    assert_eq!(state(&end), "done", "killed {killed:?} after {kill:?}: {end}\n{}", c.logs());
    (took, killed)
}

/// `AWQ_DRILL_TRIALS` trials (3 unless set; RELIABILITY.md records 20) from `AWQ_DRILL_SEED` (20
/// unless set): each kills one of the 3 workers, drawn at random, at a moment drawn uniformly over
/// the undisturbed run's time; every job must end done with the reference's bytes. Prints each
/// trial's extra time against the undisturbed run.
#[test]
fn jobs_survive_a_worker_killed_at_a_random_moment_with_the_same_bytes() {
    let env = |name: &str, default: u64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let (trials, seed) = (env("AWQ_DRILL_TRIALS", 3), env("AWQ_DRILL_SEED", 20));
    let s = scratch();
    let dir = s.path();
    let options = slow_job(dir);
    let model = synthetic(dir, "tiny12", &["--blocks", &SLOW_BLOCKS.to_string()]);
    let reference_dir = dir.join("reference");
    reference(&model, &reference_dir, &options);

    let (undisturbed, _) = drill_trial(&dir.join("undisturbed"), &model, &options, None);
    assert_same_files(&reference_dir, &dir.join("undisturbed/out"));
    eprintln!("drill: undisturbed 3-worker run {:.2} s (seed {seed})", undisturbed.as_secs_f64());
    let mut rng = awq_kernels::rng::SplitMix64::new(seed);
    let mut extra = Vec::new();
    for trial in 0..trials {
        let at = undisturbed.mul_f64(rng.next_f64());
        let victim = ["w0", "w1", "w2"][rng.below(3)];
        let trial_dir = dir.join(format!("trial-{trial}"));
        let (took, killed) = drill_trial(&trial_dir, &model, &options, Some((at, victim)));
        assert_same_files(&reference_dir, &trial_dir.join("out"));
        let what = match &killed {
            Some(v) => format!("{v} killed at {:.2} s", at.as_secs_f64()),
            None => format!("{victim} not killed: the job had ended by {:.2} s", at.as_secs_f64()),
        };
        let delta = took.as_secs_f64() - undisturbed.as_secs_f64();
        eprintln!("drill: trial {trial}: {what}; done in {:.2} s ({delta:+.2} s), same bytes", took.as_secs_f64());
        if killed.is_some() {
            extra.push(delta);
        }
        std::fs::remove_dir_all(&trial_dir).expect("the trial's folder can go");
    }
    if !extra.is_empty() {
        extra.sort_by(f64::total_cmp);
        let mean = extra.iter().sum::<f64>() / extra.len() as f64;
        eprintln!(
            "drill: {} kills, extra time per kill: mean {mean:+.2} s, median {:+.2} s, max {:+.2} s",
            extra.len(),
            extra[extra.len() / 2],
            extra[extra.len() - 1]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 9. Disk full (issue 20): the coordinator's output filesystem fills up mid-job. The job waits with
//    a clear message (nothing staged is lost, no worker is blamed) and completes once space is
//    freed, with the reference's bytes.
// ---------------------------------------------------------------------------------------------

/// The coordinator runs in a private mount namespace (`unshare -m`: CI runs as root) where the
/// output's folder is a 2 MB tmpfs that a filler file fills (the job's output is 0.5 MB, and its
/// staged copy as much). The filler goes when the test creates `free`.
#[test]
fn a_full_disk_makes_the_job_wait_and_it_completes_once_space_is_freed() {
    let s = scratch();
    let dir = s.path();
    let options = short_job(dir);
    let model = synthetic(dir, "tiny4", &["--blocks", "4"]);
    let (fs, free) = (dir.join("fs"), dir.join("free"));
    std::fs::create_dir_all(&fs).expect("the scratch folder is writable");
    let script = dir.join("small-disk.sh");
    let body = "set -e\nmount -t tmpfs -o size=2m tmpfs \"$FS\"\nhead -c 4m /dev/zero > \"$FS/filler\" 2>/dev/null || true\n\
                ( i=0; while [ ! -e \"$FREE\" ] && [ $i -lt 3000 ]; do sleep 0.1; i=$((i+1)); done; rm -f \"$FS/filler\" ) &\nexec \"$@\"\n";
    std::fs::write(&script, body).expect("the scratch folder is writable");
    let wrapper: Vec<String> = ["env", &format!("FS={}", arg(&fs)), &format!("FREE={}", arg(&free))]
        .into_iter()
        .map(String::from)
        .chain(["unshare", "--mount", "--propagation", "private", "sh"].map(String::from))
        .chain([arg(&script)])
        .collect();
    let c = Cluster::start_wrapped(dir, StoreKind::Memory, &[], &wrapper, &["w0"], &[]);
    let out = fs.join("q");
    let job_id = id(&submit(&c, &model, &out, &options, &[], Duration::from_secs(60)));

    let coordinator_log = || std::fs::read_to_string(dir.join("coordinator.log")).unwrap_or_default();
    let waiting = c.wait_until("the job to wait for disk space", JOB_TIMEOUT, || {
        let log = coordinator_log();
        log.lines().find(|l| l.contains("waiting for disk space")).map(String::from)
    });
    assert!(waiting.contains("No space left on device") && waiting.contains(&job_id), "{waiting}");
    let held = c.status(&job_id);
    assert_eq!(state(&held), "running", "a full disk is no reason to fail the job: {held}");
    let why = held["waiting_for_disk_space"].as_str().unwrap_or_default();
    assert!(why.contains("No space left on device"), "`awq status` says why the job waits: {held}");

    std::fs::write(&free, b"").expect("the scratch folder is writable");
    let end = c.wait_job(&job_id, "the job to end once space is freed", JOB_TIMEOUT, is_terminal);
    assert_eq!(state(&end), "done", "{end}\n{}", c.logs());
    assert!(coordinator_log().contains("disk space available again"), "{}", c.logs());
    let worker = c.worker_log("w0");
    assert!(worker.contains("sending it again") && !worker.contains("stage failed"), "{worker}");

    // The output lives in the coordinator's namespace: read it back through the coordinator's root.
    let pid = c.procs().iter().find(|p| p.name() == "coordinator").map(|p| p.pid()).expect("the coordinator");
    let seen = PathBuf::from(format!("/proc/{pid}/root{}", arg(&out)));
    let reference_dir = dir.join("reference");
    reference(&model, &reference_dir, &options);
    assert_same_files(&reference_dir, &seen);
}

// ---------------------------------------------------------------------------------------------
// 10. etcd stops answering (issue 20): new work is refused with a clear error, never accepted into
//     memory only; the running job's results wait for it and the job completes with the bytes of
//     `awq quantize`.
// ---------------------------------------------------------------------------------------------

/// Sends `signal` (`STOP`, `CONT`) to process `pid`.
fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status();
    assert!(status.is_ok_and(|s| s.success()), "kill -{signal} {pid}");
}

#[test]
fn a_silent_etcd_refuses_new_work_and_the_running_job_waits_for_it() {
    let s = scratch();
    let dir = s.path();
    let options = slow_job(dir);
    let model = synthetic(dir, "tiny12", &["--blocks", &SLOW_BLOCKS.to_string()]);
    let c = Cluster::start(dir, StoreKind::Etcd, &[], &["w0"]);
    let out = dir.join("cluster");
    let job_id = id(&submit(&c, &model, &out, &options, &[], Duration::from_secs(60)));
    let before = c.wait_job(&job_id, "1 block done", JOB_TIMEOUT, |j| count(j, "blocks_done") >= 1 || is_terminal(j));
    assert_eq!(state(&before), "running", "the job ended before etcd could be stopped: {before}");

    // etcd stops answering (SIGSTOP: its connections stay open, its replies never come).
    let etcd = c.etcd().proc.pid();
    signal(etcd, "STOP");
    let started = std::time::Instant::now();
    let err = c.err(&["submit", &arg(&model), "-o", &arg(&dir.join("second"))]);
    let waited = started.elapsed();
    assert!(err.contains("the job was not submitted") && err.contains("etcd"), "{err}");
    assert!(waited < Duration::from_secs(30), "the refusal took {waited:?}");
    let err = c.err(&["deploy", &arg(&model), "--name", "m"]);
    assert!(err.contains("nothing was deployed"), "{err}");
    // Long enough for the worker's uploads to be refused (the store's calls give up after 5 s).
    let worker_log = || c.worker_log("w0");
    c.wait_until("an upload refused while etcd is silent", Duration::from_secs(60), || {
        worker_log().contains("sending it again").then_some(())
    });
    signal(etcd, "CONT");

    let end = c.json_within(&["watch", &job_id], JOB_TIMEOUT);
    assert_eq!((id(&end), state(&end)), (job_id.clone(), "done"), "{end}\n{}", c.logs());
    assert_eq!(c.json(&["jobs"]).as_array().map(Vec::len), Some(1), "a refused submission became a job");
    let reference_dir = dir.join("reference");
    reference(&model, &reference_dir, &options);
    assert_same_files(&reference_dir, &out);
    eprintln!("etcd silent for {:.1} s; submit refused after {waited:.1?}", started.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------------------------
// 11. Slow and broken links (issue 20): the workers reach the coordinator through a proxy that
//     delays every chunk, then cuts every connection, then swallows everything for seconds. The job
//     completes with the bytes of `awq quantize`, within its bound; no worker hangs.
// ---------------------------------------------------------------------------------------------

#[test]
fn a_job_completes_through_slow_cut_and_silent_links() {
    let s = scratch();
    let dir = s.path();
    let options = slow_job(dir);
    let model = synthetic(dir, "tiny12", &["--blocks", &SLOW_BLOCKS.to_string()]);
    let c = Cluster::start(dir, StoreKind::Memory, &[], &[]);
    let target: std::net::SocketAddr =
        c.url().trim_start_matches("http://").parse().expect("the coordinator listens on host:port");
    let proxy = awq_e2e::proxy::Proxy::start(target);
    let via = format!("http://{}", proxy.addr);
    let mut workers: Vec<_> = ["w0", "w1"].iter().map(|n| awq_e2e::cluster::start_worker(dir, &via, n)).collect();
    c.wait_until("both workers to join through the proxy", Duration::from_secs(60), || {
        (c.workers_json().len() == 2).then_some(())
    });
    let started = Instant::now();
    proxy.set_delay(Duration::from_millis(20));
    let out = dir.join("cluster");
    let job_id = id(&submit(&c, &model, &out, &options, &[], Duration::from_secs(60)));
    let running = c.wait_job(&job_id, "1 block done", JOB_TIMEOUT, |j| count(j, "blocks_done") >= 1 || is_terminal(j));
    assert_eq!(state(&running), "running", "the job ended before the links broke: {running}");

    // Every connection cut at once: the workers lose their sessions, join again, and the stages
    // they lost are planned again.
    let before = proxy.accepted();
    proxy.cut();
    c.wait_until("the workers to join again", Duration::from_secs(60), || (proxy.accepted() > before).then_some(()));
    // Then silence: connections open, nothing passes, for longer than the keepalives' interval.
    std::thread::sleep(Duration::from_secs(2));
    proxy.set_black_hole(true);
    std::thread::sleep(Duration::from_secs(8));
    proxy.set_black_hole(false);

    let end = c.wait_job(&job_id, "the job to end", JOB_TIMEOUT, is_terminal);
    assert_eq!(state(&end), "done", "{end}\n{}", c.logs());
    for w in &mut workers {
        assert!(w.exited().is_none(), "{} exited:\n{}", w.name(), w.log_tail());
        assert!(w.log().matches("joined").count() >= 2, "{} did not join again after the cut:\n{}", w.name(), w.log());
    }
    assert!(stages(&end).iter().any(|s| count(s, "attempt") > 0), "nothing was planned again after the cut: {end}");
    let reference_dir = dir.join("reference");
    reference(&model, &reference_dir, &options);
    assert_same_files(&reference_dir, &out);
    eprintln!(
        "through the proxy: {} connections, the job done in {:.1} s with a 20 ms delay, a cut and 8 s of silence",
        proxy.accepted(),
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// 12. A standby coordinator (issue 20): two coordinators on one etcd elect one leader; the other
//     refuses every call naming it; workers and clients are given both URLs. The leader SIGKILLed
//     mid-job, the standby takes over within seconds and the job completes with the same bytes.
// ---------------------------------------------------------------------------------------------

/// Coordinator a leading on `etcd` and coordinator b standing by (it says it is listening only
/// once it leads): (a, its URL, b, its URL), once b has named a as the leader.
fn leader_and_standby(dir: &Path, etcd: &awq_e2e::cluster::Etcd) -> (awq_e2e::cluster::Proc, String, awq_e2e::cluster::Proc, String) {
    use awq_e2e::cluster::{start_coordinator_at, wait_until, Proc};
    let (a, url_a) = start_coordinator_at(dir.join("coordinator-a.log"), "127.0.0.1:0", &etcd.store(), &[]);
    let port_b = free_port();
    let url_b = format!("http://127.0.0.1:{port_b}");
    let mut cmd = std::process::Command::new(awq_bin());
    cmd.args(["coordinator", "--listen", &format!("127.0.0.1:{port_b}"), "--store", &etcd.store()]);
    cmd.env("AWQ_LOG", "info").env("NO_COLOR", "1").env_remove("AWQ_TOKEN").env_remove("AWQ_COORDINATOR");
    let b = Proc::spawn("coordinator b", cmd, dir.join("coordinator-b.log"));
    wait_until("b to stand by", Duration::from_secs(60), &[&b], || {
        b.log().contains(&format!("standing by; the leader is {url_a}")).then_some(())
    });
    (a, url_a, b, url_b)
}

#[test]
fn a_standby_coordinator_takes_over_when_the_leader_is_killed() {
    use awq_e2e::cluster::{start_worker, wait_until, Etcd, Proc};
    let s = scratch();
    let dir = s.path();
    let options = slow_job(dir);
    let model = synthetic(dir, "tiny12", &["--blocks", &SLOW_BLOCKS.to_string()]);
    let etcd = Etcd::start(dir);
    let (mut a, url_a, b, url_b) = leader_and_standby(dir, &etcd);
    let err = awq_err(["jobs", "--coordinator", &url_b]);
    assert!(err.contains("standby") && err.contains(&url_a), "{err}");

    let both = format!("{url_a},{url_b}");
    let workers: Vec<Proc> = ["w0", "w1"].iter().map(|n| start_worker(dir, &both, n)).collect();
    let client = |args: &[&str], timeout: Duration| -> Value {
        let mut full: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        full.extend(["--coordinator".into(), both.clone(), "--json".into()]);
        let out = awq_e2e::cluster::awq_within(&full, timeout).unwrap_or_else(|| panic!("awq {full:?} hung"));
        assert!(out.status.success(), "awq {full:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("awq {full:?}: not JSON: {e}"))
    };
    wait_until("both workers to join the leader", Duration::from_secs(60), &[&a, &b], || {
        (client(&["workers"], Duration::from_secs(30)).as_array().map(Vec::len) == Some(2)).then_some(())
    });
    let (model_arg, out) = (arg(&model), dir.join("cluster"));
    let mut submit = vec!["submit", &model_arg, "-o"];
    let out_arg = arg(&out);
    submit.push(&out_arg);
    submit.extend(options.0.iter().map(String::as_str));
    let job_id = id(&client(&submit, Duration::from_secs(60)));
    wait_until("1 block done", JOB_TIMEOUT, &[&a, &b], || {
        let j = client(&["status", &job_id], Duration::from_secs(30));
        (count(&j, "blocks_done") >= 1 || is_terminal(&j)).then_some(())
    });

    a.kill();
    let killed = Instant::now();
    wait_until("b to lead", Duration::from_secs(30), &[&b], || b.log().contains("elected leader").then_some(()));
    let took_over = killed.elapsed();
    let end = client(&["watch", &job_id], JOB_TIMEOUT);
    assert_eq!((id(&end), state(&end)), (job_id.clone(), "done"), "{end}\n{}", b.log());
    let reference_dir = dir.join("reference");
    reference(&model, &reference_dir, &options);
    assert_same_files(&reference_dir, &out);
    assert!(took_over < Duration::from_secs(15), "the standby took {took_over:?} to lead");
    drop(workers);
    eprintln!("the standby led {:.1} s after the leader was SIGKILLed; the job done on it", took_over.as_secs_f64());
}

/// A client given several coordinators of which none leads (all gone, or a standby still taking
/// over) asks again for a bounded time, says so, then fails naming each URL; it never hangs.
#[test]
fn a_client_waits_a_bounded_time_for_some_coordinator_to_lead() {
    let [a, b] = awq_e2e::cluster::free_ports();
    let urls = format!("http://127.0.0.1:{a},http://127.0.0.1:{b}");
    let started = Instant::now();
    let out = awq_e2e::cluster::awq_within(
        &["jobs".to_string(), "--coordinator".into(), urls.clone()],
        Duration::from_secs(60),
    )
    .expect("awq jobs ended within 60 s");
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("asking again for up to 20 s") && stderr.contains("leads now"), "{stderr}");
    assert!(stderr.contains(&format!("127.0.0.1:{a}")) && stderr.contains(&format!("127.0.0.1:{b}")), "{stderr}");
    assert!(took >= Duration::from_secs(19) && took < Duration::from_secs(40), "took {took:?}");
}

/// A leader asked to stop (SIGTERM) resigns: the standby leads within a second or two, not after
/// the lease's 5 seconds, and answers as the leader.
#[test]
fn a_leader_given_sigterm_resigns_and_the_standby_leads_at_once() {
    use awq_e2e::cluster::{wait_until, Etcd};
    let s = scratch();
    let dir = s.path();
    let etcd = Etcd::start(dir);
    let (mut a, _, b, url_b) = leader_and_standby(dir, &etcd);

    a.terminate();
    let asked = Instant::now();
    wait_until("b to lead", Duration::from_secs(30), &[&b], || b.log().contains("elected leader").then_some(()));
    let took_over = asked.elapsed();
    let deadline = Instant::now() + Duration::from_secs(30);
    while a.exited().is_none() {
        assert!(Instant::now() < deadline, "a did not exit within 30 s of SIGTERM:\n{}", a.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(a.log().contains("resigned the leadership"), "{}", a.log());
    // The lease's TTL is 5 s: a standby that waited it out would take at least that.
    assert!(took_over < Duration::from_secs(4), "the standby took {took_over:?} to lead after a graceful exit");
    let jobs = awq_ok(["jobs", "--coordinator", &url_b, "--json"]);
    assert!(jobs.trim_start().starts_with('['), "{jobs}");
    eprintln!("the standby led {:.1} s after the leader was asked to stop", took_over.as_secs_f64());
}

/// The same between stages: each worker's stage service (where the previous stage pushes its
/// activations) sits behind a proxy that delays every chunk, goes silent for seconds, then cuts
/// every connection. The job completes with the bytes of `awq quantize`.
#[test]
fn a_job_completes_through_slow_silent_and_cut_links_between_stages() {
    use awq_e2e::cluster::start_worker_with;
    use awq_e2e::proxy::Proxy;
    let s = scratch();
    let dir = s.path();
    let options = slow_job(dir);
    let model = synthetic(dir, "tiny12", &["--blocks", &SLOW_BLOCKS.to_string()]);
    let c = Cluster::start(dir, StoreKind::Memory, &[], &[]);
    let mut proxies = Vec::new();
    let mut workers = Vec::new();
    for name in ["w0", "w1"] {
        let port = free_port();
        let proxy = Proxy::start(format!("127.0.0.1:{port}").parse().expect("an address"));
        let (listen, advertise) = (format!("127.0.0.1:{port}"), proxy.addr.to_string());
        workers.push(start_worker_with(dir, c.url(), name, &["--listen", &listen, "--advertise", &advertise]));
        proxy.set_delay(Duration::from_millis(20));
        proxies.push(proxy);
    }
    c.wait_until("both workers to join", Duration::from_secs(60), || (c.workers_json().len() == 2).then_some(()));
    let started = Instant::now();
    let out = dir.join("cluster");
    let job_id = id(&submit(&c, &model, &out, &options, &[], Duration::from_secs(60)));
    // The first plan chains its two stages: the second waits for the first's activations.
    std::thread::sleep(Duration::from_secs(1));
    proxies.iter().for_each(|p| p.set_black_hole(true));
    std::thread::sleep(Duration::from_secs(6));
    proxies.iter().for_each(|p| {
        p.cut();
        p.set_black_hole(false);
    });
    let end = c.wait_job(&job_id, "the job to end", JOB_TIMEOUT, is_terminal);
    assert_eq!(state(&end), "done", "{end}\n{}", c.logs());
    let through: u64 = proxies.iter().map(Proxy::accepted).sum();
    assert!(through >= 1, "no activations went through the stages' proxies: {end}");
    for w in &mut workers {
        assert!(w.exited().is_none(), "{} exited:\n{}", w.name(), w.log_tail());
    }
    let reference_dir = dir.join("reference");
    reference(&model, &reference_dir, &options);
    assert_same_files(&reference_dir, &out);
    eprintln!(
        "between stages: {through} connections through the proxies, the job done in {:.1} s with 20 ms per chunk, \
         6 s of silence and a cut",
        started.elapsed().as_secs_f64()
    );
}
