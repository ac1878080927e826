//! Durable storage for peerbus nodes.
//!
//! Everything a node keeps across restarts goes through the small synchronous [`Backend`]
//! trait: topic logs, subscriber offsets, and registry tables. [`FjallBackend`] keeps them on
//! disk; [`MemoryBackend`] has the same semantics in memory, for tests and for nodes that do
//! not need durability. Writes reach a backend through one [`Writer`] thread per node, which
//! batches whatever is queued into one atomic write and one fsync (group commit), so many
//! small publishes cost one disk flush instead of one each.
//!
//! Key layout (big-endian integers, so a range scan yields offsets in order):
//!
//! | keyspace    | key                                  | value                          |
//! |-------------|--------------------------------------|--------------------------------|
//! | `topics`    | topic name                           | postcard([`TopicMeta`])        |
//! | `batches`   | topic id (u64) ‖ first offset (u64)  | one publish's messages (below) |
//! | `offsets`   | topic id (u64) ‖ subscriber (UTF-8)  | offset (u64)                   |
//! | [`Table`]s  | caller's key                         | caller's value                 |
//!
//! A `batches` record holds the messages of one publish, as Kafka keeps a record batch:
//! format (u8: one shared timestamp or one each), count (u32), the timestamp(s) (u64 ms),
//! the payload lengths (u32 each), then the payloads. Storing a publish is one insert
//! rather than one per message, which is what makes `sync` durability keep up with
//! `memory`. A truncation or an overlapping append rewrites the records it cuts.
//!
//! All topics share the `batches` and `offsets` keyspaces: a keyspace per topic would cost
//! a journal-tracked LSM tree per topic and make topic creation a schema change.

#![warn(missing_docs)]

mod fjall_backend;
mod memory;
mod segment;
mod writer;

pub use fjall_backend::FjallBackend;
pub use memory::MemoryBackend;
pub use writer::Writer;

use peerbus_proto::{Batch, Message, Retention};
use serde::{Deserialize, Serialize};

/// The result of every storage operation.
pub type Result<T> = std::result::Result<T, StoreError>;

/// Why a storage operation failed.
///
/// Clone-able so one failed group commit can be reported to every waiting job.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The storage engine or the file system failed, or a write was refused before anything
    /// was applied; the message says what and why, with the path where known.
    #[error("storage error: {0}")]
    Backend(String),
    /// Stored bytes do not decode; the message names the record.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The [`Writer`] was shut down (or its thread died) before the job could run.
    #[error("the storage writer has stopped")]
    Closed,
    /// An earlier write failed (a full disk, an I/O error), so the writer refuses every
    /// later one: what reached storage stays a gap-free prefix of what was submitted.
    #[error(
        "storage refuses writes since an earlier write failed ({0}); free the disk or fix the error, then restart the node"
    )]
    Failed(String),
}

/// Registry tables, used by the index server and by peers for their own identity and state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    /// Node identity and settings (keyspace `meta`).
    Meta,
    /// Known peers (keyspace `peers`).
    Peers,
    /// Topic locations (keyspace `directory`).
    Directory,
    /// Shared files (keyspace `files`).
    Files,
}

impl Table {
    /// The name of the table's keyspace on disk; part of the storage format.
    pub(crate) fn keyspace_name(self) -> &'static str {
        match self {
            Table::Meta => "meta",
            Table::Peers => "peers",
            Table::Directory => "directory",
            Table::Files => "files",
        }
    }

    fn index(self) -> usize {
        match self {
            Table::Meta => 0,
            Table::Peers => 1,
            Table::Directory => 2,
            Table::Files => 3,
        }
    }
}

/// Per-topic metadata persisted in the `topics` keyspace (key = topic name), postcard-encoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicMeta {
    /// Topic id, used as the key prefix of the topic's messages and offsets so that renaming
    /// or recreating a topic never collides with data of an older topic of the same name.
    pub id: u64,
    /// Retention policy.
    pub retention: Retention,
    /// Offsets below this were deleted by retention; the next offset is
    /// `max(low, last stored + 1)`, so offsets are never reused even when the log is empty.
    pub low: u64,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
}

/// One write. A `Vec<Op>` is applied atomically (one fjall write batch), in order.
#[derive(Debug, Clone)]
pub enum Op {
    /// Creates or replaces a topic's metadata.
    PutTopic {
        /// The topic.
        name: String,
        /// Its metadata.
        meta: TopicMeta,
    },
    /// Removes the topic's meta, every message and every subscriber offset of `id`.
    DeleteTopic {
        /// The topic.
        name: String,
        /// Its id (from its [`TopicMeta`]).
        id: u64,
    },
    /// Message `i` gets offset `first_offset + i`, timestamp `timestamps[i]`, and the `i`-th
    /// payload of `batch`.
    Append {
        /// The topic's id.
        topic_id: u64,
        /// Offset of the first message.
        first_offset: u64,
        /// One publish time per payload, milliseconds since the Unix epoch.
        timestamps: Vec<u64>,
        /// The payloads.
        batch: Batch,
    },
    /// Deletes the topic's messages with offset < `below`.
    Truncate {
        /// The topic's id.
        topic_id: u64,
        /// First offset kept.
        below: u64,
    },
    /// Records a subscriber's committed offset.
    SetOffset {
        /// The topic's id.
        topic_id: u64,
        /// The subscriber's name.
        subscriber: String,
        /// The offset.
        offset: u64,
    },
    /// Forgets a subscriber's committed offset.
    DeleteOffset {
        /// The topic's id.
        topic_id: u64,
        /// The subscriber's name.
        subscriber: String,
    },
    /// Sets a registry value.
    Put {
        /// The table.
        table: Table,
        /// The key (1 to 65535 bytes).
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
    },
    /// Removes a registry value.
    Remove {
        /// The table.
        table: Table,
        /// The key.
        key: Vec<u8>,
    },
}

impl Op {
    /// Payload bytes the op writes, so the writer can bound how much one group commit holds.
    pub(crate) fn payload_bytes(&self) -> usize {
        match self {
            Op::Append { batch, .. } => batch.data.len(),
            Op::Put { key, value, .. } => key.len() + value.len(),
            _ => 0,
        }
    }
}

/// Synchronous storage operations. Implemented by [`FjallBackend`] and [`MemoryBackend`].
pub trait Backend: Send + Sync + 'static {
    /// Applies `ops` in order, atomically: either all of them take effect or none does.
    /// Does not fsync.
    fn apply(&self, ops: &[Op]) -> Result<()>;
    /// Makes everything applied so far durable: `sync` = fsync data, otherwise flush to the
    /// operating system (survives a process crash, not a power loss). A no-op in memory.
    fn persist(&self, sync: bool) -> Result<()>;
    /// Every topic with its meta, in name order.
    fn topics(&self) -> Result<Vec<(String, TopicMeta)>>;
    /// Messages of `topic_id` with offset >= `from`, ascending, at most `max_count` of them.
    /// Payloads add up to at most `max_bytes`, except that the first message is returned
    /// whatever its size, so a reader always makes progress.
    fn read(
        &self,
        topic_id: u64,
        from: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<Message>>;
    /// Highest stored offset of the topic, if any message is stored.
    fn last_offset(&self, topic_id: u64) -> Result<Option<u64>>;
    /// `(offset, timestamp_ms, payload_len)` of every stored message of the topic, ascending;
    /// used at start-up to rebuild retention accounting without loading payloads into the
    /// caller.
    fn sizes(&self, topic_id: u64) -> Result<Vec<(u64, u64, u32)>>;
    /// Committed offset of every subscriber of the topic, in subscriber order.
    fn offsets(&self, topic_id: u64) -> Result<Vec<(String, u64)>>;
    /// Every `(key, value)` of a registry table, in key order.
    fn scan(&self, table: Table) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;
    /// One registry value.
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Frees one step of the space deleted topics still take. A deletion takes the topic
    /// out at once (reads see none of it) but removes its records in steps afterwards, so
    /// deleting a topic of millions of records neither stalls every other write behind
    /// one huge one nor risks a write too large to make. Returns true while more is left;
    /// the writer calls it when it has nothing else to do.
    fn reclaim(&self) -> Result<bool> {
        Ok(false)
    }
}

/// fjall refuses empty keys and keys over 65535 bytes by panicking, so both backends check
/// limits up front and fail the whole `apply` before touching anything; the memory backend
/// checks the same limits so that both accept exactly the same writes.
const MAX_KEY: usize = u16::MAX as usize;
/// Values are limited to 32-bit lengths by fjall.
const MAX_VALUE: usize = u32::MAX as usize;

/// Checks every op of a write so a bad op cannot leave a half-applied write behind.
pub(crate) fn validate(ops: &[Op]) -> Result<()> {
    let invalid = |what: String| Err(StoreError::Backend(format!("refused write: {what}")));
    for op in ops {
        match op {
            Op::PutTopic { name, .. } | Op::DeleteTopic { name, .. } => {
                if name.is_empty() || name.len() > MAX_KEY {
                    return invalid(format!("topic name of {} bytes", name.len()));
                }
            }
            Op::Append {
                topic_id,
                first_offset,
                timestamps,
                batch,
            } => {
                if let Err(e) = batch.check() {
                    return invalid(format!("append to topic {topic_id}: {e}"));
                }
                if timestamps.len() != batch.len() {
                    return invalid(format!(
                        "append to topic {topic_id}: {} timestamps for {} payloads",
                        timestamps.len(),
                        batch.len()
                    ));
                }
                if first_offset.checked_add(batch.len() as u64).is_none() {
                    return invalid(format!(
                        "append to topic {topic_id}: offsets from {first_offset} overflow"
                    ));
                }
                if let Some(&len) = batch.lens.iter().find(|&&l| l as usize > MAX_VALUE - 8) {
                    return invalid(format!(
                        "append to topic {topic_id}: payload of {len} bytes"
                    ));
                }
            }
            Op::SetOffset {
                topic_id,
                subscriber,
                ..
            }
            | Op::DeleteOffset {
                topic_id,
                subscriber,
            } => {
                if subscriber.len() > MAX_KEY - 8 {
                    return invalid(format!(
                        "offset of topic {topic_id}: subscriber name of {} bytes",
                        subscriber.len()
                    ));
                }
            }
            Op::Put { table, key, value } => {
                if key.is_empty() || key.len() > MAX_KEY || value.len() > MAX_VALUE {
                    return invalid(format!(
                        "{} entry with a {}-byte key and a {}-byte value",
                        table.keyspace_name(),
                        key.len(),
                        value.len()
                    ));
                }
            }
            Op::Remove { table, key } => {
                if key.is_empty() || key.len() > MAX_KEY {
                    return invalid(format!(
                        "{} removal with a {}-byte key",
                        table.keyspace_name(),
                        key.len()
                    ));
                }
            }
            Op::Truncate { .. } => {}
        }
    }
    Ok(())
}

/// Whether one more payload of `len` bytes fits a read that already holds `count` messages
/// of `bytes` bytes; shared so both backends cut reads at exactly the same place.
pub(crate) fn read_fits(
    count: usize,
    bytes: usize,
    len: usize,
    max_count: usize,
    max_bytes: usize,
) -> bool {
    if count >= max_count {
        return false;
    }
    count == 0 || bytes.saturating_add(len) <= max_bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_cut_rules() {
        // The first message always goes, however large.
        assert!(read_fits(0, 0, 100, 10, 5));
        assert!(!read_fits(1, 100, 1, 10, 5));
        assert!(read_fits(1, 3, 2, 10, 5));
        assert!(!read_fits(1, 3, 3, 10, 5));
        assert!(!read_fits(2, 0, 0, 2, 5));
        assert!(!read_fits(0, 0, 0, 0, 5));
    }

    #[test]
    fn validate_refuses_inconsistent_appends() {
        let batch = Batch::from_payloads([b"a".as_slice(), b"b"]);
        let ok = Op::Append {
            topic_id: 1,
            first_offset: 0,
            timestamps: vec![1, 2],
            batch: batch.clone(),
        };
        assert!(validate(&[ok]).is_ok());
        let short = Op::Append {
            topic_id: 1,
            first_offset: 0,
            timestamps: vec![1],
            batch: batch.clone(),
        };
        assert!(matches!(validate(&[short]), Err(StoreError::Backend(_))));
        let overflow = Op::Append {
            topic_id: 1,
            first_offset: u64::MAX,
            timestamps: vec![1, 2],
            batch,
        };
        assert!(validate(&[overflow]).is_err());
        let empty_key = Op::Put {
            table: Table::Meta,
            key: vec![],
            value: vec![1],
        };
        assert!(validate(&[empty_key]).is_err());
    }
}
