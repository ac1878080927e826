//! Arbitrary bytes through the frame codec, fed in chunks so partial frames are exercised,
//! and every frame body through the client and server frame decoders.
//!
//! Input layout: byte 0 picks the frame limit, bytes 1..9 pick the chunk sizes, the rest is
//! the byte stream a node would read from its socket.

#![no_main]

use bytes::{BufMut, BytesMut};
use libfuzzer_sys::fuzz_target;
use peerbus_proto::{
    ClientFrame, CodecError, DEFAULT_MAX_FRAME, FRAME_HEADER, FrameCodec, Request, Response,
    ServerFrame, decode_client, decode_server, encode_frame,
};
use tokio_util::codec::Decoder;

/// What the codec must produce for `stream`, computed from the whole stream at once.
enum Expected {
    /// Every whole frame, then a partial one (or nothing) left waiting for more bytes.
    Frames(Vec<Vec<u8>>),
    /// The frames before an oversized length prefix, then the refusal.
    TooLarge(Vec<Vec<u8>>, usize),
}

fn reference(stream: &[u8], max: usize) -> Expected {
    let mut frames = Vec::new();
    let mut at = 0;
    while stream.len() - at >= FRAME_HEADER {
        let len = u32::from_be_bytes(stream[at..at + FRAME_HEADER].try_into().unwrap()) as usize;
        if len > max {
            return Expected::TooLarge(frames, len);
        }
        if stream.len() - at - FRAME_HEADER < len {
            break;
        }
        frames.push(stream[at + FRAME_HEADER..at + FRAME_HEADER + len].to_vec());
        at += FRAME_HEADER + len;
    }
    Expected::Frames(frames)
}

/// A decoded value must survive encode → codec → decode unchanged.
fn round_trip_client(frame: &ClientFrame, max: usize) {
    let mut buf = BytesMut::new();
    encode_frame(frame, &mut buf).expect("a decoded client frame encodes");
    let mut codec = FrameCodec::new(usize::MAX);
    let body = codec
        .decode(&mut buf)
        .expect("an encoded frame splits")
        .expect("an encoded frame is whole");
    assert!(
        buf.is_empty(),
        "the codec left bytes after one encoded frame"
    );
    let again = decode_client(&body).expect("a re-encoded client frame decodes");
    assert_eq!(&again, frame, "client frame changed across a round trip");
    // postcard never needs more bytes than it read, so the re-encoding fits the limit too.
    assert!(body.len() <= max, "re-encoding grew a frame past the limit");
}

fn round_trip_server(frame: &ServerFrame) {
    let mut buf = BytesMut::new();
    encode_frame(frame, &mut buf).expect("a decoded server frame encodes");
    let body = FrameCodec::new(usize::MAX)
        .decode(&mut buf)
        .expect("an encoded frame splits")
        .expect("an encoded frame is whole");
    let again = decode_server(&body).expect("a re-encoded server frame decodes");
    assert_eq!(&again, frame, "server frame changed across a round trip");
}

/// What a node does with a batch from the network: check it, then slice it.
fn use_batch(batch: &peerbus_proto::Batch) {
    if batch.check().is_ok() {
        let mut total = 0usize;
        for (payload, &len) in batch.iter().zip(&batch.lens) {
            assert_eq!(payload.len(), len as usize);
            total += payload.len();
        }
        assert_eq!(total, batch.data.len());
    }
}

fn inspect_client(frame: &ClientFrame) {
    if let ClientFrame::Request { body, .. } = frame {
        let _ = body.kind();
        let _ = body.hosted_topic();
        match body {
            Request::Publish { batch, .. } | Request::PublishIdempotent { batch, .. } => {
                use_batch(batch)
            }
            _ => {}
        }
    }
}

fn inspect_server(frame: &ServerFrame) {
    match frame {
        ServerFrame::Delivery { messages, .. }
        | ServerFrame::Response {
            body: Ok(Response::Messages(messages)),
            ..
        } => use_batch(&messages.batch),
        ServerFrame::Refused(e)
        | ServerFrame::SubscriptionEnded { reason: e, .. }
        | ServerFrame::Response { body: Err(e), .. } => {
            let _ = e.to_string();
        }
        _ => {}
    }
}

fn check_body(body: &[u8], max: usize) {
    match decode_client(body) {
        Ok(frame) => {
            inspect_client(&frame);
            round_trip_client(&frame, max);
        }
        Err(e) => {
            assert!(matches!(e, CodecError::Malformed(_)), "{e:?}");
            let _ = e.to_string();
        }
    }
    match decode_server(body) {
        Ok(frame) => {
            inspect_server(&frame);
            round_trip_server(&frame);
        }
        Err(e) => {
            assert!(matches!(e, CodecError::Malformed(_)), "{e:?}");
            let _ = e.to_string();
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    // Even: the production limit. Odd: a small limit, so refusals are common.
    let max = if data[0] & 1 == 0 {
        DEFAULT_MAX_FRAME
    } else {
        usize::from(data[0]) * 4
    };
    let chunk_sizes = &data[1..9];
    let stream = &data[9..];

    let mut codec = FrameCodec::new(max);
    let mut buf = BytesMut::new();
    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut refused: Option<usize> = None;
    let mut fed = 0;
    let mut i = 0;
    'feed: while fed < stream.len() {
        let n = (usize::from(chunk_sizes[i % chunk_sizes.len()]) % 64 + 1).min(stream.len() - fed);
        i += 1;
        buf.put_slice(&stream[fed..fed + n]);
        fed += n;
        loop {
            let before = buf.len();
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    assert!(frame.len() <= max, "frame of {} over {max}", frame.len());
                    assert_eq!(
                        before - buf.len(),
                        FRAME_HEADER + frame.len(),
                        "a frame consumed other than its header and body"
                    );
                    check_body(&frame, max);
                    got.push(frame.to_vec());
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before, "Ok(None) consumed bytes");
                    break;
                }
                Err(CodecError::TooLarge { len, max: m }) => {
                    assert_eq!(m, max);
                    assert!(len > max, "refused {len} bytes under the {max} limit");
                    let _ = CodecError::TooLarge { len, max: m }.to_string();
                    refused = Some(len);
                    break 'feed;
                }
                Err(e) => panic!("the frame splitter failed with {e:?}"),
            }
        }
    }

    match reference(stream, max) {
        Expected::Frames(frames) => {
            assert_eq!(refused, None, "refused a stream with no oversized prefix");
            assert_eq!(got, frames, "chunked decoding differs from whole decoding");
        }
        Expected::TooLarge(frames, len) => {
            assert_eq!(refused, Some(len), "oversized prefix not refused");
            assert_eq!(got, frames, "chunked decoding differs from whole decoding");
        }
    }
});
