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
//! The step's indices are resolved once into a [`PagedBatch`] (each row's position, slot and block
//! table; uploaded once for a CUDA step) that every layer's calls read.
//!
//! The CPU reference is one task per (query row, head), written to be read. The CUDA kernels
//! (`paged_attention.cu`) take one block per (row, KV head, partition of the row's positions),
//! serving the query heads of that KV head together with an online softmax; with several
//! partitions (a decode step's few rows) a second kernel merges them. They support head sizes 64,
//! 128 and 256 and up to 8 query heads per KV head.

use rayon::prelude::*;

use super::{operands, Operands};
use crate::{DType, Device, Error, Indices, Result, Tensor};

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

/// One sequence's query rows in a step: `n_queries` consecutive rows of `q`, at positions
/// `first_position..first_position + n_queries`, over the cache blocks of `block_table` (which must
/// cover every position up to the last query's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagedSeq<'a> {
    pub block_table: &'a [u32],
    pub first_position: usize,
    pub n_queries: usize,
}

/// A step's query rows over a paged cache of `n_cache_blocks` blocks, checked and resolved once:
/// each row's position and cache slot, and its sequence's block table (all of them concatenated).
#[derive(Debug)]
pub struct PagedBatch {
    block_size: usize,
    n_cache_blocks: usize,
    positions: Indices,
    slots: Indices,
    /// Per row: where its sequence's block table starts in `tables`.
    row_tables: Indices,
    tables: Indices,
    /// The most positions any row reads (its position + 1): what the CUDA kernel partitions.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    max_context: usize,
    /// Set for a batch made by [`PagedBatch::fixed`].
    layout: Option<FixedLayout>,
    /// The sequences whose rows are their whole prompt so far, which a CUDA device attends on the
    /// tensor cores (see [`WholePrompt`]); none on the CPU and in a fixed batch.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    whole_prompts: Vec<WholePrompt>,
}

/// A sequence whose rows in a step are positions `0..n` with `n` in [`WHOLE_PROMPT_ROWS`] (a
/// prompt prefilled in one chunk): its keys and values are exactly its own rows, so on a CUDA
/// device its attention is [`super::causal_attention`] (two batched cuBLAS GEMMs on the tensor
/// cores) over its K and V gathered back from the cache at `slots`, instead of the paged kernel,
/// whose CUDA-core dot products are what a prefill of an 8B model waited on.
#[derive(Debug)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct WholePrompt {
    rows: std::ops::Range<usize>,
    slots: Indices,
}

/// Prompt lengths attended as [`WholePrompt`]s: from where the tensor cores beat the paged kernel,
/// up to where the score matrices (`n_heads * n * n` f32 per sequence, 512 MiB for 32 heads of
/// 2048 positions) stop being small next to a step's other activations.
pub const WHOLE_PROMPT_ROWS: std::ops::RangeInclusive<usize> = 64..=2048;

/// The layout of a batch whose buffers are rewritten in place from step to step
/// ([`PagedBatch::fixed`], [`PagedBatch::refill`]): what a recorded [`crate::Graph`] reads, so
/// everything its kernels were recorded with stays the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FixedLayout {
    /// Query rows, always all of them (a caller pads with rows of a spare sequence).
    pub rows: usize,
    /// Entries per block table: each sequence's table is padded to this length.
    pub table_len: usize,
    /// The most positions a row may read: the CUDA kernel's partitions are cut for this many.
    pub max_context: usize,
}

/// A batch's indices on the host.
struct HostBatch {
    positions: Vec<u32>,
    slots: Vec<u32>,
    row_tables: Vec<u32>,
    tables: Vec<u32>,
    max_context: usize,
    /// Each sequence's first position and rows.
    seq_rows: Vec<(usize, std::ops::Range<usize>)>,
}

/// Checks `seqs` against the cache and resolves their rows; with `layout`, to its fixed shape.
fn resolve(
    seqs: &[PagedSeq<'_>],
    block_size: usize,
    n_cache_blocks: usize,
    layout: Option<FixedLayout>,
) -> Result<HostBatch> {
    let rows: usize = seqs.iter().map(|s| s.n_queries).sum();
    let mut b = HostBatch {
        positions: Vec::with_capacity(rows),
        slots: Vec::with_capacity(rows),
        row_tables: Vec::with_capacity(rows),
        tables: Vec::new(),
        max_context: 0,
        seq_rows: Vec::with_capacity(seqs.len()),
    };
    for s in seqs {
        let end = s.first_position + s.n_queries;
        if s.block_table.len() * block_size < end {
            return Err(Error::Index { op: "paged_attention", index: end - 1, len: s.block_table.len() * block_size });
        }
        if let Some(&bad) = s.block_table.iter().find(|&&b| b as usize >= n_cache_blocks) {
            return Err(Error::Index { op: "paged_attention", index: bad as usize, len: n_cache_blocks });
        }
        let table_start = b.tables.len() as u32;
        b.seq_rows.push((s.first_position, b.positions.len()..b.positions.len() + s.n_queries));
        b.tables.extend_from_slice(s.block_table);
        if let Some(l) = layout {
            if s.block_table.len() > l.table_len {
                return Err(Error::Index { op: "paged_attention", index: s.block_table.len(), len: l.table_len });
            }
            b.tables.resize(table_start as usize + l.table_len, 0);
        }
        for p in s.first_position..end {
            b.positions.push(p as u32);
            b.slots.push(s.block_table[p / block_size] * block_size as u32 + (p % block_size) as u32);
            b.row_tables.push(table_start);
        }
        b.max_context = b.max_context.max(end);
    }
    if let Some(l) = layout {
        if rows != l.rows || b.max_context > l.max_context {
            return Err(Error::Shape {
                op: "paged_attention",
                detail: format!("{rows} rows reading up to {} positions for a batch fixed at {l:?}", b.max_context),
            });
        }
        // Room for a table per row: the most sequences the rows can be.
        b.tables.resize(l.rows * l.table_len, 0);
        b.max_context = l.max_context;
    }
    Ok(b)
}

impl PagedBatch {
    /// The rows of `seqs`, in order, for ops on `device`.
    ///
    /// Errors: [`Error::Index`] when a block table does not cover its sequence's last position or
    /// names a block outside the cache; what uploading to `device` reports.
    pub fn new(seqs: &[PagedSeq<'_>], block_size: usize, n_cache_blocks: usize, device: Device) -> Result<PagedBatch> {
        PagedBatch::upload(resolve(seqs, block_size, n_cache_blocks, None)?, block_size, n_cache_blocks, None, device)
    }

    /// [`PagedBatch::new`] laid out as `layout` says, for rewriting with [`PagedBatch::refill`].
    ///
    /// Errors: as [`PagedBatch::new`]; [`Error::Shape`] when `seqs` do not have `layout.rows` rows or
    /// read more than `layout.max_context` positions, [`Error::Index`] for a block table longer than
    /// `layout.table_len`.
    pub fn fixed(
        seqs: &[PagedSeq<'_>],
        block_size: usize,
        n_cache_blocks: usize,
        layout: FixedLayout,
        device: Device,
    ) -> Result<PagedBatch> {
        let host = resolve(seqs, block_size, n_cache_blocks, Some(layout))?;
        PagedBatch::upload(host, block_size, n_cache_blocks, Some(layout), device)
    }

    /// Rewrites a [`PagedBatch::fixed`] batch with the rows of `seqs`, in place (see
    /// [`Indices::overwrite`]). Errors: as [`PagedBatch::fixed`]; [`Error::Shape`] for a batch not
    /// made by it.
    pub fn refill(&mut self, seqs: &[PagedSeq<'_>]) -> Result<()> {
        let Some(layout) = self.layout else {
            return Err(Error::Shape { op: "paged_attention", detail: "refill of a batch not made by PagedBatch::fixed".into() });
        };
        let host = resolve(seqs, self.block_size, self.n_cache_blocks, Some(layout))?;
        self.positions.overwrite(&host.positions)?;
        self.slots.overwrite(&host.slots)?;
        self.row_tables.overwrite(&host.row_tables)?;
        self.tables.overwrite(&host.tables)
    }

    fn upload(
        host: HostBatch,
        block_size: usize,
        n_cache_blocks: usize,
        layout: Option<FixedLayout>,
        device: Device,
    ) -> Result<PagedBatch> {
        let mut whole_prompts = Vec::new();
        if device != Device::Cpu && layout.is_none() {
            for (first, rows) in &host.seq_rows {
                if *first == 0 && WHOLE_PROMPT_ROWS.contains(&rows.len()) {
                    let slots = Indices::new(host.slots[rows.clone()].to_vec(), device)?;
                    whole_prompts.push(WholePrompt { rows: rows.clone(), slots });
                }
            }
        }
        Ok(PagedBatch {
            whole_prompts,
            block_size,
            n_cache_blocks,
            positions: Indices::new(host.positions, device)?,
            slots: Indices::new(host.slots, device)?,
            row_tables: Indices::new(host.row_tables, device)?,
            tables: Indices::new(host.tables, device)?,
            max_context: host.max_context,
            layout,
        })
    }

    /// Query rows.
    pub fn rows(&self) -> usize {
        self.positions.len()
    }

    /// Each row's position (what RoPE rotates by).
    pub fn positions(&self) -> &Indices {
        &self.positions
    }

    /// Each row's cache slot (where its K and V go).
    pub fn slots(&self) -> &Indices {
        &self.slots
    }

    pub fn device(&self) -> Device {
        self.positions.device()
    }
}

/// The cache shape `[n_blocks, block_size, n_kv_heads, head_dim]` of one layer's K (or V).
pub fn kv_cache_shape(n_blocks: usize, shape: PagedAttentionShape) -> [usize; 4] {
    [n_blocks, shape.block_size, shape.n_kv_heads, shape.head_dim]
}

/// Checks that `cache` is a 4-D cache of `shape`'s layout; returns its block count.
pub(super) fn cache_blocks(op: &'static str, cache: &Tensor, shape: PagedAttentionShape) -> Result<usize> {
    match cache.shape() {
        &[n_blocks, bs, kvh, hd] if bs == shape.block_size && kvh == shape.n_kv_heads && hd == shape.head_dim => {
            Ok(n_blocks)
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

/// Checks that `indices` are where the tensors of `op` are.
pub(super) fn indices_on(op: &'static str, indices: &Indices, device: Device) -> Result<()> {
    match indices.device() {
        d if d == device => Ok(()),
        other => Err(Error::DeviceMismatch { op, first: device, other }),
    }
}

/// Writes row `i` of `x[rows, n_kv_heads * head_dim]` (a step's keys or values) into slot
/// `slots[i]` of `cache` (of `shape`'s layout, in any dtype: the values are converted); other
/// slots are untouched.
///
/// Errors: [`Error::Shape`] for a layout mismatch, [`Error::Index`] for a slot outside the cache,
/// [`Error::DeviceMismatch`] when the slots are not on the tensors' device.
pub fn write_kv_slots(cache: &mut Tensor, x: &Tensor, slots: &Indices, shape: PagedAttentionShape) -> Result<()> {
    let n_slots = cache_blocks("write_kv_slots", cache, shape)? * shape.block_size;
    let width = shape.n_kv_heads * shape.head_dim;
    let (rows, x_width) = x.dims2("write_kv_slots")?;
    if x_width != width || rows != slots.len() {
        return Err(Error::Shape {
            op: "write_kv_slots",
            detail: format!("x is [{rows}, {x_width}] for {} slots of width {width}", slots.len()),
        });
    }
    if let Some(&bad) = slots.values().iter().find(|&&s| s as usize >= n_slots) {
        return Err(Error::Index { op: "write_kv_slots", index: bad as usize, len: n_slots });
    }
    indices_on("write_kv_slots", slots, super::common_device("write_kv_slots", &[cache, x])?)?;
    #[cfg(feature = "cuda")]
    if let (Some(sc), Some(sx)) = (cache.cuda_storage_mut(), x.cuda_storage()) {
        return cuda::write_kv_slots(sc, sx, slots, rows, width);
    }
    let dtype = cache.dtype();
    let cache_shape = cache.shape().to_vec();
    let xv = x.f32_values()?;
    let mut data = cache.to_f32_vec()?;
    for (row, &slot) in xv.chunks_exact(width.max(1)).zip(slots.values()) {
        let slot = slot as usize;
        data[slot * width..(slot + 1) * width].copy_from_slice(row);
    }
    // An f32 cache (the CPU runner's) is written in place; another dtype is converted back.
    match cache.f32_values_mut() {
        Some(values) => values.copy_from_slice(&data),
        None => *cache = Tensor::from_f32_as(&cache_shape, data, dtype)?,
    }
    Ok(())
}

/// Attention of every row of `q[rows, n_heads * head_dim]` (rotary applied) over its sequence's
/// cached keys and values (see the module docs): `batch` names each row's position and block
/// table. Output `[rows, n_heads * head_dim]` in `q`'s dtype.
///
/// Errors: [`Error::Shape`] when the shapes disagree or the batch was made for another cache,
/// [`Error::DeviceMismatch`] when the batch is not on the tensors' device; on CUDA,
/// [`Error::Shape`] for a head size other than 64, 128, 256 or more than 8 query heads per KV
/// head, [`Error::DType`] when the cache's dtype is not the queries'.
pub fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    batch: &PagedBatch,
    shape: PagedAttentionShape,
    scale: f32,
) -> Result<Tensor> {
    let PagedAttentionShape { n_heads, n_kv_heads, head_dim, block_size, .. } = shape;
    let (rows, q_width) = q.dims2("paged_attention")?;
    let n_blocks = cache_blocks("paged_attention", k_cache, shape)?;
    if cache_blocks("paged_attention", v_cache, shape)? != n_blocks
        || batch.n_cache_blocks != n_blocks
        || batch.block_size != block_size
    {
        return Err(Error::Shape {
            op: "paged_attention",
            detail: format!(
                "caches {:?} and {:?}, a batch for {} blocks of {}",
                k_cache.shape(),
                v_cache.shape(),
                batch.n_cache_blocks,
                batch.block_size
            ),
        });
    }
    if n_kv_heads == 0 || n_heads % n_kv_heads != 0 || q_width != n_heads * head_dim || batch.rows() != rows {
        return Err(Error::Shape {
            op: "paged_attention",
            detail: format!(
                "q {:?} with {n_heads} heads, {n_kv_heads} kv heads of {head_dim}; the batch has {} query rows",
                q.shape(),
                batch.rows()
            ),
        });
    }
    match operands("paged_attention", [q, k_cache, v_cache])? {
        Operands::Cpu => {
            indices_on("paged_attention", &batch.positions, Device::Cpu)?;
            paged_attention_cpu(q, k_cache, v_cache, batch, shape, scale, rows)
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda([sq, sk, sv], _) => {
            indices_on("paged_attention", &batch.positions, q.device())?;
            if batch.whole_prompts.is_empty() {
                return cuda::paged_attention(sq, sk, sv, batch, shape, scale, 0..rows);
            }
            paged_attention_with_whole_prompts(q, (k_cache, v_cache), (sq, sk, sv), batch, shape, scale)
        }
    }
}

/// [`paged_attention`] on a CUDA device for a batch with [`WholePrompt`]s: each of them through
/// [`super::causal_attention`] over its keys and values gathered from the cache, the rows between
/// them through the paged kernel, every part written into its rows of one output.
#[cfg(feature = "cuda")]
fn paged_attention_with_whole_prompts(
    q: &Tensor,
    (k_cache, v_cache): (&Tensor, &Tensor),
    (sq, sk, sv): (&crate::cuda::CudaStorage, &crate::cuda::CudaStorage, &crate::cuda::CudaStorage),
    batch: &PagedBatch,
    shape: PagedAttentionShape,
    scale: f32,
) -> Result<Tensor> {
    let (rows, width) = q.dims2("paged_attention")?;
    let kv_width = shape.n_kv_heads * shape.head_dim;
    let n_slots = cache_blocks("paged_attention", k_cache, shape)? * shape.block_size;
    // The caches seen as tables of slot rows (clones share the device buffers).
    let k_rows = k_cache.clone().reshape(&[n_slots, kv_width])?;
    let v_rows = v_cache.clone().reshape(&[n_slots, kv_width])?;
    let mut out = Tensor::zeros_on(&[rows, width], q.dtype(), q.device())?;
    let mut next = 0;
    for whole in &batch.whole_prompts {
        if whole.rows.start > next {
            out.write_rows(next, &cuda::paged_attention(sq, sk, sv, batch, shape, scale, next..whole.rows.start)?)?;
        }
        let n = whole.rows.len();
        let k = super::embedding_at(&k_rows, &whole.slots, q.dtype())?;
        let v = super::embedding_at(&v_rows, &whole.slots, q.dtype())?;
        let attention = super::AttentionShape {
            n_heads: shape.n_heads,
            n_kv_heads: shape.n_kv_heads,
            head_dim: shape.head_dim,
            seq_len: n,
            sliding_window: shape.sliding_window,
        };
        let q_rows = q.rows(whole.rows.start, whole.rows.end)?;
        out.write_rows(whole.rows.start, &super::causal_attention(&q_rows, &k, &v, attention, scale)?)?;
        next = whole.rows.end;
    }
    if next < rows {
        out.write_rows(next, &cuda::paged_attention(sq, sk, sv, batch, shape, scale, next..rows)?)?;
    }
    Ok(out)
}

/// The reference, on shapes `paged_attention` checked.
fn paged_attention_cpu(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    batch: &PagedBatch,
    shape: PagedAttentionShape,
    scale: f32,
    rows: usize,
) -> Result<Tensor> {
    let PagedAttentionShape { n_heads, n_kv_heads, head_dim, block_size, sliding_window } = shape;
    let (qv, kv, vv) = (q.f32_values()?, k_cache.f32_values()?, v_cache.f32_values()?);
    let q_width = n_heads * head_dim;
    let group = n_heads / n_kv_heads;
    let (positions, row_tables, tables) = (batch.positions.values(), batch.row_tables.values(), batch.tables.values());
    let mut out = vec![0.0f32; rows * q_width];
    out.par_chunks_mut(head_dim.max(1)).enumerate().for_each(|(task, o)| {
        let (r, h) = (task / n_heads, task % n_heads);
        let kvh = h / group;
        let (table, pos) = (&tables[row_tables[r] as usize..], positions[r] as usize);
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

/// An empty cache of `n_blocks` blocks for one layer's K or V (zeros), in `dtype`, on `device`.
pub fn zeros_kv_cache(n_blocks: usize, shape: PagedAttentionShape, dtype: DType, device: Device) -> Result<Tensor> {
    Tensor::zeros_on(&kv_cache_shape(n_blocks, shape), dtype, device)
}

/// Blocks of the CUDA kernel a step should give each multiprocessor: a block's warps walk their
/// positions one chain of loads after another, so a step with few rows (a decode step) splits each
/// row's positions into partitions, merged afterwards, until the GPU holds this many per SM: as
/// many 128-thread blocks as an SM runs at once. (H100, Llama-3-8B shapes: one row at ~1100
/// positions in 40 blocks of 256 positions took 68 us a layer; with 4 blocks per SM 32 rows got
/// fewer partitions than before and lost 9%: BENCHMARKS.md.)
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const BLOCKS_PER_SM: usize = 16;

/// The fewest positions a partition holds: below that, merging costs more than the walk saves.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const MIN_PARTITION_LEN: usize = 32;

/// How many partitions each row's `longest` positions are cut into when `groups` (rows x KV heads)
/// blocks would run without: enough for [`BLOCKS_PER_SM`] blocks per multiprocessor, none shorter
/// than [`MIN_PARTITION_LEN`] positions.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn partitions(groups: usize, longest: usize, multiprocessors: usize) -> usize {
    let target = BLOCKS_PER_SM * multiprocessors;
    match groups >= target {
        true => 1,
        false => target.div_ceil(groups.max(1)).min(longest.div_ceil(MIN_PARTITION_LEN)).max(1),
    }
}

#[cfg(feature = "cuda")]
pub(crate) const CUDA_SOURCE: crate::cuda::CudaSource = crate::cuda::CudaSource {
    file: "ops/paged_attention.cu",
    code: include_str!("paged_attention.cu"),
    headers: &[],
    kernels: &[
        "write_kv_slots_f32_f32", "write_kv_slots_f32_f16", "write_kv_slots_f32_bf16",
        "write_kv_slots_f16_f32", "write_kv_slots_f16_f16", "write_kv_slots_f16_bf16",
        "write_kv_slots_bf16_f32", "write_kv_slots_bf16_f16", "write_kv_slots_bf16_bf16",
        "rope_at_f32", "rope_at_f16", "rope_at_bf16",
        "rope_qkv_f32_f32", "rope_qkv_f32_f16", "rope_qkv_f32_bf16",
        "rope_qkv_f16_f32", "rope_qkv_f16_f16", "rope_qkv_f16_bf16",
        "rope_qkv_bf16_f32", "rope_qkv_bf16_f16", "rope_qkv_bf16_bf16",
        "paged_attention_f32_f32_64", "paged_attention_f32_f32_128", "paged_attention_f32_f32_256",
        "paged_attention_f16_f16_64", "paged_attention_f16_f16_128", "paged_attention_f16_f16_256",
        "paged_attention_bf16_bf16_64", "paged_attention_bf16_bf16_128", "paged_attention_bf16_bf16_256",
        "paged_attention_merge_f32", "paged_attention_merge_f16", "paged_attention_merge_bf16",
    ],
};

#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::{LaunchConfig, PushKernelArg};

    use super::{partitions, PagedAttentionShape, PagedBatch, CUDA_SOURCE};
    use crate::cuda::{grid_for, kernel_dim, CudaStorage};
    use crate::{Error, Indices, Result, Tensor};

    /// The device copy of indices the op checked to be on this device.
    fn on_device(indices: &Indices) -> Result<&cudarc::driver::CudaSlice<u32>> {
        indices.cuda().ok_or(Error::DeviceMismatch { op: "paged_attention", first: indices.device(), other: indices.device() })
    }

    /// One thread per value written.
    pub(super) fn write_kv_slots(
        sc: &mut CudaStorage,
        sx: &CudaStorage,
        slots: &Indices,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        let n = rows * width;
        if n == 0 {
            return Ok(());
        }
        let dev = sc.dev().clone();
        let name = format!("write_kv_slots_{}_{}", sx.dtype(), sc.dtype());
        let kernel = dev.kernel(&CUDA_SOURCE, &name)?;
        let (n64, width32) = (n as u64, kernel_dim("write_kv_slots", width)?);
        let slots = on_device(slots)?;
        let mut args = kernel.args();
        sx.buf().arg(&mut args);
        args.arg(slots);
        sc.buf_mut()?.arg_mut(&mut args);
        args.arg(&n64);
        args.arg(&width32);
        // SAFETY: write_kv_slots_<x>_<c>(const X* x, const u32* slots, C* cache, u64 n, u32 width),
        // the dtypes those of x and the cache: x holds n = rows * width values, slots one entry per
        // row, each below the cache's slot count (checked by `write_kv_slots`), whose rows are
        // `width` wide; the grid-stride loop stops at n.
        unsafe { kernel.launch(args, grid_for(n, 256)) }
    }

    /// The paged kernel on rows `range` of the batch (all of them, or those between whole prompts):
    /// `[range.len(), n_heads * head_dim]`.
    pub(super) fn paged_attention(
        sq: &CudaStorage,
        sk: &CudaStorage,
        sv: &CudaStorage,
        batch: &PagedBatch,
        shape: PagedAttentionShape,
        scale: f32,
        range: std::ops::Range<usize>,
    ) -> Result<Tensor> {
        let PagedAttentionShape { n_heads, n_kv_heads, head_dim, block_size, sliding_window } = shape;
        let dev = sq.dev().clone();
        let width = n_heads * head_dim;
        let rows = range.len();
        let mut out = dev.alloc_buf(sq.dtype(), rows * width)?;
        if rows == 0 {
            return Ok(Tensor::from_cuda(&[rows, width], CudaStorage::new(dev, out)));
        }
        if !matches!(head_dim, 64 | 128 | 256) || n_heads / n_kv_heads > 8 {
            return Err(Error::Shape {
                op: "paged_attention",
                detail: format!(
                    "the CUDA kernel takes head sizes 64, 128, 256 and up to 8 query heads per KV head; got \
                     {head_dim} and {n_heads}/{n_kv_heads}"
                ),
            });
        }
        if sk.dtype() != sq.dtype() || sv.dtype() != sq.dtype() {
            return Err(Error::DType { op: "paged_attention", dtype: sk.dtype() });
        }
        // Partitions when the rows alone leave the GPU short of blocks (a decode step).
        let window = sliding_window.unwrap_or(0);
        let longest = if window > 0 { batch.max_context.min(window) } else { batch.max_context };
        let n_parts = partitions(rows * n_kv_heads, longest, dev.multiprocessors());
        let part_len = longest.div_ceil(n_parts).max(1);
        let scratch_len = if n_parts == 1 { 0 } else { rows * n_heads * n_parts };
        // At least one value each: an empty allocation cannot be recorded into a graph.
        let mut part_out = dev.alloc::<f32>((scratch_len * head_dim).max(1))?;
        let mut part_ml = dev.alloc::<f32>((scratch_len * 2).max(1))?;

        let name = format!("paged_attention_{}_{}_{}", sq.dtype(), sk.dtype(), head_dim);
        let kernel = dev.kernel(&CUDA_SOURCE, &name)?;
        let (positions, row_tables, tables) =
            (on_device(&batch.positions)?, on_device(&batch.row_tables)?, on_device(&batch.tables)?);
        let (n_heads32, n_kv_heads32) = (kernel_dim("paged_attention", n_heads)?, kernel_dim("paged_attention", n_kv_heads)?);
        let (block_size32, window32) = (kernel_dim("paged_attention", block_size)?, kernel_dim("paged_attention", window)?);
        let part_len32 = kernel_dim("paged_attention", part_len)?;
        // The range's first row: q, positions and table offsets from there.
        let (q_base, _q_guard) = sq.buf().device_ptr(sq.dev().stream());
        let q_first = q_base + (range.start * width * sq.dtype().size_bytes()) as u64;
        let (positions, row_tables) = (positions.slice(range.clone()), row_tables.slice(range.clone()));
        let mut args = kernel.args();
        args.arg(&q_first);
        sk.buf().arg(&mut args);
        sv.buf().arg(&mut args);
        args.arg(&positions);
        args.arg(&row_tables);
        args.arg(tables);
        out.arg_mut(&mut args);
        args.arg(&mut part_out);
        args.arg(&mut part_ml);
        args.arg(&n_heads32);
        args.arg(&n_kv_heads32);
        args.arg(&block_size32);
        args.arg(&window32);
        args.arg(&scale);
        args.arg(&part_len32);
        let cfg = LaunchConfig {
            grid_dim: (kernel_dim("paged_attention", rows)?, n_kv_heads32, n_parts as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: paged_attention_<t>_<t>_<hd>(const T* q, const T* k_cache, const T* v_cache, const
        // u32* positions, const u32* row_tables, const u32* tables, T* out, f32* part_out, f32*
        // part_ml, u32 n_heads, u32 n_kv_heads, u32 block_size, u32 window, f32 scale, u32
        // part_len), with 128 threads (PA_WARPS warps) and a grid of (rows, n_kv_heads, n_parts),
        // rows those of `range`, which the caller keeps within the batch's: q (from the range's
        // first row; the batch's rows of n_heads * hd values checked by `paged_attention`, the
        // buffer alive while `_q_guard` is) and out hold rows * n_heads * hd values, positions and
        // row_tables are the range's entries, the caches the
        // batch's n_cache_blocks blocks of [block_size, n_kv_heads, hd]; the batch holds one
        // position and table offset per row, and its tables cover every position up to each row's
        // and name blocks of the cache (`PagedBatch::new`); n_heads / n_kv_heads <= 8 (checked
        // above). With n_parts > 1 the scratch holds rows * n_heads * n_parts * (hd + 2) floats
        // and part_len * n_parts covers the longest row's visible positions; with one partition
        // part_len is that length itself and the scratch is not touched.
        unsafe { kernel.launch(args, cfg) }?;
        if n_parts > 1 {
            let merge = dev.kernel(&CUDA_SOURCE, &format!("paged_attention_merge_{}", sq.dtype()))?;
            let (n_parts32, head_dim32) = (n_parts as u32, head_dim as u32);
            let mut args = merge.args();
            args.arg(&part_out);
            args.arg(&part_ml);
            out.arg_mut(&mut args);
            args.arg(&n_parts32);
            args.arg(&head_dim32);
            let cfg = LaunchConfig {
                grid_dim: (kernel_dim("paged_attention", rows * n_heads)?, 1, 1),
                block_dim: (head_dim32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: paged_attention_merge_<t>(const f32* part_out, const f32* part_ml, T* out, u32
            // n_parts, u32 head_dim), one block per (row, head) of head_dim threads: the scratch
            // buffers hold rows * n_heads * n_parts entries of head_dim values and of (m, l), all
            // written by the kernel above (every partition of every head, empty ones with l = 0
            // and m = -inf), out rows * n_heads * head_dim values.
            unsafe { merge.launch(args, cfg) }?;
        }
        Ok(Tensor::from_cuda(&[rows, width], CudaStorage::new(dev, out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::rel;
    use crate::rng::SplitMix64;

    const GUARD: f32 = -7.25;

    #[test]
    fn a_decode_step_is_cut_into_partitions_until_the_gpu_has_blocks_enough() {
        // One row, 8 KV heads, 132 SMs: 2112 blocks wanted, 2048 positions allow 64 partitions of 32.
        assert_eq!(partitions(8, 2048, 132), 64);
        assert_eq!(partitions(8, 100_000, 132), 264);
        // 32 rows: 9 partitions (of 228 positions at 2048); a short context is never cut below
        // MIN_PARTITION_LEN.
        assert_eq!(partitions(256, 2048, 132), 9);
        assert_eq!(partitions(8, 40, 132), 2);
        assert_eq!(partitions(8, 1, 132), 1);
        // 128 rows: 3; rows enough to fill the GPU: one partition.
        assert_eq!(partitions(1024, 2048, 132), 3);
        assert_eq!(partitions(2112, 2048, 132), 1);
        for (groups, longest) in [(1, 1), (3, 77), (100, 5000), (7, 33)] {
            let n = partitions(groups, longest, 132);
            assert!(n >= 1 && longest.div_ceil(n) * n >= longest, "{groups} {longest}: {n}");
        }
    }

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
        write_kv_slots(&mut cache, &x, &Indices::host(slots.to_vec()), shape).unwrap();
        let (c, xv) = (cache.f32_values().unwrap(), x.f32_values().unwrap());
        for slot in 0..n_blocks * 4 {
            let got = &c[slot * width..(slot + 1) * width];
            match slots.iter().position(|&s| s as usize == slot) {
                Some(i) => assert_eq!(got, &xv[i * width..(i + 1) * width], "slot {slot}"),
                None => assert!(got.iter().all(|&v| v == GUARD), "slot {slot} was touched"),
            }
        }
        let err = write_kv_slots(&mut cache, &x, &Indices::host(vec![0, 1, 2, 3, 20]), shape).unwrap_err();
        assert!(matches!(err, Error::Index { index: 20, len: 20, .. }), "{err}");
        let err = write_kv_slots(&mut cache, &x, &Indices::host(vec![0, 1]), shape).unwrap_err();
        assert!(matches!(err, Error::Shape { .. }), "{err}");
    }

    fn check(shape: PagedAttentionShape, seqs: &[(usize, usize)], seed: u64) {
        let mut rng = SplitMix64::new(seed);
        let PagedAttentionShape { n_heads, n_kv_heads, head_dim: hd, block_size: bs, .. } = shape;
        let kvw = n_kv_heads * hd;
        let lens: Vec<usize> = seqs.iter().map(|&(f, n)| f + n).collect();
        let n_blocks = lens.iter().map(|l| l.div_ceil(bs)).sum::<usize>() + 3;
        let mut k_cache = zeros_kv_cache(n_blocks, shape, DType::F32, Device::Cpu).unwrap();
        let mut v_cache = zeros_kv_cache(n_blocks, shape, DType::F32, Device::Cpu).unwrap();
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
            let slots = Indices::host((0..l).map(|p| tables[s][p / bs] * bs as u32 + (p % bs) as u32).collect());
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
        let batch = PagedBatch::new(&paged, bs, n_blocks, Device::Cpu).unwrap();
        let got = paged_attention(&q, &k_cache, &v_cache, &batch, shape, scale).unwrap();
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
    fn a_fixed_batch_attends_as_a_new_one_and_refills_in_place() {
        let shape = PagedAttentionShape { n_heads: 4, n_kv_heads: 2, head_dim: 8, block_size: 4, sliding_window: None };
        let mut rng = SplitMix64::new(5);
        let n_blocks = 9;
        let k = Tensor::from_f32(&kv_cache_shape(n_blocks, shape), rng.normal_vec(n_blocks * 4 * 16, 1.0)).unwrap();
        let v = Tensor::from_f32(&kv_cache_shape(n_blocks, shape), rng.normal_vec(n_blocks * 4 * 16, 1.0)).unwrap();
        let q = Tensor::from_f32(&[3, 32], rng.normal_vec(3 * 32, 1.0)).unwrap();
        let layout = FixedLayout { rows: 3, table_len: 4, max_context: 15 };
        let (t0, t1, t2) = ([3u32, 1], [0u32, 2, 4, 5], [8u32]);
        let step = |p: usize| {
            [
                PagedSeq { block_table: &t0, first_position: p, n_queries: 1 },
                PagedSeq { block_table: &t1, first_position: 2 * p, n_queries: 1 },
                PagedSeq { block_table: &t2, first_position: 0, n_queries: 1 },
            ]
        };
        let mut fixed = PagedBatch::fixed(&step(2), 4, n_blocks, layout, Device::Cpu).unwrap();
        for p in [2, 5, 7] {
            fixed.refill(&step(p)).unwrap();
            let new = PagedBatch::new(&step(p), 4, n_blocks, Device::Cpu).unwrap();
            assert_eq!(fixed.positions().values(), new.positions().values());
            assert_eq!(fixed.slots().values(), new.slots().values());
            let got = paged_attention(&q, &k, &v, &fixed, shape, 0.5).unwrap();
            assert_eq!(got, paged_attention(&q, &k, &v, &new, shape, 0.5).unwrap(), "position {p}");
        }
        // Another row count, a table longer than the layout's, a context past it: refused.
        assert!(matches!(fixed.refill(&step(2)[..2]), Err(Error::Shape { .. })));
        let long = [0u32, 1, 2, 3, 4];
        let seqs = [step(1)[0], step(1)[1], PagedSeq { block_table: &long, first_position: 0, n_queries: 1 }];
        assert!(matches!(fixed.refill(&seqs), Err(Error::Index { index: 5, len: 4, .. })));
        let seqs = [step(1)[0], step(1)[1], PagedSeq { block_table: &t1, first_position: 15, n_queries: 1 }];
        assert!(matches!(fixed.refill(&seqs), Err(Error::Shape { .. })));
        let err = PagedBatch::new(&step(1), 4, n_blocks, Device::Cpu).unwrap().refill(&step(1)).unwrap_err();
        assert!(matches!(err, Error::Shape { .. }), "{err}");
    }

    #[test]
    fn a_table_too_short_for_its_positions_is_refused() {
        let shape = PagedAttentionShape { n_heads: 2, n_kv_heads: 1, head_dim: 4, block_size: 4, sliding_window: None };
        let seqs = [PagedSeq { block_table: &[0, 1], first_position: 7, n_queries: 2 }];
        let err = PagedBatch::new(&seqs, 4, 3, Device::Cpu).unwrap_err();
        assert!(matches!(err, Error::Index { index: 8, len: 8, .. }), "{err}");
        let seqs = [PagedSeq { block_table: &[0, 3], first_position: 0, n_queries: 2 }];
        let err = PagedBatch::new(&seqs, 4, 3, Device::Cpu).unwrap_err();
        assert!(matches!(err, Error::Index { index: 3, len: 3, .. }), "{err}");
        // A batch made for another cache is refused.
        let k = zeros_kv_cache(3, shape, DType::F32, Device::Cpu).unwrap();
        let q = Tensor::zeros(&[2, 8], DType::F32);
        let seqs = [PagedSeq { block_table: &[0, 1], first_position: 0, n_queries: 2 }];
        let batch = PagedBatch::new(&seqs, 4, 5, Device::Cpu).unwrap();
        let err = paged_attention(&q, &k, &k, &batch, shape, 1.0).unwrap_err();
        assert!(matches!(err, Error::Shape { .. }), "{err}");
    }
}
