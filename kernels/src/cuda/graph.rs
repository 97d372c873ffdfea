//! CUDA graphs: a sequence of launches, copies, allocations and frees recorded once from the device's
//! stream and replayed with one driver call (what [`crate::Graph`] is on a CUDA device).
//!
//! Why: a decode step of an 8B model is some 400 kernels of a few microseconds each; issuing them one
//! by one costs the host more than the GPU takes to run them. Replayed as a graph, they cost one
//! launch.
//!
//! What a recording may do: launch kernels and copy between device buffers on the device's stream,
//! allocate and free device memory (the graph's own memory: it gets the same addresses at every
//! replay), read and write buffers that outlive the graph. What it must not: wait for the device
//! (a download, a synchronization), copy from host memory (the host values of the recording would
//! be replayed, not the current ones), free a buffer allocated before the recording. The driver
//! refuses the first two; a caller keeps the inputs of a replay in buffers allocated before the
//! recording and rewrites them before each launch, and runs the recorded work once before the
//! recording so that whatever it allocates lazily (modules, cuBLAS' workspace, split-K counters)
//! exists already.

use std::sync::Arc;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::CudaGraph;

use super::CudaDevice;

/// A recorded graph, ready to replay on its device's stream.
pub(crate) struct DeviceGraph {
    dev: Arc<CudaDevice>,
    graph: CudaGraph,
}

// SAFETY: cudarc's graph holds raw driver handles, which are not tied to a thread; the driver only
// requires that one graph is not used from two threads at once, and `DeviceGraph` is used through
// `&mut`/owned access only (`launch` takes `&mut self`), so moving it to another thread is sound.
unsafe impl Send for DeviceGraph {}

impl DeviceGraph {
    /// Records what `record` issues to `dev`'s stream (see the module docs) and instantiates it.
    /// The work is not run. When `record` fails, or the driver refuses something it issued, the
    /// recording is ended and discarded and the error returned: the stream is usable again.
    pub(crate) fn record<T, E: From<crate::Error>>(
        dev: &Arc<CudaDevice>,
        record: impl FnOnce() -> std::result::Result<T, E>,
    ) -> std::result::Result<(DeviceGraph, T), E> {
        let stream = dev.stream();
        // Relaxed: the recording thread (or the rayon thread an op runs on) may still call driver
        // functions that are not stream work, such as loading a module.
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(dev.driver_error("cuStreamBeginCapture"))?;
        let recorded = record();
        // Ended whatever happened, so that the stream leaves capture mode.
        let ended = stream.end_capture(CUgraphInstantiate_flags(0)).map_err(dev.driver_error("cuStreamEndCapture"));
        let value = recorded?;
        let graph = ended?.ok_or_else(|| crate::Error::Shape {
            op: "graph",
            detail: "the recording issued no work to the device's stream".into(),
        })?;
        graph.upload().map_err(dev.driver_error("cuGraphUpload"))?;
        Ok((DeviceGraph { dev: dev.clone(), graph }, value))
    }

    /// Queues one replay on the device's stream.
    pub(crate) fn launch(&mut self) -> crate::Result<()> {
        self.graph.launch().map_err(self.dev.driver_error("cuGraphLaunch"))
    }
}
