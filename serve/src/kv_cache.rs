//! Bookkeeping of the paged KV cache: which fixed-size block holds which tokens of which sequence.
//!
//! The cache is `n_blocks` blocks of `block_size` token slots each; the tensors live with the model
//! runner, which finds token `pos` of a sequence at slot [`slot_of`]`(block_table, block_size,
//! pos)` (`block_table[pos / block_size] * block_size + pos % block_size`). This module owns the
//! free list, the per-sequence block tables, reference counts (a block shared by several sequences
//! through a common prefix) and the prefix cache: a FULL block whose KV is computed is indexed by
//! [`BlockHash`] = hash(parent block's hash, the block's token ids), so equal prefixes give equal
//! hash chains and a new sequence starts from the longest chain already cached. Freed indexed
//! blocks stay findable until their slots are needed: blocks never indexed are handed out first,
//! then indexed ones least recently used first.
//!
//! Follows vLLM v1's `block_pool.py` / `kv_cache_manager.py` (hash chains over full blocks, an
//! evictable free queue, the last token of a prompt never served from the cache so it yields
//! logits) and TGI's `block_allocator.rs` (the allocator as its own small module). Own choices: a
//! hit is verified against the cached block's parent hash and token ids, so a 64-bit hash collision
//! costs a miss, never wrong KV; blocks are indexed only once the caller reports them computed
//! ([`KvCache::cache_computed`]), so no sequence can hit a block whose KV is still being written.
//! Not here: tensors, attention, scheduling policy (the scheduler decides who gets blocks and whom
//! to preempt).

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

use crate::{Error, RequestId, Result};

/// A physical block of the cache, `0..n_blocks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

/// The identity of a full block's content in context: hash(parent's hash, token ids). In-process
/// only (the hasher is not stable across Rust releases): never persist or send it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockHash(u64);

/// The cache slot of token `pos` of a sequence with `block_table`: what the model runner writes the
/// token's K and V to. Panics if the table does not cover `pos` (the scheduler's plans always do).
pub fn slot_of(block_table: &[BlockId], block_size: usize, pos: usize) -> usize {
    block_table[pos / block_size].0 as usize * block_size + pos % block_size
}

impl BlockHash {
    /// The hash of a full block holding `tokens` after the block hashed `parent` (None: the first block).
    pub fn of(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
        let mut h = DefaultHasher::new();
        parent.map(|p| p.0).hash(&mut h);
        tokens.hash(&mut h);
        BlockHash(h.finish())
    }
}

/// The cache's shape and policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCacheConfig {
    pub n_blocks: usize,
    /// Token slots per block (vLLM's default is 16).
    pub block_size: usize,
    /// Index full computed blocks and reuse them for new sequences with the same prefix.
    pub prefix_caching: bool,
}

impl KvCacheConfig {
    /// How many tokens the whole cache holds.
    pub fn capacity_tokens(&self) -> usize {
        self.n_blocks * self.block_size
    }
}

/// Whether [`KvCache::allocate`] may start a sequence from cached blocks. A request that wants the
/// logprobs of its prompt must compute every prompt position, so it skips the lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefixLookup {
    Use,
    Skip,
}

/// What [`KvCache::allocate`] gave a new sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allocation {
    /// Leading tokens whose KV is already in the cache (a multiple of the block size).
    pub n_cached_tokens: usize,
    /// Tokens after those that have slots now, to be computed this step.
    pub n_new_tokens: usize,
}

/// Counters for metrics (vLLM's `kv_cache_usage_perc`, `prefix_cache_queries`, `prefix_cache_hits`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KvCacheStats {
    pub n_blocks: usize,
    /// Blocks referenced by at least one sequence.
    pub n_blocks_in_use: usize,
    /// Free blocks that still hold indexed prefix KV (reusable until evicted).
    pub n_blocks_cached_free: usize,
    /// `n_blocks_in_use / n_blocks`.
    pub usage: f64,
    /// Tokens looked up in the prefix cache (prompt tokens of allocated sequences that used it).
    pub prefix_queries_tokens: u64,
    /// Of those, tokens found cached.
    pub prefix_hits_tokens: u64,
}

/// The content an indexed block was registered with; a lookup must match it exactly.
#[derive(Debug)]
struct CachedContent {
    hash: BlockHash,
    parent: Option<BlockHash>,
    tokens: Box<[u32]>,
}

#[derive(Debug, Default)]
struct BlockMeta {
    ref_count: u32,
    /// Set while the prefix index names this block.
    cached: Option<CachedContent>,
    /// Its key in `evictable` while it sits there.
    evict_tick: u64,
}

#[derive(Debug, Default)]
struct SeqBlocks {
    blocks: Vec<BlockId>,
    /// Token slots reserved (the table covers `ceil(n_slots / block_size)` blocks).
    n_slots: usize,
    /// Hash chain of the leading full blocks known computed (hit or reported).
    hashes: Vec<BlockHash>,
}

/// The paged KV cache's bookkeeping. Every block is in exactly one of three places: referenced by
/// sequences (`ref_count > 0`), on the fresh free list (not indexed), or evictable (free but still
/// indexed); `check_invariants` (tests) proves it after every operation.
#[derive(Debug)]
pub struct KvCache {
    config: KvCacheConfig,
    blocks: Vec<BlockMeta>,
    /// Free, not indexed: handed out first (a stack: any order is as good).
    fresh: Vec<BlockId>,
    /// Free but indexed, oldest release first: evicted when `fresh` is empty.
    evictable: BTreeMap<u64, BlockId>,
    index: HashMap<BlockHash, BlockId>,
    seqs: HashMap<RequestId, SeqBlocks>,
    next_tick: u64,
    prefix_queries_tokens: u64,
    prefix_hits_tokens: u64,
}

impl KvCache {
    pub fn new(config: KvCacheConfig) -> Result<KvCache> {
        if config.block_size == 0 {
            return Err(Error::InvalidConfig { field: "block_size", expected: "at least 1".into(), got: "0".into() });
        }
        if config.n_blocks == 0 || config.n_blocks > u32::MAX as usize {
            let got = config.n_blocks.to_string();
            return Err(Error::InvalidConfig { field: "n_blocks", expected: format!("in [1, {}]", u32::MAX), got });
        }
        // Reversed so that `pop` hands out block 0 first: plans read naturally in tests and logs.
        let fresh = (0..config.n_blocks as u32).rev().map(BlockId).collect();
        Ok(KvCache {
            config,
            blocks: (0..config.n_blocks).map(|_| BlockMeta::default()).collect(),
            fresh,
            evictable: BTreeMap::new(),
            index: HashMap::new(),
            seqs: HashMap::new(),
            next_tick: 0,
            prefix_queries_tokens: 0,
            prefix_hits_tokens: 0,
        })
    }

    pub fn config(&self) -> KvCacheConfig {
        self.config
    }

    pub fn block_size(&self) -> usize {
        self.config.block_size
    }

    /// Blocks that can be handed out now, evicting cached ones if need be.
    pub fn n_free_blocks(&self) -> usize {
        self.fresh.len() + self.evictable.len()
    }

    fn blocks_for(&self, n_tokens: usize) -> usize {
        n_tokens.div_ceil(self.config.block_size)
    }

    /// Whether a sequence of `n_tokens` could get all its slots from free blocks, ignoring hits.
    pub fn can_allocate(&self, n_tokens: usize) -> bool {
        self.blocks_for(n_tokens) <= self.n_free_blocks()
    }

    /// Starts sequence `seq` holding `tokens` (a prompt, or prompt + generated when recomputing after
    /// preemption): takes the longest run of cached full blocks (never the block of the last token,
    /// whose logits the model must produce), then slots for up to `max_new_tokens` more tokens. All
    /// or nothing: on `OutOfBlocks` nothing changed.
    pub fn allocate(
        &mut self,
        seq: RequestId,
        tokens: &[u32],
        lookup: PrefixLookup,
        max_new_tokens: usize,
    ) -> Result<Allocation> {
        if self.seqs.contains_key(&seq) {
            return Err(Error::DuplicateRequest(seq));
        }
        let bs = self.config.block_size;
        let use_cache = self.config.prefix_caching && lookup == PrefixLookup::Use;
        let mut hits = Vec::new();
        let mut hashes = Vec::new();
        if use_cache {
            let max_cached_blocks = tokens.len().saturating_sub(1) / bs;
            for chunk in tokens.chunks_exact(bs).take(max_cached_blocks) {
                let parent = hashes.last().copied();
                let hash = BlockHash::of(parent, chunk);
                match self.lookup(hash, parent, chunk) {
                    Some(b) => {
                        hits.push(b);
                        hashes.push(hash);
                    }
                    None => break,
                }
            }
        }
        let n_cached_tokens = hits.len() * bs;
        let n_new_tokens = (tokens.len() - n_cached_tokens).min(max_new_tokens);
        let n_fresh = self.blocks_for(n_cached_tokens + n_new_tokens) - hits.len();
        // Hit blocks that sit on the evictable list are no longer free once taken.
        let hits_free = hits.iter().filter(|b| self.meta(**b).ref_count == 0).count();
        let free = self.n_free_blocks() - hits_free;
        if n_fresh > free {
            return Err(Error::OutOfBlocks { needed: n_fresh, free });
        }
        for &b in &hits {
            self.take_ref(b);
        }
        let mut blocks = hits;
        for _ in 0..n_fresh {
            blocks.push(self.take_free_block());
        }
        if use_cache {
            self.prefix_queries_tokens += tokens.len() as u64;
            self.prefix_hits_tokens += n_cached_tokens as u64;
        }
        self.seqs.insert(seq, SeqBlocks { blocks, n_slots: n_cached_tokens + n_new_tokens, hashes });
        Ok(Allocation { n_cached_tokens, n_new_tokens })
    }

    /// Grows `seq` to hold `n_tokens` tokens in all (a no-op if it already does). All or nothing.
    pub fn ensure_slots(&mut self, seq: RequestId, n_tokens: usize) -> Result<()> {
        let have = self.seqs.get(&seq).ok_or(Error::UnknownSequence(seq))?.blocks.len();
        let needed = self.blocks_for(n_tokens).saturating_sub(have);
        if needed > self.n_free_blocks() {
            return Err(Error::OutOfBlocks { needed, free: self.n_free_blocks() });
        }
        let new_blocks: Vec<BlockId> = (0..needed).map(|_| self.take_free_block()).collect();
        let s = self.seqs.get_mut(&seq).expect("checked above");
        s.blocks.extend(new_blocks);
        s.n_slots = s.n_slots.max(n_tokens);
        Ok(())
    }

    /// Records that the first `n_computed` of `tokens` (the sequence's tokens) have their KV written:
    /// every full block among them joins the prefix index, unless an equal block is indexed already.
    pub fn cache_computed(&mut self, seq: RequestId, tokens: &[u32], n_computed: usize) -> Result<()> {
        let bs = self.config.block_size;
        let s = self.seqs.get_mut(&seq).ok_or(Error::UnknownSequence(seq))?;
        let n_full = n_computed.min(tokens.len()).min(s.n_slots) / bs;
        let mut newly_full = Vec::new();
        while s.hashes.len() < n_full {
            let i = s.hashes.len();
            let parent = s.hashes.last().copied();
            let hash = BlockHash::of(parent, &tokens[i * bs..(i + 1) * bs]);
            s.hashes.push(hash);
            newly_full.push((s.blocks[i], hash, parent, i));
        }
        if !self.config.prefix_caching {
            return Ok(());
        }
        for (b, hash, parent, i) in newly_full {
            if self.index.contains_key(&hash) || self.meta(b).cached.is_some() {
                continue;
            }
            let tokens = tokens[i * bs..(i + 1) * bs].into();
            self.blocks[b.0 as usize].cached = Some(CachedContent { hash, parent, tokens });
            self.index.insert(hash, b);
        }
        Ok(())
    }

    /// Releases every block of `seq` at once; indexed ones stay findable until evicted. The blocks
    /// are released last to first, so a chain's tail is evicted before its head (a head alone still
    /// serves shorter prefixes; a tail alone serves nothing). Returns false for an unknown sequence.
    pub fn free(&mut self, seq: RequestId) -> bool {
        let Some(s) = self.seqs.remove(&seq) else { return false };
        for &b in s.blocks.iter().rev() {
            let tick = self.next_tick;
            let m = &mut self.blocks[b.0 as usize];
            m.ref_count -= 1;
            if m.ref_count > 0 {
                continue;
            }
            if m.cached.is_some() {
                m.evict_tick = tick;
                self.evictable.insert(tick, b);
                self.next_tick += 1;
            } else {
                self.fresh.push(b);
            }
        }
        true
    }

    /// The block table of `seq`: block `i` holds its tokens `i * block_size ..`.
    pub fn block_table(&self, seq: RequestId) -> Option<&[BlockId]> {
        self.seqs.get(&seq).map(|s| s.blocks.as_slice())
    }

    pub fn stats(&self) -> KvCacheStats {
        let n_blocks = self.config.n_blocks;
        let n_blocks_in_use = n_blocks - self.n_free_blocks();
        KvCacheStats {
            n_blocks,
            n_blocks_in_use,
            n_blocks_cached_free: self.evictable.len(),
            usage: n_blocks_in_use as f64 / n_blocks as f64,
            prefix_queries_tokens: self.prefix_queries_tokens,
            prefix_hits_tokens: self.prefix_hits_tokens,
        }
    }

    fn meta(&self, b: BlockId) -> &BlockMeta {
        &self.blocks[b.0 as usize]
    }

    /// The indexed block for `hash` if its registered content is exactly (parent, tokens).
    fn lookup(&self, hash: BlockHash, parent: Option<BlockHash>, tokens: &[u32]) -> Option<BlockId> {
        let b = *self.index.get(&hash)?;
        let c = self.meta(b).cached.as_ref().expect("indexed blocks keep their content");
        (c.parent == parent && *c.tokens == *tokens).then_some(b)
    }

    fn take_ref(&mut self, b: BlockId) {
        let m = &mut self.blocks[b.0 as usize];
        if m.ref_count == 0 {
            self.evictable.remove(&m.evict_tick);
        }
        m.ref_count += 1;
    }

    /// A free block for new tokens: a fresh one, else the least recently released indexed one,
    /// which leaves the index. Callers check `n_free_blocks` first.
    fn take_free_block(&mut self) -> BlockId {
        let b = match self.fresh.pop() {
            Some(b) => b,
            None => self.evictable.pop_first().expect("callers check n_free_blocks").1,
        };
        let m = &mut self.blocks[b.0 as usize];
        if let Some(c) = m.cached.take() {
            self.index.remove(&c.hash);
        }
        m.ref_count = 1;
        b
    }

    /// Every block in exactly one place, reference counts equal to table references, the index
    /// consistent with block contents. Panics with what is wrong (tests only).
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        let mut refs = vec![0u32; self.config.n_blocks];
        for (id, s) in &self.seqs {
            assert_eq!(s.blocks.len(), self.blocks_for(s.n_slots), "seq {id}: table size vs slots");
            assert!(s.hashes.len() <= s.blocks.len(), "seq {id}: more hashes than blocks");
            for b in &s.blocks {
                refs[b.0 as usize] += 1;
            }
        }
        let mut free_seen = vec![false; self.config.n_blocks];
        for b in self.fresh.iter().chain(self.evictable.values()) {
            assert!(!free_seen[b.0 as usize], "block {b:?} free twice");
            free_seen[b.0 as usize] = true;
        }
        for (i, m) in self.blocks.iter().enumerate() {
            assert_eq!(m.ref_count, refs[i], "block {i}: ref count");
            assert_eq!(m.ref_count == 0, free_seen[i], "block {i}: free iff unreferenced");
        }
        for b in &self.fresh {
            assert!(self.meta(*b).cached.is_none(), "fresh block {b:?} is indexed");
        }
        for (tick, b) in &self.evictable {
            assert_eq!(self.meta(*b).evict_tick, *tick, "evictable block {b:?}: tick");
            assert!(self.meta(*b).cached.is_some(), "evictable block {b:?} not indexed");
        }
        for (hash, b) in &self.index {
            assert_eq!(self.meta(*b).cached.as_ref().map(|c| c.hash), Some(*hash), "index entry {b:?}");
        }
        let n_indexed = self.blocks.iter().filter(|m| m.cached.is_some()).count();
        assert_eq!(n_indexed, self.index.len(), "indexed blocks vs index entries");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn cache(n_blocks: usize, block_size: usize) -> KvCache {
        KvCache::new(KvCacheConfig { n_blocks, block_size, prefix_caching: true }).unwrap()
    }

    fn id(n: u64) -> RequestId {
        RequestId(n)
    }

    /// Allocates a whole prompt and reports it computed, as a finished prefill would.
    fn prefill(kv: &mut KvCache, seq: u64, tokens: &[u32]) -> Allocation {
        let a = kv.allocate(id(seq), tokens, PrefixLookup::Use, usize::MAX).unwrap();
        kv.cache_computed(id(seq), tokens, tokens.len()).unwrap();
        kv.check_invariants();
        a
    }

    #[test]
    fn block_tables_grow_one_block_per_block_size_tokens() {
        let mut kv = cache(8, 4);
        let a = kv.allocate(id(1), &[1, 2, 3, 4, 5], PrefixLookup::Use, 3).unwrap();
        assert_eq!(a, Allocation { n_cached_tokens: 0, n_new_tokens: 3 });
        assert_eq!(kv.block_table(id(1)).unwrap(), [BlockId(0)]);
        kv.ensure_slots(id(1), 5).unwrap();
        kv.ensure_slots(id(1), 8).unwrap();
        assert_eq!(kv.block_table(id(1)).unwrap(), [BlockId(0), BlockId(1)]);
        kv.ensure_slots(id(1), 9).unwrap();
        assert_eq!(kv.stats().n_blocks_in_use, 3);
        assert!(kv.free(id(1)));
        assert!(!kv.free(id(1)), "second free of the same sequence");
        assert_eq!(kv.stats().n_blocks_in_use, 0);
        kv.check_invariants();
    }

    #[test]
    fn out_of_blocks_changes_nothing() {
        let mut kv = cache(3, 4);
        kv.allocate(id(1), &[1; 8], PrefixLookup::Use, usize::MAX).unwrap();
        assert!(kv.can_allocate(4) && !kv.can_allocate(5));
        let err = kv.allocate(id(2), &[2; 8], PrefixLookup::Use, usize::MAX).unwrap_err();
        assert!(matches!(err, Error::OutOfBlocks { needed: 2, free: 1 }), "{err}");
        assert!(kv.block_table(id(2)).is_none());
        let err = kv.ensure_slots(id(1), 13).unwrap_err();
        assert!(matches!(err, Error::OutOfBlocks { needed: 2, free: 1 }), "{err}");
        assert_eq!(kv.block_table(id(1)).unwrap().len(), 2);
        assert!(matches!(kv.ensure_slots(id(9), 1), Err(Error::UnknownSequence(RequestId(9)))));
        kv.check_invariants();
    }

    #[test]
    fn equal_prefixes_share_blocks_and_the_last_token_is_always_computed() {
        let mut kv = cache(16, 4);
        let prompt: Vec<u32> = (0..10).collect();
        assert_eq!(prefill(&mut kv, 1, &prompt).n_cached_tokens, 0);
        // Same first 8 tokens: two full blocks hit, shared with sequence 1.
        let mut other = prompt[..8].to_vec();
        other.extend([77, 78, 79]);
        let a = prefill(&mut kv, 2, &other);
        assert_eq!(a, Allocation { n_cached_tokens: 8, n_new_tokens: 3 });
        assert_eq!(kv.block_table(id(2)).unwrap()[..2], kv.block_table(id(1)).unwrap()[..2]);
        // Exactly two full blocks: the second must be computed again for the last token's logits.
        let a = prefill(&mut kv, 3, &prompt[..8]);
        assert_eq!(a, Allocation { n_cached_tokens: 4, n_new_tokens: 4 });
        // Same tokens in another position (different parent): no hit.
        let shifted: Vec<u32> = [99].into_iter().chain(prompt[..8].iter().copied()).collect();
        assert_eq!(prefill(&mut kv, 4, &shifted).n_cached_tokens, 0);
        let st = kv.stats();
        assert_eq!((st.prefix_queries_tokens, st.prefix_hits_tokens), (10 + 11 + 8 + 9, 8 + 4));
        // Skipping the lookup neither hits nor counts.
        let a = kv.allocate(id(5), &prompt, PrefixLookup::Skip, usize::MAX).unwrap();
        assert_eq!(a.n_cached_tokens, 0);
        assert_eq!(kv.stats().prefix_queries_tokens, st.prefix_queries_tokens);
        kv.check_invariants();
    }

    #[test]
    fn freed_blocks_stay_findable_until_evicted_least_recently_used_first() {
        let mut kv = cache(4, 2);
        prefill(&mut kv, 1, &[1, 2, 3, 4, 5]); // blocks [1,2] [3,4] indexed, [5] not
        kv.free(id(1));
        assert_eq!(kv.stats().n_blocks_cached_free, 2);
        assert_eq!(kv.stats().n_blocks_in_use, 0);
        // A new sequence hits both cached blocks.
        assert_eq!(prefill(&mut kv, 2, &[1, 2, 3, 4, 9]).n_cached_tokens, 4);
        kv.free(id(2));
        // A sequence that needs 3 fresh blocks: 2 fresh remain, then one eviction, which takes
        // the chain's tail [3,4] (released first), keeping its head [1,2].
        prefill(&mut kv, 3, &[7, 7, 7, 7, 7]);
        kv.free(id(3));
        assert_eq!(prefill(&mut kv, 4, &[1, 2, 3, 4, 9]).n_cached_tokens, 2);
    }

    #[test]
    fn a_block_indexed_twice_keeps_the_first_copy() {
        let mut kv = cache(8, 2);
        let tokens = [5, 6, 7];
        // Two sequences compute the same block without a hit (the second skips the lookup).
        prefill(&mut kv, 1, &tokens);
        kv.allocate(id(2), &tokens, PrefixLookup::Skip, usize::MAX).unwrap();
        kv.cache_computed(id(2), &tokens, 3).unwrap();
        kv.check_invariants();
        let first = kv.block_table(id(1)).unwrap()[0];
        kv.free(id(1));
        kv.free(id(2));
        kv.check_invariants();
        assert_eq!(kv.stats().n_blocks_cached_free, 1);
        prefill(&mut kv, 3, &tokens);
        assert_eq!(kv.block_table(id(3)).unwrap()[0], first);
    }

    /// Random allocate / grow / compute / free over sequences with shared prefixes: after every
    /// operation each block is in exactly one place with exact reference counts; usage equals the
    /// distinct blocks in tables; prefix hits are found; freeing everything returns every block.
    #[test]
    fn random_operations_never_leak_or_double_free_a_block() {
        for seed in 0..20u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let block_size = [1, 2, 4, 16][seed as usize % 4];
            let mut kv = cache(rng.random_range(4..64), block_size);
            // A few shared stems, so prefixes repeat.
            let stems: Vec<Vec<u32>> =
                (0..3).map(|_| (0..rng.random_range(1..40)).map(|_| rng.random_range(0..5)).collect()).collect();
            let mut live: Vec<(RequestId, Vec<u32>, usize)> = Vec::new(); // id, tokens, slots
            let (mut total_hits, mut next_id) = (0u64, 0u64);
            for _ in 0..400 {
                match rng.random_range(0..4) {
                    0 => {
                        let mut tokens = stems[rng.random_range(0..stems.len())].clone();
                        tokens.extend((0..rng.random_range(0..10)).map(|_| rng.random_range(0..5)));
                        if tokens.is_empty() {
                            tokens.push(1);
                        }
                        let seq = id(next_id);
                        next_id += 1;
                        let before = kv.stats();
                        match kv.allocate(seq, &tokens, PrefixLookup::Use, rng.random_range(1..64)) {
                            Ok(a) => {
                                assert_eq!(a.n_cached_tokens % block_size, 0);
                                assert!(a.n_cached_tokens < tokens.len());
                                total_hits += a.n_cached_tokens as u64;
                                live.push((seq, tokens, a.n_cached_tokens + a.n_new_tokens));
                            }
                            Err(Error::OutOfBlocks { .. }) => assert_eq!(kv.stats(), before),
                            Err(e) => panic!("{e}"),
                        }
                    }
                    1 if !live.is_empty() => {
                        let i = rng.random_range(0..live.len());
                        let (seq, tokens, slots) = &mut live[i];
                        let grow = rng.random_range(1..8);
                        tokens.extend((0..grow).map(|_| rng.random_range(0..5)));
                        if kv.ensure_slots(*seq, tokens.len()).is_ok() {
                            *slots = tokens.len();
                        }
                    }
                    2 if !live.is_empty() => {
                        let (seq, tokens, slots) = &live[rng.random_range(0..live.len())];
                        kv.cache_computed(*seq, tokens, *slots).unwrap();
                    }
                    _ if !live.is_empty() => {
                        let (seq, ..) = live.swap_remove(rng.random_range(0..live.len()));
                        assert!(kv.free(seq));
                    }
                    _ => {}
                }
                kv.check_invariants();
                let mut distinct: Vec<BlockId> =
                    live.iter().flat_map(|(s, ..)| kv.block_table(*s).unwrap().to_vec()).collect();
                distinct.sort();
                distinct.dedup();
                let st = kv.stats();
                assert_eq!(st.n_blocks_in_use, distinct.len(), "seed {seed}");
                assert!((st.usage - distinct.len() as f64 / st.n_blocks as f64).abs() < 1e-12);
                assert_eq!(st.prefix_hits_tokens, total_hits);
            }
            for (seq, ..) in live.drain(..) {
                assert!(kv.free(seq));
            }
            kv.check_invariants();
            assert_eq!(kv.stats().n_blocks_in_use, 0, "seed {seed}");
            assert_eq!(kv.n_free_blocks(), kv.config().n_blocks, "seed {seed}");
            assert!(total_hits > 0, "seed {seed}: shared stems never hit the prefix cache");
        }
    }
}
