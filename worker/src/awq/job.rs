//! A whole-model quantization on one process: calibration rows in, checkpoint tensors out.
//!
//! Blocks run in order; the calibration activations flow from block to block as the ORIGINAL
//! block outputs, and only one block's weights are in memory at a time.

use awq_kernels::{ops, DType};
use awq_model::awq_format::{output_config, AwqConfig};
use awq_model::safetensors::RawTensor;
use awq_model::writer::CheckpointOutput;
use awq_model::Checkpoint;
use serde::Serialize;
use serde_json::{json, Value};

use super::calib::CalibrationSet;
use awq_model::awq_format::check_quantizable;

use super::{quantize_block, quantize_rtn, AwqOptions, BlockReport, Method, QuantizedBlock};
use crate::forward::BlockShape;
use crate::Result;

/// The result of quantizing every block.
pub struct QuantizedModel {
    pub blocks: Vec<QuantizedBlock>,
    pub options: AwqOptions,
    /// `None` for RTN, which needs no calibration.
    pub calibration: Option<CalibrationSummary>,
}

/// What the calibration set was, for the report.
#[derive(Clone, Debug, Serialize)]
pub struct CalibrationSummary {
    pub rows: usize,
    pub seqlen: usize,
    pub samples_used: usize,
    pub samples_too_long: usize,
}

/// Quantizes every block of `checkpoint`; `progress` is called after each block. `calib` is
/// required for AWQ and ignored by RTN.
pub fn quantize_model(
    checkpoint: &Checkpoint,
    calib: Option<&CalibrationSet>,
    options: &AwqOptions,
    mut progress: impl FnMut(&BlockReport),
) -> Result<QuantizedModel> {
    let (config, arch) = (checkpoint.config(), checkpoint.arch());
    check_quantizable(arch, config, options.spec.group_size)?;
    let shape = BlockShape::of(checkpoint);
    let calib = match (options.method, calib) {
        (Method::Rtn, _) => None,
        (Method::Awq, Some(c)) => Some(c),
        (Method::Awq, None) => return Err(crate::Error::Input("AWQ needs calibration data".into())),
    };
    let mut x = match calib {
        Some(c) => Some(ops::embedding(&checkpoint.embed_tokens()?, &c.rows.concat(), DType::F32)?),
        None => None,
    };
    let mut blocks = Vec::with_capacity(config.n_blocks);
    for block_idx in 0..config.n_blocks {
        let weights = checkpoint.load_block(block_idx)?.into_dtype(DType::F32);
        let block = match (&x, calib) {
            (Some(input), Some(c)) => {
                let (block, next) = quantize_block(weights, input, &shape, c.seqlen, arch, options)?;
                x = Some(next);
                block
            }
            _ => quantize_rtn(&weights, options.spec)?,
        };
        progress(&block.report);
        blocks.push(block);
    }
    let calibration = calib.map(|c| CalibrationSummary {
        rows: c.rows.len(),
        seqlen: c.seqlen,
        samples_used: c.samples_used,
        samples_too_long: c.samples_too_long,
    });
    Ok(QuantizedModel { blocks, options: *options, calibration })
}

/// The tensors outside the blocks (embeddings, final norm, untied head), in f16 as the AWQ
/// checkpoint stores them.
pub fn tail_tensors(checkpoint: &Checkpoint) -> Result<Vec<RawTensor>> {
    let (config, arch) = (checkpoint.config(), checkpoint.arch());
    let f16 = |name: &str, t: awq_kernels::Tensor| RawTensor::from_tensor(name, &t.into_dtype(DType::F16));
    let mut tensors = vec![f16(arch.embed_tokens, checkpoint.embed_tokens()?), f16(arch.final_norm, checkpoint.final_norm()?)];
    if !config.tie_word_embeddings {
        tensors.push(f16(arch.lm_head, checkpoint.lm_head()?));
    }
    Ok(tensors)
}

impl QuantizedModel {
    pub fn awq_config(&self) -> AwqConfig {
        let s = self.options.spec;
        AwqConfig { bits: s.bits, group_size: s.group_size, zero_point: s.zero_point }
    }

    /// The per-block report as JSON (deterministic: no timings).
    pub fn report_json(&self) -> Value {
        let s = self.options.spec;
        json!({
            "method": self.options.method,
            "bits": s.bits,
            "group_size": s.group_size,
            "zero_point": s.zero_point,
            "calibration": self.calibration,
            "blocks": self.blocks.iter().map(|b| &b.report).collect::<Vec<_>>(),
        })
    }

    /// Tensors and config of the AutoAWQ GEMM checkpoint, ready for the writer.
    pub fn into_output(self, checkpoint: &Checkpoint) -> Result<CheckpointOutput> {
        let (config, arch) = (checkpoint.config(), checkpoint.arch());
        let awq = self.awq_config();
        let report = serde_json::to_vec_pretty(&self.report_json()).expect("report serialises");
        let mut tensors = tail_tensors(checkpoint)?;
        for block in &self.blocks {
            tensors.extend(block.raw_tensors(arch)?);
        }
        let out_config = output_config(&config.raw, awq);
        let report_name = match self.options.method {
            Method::Awq => "awq_report.json",
            Method::Rtn => "rtn_report.json",
        };
        Ok(CheckpointOutput {
            config: out_config,
            tensors,
            copy_from: checkpoint.dir().to_path_buf(),
            extra_files: vec![(report_name.into(), report)],
        })
    }
}
