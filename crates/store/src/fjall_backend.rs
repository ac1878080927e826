//! The on-disk backend, on fjall (an LSM-tree key-value store).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Slice};
use peerbus_proto::Message;

use crate::{Backend, Op, Result, StoreError, Table, TopicMeta, read_fits, validate};

/// Index of each keyspace in [`FjallBackend::keyspaces`]; registry tables come first so
/// `Table::index` doubles as their index.
const TOPICS: usize = 4;
const MESSAGES: usize = 5;
const OFFSETS: usize = 6;
const KEYSPACES: usize = 7;
const NAMES: [&str; KEYSPACES] = [
    "meta",
    "peers",
    "directory",
    "files",
    "topics",
    "messages",
    "offsets",
];

/// Storage on disk in a fjall database, one keyspace per kind of record.
pub struct FjallBackend {
    db: Database,
    keyspaces: [Keyspace; KEYSPACES],
    path: PathBuf,
    /// `apply` reads stored keys to expand truncations and deletions into removals; two
    /// concurrent applies could each miss the other's keys, so they take turns.
    apply_lock: Mutex<()>,
}

impl std::fmt::Debug for FjallBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FjallBackend")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Cap on the journals' total size; see [`FjallBackend::open`].
const JOURNAL_BYTES: u64 = 192 << 20;

/// Size at which a keyspace's memtable is sealed and flushed; see [`FjallBackend::open`].
const MEMTABLE_BYTES: u64 = 32 << 20;

impl FjallBackend {
    /// Opens (or creates) the database in `dir`, creating the directory if missing.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Backend(format!("cannot create directory {}: {e}", dir.display()))
        })?;
        // Journal flushes are left to `persist`, so a group of writes costs one flush
        // instead of one per write batch. Memtables waiting for their flush live as long as
        // the journal that backs them, so the journal's cap is what bounds a node's memory
        // under a sustained write load (fjall's default of 512 MiB lets it reach ~600 MiB).
        let db = Database::builder(dir)
            .manual_journal_persist(true)
            .max_journaling_size(JOURNAL_BYTES)
            .open()
            .map_err(|e| {
                StoreError::Backend(format!(
                    "cannot open the database in {}: {e}",
                    dir.display()
                ))
            })?;
        let mut opened = Vec::with_capacity(KEYSPACES);
        for name in NAMES {
            // Up to four sealed memtables wait for their flush before fjall halts writes, so
            // the memtable size is what bounds a node's memory while the disk lags behind.
            let options = || KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE_BYTES);
            let ks = db.keyspace(name, options).map_err(|e| {
                StoreError::Backend(format!(
                    "cannot open keyspace {name} in {}: {e}",
                    dir.display()
                ))
            })?;
            opened.push(ks);
        }
        let keyspaces: [Keyspace; KEYSPACES] = opened
            .try_into()
            .unwrap_or_else(|_| unreachable!("one keyspace per name"));
        Ok(FjallBackend {
            db,
            keyspaces,
            path: dir.to_path_buf(),
            apply_lock: Mutex::new(()),
        })
    }

    fn fail(&self, what: &str, e: fjall::Error) -> StoreError {
        StoreError::Backend(format!("{what} in {}: {e}", self.path.display()))
    }

    /// Keys of keyspace `ks` within `[lo, hi)` (`hi = None`: every key starting with `lo`).
    fn stored_keys(&self, ks: usize, lo: &[u8], hi: Option<&[u8]>) -> Result<Vec<Slice>> {
        let iter = match hi {
            Some(hi) => self.keyspaces[ks].range(lo..hi),
            None => self.keyspaces[ks].prefix(lo),
        };
        iter.map(|guard| {
            guard
                .key()
                .map_err(|e| self.fail(&format!("scanning {}", NAMES[ks]), e))
        })
        .collect()
    }
}

fn message_key(topic_id: u64, offset: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&topic_id.to_be_bytes());
    key[8..].copy_from_slice(&offset.to_be_bytes());
    key
}

fn offset_key(topic_id: u64, subscriber: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + subscriber.len());
    key.extend_from_slice(&topic_id.to_be_bytes());
    key.extend_from_slice(subscriber.as_bytes());
    key
}

fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?))
}

fn message_offset(topic_id: u64, key: &[u8]) -> Result<u64> {
    match (key.len(), be_u64(key.get(8..).unwrap_or_default())) {
        (16, Some(offset)) => Ok(offset),
        _ => Err(StoreError::Corrupt(format!(
            "message key of {} bytes in topic {topic_id}",
            key.len()
        ))),
    }
}

/// Splits a stored message value into its timestamp and payload.
fn split_value(topic_id: u64, offset: u64, value: &[u8]) -> Result<u64> {
    be_u64(value).ok_or_else(|| {
        StoreError::Corrupt(format!(
            "message {offset} of topic {topic_id} is {} bytes, shorter than its timestamp",
            value.len()
        ))
    })
}

/// True when no two appends of `ops` write the same message.
fn appends_are_disjoint(ops: &[Op]) -> bool {
    let mut ranges: Vec<(u64, u64, u64)> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Append {
                topic_id,
                first_offset,
                batch,
                ..
            } => Some((*topic_id, *first_offset, first_offset + batch.len() as u64)),
            _ => None,
        })
        .collect();
    ranges.sort_unstable();
    ranges
        .windows(2)
        .all(|w| w[0].0 != w[1].0 || w[0].2 <= w[1].1)
}

/// The net effect of one `apply`, key by key. fjall gives every item of a write batch the
/// same sequence number, so two items for one key would leave the winner to chance; and
/// removals expanded from a range must also catch keys written earlier in the same apply,
/// which are not yet visible in the keyspace.
#[derive(Default)]
struct Pending {
    writes: BTreeMap<(usize, Vec<u8>), Option<Slice>>,
}

impl Pending {
    fn put(&mut self, ks: usize, key: Vec<u8>, value: Slice) {
        self.writes.insert((ks, key), Some(value));
    }

    fn remove(&mut self, ks: usize, key: Vec<u8>) {
        self.writes.insert((ks, key), None);
    }

    /// Removes every stored or pending key of `ks` in `[lo, hi)` (or with prefix `lo`).
    fn remove_range(
        &mut self,
        backend: &FjallBackend,
        ks: usize,
        lo: &[u8],
        hi: Option<&[u8]>,
    ) -> Result<()> {
        let inside = |key: &[u8]| match hi {
            Some(hi) => key >= lo && key < hi,
            None => key.starts_with(lo),
        };
        let pending: Vec<Vec<u8>> = self
            .writes
            .range((ks, lo.to_vec())..)
            .take_while(|((k, key), _)| *k == ks && inside(key))
            .map(|((_, key), _)| key.clone())
            .collect();
        for key in pending {
            self.remove(ks, key);
        }
        for key in backend.stored_keys(ks, lo, hi)? {
            self.remove(ks, key.to_vec());
        }
        Ok(())
    }
}

impl Backend for FjallBackend {
    fn apply(&self, ops: &[Op]) -> Result<()> {
        validate(ops)?;
        let _turn = self
            .apply_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut pending = Pending::default();
        // Messages go straight into the write batch when nothing else in this apply could
        // touch their keys: no range removal, and appends that do not overlap. That skips
        // an ordered map insert and a key allocation per message, most of a large
        // publish's storing cost.
        let direct = appends_are_disjoint(ops)
            && !ops
                .iter()
                .any(|op| matches!(op, Op::Truncate { .. } | Op::DeleteTopic { .. }));
        let mut batch = self.db.batch().durability(None);
        for op in ops {
            match op {
                Op::PutTopic { name, meta } => {
                    let value = postcard::to_stdvec(meta).map_err(|e| {
                        StoreError::Backend(format!("cannot encode the meta of topic {name}: {e}"))
                    })?;
                    pending.put(TOPICS, name.as_bytes().to_vec(), value.into());
                }
                Op::DeleteTopic { name, id } => {
                    pending.remove(TOPICS, name.as_bytes().to_vec());
                    let prefix = id.to_be_bytes();
                    pending.remove_range(self, MESSAGES, &prefix, None)?;
                    pending.remove_range(self, OFFSETS, &prefix, None)?;
                }
                Op::Append {
                    topic_id,
                    first_offset,
                    timestamps,
                    batch: messages,
                } => {
                    for (i, (payload, ts)) in messages.iter().zip(timestamps).enumerate() {
                        let mut value = Vec::with_capacity(8 + payload.len());
                        value.extend_from_slice(&ts.to_be_bytes());
                        value.extend_from_slice(&payload);
                        let key = message_key(*topic_id, first_offset + i as u64);
                        if direct {
                            batch.insert(&self.keyspaces[MESSAGES], key, value);
                        } else {
                            pending.put(MESSAGES, key.to_vec(), value.into());
                        }
                    }
                }
                Op::Truncate { topic_id, below } => {
                    let lo = message_key(*topic_id, 0);
                    let hi = message_key(*topic_id, *below);
                    pending.remove_range(self, MESSAGES, &lo, Some(&hi))?;
                }
                Op::SetOffset {
                    topic_id,
                    subscriber,
                    offset,
                } => {
                    let value = offset.to_be_bytes().to_vec();
                    pending.put(OFFSETS, offset_key(*topic_id, subscriber), value.into());
                }
                Op::DeleteOffset {
                    topic_id,
                    subscriber,
                } => pending.remove(OFFSETS, offset_key(*topic_id, subscriber)),
                Op::Put { table, key, value } => {
                    pending.put(table.index(), key.clone(), value.clone().into());
                }
                Op::Remove { table, key } => pending.remove(table.index(), key.clone()),
            }
        }
        for ((ks, key), value) in pending.writes {
            match value {
                Some(value) => batch.insert(&self.keyspaces[ks], key, value),
                None => batch.remove(&self.keyspaces[ks], key),
            }
        }
        batch.commit().map_err(|e| self.fail("write failed", e))
    }

    fn persist(&self, sync: bool) -> Result<()> {
        let mode = if sync {
            PersistMode::SyncData
        } else {
            PersistMode::Buffer
        };
        self.db
            .persist(mode)
            .map_err(|e| self.fail("flushing the journal failed", e))
    }

    fn topics(&self) -> Result<Vec<(String, TopicMeta)>> {
        let mut topics = Vec::new();
        for guard in self.keyspaces[TOPICS].iter() {
            let (key, value) = guard
                .into_inner()
                .map_err(|e| self.fail("reading topics", e))?;
            let name = String::from_utf8(key.to_vec())
                .map_err(|_| StoreError::Corrupt(format!("topic name {:?} is not UTF-8", &*key)))?;
            let meta = postcard::from_bytes(&value).map_err(|e| {
                StoreError::Corrupt(format!("the meta of topic {name} does not decode: {e}"))
            })?;
            topics.push((name, meta));
        }
        Ok(topics)
    }

    fn read(
        &self,
        topic_id: u64,
        from: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<Message>> {
        let mut messages = Vec::new();
        if max_count == 0 {
            return Ok(messages);
        }
        let lo = message_key(topic_id, from);
        let hi = message_key(topic_id, u64::MAX);
        let mut bytes = 0usize;
        for guard in self.keyspaces[MESSAGES].range(lo..=hi) {
            let (key, value) = guard
                .into_inner()
                .map_err(|e| self.fail(&format!("reading topic {topic_id}"), e))?;
            let offset = message_offset(topic_id, &key)?;
            let timestamp_ms = split_value(topic_id, offset, &value)?;
            let len = value.len() - 8;
            if !read_fits(messages.len(), bytes, len, max_count, max_bytes) {
                break;
            }
            bytes += len;
            // With fjall's `bytes_1` feature the value already is a `Bytes`, so the payload is
            // a view into it rather than a copy.
            let payload = Bytes::from(value).slice(8..);
            messages.push(Message {
                offset,
                timestamp_ms,
                payload,
            });
        }
        Ok(messages)
    }

    fn last_offset(&self, topic_id: u64) -> Result<Option<u64>> {
        let Some(guard) = self.keyspaces[MESSAGES]
            .prefix(topic_id.to_be_bytes())
            .next_back()
        else {
            return Ok(None);
        };
        let key = guard
            .key()
            .map_err(|e| self.fail(&format!("reading topic {topic_id}"), e))?;
        message_offset(topic_id, &key).map(Some)
    }

    fn sizes(&self, topic_id: u64) -> Result<Vec<(u64, u64, u32)>> {
        let mut sizes = Vec::new();
        for guard in self.keyspaces[MESSAGES].prefix(topic_id.to_be_bytes()) {
            let (key, value) = guard
                .into_inner()
                .map_err(|e| self.fail(&format!("reading topic {topic_id}"), e))?;
            let offset = message_offset(topic_id, &key)?;
            let timestamp_ms = split_value(topic_id, offset, &value)?;
            // Values are written from u32-length payloads, so this cannot truncate.
            sizes.push((offset, timestamp_ms, (value.len() - 8) as u32));
        }
        Ok(sizes)
    }

    fn offsets(&self, topic_id: u64) -> Result<Vec<(String, u64)>> {
        let mut offsets = Vec::new();
        for guard in self.keyspaces[OFFSETS].prefix(topic_id.to_be_bytes()) {
            let (key, value) = guard
                .into_inner()
                .map_err(|e| self.fail(&format!("reading offsets of topic {topic_id}"), e))?;
            let name = key.get(8..).unwrap_or_default();
            let subscriber = std::str::from_utf8(name).map_err(|_| {
                StoreError::Corrupt(format!(
                    "a subscriber name of topic {topic_id} is not UTF-8: {name:?}"
                ))
            })?;
            let offset = match (value.len(), be_u64(&value)) {
                (8, Some(offset)) => offset,
                _ => {
                    return Err(StoreError::Corrupt(format!(
                        "offset of subscriber {subscriber} of topic {topic_id} is {} bytes",
                        value.len()
                    )));
                }
            };
            offsets.push((subscriber.to_owned(), offset));
        }
        Ok(offsets)
    }

    fn scan(&self, table: Table) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.keyspaces[table.index()]
            .iter()
            .map(|guard| {
                let (key, value) = guard
                    .into_inner()
                    .map_err(|e| self.fail(&format!("reading {}", table.keyspace_name()), e))?;
                Ok((key.to_vec(), value.to_vec()))
            })
            .collect()
    }

    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        // fjall panics on keys it could never have stored; such keys are simply absent.
        if key.is_empty() || key.len() > crate::MAX_KEY {
            return Ok(None);
        }
        let value = self.keyspaces[table.index()]
            .get(key)
            .map_err(|e| self.fail(&format!("reading {}", table.keyspace_name()), e))?;
        Ok(value.map(|v| v.to_vec()))
    }
}
