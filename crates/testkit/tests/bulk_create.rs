//! Creating many topics in one request: through the index (spread over the peers or on a
//! named one) or straight at a peer; every name must be valid, new and listed once.

use peerbus_client::{Client, ErrorCode, Retention};
use peerbus_proto::{Request, Response};
use peerbus_testkit::Cluster;

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}.{i:05}")).collect()
}

async fn count_under(c: &Client, prefix: &str) -> usize {
    c.list_topics(Some(prefix)).await.unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_create_spreads_over_the_peers_and_every_topic_is_hosted() {
    let cluster = Cluster::start(3).await.unwrap();
    let c = cluster.client();
    // One topic already on peer1: the spread evens the loads out.
    c.create_topic("first", Some(&cluster.peer_name(0)), Retention::default())
        .await
        .unwrap();
    let topics = names("bulk", 3_002);
    let created = c
        .create_topics(topics.clone(), None, Retention::default())
        .await
        .unwrap();
    let mut counts: Vec<(String, u64)> = created
        .iter()
        .map(|h| (h.peer_name.clone(), h.count))
        .collect();
    counts.sort();
    assert_eq!(
        counts,
        vec![
            ("peer1".to_string(), 1_000),
            ("peer2".to_string(), 1_001),
            ("peer3".to_string(), 1_001)
        ]
    );
    let listed = c.list_topics(Some("bulk.")).await.unwrap();
    assert_eq!(listed.len(), topics.len());
    // Every topic is found where its host said, and really works there.
    for t in topics.iter().step_by(97) {
        let loc = c.lookup(t).await.unwrap();
        assert!(created.iter().any(|h| h.addr == loc.addr), "{t} at {loc:?}");
        assert_eq!(c.publish(t, "hello").await.unwrap(), 0);
        let got = c.pull(t, "s", 10, std::time::Duration::ZERO).await.unwrap();
        assert_eq!(got.len(), 1);
    }
    // The peers' own view agrees with the index.
    let peers = c.peers().await.unwrap();
    let total: u32 = peers.iter().map(|p| p.topics).sum();
    assert_eq!(total as usize, topics.len() + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bulk_creates_are_refused_and_create_nothing() {
    let cluster = Cluster::start(2).await.unwrap();
    let c = cluster.client();
    c.create_topic("taken.3", None, Retention::default())
        .await
        .unwrap();

    let mut twice = names("dup", 10);
    twice.push("dup.00004".into());
    let e = c
        .create_topics(twice, None, Retention::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{e}");
    assert!(e.to_string().contains("'dup.00004' is listed twice"), "{e}");
    assert_eq!(count_under(&c, "dup.").await, 0);

    let taken = vec!["taken.1".to_string(), "taken.2".into(), "taken.3".into()];
    let e = c
        .create_topics(taken, None, Retention::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Exists), "{e}");
    assert!(
        e.to_string().contains("topic 'taken.3' exists on peer"),
        "{e}"
    );
    assert_eq!(count_under(&c, "taken.").await, 1);

    // Refused by the library before sending, and by the index when sent raw.
    let bad = vec!["ok.1".to_string(), "has space".into()];
    let e = c
        .create_topics(bad.clone(), None, Retention::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("has space"), "{e}");
    let e = c
        .index_request(Request::CreateTopics {
            topics: bad,
            retention: Retention::default(),
            peer: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{e}");
    assert_eq!(count_under(&c, "ok.").await, 0);

    let e = c
        .create_topics(names("x", 3), Some("nobody"), Retention::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}");

    // An empty request creates nothing and is not an error.
    assert!(
        c.create_topics(Vec::new(), None, Retention::default())
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_create_on_a_named_peer_or_sent_to_a_peer_hosts_them_there() {
    let cluster = Cluster::start(2).await.unwrap();
    let c = cluster.client();
    let created = c
        .create_topics(
            names("named", 50),
            Some(&cluster.peer_name(1)),
            Retention::default(),
        )
        .await
        .unwrap();
    assert_eq!(created.len(), 1);
    assert_eq!(created[0].peer_name, "peer2");
    assert_eq!(created[0].count, 50);
    assert_eq!(
        c.lookup("named.00049").await.unwrap().addr,
        cluster.peer_addr(1)
    );

    // Straight at peer1: it hosts them and claims them at the index.
    let answer = c
        .request_at(
            &cluster.peer_addr(0),
            Request::CreateTopics {
                topics: names("direct", 20),
                retention: Retention::default(),
                peer: None,
            },
            false,
        )
        .await
        .unwrap();
    let Response::Created(on) = answer else {
        panic!("unexpected answer {answer:?}");
    };
    assert_eq!((on[0].peer_name.as_str(), on[0].count), ("peer1", 20));
    assert_eq!(
        c.lookup("direct.00000").await.unwrap().addr,
        cluster.peer_addr(0)
    );
    // A peer refuses names another peer holds, and creates none of the set.
    let e = c
        .request_at(
            &cluster.peer_addr(0),
            Request::CreateTopics {
                topics: vec!["direct.x".into(), "named.00001".into()],
                retention: Retention::default(),
                peer: None,
            },
            false,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Exists), "{e}");
    assert!(e.to_string().contains("exists on peer peer2"), "{e}");
    assert!(c.lookup("direct.x").await.is_err());
}

/// One request creates a bounded number of topics, at the index and at a peer: a larger
/// one is refused whole, with the limit in the answer, and creates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_creates_a_bounded_number_of_topics() {
    let cluster = Cluster::start(1).await.unwrap();
    let c = cluster.client();
    let too_many = names("many", peerbus_proto::MAX_CREATE_TOPICS + 1);
    for addr in [cluster.index_addr(), cluster.peer_addr(0)] {
        let e = c
            .request_at(
                &addr,
                Request::CreateTopics {
                    topics: too_many.clone(),
                    retention: Retention::default(),
                    peer: None,
                },
                false,
            )
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::TooLarge), "{addr}: {e}");
        assert!(e.to_string().contains("20000 topic limit"), "{e}");
    }
    // The library refuses it before sending.
    let e = c
        .create_topics(too_many, None, Retention::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("send them in parts"), "{e}");
    assert_eq!(count_under(&c, "many.").await, 0);
    // At the limit it goes through.
    let at_limit = names("many", peerbus_proto::MAX_CREATE_TOPICS);
    c.create_topics(at_limit, None, Retention::default())
        .await
        .unwrap();
    assert_eq!(
        count_under(&c, "many.").await,
        peerbus_proto::MAX_CREATE_TOPICS
    );
}

/// A peer hosting more topics than one frame can name (in chunks) re-announces all of them
/// after an index restart, drops at the index what it no longer hosts, and the paged list
/// shows every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_peer_re_announces_everything_after_an_index_restart() {
    let mut cluster = Cluster::start(1).await.unwrap();
    let c = cluster.client();
    let n = 3 * peerbus_proto::SYNC_TOPICS_CHUNK + 17;
    // Long names, so the whole set is well over one frame.
    let long = "x".repeat(200);
    let topics: Vec<String> = (0..n).map(|i| format!("big.{long}.{i:06}")).collect();
    for chunk in topics.chunks(10_000) {
        c.create_topics(chunk.to_vec(), Some("peer1"), Retention::default())
            .await
            .unwrap();
    }
    assert!(n * 200 > peerbus_proto::DEFAULT_MAX_FRAME);
    let registrations = |peers: Vec<peerbus_proto::PeerInfo>| peers[0].registrations;
    let before = registrations(c.peers().await.unwrap());
    cluster.restart_index().await.unwrap();
    let c = cluster.client();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    // The peer notices the restart at its next keepalive and registers again.
    while c.peers().await.map(registrations).unwrap_or(before) == before {
        assert!(
            std::time::Instant::now() < deadline,
            "the peer did not register again"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    loop {
        let listed = c.list_topics(Some("big.")).await.unwrap_or_default();
        if listed.len() == n {
            let names: Vec<String> = listed.into_iter().map(|t| t.topic).collect();
            assert_eq!(names, topics, "every topic once, in name order");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {n} topics listed after the index restart",
            listed.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(c.publish(&topics[n - 1], "still here").await.unwrap(), 0);
    // The peer holds its lease again once its sync is done: it can claim new topics.
    loop {
        match c
            .create_topic("big.after", Some("peer1"), Retention::default())
            .await
        {
            Ok(_) => break,
            Err(e) => assert!(
                std::time::Instant::now() < deadline,
                "the peer cannot create topics after the index restart: {e}"
            ),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
