//! Job intake: a `SubmitRequest` from the wire becomes a [`JobSpec`], or an error naming the field.
//!
//! Everything that can be known before work starts is checked here, so a bad job fails in
//! milliseconds instead of after an hour on the cluster.

use std::path::{Component, Path, PathBuf};

use awq_job::deployment::DeploymentSpec;
use awq_job::{CalibSource, InvalidOption, JobOptions};
use awq_model::awq_format::check_quantizable;
use awq_model::Checkpoint;
use awq_proto::v1::{self as pb, SubmitRequest};

use crate::{Error, Result};

/// A checked job: what a `SubmitRequest` asked for, as typed values, and what the model on disk
/// says about it.
#[derive(Clone, Debug)]
pub struct JobSpec {
    /// The checkpoint directory (absolute, as the workers see it).
    pub model: PathBuf,
    /// The output directory (absolute, under the allowed roots, not the model).
    pub output: PathBuf,
    /// Replace an existing output once the new one is complete.
    pub overwrite: bool,
    pub options: JobOptions,
    pub n_blocks: u32,
    pub model_type: String,
    /// Memory a worker needs per block it holds, and once per stage (see the planner).
    pub per_block_bytes: u64,
    pub fixed_bytes: u64,
    /// The deployment to make of the output once the job is done (its model: the output).
    pub deploy: Option<DeploymentSpec>,
}

fn invalid(field: &'static str, detail: impl Into<String>) -> Error {
    Error::Invalid { field, detail: detail.into() }
}

impl From<InvalidOption> for Error {
    fn from(e: InvalidOption) -> Error {
        Error::Invalid { field: e.field, detail: e.detail }
    }
}

/// `path` without `.` and `..` components (lexically; the path need not exist).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Whether `path` lies under one of `roots` (every path does when there are no roots).
pub fn under_roots(path: &Path, roots: &[PathBuf]) -> bool {
    roots.is_empty() || roots.iter().any(|r| normalize(path).starts_with(normalize(r)))
}

/// Checks `req` against the model on disk and the allowed `roots`.
pub fn validate(req: &SubmitRequest, roots: &[PathBuf]) -> Result<JobSpec> {
    let model = Path::new(&req.model_path);
    if req.model_path.is_empty() || !model.is_absolute() {
        return Err(invalid("model_path", format!("`{}` is not an absolute path", req.model_path)));
    }
    if !under_roots(model, roots) {
        return Err(invalid("model_path", format!("{} is outside the allowed roots {roots:?}", model.display())));
    }
    let output = Path::new(&req.output_path);
    if req.output_path.is_empty() || !output.is_absolute() || output.file_name().is_none() {
        return Err(invalid("output_path", format!("`{}` is not an absolute directory path", req.output_path)));
    }
    if !under_roots(output, roots) {
        return Err(invalid("output_path", format!("{} is outside the allowed roots {roots:?}", output.display())));
    }
    if normalize(output) == normalize(model) {
        return Err(invalid("output_path", "the output cannot replace the model it is made from"));
    }
    if output.exists() && !req.overwrite {
        return Err(invalid("output_path", format!("{} exists (set overwrite to replace it)", output.display())));
    }
    let options = JobOptions::try_from(req.options.as_ref().ok_or_else(|| invalid("options", "missing"))?)?;
    if let CalibSource::File(calib) = &options.calib_source {
        if !calib.is_file() {
            return Err(invalid("options.calib_path", format!("{} is not a readable file", calib.display())));
        }
        if !under_roots(calib, roots) {
            return Err(invalid(
                "options.calib_path",
                format!("{} is outside the allowed roots {roots:?}", calib.display()),
            ));
        }
    }
    let checkpoint = Checkpoint::open(model).map_err(|e| invalid("model_path", e.to_string()))?;
    if checkpoint.awq().is_some() {
        return Err(invalid("model_path", format!("{} is already AWQ-quantized", model.display())));
    }
    let (c, arch) = (checkpoint.config(), checkpoint.arch());
    check_quantizable(arch, c, options.quant.group_size).map_err(|e| invalid("options.group_size", e.to_string()))?;

    // Memory per block: the f32 weights twice (original and the search's working copy) plus the
    // block's saved input; per stage: the working activations of one block forward.
    // The largest block's (a mixture of experts' holds every expert); its MLP's activations are
    // each token's through its experts.
    let params = checkpoint.block_elements() as u64;
    let tokens = options.calib.n_samples as u64 * options.calib.seqlen as u64;
    let per_block_bytes = params * 8 + tokens * c.hidden_size as u64 * 4;
    let mlp_width =
        c.moe.as_ref().map_or(0, |m| m.experts_per_token * m.expert_intermediate_size).max(c.intermediate_size);
    let fixed_bytes = tokens * (3 * mlp_width as u64 + 6 * c.hidden_size as u64) * 4;
    let deploy = match &req.deploy {
        None => None,
        Some(d) => {
            if !d.model_path.is_empty() && normalize(Path::new(&d.model_path)) != normalize(output) {
                return Err(invalid("deploy.model_path", "must be empty or the output path: the output is deployed"));
            }
            let with_output = pb::DeploymentSpec { model_path: req.output_path.clone(), ..d.clone() };
            let spec = DeploymentSpec::try_from(&with_output)
                .map_err(|e| Error::Invalid { field: deploy_field(e.field), detail: e.detail })?;
            // The output has the model's architecture and shapes.
            crate::deployments::check_split(&spec, c).map_err(|e| match e {
                Error::Invalid { field, detail } => Error::Invalid { field: deploy_field(field), detail },
                other => other,
            })?;
            Some(spec)
        }
    };
    Ok(JobSpec {
        model: model.to_path_buf(),
        output: output.to_path_buf(),
        overwrite: req.overwrite,
        options,
        n_blocks: c.n_blocks as u32,
        model_type: c.model_type.clone(),
        per_block_bytes,
        fixed_bytes,
        deploy,
    })
}

/// A deployment field's name inside a `SubmitRequest` (`tp` -> `deploy.tp`).
fn deploy_field(field: &'static str) -> &'static str {
    match field {
        "name" => "deploy.name",
        "served_model_name" => "deploy.served_model_name",
        "model_path" => "deploy.model_path",
        "tp" => "deploy.tp",
        "pp" => "deploy.pp",
        "replicas" => "deploy.replicas",
        "engine.gpu_memory_utilization" => "deploy.engine.gpu_memory_utilization",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_are_checked_lexically() {
        let roots = vec![PathBuf::from("/data/models")];
        assert!(under_roots(Path::new("/data/models/x/out"), &roots));
        assert!(!under_roots(Path::new("/data/models/../secrets/out"), &roots));
        assert!(!under_roots(Path::new("/data/modelsX/out"), &roots));
        assert!(under_roots(Path::new("/anything"), &[]));
    }
}
