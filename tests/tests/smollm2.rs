//! SmolLM2-135M (a real trained model) through `awq eval ppl`, against the numbers of
//! ../shared/assets/README.md and against check-model.py, the numpy float32 reference.

use awq_e2e::*;

/// The first 4096 tokens of Pride and Prejudice in 8 windows of 512: the assets README measures
/// 22.33 with check-model.py (and 22.331 with an independent forward pass on the raw GGUF).
#[test]
fn smollm2_pride_and_prejudice_4096_tokens_matches_the_published_perplexity() {
    let text = text_dir().join("austen").join("pride-and-prejudice.txt");
    let report = awq_ppl_json(&smollm2_135m(), &text, Some(4096), 512);
    assert_eq!(json_usize(&report, "tokens"), 4096, "{report}");
    // No BOS (SmolLM2's tokenizer_config.json has add_bos_token: false): window k feeds tokens
    // 512k..512k+512 and scores the token after each, so every token but the first is scored.
    assert_eq!(report["bos"], false, "{report}");
    assert_eq!(json_usize(&report, "windows"), 8, "{report}");
    assert_eq!(json_usize(&report, "tokens_scored"), 4095, "{report}");
    let ppl = json_f64(&report, "perplexity");
    assert!((ppl - 22.33).abs() < 0.01, "perplexity {ppl}, the assets README measures 22.33");
}

/// Same text, first 1024 tokens, against check-model.py run now (it prints 4 decimals; both
/// measured 19.3366). Both compute in float32, so they agree far closer than 1e-4.
#[test]
fn smollm2_pride_and_prejudice_1024_tokens_matches_check_model() {
    let (model, text) = (smollm2_135m(), text_dir().join("austen").join("pride-and-prejudice.txt"));
    let reference = check_model(&model, &text, 1024, 512);
    let ours = awq_ppl_json(&model, &text, Some(1024), 512);
    assert_eq!(json_usize(&ours, "tokens"), reference.tokens, "{ours}\n{reference:?}");
    assert_eq!(json_usize(&ours, "tokens_scored"), reference.scored, "{ours}\n{reference:?}");
    let ppl = json_f64(&ours, "perplexity");
    assert!(rel_diff(ppl, reference.ppl) < 1e-4, "awq {ppl}, check-model.py {}", reference.ppl);
}
