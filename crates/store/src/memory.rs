//! The in-memory backend: same semantics as the fjall one, nothing survives the process.

use std::collections::{BTreeMap, HashMap};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use peerbus_proto::Message;

use crate::segment::{Log, Segment};
use crate::{Backend, Op, Result, Table, TopicMeta, read_fits, validate};

/// Storage in ordered maps, for tests and for nodes that need no durability.
#[derive(Default)]
pub struct MemoryBackend {
    state: RwLock<State>,
}

impl std::fmt::Debug for MemoryBackend {
    // The contents could be every message of every topic: far too much for a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBackend").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    topics: BTreeMap<String, TopicMeta>,
    /// Topic id → its messages.
    logs: HashMap<u64, Log>,
    /// (topic id, subscriber) → committed offset.
    offsets: BTreeMap<(u64, String), u64>,
    tables: [BTreeMap<Vec<u8>, Vec<u8>>; 4],
}

impl MemoryBackend {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    // A panic while holding the lock cannot leave a half-applied write (ops are validated
    // before any change, and the changes themselves do not panic), so poisoning is ignored.
    fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }
}

impl Backend for MemoryBackend {
    fn apply(&self, ops: &[Op]) -> Result<()> {
        validate(ops)?;
        let mut state = self.write_state();
        for op in ops {
            match op {
                Op::PutTopic { name, meta } => {
                    state.topics.insert(name.clone(), meta.clone());
                }
                Op::DeleteTopic { name, id } => {
                    state.topics.remove(name);
                    state.logs.remove(id);
                    let doomed: Vec<(u64, String)> = state
                        .offsets
                        .range((*id, String::new())..)
                        .take_while(|((t, _), _)| t == id)
                        .map(|(key, _)| key.clone())
                        .collect();
                    for key in doomed {
                        state.offsets.remove(&key);
                    }
                }
                Op::Append {
                    topic_id,
                    first_offset,
                    timestamps,
                    batch,
                } => {
                    if !batch.is_empty() {
                        state.logs.entry(*topic_id).or_default().append(Segment {
                            first: *first_offset,
                            timestamps: timestamps.clone(),
                            batch: batch.clone(),
                        });
                    }
                }
                Op::Truncate { topic_id, below } => {
                    if let Some(log) = state.logs.get_mut(topic_id) {
                        log.cut(0, *below);
                        if log.segments.is_empty() {
                            state.logs.remove(topic_id);
                        }
                    }
                }
                Op::SetOffset {
                    topic_id,
                    subscriber,
                    offset,
                } => {
                    state
                        .offsets
                        .insert((*topic_id, subscriber.clone()), *offset);
                }
                Op::DeleteOffset {
                    topic_id,
                    subscriber,
                } => {
                    state.offsets.remove(&(*topic_id, subscriber.clone()));
                }
                Op::Put { table, key, value } => {
                    state.tables[table.index()].insert(key.clone(), value.clone());
                }
                Op::Remove { table, key } => {
                    state.tables[table.index()].remove(key);
                }
            }
        }
        Ok(())
    }

    fn persist(&self, _sync: bool) -> Result<()> {
        Ok(())
    }

    fn topics(&self) -> Result<Vec<(String, TopicMeta)>> {
        let state = self.read_state();
        Ok(state
            .topics
            .iter()
            .map(|(name, meta)| (name.clone(), meta.clone()))
            .collect())
    }

    fn read(
        &self,
        topic_id: u64,
        from: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<Message>> {
        let state = self.read_state();
        let mut messages = Vec::new();
        let mut bytes = 0usize;
        let Some(log) = state.logs.get(&topic_id) else {
            return Ok(messages);
        };
        for m in log.messages_from(from) {
            if !read_fits(messages.len(), bytes, m.payload.len(), max_count, max_bytes) {
                break;
            }
            bytes += m.payload.len();
            messages.push(m);
        }
        Ok(messages)
    }

    fn last_offset(&self, topic_id: u64) -> Result<Option<u64>> {
        let state = self.read_state();
        Ok(state
            .logs
            .get(&topic_id)
            .and_then(|log| log.segments.values().next_back())
            .map(|seg| seg.end() - 1))
    }

    fn sizes(&self, topic_id: u64) -> Result<Vec<(u64, u64, u32)>> {
        let state = self.read_state();
        Ok(state.logs.get(&topic_id).map_or_else(Vec::new, |log| {
            log.segments.values().flat_map(Segment::sizes).collect()
        }))
    }

    fn offsets(&self, topic_id: u64) -> Result<Vec<(String, u64)>> {
        let state = self.read_state();
        // Subscribers sort by their UTF-8 bytes here as in fjall, since `str` orders bytewise.
        Ok(state
            .offsets
            .range((topic_id, String::new())..)
            .take_while(|((t, _), _)| *t == topic_id)
            .map(|((_, subscriber), &offset)| (subscriber.clone(), offset))
            .collect())
    }

    fn scan(&self, table: Table) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let state = self.read_state();
        Ok(state.tables[table.index()]
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.read_state().tables[table.index()].get(key).cloned())
    }
}
