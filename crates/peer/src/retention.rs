//! Retention accounting: which offsets a topic may drop. Pure logic; the caller passes the
//! clock and turns the answer into a storage truncate.

use std::collections::VecDeque;

use peerbus_proto::Retention;

/// What every message costs beside its payload (its retention entry, its length in the
/// stored record and the tail, its timestamp), charged against byte limits so that tiny
/// and empty messages are bounded too.
pub const MESSAGE_OVERHEAD: u64 = 32;

/// What a batch counts against byte budgets (the node's write budget, the tails): its
/// payloads plus [`MESSAGE_OVERHEAD`] a message, so batches of empty messages count too.
pub fn batch_charge(batch: &peerbus_proto::Batch) -> usize {
    batch
        .data
        .len()
        .saturating_add(batch.len().saturating_mul(MESSAGE_OVERHEAD as usize))
}

/// Size and time of every retained message, oldest first, so limits can be checked without
/// reading the log.
#[derive(Debug, Default, Clone)]
pub struct Retained {
    low: u64,
    entries: VecDeque<(u32, u64)>,
    bytes: u64,
}

impl Retained {
    /// Accounting that starts at offset `low` with nothing retained.
    pub fn starting_at(low: u64) -> Self {
        Retained {
            low,
            entries: VecDeque::new(),
            bytes: 0,
        }
    }

    /// Oldest retained offset.
    pub fn low(&self) -> u64 {
        self.low
    }

    /// Offset the next message will get.
    pub fn next(&self) -> u64 {
        self.low + self.entries.len() as u64
    }

    /// Payload bytes retained.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// What the retained messages count against a byte limit: payloads plus
    /// [`MESSAGE_OVERHEAD`] each.
    pub fn charged(&self) -> u64 {
        self.bytes + self.entries.len() as u64 * MESSAGE_OVERHEAD
    }

    /// Records the next message.
    pub fn push(&mut self, size: u32, timestamp_ms: u64) {
        self.entries.push_back((size, timestamp_ms));
        self.bytes += u64::from(size);
    }

    /// Moves the start past a gap (messages that were never stored), so `next` stays right.
    pub fn skip_to(&mut self, offset: u64) {
        if offset > self.next() {
            self.entries.clear();
            self.bytes = 0;
            self.low = offset;
        }
    }

    /// The first offset to keep under `policy` at `now_ms`. `min_committed` is the lowest
    /// committed offset among subscribers (`None` without subscribers), used by the
    /// `consumed` policy; without subscribers `consumed` keeps everything, as a broker that
    /// deletes only what every subscriber has read.
    pub fn cutoff(&self, policy: &Retention, now_ms: u64, min_committed: Option<u64>) -> u64 {
        let mut keep_from = self.low;
        let next = self.next();
        if let Some(max) = policy.max_messages {
            keep_from = keep_from.max(next.saturating_sub(max));
        }
        let charged = self.charged();
        if let Some(max) = policy.max_bytes
            && charged > max
        {
            let mut excess = charged - max;
            let mut off = self.low;
            for &(size, _) in &self.entries {
                if excess == 0 {
                    break;
                }
                excess = excess.saturating_sub(u64::from(size) + MESSAGE_OVERHEAD);
                off += 1;
            }
            keep_from = keep_from.max(off);
        }
        if let Some(age) = policy.max_age_secs {
            let oldest_ok = now_ms.saturating_sub(age.saturating_mul(1000));
            let expired = self
                .entries
                .iter()
                .take_while(|&&(_, ts)| ts < oldest_ok)
                .count() as u64;
            keep_from = keep_from.max(self.low + expired);
        }
        if policy.consumed
            && let Some(c) = min_committed
        {
            keep_from = keep_from.max(c.min(next));
        }
        keep_from.min(next)
    }

    /// Forgets everything below `offset`.
    pub fn drop_below(&mut self, offset: u64) {
        while self.low < offset {
            match self.entries.pop_front() {
                Some((size, _)) => {
                    self.bytes -= u64::from(size);
                    self.low += 1;
                }
                None => {
                    self.low = offset;
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(n: u64, size: u32, ts_step: u64) -> Retained {
        let mut r = Retained::starting_at(0);
        for i in 0..n {
            r.push(size, 1_000 + i * ts_step);
        }
        r
    }

    fn policy() -> Retention {
        Retention {
            max_messages: None,
            max_bytes: None,
            max_age_secs: None,
            consumed: false,
        }
    }

    #[test]
    fn keeps_everything_without_limits() {
        let r = filled(10, 5, 1);
        assert_eq!(r.cutoff(&policy(), 10_000_000, Some(10)), 0);
    }

    #[test]
    fn count_limit_keeps_the_newest() {
        let r = filled(10, 5, 1);
        let p = Retention {
            max_messages: Some(3),
            ..policy()
        };
        assert_eq!(r.cutoff(&p, 0, None), 7);
    }

    #[test]
    fn byte_limit_drops_just_enough() {
        let r = filled(10, 10, 1); // 100 bytes of payload, 10 + 32 charged each
        let p = Retention {
            max_bytes: Some(130),
            ..policy()
        };
        // 420 - 130 = 290 bytes too many: drop 7 messages (294), keep 126.
        assert_eq!(r.cutoff(&p, 0, None), 7);
        assert_eq!(r.bytes(), 100);
    }

    #[test]
    fn empty_messages_count_against_the_byte_limit() {
        let r = filled(1000, 0, 1);
        let p = Retention {
            max_bytes: Some(10 * MESSAGE_OVERHEAD),
            ..policy()
        };
        assert_eq!(r.cutoff(&p, 0, None), 990);
    }

    #[test]
    fn age_limit_uses_the_given_clock() {
        let r = filled(10, 1, 1_000); // timestamps 1_000, 2_000, ... 10_000 ms
        let p = Retention {
            max_age_secs: Some(3),
            ..policy()
        };
        // At 10_000 ms, messages older than 7_000 ms go: 1_000..=6_000 → 6 messages.
        assert_eq!(r.cutoff(&p, 10_000, None), 6);
        assert_eq!(r.cutoff(&p, 1_000, None), 0);
    }

    #[test]
    fn consumed_waits_for_the_slowest_subscriber() {
        let r = filled(10, 1, 1);
        let p = Retention {
            consumed: true,
            ..policy()
        };
        assert_eq!(r.cutoff(&p, 0, None), 0, "no subscriber: keep all");
        assert_eq!(r.cutoff(&p, 0, Some(4)), 4);
        assert_eq!(r.cutoff(&p, 0, Some(99)), 10, "never past the end");
    }

    #[test]
    fn drop_below_updates_bytes_and_low() {
        let mut r = filled(10, 10, 1);
        r.drop_below(4);
        assert_eq!((r.low(), r.next(), r.bytes()), (4, 10, 60));
        r.drop_below(2);
        assert_eq!(r.low(), 4, "never moves backwards");
        r.skip_to(20);
        assert_eq!((r.low(), r.next(), r.bytes()), (20, 20, 0));
    }
}
