//! How the registry maps onto the store's tables.
//!
//! | table       | key                 | value                        |
//! |-------------|---------------------|------------------------------|
//! | `Peers`     | peer id (u64 BE)    | postcard([`PeerRecord`])     |
//! | `Directory` | topic name (UTF-8)  | peer id (u64 BE)             |
//! | `Meta`      | `next_peer_id`      | next fresh peer id (u64 BE)  |

use peerbus_store::{Backend, Op, StoreError, Table};

use crate::registry::{Change, PeerRecord, Registry};

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
        })
        .collect()
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
        let rec: PeerRecord = postcard::from_bytes(&value)
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
    let (registry, cleanup) = Registry::load(ttl_ms, next_id, peers, directory);
    Ok((registry, ops(cleanup)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::TopicSet;
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

        let (loaded, cleanup) = load(&backend, 10_000).unwrap();
        assert!(cleanup.is_empty());
        assert_eq!(loaded.list_peers(2_000), reg.list_peers(2_000));
        assert_eq!(loaded.list_topics(None), reg.list_topics(None));
        let mut loaded = loaded;
        let (again, _) = loaded
            .register(
                &RegisterPeer {
                    name: "q".into(),
                    addr: "127.0.0.1:3".into(),
                    http: None,
                    previous: None,
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
}
