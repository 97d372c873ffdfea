//! Output assembly: staged results become the AutoAWQ checkpoint.
//!
//! While a job runs, each finished block is staged beside the output as
//! `.{name}.parts-{job}/block-{idx:05}.safetensors` (+ `.json`, its report) and the tensors outside
//! the blocks as `tail.safetensors` (+ `tail.json`). Staged files are written to a temporary name
//! and renamed, so a file that exists is complete; the store records it only after the rename.
//! Assembly reads them back in block order, adds config.json (`quantization_config`) and the
//! report, and hands everything to the checkpoint writer, which renames the output into place.

use std::path::{Path, PathBuf};

use awq_model::awq_format::{output_config, AwqConfig};
use awq_model::safetensors::{RawTensor, SafetensorsFile};
use awq_model::writer::{write_checkpoint, CheckpointOutput, Overwrite};
use awq_model::ModelConfig;
use awq_proto::v1::SubmitRequest;
use rayon::prelude::*;
use serde_json::{json, Value};

use crate::{Error, Result};

/// The staging folder of a job's results.
pub fn staging_dir(output: &Path, job_id: &str) -> PathBuf {
    let name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    output.parent().unwrap_or(Path::new("/")).join(format!(".{name}.parts-{job_id}"))
}

pub fn block_file(staging: &Path, block_idx: u32) -> PathBuf {
    staging.join(format!("block-{block_idx:05}.safetensors"))
}

pub fn tail_file(staging: &Path) -> PathBuf {
    staging.join("tail.safetensors")
}

/// Writes `bytes` to `path` through a temporary name, then renames.
pub fn write_staged(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).map_err(Error::io(&tmp))?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(Error::io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(Error::io(path))
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
    serde_json::from_str(&text).map_err(|e| Error::DataLoss(format!("{}: {e}", path.display())))
}

/// Assembles the checkpoint of a job with `n_blocks` blocks staged in `staging`.
pub fn assemble(req: &SubmitRequest, n_blocks: u32, staging: &Path) -> Result<()> {
    let o = req.options.clone().unwrap_or_default();
    let model = Path::new(&req.model_path);
    let config = ModelConfig::from_dir(model)?;
    let awq = AwqConfig { bits: o.w_bit, group_size: o.group_size as usize, zero_point: o.zero_point };

    let mut tensors = SafetensorsFile::open(tail_file(staging))?.raw_tensors();
    // The staged files are read in parallel (gigabytes for a large model), kept in block order.
    let blocks: Vec<(Vec<RawTensor>, Value)> = (0..n_blocks)
        .into_par_iter()
        .map(|b| {
            let path = block_file(staging, b);
            Ok((SafetensorsFile::open(&path)?.raw_tensors(), read_json(&path.with_extension("json"))?))
        })
        .collect::<Result<_>>()?;
    let mut reports = Vec::with_capacity(n_blocks as usize);
    for (block_tensors, report) in blocks {
        tensors.extend(block_tensors);
        reports.push(report);
    }
    let tail = read_json(&tail_file(staging).with_extension("json"))?;
    let report = json!({
        "method": o.method,
        "bits": o.w_bit,
        "group_size": o.group_size,
        "zero_point": o.zero_point,
        "calibration": tail.get("calibration").cloned().unwrap_or(Value::Null),
        "blocks": reports,
    });
    let report_name = if o.method == "rtn" { "rtn_report.json" } else { "awq_report.json" };
    let output = CheckpointOutput {
        config: output_config(&config.raw, awq),
        tensors,
        copy_from: model.to_path_buf(),
        extra_files: vec![(report_name.into(), serde_json::to_vec_pretty(&report).expect("report serialises"))],
    };
    let overwrite = if req.overwrite { Overwrite::Replace } else { Overwrite::Refuse };
    write_checkpoint(output, Path::new(&req.output_path), o.max_shard_bytes, overwrite)?;
    std::fs::remove_dir_all(staging).map_err(Error::io(staging))
}
