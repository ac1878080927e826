use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Buf, BytesMut};
use serde::Serialize;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

/// Bytes of frames a node's connection may have queued and not yet written before senders
/// wait. Frames alone are no bound (a delivery may carry megabytes), so this budget is what
/// turns a subscriber that stops reading into backpressure instead of memory growth.
pub const OUTBOX_BYTES: usize = 8 << 20;

/// A frame in an outbox together with its share of the connection's byte budget, given back
/// when the frame has been written to the socket.
#[derive(Debug)]
pub struct Queued<T> {
    frame: T,
    permit: Option<OwnedSemaphorePermit>,
}

impl<T> From<T> for Queued<T> {
    /// A frame outside any byte budget (handshakes, clients' own requests).
    fn from(frame: T) -> Self {
        Queued {
            frame,
            permit: None,
        }
    }
}

/// A connection's byte budget: [`Budget::queue`] waits until the frame's bytes fit.
#[derive(Debug, Clone)]
pub(crate) struct Budget(Arc<Semaphore>);

impl Budget {
    pub(crate) fn new() -> Self {
        Budget(Arc::new(Semaphore::new(OUTBOX_BYTES)))
    }

    /// Reserves `bytes` if they fit now.
    pub(crate) fn try_queue<T>(&self, frame: T, bytes: usize) -> Option<Queued<T>> {
        let n = bytes.clamp(1, OUTBOX_BYTES) as u32;
        let permit = self.0.clone().try_acquire_many_owned(n).ok()?;
        Some(Queued {
            frame,
            permit: Some(permit),
        })
    }

    /// Reserves `bytes` (at most the whole budget, so one huge frame still goes out alone).
    pub(crate) async fn queue<T>(&self, frame: T, bytes: usize) -> Option<Queued<T>> {
        let n = bytes.clamp(1, OUTBOX_BYTES) as u32;
        let permit = self.0.clone().acquire_many_owned(n).await.ok()?;
        Some(Queued {
            frame,
            permit: Some(permit),
        })
    }
}

/// The connection is gone: its socket failed, or a frame could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxClosed;

/// The sending side of a socket, shared by every task that answers on the connection.
///
/// A sender encodes its frame into the connection's buffer and, when no earlier bytes are
/// still waiting, writes it to the socket right away from its own task. Only what the
/// socket does not take at once is left to a flusher task. So a request and its answer
/// cross no task boundary on the way out, which is most of a round trip's latency on a
/// busy machine, while a burst that fills the socket still leaves in large writes.
///
/// Senders wait while [`OUTBOX_BYTES`] are buffered. When the last handle is dropped the
/// flusher writes what is left and the socket's write side is shut down.
#[derive(Debug)]
pub struct Outbox<T> {
    inner: Arc<Inner>,
    _frames: std::marker::PhantomData<fn(T)>,
}

#[derive(Debug)]
struct Inner {
    sock: OwnedWriteHalf,
    state: Mutex<State>,
    /// Wakes the flusher: bytes were left over, or the last sender left.
    work: Notify,
    /// Wakes senders waiting for buffer space or for the end.
    space: Notify,
    senders: AtomicUsize,
}

#[derive(Debug, Default)]
struct State {
    /// Encoded bytes the socket has not taken yet.
    buf: BytesMut,
    /// Bytes ever appended to / written from `buf`, to know which frames are out.
    appended: u64,
    written: u64,
    /// Budget permits of frames not wholly written, with the position their frame ends at.
    held: VecDeque<(u64, OwnedSemaphorePermit)>,
    /// The flusher owns the socket until `buf` is empty; senders only append meanwhile.
    flushing: bool,
    failed: bool,
}

impl<T> Clone for Outbox<T> {
    fn clone(&self) -> Self {
        self.inner.senders.fetch_add(1, Ordering::Relaxed);
        Outbox {
            inner: self.inner.clone(),
            _frames: std::marker::PhantomData,
        }
    }
}

impl<T> Drop for Outbox<T> {
    fn drop(&mut self) {
        if self.inner.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.work.notify_one();
        }
    }
}

impl<T: Serialize> Outbox<T> {
    /// An outbox writing to `w`, and its flusher task, which ends once every handle is
    /// dropped and everything was written, or the socket fails.
    pub fn new(w: OwnedWriteHalf) -> (Outbox<T>, JoinHandle<()>) {
        let inner = Arc::new(Inner {
            sock: w,
            state: Mutex::new(State::default()),
            work: Notify::new(),
            space: Notify::new(),
            senders: AtomicUsize::new(1),
        });
        let flusher = tokio::spawn(flush(inner.clone()));
        (
            Outbox {
                inner,
                _frames: std::marker::PhantomData,
            },
            flusher,
        )
    }

    /// Encodes `queued` and writes it, or leaves it to the flusher when the socket is busy;
    /// waits while the buffer is full.
    pub async fn send(&self, queued: Queued<T>) -> Result<(), OutboxClosed> {
        let Queued { frame, mut permit } = queued;
        loop {
            let room = self.inner.space.notified();
            tokio::pin!(room);
            {
                let mut st = self.inner.lock();
                if st.failed {
                    return Err(OutboxClosed);
                }
                if st.buf.len() < OUTBOX_BYTES {
                    return self.append(&mut st, &frame, permit.take());
                }
                room.as_mut().enable();
            }
            room.await;
        }
    }

    /// Like [`Outbox::send`] but never waits, even when the buffer is full: for small
    /// control frames sent from code that cannot wait.
    pub fn send_now(&self, queued: Queued<T>) -> Result<(), OutboxClosed> {
        let mut st = self.inner.lock();
        if st.failed {
            return Err(OutboxClosed);
        }
        self.append(&mut st, &queued.frame, queued.permit)
    }

    /// Sends `frame` only if the buffer has room, without waiting; `false` when it is full
    /// or the connection is gone. For callers that must not wait and can fall back.
    pub fn try_send(&self, queued: Queued<T>) -> bool {
        let mut st = self.inner.lock();
        if st.failed || st.buf.len() >= OUTBOX_BYTES {
            return false;
        }
        self.append(&mut st, &queued.frame, queued.permit).is_ok()
    }

    fn append(
        &self,
        st: &mut State,
        frame: &T,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Result<(), OutboxClosed> {
        let before = st.buf.len();
        if let Err(e) = peerbus_proto::encode_frame(frame, &mut st.buf) {
            tracing::error!("cannot encode an outgoing frame: {e}");
            st.buf.truncate(before);
            self.inner.fail(st);
            return Err(OutboxClosed);
        }
        st.appended += (st.buf.len() - before) as u64;
        if let Some(p) = permit {
            let end = st.appended;
            st.held.push_back((end, p));
        }
        if !st.flushing {
            self.inner.write_now(st);
            if !st.buf.is_empty() && !st.failed {
                st.flushing = true;
                self.inner.work.notify_one();
            }
        }
        if st.failed { Err(OutboxClosed) } else { Ok(()) }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A sender panicking mid-append leaves at worst a torn frame, which the peer will
        // refuse; the buffer itself stays usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, st: &mut State) {
        st.failed = true;
        st.buf.clear();
        st.held.clear();
        self.space.notify_waiters();
        self.work.notify_one();
    }

    /// Writes as much of the buffer as the socket takes without waiting.
    fn write_now(&self, st: &mut State) {
        while !st.buf.is_empty() {
            match self.sock.try_write(&st.buf) {
                Ok(0) => {
                    tracing::debug!("connection write failed: the socket took nothing");
                    self.fail(st);
                }
                Ok(n) => {
                    st.buf.advance(n);
                    st.written += n as u64;
                    while st.held.front().is_some_and(|&(end, _)| end <= st.written) {
                        st.held.pop_front();
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!("connection write failed: {e}");
                    self.fail(st);
                }
            }
        }
        if st.buf.is_empty() && st.buf.capacity() > OUTBOX_BYTES {
            // One huge frame should not pin its buffer for the connection's life.
            st.buf = BytesMut::new();
        }
    }
}

/// Writes what senders left over whenever the socket can take it. While the buffer is not
/// empty `flushing` is set, so senders only append and the flusher alone writes.
async fn flush(inner: Arc<Inner>) {
    loop {
        let work = inner.work.notified();
        tokio::pin!(work);
        let idle = {
            let mut st = inner.lock();
            if st.failed {
                return;
            }
            if st.buf.is_empty() {
                st.flushing = false;
                if inner.senders.load(Ordering::Acquire) == 0 {
                    return;
                }
                // Registered before the lock is released, so no sender's wakeup is lost.
                work.as_mut().enable();
                true
            } else {
                false
            }
        };
        if idle {
            work.await;
            continue;
        }
        if let Err(e) = inner.sock.writable().await {
            tracing::debug!("connection write failed: {e}");
            inner.fail(&mut inner.lock());
            return;
        }
        inner.write_now(&mut inner.lock());
        inner.space.notify_waiters();
    }
}
