//! Length-prefixed frames: a big-endian `u32` body length, then a postcard body.

use bytes::{Buf, BufMut, BytesMut};
use serde::Serialize;
use tokio_util::codec::Decoder;

use crate::{ClientFrame, ServerFrame};

/// Bytes of the length prefix.
pub const FRAME_HEADER: usize = 4;

/// Default largest frame body: room for an 8 MiB payload plus the request around it.
pub const DEFAULT_MAX_FRAME: usize = crate::DEFAULT_MAX_PAYLOAD + 64 * 1024;

/// Largest frame a server reads before a connection's hello is accepted: a hello is a
/// protocol name and a token, so nothing unauthenticated makes a node buffer more.
pub const MAX_HELLO_FRAME: usize = 4096;

/// Why bytes could not be read as a frame.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The length prefix announces more than the limit; nothing was allocated for it.
    #[error("{}", too_large_message(*.len, *.max))]
    TooLarge {
        /// Announced body length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The body is not a valid postcard encoding of the expected frame type.
    #[error("malformed frame: {0}")]
    Malformed(#[from] postcard::Error),
    /// The socket failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

fn too_large_message(len: usize, max: usize) -> String {
    // Four ASCII letters where a length should be is almost always a person pointing an
    // HTTP client or telnet at the binary port; say so instead of quoting a huge number.
    let head = (len as u32).to_be_bytes();
    if head.iter().all(|b| b.is_ascii_uppercase() || *b == b' ') {
        return format!(
            "this is the peerbus binary protocol port and {:?} is not a frame; \
             HTTP is served on the node's --http address",
            String::from_utf8_lossy(&head)
        );
    }
    format!("frame of {len} bytes is over the {max} byte limit")
}

/// Splits a byte stream into frame bodies, refusing oversized frames before buffering them.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max: usize,
}

impl FrameCodec {
    /// A codec that refuses bodies longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        FrameCodec { max }
    }

    /// Changes the limit for frames not yet read (a server raises it after the hello).
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_MAX_FRAME)
    }
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, CodecError> {
        if src.len() < FRAME_HEADER {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > self.max {
            return Err(CodecError::TooLarge { len, max: self.max });
        }
        if src.len() < FRAME_HEADER + len {
            src.reserve(FRAME_HEADER + len - src.len());
            return Ok(None);
        }
        src.advance(FRAME_HEADER);
        Ok(Some(src.split_to(len)))
    }
}

/// Appends one frame (length prefix and postcard body) to `dst`.
pub fn encode_frame<T: Serialize>(frame: &T, dst: &mut BytesMut) -> Result<(), CodecError> {
    let start = dst.len();
    dst.put_u32(0);
    if let Err(e) = postcard::to_io(frame, (&mut *dst).writer()) {
        dst.truncate(start);
        return Err(e.into());
    }
    let body_len = (dst.len() - start - FRAME_HEADER) as u32;
    dst[start..start + FRAME_HEADER].copy_from_slice(&body_len.to_be_bytes());
    Ok(())
}

/// Decodes a frame body a client sent.
pub fn decode_client(body: &[u8]) -> Result<ClientFrame, CodecError> {
    Ok(postcard::from_bytes(body)?)
}

/// Decodes a frame body a server sent.
pub fn decode_server(body: &[u8]) -> Result<ServerFrame, CodecError> {
    Ok(postcard::from_bytes(body)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;

    #[test]
    fn frames_split_and_join() {
        let mut buf = BytesMut::new();
        let a = ClientFrame::Request {
            id: 7,
            forward: true,
            body: Request::Ping,
        };
        encode_frame(&a, &mut buf).unwrap();
        encode_frame(&a, &mut buf).unwrap();
        let mut codec = FrameCodec::default();
        // Feed byte by byte: a frame appears only once whole.
        let mut stream = BytesMut::new();
        let mut got = Vec::new();
        for b in buf.iter() {
            stream.put_u8(*b);
            while let Some(body) = codec.decode(&mut stream).unwrap() {
                got.push(decode_client(&body).unwrap());
            }
        }
        assert_eq!(got, vec![a.clone(), a]);
    }

    #[test]
    fn oversized_frames_are_refused_before_buffering() {
        let mut codec = FrameCodec::new(16);
        let mut src = BytesMut::from(&[0u8, 0, 0, 17][..]);
        let err = codec.decode(&mut src).unwrap_err();
        assert_eq!(
            err.to_string(),
            "frame of 17 bytes is over the 16 byte limit"
        );
    }

    #[test]
    fn http_on_the_binary_port_is_named() {
        let mut codec = FrameCodec::default();
        let mut src = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        let err = codec.decode(&mut src).unwrap_err().to_string();
        assert!(err.contains("binary protocol port"), "{err}");
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let err = decode_client(&[0xff, 0xff, 0xff]).unwrap_err();
        assert!(err.to_string().starts_with("malformed frame"), "{err}");
    }
}
