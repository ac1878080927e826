//! The single writer thread of a node, doing group commit.
//!
//! An fsync costs about as much for one message as for a thousand, so instead of one fsync
//! per publish the thread takes every job already queued, applies their ops as one atomic
//! write, and persists once for all of them.

use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use crate::{Backend, Op, Result, StoreError, validate};

/// Payload bytes above which a group takes no more jobs, so one group's apply (and the
/// latency of every job in it) stays bounded under a flood of publishes.
const GROUP_BYTES: usize = 64 << 20;

struct Job {
    ops: Vec<Op>,
    sync: bool,
    /// `None` for detached jobs: their outcome is only logged.
    reply: Option<oneshot::Sender<Result<()>>>,
}

/// A Clone-able handle to the writer thread of a node.
///
/// Dropping the last handle shuts the thread down like [`Writer::shutdown`].
#[derive(Clone)]
pub struct Writer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let open = self.inner.sender().is_some();
        f.debug_struct("Writer").field("open", &open).finish()
    }
}

struct Inner {
    /// Taken by shutdown: dropping the only sender is what tells the thread to finish, after
    /// it has drained everything queued before.
    tx: RwLock<Option<Sender<Job>>>,
    /// Held for the whole of a shutdown, so a concurrent second call returns only once the
    /// thread is really gone.
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Inner {
    fn sender(&self) -> Option<Sender<Job>> {
        self.tx.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn send(&self, job: Job) -> std::result::Result<(), Job> {
        let tx = self.tx.read().unwrap_or_else(|p| p.into_inner());
        match tx.as_ref() {
            Some(tx) => tx.send(job).map_err(|mpsc::SendError(job)| job),
            None => Err(job),
        }
    }

    fn shutdown(&self) {
        let mut thread = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        self.tx.write().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = thread.take()
            && handle.join().is_err()
        {
            tracing::error!("the storage writer thread panicked");
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Writer {
    /// Starts the thread "peerbus-writer" writing to `backend`.
    ///
    /// # Panics
    ///
    /// If the operating system refuses to start a thread, as `std::thread::spawn` does.
    pub fn start(backend: Arc<dyn Backend>) -> Writer {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("peerbus-writer".into())
            .spawn(move || run(&*backend, &rx))
            .expect("cannot start the storage writer thread");
        Writer {
            inner: Arc::new(Inner {
                tx: RwLock::new(Some(tx)),
                thread: Mutex::new(Some(thread)),
            }),
        }
    }

    /// Queues a job. The receiver completes after the job's ops are applied and, when `sync`
    /// is true, after an fsync that covers them; when `sync` is false, after they are applied
    /// and flushed to the operating system. Jobs complete in submission order.
    ///
    /// A receiver that fails with `RecvError` means the writer thread died (it panicked).
    pub fn submit(&self, ops: Vec<Op>, sync: bool) -> oneshot::Receiver<Result<()>> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            ops,
            sync,
            reply: Some(reply),
        };
        if let Err(job) = self.inner.send(job)
            && let Some(reply) = job.reply
        {
            let _ = reply.send(Err(StoreError::Closed));
        }
        rx
    }

    /// Like [`Writer::submit`] but nobody waits (e.g. committed-offset updates); failures
    /// are logged.
    pub fn submit_detached(&self, ops: Vec<Op>) {
        let job = Job {
            ops,
            sync: false,
            reply: None,
        };
        if self.inner.send(job).is_err() {
            tracing::error!("storage write dropped: {}", StoreError::Closed);
        }
    }

    /// Drains every queued job, persists with fsync, stops and joins the thread. Idempotent;
    /// later submits complete with [`StoreError::Closed`].
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }
}

/// The thread: one group per loop, until every sender is gone and the queue is empty.
fn run(backend: &dyn Backend, rx: &Receiver<Job>) {
    // Once a group fails, nothing later may be applied: jobs behind it were given positions
    // (offsets) that assume it is stored, so writing them would leave a hole in the log.
    let mut failed: Option<StoreError> = None;
    // Deleted topics left from before a restart may still have records to remove.
    let mut reclaiming = true;
    loop {
        // Blocking for the first job of a group, unless deleted topics' space is left to
        // free: then a step of that runs whenever no job waits. `recv` fails only once the
        // queue is empty and shutdown dropped the sender.
        let first = if reclaiming && failed.is_none() {
            match rx.try_recv() {
                Ok(job) => job,
                Err(TryRecvError::Empty) => {
                    reclaiming = backend.reclaim().unwrap_or_else(|e| {
                        tracing::error!("freeing the space of deleted topics failed: {e}");
                        false
                    });
                    continue;
                }
                Err(TryRecvError::Disconnected) => break,
            }
        } else {
            match rx.recv() {
                Ok(job) => job,
                Err(_) => break,
            }
        };
        if let Some(e) = &failed {
            answer(first.reply, Err(e.clone()));
            continue;
        }
        let mut group = vec![first];
        let mut bytes = job_bytes(&group[0]);
        while bytes < GROUP_BYTES {
            match rx.try_recv() {
                Ok(job) => {
                    bytes += job_bytes(&job);
                    group.push(job);
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        reclaiming |= group
            .iter()
            .any(|j| j.ops.iter().any(|op| matches!(op, Op::DeleteTopic { .. })));
        if let Err(e) = commit(backend, group) {
            tracing::error!("{e}: refusing every later write");
            failed = Some(StoreError::Failed(e.to_string()));
        }
    }
    if failed.is_some() {
        return;
    }
    if let Err(e) = backend.persist(true) {
        tracing::error!("final storage sync at shutdown failed: {e}");
    }
}

fn job_bytes(job: &Job) -> usize {
    job.ops.iter().map(Op::payload_bytes).sum()
}

/// Sends a job its outcome, or logs it for a detached job.
fn answer(reply: Option<oneshot::Sender<Result<()>>>, result: Result<()>) {
    match reply {
        // The waiter may have given up; its job is done either way.
        Some(reply) => {
            let _ = reply.send(result);
        }
        None => {
            if let Err(e) = result {
                tracing::error!("detached storage write failed: {e}");
            }
        }
    }
}

/// Applies one group with one write and one persist, then answers its jobs in queue order.
/// Returns the failure of the write itself (not of jobs refused on their own merits).
fn commit(backend: &dyn Backend, group: Vec<Job>) -> Result<()> {
    // A job refused on its own merits fails alone instead of failing everyone grouped with
    // it; it is still answered in its place in the queue.
    let mut verdicts: Vec<Option<StoreError>> = Vec::with_capacity(group.len());
    let mut ops = Vec::new();
    let mut sync = false;
    let mut replies = Vec::with_capacity(group.len());
    for job in group {
        match validate(&job.ops) {
            Ok(()) => {
                verdicts.push(None);
                sync |= job.sync;
                ops.extend(job.ops);
            }
            Err(e) => verdicts.push(Some(e)),
        }
        replies.push(job.reply);
    }
    let outcome = if ops.is_empty() {
        backend.persist(sync)
    } else {
        backend.apply(&ops).and_then(|()| backend.persist(sync))
    };
    for (reply, verdict) in replies.into_iter().zip(verdicts) {
        let result = match verdict {
            Some(e) => Err(e),
            None => outcome.clone(),
        };
        answer(reply, result);
    }
    outcome
}
