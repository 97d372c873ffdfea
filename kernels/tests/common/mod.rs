//! What the GPU test files share.

use std::sync::Once;

use awq_kernels::{Device, KernelCache, KernelSettings};

/// `cuda:0` when the GPU tests are on (`AWQ_GPU_TESTS=1`), after checking it works; `None` (skip)
/// when they are off. With the variable set, a missing GPU or driver is a failure, not a skip.
/// Installs the kernel settings first ([`configure_from_env`]).
#[allow(dead_code)] // not every test file uses every helper
pub fn gpu() -> Option<Device> {
    configure_from_env();
    if std::env::var("AWQ_GPU_TESTS").map_or(true, |v| v.is_empty() || v == "0") {
        eprintln!("skipped: set AWQ_GPU_TESTS=1 on a machine with a GPU (gpu-bin/run-gpu-tests does)");
        return None;
    }
    let device = Device::Cuda(0);
    if let Err(e) = device.check_available() {
        panic!("AWQ_GPU_TESTS=1 but {device} is not usable: {e}");
    }
    Some(device)
}

/// The kernel settings `awq` would take from the same environment variables (`AWQ_CUDA_INCLUDE`,
/// which `kernels/tests/nvrtc-env` and gpu-bin/run-gpu-tests may set, `AWQ_KERNEL_CACHE`,
/// `AWQ_NVRTC_VERBOSE`), installed once per test binary; every test calls this before it compiles
/// a kernel.
#[allow(dead_code)] // not every test file uses every helper
pub fn configure_from_env() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let cuda_include = std::env::var_os("AWQ_CUDA_INCLUDE")
            .map(|list| std::env::split_paths(&list).filter(|p| !p.as_os_str().is_empty()).collect())
            .unwrap_or_default();
        let kernel_cache = match std::env::var_os("AWQ_KERNEL_CACHE") {
            None => KernelCache::Default,
            Some(v) if v.is_empty() || v == "off" => KernelCache::Off,
            Some(v) => KernelCache::Dir(v.into()),
        };
        let nvrtc_verbose = std::env::var("AWQ_NVRTC_VERBOSE").is_ok_and(|v| v == "1");
        let settings = KernelSettings { cuda_include, kernel_cache, nvrtc_verbose, ..KernelSettings::default() };
        awq_kernels::configure(settings).expect("the kernel settings are installed before any kernel compiles");
    });
}
