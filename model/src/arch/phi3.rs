//! Phi-3 (Phi-3-mini/small/medium with a 4k context, and every checkpoint that says
//! `model_type: phi3`): the Llama block with fused storage. `self_attn.qkv_proj` holds q's rows
//! (`heads * head_dim`), then k's and v's (`kv_heads * head_dim` each); `mlp.gate_up_proj` holds gate's
//! rows, then up's (transformers' `Phi3MLP`: `gate, up = gate_up_proj(x).chunk(2)`, then
//! `down(silu(gate) * up)`). No biases: transformers' `Phi3Attention` and `Phi3MLP` build every
//! linear with `bias=False`, and `Phi3Config` has no `attention_bias` / `mlp_bias`. `sliding_window`
//! applies when config.json sets it (Phi-3-mini-4k: 2047), as transformers' Phi-3 attention does.
//! The long-context models (Phi-3-*-128k, Phi-3.5, Phi-4-mini) use `longrope` RoPE scaling, which
//! config.rs refuses naming the field.
//!
//! Fusion is storage only: the roles stay apart everywhere else (forward pass, AWQ, tensor
//! parallelism). AWQ follows AutoAWQ 0.2.9's `Phi3AWQForCausalLM.get_layers_for_scaling`, whose four
//! groups are Llama's in our terms:
//! - input_layernorm -> qkv_proj, inspecting self_attn: [Q, K, V] (AutoAWQ's search concatenates a
//!   group's weights, so the fused tensor is the same matrix);
//! - qkv_proj -> o_proj: [O] from Linear(V). AutoAWQ's `scale_fc_fc` divides the last
//!   `o_proj.in_features` rows of qkv_proj, which are exactly v's rows only when there are as many KV
//!   heads as heads. Under grouped-query attention (Phi-3-medium: 40 heads, 10 KV heads) they would
//!   reach into k's and q's rows, an AutoAWQ bug we do not copy: `When::SameShape(V, O)` skips the
//!   group there, as for Llama;
//! - post_attention_layernorm -> gate_up_proj, inspecting mlp: [Gate, Up];
//! - gate_up_proj -> down_proj: [Down] from Linear(Up) (`scale_fc_fc` divides the last rows of
//!   gate_up_proj: up's half).
//!
//! Clipping: AutoAWQ's `avoid_clipping` (`q_`, `k_`, `query`, `key`, `Wqkv`) does not match
//! `qkv_proj`, so it clips the fused tensor, and the clip search is per output row: that is clipping
//! q, k and v each. `clip_skip` is empty.

use super::llama::LLAMA;
use super::{ArchDescriptor, Bias, ConfigDefaults, Dim, FusedLinear, LinearRole, LinearSpec, Split, WindowedBlocks};

pub const PHI3: ArchDescriptor = ArchDescriptor {
    model_type: "phi3",
    linears: &LINEARS,
    fused: &[
        FusedLinear { module: QKV, parts: &[LinearRole::Q, LinearRole::K, LinearRole::V] },
        FusedLinear { module: GATE_UP, parts: &[LinearRole::Gate, LinearRole::Up] },
    ],
    clip_skip: &[],
    windowed_blocks: WindowedBlocks::All,
    // Phi3Config (4.57 `__init__`, 5.x fields): Llama's defaults, except `rms_norm_eps=1e-5`
    // (`num_key_value_heads=None` -> `num_attention_heads`, `rope_theta=10000.0`, `hidden_act="silu"`,
    // `tie_word_embeddings=False`, `sliding_window=None`; the attention's head_dim is
    // `hidden_size // num_attention_heads`).
    config_defaults: ConfigDefaults { rms_norm_eps: 1e-5, ..LLAMA.config_defaults },
    // Llama's norms, tensor names outside the blocks and scaling groups (see the module docs).
    ..LLAMA
};

const QKV: &str = "self_attn.qkv_proj";
const GATE_UP: &str = "mlp.gate_up_proj";

const LINEARS: [LinearSpec; 7] = {
    use Dim::*;
    use LinearRole::*;
    use Split::*;
    let b = Bias::Never;
    [
        LinearSpec { role: Q, module: QKV, out_dim: QHeads, in_dim: Hidden, bias: b, split: Column },
        LinearSpec { role: K, module: QKV, out_dim: KvHeads, in_dim: Hidden, bias: b, split: Column },
        LinearSpec { role: V, module: QKV, out_dim: KvHeads, in_dim: Hidden, bias: b, split: Column },
        LinearSpec { role: O, module: "self_attn.o_proj", out_dim: Hidden, in_dim: QHeads, bias: b, split: Row },
        LinearSpec { role: Gate, module: GATE_UP, out_dim: Intermediate, in_dim: Hidden, bias: b, split: Column },
        LinearSpec { role: Up, module: GATE_UP, out_dim: Intermediate, in_dim: Hidden, bias: b, split: Column },
        LinearSpec { role: Down, module: "mlp.down_proj", out_dim: Hidden, in_dim: Intermediate, bias: b, split: Row },
    ]
};
