//! Backpressure through the built binary: a subscriber that stops reading while 2 GiB are
//! published to its topic must not make the peer's memory grow with the backlog. The peer
//! stops sending to it once that connection's outbox budget is full and goes on storing;
//! when the subscriber reads again, it receives every message, in order, from the log.

mod common;

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use common::spawn;
use futures::stream::{FuturesOrdered, StreamExt};
use peerbus_client::Client;
use peerbus_proto::Retention;

/// Payload size and count: 8,192 × 256 KiB = 2 GiB.
const PAYLOAD: usize = 256 << 10;
const MESSAGES: u64 = 8192;

/// The bound the peer's peak resident memory must stay under while 2 GiB pile up behind a
/// stalled subscriber: the storage engine's memtables and caches, the per-connection
/// outbox budget and read buffers, far below the backlog itself.
const RSS_BOUND: u64 = 512 << 20;

/// Publishes at most this many messages ahead of their acknowledgements, so the test
/// process itself does not hold the 2 GiB either.
const WINDOW: usize = 64;

fn payload(i: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(PAYLOAD);
    b.put_u64(i);
    b.resize(PAYLOAD, (i % 251) as u8);
    b.freeze()
}

/// Peak resident set size of a process, from /proc.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .expect("VmHWM line")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .expect("VmHWM in kB");
    kib << 10
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_subscriber_bounds_peer_memory_and_then_receives_everything() {
    let dir = tempfile::tempdir().unwrap();
    let index = spawn(
        [
            "index",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "off",
            "--data",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([dir.path().join("index").display().to_string()]),
    );
    let peer = spawn(
        [
            "--index",
            &index.addr,
            "peer",
            "--listen",
            "127.0.0.1:0",
            "--name",
            "p",
            "--durability",
            "sync",
            "--data",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([dir.path().join("peer").display().to_string()]),
    );

    let publisher = Client::new(index.addr.clone());
    // Room for the whole backlog: the default 1 GiB retention would drop what the stalled
    // subscriber has not read, which is retention, not backpressure.
    let retention = Retention {
        max_bytes: Some(4 << 30),
        ..Retention::default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match publisher.create_topic("big", None, retention).await {
            Ok(_) => break,
            // The peer may not have registered yet: poll until the deadline.
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot create the topic: {e}"),
        }
    }

    // Its own client, so its stalled connection is not the publisher's.
    let subscriber = Client::new(index.addr.clone());
    let mut sub = subscriber.follow("big", "stalled", None).await.unwrap();
    assert_eq!(sub.next_offset(), 0);

    let mut acks = FuturesOrdered::new();
    let mut acked = 0u64;
    for i in 0..MESSAGES {
        acks.push_back(publisher.publish_nowait("big", payload(i)));
        if acks.len() >= WINDOW {
            let offset = acks.next().await.unwrap().expect("publish acknowledged");
            assert_eq!(offset, acked);
            acked += 1;
        }
    }
    while let Some(r) = acks.next().await {
        assert_eq!(r.expect("publish acknowledged"), acked);
        acked += 1;
    }
    assert_eq!(acked, MESSAGES);

    let peak = peak_rss(peer.child.id());
    eprintln!(
        "peer peak RSS after 2 GiB behind a stalled subscriber: {} MiB (bound {} MiB)",
        peak >> 20,
        RSS_BOUND >> 20
    );
    assert!(
        peak < RSS_BOUND,
        "peer peak RSS {} MiB is over the {} MiB bound",
        peak >> 20,
        RSS_BOUND >> 20
    );

    // The peer held back: the stalled subscriber's position is far behind the log.
    let position = publisher
        .subscribers("big")
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.name == "stalled")
        .expect("the stalled subscriber is still subscribed")
        .next_offset;
    assert!(
        position < MESSAGES / 2,
        "a subscriber that reads nothing was sent up to offset {position} of {MESSAGES}"
    );

    // Reading again: every message arrives, in order, intact; the connection was kept.
    let mut next = 0u64;
    while next < MESSAGES {
        let set = sub
            .next_batch()
            .await
            .expect("the subscription stays open")
            .expect("deliveries resume");
        for m in set.messages() {
            assert_eq!(m.offset, next);
            assert_eq!(m.payload, payload(next), "payload of message {next}");
            next += 1;
        }
    }
    let peak = peak_rss(peer.child.id());
    assert!(
        peak < RSS_BOUND,
        "peer peak RSS {} MiB after catching up is over the {} MiB bound",
        peak >> 20,
        RSS_BOUND >> 20
    );
}

/// Piece requests pipelined by a client that reads nothing meanwhile: each asks the peer to
/// read a megabyte. The peer must stop reading that connection once its in-flight budget is
/// used, instead of reading every piece into memory, and then answer every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_piece_requests_do_not_grow_peer_memory() {
    use peerbus_proto::{
        ClientFrame, FrameCodec, PROTOCOL, Request, Response, ServerFrame, decode_server,
        encode_frame,
    };
    use tokio::io::AsyncWriteExt;

    const REQUESTS: u32 = 2000;
    const BOUND: u64 = 384 << 20;
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir_all(&share).unwrap();
    let piece: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
    std::fs::write(share.join("one.bin"), &piece).unwrap();
    let index = spawn([
        "index",
        "--listen",
        "127.0.0.1:0",
        "--http",
        "off",
        "--in-memory",
    ]);
    let peer = spawn(
        [
            "--index",
            &index.addr,
            "peer",
            "--listen",
            "127.0.0.1:0",
            "--in-memory",
            "--share",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([share.display().to_string()]),
    );
    let hash = Client::new(index.addr.clone())
        .peer_files(&peer.addr, "")
        .await
        .unwrap()[0]
        .hash
        .clone();

    let stream = tokio::net::TcpStream::connect(&peer.addr).await.unwrap();
    let (r, mut w) = stream.into_split();
    let mut frames = tokio_util::codec::FramedRead::new(r, FrameCodec::default());
    let mut buf = BytesMut::new();
    encode_frame(
        &ClientFrame::Hello {
            protocol: PROTOCOL.into(),
            token: None,
        },
        &mut buf,
    )
    .unwrap();
    for id in 0..REQUESTS {
        encode_frame(
            &ClientFrame::Request {
                id,
                forward: false,
                body: Request::ReadPiece {
                    hash: hash.clone(),
                    index: 0,
                },
            },
            &mut buf,
        )
        .unwrap();
    }
    // Written from a task: once the peer stops reading, this write waits on TCP.
    let writer = tokio::spawn(async move { w.write_all(&buf).await.map(|()| w) });
    let mut answered = 0;
    while answered < REQUESTS {
        let frame = tokio::time::timeout(Duration::from_secs(60), frames.next())
            .await
            .expect("the peer stopped answering")
            .expect("the peer closed the connection")
            .unwrap();
        match decode_server(&frame).unwrap() {
            ServerFrame::Response { body, .. } => {
                assert!(matches!(body, Ok(Response::Piece(p)) if p.len() == piece.len()));
                answered += 1;
            }
            ServerFrame::Welcome { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    drop(writer.await.unwrap().unwrap());
    let peak = peak_rss(peer.child.id());
    assert!(
        peak < BOUND,
        "the peer peaked at {} MiB answering {REQUESTS} pipelined 1 MiB piece requests",
        peak >> 20
    );
}
