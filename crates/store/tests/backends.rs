//! The same behaviour checks run against both backends, plus fjall-only checks (reopen,
//! corruption) and a property test that the two backends agree.

use std::path::Path;
use std::sync::Arc;

use peerbus_proto::{Batch, Retention};
use peerbus_store::{
    Backend, FjallBackend, MemoryBackend, Op, StoreError, Table, TopicMeta, Writer,
};
use proptest::prelude::*;

fn append(topic_id: u64, first_offset: u64, payloads: &[&[u8]]) -> Op {
    Op::Append {
        topic_id,
        first_offset,
        timestamps: (0..payloads.len() as u64)
            .map(|i| 1_000 + first_offset + i)
            .collect(),
        batch: Batch::from_payloads(payloads),
    }
}

fn meta(id: u64) -> TopicMeta {
    TopicMeta {
        id,
        retention: Retention {
            max_messages: Some(10),
            max_bytes: None,
            max_age_secs: Some(60),
            consumed: true,
        },
        low: 3,
        created_ms: 42,
    }
}

fn set_offset(topic_id: u64, subscriber: &str, offset: u64) -> Op {
    Op::SetOffset {
        topic_id,
        subscriber: subscriber.into(),
        offset,
    }
}

fn offsets_of(b: &dyn Backend, topic_id: u64) -> Vec<(String, u64)> {
    b.offsets(topic_id).unwrap()
}

fn read_offsets(b: &dyn Backend, topic_id: u64, from: u64, count: usize, bytes: usize) -> Vec<u64> {
    b.read(topic_id, from, count, bytes)
        .unwrap()
        .iter()
        .map(|m| m.offset)
        .collect()
}

/// Ten 10-byte messages at offsets 0..10 in topic 1, one message in topic 2.
fn ten_messages(b: &dyn Backend) {
    let payloads: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 10]).collect();
    let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
    b.apply(&[append(1, 0, &refs[..4]), append(1, 4, &refs[4..])])
        .unwrap();
    b.apply(&[append(2, 0, &[b"other"])]).unwrap();
}

fn append_and_read(b: &dyn Backend) {
    ten_messages(b);
    let all = b.read(1, 0, usize::MAX, usize::MAX).unwrap();
    assert_eq!(all.len(), 10);
    for (i, m) in all.iter().enumerate() {
        assert_eq!(m.offset, i as u64);
        assert_eq!(m.timestamp_ms, 1_000 + i as u64);
        assert_eq!(&m.payload[..], &[i as u8; 10]);
    }
    assert_eq!(read_offsets(b, 1, 0, 3, usize::MAX), [0, 1, 2]);
    assert_eq!(read_offsets(b, 1, 5, 100, usize::MAX), [5, 6, 7, 8, 9]);
    assert_eq!(read_offsets(b, 1, 2, 100, 25), [2, 3]);
    assert_eq!(read_offsets(b, 1, 2, 100, 30), [2, 3, 4]);
    // The first message is returned even when it alone exceeds the byte budget.
    assert_eq!(read_offsets(b, 1, 7, 100, 0), [7]);
    assert_eq!(read_offsets(b, 1, 7, 0, 100), Vec::<u64>::new());
    assert_eq!(read_offsets(b, 1, 10, 100, 100), Vec::<u64>::new());
    let other = b.read(2, 0, 10, 10).unwrap();
    assert_eq!(other.len(), 1);
    assert_eq!(&other[0].payload[..], b"other");
    assert!(b.read(3, 0, 10, 10).unwrap().is_empty());
    let sizes = b.sizes(1).unwrap();
    assert_eq!(sizes.len(), 10);
    assert_eq!(sizes[3], (3, 1_003, 10));
    assert_eq!(b.sizes(2).unwrap(), [(0, 1_000, 5)]);
}

fn last_offset(b: &dyn Backend) {
    assert_eq!(b.last_offset(1).unwrap(), None);
    ten_messages(b);
    assert_eq!(b.last_offset(1).unwrap(), Some(9));
    assert_eq!(b.last_offset(2).unwrap(), Some(0));
    assert_eq!(b.last_offset(0).unwrap(), None);
    b.apply(&[Op::Truncate {
        topic_id: 1,
        below: 10,
    }])
    .unwrap();
    assert_eq!(b.last_offset(1).unwrap(), None);
}

fn truncate(b: &dyn Backend) {
    ten_messages(b);
    b.apply(&[Op::Truncate {
        topic_id: 1,
        below: 4,
    }])
    .unwrap();
    assert_eq!(read_offsets(b, 1, 0, 3, usize::MAX), [4, 5, 6]);
    assert_eq!(b.sizes(1).unwrap().first().map(|s| s.0), Some(4));
    b.apply(&[Op::Truncate {
        topic_id: 1,
        below: 0,
    }])
    .unwrap();
    assert_eq!(b.sizes(1).unwrap().len(), 6);
    // Truncating one topic leaves the others alone.
    b.apply(&[Op::Truncate {
        topic_id: 1,
        below: u64::MAX,
    }])
    .unwrap();
    assert!(b.sizes(1).unwrap().is_empty());
    assert_eq!(b.sizes(2).unwrap().len(), 1);
}

fn ops_see_earlier_ops_of_the_same_apply(b: &dyn Backend) {
    b.apply(&[
        append(5, 0, &[b"a", b"b", b"c"]),
        Op::Truncate {
            topic_id: 5,
            below: 2,
        },
        append(5, 3, &[b"d"]),
    ])
    .unwrap();
    assert_eq!(read_offsets(b, 5, 0, 10, 100), [2, 3]);
    b.apply(&[
        Op::PutTopic {
            name: "t6".into(),
            meta: meta(6),
        },
        append(6, 0, &[b"x"]),
        set_offset(6, "s", 1),
        Op::DeleteTopic {
            name: "t6".into(),
            id: 6,
        },
    ])
    .unwrap();
    assert!(b.sizes(6).unwrap().is_empty());
    assert!(offsets_of(b, 6).is_empty());
    assert!(b.topics().unwrap().is_empty());
    b.apply(&[
        set_offset(5, "s", 1),
        Op::DeleteOffset {
            topic_id: 5,
            subscriber: "s".into(),
        },
        set_offset(5, "t", 1),
        set_offset(5, "t", 2),
        Op::Put {
            table: Table::Meta,
            key: b"k".to_vec(),
            value: b"v".to_vec(),
        },
        Op::Remove {
            table: Table::Meta,
            key: b"k".to_vec(),
        },
    ])
    .unwrap();
    assert_eq!(offsets_of(b, 5), [("t".to_string(), 2)]);
    assert_eq!(b.get(Table::Meta, b"k").unwrap(), None);
}

fn delete_topic(b: &dyn Backend) {
    ten_messages(b);
    b.apply(&[
        Op::PutTopic {
            name: "one".into(),
            meta: meta(1),
        },
        Op::PutTopic {
            name: "two".into(),
            meta: meta(2),
        },
        set_offset(1, "alice", 3),
        set_offset(1, "bob", 4),
        set_offset(2, "alice", 0),
    ])
    .unwrap();
    b.apply(&[Op::DeleteTopic {
        name: "one".into(),
        id: 1,
    }])
    .unwrap();
    assert!(b.read(1, 0, 100, usize::MAX).unwrap().is_empty());
    assert_eq!(b.last_offset(1).unwrap(), None);
    assert!(offsets_of(b, 1).is_empty());
    assert_eq!(b.topics().unwrap(), [("two".to_string(), meta(2))]);
    assert_eq!(read_offsets(b, 2, 0, 100, usize::MAX), [0]);
    assert_eq!(offsets_of(b, 2), [("alice".to_string(), 0)]);
}

fn offsets(b: &dyn Backend) {
    b.apply(&[
        set_offset(1, "zed", 1),
        set_offset(1, "amy", 2),
        set_offset(1, "", 3),
        set_offset(2, "amy", 9),
    ])
    .unwrap();
    assert_eq!(
        offsets_of(b, 1),
        [
            (String::new(), 3),
            ("amy".to_string(), 2),
            ("zed".to_string(), 1)
        ]
    );
    b.apply(&[
        set_offset(1, "amy", 7),
        Op::DeleteOffset {
            topic_id: 1,
            subscriber: "zed".into(),
        },
        Op::DeleteOffset {
            topic_id: 1,
            subscriber: "nobody".into(),
        },
    ])
    .unwrap();
    assert_eq!(
        offsets_of(b, 1),
        [(String::new(), 3), ("amy".to_string(), 7)]
    );
    assert_eq!(offsets_of(b, 2), [("amy".to_string(), 9)]);
    assert!(offsets_of(b, 3).is_empty());
}

fn registry(b: &dyn Backend) {
    let put = |table, key: &[u8], value: &[u8]| Op::Put {
        table,
        key: key.to_vec(),
        value: value.to_vec(),
    };
    b.apply(&[
        put(Table::Peers, b"b", b"2"),
        put(Table::Peers, b"a", b"1"),
        put(Table::Peers, b"c", b""),
        put(Table::Files, b"a", b"file"),
        put(Table::Meta, b"id", b"7"),
    ])
    .unwrap();
    assert_eq!(
        b.scan(Table::Peers).unwrap(),
        [
            (b"a".to_vec(), b"1".to_vec()),
            (b"b".to_vec(), b"2".to_vec()),
            (b"c".to_vec(), Vec::new())
        ]
    );
    assert_eq!(b.get(Table::Files, b"a").unwrap(), Some(b"file".to_vec()));
    assert_eq!(b.get(Table::Directory, b"a").unwrap(), None);
    assert_eq!(b.get(Table::Meta, b"").unwrap(), None);
    b.apply(&[
        Op::Remove {
            table: Table::Peers,
            key: b"a".to_vec(),
        },
        put(Table::Peers, b"b", b"22"),
    ])
    .unwrap();
    assert_eq!(b.get(Table::Peers, b"a").unwrap(), None);
    assert_eq!(
        b.scan(Table::Peers).unwrap(),
        [(b"b".to_vec(), b"22".to_vec()), (b"c".to_vec(), Vec::new())]
    );
    assert!(b.scan(Table::Directory).unwrap().is_empty());
    assert_eq!(b.scan(Table::Files).unwrap().len(), 1);
}

fn topics_round_trip(b: &dyn Backend) {
    assert!(b.topics().unwrap().is_empty());
    let mut other = meta(9);
    other.retention = Retention::default();
    b.apply(&[
        Op::PutTopic {
            name: "zeta".into(),
            meta: meta(1),
        },
        Op::PutTopic {
            name: "alpha.β".into(),
            meta: other.clone(),
        },
    ])
    .unwrap();
    assert_eq!(
        b.topics().unwrap(),
        [
            ("alpha.β".to_string(), other),
            ("zeta".to_string(), meta(1))
        ]
    );
    let mut moved = meta(1);
    moved.low = 100;
    b.apply(&[Op::PutTopic {
        name: "zeta".into(),
        meta: moved.clone(),
    }])
    .unwrap();
    assert_eq!(b.topics().unwrap()[1], ("zeta".to_string(), moved));
}

fn bad_write_changes_nothing(b: &dyn Backend) {
    let bad = Op::Append {
        topic_id: 1,
        first_offset: 0,
        timestamps: vec![1],
        batch: Batch::from_payloads([b"a".as_slice(), b"b"]),
    };
    let err = b
        .apply(&[
            Op::Put {
                table: Table::Meta,
                key: b"k".to_vec(),
                value: b"v".to_vec(),
            },
            bad,
        ])
        .unwrap_err();
    assert!(matches!(err, StoreError::Backend(_)), "{err}");
    assert_eq!(b.get(Table::Meta, b"k").unwrap(), None);
    assert!(b.sizes(1).unwrap().is_empty());
    let empty_key = Op::Put {
        table: Table::Meta,
        key: Vec::new(),
        value: b"v".to_vec(),
    };
    assert!(b.apply(&[empty_key]).is_err());
    b.persist(false).unwrap();
    b.persist(true).unwrap();
}

macro_rules! suite {
    ($module:ident, $make:expr) => {
        mod $module {
            use super::*;

            fn with_backend(check: fn(&dyn Backend)) {
                let dir = tempfile::tempdir().unwrap();
                let make: fn(&Path) -> Box<dyn Backend> = $make;
                let backend = make(dir.path());
                check(&*backend);
            }

            #[test]
            fn append_and_read() {
                with_backend(super::append_and_read);
            }

            #[test]
            fn last_offset() {
                with_backend(super::last_offset);
            }

            #[test]
            fn truncate() {
                with_backend(super::truncate);
            }

            #[test]
            fn ops_see_earlier_ops_of_the_same_apply() {
                with_backend(super::ops_see_earlier_ops_of_the_same_apply);
            }

            #[test]
            fn delete_topic() {
                with_backend(super::delete_topic);
            }

            #[test]
            fn offsets() {
                with_backend(super::offsets);
            }

            #[test]
            fn registry() {
                with_backend(super::registry);
            }

            #[test]
            fn topics_round_trip() {
                with_backend(super::topics_round_trip);
            }

            #[test]
            fn bad_write_changes_nothing() {
                with_backend(super::bad_write_changes_nothing);
            }
        }
    };
}

suite!(memory_backend, |_| Box::new(MemoryBackend::new()));
suite!(fjall_backend, |dir| Box::new(
    FjallBackend::open(dir).unwrap()
));

#[test]
fn fjall_reopen_keeps_what_a_synced_writer_wrote() {
    let dir = tempfile::tempdir().unwrap();
    // A directory that does not exist yet: open creates it.
    let path = dir.path().join("node").join("store");
    {
        let backend: Arc<dyn Backend> = Arc::new(FjallBackend::open(&path).unwrap());
        let writer = Writer::start(backend.clone());
        let first = writer.submit(
            vec![
                Op::PutTopic {
                    name: "news".into(),
                    meta: meta(4),
                },
                append(4, 0, &[b"hello", b"world"]),
                set_offset(4, "sub", 1),
                Op::Put {
                    table: Table::Directory,
                    key: b"news".to_vec(),
                    value: b"peer-1".to_vec(),
                },
            ],
            true,
        );
        let second = writer.submit(
            vec![
                append(4, 2, &[b"!"]),
                Op::Truncate {
                    topic_id: 4,
                    below: 1,
                },
            ],
            false,
        );
        writer.submit_detached(vec![set_offset(4, "sub", 2)]);
        first.blocking_recv().unwrap().unwrap();
        second.blocking_recv().unwrap().unwrap();
        writer.shutdown();
    }
    let backend = FjallBackend::open(&path).unwrap();
    assert_eq!(backend.topics().unwrap(), [("news".to_string(), meta(4))]);
    let messages = backend.read(4, 0, 10, usize::MAX).unwrap();
    let got: Vec<(u64, u64, &[u8])> = messages
        .iter()
        .map(|m| (m.offset, m.timestamp_ms, &m.payload[..]))
        .collect();
    assert_eq!(
        got,
        [(1, 1_001, b"world".as_slice()), (2, 1_002, b"!".as_slice())]
    );
    assert_eq!(backend.last_offset(4).unwrap(), Some(2));
    assert_eq!(offsets_of(&backend, 4), [("sub".to_string(), 2)]);
    assert_eq!(
        backend.get(Table::Directory, b"news").unwrap(),
        Some(b"peer-1".to_vec())
    );
}

#[test]
fn fjall_reads_racing_truncations_return_each_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FjallBackend::open(dir.path()).unwrap());
    // Records of 16 messages; the truncation then moves through them one message at a
    // time, rewriting the record it cuts under a later key each time.
    let payloads = [b"m".as_slice(); 16];
    for r in 0..256u64 {
        backend.apply(&[append(1, r * 16, &payloads)]).unwrap();
    }
    let cutter = {
        let backend = backend.clone();
        std::thread::spawn(move || {
            for below in 1..4096 {
                backend
                    .apply(&[Op::Truncate { topic_id: 1, below }])
                    .unwrap();
            }
        })
    };
    let mut reads = 0u64;
    while !cutter.is_finished() {
        // Reading from where the truncation is now: the read races the cut.
        let from = backend
            .read(1, 0, 1, usize::MAX)
            .unwrap()
            .first()
            .map_or(0, |m| m.offset);
        let got = backend.read(1, from, 64, usize::MAX).unwrap();
        for pair in got.windows(2) {
            assert_eq!(
                pair[1].offset,
                pair[0].offset + 1,
                "read from {from}: {got:?}"
            );
        }
        reads += 1;
    }
    cutter.join().unwrap();
    assert!(reads > 0);
    assert_eq!(read_offsets(&*backend, 1, 0, 10, 100), [4095]);
}

/// Writes raw `(topic, offset, value)` records into keyspace `name` of a fjall database
/// in `dir`, as a damaged disk or an earlier version would have left them.
fn write_raw(dir: &std::path::Path, name: &str, records: &[(u64, u64, Vec<u8>)]) {
    let db = fjall::Database::builder(dir).open().unwrap();
    let ks = db
        .keyspace(name, fjall::KeyspaceCreateOptions::default)
        .unwrap();
    for (topic, offset, value) in records {
        let mut key = topic.to_be_bytes().to_vec();
        key.extend_from_slice(&offset.to_be_bytes());
        ks.insert(key, value.as_slice()).unwrap();
    }
    db.persist(fjall::PersistMode::SyncData).unwrap();
}

#[test]
fn fjall_damaged_record_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    // A header claiming two messages (one timestamp), with lengths of 4 + 4 bytes but
    // only 3 payload bytes.
    let mut value = vec![0u8, 0, 0, 0, 2];
    value.extend_from_slice(&9u64.to_be_bytes());
    value.extend_from_slice(&4u32.to_be_bytes());
    value.extend_from_slice(&4u32.to_be_bytes());
    value.extend_from_slice(b"abc");
    write_raw(dir.path(), "batches", &[(7, 3, value), (8, 0, vec![1, 2])]);
    let backend = FjallBackend::open(dir.path()).unwrap();
    for (topic, err) in [
        (7, backend.read(7, 0, 10, 10).unwrap_err()),
        (7, backend.sizes(7).unwrap_err()),
        (8, backend.read(8, 0, 10, 10).unwrap_err()),
        (8, backend.last_offset(8).unwrap_err()),
    ] {
        match err {
            StoreError::Corrupt(msg) => {
                assert!(msg.contains(&format!("topic {topic}")), "{msg}");
            }
            other => panic!("expected corruption, got {other}"),
        }
    }
    // The header alone is intact, so the last offset is still known.
    assert_eq!(backend.last_offset(7).unwrap(), Some(4));
    // Nothing can be appended over a record that does not decode.
    assert!(matches!(
        backend.apply(&[append(7, 4, &[b"x"])]),
        Err(StoreError::Corrupt(_))
    ));
    backend.apply(&[append(7, 5, &[b"y"])]).unwrap();
}

#[test]
fn fjall_open_moves_messages_stored_one_per_key() {
    let dir = tempfile::tempdir().unwrap();
    let old = |ts: u64, payload: &[u8]| {
        let mut value = ts.to_be_bytes().to_vec();
        value.extend_from_slice(payload);
        value
    };
    write_raw(
        dir.path(),
        "messages",
        &[
            (2, 5, old(50, b"five")),
            (2, 6, old(60, b"")),
            (3, 0, old(1, b"zero")),
        ],
    );
    {
        let backend = FjallBackend::open(dir.path()).unwrap();
        let got: Vec<(u64, u64, Vec<u8>)> = backend
            .read(2, 0, 10, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|m| (m.offset, m.timestamp_ms, m.payload.to_vec()))
            .collect();
        assert_eq!(got, [(5, 50, b"five".to_vec()), (6, 60, vec![])]);
        assert_eq!(backend.last_offset(2).unwrap(), Some(6));
        backend.apply(&[append(2, 7, &[b"seven"])]).unwrap();
        assert_eq!(read_offsets(&backend, 3, 0, 10, 100), [0]);
        backend.persist(true).unwrap();
    }
    // Opened again: the old keyspace is gone and nothing moves twice.
    let backend = FjallBackend::open(dir.path()).unwrap();
    assert_eq!(read_offsets(&backend, 2, 0, 10, 100), [5, 6, 7]);
    assert_eq!(backend.sizes(3).unwrap(), [(0, 1, 4)]);
}

/// One random write, small ranges so ops collide often.
#[derive(Debug, Clone)]
enum Step {
    Append {
        topic: u64,
        first: u64,
        lens: Vec<u8>,
    },
    Truncate {
        topic: u64,
        below: u64,
    },
    SetOffset {
        topic: u64,
        sub: u8,
        offset: u64,
    },
    DeleteOffset {
        topic: u64,
        sub: u8,
    },
    DeleteTopic {
        topic: u64,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..3u64, 0..24u64, prop::collection::vec(0..12u8, 0..5))
            .prop_map(|(topic, first, lens)| Step::Append { topic, first, lens }),
        2 => (0..3u64, 0..30u64).prop_map(|(topic, below)| Step::Truncate { topic, below }),
        2 => (0..3u64, 0..3u8, 0..30u64)
            .prop_map(|(topic, sub, offset)| Step::SetOffset { topic, sub, offset }),
        1 => (0..3u64, 0..3u8).prop_map(|(topic, sub)| Step::DeleteOffset { topic, sub }),
        1 => (0..3u64).prop_map(|topic| Step::DeleteTopic { topic }),
    ]
}

fn to_op(step: &Step, seq: usize) -> Op {
    match step {
        Step::Append { topic, first, lens } => Op::Append {
            topic_id: *topic,
            first_offset: *first,
            timestamps: (0..lens.len() as u64)
                .map(|i| seq as u64 * 100 + i)
                .collect(),
            batch: Batch::from_payloads(lens.iter().map(|&l| vec![seq as u8; l as usize])),
        },
        Step::Truncate { topic, below } => Op::Truncate {
            topic_id: *topic,
            below: *below,
        },
        Step::SetOffset { topic, sub, offset } => set_offset(*topic, &format!("s{sub}"), *offset),
        Step::DeleteOffset { topic, sub } => Op::DeleteOffset {
            topic_id: *topic,
            subscriber: format!("s{sub}"),
        },
        Step::DeleteTopic { topic } => Op::DeleteTopic {
            name: format!("t{topic}"),
            id: *topic,
        },
    }
}

/// Both backends hold the same for every topic the random steps touch.
fn agree(
    disk: &dyn Backend,
    memory: &dyn Backend,
    from: u64,
    max_count: usize,
    max_bytes: usize,
) -> Result<(), TestCaseError> {
    for topic in 0..3 {
        prop_assert_eq!(
            disk.read(topic, 0, usize::MAX, usize::MAX).unwrap(),
            memory.read(topic, 0, usize::MAX, usize::MAX).unwrap()
        );
        prop_assert_eq!(
            disk.read(topic, from, max_count, max_bytes).unwrap(),
            memory.read(topic, from, max_count, max_bytes).unwrap()
        );
        prop_assert_eq!(
            disk.last_offset(topic).unwrap(),
            memory.last_offset(topic).unwrap()
        );
        prop_assert_eq!(disk.sizes(topic).unwrap(), memory.sizes(topic).unwrap());
        prop_assert_eq!(disk.offsets(topic).unwrap(), memory.offsets(topic).unwrap());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn backends_agree(
        groups in prop::collection::vec(prop::collection::vec(step(), 1..5), 1..8),
        from in 0..30u64,
        max_count in 0..8usize,
        max_bytes in 0..40usize,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let disk = FjallBackend::open(dir.path()).unwrap();
        let memory = MemoryBackend::new();
        let mut seq = 0;
        for group in &groups {
            let ops: Vec<Op> = group.iter().map(|s| { seq += 1; to_op(s, seq) }).collect();
            disk.apply(&ops).unwrap();
            memory.apply(&ops).unwrap();
        }
        agree(&disk, &memory, from, max_count, max_bytes)?;
        // Opened again, the disk backend knows where each topic ends only from what it
        // stored: an append must replace exactly what it overlaps there too.
        drop(disk);
        let disk = FjallBackend::open(dir.path()).unwrap();
        let ops: Vec<Op> = (0..3).map(|topic| to_op(&Step::Append { topic, first: from, lens: vec![1, 2] }, seq + 1)).collect();
        disk.apply(&ops).unwrap();
        memory.apply(&ops).unwrap();
        agree(&disk, &memory, from, max_count, max_bytes)?;
    }
}

/// Deleting a topic takes it out at once and removes its records in small steps
/// afterwards, also across a restart, so a large topic's deletion is never one huge write.
#[test]
fn fjall_deletes_a_large_topic_in_steps() {
    let dir = tempfile::tempdir().unwrap();
    // More records than three reclaim steps remove.
    const RECORDS: u64 = 3 * 4096 + 5;
    {
        let backend = FjallBackend::open(dir.path()).unwrap();
        backend
            .apply(&[Op::PutTopic {
                name: "big".into(),
                meta: meta(1),
            }])
            .unwrap();
        let ops: Vec<Op> = (0..RECORDS).map(|i| append(1, i, &[b"x"])).collect();
        backend.apply(&ops).unwrap();
        backend.apply(&[append(2, 0, &[b"other"])]).unwrap();
        backend
            .apply(&[Op::DeleteTopic {
                name: "big".into(),
                id: 1,
            }])
            .unwrap();
        // Gone for readers at once, though its records are still on disk.
        assert!(backend.read(1, 0, 10, usize::MAX).unwrap().is_empty());
        assert_eq!(backend.last_offset(1).unwrap(), None);
        assert!(backend.sizes(1).unwrap().is_empty());
        assert_eq!(backend.reclaim_pending(), 1);
        // One step, then a restart.
        assert!(backend.reclaim().unwrap());
        backend.persist(true).unwrap();
    }
    let backend = FjallBackend::open(dir.path()).unwrap();
    assert_eq!(backend.reclaim_pending(), 1, "carried on after the restart");
    assert!(backend.read(1, 0, 10, usize::MAX).unwrap().is_empty());
    let mut steps = 0;
    while backend.reclaim().unwrap() {
        steps += 1;
        assert!(steps < 10, "reclaim does not end");
    }
    assert_eq!(backend.reclaim_pending(), 0);
    // Every record is gone now that reads are no longer held back, and nothing else was
    // touched.
    assert!(backend.read(1, 0, 10, usize::MAX).unwrap().is_empty());
    assert_eq!(backend.last_offset(1).unwrap(), None);
    assert_eq!(read_offsets(&backend, 2, 0, 10, usize::MAX), [0]);
    drop(backend);
    let backend = FjallBackend::open(dir.path()).unwrap();
    assert_eq!(backend.reclaim_pending(), 0);
}

/// The writer frees deleted topics' space by itself when it has nothing else to do.
#[test]
fn the_writer_reclaims_when_idle() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FjallBackend::open(dir.path()).unwrap());
    let writer = Writer::start(backend.clone());
    let ops: Vec<Op> = (0..10_000).map(|i| append(1, i, &[b"x"])).collect();
    writer.submit(ops, false).blocking_recv().unwrap().unwrap();
    writer
        .submit(
            vec![Op::DeleteTopic {
                name: "big".into(),
                id: 1,
            }],
            true,
        )
        .blocking_recv()
        .unwrap()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while backend.reclaim_pending() > 0 {
        assert!(std::time::Instant::now() < deadline, "never reclaimed");
        std::thread::yield_now();
    }
    assert_eq!(backend.last_offset(1).unwrap(), None);
    writer.shutdown();
}
