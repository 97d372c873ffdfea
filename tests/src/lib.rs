//! Helpers for the end-to-end tests in `tests/tests/*.rs`, after ripgrep's `tests/util.rs`.
//!
//! The tests drive the real `awq` binary ([`awq`], [`awq_ok`], [`awq_err`], [`awq_ppl_json`]) on real
//! checkpoints and compare what it prints with independent references:
//!
//! - assets: [`smollm2_135m`], [`gemma3_270m`] and [`text_dir`] run `../shared/assets/fetch-model`
//!   and `fetch-text` into `target/assets/` (idempotent; a no-op once done; [`smollm2_135m_gguf`] and
//!   [`gemma3_270m_gguf`] are the GGUF files the checkpoints were converted from), [`reference_python`] is
//!   the assets' venv (numpy, tokenizers, safetensors), [`check_model`] runs `check-model.py`, the numpy
//!   reference forward pass, in it and [`python_token_ids`] its `tokenizers` package;
//! - synthetic checkpoints come from `awq_model::synthetic`, written into a [`scratch`] folder, and
//!   are scored on [`ENGLISH_SAMPLE`]; tokenizers are compared on [`TRICKY_TEXTS`].
//!
//! `cargo test` runs test threads (and may run test binaries) in parallel, so everything that writes
//! to `target/` happens once per process ([`OnceLock`]) and under a cross-process file lock. A missing
//! asset or a failing reference is a test failure with the script's own message, never a skip.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use serde_json::Value;

pub mod cluster;
pub mod proxy;
pub mod serve;

/// The workspace root (the parent of this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the e2e crate lives inside the workspace").to_path_buf()
}

/// `target/assets/`, where the fetched models and texts live.
fn assets_target() -> PathBuf {
    repo_root().join("target").join("assets")
}

/// Runs `f` while holding an exclusive lock on the file `lock_path` (created if needed), so that
/// test processes running side by side do not fetch or build the same thing at once. The lock is
/// released when the file is closed, even if `f` panics.
fn with_file_lock<T>(lock_path: &Path, f: impl FnOnce() -> T) -> T {
    let dir = lock_path.parent().expect("lock files live in a folder");
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_path)
        .unwrap_or_else(|e| panic!("cannot open lock file {}: {e}", lock_path.display()));
    file.lock().unwrap_or_else(|e| panic!("cannot lock {}: {e}", lock_path.display()));
    f()
}

/// Runs `cmd` to completion and returns its stdout; panics with its stderr when it fails.
fn run_script(mut cmd: Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout).unwrap_or_else(|e| panic!("{cmd:?} printed non-UTF-8: {e}"))
}

/// The `awq` binary of the profile these tests were built with.
///
/// Cargo gives `CARGO_BIN_EXE_*` only to tests of the package that owns the binary, so this finds
/// it next to the test executable (`target/<profile>/deps/..` -> `target/<profile>/awq`). It runs
/// `cargo build --workspace --bins --tests` once per process first, so `cargo test -p awq-e2e`
/// never runs a binary older than the sources. Those flags select what `cargo test --workspace`
/// (the README's test command) builds, so dependency features unify the same way and the build
/// reuses every unit the test run compiled: a no-op but for linking `awq`. (`-p awq-cli` alone
/// unified them differently and compiled half the workspace again inside the first end-to-end
/// test: four minutes of every CI run.) Tests built with this crate's `cuda` feature build with
/// `awq-cli/cuda`. Set `AWQ_BIN` to test a given binary instead, without building (what
/// gpu-bin/run-gpu-tests does, on a machine without cargo).
pub fn awq_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("AWQ_BIN") {
            let bin = PathBuf::from(bin);
            assert!(bin.is_file(), "AWQ_BIN={} is not a file", bin.display());
            return bin;
        }
        let exe = std::env::current_exe().expect("the test executable has a path");
        let profile_dir =
            exe.parent().and_then(Path::parent).expect("test executables live in target/<profile>/deps/").to_path_buf();
        let bin = profile_dir.join(format!("awq{}", std::env::consts::EXE_SUFFIX));
        let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.current_dir(repo_root()).args(["build", "--quiet", "--workspace", "--bins", "--tests"]);
        if cfg!(feature = "cuda") {
            cmd.args(["--features", "awq-cli/cuda"]);
        }
        match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => {}
            Some("release") => {
                cmd.arg("--release");
            }
            Some(profile) => {
                cmd.args(["--profile", profile]);
            }
            None => panic!("unexpected test executable location {}", exe.display()),
        }
        with_file_lock(&profile_dir.join(".awq-e2e-build.lock"), || run_script(cmd));
        assert!(bin.is_file(), "cargo built awq-cli, but {} does not exist", bin.display());
        bin
    })
}

/// `../shared/assets` (or `$AWQ_SHARED_ASSETS`): the asset scripts and check-model.py.
pub fn shared_assets_dir() -> PathBuf {
    let dir = match std::env::var_os("AWQ_SHARED_ASSETS") {
        Some(dir) => PathBuf::from(dir),
        None => repo_root().join("..").join("shared").join("assets"),
    };
    assert!(
        dir.join("fetch-model").is_file() && dir.join("check-model.py").is_file(),
        "the shared asset scripts are not in {} (expected fetch-model, fetch-text and check-model.py there); \
         set AWQ_SHARED_ASSETS to the folder that holds them",
        dir.display()
    );
    dir
}

/// Runs an asset script once per process, under the assets lock, and returns its stdout.
fn fetch_once(cell: &'static OnceLock<String>, script: &str, args: &[&Path]) -> &'static str {
    cell.get_or_init(|| {
        let mut cmd = Command::new(shared_assets_dir().join(script));
        cmd.args(args).current_dir(repo_root());
        with_file_lock(&assets_target().join(".lock"), || run_script(cmd))
    })
}

/// The SmolLM2-135M checkpoint (float16, dequantized from a GGUF), fetched into
/// `target/assets/smollm2-135m` if needed.
pub fn smollm2_135m() -> PathBuf {
    static DONE: OnceLock<String> = OnceLock::new();
    let dest = assets_target().join("smollm2-135m");
    fetch_once(&DONE, "fetch-model", &[Path::new("smollm2-135m"), &dest]);
    dest
}

/// The Gemma-3-270M base checkpoint (gemma3_text, float16, dequantized from a GGUF), fetched into
/// `target/assets/gemma3-270m` if needed (a 253 MB download the first time).
pub fn gemma3_270m() -> PathBuf {
    static DONE: OnceLock<String> = OnceLock::new();
    let dest = assets_target().join("gemma3-270m");
    fetch_once(&DONE, "fetch-model", &[Path::new("gemma3-270m"), &dest]);
    dest
}

/// The English texts (`austen/*.txt`, `kjv.txt`), fetched into `target/assets/text` if needed.
pub fn text_dir() -> PathBuf {
    static DONE: OnceLock<String> = OnceLock::new();
    let dest = assets_target().join("text");
    fetch_once(&DONE, "fetch-text", &[&dest]);
    dest
}

/// The assets' Python (a venv with numpy, tokenizers and safetensors), set up if needed.
pub fn reference_python() -> PathBuf {
    static DONE: OnceLock<String> = OnceLock::new();
    let python = PathBuf::from(fetch_once(&DONE, "fetch-model", &[Path::new("--python")]).trim());
    assert!(python.is_file(), "fetch-model --python printed {}, which is not a file", python.display());
    python
}

/// The verified GGUF file behind [`smollm2_135m`]: fetch-model keeps it in its cache,
/// `${AWQ_ASSET_CACHE:-$HOME/.cache/awq-assets}/gguf/smollm2-135m.gguf` (fetched if needed).
pub fn smollm2_135m_gguf() -> PathBuf {
    smollm2_135m();
    cached_gguf("smollm2-135m")
}

/// The verified GGUF file behind [`gemma3_270m`] (fetched if needed), as [`smollm2_135m_gguf`].
pub fn gemma3_270m_gguf() -> PathBuf {
    gemma3_270m();
    cached_gguf("gemma3-270m")
}

/// fetch-model's cached GGUF of model `name`, which the caller has just fetched into
/// `target/assets/NAME`.
fn cached_gguf(name: &str) -> PathBuf {
    let cache = match std::env::var_os("AWQ_ASSET_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache").join("awq-assets"),
    };
    let gguf = cache.join("gguf").join(format!("{name}.gguf"));
    assert!(
        gguf.is_file(),
        "{} is missing although target/assets/{name} is up to date; delete target/assets/{name} \
         so that fetch-model downloads and verifies the GGUF again",
        gguf.display()
    );
    gguf
}

/// What check-model.py printed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reference {
    pub ppl: f64,
    /// Tokens kept from the text (at most `--tokens`).
    pub tokens: usize,
    /// Tokens scored.
    pub scored: usize,
}

/// Runs `check-model.py MODEL TEXT --tokens N --ctx C` (numpy, float32) and parses its result line.
pub fn check_model(model_dir: &Path, text: &Path, tokens: usize, ctx: usize) -> Reference {
    let mut cmd = Command::new(reference_python());
    cmd.arg(shared_assets_dir().join("check-model.py")).arg(model_dir).arg(text);
    cmd.args(["--tokens", &tokens.to_string(), "--ctx", &ctx.to_string()]);
    let stdout = run_script(cmd);
    let field = |key: &str| -> &str {
        stdout
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .unwrap_or_else(|| panic!("check-model.py printed no `{key}=`: {stdout}"))
    };
    let parse_error = |key: &str| format!("check-model.py printed a bad `{key}=`: {stdout}");
    Reference {
        ppl: field("ppl").parse().unwrap_or_else(|_| panic!("{}", parse_error("ppl"))),
        tokens: field("tokens").parse().unwrap_or_else(|_| panic!("{}", parse_error("tokens"))),
        scored: field("scored").parse().unwrap_or_else(|_| panic!("{}", parse_error("scored"))),
    }
}

/// check-model.py's perplexity; see [`check_model`].
pub fn check_model_ppl(model_dir: &Path, text: &Path, tokens: usize, ctx: usize) -> f64 {
    check_model(model_dir, text, tokens, ctx).ppl
}

/// Token ids from the Python `tokenizers` package of the assets' venv (the tokenizer check-model.py
/// uses) for `dir/tokenizer.json`, one list per text, without special tokens.
pub fn python_token_ids(dir: &Path, texts: &[String]) -> Vec<Vec<u32>> {
    const SCRIPT: &str = "import json, sys\n\
        from tokenizers import Tokenizer\n\
        req = json.load(sys.stdin)\n\
        tok = Tokenizer.from_file(req['tokenizer'])\n\
        json.dump([tok.encode(t, add_special_tokens=False).ids for t in req['texts']], sys.stdout)\n";
    let request = serde_json::json!({"tokenizer": dir.join("tokenizer.json"), "texts": texts});
    let mut child = Command::new(reference_python())
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the reference python starts");
    child.stdin.take().expect("stdin is piped").write_all(request.to_string().as_bytes()).expect("python reads stdin");
    let out = child.wait_with_output().expect("python runs");
    assert!(out.status.success(), "python tokenizers failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("python printed no id lists ({e})"))
}

/// Runs `awq ARGS...` to completion.
pub fn awq<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = Command::new(awq_bin());
    cmd.args(args).env_remove("AWQ_LOG");
    cmd.output().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

/// The command line and both streams of a finished `awq` run, for failure messages.
pub(crate) fn describe(args: &[String], out: &Output) -> String {
    format!(
        "awq {} ({})\n--- stdout\n{}\n--- stderr\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn to_strings<I, S>(args: I) -> Vec<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    args.into_iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect()
}

/// Runs `awq ARGS...`, asserts it succeeded and returns its stdout.
pub fn awq_ok<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let args = to_strings(args);
    let out = awq(&args);
    assert!(out.status.success(), "expected success: {}", describe(&args, &out));
    String::from_utf8(out.stdout.clone()).unwrap_or_else(|_| panic!("non-UTF-8 stdout: {}", describe(&args, &out)))
}

/// Runs `awq ARGS...`, asserts it failed the way a user error should (exit code 1, one `error:`
/// line chain on stderr, no panic) and returns its stderr.
pub fn awq_err<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let args = to_strings(args);
    let out = awq(&args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "expected exit code 1: {}", describe(&args, &out));
    assert!(
        stderr.starts_with("error: ") && !stderr.contains("panicked"),
        "expected an `error:` message and no panic: {}",
        describe(&args, &out)
    );
    stderr
}

/// `awq eval ppl MODEL --text TEXT --ctx CTX [--max-tokens N] --json`, parsed.
pub fn awq_ppl_json(model: &Path, text: &Path, max_tokens: Option<usize>, ctx: usize) -> Value {
    let (model, text) = (model.to_string_lossy().into_owned(), text.to_string_lossy().into_owned());
    let mut args = vec!["eval".into(), "ppl".into(), model, "--text".into(), text, "--ctx".into(), ctx.to_string()];
    args.push("--json".into());
    if let Some(n) = max_tokens {
        args.extend(["--max-tokens".into(), n.to_string()]);
    }
    let stdout = awq_ok(&args);
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("awq {} printed no JSON ({e}): {stdout}", args.join(" ")))
}

/// Reads a number out of a JSON report, with a message naming the key when it is not there.
pub fn json_f64(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or_else(|| panic!("no number `{key}` in {v}"))
}

/// Reads a count out of a JSON report, with a message naming the key when it is not there.
pub fn json_usize(v: &Value, key: &str) -> usize {
    v.get(key).and_then(Value::as_u64).unwrap_or_else(|| panic!("no count `{key}` in {v}")) as usize
}

/// Rewrites `dir/config.json` through `edit`, which gets the parsed JSON object.
pub fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut config: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    edit(config.as_object_mut().unwrap_or_else(|| panic!("{} is not a JSON object", path.display())));
    let text = serde_json::to_string_pretty(&config).expect("JSON serialises");
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// Strings where byte-level BPE tokenizers tend to differ: digit splitting, unicode (accents in
/// both normal forms, CJK, emoji with modifiers and joiners, right-to-left scripts), whitespace runs
/// of every kind, special-token text, code and contractions.
pub const TRICKY_TEXTS: &[&str] = &[
    "",
    "12345 67.89 1,000,000",
    "12345",
    "3.14159265358979 and -42, 0x1F, 1e-5, 2024-06-30",
    "café naïve résumé Ångström façade",
    "cafe\u{301} nai\u{308}ve (combining marks) e\u{301}\u{301}\u{301}",
    "日本語のテキスト、中文文本。한국어 텍스트",
    "👍🏽 🎉🎉🎉 👨\u{200d}👩\u{200d}👧 🇫🇷",
    "שלום עולם, مرحبا بالعالم",
    "  leading and trailing  ",
    " x",
    "a    b     c      d",
    "line one\nline two\n\n\nline five\n",
    "\n\n",
    "windows\r\nline endings\r\n\r\n",
    "\tindented\t\ttabs\t",
    "\u{a0}no-break\u{2003}em space\u{3000}ideographic\u{b}vertical tab\u{c}form feed",
    "<|im_start|>user\nHello there!<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user",
    "<|endoftext|><|endoftext|> and a broken <|im_start token",
    "fn main() {\n    let x: Vec<u32> = (0..10).map(|i| i * 2).collect();\n    println!(\"{x:?}\");\n}\n",
    "def f(a, b=2):\n\treturn {'k': [a ** b, a // b]}  # comment\n",
    "I'm sure you'll agree they're right; it's theirs, we'd said. DON'T SHOUT",
    "!!!???...---***___ ''' \"\"\"",
    "HELLO World hello WORLD hElLo",
];

/// A fresh scratch folder, deleted when dropped.
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("awq-e2e-").tempdir().expect("the temp folder is writable")
}

/// `|a - b| / |b|`
pub fn rel_diff(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

/// Writes `ENGLISH_SAMPLE` to `dir/sample.txt` and returns its path.
pub fn write_sample_text(dir: &Path) -> PathBuf {
    let path = dir.join("sample.txt");
    std::fs::write(&path, ENGLISH_SAMPLE).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    path
}

/// Fifteen short English lines: calibration texts of < 128 bytes each (all 15: about 6 rows of
/// 128 tokens), the jobs of the cluster, auth and chart tests.
pub const SHORT_LINES: [&str; 15] = [
    "The lighthouse keeper rose before dawn, as he had every morning.",
    "He climbed the steps, wound the clockwork and trimmed the wick.",
    "The sea is never the same twice, he said to his niece.",
    "She had come from the city with a suitcase and a camera.",
    "The island was small, with fifty-seven people and many sheep.",
    "The ferry came on Tuesdays and Fridays, weather permitting.",
    "Letters arrived in bundles; newspapers were read a week late.",
    "On the third day it rained, and they sat in the kitchen.",
    "He told her about the storm of 1953 and the lantern gallery.",
    "By Saturday the wind had dropped and the sky was clear.",
    "The puffins came at noon, whirring in from the sea.",
    "The harbour master unrolled a chart and traced a line.",
    "Some years you can see the ribs of the wreck at spring tides.",
    "She learned to tie a bowline, a sheet bend and a clove hitch.",
    "On the last evening they climbed the tower together.",
];

/// The first `n` of [`SHORT_LINES`], one per line: a calibration file's text.
pub fn short_lines(n: usize) -> String {
    SHORT_LINES[..n.min(SHORT_LINES.len())].iter().map(|l| format!("{l}\n")).collect()
}

/// About 2.5 KB of varied English (prose, dialogue, numbers, a list, a few accented letters) for
/// synthetic models, whose byte-level tokenizer makes every byte one token. Its length is not a
/// multiple of any window length the tests use, so the last window is a short one.
pub const ENGLISH_SAMPLE: &str = "\
The lighthouse keeper rose before dawn, as he had every morning for thirty-one years. He climbed the
one hundred and fourteen steps, wound the clockwork, trimmed the wick and wrote in the log: \"Wind
north-east, force 4; sea moderate; visibility good. Two trawlers passed at 05:40.\"

\"Do you never tire of it?\" his niece asked when she visited in June.
\"Tire of what? The sea is never the same twice,\" he said. \"Yesterday it was grey as slate; today
it is green, and tomorrow, who knows?\"

She had come from the city with a suitcase, a camera and a list:
  1. Photograph the puffins on the north cliff.
  2. Find the wreck of the Marguerite (lost 1887, all hands saved).
  3. Learn to tie a bowline, a sheet bend and a clove hitch.
  4. Eat at least one crème brûlée at the café in the village.

The island was small: 2.3 km long and barely 800 m wide, with a population of 57 people, 340 sheep
and an uncounted number of rabbits. The ferry came on Tuesdays and Fridays, weather permitting,
which in winter meant rarely. Letters arrived in bundles; newspapers were read a week late and
argued over as if the news were fresh.

On the third day it rained. They sat in the kitchen and he told her about the storm of 1953, when
the waves broke over the lantern gallery, sixty metres above the sea, and the light went out for
eleven minutes. \"Eleven minutes,\" he repeated. \"I have never been so frightened, before or since.
Every ship in the channel was counting on that light.\"

By Saturday the wind had dropped. She walked to the north cliff at low tide, lay flat on the wet
turf and waited. The puffins came at noon: dozens of them, then hundreds, whirring in from the sea
with beaks full of silver fish. She took 212 photographs and kept nine.

The wreck was harder. The harbour master, Mrs. Okonkwo, unrolled a chart from 1902 and traced a
line with her finger. \"Here, or perhaps here. The sand moves. Some years you can see her ribs at the
spring tides; some years nothing at all.\" It was not a spring tide, and she saw nothing at all.

Still, by the end of the fortnight she could tie all three knots with her eyes closed, and she had
eaten four crème brûlées (the list had said at least one). On the last evening they climbed the
tower together and watched the beam sweep out across the dark water: three flashes every fifteen
seconds, the same signal since 1874.

\"Will you come back?\" he asked.
\"Next summer,\" she said, \"if the ferry runs.\"
\"It always runs,\" he said, \"eventually.\"
";

/// Every entry name in `dir` (not recursive), sorted.
pub fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.expect("readable entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Asserts that folders `a` and `b` hold the same files with the same bytes; a failure names the
/// file, both sizes and the first differing byte.
pub fn assert_same_files(a: &Path, b: &Path) {
    let names = file_names(a);
    assert_eq!(names, file_names(b), "{} and {} hold different files", a.display(), b.display());
    for name in &names {
        let read = |dir: &Path| std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("cannot read {}/{name}: {e}", dir.display()));
        let (x, y) = (read(a), read(b));
        if x != y {
            let at = x.iter().zip(&y).position(|(p, q)| p != q).unwrap_or(x.len().min(y.len()));
            panic!(
                "{name} differs between {} ({} bytes) and {} ({} bytes), first at byte {at}",
                a.display(),
                x.len(),
                b.display(),
                y.len()
            );
        }
    }
}

/// Hidden working folders beside an output named `out_name` in `dir`: the writer's `.OUT.tmp-*`
/// and `.OUT.old-*`, the coordinator's staging `.OUT.parts-*`, anything `.OUT.*`.
pub fn leftovers(dir: &Path, out_name: &str) -> Vec<String> {
    file_names(dir).into_iter().filter(|n| n.starts_with(&format!(".{out_name}."))).collect()
}
