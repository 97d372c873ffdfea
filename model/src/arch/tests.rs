use super::*;

#[test]
fn registry_is_complete_and_unknown_types_are_named() {
    for d in REGISTRY {
        assert_eq!(d.linears.len(), LinearRole::ALL.len(), "{}", d.model_type);
        for role in LinearRole::ALL {
            d.linear(role);
        }
        // Attn and Mlp in every block, each role at most once, in role order (the order of a block's
        // norms in manifests and weights).
        assert!(d.has_norm(NormRole::Attn) && d.has_norm(NormRole::Mlp), "{}", d.model_type);
        assert!(d.norms.windows(2).all(|w| w[0].role < w[1].role), "{}", d.model_type);
        // The forward pass normalises q's and k's heads together or not at all, and both
        // sublayers' outputs or neither.
        assert_eq!(d.has_norm(NormRole::QHead), d.has_norm(NormRole::KHead), "{}", d.model_type);
        assert_eq!(d.has_norm(NormRole::AttnOut), d.has_norm(NormRole::MlpOut), "{}", d.model_type);
        // Output norms and per-head norms are never a scaling group's `prev`: AWQ does not scale them.
        for g in d.scaling_groups {
            let scalable = matches!(g.prev, Prev::Linear(_) | Prev::Norm(NormRole::Attn | NormRole::Mlp));
            assert!(scalable, "{}", d.model_type);
        }
        // Fused parts: two or more roles, each in one fused linear only, under its module, with
        // one input and one bias rule (readers and writers split and join them along the output
        // only). Roles apart from each other never share a module: a stored name is one tensor.
        for f in d.fused {
            assert!(f.parts.len() >= 2, "{} {}", d.model_type, f.module);
            for &r in f.parts {
                let (l, first) = (d.linear(r), d.linear(f.parts[0]));
                assert_eq!(l.module, f.module, "{} {r:?}", d.model_type);
                assert_eq!((l.in_dim, l.bias), (first.in_dim, first.bias), "{} {r:?}", f.module);
                assert_eq!(d.fused.iter().filter(|g| g.parts.contains(&r)).count(), 1, "{} {r:?}", d.model_type);
            }
        }
        for a in LinearRole::ALL {
            for b in LinearRole::ALL {
                let same_module = d.linear(a).module == d.linear(b).module;
                assert_eq!(same_module, d.stored_parts(a) == d.stored_parts(b), "{} {a:?} {b:?}", d.model_type);
            }
        }
        assert_eq!(d.stored_linears().flatten().copied().collect::<Vec<_>>(), LinearRole::ALL, "{}", d.model_type);
    }
    let err = descriptor_for("gpt2", Path::new("x/config.json")).unwrap_err().to_string();
    let supported = "(supported: llama, mistral, qwen2, qwen3, phi3, gemma3_text, mixtral, qwen3_moe)";
    assert_eq!(err, format!("x/config.json: model_type `gpt2` is not supported {supported}"));
    assert_eq!(llama::LLAMA.linear_name(3, LinearRole::Down), "model.layers.3.mlp.down_proj.weight");
}

/// Where each role of a fused tensor lives: its rows, the stored shape and name (Phi-3-medium's
/// sizes: 40 heads and 10 KV heads of 128, hidden 5120, intermediate 17920).
#[test]
fn fused_roles_map_to_rows_of_one_stored_tensor() {
    let text = r#"{"model_type": "phi3", "hidden_size": 5120, "intermediate_size": 17920, "num_hidden_layers": 40,
        "num_attention_heads": 40, "num_key_value_heads": 10, "vocab_size": 32064}"#;
    let c = ModelConfig::parse(Path::new("config.json"), text).unwrap();
    let d = &phi3::PHI3;
    use LinearRole::*;
    let rows = |r| d.stored_rows(r, &c);
    assert_eq!([rows(Q), rows(K), rows(V)], [0..5120, 5120..6400, 6400..7680]);
    assert_eq!([rows(Gate), rows(Up), rows(O), rows(Down)], [0..17920, 17920..35840, 0..5120, 0..5120]);
    assert_eq!([d.stored_shape(K, &c), d.stored_shape(Up, &c)], [[7680, 5120], [35840, 5120]]);
    assert_eq!(d.stored_shape(Down, &c), d.linear_shape(Down, &c));
    assert_eq!(d.linear_name(7, V), "model.layers.7.self_attn.qkv_proj.weight");
    assert_eq!(d.packed_name(7, Gate, "scales"), "model.layers.7.mlp.gate_up_proj.scales");
    let stored: Vec<&[LinearRole]> = d.stored_linears().collect();
    assert_eq!(stored, [&[Q, K, V][..], &[O], &[Gate, Up], &[Down]]);
    assert_eq!(llama::LLAMA.stored_linears().count(), 7);
    assert_eq!(llama::LLAMA.stored_rows(K, &c), 0..1280);
}

/// Every value of a descriptor, one line per item, so that a change to any shows in a diff.
fn table(d: &ArchDescriptor) -> Vec<String> {
    let mut lines = vec![
        format!("model_type {}", d.model_type),
        format!("names {} {} {} {}", d.block_prefix, d.embed_tokens, d.final_norm, d.lm_head),
    ];
    lines.extend(d.norms.iter().map(|n| format!("norm {:?} {} {:?}", n.role, n.module, n.dim)));
    lines.extend(
        d.linears.iter().map(|l| format!("linear {:?} {} {:?}x{:?} {:?} {:?}", l.role, l.module, l.out_dim, l.in_dim, l.bias, l.split)),
    );
    lines.push(format!("fused {:?}", d.fused));
    lines.extend(d.scaling_groups.iter().map(|g| format!("{g:?}")));
    lines.push(format!("clip_skip {:?}, windowed_blocks {:?}", d.clip_skip, d.windowed_blocks));
    let (form, scores, embed) = (d.norm_form, d.attention_scale, d.embed_scale);
    lines.push(format!("norm_form {form:?}, attention_scale {scores:?}, embed_scale {embed:?}, gpu_dtype {}", d.gpu_dtype));
    lines.push(format!("{:?}", d.config_defaults));
    match d.moe {
        None => lines.push("moe None".into()),
        Some(m) => {
            lines.push(format!("moe router {} experts {}", m.router, m.experts));
            lines.extend(m.expert_linears.iter().map(|l| {
                let (module, dims) = (l.module, format!("{:?}x{:?}", l.out_dim, l.in_dim));
                format!("expert {:?} {module} {dims} {:?} {:?}", l.role, l.bias, l.split)
            }));
            let (fields, width) = (m.n_experts_fields, m.expert_intermediate_field);
            let rules = format!("{:?}, {:?}, clip_experts {}", m.renormalize, m.sparse_blocks, m.clip_experts);
            lines.push(format!("moe fields {fields:?} {width}, {rules}, {:?}", m.not_convert));
            lines.extend(m.scaling_groups.iter().map(|g| format!("moe {g:?}")));
        }
    }
    lines
}

/// The lines of `other`'s table that differ from `base`'s, as (base, other) pairs.
fn differences(base: &ArchDescriptor, other: &ArchDescriptor) -> Vec<(String, String)> {
    let (a, b) = (table(base), table(other));
    assert_eq!(a.len(), b.len(), "{} and {} list different numbers of items", base.model_type, other.model_type);
    a.into_iter().zip(b).filter(|(x, y)| x != y).collect()
}

fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    expected.iter().map(|&(a, b)| (a.to_string(), b.to_string())).collect()
}

/// Pins every descriptor value: Llama's in full, the others' as their differences from Llama's
/// (AutoAWQ's `MistralAWQForCausalLM`, `Qwen2AWQForCausalLM`, `Qwen3AWQForCausalLM` and
/// `Phi3AWQForCausalLM` scale as Llama does; Qwen3's q/k norms are neither scaled nor quantized).
#[test]
fn descriptors_hold_exactly_these_values() {
    let groups = [
        "ScalingGroup { prev: Norm(Attn), linears: [Q, K, V], inspect: Attention, when: Always, experts: None }",
        "ScalingGroup { prev: Linear(V), linears: [O], inspect: Linear(O), when: SameShape(V, O), experts: None }",
        "ScalingGroup { prev: Norm(Mlp), linears: [Gate, Up], inspect: Mlp, when: Always, experts: None }",
        "ScalingGroup { prev: Linear(Up), linears: [Down], inspect: Linear(Down), when: Always, experts: None }",
    ];
    let mut llama = vec![
        "model_type llama",
        "names model.layers model.embed_tokens.weight model.norm.weight lm_head.weight",
        "norm Attn input_layernorm Hidden",
        "norm Mlp post_attention_layernorm Hidden",
        "linear Q self_attn.q_proj QHeadsxHidden IfAttentionBias Column",
        "linear K self_attn.k_proj KvHeadsxHidden IfAttentionBias Column",
        "linear V self_attn.v_proj KvHeadsxHidden IfAttentionBias Column",
        "linear O self_attn.o_proj HiddenxQHeads IfAttentionBias Row",
        "linear Gate mlp.gate_proj IntermediatexHidden IfMlpBias Column",
        "linear Up mlp.up_proj IntermediatexHidden IfMlpBias Column",
        "linear Down mlp.down_proj HiddenxIntermediate IfMlpBias Row",
    ];
    llama.push("fused []");
    llama.extend(groups);
    llama.push("clip_skip [Q, K], windowed_blocks None");
    llama.push("norm_form Plain, attention_scale InvSqrtHeadDim, embed_scale One, gpu_dtype f16");
    llama.push(
        "ConfigDefaults { rms_norm_eps: 1e-6, rope_theta: 10000.0, hidden_act: \"silu\", tie_word_embeddings: false, \
         num_key_value_heads: AttentionHeads, head_dim: HiddenOverHeads, sliding_window: None, \
         sliding_window_pattern: None, rope_local_base_freq: None, query_pre_attn_scalar: None }",
    );
    llama.push("moe None");
    assert_eq!(table(&llama::LLAMA), llama);
    let defaults_line = llama.len() - 2;

    let mistral_defaults = "ConfigDefaults { rms_norm_eps: 1e-6, rope_theta: 10000.0, hidden_act: \"silu\", \
                            tie_word_embeddings: false, num_key_value_heads: Required, head_dim: HiddenOverHeads, \
                            sliding_window: Some(4096), sliding_window_pattern: None, \
                            rope_local_base_freq: None, query_pre_attn_scalar: None }";
    assert_eq!(
        differences(&llama::LLAMA, &mistral::MISTRAL),
        pairs(&[
            ("model_type llama", "model_type mistral"),
            ("linear Q self_attn.q_proj QHeadsxHidden IfAttentionBias Column", "linear Q self_attn.q_proj QHeadsxHidden Never Column"),
            ("linear K self_attn.k_proj KvHeadsxHidden IfAttentionBias Column", "linear K self_attn.k_proj KvHeadsxHidden Never Column"),
            ("linear V self_attn.v_proj KvHeadsxHidden IfAttentionBias Column", "linear V self_attn.v_proj KvHeadsxHidden Never Column"),
            ("linear O self_attn.o_proj HiddenxQHeads IfAttentionBias Row", "linear O self_attn.o_proj HiddenxQHeads Never Row"),
            ("clip_skip [Q, K], windowed_blocks None", "clip_skip [Q, K], windowed_blocks All"),
            (llama[defaults_line], mistral_defaults),
        ])
    );
    let qwen2_defaults = "ConfigDefaults { rms_norm_eps: 1e-6, rope_theta: 10000.0, hidden_act: \"silu\", \
                          tie_word_embeddings: false, num_key_value_heads: Required, head_dim: HiddenOverHeads, \
                          sliding_window: None, sliding_window_pattern: None, rope_local_base_freq: None, \
                          query_pre_attn_scalar: None }";
    assert_eq!(
        differences(&llama::LLAMA, &qwen2::QWEN2),
        pairs(&[
            ("model_type llama", "model_type qwen2"),
            ("linear Q self_attn.q_proj QHeadsxHidden IfAttentionBias Column", "linear Q self_attn.q_proj QHeadsxHidden Always Column"),
            ("linear K self_attn.k_proj KvHeadsxHidden IfAttentionBias Column", "linear K self_attn.k_proj KvHeadsxHidden Always Column"),
            ("linear V self_attn.v_proj KvHeadsxHidden IfAttentionBias Column", "linear V self_attn.v_proj KvHeadsxHidden Always Column"),
            ("linear O self_attn.o_proj HiddenxQHeads IfAttentionBias Row", "linear O self_attn.o_proj HiddenxQHeads Never Row"),
            (llama[defaults_line], qwen2_defaults),
        ])
    );
    // Qwen3: Llama's table with the per-head q/k norms after the block's two, and head_dim required.
    let mut qwen3 = llama.clone();
    qwen3[0] = "model_type qwen3";
    qwen3.splice(4..4, ["norm QHead self_attn.q_norm HeadDim", "norm KHead self_attn.k_norm HeadDim"]);
    let n = qwen3.len();
    qwen3[n - 2] = "ConfigDefaults { rms_norm_eps: 1e-6, rope_theta: 10000.0, hidden_act: \"silu\", \
                                  tie_word_embeddings: false, num_key_value_heads: Required, head_dim: Required, \
                                  sliding_window: None, sliding_window_pattern: None, rope_local_base_freq: None, \
                                  query_pre_attn_scalar: None }";
    assert_eq!(table(&qwen3::QWEN3), qwen3);

    // Phi-3: q|k|v and gate|up stored fused, no biases, Llama's scaling groups (AutoAWQ's
    // Phi3AWQForCausalLM; see phi3.rs), clipping q and k too, a sliding window when config.json
    // sets one, rms_norm_eps 1e-5.
    let phi3_defaults = "ConfigDefaults { rms_norm_eps: 1e-5, rope_theta: 10000.0, hidden_act: \"silu\", \
                         tie_word_embeddings: false, num_key_value_heads: AttentionHeads, \
                         head_dim: HiddenOverHeads, sliding_window: None, sliding_window_pattern: None, \
                         rope_local_base_freq: None, query_pre_attn_scalar: None }";
    assert_eq!(
        differences(&llama::LLAMA, &phi3::PHI3),
        pairs(&[
            ("model_type llama", "model_type phi3"),
            ("linear Q self_attn.q_proj QHeadsxHidden IfAttentionBias Column", "linear Q self_attn.qkv_proj QHeadsxHidden Never Column"),
            ("linear K self_attn.k_proj KvHeadsxHidden IfAttentionBias Column", "linear K self_attn.qkv_proj KvHeadsxHidden Never Column"),
            ("linear V self_attn.v_proj KvHeadsxHidden IfAttentionBias Column", "linear V self_attn.qkv_proj KvHeadsxHidden Never Column"),
            ("linear O self_attn.o_proj HiddenxQHeads IfAttentionBias Row", "linear O self_attn.o_proj HiddenxQHeads Never Row"),
            ("linear Gate mlp.gate_proj IntermediatexHidden IfMlpBias Column", "linear Gate mlp.gate_up_proj IntermediatexHidden Never Column"),
            ("linear Up mlp.up_proj IntermediatexHidden IfMlpBias Column", "linear Up mlp.gate_up_proj IntermediatexHidden Never Column"),
            ("linear Down mlp.down_proj HiddenxIntermediate IfMlpBias Row", "linear Down mlp.down_proj HiddenxIntermediate Never Row"),
            (
                "fused []",
                "fused [FusedLinear { module: \"self_attn.qkv_proj\", parts: [Q, K, V] }, \
                 FusedLinear { module: \"mlp.gate_up_proj\", parts: [Gate, Up] }]",
            ),
            ("clip_skip [Q, K], windowed_blocks None", "clip_skip [], windowed_blocks All"),
            (llama[defaults_line], phi3_defaults),
        ])
    );

    // Gemma 3: Llama's linears (no MLP biases), its norms renamed and four more (the per-head
    // q/k norms, the attention's and the MLP's output norms), all `1 + w`; Llama's scaling groups
    // with the MLP's behind pre_feedforward_layernorm (AutoAWQ's Gemma2AWQForCausalLM; see
    // gemma3.rs); sliding-attention blocks, scores scaled by query_pre_attn_scalar, embeddings by
    // sqrt(hidden); Gemma3TextConfig's defaults.
    let gemma3_defaults = "ConfigDefaults { rms_norm_eps: 1e-6, rope_theta: 1000000.0, \
                           hidden_act: \"gelu_pytorch_tanh\", tie_word_embeddings: true, \
                           num_key_value_heads: Required, head_dim: Required, sliding_window: Some(4096), \
                           sliding_window_pattern: Some(6), rope_local_base_freq: Some(10000.0), \
                           query_pre_attn_scalar: Some(256.0) }";
    let mut gemma3 = llama.clone();
    gemma3[0] = "model_type gemma3_text";
    gemma3[3] = "norm Mlp pre_feedforward_layernorm Hidden";
    gemma3.splice(
        4..4,
        [
            "norm QHead self_attn.q_norm HeadDim",
            "norm KHead self_attn.k_norm HeadDim",
            "norm AttnOut post_attention_layernorm Hidden",
            "norm MlpOut post_feedforward_layernorm Hidden",
        ],
    );
    for (i, line) in [
        (12, "linear Gate mlp.gate_proj IntermediatexHidden Never Column"),
        (13, "linear Up mlp.up_proj IntermediatexHidden Never Column"),
        (14, "linear Down mlp.down_proj HiddenxIntermediate Never Row"),
    ] {
        gemma3[i] = line;
    }
    let n = gemma3.len();
    gemma3[n - 4] = "clip_skip [Q, K], windowed_blocks SlidingAttention";
    gemma3[n - 3] = "norm_form OnePlus, attention_scale InvSqrtQueryPreAttnScalar, embed_scale SqrtHidden, gpu_dtype bf16";
    gemma3[n - 2] = gemma3_defaults;
    assert_eq!(table(&gemma3::GEMMA3_TEXT), gemma3);

    // The mixture-of-experts families: the groups of a sparse block (AutoAWQ's
    // MixtralAWQForCausalLM and Qwen3MoeAWQForCausalLM; see mixtral.rs and qwen3_moe.rs).
    let moe_groups = [
        "moe ScalingGroup { prev: Norm(Attn), linears: [Q, K, V], inspect: Attention, when: Always, experts: None }",
        "moe ScalingGroup { prev: Linear(V), linears: [O], inspect: Linear(O), when: SameShape(V, O), experts: None }",
        "moe ScalingGroup { prev: Norm(Mlp), linears: [Gate, Up], inspect: Mlp, when: Always, experts: All }",
        "moe ScalingGroup { prev: Linear(Up), linears: [Down], inspect: Linear(Down), when: Always, experts: Each }",
    ];
    // Mixtral: Mistral's table, MixtralConfig's defaults, every block sparse, experts w1/w3/w2,
    // always renormalised, no expert clipped (AutoAWQ's `k_` in `block_sparse_moe`), ["gate"].
    let mut mixtral = table(&mistral::MISTRAL);
    mixtral[0] = "model_type mixtral".into();
    let n = mixtral.len();
    mixtral[n - 2] = "ConfigDefaults { rms_norm_eps: 1e-5, rope_theta: 1000000.0, hidden_act: \"silu\", \
                      tie_word_embeddings: false, num_key_value_heads: Required, head_dim: HiddenOverHeads, \
                      sliding_window: None, sliding_window_pattern: None, rope_local_base_freq: None, \
                      query_pre_attn_scalar: None }"
        .into();
    mixtral.pop();
    mixtral.extend([
        "moe router block_sparse_moe.gate experts block_sparse_moe.experts",
        "expert Gate w1 ExpertIntermediatexHidden Never Column",
        "expert Up w3 ExpertIntermediatexHidden Never Column",
        "expert Down w2 HiddenxExpertIntermediate Never Row",
        "moe fields [\"num_local_experts\", \"num_experts\"] intermediate_size, Always, All, clip_experts false, \
         Names([\"gate\"])",
    ].map(String::from));
    mixtral.extend(moe_groups.map(String::from));
    assert_eq!(table(&mixtral::MIXTRAL), mixtral);

    // Qwen3-MoE: Qwen3's table (head_dim defaulting to hidden / heads), experts under mlp.experts,
    // renormalised by norm_topk_prob, sparse by decoder_sparse_step and mlp_only_layers,
    // experts clipped, each router named by its path.
    let mut qwen3_moe = table(&qwen3::QWEN3);
    qwen3_moe[0] = "model_type qwen3_moe".into();
    let n = qwen3_moe.len();
    qwen3_moe[n - 2] = qwen3_moe[n - 2].replace("head_dim: Required", "head_dim: HiddenOverHeads");
    qwen3_moe.pop();
    qwen3_moe.extend([
        "moe router mlp.gate experts mlp.experts",
        "expert Gate gate_proj ExpertIntermediatexHidden Never Column",
        "expert Up up_proj ExpertIntermediatexHidden Never Column",
        "expert Down down_proj HiddenxExpertIntermediate Never Row",
        "moe fields [\"num_experts\", \"num_local_experts\"] moe_intermediate_size, IfNormTopkProb, \
         StepExceptMlpOnly, clip_experts true, RouterPaths",
    ].map(String::from));
    qwen3_moe.extend(moe_groups.map(String::from));
    assert_eq!(table(&qwen3_moe::QWEN3_MOE), qwen3_moe);
}

/// A Qwen3-MoE block's linears, names, groups and clipping, dense and sparse, from one config;
/// Mixtral's names and `modules_to_not_convert`.
#[test]
fn moe_blocks_name_their_experts_and_expand_their_groups() {
    let text = r#"{"model_type": "qwen3_moe", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "num_experts": 3,
        "num_experts_per_tok": 2, "moe_intermediate_size": 64, "decoder_sparse_step": 2, "mlp_only_layers": [3]}"#;
    let c = ModelConfig::parse(Path::new("config.json"), text).unwrap();
    let d = &qwen3_moe::QWEN3_MOE;
    use LinearRole::*;
    let sparse: Vec<bool> = (0..4).map(|b| d.is_sparse(&c, b)).collect();
    assert_eq!(sparse, [false, true, false, false], "block 3 is listed in mlp_only_layers");
    assert_eq!(d.block_linears(&c, 0), [Q, K, V, O, Gate, Up, Down].map(LinearId::from));
    let sparse_linears = d.block_linears(&c, 1);
    assert_eq!(sparse_linears.len(), 4 + 3 * 3);
    assert_eq!(sparse_linears[4..7], [Gate, Up, Down].map(|r| LinearId::expert(0, r)));
    let e2_down = LinearId::expert(2, Down);
    assert_eq!(d.linear_name(1, e2_down), "model.layers.1.mlp.experts.2.down_proj.weight");
    assert_eq!(d.packed_name(1, e2_down, "qzeros"), "model.layers.1.mlp.experts.2.down_proj.qzeros");
    assert_eq!(d.linear_name(0, Down), "model.layers.0.mlp.down_proj.weight");
    assert_eq!(d.router_name(1), "model.layers.1.mlp.gate.weight");
    assert_eq!((d.linear_shape(e2_down, &c), d.linear_shape(Down, &c)), ([128, 64], [128, 256]));
    assert_eq!(e2_down.to_string(), "experts.2.Down");
    assert!(d.clips(e2_down) && !d.clips(K) && d.clips(O));
    let stored = d.block_stored(&c, 1);
    assert_eq!(stored.len(), 4 + 9);
    assert!(stored.iter().all(|parts| parts.len() == 1));

    let groups = d.block_groups(&c, 1);
    let shown: Vec<String> =
        groups.iter().map(|g| format!("{:?} {} {:?}", g.prev, g.linears.len(), g.inspect)).collect();
    assert_eq!(
        shown,
        [
            "Norm(Attn) 3 Attention",
            "Norm(Mlp) 6 Mlp",
            "Linear(LinearId { role: Up, expert: Some(0) }) 1 Linear(LinearId { role: Down, expert: Some(0) })",
            "Linear(LinearId { role: Up, expert: Some(1) }) 1 Linear(LinearId { role: Down, expert: Some(1) })",
            "Linear(LinearId { role: Up, expert: Some(2) }) 1 Linear(LinearId { role: Down, expert: Some(2) })",
        ],
        "v -> o is left out: 2 KV heads of 32 make v [64, 128], o [128, 128]"
    );
    let (e0, e1) = (|r| LinearId::expert(0, r), |r| LinearId::expert(1, r));
    assert_eq!(groups[1].linears[..4], [e0(Gate), e0(Up), e1(Gate), e1(Up)]);
    assert_eq!(d.block_groups(&c, 0).len(), 3, "a dense block has Llama's groups (v -> o left out)");
    assert_eq!(d.modules_to_not_convert(&c), Some(vec!["model.layers.1.mlp.gate".to_string()]));
    assert_eq!(llama::LLAMA.modules_to_not_convert(&c), None);

    let text = r#"{"model_type": "mixtral", "hidden_size": 128, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 300, "num_local_experts": 2,
        "num_experts_per_tok": 1}"#;
    let c = ModelConfig::parse(Path::new("config.json"), text).unwrap();
    let m = &mixtral::MIXTRAL;
    assert!((0..2).all(|b| m.is_sparse(&c, b)));
    assert_eq!(m.linear_name(1, LinearId::expert(1, Up)), "model.layers.1.block_sparse_moe.experts.1.w3.weight");
    assert_eq!(m.router_name(0), "model.layers.0.block_sparse_moe.gate.weight");
    assert!(!m.clips(LinearId::expert(0, Gate)) && m.clips(O));
    assert_eq!(m.block_groups(&c, 0).len(), 2 + 1 + 2, "v -> o applies with as many KV heads as heads");
    assert_eq!(m.modules_to_not_convert(&c), Some(vec!["gate".to_string()]));
    let moe = c.moe.as_ref().map(|m| (m.n_experts, m.experts_per_token, m.expert_intermediate_size, m.renormalize));
    assert_eq!(moe, Some((2, 1, 64, true)));
}

/// Which blocks attend through the window, their scales: read from config.json by the descriptor.
#[test]
fn gemma3_windows_and_scales_follow_the_config() {
    let text = r#"{"model_type": "gemma3_text", "hidden_size": 640, "intermediate_size": 2048,
        "num_hidden_layers": 7, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
        "vocab_size": 262144, "sliding_window": 512}"#;
    let c = ModelConfig::parse(Path::new("config.json"), text).unwrap();
    let d = &gemma3::GEMMA3_TEXT;
    let windows: Vec<Option<usize>> = (0..7).map(|b| d.sliding_window(&c, b)).collect();
    let (w, none) = (Some(512), None);
    assert_eq!(windows, [w, w, w, w, w, none, w]);
    assert_eq!((d.score_scale(&c), d.embedding_scale(&c)), (0.0625, 640f64.sqrt() as f32));
    assert_eq!(llama::LLAMA.score_scale(&c), 1.0 / 16.0);
    assert_eq!((llama::LLAMA.embedding_scale(&c), mistral::MISTRAL.sliding_window(&c, 5)), (1.0, Some(512)));
}
