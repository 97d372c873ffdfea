//! The one conversion between the typed values of this crate and their `awq.v1` messages, in
//! each direction. From the wire, every field is checked by the typed constructors and an error
//! names the wire field; to the wire, nothing can fail.

use std::path::PathBuf;

use awq_kernels::{DType, Device};
use awq_proto::v1 as pb;

use crate::{CalibOptions, CalibSource, EngineDtype, InvalidOption, JobOptions, Method};

impl TryFrom<&pb::QuantOptions> for JobOptions {
    type Error = InvalidOption;

    fn try_from(o: &pb::QuantOptions) -> Result<JobOptions, InvalidOption> {
        let method = match o.quant_method() {
            pb::QuantMethod::Awq => Method::Awq,
            pb::QuantMethod::Rtn => Method::Rtn,
            pb::QuantMethod::Unspecified => {
                return Err(InvalidOption::new("options.quant_method", format!("{} is not awq or rtn", o.quant_method)))
            }
        };
        let engine_dtype = match pb::EngineDtype::try_from(o.engine_dtype) {
            Ok(pb::EngineDtype::DeviceDefault) => EngineDtype::DeviceDefault,
            Ok(pb::EngineDtype::F32) => EngineDtype::Fixed(DType::F32),
            Ok(pb::EngineDtype::F16) => EngineDtype::Fixed(DType::F16),
            Ok(pb::EngineDtype::Bf16) => EngineDtype::Fixed(DType::BF16),
            Err(_) => {
                return Err(InvalidOption::new(
                    "options.engine_dtype",
                    format!("{} is not a known dtype", o.engine_dtype),
                ))
            }
        };
        let calib_source = match o.calib_path.as_str() {
            "" => CalibSource::BuiltIn,
            path => JobOptions::calib_file(PathBuf::from(path))?,
        };
        Ok(JobOptions {
            quant: JobOptions::quant_spec(o.w_bit.into(), o.group_size.into(), o.zero_point)?,
            method,
            calib: CalibOptions::new(o.n_samples as usize, o.seqlen as usize, o.seed)?,
            calib_source,
            engine_dtype,
            max_shard_bytes: JobOptions::shard_bytes(o.max_shard_bytes)?,
        })
    }
}

impl From<&JobOptions> for pb::QuantOptions {
    fn from(o: &JobOptions) -> pb::QuantOptions {
        let quant_method = match o.method {
            Method::Awq => pb::QuantMethod::Awq,
            Method::Rtn => pb::QuantMethod::Rtn,
        };
        let engine_dtype = match o.engine_dtype {
            EngineDtype::DeviceDefault => pb::EngineDtype::DeviceDefault,
            EngineDtype::Fixed(DType::F32) => pb::EngineDtype::F32,
            EngineDtype::Fixed(DType::F16) => pb::EngineDtype::F16,
            EngineDtype::Fixed(DType::BF16) => pb::EngineDtype::Bf16,
        };
        pb::QuantOptions {
            w_bit: o.quant.bits,
            group_size: o.quant.group_size.get() as u32,
            zero_point: o.quant.zero_point,
            n_samples: o.calib.n_samples as u32,
            seqlen: o.calib.seqlen as u32,
            seed: o.calib.seed,
            calib_path: match &o.calib_source {
                CalibSource::BuiltIn => String::new(),
                CalibSource::File(path) => path.to_string_lossy().into_owned(),
            },
            max_shard_bytes: o.max_shard_bytes,
            quant_method: quant_method as i32,
            engine_dtype: engine_dtype as i32,
        }
    }
}

/// The device a message names; `field` is the message's field, for the error.
pub fn device_from_wire(device: Option<&pb::Device>, field: &'static str) -> Result<Device, InvalidOption> {
    let d = device.ok_or_else(|| InvalidOption::new(field, "missing"))?;
    match pb::DeviceKind::try_from(d.kind) {
        Ok(pb::DeviceKind::Cpu) => Ok(Device::Cpu),
        Ok(pb::DeviceKind::Cuda) => Ok(Device::Cuda(d.ordinal as usize)),
        Err(_) => Err(InvalidOption::new(field, format!("device kind {} is not cpu or cuda", d.kind))),
    }
}

/// A worker's serving devices from its join (`serving_devices`): `compute` alone when none are
/// given; else `compute` first, each once, GPUs alone (a CPU worker serves on the CPU).
pub fn serving_devices_from_wire(compute: Device, wire: &[pb::Device]) -> Result<Vec<Device>, InvalidOption> {
    const FIELD: &str = "serving_devices";
    if wire.is_empty() {
        return Ok(vec![compute]);
    }
    let devices = wire.iter().map(|d| device_from_wire(Some(d), FIELD)).collect::<Result<Vec<_>, _>>()?;
    let names = || devices.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",");
    if devices[0] != compute {
        return Err(InvalidOption::new(FIELD, format!("[{}] must start with compute_device {compute}", names())));
    }
    if devices.len() > 1 && devices.contains(&Device::Cpu) {
        return Err(InvalidOption::new(FIELD, format!("[{}]: the CPU serves alone", names())));
    }
    if devices.iter().enumerate().any(|(i, d)| devices[..i].contains(d)) {
        return Err(InvalidOption::new(FIELD, format!("[{}] names a device twice", names())));
    }
    Ok(devices)
}

/// The message of `device`.
pub fn device_to_wire(device: Device) -> pb::Device {
    match device {
        Device::Cpu => pb::Device { kind: pb::DeviceKind::Cpu as i32, ordinal: 0 },
        Device::Cuda(ordinal) => pb::Device { kind: pb::DeviceKind::Cuda as i32, ordinal: ordinal as u32 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GroupSize, QuantSpec};

    #[test]
    fn serving_devices_start_with_the_compute_device_and_name_each_gpu_once() {
        let wire = |ds: &[Device]| ds.iter().map(|&d| device_to_wire(d)).collect::<Vec<_>>();
        let (cpu, g0, g1) = (Device::Cpu, Device::Cuda(0), Device::Cuda(1));
        assert_eq!(serving_devices_from_wire(g0, &[]).unwrap(), [g0]);
        assert_eq!(serving_devices_from_wire(g0, &wire(&[g0, g1])).unwrap(), [g0, g1]);
        assert_eq!(serving_devices_from_wire(cpu, &wire(&[cpu])).unwrap(), [cpu]);
        for (compute, bad) in [(g0, vec![g1, g0]), (g0, vec![g0, g0]), (g0, vec![g0, cpu]), (cpu, vec![cpu, g0])] {
            let err = serving_devices_from_wire(compute, &wire(&bad)).unwrap_err();
            assert_eq!(err.field, "serving_devices", "{bad:?}: {err:?}");
        }
    }

    fn options() -> JobOptions {
        JobOptions {
            quant: QuantSpec { bits: 4, group_size: GroupSize::G64, zero_point: false },
            method: Method::Rtn,
            calib: CalibOptions { n_samples: 16, seqlen: 256, seed: 7 },
            calib_source: CalibSource::File("/data/calib.jsonl".into()),
            engine_dtype: EngineDtype::Fixed(DType::BF16),
            max_shard_bytes: 1 << 30,
        }
    }

    #[test]
    fn options_survive_the_wire() {
        let o = options();
        assert_eq!(JobOptions::try_from(&pb::QuantOptions::from(&o)).unwrap(), o);
        let o = JobOptions {
            method: Method::Awq,
            calib_source: CalibSource::BuiltIn,
            engine_dtype: EngineDtype::DeviceDefault,
            ..o
        };
        assert_eq!(JobOptions::try_from(&pb::QuantOptions::from(&o)).unwrap(), o);
    }

    #[test]
    fn bad_wire_options_name_their_field() {
        let good = pb::QuantOptions::from(&options());
        let refused = |o: pb::QuantOptions| JobOptions::try_from(&o).unwrap_err().field;
        assert_eq!(refused(pb::QuantOptions { quant_method: 0, ..good.clone() }), "options.quant_method");
        assert_eq!(refused(pb::QuantOptions { quant_method: 9, ..good.clone() }), "options.quant_method");
        assert_eq!(refused(pb::QuantOptions { engine_dtype: 9, ..good.clone() }), "options.engine_dtype");
        assert_eq!(refused(pb::QuantOptions { group_size: 48, ..good.clone() }), "options.group_size");
        assert_eq!(refused(pb::QuantOptions { w_bit: 8, ..good.clone() }), "options.w_bit");
        assert_eq!(refused(pb::QuantOptions { seqlen: 0, ..good.clone() }), "options.n_samples");
        assert_eq!(refused(pb::QuantOptions { calib_path: "rel/path".into(), ..good.clone() }), "options.calib_path");
        assert_eq!(refused(pb::QuantOptions { max_shard_bytes: 0, ..good }), "options.max_shard_bytes");
    }

    #[test]
    fn devices_survive_the_wire_and_unknown_kinds_are_refused() {
        for device in [Device::Cpu, Device::Cuda(0), Device::Cuda(7)] {
            assert_eq!(device_from_wire(Some(&device_to_wire(device)), "d").unwrap(), device);
        }
        assert_eq!(device_from_wire(None, "compute_device").unwrap_err().field, "compute_device");
        let odd = pb::Device { kind: 5, ordinal: 0 };
        assert!(device_from_wire(Some(&odd), "d").unwrap_err().detail.contains("kind 5"));
    }
}
