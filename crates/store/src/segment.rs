//! A topic's messages kept as the batches they were published in.
//!
//! Both backends store a publish as one record instead of one per message, as Kafka does:
//! the memory backend as a [`Segment`] sharing the batch's buffer, the fjall backend as one
//! key whose value is [`Segment::encode`]d. Storing a batch then costs one insert, and the
//! per-message work left is a length and a timestamp in the record's header.

use std::collections::BTreeMap;

use bytes::Bytes;
use peerbus_proto::{Batch, Message};

use crate::{Result, StoreError};

/// One topic's segments, keyed by first offset and never overlapping. A segment cut by
/// retention or overwritten in part keeps sharing its buffer in memory, so a topic may hold
/// up to one batch's bytes more than its messages.
#[derive(Default)]
pub(crate) struct Log {
    pub(crate) segments: BTreeMap<u64, Segment>,
}

/// Messages `first..first + batch.len()`, with their timestamps.
#[derive(Debug, Clone)]
pub(crate) struct Segment {
    pub(crate) first: u64,
    pub(crate) timestamps: Vec<u64>,
    pub(crate) batch: Batch,
}

/// Record formats, the first byte of an encoded segment: every message has the same
/// timestamp (what a publish stores), or each has its own.
const ONE_TIMESTAMP: u8 = 0;
const TIMESTAMP_EACH: u8 = 1;

impl Segment {
    pub(crate) fn end(&self) -> u64 {
        self.first + self.batch.len() as u64
    }

    /// Messages `from..to` of this segment (offsets, clamped to it), sharing its buffer.
    pub(crate) fn slice(&self, from: u64, to: u64) -> Segment {
        let lo = (from.max(self.first) - self.first) as usize;
        let hi = (to.min(self.end()) - self.first) as usize;
        let start: usize = self.batch.lens[..lo].iter().map(|&l| l as usize).sum();
        let len: usize = self.batch.lens[lo..hi].iter().map(|&l| l as usize).sum();
        Segment {
            first: self.first + lo as u64,
            timestamps: self.timestamps[lo..hi].to_vec(),
            batch: Batch {
                lens: self.batch.lens[lo..hi].to_vec(),
                data: self.batch.data.slice(start..start + len),
            },
        }
    }

    /// The segment's messages from offset `from` on. Starts at `from` rather than skipping
    /// up to it, since a read may begin deep inside a batch of many thousand messages.
    pub(crate) fn messages_from(&self, from: u64) -> impl Iterator<Item = Message> + '_ {
        let lo = (from.max(self.first) - self.first).min(self.batch.len() as u64) as usize;
        let mut at: usize = self.batch.lens[..lo].iter().map(|&l| l as usize).sum();
        (lo..self.batch.len()).map(move |i| {
            let len = self.batch.lens[i] as usize;
            let payload = self.batch.data.slice(at..at + len);
            at += len;
            Message {
                offset: self.first + i as u64,
                timestamp_ms: self.timestamps[i],
                payload,
            }
        })
    }

    /// `(offset, timestamp_ms, payload_len)` of each message.
    pub(crate) fn sizes(&self) -> impl Iterator<Item = (u64, u64, u32)> + '_ {
        (0..self.batch.len()).map(|i| {
            (
                self.first + i as u64,
                self.timestamps[i],
                self.batch.lens[i],
            )
        })
    }

    /// The record value: format byte, message count (u32), the timestamp or timestamps
    /// (u64 each), the payload lengths (u32 each), then the payloads; big-endian.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let n = self.batch.len();
        let shared = self.timestamps.windows(2).all(|w| w[0] == w[1]);
        let stamps = if shared { 1 } else { n };
        let mut value = Vec::with_capacity(5 + 8 * stamps + 4 * n + self.batch.data.len());
        value.push(if shared {
            ONE_TIMESTAMP
        } else {
            TIMESTAMP_EACH
        });
        value.extend_from_slice(&(n as u32).to_be_bytes());
        for ts in &self.timestamps[..stamps.min(n)] {
            value.extend_from_slice(&ts.to_be_bytes());
        }
        for len in &self.batch.lens {
            value.extend_from_slice(&len.to_be_bytes());
        }
        value.extend_from_slice(&self.batch.data);
        value
    }

    /// Decodes a record of `topic_id` stored under offset `first`; the payloads are views
    /// into `value`, not copies.
    pub(crate) fn decode(topic_id: u64, first: u64, value: Bytes) -> Result<Segment> {
        let corrupt = |why: String| corrupt_record(topic_id, first, why);
        let n = record_count(topic_id, first, &value)? as usize;
        let stamps = match value[0] {
            ONE_TIMESTAMP => 1,
            TIMESTAMP_EACH => n,
            other => return Err(corrupt(format!("has unknown format {other}"))),
        };
        let header = 5 + 8 * stamps.min(n) + 4 * n;
        if value.len() < header {
            return Err(corrupt(format!(
                "is {} bytes, shorter than the header of its {n} messages",
                value.len()
            )));
        }
        let be = |at: usize, width: usize| {
            value[at..at + width]
                .iter()
                .fold(0u64, |acc, &b| acc << 8 | u64::from(b))
        };
        let ts_at = 5;
        let timestamps: Vec<u64> = (0..n)
            .map(|i| be(ts_at + 8 * if stamps == 1 { 0 } else { i }, 8))
            .collect();
        let lens_at = ts_at + 8 * stamps.min(n);
        let lens: Vec<u32> = (0..n).map(|i| be(lens_at + 4 * i, 4) as u32).collect();
        let total: u64 = lens.iter().map(|&l| u64::from(l)).sum();
        if total != (value.len() - header) as u64 {
            return Err(corrupt(format!(
                "holds {} payload bytes where its lengths add up to {total}",
                value.len() - header
            )));
        }
        if first.checked_add(n as u64).is_none() {
            return Err(corrupt(format!(
                "claims {n} messages, past the last offset"
            )));
        }
        Ok(Segment {
            first,
            timestamps,
            batch: Batch {
                lens,
                data: value.slice(header..),
            },
        })
    }
}

/// The message count of the record of `topic_id` stored under offset `first`, read
/// without decoding the rest.
pub(crate) fn record_count(topic_id: u64, first: u64, value: &[u8]) -> Result<u32> {
    match value.get(1..5) {
        Some(count) => Ok(u32::from_be_bytes(count.try_into().expect("four bytes"))),
        None => Err(corrupt_record(
            topic_id,
            first,
            format!("is {} bytes, shorter than its header", value.len()),
        )),
    }
}

fn corrupt_record(topic_id: u64, first: u64, why: String) -> StoreError {
    StoreError::Corrupt(format!(
        "the record of messages from {first} of topic {topic_id} {why}"
    ))
}

impl Log {
    /// Stores `seg`, replacing whatever it overlaps.
    pub(crate) fn append(&mut self, seg: Segment) {
        if seg.batch.is_empty() {
            return;
        }
        self.cut(seg.first, seg.end());
        self.segments.insert(seg.first, seg);
    }

    /// Removes messages `from..to`, keeping the parts of segments outside that range.
    pub(crate) fn cut(&mut self, from: u64, to: u64) {
        if from >= to {
            return;
        }
        // The segment starting before `from` may reach into the range; the others that
        // overlap start inside it.
        let mut hit: Vec<u64> = self
            .segments
            .range(..from)
            .next_back()
            .filter(|(_, seg)| seg.end() > from)
            .map(|(&k, _)| k)
            .into_iter()
            .collect();
        hit.extend(self.segments.range(from..to).map(|(&k, _)| k));
        for k in hit {
            let seg = self.segments.remove(&k).expect("listed above");
            if seg.first < from {
                let before = seg.slice(seg.first, from);
                self.segments.insert(before.first, before);
            }
            if seg.end() > to {
                let after = seg.slice(to, seg.end());
                self.segments.insert(after.first, after);
            }
        }
    }

    /// Every message from offset `from` on, in order.
    pub(crate) fn messages_from(&self, from: u64) -> impl Iterator<Item = Message> + '_ {
        let start = self
            .segments
            .range(..=from)
            .next_back()
            .filter(|(_, seg)| seg.end() > from)
            .map_or(from, |(&k, _)| k);
        self.segments
            .range(start..)
            .flat_map(move |(_, seg)| seg.messages_from(from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(first: u64, timestamps: Vec<u64>, payloads: &[&[u8]]) -> Segment {
        Segment {
            first,
            timestamps,
            batch: Batch::from_payloads(payloads),
        }
    }

    fn round_trip(seg: &Segment) -> Segment {
        Segment::decode(1, seg.first, Bytes::from(seg.encode())).unwrap()
    }

    #[test]
    fn records_round_trip() {
        for seg in [
            segment(5, vec![7, 7, 7], &[b"a", b"", b"ccc"]),
            segment(0, vec![1, 2], &[b"x", b"yy"]),
            segment(9, vec![3], &[b""]),
        ] {
            let back = round_trip(&seg);
            assert_eq!(back.timestamps, seg.timestamps);
            assert_eq!(back.batch, seg.batch);
            assert_eq!(back.first, seg.first);
        }
    }

    #[test]
    fn damaged_records_are_corrupt_not_panics() {
        let good = segment(3, vec![1, 2], &[b"ab", b"c"]).encode();
        let mut cases = vec![vec![], vec![0u8; 4], vec![9, 0, 0, 0, 1]];
        cases.push(good[..good.len() - 1].to_vec());
        cases.push(good[..8].to_vec());
        let mut longer = good.clone();
        longer.push(0);
        cases.push(longer);
        for value in cases {
            match Segment::decode(4, 3, Bytes::from(value.clone())) {
                Err(StoreError::Corrupt(msg)) => {
                    assert!(msg.contains("topic 4") && msg.contains("from 3"), "{msg}")
                }
                other => panic!("{value:?} decoded to {other:?}"),
            }
        }
    }

    #[test]
    fn cut_keeps_the_outside_parts() {
        let mut log = Log::default();
        log.append(segment(0, vec![1; 4], &[b"a", b"b", b"c", b"d"]));
        log.append(segment(4, vec![2; 2], &[b"e", b"f"]));
        log.cut(2, 5);
        let left: Vec<(u64, Bytes)> = log
            .messages_from(0)
            .map(|m| (m.offset, m.payload))
            .collect();
        assert_eq!(
            left,
            [
                (0, Bytes::from_static(b"a")),
                (1, Bytes::from_static(b"b")),
                (5, Bytes::from_static(b"f"))
            ]
        );
    }
}
