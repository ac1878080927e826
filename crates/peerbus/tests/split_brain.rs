//! A peer that lost its lease while its topic was given to another peer must stop serving
//! its old copy when it comes back: a publisher with a stale location gets "not here" (or
//! a forward to the new host), never an acknowledgement that the new host's readers miss.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::spawn;
use peerbus_client::{Client, Connection};
use peerbus_proto::{Batch, ErrorCode, Request, Response};

const DEADLINE: Duration = Duration::from_secs(30);

fn signal(pid: u32, sig: &str) {
    assert!(
        Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
}

async fn active(client: &Client, name: &str) -> bool {
    client
        .peers()
        .await
        .unwrap()
        .iter()
        .any(|p| p.name == name && p.active)
}

async fn poll(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_whose_topic_moved_while_it_was_away_stops_serving_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).display().to_string();
    let index = spawn([
        "index",
        "--listen",
        "127.0.0.1:0",
        "--http",
        "off",
        "--in-memory",
        "--ttl",
        "2",
    ]);
    let peer = |name: &str| {
        spawn([
            "--index",
            &index.addr,
            "peer",
            "--listen",
            "127.0.0.1:0",
            "--name",
            name,
            "--data",
            &d(name),
        ])
    };
    let a = peer("a");
    let _b = peer("b");
    let client = Client::new(index.addr.clone());
    poll("both peers", async || {
        active(&client, "a").await && active(&client, "b").await
    })
    .await;
    client
        .create_topic("orders", Some("a"), peerbus_proto::Retention::default())
        .await
        .unwrap();
    client.publish("orders", "on a").await.unwrap();

    // A freezes past its lease; the topic is created again and lands on B.
    signal(a.child.id(), "-STOP");
    poll("a's lease to expire", async || !active(&client, "a").await).await;
    poll("orders to be free", async || {
        client.lookup("orders").await.is_err()
    })
    .await;
    client
        .create_topic("orders", None, peerbus_proto::Retention::default())
        .await
        .unwrap();
    assert_eq!(client.lookup("orders").await.unwrap().peer_name, "b");
    signal(a.child.id(), "-CONT");

    // A publisher that still has A cached, not forwarding: once A is back it must hear
    // "not here" instead of an acknowledgement.
    let stale = Connection::connect(&a.addr, None).await.unwrap();
    let publish = || Request::Publish {
        topic: "orders".into(),
        batch: Batch::from_payloads([b"stale".as_slice()]),
    };
    poll("a to refuse the moved topic", async || {
        match stale.request(publish(), false).await {
            Ok(Response::Published { .. }) => false,
            Err(e) if e.code() == Some(ErrorCode::NotHost) => true,
            other => panic!("unexpected answer {other:?}"),
        }
    })
    .await;
    // Forwarded, the same publish reaches the new host.
    assert!(matches!(
        stale.request(publish(), true).await,
        Ok(Response::Published { .. })
    ));
    let set = client
        .pull_uncommitted("orders", "auditor", 100, Duration::ZERO)
        .await
        .unwrap();
    let got: Vec<String> = set
        .batch
        .iter()
        .map(|b| String::from_utf8(b.to_vec()).unwrap())
        .collect();
    // Only what B acknowledged is in B's log; A's stale acks (before it was fenced) are not.
    assert_eq!(got.last().map(String::as_str), Some("stale"), "{got:?}");
    assert!(!got.iter().any(|m| m == "on a"), "{got:?}");
}
