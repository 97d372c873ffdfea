//! What the GPU test files share.

use awq_kernels::Device;

/// `cuda:0` when the GPU tests are on (`AWQ_GPU_TESTS=1`), after checking it works; `None` (skip)
/// when they are off. With the variable set, a missing GPU or driver is a failure, not a skip.
pub fn gpu() -> Option<Device> {
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
