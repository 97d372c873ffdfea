//! The ranks of a tensor-parallel group, each on a thread of its own.
//!
//! Why threads: an all-reduce waits until every rank reaches it, so ranks cannot take turns on one
//! thread, nor share a pool smaller than the group (rayon's, on a 2-core machine, would deadlock at
//! `tp` 3). Each rank's thread owns its [`RankRunner`] for the runner's life (a GPU rank's graphs
//! and NCCL communicator stay on the thread that made them) and runs whatever job the runner
//! hands it; a step is one job per rank, so the threads meet only in the all-reduces (NCCL's on
//! the GPUs' streams: the host threads do not wait for each other there at all).
//!
//! A rank that fails aborts the group's host-memory meeting, so the others return instead of
//! waiting for it; ranks that still do not answer within [`STRAGGLER_WAIT`] (NCCL ranks left
//! behind a failed peer) are given up, and the group is broken from then on.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use awq_kernels::CollectiveGroup;

use super::rank::RankRunner;
use crate::{Error, Result};

/// How long the other ranks get to answer once one has failed.
const STRAGGLER_WAIT: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce(&mut RankRunner) + Send>;

/// One thread per rank (see the module docs).
pub(super) struct RankThreads {
    threads: Vec<RankThread>,
    group: CollectiveGroup,
    /// Why the group cannot run another job, once a job failed on some rank.
    broken: Option<(usize, String)>,
}

struct RankThread {
    jobs: Option<mpsc::Sender<Job>>,
    handle: Option<JoinHandle<()>>,
}

impl RankThreads {
    /// Starts one thread per runner (in rank order), each owning its runner.
    pub(super) fn start(runners: Vec<RankRunner>, group: CollectiveGroup) -> Result<RankThreads> {
        let mut threads = Vec::with_capacity(runners.len());
        for (rank, mut runner) in runners.into_iter().enumerate() {
            let (jobs, inbox) = mpsc::channel::<Job>();
            let handle = std::thread::Builder::new()
                .name(format!("tp-rank-{rank}"))
                .spawn(move || {
                    for job in inbox {
                        job(&mut runner);
                    }
                })
                .map_err(|e| Error::RankStopped { rank, reason: format!("cannot start its thread: {e}") })?;
            threads.push(RankThread { jobs: Some(jobs), handle: Some(handle) });
        }
        Ok(RankThreads { threads, group, broken: None })
    }

    /// `f` on every rank at once; the results in rank order. The first rank's error is returned
    /// (another rank's `CollectiveAborted` only when nothing else failed).
    pub(super) fn on_every_rank<R: Send + 'static>(
        &mut self,
        f: impl Fn(&mut RankRunner) -> Result<R> + Send + Sync + 'static,
    ) -> Result<Vec<R>> {
        if let Some((rank, reason)) = &self.broken {
            return Err(Error::RankStopped { rank: *rank, reason: reason.clone() });
        }
        let f = Arc::new(f);
        let (done, results) = mpsc::channel::<(usize, Result<R>)>();
        for (rank, thread) in self.threads.iter().enumerate() {
            let (f, done) = (f.clone(), done.clone());
            let job: Job = Box::new(move |runner| {
                let _ = done.send((rank, f(runner)));
            });
            if thread.jobs.as_ref().is_none_or(|jobs| jobs.send(job).is_err()) {
                self.broken = Some((rank, "its thread has ended".into()));
                self.group.abort();
            }
        }
        drop(done);
        let n = self.threads.len();
        let mut out: Vec<Option<R>> = (0..n).map(|_| None).collect();
        let mut failure: Option<(usize, Error)> = None;
        let mut deadline: Option<Instant> = None;
        for _ in 0..n {
            let received = match deadline {
                None => results.recv().map_err(|_| ()),
                Some(at) => results.recv_timeout(at.saturating_duration_since(Instant::now())).map_err(|_| ()),
            };
            // Every sender gone (a rank panicked) or the stragglers' time is up.
            let Ok((rank, result)) = received else { break };
            match result {
                Ok(r) => out[rank] = Some(r),
                Err(e) => {
                    let aborted = is_aborted(&e);
                    if failure.as_ref().is_none_or(|(_, first)| !aborted && is_aborted(first)) {
                        failure = Some((rank, e));
                    }
                    self.group.abort();
                    deadline.get_or_insert_with(|| Instant::now() + STRAGGLER_WAIT);
                }
            }
        }
        if let Some((rank, e)) = failure {
            self.broken = Some((rank, e.to_string()));
            return Err(e);
        }
        match out.iter().position(Option::is_none) {
            Some(rank) => {
                let reason = "its thread stopped during a step (a panic)".to_string();
                self.broken = Some((rank, reason.clone()));
                self.group.abort();
                Err(Error::RankStopped { rank, reason })
            }
            None => Ok(out.into_iter().flatten().collect()),
        }
    }
}

/// Whether `e` only says the rank gave up waiting for a failed peer.
fn is_aborted(e: &Error) -> bool {
    matches!(e, Error::Kernel { cause, .. } if matches!(**cause, awq_kernels::Error::CollectiveAborted { .. }))
}

impl Drop for RankThreads {
    /// Ends every thread (their job queues close) and waits for them, unless the group is broken:
    /// a rank stuck behind a failed peer would never end.
    fn drop(&mut self) {
        for thread in &mut self.threads {
            thread.jobs = None;
        }
        if self.broken.is_some() {
            return;
        }
        for thread in &mut self.threads {
            if let Some(handle) = thread.handle.take() {
                let _ = handle.join();
            }
        }
    }
}
