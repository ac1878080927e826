//! A hosted topic: its offsets, retention accounting, subscribers and the durable high
//! watermark that wakes readers.

use std::collections::BTreeMap;
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
