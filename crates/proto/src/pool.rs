//! Reused buffers for file pieces.
//!
//! A download moves each piece through a buffer on the sending side (read from the file)
//! and one on the receiving side (out of the socket's read buffer), a megabyte at a time.
//! Fresh buffers of that size come straight from the kernel (`mmap`), so every byte of a
//! download would also cost a page fault and a page clearing on both sides, more than the
//! copies themselves. A buffer taken here goes back to a small process-wide free list when
//! the last [`Bytes`] sharing it is dropped, so a steady transfer faults its buffers in once.

use std::sync::Mutex;

use bytes::Bytes;

/// Buffers smaller than this are not worth keeping: the allocator serves them from its
/// own free lists.
const MIN_POOLED: usize = 64 << 10;
/// Buffers larger than this are not kept: no piece is that big.
const MAX_POOLED: usize = 16 << 20;
/// What the free list may hold in all, so an idle process keeps at most this much.
const KEEP_BYTES: usize = 32 << 20;

static FREE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// The owner behind a pooled [`Bytes`]; gives its buffer back when dropped.
struct Pooled(Vec<u8>);

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        give_back(std::mem::take(&mut self.0));
    }
}

/// An empty buffer with room for `len` bytes, from the free list when one fits.
fn take(len: usize) -> Vec<u8> {
    if len >= MIN_POOLED {
        let mut free = FREE.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = free.iter().position(|b| b.capacity() >= len) {
            let mut buf = free.swap_remove(i);
            buf.clear();
            return buf;
        }
    }
    Vec::with_capacity(len)
}

fn give_back(buf: Vec<u8>) {
    let cap = buf.capacity();
    if !(MIN_POOLED..=MAX_POOLED).contains(&cap) {
        return;
    }
    let mut free = FREE.lock().unwrap_or_else(|p| p.into_inner());
    let held: usize = free.iter().map(Vec::capacity).sum();
    if held + cap <= KEEP_BYTES {
        free.push(buf);
    }
}

fn share(buf: Vec<u8>) -> Bytes {
    if buf.capacity() >= MIN_POOLED {
        Bytes::from_owner(Pooled(buf))
    } else {
        Bytes::from(buf)
    }
}

/// `len` bytes written by `fill`, in a reused buffer (for example a piece read from a file).
pub fn filled<E>(len: usize, fill: impl FnOnce(&mut [u8]) -> Result<(), E>) -> Result<Bytes, E> {
    let mut buf = take(len);
    buf.resize(len, 0);
    fill(&mut buf)?;
    Ok(share(buf))
}

/// A copy of `data` in a reused buffer.
pub fn copy(data: &[u8]) -> Bytes {
    let mut buf = take(data.len());
    buf.extend_from_slice(data);
    share(buf)
}

/// Deserializes bytes into a reused buffer; for `#[serde(deserialize_with)]` on large
/// byte fields that are consumed right after decoding.
pub(crate) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
    struct Visitor;
    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = Bytes;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
            Ok(copy(v))
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
            let mut buf = take(seq.size_hint().unwrap_or(0));
            while let Some(b) = seq.next_element::<u8>()? {
                buf.push(b);
            }
            Ok(share(buf))
        }
    }
    d.deserialize_bytes(Visitor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_piece_buffer_is_reused() {
        let data = vec![7u8; MIN_POOLED + 1];
        let first = copy(&data);
        assert_eq!(&first[..], &data[..]);
        let at = first.as_ptr();
        drop(first);
        // Other tests may take the same buffer in between, so look for it among several.
        let again: Vec<Bytes> = (0..8)
            .map(|i| {
                filled(MIN_POOLED, |b| {
                    b.fill(i);
                    Ok::<_, ()>(())
                })
                .unwrap()
            })
            .collect();
        assert!(again.iter().any(|b| b.as_ptr() == at));
        for (i, b) in again.iter().enumerate() {
            assert!(b.iter().all(|&x| x == i as u8));
        }
    }

    #[test]
    fn small_buffers_are_plain_copies() {
        let b = copy(b"abc");
        assert_eq!(&b[..], b"abc");
    }
}
