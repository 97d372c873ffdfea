//! Hidden states between the GPU stages of a pipelined replica, over NCCL (DESIGN.md, "Serving").
//!
//! A stage whose next stage runs on another worker ([`crate::pipeline::RemoteStages`]) offers it a
//! link once that stage has loaded: it creates an NCCL id, starts joining a two-rank communicator
//! as rank 0 ([`LinkToNext::start`]) and calls `ReplicaService.StageLink` with the id; the next
//! stage joins as rank 1 ([`LinkFromPrevious::join`]) and answers once both have joined. From then
//! on a step's plan still travels over gRPC (`StageStep`, its first message saying
//! `hidden_over_nccl`), and its hidden states, `[tokens, hidden]` f32 on the sender's GPU, go
//! straight to the receiver's GPU: no copy through the host, no serialization, over whatever NCCL
//! finds between the two (NVLink, PCIe, InfiniBand, sockets). Logits come back over gRPC (small: the
//! last stage picks greedy tokens itself).
//!
//! A link is a faster road, never a requirement: where a side cannot (a CPU stage, a build without
//! CUDA, two stages on one GPU, which NCCL refuses) or joining fails, the stages keep gRPC and the
//! sender logs why. A transfer that fails breaks the link for good (each side drops its end): that
//! step fails like any step whose stage cannot be reached, and later steps go over gRPC.
//!
//! Nothing waits forever: joining gives up after [`JOIN_TIMEOUT`], a transfer after
//! [`TRANSFER_TIMEOUT`] or as soon as the step's gRPC call ended in an error (the receiver refused
//! the step, or is gone), through the communicator's abort signal ([`Watch`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[cfg(feature = "cuda")]
pub use with_cuda::{LinkFromPrevious, LinkToNext};
#[cfg(not(feature = "cuda"))]
pub use without_cuda::{LinkFromPrevious, LinkToNext};

/// How long the two ends of a link may take to join (NCCL's set-up between two processes: a
/// second or two on one node).
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one step's hidden states may take to cross (the first transfer also connects the
/// two GPUs).
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(60);

/// What a link's communicator is waiting for: a deadline, and whether the step it serves already
/// failed. Its abort signal reads both, each time NCCL's wait loop pauses.
#[derive(Default)]
pub struct Watch {
    failed: AtomicBool,
    deadline: Mutex<Option<Instant>>,
}

impl Watch {
    /// Starts a wait of at most `within`.
    pub fn arm(&self, within: Duration) {
        self.failed.store(false, Ordering::SeqCst);
        *self.deadline.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + within);
    }

    /// Stops the wait now (the step's call failed: the peer will not transfer).
    pub fn fail(&self) {
        self.failed.store(true, Ordering::SeqCst);
    }

    /// Whether the wait should give up.
    pub fn should_stop(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
            || self.deadline.lock().unwrap_or_else(|e| e.into_inner()).is_some_and(|d| Instant::now() >= d)
    }
}

#[cfg(feature = "cuda")]
mod with_cuda {
    use std::sync::Arc;

    use awq_kernels::cuda::{NcclComm, NcclId};
    use awq_kernels::{DType, Device, Tensor};

    use super::{Watch, JOIN_TIMEOUT, TRANSFER_TIMEOUT};

    /// The sending end of a link (rank 0), held by the stage before.
    pub struct LinkToNext {
        comm: NcclComm,
        watch: Arc<Watch>,
    }

    /// The receiving end of a link (rank 1), held by the stage after.
    pub struct LinkFromPrevious {
        comm: NcclComm,
        watch: Arc<Watch>,
    }

    /// A communicator of two on `device` as `rank`, joining in the background under `watch`.
    fn start(device: Device, id: &NcclId, rank: usize) -> Result<(NcclComm, Arc<Watch>), String> {
        let watch = Arc::new(Watch::default());
        watch.arm(JOIN_TIMEOUT);
        let signal = watch.clone();
        let comm = NcclComm::start(device, id, rank, 2, Box::new(move || signal.should_stop()))
            .map_err(|e| format!("joining an NCCL link on {device}: {e}"))?;
        Ok((comm, watch))
    }

    impl LinkToNext {
        /// Starts joining a new link on `device` (this stage's leader's GPU) as its sender; the
        /// bytes of its id are for the next stage's `StageLink`. Errors: a device that is not a
        /// GPU, no NCCL library, NCCL's own.
        pub fn start(device: Device) -> Result<(LinkToNext, Vec<u8>), String> {
            let id = NcclId::new().map_err(|e| format!("creating an NCCL id: {e}"))?;
            let (comm, watch) = start(device, &id, 0)?;
            Ok((LinkToNext { comm, watch }, id.to_bytes().to_vec()))
        }

        /// Waits until the next stage has joined too (it said so: this returns at once, or within
        /// [`JOIN_TIMEOUT`]).
        pub fn joined(self) -> Result<LinkToNext, String> {
            self.comm.wait_ready().map_err(|e| format!("joining the NCCL link: {e}"))?;
            Ok(self)
        }

        /// Starts a step: arms the watch for its transfer ([`TRANSFER_TIMEOUT`]) and returns it,
        /// for [`Watch::fail`] when the step's call fails. Before the call starts, so that a call
        /// that fails at once cannot be undone by the arming.
        pub fn begin_step(&self) -> Arc<Watch> {
            self.watch.arm(TRANSFER_TIMEOUT);
            self.watch.clone()
        }

        /// Sends a step's hidden states (on this link's GPU) to the next stage, which receives them
        /// with [`LinkFromPrevious::recv`], within the step [`LinkToNext::begin_step`] started.
        /// Errors (the link is then broken): the transfer failed, timed out or was stopped through
        /// the watch.
        pub fn send(&self, hidden: &Tensor) -> Result<(), String> {
            self.comm.send(hidden, 1).map_err(|e| format!("sending hidden states over NCCL: {e}"))
        }
    }

    impl LinkFromPrevious {
        /// Joins the link of `id` (the previous stage's `StageLink`) on `device` (this stage's
        /// leader's GPU) as its receiver, and waits until both ends have joined, within
        /// [`JOIN_TIMEOUT`]. Errors: a malformed id, a device that is not a GPU, no NCCL library,
        /// NCCL's own (among them two stages on one GPU).
        pub fn join(device: Device, id: &[u8]) -> Result<LinkFromPrevious, String> {
            let id = NcclId::from_bytes(id).map_err(|e| format!("nccl_id: {e}"))?;
            let (comm, watch) = start(device, &id, 1)?;
            comm.wait_ready().map_err(|e| format!("joining the NCCL link on {device}: {e}"))?;
            Ok(LinkFromPrevious { comm, watch })
        }

        /// Receives a step's hidden states, `rows` x `width` f32, from the previous stage onto this
        /// link's GPU. Errors (the link is then broken): the transfer failed or timed out.
        pub fn recv(&self, rows: usize, width: usize) -> Result<Tensor, String> {
            self.watch.arm(TRANSFER_TIMEOUT);
            self.comm
                .recv(&[rows, width], DType::F32, 0)
                .map_err(|e| format!("receiving hidden states over NCCL: {e}"))
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod without_cuda {
    use std::sync::Arc;

    use awq_kernels::{Device, Tensor};

    use super::Watch;

    const NO_CUDA: &str = "this awq was built without the cuda feature, so without NCCL";

    /// No link exists in a build without CUDA.
    pub enum LinkToNext {}

    /// No link exists in a build without CUDA.
    pub enum LinkFromPrevious {}

    impl LinkToNext {
        pub fn start(_device: Device) -> Result<(LinkToNext, Vec<u8>), String> {
            Err(NO_CUDA.into())
        }

        pub fn joined(self) -> Result<LinkToNext, String> {
            match self {}
        }

        pub fn begin_step(&self) -> Arc<Watch> {
            match *self {}
        }

        pub fn send(&self, _hidden: &Tensor) -> Result<(), String> {
            match *self {}
        }
    }

    impl LinkFromPrevious {
        pub fn join(_device: Device, _id: &[u8]) -> Result<LinkFromPrevious, String> {
            Err(NO_CUDA.into())
        }

        pub fn recv(&self, _rows: usize, _width: usize) -> Result<Tensor, String> {
            match *self {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_stops_at_its_deadline_or_when_its_step_failed_and_is_rearmed_by_the_next_wait() {
        let watch = Watch::default();
        assert!(!watch.should_stop(), "an unarmed watch waits");
        watch.arm(Duration::from_millis(30));
        assert!(!watch.should_stop());
        std::thread::sleep(Duration::from_millis(40));
        assert!(watch.should_stop(), "past its deadline");
        watch.arm(Duration::from_secs(60));
        assert!(!watch.should_stop(), "a new wait has a new deadline");
        watch.fail();
        assert!(watch.should_stop(), "the step's call failed");
        watch.arm(Duration::from_secs(60));
        assert!(!watch.should_stop(), "the next wait starts afresh");
    }

    #[test]
    #[cfg(not(feature = "cuda"))]
    fn without_cuda_no_link_is_made_and_the_reason_says_so() {
        let Err(why) = LinkToNext::start(awq_kernels::Device::Cuda(0));
        assert!(why.contains("cuda feature"), "{why}");
        let Err(why) = LinkFromPrevious::join(awq_kernels::Device::Cuda(0), &[0; 128]);
        assert!(why.contains("cuda feature"), "{why}");
    }
}
