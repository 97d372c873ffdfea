use super::*;

const SMOLLM2: &str = r#"{"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "vocab_size": 49152, "rms_norm_eps": 1e-05, "rope_theta": 100000.0, "rope_scaling": null,
    "tie_word_embeddings": true, "torch_dtype": "float16", "hidden_act": "silu", "bos_token_id": 1}"#;

fn parse(text: &str) -> Result<ModelConfig> {
    ModelConfig::parse(Path::new("m/config.json"), text)
}

#[test]
fn parses_a_real_config() {
    let c = parse(SMOLLM2).unwrap();
    assert_eq!((c.hidden_size, c.n_blocks, c.n_heads, c.n_kv_heads, c.head_dim), (576, 30, 9, 3, 64));
    assert_eq!((c.q_dim(), c.kv_dim(), c.rotary_dim()), (576, 192, 64));
    assert_eq!(c.dtype, Some(DType::F16));
    assert!(c.tie_word_embeddings && c.rope_scaling.is_none());
    assert_eq!(c.rope_inv_freq()[1], 1.0 / 100000f64.powf(2.0 / 64.0));
}

#[test]
fn missing_and_wrong_fields_are_named() {
    let text = SMOLLM2.replace(r#""num_hidden_layers": 30,"#, "");
    let err = parse(&text).unwrap_err().to_string();
    assert_eq!(err, "m/config.json: field `num_hidden_layers`: required field is missing");
    let err = parse(&SMOLLM2.replace(r#""hidden_size": 576"#, r#""hidden_size": "576""#)).unwrap_err();
    assert!(matches!(err, Error::ConfigField { ref field, .. } if field == "hidden_size"), "{err}");
    let err = parse(&SMOLLM2.replace(r#""num_key_value_heads": 3"#, r#""num_key_value_heads": 4"#)).unwrap_err();
    assert!(err.to_string().contains("num_key_value_heads"), "{err}");
    assert!(parse("[1, 2]").unwrap_err().to_string().contains("not a JSON object"));
}

/// Qwen3-30B-A3B's config.json (its MoE fields, a smaller vocabulary and depth), edited.
fn qwen3_moe(edit: impl FnOnce(&mut Map<String, Value>)) -> Result<ModelConfig> {
    let mut map: Map<String, Value> = serde_json::from_str(
        r#"{"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 6,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 1000,
        "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": true,
        "decoder_sparse_step": 1, "mlp_only_layers": []}"#,
    )
    .unwrap();
    edit(&mut map);
    parse(&serde_json::to_string(&map).unwrap())
}

#[test]
fn moe_fields_are_read_once_with_their_defaults_and_rules() {
    let c = qwen3_moe(|_| {}).unwrap();
    let moe = c.moe.clone().unwrap();
    assert_eq!((moe.n_experts, moe.experts_per_token, moe.expert_intermediate_size), (128, 8, 768));
    assert_eq!((moe.n_experts_field, moe.renormalize), ("num_experts", true));
    assert!((0..6).all(|b| moe.is_sparse(b)));
    // Defaults: norm_topk_prob false, decoder_sparse_step 1, mlp_only_layers [].
    let c = qwen3_moe(|m| {
        for f in ["norm_topk_prob", "decoder_sparse_step", "mlp_only_layers"] {
            m.remove(f);
        }
    })
    .unwrap();
    let rules = c.moe.as_ref().map(|m| (m.renormalize, m.sparse.clone()));
    assert_eq!(rules, Some((false, SparseRule::Step { step: 1, dense: vec![] })));
    // Every third block sparse, but block 5 dense.
    let c = qwen3_moe(|m| {
        m.insert("decoder_sparse_step".into(), 3.into());
        m.insert("mlp_only_layers".into(), serde_json::json!([5]));
    })
    .unwrap();
    let sparse: Vec<bool> = (0..6).map(|b| c.moe.as_ref().unwrap().is_sparse(b)).collect();
    assert_eq!(sparse, [false, false, true, false, false, false]);
    // transformers 5's name of the count, alone or agreeing; no experts: every block dense.
    let c = qwen3_moe(|m| {
        let n = m.remove("num_experts").unwrap();
        m.insert("num_local_experts".into(), n);
    })
    .unwrap();
    assert_eq!(c.moe.as_ref().map(|m| (m.n_experts, m.n_experts_field)), Some((128, "num_local_experts")));
    let c = qwen3_moe(|m| {
        m.insert("num_experts".into(), 0.into());
    })
    .unwrap();
    assert!((0..6).all(|b| !c.moe.as_ref().unwrap().is_sparse(b)));
    // Mixtral: always renormalised, every block sparse, its width in intermediate_size.
    let text = r#"{"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
        "num_local_experts": 8, "num_experts_per_tok": 2, "rope_theta": 1e6, "sliding_window": null}"#;
    let c = parse(text).unwrap();
    let moe = c.moe.unwrap();
    let sizes = (moe.n_experts, moe.experts_per_token, moe.expert_intermediate_size, moe.renormalize);
    assert_eq!(sizes, (8, 2, 14336, true));
    assert_eq!((moe.sparse, c.sliding_window, c.rms_norm_eps), (SparseRule::All, None, 1e-5));
    assert!(parse(SMOLLM2).unwrap().moe.is_none());
}

#[test]
fn bad_moe_fields_are_named() {
    type Edit = Box<dyn FnOnce(&mut Map<String, Value>)>;
    let cases: [(&str, Edit, &str); 8] = [
        (
            "num_experts",
            Box::new(|m| drop(m.remove("num_experts"))),
            "required field is missing (or `num_local_experts`)",
        ),
        (
            "num_experts",
            Box::new(|m| drop(m.insert("num_local_experts".into(), 64.into()))),
            "128 here, but num_local_experts says 64: the two names of the expert count disagree",
        ),
        ("num_experts_per_tok", Box::new(|m| drop(m.remove("num_experts_per_tok"))), "required field is missing"),
        (
            "num_experts_per_tok",
            Box::new(|m| drop(m.insert("num_experts_per_tok".into(), 129.into()))),
            "129 experts per token, but there are 128 (num_experts)",
        ),
        ("moe_intermediate_size", Box::new(|m| drop(m.remove("moe_intermediate_size"))), "required field is missing"),
        (
            "decoder_sparse_step",
            Box::new(|m| drop(m.insert("decoder_sparse_step".into(), 0.into()))),
            "0: every step-th block",
        ),
        (
            "mlp_only_layers",
            Box::new(|m| drop(m.insert("mlp_only_layers".into(), serde_json::json!([1, 6])))),
            "6 is not a block index below num_hidden_layers 6",
        ),
        (
            "norm_topk_prob",
            Box::new(|m| drop(m.insert("norm_topk_prob".into(), "yes".into()))),
            "expected true or false",
        ),
    ];
    for (field, edit, detail) in cases {
        let err = qwen3_moe(edit).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::ConfigField { field: ref f, .. } if f == field), "{field}: {msg}");
        assert!(msg.starts_with(&format!("m/config.json: field `{field}`: ")) && msg.contains(detail), "{msg}");
    }
    let text = r#"{"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 300, "num_local_experts": 0,
        "num_experts_per_tok": 1}"#;
    let msg = parse(text).unwrap_err().to_string();
    assert!(msg.contains("field `num_local_experts`: 0 experts"), "{msg}");
}

/// SMOLLM2 with `edit` applied to its JSON object.
fn edited(edit: impl FnOnce(&mut Map<String, Value>)) -> String {
    let mut map: Map<String, Value> = serde_json::from_str(SMOLLM2).unwrap();
    edit(&mut map);
    serde_json::to_string(&map).unwrap()
}

/// SMOLLM2 as transformers 5 writes it: RoPE settings in `rope_parameters`, `dtype`.
fn v5(rope_parameters: Value) -> String {
    edited(|c| {
        c.remove("rope_theta");
        c.remove("rope_scaling");
        let dtype = c.remove("torch_dtype").unwrap();
        c.insert("dtype".into(), dtype);
        c.insert("rope_parameters".into(), rope_parameters);
    })
}

/// Llama 3.1's RoPE (theta 500000, llama3 scaling), in the 4.x form and the 5.x form.
fn llama31_v4() -> String {
    edited(|c| {
        c.insert("rope_theta".into(), json!(500000.0));
        c.insert(
            "rope_scaling".into(),
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}),
        );
    })
}

fn llama31_v5() -> String {
    v5(json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}))
}

/// `text` is refused with an error naming `field`, whose message contains each of `names`.
fn check_refused(text: &str, field: &str, names: &[&str]) {
    let err = parse(text).unwrap_err();
    let message = err.to_string();
    assert!(matches!(&err, Error::ConfigField { field: f, .. } if f == field), "expected field `{field}`: {message}");
    assert!(message.starts_with("m/config.json: "), "{message}");
    for name in names {
        assert!(message.contains(name), "expected `{name}` in: {message}");
    }
}

use serde_json::json;

#[test]
fn the_transformers_4_and_5_forms_give_the_same_config() {
    let (old, new) = (parse(&llama31_v4()).unwrap(), parse(&llama31_v5()).unwrap());
    assert_eq!(old.rope_theta, 500000.0);
    assert!(matches!(old.rope_scaling, Some(RopeScaling::Llama3 { .. })));
    assert_eq!(old.rope_inv_freq(), new.rope_inv_freq());
    assert_eq!(ModelConfig { raw: Map::new(), ..old }, ModelConfig { raw: Map::new(), ..new.clone() });

    // Regression: a 5.x config's theta was ignored (and 10000 used) because only `rope_theta` was read.
    let c = parse(&v5(json!({"rope_type": "default", "rope_theta": 500000.0}))).unwrap();
    assert_eq!((c.rope_theta, &c.rope_scaling), (500000.0, &None));
    assert_eq!(c.rope_inv_freq()[1], 1.0 / 500000f64.powf(2.0 / 64.0));

    // The same values in both forms are fine; null means "not stated".
    let both = edited(|c| {
        c.insert("rope_parameters".into(), json!({"rope_type": "default", "rope_theta": 100000.0}));
    });
    assert_eq!(parse(&both).unwrap().rope_theta, 100000.0);
    let null_scaling = llama31_v5().replace(r#""bos_token_id":1"#, r#""bos_token_id":1,"rope_scaling":null"#);
    assert_eq!(parse(&null_scaling).unwrap().rope_scaling, new.rope_scaling);

    // Linear scaling, `type` spelling, partial rotary inside rope_parameters.
    let linear = parse(&v5(json!({"type": "linear", "factor": 4.0, "rope_theta": 10000.0, "partial_rotary_factor": 0.5}))).unwrap();
    assert_eq!((&linear.rope_scaling, linear.rotary_dim()), (&Some(RopeScaling::Linear { factor: 4.0 }), 32));
}

#[test]
fn rope_parameters_per_layer_type_must_agree_on_the_types_in_use() {
    let per_type = |sliding_theta: f64| {
        v5(json!({"full_attention": {"rope_type": "default", "rope_theta": 500000.0},
                  "sliding_attention": {"rope_type": "default", "rope_theta": sliding_theta}}))
    };
    assert_eq!(parse(&per_type(500000.0)).unwrap().rope_theta, 500000.0);
    check_refused(&per_type(10000.0), "rope_parameters.sliding_attention", &["rope_parameters.full_attention", "not supported"]);
    // Only the layer types the model has count (transformers 5 reads the nesting through `layer_types`).
    let layer_types = |types: &str| format!(r#""bos_token_id":1,"layer_types":[{types}]"#);
    let all_full = vec![r#""full_attention""#; 30].join(",");
    let full_only = per_type(10000.0).replace(r#""bos_token_id":1"#, &layer_types(&all_full));
    let c = parse(&full_only).unwrap();
    assert_eq!((c.rope_theta, c.layer_types.of(29), &c.sliding_rope), (500000.0, LayerType::Full, &None));
    let full_rope_missing = v5(json!({"sliding_attention": {"rope_type": "default"}}))
        .replace(r#""bos_token_id":1"#, &layer_types(&all_full));
    check_refused(&full_rope_missing, "rope_parameters.full_attention", &["missing or null"]);
    // One entry per block, of the two types there are.
    let short = per_type(500000.0).replace(r#""bos_token_id":1"#, &layer_types(r#""full_attention""#));
    check_refused(&short, "layer_types", &["1 entries for num_hidden_layers 30"]);
    let chunked = vec![r#""chunked_attention""#; 30].join(",");
    let unknown = per_type(500000.0).replace(r#""bos_token_id":1"#, &layer_types(&chunked));
    check_refused(&unknown, "layer_types", &["\"chunked_attention\" is not supported"]);
}

/// google/gemma-3-270m's config.json as transformers 4 writes it (as the assets' converter does).
const GEMMA3_270M: &str = r#"{"model_type": "gemma3_text", "hidden_size": 640, "intermediate_size": 2048,
    "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
    "vocab_size": 262144, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
    "rope_scaling": null, "query_pre_attn_scalar": 256, "sliding_window": 512, "sliding_window_pattern": 6,
    "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention",
        "sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "sliding_attention",
        "sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
        "sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
    "hidden_activation": "gelu_pytorch_tanh", "attn_logit_softcapping": null, "final_logit_softcapping": null,
    "tie_word_embeddings": true, "torch_dtype": "float16", "max_position_embeddings": 32768,
    "bos_token_id": 2, "eos_token_id": 1}"#;

/// GEMMA3_270M with `edit` applied to its JSON object.
fn gemma3(edit: impl FnOnce(&mut Map<String, Value>)) -> String {
    let mut map: Map<String, Value> = serde_json::from_str(GEMMA3_270M).unwrap();
    edit(&mut map);
    serde_json::to_string(&map).unwrap()
}

/// GEMMA3_270M as transformers 5 writes it: one `rope_parameters` object per layer type, `dtype`.
fn gemma3_v5(full: Value, sliding: Value) -> String {
    gemma3(|c| {
        for k in ["rope_theta", "rope_local_base_freq", "rope_scaling", "sliding_window_pattern"] {
            c.remove(k);
        }
        let dtype = c.remove("torch_dtype").unwrap();
        c.insert("dtype".into(), dtype);
        c.insert("rope_parameters".into(), json!({"full_attention": full, "sliding_attention": sliding}));
    })
}

#[test]
fn gemma3_reads_both_forms_into_per_layer_type_rope() {
    let old = parse(GEMMA3_270M).unwrap();
    let sliding = |theta| Some(RopeParams { theta, scaling: None, partial_rotary_factor: 1.0 });
    assert_eq!((old.rope_theta, &old.rope_scaling, &old.sliding_rope), (1e6, &None, &sliding(10000.0)));
    let globals: Vec<usize> = (0..18).filter(|&b| old.layer_types.of(b) == LayerType::Full).collect();
    assert_eq!(globals, [5, 11, 17]);
    assert_eq!((old.activation, old.query_pre_attn_scalar), (GatedActivation::GeluTanh, Some(256.0)));
    assert_eq!(old.final_logit_softcapping, None);
    assert_eq!(old.block_rope_inv_freq(5), old.rope_inv_freq());
    assert_eq!(old.block_rope_inv_freq(4)[1], 1.0 / 10000f64.powf(2.0 / 256.0));
    assert_eq!(old.rope_inv_freq()[1], 1.0 / 1e6f64.powf(2.0 / 256.0));

    let new = parse(&gemma3_v5(
        json!({"rope_type": "default", "rope_theta": 1000000.0}),
        json!({"rope_type": "default", "rope_theta": 10000.0}),
    ))
    .unwrap();
    assert_eq!(ModelConfig { raw: Map::new(), ..old.clone() }, ModelConfig { raw: Map::new(), ..new });

    // Without layer_types, every sliding_window_pattern-th block is global (Gemma3TextConfig).
    let pattern = parse(&gemma3(|c| drop(c.remove("layer_types")))).unwrap();
    assert_eq!(pattern.layer_types, LayerTypes::Pattern(6));
    assert!((0..18).all(|b| pattern.layer_types.of(b) == old.layer_types.of(b)));
    let c = parse(&gemma3(|c| {
        c.remove("layer_types");
        c.insert("sliding_window_pattern".into(), json!(4));
    }))
    .unwrap();
    let first: Vec<LayerType> = (0..5).map(|b| c.layer_types.of(b)).collect();
    let (s, f) = (LayerType::Sliding, LayerType::Full);
    assert_eq!(first, [s, s, s, f, s]);

    // Gemma 3 4B's RoPE: linear scaling on the global blocks only (4.x: `rope_scaling`, which the
    // local rotary embedding replaces by "default"; 5.x: in `full_attention` alone).
    let linear = Some(RopeScaling::Linear { factor: 8.0 });
    let scaled = gemma3(|c| drop(c.insert("rope_scaling".into(), json!({"rope_type": "linear", "factor": 8.0}))));
    let old = parse(&scaled).unwrap();
    assert_eq!((&old.rope_scaling, &old.sliding_rope), (&linear, &sliding(10000.0)));
    let new = parse(&gemma3_v5(
        json!({"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}),
        json!({"rope_type": "default", "rope_theta": 10000.0}),
    ))
    .unwrap();
    assert_eq!((&new.rope_scaling, &new.sliding_rope, new.rope_theta), (&linear, &sliding(10000.0), 1e6));
    assert_eq!(old.block_rope_inv_freq(5)[0], 1.0 / 8.0);
}

#[test]
fn gemma3_defaults_are_gemma3_text_configs() {
    // Gemma3TextConfig: rms_norm_eps 1e-6, rope_theta 1e6, rope_local_base_freq 1e4,
    // query_pre_attn_scalar 256, sliding_window 4096 and pattern 6, gelu_pytorch_tanh, tied.
    let bare = gemma3(|c| {
        for k in [
            "rms_norm_eps", "rope_theta", "rope_local_base_freq", "rope_scaling", "query_pre_attn_scalar",
            "sliding_window", "sliding_window_pattern", "layer_types", "hidden_activation",
            "attn_logit_softcapping", "final_logit_softcapping", "tie_word_embeddings",
        ] {
            c.remove(k);
        }
    });
    let c = parse(&bare).unwrap();
    let local_theta = c.sliding_rope.as_ref().map(|r| r.theta);
    assert_eq!((c.rms_norm_eps, c.rope_theta, local_theta), (1e-6, 1e6, Some(10000.0)));
    assert_eq!((c.query_pre_attn_scalar, c.sliding_window), (Some(256.0), Some(4096)));
    assert_eq!((c.activation, c.tie_word_embeddings), (GatedActivation::GeluTanh, true));
    assert_eq!((c.layer_types.of(5), c.layer_types.of(6)), (LayerType::Full, LayerType::Sliding));
    // The 5.x form with no RoPE objects' bases: the same defaults.
    let v5 = gemma3_v5(json!({"rope_type": "default"}), json!({"rope_type": "default"}));
    let c = parse(&v5).unwrap();
    assert_eq!((c.rope_theta, c.sliding_rope.map(|r| r.theta)), (1e6, Some(10000.0)));
    // Sizes stay required; a Llama config's query_pre_attn_scalar is not read.
    check_refused(&gemma3(|c| drop(c.remove("head_dim"))), "head_dim", &["required field is missing"]);
    check_refused(&gemma3(|c| drop(c.remove("num_key_value_heads"))), "num_key_value_heads", &["required"]);
    let llama = edited(|c| drop(c.insert("query_pre_attn_scalar".into(), json!(1.0))));
    assert_eq!(parse(&llama).unwrap().query_pre_attn_scalar, None);
}

#[test]
fn gemma3_refusals_name_their_field() {
    let set = |field: &'static str, v: Value| gemma3(move |c| drop(c.insert(field.into(), v)));
    check_refused(&set("attn_logit_softcapping", json!(50.0)), "attn_logit_softcapping", &["not supported"]);
    let negative = set("final_logit_softcapping", json!(-1.0));
    check_refused(&negative, "final_logit_softcapping", &["not a positive number"]);
    assert_eq!(parse(&set("final_logit_softcapping", json!(30.0))).unwrap().final_logit_softcapping, Some(30.0));
    check_refused(&set("use_bidirectional_attention", json!(true)), "use_bidirectional_attention", &["causal"]);
    check_refused(&set("query_pre_attn_scalar", json!(0)), "query_pre_attn_scalar", &["not a positive number"]);
    let no_layer_types = |pattern: Value| {
        gemma3(move |c| {
            c.remove("layer_types");
            c.insert("sliding_window_pattern".into(), pattern);
        })
    };
    check_refused(&no_layer_types(json!(0)), "sliding_window_pattern", &["0"]);
    // The two forms of the local base disagree: both named.
    let both = gemma3_v5(json!({"rope_theta": 1000000.0}), json!({"rope_theta": 20000.0}))
        .replace(r#""bos_token_id":2"#, r#""bos_token_id":2,"rope_local_base_freq":10000.0"#);
    let names = ["rope_local_base_freq says 10000", "20000 here"];
    check_refused(&both, "rope_parameters.sliding_attention.rope_theta", &names);
    // A layer type the blocks use needs its RoPE object.
    let missing = gemma3(|c| {
        c.remove("rope_theta");
        c.insert("rope_parameters".into(), json!({"full_attention": {"rope_theta": 1000000.0}}));
    });
    check_refused(&missing, "rope_parameters.sliding_attention", &["missing or null"]);
}

#[test]
fn forms_that_disagree_are_refused_naming_both_fields() {
    let theta = edited(|c| {
        c.insert("rope_parameters".into(), json!({"rope_type": "default", "rope_theta": 500000.0}));
    });
    check_refused(&theta, "rope_parameters.rope_theta", &["rope_theta says 100000", "500000 here"]);
    let scaling = llama31_v5().replace(r#""bos_token_id":1"#, r#""bos_token_id":1,"rope_scaling":{"type":"linear","factor":8.0}"#);
    check_refused(&scaling, "rope_parameters", &["rope_scaling says linear scaling by 8", "llama3 scaling"]);
    let spellings = edited(|c| {
        c.insert("rope_scaling".into(), json!({"rope_type": "llama3", "type": "linear", "factor": 8.0}));
    });
    check_refused(&spellings, "rope_scaling.rope_type", &["rope_scaling.type", "`linear`"]);
    let dtype = edited(|c| {
        c.insert("dtype".into(), json!("bfloat16"));
    });
    check_refused(&dtype, "dtype", &["torch_dtype says F16", "BF16 here"]);
    let rotary = v5(json!({"rope_theta": 10000.0, "partial_rotary_factor": 0.5}))
        .replace(r#""bos_token_id":1"#, r#""bos_token_id":1,"partial_rotary_factor":0.25"#);
    check_refused(&rotary, "rope_parameters.partial_rotary_factor", &["partial_rotary_factor says 0.25"]);
}

#[test]
fn missing_rope_fields_take_documented_defaults_or_are_refused() {
    // transformers 5's `RopeParameters`: an omitted `rope_theta` is the class's `default_theta`
    // (10000 for LlamaConfig), an omitted `rope_type` is "default"; 4.x: `rope_theta=10000.0`.
    let c = parse(&v5(json!({"rope_type": "default"}))).unwrap();
    assert_eq!((c.rope_theta, c.rope_scaling, c.partial_rotary_factor), (10000.0, None, 1.0));
    assert_eq!(parse(&v5(json!({}))).unwrap().rope_theta, 10000.0);
    assert_eq!(parse(&edited(|c| drop(c.remove("rope_theta")))).unwrap().rope_theta, 10000.0);
    // Scaling parameters have no defaults.
    let no_original = llama31_v5().replace(r#","original_max_position_embeddings":8192"#, "");
    check_refused(&no_original, "rope_parameters.original_max_position_embeddings", &["required field is missing"]);
    check_refused(&v5(json!({"rope_type": "linear"})), "rope_parameters.factor", &["required field is missing"]);
    // A scaling without a type is not read as no scaling.
    check_refused(&v5(json!({"factor": 8.0})), "rope_parameters.factor", &["`default`"]);
    check_refused(&v5(json!({"rope_type": "yarn", "factor": 4.0})), "rope_parameters.rope_type", &["`yarn`", "not supported"]);
    // Phi-3-mini-128k's LongRoPE, in its 4.x spelling (`type`) and in the 5.x form.
    let longrope = json!({"type": "longrope", "long_factor": [1.0, 1.25], "short_factor": [1.0, 1.0]});
    let phi3 = edited(|c| {
        c.insert("model_type".into(), json!("phi3"));
        c.insert("rope_scaling".into(), longrope.clone());
    });
    check_refused(&phi3, "rope_scaling.type", &["`longrope` is not supported"]);
    let v5_longrope =
        v5(json!({"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": [1.0], "short_factor": [1.0]}));
    check_refused(&v5_longrope, "rope_parameters.rope_type", &["`longrope` is not supported"]);
    check_refused(&v5(json!({"rope_theta": "big"})), "rope_parameters.rope_theta", &["expected a number"]);
    check_refused(&v5(json!([1, 2])), "rope_parameters", &["expected an object"]);
}

#[test]
fn other_defaults_follow_the_architecture() {
    // LlamaConfig: num_key_value_heads -> num_attention_heads, rms_norm_eps 1e-6, silu, untied.
    let bare = edited(|c| {
        for k in ["num_key_value_heads", "rms_norm_eps", "hidden_act", "tie_word_embeddings", "torch_dtype", "head_dim"] {
            c.remove(k);
        }
    });
    let c = parse(&bare).unwrap();
    assert_eq!((c.n_kv_heads, c.head_dim, c.rms_norm_eps, c.tie_word_embeddings, c.dtype), (9, 64, 1e-6, false, None));
    assert_eq!((c.activation, c.sliding_window), (GatedActivation::Silu, None));
    // MistralConfig, Qwen2Config and Qwen3Config default num_key_value_heads to their reference
    // models' 8, 32 and 32: required.
    for model_type in ["mistral", "qwen2", "qwen3"] {
        let text = bare.replace(r#""model_type":"llama""#, &format!(r#""model_type":"{model_type}""#));
        check_refused(&text, "num_key_value_heads", &["required field is missing"]);
    }
    // Qwen3Config's head_dim=128 is Qwen3-8B's, not hidden_size / heads: required too; stated, it
    // may differ from hidden_size / heads.
    let qwen3 = SMOLLM2.replace(r#""model_type": "llama""#, r#""model_type": "qwen3""#);
    check_refused(&qwen3.replace(r#""head_dim": 64,"#, ""), "head_dim", &["required field is missing"]);
    let c = parse(&qwen3.replace(r#""head_dim": 64"#, r#""head_dim": 128"#)).unwrap();
    assert_eq!((c.head_dim, c.q_dim(), c.kv_dim(), c.sliding_window), (128, 9 * 128, 3 * 128, None));
    // MistralConfig's sliding_window=4096 when absent; null is no window.
    let mistral = SMOLLM2.replace(r#""model_type": "llama""#, r#""model_type": "mistral""#);
    assert_eq!(parse(&mistral).unwrap().sliding_window, Some(4096));
    let mistral_null = mistral.replace(r#""bos_token_id": 1"#, r#""bos_token_id": 1, "sliding_window": null"#);
    assert_eq!(parse(&mistral_null).unwrap().sliding_window, None);
    // Phi3Config: num_key_value_heads -> num_attention_heads, rms_norm_eps 1e-5, no window unless
    // config.json sets one (Phi-3-mini-4k: 2047), which applies.
    let phi3 = bare.replace(r#""model_type":"llama""#, r#""model_type":"phi3""#);
    let c = parse(&phi3).unwrap();
    assert_eq!((c.n_kv_heads, c.head_dim, c.rms_norm_eps, c.tie_word_embeddings), (9, 64, 1e-5, false));
    assert_eq!(c.sliding_window, None);
    let c = parse(&phi3.replace(r#""bos_token_id":1"#, r#""bos_token_id":1,"sliding_window":2047"#)).unwrap();
    let arch = descriptor_for("phi3", Path::new("config.json")).unwrap();
    assert_eq!((c.sliding_window, arch.sliding_window(&c, 0)), (Some(2047), Some(2047)));
    // The defaults come from the descriptor, so the type must be known.
    let err = parse(&SMOLLM2.replace(r#""model_type": "llama""#, r#""model_type": "gpt2""#)).unwrap_err();
    assert!(matches!(err, Error::UnsupportedArchitecture { .. }), "{err}");
}

#[test]
fn llama3_rope_scaling_keeps_high_and_divides_low_frequencies() {
    let text = SMOLLM2.replace(
        r#""rope_scaling": null"#,
        r#""rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#,
    );
    let c = parse(&text).unwrap();
    let (scaled, base) = (c.rope_inv_freq(), ModelConfig { rope_scaling: None, ..c.clone() }.rope_inv_freq());
    assert_eq!(scaled[0], base[0]);
    assert_eq!(*scaled.last().unwrap(), base.last().unwrap() / 8.0);
}

#[test]
fn generation_config_gives_its_eos_ids_and_names_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(GenerationConfig::from_dir(dir.path()).unwrap(), GenerationConfig::default());
    let file = dir.path().join("generation_config.json");
    std::fs::write(&file, r#"{"bos_token_id": 1, "eos_token_id": [128001, 128008, 128009]}"#).unwrap();
    assert_eq!(GenerationConfig::from_dir(dir.path()).unwrap().eos_token_ids, [128001, 128008, 128009]);
    std::fs::write(&file, r#"{"eos_token_id": 2}"#).unwrap();
    assert_eq!(GenerationConfig::from_dir(dir.path()).unwrap().eos_token_ids, [2]);
    std::fs::write(&file, r#"{"eos_token_id": "two"}"#).unwrap();
    let err = GenerationConfig::from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("generation_config.json") && err.contains("eos_token_id"), "{err}");
}
