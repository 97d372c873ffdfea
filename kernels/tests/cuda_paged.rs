//! The serving engine's CUDA ops against their CPU references, on a GPU: writes into the paged KV
//! cache, RoPE at given positions, attention over the paged cache (prefill chunks, whole prompts on
//! the tensor cores, decodes with contexts long enough to be partitioned, GQA, sliding windows, head
//! sizes 64/128/256), and the
//! greedy sampler's argmax over rows of logits; and a decode step recorded as a CUDA graph
//! (`awq_kernels::Graph`), replayed with new inputs, against the same step run op by op.
//!
//! Skipped unless `AWQ_GPU_TESTS=1` (gpu-bin/run-gpu-tests sets it), like `cuda_ops.rs`.
#![cfg(feature = "cuda")]

mod common;

use common::{down, gpu, randn, rel};

use awq_kernels::ops::{
    apply_rope_at, argmax_rows, argmax_rows_into, embedding_at, gated_activation_fused, kv_cache_shape,
    paged_attention, rope_qkv_into_cache, write_kv_slots, zeros_kv_cache, FixedLayout, GatedActivation,
    PagedAttentionShape, PagedBatch, PagedSeq, RopeCache, RopeTable, NOT_FINITE,
};
use awq_kernels::rng::SplitMix64;
use awq_kernels::{DType, Device, Graph, Indices, Tensor};




/// A shuffled list of `n` distinct blocks.
fn shuffled(rng: &mut SplitMix64, n: usize) -> Vec<u32> {
    let mut all: Vec<u32> = (0..n as u32).collect();
    for i in (1..all.len()).rev() {
        all.swap(i, rng.below(i + 1));
    }
    all
}

#[test]
fn write_kv_slots_matches_cpu_bit_for_bit() {
    let Some(gpu) = gpu() else { return };
    let mut rng = SplitMix64::new(1);
    let shape = PagedAttentionShape { n_heads: 8, n_kv_heads: 2, head_dim: 64, block_size: 16, sliding_window: None };
    let n_blocks = 7;
    for (x_dtype, cache_dtype) in [(DType::F16, DType::F16), (DType::F32, DType::F16), (DType::BF16, DType::F32)] {
        // A cache full of distinct values, so untouched slots are checked too.
        let cache = randn(&mut rng, &kv_cache_shape(n_blocks, shape), 1.0, cache_dtype);
        let slots: Vec<u32> = shuffled(&mut rng, n_blocks * 16).into_iter().take(37).collect();
        let x = randn(&mut rng, &[37, 128], 1.0, x_dtype);
        let mut want = cache.clone();
        write_kv_slots(&mut want, &x, &Indices::host(slots.clone()), shape).unwrap();
        let mut got = cache.to_device(gpu).unwrap();
        write_kv_slots(&mut got, &x.to_device(gpu).unwrap(), &Indices::new(slots, gpu).unwrap(), shape).unwrap();
        assert_eq!(down(&got).to_le_bytes().unwrap(), want.to_le_bytes().unwrap(), "{x_dtype} into {cache_dtype}");
    }
}

#[test]
fn rope_at_matches_cpu_bit_for_bit() {
    let Some(gpu) = gpu() else { return };
    let mut rng = SplitMix64::new(2);
    for &(heads, hd, rot) in &[(9, 64, 64), (32, 128, 128), (4, 80, 64)] {
        let table = RopeTable::new(rot, 500_000.0);
        let (cpu_cache, gpu_cache) =
            (RopeCache::new(&table, 5000, Device::Cpu).unwrap(), RopeCache::new(&table, 5000, gpu).unwrap());
        let positions: Vec<u32> = (0..70).map(|_| rng.below(5000) as u32).collect();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let x = randn(&mut rng, &[70, heads * hd], 1.0, dtype);
            let want = apply_rope_at(&x, heads, hd, &Indices::host(positions.clone()), &cpu_cache).unwrap();
            let got = apply_rope_at(
                &x.to_device(gpu).unwrap(),
                heads,
                hd,
                &Indices::new(positions.clone(), gpu).unwrap(),
                &gpu_cache,
            )
            .unwrap();
            assert_eq!(
                down(&got).to_le_bytes().unwrap(),
                want.to_le_bytes().unwrap(),
                "{heads}x{hd} rot {rot} {dtype}"
            );
        }
    }
}

/// Fills a cache of random K and V for sequences of `lens` tokens on shuffled blocks; runs the
/// attention of `queries` (per sequence: first position, rows) on the CPU and the GPU.
fn check_attention(shape: PagedAttentionShape, lens: &[usize], queries: &[(usize, usize)], dtype: DType, seed: u64) {
    let gpu = Device::Cuda(0);
    let mut rng = SplitMix64::new(seed);
    let bs = shape.block_size;
    let n_blocks = lens.iter().map(|l| l.div_ceil(bs)).sum::<usize>() + 2;
    let order = shuffled(&mut rng, n_blocks);
    let mut tables = Vec::new();
    let mut next = 0;
    for l in lens {
        tables.push(order[next..next + l.div_ceil(bs)].to_vec());
        next += l.div_ceil(bs);
    }
    // Every slot random (unused ones too: a kernel reading past a row's positions would show).
    let k = randn(&mut rng, &kv_cache_shape(n_blocks, shape), 1.0, dtype);
    let v = randn(&mut rng, &kv_cache_shape(n_blocks, shape), 1.0, dtype);
    let rows: usize = queries.iter().map(|q| q.1).sum();
    let q = randn(&mut rng, &[rows, shape.n_heads * shape.head_dim], 2.0, dtype);
    let seqs: Vec<PagedSeq> = queries
        .iter()
        .zip(&tables)
        .map(|(&(first, n), t)| PagedSeq { block_table: t, first_position: first, n_queries: n })
        .collect();
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    let want =
        paged_attention(&q, &k, &v, &PagedBatch::new(&seqs, bs, n_blocks, Device::Cpu).unwrap(), shape, scale).unwrap();
    let batch = PagedBatch::new(&seqs, bs, n_blocks, gpu).unwrap();
    let (qd, kd, vd) = (q.to_device(gpu).unwrap(), k.to_device(gpu).unwrap(), v.to_device(gpu).unwrap());
    let got = paged_attention(&qd, &kd, &vd, &batch, shape, scale).unwrap();
    // f32 on both sides in another order (online softmax, warp sums), then the dtype's rounding.
    let tol = match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 1e-3,
        DType::BF16 => 8e-3,
    };
    let e = rel(&down(&got), &want);
    assert!(e <= tol, "{shape:?} {queries:?} {dtype}: rel err {e:.3e} > {tol:.0e}");
}

#[test]
fn paged_attention_matches_cpu() {
    let Some(_) = gpu() else { return };
    let llama = PagedAttentionShape { n_heads: 32, n_kv_heads: 8, head_dim: 128, block_size: 16, sliding_window: None };
    let smollm = PagedAttentionShape { n_heads: 9, n_kv_heads: 3, head_dim: 64, block_size: 16, sliding_window: None };
    for dtype in [DType::F16, DType::F32, DType::BF16] {
        // A prefill from 0, a chunk in the middle of a sequence and decodes, in one call.
        check_attention(llama, &[130, 300, 41, 1], &[(0, 130), (200, 100), (40, 1), (0, 1)], dtype, 1);
        // Decodes only, with contexts long enough to be partitioned (few rows: partitions fill the GPU).
        check_attention(llama, &[3000, 1025, 257], &[(2999, 1), (1024, 1), (256, 1)], dtype, 2);
        check_attention(smollm, &[700, 33], &[(0, 700), (32, 1)], dtype, 3);
    }
    // Many rows: one partition per row (whole prompts on the tensor cores, a chunk on the paged kernel).
    check_attention(llama, &[1024, 1024, 1500], &[(0, 1024), (0, 1024), (476, 1024)], DType::F16, 4);
    // Whole prompts between decodes; one past WHOLE_PROMPT_ROWS, which the paged kernel takes.
    check_attention(llama, &[41, 100, 8], &[(40, 1), (0, 100), (7, 1)], DType::BF16, 9);
    check_attention(llama, &[2049, 70, 5], &[(0, 2049), (0, 70), (4, 1)], DType::F16, 10);
    // 8 query heads per KV head, heads of 256, a block size of 32, sliding windows.
    let wide = PagedAttentionShape { n_heads: 16, n_kv_heads: 2, head_dim: 256, block_size: 32, sliding_window: None };
    check_attention(wide, &[600, 90], &[(0, 90), (89, 1)], DType::F16, 5);
    let window = PagedAttentionShape { sliding_window: Some(100), ..llama };
    check_attention(window, &[2000, 150, 50], &[(1999, 1), (0, 150), (49, 1)], DType::F16, 6);
    check_attention(window, &[2000], &[(1990, 10)], DType::F32, 7);
    // Multi-head attention (one query head per KV head).
    let mha = PagedAttentionShape { n_heads: 4, n_kv_heads: 4, head_dim: 64, block_size: 16, sliding_window: None };
    check_attention(mha, &[513], &[(512, 1)], DType::F16, 8);
}

#[test]
fn argmax_rows_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = SplitMix64::new(9);
    for &(rows, cols) in &[(1, 128_256), (128, 49_152), (3, 31), (5, 1025)] {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let mut values = rng.normal_vec(rows * cols, 4.0);
            // Ties: row 0's maximum twice (the first wins), and a NaN and an infinity in the last row.
            let max = values[..cols].iter().copied().fold(f32::MIN, f32::max) + 1.0;
            values[cols / 3] = max;
            values[cols / 2] = max;
            if rows > 2 {
                values[(rows - 1) * cols + 7] = f32::NAN;
                values[(rows - 2) * cols] = f32::INFINITY;
            }
            let x = Tensor::from_f32_as(&[rows, cols], values, dtype).unwrap();
            let want = argmax_rows(&x).unwrap();
            assert_eq!(want[0], (cols / 3) as u32);
            if rows > 2 {
                assert_eq!((want[rows - 1], want[rows - 2]), (NOT_FINITE, NOT_FINITE));
            }
            assert_eq!(argmax_rows(&x.to_device(gpu).unwrap()).unwrap(), want, "{rows}x{cols} {dtype}");
        }
    }
}

#[test]
fn the_fused_qkv_step_and_gated_activation_match_cpu_bit_for_bit() {
    let Some(gpu) = gpu() else { return };
    let mut rng = SplitMix64::new(10);
    for &(heads, kv_heads, hd) in &[(32, 8, 128), (9, 3, 64)] {
        let shape = PagedAttentionShape {
            n_heads: heads,
            n_kv_heads: kv_heads,
            head_dim: hd,
            block_size: 16,
            sliding_window: None,
        };
        let table = RopeTable::new(hd, 500_000.0);
        let (cpu_rope, gpu_rope) =
            (RopeCache::new(&table, 4096, Device::Cpu).unwrap(), RopeCache::new(&table, 4096, gpu).unwrap());
        let n_blocks = 20;
        let blocks: Vec<u32> = shuffled(&mut rng, n_blocks);
        // A prefill chunk mid-sequence and two decodes.
        let seqs = [
            PagedSeq { block_table: &blocks[0..8], first_position: 30, n_queries: 90 },
            PagedSeq { block_table: &blocks[8..12], first_position: 63, n_queries: 1 },
            PagedSeq { block_table: &blocks[12..20], first_position: 100, n_queries: 1 },
        ];
        let rows = 92;
        for (dtype, cache_dtype) in [(DType::F16, DType::F16), (DType::F32, DType::F16), (DType::BF16, DType::BF16)] {
            let qkv = randn(&mut rng, &[rows, (heads + 2 * kv_heads) * hd], 1.0, dtype);
            let k0 = randn(&mut rng, &kv_cache_shape(n_blocks, shape), 1.0, cache_dtype);
            let v0 = randn(&mut rng, &kv_cache_shape(n_blocks, shape), 1.0, cache_dtype);
            let (mut k, mut v) = (k0.clone(), v0.clone());
            let batch = PagedBatch::new(&seqs, 16, n_blocks, Device::Cpu).unwrap();
            let q = rope_qkv_into_cache(&qkv, &batch, &cpu_rope, &mut k, &mut v, shape).unwrap();
            let (mut kd, mut vd) = (k0.to_device(gpu).unwrap(), v0.to_device(gpu).unwrap());
            let batch = PagedBatch::new(&seqs, 16, n_blocks, gpu).unwrap();
            let qd =
                rope_qkv_into_cache(&qkv.to_device(gpu).unwrap(), &batch, &gpu_rope, &mut kd, &mut vd, shape).unwrap();
            let what = format!("{heads}/{kv_heads}x{hd} {dtype} cache {cache_dtype}");
            assert_eq!(down(&qd).to_le_bytes().unwrap(), q.to_le_bytes().unwrap(), "q {what}");
            assert_eq!(down(&kd).to_le_bytes().unwrap(), k.to_le_bytes().unwrap(), "k cache {what}");
            assert_eq!(down(&vd).to_le_bytes().unwrap(), v.to_le_bytes().unwrap(), "v cache {what}");
        }
    }
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let gu = randn(&mut rng, &[37, 2 * 1536], 2.0, dtype);
        for act in [GatedActivation::Silu, GatedActivation::GeluTanh] {
            let want = gated_activation_fused(act, &gu).unwrap();
            let got = gated_activation_fused(act, &gu.to_device(gpu).unwrap()).unwrap();
            // expf/tanhf on the device against Rust's libm: within an f32 ulp, then the dtype's rounding.
            let e = rel(&down(&got), &want);
            assert!(e < if dtype == DType::F32 { 1e-6 } else { 5e-3 }, "{act:?} {dtype}: {e:.2e}");
        }
    }
}

/// The tensors of the graph test's step: query/key/value tables (a token's q, k, v are its rows),
/// the two caches, and the step's outputs.
struct GraphStep {
    q_table: Tensor,
    k_table: Tensor,
    v_table: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    out: Tensor,
    argmax: Indices,
}

impl GraphStep {
    /// One decode step: K and V of the step's tokens into their slots, attention over the cache,
    /// the result into `out` and its rows' argmax into `argmax` (what a recorded step ends with).
    fn run(&mut self, ids: &Indices, batch: &PagedBatch, shape: PagedAttentionShape) -> awq_kernels::Result<()> {
        let q = embedding_at(&self.q_table, ids, DType::F16)?;
        write_kv_slots(&mut self.k_cache, &embedding_at(&self.k_table, ids, DType::F16)?, batch.slots(), shape)?;
        write_kv_slots(&mut self.v_cache, &embedding_at(&self.v_table, ids, DType::F16)?, batch.slots(), shape)?;
        let attended = paged_attention(&q, &self.k_cache, &self.v_cache, batch, shape, 0.125)?;
        self.out.write_rows(0, &attended)?;
        argmax_rows_into(&attended, &mut self.argmax)
    }
}

#[test]
fn a_recorded_step_replays_with_new_inputs_as_the_ops_run_one_by_one() {
    let Some(gpu) = gpu() else { return };
    let shape = PagedAttentionShape { n_heads: 4, n_kv_heads: 2, head_dim: 64, block_size: 16, sliding_window: None };
    let (vocab, n_blocks, rows) = (50, 12, 4);
    let mut rng = SplitMix64::new(21);
    let step = |rng: &mut SplitMix64| GraphStep {
        q_table: randn(rng, &[vocab, 256], 1.0, DType::F16).to_device(gpu).unwrap(),
        k_table: randn(rng, &[vocab, 128], 1.0, DType::F16).to_device(gpu).unwrap(),
        v_table: randn(rng, &[vocab, 128], 1.0, DType::F16).to_device(gpu).unwrap(),
        k_cache: zeros_kv_cache(n_blocks, shape, DType::F16, gpu).unwrap(),
        v_cache: zeros_kv_cache(n_blocks, shape, DType::F16, gpu).unwrap(),
        out: Tensor::zeros_on(&[rows, 256], DType::F16, gpu).unwrap(),
        argmax: Indices::zeros(rows, gpu).unwrap(),
    };
    // Two copies of the same tensors: one replays the graph, the other runs the ops.
    let mut recorded = step(&mut rng);
    let mut direct = GraphStep {
        q_table: recorded.q_table.clone(),
        k_table: recorded.k_table.clone(),
        v_table: recorded.v_table.clone(),
        ..step(&mut SplitMix64::new(0))
    };
    // Four sequences of three blocks each; every step decodes one more position of each.
    let tables: Vec<Vec<u32>> = (0..rows as u32).map(|s| vec![s, s + 4, s + 8]).collect();
    let layout = FixedLayout { rows, table_len: 3, max_context: 48 };
    let seqs = |p: usize| -> Vec<PagedSeq> {
        tables.iter().map(|t| PagedSeq { block_table: t, first_position: p, n_queries: 1 }).collect()
    };
    let token = |p: usize, s: usize| ((p * 7 + s * 13) % vocab) as u32;
    let ids_at = |p: usize| (0..rows).map(|s| token(p, s)).collect::<Vec<u32>>();
    let mut ids = Indices::new(ids_at(0), gpu).unwrap();
    let mut batch = PagedBatch::fixed(&seqs(0), 16, n_blocks, layout, gpu).unwrap();
    // Position 0 run directly on both (the warm-up a recording needs), then recorded.
    recorded.run(&ids, &batch, shape).unwrap();
    direct.run(&ids, &batch, shape).unwrap();
    let (mut graph, ()) = Graph::record(gpu, || recorded.run(&ids, &batch, shape)).unwrap();
    for p in 1..40 {
        ids.overwrite(&ids_at(p)).unwrap();
        batch.refill(&seqs(p)).unwrap();
        graph.launch().unwrap();
        let replayed = (recorded.out.to_f32_vec().unwrap(), recorded.argmax.read_back().unwrap().to_vec());
        direct.run(&ids, &batch, shape).unwrap();
        let ran = (direct.out.to_f32_vec().unwrap(), direct.argmax.read_back().unwrap().to_vec());
        assert_eq!(replayed, ran, "position {p}: the replay and the ops differ");
        // And against the CPU (the cache written so far, attended with the reference).
        if p == 39 {
            let cpu_batch = PagedBatch::new(&seqs(p), 16, n_blocks, Device::Cpu).unwrap();
            let q = embedding_at(&down(&recorded.q_table), &Indices::host(ids_at(p)), DType::F32).unwrap();
            let want =
                paged_attention(&q, &down(&recorded.k_cache), &down(&recorded.v_cache), &cpu_batch, shape, 0.125).unwrap();
            let e = rel(&down(&recorded.out), &want);
            assert!(e < 1e-3, "replayed attention against the CPU: rel err {e:.2e}");
        }
    }
    // A refill of another shape is refused before anything is written.
    let err = batch.refill(&seqs(0)[..2]).unwrap_err();
    assert!(matches!(err, awq_kernels::Error::Shape { .. }), "{err}");
}
