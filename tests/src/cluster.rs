//! A real cluster on loopback for the end-to-end tests in `tests/tests/cluster.rs`: an etcd server,
//! an `awq coordinator` and `awq worker`s, each a child process of the test.
//!
//! - [`Proc`]: a child process whose stdout and stderr go to a log file; killed (SIGKILL) and
//!   reaped when dropped, and its log printed when it is dropped while the test panics, so a failed
//!   test shows what every process said.
//! - [`Etcd::start`], [`start_coordinator`], [`start_worker`]: the three kinds of process, on free
//!   loopback ports ([`free_port`], or port 0 where the process reports the port it bound).
//! - [`Cluster`]: a coordinator (memory or etcd store) and named workers, with the client commands
//!   run against it under a timeout ([`Cluster::json`], [`Cluster::err`]), wait helpers that fail
//!   with the logs of every process ([`Cluster::wait_until`]), and the restarts and kills the
//!   failure tests need. [`Cluster::start_secured`]: one whose coordinator requires [`Tokens`],
//!   which its workers and client commands send; [`Cluster::start_tls`]: one over TLS ([`TlsFiles`]).
//! - [`assert_same_files`]: two output folders hold the same files, byte for byte, or a message
//!   that says which file differs and where.
//!
//! Services log at `AWQ_LOG=info` without colours; client commands run without `AWQ_LOG` and
//! `AWQ_COORDINATOR` (the coordinator URL is always passed explicitly). No process inherits a token
//! or API key from the test's environment ([`AUTH_ENV`]): a test gives them explicitly.

use std::cell::Cell;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{awq_bin, describe, repo_root};

/// How long a client command (`awq status`, `awq workers`, ...) may take.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a process may take to come up (listen, join).
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The most of each log a failure message shows (the end of it).
const LOG_TAIL_BYTES: usize = 12_000;

/// The environment variables that carry tokens, API keys and TLS files, removed from every process started
/// here, so that one set where the tests run never reaches a process unasked.
pub const AUTH_ENV: [&str; 7] =
    ["AWQ_TOKEN", "AWQ_ADMIN_TOKEN", "AWQ_WORKER_TOKEN", "AWQ_API_KEY", "AWQ_TLS_CERT", "AWQ_TLS_KEY", "AWQ_TLS_CA"];

/// `cmd` without the variables of [`AUTH_ENV`].
fn without_auth_env(cmd: &mut Command) -> &mut Command {
    AUTH_ENV.iter().fold(cmd, |cmd, var| cmd.env_remove(var))
}

/// A loopback TCP port that was free a moment ago (bound and released).
pub fn free_port() -> u16 {
    free_ports::<1>()[0]
}

/// `N` distinct loopback TCP ports that were free a moment ago: all bound at once, then released
/// (ports taken one by one may repeat: a released port can be handed out again at once).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: [TcpListener; N] =
        std::array::from_fn(|_| TcpListener::bind("127.0.0.1:0").expect("a loopback port can be bound"));
    listeners.map(|l| l.local_addr().expect("a bound socket has an address").port())
}

/// A child process with its output in a log file; killed and reaped on drop.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    /// Whether a failure message already carried the log (so that drop does not print it again).
    reported: Cell<bool>,
}

impl Proc {
    /// Starts `cmd` as `name`, its stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Proc {
        let file = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("cannot open log {}: {e}", log.display()));
        let err = file.try_clone().expect("a log file handle can be cloned");
        cmd.stdin(Stdio::null()).stdout(file).stderr(err);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Proc { name: name.to_string(), child, log, reported: Cell::new(false) }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process wrote so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// The end of [`Proc::log`], under a header naming the process, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let start = log.len().saturating_sub(LOG_TAIL_BYTES);
        let start = (start..log.len()).find(|&i| log.is_char_boundary(i)).unwrap_or(log.len());
        let cut = if start > 0 { "[...]\n" } else { "" };
        format!("--- log of {} (pid {}, {})\n{cut}{}", self.name, self.pid(), self.log.display(), &log[start..])
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap_or_else(|e| panic!("cannot poll {}: {e}", self.name))
    }

    /// Sends SIGTERM (what Kubernetes sends a pod it stops): the process may clean up and exit.
    pub fn terminate(&self) {
        let pid = self.pid().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs");
        assert!(status.success(), "kill -TERM {pid} ({}) failed", self.name);
    }

    /// Kills the process with SIGKILL (`kill -9`: no clean-up, no goodbye to its peers) and reaps it.
    pub fn kill(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() && !self.reported.get() {
            eprintln!("{}", self.log_tail());
        }
    }
}

/// The logs of `procs`, one after the other, marked as reported.
pub fn logs(procs: &[&Proc]) -> String {
    procs
        .iter()
        .map(|p| {
            p.reported.set(true);
            p.log_tail()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Polls `f` every 100 ms until it returns `Some`, for at most `timeout`; panics naming `what`
/// with the logs of `procs` when time runs out.
pub fn wait_until<T>(what: &str, timeout: Duration, procs: &[&Proc], mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {:.0?} waiting for {what}\n{}", timeout, logs(procs));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `awq ARGS...` (as a client: no `AWQ_LOG`, no `AWQ_COORDINATOR`) for at most `timeout`;
/// `None` when it had to be killed.
pub fn awq_within(args: &[String], timeout: Duration) -> Option<Output> {
    let mut cmd = Command::new(awq_bin());
    cmd.args(args).env_remove("AWQ_LOG").env_remove("AWQ_COORDINATOR");
    without_auth_env(&mut cmd).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    // Readers on threads, so that a chatty child never blocks on a full pipe.
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped")));
    let err = drain(Box::new(child.stderr.take().expect("piped")));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("the child can be polled") {
            break Some(status);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (stdout, stderr) = (out.join().expect("reader thread"), err.join().expect("reader thread"));
    status.map(|status| Output { status, stdout, stderr })
}

/// The etcd server binary: `$AWQ_ETCD`, else what `tools/fetch-etcd` prints (etcd on PATH, or
/// Debian's etcd-server unpacked into target/tools).
pub fn etcd_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("AWQ_ETCD") {
            return PathBuf::from(bin);
        }
        let script = repo_root().join("tools").join("fetch-etcd");
        let out = Command::new(&script).output().unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} found no etcd (install Debian's etcd-server, or set AWQ_ETCD):\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        assert!(bin.is_file(), "{} printed {}, which is not a file", script.display(), bin.display());
        bin
    })
}

/// Whether the etcd at `port` answers `GET /health` with `"health":"true"`.
fn etcd_healthy(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(1))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply.contains("\"health\":\"true\"")
}

/// A single-member etcd cluster on two free loopback ports, its data in the test's folder.
pub struct Etcd {
    pub proc: Proc,
    pub client_port: u16,
    peer_port: u16,
    /// Its data directory, which a restarted etcd reads back.
    data: PathBuf,
    /// The folder of its logs.
    dir: PathBuf,
    /// Processes killed by [`Etcd::restart`], kept for their logs.
    retired: Vec<Proc>,
}

impl Etcd {
    /// Starts etcd with its data in `dir/etcd-data` and its log in `dir/etcd.log`, and waits until
    /// it reports itself healthy. Tries new ports when the chosen ones were taken meanwhile.
    pub fn start(dir: &Path) -> Etcd {
        let mut failures = Vec::new();
        for attempt in 0..3 {
            let client = free_port();
            let peer = std::iter::repeat_with(free_port).find(|&p| p != client).expect("an endless supply");
            let data = dir.join(format!("etcd-data-{attempt}"));
            let log = dir.join(format!("etcd-{attempt}.log"));
            match Etcd::spawn_healthy(client, peer, &data, log) {
                Ok(proc) => {
                    let dir = dir.to_path_buf();
                    return Etcd { proc, client_port: client, peer_port: peer, data, dir, retired: Vec::new() };
                }
                Err(log) => failures.push(log),
            }
        }
        panic!("etcd did not become healthy in 3 attempts\n{}", failures.join("\n"));
    }

    /// Starts etcd on `client` and `peer` with its data in `data`, logging to `log`, and waits
    /// until it is healthy; the end of its log when it is not within [`START_TIMEOUT`].
    fn spawn_healthy(client: u16, peer: u16, data: &Path, log: PathBuf) -> Result<Proc, String> {
        let (client_url, peer_url) = (format!("http://127.0.0.1:{client}"), format!("http://127.0.0.1:{peer}"));
        let mut cmd = Command::new(etcd_bin());
        cmd.arg("--name").arg("t").arg("--data-dir").arg(data);
        cmd.args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url]);
        cmd.args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url]);
        cmd.args(["--initial-cluster", &format!("t={peer_url}")]);
        let mut proc = Proc::spawn("etcd", cmd, log);
        let start = Instant::now();
        while start.elapsed() < START_TIMEOUT {
            if etcd_healthy(client) {
                return Ok(proc);
            }
            if proc.exited().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        proc.reported.set(true);
        Err(proc.log_tail())
    }

    /// Kills etcd with SIGKILL (no clean shutdown: what it had not synced to its write-ahead log is
    /// lost, as in a crash) and reaps it.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Kills etcd (if it still runs) and starts it again on the same ports from its data
    /// directory, as a supervisor restarts a crashed etcd; waits until it is healthy.
    pub fn restart(&mut self) {
        self.proc.kill();
        let n = self.retired.len() + 1;
        let log = self.dir.join(format!("etcd-restart-{n}.log"));
        let proc = Etcd::spawn_healthy(self.client_port, self.peer_port, &self.data, log)
            .unwrap_or_else(|log| panic!("etcd did not become healthy again from {}\n{log}", self.data.display()));
        let mut old = std::mem::replace(&mut self.proc, proc);
        old.name = format!("etcd #{n} (killed)");
        self.retired.push(old);
    }

    /// The live etcd and those it replaced, for failure messages.
    pub fn procs(&self) -> Vec<&Proc> {
        self.retired.iter().chain([&self.proc]).collect()
    }

    /// The coordinator's `--store` for this etcd.
    pub fn store(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.client_port)
    }

    /// How many keys start with `prefix`, asked through etcd's JSON gateway (`/v3/kv/range`, the
    /// range [prefix, prefix with its last byte + 1)).
    pub fn count_keys(&self, prefix: &str) -> usize {
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().expect("a non-empty prefix") += 1;
        let body =
            format!(r#"{{"key":"{}","range_end":"{}","count_only":true}}"#, base64(prefix.as_bytes()), base64(&end));
        let mut stream = TcpStream::connect(("127.0.0.1", self.client_port)).expect("etcd is listening");
        let request = format!(
            "POST /v3/kv/range HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).expect("request sent");
        let mut reply = String::new();
        stream.read_to_string(&mut reply).expect("reply read");
        let json = reply.split("\r\n\r\n").nth(1).unwrap_or_else(|| panic!("etcd's reply has no body: {reply}"));
        let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("etcd replied {json}: {e}"));
        assert!(v.get("header").is_some(), "etcd's range reply: {json}");
        // proto3 JSON: 64-bit numbers are strings, and a zero count is left out.
        v.get("count").and_then(|c| c.as_str()).map_or(0, |c| c.parse().expect("a count"))
    }
}

/// Standard base64 with padding (what etcd's JSON gateway takes for bytes).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Starts `awq coordinator --listen LISTEN --store STORE --root R...`, logging to `log`. Waits
/// until it listens and returns it with its URL (`http://127.0.0.1:PORT`). `listen` may have port
/// 0: the coordinator reports the port it bound.
pub fn start_coordinator_at(log: PathBuf, listen: &str, store: &str, roots: &[PathBuf]) -> (Proc, String) {
    start_coordinator_with(log, listen, store, roots, &[])
}

/// [`start_coordinator_at`] with more arguments (`--http-listen ADDR`).
pub fn start_coordinator_with(
    log: PathBuf,
    listen: &str,
    store: &str,
    roots: &[PathBuf],
    extra: &[String],
) -> (Proc, String) {
    start_coordinator_wrapped(log, &[], listen, store, roots, extra)
}

/// [`start_coordinator_with`] run by `wrapper` (`wrapper[0] wrapper[1..] awq coordinator ...`: a
/// mount namespace, say) unless it is empty.
pub fn start_coordinator_wrapped(
    log: PathBuf,
    wrapper: &[String],
    listen: &str,
    store: &str,
    roots: &[PathBuf],
    extra: &[String],
) -> (Proc, String) {
    let mut cmd = match wrapper {
        [] => Command::new(awq_bin()),
        [program, args @ ..] => {
            let mut cmd = Command::new(program);
            cmd.args(args).arg(awq_bin());
            cmd
        }
    };
    cmd.args(["coordinator", "--listen", listen, "--store", store]).args(extra);
    for r in roots {
        cmd.arg("--root").arg(r);
    }
    without_auth_env(&mut cmd).env("AWQ_LOG", "info").env("NO_COLOR", "1");
    let mut proc = Proc::spawn("coordinator", cmd, log);
    let marker = "awq coordinator listening on ";
    let addr = wait_until("the coordinator to listen", START_TIMEOUT, &[], || {
        if let Some(status) = proc.exited() {
            panic!("the coordinator exited ({status}) before listening\n{}", logs(&[&proc]));
        }
        let log = proc.log();
        let rest = &log[log.find(marker)? + marker.len()..];
        // Only a complete line: stderr is unbuffered, the line may still be being written.
        let line = &rest[..rest.find('\n')?];
        Some(line.split_whitespace().next()?.to_string())
    });
    (proc, format!("http://{addr}"))
}

/// [`start_coordinator_at`] on a port the coordinator picks, logging to `dir/coordinator.log`.
pub fn start_coordinator(dir: &Path, store: &str, roots: &[PathBuf]) -> (Proc, String) {
    start_coordinator_at(dir.join("coordinator.log"), "127.0.0.1:0", store, roots)
}

/// Starts `awq worker --coordinator URL --name NAME` (stage service on a port it picks), logging
/// to `dir/worker-NAME.log`. It joins on its own; see [`Cluster::add_worker`] to wait for that.
pub fn start_worker(dir: &Path, url: &str, name: &str) -> Proc {
    start_worker_with(dir, url, name, &[])
}

/// [`start_worker`] with more arguments (`--device cuda:1`).
pub fn start_worker_with(dir: &Path, url: &str, name: &str, extra: &[&str]) -> Proc {
    start_worker_env(dir, url, name, extra, &[])
}

/// [`start_worker_with`] with environment variables (`AWQ_WORKER_TOKEN`).
pub fn start_worker_env(dir: &Path, url: &str, name: &str, extra: &[&str], env: &[(String, String)]) -> Proc {
    let mut cmd = Command::new(awq_bin());
    cmd.args(["worker", "--coordinator", url, "--name", name]);
    // A port of its choosing, unless `extra` names one.
    if !extra.contains(&"--listen") {
        cmd.args(["--listen", "127.0.0.1:0"]);
    }
    cmd.args(extra);
    without_auth_env(&mut cmd).env("AWQ_LOG", "info").env("NO_COLOR", "1").env_remove("AWQ_COORDINATOR");
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    Proc::spawn(&format!("worker {name}"), cmd, dir.join(format!("worker-{name}.log")))
}

/// The tokens of a cluster started with [`Cluster::start_secured`]: its coordinator requires them
/// (`--admin-token-file`, `--worker-token-file`: files in the test's folder, as Kubernetes mounts
/// a Secret), its workers send the worker token (`AWQ_WORKER_TOKEN`), its client commands the
/// admin token (`--token`).
#[derive(Clone, Debug)]
pub struct Tokens {
    pub admin: String,
    pub worker: String,
}

/// PEM files of a [`Cluster::start_tls`]: the certificate (and key) every process serves, and the
/// CA that signed it.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

fn arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Where a [`Cluster`] keeps its state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    Memory,
    Etcd,
}

/// etcd (optional), one coordinator and named workers, all on loopback.
pub struct Cluster {
    dir: PathBuf,
    // Dropped in this order: workers, coordinator, etcd.
    workers: Vec<Proc>,
    coordinator: Proc,
    /// Coordinators killed by [`Cluster::restart_coordinator`], kept for their logs.
    retired: Vec<Proc>,
    etcd: Option<Etcd>,
    url: String,
    store: String,
    roots: Vec<PathBuf>,
    /// More arguments for every coordinator started (`--http-listen`).
    coordinator_args: Vec<String>,
    coordinator_starts: usize,
    /// What the coordinator requires, the workers and the client commands send.
    tokens: Option<Tokens>,
    /// More arguments for every client command and every worker started ([`Cluster::start_tls`]).
    client_args: Vec<String>,
    worker_args: Vec<String>,
}

impl Cluster {
    /// The cluster's etcd (for clusters started with [`StoreKind::Etcd`]).
    pub fn etcd(&self) -> &Etcd {
        self.etcd.as_ref().expect("this cluster keeps its state in memory, not etcd")
    }

    /// The cluster's etcd, to kill or restart it.
    pub fn etcd_mut(&mut self) -> &mut Etcd {
        self.etcd.as_mut().expect("this cluster keeps its state in memory, not etcd")
    }

    /// Starts the store, a coordinator (with `roots`, if any) and one worker per name, and waits
    /// until every worker has joined. Logs go to `dir`.
    pub fn start(dir: &Path, store: StoreKind, roots: &[PathBuf], workers: &[&str]) -> Cluster {
        Cluster::start_with(dir, store, roots, workers, &[])
    }

    /// [`Cluster::start`] with more arguments for the coordinator (`--http-listen ADDR`), which a
    /// restarted coordinator gets too.
    pub fn start_with(
        dir: &Path,
        store: StoreKind,
        roots: &[PathBuf],
        workers: &[&str],
        coordinator_args: &[&str],
    ) -> Cluster {
        Cluster::start_wrapped(dir, store, roots, &[], workers, coordinator_args)
    }

    /// [`Cluster::start_with`] with the coordinator run by `wrapper` (see
    /// [`start_coordinator_wrapped`]; a restarted coordinator is not).
    pub fn start_wrapped(
        dir: &Path,
        store: StoreKind,
        roots: &[PathBuf],
        wrapper: &[String],
        workers: &[&str],
        coordinator_args: &[&str],
    ) -> Cluster {
        let etcd = (store == StoreKind::Etcd).then(|| Etcd::start(dir));
        let store = etcd.as_ref().map_or_else(|| "memory".to_string(), Etcd::store);
        let coordinator_args: Vec<String> = coordinator_args.iter().map(|a| a.to_string()).collect();
        let (coordinator, url) = start_coordinator_wrapped(
            dir.join("coordinator.log"),
            wrapper,
            "127.0.0.1:0",
            &store,
            roots,
            &coordinator_args,
        );
        let mut cluster = Cluster {
            dir: dir.to_path_buf(),
            workers: Vec::new(),
            coordinator,
            retired: Vec::new(),
            etcd,
            url,
            store,
            roots: roots.to_vec(),
            coordinator_args,
            coordinator_starts: 1,
            tokens: None,
            client_args: Vec::new(),
            worker_args: Vec::new(),
        };
        for name in workers {
            cluster.add_worker(name);
        }
        cluster
    }

    /// [`Cluster::start_with`] with [`Tokens`]: the coordinator requires them (files in `dir`, kept
    /// for a restarted coordinator too), the workers and the client commands send them.
    pub fn start_secured(
        dir: &Path,
        store: StoreKind,
        roots: &[PathBuf],
        workers: &[&str],
        coordinator_args: &[&str],
        tokens: Tokens,
    ) -> Cluster {
        let mut args: Vec<String> = coordinator_args.iter().map(|a| a.to_string()).collect();
        for (flag, file, token) in [
            ("--admin-token-file", "admin-token", &tokens.admin),
            ("--worker-token-file", "worker-token", &tokens.worker),
        ] {
            let path = dir.join(file);
            std::fs::write(&path, format!("{token}\n")).expect("the scratch folder is writable");
            args.extend([flag.to_string(), path.to_string_lossy().into_owned()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut cluster = Cluster::start_with(dir, store, roots, &[], &args);
        cluster.tokens = Some(tokens);
        for name in workers {
            cluster.add_worker(name);
        }
        cluster
    }

    /// [`Cluster::start_secured`] (memory store) over TLS: the coordinator serves `tls`'s certificate
    /// (its URL becomes `https://`), every worker serves one too and verifies the others and the
    /// coordinator against the CA, and the client commands pass `--tls-ca` (and, when
    /// `coordinator_args` ask for client certificates with `--tls-client-ca`, the same certificate
    /// and key as theirs).
    pub fn start_tls(
        dir: &Path,
        workers: &[&str],
        coordinator_args: &[&str],
        tokens: Tokens,
        tls: &TlsFiles,
    ) -> Cluster {
        let (cert, key, ca) = (arg(&tls.cert), arg(&tls.key), arg(&tls.ca));
        let mut args: Vec<&str> = coordinator_args.to_vec();
        args.extend(["--tls-cert", &cert, "--tls-key", &key, "--tls-ca", &ca]);
        let mut cluster = Cluster::start_secured(dir, StoreKind::Memory, &[], &[], &args, tokens);
        cluster.url = cluster.url.replacen("http://", "https://", 1);
        cluster.client_args = vec!["--tls-ca".into(), ca.clone()];
        if coordinator_args.contains(&"--tls-client-ca") {
            cluster.client_args.extend(["--tls-cert", &cert, "--tls-key", &key].map(String::from));
        }
        cluster.worker_args = ["--tls-cert", &cert, "--tls-key", &key, "--tls-ca", &ca].map(String::from).to_vec();
        for name in workers {
            cluster.add_worker(name);
        }
        cluster
    }

    /// `http://127.0.0.1:PORT` of the coordinator (`https://` for [`Cluster::start_tls`]).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Every process, for failure messages.
    pub fn procs(&self) -> Vec<&Proc> {
        let mut procs: Vec<&Proc> = self.etcd.iter().flat_map(Etcd::procs).collect();
        procs.extend(self.retired.iter());
        procs.push(&self.coordinator);
        procs.extend(self.workers.iter());
        procs
    }

    /// The logs of every process.
    pub fn logs(&self) -> String {
        logs(&self.procs())
    }

    /// [`wait_until`] with the logs of every process on failure.
    pub fn wait_until<T>(&self, what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
        wait_until(what, timeout, &self.procs(), f)
    }

    /// Starts a worker named `name` and waits until `awq workers` lists it.
    pub fn add_worker(&mut self, name: &str) {
        self.add_worker_with(name, &[]);
    }

    /// [`Cluster::add_worker`] with more arguments for `awq worker` (`--device cuda:1`).
    pub fn add_worker_with(&mut self, name: &str, extra: &[&str]) {
        self.add_worker_env(name, extra, &[]);
    }

    /// [`Cluster::add_worker_with`] with `env` added to the worker's environment (NCCL's settings).
    pub fn add_worker_env(&mut self, name: &str, extra: &[&str], env: &[(&str, &str)]) {
        let env: Vec<(String, String)> = self
            .tokens
            .iter()
            .map(|t| ("AWQ_WORKER_TOKEN".to_string(), t.worker.clone()))
            .chain(env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .collect();
        let extra: Vec<&str> = self.worker_args.iter().map(String::as_str).chain(extra.iter().copied()).collect();
        self.workers.push(start_worker_env(&self.dir, &self.url, name, &extra, &env));
        self.wait_until(&format!("worker {name} to join"), START_TIMEOUT, || {
            self.workers_json().iter().any(|w| w["name"] == name).then_some(())
        });
    }

    /// Everything worker `name` logged so far.
    pub fn worker_log(&self, name: &str) -> String {
        let label = format!("worker {name}");
        self.workers.iter().find(|p| p.name == label).unwrap_or_else(|| panic!("no worker named {name}")).log()
    }

    /// Kills worker `name` with SIGKILL.
    pub fn kill_worker(&mut self, name: &str) {
        let label = format!("worker {name}");
        let p = self.workers.iter_mut().find(|p| p.name == label).unwrap_or_else(|| panic!("no worker named {name}"));
        p.kill();
    }

    /// Kills the coordinator with SIGKILL.
    pub fn kill_coordinator(&mut self) {
        self.coordinator.kill();
    }

    /// The coordinator running now (the last one started), e.g. to send it SIGTERM.
    pub fn coordinator_mut(&mut self) -> &mut Proc {
        &mut self.coordinator
    }

    /// Everything the coordinator running now (the last one started) logged so far.
    pub fn coordinator_log(&self) -> String {
        self.coordinator.log()
    }

    /// Starts a new coordinator on the same address and store as the first one (its log in
    /// `coordinator-N.log`); the workers join it again by themselves.
    pub fn restart_coordinator(&mut self) {
        self.coordinator.kill();
        self.coordinator_starts += 1;
        let listen = self.url.split_once("://").map_or(self.url.as_str(), |(_, a)| a).to_string();
        let log = self.dir.join(format!("coordinator-{}.log", self.coordinator_starts));
        // The old process stays in the logs (it is already dead; its drop only reaps it).
        let (new, url) = start_coordinator_with(log, &listen, &self.store, &self.roots, &self.coordinator_args);
        let mut old = std::mem::replace(&mut self.coordinator, new);
        old.name = format!("coordinator #{} (killed)", self.coordinator_starts - 1);
        self.retired.push(old);
        assert_eq!(
            url.split_once("://").map(|u| u.1),
            Some(listen.as_str()),
            "the restarted coordinator listens elsewhere"
        );
    }

    /// Runs `awq ARGS... --coordinator URL` (with `--token` when the cluster has tokens) under
    /// [`CLIENT_TIMEOUT`] or `timeout`.
    fn client(&self, args: &[&str], timeout: Duration) -> (Vec<String>, Output) {
        self.client_with(args, self.tokens.as_ref().map(|t| t.admin.as_str()), timeout)
    }

    /// Runs `awq ARGS... --coordinator URL`, with `--token TOKEN` when `token` is given.
    fn client_with(&self, args: &[&str], token: Option<&str>, timeout: Duration) -> (Vec<String>, Output) {
        let mut full: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        full.extend(["--coordinator".to_string(), self.url.clone()]);
        full.extend(self.client_args.iter().cloned());
        if let Some(token) = token {
            full.extend(["--token".to_string(), token.to_string()]);
        }
        let out = awq_within(&full, timeout)
            .unwrap_or_else(|| panic!("awq {} did not finish in {timeout:.0?}\n{}", full.join(" "), self.logs()));
        (full, out)
    }

    /// `awq ARGS... --coordinator URL --json`, asserting success, parsed; `timeout` bounds it.
    pub fn json_within(&self, args: &[&str], timeout: Duration) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        let (full, out) = self.client(&args, timeout);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "expected success: {}\n{}", describe(&full, &out), self.logs());
        serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("printed no JSON ({e}): {}\n{}", describe(&full, &out), self.logs()))
    }

    /// [`Cluster::json_within`] under [`CLIENT_TIMEOUT`].
    pub fn json(&self, args: &[&str]) -> Value {
        self.json_within(args, CLIENT_TIMEOUT)
    }

    /// `awq ARGS... --coordinator URL`, asserting it failed as a user error should (exit code 1,
    /// an `error:` message, no panic); returns its stderr.
    pub fn err(&self, args: &[&str]) -> String {
        self.err_as(args, self.tokens.as_ref().map(|t| t.admin.as_str()))
    }

    /// [`Cluster::err`] with `--token TOKEN` (`None`: without any token, whatever the cluster's).
    pub fn err_as(&self, args: &[&str], token: Option<&str>) -> String {
        let (full, out) = self.client_with(args, token, CLIENT_TIMEOUT);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "expected exit code 1: {}\n{}", describe(&full, &out), self.logs());
        assert!(
            stderr.starts_with("error: ") && !stderr.contains("panicked"),
            "expected an `error:` message and no panic: {}",
            describe(&full, &out)
        );
        stderr
    }

    /// `awq status JOB --json`.
    pub fn status(&self, job: &str) -> Value {
        self.json(&["status", job])
    }

    /// `awq workers --json`, as a list.
    pub fn workers_json(&self) -> Vec<Value> {
        match self.json(&["workers"]) {
            Value::Array(list) => list,
            other => panic!("awq workers --json printed {other}, not a list\n{}", self.logs()),
        }
    }

    /// Polls `awq status JOB` until `pred` holds for it; returns that status.
    pub fn wait_job(&self, job: &str, what: &str, timeout: Duration, mut pred: impl FnMut(&Value) -> bool) -> Value {
        self.wait_until(&format!("job {job}: {what}"), timeout, || {
            let status = self.status(job);
            pred(&status).then_some(status)
        })
    }
}
