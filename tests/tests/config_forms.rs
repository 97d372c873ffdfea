//! config.json as transformers 5 writes it (RoPE settings in `rope_parameters`, `dtype` for
//! `torch_dtype`) scores exactly like the same settings in the transformers 4 form, in `awq eval
//! ppl` and in check-model.py. The RoPE base is not the default 10000 here, so a reader that
//! missed it (as ours did) would score another model.

use std::path::Path;

use awq_e2e::*;
use awq_model::synthetic::{write_checkpoint, SyntheticSpec};
use serde_json::{json, Map, Value};

/// Window length, as in synthetic.rs: not a power of two, a short last window.
const CTX: usize = 300;

/// Rewrites the 4.x RoPE and dtype fields of `c` into the 5.x form.
fn to_transformers_5(c: &mut Map<String, Value>) {
    let mut rope = match c.remove("rope_scaling") {
        Some(Value::Object(scaling)) => scaling,
        _ => Map::from_iter([("rope_type".to_string(), json!("default"))]),
    };
    rope.insert("rope_theta".into(), c.remove("rope_theta").expect("the 4.x form has rope_theta"));
    c.insert("rope_parameters".into(), Value::Object(rope));
    let dtype = c.remove("torch_dtype").expect("the synthetic writer sets torch_dtype");
    c.insert("dtype".into(), dtype);
}

fn score(dir: &Path, text: &Path) -> Value {
    awq_ppl_json(dir, text, None, CTX)
}

#[test]
fn transformers_5_config_scores_like_the_4_form() {
    let dir = scratch();
    write_checkpoint(dir.path(), &SyntheticSpec { seed: 21, ..SyntheticSpec::tiny_llama() }).unwrap_or_else(|e| panic!("{e}"));
    let text = write_sample_text(dir.path());
    edit_config(dir.path(), |c| drop(c.insert("rope_theta".into(), json!(500000.0))));
    let v4 = score(dir.path(), &text);
    edit_config(dir.path(), to_transformers_5);
    let v5 = score(dir.path(), &text);
    assert_eq!(v5["nll_sum"], v4["nll_sum"], "5.x form {v5}\n4.x form {v4}");

    // The independent reference reads the 5.x form too.
    let reference = check_model(dir.path(), &text, ENGLISH_SAMPLE.len(), CTX);
    let ppl = json_f64(&v5, "perplexity");
    assert!(rel_diff(ppl, reference.ppl) < 1e-4, "awq {ppl}, check-model.py {}", reference.ppl);

    // The base matters: the default one scores differently.
    edit_config(dir.path(), |c| drop(c.insert("rope_parameters".into(), json!({"rope_type": "default"}))));
    let default_theta = score(dir.path(), &text);
    assert_ne!(default_theta["nll_sum"], v4["nll_sum"], "theta 10000 scored like theta 500000");
}

/// Llama 3.1's scaling (check-model.py has no RoPE scaling, so the two forms are compared with each
/// other, and with no scaling, which must differ).
#[test]
fn llama3_rope_scaling_scores_alike_in_both_forms() {
    let dir = scratch();
    write_checkpoint(dir.path(), &SyntheticSpec { seed: 22, ..SyntheticSpec::tiny_llama() }).unwrap_or_else(|e| panic!("{e}"));
    let text = write_sample_text(dir.path());
    edit_config(dir.path(), |c| drop(c.insert("rope_theta".into(), json!(500000.0))));
    let unscaled = score(dir.path(), &text);
    edit_config(dir.path(), |c| {
        let scaling = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192});
        c.insert("rope_scaling".into(), scaling);
    });
    let v4 = score(dir.path(), &text);
    edit_config(dir.path(), to_transformers_5);
    let v5 = score(dir.path(), &text);
    assert_eq!(v5["nll_sum"], v4["nll_sum"], "5.x form {v5}\n4.x form {v4}");
    assert_ne!(v4["nll_sum"], unscaled["nll_sum"], "llama3 scaling changed nothing");
}
