//! How long work that a full disk stopped waits before it goes again (issue 20: a full disk makes a
//! job wait, not fail): a worker's upload that the coordinator refused, and the coordinator's
//! assembly. Both sides wait the same way, doubling from half a second up to eight.

use std::time::Duration;

/// The first wait, and the longest.
const FIRST: Duration = Duration::from_millis(500);
const LONGEST: Duration = Duration::from_secs(8);

/// The waits between tries after a full disk: 0.5 s, 1 s, 2 s, 4 s, then 8 s each time.
#[derive(Clone, Debug)]
pub struct DiskFullBackoff {
    next: Duration,
}

impl Default for DiskFullBackoff {
    fn default() -> DiskFullBackoff {
        DiskFullBackoff { next: FIRST }
    }
}

impl DiskFullBackoff {
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
        let mut b = DiskFullBackoff::default();
        let waits: Vec<u64> = (0..7).map(|_| b.next_wait().as_millis() as u64).collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 8000, 8000, 8000]);
    }
}
