//! The typed options of a quantization job, each checked by its constructor.

use std::path::PathBuf;

use awq_kernels::ops::{GroupSize, QuantSpec};
use awq_kernels::{DType, Device};
use serde::Serialize;

/// An option that cannot be: `field` names it as the wire does (`options.group_size`); the edge
/// that read it may rename it (the CLI says `--group-size`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {detail}")]
pub struct InvalidOption {
    pub field: &'static str,
    pub detail: String,
}

impl InvalidOption {
    pub fn new(field: &'static str, detail: impl Into<String>) -> InvalidOption {
        InvalidOption { field, detail: detail.into() }
    }
}

/// Which quantization method a job runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Activation-aware scaling and clipping, then quantization (AutoAWQ 0.2.9).
    Awq,
    /// Round-to-nearest: quantization alone (the baseline AWQ is measured against). Needs no
    /// calibration and passes no activations between stages.
    Rtn,
}

impl Method {
    /// How the command line and reports spell it.
    pub fn name(self) -> &'static str {
        match self {
            Method::Awq => "awq",
            Method::Rtn => "rtn",
        }
    }

    /// Whether the method runs the calibration forward pass (and so chains a job's stages).
    pub fn needs_activations(self) -> bool {
        self == Method::Awq
    }

    /// The report the output carries (`awq_report.json`, as AutoAWQ users look for).
    pub fn report_file_name(self) -> &'static str {
        match self {
            Method::Awq => "awq_report.json",
            Method::Rtn => "rtn_report.json",
        }
    }
}

/// How to sample calibration rows (AutoAWQ's defaults: 128 samples of at most 512 tokens).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CalibOptions {
    pub n_samples: usize,
    pub seqlen: usize,
    pub seed: u64,
}

impl CalibOptions {
    /// At least one sample of at least two tokens (one input, one next token).
    pub fn new(n_samples: usize, seqlen: usize, seed: u64) -> Result<CalibOptions, InvalidOption> {
        if n_samples == 0 || seqlen < 2 {
            return Err(InvalidOption::new("options.n_samples", format!("{n_samples} samples of {seqlen} tokens is no calibration")));
        }
        Ok(CalibOptions { n_samples, seqlen, seed })
    }
}

impl Default for CalibOptions {
    fn default() -> Self {
        CalibOptions { n_samples: 128, seqlen: 512, seed: 42 }
    }
}

/// Where calibration texts come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CalibSource {
    /// The set built into the binary (paragraphs of four Jane Austen novels).
    BuiltIn,
    /// A file on the workers' filesystem (absolute): .jsonl with "text", or plain text.
    File(PathBuf),
}

/// The dtype the AWQ engine computes in. It changes the output's bytes, so it is the job's (every
/// stage computes in it; the report records it), not a worker's setting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EngineDtype {
    /// On a GPU the architecture's 16-bit dtype (`ArchDescriptor::gpu_dtype`: f16, as AutoAWQ runs
    /// its search, tensor-core GEMMs with f32 accumulation; bf16 for Gemma, which overflows f16);
    /// f32 on the CPU (the reference engine).
    #[default]
    DeviceDefault,
    /// The same dtype on every device (for comparisons between them).
    Fixed(DType),
}

impl EngineDtype {
    /// The dtype a stage on `device` computes in, for a model whose GPU dtype is `gpu_dtype`
    /// (`ArchDescriptor::gpu_dtype`).
    pub fn on(self, device: Device, gpu_dtype: DType) -> DType {
        match (self, device) {
            (EngineDtype::Fixed(dtype), _) => dtype,
            (EngineDtype::DeviceDefault, Device::Cpu) => DType::F32,
            (EngineDtype::DeviceDefault, Device::Cuda(_)) => gpu_dtype,
        }
    }

    /// How the command line and reports spell it.
    pub fn name(self) -> String {
        match self {
            EngineDtype::DeviceDefault => "auto".into(),
            EngineDtype::Fixed(dtype) => dtype.to_string(),
        }
    }
}

/// Everything that decides a job's output besides the model: checked once, then carried.
#[derive(Clone, Debug, PartialEq)]
pub struct JobOptions {
    pub quant: QuantSpec,
    pub method: Method,
    pub calib: CalibOptions,
    pub calib_source: CalibSource,
    pub engine_dtype: EngineDtype,
    /// Largest output safetensors file, in bytes (positive).
    pub max_shard_bytes: u64,
}

impl Default for JobOptions {
    /// AutoAWQ's defaults: 4 bits, groups of 128 with a zero point, 128 calibration samples of 512
    /// tokens from the built-in texts, and shards of at most 5 GB.
    fn default() -> JobOptions {
        JobOptions {
            quant: QuantSpec { bits: 4, group_size: GroupSize::G128, zero_point: true },
            method: Method::Awq,
            calib: CalibOptions::default(),
            calib_source: CalibSource::BuiltIn,
            engine_dtype: EngineDtype::DeviceDefault,
            max_shard_bytes: 5_000_000_000,
        }
    }
}

impl JobOptions {
    /// The quantization of AutoAWQ's GEMM format: 4 bits, a group size of the format.
    pub fn quant_spec(w_bit: u64, group_size: u64, zero_point: bool) -> Result<QuantSpec, InvalidOption> {
        if w_bit != 4 {
            return Err(InvalidOption::new("options.w_bit", format!("{w_bit} bits: the GEMM format holds 4")));
        }
        let group_size = GroupSize::awq(group_size)
            .ok_or_else(|| InvalidOption::new("options.group_size", format!("{group_size} is not 32, 64 or 128")))?;
        Ok(QuantSpec { bits: 4, group_size, zero_point })
    }

    /// A positive shard size.
    pub fn shard_bytes(max_shard_bytes: u64) -> Result<u64, InvalidOption> {
        if max_shard_bytes == 0 {
            return Err(InvalidOption::new("options.max_shard_bytes", "must be positive"));
        }
        Ok(max_shard_bytes)
    }

    /// A calibration file must be named by an absolute path (the workers read it where they are).
    pub fn calib_file(path: PathBuf) -> Result<CalibSource, InvalidOption> {
        if !path.is_absolute() {
            return Err(InvalidOption::new("options.calib_path", format!("{} is not an absolute path", path.display())));
        }
        Ok(CalibSource::File(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_option_names_its_field_when_refused() {
        assert_eq!(JobOptions::quant_spec(3, 128, true).unwrap_err().field, "options.w_bit");
        assert_eq!(JobOptions::quant_spec(4, 96, true).unwrap_err().field, "options.group_size");
        assert_eq!(JobOptions::quant_spec(4, 64, false).unwrap(), QuantSpec { bits: 4, group_size: GroupSize::G64, zero_point: false });
        assert_eq!(CalibOptions::new(0, 512, 1).unwrap_err().field, "options.n_samples");
        assert_eq!(CalibOptions::new(4, 1, 1).unwrap_err().field, "options.n_samples");
        assert_eq!(JobOptions::shard_bytes(0).unwrap_err().field, "options.max_shard_bytes");
        assert_eq!(JobOptions::calib_file("calib.txt".into()).unwrap_err().field, "options.calib_path");
    }

    #[test]
    fn the_engine_dtype_follows_the_device_unless_fixed() {
        assert_eq!(EngineDtype::DeviceDefault.on(Device::Cpu, DType::BF16), DType::F32);
        assert_eq!(EngineDtype::DeviceDefault.on(Device::Cuda(1), DType::F16), DType::F16);
        assert_eq!(EngineDtype::DeviceDefault.on(Device::Cuda(1), DType::BF16), DType::BF16);
        assert_eq!(EngineDtype::Fixed(DType::BF16).on(Device::Cpu, DType::F16), DType::BF16);
        assert_eq!(EngineDtype::Fixed(DType::F16).on(Device::Cuda(0), DType::BF16), DType::F16);
    }
}
