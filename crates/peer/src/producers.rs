//! Idempotent producers of one topic: the last batch each one sent, so a resend is answered
//! with the offsets it got instead of being stored twice. Pure logic (it takes `now` and
//! does no I/O), bounded in count and in time like Kafka's producer state
//! (`producer.id.expiration.ms`): without a bound, every client, restart and failure adds
//! a producer for ever, and a raw client sending random ids grows memory and disk at will.

use std::collections::HashMap;

use peerbus_proto::{ErrorCode, WireError};

/// Most producers one topic remembers. At 48 bytes or so each, a full topic holds about
/// 200 KiB of producer state.
pub(crate) const MAX_PRODUCERS: usize = 4096;

/// A producer idle this long is forgotten when room is needed or the peer restarts (Kafka's
/// default `producer.id.expiration.ms`). Coming back, it is told it is unknown and starts
/// again under a fresh id.
pub(crate) const PRODUCER_EXPIRY_MS: u64 = 24 * 60 * 60 * 1000;

/// A producer idle for less than this may still be resending its last batch (the client
/// library resends for up to 30 s), so forgetting it could store that batch twice: a full
/// topic refuses a new producer rather than evict one this recent.
pub(crate) const RESEND_WINDOW_MS: u64 = 60_000;

/// The last batch an idempotent producer published to a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Produced {
    pub sequence: u64,
    pub first: u64,
    pub count: u32,
    /// When the batch was appended, in ms since the Unix epoch.
    pub last_ms: u64,
}

impl Produced {
    /// Storage encoding: sequence ‖ first ‖ count ‖ last_ms, big-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(28);
        v.extend_from_slice(&self.sequence.to_be_bytes());
        v.extend_from_slice(&self.first.to_be_bytes());
        v.extend_from_slice(&self.count.to_be_bytes());
        v.extend_from_slice(&self.last_ms.to_be_bytes());
        v
    }

    /// Decodes [`Produced::encode`]'s bytes. State written before producers had a time
    /// (20 bytes) counts as active at `now`, so it is never expired early.
    pub fn decode(v: &[u8], now: u64) -> Option<Produced> {
        let u64_at = |i: usize| Some(u64::from_be_bytes(v.get(i..i + 8)?.try_into().ok()?));
        let last_ms = match v.len() {
            20 => now,
            28 => u64_at(20)?,
            _ => return None,
        };
        Some(Produced {
            sequence: u64_at(0)?,
            first: u64_at(8)?,
            count: u32::from_be_bytes(v.get(16..20)?.try_into().ok()?),
            last_ms,
        })
    }
}

/// Prefix of the `meta` keys holding idempotent producer state: prefix ‖ topic id ‖ producer.
pub(crate) const PRODUCER_PREFIX: &[u8] = b"producer";

/// The `meta` key of a producer's state on a topic.
pub(crate) fn producer_key(topic_id: u64, producer: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(PRODUCER_PREFIX.len() + 16);
    k.extend_from_slice(PRODUCER_PREFIX);
    k.extend_from_slice(&topic_id.to_be_bytes());
    k.extend_from_slice(&producer.to_be_bytes());
    k
}

/// The (topic id, producer) of a `meta` key, when it is a producer key.
pub(crate) fn parse_producer_key(k: &[u8]) -> Option<(u64, u64)> {
    let rest = k.strip_prefix(PRODUCER_PREFIX)?;
    let rest: &[u8; 16] = rest.try_into().ok()?;
    Some((
        u64::from_be_bytes(rest[0..8].try_into().ok()?),
        u64::from_be_bytes(rest[8..16].try_into().ok()?),
    ))
}

/// What to do with an idempotent batch.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    /// A resend of the producer's last batch, which got these offsets.
    Duplicate { first: u64, count: u32 },
    /// The producer's next batch: store it. `previous` is the producer's state before it
    /// (to restore if the write fails); `evicted` are producers forgotten to make room,
    /// whose stored state must be removed in the same write.
    Next {
        previous: Option<Produced>,
        evicted: Vec<u64>,
    },
}

/// The producers of one topic.
#[derive(Debug, Default)]
pub(crate) struct Producers {
    map: HashMap<u64, Produced>,
}

impl Producers {
    /// Producers loaded from storage; those idle past the expiry at `now` are left out and
    /// returned, for their stored state to be removed.
    pub fn load(loaded: HashMap<u64, Produced>, now: u64) -> (Producers, Vec<u64>) {
        let mut p = Producers { map: loaded };
        let expired = p.take_expired(now);
        (p, expired)
    }

    /// Producer ids known now.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.map.keys().copied()
    }

    /// Number of producers known now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Decides what to do with batch `sequence` of `producer`, arriving at `now`. A new
    /// producer must start at sequence 0: one that arrives later in its sequence is unknown
    /// here (its state expired, or the topic was deleted and made again), and storing its
    /// batch could duplicate one stored before; Kafka answers `UNKNOWN_PRODUCER_ID` there.
    pub fn admit(
        &mut self,
        topic: &str,
        producer: u64,
        sequence: u64,
        now: u64,
    ) -> Result<Admission, WireError> {
        match self.map.get(&producer) {
            Some(p) if p.sequence == sequence => Ok(Admission::Duplicate {
                first: p.first,
                count: p.count,
            }),
            Some(p) if p.sequence.checked_add(1) == Some(sequence) => Ok(Admission::Next {
                previous: Some(*p),
                evicted: Vec::new(),
            }),
            Some(p) => Err(WireError::new(
                ErrorCode::BadRequest,
                format!(
                    "out-of-order sequence {sequence} from producer {producer} (expected {})",
                    p.sequence.wrapping_add(1)
                ),
            )),
            None if sequence > 0 => Err(WireError::new(
                ErrorCode::UnknownProducer,
                format!(
                    "producer {producer} is not known to topic '{topic}' (its state expired \
                     or the topic was made again): start again under a new producer id at \
                     sequence 0"
                ),
            )),
            None => Ok(Admission::Next {
                previous: None,
                evicted: self.make_room(topic, now)?,
            }),
        }
    }

    /// Room for one more producer: when the topic is full, every expired producer goes, or
    /// else the longest idle one if it is past the resend window.
    fn make_room(&mut self, topic: &str, now: u64) -> Result<Vec<u64>, WireError> {
        if self.map.len() < MAX_PRODUCERS {
            return Ok(Vec::new());
        }
        let expired = self.take_expired(now);
        if !expired.is_empty() {
            return Ok(expired);
        }
        let (&oldest, p) = self
            .map
            .iter()
            .min_by_key(|(id, p)| (p.last_ms, **id))
            .expect("a full topic has producers");
        if now.saturating_sub(p.last_ms) < RESEND_WINDOW_MS {
            return Err(WireError::new(
                ErrorCode::LimitReached,
                format!(
                    "topic '{topic}' has {MAX_PRODUCERS} idempotent producers active in the \
                     last {} s, its limit: try again later",
                    RESEND_WINDOW_MS / 1000
                ),
            ));
        }
        self.map.remove(&oldest);
        Ok(vec![oldest])
    }

    fn take_expired(&mut self, now: u64) -> Vec<u64> {
        let expired: Vec<u64> = self
            .map
            .iter()
            .filter(|(_, p)| now.saturating_sub(p.last_ms) >= PRODUCER_EXPIRY_MS)
            .map(|(&id, _)| id)
            .collect();
        for id in &expired {
            self.map.remove(id);
        }
        expired
    }

    /// Records the producer's batch (after [`Producers::admit`] said `Next`).
    pub fn record(&mut self, producer: u64, p: Produced) {
        self.map.insert(producer, p);
    }

    /// Takes back `recorded` after its write failed, unless a later batch of the producer
    /// was recorded meanwhile, so a resend is stored instead of answered with offsets that
    /// were never stored.
    pub fn undo(&mut self, producer: u64, recorded: Produced, previous: Option<Produced>) {
        if self.map.get(&producer) == Some(&recorded) {
            match previous {
                Some(p) => self.map.insert(producer, p),
                None => self.map.remove(&producer),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000;

    fn produced(sequence: u64, first: u64, last_ms: u64) -> Produced {
        Produced {
            sequence,
            first,
            count: 1,
            last_ms,
        }
    }

    fn next(p: &mut Producers, producer: u64, sequence: u64, now: u64) -> Vec<u64> {
        match p.admit("t", producer, sequence, now).expect("admitted") {
            Admission::Next { evicted, .. } => {
                p.record(producer, produced(sequence, sequence, now));
                evicted
            }
            other => panic!("expected Next, got {other:?}"),
        }
    }

    #[test]
    fn resends_are_duplicates_and_gaps_are_refused() {
        let mut p = Producers::default();
        next(&mut p, 7, 0, T0);
        next(&mut p, 7, 1, T0);
        assert_eq!(
            p.admit("t", 7, 1, T0),
            Ok(Admission::Duplicate { first: 1, count: 1 })
        );
        let e = p.admit("t", 7, 3, T0).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(e.message.contains("expected 2"), "{e:?}");
    }

    #[test]
    fn an_unknown_producer_must_start_at_zero() {
        let mut p = Producers::default();
        let e = p.admit("t", 9, 5, T0).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownProducer);
        assert!(e.message.contains("sequence 0"), "{e:?}");
        assert_eq!(p.len(), 0, "a refused producer is not remembered");
    }

    #[test]
    fn a_full_topic_drops_expired_producers_first() {
        let mut p = Producers::default();
        for id in 0..MAX_PRODUCERS as u64 {
            // Half of them idle since T0, half active a little later.
            let at = if id % 2 == 0 { T0 } else { T0 + 1000 };
            next(&mut p, id, 0, at);
        }
        let now = T0 + PRODUCER_EXPIRY_MS;
        let evicted = next(&mut p, u64::MAX, 0, now);
        assert_eq!(evicted.len(), MAX_PRODUCERS / 2);
        assert!(
            evicted.iter().all(|id| id % 2 == 0),
            "only the expired ones"
        );
        assert_eq!(p.len(), MAX_PRODUCERS / 2 + 1);
    }

    #[test]
    fn a_full_topic_evicts_the_longest_idle_only_past_the_resend_window() {
        let mut p = Producers::default();
        for id in 0..MAX_PRODUCERS as u64 {
            next(&mut p, id, 0, T0 + id);
        }
        // Everyone was active within the window: refused, nothing forgotten.
        let e = p.admit("t", u64::MAX, 0, T0 + 10_000).unwrap_err();
        assert_eq!(e.code, ErrorCode::LimitReached);
        assert!(e.message.contains("limit"), "{e:?}");
        assert_eq!(p.len(), MAX_PRODUCERS);
        // Past the window, the longest idle (id 0) makes room.
        let evicted = next(&mut p, u64::MAX, 0, T0 + RESEND_WINDOW_MS);
        assert_eq!(evicted, vec![0]);
        assert_eq!(p.len(), MAX_PRODUCERS);
        // The evicted producer is now unknown.
        assert_eq!(
            p.admit("t", 0, 1, T0 + RESEND_WINDOW_MS).unwrap_err().code,
            ErrorCode::UnknownProducer
        );
    }

    #[test]
    fn loading_leaves_out_expired_producers() {
        let loaded = HashMap::from([
            (1, produced(3, 10, T0)),
            (2, produced(4, 20, T0 + PRODUCER_EXPIRY_MS)),
        ]);
        let (p, expired) = Producers::load(loaded, T0 + PRODUCER_EXPIRY_MS);
        assert_eq!(expired, vec![1]);
        assert_eq!(p.ids().collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn undo_restores_unless_a_later_batch_was_recorded() {
        let mut p = Producers::default();
        next(&mut p, 1, 0, T0);
        let first = produced(0, 0, T0);
        let second = produced(1, 1, T0);
        p.record(1, second);
        p.undo(1, second, Some(first));
        assert_eq!(
            p.admit("t", 1, 0, T0),
            Ok(Admission::Duplicate { first: 0, count: 1 })
        );
        // A later batch recorded meanwhile stays.
        p.record(1, second);
        p.undo(1, first, None);
        assert_eq!(
            p.admit("t", 1, 1, T0),
            Ok(Admission::Duplicate { first: 1, count: 1 })
        );
    }

    #[test]
    fn state_round_trips_and_old_state_counts_as_active() {
        let p = produced(5, 100, T0);
        assert_eq!(Produced::decode(&p.encode(), T0 + 5), Some(p));
        let old = &p.encode()[..20];
        assert_eq!(Produced::decode(old, T0 + 5).unwrap().last_ms, T0 + 5);
        assert_eq!(Produced::decode(&[0; 7], T0), None);
    }
}
