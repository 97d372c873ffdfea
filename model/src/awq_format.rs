//! AutoAWQ's "GEMM" checkpoint format for 4-bit linears, the one transformers, vLLM and AutoAWQ load
//! (`WQLinear_GEMM.from_linear` in AutoAWQ 0.2.9, awq/modules/linear/gemm.py).
//!
//! For a linear with weight `[out, in]` and group size `g`, three tensors replace `weight`:
//! - `qweight` I32 `[in, out / 8]`: for input channel `i`, int32 column `c` holds the codes of
//!   outputs `8c .. 8c + 8`, nibble `k` (bits `4k .. 4k + 4`) carrying output `8c + ORDER[k]`, with
//!   `ORDER = [0, 2, 4, 6, 1, 3, 5, 7]` (the interleave AWQ's GEMM kernel dequantizes fastest);
//! - `qzeros` I32 `[in / g, out / 8]`: the per-group zero points, packed the same way;
//! - `scales` F16 `[in / g, out]`.
//!
//! A weight dequantizes as `w[o, i] = (q[i, o] - z[i / g, o]) * s[i / g, o]`. Symmetric
//! quantization is stored as codes shifted by `2^(bits-1)` with that constant as the zero point, so
//! every GEMM loader reads it unchanged.

pub use awq_kernels::ops::{PackedLinear, AWQ_ORDER};
use awq_kernels::ops::{GroupSize, QuantSpec};

use crate::arch::{ArchDescriptor, LinearId};
use crate::ModelConfig;
use serde_json::{json, Value};

/// `quantization_config` as AutoAWQ writes it into config.json, for quantization `spec`;
/// `not_convert`: the modules left unquantized (a mixture of experts' routers,
/// `ArchDescriptor::modules_to_not_convert`), `null` when there are none.
pub fn quantization_config(spec: QuantSpec, not_convert: Option<&[String]>) -> Value {
    json!({
        "quant_method": "awq",
        "bits": spec.bits,
        "group_size": spec.group_size.get(),
        "zero_point": spec.zero_point,
        "version": "gemm",
        "modules_to_not_convert": not_convert,
    })
}

/// Reads a `quantization_config`: `Err(field, detail)` when it is not an AWQ GEMM config this
/// crate can read (4 bits, a positive group size).
pub fn read_quantization_config(v: &Value) -> Result<QuantSpec, (String, String)> {
    let field = |k: &str| format!("quantization_config.{k}");
    let method = v.get("quant_method").and_then(Value::as_str).unwrap_or("");
    if method != "awq" {
        return Err((field("quant_method"), format!("`{method}` is not supported (awq)")));
    }
    let version = v.get("version").and_then(Value::as_str).unwrap_or("gemm");
    if !version.eq_ignore_ascii_case("gemm") {
        return Err((field("version"), format!("`{version}` is not supported (gemm)")));
    }
    let bits = v.get("bits").or(v.get("w_bit")).and_then(Value::as_u64).ok_or((field("bits"), "missing".into()))?;
    if bits != 4 {
        return Err((field("bits"), format!("{bits} bits: only 4 is supported")));
    }
    let group_size =
        v.get("group_size").or(v.get("q_group_size")).and_then(Value::as_u64).ok_or((field("group_size"), "missing".into()))?;
    // Any positive size reads (dequantizing); the CUDA kernels say which sizes they run.
    let group_size = GroupSize::new(group_size).ok_or((field("group_size"), format!("{group_size} is not a positive group size")))?;
    // AutoAWQ's default (`zero_point=True` in its quant_config), also what it writes.
    let zero_point = v.get("zero_point").and_then(Value::as_bool).unwrap_or(true);
    Ok(QuantSpec { bits: 4, group_size, zero_point })
}

/// Checks, before any work, that every linear of a model can be quantized with `group_size` and
/// packed: input features a multiple of the group size, output features of 8. The error names the
/// first offending tensor.
pub fn check_quantizable(arch: &ArchDescriptor, config: &ModelConfig, group_size: GroupSize) -> crate::Result<()> {
    let group_size = group_size.get();
    // Each kind of linear once, named in the first block that has it: the attention's, the dense
    // MLP's where a block has one, an expert's where a block is sparse.
    let sparse = (0..config.n_blocks).find(|&b| arch.is_sparse(config, b));
    let dense = (0..config.n_blocks).find(|&b| !arch.is_sparse(config, b));
    let first_of = |b: Option<usize>| b.map(|b| arch.block_linears(config, b).into_iter().map(move |id| (b, id)));
    let mut seen: Vec<LinearId> = Vec::new();
    for (block_idx, id) in first_of(dense).into_iter().flatten().chain(first_of(sparse).into_iter().flatten()) {
        let kind = LinearId { expert: id.expert.map(|_| 0), ..id };
        if seen.contains(&kind) {
            continue;
        }
        seen.push(kind);
        let [out_f, in_f] = arch.linear_shape(id, config);
        if !in_f.is_multiple_of(group_size) || !out_f.is_multiple_of(8) {
            let hint = match [128, 64, 32].iter().find(|&&g| g < group_size && in_f.is_multiple_of(g)) {
                Some(g) if out_f.is_multiple_of(8) => format!(" (group size {g} divides it)"),
                _ => String::new(),
            };
            let tensor = arch.linear_name(block_idx, id);
            return Err(crate::Error::NotQuantizable { tensor, shape: [out_f, in_f], group_size, hint });
        }
    }
    Ok(())
}

/// config.json of an AWQ checkpoint of `arch` under `source` (its config): the source config with
/// `quantization_config` added (naming what `arch` leaves unquantized) and `torch_dtype` set to
/// float16 (the dtype of scales and unquantized tensors).
pub fn output_config(arch: &ArchDescriptor, source: &ModelConfig, spec: QuantSpec) -> serde_json::Map<String, Value> {
    let mut config = source.raw.clone();
    let not_convert = arch.modules_to_not_convert(source);
    config.insert("quantization_config".into(), quantization_config(spec, not_convert.as_deref()));
    config.insert("torch_dtype".into(), json!("float16"));
    config
}

#[cfg(test)]
mod tests {
    use super::*;
    use awq_kernels::ops::{pseudo_quantize, quantize_groups};
    use awq_kernels::rng::SplitMix64;
    use awq_kernels::{DType, Tensor};

    #[test]
    fn pack_then_dequantize_equals_pseudo_quantize() {
        let mut rng = SplitMix64::new(21);
        for zero_point in [true, false] {
            let spec = QuantSpec { bits: 4, group_size: GroupSize::G32, zero_point };
            let w = Tensor::from_f32(&[24, 96], rng.normal_vec(24 * 96, 0.05)).unwrap();
            let q = quantize_groups(&w, spec).unwrap();
            let packed = PackedLinear::from_groups(&q, spec);
            assert_eq!(awq_kernels::ops::quantize_packed(&w, spec).unwrap(), packed);
            assert_eq!((packed.qweight.len(), packed.qzeros.len(), packed.scales.len()), (96 * 3, 3 * 3, 3 * 24));
            let want = pseudo_quantize(&w, spec).unwrap();
            // Identical but for the f16 rounding of scales (relative 2^-11).
            let e = awq_kernels::ops::relative_error(&packed.dequantize().into_dtype(DType::F32), &want).unwrap();
            assert!(e < 1e-3, "zero_point {zero_point}: {e}");
            for o in 0..24 {
                for i in 0..96 {
                    let shift = if zero_point { 0 } else { 8 };
                    assert_eq!(packed.code(o, i) as i32, q.codes[o * 96 + i] as i32 + shift);
                }
            }
        }
    }
}
