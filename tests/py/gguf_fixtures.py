#!/usr/bin/env python3
"""GGUF files and reference dequantization for the `awq import gguf` tests, from the Python `gguf`
package (llama.cpp's gguf-py, pinned by ../shared/assets/fetch-model): an independent writer of the
format and an independent implementation of every block format.

usage:
  gguf_fixtures.py model OUT.gguf ARCH     write a tiny model of architecture ARCH (llama, qwen2,
                                           gemma3; any other name gets a one-tensor file of that name)
  gguf_fixtures.py dequant DIR             for every DIR/TYPE.bin (a whole number of blocks of GGML
                                           type TYPE), gguf.quants.dequantize into DIR/TYPE.f32
                                           (float32, little-endian)
  gguf_fixtures.py sizes                   print GGML_QUANT_SIZES as JSON {name: [elements, bytes]}

The tiny models are built like llama.cpp's converter builds real ones: 2 blocks, hidden 256, 4 heads
of 64 with 2 KV heads, FFN 512, a byte-level BPE vocabulary (the 256 GPT-2 byte characters, a few
merges, control, user-defined and unused tokens) and, between the two models, every block format the
importer supports: F32, F16, BF16 and the legacy formats come from gguf.quants.quantize of random
normal weights; the K formats (which gguf-py cannot quantize) are random bytes whose f16 scale fields
hold random finite values. The llama model has an untied output.weight and add_bos_token; the qwen2
model has q/k/v biases and tied embeddings. The gemma3 model (6 blocks, the last global) is laid out
as llama.cpp's Gemma3Model writes one: heads of `key_length`, per-head q/k norms, norms of the
attention's and the MLP's outputs, every norm weight stored as 1 + w, a sliding window, tied
embeddings, and a SentencePiece-style vocabulary (tokenizer.ggml.model llama: byte pieces, scored
pieces whose scores tie in pairs, control and user-defined tokens) with a space prefix. Fixed seed:
same arguments, same bytes.
"""
import glob
import json
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, BLOCKS, CONTEXT = 256, 4, 2, 64, 512, 2, 4096

# Byte offsets of the f16 scale fields inside one block (ggml-common.h block structs).
SCALE_FIELDS = {T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}

LAYOUT = {
    "llama": {
        "token_embd": T.Q6_K, "output": T.BF16,
        0: {"attn_q": T.Q4_K, "attn_k": T.Q5_K, "attn_v": T.Q5_0, "attn_output": T.Q5_1,
            "ffn_gate": T.Q4_0, "ffn_up": T.Q2_K, "ffn_down": T.Q3_K},
        1: {"attn_q": T.Q8_0, "attn_k": T.Q4_1, "attn_v": T.F16, "attn_output": T.BF16,
            "ffn_gate": T.Q6_K, "ffn_up": T.Q4_K, "ffn_down": T.Q5_K},
    },
    "gemma3": {
        "token_embd": T.Q8_0,
        0: {"attn_q": T.Q5_0, "attn_k": T.Q4_K, "attn_v": T.Q8_0, "attn_output": T.Q6_K,
            "ffn_gate": T.Q5_K, "ffn_up": T.F16, "ffn_down": T.Q3_K},
        1: {"attn_q": T.Q4_0, "attn_k": T.BF16, "attn_v": T.Q5_1, "attn_output": T.Q4_1,
            "ffn_gate": T.Q2_K, "ffn_up": T.Q6_K, "ffn_down": T.F32},
    },
    "qwen2": {
        "token_embd": T.Q8_0,
        0: {"attn_q": T.Q4_K, "attn_k": T.Q6_K, "attn_v": T.Q8_0, "attn_output": T.Q5_0,
            "ffn_gate": T.Q4_1, "ffn_up": T.Q3_K, "ffn_down": T.Q6_K},
        1: {"attn_q": T.Q5_K, "attn_k": T.Q2_K, "attn_v": T.Q4_0, "attn_output": T.Q5_1,
            "ffn_gate": T.F16, "ffn_up": T.BF16, "ffn_down": T.Q4_K},
    },
}
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "r e", "a n", "Ġa n", "Ġan d",
          "Ġ w", "o u", "e s", "Ġ c", "Ġ Ġ", "ĠĠ ĠĠ", "1 2", "Ċ Ċ", "Ġ 1"]


def bytes_to_unicode():
    """GPT-2's table from bytes to printable characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def vocab():
    tokens = bytes_to_unicode()
    for m in MERGES:
        merged = m.replace(" ", "")
        if merged not in tokens:
            tokens.append(merged)
    types = [gguf.TokenType.NORMAL] * len(tokens)
    for t, ty in [("<|endoftext|>", gguf.TokenType.CONTROL), ("<|im_start|>", gguf.TokenType.CONTROL),
                  ("<|im_end|>", gguf.TokenType.CONTROL), ("<tool_call>", gguf.TokenType.USER_DEFINED),
                  ("[PAD300]", gguf.TokenType.UNUSED), ("[PAD301]", gguf.TokenType.UNUSED)]:
        tokens.append(t)
        types.append(ty)
    return tokens, [int(t) for t in types]


# Pieces of the SentencePiece vocabulary beyond single characters ("▁" is its space), in id order.
SPM_PIECES = ["▁t", "he", "th", "the", "▁the", "in", "▁a", "er", "on", "▁s", "re", "an",
              "▁an", "nd", "and", "▁and", "▁w", "ou", "es", "▁c", "▁▁",
              "▁▁▁▁", "12", "ing", "▁of", "of", "en", "ed", "is", "▁is"]
SPM_CHARS = "▁" + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()"


def spm_vocab():
    """Gemma's layout: control <pad> <eos> <bos>, <unk>, the 256 byte pieces, single characters,
    scored pieces (every two share a score, so ties must go by id), control and user-defined tokens."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"]
    types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.UNKNOWN]
    scores = [0.0] * 4
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    scores += [0.0] * 256
    for i, c in enumerate(SPM_CHARS):
        tokens.append(c)
        types.append(gguf.TokenType.NORMAL)
        scores.append(-1000.0 - i)
    for i, piece in enumerate(SPM_PIECES):
        tokens.append(piece)
        types.append(gguf.TokenType.NORMAL)
        scores.append(-1.0 - i // 2)
    for t, ty in [("<start_of_turn>", gguf.TokenType.CONTROL), ("<end_of_turn>", gguf.TokenType.CONTROL),
                  ("\n\n", gguf.TokenType.USER_DEFINED), ("  ", gguf.TokenType.USER_DEFINED)]:
        tokens.append(t)
        types.append(ty)
        scores.append(-1000.0)
    return tokens, [int(t) for t in types], scores


def weights(rng, qtype, rows, cols):
    """A [rows, cols] tensor of `qtype` as the bytes (or floats) GGUFWriter.add_tensor takes."""
    if qtype in SCALE_FIELDS:
        block_len, block_bytes = GGML_QUANT_SIZES[qtype]
        blocks = rng.integers(0, 256, size=(rows * cols // block_len, block_bytes), dtype=np.uint8)
        for at in SCALE_FIELDS[qtype]:
            scale = rng.uniform(1e-4, 2e-2, size=blocks.shape[0]).astype(np.float16)
            blocks[:, at:at + 2] = scale.view(np.uint8).reshape(-1, 2)
        return blocks.reshape(rows, -1)
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    if qtype == T.F32:
        return w
    if qtype == T.F16:
        return w.astype(np.float16)
    return gguf.quants.quantize(w, qtype)


def write_model(path, arch):
    rng = np.random.default_rng(1234)
    writer = gguf.GGUFWriter(path, arch)
    gemma = arch == "gemma3"
    tokens, types = vocab() if not gemma else spm_vocab()[:2]
    if arch not in LAYOUT:
        writer.add_block_count(1)
        writer.add_tensor("token_embd.weight", weights(rng, T.F32, len(tokens), HIDDEN))
    else:
        layout = LAYOUT[arch]
        writer.add_name(f"Tiny {arch}")
        # Six gemma3 blocks, so that the last attends globally (every 6th does).
        n_blocks = 6 if gemma else BLOCKS
        writer.add_block_count(n_blocks)
        writer.add_context_length(CONTEXT)
        writer.add_embedding_length(HIDDEN)
        writer.add_feed_forward_length(FFN)
        writer.add_head_count(HEADS)
        writer.add_head_count_kv(KV_HEADS)
        writer.add_rope_freq_base(100000.0 if arch == "llama" else 1000000.0)
        writer.add_layer_norm_rms_eps(1e-5 if arch == "llama" else 1e-6)
        if gemma:
            # What llama.cpp's Gemma3Model writes: head sizes and the window, no rope dimensions.
            writer.add_key_length(HEAD_DIM)
            writer.add_value_length(HEAD_DIM)
            writer.add_sliding_window(16)
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")
            writer.add_token_list(tokens)
            writer.add_token_scores(spm_vocab()[2])
            writer.add_token_types(types)
            writer.add_bos_token_id(tokens.index("<bos>"))
            writer.add_eos_token_id(tokens.index("<eos>"))
            writer.add_unk_token_id(tokens.index("<unk>"))
            writer.add_pad_token_id(tokens.index("<pad>"))
            writer.add_add_bos_token(True)
            writer.add_add_space_prefix(True)
        else:
            writer.add_rope_dimension_count(HEAD_DIM)
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre("smollm" if arch == "llama" else "qwen2")
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            writer.add_token_merges(MERGES)
            writer.add_bos_token_id(tokens.index("<|im_start|>"))
            writer.add_eos_token_id(tokens.index("<|im_end|>"))
            writer.add_pad_token_id(tokens.index("<|endoftext|>"))
            writer.add_add_bos_token(arch == "llama")
            writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")

        n_vocab = len(tokens)
        writer.add_tensor("token_embd.weight", weights(rng, layout["token_embd"], n_vocab, HIDDEN),
                          raw_dtype=layout["token_embd"])
        for b in range(n_blocks):
            shapes = {"attn_q": (HEADS * HEAD_DIM, HIDDEN), "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
                      "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, HEADS * HEAD_DIM),
                      "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN)}
            norms = [("attn_norm", HIDDEN), ("ffn_norm", HIDDEN)]
            if gemma:
                norms += [("attn_q_norm", HEAD_DIM), ("attn_k_norm", HEAD_DIM), ("post_attention_norm", HIDDEN),
                          ("post_ffw_norm", HIDDEN)]
            for stem, n in norms:
                writer.add_tensor(f"blk.{b}.{stem}.weight", (1 + 0.1 * rng.standard_normal(n)).astype(np.float32))
            for stem, (rows, cols) in shapes.items():
                qtype = layout[b % 2][stem]
                raw = None if qtype in (T.F32, T.F16) else qtype
                writer.add_tensor(f"blk.{b}.{stem}.weight", weights(rng, qtype, rows, cols), raw_dtype=raw)
                if arch == "qwen2" and stem in ("attn_q", "attn_k", "attn_v"):
                    writer.add_tensor(f"blk.{b}.{stem}.bias", (0.1 * rng.standard_normal(rows)).astype(np.float32))
        writer.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
        if "output" in layout:
            writer.add_tensor("output.weight", weights(rng, layout["output"], n_vocab, HIDDEN), raw_dtype=layout["output"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main():
    args = sys.argv[1:]
    if len(args) == 3 and args[0] == "model":
        write_model(args[1], args[2])
    elif len(args) == 2 and args[0] == "dequant":
        for path in sorted(glob.glob(os.path.join(args[1], "*.bin"))):
            qtype = T[os.path.basename(path)[:-len(".bin")]]
            data = np.fromfile(path, dtype=np.uint8)
            out = np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32)
            out.astype("<f4").tofile(path[:-len(".bin")] + ".f32")
    elif len(args) == 1 and args[0] == "sizes":
        json.dump({t.name: list(GGML_QUANT_SIZES[t]) for t in GGML_QUANT_SIZES}, sys.stdout)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
