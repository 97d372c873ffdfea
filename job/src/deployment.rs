//! What a deployment asks for (a checkpoint served by replicas of `tp` ranks and `pp` stages),
//! checked once: [`DeploymentSpec`] and its engine's [`EngineOptions`], with their one conversion
//! to and from `awq.v1` each way. The coordinator checks a `Deploy` call into this type (plus what
//! needs the model on disk); the worker checks a `ServeReplica` command into it again at its own
//! edge, and turns the options into its engine's configuration.

use std::path::PathBuf;

use awq_proto::v1 as pb;

use crate::InvalidOption;

/// The longest deployment name: a DNS label, so that names work as Kubernetes names and labels.
pub const MAX_NAME_BYTES: usize = 63;

/// The most replicas a deployment may ask for (each is a worker): the coordinator keeps a record
/// per replica from the start, so a count that lies must not ask for billions of them.
pub const MAX_REPLICAS: usize = 1024;

/// A deployment's engine settings (vLLM's engine arguments); `None` takes the engine's default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineOptions {
    pub max_model_len: Option<usize>,
    pub max_num_seqs: Option<usize>,
    pub max_num_batched_tokens: Option<usize>,
    pub block_size: Option<usize>,
    pub gpu_memory_utilization: Option<f32>,
    pub kv_cache_bytes: Option<u64>,
    pub max_waiting: Option<usize>,
    pub enforce_eager: bool,
}

/// The longest served model name (what clients send as `model`).
pub const MAX_SERVED_NAME_BYTES: usize = 256;

/// A checked deployment (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct DeploymentSpec {
    /// The deployment's name in the cluster (`awq undeploy NAME`, the store's keys, Kubernetes
    /// labels): `[a-z0-9][a-z0-9._-]*`, at most [`MAX_NAME_BYTES`].
    pub name: String,
    /// What clients send as `model` (vLLM's `--served-model-name`): `name` unless the deployment
    /// gave another; printable text of at most [`MAX_SERVED_NAME_BYTES`].
    pub served_model_name: String,
    /// The checkpoint directory, as the workers see it.
    pub model: PathBuf,
    /// Tensor-parallel ranks of a replica.
    pub tp: usize,
    /// Pipeline stages of a replica (one worker each).
    pub pp: usize,
    pub replicas: usize,
    pub engine: EngineOptions,
}

/// Checks a served model name (see [`DeploymentSpec::served_model_name`]).
pub fn check_served_model_name(name: &str) -> Result<(), InvalidOption> {
    let field = "served_model_name";
    if name.trim().is_empty() {
        return Err(InvalidOption::new(field, "is empty"));
    }
    if name.len() > MAX_SERVED_NAME_BYTES {
        return Err(InvalidOption::new(field, format!("{} bytes, more than {MAX_SERVED_NAME_BYTES}", name.len())));
    }
    if name.chars().any(char::is_control) {
        return Err(InvalidOption::new(field, format!("{name:?} holds control characters")));
    }
    Ok(())
}

/// Checks a deployment name (see [`DeploymentSpec::name`]).
pub fn check_name(name: &str) -> Result<(), InvalidOption> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'));
    match ok {
        true => Ok(()),
        false => Err(InvalidOption::new(
            "name",
            format!("{name:?} is not [a-z0-9][a-z0-9._-]* of at most {MAX_NAME_BYTES} bytes"),
        )),
    }
}

impl TryFrom<&pb::DeploymentSpec> for DeploymentSpec {
    type Error = InvalidOption;

    /// Every field checked, the error naming it: a name ([`check_name`]), a model path, `tp`,
    /// `pp` and `replicas` of at least 1 (`replicas` at most [`MAX_REPLICAS`]),
    /// engine options in range.
    fn try_from(s: &pb::DeploymentSpec) -> Result<DeploymentSpec, InvalidOption> {
        check_name(&s.name)?;
        let served_model_name = match s.served_model_name.as_str() {
            "" => s.name.clone(),
            served => {
                check_served_model_name(served)?;
                served.to_string()
            }
        };
        if s.model_path.is_empty() {
            return Err(InvalidOption::new("model_path", "missing"));
        }
        let at_least_one = |field: &'static str, v: u32| match v {
            0 => Err(InvalidOption::new(field, "must be at least 1")),
            v => Ok(v as usize),
        };
        let (tp, pp, replicas) =
            (at_least_one("tp", s.tp)?, at_least_one("pp", s.pp)?, at_least_one("replicas", s.replicas)?);
        if replicas > MAX_REPLICAS {
            return Err(InvalidOption::new("replicas", format!("{replicas} is more than {MAX_REPLICAS}")));
        }
        let e = s.engine.clone().unwrap_or_default();
        let set = |v: u32| (v > 0).then_some(v as usize);
        let utilization = match e.gpu_memory_utilization {
            0.0 => None,
            u if u > 0.0 && u <= 1.0 => Some(u),
            u => return Err(InvalidOption::new("engine.gpu_memory_utilization", format!("{u} is not in (0, 1]"))),
        };
        Ok(DeploymentSpec {
            name: s.name.clone(),
            served_model_name,
            model: PathBuf::from(&s.model_path),
            tp,
            pp,
            replicas,
            engine: EngineOptions {
                max_model_len: set(e.max_model_len),
                max_num_seqs: set(e.max_num_seqs),
                max_num_batched_tokens: set(e.max_num_batched_tokens),
                block_size: set(e.block_size),
                gpu_memory_utilization: utilization,
                kv_cache_bytes: (e.kv_cache_bytes > 0).then_some(e.kv_cache_bytes),
                max_waiting: set(e.max_waiting),
                enforce_eager: e.enforce_eager,
            },
        })
    }
}

impl From<&DeploymentSpec> for pb::DeploymentSpec {
    fn from(s: &DeploymentSpec) -> pb::DeploymentSpec {
        let e = &s.engine;
        let n = |v: Option<usize>| v.map_or(0, |v| u32::try_from(v).unwrap_or(u32::MAX));
        pb::DeploymentSpec {
            name: s.name.clone(),
            model_path: s.model.to_string_lossy().into_owned(),
            tp: s.tp as u32,
            pp: s.pp as u32,
            replicas: s.replicas as u32,
            engine: Some(pb::EngineOptions {
                max_model_len: n(e.max_model_len),
                max_num_seqs: n(e.max_num_seqs),
                max_num_batched_tokens: n(e.max_num_batched_tokens),
                block_size: n(e.block_size),
                gpu_memory_utilization: e.gpu_memory_utilization.unwrap_or(0.0),
                kv_cache_bytes: e.kv_cache_bytes.unwrap_or(0),
                max_waiting: n(e.max_waiting),
                enforce_eager: e.enforce_eager,
            }),
            served_model_name: s.served_model_name.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_crosses_the_wire_and_bad_fields_are_named() {
        let spec = DeploymentSpec {
            name: "smol-2".into(),
            served_model_name: "HuggingFaceTB/SmolLM2-135M".into(),
            model: "/models/smol".into(),
            tp: 3,
            pp: 1,
            replicas: 2,
            engine: EngineOptions {
                max_model_len: Some(512),
                gpu_memory_utilization: Some(0.8),
                enforce_eager: true,
                ..Default::default()
            },
        };
        let wire = pb::DeploymentSpec::from(&spec);
        assert_eq!(DeploymentSpec::try_from(&wire).unwrap(), spec);
        let bad = |f: fn(&mut pb::DeploymentSpec), field: &str| {
            let mut w = wire.clone();
            f(&mut w);
            assert_eq!(DeploymentSpec::try_from(&w).unwrap_err().field, field);
        };
        bad(|w| w.name = "Smol".into(), "name");
        bad(|w| w.name = "-x".into(), "name");
        bad(|w| w.name = "a".repeat(64), "name");
        bad(|w| w.model_path.clear(), "model_path");
        bad(|w| w.served_model_name = " ".into(), "served_model_name");
        bad(|w| w.served_model_name = "a\nb".into(), "served_model_name");
        bad(|w| w.served_model_name = "m".repeat(257), "served_model_name");
        let unnamed = pb::DeploymentSpec { served_model_name: String::new(), ..wire.clone() };
        assert_eq!(DeploymentSpec::try_from(&unnamed).unwrap().served_model_name, "smol-2", "served as its name");
        bad(|w| w.tp = 0, "tp");
        bad(|w| w.replicas = 0, "replicas");
        bad(|w| w.replicas = u32::MAX, "replicas");
        bad(|w| w.engine.as_mut().unwrap().gpu_memory_utilization = 1.5, "engine.gpu_memory_utilization");
    }
}
