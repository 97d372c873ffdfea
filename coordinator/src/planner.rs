//! The planner: which worker computes which blocks.
//!
//! Blocks of one model cost the same (same shapes, same calibration tokens), so a balanced plan
//! gives each worker a contiguous range of nearly equal length (lengths differ by at most one,
//! longer ranges first). A worker takes at most as many blocks as its memory holds; what no worker
//! can hold now waits for the next plan. Ranges are contiguous so that a range needs only the
//! activations at its first block: one transfer per stage.

use std::ops::Range;

/// How many blocks a worker can hold at once, from its memory and the cost of one block.
pub fn block_capacity(memory_bytes: u64, per_block_bytes: u64, fixed_bytes: u64) -> usize {
    if per_block_bytes == 0 {
        return usize::MAX;
    }
    (memory_bytes.saturating_sub(fixed_bytes) / per_block_bytes) as usize
}

/// Splits `blocks` into at most `capacities.len()` contiguous ranges, range `i` for worker `i`,
/// balanced and bounded by each worker's capacity. Workers with no capacity get an empty range.
/// The ranges are returned in block order and cover a prefix of `blocks` (all of it when the
/// capacities allow).
pub fn plan(blocks: Range<usize>, capacities: &[usize]) -> Vec<Range<usize>> {
    let n = blocks.len();
    let usable: Vec<usize> = (0..capacities.len()).filter(|&i| capacities[i] > 0).collect();
    let mut sizes = vec![0usize; capacities.len()];
    if usable.is_empty() || n == 0 {
        return sizes.iter().map(|_| blocks.start..blocks.start).collect();
    }
    // Water-filling: hand out blocks one round at a time to workers that still have room, so
    // sizes stay within one of each other wherever capacities allow.
    let mut left = n;
    while left > 0 {
        let open: Vec<usize> = usable.iter().copied().filter(|&i| sizes[i] < capacities[i]).collect();
        if open.is_empty() {
            break;
        }
        let share = (left / open.len()).max(1);
        for &i in &open {
            let give = share.min(capacities[i] - sizes[i]).min(left);
            sizes[i] += give;
            left -= give;
            if left == 0 {
                break;
            }
        }
    }
    // Ranges follow worker order; the water-filling above already gave earlier workers the extra
    // blocks (10 blocks on 3 workers: 4, 3, 3).
    let mut start = blocks.start;
    sizes
        .into_iter()
        .map(|size| {
            start += size;
            start - size..start
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(blocks: Range<usize>, capacities: &[usize], expected: &[Range<usize>]) {
        assert_eq!(plan(blocks.clone(), capacities), expected, "{blocks:?} over {capacities:?}");
    }

    #[test]
    fn balanced_contiguous_ranges() {
        check(0..30, &[usize::MAX; 3], &[0..10, 10..20, 20..30]);
        check(0..10, &[usize::MAX; 3], &[0..4, 4..7, 7..10]);
        check(0..2, &[usize::MAX; 3], &[0..1, 1..2, 2..2]);
        #[allow(clippy::single_range_in_vec_init)] // one worker: one range
        check(5..9, &[usize::MAX], &[5..9]);
    }

    #[test]
    fn memory_bounds_the_share() {
        // Worker 0 holds only 2 blocks; the others take the rest evenly.
        check(0..10, &[2, 100, 100], &[0..2, 2..6, 6..10]);
        // Not enough room for everything: a prefix is planned, the rest waits.
        check(0..10, &[2, 3], &[0..2, 2..5]);
        // A worker that cannot hold one block gets nothing.
        check(0..4, &[0, 9], &[0..0, 0..4]);
        assert_eq!(block_capacity(10_000, 1_000, 2_500), 7);
    }
}
