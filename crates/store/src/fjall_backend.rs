//! The on-disk backend, on fjall (an LSM-tree key-value store).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable, Slice};
use peerbus_proto::{Batch, Message};

use crate::segment::{Log, Segment, record_count};
use crate::{Backend, Op, Result, StoreError, Table, TopicMeta, read_fits, validate};

/// Index of each keyspace in [`FjallBackend::keyspaces`]; registry tables come first so
/// `Table::index` doubles as their index.
const TOPICS: usize = 4;
const MESSAGES: usize = 5;
const OFFSETS: usize = 6;
/// Ids of deleted topics whose records are still being removed (empty values).
const RECLAIM: usize = 7;
const KEYSPACES: usize = 8;
const NAMES: [&str; KEYSPACES] = [
    "meta",
    "peers",
    "directory",
    "files",
    "topics",
    "batches",
    "offsets",
    "reclaim",
];

/// The keyspace of an earlier storage format with one record per message (value:
/// timestamp ‖ payload); [`FjallBackend::open`] moves what it holds into `batches`.
const OLD_MESSAGES: &str = "messages";
/// How many payload bytes one step of that move carries, so it never holds a whole old
/// log in memory.
const MIGRATE_BYTES: usize = 16 << 20;

/// Storage on disk in a fjall database, one keyspace per kind of record.
pub struct FjallBackend {
    db: Database,
    keyspaces: [Keyspace; KEYSPACES],
    path: PathBuf,
    /// `apply` reads stored records to cut them and keys to expand deletions into
    /// removals; two concurrent applies could each miss the other's, so they take turns.
    /// The lock holds each touched topic's [`Bounds`], so an append past the end reads
    /// nothing and a truncation reads only from where the last one stopped.
    apply_lock: Mutex<HashMap<u64, Bounds>>,
    /// Deleted topics whose records are still on disk: [`Backend::reclaim`] removes them a
    /// step at a time, and reads see none of them meanwhile.
    doomed: Mutex<BTreeSet<u64>>,
}

/// Records one [`Backend::reclaim`] step removes at most: a step is one small write, so
/// deleting a topic of millions of records never stalls the writer nor makes a write so
/// large that fjall refuses it.
const RECLAIM_KEYS: usize = 4096;

impl std::fmt::Debug for FjallBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FjallBackend")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Where a topic's stored records can be: every one starts at or after `start` and ends at
/// or before `end`. Kept per topic while the backend is open, so neither an append at the
/// end nor a truncation re-reads what earlier ones already settled; a truncation would
/// otherwise scan from offset 0 over the deletion markers of everything cut before, until
/// a compaction drops them.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    start: u64,
    end: u64,
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
        let backend = FjallBackend {
            db,
            keyspaces,
            path: dir.to_path_buf(),
            apply_lock: Mutex::new(HashMap::new()),
            doomed: Mutex::new(BTreeSet::new()),
        };
        backend.migrate_messages()?;
        let unreclaimed = backend.unreclaimed()?;
        if !unreclaimed.is_empty() {
            tracing::info!(
                "{} deleted topics still have records on disk; removing them",
                unreclaimed.len()
            );
        }
        *backend.doomed() = unreclaimed;
        Ok(backend)
    }

    /// Moves messages stored one per key by an earlier version into one-message records,
    /// a step at a time: each step inserts and removes in one atomic batch, so a crash in
    /// between leaves every message in exactly one of the two keyspaces and the next open
    /// carries on.
    fn migrate_messages(&self) -> Result<()> {
        if !self.db.keyspace_exists(OLD_MESSAGES) {
            return Ok(());
        }
        let old = self
            .db
            .keyspace(OLD_MESSAGES, KeyspaceCreateOptions::default)
            .map_err(|e| self.fail("opening the old messages keyspace", e))?;
        loop {
            let mut batch = self.db.batch();
            let mut bytes = 0;
            let mut moved = 0;
            for guard in old.iter() {
                let (key, value) = guard
                    .into_inner()
                    .map_err(|e| self.fail("reading the old messages keyspace", e))?;
                let topic_id = be_u64(&key).unwrap_or_default();
                let offset = message_offset(topic_id, &key)?;
                let timestamp_ms = split_value(topic_id, offset, &value)?;
                let seg = Segment {
                    first: offset,
                    timestamps: vec![timestamp_ms],
                    batch: Batch {
                        lens: vec![(value.len() - 8) as u32],
                        data: Bytes::from(value).slice(8..),
                    },
                };
                bytes += seg.batch.data.len();
                batch.insert(&self.keyspaces[MESSAGES], key.clone(), seg.encode());
                batch.remove(&old, key);
                moved += 1;
                if bytes >= MIGRATE_BYTES {
                    break;
                }
            }
            if moved == 0 {
                break;
            }
            batch
                .commit()
                .map_err(|e| self.fail("moving old messages", e))?;
            tracing::info!(moved, "moved messages to the batch storage format");
        }
        self.db
            .delete_keyspace(old)
            .map_err(|e| self.fail("removing the old messages keyspace", e))?;
        self.persist(true)
    }

    /// The topic's [`Bounds`]: cached in `known`, or `start` 0 and `end` read from the
    /// topic's last record.
    fn bounds(&self, known: &mut HashMap<u64, Bounds>, topic_id: u64) -> Result<Bounds> {
        if let Some(&b) = known.get(&topic_id) {
            return Ok(b);
        }
        let end = match self.last_record(topic_id)? {
            Some((first, count)) => first + u64::from(count),
            None => 0,
        };
        let b = Bounds { start: 0, end };
        known.insert(topic_id, b);
        Ok(b)
    }

    /// First offset and message count of the topic's last record.
    fn last_record(&self, topic_id: u64) -> Result<Option<(u64, u32)>> {
        let Some(guard) = self.keyspaces[MESSAGES]
            .prefix(topic_id.to_be_bytes())
            .next_back()
        else {
            return Ok(None);
        };
        let (key, value) = guard
            .into_inner()
            .map_err(|e| self.fail(&format!("reading topic {topic_id}"), e))?;
        let first = message_offset(topic_id, &key)?;
        Ok(Some((first, record_count(topic_id, first, &value)?)))
    }

    /// Decodes one stored record of `topic_id`.
    fn record(&self, topic_id: u64, guard: fjall::Guard) -> Result<Segment> {
        let (key, value) = guard
            .into_inner()
            .map_err(|e| self.fail(&format!("reading topic {topic_id}"), e))?;
        let first = message_offset(topic_id, &key)?;
        // With fjall's `bytes_1` feature the value already is a `Bytes`, so the payloads
        // are views into it rather than copies.
        Segment::decode(topic_id, first, Bytes::from(value))
    }

    /// How many deleted topics still have records being removed.
    pub fn reclaim_pending(&self) -> usize {
        self.doomed().len()
    }

    fn doomed(&self) -> std::sync::MutexGuard<'_, BTreeSet<u64>> {
        // A set insert or remove cannot be left half done.
        self.doomed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn is_doomed(&self, topic_id: u64) -> bool {
        self.doomed().contains(&topic_id)
    }

    /// Deleted topics whose records are not all removed yet, from their markers.
    fn unreclaimed(&self) -> Result<BTreeSet<u64>> {
        let mut ids = BTreeSet::new();
        for guard in self.keyspaces[RECLAIM].iter() {
            let key = guard
                .key()
                .map_err(|e| self.fail("reading the deleted topics", e))?;
            match <[u8; 8]>::try_from(key.as_ref()) {
                Ok(id) => ids.insert(u64::from_be_bytes(id)),
                Err(_) => {
                    return Err(StoreError::Corrupt(format!(
                        "a deleted topic's id of {} bytes",
                        key.len()
                    )));
                }
            };
        }
        Ok(ids)
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

/// The `reclaim` key of a deleted topic: its id, big-endian.
fn reclaim_key(topic_id: u64) -> Vec<u8> {
    topic_id.to_be_bytes().to_vec()
}

/// The topic an op writes records or positions of, if any.
fn written_topic(op: &Op) -> Option<u64> {
    match op {
        Op::PutTopic { meta, .. } => Some(meta.id),
        Op::Append { topic_id, .. }
        | Op::Truncate { topic_id, .. }
        | Op::SetOffset { topic_id, .. } => Some(*topic_id),
        _ => None,
    }
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

/// The timestamp of a message value of the old one-key-per-message layout (timestamp ‖
/// payload), which only the move to records at open still reads.
fn split_value(topic_id: u64, offset: u64, value: &[u8]) -> Result<u64> {
    be_u64(value).ok_or_else(|| {
        StoreError::Corrupt(format!(
            "message {offset} of topic {topic_id} is {} bytes, shorter than its timestamp",
            value.len()
        ))
    })
}

/// The records of the topics one `apply` changes: each topic's [`Log`] holds its new
/// records plus the stored ones that the apply's cuts reach, which are read in on demand.
/// At commit, the log's segments are written and every stored record read in that is no
/// longer there is removed, so no key gets both an insert and a removal.
#[derive(Default)]
struct Records {
    topics: HashMap<u64, TopicRecords>,
}

#[derive(Default)]
struct TopicRecords {
    log: Log,
    /// First offsets of the stored records now owned by `log`.
    loaded: BTreeSet<u64>,
    /// The topic was deleted in this apply: every stored record is in `loaded`.
    cleared: bool,
    /// The highest truncation of this apply: every stored record starting below it was
    /// read into `log` (and cut there).
    below: u64,
}

impl Records {
    /// Reads into the topic's log every stored record holding messages `from..to` that
    /// it does not have yet.
    fn load(
        &mut self,
        backend: &FjallBackend,
        known: &mut HashMap<u64, Bounds>,
        topic_id: u64,
        from: u64,
        to: u64,
    ) -> Result<()> {
        let Bounds { start, end } = backend.bounds(known, topic_id)?;
        let t = self.topics.entry(topic_id).or_default();
        if from >= to || from >= end || to <= start || t.cleared {
            return Ok(());
        }
        let ks = &backend.keyspaces[MESSAGES];
        let from = from.max(start);
        let before = ks
            .range(message_key(topic_id, start)..message_key(topic_id, from))
            .next_back();
        let inside = ks.range(message_key(topic_id, from)..message_key(topic_id, to.min(end)));
        for guard in before.into_iter().chain(inside) {
            let seg = backend.record(topic_id, guard)?;
            if seg.end() > from && t.loaded.insert(seg.first) {
                t.log.segments.insert(seg.first, seg);
            }
        }
        Ok(())
    }

    /// Stores `seg` in the topic, replacing whatever it overlaps.
    fn append(
        &mut self,
        backend: &FjallBackend,
        known: &mut HashMap<u64, Bounds>,
        topic_id: u64,
        seg: Segment,
    ) -> Result<()> {
        self.load(backend, known, topic_id, seg.first, seg.end())?;
        self.topics.entry(topic_id).or_default().log.append(seg);
        Ok(())
    }

    /// Removes the topic's messages below `below`.
    fn truncate(
        &mut self,
        backend: &FjallBackend,
        known: &mut HashMap<u64, Bounds>,
        topic_id: u64,
        below: u64,
    ) -> Result<()> {
        self.load(backend, known, topic_id, 0, below)?;
        let t = self.topics.entry(topic_id).or_default();
        t.log.cut(0, below);
        t.below = t.below.max(below);
        Ok(())
    }

    /// Drops what this apply was going to write for the topic (it is being deleted; what
    /// is stored is reclaimed later).
    fn forget(&mut self, topic_id: u64) {
        self.topics.remove(&topic_id);
    }

    /// Removes every message of the topic, stored or written earlier in this apply.
    fn delete(&mut self, backend: &FjallBackend, topic_id: u64) -> Result<()> {
        let keys = backend.stored_keys(MESSAGES, &topic_id.to_be_bytes(), None)?;
        let t = self.topics.entry(topic_id).or_default();
        for key in keys {
            t.loaded.insert(message_offset(topic_id, &key)?);
        }
        t.log.segments.clear();
        t.cleared = true;
        Ok(())
    }

    /// Adds the changes to `batch`; returns each topic's [`Bounds`] once the batch is
    /// committed, given those `known` before this apply.
    fn write(
        self,
        backend: &FjallBackend,
        known: &HashMap<u64, Bounds>,
        batch: &mut fjall::OwnedWriteBatch,
    ) -> Vec<(u64, Bounds)> {
        let ks = &backend.keyspaces[MESSAGES];
        let mut after = Vec::with_capacity(self.topics.len());
        for (topic_id, t) in self.topics {
            for first in &t.loaded {
                if !t.log.segments.contains_key(first) {
                    batch.remove(ks, message_key(topic_id, *first));
                }
            }
            for seg in t.log.segments.values() {
                batch.insert(ks, message_key(topic_id, seg.first), seg.encode());
            }
            // Stored records outside the log were not touched: they start at or after the
            // old start and the truncation point, and end by the old end.
            let old = match known.get(&topic_id) {
                _ if t.cleared => Bounds { start: 0, end: 0 },
                Some(b) => *b,
                // Every op but a deletion reads the bounds first, so this is not reached;
                // without them nothing is known to keep.
                None => continue,
            };
            let first = t.log.segments.keys().next().copied();
            let last = t.log.segments.values().next_back().map(Segment::end);
            let start = old.start.max(t.below);
            after.push((
                topic_id,
                Bounds {
                    start: first.map_or(start, |f| f.min(start)),
                    end: last.map_or(old.end, |e| e.max(old.end)),
                },
            ));
        }
        after
    }
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
        let mut known = self
            .apply_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut pending = Pending::default();
        let mut records = Records::default();
        let mut deleted: Vec<u64> = Vec::new();
        let mut revived: Vec<u64> = Vec::new();
        for op in ops {
            // An id deleted before (in an earlier apply or this one) and written again,
            // which a peer never does since it does not reuse ids, must not lose the new
            // writes to the reclaim of the old ones: its old records go now, in this write.
            if let Some(id) = written_topic(op)
                && (deleted.contains(&id) || (self.is_doomed(id) && !revived.contains(&id)))
            {
                records.delete(self, id)?;
                pending.remove(RECLAIM, reclaim_key(id));
                deleted.retain(|&d| d != id);
                revived.push(id);
            }
            match op {
                Op::PutTopic { name, meta } => {
                    let value = postcard::to_stdvec(meta).map_err(|e| {
                        StoreError::Backend(format!("cannot encode the meta of topic {name}: {e}"))
                    })?;
                    pending.put(TOPICS, name.as_bytes().to_vec(), value.into());
                }
                Op::DeleteTopic { name, id } => {
                    pending.remove(TOPICS, name.as_bytes().to_vec());
                    // Its records go later, a step at a time (`reclaim`); appends of this
                    // apply still reach the disk, and are reclaimed with the rest.
                    records.forget(*id);
                    known.remove(id);
                    deleted.push(*id);
                    // Stored with the deletion, so a restart carries on removing.
                    pending.put(RECLAIM, reclaim_key(*id), Vec::<u8>::new().into());
                    pending.remove_range(self, OFFSETS, &id.to_be_bytes(), None)?;
                }
                Op::Append {
                    topic_id,
                    first_offset,
                    timestamps,
                    batch,
                } => {
                    let seg = Segment {
                        first: *first_offset,
                        timestamps: timestamps.clone(),
                        batch: batch.clone(),
                    };
                    records.append(self, &mut known, *topic_id, seg)?;
                }
                Op::Truncate { topic_id, below } => {
                    records.truncate(self, &mut known, *topic_id, *below)?;
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
        let mut batch = self.db.batch().durability(None);
        let changed = records.write(self, &known, &mut batch);
        for ((ks, key), value) in pending.writes {
            match value {
                Some(value) => batch.insert(&self.keyspaces[ks], key, value),
                None => batch.remove(&self.keyspaces[ks], key),
            }
        }
        batch.commit().map_err(|e| self.fail("write failed", e))?;
        known.extend(changed);
        let mut doomed = self.doomed();
        for id in revived {
            doomed.remove(&id);
        }
        doomed.extend(deleted);
        Ok(())
    }

    fn reclaim(&self) -> Result<bool> {
        let _turn = self
            .apply_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(id) = self.doomed().first().copied() else {
            return Ok(false);
        };
        let keys: Vec<Slice> = self.keyspaces[MESSAGES]
            .prefix(id.to_be_bytes())
            .take(RECLAIM_KEYS)
            .map(|guard| {
                guard
                    .key()
                    .map_err(|e| self.fail(&format!("reclaiming topic {id}"), e))
            })
            .collect::<Result<_>>()?;
        let done = keys.len() < RECLAIM_KEYS;
        let mut batch = self.db.batch().durability(None);
        for key in keys {
            batch.remove(&self.keyspaces[MESSAGES], key);
        }
        if done {
            // In the same write as the last records, so the marker never outlives them.
            batch.remove(&self.keyspaces[RECLAIM], reclaim_key(id));
        }
        batch
            .commit()
            .map_err(|e| self.fail(&format!("reclaiming topic {id}"), e))?;
        if done {
            self.doomed().remove(&id);
        }
        Ok(!self.doomed().is_empty())
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
        if max_count == 0 || self.is_doomed(topic_id) {
            return Ok(messages);
        }
        // The record holding `from` starts at or before it; the rest start after it.
        // Two scans, so both read one snapshot: a truncation or an overwrite committed in
        // between rewrites the record holding `from` under a later key, which the second
        // scan would otherwise return again.
        let ks = &self.keyspaces[MESSAGES];
        let snapshot = self.db.snapshot();
        let before = snapshot
            .range(ks, message_key(topic_id, 0)..=message_key(topic_id, from))
            .next_back();
        let after = snapshot.range(
            ks,
            message_key(topic_id, from.saturating_add(1))..=message_key(topic_id, u64::MAX),
        );
        let mut bytes = 0usize;
        for guard in before.into_iter().chain(after) {
            let seg = self.record(topic_id, guard)?;
            for m in seg.messages_from(from) {
                if !read_fits(messages.len(), bytes, m.payload.len(), max_count, max_bytes) {
                    return Ok(messages);
                }
                bytes += m.payload.len();
                messages.push(m);
            }
        }
        Ok(messages)
    }

    fn last_offset(&self, topic_id: u64) -> Result<Option<u64>> {
        if self.is_doomed(topic_id) {
            return Ok(None);
        }
        Ok(self
            .last_record(topic_id)?
            .and_then(|(first, count)| (first + u64::from(count)).checked_sub(1)))
    }

    fn sizes(&self, topic_id: u64) -> Result<Vec<(u64, u64, u32)>> {
        let mut sizes = Vec::new();
        if self.is_doomed(topic_id) {
            return Ok(sizes);
        }
        for guard in self.keyspaces[MESSAGES].prefix(topic_id.to_be_bytes()) {
            sizes.extend(self.record(topic_id, guard)?.sizes());
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
