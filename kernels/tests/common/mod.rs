//! What the GPU test files share.

use std::sync::Once;

use awq_kernels::rng::SplitMix64;
use awq_kernels::{DType, Device, KernelCache, KernelSettings, Tensor};

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

#[allow(dead_code)] // not every test file uses every helper
pub fn randn(rng: &mut SplitMix64, shape: &[usize], std: f32, dtype: DType) -> Tensor {
    let n = shape.iter().product();
    // Non-zero: a value that rounds to 0 in the dtype is nudged away from it.
    let values = rng.normal_vec(n, std).into_iter().map(|v| if v.abs() < 1e-3 { 1e-3f32.copysign(v) } else { v }).collect();
    Tensor::from_f32_as(shape, values, dtype).unwrap()
}

#[allow(dead_code)] // not every test file uses every helper
pub fn down(t: &Tensor) -> Tensor {
    t.to_device(Device::Cpu).unwrap()
}

/// `||got - want|| / ||want||` in f64; NaN anywhere gives infinity.
#[allow(dead_code)] // not every test file uses every helper
pub fn rel(got: &Tensor, want: &Tensor) -> f64 {
    let (a, b) = (got.to_f32_vec().unwrap(), want.to_f32_vec().unwrap());
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(&b) {
        if x.is_nan() || y.is_nan() {
            return f64::INFINITY;
        }
        num += (*x as f64 - *y as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    assert!(den > 0.0, "reference must not be all zero");
    (num / den).sqrt()
}
