//! At-least-once consumption through the library: a batch is committed only once the
//! application has it, so a consumer that dies holding a batch, or a delivery lost on the
//! way, gets it again; nothing is skipped, and `consumed` retention deletes only what was
//! acknowledged.

use std::time::Duration;

use futures::StreamExt;
use peerbus_client::Retention;
use peerbus_testkit::{Cluster, ClusterOptions};

const DEADLINE: Duration = Duration::from_secs(20);

async fn with_messages(topic: &str, n: usize, retention: Retention) -> Cluster {
    let cluster = Cluster::start_with(ClusterOptions {
        peers: 1,
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let c = cluster.client();
    c.create_topic(topic, Some("peer1"), retention)
        .await
        .unwrap();
    for i in 0..n {
        c.publish(topic, format!("m{i}")).await.unwrap();
    }
    cluster
}

fn texts(set: &peerbus_proto::MessageSet) -> Vec<String> {
    set.batch
        .iter()
        .map(|b| String::from_utf8(b.to_vec()).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_dies_holding_a_batch_leaves_it_to_the_next() {
    let cluster = with_messages("jobs", 10, Retention::default()).await;
    let first = cluster.client();
    let got = first
        .pull("jobs", "worker", 4, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(texts(&got), ["m0", "m1", "m2", "m3"]);
    // The first consumer dies before asking for more: a new one gets the same batch.
    drop(first);
    let second = cluster.client();
    let again = second
        .pull("jobs", "worker", 4, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(again.first_offset, 0);
    assert_eq!(texts(&again), texts(&got));
    // Asking for the next batch acknowledges the previous one.
    let next = second
        .pull("jobs", "worker", 100, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(next.first_offset, 4);
    assert_eq!(next.len(), 6);
    let subs = second.subscribers("jobs").await.unwrap();
    assert_eq!(
        subs[0].next_offset, 4,
        "the last batch is not acknowledged yet"
    );
    second.ack("jobs", "worker", 10).await.unwrap();
    assert!(
        second
            .pull_uncommitted("jobs", "worker", 100, Duration::ZERO)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_stops_before_handling_a_batch_gets_it_again() {
    let cluster = with_messages("feed", 20, Retention::default()).await;
    let c = cluster.client();
    let mut sub = c.follow("feed", "reader", None).await.unwrap();
    let first = tokio::time::timeout(DEADLINE, sub.next_batch())
        .await
        .expect("no delivery")
        .unwrap()
        .unwrap();
    assert_eq!(first.first_offset, 0);
    // Dropped before asking for more: that batch was never acknowledged.
    drop(sub);
    let mut sub = c.follow("feed", "reader", None).await.unwrap();
    let again = tokio::time::timeout(DEADLINE, sub.next_batch())
        .await
        .expect("no delivery")
        .unwrap()
        .unwrap();
    assert_eq!(again.first_offset, 0, "resumed past a batch nobody handled");
    // Handling every message one by one and asking for more acknowledges them.
    let mut seen = again.next_offset();
    while seen < 20 {
        let m = tokio::time::timeout(DEADLINE, sub.next())
            .await
            .expect("no delivery")
            .unwrap()
            .unwrap();
        seen = m.offset + 1;
    }
    // The last batch is acknowledged once the next is asked for.
    assert!(
        futures::FutureExt::now_or_never(sub.next()).is_none(),
        "nothing more was published"
    );
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let subs = c.subscribers("feed").await.unwrap();
        if subs[0].next_offset == 20 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{subs:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumed_retention_deletes_only_acknowledged_messages() {
    let consumed = Retention {
        consumed: true,
        ..Retention::default()
    };
    let cluster = with_messages("once", 10, consumed).await;
    let c = cluster.client();
    let got = c
        .pull_uncommitted("once", "only", 100, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(got.len(), 10);
    assert_eq!(c.topic_stats("once").await.unwrap().first_offset, 0);
    c.ack("once", "only", 6).await.unwrap();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while c.topic_stats("once").await.unwrap().first_offset != 6 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rest = c
        .pull_uncommitted("once", "only", 100, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(texts(&rest), ["m6", "m7", "m8", "m9"]);
}

/// A subscription whose consumer stops reading must not stall the connection it shares
/// with other requests and subscriptions: it is paused on the host, the rest go on, and once
/// its reader catches up it follows again by itself, so every message still arrives, in
/// order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscription_pauses_and_its_connection_keeps_serving() {
    let cluster = with_messages("slow", 0, Retention::default()).await;
    let c = cluster.client();
    c.create_topic("fast", Some("peer1"), Retention::default())
        .await
        .unwrap();
    let mut stalled = c.follow("slow", "stuck", None).await.unwrap();
    let mut active = c.follow("fast", "live", None).await.unwrap();
    // One delivery per publish, far more than the subscription buffers.
    for i in 0..200 {
        tokio::time::timeout(DEADLINE, c.publish("slow", format!("m{i}")))
            .await
            .expect("a publish on the shared connection stalled")
            .unwrap();
    }
    tokio::time::timeout(DEADLINE, c.publish("fast", "still flowing"))
        .await
        .expect("a publish on the shared connection stalled")
        .unwrap();
    let m = tokio::time::timeout(DEADLINE, active.next())
        .await
        .expect("the other subscription stalled")
        .unwrap()
        .unwrap();
    assert_eq!(&m.payload[..], b"still flowing");
    // The stalled one, read again, yields every message once, in order: what it buffered,
    // then the rest after it followed again by itself.
    for i in 0..200 {
        let m = tokio::time::timeout(DEADLINE, stalled.next())
            .await
            .expect("the paused subscription did not resume")
            .unwrap()
            .unwrap();
        assert_eq!(m.offset, i);
        assert_eq!(m.payload, format!("m{i}").into_bytes());
    }
}

/// A position remembered from before an unsubscribe or from an earlier topic of the same
/// name neither fails later pulls nor skips the new topic's messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_pull_positions_are_ignored() {
    let cluster = with_messages("again", 10, Retention::default()).await;
    let c = cluster.client();
    let other = cluster.client();
    assert_eq!(
        c.pull("again", "r", 100, Duration::ZERO)
            .await
            .unwrap()
            .len(),
        10
    );
    // Deleted and recreated by someone else: this client still remembers offset 10.
    other.delete_topic("again").await.unwrap();
    other
        .create_topic("again", Some("peer1"), Retention::default())
        .await
        .unwrap();
    for i in 0..3 {
        other.publish("again", format!("n{i}")).await.unwrap();
    }
    let set = c.pull("again", "r", 100, Duration::ZERO).await.unwrap();
    assert_eq!(texts(&set), ["n0", "n1", "n2"]);
    // Unsubscribed in between: the next pull starts afresh, and does not fail.
    c.unsubscribe("again", "r").await.unwrap();
    let set = c.pull("again", "r", 100, Duration::ZERO).await.unwrap();
    assert_eq!(set.first_offset, 0);
    assert_eq!(set.len(), 3);
}
