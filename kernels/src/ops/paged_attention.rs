//! Attention over a paged KV cache (Kwon et al. 2023, vLLM's PagedAttention): the serving engine's
//! attention, where each sequence's keys and values live in fixed-size blocks named by a block table.
//!
//! One layer's cache is two tensors `k_cache`, `v_cache` of shape `[n_blocks, block_size,
//! n_kv_heads, head_dim]`; position `p` of a sequence with block table `t` lives at slot
//! `t[p / block_size] * block_size + p % block_size` (row `slot` of the cache seen as `[n_blocks *
//! block_size, n_kv_heads * head_dim]`). [`write_kv_slots`] stores the K (or V) rows of the tokens a
//! step computes into their slots; [`paged_attention`] then lets each query row attend to its
//! sequence's positions `0..=p` (causal; the last `w` positions only with a sliding window `w`),
//! with grouped-query heads as [`super::causal_attention`]: query head `h` reads KV head `h / (n_heads
//! / n_kv_heads)`. Scores `q k^T * scale` are soft-maxed in f32 as in `causal_attention`, so one
//! sequence computed whole there, or in chunks (prefill) and one token at a time (decode) here,
//! gives the same values up to f32 rounding. The same call mixes prefill chunks and decodes: each
//! [`PagedSeq`] names its block table, the position of its first query row and how many rows it has.
//!
//! The CPU reference is one task per (query row, head), written to be read. CUDA answers
//! [`Error::NoCudaImplementation`] for now (the prefill and decode kernels come with the CUDA model
//! runner).

use rayon::prelude::*;

use super::{operands, Operands};
use crate::{DType, Error, Result, Tensor};

/// The head layout of a paged cache and the attention over it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagedAttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Token slots per cache block.
    pub block_size: usize,
    /// Attend only to the last `w` positions (Mistral); `None` for full causal attention.
    pub sliding_window: Option<usize>,
}

/// One sequence's query rows in a [`paged_attention`] call: `n_queries` consecutive rows of `q`, at
/// positions `first_position..first_position + n_queries`, over the cache blocks of `block_table`
/// (which must cover every position up to the last query's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagedSeq<'a> {
    pub block_table: &'a [u32],
    pub first_position: usize,
    pub n_queries: usize,
}

/// The cache shape `[n_blocks, block_size, n_kv_heads, head_dim]` of one layer's K (or V).
pub fn kv_cache_shape(n_blocks: usize, shape: PagedAttentionShape) -> [usize; 4] {
    [n_blocks, shape.block_size, shape.n_kv_heads, shape.head_dim]
}

/// Checks that `cache` is a 4-D cache of `shape`'s layout; returns its slot count.
fn cache_slots(op: &'static str, cache: &Tensor, shape: PagedAttentionShape) -> Result<usize> {
    match cache.shape() {
        &[n_blocks, bs, kvh, hd] if bs == shape.block_size && kvh == shape.n_kv_heads && hd == shape.head_dim => {
            Ok(n_blocks * bs)
        }
        other => Err(Error::Shape {
            op,
            detail: format!(
                "cache is {other:?}, expected [n_blocks, {}, {}, {}]",
                shape.block_size, shape.n_kv_heads, shape.head_dim
            ),
        }),
    }
}

/// Writes row `i` of `x[rows, n_kv_heads * head_dim]` (a step's keys or values) into slot
/// `slots[i]` of `cache` (an f32 host cache of `shape`'s layout); other slots are untouched.
///
/// Errors: [`Error::Shape`] for a layout mismatch, [`Error::Index`] for a slot outside the cache,
/// [`Error::DType`] for a cache that is not f32, [`Error::NoCudaImplementation`] on a CUDA device.
pub fn write_kv_slots(cache: &mut Tensor, x: &Tensor, slots: &[usize], shape: PagedAttentionShape) -> Result<()> {
    let n_slots = cache_slots("write_kv_slots", cache, shape)?;
    let width = shape.n_kv_heads * shape.head_dim;
    let (rows, x_width) = x.dims2("write_kv_slots")?;
    if x_width != width || rows != slots.len() {
        return Err(Error::Shape {
            op: "write_kv_slots",
            detail: format!("x is [{rows}, {x_width}] for {} slots of width {width}", slots.len()),
        });
    }
    if let Some(&bad) = slots.iter().find(|&&s| s >= n_slots) {
        return Err(Error::Index { op: "write_kv_slots", index: bad, len: n_slots });
    }
    match operands("write_kv_slots", [&*cache, x])? {
        Operands::Cpu => {}
        #[cfg(feature = "cuda")]
        Operands::Cuda(..) => return Err(Error::NoCudaImplementation { op: "write_kv_slots", device: cache.device() }),
    }
    let dtype = cache.dtype();
    let xv = x.f32_values()?;
    let data = cache.f32_values_mut().ok_or(Error::DType { op: "write_kv_slots", dtype })?;
    for (row, &slot) in xv.chunks_exact(width.max(1)).zip(slots) {
        data[slot * width..(slot + 1) * width].copy_from_slice(row);
    }
    Ok(())
}

/// Attention of every row of `q[rows, n_heads * head_dim]` (rotary applied) over its sequence's
/// cached keys and values (see the module docs); `seqs` cover the rows in order. Output
/// `[rows, n_heads * head_dim]` in `q`'s dtype.
///
/// Errors: [`Error::Shape`] when the shapes disagree, [`Error::Index`] when a block table does not
/// cover a query's position or names a block outside the cache, [`Error::NoCudaImplementation`] on
/// a CUDA device.
pub fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    seqs: &[PagedSeq<'_>],
    shape: PagedAttentionShape,
    scale: f32,
) -> Result<Tensor> {
    let PagedAttentionShape { n_heads, n_kv_heads, head_dim, block_size, .. } = shape;
    let (rows, q_width) = q.dims2("paged_attention")?;
    let n_slots = cache_slots("paged_attention", k_cache, shape)?;
    cache_slots("paged_attention", v_cache, shape)?;
    let total: usize = seqs.iter().map(|s| s.n_queries).sum();
    if n_kv_heads == 0 || n_heads % n_kv_heads != 0 || q_width != n_heads * head_dim || total != rows {
        return Err(Error::Shape {
            op: "paged_attention",
            detail: format!(
                "q {:?} with {n_heads} heads, {n_kv_heads} kv heads of {head_dim}; the sequences have {total} query rows",
                q.shape()
            ),
        });
    }
    let n_blocks = n_slots / block_size.max(1);
    for s in seqs {
        let end = s.first_position + s.n_queries;
        if s.block_table.len() * block_size < end {
            return Err(Error::Index { op: "paged_attention", index: end - 1, len: s.block_table.len() * block_size });
        }
        if let Some(&b) = s.block_table.iter().find(|&&b| b as usize >= n_blocks) {
            return Err(Error::Index { op: "paged_attention", index: b as usize, len: n_blocks });
        }
    }
    match operands("paged_attention", [q, k_cache, v_cache])? {
        Operands::Cpu => paged_attention_cpu(q, k_cache, v_cache, seqs, shape, scale, rows),
        #[cfg(feature = "cuda")]
        Operands::Cuda(..) => Err(Error::NoCudaImplementation { op: "paged_attention", device: q.device() }),
    }
}

/// The reference, on shapes `paged_attention` checked.
fn paged_attention_cpu(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    seqs: &[PagedSeq<'_>],
    shape: PagedAttentionShape,
    scale: f32,
    rows: usize,
) -> Result<Tensor> {
    let PagedAttentionShape { n_heads, n_kv_heads, head_dim, block_size, sliding_window } = shape;
    let (qv, kv, vv) = (q.f32_values()?, k_cache.f32_values()?, v_cache.f32_values()?);
    let q_width = n_heads * head_dim;
    let group = n_heads / n_kv_heads;
    // Each row's sequence and position.
    let mut row_of: Vec<(&[u32], usize)> = Vec::with_capacity(rows);
    for s in seqs {
        row_of.extend((0..s.n_queries).map(|j| (s.block_table, s.first_position + j)));
    }
    let mut out = vec![0.0f32; rows * q_width];
    out.par_chunks_mut(head_dim.max(1)).enumerate().for_each(|(task, o)| {
        let (r, h) = (task / n_heads, task % n_heads);
        let kvh = h / group;
        let (table, pos) = row_of[r];
        let first = sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let qh = &qv[r * q_width + h * head_dim..][..head_dim];
        // Where position t's KV head starts in the caches.
        let at = |t: usize| {
            let slot = table[t / block_size] as usize * block_size + t % block_size;
            (slot * n_kv_heads + kvh) * head_dim
        };
        let mut scores: Vec<f32> = (first..=pos)
            .map(|t| {
                let k = &kv[at(t)..][..head_dim];
                qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale
            })
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        for (t, p) in (first..=pos).zip(&scores) {
            let v = &vv[at(t)..][..head_dim];
            let p = p * inv;
            o.iter_mut().zip(v).for_each(|(o, v)| *o += p * v);
        }
    });
    Tensor::from_f32_as(&[rows, q_width], out, q.dtype())
}

/// An empty f32 cache of `n_blocks` blocks for one layer's K or V (zeros).
pub fn zeros_kv_cache(n_blocks: usize, shape: PagedAttentionShape) -> Tensor {
    Tensor::zeros(&kv_cache_shape(n_blocks, shape), DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::rel;
    use crate::rng::SplitMix64;

    const GUARD: f32 = -7.25;

    /// A shuffled block table of `n` distinct blocks out of `n_blocks`.
    fn table(rng: &mut SplitMix64, n: usize, n_blocks: usize) -> Vec<u32> {
        let mut all: Vec<u32> = (0..n_blocks as u32).collect();
        for i in (1..all.len()).rev() {
            all.swap(i, rng.below(i + 1));
        }
        all.truncate(n);
        all
    }

    #[test]
    fn write_kv_slots_writes_exactly_its_slots() {
        let shape = PagedAttentionShape { n_heads: 4, n_kv_heads: 2, head_dim: 8, block_size: 4, sliding_window: None };
        let mut rng = SplitMix64::new(1);
        let n_blocks = 5;
        let width = 16;
        let mut cache = Tensor::from_f32(&kv_cache_shape(n_blocks, shape), vec![GUARD; n_blocks * 4 * width]).unwrap();
        let slots = [3, 17, 0, 9, 19];
        let x = Tensor::from_f32(&[5, width], rng.normal_vec(5 * width, 1.0)).unwrap();
        write_kv_slots(&mut cache, &x, &slots, shape).unwrap();
        let (c, xv) = (cache.f32_values().unwrap(), x.f32_values().unwrap());
        for slot in 0..n_blocks * 4 {
            let got = &c[slot * width..(slot + 1) * width];
            match slots.iter().position(|&s| s == slot) {
                Some(i) => assert_eq!(got, &xv[i * width..(i + 1) * width], "slot {slot}"),
                None => assert!(got.iter().all(|&v| v == GUARD), "slot {slot} was touched"),
            }
        }
        let err = write_kv_slots(&mut cache, &x, &[0, 1, 2, 3, 20], shape).unwrap_err();
        assert!(matches!(err, Error::Index { index: 20, len: 20, .. }), "{err}");
        let err = write_kv_slots(&mut cache, &x, &[0, 1], shape).unwrap_err();
        assert!(matches!(err, Error::Shape { .. }), "{err}");
    }

    fn check(shape: PagedAttentionShape, seqs: &[(usize, usize)], seed: u64) {
        let mut rng = SplitMix64::new(seed);
        let PagedAttentionShape { n_heads, n_kv_heads, head_dim: hd, block_size: bs, .. } = shape;
        let kvw = n_kv_heads * hd;
        let lens: Vec<usize> = seqs.iter().map(|&(f, n)| f + n).collect();
        let n_blocks = lens.iter().map(|l| l.div_ceil(bs)).sum::<usize>() + 3;
        let mut k_cache = zeros_kv_cache(n_blocks, shape);
        let mut v_cache = zeros_kv_cache(n_blocks, shape);
        // Distinct blocks per sequence, shuffled over the whole cache.
        let all = table(&mut rng, n_blocks, n_blocks);
        let mut tables = Vec::new();
        let mut next = 0;
        for l in &lens {
            tables.push(all[next..next + l.div_ceil(bs)].to_vec());
            next += l.div_ceil(bs);
        }
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for (s, &l) in lens.iter().enumerate() {
            let ks = rng.normal_vec(l * kvw, 1.0);
            let vs = rng.normal_vec(l * kvw, 1.0);
            let slots: Vec<usize> = (0..l).map(|p| tables[s][p / bs] as usize * bs + p % bs).collect();
            write_kv_slots(&mut k_cache, &Tensor::from_f32(&[l, kvw], ks.clone()).unwrap(), &slots, shape).unwrap();
            write_kv_slots(&mut v_cache, &Tensor::from_f32(&[l, kvw], vs.clone()).unwrap(), &slots, shape).unwrap();
            k.push(ks);
            v.push(vs);
        }
        let rows: usize = seqs.iter().map(|s| s.1).sum();
        let qv = rng.normal_vec(rows * n_heads * hd, 1.0);
        let q = Tensor::from_f32(&[rows, n_heads * hd], qv.clone()).unwrap();
        let paged: Vec<PagedSeq> = seqs
            .iter()
            .zip(&tables)
            .map(|(&(f, n), t)| PagedSeq { block_table: t, first_position: f, n_queries: n })
            .collect();
        let scale = 1.0 / (hd as f32).sqrt();
        let got = paged_attention(&q, &k_cache, &v_cache, &paged, shape, scale).unwrap();
        let mut want = Vec::new();
        let mut r0 = 0;
        for (s, &(f, n)) in seqs.iter().enumerate() {
            let qs = &qv[r0 * n_heads * hd..(r0 + n) * n_heads * hd];
            want.extend(reference(qs, &k[s], &v[s], f, n, shape, scale));
            r0 += n;
        }
        // f32 dot products and softmax against f64: a few ulps per term over at most ~70 positions.
        let e = rel(&got.f32_values().unwrap(), &want);
        assert!(e < 1e-5, "{shape:?} {seqs:?}: relative error {e}");
    }

    /// The f64 formula for one sequence's `n` query rows at positions `first..`, on its dense K and V
    /// `[len, n_kv_heads * head_dim]`: softmax over the visible positions of q.k * scale, applied to v.
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        first: usize,
        n: usize,
        shape: PagedAttentionShape,
        scale: f32,
    ) -> Vec<f64> {
        let PagedAttentionShape { n_heads, n_kv_heads, head_dim: hd, sliding_window, .. } = shape;
        let kvw = n_kv_heads * hd;
        let mut out = Vec::new();
        for (j, pos) in (first..first + n).enumerate() {
            for h in 0..n_heads {
                let kvh = h / (n_heads / n_kv_heads);
                let lo = sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
                let qh = &q[(j * n_heads + h) * hd..][..hd];
                let scores: Vec<f64> = (lo..=pos)
                    .map(|t| {
                        let kk = &k[t * kvw + kvh * hd..][..hd];
                        qh.iter().zip(kk).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale as f64
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for d in 0..hd {
                    let o: f64 = (lo..=pos)
                        .zip(&scores)
                        .map(|(t, s)| (s - max).exp() / sum * v[t * kvw + kvh * hd + d] as f64)
                        .sum();
                    out.push(o);
                }
            }
        }
        out
    }

    #[test]
    fn paged_attention_matches_the_f64_formula() {
        let gqa = PagedAttentionShape { n_heads: 6, n_kv_heads: 2, head_dim: 16, block_size: 4, sliding_window: None };
        // One prefill from 0, a chunk in the middle, decodes (one row), all in one call.
        check(gqa, &[(0, 9), (13, 7), (40, 1), (5, 1)], 11);
        check(gqa, &[(0, 1)], 12);
        let mha = PagedAttentionShape { n_heads: 3, n_kv_heads: 3, head_dim: 8, block_size: 16, sliding_window: None };
        check(mha, &[(0, 33), (70, 1)], 13);
        let window = PagedAttentionShape { sliding_window: Some(5), ..gqa };
        check(window, &[(0, 12), (20, 3), (3, 1)], 14);
    }

    #[test]
    fn a_table_too_short_for_its_positions_is_refused() {
        let shape = PagedAttentionShape { n_heads: 2, n_kv_heads: 1, head_dim: 4, block_size: 4, sliding_window: None };
        let k = zeros_kv_cache(3, shape);
        let q = Tensor::zeros(&[2, 8], DType::F32);
        let seqs = [PagedSeq { block_table: &[0, 1], first_position: 7, n_queries: 2 }];
        let err = paged_attention(&q, &k, &k, &seqs, shape, 1.0).unwrap_err();
        assert!(matches!(err, Error::Index { index: 8, len: 8, .. }), "{err}");
        let seqs = [PagedSeq { block_table: &[0, 3], first_position: 0, n_queries: 2 }];
        let err = paged_attention(&q, &k, &k, &seqs, shape, 1.0).unwrap_err();
        assert!(matches!(err, Error::Index { index: 3, len: 3, .. }), "{err}");
    }
}
