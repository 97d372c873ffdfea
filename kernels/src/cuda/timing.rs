//! Timing on the device, for benchmarks (`awq bench kernels`): CUDA events on the device's stream,
//! a spin kernel that holds the stream while the host queues the work to be timed, and the
//! device-to-device copy bandwidth that kernels are compared with.
//!
//! How a measurement goes ([`GpuTimer::time_calls`]): a spin kernel holds the stream while the
//! host queues every call to time between two events; the elapsed time is the GPU's, running the
//! calls back to back, without the host's per-launch overhead (as in a serving loop that replays
//! CUDA graphs).

use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, LaunchConfig, PushKernelArg};

use super::{CudaDevice, CudaSource};
use crate::{Device, Error, Result};

pub(crate) const CUDA_SOURCE: CudaSource =
    CudaSource { file: "cuda/timing.cu", code: include_str!("timing.cu"), headers: &[], kernels: &["spin_ns"] };

/// A pair of timing events on one device's stream.
pub struct GpuTimer {
    dev: Arc<CudaDevice>,
    start: CudaEvent,
    end: CudaEvent,
}

impl GpuTimer {
    pub fn new(device: Device) -> Result<GpuTimer> {
        let Device::Cuda(ordinal) = device else {
            return Err(Error::Shape { op: "GpuTimer", detail: format!("needs a CUDA device, got {device}") });
        };
        let dev = CudaDevice::get(ordinal)?;
        let ctx = dev.stream().context().clone();
        let event = || ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(dev.driver_error("cuEventCreate"));
        let (start, end) = (event()?, event()?);
        Ok(GpuTimer { dev, start, end })
    }

    /// Median milliseconds per call of `call(0..calls)` over `reps` measurements. The calls run
    /// once first (warm-up: module loads, cuBLAS handles, pool growth); then each measurement holds
    /// the stream with a spin kernel, records the start event, queues all the calls and records the
    /// end event, so the GPU runs them back to back and the host's launch overhead is not timed.
    /// (A CUDA graph, [`crate::Graph`], would also hide the launch overhead, but what is timed here
    /// is a kernel's own time, not what it costs inside a graph.)
    pub fn time_calls(&self, reps: usize, calls: usize, mut call: impl FnMut(usize) -> Result<()>) -> Result<f64> {
        for i in 0..calls {
            call(i)?;
        }
        let mut per_call = Vec::with_capacity(reps);
        for _ in 0..reps.max(1) {
            // Long enough for the host to queue every call (tens of microseconds each at most).
            self.hold(500 + 50 * calls as u64)?;
            self.start()?;
            for i in 0..calls {
                call(i)?;
            }
            per_call.push(self.stop()? / calls as f64);
        }
        Ok(median(&mut per_call))
    }

    /// Keeps the stream busy for `micros` microseconds (queue the timed work behind it).
    pub fn hold(&self, micros: u64) -> Result<()> {
        let ns = micros * 1000;
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 };
        let kernel = self.dev.kernel(&CUDA_SOURCE, "spin_ns")?;
        let mut args = kernel.args();
        args.arg(&ns);
        // SAFETY: spin_ns(u64 ns) takes one value and touches no memory.
        unsafe { kernel.launch(args, cfg) }
    }

    /// Records the start event on the stream.
    pub fn start(&self) -> Result<()> {
        self.start.record(self.dev.stream()).map_err(self.dev.driver_error("cuEventRecord"))
    }

    /// Records the end event, waits for it and returns the milliseconds since the start event.
    pub fn stop(&self) -> Result<f64> {
        self.end.record(self.dev.stream()).map_err(self.dev.driver_error("cuEventRecord"))?;
        let ms = self.start.elapsed_ms(&self.end).map_err(self.dev.driver_error("cuEventElapsedTime"))?;
        Ok(ms as f64)
    }

    /// The device-to-device copy bandwidth in GB/s (bytes read plus bytes written, per second), the
    /// median of `runs` copies of `bytes` bytes: the memory roofline kernels are held to.
    pub fn copy_bandwidth(&self, bytes: usize, runs: usize) -> Result<f64> {
        let words = bytes / 4;
        let src = self.dev.alloc::<u32>(words)?;
        let mut dst = self.dev.alloc::<u32>(words)?;
        let stream = self.dev.stream();
        stream.memset_zeros(&mut dst).map_err(self.dev.driver_error("cuMemsetD8"))?;
        let mut times = Vec::with_capacity(runs);
        for _ in 0..runs.max(1) + 1 {
            self.start()?;
            stream.memcpy_dtod(&src, &mut dst).map_err(self.dev.driver_error("cuMemcpyDtoD"))?;
            times.push(self.stop()?);
        }
        times.remove(0); // the first copy warms up
        Ok(2.0 * (words * 4) as f64 / (median(&mut times) * 1e-3) / 1e9)
    }
}

/// The median of `values` (sorted in place); NaN for none.
fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
