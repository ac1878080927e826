//! The peerbus wire protocol: every type that crosses a socket, the rules for names, and the
//! length-prefixed frame codec.
//!
//! A frame is a big-endian `u32` body length followed by a postcard-encoded body. The first
//! frame a client sends is [`ClientFrame::Hello`]; the server answers [`ServerFrame::Welcome`]
//! or [`ServerFrame::Refused`]. After that, requests carry a `u32` id that the response echoes,
//! so many requests may be in flight on one connection. Push deliveries are
//! [`ServerFrame::Delivery`] frames tagged with the subscription id the client chose.
//!
//! Enum variant order is part of the wire format: new variants go at the end.

mod codec;
mod message;
mod names;
pub mod pool;

pub use codec::{
    CodecError, DEFAULT_MAX_FRAME, FRAME_HEADER, FrameCodec, MAX_HELLO_FRAME, decode_client,
    decode_server, encode_frame,
};
pub use message::*;
pub use names::{NameError, validate_peer_name, validate_subscriber, validate_topic};

/// The protocol string a client sends in its hello; servers refuse any other.
pub const PROTOCOL: &str = "peerbus/1";

/// Entries one list answer carries at most; longer lists are paged.
pub const LIST_PAGE: usize = 10_000;

/// Peers one [`Request::ListPeers`] answer carries at most (at 255-byte names and
/// addresses, about 4 MiB).
pub const PEER_PAGE: usize = 4096;

/// Hits one [`Request::SearchFiles`] answer carries at most.
pub const FILE_PAGE: usize = 1024;

/// Bytes of hits one [`Request::SearchFiles`] answer carries at most (roughly: names,
/// hashes and holders), since one file may have many holders.
pub const FILE_PAGE_BYTES: usize = 4 << 20;

/// The page of `hits` that follows `after` (a `(name, hash)`) in `(name, hash)` order: at
/// most [`FILE_PAGE`] hits and about [`FILE_PAGE_BYTES`] (always at least one hit when any
/// follows). Index and peers answer [`Request::SearchFiles`] with it. Linear in the number
/// of hits, however far the page is into them.
pub fn page_of_hits(hits: Vec<FileHit>, after: Option<&(String, String)>) -> Vec<FileHit> {
    let mut rest: Vec<FileHit> = match after {
        Some((name, hash)) => hits
            .into_iter()
            .filter(|h| (h.name.as_str(), h.hash.as_str()) > (name.as_str(), hash.as_str()))
            .collect(),
        None => hits,
    };
    let by_key = |a: &FileHit, b: &FileHit| (&a.name, &a.hash).cmp(&(&b.name, &b.hash));
    if rest.len() > FILE_PAGE {
        rest.select_nth_unstable_by(FILE_PAGE, by_key);
        rest.truncate(FILE_PAGE);
    }
    rest.sort_unstable_by(by_key);
    let mut bytes = 0;
    let mut keep = 0;
    for h in &rest {
        let size = 96
            + h.name.len()
            + h.hash.len()
            + h.peers
                .iter()
                .map(|p| 16 + p.name.len() + p.addr.len())
                .sum::<usize>();
        if keep > 0 && bytes + size > FILE_PAGE_BYTES {
            break;
        }
        bytes += size;
        keep += 1;
    }
    rest.truncate(keep);
    rest
}

/// Topics one [`Request::SyncTopics`] chunk carries at most (at 255 bytes a name, about
/// 4 MiB: well under the frame limit).
pub const SYNC_TOPICS_CHUNK: usize = 16_384;

/// Files one [`Request::SyncFiles`] chunk carries at most.
pub const SYNC_FILES_CHUNK: usize = 4_096;

/// Messages one publish may carry: a bound on what a batch of tiny or empty messages costs
/// a host beside its payload (lengths, timestamps, retention entries).
pub const MAX_BATCH_MESSAGES: usize = 1 << 18;

/// Topics one [`Request::CreateTopics`] may create: enough to make a million topics in 50
/// requests, few enough that the index places one request's topics (under the lock that
/// lease renewals also need) in milliseconds, and that a peer's in-memory topics for it stay
/// a bounded cost of one request.
pub const MAX_CREATE_TOPICS: usize = 20_000;

/// Refuses a [`Request::CreateTopics`] of more than [`MAX_CREATE_TOPICS`] topics.
pub fn check_create_count(count: usize) -> Result<(), WireError> {
    if count > MAX_CREATE_TOPICS {
        return Err(WireError::new(
            ErrorCode::TooLarge,
            format!(
                "a request to create {count} topics is over the {MAX_CREATE_TOPICS} topic \
                 limit of one request: send them in parts"
            ),
        ));
    }
    Ok(())
}

/// The largest payload a single message may carry by default (8 MiB).
pub const DEFAULT_MAX_PAYLOAD: usize = 8 * 1024 * 1024;

/// True when `s` spells a BLAKE3 hash: 64 hex digits (either case).
pub fn is_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Compares secrets (tokens, cookies) in time that depends only on their lengths, so a
/// client cannot find one byte by byte from how fast wrong guesses are refused.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod secret_tests {
    use super::same_secret;

    #[test]
    fn secrets_match_only_when_equal() {
        assert!(same_secret(b"token", b"token"));
        assert!(same_secret(b"", b""));
        assert!(!same_secret(b"token", b"tokem"));
        assert!(!same_secret(b"token", b"token2"));
        assert!(!same_secret(b"token", b""));
    }
}

#[cfg(test)]
mod page_tests {
    use super::*;

    fn hit(name: &str, hash: char, holders: usize) -> FileHit {
        FileHit {
            name: name.into(),
            size: 1,
            hash: hash.to_string().repeat(64),
            peers: (0..holders)
                .map(|i| FileHolder {
                    peer_id: i as u64,
                    name: format!("peer{i}"),
                    addr: "x".repeat(200),
                })
                .collect(),
        }
    }

    #[test]
    fn pages_follow_name_then_hash_order_and_end_empty() {
        let hits: Vec<FileHit> = (0..FILE_PAGE + 10)
            .map(|i| hit(&format!("f{:05}", (i * 7919) % (FILE_PAGE + 10)), 'a', 1))
            .chain([hit("f00003", 'b', 1)])
            .collect();
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = page_of_hits(hits.clone(), after.as_ref());
            if page.is_empty() {
                break;
            }
            assert!(page.len() <= FILE_PAGE);
            after = page.last().map(|h| (h.name.clone(), h.hash.clone()));
            seen.extend(page.into_iter().map(|h| (h.name, h.hash)));
        }
        assert_eq!(seen.len(), FILE_PAGE + 11, "every hit once");
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "in order, no repeats");
    }

    #[test]
    fn a_page_is_bounded_in_bytes_but_never_empty_when_hits_follow() {
        // Files with a thousand holders each: about 230 KB a hit.
        let hits: Vec<FileHit> = (0..40)
            .map(|i| hit(&format!("f{i:02}"), 'a', 1000))
            .collect();
        let page = page_of_hits(hits.clone(), None);
        assert!(page.len() < 40 && !page.is_empty(), "{}", page.len());
        let huge = vec![hit("one", 'a', 30_000)];
        assert_eq!(page_of_hits(huge, None).len(), 1);
    }
}
