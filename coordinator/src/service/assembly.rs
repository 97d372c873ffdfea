//! How the service runs a job's assembly ([`crate::assemble`] does its file work): in a task of
//! its own, the file work on blocking threads; a full disk and a silent state store are waited
//! out, never fatal; the output's identity is recorded in the store before its rename, so that a
//! coordinator restarted at any moment of it ends the job done with the same bytes
//! (RELIABILITY.md, "the coordinator killed during assembly").

use std::path::PathBuf;
use std::sync::Arc;

use awq_proto::v1 as pb;
use prost::Message;
use tracing::warn;

use super::{now_ms, Coordinator};
use crate::assemble::{commit, committed_before, prepare, staging_dir, OutputSlot};
use crate::store::keys;
use crate::validate::JobSpec;
use crate::Result;

impl Coordinator {
    /// Runs job `job_id`'s assembly in a task of its own: the job `assembling` (recorded), its
    /// output written and renamed ([`Coordinator::assemble_output`]), then the job `done` or
    /// `failed` (recorded), its results forgotten, and what waited planned.
    pub(super) fn spawn_assembly(&self, job_id: String) {
        let this = self.clone();
        tokio::spawn(async move {
            let (started, out) = this.update(|inner, fx| {
                let job = inner.state.start_assembly(&job_id, fx)?;
                Some((job, inner.jobs.get(&job_id)?.output.clone()))
            });
            this.apply(out).await;
            let Some((job, output)) = started else { return };
            let _ = this.shared.store.put(&keys::job(&job_id), pb::Job::from(&job).encode_to_vec()).await;
            let staging = staging_dir(&job.spec.output, &job_id);
            let result = this.assemble_output(&job_id, &job.spec, staging, output).await;
            if result.is_err() {
                // A failed job is never resumed: its staged results and unfinished output would
                // only be litter. Removed before the failure is told, so that a watcher that
                // exits on it (the embedded `awq quantize`) leaves nothing behind.
                let discard = this.lock().discard(&job_id);
                if let Some(discard) = discard {
                    discard.run().await;
                }
            }
            let (ended, out) = this.update(|inner, fx| inner.state.finish_assembly(&job_id, result, now_ms(), fx));
            this.apply(out).await;
            let Some(job) = ended else { return };
            let _ = this.shared.store.put(&keys::job(&job_id), pb::Job::from(&job).encode_to_vec()).await;
            this.forget_results(&job_id).await;
            let ((), out) = this.update(|inner, fx| inner.state.schedule(fx));
            this.apply(out).await;
        });
    }

    /// Writes job `job_id`'s output and renames it into place ([`crate::assemble`]), unless an
    /// earlier coordinator did (it died between the rename and the job's record). A full disk is
    /// waited out, as for uploads: everything before the rename can be done again (the writes land
    /// where they did), and the staged results stay. So is a store that does not answer: the
    /// output's identity is recorded before the rename, or the output is not renamed. Errors: what
    /// the job's record says.
    async fn assemble_output(
        &self,
        job_id: &str,
        spec: &JobSpec,
        staging: PathBuf,
        slot: Arc<OutputSlot>,
    ) -> std::result::Result<(), String> {
        let store = &self.shared.store;
        let committed_key = keys::committed(job_id);
        let recorded =
            retry_store(job_id, "read whether the output was renamed into place", || store.get(&committed_key)).await;
        if let Some(recorded) = recorded {
            let (id, spec, staging, slot) = (job_id.to_string(), spec.clone(), staging.clone(), slot.clone());
            let found = blocking(move || committed_before(&spec, &id, &staging, &slot, &recorded)).await?;
            if found {
                return Ok(());
            }
        }
        let mut backoff = awq_job::RetryBackoff::default();
        let prepared = loop {
            let (id, spec, staging, slot) = (job_id.to_string(), spec.clone(), staging.clone(), slot.clone());
            match tokio::task::spawn_blocking(move || prepare(&spec, &id, &staging, &slot)).await {
                Ok(Err(e)) if e.is_storage_full() => {
                    let ((), out) =
                        self.update(|inner, fx| inner.state.wait_for_space(job_id, &format!("assembly: {e}"), fx));
                    self.apply(out).await;
                    tokio::time::sleep(backoff.next_wait()).await;
                }
                Ok(result) => break result.map_err(|e| format!("assembly failed: {e}"))?,
                Err(e) => return Err(format!("assembly panicked: {e}")),
            }
        };
        let id = prepared.id.to_string().into_bytes();
        retry_store(job_id, "record the output's identity before renaming it", || {
            store.put(&committed_key, id.clone())
        })
        .await;
        let (id, spec) = (job_id.to_string(), spec.clone());
        blocking(move || commit(&spec, &id, &staging, &slot, prepared)).await
    }
}

/// Runs `f` on a blocking thread; its error, or its panic, as the job's record words it.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> std::result::Result<T, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(|e| format!("assembly failed: {e}")),
        Err(e) => Err(format!("assembly panicked: {e}")),
    }
}

/// Calls the store (`call`, to `what` for job `job_id`) until it answers, waiting between tries as
/// a worker does for a refused upload ([`awq_job::RetryBackoff`]); warns once. The assembly cannot
/// go on without the answer, and a store that does not answer is a passing fault.
async fn retry_store<T, F: std::future::Future<Output = Result<T>>>(
    job_id: &str,
    what: &str,
    mut call: impl FnMut() -> F,
) -> T {
    let (mut backoff, mut warned) = (awq_job::RetryBackoff::default(), false);
    loop {
        match call().await {
            Ok(value) => return value,
            Err(e) => {
                if !std::mem::replace(&mut warned, true) {
                    warn!(job = %job_id, "cannot {what}: {e}; trying again until the state store answers");
                }
                tokio::time::sleep(backoff.next_wait()).await;
            }
        }
    }
}
