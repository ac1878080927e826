//! The library against nodes that do not answer: a request fails after its deadline
//! instead of hanging, and callers waiting for one connection share one connect attempt
//! instead of trying one after another.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use peerbus_client::{Client, ClientError, Connection};
use peerbus_proto::{FrameCodec, NodeKind, PROTOCOL, Request, ServerFrame, encode_frame};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_util::bytes::BytesMut;
use tokio_util::codec::FramedRead;

/// A node that welcomes every connection and then never answers anything.
async fn mute_node() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut frames = FramedRead::new(r, FrameCodec::default());
                if frames.next().await.is_none() {
                    return;
                }
                let mut out = BytesMut::new();
                encode_frame(
                    &ServerFrame::Welcome {
                        protocol: PROTOCOL.into(),
                        version: "mute".into(),
                        node: NodeKind::Peer,
                    },
                    &mut out,
                )
                .unwrap();
                w.write_all(&out).await.unwrap();
                // Read and ignore every request.
                while frames.next().await.is_some() {}
            });
        }
    });
    addr
}

/// A node that accepts connections, counts them, and never says a word.
async fn black_hole() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(s);
        }
    });
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_an_answer_times_out_and_the_connection_stays_usable() {
    let addr = mute_node().await;
    let conn = Connection::connect(&addr, None).await.unwrap();
    conn.set_request_timeout(Duration::from_millis(300));
    for _ in 0..2 {
        let e = conn.request(Request::Ping, false).await.unwrap_err();
        assert!(matches!(e, ClientError::Timeout { .. }), "{e:?}");
        assert!(e.to_string().contains("no answer from"), "{e}");
        assert!(e.to_string().contains("to ping within 300 ms"), "{e}");
        // The outcome is unknown: an idempotent publish may be sent again.
        assert!(e.is_unreachable());
    }
    assert!(!conn.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_waiting_for_one_connection_share_one_attempt() {
    let (addr, accepted) = black_hole().await;
    let c = Client::new(addr.clone());
    let waiting: Vec<_> = (0..8)
        .map(|_| {
            let (c, addr) = (c.clone(), addr.clone());
            tokio::spawn(async move { c.connection(&addr).await })
        })
        .collect();
    for w in waiting {
        let e = w.await.unwrap().unwrap_err();
        assert!(matches!(e, ClientError::Connect { .. }), "{e:?}");
        assert!(e.to_string().contains("no answer to hello"), "{e}");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "eight callers, one connect attempt"
    );
    // The failure is not remembered: the next caller tries again.
    let e = c.connection(&addr).await.unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }), "{e:?}");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}
