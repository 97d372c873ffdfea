//! Output assembly: a job's results become the AutoAWQ checkpoint while the job runs.
//!
//! Each result (a block, or the tail: the tensors outside the blocks) is handled twice as it
//! arrives, both in the upload's blocking task:
//! - staged beside the output as `.{name}.parts-{job}/block-{idx:05}.safetensors` (+ `.json`, its
//!   report) or `tail.safetensors` (+ `tail.json`), written to a temporary name, synced and
//!   renamed, so a file that exists is complete; the store records the result only after that.
//!   Staged files are the durable record a restarted coordinator resumes from;
//! - written into the job's [`JobOutput`]: the output checkpoint itself, laid out in full from the
//!   model's [`AwqManifest`] in `.{name}.tmp-{job}` ([`awq_model::writer::OutputFolder`], named
//!   after the job so a restarted coordinator replaces what its predecessor left) and filled
//!   tensor by tensor with positioned writes whose disk writeback starts at once.
//!
//! The output is created by the first result of the job that arrives, not when the job is
//! planned: that is when its staging folder appears too, a job cancelled before any result leaves
//! nothing to clean, and creation (a few empty files of known length) costs milliseconds. Every
//! result is checked against the manifest's tensors for its part (names, dtypes, shapes) before
//! anything is staged; a mismatch is a `DataLoss` error naming the tensor.
//!
//! The assembly runs once the last result is recorded. [`prepare`]: what no upload wrote
//! (everything, after a coordinator restart: the output is new and empty then) is written from the
//! staged files; then the shards are synced (mostly written back already), the index, config.json
//! (with `quantization_config`), the report and the tokenizer files are written. The coordinator
//! records the folder's identity in the store ([`crate::store::keys::committed`]); [`commit`]
//! renames the folder into place and removes the staging folder. Its log line splits the time
//! after the last result into those steps.
//!
//! A coordinator killed at any moment of this leaves the output path empty or complete, never
//! half-written, and its successor (the job still `assembling` in the store) either finds the
//! output in place under the recorded identity ([`committed_before`]: a kill after the rename,
//! before the job's record said done) or prepares it again from the staged files, which stay
//! until the rename.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use awq_model::arch::{descriptor_for, ArchDescriptor};
use awq_model::awq_format::output_config;
use awq_model::manifest::{AwqManifest, ModelPart};
use awq_model::safetensors::SafetensorsFile;
use awq_model::writer::{rename_durably, FolderId, OutputFolder, Overwrite, WeightsWriter};
use awq_model::ModelConfig;
use awq_job::QuantSpec;
use rayon::prelude::*;
use serde_json::{json, Value};
use tracing::info;

use crate::validate::JobSpec;
use crate::{Error, Result};

/// The staging folder of a job's results.
pub fn staging_dir(output: &Path, job_id: &str) -> PathBuf {
    let name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    output.parent().unwrap_or(Path::new("/")).join(format!(".{name}.parts-{job_id}"))
}

/// The folder a job's output checkpoint is written in until it is complete.
pub fn output_temp_dir(output: &Path, job_id: &str) -> Result<PathBuf> {
    Ok(OutputFolder::temp_path(output, job_id)?)
}

pub fn block_file(staging: &Path, block_idx: u32) -> PathBuf {
    staging.join(format!("block-{block_idx:05}.safetensors"))
}

pub fn tail_file(staging: &Path) -> PathBuf {
    staging.join("tail.safetensors")
}

/// The staged file of `part`.
pub fn staged_file(staging: &Path, part: ModelPart) -> PathBuf {
    match part {
        ModelPart::Block(b) => block_file(staging, b as u32),
        ModelPart::Tail => tail_file(staging),
    }
}

/// Writes `bytes` to `path` through a temporary name, then renames (the file and the rename
/// synced: a staged block the coordinator recorded survives a power loss).
pub fn write_staged(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).map_err(Error::io(&tmp))?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(Error::io(&tmp))?;
    rename_durably(&tmp, path, path).map_err(Error::from)
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
    serde_json::from_str(&text).map_err(|e| Error::DataLoss(format!("{}: {e}", path.display())))
}

/// A job's output checkpoint while its results arrive; see the module docs. Shared between the
/// uploads that write into it (from several threads at once) and the assembly.
#[derive(Debug)]
pub struct JobOutput {
    folder: OutputFolder,
    weights: WeightsWriter,
    manifest: AwqManifest,
    /// The source model's config.json and architecture, for the output's.
    model_config: ModelConfig,
    arch: &'static ArchDescriptor,
    awq: QuantSpec,
}

impl JobOutput {
    /// Creates the output of job `job_id` (`spec`): every shard laid out, in
    /// `.{name}.tmp-{job_id}`, replacing a folder of that name left by an earlier coordinator.
    pub fn create(spec: &JobSpec, job_id: &str) -> Result<JobOutput> {
        let model_config = ModelConfig::from_dir(&spec.model)?;
        let arch = descriptor_for(&model_config.model_type, &model_config.path)?;
        let awq = spec.options.quant;
        let manifest = AwqManifest::new(arch, &model_config, awq);
        let folder = OutputFolder::create(&spec.output, job_id)?;
        let weights = match WeightsWriter::create(folder.path(), manifest.tensors().cloned().collect(), spec.options.max_shard_bytes) {
            Ok(weights) => weights,
            Err(e) => {
                let _ = folder.remove();
                return Err(e.into());
            }
        };
        Ok(JobOutput { folder, weights, manifest, model_config, arch, awq })
    }

    /// Checks that `file` holds exactly the tensors the manifest lists for `part`, with their
    /// dtypes and shapes; a `DataLoss` error names the first tensor at fault.
    pub fn check(&self, part: ModelPart, file: &SafetensorsFile) -> Result<()> {
        let source = file.path().display();
        let expected = self.manifest.part(part).ok_or_else(|| {
            Error::DataLoss(format!("{source}: {part} is not in the model, which has {} blocks", self.manifest.n_blocks()))
        })?;
        for spec in expected {
            let Some(info) = file.info(&spec.name) else {
                return Err(Error::DataLoss(format!("{source}: {part}: tensor {} is missing", spec.name)));
            };
            if info.dtype != spec.dtype || info.shape != spec.shape {
                return Err(Error::DataLoss(format!(
                    "{source}: {part}: tensor {} is {} {:?}; the output checkpoint holds {}",
                    spec.name,
                    info.dtype.name(),
                    info.shape,
                    spec.describe()
                )));
            }
        }
        if let Some(extra) = file.tensors().keys().find(|name| !expected.iter().any(|s| s.name == **name)) {
            return Err(Error::DataLoss(format!("{source}: {part}: tensor {extra} is not part of {part} in the output checkpoint")));
        }
        Ok(())
    }

    /// Writes the tensors of `file` (checked with [`JobOutput::check`]) that are not written yet.
    /// A tensor that another upload of the same result wrote, or is writing, is left to it:
    /// results are deterministic, so a repeated upload (a retry, a block planned again while its
    /// first upload was on its way) carries the same bytes.
    pub fn write_result(&self, file: &SafetensorsFile) -> Result<()> {
        for name in file.tensors().keys() {
            if self.weights.is_written(name) {
                continue;
            }
            match self.weights.write_tensor(name, file.bytes(name)?) {
                Ok(()) | Err(awq_model::Error::TensorWrittenTwice { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Whether every tensor of `part` is written.
    fn part_written(&self, part: ModelPart) -> bool {
        self.manifest.part(part).is_some_and(|specs| specs.iter().all(|s| self.weights.is_written(&s.name)))
    }

    pub fn n_blocks(&self) -> usize {
        self.manifest.n_blocks()
    }
}

/// Where a job's [`JobOutput`] lives: created by the first result that arrives (or by the
/// assembly, when none did since the coordinator started), closed when the job ends, after which
/// it is never created again.
#[derive(Debug, Default)]
pub struct OutputSlot(Mutex<SlotState>);

#[derive(Debug, Default)]
enum SlotState {
    #[default]
    Empty,
    Open(Arc<JobOutput>),
    Closed,
}

impl OutputSlot {
    fn state(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.0.lock().expect("the output slot's lock is never held across a panic")
    }

    /// The job's output, created if there is none yet (file I/O, under this slot's own lock: call
    /// it from a blocking task, never under the coordinator's state lock); `None` once closed.
    pub fn get_or_create(&self, spec: &JobSpec, job_id: &str) -> Result<Option<Arc<JobOutput>>> {
        let mut state = self.state();
        match &*state {
            SlotState::Open(output) => Ok(Some(output.clone())),
            SlotState::Closed => Ok(None),
            SlotState::Empty => {
                let output = Arc::new(JobOutput::create(spec, job_id)?);
                *state = SlotState::Open(output.clone());
                Ok(Some(output))
            }
        }
    }

    /// Closes the slot: the output (if any) is dropped once its last user is done with it, and no
    /// new one is created. Its folder stays; the caller removes or commits it.
    pub fn close(&self) {
        let state = std::mem::replace(&mut *self.state(), SlotState::Closed);
        drop(state);
    }
}

/// A job's output written in full in its temporary folder by [`prepare`], to be renamed into place
/// by [`commit`] once the store holds its identity (`id`).
#[derive(Debug)]
pub struct Prepared {
    output: Arc<JobOutput>,
    /// The temporary folder's identity, which the output keeps once renamed
    /// ([`crate::store::keys::committed`]).
    pub id: FolderId,
    start: Instant,
    /// Parts written from staged files, of all.
    left: usize,
    /// Seconds from `start` to the end of each step: writing what was left, fsync, small files.
    steps_s: [f64; 3],
}

/// Writes the checkpoint of job `job_id` (`spec`), whose results are all staged in `staging`, in
/// full in the temporary folder of `slot`'s output (created here if no result created it); see
/// the module docs. Everything here can be done again: on error (a full disk, say) the caller may
/// call it again, or remove the output's temporary folder and the staging folder.
pub fn prepare(spec: &JobSpec, job_id: &str, staging: &Path, slot: &OutputSlot) -> Result<Prepared> {
    let start = Instant::now();
    let output = slot
        .get_or_create(spec, job_id)?
        .ok_or_else(|| Error::DataLoss(format!("job {job_id}: its output was closed before assembly")))?;

    // 1. What no upload wrote: from the staged files (mapped, so pwrite reads straight from them).
    let left: Vec<ModelPart> = output.manifest.parts().filter(|&p| !output.part_written(p)).collect();
    left.par_iter().try_for_each(|&part| {
        let file = SafetensorsFile::open(staged_file(staging, part))?;
        output.check(part, &file)?;
        output.write_result(&file)
    })?;
    let written_s = start.elapsed().as_secs_f64();

    // 2. The shards on disk: writeback of each tensor started when it was written.
    output.weights.sync()?;
    let synced_s = start.elapsed().as_secs_f64();

    // 3. Index, config.json, report, tokenizer files.
    let o = &spec.options;
    output.weights.finish(&output_config(output.arch, &output.model_config, output.awq))?;
    let reports = (0..output.n_blocks() as u32)
        .map(|b| read_json(&block_file(staging, b).with_extension("json")))
        .collect::<Result<Vec<_>>>()?;
    let tail = read_json(&tail_file(staging).with_extension("json"))?;
    let report = json!({
        "method": o.method.name(),
        "bits": o.quant.bits,
        "group_size": o.quant.group_size.get(),
        "zero_point": o.quant.zero_point,
        "engine_dtype": o.engine_dtype.name(),
        "calibration": tail.get("calibration").cloned().unwrap_or(Value::Null),
        "blocks": reports,
    });
    let report_name = o.method.report_file_name();
    output.folder.write_file(report_name, &serde_json::to_vec_pretty(&report).expect("report serialises"))?;
    output.folder.copy_source_files(&spec.model)?;
    let small_files_s = start.elapsed().as_secs_f64();
    let id = output.folder.id()?;
    Ok(Prepared { output, id, start, left: left.len(), steps_s: [written_s, synced_s, small_files_s] })
}

/// Renames the output that [`prepare`] wrote into place, closes `slot` and removes the staging
/// folder; logs how the time after the last result was spent.
pub fn commit(spec: &JobSpec, job_id: &str, staging: &Path, slot: &OutputSlot, prepared: Prepared) -> Result<()> {
    let Prepared { output, start, left, steps_s: [written_s, synced_s, small_files_s], .. } = prepared;
    let overwrite = if spec.overwrite { Overwrite::Replace } else { Overwrite::Refuse };
    output.folder.commit(overwrite)?;
    slot.close();
    let renamed_s = start.elapsed().as_secs_f64();
    std::fs::remove_dir_all(staging).map_err(Error::io(staging))?;
    let total_s = start.elapsed().as_secs_f64();
    info!(
        job = %job_id,
        "assembled in {total_s:.2} s after the last result: writing what was left {written_s:.2} s \
         ({left} of {} parts), fsync {:.2} s, index, config, report and tokenizer files {:.2} s, \
         rename {:.2} s, staging folder removed in {:.2} s",
        output.n_blocks() + 1,
        synced_s - written_s,
        small_files_s - synced_s,
        renamed_s - small_files_s,
        total_s - renamed_s,
    );
    Ok(())
}

/// Whether job `job_id`'s output is in place already: `recorded` (the store's
/// [`crate::store::keys::committed`]) names the folder now at the output path. A coordinator that
/// died after the rename and before the job's record said done left it so; then what remains of
/// that commit is finished (the staging folder, a replaced output still aside) and `slot` closed.
pub fn committed_before(
    spec: &JobSpec,
    job_id: &str,
    staging: &Path,
    slot: &OutputSlot,
    recorded: &[u8],
) -> Result<bool> {
    let recorded = std::str::from_utf8(recorded).ok().and_then(FolderId::parse);
    let Some(recorded) = recorded else { return Ok(false) };
    if FolderId::of(&spec.output)? != Some(recorded) {
        return Ok(false);
    }
    OutputFolder::recover(&spec.output, job_id)?;
    slot.close();
    if let Err(cause) = std::fs::remove_dir_all(staging) {
        if cause.kind() != std::io::ErrorKind::NotFound {
            return Err(Error::Io { path: staging.to_path_buf(), cause });
        }
    }
    info!(job = %job_id, "the output was renamed into place before the coordinator restarted: not assembled again");
    Ok(true)
}
