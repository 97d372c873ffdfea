//! Every `.cu` file under `kernels/src` compiles with NVRTC for sm_90a (the H100's target: sm_90 with
//! the architecture-specific instructions, wgmma among them), through
//! `awq_kernels::cuda::compile`, the function the devices use at run time (same options, same
//! in-memory `common.cuh` and headers). Needs no GPU: only libnvrtc and CUDA's headers, which
//! `kernels/tests/nvrtc-env` installs from PyPI wheels. So a kernel that does not compile fails CI.
//!
//! Without NVRTC the tests fail when `CI` or `AWQ_NVRTC_TESTS=1` is set (CI sets both), and skip
//! with a message otherwise (a developer's plain `cargo test --features cuda`).
#![cfg(feature = "cuda")]

mod common;

use std::path::{Path, PathBuf};

use awq_kernels::cuda::{compile, cubin_defines, include_dirs, nvrtc_available, nvrtc_version, COMMON_HEADER};
use awq_kernels::ops::CUDA_SOURCES;
use awq_kernels::Error;

const ARCH: &str = "sm_90a";

fn required() -> bool {
    let set = |var: &str| std::env::var(var).is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
    set("CI") || set("AWQ_NVRTC_TESTS")
}

/// Whether NVRTC is here; panics when it must be and is not. Installs the kernel settings first
/// (`AWQ_CUDA_INCLUDE`, from `nvrtc-env`).
fn have_nvrtc() -> bool {
    common::configure_from_env();
    if nvrtc_available() {
        eprintln!("NVRTC {:?}, CUDA headers from {:?}", nvrtc_version(), include_dirs());
        return true;
    }
    assert!(
        !required(),
        "libnvrtc.so.13 could not be loaded, and CI or AWQ_NVRTC_TESTS=1 requires it: run the tests \
         through kernels/tests/nvrtc-env, which installs it from the nvidia-cuda-nvrtc wheel"
    );
    eprintln!("skipped: libnvrtc.so.13 not found (kernels/tests/nvrtc-env provides it; AWQ_NVRTC_TESTS=1 makes this a failure)");
    false
}

/// The kernels crate's `src` folder: where it was built, or, for a test binary taken to a GPU
/// machine (scripts/build-gpu), `kernels/src` under the repository copy it runs from.
fn kernel_sources() -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let copied = PathBuf::from("kernels/src");
    if !built.is_dir() && copied.is_dir() {
        return copied;
    }
    built
}

/// Every file with extension `ext` under `dir`, as paths relative to `root` with `/` separators.
fn files_with(ext: &str, root: &Path, dir: &Path, out: &mut Vec<String>) {
    let mut entries: Vec<PathBuf> =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).map(|e| e.unwrap().path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            files_with(ext, root, &path, out);
        } else if path.extension().is_some_and(|e| e == ext) {
            let rel = path.strip_prefix(root).unwrap();
            out.push(rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/"));
        }
    }
}

#[test]
fn every_cu_file_compiles_for_sm_90a_and_defines_its_kernels() {
    if !have_nvrtc() {
        return;
    }
    let src = kernel_sources();
    let mut files = Vec::new();
    files_with("cu", &src, &src, &mut files);
    assert!(files.len() >= CUDA_SOURCES.len(), "found only {files:?} under {}", src.display());

    let mut failures = Vec::new();
    // Every header on disk is the one embedded (the sources that include it compile with that).
    let mut headers = Vec::new();
    files_with("cuh", &src, &src, &mut headers);
    let registered = CUDA_SOURCES.iter().flat_map(|s| s.headers.iter().copied()).chain([&COMMON_HEADER]);
    for file in &headers {
        let text = std::fs::read_to_string(src.join(file)).unwrap();
        match registered.clone().find(|h| h.file == file) {
            None => failures.push(format!("{file}: no CudaSource lists this header")),
            Some(h) if h.code != text => failures.push(format!("{file}: the embedded header differs from the file")),
            Some(_) => {}
        }
    }
    for file in &files {
        let text = std::fs::read_to_string(src.join(file)).unwrap();
        // Compile what is on disk, so even a file the registry forgot is checked (with the
        // registered source's headers when there is one).
        let registered = CUDA_SOURCES.iter().find(|s| s.file == file);
        let started = std::time::Instant::now();
        let cubin = match compile(file, &text, registered.map_or(&[][..], |s| s.headers), ARCH) {
            Ok(cubin) => cubin,
            Err(e) => {
                failures.push(e.to_string());
                continue;
            }
        };
        eprintln!("{file}: {} bytes of {ARCH} code in {:.2} s", cubin.len(), started.elapsed().as_secs_f64());
        match registered {
            None => failures.push(format!("{file}: not listed in awq_kernels::ops::CUDA_SOURCES, so no op can launch it")),
            Some(s) if s.code != text => failures.push(format!("{file}: the embedded text differs from the file")),
            Some(s) => failures.extend(
                s.kernels.iter().filter(|k| !cubin_defines(&cubin, k)).map(|k| format!("{file}: kernel {k} is not defined")),
            ),
        }
    }
    failures.extend(
        CUDA_SOURCES.iter().filter(|s| !files.contains(&s.file.to_string())).map(|s| format!("{}: listed but not on disk", s.file)),
    );
    assert!(failures.is_empty(), "{} problem(s):\n\n{}", failures.len(), failures.join("\n\n"));
}

#[test]
fn a_kernel_that_does_not_compile_names_its_file_and_line() {
    if !have_nvrtc() {
        return;
    }
    let broken = "#include \"common.cuh\"\nextern \"C\" __global__ void k(float* x) { x[0] = not_declared; }\n";
    let err = compile("ops/broken.cu", broken, &[], ARCH).unwrap_err();
    let Error::NvrtcCompile { file, arch, log, .. } = &err else { panic!("expected an NVRTC compile error, got {err}") };
    assert_eq!((file.as_str(), arch.as_str()), ("ops/broken.cu", ARCH));
    assert!(log.contains("ops/broken.cu(2)") && log.contains("not_declared"), "log: {log}");
    assert!(err.to_string().starts_with("ops/broken.cu: NVRTC failed"), "{err}");
}

#[test]
fn compiled_kernels_are_cached_on_disk_and_damaged_entries_compiled_again() {
    use awq_kernels::cuda::kernel_cache::{compile_cached_in, CacheOutcome};
    if !have_nvrtc() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = CUDA_SOURCES.iter().find(|s| s.file.ends_with("rms_norm.cu")).expect("rms_norm.cu is a source");
    let (first, outcome) = compile_cached_in(Some(dir.path()), src.file, src.code, src.headers, ARCH).unwrap();
    assert_eq!(outcome, CacheOutcome::Miss);
    let entries: Vec<PathBuf> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(entries.len(), 1, "one entry, no temporary file left: {entries:?}");
    let (again, outcome) = compile_cached_in(Some(dir.path()), src.file, src.code, src.headers, ARCH).unwrap();
    assert_eq!(outcome, CacheOutcome::Hit);
    assert_eq!(again, first);
    // A damaged entry (here: its last byte) is not used; it is compiled and replaced.
    let mut bytes = std::fs::read(&entries[0]).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(&entries[0], &bytes).unwrap();
    let (repaired, outcome) = compile_cached_in(Some(dir.path()), src.file, src.code, src.headers, ARCH).unwrap();
    assert_eq!(outcome, CacheOutcome::Miss);
    assert_eq!(repaired, first);
    assert_eq!(compile_cached_in(Some(dir.path()), src.file, src.code, src.headers, ARCH).unwrap().1, CacheOutcome::Hit);
    // Another architecture is another entry; no folder, no cache.
    assert_eq!(compile_cached_in(Some(dir.path()), src.file, src.code, src.headers, "sm_80").unwrap().1, CacheOutcome::Miss);
    assert_eq!(compile_cached_in(None, src.file, src.code, src.headers, ARCH).unwrap().1, CacheOutcome::Off);
    // An unwritable folder only means no cache.
    let file_in_the_way = dir.path().join("not-a-folder");
    std::fs::write(&file_in_the_way, b"x").unwrap();
    assert_eq!(compile_cached_in(Some(&file_in_the_way), src.file, src.code, src.headers, ARCH).unwrap().1, CacheOutcome::Miss);
}

/// The W4A16 decode kernel uses sm_90 instructions (TMA bulk copies, mbarrier transaction counts)
/// and the prefill kernel sm_90a's (wgmma); they are compiled out where the target lacks them, and
/// the files must still compile there (ops/w4a16/mod.rs sends those GPUs to the other kernels).
#[test]
fn w4a16_compiles_without_the_hopper_kernel_bodies_for_older_targets() {
    if !have_nvrtc() {
        return;
    }
    let sources: Vec<_> = CUDA_SOURCES.iter().filter(|s| s.file.starts_with("ops/w4a16/")).collect();
    assert_eq!(sources.len(), 4, "decode, stream, fused and dequantize are registered");
    for src in sources {
        for arch in ["sm_80", "sm_90"] {
            let cubin = compile(src.file, src.code, src.headers, arch).unwrap_or_else(|e| panic!("{e}"));
            for kernel in src.kernels {
                assert!(cubin_defines(&cubin, kernel), "{arch}: {}: kernel {kernel} is not defined", src.file);
            }
        }
    }
}
