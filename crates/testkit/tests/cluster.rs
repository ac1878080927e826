//! Whole-cluster tests: an index and peers on real sockets, driven through the client library.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use peerbus_client::{Client, ClientError, Connection, ErrorCode, Retention, StartFrom};
use peerbus_proto::{Batch, Request, Response};
use peerbus_testkit::{Cluster, ClusterOptions};

fn code(e: &ClientError) -> Option<ErrorCode> {
    e.code()
}

/// The next `n` messages of a following subscription; fails if one takes over a minute.
async fn next_messages(
    sub: &mut peerbus_client::Subscription,
    n: usize,
) -> Vec<peerbus_client::Message> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(60), sub.next())
            .await
            .expect("messages keep coming")
            .expect("stream open")
            .expect("no error");
        got.push(m);
    }
    got
}

/// A task that publishes every payload to `topic` without waiting between them, then
/// yields their acknowledged offsets in publish order.
fn spawn_publisher(
    client: Client,
    topic: &'static str,
    payloads: impl Iterator<Item = Vec<u8>>,
) -> tokio::task::JoinHandle<Vec<u64>> {
    let payloads: Vec<Vec<u8>> = payloads.collect();
    tokio::spawn(async move {
        let acks: Vec<_> = payloads
            .into_iter()
            .map(|p| client.publish_nowait(topic, p))
            .collect();
        let mut offsets = Vec::with_capacity(acks.len());
        for a in acks {
            offsets.push(a.await.unwrap());
        }
        offsets
    })
}

async fn pull_all(c: &Client, topic: &str, sub: &str) -> Vec<String> {
    let mut got = Vec::new();
    loop {
        let set = c.pull(topic, sub, 1000, Duration::ZERO).await.unwrap();
        if set.is_empty() {
            return got;
        }
        got.extend(
            set.batch
                .iter()
                .map(|b| String::from_utf8(b.to_vec()).unwrap()),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_topic_api_through_the_library() {
    let cluster = Cluster::start(3).await.unwrap();
    let c = cluster.client();

    // Create on a named peer and by placement.
    let a = c
        .create_topic("news", Some("peer2"), Retention::default())
        .await
        .unwrap();
    assert_eq!(a.peer_name, "peer2");
    assert_eq!(a.addr, cluster.peer_addr(1));
    let b = c
        .create_topic("sports.football", None, Retention::default())
        .await
        .unwrap();
    assert_ne!(b.peer_name, "peer2", "placement picks a less-loaded peer");
    let dup = c
        .create_topic("news", None, Retention::default())
        .await
        .unwrap_err();
    assert_eq!(code(&dup), Some(ErrorCode::Exists));
    assert_eq!(dup.to_string(), "topic 'news' exists on peer peer2");
    let bad = c
        .create_topic("bad name", None, Retention::default())
        .await
        .unwrap_err();
    assert!(bad.to_string().contains("whitespace"), "{bad}");

    // Lookup and list.
    assert_eq!(c.lookup("news").await.unwrap().peer_name, "peer2");
    let names: Vec<String> = c
        .list_topics(None)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.topic)
        .collect();
    assert_eq!(names, vec!["news", "sports.football"]);
    let sports = c.list_topics(Some("sports.")).await.unwrap();
    assert_eq!(sports.len(), 1);

    // Publish before anyone subscribes; a late subscriber still gets everything.
    for (i, m) in ["one", "two", "three"].iter().enumerate() {
        assert_eq!(c.publish("news", *m).await.unwrap(), i as u64);
    }
    assert_eq!(c.subscribe("news", "alice", None).await.unwrap(), 0);
    assert_eq!(pull_all(&c, "news", "alice").await, ["one", "two", "three"]);
    assert!(
        pull_all(&c, "news", "alice").await.is_empty(),
        "pull advances"
    );
    // Pull without subscribing subscribes implicitly from the oldest message.
    assert_eq!(pull_all(&c, "news", "bob").await.len(), 3);
    // --from latest and an explicit offset.
    assert_eq!(
        c.subscribe("news", "carol", Some(StartFrom::Latest))
            .await
            .unwrap(),
        3
    );
    assert_eq!(
        c.subscribe("news", "dave", Some(StartFrom::Offset(1)))
            .await
            .unwrap(),
        1
    );
    assert_eq!(pull_all(&c, "news", "dave").await, ["two", "three"]);

    let subs: Vec<String> = c
        .subscribers("news")
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(subs, ["alice", "bob", "carol", "dave"]);
    c.unsubscribe("news", "bob").await.unwrap();
    let e = c.unsubscribe("news", "bob").await.unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::NotFound));
    assert_eq!(c.subscribers("news").await.unwrap().len(), 3);

    // Peers list with counts.
    let peers = c.peers().await.unwrap();
    assert_eq!(peers.len(), 3);
    assert!(
        peers
            .iter()
            .all(|p| p.active && p.registrations == 1 && p.ttl_left_ms > 0)
    );
    assert_eq!(peers.iter().map(|p| p.topics).sum::<u32>(), 2);

    // Delete: gone from the index and from its host.
    c.delete_topic("news").await.unwrap();
    let e = c.lookup("news").await.unwrap_err();
    assert_eq!(e.to_string(), "topic 'news' not found");
    let e = c.publish("news", "x").await.unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::NotFound), "{e}");
    // The name is free again, and starts from offset 0.
    c.create_topic("news", Some("peer1"), Retention::default())
        .await
        .unwrap();
    assert_eq!(c.publish("news", "fresh").await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_forwards_requests_for_topics_it_does_not_host() {
    let cluster = Cluster::start(2).await.unwrap();
    let c = cluster.client();
    c.create_topic("t", Some("peer1"), Retention::default())
        .await
        .unwrap();
    // A thin client that only knows peer2.
    let conn = Connection::connect(&cluster.peer_addr(1), None)
        .await
        .unwrap();
    let publish = Request::Publish {
        topic: "t".into(),
        batch: Batch::from_payloads(["via peer2"]),
    };
    let r = conn.request(publish.clone(), true).await.unwrap();
    assert_eq!(
        r,
        Response::Published {
            first_offset: 0,
            count: 1
        }
    );
    // Without forwarding the peer says it is not the host, so a library client re-resolves.
    let e = conn.request(publish, false).await.unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::NotHost));
    // Index questions asked of a peer are answered too.
    match conn
        .request(Request::LookupTopic { topic: "t".into() }, true)
        .await
        .unwrap()
    {
        Response::Location(l) => assert_eq!(l.peer_name, "peer1"),
        other => panic!("{other:?}"),
    }
    // A follow through the non-hosting peer streams too.
    let (_, _, mut rx) = conn
        .follow(
            peerbus_proto::Subscribe {
                topic: "t".into(),
                subscriber: "s".into(),
                from: Some(StartFrom::Earliest),
                follow: None,
            },
            true,
        )
        .await
        .unwrap();
    match rx.recv().await.unwrap() {
        peerbus_client::SubEvent::Messages(m) => {
            assert_eq!(m.batch.iter().next().unwrap(), "via peer2")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_publishers_eight_subscribers_exactly_once_in_order() {
    const PUBS: usize = 8;
    const SUBS: usize = 8;
    const EACH: usize = 400;
    let cluster = Cluster::start(3).await.unwrap();
    let c = cluster.client();
    c.create_topic("load", None, Retention::default())
        .await
        .unwrap();

    let mut subs = Vec::new();
    for s in 0..SUBS {
        let mut sub = cluster
            .client()
            .follow("load", &format!("s{s}"), Some(StartFrom::Earliest))
            .await
            .unwrap();
        subs.push(tokio::spawn(async move {
            next_messages(&mut sub, PUBS * EACH)
                .await
                .into_iter()
                .map(|m| (m.offset, String::from_utf8(m.payload.to_vec()).unwrap()))
                .collect::<Vec<_>>()
        }));
    }
    let mut pubs = Vec::new();
    for p in 0..PUBS {
        let payloads = (0..EACH).map(|i| format!("p{p}-{i}").into_bytes());
        pubs.push(spawn_publisher(cluster.client(), "load", payloads));
    }
    let mut all_offsets = Vec::new();
    for p in pubs {
        let offs = p.await.unwrap();
        assert!(
            offs.windows(2).all(|w| w[0] < w[1]),
            "a publisher's messages keep their order"
        );
        all_offsets.extend(offs);
    }
    all_offsets.sort();
    assert_eq!(all_offsets, (0..(PUBS * EACH) as u64).collect::<Vec<_>>());
    for s in subs {
        let got = s.await.unwrap();
        let offsets: Vec<u64> = got.iter().map(|(o, _)| *o).collect();
        assert_eq!(
            offsets,
            (0..(PUBS * EACH) as u64).collect::<Vec<_>>(),
            "every offset once, in order"
        );
        let mut next: HashMap<String, usize> = HashMap::new();
        for (_, m) in &got {
            let (p, i) = m.split_once('-').unwrap();
            let i: usize = i.parse().unwrap();
            let n = next.entry(p.to_string()).or_default();
            assert_eq!(*n, i, "publisher {p}'s messages arrive in publish order");
            *n += 1;
        }
        assert!(next.values().all(|&n| n == EACH));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_restart_serves_every_acknowledged_message_once() {
    let mut cluster = Cluster::start(1).await.unwrap();
    let c = cluster.client();
    c.create_topic("log", None, Retention::default())
        .await
        .unwrap();
    let acks: Vec<_> = (0..1000)
        .map(|i| c.publish_nowait("log", format!("m{i}")))
        .collect();
    for a in acks {
        a.await.unwrap();
    }
    assert_eq!(pull_all(&c, "log", "half").await.len(), 1000);
    c.publish("log", "after-pull").await.unwrap();

    cluster.restart_peer(0).await.unwrap();
    let c = cluster.client();
    let all = pull_all(&c, "log", "fresh").await;
    assert_eq!(all.len(), 1001);
    assert_eq!(all[0], "m0");
    assert_eq!(all[999], "m999");
    // The committed offset survived: only the message after the pull is new for "half".
    assert_eq!(pull_all(&c, "log", "half").await, ["after-pull"]);
    // Offsets continue where they stopped.
    assert_eq!(c.publish("log", "next").await.unwrap(), 1001);
    let peers = c.peers().await.unwrap();
    assert_eq!(peers[0].registrations, 2, "same identity, registered again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_restart_peers_rejoin_with_their_cookie_and_topics() {
    let mut cluster = Cluster::start_with(ClusterOptions {
        peers: 2,
        ttl: Duration::from_secs(2),
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let c = cluster.client();
    c.create_topic("a", Some("peer1"), Retention::default())
        .await
        .unwrap();
    c.create_topic("b", Some("peer2"), Retention::default())
        .await
        .unwrap();
    c.publish("a", "before").await.unwrap();
    let ids: Vec<u64> = c.peers().await.unwrap().iter().map(|p| p.id).collect();

    cluster.restart_index().await.unwrap();
    let c = cluster.client();
    // Peers notice on their next keepalive, reconnect and register again.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(peers) = c.peers().await
            && peers.iter().all(|p| p.active && p.registrations >= 2)
        {
            assert_eq!(
                peers.iter().map(|p| p.id).collect::<Vec<_>>(),
                ids,
                "same ids"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "peers did not re-register after the index restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(c.lookup("a").await.unwrap().peer_name, "peer1");
    assert_eq!(c.lookup("b").await.unwrap().peer_name, "peer2");
    assert_eq!(pull_all(&c, "a", "x").await, ["before"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_peer_leaves_and_its_topics_are_not_found() {
    let mut cluster = Cluster::start(2).await.unwrap();
    let c = cluster.client();
    c.create_topic("gone", Some("peer2"), Retention::default())
        .await
        .unwrap();
    cluster.stop_peer(1).await;
    let e = c.lookup("gone").await.unwrap_err();
    assert_eq!(e.to_string(), "topic 'gone' not found");
    let peers = c.peers().await.unwrap();
    let p2 = peers.iter().find(|p| p.name == "peer2").unwrap();
    assert!(!p2.active);
    assert_eq!(p2.ttl_left_ms, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumed_retention_deletes_what_every_subscriber_pulled() {
    let cluster = Cluster::start(1).await.unwrap();
    let c = cluster.client();
    let r = Retention {
        consumed: true,
        ..Retention::default()
    };
    c.create_topic("jobs", None, r).await.unwrap();
    c.subscribe("jobs", "a", None).await.unwrap();
    c.subscribe("jobs", "b", None).await.unwrap();
    for i in 0..10 {
        c.publish("jobs", format!("{i}")).await.unwrap();
    }
    assert_eq!(pull_all(&c, "jobs", "a").await.len(), 10);
    assert_eq!(
        c.topic_stats("jobs").await.unwrap().first_offset,
        0,
        "b has not pulled"
    );
    assert_eq!(pull_all(&c, "jobs", "b").await.len(), 10);
    let stats = c.topic_stats("jobs").await.unwrap();
    assert_eq!(
        (stats.first_offset, stats.next_offset, stats.bytes),
        (10, 10, 0)
    );
}

/// In memory mode a caught-up follower is served by the publishing task itself. One that
/// keeps up and one that reads nothing until every publish is acknowledged (so its
/// connection fills and its own task takes over again) both get every message once, in
/// order, with the payload each publish was acknowledged for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_mode_live_and_stalled_followers_get_everything_once_in_order() {
    const PUBS: usize = 4;
    const EACH: usize = 128;
    // 32 MiB in all: more than a connection's outbox, socket buffers and client queue hold.
    const SIZE: usize = 64 << 10;
    let cluster = Cluster::start_with(ClusterOptions {
        peers: 1,
        durability: peerbus_peer::Durability::Memory,
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let c = cluster.client();
    c.create_topic("live", None, Retention::default())
        .await
        .unwrap();
    let mut fast = cluster
        .client()
        .follow("live", "fast", Some(StartFrom::Latest))
        .await
        .unwrap();
    let mut slow = cluster
        .client()
        .follow("live", "slow", Some(StartFrom::Latest))
        .await
        .unwrap();
    let total = PUBS * EACH;
    let payload = |p: usize, i: usize| {
        let mut v = vec![(p * 31 + i) as u8; SIZE];
        v[..16].copy_from_slice(&((p as u64) << 32 | i as u64).to_be_bytes().repeat(2));
        v
    };
    let fast_reader = tokio::spawn(async move { next_messages(&mut fast, total).await });
    let mut pubs = Vec::new();
    for p in 0..PUBS {
        let payloads = (0..EACH).map(|i| payload(p, i));
        pubs.push(spawn_publisher(cluster.client(), "live", payloads));
    }
    // offset → (publisher, index) as acknowledged.
    let mut acked = HashMap::new();
    for (p, h) in pubs.into_iter().enumerate() {
        for (i, offset) in h.await.unwrap().into_iter().enumerate() {
            assert!(
                acked.insert(offset, (p, i)).is_none(),
                "offset {offset} twice"
            );
        }
    }
    assert_eq!(acked.len(), total);
    let slow_got = next_messages(&mut slow, total).await;
    for got in [fast_reader.await.unwrap(), slow_got] {
        let offsets: Vec<u64> = got.iter().map(|m| m.offset).collect();
        assert_eq!(
            offsets,
            (0..total as u64).collect::<Vec<_>>(),
            "every offset once, in order"
        );
        for m in got {
            let (p, i) = acked[&m.offset];
            assert!(
                m.payload == payload(p, i),
                "offset {} holds publish {p}/{i}",
                m.offset
            );
        }
    }
}
