//! Security: the shared token on every node, and the per-peer cookie that stops one peer
//! from acting in another's name.

use std::time::Duration;

use peerbus_client::{Client, ClientError, Connection, ErrorCode, Retention};
use peerbus_index::{Index, IndexConfig};
use peerbus_peer::{Peer, PeerConfig};
use peerbus_proto::{FileEntry, PeerAuth, RegisterPeer, Request, Response};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "s3cret";

fn assert_unauthorized_refusal(r: Result<Connection, ClientError>, what: &str) {
    match r {
        Err(ClientError::Refused { error, .. }) => {
            assert_eq!(error.code, ErrorCode::Unauthorized, "{what}: {error}")
        }
        Err(e) => panic!("{what}: expected a refusal, got {e}"),
        Ok(_) => panic!("{what}: the connection was accepted"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_refuses_a_missing_or_wrong_token_and_accepts_the_right_one() {
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let mut ic = IndexConfig::new("127.0.0.1:0");
    ic.data = Some(dir.path().join("index"));
    ic.token = Some(TOKEN.into());
    let index = Index::start(ic, stop.clone()).await.unwrap();
    let ix = index.addr().to_string();

    let mut peers = Vec::new();
    for i in 0..2 {
        let mut pc = PeerConfig::new("127.0.0.1:0", ix.clone());
        pc.data = Some(dir.path().join(format!("peer{i}")));
        pc.name = Some(format!("peer{i}"));
        pc.token = Some(TOKEN.into());
        let peer = Peer::start(pc, stop.clone()).await.unwrap();
        assert!(
            peer.registered(Duration::from_secs(15)).await,
            "peer{i} registers with the right token"
        );
        peers.push(peer);
    }

    let mut nodes = vec![("index", ix.clone())];
    for p in &peers {
        nodes.push(("peer", p.addr().to_string()));
    }
    for (kind, addr) in &nodes {
        assert_unauthorized_refusal(
            Connection::connect(addr, None).await,
            &format!("{kind} without a token"),
        );
        assert_unauthorized_refusal(
            Connection::connect(addr, Some("wrong")).await,
            &format!("{kind} with a wrong token"),
        );
        let conn = Connection::connect(addr, Some(TOKEN))
            .await
            .unwrap_or_else(|e| panic!("{kind} with the right token: {e}"));
        assert_eq!(
            conn.request(Request::Ping, true).await.unwrap(),
            Response::Pong
        );
    }

    // Clients without the token get nothing done.
    let e = Client::new(ix.clone())
        .create_topic("t", None, Retention::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unauthorized), "{e}");
    let e = Client::with_token(ix.clone(), Some("wrong".into()))
        .peers()
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unauthorized), "{e}");

    // With the token everything works.
    let c = Client::with_token(ix.clone(), Some(TOKEN.into()));
    c.create_topic("t", None, Retention::default())
        .await
        .unwrap();
    for i in 0..10 {
        c.publish("t", format!("m{i}")).await.unwrap();
    }
    let set = c.pull("t", "s", 100, Duration::ZERO).await.unwrap();
    let got: Vec<String> = set
        .batch
        .iter()
        .map(|b| String::from_utf8(b.to_vec()).unwrap())
        .collect();
    let want: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want);
    assert_eq!(c.peers().await.unwrap().len(), 2);

    stop.cancel();
    for p in peers {
        p.wait().await;
    }
    index.wait().await;
}

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> Option<ErrorCode> {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.code(),
    }
}

async fn register(conn: &Connection, name: &str, previous: Option<PeerAuth>) -> (PeerAuth, u32) {
    let r = conn
        .request(
            Request::Register(RegisterPeer {
                name: name.into(),
                addr: format!("127.0.0.1:{}", 40000 + name.len()),
                http: None,
                previous,
                keeps_identity: false,
            }),
            true,
        )
        .await
        .unwrap();
    match r {
        Response::Registered {
            peer_id,
            cookie,
            registrations,
            ..
        } => (PeerAuth { peer_id, cookie }, registrations),
        other => panic!("unexpected answer to Register: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_act_in_another_peers_name_or_take_its_identity() {
    let stop = CancellationToken::new();
    let index = Index::start(IndexConfig::new("127.0.0.1:0"), stop.clone())
        .await
        .unwrap();
    let ix = index.addr().to_string();
    let a_conn = Connection::connect(&ix, None).await.unwrap();
    let b_conn = Connection::connect(&ix, None).await.unwrap();
    let (a, _) = register(&a_conn, "alpha", None).await;
    let (b, _) = register(&b_conn, "beta", None).await;
    assert_ne!(a.peer_id, b.peer_id);
    assert_ne!(a.cookie, b.cookie);

    let ok = |r: Result<Response, ClientError>| assert_eq!(r.unwrap(), Response::Ok);
    ok(a_conn
        .request(
            Request::AnnounceTopics {
                auth: a.clone(),
                topics: vec!["a-topic".into()],
                replace: false,
            },
            true,
        )
        .await);
    let file = FileEntry {
        name: "a.txt".into(),
        hash: blake3::hash(b"alpha's file").to_hex().to_string(),
        size: 12,
    };
    ok(a_conn
        .request(
            Request::RegisterFiles {
                auth: a.clone(),
                files: vec![file.clone()],
                replace: false,
            },
            true,
        )
        .await);

    // B presents A's id with its own cookie.
    let forged = PeerAuth {
        peer_id: a.peer_id,
        cookie: b.cookie.clone(),
    };
    let attempts = vec![
        ("keepalive", Request::Keepalive(forged.clone())),
        ("leave", Request::Leave(forged.clone())),
        (
            "announce",
            Request::AnnounceTopics {
                auth: forged.clone(),
                topics: vec!["stolen".into()],
                replace: true,
            },
        ),
        (
            "withdraw",
            Request::WithdrawTopics {
                auth: forged.clone(),
                topics: vec!["a-topic".into()],
            },
        ),
        (
            "register files",
            Request::RegisterFiles {
                auth: forged.clone(),
                files: vec![],
                replace: true,
            },
        ),
        (
            "unregister files",
            Request::UnregisterFiles {
                auth: forged.clone(),
                hashes: vec![file.hash.clone()],
            },
        ),
    ];
    for (what, req) in attempts {
        assert_eq!(
            code(b_conn.request(req, true).await),
            Some(ErrorCode::Unauthorized),
            "{what} in A's name with B's cookie"
        );
    }

    // Re-registering with A's id and a wrong cookie is refused, under A's name or B's.
    for name in ["alpha", "beta"] {
        let r = b_conn
            .request(
                Request::Register(RegisterPeer {
                    name: name.into(),
                    addr: "127.0.0.1:40999".into(),
                    http: None,
                    previous: Some(forged.clone()),
                    keeps_identity: false,
                }),
                true,
            )
            .await;
        assert_eq!(
            code(r),
            Some(ErrorCode::Unauthorized),
            "re-register as {name} with A's id"
        );
    }

    // A name held by an active peer cannot be taken by a newcomer.
    let c_conn = Connection::connect(&ix, None).await.unwrap();
    let r = c_conn
        .request(
            Request::Register(RegisterPeer {
                name: "alpha".into(),
                addr: "127.0.0.1:40998".into(),
                http: None,
                previous: None,
                keeps_identity: false,
            }),
            true,
        )
        .await;
    assert_eq!(code(r), Some(ErrorCode::Exists), "taking an active name");

    // A is untouched: active, same address, its topic and file still listed.
    let Response::Peers(list) = a_conn
        .request(Request::ListPeers { after: None }, true)
        .await
        .unwrap()
    else {
        panic!("unexpected answer to ListPeers");
    };
    assert_eq!(list.len(), 2, "{list:?}");
    let pa = list.iter().find(|p| p.id == a.peer_id).unwrap();
    assert_eq!(pa.name, "alpha");
    assert!(pa.active, "{pa:?}");
    assert_eq!(pa.addr, "127.0.0.1:40005");
    assert_eq!(pa.topics, 1, "{pa:?}");
    assert_eq!(pa.files, 1, "{pa:?}");
    let Response::Location(loc) = a_conn
        .request(
            Request::LookupTopic {
                topic: "a-topic".into(),
            },
            true,
        )
        .await
        .unwrap()
    else {
        panic!("unexpected answer to LookupTopic");
    };
    assert_eq!(loc.peer_id, a.peer_id);
    assert_eq!(
        code(
            a_conn
                .request(
                    Request::LookupTopic {
                        topic: "stolen".into()
                    },
                    true
                )
                .await
        ),
        Some(ErrorCode::NotFound)
    );

    // A's own cookie still works, and re-registering with it keeps the id.
    ok(a_conn.request(Request::Keepalive(a.clone()), true).await);
    let (again, regs) = register(&a_conn, "alpha", Some(a.clone())).await;
    assert_eq!(again.peer_id, a.peer_id);
    assert_eq!(regs, 2);

    stop.cancel();
    index.wait().await;
}

/// A peer that keeps its identity (it has a data directory) keeps its name while it rests:
/// a newcomer registering under it after the lease ended is refused, and the real peer,
/// restarted, comes back as itself and serves its topics again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resting_peers_name_cannot_be_taken() {
    let mut cluster = peerbus_testkit::Cluster::start_with(peerbus_testkit::ClusterOptions {
        peers: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let c = cluster.client();
    c.create_topic("kept", Some("peer1"), Retention::default())
        .await
        .unwrap();
    c.publish("kept", "before").await.unwrap();
    let before = c.peers().await.unwrap()[0].id;
    cluster.stop_peer(0).await;

    // Stopped cleanly, the peer left: its lease is over. A newcomer may not take its name.
    let squatter = Connection::connect(&cluster.index_addr(), None)
        .await
        .unwrap();
    let r = squatter
        .request(
            Request::Register(RegisterPeer {
                name: "peer1".into(),
                addr: "127.0.0.1:40997".into(),
                http: None,
                previous: None,
                keeps_identity: false,
            }),
            true,
        )
        .await;
    let e = r.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Exists), "{e}");
    assert!(e.to_string().contains("is kept for peer"), "{e}");

    cluster.restart_peer(0).await.unwrap();
    let peers = c.peers().await.unwrap();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].id, before, "the peer came back as itself");
    let set = c
        .pull("kept", "reader", 10, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(set.messages().next().unwrap().payload.as_ref(), b"before");
}
