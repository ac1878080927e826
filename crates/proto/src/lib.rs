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
