//! What one client can make a node remember is bounded: durable subscribers per topic and
//! participants at the index. Past a bound the answer says which limit was reached, and
//! what was there before goes on working. Lists that have no such bound are paged.

use std::time::Duration;

use peerbus_client::{Connection, ErrorCode, Retention};
use peerbus_proto::{FileEntry, PeerAuth, RegisterPeer, Request, Response};
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

/// Registers a peer straight at the index (nothing listens at its address).
async fn register_raw(conn: &Connection, name: &str) -> PeerAuth {
    let req = Request::Register(RegisterPeer {
        name: name.into(),
        addr: format!("{name}.invalid:7000"),
        http: None,
        previous: None,
        keeps_identity: false,
    });
    match conn.request(req, false).await.unwrap() {
        Response::Registered {
            peer_id, cookie, ..
        } => PeerAuth { peer_id, cookie },
        other => panic!("unexpected answer {other:?}"),
    }
}

/// Lists of peers and of files come a page at a time, so none outgrows a frame however
/// many there are; the library asks page after page and gets every one once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_and_file_lists_are_paged() {
    let cluster = Cluster::start(1).await.unwrap();
    let c = cluster.client();
    let conn = Connection::connect(&cluster.index_addr(), None)
        .await
        .unwrap();
    let extra = peerbus_proto::PEER_PAGE + 10;
    let auths = futures::future::join_all((0..extra).map(|i| {
        let conn = conn.clone();
        async move { register_raw(&conn, &format!("p{i:05}")).await }
    }))
    .await;
    match conn
        .request(Request::ListPeers { after: None }, false)
        .await
        .unwrap()
    {
        Response::Peers(p) => assert_eq!(p.len(), peerbus_proto::PEER_PAGE),
        other => panic!("unexpected answer {other:?}"),
    }
    let peers = c.peers().await.unwrap();
    assert_eq!(peers.len(), extra + 1);
    assert!(peers.windows(2).all(|w| w[0].id < w[1].id));

    // One registered peer offers more files than one page holds.
    let files: Vec<FileEntry> = (0..2 * peerbus_proto::FILE_PAGE + 5)
        .map(|i| FileEntry {
            name: format!("doc{i:05}.txt"),
            hash: format!("{i:064x}"),
            size: 1,
        })
        .collect();
    let n = files.len();
    let r = conn
        .request(
            Request::RegisterFiles {
                auth: auths[0].clone(),
                files,
                replace: false,
            },
            false,
        )
        .await
        .unwrap();
    assert_eq!(r, Response::Ok);
    match conn
        .request(
            Request::SearchFiles {
                pattern: "doc".into(),
                after: None,
            },
            false,
        )
        .await
        .unwrap()
    {
        Response::Files(f) => assert_eq!(f.len(), peerbus_proto::FILE_PAGE),
        other => panic!("unexpected answer {other:?}"),
    }
    let hits = c.search_files("DOC").await.unwrap();
    assert_eq!(hits.len(), n);
    assert!(hits.windows(2).all(|w| w[0].name < w[1].name));
}
