//! The all-reduce of tensor-parallel ranks (Megatron-LM's): every rank gives its partial output
//! and gets the sum over all ranks back, the same bits on every rank, so the replicated residual
//! stream stays identical across ranks.
//!
//! One interface, two ways to meet:
//! - **NCCL** (the `cuda` feature; every rank on a GPU of its own): `ncclAllReduce` queued on each
//!   device's stream, with no host wait, so a CUDA graph records it with the kernels around it.
//!   NCCL picks its algorithm from the GPUs and the message size, so the sums are the same run to
//!   run on the same GPUs.
//! - **Host memory** (ranks of one process on the CPU, or sharing one GPU, which is how the GPU
//!   code path runs on a one-GPU machine): each rank leaves its part in a shared slot and every
//!   rank adds the parts in rank order, in f32. A GPU part round-trips through the host: correct,
//!   slow, and not recordable in a graph.
//!
//! The sum is f32 whatever the parts' dtype (f16 partial outputs added in f16 would round at every
//! rank), except for a single rank, whose part is returned as it is. Ranks must call
//! [`Collective::all_reduce_sum`] in the same order with the same shapes, each from its own
//! thread (a call waits for every rank).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

#[cfg(feature = "cuda")]
use crate::DType;
use crate::{Device, Error, Result, Tensor};

/// How the ranks of one tensor-parallel group meet; [`CollectiveGroup::join`] gives each rank its
/// [`Collective`].
pub struct CollectiveGroup {
    n_ranks: usize,
    way: GroupWay,
}

enum GroupWay {
    Alone,
    Host(Arc<HostMeeting>),
    #[cfg(feature = "cuda")]
    Nccl {
        id: crate::cuda::nccl::NcclId,
        devices: Vec<Device>,
    },
}

impl CollectiveGroup {
    /// A group of one rank per entry of `devices` (in rank order): NCCL when there are several and
    /// each is a GPU of its own, host memory otherwise. Errors: NCCL's unique id (no libnccl).
    pub fn new(devices: &[Device]) -> Result<CollectiveGroup> {
        let n_ranks = devices.len();
        let distinct_gpus = devices.iter().all(|d| *d != Device::Cpu)
            && devices.iter().enumerate().all(|(i, d)| !devices[..i].contains(d));
        let way = match n_ranks {
            0 | 1 => GroupWay::Alone,
            #[cfg(feature = "cuda")]
            _ if distinct_gpus => GroupWay::Nccl { id: crate::cuda::nccl::NcclId::new()?, devices: devices.to_vec() },
            _ => {
                let _ = distinct_gpus; // without the `cuda` feature no device is a GPU
                GroupWay::Host(Arc::new(HostMeeting::new(n_ranks)))
            }
        };
        Ok(CollectiveGroup { n_ranks: n_ranks.max(1), way })
    }

    pub fn n_ranks(&self) -> usize {
        self.n_ranks
    }

    /// Rank `rank`'s side of the group. For NCCL this waits until every rank has joined: call it
    /// from every rank's thread at once.
    pub fn join(&self, rank: usize) -> Result<Collective> {
        if rank >= self.n_ranks {
            return Err(Error::Shape {
                op: "CollectiveGroup::join",
                detail: format!("rank {rank} of {}", self.n_ranks),
            });
        }
        let link = match &self.way {
            GroupWay::Alone => Link::Alone,
            GroupWay::Host(meeting) => Link::Host(meeting.clone()),
            #[cfg(feature = "cuda")]
            GroupWay::Nccl { id, devices } => {
                Link::Nccl(crate::cuda::nccl::NcclComm::init(devices[rank], id, rank, self.n_ranks)?)
            }
        };
        Ok(Collective { rank, n_ranks: self.n_ranks, link })
    }

    /// Makes every host-memory call waiting now or later fail ([`Error::CollectiveAborted`]): a
    /// rank failed before reaching the meeting, which would otherwise wait for it forever. NCCL
    /// groups are not reached from here (their ranks fail together: one process, one set of GPUs).
    pub fn abort(&self) {
        if let GroupWay::Host(meeting) = &self.way {
            meeting.abort();
        }
    }
}

/// One rank's side of a [`CollectiveGroup`].
pub struct Collective {
    rank: usize,
    n_ranks: usize,
    link: Link,
}

enum Link {
    Alone,
    Host(Arc<HostMeeting>),
    #[cfg(feature = "cuda")]
    Nccl(crate::cuda::nccl::NcclComm),
}

impl Collective {
    /// The collective of a group of one.
    pub fn alone() -> Collective {
        Collective { rank: 0, n_ranks: 1, link: Link::Alone }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn n_ranks(&self) -> usize {
        self.n_ranks
    }

    /// Whether a CUDA graph can record [`Collective::all_reduce_sum`] (not a host-memory meeting).
    pub fn recordable(&self) -> bool {
        !matches!(self.link, Link::Host(_))
    }

    /// The sum over ranks of `part` (see the module docs: f32 on `part`'s device, or `part` itself
    /// for one rank). Errors: the device's, NCCL's, [`Error::CollectiveAborted`], and
    /// [`Error::Shape`] when the ranks' parts differ in length.
    pub fn all_reduce_sum(&self, part: Tensor) -> Result<Tensor> {
        match &self.link {
            Link::Alone => Ok(part),
            Link::Host(meeting) => {
                let device = part.device();
                let sum = meeting.sum(self.rank, part.to_f32_vec()?)?;
                Tensor::from_f32(part.shape(), sum)?.to_device(device)
            }
            #[cfg(feature = "cuda")]
            Link::Nccl(comm) => comm.all_reduce_sum(&part.into_dtype(DType::F32)),
        }
    }
}

/// Where the ranks of a host-memory group leave their parts and pick up the sum. One round at a
/// time: a rank that arrives for the next round while others still pick up the last one waits.
struct HostMeeting {
    n_ranks: usize,
    round: Mutex<Round>,
    changed: Condvar,
}

#[derive(Default)]
struct Round {
    parts: Vec<Option<Vec<f32>>>,
    /// Set once every part is in; taken by each rank once.
    sum: Option<Arc<std::result::Result<Vec<f32>, String>>>,
    picked_up: usize,
    aborted: bool,
}

impl HostMeeting {
    fn new(n_ranks: usize) -> HostMeeting {
        let round = Round { parts: vec![None; n_ranks], ..Round::default() };
        HostMeeting { n_ranks, round: Mutex::new(round), changed: Condvar::new() }
    }

    fn lock(&self) -> MutexGuard<'_, Round> {
        self.round.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, Round>) -> MutexGuard<'a, Round> {
        self.changed.wait(guard).unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn abort(&self) {
        self.lock().aborted = true;
        self.changed.notify_all();
    }

    /// Rank `rank`'s part in, the sum (parts added in rank order) out.
    fn sum(&self, rank: usize, part: Vec<f32>) -> Result<Vec<f32>> {
        let aborted = || Error::CollectiveAborted { rank, n_ranks: self.n_ranks };
        let mut round = self.lock();
        // The last round is still being picked up (or this rank is a round ahead).
        while !round.aborted && (round.sum.is_some() || round.parts[rank].is_some()) {
            round = self.wait(round);
        }
        if round.aborted {
            return Err(aborted());
        }
        round.parts[rank] = Some(part);
        if round.parts.iter().all(Option::is_some) {
            let parts: Vec<Vec<f32>> = round.parts.iter_mut().map(|p| p.take().unwrap_or_default()).collect();
            round.sum = Some(Arc::new(add_in_rank_order(parts)));
            self.changed.notify_all();
        }
        while !round.aborted && round.sum.is_none() {
            round = self.wait(round);
        }
        let Some(sum) = round.sum.clone() else { return Err(aborted()) };
        round.picked_up += 1;
        if round.picked_up == self.n_ranks {
            (round.sum, round.picked_up) = (None, 0);
            self.changed.notify_all();
        }
        match sum.as_ref() {
            Ok(sum) => Ok(sum.clone()),
            Err(detail) => Err(Error::Shape { op: "all_reduce_sum", detail: detail.clone() }),
        }
    }
}

fn add_in_rank_order(parts: Vec<Vec<f32>>) -> std::result::Result<Vec<f32>, String> {
    let mut parts = parts.into_iter();
    let mut sum = parts.next().unwrap_or_default();
    for (i, part) in parts.enumerate() {
        if part.len() != sum.len() {
            return Err(format!("rank {} gave {} values, rank 0 {}", i + 1, part.len(), sum.len()));
        }
        sum.iter_mut().zip(&part).for_each(|(s, p)| *s += p);
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` ranks on threads, `rounds` all-reduces each, every part random: each rank gets the
    /// rank-order sum, bit for bit, every round.
    #[test]
    fn host_ranks_get_the_rank_order_sum_round_after_round() {
        let (n, rounds, len) = (3, 50, 37);
        let group = CollectiveGroup::new(&vec![Device::Cpu; n]).unwrap();
        assert!(!group.join(0).unwrap().recordable(), "ranks on the CPU meet in host memory");
        let part = |rank: usize, round: usize| -> Vec<f32> {
            let mut rng = crate::rng::SplitMix64::new((rank * 1000 + round) as u64 + 1);
            (0..len).map(|_| rng.uniform(-1.0, 1.0)).collect()
        };
        let results: Vec<Vec<Vec<f32>>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|rank| {
                    let c = group.join(rank).unwrap();
                    s.spawn(move || {
                        (0..rounds)
                            .map(|round| {
                                let t = Tensor::from_f32(&[1, len], part(rank, round)).unwrap();
                                c.all_reduce_sum(t).unwrap().to_f32_vec().unwrap()
                            })
                            .collect()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for round in 0..rounds {
            let mut want = part(0, round);
            for rank in 1..n {
                want.iter_mut().zip(part(rank, round)).for_each(|(w, p)| *w += p);
            }
            for rank in 0..n {
                assert_eq!(results[rank][round], want, "rank {rank}, round {round}");
            }
        }
    }

    #[test]
    fn an_aborted_meeting_frees_the_ranks_that_wait() {
        let group = CollectiveGroup::new(&[Device::Cpu, Device::Cpu]).unwrap();
        let rank0 = group.join(0).unwrap();
        std::thread::scope(|s| {
            let waiting = s.spawn(move || rank0.all_reduce_sum(Tensor::from_f32(&[2], vec![1.0, 2.0]).unwrap()));
            std::thread::sleep(std::time::Duration::from_millis(20));
            group.abort();
            let err = waiting.join().unwrap().unwrap_err();
            assert!(matches!(err, Error::CollectiveAborted { rank: 0, n_ranks: 2 }), "{err}");
        });
        assert!(group.join(1).unwrap().all_reduce_sum(Tensor::from_f32(&[1], vec![0.5]).unwrap()).is_err());
    }

    #[test]
    fn one_rank_gets_its_part_back_as_it_is() {
        let group = CollectiveGroup::new(&[Device::Cpu]).unwrap();
        let c = group.join(0).unwrap();
        assert!(c.recordable());
        let part = Tensor::from_f32_as(&[2], vec![1.5, -2.0], crate::DType::F16).unwrap();
        assert_eq!(c.all_reduce_sum(part.clone()).unwrap(), part);
        assert!(group.join(1).is_err());
    }
}
