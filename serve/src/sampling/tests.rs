//! The sampler against naive f64 references on random non-zero logits.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

/// Random logits in about [-8, 8], never exactly zero, with no exact ties.
fn random_logits(rng: &mut StdRng, vocab: usize) -> Vec<f32> {
    (0..vocab)
        .map(|_| {
            let v: f32 = rng.random_range(-8.0..8.0);
            if v == 0.0 {
                0.5
            } else {
                v
            }
        })
        .collect()
}

fn params(raw: RawSamplingParams) -> SamplingParams {
    SamplingParams::new(raw).unwrap()
}

/// Naive f64 log-softmax.
fn reference_logprobs(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().map(|&l| l as f64).fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    logits.iter().map(|&l| l as f64 - max - sum.ln()).collect()
}

/// Naive f64 sampling distribution: full softmax, min-p against the maximum probability, top-k by
/// the k-th largest probability, top-p (off at 1) by the mass of every more likely token (O(V^2)).
fn reference_distribution(logits: &[f32], temperature: f64, top_k: Option<usize>, top_p: f64, min_p: f64) -> Vec<f64> {
    let mut p: Vec<f64> = logits.iter().map(|&l| l as f64 / temperature).collect();
    let max = p.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = p.iter().map(|x| (x - max).exp()).sum();
    p.iter_mut().for_each(|x| *x = (*x - max).exp() / sum);
    let p_max = p.iter().copied().fold(0.0, f64::max);
    p.iter_mut().filter(|x| **x < min_p * p_max).for_each(|x| *x = 0.0);
    if let Some(k) = top_k {
        let mut sorted = p.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        if k < sorted.len() {
            let kth = sorted[k - 1];
            p.iter_mut().filter(|x| **x < kth).for_each(|x| *x = 0.0);
        }
    }
    let total: f64 = p.iter().sum();
    let q: Vec<f64> = p.iter().map(|x| x / total).collect();
    let kept: Vec<bool> = (0..q.len())
        .map(|i| {
            let above: f64 = (0..q.len()).filter(|&j| q[j] > q[i] || (q[j] == q[i] && j < i)).map(|j| q[j]).sum();
            q[i] > 0.0 && (top_p >= 1.0 || above < top_p)
        })
        .collect();
    let total: f64 = (0..q.len()).filter(|&i| kept[i]).map(|i| q[i]).sum();
    (0..q.len()).map(|i| if kept[i] { q[i] / total } else { 0.0 }).collect()
}

#[test]
fn logprobs_and_top_logprobs_match_log_softmax() {
    let mut rng = StdRng::seed_from_u64(1);
    for vocab in [1, 2, 7, 1000, 32_000] {
        let logits = random_logits(&mut rng, vocab);
        let expected = reference_logprobs(&logits);
        let mut sampler = Sampler::new(
            params(RawSamplingParams {
                temperature: Some(0.0),
                logprobs: true,
                top_logprobs: Some(20),
                ..Default::default()
            }),
            &[],
        );
        let s = sampler.sample(&logits).unwrap();
        let mut order: Vec<usize> = (0..vocab).collect();
        order.sort_by(|&a, &b| expected[b].total_cmp(&expected[a]).then(a.cmp(&b)));
        assert_eq!(s.token as usize, order[0], "greedy = most likely");
        assert!((s.logprob.unwrap() as f64 - expected[order[0]]).abs() < 1e-5);
        assert_eq!(s.top_logprobs.len(), vocab.min(20));
        for (got, &want) in s.top_logprobs.iter().zip(&order) {
            assert_eq!(got.token as usize, want);
            assert!((got.logprob as f64 - expected[want]).abs() < 1e-5, "vocab {vocab}, token {want}");
        }
        let p: f64 = expected.iter().map(|l| l.exp()).sum();
        assert!((p - 1.0).abs() < 1e-9);
    }
}

#[test]
fn candidates_match_the_reference_masks() {
    let mut rng = StdRng::seed_from_u64(2);
    for case in 0..300 {
        let vocab = rng.random_range(1..60);
        let logits = random_logits(&mut rng, vocab);
        let temperature = [0.3, 0.7, 1.0, 1.6][case % 4];
        let top_k = [None, Some(1), Some(5), Some(40)][(case / 4) % 4];
        let top_p = [1.0, 0.9, 0.5, 0.05][(case / 16) % 4];
        let min_p = [0.0, 0.05, 0.3][(case / 64) % 3];
        let p = params(RawSamplingParams {
            temperature: Some(temperature),
            top_k: top_k.map(|k| k as i64),
            top_p: Some(top_p),
            min_p: Some(min_p),
            ..Default::default()
        });
        let got = candidates(&logits, &p);
        // The parameters as the sampler holds them (f32), so only the arithmetic differs.
        let (t, tp, mp) = (p.temperature() as f64, p.top_p() as f64, p.min_p() as f64);
        let want = reference_distribution(&logits, t, top_k, tp, mp);
        let mut dense = vec![0.0; vocab];
        for &(t, prob) in &got {
            assert_eq!(dense[t as usize], 0.0, "case {case}: token {t} twice");
            dense[t as usize] = prob;
        }
        for i in 0..vocab {
            assert_eq!(dense[i] > 0.0, want[i] > 0.0, "case {case}: token {i} kept? {:?} vs {:?}", dense[i], want[i]);
            assert!((dense[i] - want[i]).abs() < 1e-9, "case {case}: token {i}: {} vs {}", dense[i], want[i]);
        }
        if let Some(k) = top_k {
            assert!(got.len() <= k.max(1), "no ties in random logits, so top-k keeps at most k");
        }
    }
}

#[test]
fn penalties_follow_hf_and_openai_semantics() {
    let mut rng = StdRng::seed_from_u64(3);
    let logits = random_logits(&mut rng, 50);
    let prompt = [1u32, 2, 3, 3, 49, 1000]; // 1000: beyond the vocabulary, ignored
    let output = [3u32, 4, 4, 4, 10];
    let (rep, freq, pres) = (1.3f32, 0.4f32, 0.7f32);
    let mut sampler = Sampler::new(
        params(RawSamplingParams {
            repetition_penalty: Some(rep as f64),
            frequency_penalty: Some(freq as f64),
            presence_penalty: Some(pres as f64),
            ..Default::default()
        }),
        &prompt,
    );
    for &t in &output {
        sampler.record_output(t);
    }
    let mut got = logits.clone();
    sampler.apply_penalties(&mut got);
    for (t, &l) in logits.iter().enumerate() {
        let t32 = t as u32;
        let mut want = l as f64;
        if prompt.contains(&t32) || output.contains(&t32) {
            want = if want > 0.0 { want / rep as f64 } else { want * rep as f64 };
        }
        let count = output.iter().filter(|&&o| o == t32).count() as f64;
        want -= freq as f64 * count + if count > 0.0 { pres as f64 } else { 0.0 };
        assert!((got[t] as f64 - want).abs() < 1e-5, "token {t}: {} vs {want}", got[t]);
    }
    // Greedy decoding sees the penalties: the most likely token, once sampled, loses to the next.
    let mut greedy = Sampler::new(
        params(RawSamplingParams { temperature: Some(0.0), presence_penalty: Some(2.0), ..Default::default() }),
        &[],
    );
    let logits = [1.0, 3.0, 2.5, 0.0];
    assert_eq!(greedy.sample(&logits).unwrap().token, 1);
    assert_eq!(greedy.sample(&logits).unwrap().token, 2);
}

#[test]
fn logprobs_are_raw_by_default_and_penalized_on_request() {
    let logits = [2.0f32, 1.0, -1.0, 0.5];
    let raw = RawSamplingParams {
        temperature: Some(0.0),
        repetition_penalty: Some(2.0),
        logprobs: true,
        ..Default::default()
    };
    let penalized_logits = [1.0f32, 1.0, -1.0, 0.5]; // token 0 in the prompt: 2.0 / 2
    let mut s = Sampler::new(params(raw.clone()), &[0]);
    let a = s.sample(&logits).unwrap();
    assert_eq!(a.token, 0, "ties after the penalty: lowest id");
    assert!((a.logprob.unwrap() as f64 - reference_logprobs(&logits)[0]).abs() < 1e-6);
    let mut s = Sampler::new(params(raw), &[0]).with_logprobs_mode(LogprobsMode::Penalized);
    let b = s.sample(&logits).unwrap();
    assert!((b.logprob.unwrap() as f64 - reference_logprobs(&penalized_logits)[0]).abs() < 1e-6);
}

#[test]
fn greedy_takes_the_lowest_index_among_ties() {
    let mut s =
        Sampler::new(params(RawSamplingParams { temperature: Some(0.0), top_k: Some(1), ..Default::default() }), &[]);
    assert_eq!(s.sample(&[1.0, 3.0, 3.0, 2.0]).unwrap().token, 1);
    assert_eq!(s.sample(&[f32::NEG_INFINITY, -2.0, -2.0]).unwrap().token, 1);
    assert_eq!(s.sample(&[5.0]).unwrap().token, 0);
    assert_eq!(top_n_indices(&[1.0, 3.0, 3.0, 2.0], 3), [1, 2, 3]);
}

#[test]
fn the_same_seed_gives_the_same_tokens() {
    let mut rng = StdRng::seed_from_u64(4);
    let steps: Vec<Vec<f32>> = (0..50).map(|_| random_logits(&mut rng, 100)).collect();
    let run = |seed: i64| {
        let p = params(RawSamplingParams {
            seed: Some(seed),
            top_p: Some(0.95),
            frequency_penalty: Some(0.5),
            ..Default::default()
        });
        let mut s = Sampler::new(p, &[1, 2, 3]);
        steps.iter().map(|l| s.sample(l).unwrap().token).collect::<Vec<_>>()
    };
    assert_eq!(run(42), run(42));
    assert_ne!(run(42), run(43));
}

/// Frequencies of 40 000 seeded draws match the candidate distribution (within 0.01 absolute:
/// about 4 standard deviations at p = 0.5), with top-k truncation active.
#[test]
fn draws_follow_the_distribution() {
    let logits = [0.0f32, 1.0, 2.0, -1.0, 0.5, -3.0];
    let p = params(RawSamplingParams { seed: Some(7), temperature: Some(0.8), top_k: Some(4), ..Default::default() });
    let want = candidates(&logits, &p);
    let mut s = Sampler::new(p, &[]);
    let n = 40_000;
    let mut counts = [0usize; 6];
    for _ in 0..n {
        counts[s.sample(&logits).unwrap().token as usize] += 1;
    }
    assert_eq!(counts[3] + counts[5], 0, "tokens outside the top 4 are never drawn");
    for (t, prob) in want {
        let freq = counts[t as usize] as f64 / n as f64;
        assert!((freq - prob).abs() < 0.01, "token {t}: {freq} vs {prob}");
    }
}

#[test]
fn unusable_logits_are_refused() {
    let mut s = Sampler::new(SamplingParams::default(), &[]);
    let err = s.sample(&[0.0, f32::NAN, 1.0]).unwrap_err();
    assert_eq!(err.to_string(), "logits at token 1: NaN or +inf");
    assert!(matches!(s.sample(&[f32::NEG_INFINITY; 3]), Err(Error::InvalidLogits { .. })));
    assert!(matches!(s.sample(&[]), Err(Error::InvalidLogits { .. })));
    let err = score_token(&[0.0, 1.0], 5, 0).unwrap_err();
    assert_eq!(err.to_string(), "logits at token 5: token id beyond the vocabulary");
}

#[test]
fn score_token_reports_prompt_logprobs() {
    let logits = [0.1f32, -2.0, 3.0];
    let (lp, top) = score_token(&logits, 1, 2).unwrap();
    let want = reference_logprobs(&logits);
    assert!((lp as f64 - want[1]).abs() < 1e-6);
    assert_eq!(top.iter().map(|t| t.token).collect::<Vec<_>>(), [2, 0]);
}
