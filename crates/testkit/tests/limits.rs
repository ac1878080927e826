//! What one client can make a node remember is bounded: durable subscribers per topic and
//! participants at the index. Past a bound the answer says which limit was reached, and
//! what was there before goes on working.

use std::time::Duration;

use peerbus_client::{ErrorCode, Retention};
use peerbus_proto::{Request, Response};
use peerbus_testkit::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_bounds_its_durable_subscribers() {
    // The peer's per-topic limit.
    const LIMIT: usize = 10_000;
    let cluster = Cluster::start(1).await.unwrap();
    let c = cluster.client();
    c.create_topic("t", None, Retention::default())
        .await
        .unwrap();
    c.publish("t", "m").await.unwrap();
    for i in 0..LIMIT {
        c.pull_uncommitted("t", &format!("s{i}"), 1, Duration::ZERO)
            .await
            .unwrap();
    }
    let e = c
        .pull_uncommitted("t", "one-too-many", 1, Duration::ZERO)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::LimitReached), "{e}");
    assert!(e.to_string().contains("10000 subscribers"), "{e}");
    assert_eq!(c.subscribers("t").await.unwrap().len(), LIMIT);
    // Known subscribers go on, and an unsubscribe makes room.
    let set = c
        .pull_uncommitted("t", "s7", 1, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(set.len(), 1);
    c.unsubscribe("t", "s7").await.unwrap();
    let set = c
        .pull_uncommitted("t", "one-too-many", 1, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(set.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_bounds_its_participants() {
    // The index's limit.
    const LIMIT: usize = 10_000;
    let cluster = Cluster::start(0).await.unwrap();
    let c = cluster.client();
    let register = |name: String| Request::RegisterParticipant { name };
    for i in 0..LIMIT {
        c.index_request(register(format!("p{i}"))).await.unwrap();
    }
    let e = c
        .index_request(register("one-too-many".into()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::LimitReached), "{e}");
    assert!(e.to_string().contains("10000 participants"), "{e}");
    // The whole list still fits in one answer.
    match c.index_request(Request::ListParticipants).await.unwrap() {
        Response::Participants(v) => assert_eq!(v.len(), LIMIT),
        other => panic!("unexpected answer {other:?}"),
    }
    // A name that is there is still "already registered", and leaving makes room.
    let e = c.index_request(register("p1".into())).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Exists), "{e}");
    c.index_request(Request::UnregisterParticipant { name: "p1".into() })
        .await
        .unwrap();
    c.index_request(register("one-too-many".into()))
        .await
        .unwrap();
}
