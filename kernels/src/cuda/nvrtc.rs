//! Run-time compilation of our `.cu` files with NVRTC.
//!
//! Every op's CUDA source sits next to its Rust module (`ops/rms_norm.cu` beside `ops/rms_norm.rs`)
//! and is embedded with `include_str!` into a [`CudaSource`] that the op module declares;
//! `crate::ops::CUDA_SOURCES` lists them all (this module knows no op). A
//! device compiles a source the first time one of its kernels is launched, for that device's own
//! architecture (`--gpu-architecture=sm_XY`, so the result is machine code, no JIT at load), and
//! keeps the module (see `CudaDevice::function`). The shared header `common.cuh`, and the headers a
//! source lists ([`CudaHeader`], e.g. `ops/w4a16/w4a16.cuh`), are handed to NVRTC in memory. CUDA's
//! own headers (`cuda_fp16.h`, `cuda_bf16.h`) come from [`include_dirs`].
//!
//! The options come from the process's `KernelSettings` (`crate::configure`): the CUDA header
//! folders, ptxas's report (`nvrtc_verbose`), and preprocessor definitions (`nvrtc_defines`), which
//! reach NVRTC only in a build with the `kernel-probes` feature: they can turn on the benchmark
//! probes of the W4A16 kernels, which give wrong results by design (`ops/w4a16/w4a16.cuh`), so a
//! normal build compiles exactly the embedded sources.
//!
//! The CI test `tests/nvrtc.rs` compiles every `.cu` file under `src/` through [`compile`], the same
//! function the devices use, so a kernel that does not compile fails CI without a GPU.

use std::ffi::{c_char, CString};
use std::path::PathBuf;
use std::sync::OnceLock;

use cudarc::nvrtc::{result, sys};

use crate::settings::settings;
use crate::{Error, Result};

/// One `.cu` file, embedded in the binary: declared by the module that launches its kernels.
#[derive(Debug)]
pub struct CudaSource {
    /// Path under `kernels/src` (`ops/rms_norm.cu`); names the file in errors and its modules.
    pub file: &'static str,
    /// The source text.
    pub code: &'static str,
    /// The headers it includes besides `common.cuh` (which every source gets).
    pub headers: &'static [&'static CudaHeader],
    /// Every `extern "C"` kernel the Rust side may launch from it.
    pub kernels: &'static [&'static str],
}

/// A header of our own, embedded in the binary; a `.cu` file includes it by its file name
/// (`#include "w4a16.cuh"`).
#[derive(Debug)]
pub struct CudaHeader {
    /// Path under `kernels/src` (`cuda/common.cuh`).
    pub file: &'static str,
    /// The header text.
    pub code: &'static str,
}

impl CudaHeader {
    /// The name a source includes it by: the file name.
    pub(crate) fn include_name(&self) -> &'static str {
        self.file.rsplit('/').next().unwrap_or(self.file)
    }
}

/// The header every `.cu` file includes as `"common.cuh"`.
pub const COMMON_HEADER: CudaHeader = CudaHeader { file: "cuda/common.cuh", code: include_str!("common.cuh") };

/// Whether libnvrtc (`libnvrtc.so.13`) can be loaded. Checked once per process.
pub fn nvrtc_available() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only tries to dlopen the library names cudarc knows; no symbol is called.
    *PRESENT.get_or_init(|| unsafe { sys::is_culib_present() })
}

/// The folders NVRTC reads CUDA's headers from: `KernelSettings::cuda_include` when it names any
/// (`AWQ_CUDA_INCLUDE` in `awq`), and nothing else; otherwise the first of these holding
/// `cuda_fp16.h`:
/// - `DIR/../include` for each `DIR` of `$LD_LIBRARY_PATH` (the pip wheels' layout,
///   `nvidia/cu13/{lib,include}`, and a toolkit's `lib64` beside its `include`), in order, so the
///   headers match the libnvrtc that was loaded from there;
/// - `$CUDA_HOME/include`, `$CUDA_PATH/include`, `/usr/local/cuda/include`.
///
/// Empty when none is found; NVRTC then fails on `#include <cuda_fp16.h>`, and the error shows the
/// (empty) include path and names AWQ_CUDA_INCLUDE.
pub fn include_dirs() -> Vec<PathBuf> {
    let configured = &settings().cuda_include;
    if !configured.is_empty() {
        return configured.clone();
    }
    let mut candidates = Vec::new();
    if let Some(list) = std::env::var_os("LD_LIBRARY_PATH") {
        candidates.extend(std::env::split_paths(&list).filter(|p| !p.as_os_str().is_empty()).map(|p| p.join("../include")));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = std::env::var_os(var) {
            candidates.push(PathBuf::from(root).join("include"));
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    candidates
        .into_iter()
        .find(|dir| dir.join("cuda_fp16.h").is_file())
        .map(|dir| dir.canonicalize().unwrap_or(dir))
        .into_iter()
        .collect()
}

/// Destroys an NVRTC program when dropped.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the handle came from a successful nvrtcCreateProgram and is destroyed once. A
        // failure to free compiler memory is not worth a panic.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

fn c_chars_to_string(chars: &[c_char]) -> String {
    let bytes: Vec<u8> = chars.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compiles one `.cu` source (named `file` in messages) with `headers` (and `common.cuh`) for
/// `arch` (`sm_90`), returning the CUBIN.
///
/// Errors: [`Error::CudaLibraryNotFound`] when libnvrtc cannot be loaded; [`Error::NvrtcCompile`]
/// with NVRTC's log (which names `file` and the line) when the source does not compile.
pub fn compile(file: &str, text: &str, headers: &[&CudaHeader], arch: &str) -> Result<Vec<u8>> {
    if !nvrtc_available() {
        return Err(Error::CudaLibraryNotFound { what: "NVRTC", library: "libnvrtc.so.13" });
    }
    let include_dirs: Vec<String> = include_dirs().iter().map(|d| d.display().to_string()).collect();
    let fail = |status: String, log: String| Error::NvrtcCompile {
        file: file.to_string(),
        arch: arch.to_string(),
        status,
        include_dirs: include_dirs.clone(),
        log,
    };
    let to_c = |s: &str| CString::new(s).map_err(|_| fail("a NUL byte in the source or its name".into(), String::new()));
    let (src, name) = (to_c(text)?, to_c(file)?);
    let all_headers: Vec<&CudaHeader> = [&COMMON_HEADER].into_iter().chain(headers.iter().copied()).collect();
    let header_texts = all_headers.iter().map(|h| to_c(h.code)).collect::<Result<Vec<_>>>()?;
    let header_names = all_headers.iter().map(|h| to_c(h.include_name())).collect::<Result<Vec<_>>>()?;
    let header_ptrs: Vec<*const c_char> = header_texts.iter().map(|h| h.as_ptr()).collect();
    let header_name_ptrs: Vec<*const c_char> = header_names.iter().map(|h| h.as_ptr()).collect();
    let n_headers = header_ptrs.len() as i32;

    let mut raw = std::ptr::null_mut();
    // SAFETY: every pointer is a live NUL-terminated string (or an array of `n_headers` of them)
    // for the call.
    unsafe {
        sys::nvrtcCreateProgram(&mut raw, src.as_ptr(), name.as_ptr(), n_headers, header_ptrs.as_ptr(), header_name_ptrs.as_ptr())
    }
        .result()
        .map_err(|e| fail(format!("{e:?} in nvrtcCreateProgram"), String::new()))?;
    let program = Program(raw);

    let mut options = vec![format!("--gpu-architecture={arch}"), "--std=c++17".to_string()];
    options.extend(include_dirs.iter().map(|d| format!("--include-path={d}")));
    // ptxas's report (registers, shared memory, stack frame, spills) per kernel, to stderr.
    let verbose = settings().nvrtc_verbose;
    if verbose {
        options.push("--ptxas-options=-v".to_string());
    }
    options.extend(defines());
    // SAFETY: the program is live; the options are converted to C strings by cudarc.
    if let Err(e) = unsafe { result::compile_program(program.0, &options) } {
        // SAFETY: the program is live; the log exists after a compile attempt.
        let log = match unsafe { result::get_program_log(program.0) } {
            Ok(chars) => c_chars_to_string(&chars),
            Err(log_err) => format!("(no log: {log_err:?})"),
        };
        return Err(fail(format!("{e:?}"), log));
    }

    if verbose {
        // SAFETY: the program is live and compiled.
        if let Ok(chars) = unsafe { result::get_program_log(program.0) } {
            eprintln!("{file} ({arch}):\n{}", c_chars_to_string(&chars));
        }
    }
    let mut size = 0usize;
    // SAFETY: the program compiled; size and buffer come from NVRTC itself.
    unsafe { sys::nvrtcGetCUBINSize(program.0, &mut size) }
        .result()
        .map_err(|e| fail(format!("{e:?} in nvrtcGetCUBINSize"), String::new()))?;
    let mut cubin = vec![0u8; size];
    unsafe { sys::nvrtcGetCUBIN(program.0, cubin.as_mut_ptr().cast::<c_char>()) }
        .result()
        .map_err(|e| fail(format!("{e:?} in nvrtcGetCUBIN"), String::new()))?;
    if cubin.is_empty() {
        return Err(fail(format!("no machine code for {arch}; is it a real architecture (sm_XY)?"), String::new()));
    }
    Ok(cubin)
}

/// The `-D` options of `KernelSettings::nvrtc_defines` (`AWQ_NVRTC_DEFINES="-DNAME=VALUE ..."` in
/// `awq`): how a benchmark tries a kernel's compile-time variants and probes
/// (`ops/w4a16/w4a16.cuh`) without a rebuild. Only in a build with the `kernel-probes` feature;
/// empty in any other, whatever the settings hold (`configure` refuses them there too).
pub(crate) fn defines() -> Vec<String> {
    if cfg!(feature = "kernel-probes") {
        return settings().nvrtc_defines.iter().filter(|d| d.starts_with("-D")).cloned().collect();
    }
    Vec::new()
}

/// Whether a compiled CUBIN defines the kernel `name` (its symbol appears as a whole string).
pub fn cubin_defines(cubin: &[u8], name: &str) -> bool {
    let needle: Vec<u8> = name.bytes().chain([0]).collect();
    cubin
        .windows(needle.len())
        .enumerate()
        .any(|(i, w)| w == needle.as_slice() && i > 0 && matches!(cubin[i - 1], 0 | b'.'))
}

/// NVRTC's version, e.g. `(13, 0)`, when the library loads.
pub fn nvrtc_version() -> Option<(i32, i32)> {
    if !nvrtc_available() {
        return None;
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two plain out-parameters.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }.result().ok().map(|_| (major, minor))
}
