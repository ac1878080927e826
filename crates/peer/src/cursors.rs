//! The durable subscribers of one topic: each one's committed position, bounded in count
//! and in time. Pure logic (it takes `now` and does no I/O). Without a bound, every pull
//! under a new name adds a subscriber for ever: under `consumed` retention each abandoned
//! one pins the log, and a client inventing names grows memory and disk at will. Like
//! Kafka's `offsets.retention.minutes`, a subscriber nobody has used for a week (and that
//! no follow holds open) is forgotten.

use std::collections::BTreeMap;

use peerbus_proto::{ErrorCode, WireError};

/// Most durable subscribers one topic keeps. With names of at most 255 bytes the whole list
/// (a `Subscribers` answer) stays under 3 MiB, inside one frame.
pub(crate) const MAX_SUBSCRIBERS: usize = 10_000;

/// A subscriber with no subscribe, pull or acknowledgement for this long, and no follow
/// open, is forgotten (Kafka's default `offsets.retention.minutes` is also 7 days).
pub(crate) const SUBSCRIBER_EXPIRY_MS: u64 = 7 * 24 * 60 * 60 * 1000;

/// How often a busy topic looks for expired subscribers: often enough that an abandoned
/// one stops pinning a `consumed` log soon after its week, rarely enough to cost nothing.
const SWEEP_EVERY_MS: u64 = 60_000;

/// One subscriber's position and use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cursor {
    /// The next offset it reads: it has acknowledged everything before.
    next: u64,
    /// When it was last used, in ms since the Unix epoch (kept in memory only: after a
    /// restart every subscriber counts as used at the restart, never expiring early).
    active_ms: u64,
    /// Follows open on it now; a followed subscriber never expires.
    follows: u32,
}

/// The durable subscribers of one topic, by name.
#[derive(Debug, Default)]
pub(crate) struct Cursors {
    map: BTreeMap<String, Cursor>,
    swept_ms: u64,
}

impl Cursors {
    /// Positions loaded from storage, all counted as used at `now`.
    pub fn load(positions: BTreeMap<String, u64>, now: u64) -> Cursors {
        Cursors {
            map: positions
                .into_iter()
                .map(|(name, next)| {
                    (
                        name,
                        Cursor {
                            next,
                            active_ms: now,
                            follows: 0,
                        },
                    )
                })
                .collect(),
            swept_ms: now,
        }
    }

    /// The committed position of `name`, if it is a subscriber.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.map.get(name).map(|c| c.next)
    }

    /// Whether `name` is a subscriber.
    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    /// Number of subscribers.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// The subscribers and their positions, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.map.iter().map(|(n, c)| (n.as_str(), c.next))
    }

    /// The lowest committed position (`None` without subscribers), for `consumed`
    /// retention.
    pub fn min(&self) -> Option<u64> {
        self.map.values().map(|c| c.next).min()
    }

    /// Sets `name`'s position to `next`, adding it if it is new. A new subscriber on a full
    /// topic first makes expired ones go (returned, for their stored positions to be
    /// removed in the same write); if none has expired it is refused.
    pub fn set(
        &mut self,
        topic: &str,
        name: &str,
        next: u64,
        now: u64,
    ) -> Result<Vec<String>, WireError> {
        if let Some(c) = self.map.get_mut(name) {
            c.next = next;
            c.active_ms = now;
            return Ok(Vec::new());
        }
        let mut expired = Vec::new();
        if self.map.len() >= MAX_SUBSCRIBERS {
            expired = self.take_expired(now);
            if expired.is_empty() {
                return Err(WireError::new(
                    ErrorCode::LimitReached,
                    format!(
                        "topic '{topic}' has {MAX_SUBSCRIBERS} subscribers, its limit: \
                         unsubscribe some, or reuse a subscriber name"
                    ),
                ));
            }
        }
        self.map.insert(
            name.to_string(),
            Cursor {
                next,
                active_ms: now,
                follows: 0,
            },
        );
        Ok(expired)
    }

    /// Marks `name` as used at `now` without moving it.
    pub fn touch(&mut self, name: &str, now: u64) {
        if let Some(c) = self.map.get_mut(name) {
            c.active_ms = now;
        }
    }

    /// Moves `name`'s position forward to `next`. False (and nothing changes) when it is
    /// not a subscriber (unsubscribed meanwhile: it is not brought back) or is there
    /// already.
    pub fn advance(&mut self, name: &str, next: u64, now: u64) -> bool {
        match self.map.get_mut(name) {
            Some(c) => {
                c.active_ms = now;
                if c.next >= next {
                    return false;
                }
                c.next = next;
                true
            }
            None => false,
        }
    }

    /// Removes `name`; false when it was not a subscriber.
    pub fn remove(&mut self, name: &str) -> bool {
        self.map.remove(name).is_some()
    }

    /// A follow on `name` opened.
    pub fn follow_started(&mut self, name: &str, now: u64) {
        if let Some(c) = self.map.get_mut(name) {
            c.follows += 1;
            c.active_ms = now;
        }
    }

    /// A follow on `name` ended.
    pub fn follow_ended(&mut self, name: &str, now: u64) {
        if let Some(c) = self.map.get_mut(name) {
            c.follows = c.follows.saturating_sub(1);
            c.active_ms = now;
        }
    }

    /// The subscribers that expired by `now`, removed, at most once a minute.
    pub fn sweep(&mut self, now: u64) -> Vec<String> {
        if now.saturating_sub(self.swept_ms) < SWEEP_EVERY_MS {
            return Vec::new();
        }
        self.take_expired(now)
    }

    fn take_expired(&mut self, now: u64) -> Vec<String> {
        self.swept_ms = now;
        let expired: Vec<String> = self
            .map
            .iter()
            .filter(|(_, c)| {
                c.follows == 0 && now.saturating_sub(c.active_ms) >= SUBSCRIBER_EXPIRY_MS
            })
            .map(|(n, _)| n.clone())
            .collect();
        for n in &expired {
            self.map.remove(n);
        }
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000;

    #[test]
    fn positions_move_forward_only_and_removed_ones_stay_removed() {
        let mut c = Cursors::default();
        assert_eq!(c.set("t", "a", 5, T0), Ok(vec![]));
        assert!(c.advance("a", 7, T0));
        assert!(!c.advance("a", 6, T0), "never backwards");
        assert_eq!(c.get("a"), Some(7));
        assert!(c.remove("a"));
        assert!(!c.advance("a", 9, T0), "not brought back");
        assert_eq!(c.get("a"), None);
    }

    #[test]
    fn idle_subscribers_expire_after_a_week_unless_followed() {
        let mut c = Cursors::load(BTreeMap::from([("a".into(), 1), ("b".into(), 2)]), T0);
        c.follow_started("b", T0);
        assert_eq!(
            c.sweep(T0 + SUBSCRIBER_EXPIRY_MS - SWEEP_EVERY_MS),
            Vec::<String>::new()
        );
        assert_eq!(c.sweep(T0 + SUBSCRIBER_EXPIRY_MS), vec!["a".to_string()]);
        assert_eq!(c.min(), Some(2), "an expired one no longer pins the log");
        c.follow_ended("b", T0 + SUBSCRIBER_EXPIRY_MS);
        assert_eq!(
            c.sweep(T0 + 2 * SUBSCRIBER_EXPIRY_MS - SWEEP_EVERY_MS),
            Vec::<String>::new(),
            "the end of its follow counts as use"
        );
        assert_eq!(
            c.sweep(T0 + 2 * SUBSCRIBER_EXPIRY_MS),
            vec!["b".to_string()]
        );
    }

    #[test]
    fn use_keeps_a_subscriber_and_sweeps_are_rare() {
        let mut c = Cursors::load(BTreeMap::from([("a".into(), 1)]), T0);
        c.touch("a", T0 + 1);
        assert!(c.sweep(T0 + SUBSCRIBER_EXPIRY_MS).is_empty(), "used since");
        // Expired a moment later, but the last sweep was under a minute ago.
        assert!(c.sweep(T0 + SUBSCRIBER_EXPIRY_MS + 1).is_empty());
        assert_eq!(
            c.sweep(T0 + SUBSCRIBER_EXPIRY_MS + SWEEP_EVERY_MS),
            vec!["a".to_string()]
        );
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn a_full_topic_refuses_new_names_until_some_expire() {
        let mut c = Cursors::default();
        for i in 0..MAX_SUBSCRIBERS {
            c.set("t", &format!("s{i}"), 0, T0 + i as u64).unwrap();
        }
        let e = c.set("t", "new", 0, T0 + 1000).unwrap_err();
        assert_eq!(e.code, ErrorCode::LimitReached);
        assert!(e.message.contains("10000 subscribers"), "{e:?}");
        // Known names go on.
        assert_eq!(c.set("t", "s1", 4, T0 + 1000), Ok(vec![]));
        // A week after the first ones were used, they make room.
        let expired = c.set("t", "new", 0, T0 + SUBSCRIBER_EXPIRY_MS + 1).unwrap();
        assert_eq!(expired, vec!["s0".to_string()]);
        assert_eq!(c.len(), MAX_SUBSCRIBERS);
    }
}
