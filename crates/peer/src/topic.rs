//! A hosted topic: its offsets, retention accounting, subscribers and the durable high
//! watermark that wakes readers.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use peerbus_proto::{Batch, MessageSet, Retention, StartFrom};
use tokio::sync::Notify;

use crate::cursors::Cursors;
use crate::producers::Producers;
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
    durable: AtomicU64,
    /// Set when the topic is deleted, ending its followers.
    deleted: AtomicBool,
    /// Wakes whoever waits for the watermark to rise. With `gone`, 64 bytes instead of a
    /// watch channel and a cancellation token (about 470 bytes together, most of it waiter
    /// bookkeeping), since most topics of a large peer have no waiter at all.
    changed: Notify,
    /// Wakes whoever waits for the deletion; apart from `changed`, so a live follower
    /// waiting for the end of its topic is not woken by every publish.
    gone: Notify,
    /// Set before `deleted` when the topic was not deleted but is no longer served here
    /// (the index gave it to another peer): what ends its followers is then "not here".
    pub fenced: AtomicBool,
}

#[derive(Debug)]
pub(crate) struct TopicState {
    pub retained: Retained,
    pub subscribers: Cursors,
    /// The last batch of each idempotent producer, by producer id, so a resent batch is
    /// answered with its offsets instead of being stored twice. Recorded when the batch is
    /// queued for storage (not when durable), so a retry racing the original finds it.
    pub producers: Producers,
    /// Followers that have everything durable: a newly durable batch is written to their
    /// connections by the task that made it durable, with no follower task woken.
    pub live: Vec<Live>,
    /// The most recently appended batches, as they arrived, so followers of a busy topic are
    /// served from memory (no store read, no copy) while they keep up.
    pub tail: Tail,
}

/// A caught-up follower, served by the publishing side while it keeps up.
#[derive(Debug)]
pub(crate) struct Live {
    pub sub: u64,
    pub conn: Arc<peerbus_net::ConnCtx>,
    /// The next offset it should get.
    pub next: u64,
    pub handback: Arc<Handback>,
}

/// How a live follower's task learns it must serve the follower itself again, and from
/// where: a batch did not follow on, or did not fit in the connection's outbox.
#[derive(Debug, Default)]
pub(crate) struct Handback {
    pub wake: tokio::sync::Notify,
    pub next: std::sync::atomic::AtomicU64,
}

/// Payload bytes of recent batches a topic keeps in memory for its followers.
pub(crate) const TAIL_BYTES: usize = 8 << 20;

/// Payload bytes all of a node's topic tails keep together, so many busy topics can't add up
/// to more memory than one node should spend on them (a tail that would cross it is
/// dropped and its followers read from the store instead).
pub(crate) const NODE_TAIL_BYTES: usize = 64 << 20;

/// The tail bytes a node's topics hold in total, shared by all of them.
#[derive(Debug, Default, Clone)]
pub(crate) struct TailBudget(Arc<AtomicUsize>);

impl TailBudget {
    /// Bytes held by all tails now.
    pub fn used(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// Payload bytes one read from the tail gathers across batches at most (like a store read).
const READ_BYTES: usize = 4 << 20;

/// Recent batches in offset order, without gaps, at most [`TAIL_BYTES`] of payload (plus the
/// newest batch, however big), and never more than the node's [`NODE_TAIL_BYTES`] allow.
#[derive(Debug)]
pub(crate) struct Tail {
    batches: VecDeque<Recent>,
    bytes: usize,
    budget: TailBudget,
    limit: usize,
}

impl Drop for Tail {
    fn drop(&mut self) {
        self.clear();
    }
}

#[derive(Debug)]
struct Recent {
    first: u64,
    timestamp_ms: u64,
    batch: Batch,
}

impl Tail {
    /// An empty tail drawing on the node's `budget`, which all its tails hold at most `limit`
    /// bytes of.
    pub fn new(budget: TailBudget, limit: usize) -> Tail {
        Tail {
            batches: VecDeque::new(),
            bytes: 0,
            budget,
            limit,
        }
    }

    /// Remembers a batch appended at `first`; forgets the oldest beyond the topic's byte
    /// budget, and everything when the node's budget can't take the batch.
    pub fn push(&mut self, first: u64, timestamp_ms: u64, batch: Batch) {
        if self
            .batches
            .back()
            .is_some_and(|b| b.first + b.batch.len() as u64 != first)
        {
            self.clear();
        }
        let len = crate::retention::batch_charge(&batch);
        while !self.batches.is_empty() && self.budget.used() + len > self.limit {
            self.pop_oldest();
        }
        if self.budget.used() + len > self.limit {
            // Other topics hold the node's budget; this one's followers read the store.
            return;
        }
        self.bytes += len;
        self.budget.0.fetch_add(len, Ordering::Relaxed);
        self.batches.push_back(Recent {
            first,
            timestamp_ms,
            batch,
        });
        while self.bytes > TAIL_BYTES && self.batches.len() > 1 {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some(old) = self.batches.pop_front() {
            let len = crate::retention::batch_charge(&old.batch);
            self.bytes -= len;
            self.budget.0.fetch_sub(len, Ordering::Relaxed);
        }
    }

    /// Forgets everything (after a failed write, whose batches may never be stored).
    pub fn clear(&mut self) {
        self.budget.0.fetch_sub(self.bytes, Ordering::Relaxed);
        self.batches.clear();
        self.bytes = 0;
    }

    /// The messages from `from` up to (not including) `end` that one remembered batch holds,
    /// at most `max`, sharing the batch's buffer; `None` when `from` is not in the tail.
    pub fn read(&self, topic: &str, from: u64, end: u64, max: usize) -> Option<MessageSet> {
        let oldest = self.batches.front()?;
        if from < oldest.first || from >= end || max == 0 {
            return None;
        }
        let i = self
            .batches
            .partition_point(|b| b.first + b.batch.len() as u64 <= from);
        let want = ((end - from) as usize).min(max);
        // One batch's messages share its buffer; a read spanning batches copies them into one.
        let mut pieces = Vec::new();
        let (mut at, mut got, mut bytes) = (from, 0usize, 0usize);
        for r in self.batches.range(i..) {
            if got >= want || (got > 0 && bytes >= READ_BYTES) {
                break;
            }
            let skip = (at - r.first) as usize;
            let take = (r.batch.len() - skip).min(want - got);
            let start: usize = r.batch.lens[..skip].iter().map(|&l| l as usize).sum();
            let len: usize = r.batch.lens[skip..skip + take]
                .iter()
                .map(|&l| l as usize)
                .sum();
            pieces.push((r, skip, take, start, len));
            got += take;
            bytes += len;
            at += take as u64;
        }
        let mut timestamps = Vec::with_capacity(got);
        let batch = if let [(r, 0, take, _, _)] = pieces[..]
            && take == r.batch.len()
        {
            timestamps.resize(take, r.timestamp_ms);
            r.batch.clone()
        } else if let [(r, skip, take, start, len)] = pieces[..] {
            timestamps.resize(take, r.timestamp_ms);
            Batch {
                lens: r.batch.lens[skip..skip + take].to_vec(),
                data: r.batch.data.slice(start..start + len),
            }
        } else {
            let mut lens = Vec::with_capacity(got);
            let mut data = Vec::with_capacity(bytes);
            for (r, skip, take, start, len) in pieces {
                lens.extend_from_slice(&r.batch.lens[skip..skip + take]);
                data.extend_from_slice(&r.batch.data[start..start + len]);
                timestamps.extend(std::iter::repeat_n(r.timestamp_ms, take));
            }
            Batch {
                lens,
                data: bytes::Bytes::from(data),
            }
        };
        Some(MessageSet {
            topic: topic.to_string(),
            first_offset: from,
            timestamps,
            batch,
        })
    }
}

impl Topic {
    pub fn new(
        name: String,
        id: u64,
        retention: Retention,
        created_ms: u64,
        retained: Retained,
        subscribers: Cursors,
        tails: TailBudget,
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
                producers: Producers::default(),
                live: Vec::new(),
                tail: Tail::new(tails, NODE_TAIL_BYTES),
            }),
            durable: AtomicU64::new(next),
            deleted: AtomicBool::new(false),
            changed: Notify::new(),
            gone: Notify::new(),
            fenced: AtomicBool::new(false),
        }
    }

    /// Raises the durable high watermark (completions may be observed out of order; a later
    /// batch being durable implies every earlier one is, as the writer completes in order).
    pub fn mark_durable(&self, upto: u64) {
        if self.durable.fetch_max(upto, Ordering::AcqRel) < upto {
            self.changed.notify_waiters();
        }
    }

    pub fn high_watermark(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    /// Marks the topic deleted and wakes everyone waiting on it.
    pub fn mark_deleted(&self) {
        self.deleted.store(true, Ordering::Release);
        self.changed.notify_waiters();
        self.gone.notify_waiters();
    }

    /// True once the topic was deleted (or fenced).
    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    /// Waits until the watermark reaches `offset` (returning it) or the topic is deleted
    /// (`None`).
    pub async fn durable_at(&self, offset: u64) -> Option<u64> {
        wait_for(&self.changed, || {
            if self.is_deleted() {
                return Some(None);
            }
            let hw = self.high_watermark();
            (hw >= offset).then_some(Some(hw))
        })
        .await
    }

    /// Completes once the topic is deleted.
    pub async fn deleted(&self) {
        wait_for(&self.gone, || self.is_deleted().then_some(())).await
    }
}

/// Waits on `notify` until `ready` has an answer. Interest is registered before each
/// check, so a notification between the check and the wait still wakes the waiter.
async fn wait_for<T>(notify: &Notify, mut ready: impl FnMut() -> Option<T>) -> T {
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(v) = ready() {
            return v;
        }
        notified.await;
    }
}

impl TopicState {
    /// Where a subscriber starts, given an explicit `from` or its committed position.
    ///
    /// The retained low watermark may be past the durable one `hw`: retention is applied when
    /// a batch is appended, before it is durable. A position is then never below `low` (those
    /// messages are going) and a reader waits there until the batch is durable.
    pub fn start_position(&self, current: Option<u64>, from: Option<StartFrom>, hw: u64) -> u64 {
        let low = self.retained.low();
        let high = hw.max(low);
        match (from, current) {
            (Some(StartFrom::Earliest), _) => low,
            (Some(StartFrom::Latest), _) => high,
            (Some(StartFrom::Offset(n)), _) => n.clamp(low, high),
            (None, Some(c)) => c.max(low),
            (None, None) => low,
        }
    }

    pub fn min_committed(&self) -> Option<u64> {
        self.subscribers.min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_position_is_found_while_retention_runs_ahead_of_durability() {
        // Two messages appended with a count limit of 1: offset 0 is already cut (low = 1)
        // while nothing is durable yet (hw = 0).
        let mut retained = Retained::starting_at(0);
        retained.push(1, 0);
        retained.push(1, 0);
        retained.drop_below(1);
        let t = Topic::new(
            "t".into(),
            1,
            Retention::default(),
            0,
            retained,
            Cursors::default(),
            TailBudget::default(),
        );
        let st = t.state.lock().unwrap();
        let (low, hw) = (1, 0);
        assert_eq!(st.start_position(None, Some(StartFrom::Offset(0)), hw), low);
        assert_eq!(st.start_position(None, Some(StartFrom::Offset(9)), hw), low);
        assert_eq!(st.start_position(None, Some(StartFrom::Latest), hw), low);
        assert_eq!(st.start_position(None, Some(StartFrom::Earliest), hw), low);
        assert_eq!(st.start_position(Some(0), None, hw), low);
        // The usual case is unchanged.
        assert_eq!(st.start_position(None, Some(StartFrom::Offset(1)), 2), 1);
        assert_eq!(st.start_position(None, Some(StartFrom::Offset(5)), 2), 2);
    }

    #[test]
    fn tail_serves_whole_and_partial_batches_and_forgets_old_ones() {
        let mut t = Tail::new(TailBudget::default(), NODE_TAIL_BYTES);
        t.push(
            10,
            1,
            Batch::from_payloads([b"a".as_slice(), b"bc", b"def"]),
        );
        t.push(13, 2, Batch::from_payloads([b"gh".as_slice()]));
        assert!(t.read("t", 9, 14, 10).is_none());
        let whole = t.read("t", 10, 13, 10).unwrap();
        assert_eq!(whole.first_offset, 10);
        assert_eq!(
            whole.batch,
            Batch::from_payloads([b"a".as_slice(), b"bc", b"def"])
        );
        let part = t.read("t", 11, 12, 10).unwrap();
        assert_eq!(part.batch, Batch::from_payloads([b"bc".as_slice()]));
        assert_eq!(part.timestamps, vec![1]);
        let both = t.read("t", 11, 14, 10).unwrap();
        assert_eq!(
            both.batch,
            Batch::from_payloads([b"bc".as_slice(), b"def", b"gh"])
        );
        assert_eq!(both.timestamps, vec![1, 1, 2]);
        let next = t.read("t", 13, 14, 10).unwrap();
        assert_eq!(next.batch, Batch::from_payloads([b"gh".as_slice()]));
        assert!(t.read("t", 14, 14, 10).is_none());
        // A gap starts the tail afresh.
        t.push(20, 3, Batch::from_payloads([b"x".as_slice()]));
        assert!(t.read("t", 10, 21, 10).is_none());
        assert_eq!(t.read("t", 20, 21, 10).unwrap().len(), 1);
        // Empty messages are not free: enough of them evict older batches too.
        let empties = Batch::from_payloads(vec![b"".as_slice(); TAIL_BYTES / 32 + 1]);
        t.push(21, 4, empties.clone());
        t.push(21 + empties.len() as u64, 4, empties.clone());
        assert!(
            t.read("t", 20, 21, 10).is_none(),
            "the empty batches pushed it out"
        );
        // The byte budget keeps at least the newest batch.
        let big = vec![0u8; TAIL_BYTES];
        let at = 21 + 2 * empties.len() as u64;
        t.push(at, 4, Batch::from_payloads([big.as_slice()]));
        t.push(at + 1, 5, Batch::from_payloads([big.as_slice()]));
        assert!(t.read("t", at, at + 2, 10).is_none());
        assert_eq!(t.read("t", at + 1, at + 2, 10).unwrap().len(), 1);
    }

    #[test]
    fn tails_of_all_topics_stay_within_the_node_budget() {
        let budget = TailBudget::default();
        // Each one-message batch costs its payload plus the per-message overhead.
        let o = crate::retention::MESSAGE_OVERHEAD as usize;
        let limit = 2 * o + 10;
        let mut a = Tail::new(budget.clone(), limit);
        let mut b = Tail::new(budget.clone(), limit);
        a.push(0, 1, Batch::from_payloads([[0u8; 6].as_slice()]));
        assert_eq!(budget.used(), 6 + o);
        // b can't fit beside a, and a holds nothing b could give up: b keeps nothing.
        b.push(0, 1, Batch::from_payloads([[0u8; 6].as_slice()]));
        assert_eq!(budget.used(), 6 + o);
        assert!(b.read("b", 0, 1, 10).is_none());
        // a gives up its own older batch to make room for its newer one.
        a.push(1, 2, Batch::from_payloads([[0u8; 6].as_slice()]));
        assert_eq!(budget.used(), 6 + o);
        assert!(a.read("a", 0, 2, 10).is_none());
        assert_eq!(a.read("a", 1, 2, 10).unwrap().len(), 1);
        drop(a);
        assert_eq!(budget.used(), 0);
        b.push(1, 2, Batch::from_payloads([[0u8; 4].as_slice()]));
        assert_eq!(budget.used(), 4 + o);
        b.clear();
        assert_eq!(budget.used(), 0);
    }
}
