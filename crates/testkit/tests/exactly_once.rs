//! Exactly-once publishing: idempotent producers survive lost acknowledgements, closed
//! connections and peer restarts without storing a batch twice.

use std::time::Duration;

use peerbus_client::{Client, Connection, ErrorCode, Retention};
use peerbus_proto::{Batch, Request, Response};
use peerbus_testkit::Cluster;

fn idempotent(payloads: &[&str], producer: u64, sequence: u64) -> Request {
    Request::PublishIdempotent {
        topic: "t".into(),
        batch: Batch::from_payloads(payloads),
        producer,
        sequence,
    }
}

fn published(first_offset: u64, count: u32) -> Response {
    Response::Published {
        first_offset,
        count,
    }
}

/// Every message of `topic` from the start, read by a fresh subscriber.
async fn pull_all(c: &Client, topic: &str, sub: &str) -> Vec<(u64, Vec<u8>)> {
    let mut got = Vec::new();
    loop {
        let set = c.pull(topic, sub, 8192, Duration::ZERO).await.unwrap();
        if set.is_empty() {
            return got;
        }
        for m in set.messages() {
            got.push((m.offset, m.payload.to_vec()));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_batch_is_stored_once_even_after_a_restart() {
    let mut cluster = Cluster::start(1).await.unwrap();
    let c = cluster.client();
    c.create_topic("t", Some("peer1"), Retention::default())
        .await
        .unwrap();
    let addr = cluster.peer_addr(0);
    let conn = Connection::connect(&addr, None).await.unwrap();

    let first = idempotent(&["a", "b"], 7, 0);
    assert_eq!(
        conn.request(first.clone(), false).await.unwrap(),
        published(0, 2)
    );
    // The same batch again, as after a lost acknowledgement: same offsets, nothing stored.
    assert_eq!(conn.request(first, false).await.unwrap(), published(0, 2));
    // A producer the host does not know must start at sequence 0: anything later may
    // follow batches stored before (an expired producer, a topic made again), so nothing is
    // stored and the producer is told to start again.
    let e = conn
        .request(idempotent(&["x"], 8, 5), false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::UnknownProducer), "{e}");
    assert!(e.to_string().contains("not known to topic 't'"), "{e}");
    // Another producer has its own sequence.
    assert_eq!(
        conn.request(idempotent(&["x"], 8, 0), false).await.unwrap(),
        published(2, 1)
    );
    assert_eq!(
        conn.request(idempotent(&["c"], 7, 1), false).await.unwrap(),
        published(3, 1)
    );
    // Skipping ahead or going back is refused.
    for seq in [3, 0] {
        let e = conn
            .request(idempotent(&["z"], 7, seq), false)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{e}");
        assert!(e.to_string().contains("out-of-order sequence"), "{e}");
        assert!(e.to_string().contains("(expected 2)"), "{e}");
    }
    // Publishing plainly is unaffected.
    let plain = Request::Publish {
        topic: "t".into(),
        batch: Batch::from_payloads(["p"]),
    };
    assert_eq!(conn.request(plain, false).await.unwrap(), published(4, 1));
    conn.close();

    // The producer state is on disk: a restarted peer still recognises the resend.
    cluster.restart_peer(0).await.unwrap();
    let conn = Connection::connect(&addr, None).await.unwrap();
    assert_eq!(
        conn.request(idempotent(&["c"], 7, 1), false).await.unwrap(),
        published(3, 1)
    );
    assert_eq!(
        conn.request(idempotent(&["x"], 8, 0), false).await.unwrap(),
        published(2, 1)
    );
    assert_eq!(
        conn.request(idempotent(&["d"], 7, 2), false).await.unwrap(),
        published(5, 1)
    );

    let got = pull_all(&c, "t", "reader").await;
    let want: Vec<(u64, Vec<u8>)> = ["a", "b", "x", "c", "p", "d"]
        .iter()
        .enumerate()
        .map(|(i, p)| (i as u64, p.as_bytes().to_vec()))
        .collect();
    assert_eq!(got, want);

    // Deleting the topic forgets its producers: a new topic of the same name starts over,
    // and a producer going on from where it was on the old topic is unknown there.
    c.delete_topic("t").await.unwrap();
    c.create_topic("t", Some("peer1"), Retention::default())
        .await
        .unwrap();
    let e = conn
        .request(idempotent(&["old"], 7, 3), false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::UnknownProducer), "{e}");
    assert_eq!(
        conn.request(idempotent(&["new"], 7, 0), false)
            .await
            .unwrap(),
        published(0, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_starts_a_new_producer_when_the_host_forgot_its_own() {
    let cluster = Cluster::start(1).await.unwrap();
    let c = cluster.client();
    c.create_topic("t", Some("peer1"), Retention::default())
        .await
        .unwrap();
    for i in 0..3 {
        assert_eq!(c.publish("t", format!("a{i}")).await.unwrap(), i);
    }
    // Another client deletes and makes the topic again: the host knows nothing of this
    // client's producer, which is three batches into its sequence.
    let other = cluster.client();
    other.delete_topic("t").await.unwrap();
    other
        .create_topic("t", Some("peer1"), Retention::default())
        .await
        .unwrap();
    for i in 0..3 {
        assert_eq!(c.publish("t", format!("b{i}")).await.unwrap(), i);
    }
    let got = pull_all(&c, "t", "reader").await;
    let want: Vec<(u64, Vec<u8>)> = (0..3).map(|i| (i, format!("b{i}").into_bytes())).collect();
    assert_eq!(got, want, "each message once, under the new producer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn closing_connections_mid_stream_loses_and_duplicates_nothing() {
    const N: usize = 20_000;
    let cluster = Cluster::start(1).await.unwrap();
    let c = cluster.client();
    c.create_topic("t", Some("peer1"), Retention::default())
        .await
        .unwrap();
    let addr = cluster.peer_addr(0);

    let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let publisher = {
        let c = c.clone();
        tokio::spawn(async move {
            // A window of messages in flight keeps batches on the wire all the time, so the
            // cuts land mid-batch rather than between two bursts.
            const WINDOW: usize = 500;
            let mut pending = std::collections::VecDeque::new();
            let mut offsets = Vec::with_capacity(N);
            for i in 0..N {
                pending.push_back(c.publish_nowait("t", format!("m{i}")));
                if pending.len() >= WINDOW {
                    offsets.push(pending.pop_front().expect("non-empty").await);
                    let _ = acked_tx.send(());
                }
            }
            for a in pending {
                offsets.push(a.await);
                let _ = acked_tx.send(());
            }
            offsets
        })
    };
    // Cuts the publisher's connection under it every few hundred acknowledgements, so some
    // batches are lost on the way and some acknowledgements are lost on the way back.
    let cutter = {
        let c = c.clone();
        tokio::spawn(async move {
            let mut cuts = 0;
            let mut seen = 0;
            while acked_rx.recv().await.is_some() {
                seen += 1;
                if seen % 300 == 0 {
                    c.connection(&addr).await.unwrap().close();
                    cuts += 1;
                }
            }
            cuts
        })
    };
    let offsets = publisher.await.unwrap();
    let cuts = cutter.await.unwrap();
    assert!(cuts > 0);
    for (i, r) in offsets.iter().enumerate() {
        assert_eq!(
            r.as_ref().unwrap_or_else(|e| panic!("message {i}: {e}")),
            &(i as u64),
            "message {i}"
        );
    }

    let got = pull_all(&c, "t", "reader").await;
    assert_eq!(got.len(), N);
    for (i, (offset, payload)) in got.iter().enumerate() {
        assert_eq!(*offset, i as u64);
        assert_eq!(payload, format!("m{i}").as_bytes());
    }
    assert_eq!(c.topic_stats("t").await.unwrap().next_offset, N as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_bounds_its_idempotent_producers() {
    // The per-topic limit of the peer (4,096 producers remembered).
    const LIMIT: u64 = 4096;
    let cluster = Cluster::start(1).await.unwrap();
    let c = cluster.client();
    c.create_topic("t", Some("peer1"), Retention::default())
        .await
        .unwrap();
    let conn = Connection::connect(&cluster.peer_addr(0), None)
        .await
        .unwrap();
    for p in 0..LIMIT {
        assert_eq!(
            conn.request(idempotent(&["m"], p, 0), false).await.unwrap(),
            published(p, 1)
        );
    }
    // All of them were active just now, so none may be forgotten for a new one (it might
    // still be resending): the new producer is refused, and nothing is stored.
    let e = conn
        .request(idempotent(&["m"], LIMIT, 0), false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::LimitReached), "{e}");
    assert!(e.to_string().contains("4096 idempotent producers"), "{e}");
    // Known producers go on, and plain publishes are not limited.
    assert_eq!(
        conn.request(idempotent(&["n"], 0, 1), false).await.unwrap(),
        published(LIMIT, 1)
    );
    assert_eq!(c.publish_batch("t", &["plain"]).await.unwrap(), LIMIT + 1);
}
