//! A hosted topic: its offsets, retention accounting, subscribers and the durable high
//! watermark that wakes readers.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use peerbus_proto::{Retention, StartFrom};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::retention::Retained;

/// One topic this peer hosts.
#[derive(Debug)]
pub(crate) struct Topic {
    pub name: String,
    pub id: u64,
    pub retention: Retention,
    pub created_ms: u64,
    pub state: Mutex<TopicState>,
    /// Offset one past the last durable message; readers never look past it.
    pub durable: watch::Sender<u64>,
    /// Cancelled when the topic is deleted, ending its followers.
    pub deleted: CancellationToken,
}

#[derive(Debug)]
pub(crate) struct TopicState {
    pub retained: Retained,
    pub subscribers: BTreeMap<String, u64>,
    /// The last batch of each idempotent producer, by producer id, so a resent batch is
    /// answered with its offsets instead of being stored twice. Recorded when the batch is
    /// queued for storage (not when durable), so a retry racing the original finds it.
    pub producers: HashMap<u64, Produced>,
}

/// The last batch an idempotent producer published to a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Produced {
    pub sequence: u64,
    pub first: u64,
    pub count: u32,
}

impl Produced {
    /// Storage encoding: sequence ‖ first ‖ count, big-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(20);
        v.extend_from_slice(&self.sequence.to_be_bytes());
        v.extend_from_slice(&self.first.to_be_bytes());
        v.extend_from_slice(&self.count.to_be_bytes());
        v
    }

    pub fn decode(v: &[u8]) -> Option<Produced> {
        let v: &[u8; 20] = v.try_into().ok()?;
        Some(Produced {
            sequence: u64::from_be_bytes(v[0..8].try_into().ok()?),
            first: u64::from_be_bytes(v[8..16].try_into().ok()?),
            count: u32::from_be_bytes(v[16..20].try_into().ok()?),
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

impl Topic {
    pub fn new(
        name: String,
        id: u64,
        retention: Retention,
        created_ms: u64,
        retained: Retained,
        subscribers: BTreeMap<String, u64>,
    ) -> Topic {
        let next = retained.next();
        Topic {
            name,
            id,
            retention,
            created_ms,
            state: Mutex::new(TopicState {
                retained,
                subscribers,
                producers: HashMap::new(),
            }),
            durable: watch::Sender::new(next),
            deleted: CancellationToken::new(),
        }
    }

    /// Raises the durable high watermark (completions may be observed out of order; a later
    /// batch being durable implies every earlier one is, as the writer completes in order).
    pub fn mark_durable(&self, upto: u64) {
        self.durable.send_if_modified(|v| {
            if upto > *v {
                *v = upto;
                true
            } else {
                false
            }
        });
    }

    pub fn high_watermark(&self) -> u64 {
        *self.durable.borrow()
    }
}

impl TopicState {
    /// Where a subscriber starts, given an explicit `from` or its committed position.
    pub fn start_position(&self, current: Option<u64>, from: Option<StartFrom>, hw: u64) -> u64 {
        let low = self.retained.low();
        match (from, current) {
            (Some(StartFrom::Earliest), _) => low,
            (Some(StartFrom::Latest), _) => hw,
            (Some(StartFrom::Offset(n)), _) => n.clamp(low, hw),
            (None, Some(c)) => c.max(low),
            (None, None) => low,
        }
    }

    pub fn min_committed(&self) -> Option<u64> {
        self.subscribers.values().copied().min()
    }
}
