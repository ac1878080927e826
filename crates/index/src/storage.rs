//! How the registry maps onto the store's tables.
//!
//! | table       | key                 | value                        |
//! |-------------|---------------------|------------------------------|
//! | `Peers`     | peer id (u64 BE)    | postcard([`PeerRecord`])     |
//! | `Directory` | topic name (UTF-8)  | peer id (u64 BE)             |
//! | `Meta`      | `next_peer_id`      | next fresh peer id (u64 BE)  |
//! | `Files`     | peer id (u64 BE) ‖ hash (64 hex) | postcard([`FileEntry`]) |
//!
//! File keys start with the peer id so one peer's files are adjacent; the hash makes the
//! key unique per peer, since a peer offers a given content once.

use peerbus_proto::FileEntry;
use peerbus_store::{Backend, Op, StoreError, Table};

use crate::registry::{Change, PeerRecord, Registry, is_hash};

const NEXT_PEER_ID: &[u8] = b"next_peer_id";

/// The store ops that persist `changes`, in order.
pub(crate) fn ops(changes: Vec<Change>) -> Vec<Op> {
    changes
        .into_iter()
        .map(|c| match c {
            Change::Peer(id, rec) => Op::Put {
                table: Table::Peers,
                key: id.to_be_bytes().to_vec(),
                // A record of strings and integers always encodes; postcard only fails on
                // types it cannot represent or on a full fixed-size buffer.
                value: postcard::to_stdvec(&rec).expect("a peer record always encodes"),
            },
            Change::PeerRemoved(id) => Op::Remove {
                table: Table::Peers,
                key: id.to_be_bytes().to_vec(),
            },
            Change::Topic(topic, id) => Op::Put {
                table: Table::Directory,
                key: topic.into_bytes(),
                value: id.to_be_bytes().to_vec(),
            },
            Change::TopicRemoved(topic) => Op::Remove {
                table: Table::Directory,
                key: topic.into_bytes(),
            },
            Change::NextId(next) => Op::Put {
                table: Table::Meta,
                key: NEXT_PEER_ID.to_vec(),
                value: next.to_be_bytes().to_vec(),
            },
            Change::File(id, entry) => Op::Put {
                table: Table::Files,
                key: file_key(id, &entry.hash),
                // Strings and an integer: always encodes, as for peer records.
                value: postcard::to_stdvec(&entry).expect("a file entry always encodes"),
            },
            Change::FileRemoved(id, hash) => Op::Remove {
                table: Table::Files,
                key: file_key(id, &hash),
            },
        })
        .collect()
}

fn file_key(id: u64, hash: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + hash.len());
    key.extend_from_slice(&id.to_be_bytes());
    key.extend_from_slice(hash.as_bytes());
    key
}

fn be_u64(bytes: &[u8], what: impl FnOnce() -> String) -> Result<u64, StoreError> {
    let arr: [u8; 8] = bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("{} is {} bytes, not 8", what(), bytes.len())))?;
    Ok(u64::from_be_bytes(arr))
}

/// Reads the registry back. Also returns the writes that clean up entries the load dropped.
pub(crate) fn load(backend: &dyn Backend, ttl_ms: u64) -> Result<(Registry, Vec<Op>), StoreError> {
    let next_id = match backend.get(Table::Meta, NEXT_PEER_ID)? {
        Some(v) => be_u64(&v, || "the next peer id".into())?,
        None => 1,
    };
    let mut peers = Vec::new();
    for (key, value) in backend.scan(Table::Peers)? {
        let id = be_u64(&key, || "a peer key".into())?;
        let rec = PeerRecord::decode(&value)
            .map_err(|e| StoreError::Corrupt(format!("record of peer {id}: {e}")))?;
        peers.push((id, rec));
    }
    let mut directory = Vec::new();
    for (key, value) in backend.scan(Table::Directory)? {
        let topic = String::from_utf8(key)
            .map_err(|e| StoreError::Corrupt(format!("topic name in the directory: {e}")))?;
        let id = be_u64(&value, || format!("the host of topic '{topic}'"))?;
        directory.push((topic, id));
    }
    let mut files = Vec::new();
    for (key, value) in backend.scan(Table::Files)? {
        let (id, hash) = key.split_at_checked(8).ok_or_else(|| {
            StoreError::Corrupt(format!("a file key is {} bytes, not 72", key.len()))
        })?;
        let id = be_u64(id, || "a file key".into())?;
        let entry: FileEntry = postcard::from_bytes(&value)
            .map_err(|e| StoreError::Corrupt(format!("a file entry of peer {id}: {e}")))?;
        if entry.hash.as_bytes() != hash || !is_hash(&entry.hash) {
            return Err(StoreError::Corrupt(format!(
                "file '{}' of peer {id} is stored under another hash than its own",
                entry.name
            )));
        }
        files.push((id, entry));
    }
    let (registry, cleanup) = Registry::load(ttl_ms, next_id, peers, directory, files);
    Ok((registry, ops(cleanup)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{FileSet, TopicSet};
    use peerbus_proto::{PeerAuth, RegisterPeer};
    use peerbus_store::MemoryBackend;

    #[test]
    fn a_registry_survives_a_round_trip_through_the_store() {
        let backend = MemoryBackend::new();
        let mut reg = Registry::new(10_000);
        let (r, changes) = reg
            .register(
                &RegisterPeer {
                    name: "p".into(),
                    addr: "127.0.0.1:1".into(),
                    http: Some("127.0.0.1:2".into()),
                    previous: None,
                    keeps_identity: false,
                },
                "c".repeat(32),
                1_000,
            )
            .unwrap();
        backend.apply(&ops(changes)).unwrap();
        let auth = PeerAuth {
            peer_id: r.peer_id,
            cookie: r.cookie,
        };
        let (_, changes) = reg
            .announce(
                &auth,
                &TopicSet::new(vec!["a".to_string(), "b".to_string()]).unwrap(),
                false,
            )
            .unwrap();
        backend.apply(&ops(changes)).unwrap();
        let entry = |name: &str, digit: char| FileEntry {
            name: name.into(),
            hash: digit.to_string().repeat(64),
            size: 7,
        };
        let (_, changes) = reg
            .register_files(
                &auth,
                &FileSet::new(vec![entry("kept", 'a'), entry("gone", 'b')]).unwrap(),
                false,
            )
            .unwrap();
        backend.apply(&ops(changes)).unwrap();
        let (_, changes) = reg.unregister_files(&auth, &["b".repeat(64)]).unwrap();
        backend.apply(&ops(changes)).unwrap();

        let (loaded, cleanup) = load(&backend, 10_000).unwrap();
        assert!(cleanup.is_empty());
        assert_eq!(loaded.list_peers(None, 2_000), reg.list_peers(None, 2_000));
        assert_eq!(loaded.list_peers(None, 2_000)[0].files, 1);
        assert_eq!(loaded.list_topics(None, None), reg.list_topics(None, None));
        assert_eq!(loaded.search_files("", None), reg.search_files("", None));
        assert_eq!(loaded.lookup_file("kept").unwrap().hash, "a".repeat(64));
        let mut loaded = loaded;
        let (again, _) = loaded
            .register(
                &RegisterPeer {
                    name: "q".into(),
                    addr: "127.0.0.1:3".into(),
                    http: None,
                    previous: None,
                    keeps_identity: false,
                },
                "d".repeat(32),
                2_000,
            )
            .unwrap();
        assert_eq!(again.peer_id, 2, "the id counter was persisted");
    }

    #[test]
    fn corrupt_keys_are_reported() {
        let backend = MemoryBackend::new();
        backend
            .apply(&[Op::Put {
                table: Table::Peers,
                key: vec![1, 2, 3],
                value: vec![0],
            }])
            .unwrap();
        let e = load(&backend, 1).unwrap_err();
        assert!(matches!(e, StoreError::Corrupt(m) if m.contains("peer key")));
    }

    #[test]
    fn a_file_stored_under_another_hash_is_corrupt() {
        let backend = MemoryBackend::new();
        let entry = FileEntry {
            name: "f".into(),
            hash: "a".repeat(64),
            size: 1,
        };
        backend
            .apply(&[Op::Put {
                table: Table::Files,
                key: file_key(1, &"b".repeat(64)),
                value: postcard::to_stdvec(&entry).unwrap(),
            }])
            .unwrap();
        let e = load(&backend, 1).unwrap_err();
        assert!(matches!(e, StoreError::Corrupt(m) if m.contains("another hash")));
        let backend = MemoryBackend::new();
        backend
            .apply(&[Op::Put {
                table: Table::Files,
                key: vec![0; 3],
                value: Vec::new(),
            }])
            .unwrap();
        let e = load(&backend, 1).unwrap_err();
        assert!(matches!(e, StoreError::Corrupt(m) if m.contains("file key")));
    }
}
