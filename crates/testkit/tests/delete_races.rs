//! Deleting a topic while its subscribers commit: the deletion is the last write for the
//! topic's id, so a deleted topic never comes back, a recreated one keeps its data, and a new
//! topic never takes an old topic's id (and with it the old topic's leftover rows).

use std::time::Duration;

use futures::StreamExt;
use peerbus_client::Retention;
use peerbus_proto::StartFrom;
use peerbus_store::{Backend, FjallBackend, Op};
use peerbus_testkit::{Cluster, ClusterOptions};

const DEADLINE: Duration = Duration::from_secs(20);

async fn one_peer() -> Cluster {
    Cluster::start_with(ClusterOptions {
        peers: 1,
        ..ClusterOptions::default()
    })
    .await
    .unwrap()
}

/// Leftover rows of a deleted topic (here a subscriber position written under its id) must
/// never be read as another topic's after restarts: ids are never given twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_topic_never_inherits_a_deleted_topics_rows() {
    let mut cluster = one_peer().await;
    let c = cluster.client();
    c.create_topic("old", Some("peer1"), Retention::default())
        .await
        .unwrap();
    cluster.stop_peer(0).await;
    let store_dir = cluster.peer_data(0).join("store");
    let old_id = {
        let store = FjallBackend::open(&store_dir).unwrap();
        let topics = store.topics().unwrap();
        topics.iter().find(|(n, _)| n == "old").unwrap().1.id
    };
    cluster.restart_peer(0).await.unwrap();
    cluster.client().delete_topic("old").await.unwrap();
    cluster.stop_peer(0).await;
    // What a commit racing the deletion used to leave behind: alice at 5000 under the old
    // topic's id.
    {
        let store = FjallBackend::open(&store_dir).unwrap();
        store
            .apply(&[Op::SetOffset {
                topic_id: old_id,
                subscriber: "alice".into(),
                offset: 5000,
            }])
            .unwrap();
        store.persist(true).unwrap();
    }
    cluster.restart_peer(0).await.unwrap();
    let c = cluster.client();
    c.create_topic("fresh", Some("peer1"), Retention::default())
        .await
        .unwrap();
    for m in ["a", "b", "c"] {
        c.publish("fresh", m).await.unwrap();
    }
    cluster.restart_peer(0).await.unwrap();
    let c = cluster.client();
    let set = c.pull("fresh", "alice", 100, Duration::ZERO).await.unwrap();
    assert_eq!(set.first_offset, 0, "alice starts at the oldest message");
    assert_eq!(set.len(), 3);
}

/// Creates `topic`, follows it, publishes in the background, and deletes it once the first
/// delivery arrived, so the delete lands while deliveries and their commits flow.
async fn delete_while_followed(c: &peerbus_client::Client, topic: &str, retention: Retention) {
    c.create_topic(topic, Some("peer1"), retention)
        .await
        .unwrap();
    let mut sub = c
        .follow(topic, "follower", Some(StartFrom::Earliest))
        .await
        .unwrap();
    let publisher = {
        let (c, topic) = (c.clone(), topic.to_string());
        tokio::spawn(async move {
            for i in 0..200 {
                if c.publish(&topic, format!("m{i}")).await.is_err() {
                    break;
                }
            }
        })
    };
    let first = tokio::time::timeout(DEADLINE, sub.next())
        .await
        .expect("no delivery");
    assert!(first.is_some());
    c.delete_topic(topic).await.unwrap();
    publisher.await.unwrap();
}

/// Deletes race live followers' commits (with `consumed` retention, each commit also cuts the
/// log and rewrites the topic's metadata). After a restart, the deleted topic stays deleted
/// and the recreated one serves every acknowledged message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_racing_a_delete_neither_resurrect_it_nor_orphan_its_successor() {
    let mut cluster = one_peer().await;
    let consumed = Retention {
        consumed: true,
        ..Retention::default()
    };
    for round in 0..10 {
        let c = cluster.client();
        let topic = format!("race.{round}");
        delete_while_followed(&c, &topic, consumed).await;
        // Recreated on the same peer, with acknowledged messages.
        c.create_topic(&topic, Some("peer1"), Retention::default())
            .await
            .unwrap();
        for i in 0..5 {
            c.publish(&topic, format!("new{i}")).await.unwrap();
        }
        delete_while_followed(&c, &format!("gone.{round}"), consumed).await;
    }
    cluster.restart_peer(0).await.unwrap();
    let c = cluster.client();
    let expected: Vec<String> = {
        let mut v: Vec<String> = (0..10).map(|r| format!("race.{r}")).collect();
        v.sort();
        v
    };
    // The restarted peer announces everything it loaded in one all-or-nothing request, so
    // once the recreated topics are listed, a resurrected one would be too.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let names = loop {
        let mut names: Vec<String> = c
            .list_topics(None)
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.topic)
            .collect();
        names.sort();
        if expected.iter().all(|e| names.contains(e)) {
            break names;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the restarted peer did not announce its topics: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(names, expected, "deleted topics came back");
    for round in 0..10 {
        let set = c
            .pull(&format!("race.{round}"), "checker", 100, Duration::ZERO)
            .await
            .unwrap();
        let got: Vec<String> = set
            .batch
            .iter()
            .map(|b| String::from_utf8(b.to_vec()).unwrap())
            .collect();
        assert_eq!(
            got,
            ["new0", "new1", "new2", "new3", "new4"],
            "round {round}"
        );
    }
}
