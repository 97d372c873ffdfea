//! The crate's settings: how kernels are compiled and launched, chosen once per process by the
//! binary.
//!
//! [`KernelSettings`] is a plain value; the binary fills it (`awq` from its global flags, each with
//! an environment variable: `--kernel-cache` / `AWQ_KERNEL_CACHE`, `--cuda-include` /
//! `AWQ_CUDA_INCLUDE`, ...) and installs it with [`configure`] before the first kernel compiles. A
//! process that never calls `configure` (tests, library users) gets [`KernelSettings::default`]:
//! the per-user kernel cache, CUDA's headers searched for, no extra output, overlapping launches.
//!
//! The crate reads no environment variable of its own: the settings come from here. What it still
//! reads from the environment are the conventional places behind two defaults, documented where
//! they are used: the user's cache folder (`XDG_CACHE_HOME`, `HOME`: [`KernelCache::dir`]) and
//! where CUDA's headers are installed (`LD_LIBRARY_PATH`, `CUDA_HOME`, `CUDA_PATH`:
//! `cuda::include_dirs`).

use std::path::PathBuf;
use std::sync::OnceLock;

use crate::{Error, Result};

/// Where compiled kernels (CUBINs) are kept between processes (`cuda::kernel_cache`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum KernelCache {
    /// The user's cache folder: `$XDG_CACHE_HOME/awq/kernels`, else `$HOME/.cache/awq/kernels`
    /// (none when neither variable is set: then there is no cache).
    #[default]
    Default,
    /// This folder (created when missing).
    Dir(PathBuf),
    /// No cache: every process compiles what it uses.
    Off,
}

impl KernelCache {
    /// The folder this means, if any.
    pub fn dir(&self) -> Option<PathBuf> {
        match self {
            KernelCache::Default => std::env::var_os("XDG_CACHE_HOME")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".cache")))
                .map(|base| base.join("awq").join("kernels")),
            KernelCache::Dir(dir) => Some(dir.clone()),
            KernelCache::Off => None,
        }
    }
}

/// How this process compiles and launches kernels. See the module docs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelSettings {
    /// Where compiled kernels are kept (`AWQ_KERNEL_CACHE` in `awq`).
    pub kernel_cache: KernelCache,
    /// The folders NVRTC reads CUDA's headers (`cuda_fp16.h`) from, and only those; empty: searched
    /// for (`cuda::include_dirs`). `AWQ_CUDA_INCLUDE` in `awq`.
    pub cuda_include: Vec<PathBuf>,
    /// Print ptxas's report (registers, shared memory, stack frame, spills) for every kernel
    /// compiled, to stderr: the first thing to read when a kernel is slower than its count says.
    /// Bypasses the kernel cache (the point is the report). `AWQ_NVRTC_VERBOSE=1` in `awq`.
    pub nvrtc_verbose: bool,
    /// Preprocessor definitions for NVRTC (`-DNAME=VALUE`): a kernel's compile-time variants and
    /// the W4A16 benchmark probes (`ops/w4a16/w4a16.cuh`), some of which give wrong results by
    /// design. Only a build with the `kernel-probes` feature takes any: [`configure`] refuses them
    /// elsewhere. `AWQ_NVRTC_DEFINES` in `awq`.
    pub nvrtc_defines: Vec<String>,
    /// Launch the W4A16 split-K kernels without overlapping the kernel before them (programmatic
    /// dependent launch off): a benchmark comparison (BENCHMARKS.md); results are the same.
    /// `AWQ_W4A16_SERIAL_LAUNCH=1` in `awq`.
    pub w4a16_serial_launch: bool,
}

static SETTINGS: OnceLock<KernelSettings> = OnceLock::new();

/// Installs this process's settings. Call it once, at the start, before any kernel compiles.
///
/// Errors: [`Error::NvrtcDefinesNeedProbes`] for `nvrtc_defines` in a build without the
/// `kernel-probes` feature; [`Error::SettingsAlreadySet`] when settings were installed already, or
/// were already in use (then with their defaults).
pub fn configure(settings: KernelSettings) -> Result<()> {
    if !settings.nvrtc_defines.is_empty() && !cfg!(feature = "kernel-probes") {
        return Err(Error::NvrtcDefinesNeedProbes { defines: settings.nvrtc_defines });
    }
    SETTINGS.set(settings).map_err(|_| Error::SettingsAlreadySet)
}

/// The settings in force: those [`configure`] installed, else the defaults (fixed from then on).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn settings() -> &'static KernelSettings {
    SETTINGS.get_or_init(KernelSettings::default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_folders() {
        assert_eq!(KernelCache::Off.dir(), None);
        assert_eq!(KernelCache::Dir("/tmp/k".into()).dir(), Some(PathBuf::from("/tmp/k")));
    }

    #[cfg(not(feature = "kernel-probes"))]
    #[test]
    fn defines_are_refused_without_kernel_probes() {
        let settings = KernelSettings { nvrtc_defines: vec!["-DW4A16_GEMV_SKIP_MATH".into()], ..KernelSettings::default() };
        let err = configure(settings).unwrap_err();
        assert!(matches!(&err, Error::NvrtcDefinesNeedProbes { defines } if defines == &["-DW4A16_GEMV_SKIP_MATH"]), "{err}");
        assert!(err.to_string().contains("kernel-probes"), "{err}");
    }
}
