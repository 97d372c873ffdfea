//! A sparse block's mixture of experts (Mixtral's `MixtralSparseMoeBlock`, Qwen3-MoE's
//! `Qwen3MoeSparseMoeBlock`), shared by the serving runner and the worker's `block_forward`.
//!
//! On normalised input `h[rows, hidden]`: the router's logits `h R^T` in f32 (`ops::linear_to`)
//! are copied to the host, where [`MoeRouting::route`] picks each token's experts (softmax in f64
//! over all experts, the `k` largest probabilities, ties to the lower expert index, as numpy's
//! stable argsort of `-p` in check-model.py; renormalised to sum to 1 where the config says; each
//! weight rounded once to f32). Then per expert that got tokens, in expert order: its tokens'
//! rows gathered (`ops::gather_rows`), its gated MLP on those rows only, and its output added back
//! into their rows times their weights (`ops::scatter_add_rows`) in an f32 accumulator. The same
//! ops on the CPU and on a GPU (the W4A16 kernels run each expert's linears there): tokens are
//! grouped per expert, never looped over one by one.
//!
//! Routing on the host costs one copy of `rows x n_experts` logits and a device synchronisation
//! per sparse block: small next to the experts' matrix products, but not something a recorded CUDA
//! graph can hold, so the runner does not record decode steps of a model with experts
//! (`RankRunner::can_record`).
//!
//! Tensor parallelism needs nothing here: every rank reads the same residual stream and the same
//! replicated router, so every rank routes alike, runs its share of each expert (gate and up by
//! rows, down by columns) and scatters its partial outputs with the same weights; the all-reduce
//! after the block sums them as it sums a dense MLP's.

use awq_kernels::ops;
use awq_kernels::{DType, Indices, Tensor};

/// A sparse block's routing rule, from config.json (`awq_model::MoeConfig`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeRouting {
    pub n_experts: usize,
    /// Experts per token (`num_experts_per_tok`), 1 to `n_experts`.
    pub top_k: usize,
    /// Whether the top-k probabilities are divided by their sum.
    pub renormalize: bool,
}

/// The tokens (rows) one expert takes, in ascending order, and each one's routing weight.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExpertRoute {
    pub rows: Vec<u32>,
    pub weights: Vec<f32>,
}

/// Every expert's tokens (by expert index; an expert no token chose has none).
pub type Routes = Vec<ExpertRoute>;

impl MoeRouting {
    /// The experts of each of `rows` tokens from their router logits `[rows, n_experts]` (row-major
    /// f32 on the host): see the module docs. A row holding a NaN routes by its other values (NaN
    /// probabilities are never chosen before a number).
    pub fn route(&self, logits: &[f32]) -> Routes {
        let n = self.n_experts;
        let mut routes: Routes = vec![ExpertRoute::default(); n];
        if n == 0 {
            return routes;
        }
        let mut order: Vec<usize> = Vec::with_capacity(n);
        for (row, logits) in logits.chunks_exact(n).enumerate() {
            let max = logits.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let exp: Vec<f64> = logits.iter().map(|&v| (v as f64 - max).exp()).collect();
            let sum: f64 = exp.iter().sum();
            let p: Vec<f64> = exp.iter().map(|e| e / sum).collect();
            order.clear();
            order.extend(0..n);
            // Stable: equal probabilities keep the lower expert first. NaN sorts last.
            order.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap_or_else(|| p[a].is_nan().cmp(&p[b].is_nan())));
            let chosen = &order[..self.top_k.min(n)];
            let total: f64 = chosen.iter().map(|&e| p[e]).sum();
            for &e in chosen {
                let w = if self.renormalize { p[e] / total } else { p[e] };
                routes[e].rows.push(row as u32);
                routes[e].weights.push(w as f32);
            }
        }
        routes
    }
}

/// What [`moe_mlp`] computed.
#[derive(Debug)]
pub struct MoeOutput {
    /// `[rows, hidden]` f32: every token's routing-weighted sum of its experts' outputs.
    pub out: Tensor,
    pub routes: Routes,
    /// With `capture`: each expert's down-projection input (`act(gate) * up` on its tokens' rows),
    /// `None` for an expert no token chose; empty without.
    pub down_inputs: Vec<Option<Tensor>>,
}

/// The mixture of experts on normalised input `h[rows, hidden]` (see the module docs): `router`
/// `[n_experts, hidden]` on `h`'s device; `expert(e, x)` runs expert `e`'s gated MLP on rows `x`
/// and returns `(down input, output)`. Errors: the ops' (shapes, devices), and a router whose rows
/// are not the routing's experts.
pub fn moe_mlp(
    h: &Tensor,
    router: &Tensor,
    routing: &MoeRouting,
    mut expert: impl FnMut(usize, &Tensor) -> awq_kernels::Result<(Tensor, Tensor)>,
    capture: bool,
) -> awq_kernels::Result<MoeOutput> {
    let (rows, hidden) = h.dims2("moe_mlp")?;
    let (n_experts, _) = router.dims2("moe_mlp router")?;
    if n_experts != routing.n_experts {
        let detail = format!("a router of {n_experts} experts for a routing of {}", routing.n_experts);
        return Err(awq_kernels::Error::Shape { op: "moe_mlp", detail });
    }
    let logits = ops::linear_to(h, router, None, DType::F32)?.to_f32_vec()?;
    let routes = routing.route(&logits);
    let mut out = Tensor::zeros_on(&[rows, hidden], DType::F32, h.device())?;
    let mut down_inputs = Vec::new();
    for (e, route) in routes.iter().enumerate() {
        if route.rows.is_empty() {
            if capture {
                down_inputs.push(None);
            }
            continue;
        }
        let idx = Indices::new(route.rows.clone(), h.device())?;
        let (down_in, y) = expert(e, &ops::gather_rows(h, &idx)?)?;
        ops::scatter_add_rows(&mut out, &y, &idx, &route.weights)?;
        if capture {
            down_inputs.push(Some(down_in));
        }
    }
    Ok(MoeOutput { out, routes, down_inputs })
}

#[cfg(test)]
mod tests {
    use super::*;
    use awq_kernels::rng::SplitMix64;

    /// The f64 reference, written as check-model.py does it: softmax, a stable sort of `-p`, the
    /// first k, renormalised or not; per token the (expert, weight) pairs in rank order.
    fn reference(logits: &[f32], n: usize, k: usize, renormalize: bool) -> Vec<Vec<(usize, f64)>> {
        logits
            .chunks_exact(n)
            .map(|l| {
                let max = l.iter().map(|&v| v as f64).fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = l.iter().map(|&v| (v as f64 - max).exp()).collect();
                let s: f64 = e.iter().sum();
                let p: Vec<f64> = e.iter().map(|v| v / s).collect();
                let mut idx: Vec<usize> = (0..n).collect();
                // Insertion sort on -p: stable by construction.
                for i in 1..n {
                    let mut j = i;
                    while j > 0 && -p[idx[j]] < -p[idx[j - 1]] {
                        idx.swap(j, j - 1);
                        j -= 1;
                    }
                }
                let top: Vec<usize> = idx[..k].to_vec();
                let total: f64 = top.iter().map(|&i| p[i]).sum();
                top.iter().map(|&i| (i, if renormalize { p[i] / total } else { p[i] })).collect()
            })
            .collect()
    }

    /// Per token, the (expert, weight) pairs of `routes`, in expert order.
    fn by_token(routes: &Routes, rows: usize) -> Vec<Vec<(usize, f32)>> {
        let mut tokens = vec![Vec::new(); rows];
        for (e, r) in routes.iter().enumerate() {
            assert!(r.rows.windows(2).all(|w| w[0] < w[1]), "expert {e}'s rows ascend");
            for (&row, &w) in r.rows.iter().zip(&r.weights) {
                tokens[row as usize].push((e, w));
            }
        }
        tokens
    }

    #[test]
    fn routes_equal_an_f64_reference_with_ties_and_both_renormalisations() {
        let mut rng = SplitMix64::new(3);
        for &(n, k) in &[(4, 2), (8, 2), (8, 1), (16, 4), (3, 3)] {
            let rows = 40;
            let mut logits = rng.normal_vec(rows * n, 2.0);
            // Ties: whole rows equal, and rows with two equal maxima.
            logits[..2 * n].iter_mut().for_each(|v| *v = 0.5);
            logits[n] = 3.0;
            logits[n + n - 1] = 3.0;
            for renormalize in [false, true] {
                let routing = MoeRouting { n_experts: n, top_k: k, renormalize };
                let got = by_token(&routing.route(&logits), rows);
                let want = reference(&logits, n, k, renormalize);
                for (t, (g, w)) in got.iter().zip(&want).enumerate() {
                    let mut w_sorted = w.clone();
                    w_sorted.sort_by_key(|&(e, _)| e);
                    assert_eq!(g.len(), k, "token {t}");
                    for (&(ge, gw), &(we, ww)) in g.iter().zip(&w_sorted) {
                        assert_eq!(ge, we, "n {n} k {k} token {t}: experts {g:?} vs {w:?}");
                        assert_eq!(gw, ww as f32, "n {n} k {k} token {t}: the f64 weight rounded once");
                    }
                    if renormalize {
                        let sum: f64 = g.iter().map(|&(_, w)| w as f64).sum();
                        assert!((sum - 1.0).abs() < 1e-6, "token {t}: {sum}");
                    }
                }
                // The tied rows: all equal picks experts 0..k; two equal maxima pick 0 and n-1 first.
                let tied: Vec<usize> = got[0].iter().map(|&(e, _)| e).collect();
                assert_eq!(tied, (0..k).collect::<Vec<_>>());
                assert_eq!(want[1][0].0, 0, "the lower index first among equal maxima");
            }
        }
    }

    /// The grouped computation equals a per-token loop (each token through each of its experts,
    /// weighted, in f64); an expert no token chose is never called.
    #[test]
    fn grouped_experts_equal_a_per_token_loop() {
        let mut rng = SplitMix64::new(8);
        let (rows, hidden, n) = (23, 16, 6);
        let h = Tensor::from_f32(&[rows, hidden], rng.normal_vec(rows * hidden, 1.0)).unwrap();
        // Experts 0 and 1 score `+-50 h[0]`, 2 and 3 `+-50 h[1]`: one of each pair is positive, so
        // top-2 never reaches experts 4 and 5, whose logits are 0.
        let mut router_values = vec![0.0; n * hidden];
        for (e, sign) in [(0, 1.0), (1, -1.0), (2, 1.0), (3, -1.0)] {
            router_values[e * hidden + e / 2] = 50.0 * sign;
        }
        let router = Tensor::from_f32(&[n, hidden], router_values).unwrap();
        // Expert e scales its rows by e + 1 and reports them as its down input.
        let mut called = Vec::new();
        let routing = MoeRouting { n_experts: n, top_k: 2, renormalize: false };
        let got = moe_mlp(
            &h,
            &router,
            &routing,
            |e, x| {
                called.push(e);
                let y = ops::scale_columns(x, &vec![(e + 1) as f32; hidden])?;
                Ok((x.clone(), y))
            },
            true,
        )
        .unwrap();
        let logits = ops::linear_to(&h, &router, None, DType::F32).unwrap().to_f32_vec().unwrap();
        let want = reference(&logits, n, 2, false);
        let hv = h.to_f32_vec().unwrap();
        let out = got.out.to_f32_vec().unwrap();
        for t in 0..rows {
            for j in 0..hidden {
                let x = hv[t * hidden + j] as f64;
                let w: f64 = want[t].iter().map(|&(e, p)| (p as f32) as f64 * (e + 1) as f64 * x).sum();
                assert!((out[t * hidden + j] as f64 - w).abs() <= 1e-5 * w.abs().max(1.0), "[{t}, {j}]");
            }
        }
        assert_eq!(called, [0, 1, 2, 3], "experts 4 and 5 got no token");
        assert_eq!(got.down_inputs.len(), n);
        assert!(got.down_inputs[4..].iter().all(Option::is_none) && got.routes[5].rows.is_empty());
        let e0 = got.down_inputs[0].as_ref().unwrap();
        assert_eq!(e0.shape(), [got.routes[0].rows.len(), hidden]);
    }
}
