//! Helpers for the tests of `awq serve` (tests/tests/serve.rs): a server process on a free port
//! (killed on drop), plain HTTP/1.1 over `std::net` with bounded waits (JSON requests, SSE streams
//! that can be dropped mid-way), the Prometheus exposition read back, and a venv with the official
//! `openai` Python package ([`openai_python`]) for driving the server as users do.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{awq_bin, repo_root, run_script, with_file_lock};

/// The `openai` package the tests install (pinned: the client's shapes are what we test against).
pub const OPENAI_PIN: &str = "openai==1.109.1";

/// Every wait on the server is bounded by this.
pub const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// An HTTP answer as read off the socket: status, headers, body.
pub type RawResponse = (u16, Vec<(String, String)>, String);

/// An HTTP API (`awq serve`'s, a coordinator's gateway) at `addr`, called with `api_key` when set.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub addr: String,
    pub api_key: Option<String>,
}

impl Endpoint {
    fn connect(&self) -> std::io::Result<TcpStream> {
        let s = TcpStream::connect(&self.addr)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(s)
    }

    fn send_head(
        &self,
        s: &mut TcpStream,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<&str>,
    ) -> std::io::Result<()> {
        let body = body.unwrap_or("");
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n", self.addr);
        if let Some(k) = key {
            head.push_str(&format!("Authorization: Bearer {k}\r\n"));
        }
        head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len()));
        s.write_all(head.as_bytes())?;
        s.write_all(body.as_bytes())
    }

    /// One request: (status, headers lower-cased, body).
    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<&str>,
    ) -> std::io::Result<RawResponse> {
        let mut s = self.connect()?;
        self.send_head(&mut s, method, path, key, body)?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let mut lines = head.lines();
        let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|c| c.parse().ok()).unwrap_or(0);
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect::<Vec<_>>();
        let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
        Ok((status, headers, if chunked { dechunk(body) } else { body.to_string() }))
    }

    /// Opens a streaming POST of `body` to `path` with the key; read its events with
    /// [`SseStream::next_data`], drop it to disconnect.
    pub fn stream(&self, path: &str, body: &Value) -> SseStream {
        let mut s = self.connect().expect("connects");
        self.send_head(&mut s, "POST", path, self.api_key.as_deref(), Some(&body.to_string())).expect("sends");
        let mut reader = BufReader::new(s);
        let mut status_line = String::new();
        reader.read_line(&mut status_line).expect("a status line");
        let status = status_line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("headers");
            if line.trim().is_empty() {
                break;
            }
        }
        SseStream { status, reader }
    }

    /// POST `path` with `body` and the key: (status, body). Panics on I/O errors.
    pub fn post(&self, path: &str, body: &Value) -> (u16, String) {
        let (status, _, text) = self
            .try_request("POST", path, self.api_key.as_deref(), Some(&body.to_string()))
            .unwrap_or_else(|e| panic!("POST http://{}{path}: {e}", self.addr));
        (status, text)
    }

    /// GET `path` with the key: (status, body). Panics on I/O errors.
    pub fn get(&self, path: &str) -> (u16, String) {
        let (status, _, text) = self
            .try_request("GET", path, self.api_key.as_deref(), None)
            .unwrap_or_else(|e| panic!("GET http://{}{path}: {e}", self.addr));
        (status, text)
    }
}

/// A running `awq serve`, killed when dropped; its stderr goes to `log`.
pub struct Server {
    child: Child,
    pub addr: String,
    pub api_key: Option<String>,
    log: PathBuf,
    _scratch: tempfile::TempDir,
}

impl Server {
    /// Starts `awq serve MODEL --listen 127.0.0.1:PORT ARGS...` and waits (bounded) until /health
    /// answers 200, checking first that it answers 503 while loading or is already up.
    pub fn start(model: &Path, args: &[&str]) -> Server {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let addr = format!("127.0.0.1:{port}");
        let scratch = crate::scratch();
        let log = scratch.path().join("serve.log");
        let err = std::fs::File::create(&log).expect("the log file is writable");
        let child = Command::new(awq_bin())
            .arg("serve")
            .arg(model)
            .args(["--listen", &addr])
            .args(args)
            .env("AWQ_LOG", "info")
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("awq serve starts");
        let api_key = args.iter().position(|a| *a == "--api-key").map(|i| args[i + 1].to_string());
        let mut server = Server { child, addr, api_key, log, _scratch: scratch };
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            if let Some(status) = server.child.try_wait().expect("the child can be polled") {
                panic!("awq serve exited ({status}) before it was ready:\n{}", server.log());
            }
            if let Ok((status, _, _)) = server.try_request("GET", "/health", None, None) {
                match status {
                    200 => return server,
                    503 => {}
                    other => panic!("/health answered {other} while loading:\n{}", server.log()),
                }
            }
            assert!(Instant::now() < deadline, "awq serve not ready within {IO_TIMEOUT:?}:\n{}", server.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The server's process id (to read its memory from /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Where its HTTP API is, with its key.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint { addr: self.addr.clone(), api_key: self.api_key.clone() }
    }

    fn try_request(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<&str>,
    ) -> std::io::Result<RawResponse> {
        self.endpoint().try_request(method, path, key, body)
    }

    /// A request with the server's API key: (status, headers, body). Panics on I/O errors.
    pub fn request(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Vec<(String, String)>, String) {
        self.try_request(method, path, self.api_key.as_deref(), body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.log()))
    }

    /// A request without any API key.
    pub fn request_without_key(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let (status, _, body) =
            self.try_request(method, path, None, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        (status, body)
    }

    /// POST `path` with `body`, expecting 200 and JSON.
    pub fn post_json(&self, path: &str, body: &Value) -> Value {
        let (status, _, text) = self.request("POST", path, Some(&body.to_string()));
        assert_eq!(status, 200, "POST {path} {body}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("POST {path}: not JSON ({e}): {text}"))
    }

    /// Opens a streaming request; read its events with [`SseStream::next_data`], drop it to
    /// disconnect.
    pub fn stream(&self, path: &str, body: &Value) -> SseStream {
        self.endpoint().stream(path, body)
    }

    /// The value of the series `name` (any labels), from /metrics.
    pub fn metric(&self, name: &str) -> f64 {
        let (status, _, text) = self.request("GET", "/metrics", None);
        assert_eq!(status, 200, "/metrics: {text}");
        metric_value(&text, name).unwrap_or_else(|| panic!("no series {name} in /metrics:\n{text}"))
    }

    /// Waits (bounded) until `cond` holds of the metric `name`; returns its last value.
    pub fn wait_metric(&self, name: &str, what: &str, cond: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.metric(name);
            if cond(v) {
                return v;
            }
            assert!(Instant::now() < deadline, "{name} = {v} after 30 s; expected {what}\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Server {
    /// Sends SIGTERM and waits (bounded) for the process to exit; returns its exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        self.send_sigterm();
        self.wait_exit(IO_TIMEOUT)
    }

    /// Sends SIGTERM (what Kubernetes sends a pod it stops), without waiting.
    pub fn send_sigterm(&self) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs");
        assert!(status.success(), "kill -TERM {pid} failed");
    }

    /// Waits for the process to exit, for at most `within` (a failure past it); its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("the child can be polled") {
                return status.code();
            }
            assert!(Instant::now() < deadline, "awq serve still running after {within:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first sample of `name` in a Prometheus exposition.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split(['{', ' ']).next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A chunked HTTP body, joined.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// An SSE response being read (chunked transfer framing skipped line by line).
pub struct SseStream {
    pub status: u16,
    reader: BufReader<TcpStream>,
}

impl SseStream {
    /// The next `data:` payload (`[DONE]` included); `None` at the end of the stream.
    pub fn next_data(&mut self) -> Option<String> {
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => panic!("reading the stream: {e}"),
            }
            if let Some(data) = line.trim_end().strip_prefix("data: ") {
                return Some(data.to_string());
            }
        }
    }

    /// Every payload to the end, as JSON, `[DONE]` checked last.
    pub fn collect(mut self) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(d) = self.next_data() {
            if d == "[DONE]" {
                assert!(self.next_data().is_none(), "data after [DONE]");
                return out;
            }
            out.push(serde_json::from_str(&d).unwrap_or_else(|e| panic!("not JSON ({e}): {d}")));
        }
        panic!("the stream ended without data: [DONE] after {out:?}");
    }
}

/// A Python with the official `openai` package ([`OPENAI_PIN`]), in `target/tools/openai-venv`
/// (made once, under a lock; pip fetches from PyPI).
pub fn openai_python() -> PathBuf {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let dir = repo_root().join("target").join("tools").join("openai-venv");
        let python = dir.join("bin").join("python");
        with_file_lock(&repo_root().join("target").join("tools").join(".openai-venv.lock"), || {
            let pin_file = dir.join(".pin");
            if std::fs::read_to_string(&pin_file).ok().as_deref() == Some(OPENAI_PIN) && python.is_file() {
                return;
            }
            let _ = std::fs::remove_dir_all(&dir);
            let mut venv = Command::new("python3");
            venv.args(["-m", "venv"]).arg(&dir);
            run_script(venv);
            let mut pip = Command::new(&python);
            pip.args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", OPENAI_PIN]);
            run_script(pip);
            std::fs::write(&pin_file, OPENAI_PIN).expect("target/tools is writable");
        });
        python
    })
    .clone()
}

/// Runs `script` with the openai venv's Python, `args` after it; returns its stdout as JSON.
pub fn run_openai_script(script: &str, args: &[&str]) -> Value {
    let mut cmd = Command::new(openai_python());
    cmd.arg("-c").arg(script).args(args);
    let out = run_script(cmd);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("the openai script printed no JSON ({e}): {out}"))
}
