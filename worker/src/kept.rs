//! Blocks a worker keeps in memory after quantizing them, to serve them without reading them back.
//!
//! A job submitted with `--deploy` is served as soon as it is done, and the coordinator places its
//! replicas first on the workers that quantized it (`Assignment.keep_for_serving`,
//! `ServeReplica.kept_job_id`). Each stage of such a job keeps the serialized safetensors of every
//! block it finishes (the bytes it uploads); a replica placed here for that job then reads those
//! blocks from memory (`awq_serve::engine::KeptTensors`) and only the rest from the output, so a
//! model goes from its fp16 checkpoint to answering requests without its blocks making a round
//! trip through the output's storage (a network volume in a cluster).
//!
//! Memory is bounded by one job: a stage of another job that keeps replaces the blocks of the
//! previous one, a cancelled job's blocks are dropped, and a replica takes the blocks it loads
//! (they live on in its weights, not here).

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use awq_serve::engine::KeptTensors;

/// The blocks of (at most) one job, kept for its deployment.
#[derive(Debug, Default)]
pub struct KeptBlocks {
    state: Mutex<Option<Kept>>,
}

#[derive(Debug)]
struct Kept {
    job_id: String,
    /// Block index -> the block's safetensors file, as uploaded.
    blocks: BTreeMap<usize, Arc<Vec<u8>>>,
}

impl KeptBlocks {
    fn lock(&self) -> MutexGuard<'_, Option<Kept>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A stage of `job_id` that keeps its blocks starts: another job's blocks are dropped.
    pub fn begin(&self, job_id: &str) {
        let mut state = self.lock();
        if state.as_ref().is_none_or(|k| k.job_id != job_id) {
            *state = Some(Kept { job_id: job_id.to_string(), blocks: BTreeMap::new() });
        }
    }

    /// Keeps block `block_idx` of `job_id` (ignored unless that job is the one kept).
    pub fn keep(&self, job_id: &str, block_idx: usize, payload: Arc<Vec<u8>>) {
        if let Some(kept) = self.lock().as_mut().filter(|k| k.job_id == job_id) {
            kept.blocks.insert(block_idx, payload);
        }
    }

    /// Takes the kept blocks of `job_id` within `blocks` (a replica loading them); they are no
    /// longer kept here. Empty when this worker kept none of them.
    pub fn take(&self, job_id: &str, blocks: Range<usize>) -> KeptTensors {
        let mut state = self.lock();
        let Some(kept) = state.as_mut().filter(|k| k.job_id == job_id) else { return KeptTensors::default() };
        let indices: Vec<usize> = kept.blocks.range(blocks).map(|(&b, _)| b).collect();
        let taken = indices
            .into_iter()
            .filter_map(|b| kept.blocks.remove(&b).map(|bytes| (format!("block {b} kept from job {job_id}"), bytes)))
            .collect();
        if kept.blocks.is_empty() {
            *state = None;
        }
        KeptTensors(taken)
    }

    /// Drops the blocks of `job_id` (cancelled).
    pub fn drop_job(&self, job_id: &str) {
        let mut state = self.lock();
        if state.as_ref().is_some_and(|k| k.job_id == job_id) {
            *state = None;
        }
    }

    /// How many blocks are kept, and their bytes.
    pub fn held(&self) -> (usize, usize) {
        self.lock().as_ref().map_or((0, 0), |k| (k.blocks.len(), k.blocks.values().map(|b| b.len()).sum()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: u8) -> Arc<Vec<u8>> {
        Arc::new(vec![n; 3])
    }

    #[test]
    fn one_jobs_blocks_are_kept_and_taken_by_range() {
        let kept = KeptBlocks::default();
        kept.keep("j1", 0, bytes(0));
        assert_eq!(kept.held(), (0, 0), "nothing is kept before a stage of the job begins");
        kept.begin("j1");
        for b in 0..4 {
            kept.keep("j1", b, bytes(b as u8));
        }
        kept.keep("j2", 9, bytes(9));
        kept.begin("j1");
        assert_eq!(kept.held(), (4, 12), "a second stage of the same job keeps the first's blocks");
        assert!(kept.take("j2", 0..4).0.is_empty());
        let taken = kept.take("j1", 1..3);
        let names: Vec<&str> = taken.0.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["block 1 kept from job j1", "block 2 kept from job j1"]);
        assert_eq!(*taken.0[1].1, vec![2u8; 3]);
        assert_eq!(kept.held(), (2, 6));
        // Another job's stage replaces them; a cancelled job's are dropped.
        kept.begin("j2");
        assert!(kept.take("j1", 0..4).0.is_empty());
        kept.keep("j2", 5, bytes(5));
        kept.drop_job("j2");
        assert_eq!(kept.held(), (0, 0));
    }
}
