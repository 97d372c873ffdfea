#!/usr/bin/env python3
"""Independent reader of AutoAWQ "GEMM" 4-bit checkpoints (numpy + safetensors, no torch).

usage: awq_dequant.py AWQ_DIR OUT_DIR

Checks every tensor of the checkpoint in AWQ_DIR (one model.safetensors, or
model.safetensors.index.json + shards) against the format rules and its config.json, then writes a
plain float16 Hugging Face checkpoint to OUT_DIR: every quantized linear dequantized to `.weight`,
everything else copied, config.json without quantization_config, tokenizer files copied. Exits
non-zero with a message on the first rule that does not hold.

Written from the format rules alone (AutoAWQ 0.2.9, `WQLinear_GEMM`), not from awq-cluster's code:
- per linear with weight [out, in] and group size g, `<module>.weight` is replaced by
    qweight I32 [in, out/8]: int32 column c of row i holds 8 nibbles; nibble k (bits 4k..4k+4) is the
                             code of output 8c + ORDER[k], ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
    qzeros  I32 [in/g, out/8]: the zero point of each (group, output), packed the same way
    scales  F16 [in/g, out]
  and dequantizes as w[o, i] = (q[i, o] - z[i // g, o]) * s[i // g, o];
- symmetric quantization (zero_point false) is stored as codes + 8 with every zero point 8;
- biases, embeddings, norms (Qwen3's per-head q_norm / k_norm of [head_dim] too: not quantized) and
  lm_head are float16 under their usual names;
- Phi-3 stores q|k|v as one linear self_attn.qkv_proj ([heads*hd + 2*kv*hd, h]) and gate|up as
  mlp.gate_up_proj ([2*inter, h]), each quantized as one AutoAWQ linear: it dequantizes like any
  other, and the float16 output keeps the fused names (as transformers' Phi3 reads them);
- Gemma 3 (gemma3_text, transformers' Gemma3DecoderLayer) has four norms of [h] per block
  (input_layernorm, post_attention_layernorm, pre_feedforward_layernorm, post_feedforward_layernorm)
  and q_norm / k_norm of [head_dim], none quantized; its MLP has no biases, its attention has them
  only with attention_bias; its embeddings are tied unless tie_word_embeddings says false;
- mixture of experts (transformers' MixtralSparseMoeBlock, Qwen3MoeSparseMoeBlock): a sparse layer
  has a router `<moe>.gate.weight` [experts, h] that is NOT quantized (float16 under its name) and
  per expert e `<moe>.experts.{e}.<gate>`, `<up>` [w, h] and `<down>` [h, w], quantized like any
  linear, no biases. Mixtral: `<moe>` = block_sparse_moe, linears w1 (gate), w3 (up), w2 (down),
  w = intermediate_size, every layer sparse, experts = num_local_experts. Qwen3-MoE: `<moe>` = mlp,
  linears gate_proj, up_proj, down_proj, w = moe_intermediate_size, experts = num_experts (or
  num_local_experts); layer i is sparse when it is not in mlp_only_layers, there are experts and
  (i + 1) % decoder_sparse_step == 0, else it has the dense mlp of intermediate_size; q_norm, k_norm;
- config.json has quantization_config = {quant_method: "awq", bits: 4, group_size, zero_point,
  version: "gemm", modules_to_not_convert} and torch_dtype float16. modules_to_not_convert is null
  for a model without routers; with routers it is a list of names that loaders match against module
  paths as substrings (transformers 4, vLLM): every router must match one, and no quantized linear
  may (else a loader would read a packed linear as a float one).

Knows the Llama-family layout (model_type llama, mistral, qwen2, qwen3), Phi-3's fused one (phi3),
Gemma 3's (gemma3_text) and the mixtures of experts (mixtral, qwen3_moe).
"""
import json
import os
import shutil
import struct
import sys

import numpy as np
from safetensors.numpy import save_file

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
NORMS = {"gemma3_text": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                         "post_feedforward_layernorm"]}
LLAMA_NORMS = ["input_layernorm", "post_attention_layernorm"]
QK_NORMS = ["self_attn.q_norm", "self_attn.k_norm"]
HEAD_NORMS = {"qwen3": QK_NORMS, "gemma3_text": QK_NORMS, "qwen3_moe": QK_NORMS}
# Gemma3TextConfig ties the LM head to the embeddings unless told otherwise; the others do not.
TIED_BY_DEFAULT = {"gemma3_text"}
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "added_tokens.json"]
ST_DTYPES = {"F16": np.float16, "F32": np.float32, "BF16": None, "I32": np.int32, "I64": np.int64,
             "F64": np.float64, "I16": np.int16, "I8": np.int8, "U8": np.uint8}


class FormatError(Exception):
    pass


def fail(msg):
    raise FormatError(msg)


def read_safetensors(path):
    """{name: (dtype string, numpy array)} read straight from the file (header parsed here, so the
    stored dtype string is what gets checked, not numpy's idea of it)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        fail(f"{path}: too short for a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    out = {}
    end_max = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt, shape, (b, e) = info["dtype"], info["shape"], info["data_offsets"]
        np_dt = ST_DTYPES.get(dt)
        if np_dt is None:
            fail(f"{path}: {name}: dtype {dt} is not expected in an AWQ GEMM checkpoint")
        count = int(np.prod(shape)) if shape else 1
        if e - b != count * np.dtype(np_dt).itemsize:
            fail(f"{path}: {name}: {e - b} bytes for {dt} {shape}")
        arr = np.frombuffer(body[b:e], dtype=np.dtype(np_dt).newbyteorder("<")).reshape(shape)
        out[name] = (dt, arr)
        end_max = max(end_max, e)
    if end_max != len(body):
        fail(f"{path}: {len(body) - end_max} bytes after the last tensor")
    return out


def load_tensors(d):
    index_path = os.path.join(d, "model.safetensors.index.json")
    single = os.path.join(d, "model.safetensors")
    if os.path.exists(index_path):
        if os.path.exists(single):
            fail(f"{d}: both model.safetensors and model.safetensors.index.json")
        index = json.load(open(index_path))
        weight_map = index["weight_map"]
        tensors, seen_total = {}, 0
        for file in sorted(set(weight_map.values())):
            for name, (dt, arr) in read_safetensors(os.path.join(d, file)).items():
                if weight_map.get(name) != file:
                    fail(f"{index_path}: {name} is in {file} but the index says {weight_map.get(name)}")
                if name in tensors:
                    fail(f"{d}: {name} stored twice")
                tensors[name] = (dt, arr)
                seen_total += arr.nbytes
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            fail(f"{index_path}: names tensors no shard holds: {missing[:5]}")
        total = index.get("metadata", {}).get("total_size")
        if total is not None and total != seen_total:
            fail(f"{index_path}: metadata.total_size {total}, tensors hold {seen_total} bytes")
        return tensors
    if not os.path.exists(single):
        fail(f"{d}: neither model.safetensors nor model.safetensors.index.json")
    return read_safetensors(single)


def check_quantization_config(cfg):
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict):
        fail("config.json: no quantization_config object")
    expected_keys = {"quant_method", "bits", "group_size", "zero_point", "version", "modules_to_not_convert"}
    if set(qc) != expected_keys:
        fail(f"config.json: quantization_config has keys {sorted(qc)}, expected {sorted(expected_keys)}")
    if qc["quant_method"] != "awq":
        fail(f"config.json: quantization_config.quant_method is {qc['quant_method']!r}, expected 'awq'")
    if qc["bits"] != 4 or isinstance(qc["bits"], bool):
        fail(f"config.json: quantization_config.bits is {qc['bits']!r}, expected 4")
    if qc["group_size"] not in (32, 64, 128) or isinstance(qc["group_size"], bool):
        fail(f"config.json: quantization_config.group_size is {qc['group_size']!r}, expected 32, 64 or 128")
    if not isinstance(qc["zero_point"], bool):
        fail(f"config.json: quantization_config.zero_point is {qc['zero_point']!r}, expected a boolean")
    if qc["version"] != "gemm":
        fail(f"config.json: quantization_config.version is {qc['version']!r}, expected 'gemm'")
    not_convert = qc["modules_to_not_convert"]
    names = isinstance(not_convert, list) and all(isinstance(m, str) and m for m in not_convert)
    if not_convert is not None and not names:
        fail(f"config.json: quantization_config.modules_to_not_convert is {not_convert!r}, "
             "expected null or a list of names")
    if cfg.get("torch_dtype") != "float16":
        fail(f"config.json: torch_dtype is {cfg.get('torch_dtype')!r}, expected 'float16'")
    return qc["group_size"], qc["zero_point"], not_convert


def moe_layout(cfg, layer):
    """(router module, [(expert e, {linear suffix: [out, in]})]) of a sparse layer, or None."""
    kind, h = cfg["model_type"], cfg["hidden_size"]
    if kind == "mixtral":
        prefix, names, n, w = "block_sparse_moe", ("w1", "w3", "w2"), cfg["num_local_experts"], cfg["intermediate_size"]
    elif kind == "qwen3_moe":
        n = cfg.get("num_experts", cfg.get("num_local_experts", 0))
        step, dense = cfg.get("decoder_sparse_step", 1), cfg.get("mlp_only_layers") or []
        sparse = layer not in dense and n > 0 and (layer + 1) % step == 0
        if not sparse:
            return None
        prefix, names, w = "mlp", ("gate_proj", "up_proj", "down_proj"), cfg["moe_intermediate_size"]
    else:
        return None
    gate, up, down = names
    experts = [{f"{prefix}.experts.{e}.{gate}": [w, h], f"{prefix}.experts.{e}.{up}": [w, h],
                f"{prefix}.experts.{e}.{down}": [h, w]} for e in range(n)]
    return f"{prefix}.gate", n, experts


def linear_shapes(cfg, layer):
    """{linear suffix: ([out, in], has bias)} for one block; and its router's (suffix, experts) or None."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim") or h // heads
    kind = cfg["model_type"]
    known = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text", "mixtral", "qwen3_moe")
    if kind not in known:
        fail(f"config.json: model_type {kind!r} is not one this reader knows ({', '.join(known)})")
    if kind == "phi3":  # transformers' Phi3Attention and Phi3MLP: bias=False everywhere
        return {
            "self_attn.qkv_proj": ([(heads + 2 * kv) * hd, h], False),
            "self_attn.o_proj": ([h, heads * hd], False),
            "mlp.gate_up_proj": ([2 * inter, h], False),
            "mlp.down_proj": ([h, inter], False),
        }, None
    # Mistral and Mixtral have no attention_bias field: no biases.
    attn_bias = kind == "qwen2" or (kind not in ("mistral", "mixtral") and bool(cfg.get("attention_bias")))
    o_bias = kind not in ("qwen2", "mistral", "mixtral") and bool(cfg.get("attention_bias"))
    mlp_bias = kind not in ("qwen2", "qwen3", "gemma3_text", "qwen3_moe") and bool(cfg.get("mlp_bias"))
    shapes = {
        "self_attn.q_proj": ([heads * hd, h], attn_bias),
        "self_attn.k_proj": ([kv * hd, h], attn_bias),
        "self_attn.v_proj": ([kv * hd, h], attn_bias),
        "self_attn.o_proj": ([h, heads * hd], o_bias),
    }
    moe = moe_layout(cfg, layer)
    if moe is None:
        if kind == "mixtral":
            fail("config.json: a mixtral model without experts")
        shapes.update({
            "mlp.gate_proj": ([inter, h], mlp_bias),
            "mlp.up_proj": ([inter, h], mlp_bias),
            "mlp.down_proj": ([h, inter], mlp_bias),
        })
        return shapes, None
    router, n, experts = moe
    for linears in experts:
        shapes.update({name: (shape, False) for name, shape in linears.items()})
    return shapes, (router, n)


def unpack(packed):
    """int32 [rows, cols/8] -> int32 [rows, cols] of nibbles: nibble k of column c is column 8c + ORDER[k]."""
    u = packed.view(np.uint32)
    rows, words = u.shape
    out = np.empty((rows, words * 8), dtype=np.int32)
    for k, o in enumerate(ORDER):
        out[:, o::8] = ((u >> np.uint32(4 * k)) & np.uint32(0xF)).astype(np.int32)
    return out


def take(tensors, name, dtype, shape):
    if name not in tensors:
        fail(f"missing tensor {name}")
    dt, arr = tensors.pop(name)
    if dt != dtype:
        fail(f"{name}: dtype {dt}, expected {dtype}")
    if list(arr.shape) != list(shape):
        fail(f"{name}: shape {list(arr.shape)}, expected {list(shape)}")
    return arr


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__.split("\n\n")[1])
    src, dst = sys.argv[1], sys.argv[2]
    cfg = json.load(open(os.path.join(src, "config.json")))
    g, zero_point, not_convert = check_quantization_config(cfg)
    tensors = load_tensors(src)
    h, vocab, n_layers = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    out = {}
    n_linears = 0
    layouts = [linear_shapes(cfg, layer) for layer in range(n_layers)]
    routers = [f"model.layers.{layer}.{r[0]}" for layer, (_, r) in enumerate(layouts) if r is not None]
    # What loaders leave unquantized: the modules some entry of modules_to_not_convert is a substring of.
    skipped = lambda module: any(name in module for name in (not_convert or []))
    if routers and not_convert is None:
        fail(f"config.json: quantization_config.modules_to_not_convert is null, but {routers[0]} is not quantized")
    if not routers and not_convert is not None:
        fail(f"config.json: quantization_config.modules_to_not_convert is {not_convert!r} in a model without routers")
    for r in routers:
        if not skipped(r):
            fail(f"config.json: quantization_config.modules_to_not_convert {not_convert!r} "
                 f"does not name the router {r}")

    out["model.embed_tokens.weight"] = take(tensors, "model.embed_tokens.weight", "F16", [vocab, h])
    out["model.norm.weight"] = take(tensors, "model.norm.weight", "F16", [h])
    if not cfg.get("tie_word_embeddings", cfg["model_type"] in TIED_BY_DEFAULT):
        out["lm_head.weight"] = take(tensors, "lm_head.weight", "F16", [vocab, h])
    for layer in range(n_layers):
        p = f"model.layers.{layer}."
        for norm in NORMS.get(cfg["model_type"], LLAMA_NORMS):
            out[p + norm + ".weight"] = take(tensors, p + norm + ".weight", "F16", [h])
        for norm in HEAD_NORMS.get(cfg["model_type"], []):
            out[p + norm + ".weight"] = take(tensors, p + norm + ".weight", "F16", [hd])
        shapes, router = layouts[layer]
        if router is not None:
            name, n_experts = router
            if p + name + ".qweight" in tensors:
                fail(f"{p}{name}: the router must not be quantized")
            out[p + name + ".weight"] = take(tensors, p + name + ".weight", "F16", [n_experts, h])
        for lin in shapes:
            m = p + lin
            if skipped(m):
                fail(f"{m}: quantization_config.modules_to_not_convert {not_convert!r} matches this quantized linear")
            n_linears += 1
            (o, i), has_bias = shapes[lin]
            if m + ".weight" in tensors:
                fail(f"{m}.weight: a quantized linear must not keep its float weight")
            if i % g or o % 8:
                fail(f"{m}: [{o}, {i}] cannot be stored with group size {g}")
            qweight = take(tensors, m + ".qweight", "I32", [i, o // 8])
            qzeros = take(tensors, m + ".qzeros", "I32", [i // g, o // 8])
            scales = take(tensors, m + ".scales", "F16", [i // g, o])
            q, z = unpack(qweight), unpack(qzeros)
            if not zero_point and not np.all(z == 8):
                bad = np.argwhere(z != 8)[0]
                fail(f"{m}.qzeros: zero_point is false, so every zero must be 8; group {bad[0]}, output {bad[1]} holds {z[tuple(bad)]}")
            s32 = scales.astype(np.float32)
            if not np.all(np.isfinite(s32)) or not np.all(s32 > 0):
                fail(f"{m}.scales: not all finite and positive")
            # w[o, i] = (q[i, o] - z[i // g, o]) * s[i // g, o]; the product of a small integer and
            # an f16 is exact in f32, then rounded once to f16.
            zz = np.repeat(z, g, axis=0)
            ss = np.repeat(s32, g, axis=0)
            w = ((q - zz).astype(np.float32) * ss).T.astype(np.float16)
            out[m + ".weight"] = np.ascontiguousarray(w)
            if has_bias:
                out[m + ".bias"] = take(tensors, m + ".bias", "F16", [o])
    if tensors:
        fail(f"unexpected tensors: {sorted(tensors)[:10]}")

    os.makedirs(dst, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in out.items()}, os.path.join(dst, "model.safetensors"),
              metadata={"format": "pt"})
    plain = {k: v for k, v in cfg.items() if k != "quantization_config"}
    plain["torch_dtype"] = "float16"
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(plain, f, indent=2)
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    print(f"awq_dequant: ok: {n_layers} blocks, {n_linears} linears, {len(routers)} routers, group size {g}, "
          f"zero_point {zero_point}")


if __name__ == "__main__":
    try:
        main()
    except FormatError as e:
        print(f"awq_dequant: error: {e}", file=sys.stderr)
        sys.exit(1)
