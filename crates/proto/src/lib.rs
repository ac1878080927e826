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
    CodecError, DEFAULT_MAX_FRAME, FRAME_HEADER, FrameCodec, decode_client, decode_server,
    encode_frame,
};
pub use message::*;
pub use names::{NameError, validate_peer_name, validate_subscriber, validate_topic};

/// The protocol string a client sends in its hello; servers refuse any other.
pub const PROTOCOL: &str = "peerbus/1";

/// The largest payload a single message may carry by default (8 MiB).
pub const DEFAULT_MAX_PAYLOAD: usize = 8 * 1024 * 1024;
