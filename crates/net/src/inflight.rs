//! What one connection may have in flight at once, so that no client can grow a node's
//! memory by pipelining requests and not reading the answers (Kafka's
//! `queued.max.requests`, NATS's `max_pending`).
//!
//! The read loop takes a request slot and the request's cost in bytes before handing the
//! request on, and waits for them when the connection has too much outstanding: it then
//! stops reading, and TCP pushes back on the client. They are given back once the answer
//! is queued (or the connection ends). Work that outlives its answer (a following
//! subscription's reads, a long poll's read after it woke) takes a read slot instead, for
//! as long as it holds a read that waits for room in the outbox.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Requests one connection may have unanswered.
pub const MAX_IN_FLIGHT: usize = 1024;

/// Bytes of unanswered requests one connection may hold, by their cost
/// ([`crate::Service::cost`]): the frame itself, or what answering it holds in memory.
pub const MAX_IN_FLIGHT_BYTES: usize = 64 << 20;

/// Reads that may wait for outbox room at once on one connection (each at most one read
/// of a topic, 4 MiB).
pub const MAX_PENDING_READS: usize = 4;

/// One request's hold on its connection's limits.
#[derive(Debug)]
struct Held {
    _slot: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

/// A connection's limits and what holds them.
#[derive(Debug)]
pub(crate) struct InFlight {
    slots: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    reads: Arc<Semaphore>,
    held: Mutex<HashMap<u32, Held>>,
}

impl InFlight {
    pub(crate) fn new() -> Self {
        InFlight {
            slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            bytes: Arc::new(Semaphore::new(MAX_IN_FLIGHT_BYTES)),
            reads: Arc::new(Semaphore::new(MAX_PENDING_READS)),
            held: Mutex::new(HashMap::new()),
        }
    }

    /// Waits until request `id` of `cost` bytes fits (a cost over the whole budget waits for
    /// the whole budget, so one large request still goes alone), then holds it until
    /// [`InFlight::answered`].
    pub(crate) async fn admit(&self, id: u32, cost: usize) {
        let n = cost.clamp(1, MAX_IN_FLIGHT_BYTES) as u32;
        let (Ok(slot), Ok(bytes)) = (
            self.slots.clone().acquire_owned().await,
            self.bytes.clone().acquire_many_owned(n).await,
        ) else {
            unreachable!("the semaphores are never closed")
        };
        // A client reusing the id of a request still in flight frees the older hold early;
        // it still had to wait for its own.
        self.held.lock().expect("in-flight lock").insert(
            id,
            Held {
                _slot: slot,
                _bytes: bytes,
            },
        );
    }

    /// Request `id` was answered: its hold is given back.
    pub(crate) fn answered(&self, id: u32) {
        self.held.lock().expect("in-flight lock").remove(&id);
    }

    /// Waits for a read slot.
    pub(crate) async fn read_slot(&self) -> OwnedSemaphorePermit {
        self.reads
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls once with a fresh cooperative budget (tokio makes a future that used up its
    /// task's budget return pending even when it could go on).
    async fn ready<F: std::future::Future + Unpin>(f: &mut F) -> bool {
        tokio::task::yield_now().await;
        futures::poll!(f).is_ready()
    }

    #[tokio::test]
    async fn a_connection_waits_once_its_requests_hold_the_budget() {
        let f = InFlight::new();
        f.admit(1, MAX_IN_FLIGHT_BYTES / 2).await;
        f.admit(2, MAX_IN_FLIGHT_BYTES / 2).await;
        let third = f.admit(3, 1);
        let mut third = Box::pin(third);
        assert!(!ready(&mut third).await);
        f.answered(1);
        assert!(ready(&mut third).await);
        // Over the whole budget: it waits for everything, then goes alone.
        f.answered(2);
        f.answered(3);
        f.admit(4, usize::MAX).await;
        let fifth = f.admit(5, 1);
        let mut fifth = Box::pin(fifth);
        assert!(!ready(&mut fifth).await);
        f.answered(4);
        assert!(ready(&mut fifth).await);
    }

    #[tokio::test]
    async fn the_request_count_is_bounded_too() {
        let f = InFlight::new();
        for id in 0..MAX_IN_FLIGHT as u32 {
            f.admit(id, 1).await;
        }
        let over = f.admit(u32::MAX, 1);
        let mut over = Box::pin(over);
        assert!(!ready(&mut over).await);
        f.answered(7);
        assert!(ready(&mut over).await);
    }
}
