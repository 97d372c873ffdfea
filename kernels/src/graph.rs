//! [`Graph`]: device work recorded once and replayed with one call (a CUDA graph on a CUDA device).
//!
//! The serving engine records a decode step's kernels for each batch size it meets and replays them
//! at every later step of that size, rewriting only the step's inputs (token ids, positions, block
//! tables) in buffers the recording read. What may be recorded, and what not, is in
//! `cuda::graph`'s docs. The CPU has nothing to record: [`Graph::record`] refuses it, and callers
//! run their work directly there.

use crate::{Device, Error, Result};

/// Recorded device work (see the module docs).
pub struct Graph {
    #[cfg(feature = "cuda")]
    inner: crate::cuda::graph::DeviceGraph,
    /// Without CUDA no graph is ever made.
    #[cfg(not(feature = "cuda"))]
    never: std::convert::Infallible,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Graph")
    }
}

impl Graph {
    /// Records the device work `record` issues on `device` without running it, and returns it
    /// with `record`'s value (the tensors it produced: their buffers are the graph's, rewritten at
    /// each [`Graph::launch`]). Errors: `record`'s; what the driver refuses in the recording (see
    /// the module docs); [`Error::Shape`] for the CPU or a recording that issued nothing.
    pub fn record<T, E: From<Error>>(
        device: Device,
        record: impl FnOnce() -> std::result::Result<T, E>,
    ) -> std::result::Result<(Graph, T), E> {
        match device {
            Device::Cpu => {
                let _ = record;
                Err(Error::Shape {
                    op: "graph",
                    detail: "the CPU runs its work directly; there is nothing to record".into(),
                }
                .into())
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(ordinal) => {
                let dev = crate::cuda::CudaDevice::get(ordinal)?;
                let (inner, value) = crate::cuda::graph::DeviceGraph::record(&dev, record)?;
                Ok((Graph { inner }, value))
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(ordinal) => {
                let _ = record;
                Err(Error::CudaUnavailable { ordinal, reason: crate::device::NO_CUDA_FEATURE }.into())
            }
        }
    }

    /// Queues one replay of the recorded work on its device (it has run when a later download or
    /// synchronization of that device returns).
    pub fn launch(&mut self) -> Result<()> {
        #[cfg(feature = "cuda")]
        return self.inner.launch();
        #[cfg(not(feature = "cuda"))]
        match self.never {}
    }
}
