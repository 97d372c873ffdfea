//! How long work that a passing fault stopped waits before it goes again (issue 20: a full disk or
//! a silent state store makes a job wait, not fail): a worker's upload that the coordinator refused
//! (`RESOURCE_EXHAUSTED` for its disk, `UNAVAILABLE` for its store), and the coordinator's assembly
//! on a full disk or a silent store. Both sides wait the same way, doubling from half a second up
//! to eight.

use std::time::Duration;

/// The first wait, and the longest.
const FIRST: Duration = Duration::from_millis(500);
const LONGEST: Duration = Duration::from_secs(8);

/// The waits between tries after a passing fault: 0.5 s, 1 s, 2 s, 4 s, then 8 s each time.
#[derive(Clone, Debug)]
pub struct RetryBackoff {
    next: Duration,
}

impl Default for RetryBackoff {
    fn default() -> RetryBackoff {
        RetryBackoff { next: FIRST }
    }
}

impl RetryBackoff {
    /// How long to wait before the next try (each call waits longer, up to the longest).
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(LONGEST);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_eight_seconds() {
        let mut b = RetryBackoff::default();
        let waits: Vec<u64> = (0..7).map(|_| b.next_wait().as_millis() as u64).collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 8000, 8000, 8000]);
    }
}
