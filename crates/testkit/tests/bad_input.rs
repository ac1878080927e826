//! Bad input on the binary port, sent over raw sockets: every case must get a clear error
//! (and a closed connection where the stream can no longer be trusted), while the node keeps
//! serving a normal client and keeps every message stored before the bad input.

use std::time::Duration;

use futures::StreamExt;
use peerbus_client::Retention;
use peerbus_proto::{
    Batch, ClientFrame, CodecError, ErrorCode, FrameCodec, PROTOCOL, Request, Response,
    ServerFrame, WireError, decode_server, encode_frame,
};
use peerbus_testkit::{Cluster, ClusterOptions};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::bytes::BytesMut;
use tokio_util::codec::FramedRead;

/// Generous: only a hung node would take this long, and it must then fail, not hang.
const DEADLINE: Duration = Duration::from_secs(20);

const TOPIC: &str = "safe";
const BEFORE: [&str; 3] = ["before-0", "before-1", "before-2"];

/// One raw connection: frames are read with the real codec, bytes are written by hand so
/// tests can send anything at all.
struct Raw {
    r: FramedRead<OwnedReadHalf, FrameCodec>,
    w: OwnedWriteHalf,
}

impl Raw {
    async fn connect(addr: &str) -> Raw {
        let s = TcpStream::connect(addr).await.unwrap();
        let (r, w) = s.into_split();
        Raw {
            r: FramedRead::new(r, FrameCodec::default()),
            w,
        }
    }

    async fn bytes(&mut self, b: &[u8]) {
        self.w.write_all(b).await.unwrap();
    }

    async fn frame(&mut self, f: &ClientFrame) {
        let mut buf = BytesMut::new();
        encode_frame(f, &mut buf).unwrap();
        self.bytes(&buf).await;
    }

    async fn hello_as(&mut self, protocol: &str) {
        self.frame(&ClientFrame::Hello {
            protocol: protocol.into(),
            token: None,
        })
        .await;
    }

    /// The next server frame, or `None` once the server closed the connection.
    async fn next(&mut self) -> Option<ServerFrame> {
        match tokio::time::timeout(DEADLINE, self.r.next())
            .await
            .expect("the node neither answered nor closed the connection")
        {
            None | Some(Err(CodecError::Io(_))) => None,
            Some(Err(e)) => panic!("unreadable server frame: {e}"),
            Some(Ok(body)) => Some(decode_server(&body).unwrap()),
        }
    }

    /// Connects and says a valid hello.
    async fn open(addr: &str) -> Raw {
        let mut raw = Raw::connect(addr).await;
        raw.hello_as(PROTOCOL).await;
        match raw.next().await {
            Some(ServerFrame::Welcome { .. }) => raw,
            other => panic!("expected a welcome, got {other:?}"),
        }
    }

    async fn refused(&mut self) -> WireError {
        match self.next().await {
            Some(ServerFrame::Refused(e)) => e,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    async fn closed(&mut self) {
        if let Some(f) = self.next().await {
            panic!("expected the connection closed, got {f:?}");
        }
    }

    async fn request(&mut self, id: u32, body: Request) -> Result<Response, WireError> {
        self.frame(&ClientFrame::Request {
            id,
            forward: true,
            body,
        })
        .await;
        loop {
            match self.next().await {
                Some(ServerFrame::Response { id: got, body }) if got == id => return body,
                Some(ServerFrame::Response { .. } | ServerFrame::Delivery { .. }) => {}
                other => panic!("expected response {id}, got {other:?}"),
            }
        }
    }
}

/// A cluster of one peer hosting `TOPIC` with the `BEFORE` messages stored.
async fn cluster(limits: Option<(usize, Duration, Duration)>) -> Cluster {
    let cluster = Cluster::start_with(ClusterOptions {
        peers: 1,
        server_limits: limits,
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let c = cluster.client();
    c.create_topic(TOPIC, Some("peer1"), Retention::default())
        .await
        .unwrap();
    for m in BEFORE {
        c.publish(TOPIC, m).await.unwrap();
    }
    cluster
}

/// The node still serves a normal client, and nothing stored before the bad input is lost.
async fn still_serving(cluster: &Cluster, reader: &str) {
    let c = cluster.client();
    c.publish(TOPIC, "after").await.unwrap();
    let mut got = Vec::new();
    loop {
        let set = c.pull(TOPIC, reader, 1000, Duration::ZERO).await.unwrap();
        if set.is_empty() {
            break;
        }
        got.extend(
            set.batch
                .iter()
                .map(|b| String::from_utf8(b.to_vec()).unwrap()),
        );
    }
    for m in BEFORE {
        assert!(got.iter().any(|g| g == m), "{m} lost: {got:?}");
    }
    assert_eq!(got.last().map(String::as_str), Some("after"), "{got:?}");
}

fn assert_error(e: &WireError, code: ErrorCode, needle: &str) {
    assert_eq!(e.code, code, "{e:?}");
    assert!(
        e.message.contains(needle),
        "{needle:?} not in {:?}",
        e.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_length_prefix_is_refused_and_closed() {
    let cluster = cluster(None).await;
    let mut raw = Raw::open(&cluster.peer_addr(0)).await;
    raw.bytes(&u32::MAX.to_be_bytes()).await;
    let e = raw.refused().await;
    assert_error(&e, ErrorCode::TooLarge, "over the");
    raw.closed().await;
    still_serving(&cluster, "r").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_after_hello_is_malformed() {
    let cluster = cluster(None).await;
    let mut raw = Raw::open(&cluster.peer_addr(0)).await;
    // A well-formed length prefix around a body that is no frame at all.
    raw.bytes(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]).await;
    let e = raw.refused().await;
    assert_error(&e, ErrorCode::BadRequest, "malformed frame");
    raw.closed().await;
    still_serving(&cluster, "r").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_on_the_binary_port_is_named() {
    let cluster = cluster(None).await;
    for addr in [cluster.peer_addr(0), cluster.index_addr()] {
        let mut raw = Raw::connect(&addr).await;
        raw.bytes(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let e = raw.refused().await;
        assert!(e.message.contains("binary protocol port"), "{e:?}");
        assert!(e.message.contains("--http"), "{e:?}");
        raw.closed().await;
    }
    still_serving(&cluster, "r").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_frame_then_eof_is_survived() {
    let cluster = cluster(None).await;
    let mut raw = Raw::open(&cluster.peer_addr(0)).await;
    // Announces 100 bytes, sends 3, then hangs up.
    raw.bytes(&[0, 0, 0, 100, 1, 2, 3]).await;
    raw.w.shutdown().await.unwrap();
    drop(raw);
    // Also before hello.
    let mut raw = Raw::connect(&cluster.peer_addr(0)).await;
    raw.bytes(&[0, 0]).await;
    drop(raw);
    still_serving(&cluster, "r").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_protocol_version_is_unsupported() {
    let cluster = cluster(None).await;
    let mut raw = Raw::connect(&cluster.peer_addr(0)).await;
    raw.hello_as("peerbus/99").await;
    let e = raw.refused().await;
    assert_error(&e, ErrorCode::Unsupported, PROTOCOL);
    raw.closed().await;
    still_serving(&cluster, "r").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_hello_within_hello_timeout_is_refused() {
    let limits = (100, Duration::from_secs(1), Duration::from_secs(300));
    let cluster = cluster(Some(limits)).await;
    let mut raw = Raw::connect(&cluster.peer_addr(0)).await;
    let e = raw.refused().await;
    assert_error(&e, ErrorCode::BadRequest, "no hello within");
    raw.closed().await;
    still_serving(&cluster, "r").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connection_after_hello_is_closed_when_idle() {
    let limits = (100, Duration::from_secs(10), Duration::from_secs(1));
    let cluster = cluster(Some(limits)).await;
    let mut raw = Raw::open(&cluster.peer_addr(0)).await;
    let e = raw.refused().await;
    assert_error(&e, ErrorCode::BadRequest, "idle for 1 s: closing");
    raw.closed().await;
    still_serving(&cluster, "r").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_refused_then_accepted_again() {
    let limits = (4, Duration::from_secs(10), Duration::from_secs(300));
    let cluster = cluster(Some(limits)).await;
    let addr = cluster.peer_addr(0);
    // The index and the client may hold some of the slots, so open until one is refused.
    let mut open = Vec::new();
    let refusal = loop {
        assert!(open.len() <= 4, "more than max_connections were served");
        let mut raw = Raw::connect(&addr).await;
        raw.hello_as(PROTOCOL).await;
        match raw.next().await {
            Some(ServerFrame::Welcome { .. }) => open.push(raw),
            Some(ServerFrame::Refused(e)) => {
                raw.closed().await;
                break e;
            }
            other => panic!("expected welcome or refusal, got {other:?}"),
        }
    };
    assert_error(&refusal, ErrorCode::Unavailable, "too many connections");
    // Hanging up frees the slots; the server notices asynchronously, so poll.
    drop(open);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let mut raw = Raw::connect(&addr).await;
        raw.hello_as(PROTOCOL).await;
        match raw.next().await {
            Some(ServerFrame::Welcome { .. }) => break,
            Some(ServerFrame::Refused(_)) => {}
            other => panic!("expected welcome or refusal, got {other:?}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "closed slots were never freed"
        );
        tokio::task::yield_now().await;
    }
    still_serving(&cluster, "r").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_publish_requests_get_errors_and_the_connection_stays_usable() {
    let cluster = cluster(None).await;
    let mut id = 0;
    for (topic, addr) in [
        ("bad name", cluster.peer_addr(0)),
        ("", cluster.peer_addr(0)),
        ("a/../b", cluster.index_addr()),
        ("x\n", cluster.index_addr()),
    ] {
        let mut raw = Raw::open(&addr).await;
        id += 1;
        let body = Request::Publish {
            topic: topic.into(),
            batch: Batch::from_payloads(["x"]),
        };
        let e = raw.request(id, body).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest, "{topic:?}: {e:?}");
        id += 1;
        assert_eq!(raw.request(id, Request::Ping).await, Ok(Response::Pong));
    }
    let mut raw = Raw::open(&cluster.peer_addr(0)).await;
    id += 1;
    let big = vec![7u8; peerbus_proto::DEFAULT_MAX_PAYLOAD + 1];
    let body = Request::Publish {
        topic: TOPIC.into(),
        batch: Batch::from_payloads([big]),
    };
    let e = raw.request(id, body).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::TooLarge, "{e:?}");
    id += 1;
    assert_eq!(raw.request(id, Request::Ping).await, Ok(Response::Pong));
    still_serving(&cluster, "r").await;
}

/// A topic deleted while a following subscriber is far behind (its reader stopped, so the
/// peer's sends to it wait): once the reader resumes, the subscription ends with "deleted"
/// and the peer keeps serving. Reading a deleted range finds nothing below the watermark;
/// the follower must move on rather than ask for it again and again without yielding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_topic_under_a_lagging_follower_ends_it_cleanly() {
    let cluster = cluster(None).await;
    let c = cluster.client();
    c.create_topic("lagging", Some("peer1"), Retention::default())
        .await
        .unwrap();
    // 48 MiB: more than the connection's outbox budget and socket buffers hold.
    let chunk = vec![7u8; 1 << 20];
    for _ in 0..48 {
        c.publish("lagging", chunk.clone()).await.unwrap();
    }
    let mut raw = Raw::open(&cluster.peer_addr(0)).await;
    raw.frame(&ClientFrame::Request {
        id: 1,
        forward: false,
        body: Request::Subscribe(peerbus_proto::Subscribe {
            topic: "lagging".into(),
            subscriber: "slow".into(),
            from: Some(peerbus_proto::StartFrom::Earliest),
            follow: Some(9),
        }),
    })
    .await;
    // Subscribed before the delete, or the subscription would find no topic.
    match raw.next().await {
        Some(ServerFrame::Response { id: 1, body }) => {
            body.unwrap();
        }
        other => panic!("expected the subscribe answer first, got {other:?}"),
    }
    // The follower now waits on a full outbox; delete the topic under it.
    c.delete_topic("lagging").await.unwrap();

    let mut delivered = 0u64;
    let reason = loop {
        match raw.next().await {
            Some(ServerFrame::Response { id: 1, body }) => {
                body.unwrap();
            }
            Some(ServerFrame::Delivery { sub: 9, messages }) => {
                assert_eq!(messages.first_offset, delivered, "no gap, no repeat");
                delivered += messages.len() as u64;
            }
            Some(ServerFrame::SubscriptionEnded { sub: 9, reason }) => break reason,
            other => panic!("expected deliveries then the end, got {other:?}"),
        }
    };
    assert_eq!(reason.code, ErrorCode::NotFound, "{reason:?}");
    assert!(reason.message.contains("deleted"), "{reason:?}");
    assert!(
        delivered < 48,
        "the subscriber lagged: {delivered} delivered"
    );
    // The peer still serves everyone.
    assert_eq!(raw.request(2, Request::Ping).await.unwrap(), Response::Pong);
    let mut all = Vec::new();
    loop {
        let set = c.pull(TOPIC, "after", 100, Duration::ZERO).await.unwrap();
        if set.is_empty() {
            break;
        }
        all.extend(set.messages().map(|m| m.payload));
    }
    let before: Vec<Vec<u8>> = BEFORE.iter().map(|m| m.as_bytes().to_vec()).collect();
    let all: Vec<Vec<u8>> = all.iter().map(|p| p.to_vec()).collect();
    assert_eq!(all, before);
}

/// A seek by offset while count retention has cut past the durable watermark (a 2-message
/// publish into a topic keeping 1, pipelined with the subscribe, so both are handled before
/// the fsync) must not panic under the topic lock: the topic keeps serving and can be
/// deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seek_racing_retention_ahead_of_durability_does_not_wedge_the_topic() {
    let cluster = cluster(None).await;
    let c = cluster.client();
    let retention = Retention {
        max_messages: Some(1),
        ..Retention::default()
    };
    c.create_topic("wedge", Some("peer1"), retention)
        .await
        .unwrap();
    for round in 0..20u32 {
        let mut raw = Raw::open(&cluster.peer_addr(0)).await;
        let mut buf = BytesMut::new();
        let publish = Request::Publish {
            topic: "wedge".into(),
            batch: Batch::from_payloads([b"a".as_slice(), b"b"]),
        };
        let subscribe = Request::Subscribe(peerbus_proto::Subscribe {
            topic: "wedge".into(),
            subscriber: format!("seeker-{round}"),
            from: Some(peerbus_proto::StartFrom::Offset(0)),
            follow: None,
        });
        for (id, body) in [(1, publish), (2, subscribe)] {
            encode_frame(
                &ClientFrame::Request {
                    id,
                    forward: true,
                    body,
                },
                &mut buf,
            )
            .unwrap();
        }
        raw.bytes(&buf).await;
        let mut answered = Vec::new();
        while answered.len() < 2 {
            match raw.next().await {
                Some(ServerFrame::Response { id, body }) => {
                    body.unwrap_or_else(|e| panic!("request {id} failed: {e:?}"));
                    answered.push(id);
                }
                Some(_) => {}
                None => panic!("the peer dropped the connection in round {round}"),
            }
        }
    }
    c.publish("wedge", "still works").await.unwrap();
    tokio::time::timeout(DEADLINE, c.delete_topic("wedge"))
        .await
        .expect("deleting the topic hung")
        .unwrap();
    still_serving(&cluster, "reader").await;
}

/// Before its hello is accepted a connection may send only a small frame: nothing
/// unauthenticated makes a node reserve megabytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_frame_before_the_hello_is_refused() {
    let cluster = cluster(None).await;
    for addr in [cluster.peer_addr(0), cluster.index_addr()] {
        let mut raw = Raw::connect(&addr).await;
        raw.bytes(&(1u32 << 20).to_be_bytes()).await;
        let e = raw.refused().await;
        assert_error(
            &e,
            ErrorCode::TooLarge,
            "frame of 1048576 bytes is over the 4096 byte limit",
        );
        raw.closed().await;
    }
    still_serving(&cluster, "reader").await;
}

/// Retention under which a publish would be acknowledged and deleted in the same write is
/// refused when the topic is created, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_that_deletes_on_arrival_is_refused() {
    let cluster = cluster(None).await;
    let c = cluster.client();
    for (retention, needle) in [
        (
            Retention {
                max_messages: Some(0),
                ..Retention::default()
            },
            "retention of 0 messages would delete every message as it is stored",
        ),
        (
            Retention {
                max_bytes: Some(10),
                ..Retention::default()
            },
            "retention of 10 bytes would delete messages as they are stored; keep at least 1024",
        ),
        (
            Retention {
                max_age_secs: Some(0),
                ..Retention::default()
            },
            "retention of 0 seconds",
        ),
    ] {
        for peer in [Some("peer1"), None] {
            let e = c.create_topic("doomed", peer, retention).await.unwrap_err();
            assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{e}");
            assert!(e.to_string().contains(needle), "{e}");
        }
    }
    assert!(c.lookup("doomed").await.is_err(), "nothing was created");
    still_serving(&cluster, "reader").await;
}
