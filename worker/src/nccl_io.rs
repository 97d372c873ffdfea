//! NCCL between GPU stages: the [`StageIo`] of an assignment whose transport is NCCL.
//!
//! The coordinator makes a chain of GPU stages one NCCL group (`Assignment.nccl_*`): its stages
//! are the ranks 0..n of one communicator, in chain order. Rank k receives its input from rank
//! k-1 and sends its output to rank k+1; every rank does at least one of the two, so every rank
//! joins the communicator, which is what NCCL needs before anyone can transfer.
//!
//! How the id travels: rank 0 creates the NCCL unique id when its stage starts, starts joining
//! (without waiting: NCCL goes on in the background while the stage computes its forward) and
//! publishes the id through the coordinator (`PublishNcclId`), which relays it to the workers of
//! the other ranks (`WorkerCommand.nccl_id`). There the id waits in [`NcclIds`] until the rank's
//! stage asks for it, at its first transfer (receiving its input, at the start of the stage); the
//! id may arrive before the assignment itself. The first transfer of each rank waits until every
//! rank has joined.
//!
//! On the wire: a header `[HEADER_TAG, rows, cols]` (u64), then the activations as f32, whatever
//! the stage computes in (f16 values are exact in f32; the receiving stage converts back, and
//! checks the shape against its calibration set). A rank closes its communicator after its last
//! transfer, before its search: NCCL's buffers are freed while the search runs.
//!
//! Nothing waits forever: every wait (the id, joining, a transfer) gives up when the stage is
//! cancelled or the coordinator says the group was lost (`WorkerCommand.nccl_group_lost`: a member
//! left or failed); the stage then fails and its blocks are planned again. A stage whose transfers
//! are done is not affected. Results are uploaded over gRPC, by the wrapped [`StageIo`].
//!
//! Without the `cuda` feature, an NCCL assignment fails its stage with an error that says so.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex};

use awq_kernels::Device;
use awq_proto::v1 as pb;

use crate::stage::StageIo;
use crate::{Error, Result};

/// Publishes rank 0's id through the coordinator.
pub(crate) type Publish = Box<dyn FnOnce(&[u8]) -> Result<()> + Send>;

// Without the `cuda` feature no stage reads the ids: the registry is only filled and emptied.

/// What the coordinator said about a group this worker holds a rank of.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
enum Slot {
    /// Its id, until the rank's stage takes it.
    Id(Vec<u8>),
    /// It was lost, and why.
    Lost(String),
}

/// Why waiting for an id ended without one.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Debug, PartialEq)]
pub(crate) enum NoId {
    Cancelled,
    Lost(String),
}

/// NCCL ids and lost-group notices from the coordinator, by group (group names are unique across
/// jobs), until the stages of those groups are done with them.
#[derive(Default)]
pub(crate) struct NcclIds {
    /// group -> (job, what is known).
    slots: Mutex<HashMap<String, (String, Slot)>>,
    changed: Condvar,
}

impl NcclIds {
    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Slot)>> {
        self.slots.lock().expect("the NCCL id lock is never held across a panic")
    }

    /// Keeps the id of `group` for its stage (a group already lost stays lost).
    pub fn put_id(&self, job_id: &str, group: &str, id: Vec<u8>) {
        let mut slots = self.slots();
        if !matches!(slots.get(group), Some((_, Slot::Lost(_)))) {
            slots.insert(group.to_string(), (job_id.to_string(), Slot::Id(id)));
        }
        self.changed.notify_all();
    }

    /// Marks `group` lost: waits for its id, and its communicator's calls, give up.
    pub fn lose(&self, job_id: &str, group: &str, reason: String) {
        self.slots().insert(group.to_string(), (job_id.to_string(), Slot::Lost(reason)));
        self.changed.notify_all();
    }

    /// Why `group` was lost, if it was.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn lost(&self, group: &str) -> Option<String> {
        match self.slots().get(group) {
            Some((_, Slot::Lost(reason))) => Some(reason.clone()),
            _ => None,
        }
    }

    /// Waits for the id of `group` and takes it; gives up when `cancel` is set or the group is
    /// lost.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn take_id(&self, group: &str, cancel: &AtomicBool) -> std::result::Result<Vec<u8>, NoId> {
        let mut slots = self.slots();
        loop {
            match slots.get(group) {
                Some((_, Slot::Lost(reason))) => return Err(NoId::Lost(reason.clone())),
                Some((_, Slot::Id(_))) => match slots.remove(group) {
                    Some((_, Slot::Id(id))) => return Ok(id),
                    _ => unreachable!("matched an id just above, under the same lock"),
                },
                None => {}
            }
            if cancel.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(NoId::Cancelled);
            }
            slots = self
                .changed
                .wait_timeout(slots, std::time::Duration::from_millis(100))
                .expect("the NCCL id lock is never held across a panic")
                .0;
        }
    }

    /// Forgets `group` (its stage is done with NCCL).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn forget(&self, group: &str) {
        self.slots().remove(group);
    }

    /// Forgets every group of `job_id` (cancelled).
    pub fn drop_job(&self, job_id: &str) {
        self.slots().retain(|_, (job, _)| job != job_id);
    }
}

/// The [`StageIo`] of an NCCL assignment `a` on a worker computing on `device`, around `inner`
/// (gRPC: uploads, cancellation). Rank 0 creates, starts joining and publishes the group's id here.
/// Errors: a malformed assignment, and for rank 0 whatever creating, joining or publishing
/// reports; without the `cuda` feature, always (the stage fails and is planned again).
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub(crate) fn nccl_stage_io<I: StageIo + Send + 'static>(
    inner: I,
    a: &pb::Assignment,
    device: Device,
    ids: Arc<NcclIds>,
    cancel: Arc<AtomicBool>,
    publish: Publish,
) -> Result<Box<dyn StageIo + Send>> {
    let group = a.nccl_group.clone();
    let bad = |reason: String| Error::NcclGroup { group: group.clone(), reason };
    if group.is_empty() || a.nccl_ranks < 2 || a.nccl_rank >= a.nccl_ranks {
        return Err(bad(format!("malformed NCCL assignment: rank {} of {}", a.nccl_rank, a.nccl_ranks)));
    }
    #[cfg(feature = "cuda")]
    {
        let io = gpu::NcclStageIo::new(inner, a, device, ids, cancel, publish)?;
        Ok(Box::new(io))
    }
    #[cfg(not(feature = "cuda"))]
    Err(bad("this worker was built without the `cuda` feature, which NCCL needs".into()))
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    use awq_kernels::cuda::{AbortSignal, NcclComm, NcclId};
    use awq_kernels::{ops, DType, Device, Tensor};
    use awq_proto::v1 as pb;
    use tracing::info;

    use super::{NcclIds, NoId, Publish};
    use crate::stage::{StageIo, StageResult};
    use crate::{Error, Result};

    /// First word of the header before the activations ("awq-act1"): a peer that sends anything
    /// else is not a stage of this protocol.
    const HEADER_TAG: u64 = u64::from_be_bytes(*b"awq-act1");

    pub(super) struct NcclStageIo<I> {
        inner: I,
        job_id: String,
        group: String,
        rank: usize,
        n_ranks: usize,
        device: Device,
        ids: Arc<NcclIds>,
        cancel: Arc<AtomicBool>,
        /// Joined (or joining) once the id is known; `None` again after the last transfer.
        comm: Option<NcclComm>,
        /// Transfers still to do: the communicator closes after the last one.
        to_receive: bool,
        to_send: bool,
    }

    impl<I: StageIo> NcclStageIo<I> {
        pub(super) fn new(
            inner: I,
            a: &pb::Assignment,
            device: Device,
            ids: Arc<NcclIds>,
            cancel: Arc<AtomicBool>,
            publish: Publish,
        ) -> Result<NcclStageIo<I>> {
            let (rank, n_ranks) = (a.nccl_rank as usize, a.nccl_ranks as usize);
            let mut io = NcclStageIo {
                inner,
                job_id: a.job_id.clone(),
                group: a.nccl_group.clone(),
                rank,
                n_ranks,
                device,
                ids,
                cancel,
                comm: None,
                to_receive: rank > 0,
                to_send: rank + 1 < n_ranks,
            };
            if rank == 0 {
                // Join now and publish: the others join as soon as the id reaches them, while this
                // stage computes its forward; its send then finds the communicator ready.
                let id = NcclId::new().map_err(|e| io.kernel_error(e))?;
                io.comm = Some(NcclComm::start(device, &id, 0, n_ranks, io.abort_signal()).map_err(|e| io.kernel_error(e))?);
                publish(&id.to_bytes())?;
                info!(group = %io.group, "NCCL rank 0 of {n_ranks}: id published");
            }
            Ok(io)
        }

        /// Stops a waiting NCCL call when the stage is cancelled or the group was lost.
        fn abort_signal(&self) -> AbortSignal {
            let (cancel, ids, group) = (self.cancel.clone(), self.ids.clone(), self.group.clone());
            Box::new(move || cancel.load(Ordering::Relaxed) || ids.lost(&group).is_some())
        }

        /// A kernel error of this group; an abort says why it happened (cancelled, group lost).
        fn kernel_error(&self, e: awq_kernels::Error) -> Error {
            if matches!(e, awq_kernels::Error::NcclAborted { .. }) {
                if self.cancel.load(Ordering::Relaxed) {
                    return Error::Cancelled(self.job_id.clone());
                }
                if let Some(reason) = self.ids.lost(&self.group) {
                    return Error::NcclGroup { group: self.group.clone(), reason };
                }
            }
            Error::Nccl { group: self.group.clone(), source: Box::new(e) }
        }

        fn group_error(&self, reason: String) -> Error {
            Error::NcclGroup { group: self.group.clone(), reason }
        }

        /// The communicator, joining it first when this rank has not yet: waits for the id the
        /// coordinator relays from rank 0.
        fn comm(&mut self) -> Result<&NcclComm> {
            if self.comm.is_none() {
                let bytes = self.ids.take_id(&self.group, &self.cancel).map_err(|why| match why {
                    NoId::Cancelled => Error::Cancelled(self.job_id.clone()),
                    NoId::Lost(reason) => self.group_error(reason),
                })?;
                let id = NcclId::from_bytes(&bytes).map_err(|e| self.kernel_error(e))?;
                let comm = NcclComm::start(self.device, &id, self.rank, self.n_ranks, self.abort_signal())
                    .map_err(|e| self.kernel_error(e))?;
                self.comm = Some(comm);
            }
            Ok(self.comm.as_ref().expect("joined just above"))
        }

        /// Closes the communicator once this rank has done its transfers.
        fn close_when_done(&mut self) -> Result<()> {
            if self.to_receive || self.to_send {
                return Ok(());
            }
            if let Some(comm) = self.comm.take() {
                comm.close().map_err(|e| self.kernel_error(e))?;
            }
            self.ids.forget(&self.group);
            Ok(())
        }
    }

    impl<I: StageIo> StageIo for NcclStageIo<I> {
        fn receive_input(&mut self) -> Result<Tensor> {
            if !self.to_receive {
                return Err(self.group_error(format!("rank {} has no input to receive", self.rank)));
            }
            let start = Instant::now();
            let peer = self.rank - 1;
            let header = self.comm()?.recv_u64s(3, peer).map_err(|e| self.kernel_error(e))?;
            let (rows, cols) = match header[..] {
                [HEADER_TAG, rows, cols] => (usize::try_from(rows), usize::try_from(cols)),
                _ => return Err(self.group_error(format!("rank {peer} sent {header:?}, not an activation header"))),
            };
            let (Ok(rows), Ok(cols)) = (rows, cols) else {
                return Err(self.group_error(format!("rank {peer} sent a shape this machine cannot index: {header:?}")));
            };
            let x = self.comm()?.recv(&[rows, cols], DType::F32, peer).map_err(|e| self.kernel_error(e))?;
            self.to_receive = false;
            info!(group = %self.group, "NCCL rank {}: received {rows} x {cols} f32 from rank {peer} in {:.3} s", self.rank, start.elapsed().as_secs_f64());
            self.close_when_done()?;
            Ok(x)
        }

        fn send_output(&mut self, x: &Tensor, _seq_len: usize) -> Result<()> {
            if !self.to_send {
                return Err(self.group_error(format!("rank {} is the last of {}: nobody receives its output", self.rank, self.n_ranks)));
            }
            let start = Instant::now();
            let (rows, cols) = x.dims2("send_output")?;
            // f32 on the wire whatever the stage computes in (the receiver reads f32).
            let x = if x.dtype() == DType::F32 { x.clone() } else { ops::cast(x, DType::F32)? };
            let peer = self.rank + 1;
            let comm = self.comm()?;
            let sent = comm.send_u64s(&[HEADER_TAG, rows as u64, cols as u64], peer).and_then(|()| comm.send(&x, peer));
            sent.map_err(|e| self.kernel_error(e))?;
            self.to_send = false;
            info!(group = %self.group, "NCCL rank {}: sent {rows} x {cols} f32 to rank {peer} in {:.3} s", self.rank, start.elapsed().as_secs_f64());
            self.close_when_done()
        }

        fn upload(&mut self, result: StageResult) -> Result<()> {
            self.inner.upload(result)
        }

        fn flush(&mut self) -> Result<()> {
            self.inner.flush()
        }

        fn cancelled(&self) -> bool {
            self.inner.cancelled()
        }
    }

    impl<I> Drop for NcclStageIo<I> {
        fn drop(&mut self) {
            // A communicator still open (the stage failed or was cancelled) aborts as it drops.
            self.comm = None;
            self.ids.forget(&self.group);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::thread;
    use std::time::Duration;

    use super::*;

    #[test]
    fn an_id_that_came_before_its_stage_waits_for_it() {
        let ids = NcclIds::default();
        let cancel = AtomicBool::new(false);
        ids.put_id("j1", "j1/0/0", vec![1, 2, 3]);
        assert_eq!(ids.take_id("j1/0/0", &cancel), Ok(vec![1, 2, 3]));
        // Taken: a second stage of the group would wait again.
        cancel.store(true, Ordering::Relaxed);
        assert_eq!(ids.take_id("j1/0/0", &cancel), Err(NoId::Cancelled));
    }

    #[test]
    fn a_stage_waiting_for_its_id_gets_it_or_gives_up() {
        let ids = Arc::new(NcclIds::default());
        let cancel = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (ids, cancel) = (ids.clone(), cancel.clone());
            thread::spawn(move || ids.take_id("j1/0/0", &cancel))
        };
        thread::sleep(Duration::from_millis(50));
        ids.put_id("j1", "j1/0/0", vec![9; 128]);
        assert_eq!(waiter.join().unwrap(), Ok(vec![9; 128]));

        // Lost while waiting: the reason comes back, and stays for the communicator's abort check.
        let waiter = {
            let (ids, cancel) = (ids.clone(), cancel.clone());
            thread::spawn(move || ids.take_id("j1/0/5", &cancel))
        };
        thread::sleep(Duration::from_millis(50));
        ids.lose("j1", "j1/0/5", "rank 1 was lost".into());
        assert_eq!(waiter.join().unwrap(), Err(NoId::Lost("rank 1 was lost".into())));
        assert_eq!(ids.lost("j1/0/5").as_deref(), Some("rank 1 was lost"));
        // An id that comes after the loss changes nothing.
        ids.put_id("j1", "j1/0/5", vec![1; 128]);
        assert_eq!(ids.take_id("j1/0/5", &cancel), Err(NoId::Lost("rank 1 was lost".into())));

        // Cancelled while waiting.
        let waiter = {
            let (ids, cancel) = (ids.clone(), cancel.clone());
            thread::spawn(move || ids.take_id("j2/0/0", &cancel))
        };
        thread::sleep(Duration::from_millis(50));
        cancel.store(true, Ordering::Relaxed);
        assert_eq!(waiter.join().unwrap(), Err(NoId::Cancelled));
    }

    #[test]
    fn a_cancelled_job_forgets_its_groups_only() {
        let ids = NcclIds::default();
        ids.put_id("j1", "j1/0/0", vec![1]);
        ids.lose("j1", "j1/1/2", "gone".into());
        ids.put_id("j2", "j2/0/0", vec![2]);
        ids.drop_job("j1");
        assert_eq!(ids.lost("j1/1/2"), None);
        let cancel = AtomicBool::new(true);
        assert_eq!(ids.take_id("j1/0/0", &cancel), Err(NoId::Cancelled));
        assert_eq!(ids.take_id("j2/0/0", &cancel), Ok(vec![2]));
    }

    /// A stage IO that is never used: the assignment is refused before it would be.
    struct Unused;

    impl StageIo for Unused {
        fn receive_input(&mut self) -> Result<awq_kernels::Tensor> {
            unreachable!("refused before any transfer")
        }
        fn send_output(&mut self, _: &awq_kernels::Tensor, _: usize) -> Result<()> {
            unreachable!("refused before any transfer")
        }
        fn upload(&mut self, _: crate::stage::StageResult) -> Result<()> {
            unreachable!("refused before any upload")
        }
        fn cancelled(&self) -> bool {
            false
        }
    }

    fn refused(a: &pb::Assignment) -> String {
        let publish: Publish = Box::new(|_| unreachable!("nothing is published for a refused assignment"));
        let ids = Arc::new(NcclIds::default());
        match nccl_stage_io(Unused, a, Device::Cuda(0), ids, Arc::new(AtomicBool::new(false)), publish) {
            Ok(_) => panic!("{a:?} was accepted"),
            Err(e) => {
                assert!(matches!(e, Error::NcclGroup { .. }), "{e}");
                e.to_string()
            }
        }
    }

    #[test]
    fn malformed_nccl_assignments_are_refused() {
        let a = |rank, ranks| pb::Assignment {
            job_id: "j1".into(),
            transport: pb::ActivationTransport::Nccl as i32,
            nccl_group: "j1/0/0".into(),
            nccl_rank: rank,
            nccl_ranks: ranks,
            ..Default::default()
        };
        assert!(refused(&a(2, 2)).contains("NCCL group j1/0/0: malformed NCCL assignment: rank 2 of 2"));
        assert!(refused(&a(0, 1)).contains("rank 0 of 1"));
        assert!(refused(&pb::Assignment { nccl_group: String::new(), ..a(0, 2) }).contains("malformed"));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_the_cuda_feature_an_nccl_assignment_fails_its_stage() {
        let a = pb::Assignment {
            job_id: "j1".into(),
            transport: pb::ActivationTransport::Nccl as i32,
            nccl_group: "j1/0/0".into(),
            nccl_rank: 1,
            nccl_ranks: 2,
            ..Default::default()
        };
        let message = refused(&a);
        assert!(message.contains("NCCL group j1/0/0") && message.contains("built without the `cuda` feature"), "{message}");
    }
}
