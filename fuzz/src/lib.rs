//! Time-bounded fuzzing on stable Rust, shared by the crates' `tests/fuzz_*.rs` (issue 20, "Bad
//! input"): every parser and handler that takes bytes from a file, the network or a user is fed
//! generated inputs until an iteration count or a wall-clock budget runs out, and the test fails on
//! the first panic, hang or oversized allocation, printing the run's seed and the input as hex.
//!
//! A [`Target`] names what is fed, holds valid inputs to start from (seeds) and optionally a
//! generator of structured inputs (lying length fields, counts, out-of-range values); [`Target::run`]
//! builds the code under test once, on the target's own thread (so it may own a runtime, a server,
//! a scratch folder), then feeds it. Input `k` comes from the run's seed and `k` alone: a seed with
//! a few byte mutations ([`mutate`]), a truncated seed, the generator's output (sometimes mutated
//! too), or random bytes; `AWQ_FUZZ_REPLAY=k` makes and runs input `k` only. [`json`] mutates JSON
//! documents as trees; [`grpc`] (feature `grpc`) sends raw bytes as a gRPC request's messages.
//!
//! Budgets, per target, from the environment: `AWQ_FUZZ_SECONDS` (default 3: the whole set adds
//! well under two minutes to `cargo test` on 2 cores), `AWQ_FUZZ_ITERATIONS` (default 1,000,000),
//! `AWQ_FUZZ_SEED` (default fixed, so CI runs the same inputs; `random` picks one from the clock);
//! `AWQ_FUZZ_LOG=FILE` appends each target's counts to FILE.
//!
//! A finding is:
//! - a panic of the target, or any panic recorded while an input runs (the panic hook installed here
//!   sees the panics of every thread, including those tokio and the engine catch);
//! - an input that takes longer than the target's bound ([`Target::input_timeout`]): a hang;
//! - an allocation above the target's bound while an input runs ([`Target::max_alloc_bytes`]): a
//!   length field believed. The test binary installs [`TrackingAllocator`] as its global allocator;
//!   an allocation of a gigabyte or more also writes the input's number at once, in case it aborts.
//!
//! The failing input is saved under `$TMPDIR/awq-fuzz/`. Targets of one test binary run one at a
//! time, so a panic or an allocation belongs to the input that ran.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex, Once};
use std::time::{Duration, Instant};

pub use awq_kernels::rng::SplitMix64 as Rng;

#[cfg(feature = "grpc")]
pub mod grpc;
pub mod json;

/// What the code under test made of an input (both are fine; the counts show the fuzzer is not only
/// producing what the first check refuses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    Refused,
}

impl Outcome {
    /// `Accepted` for `Ok`, `Refused` for `Err`.
    pub fn of<T, E>(r: &Result<T, E>) -> Outcome {
        if r.is_ok() {
            Outcome::Accepted
        } else {
            Outcome::Refused
        }
    }
}

/// A structured-input generator: the input for one iteration from its RNG.
type Generator = Box<dyn Fn(&mut Rng) -> Vec<u8>>;

/// One thing to fuzz; see the crate docs.
pub struct Target {
    name: &'static str,
    seeds: Vec<Vec<u8>>,
    generator: Option<Generator>,
    input_timeout: Duration,
    max_alloc_bytes: usize,
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct Report {
    pub name: &'static str,
    pub seed: u64,
    pub iterations: u64,
    pub accepted: u64,
    pub refused: u64,
    pub elapsed: Duration,
}

impl Target {
    /// A target with no seeds yet, 10 s per input and allocations of at most 64 MiB.
    pub fn new(name: &'static str) -> Target {
        Target {
            name,
            seeds: Vec::new(),
            generator: None,
            input_timeout: Duration::from_secs(10),
            max_alloc_bytes: 64 << 20,
        }
    }

    /// A valid input to mutate.
    pub fn seed(mut self, input: impl Into<Vec<u8>>) -> Target {
        self.seeds.push(input.into());
        self
    }

    /// Structured inputs (they are byte-mutated too, now and then).
    pub fn generator(mut self, generate: impl Fn(&mut Rng) -> Vec<u8> + 'static) -> Target {
        self.generator = Some(Box::new(generate));
        self
    }

    /// The longest one input may take before it counts as a hang.
    pub fn input_timeout(mut self, timeout: Duration) -> Target {
        self.input_timeout = timeout;
        self
    }

    /// The largest single allocation an input may make.
    pub fn max_alloc_bytes(mut self, bytes: usize) -> Target {
        self.max_alloc_bytes = bytes;
        self
    }

    /// Input `k` of a run seeded with `seed`.
    pub fn input(&self, seed: u64, k: u64) -> Vec<u8> {
        let mut rng = Rng::new(seed ^ k.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ hash(self.name));
        let from_seed = |rng: &mut Rng| -> Vec<u8> {
            if self.seeds.is_empty() {
                random_bytes(rng)
            } else {
                self.seeds[rng.below(self.seeds.len())].clone()
            }
        };
        let roll = rng.below(100);
        let mut input = match roll {
            0..=7 => random_bytes(&mut rng),
            8..=19 => {
                let mut s = from_seed(&mut rng);
                s.truncate(rng.below(s.len() + 1));
                s
            }
            20..=59 if self.generator.is_some() => (self.generator.as_ref().expect("checked"))(&mut rng),
            _ => from_seed(&mut rng),
        };
        let n_mutations = match roll {
            0..=19 => rng.below(2),
            20..=59 if self.generator.is_some() => usize::from(rng.below(3) == 0) * (1 + rng.below(3)),
            _ => 1 + rng.below(8),
        };
        for _ in 0..n_mutations {
            mutate(&mut input, &mut rng, &self.seeds);
        }
        input
    }

    /// Builds the code under test with `setup` on the target's thread and feeds it until the budget
    /// runs out; panics (failing the test) on the first finding. See the crate docs.
    pub fn run<F>(self, setup: impl FnOnce() -> F + Send + 'static) -> Report
    where
        F: FnMut(&[u8]) -> Outcome + 'static,
    {
        let _one_at_a_time = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        install_hook();
        check_tracking_allocator();
        let budget = Budget::from_env();
        let thread = format!("fuzz-{}", self.name);
        let (inputs, inputs_rx) = mpsc::channel::<Vec<u8>>();
        let (results_tx, results) = mpsc::channel::<Result<Outcome, String>>();
        std::thread::Builder::new()
            .name(thread.clone())
            .spawn(move || {
                let mut target = setup();
                while let Ok(input) = inputs_rx.recv() {
                    let result = std::panic::catch_unwind(AssertUnwindSafe(|| target(&input))).map_err(panic_message);
                    if results_tx.send(result).is_err() {
                        break;
                    }
                }
            })
            .expect("a thread for the target");

        let name: &'static str = self.name;
        CURRENT.store(Box::leak(Box::new((name, budget.seed))) as *mut _, Ordering::SeqCst);
        let started = Instant::now();
        let mut report =
            Report { name, seed: budget.seed, iterations: 0, accepted: 0, refused: 0, elapsed: Duration::ZERO };
        let indices: Box<dyn Iterator<Item = u64>> = match budget.replay {
            Some(k) => Box::new(std::iter::once(k)),
            None => Box::new(0..budget.iterations),
        };
        let mut first = true;
        for k in indices {
            if !first && started.elapsed() >= budget.time {
                break;
            }
            let input = self.input(budget.seed, k);
            let panics_before = panics_len();
            INPUT_INDEX.store(k, Ordering::SeqCst);
            LARGEST.store(0, Ordering::SeqCst);
            inputs.send(input.clone()).expect("the target's thread waits for inputs");
            // The first input also waits for the set-up (a server, an engine).
            let timeout = if first { self.input_timeout + Duration::from_secs(120) } else { self.input_timeout };
            first = false;
            let result = results.recv_timeout(timeout);
            let largest = LARGEST.load(Ordering::SeqCst);
            let hung = matches!(result, Err(mpsc::RecvTimeoutError::Timeout));
            let finding = match result {
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    Some(format!("no answer within {:?} (a hang)", self.input_timeout))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => Some("the target's thread died".to_string()),
                Ok(Err(message)) => Some(format!("panicked: {message}")),
                Ok(Ok(outcome)) => {
                    match outcome {
                        Outcome::Accepted => report.accepted += 1,
                        Outcome::Refused => report.refused += 1,
                    }
                    let panics = panics_since(panics_before);
                    if !panics.is_empty() {
                        Some(format!("a thread panicked while it ran: {}", panics.join("; ")))
                    } else if largest > self.max_alloc_bytes {
                        Some(format!("allocated {largest} bytes at once (the bound is {})", self.max_alloc_bytes))
                    } else {
                        None
                    }
                }
            };
            report.iterations += 1;
            if let Some(finding) = finding {
                fail(name, budget.seed, k, &input, &finding, hung);
            }
        }
        report.elapsed = started.elapsed();
        let line = format!(
            "fuzz {}: {} inputs in {:.1} s ({} accepted, {} refused), seed {:#x}",
            name,
            report.iterations,
            report.elapsed.as_secs_f64(),
            report.accepted,
            report.refused,
            report.seed
        );
        eprintln!("{line}");
        if let Ok(log) = std::env::var("AWQ_FUZZ_LOG") {
            if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&log) {
                let _ = writeln!(f, "{line}");
            }
        }
        report
    }
}

/// The budget of one target's run, from the environment (see the crate docs).
struct Budget {
    time: Duration,
    iterations: u64,
    seed: u64,
    replay: Option<u64>,
}

impl Budget {
    fn from_env() -> Budget {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let number = |name: &str, default: u64| -> u64 {
            var(name).map_or(default, |v| v.parse().unwrap_or_else(|_| panic!("{name}={v} is not a whole number")))
        };
        let seed = match var("AWQ_FUZZ_SEED").as_deref() {
            None => 0x00A1_F022,
            Some("random") => {
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
            }
            Some(v) => {
                let parsed = match v.strip_prefix("0x") {
                    Some(hex) => u64::from_str_radix(hex, 16),
                    None => v.parse(),
                };
                parsed.unwrap_or_else(|_| panic!("AWQ_FUZZ_SEED={v} is not a number (or `random`)"))
            }
        };
        Budget {
            time: Duration::from_secs(number("AWQ_FUZZ_SECONDS", 3)),
            iterations: number("AWQ_FUZZ_ITERATIONS", 1_000_000),
            seed,
            replay: var("AWQ_FUZZ_REPLAY")
                .map(|v| v.parse().unwrap_or_else(|_| panic!("AWQ_FUZZ_REPLAY={v} is not an input number"))),
        }
    }
}

/// Reports a finding: the seed, the input's number and bytes (hex), where it was saved; then fails
/// the test. After a hang the whole test binary stops: the hung input's thread cannot be stopped,
/// and whatever it still allocates or panics would be blamed on the next target's inputs.
fn fail(name: &str, seed: u64, k: u64, input: &[u8], finding: &str, hung: bool) -> ! {
    let dir = std::env::temp_dir().join("awq-fuzz");
    let path: PathBuf = dir.join(format!("{name}-{seed:x}-{k}.bin"));
    let saved = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, input));
    let saved = match saved {
        Ok(()) => format!("saved to {}", path.display()),
        Err(e) => format!("could not be saved to {}: {e}", path.display()),
    };
    const SHOWN: usize = 16 << 10;
    let more = if input.len() > SHOWN { format!(" ... ({} bytes in all)", input.len()) } else { String::new() };
    let report = format!(
        "fuzz {name}: input #{k} {finding}\n  replay: AWQ_FUZZ_SEED={seed:#x} AWQ_FUZZ_REPLAY={k}\n  input ({} bytes, {saved}):\n  {}{more}\n  as text: {:?}",
        input.len(),
        hex(&input[..input.len().min(SHOWN)]),
        String::from_utf8_lossy(&input[..input.len().min(SHOWN)]),
    );
    if hung {
        // Straight to the process's stderr: the test harness's capture would be lost with it.
        let _ = writeln!(std::io::stderr(), "{report}");
        std::process::exit(101);
    }
    panic!("{report}")
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of a hex string (for regression tests that keep a finding's input).
pub fn from_hex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).expect("ASCII"), 16).expect("hex digits"))
        .collect()
}

fn hash(s: &str) -> u64 {
    s.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01B3))
}

fn random_bytes(rng: &mut Rng) -> Vec<u8> {
    let len = if rng.below(4) == 0 { rng.below(4096) } else { rng.below(64) };
    (0..len).map(|_| rng.next_u64() as u8).collect()
}

/// Integers that break length and count checks: zero, one, powers of two and their neighbours,
/// the limits of every width, and a few gigabyte-sized claims.
pub const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    16,
    31,
    32,
    64,
    127,
    128,
    255,
    256,
    1023,
    4096,
    65535,
    65536,
    (1 << 20) + 1,
    (1 << 31) - 1,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    1 << 40,
    1 << 48,
    (1 << 53) + 1,
    1 << 60,
    (1 << 63) - 1,
    1 << 63,
    u64::MAX - 7,
    u64::MAX,
];

/// Pieces of text that break JSON and number parsers.
const TOKENS: &[&str] = &[
    "0",
    "-1",
    "-0",
    "1e309",
    "-1e309",
    "0.5",
    "1e-400",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775809",
    "9007199254740993",
    "NaN",
    "Infinity",
    "null",
    "true",
    "\"\"",
    "[]",
    "{}",
    "\"\\u0000\"",
    "\"\\ud800\"",
    "[[[[[[[[[[[[[[[[",
    "]]]]",
    "{\"a\":",
    ",",
    ":",
    "\"",
    "\\",
    "\u{feff}",
    "\u{10ffff}",
    "\u{0}",
];

/// One random change to `bytes`: bit flips, bytes and integers that matter (little-endian, of every
/// width), insertions, deletions, duplicated ranges, truncation, a splice from another seed, or a
/// piece of text that breaks JSON and number parsers.
pub fn mutate(bytes: &mut Vec<u8>, rng: &mut Rng, others: &[Vec<u8>]) {
    let pos = |rng: &mut Rng, len: usize| rng.below(len + 1);
    match rng.below(11) {
        0 if !bytes.is_empty() => {
            let i = rng.below(bytes.len());
            bytes[i] ^= 1 << rng.below(8);
        }
        1 if !bytes.is_empty() => {
            let i = rng.below(bytes.len());
            bytes[i] = rng.next_u64() as u8;
        }
        2 if !bytes.is_empty() => {
            let i = rng.below(bytes.len());
            bytes[i] =
                *[0u8, 0xff, 0x7f, 0x80, 0x01, b'"', b'{', b'}', b'[', b']', b',', b':', b'0', b'9', b'-', b'\\']
                    .get(rng.below(16))
                    .expect("in range");
        }
        3 => {
            let width = [1usize, 2, 4, 8][rng.below(4)];
            let value = if rng.below(4) == 0 { rng.next_u64() } else { INTERESTING[rng.below(INTERESTING.len())] };
            let value = if rng.below(8) == 0 { value.wrapping_neg() } else { value };
            let at = pos(rng, bytes.len().saturating_sub(width));
            let le = value.to_le_bytes();
            for (j, b) in le[..width].iter().enumerate() {
                match bytes.get_mut(at + j) {
                    Some(slot) => *slot = *b,
                    None => bytes.push(*b),
                }
            }
        }
        4 => {
            let at = pos(rng, bytes.len());
            let n = 1 + rng.below(16);
            let fresh: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            bytes.splice(at..at, fresh);
        }
        5 if !bytes.is_empty() => {
            let at = rng.below(bytes.len());
            let n = 1 + rng.below((bytes.len() - at).min(64));
            bytes.drain(at..at + n);
        }
        6 if !bytes.is_empty() => {
            let at = rng.below(bytes.len());
            let n = 1 + rng.below((bytes.len() - at).min(256));
            let piece = bytes[at..at + n].to_vec();
            let to = pos(rng, bytes.len());
            let times = if rng.below(8) == 0 { 1 + rng.below(64) } else { 1 };
            let repeated: Vec<u8> = piece.iter().copied().cycle().take(n * times).collect();
            bytes.splice(to..to, repeated);
        }
        7 => bytes.truncate(pos(rng, bytes.len())),
        8 if !others.is_empty() => {
            let other = &others[rng.below(others.len())];
            let (at, from) = (pos(rng, bytes.len()), pos(rng, other.len()));
            bytes.truncate(at);
            bytes.extend_from_slice(&other[from..]);
        }
        9 => {
            let at = pos(rng, bytes.len());
            let token = TOKENS[rng.below(TOKENS.len())].as_bytes();
            bytes.splice(at..at, token.iter().copied());
        }
        _ => {
            // A run of ASCII digits becomes another number.
            let digits: Vec<usize> = (0..bytes.len()).filter(|&i| bytes[i].is_ascii_digit()).collect();
            if let Some(&start) = digits.get(rng.below(digits.len().max(1))) {
                let end = (start..bytes.len()).find(|&i| !bytes[i].is_ascii_digit()).unwrap_or(bytes.len());
                let number = INTERESTING[rng.below(INTERESTING.len())].to_string();
                bytes.splice(start..end, number.into_bytes());
            } else if !bytes.is_empty() {
                let i = rng.below(bytes.len());
                bytes[i] = bytes[i].wrapping_add(1);
            }
        }
    }
}

// ---- panics -------------------------------------------------------------------------------------

/// Every panic since the hook was installed: the thread's name and the message.
static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// One target runs at a time per test binary.
static RUNNING: Mutex<()> = Mutex::new(());

fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current().name().unwrap_or("unnamed").to_string();
            PANICS.lock().unwrap_or_else(|e| e.into_inner()).push(format!("thread {thread}: {info}"));
            previous(info);
        }));
    });
}

fn panics_len() -> usize {
    PANICS.lock().unwrap_or_else(|e| e.into_inner()).len()
}

fn panics_since(n: usize) -> Vec<String> {
    PANICS.lock().unwrap_or_else(|e| e.into_inner())[n..].to_vec()
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    let last = PANICS.lock().unwrap_or_else(|e| e.into_inner()).last().cloned();
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(s), _) => last.unwrap_or_else(|| s.to_string()),
        (_, Some(s)) => last.unwrap_or_else(|| s.clone()),
        _ => last.unwrap_or_else(|| "a panic without a message".to_string()),
    }
}

// ---- allocations --------------------------------------------------------------------------------

/// The largest single allocation (or reallocation) since the current input started.
static LARGEST: AtomicUsize = AtomicUsize::new(0);
/// The number of the input running, and the target's name and run seed (for the note below).
static INPUT_INDEX: AtomicU64 = AtomicU64::new(0);
static CURRENT: AtomicPtr<(&'static str, u64)> = AtomicPtr::new(std::ptr::null_mut());
static INSTALLED: AtomicBool = AtomicBool::new(false);
/// From this size on, an allocation is noted on stderr at once: it may abort the process.
const NOTE_BYTES: usize = 1 << 30;

/// The global allocator of a fuzz test binary: the system's, recording the largest single
/// allocation so the harness can refuse an input that made the code believe a lying length.
///
/// ```ignore
/// #[global_allocator]
/// static ALLOC: awq_fuzz::TrackingAllocator = awq_fuzz::TrackingAllocator;
/// ```
pub struct TrackingAllocator;

impl TrackingAllocator {
    fn note(size: usize) {
        INSTALLED.store(true, Ordering::Relaxed);
        LARGEST.fetch_max(size, Ordering::Relaxed);
        if size >= NOTE_BYTES {
            note_huge(size);
        }
    }
}

/// Writes which input asked for `size` bytes, without allocating (the allocation may abort).
fn note_huge(size: usize) {
    struct Buf {
        bytes: [u8; 512],
        len: usize,
    }
    impl std::fmt::Write for Buf {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            let n = s.len().min(self.bytes.len() - self.len);
            self.bytes[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
            self.len += n;
            Ok(())
        }
    }
    let mut buf = Buf { bytes: [0; 512], len: 0 };
    let current = CURRENT.load(Ordering::SeqCst);
    // SAFETY: CURRENT is null or a leaked, never freed (name, seed) pair.
    let (name, seed) = if current.is_null() { ("(none)", 0) } else { unsafe { *current } };
    let _ = std::fmt::Write::write_fmt(
        &mut buf,
        format_args!(
            "awq-fuzz: an allocation of {size} bytes while fuzz {name} ran input #{} (replay: AWQ_FUZZ_SEED={seed:#x} AWQ_FUZZ_REPLAY={})\n",
            INPUT_INDEX.load(Ordering::SeqCst),
            INPUT_INDEX.load(Ordering::SeqCst)
        ),
    );
    let _ = std::io::stderr().write_all(&buf.bytes[..buf.len]);
}

// SAFETY: every call is passed to the system allocator unchanged; the bookkeeping only reads the
// requested size and never allocates (below `NOTE_BYTES`; above it, it writes to stderr from a
// stack buffer).
unsafe impl GlobalAlloc for TrackingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        TrackingAllocator::note(layout.size());
        // SAFETY: the caller's contract for `alloc`, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        TrackingAllocator::note(layout.size());
        // SAFETY: the caller's contract for `alloc_zeroed`, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc`, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        TrackingAllocator::note(new_size);
        // SAFETY: the caller's contract for `realloc`, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Forgets the largest allocation so far (a regression test that checks one call's).
pub fn reset_largest_allocation() {
    LARGEST.store(0, Ordering::SeqCst);
}

/// The largest single allocation since [`reset_largest_allocation`] (or since the current input
/// started), with [`TrackingAllocator`] installed; 0 without it.
pub fn largest_allocation() -> usize {
    LARGEST.load(Ordering::SeqCst)
}

/// Refuses to fuzz in a binary without [`TrackingAllocator`]: the allocation bound would not hold.
fn check_tracking_allocator() {
    let probe: Vec<u8> = Vec::with_capacity(4096);
    drop(std::hint::black_box(probe));
    assert!(
        INSTALLED.load(Ordering::Relaxed),
        "a fuzz test binary installs `#[global_allocator] static ALLOC: awq_fuzz::TrackingAllocator = awq_fuzz::TrackingAllocator;`"
    );
}

/// The name prefix of threads a target starts (its runtimes), for messages.
pub fn thread_name(target: &str) -> String {
    format!("fuzz-{target}-rt")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_depend_only_on_the_seed_and_their_number() {
        let t = Target::new("t").seed(b"{\"a\": 1}".to_vec()).generator(|rng| vec![rng.next_u64() as u8; 3]);
        for k in [0, 1, 17, 999] {
            assert_eq!(t.input(5, k), t.input(5, k));
        }
        let distinct: std::collections::BTreeSet<Vec<u8>> = (0..200).map(|k| t.input(5, k)).collect();
        assert!(distinct.len() > 100, "{} distinct inputs of 200", distinct.len());
    }

    #[test]
    fn hex_round_trips() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(from_hex(&hex(&bytes)), bytes);
    }

    #[test]
    fn mutations_stay_in_bounds() {
        let mut rng = Rng::new(3);
        let seeds = vec![b"GGUF\x03\x00\x00\x00".to_vec(), Vec::new()];
        for i in 0..20_000 {
            let mut input = seeds[i % 2].clone();
            for _ in 0..4 {
                mutate(&mut input, &mut rng, &seeds);
            }
            assert!(input.len() < 1 << 20);
        }
    }
}
