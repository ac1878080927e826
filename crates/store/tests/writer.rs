//! Group commit: grouping, ordering, failure reporting and shutdown of the writer thread.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use peerbus_proto::{Batch, Message};
use peerbus_store::{Backend, MemoryBackend, Op, Result, StoreError, Table, TopicMeta, Writer};

/// A memory backend that records every apply and persist, can fail applies containing a
/// `Put` of key `fail`, and can hold its first apply until the test has queued more jobs,
/// so the jobs queued meanwhile are known to form the next group.
struct Probe {
    inner: MemoryBackend,
    /// Number of ops of each apply, in order.
    applies: Mutex<Vec<usize>>,
    /// The `sync` flag of each persist, in order.
    persists: Mutex<Vec<bool>>,
    gate: Mutex<Option<(Sender<()>, Receiver<()>)>>,
}

impl Probe {
    fn new() -> Arc<Probe> {
        Arc::new(Probe {
            inner: MemoryBackend::new(),
            applies: Mutex::default(),
            persists: Mutex::default(),
            gate: Mutex::default(),
        })
    }

    /// Makes the next apply signal `entered` and wait for `release`.
    fn hold(&self) -> (Receiver<()>, Sender<()>) {
        let (entered_tx, entered_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel();
        *self.gate.lock().unwrap() = Some((entered_tx, release_rx));
        (entered_rx, release_tx)
    }

    fn applies(&self) -> Vec<usize> {
        self.applies.lock().unwrap().clone()
    }

    fn persists(&self) -> Vec<bool> {
        self.persists.lock().unwrap().clone()
    }
}

impl Backend for Probe {
    fn apply(&self, ops: &[Op]) -> Result<()> {
        if let Some((entered, release)) = self.gate.lock().unwrap().take() {
            entered.send(()).unwrap();
            release.recv().unwrap();
        }
        self.applies.lock().unwrap().push(ops.len());
        let fail = ops
            .iter()
            .any(|op| matches!(op, Op::Put { key, .. } if key == b"fail"));
        if fail {
            return Err(StoreError::Backend("the disk is on fire".into()));
        }
        self.inner.apply(ops)
    }

    fn persist(&self, sync: bool) -> Result<()> {
        self.persists.lock().unwrap().push(sync);
        self.inner.persist(sync)
    }

    fn topics(&self) -> Result<Vec<(String, TopicMeta)>> {
        self.inner.topics()
    }

    fn read(
        &self,
        topic_id: u64,
        from: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<Message>> {
        self.inner.read(topic_id, from, max_count, max_bytes)
    }

    fn last_offset(&self, topic_id: u64) -> Result<Option<u64>> {
        self.inner.last_offset(topic_id)
    }

    fn sizes(&self, topic_id: u64) -> Result<Vec<(u64, u64, u32)>> {
        self.inner.sizes(topic_id)
    }

    fn offsets(&self, topic_id: u64) -> Result<Vec<(String, u64)>> {
        self.inner.offsets(topic_id)
    }

    fn scan(&self, table: Table) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.inner.scan(table)
    }

    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.inner.get(table, key)
    }
}

fn append(topic_id: u64, offset: u64, payload: &[u8]) -> Op {
    Op::Append {
        topic_id,
        first_offset: offset,
        timestamps: vec![offset],
        batch: Batch::from_payloads([payload]),
    }
}

fn put(key: &[u8]) -> Op {
    Op::Put {
        table: Table::Meta,
        key: key.to_vec(),
        value: b"v".to_vec(),
    }
}

#[test]
fn queued_jobs_form_one_group_and_complete_in_order() {
    let probe = Probe::new();
    let writer = Writer::start(probe.clone());
    let (entered, release) = probe.hold();
    let first = writer.submit(vec![append(1, 0, b"first")], false);
    entered.recv().unwrap();
    // The thread is inside the first group's apply: everything queued now waits for it.
    let mut rxs = Vec::new();
    for i in 1..=20u64 {
        rxs.push(writer.submit(vec![append(1, i, &[i as u8]), put(b"k")], i == 7));
    }
    writer.submit_detached(vec![append(2, 0, b"detached")]);
    release.send(()).unwrap();
    first.blocking_recv().unwrap().unwrap();
    // Answers go out in queue order: once the last has completed, every earlier one has too.
    let last = rxs.pop().unwrap();
    last.blocking_recv().unwrap().unwrap();
    for mut rx in rxs {
        rx.try_recv().unwrap().unwrap();
    }
    writer.shutdown();
    assert_eq!(probe.applies(), [1, 41]);
    // One OS flush for the first group, one fsync for the second (job 7 wanted it), and the
    // shutdown fsync.
    assert_eq!(probe.persists(), [false, true, true]);
    let offsets: Vec<u64> = probe
        .read(1, 0, 100, usize::MAX)
        .unwrap()
        .iter()
        .map(|m| m.offset)
        .collect();
    assert_eq!(offsets, (0..=20).collect::<Vec<_>>());
    assert_eq!(probe.last_offset(2).unwrap(), Some(0));
}

#[test]
fn a_failed_group_fails_every_job_in_it_and_every_later_one() {
    let probe = Probe::new();
    let writer = Writer::start(probe.clone());

    let (entered, release) = probe.hold();
    let opener = writer.submit(vec![put(b"open")], false);
    entered.recv().unwrap();
    let good = writer.submit(vec![append(1, 0, b"a")], true);
    let doomed = writer.submit(vec![put(b"fail")], false);
    release.send(()).unwrap();
    opener.blocking_recv().unwrap().unwrap();
    for rx in [good, doomed] {
        let err = rx.blocking_recv().unwrap().unwrap_err();
        assert!(err.to_string().contains("on fire"), "{err}");
    }
    assert_eq!(probe.last_offset(1).unwrap(), None);

    // Later jobs were positioned after the failed ones: applying them would leave a hole.
    let applies = probe.applies().len();
    let later = writer.submit(vec![append(1, 1, b"b")], true);
    match later.blocking_recv().unwrap() {
        Err(StoreError::Failed(why)) => assert!(why.contains("on fire"), "{why}"),
        other => panic!("a write after a failed one must be refused, got {other:?}"),
    }
    assert_eq!(
        probe.applies().len(),
        applies,
        "nothing applied after the failure"
    );
    assert_eq!(probe.last_offset(1).unwrap(), None);
    writer.shutdown();
}

#[test]
fn a_refused_job_fails_alone() {
    let probe = Probe::new();
    let writer = Writer::start(probe.clone());
    let (entered, release) = probe.hold();
    let opener = writer.submit(vec![put(b"open")], false);
    entered.recv().unwrap();
    let before = writer.submit(vec![append(1, 0, b"a")], false);
    let refused = writer.submit(
        vec![Op::Append {
            topic_id: 1,
            first_offset: 1,
            timestamps: vec![],
            batch: Batch::from_payloads([b"no timestamp"]),
        }],
        false,
    );
    let after = writer.submit(vec![append(1, 1, b"b")], false);
    release.send(()).unwrap();
    opener.blocking_recv().unwrap().unwrap();
    before.blocking_recv().unwrap().unwrap();
    assert!(matches!(
        refused.blocking_recv().unwrap(),
        Err(StoreError::Backend(_))
    ));
    after.blocking_recv().unwrap().unwrap();
    assert_eq!(probe.last_offset(1).unwrap(), Some(1));
    writer.shutdown();
}

#[test]
fn many_threads_all_complete_in_submission_order() {
    const THREADS: u64 = 4;
    const JOBS: u64 = 200;
    let probe = Probe::new();
    let writer = Writer::start(probe.clone());
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let writer = writer.clone();
            let probe = &probe;
            s.spawn(move || {
                let mut rxs = Vec::new();
                for i in 0..JOBS {
                    let sub = Op::SetOffset {
                        topic_id: t,
                        subscriber: "last".into(),
                        offset: i,
                    };
                    rxs.push(writer.submit(vec![append(t, i, &i.to_be_bytes()), sub], i % 10 == 0));
                }
                for (i, rx) in rxs.into_iter().enumerate() {
                    rx.blocking_recv().unwrap().unwrap();
                    // A completed job is visible to readers.
                    assert_eq!(
                        probe.last_offset(t).unwrap().map(|o| o >= i as u64),
                        Some(true)
                    );
                }
            });
        }
    });
    for t in 0..THREADS {
        let messages = probe.read(t, 0, usize::MAX, usize::MAX).unwrap();
        assert_eq!(messages.len() as u64, JOBS);
        for (i, m) in messages.iter().enumerate() {
            assert_eq!(m.offset, i as u64);
            assert_eq!(&m.payload[..], &(i as u64).to_be_bytes());
        }
        // Each thread's jobs were applied in its order, so its last offset update won.
        assert_eq!(probe.offsets(t).unwrap(), [("last".to_string(), JOBS - 1)]);
    }
    // Grouping means far fewer applies than jobs are allowed, never more.
    assert!(probe.applies().len() as u64 <= THREADS * JOBS);
    writer.shutdown();
}

#[test]
fn submits_after_shutdown_are_closed() {
    let probe = Probe::new();
    let writer = Writer::start(probe.clone());
    let other = writer.clone();
    let queued = writer.submit(vec![append(1, 0, b"x")], false);
    writer.shutdown();
    writer.shutdown();
    // Shutdown drained the queue first.
    queued.blocking_recv().unwrap().unwrap();
    assert_eq!(probe.last_offset(1).unwrap(), Some(0));
    assert_eq!(probe.persists().last(), Some(&true));
    for w in [&writer, &other] {
        let rx = w.submit(vec![append(1, 1, b"y")], true);
        assert!(matches!(
            rx.blocking_recv().unwrap(),
            Err(StoreError::Closed)
        ));
    }
    other.submit_detached(vec![append(1, 1, b"y")]);
    other.shutdown();
    assert_eq!(probe.last_offset(1).unwrap(), Some(0));
}

#[test]
fn dropping_the_last_handle_drains_and_persists() {
    let probe = Probe::new();
    let writer = Writer::start(probe.clone());
    let rxs: Vec<_> = (0..50)
        .map(|i| writer.submit(vec![append(3, i, b"p")], false))
        .collect();
    let clone = writer.clone();
    drop(writer);
    clone.submit_detached(vec![append(3, 50, b"p")]);
    drop(clone);
    for rx in rxs {
        rx.blocking_recv().unwrap().unwrap();
    }
    assert_eq!(probe.last_offset(3).unwrap(), Some(50));
    assert_eq!(probe.persists().last(), Some(&true));
}
