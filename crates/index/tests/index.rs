//! The index server over real sockets: registration, leases, the directory, persistence
//! across restarts, and forwarding to peers.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use peerbus_client::{ClientError, Connection};
use peerbus_index::{Index, IndexConfig, IndexError};
use peerbus_net::{ConnCtx, ServerConfig, Service};
use peerbus_proto::{
    Batch, ErrorCode, NodeKind, PeerAuth, PeerInfo, RegisterPeer, Request, Response, Retention,
    Subscribe, TopicLocation,
};
use tokio_util::sync::CancellationToken;

async fn start(
    ttl: Duration,
    data: Option<&std::path::Path>,
) -> Result<(Index, CancellationToken)> {
    let mut config = IndexConfig::new("127.0.0.1:0");
    config.ttl = ttl;
    config.data = data.map(Into::into);
    let shutdown = CancellationToken::new();
    let index = Index::start(config, shutdown.clone()).await?;
    Ok((index, shutdown))
}

async fn connect(index: &Index) -> Result<Connection> {
    Ok(Connection::connect(&index.addr().to_string(), None).await?)
}

async fn register(
    conn: &Connection,
    name: &str,
    addr: &str,
    previous: Option<PeerAuth>,
) -> Result<(PeerAuth, u32)> {
    let req = Request::Register(RegisterPeer {
        name: name.into(),
        addr: addr.into(),
        http: None,
        previous,
    });
    match conn.request(req, false).await? {
        Response::Registered {
            peer_id,
            cookie,
            registrations,
            ..
        } => Ok((PeerAuth { peer_id, cookie }, registrations)),
        other => bail!("expected Registered, got {other:?}"),
    }
}

async fn announce(
    conn: &Connection,
    auth: &PeerAuth,
    topics: &[&str],
) -> Result<Response, ClientError> {
    conn.request(
        Request::AnnounceTopics {
            auth: auth.clone(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            replace: false,
        },
        false,
    )
    .await
}

async fn lookup(conn: &Connection, topic: &str) -> Result<TopicLocation, ClientError> {
    match conn
        .request(
            Request::LookupTopic {
                topic: topic.into(),
            },
            false,
        )
        .await?
    {
        Response::Location(loc) => Ok(loc),
        other => panic!("expected a location, got {other:?}"),
    }
}

async fn peers(conn: &Connection) -> Result<Vec<PeerInfo>> {
    match conn.request(Request::ListPeers, false).await? {
        Response::Peers(p) => Ok(p),
        other => bail!("expected Peers, got {other:?}"),
    }
}

async fn stop(index: Index, shutdown: CancellationToken) {
    shutdown.cancel();
    index.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_announce_lookup_and_list() -> Result<()> {
    let (index, shutdown) = start(Duration::from_secs(30), None).await?;
    let conn = connect(&index).await?;
    assert_eq!(conn.node(), NodeKind::Index);
    assert_eq!(conn.request(Request::Ping, false).await?, Response::Pong);

    let (a, n) = register(&conn, "alpha", "127.0.0.1:7001", None).await?;
    assert_eq!((a.peer_id, n), (1, 1));
    assert_eq!(a.cookie.len(), 32);
    assert!(a.cookie.chars().all(|c| c.is_ascii_hexdigit()));
    let (b, _) = register(&conn, "beta", "127.0.0.1:7002", None).await?;
    assert_eq!(b.peer_id, 2);
    let taken = register(&conn, "alpha", "127.0.0.1:7003", None)
        .await
        .unwrap_err()
        .downcast::<ClientError>()?;
    assert_eq!(taken.code(), Some(ErrorCode::Exists));

    announce(&conn, &a, &["news.a", "news.b", "sport"]).await?;
    let clash = announce(&conn, &b, &["mine", "sport"]).await.unwrap_err();
    assert_eq!(clash.code(), Some(ErrorCode::Exists));
    assert_eq!(clash.to_string(), "topic 'sport' exists on peer alpha");
    assert_eq!(
        lookup(&conn, "mine").await.unwrap_err().code(),
        Some(ErrorCode::NotFound)
    );

    let loc = lookup(&conn, "news.b").await?;
    assert_eq!(
        loc,
        TopicLocation {
            topic: "news.b".into(),
            peer_id: 1,
            peer_name: "alpha".into(),
            addr: "127.0.0.1:7001".into(),
        }
    );
    let Response::Topics(listed) = conn
        .request(
            Request::ListTopics {
                prefix: Some("news".into()),
            },
            false,
        )
        .await?
    else {
        bail!("expected Topics");
    };
    let names: Vec<&str> = listed.iter().map(|l| l.topic.as_str()).collect();
    assert_eq!(names, ["news.a", "news.b"]);

    let list = peers(&conn).await?;
    assert_eq!(list.len(), 2);
    assert_eq!((list[0].id, list[0].topics, list[0].active), (1, 3, true));
    assert_eq!((list[1].id, list[1].topics), (2, 0));
    assert!(list[0].ttl_left_ms > 25_000);

    let wrong = PeerAuth {
        peer_id: 1,
        cookie: "0".repeat(32),
    };
    let e = conn
        .request(Request::Keepalive(wrong), false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unauthorized));
    conn.request(Request::Keepalive(a.clone()), false).await?;

    conn.request(Request::Leave(a.clone()), false).await?;
    assert_eq!(
        lookup(&conn, "sport").await.unwrap_err().code(),
        Some(ErrorCode::NotFound)
    );
    assert!(!peers(&conn).await?[0].active);

    let follow = Request::Subscribe(Subscribe {
        topic: "sport".into(),
        subscriber: "s".into(),
        from: None,
        follow: Some(1),
    });
    let e = conn.request(follow, false).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unsupported));
    let e = conn
        .request(
            Request::DeleteTopic {
                topic: "gone".into(),
            },
            false,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound));
    assert_eq!(e.to_string(), "topic 'gone' not found");

    stop(index, shutdown).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_expires_and_its_topics_vanish() -> Result<()> {
    let (index, shutdown) = start(Duration::from_secs(1), None).await?;
    let conn = connect(&index).await?;
    let (auth, _) = register(&conn, "quiet", "127.0.0.1:7001", None).await?;
    announce(&conn, &auth, &["t"]).await?;
    assert_eq!(lookup(&conn, "t").await?.peer_name, "quiet");

    let deadline = Instant::now() + Duration::from_secs(5);
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    loop {
        poll.tick().await;
        let p = peers(&conn).await?;
        if !p[0].active {
            assert_eq!(p[0].ttl_left_ms, 0);
            assert_eq!(p[0].topics, 0);
            break;
        }
        if Instant::now() > deadline {
            bail!("the peer is still active 5 s after its 1 s lease: {p:?}");
        }
    }
    assert_eq!(
        lookup(&conn, "t").await.unwrap_err().code(),
        Some(ErrorCode::NotFound)
    );
    let e = conn
        .request(Request::Keepalive(auth.clone()), false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound));
    assert_eq!(e.to_string(), "lease of peer 1 expired; register again");

    // Coming back with the cookie resumes the identity.
    let (again, n) = register(&conn, "quiet", "127.0.0.1:7001", Some(auth.clone())).await?;
    assert_eq!((again.peer_id, n), (1, 2));
    announce(&conn, &again, &["t"]).await?;
    assert_eq!(lookup(&conn, "t").await?.peer_id, 1);
    stop(index, shutdown).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_survives_a_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (index, shutdown) = start(Duration::from_secs(30), Some(dir.path())).await?;
    let conn = connect(&index).await?;
    let (auth, _) = register(&conn, "keeper", "127.0.0.1:7001", None).await?;
    announce(&conn, &auth, &["kept.topic"]).await?;
    register(&conn, "other", "127.0.0.1:7002", None).await?;
    conn.close();
    stop(index, shutdown).await;

    let (index, shutdown) = start(Duration::from_secs(30), Some(dir.path())).await?;
    let conn = connect(&index).await?;
    let list = peers(&conn).await?;
    assert_eq!(list.len(), 2);
    assert_eq!((list[0].id, list[0].name.as_str()), (1, "keeper"));
    assert!(
        list[0].active,
        "the lease deadline survives a quick restart"
    );
    assert_eq!(list[0].topics, 1);
    let loc = lookup(&conn, "kept.topic").await?;
    assert_eq!((loc.peer_id, loc.addr.as_str()), (1, "127.0.0.1:7001"));
    conn.request(Request::Keepalive(auth.clone()), false)
        .await?;

    let (again, n) = register(&conn, "keeper", "127.0.0.1:7001", Some(auth.clone())).await?;
    assert_eq!(again, auth);
    assert_eq!(n, 2);
    let (fresh, _) = register(&conn, "newcomer", "127.0.0.1:7003", None).await?;
    assert_eq!(fresh.peer_id, 3, "ids are never reused");
    stop(index, shutdown).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_failures_name_the_address() -> Result<()> {
    let (index, shutdown) = start(Duration::from_secs(30), None).await?;
    let taken = index.addr().to_string();
    let err = Index::start(IndexConfig::new(taken.clone()), CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(err, IndexError::Bind { .. }));
    assert!(
        err.to_string()
            .starts_with(&format!("cannot listen on {taken}: ")),
        "{err}"
    );
    stop(index, shutdown).await;
    Ok(())
}

/// A stand-in peer: creating a topic announces it to the index first (on its own
/// connection, while the index waits for the answer), as a real peer does.
struct FakePeer {
    addr: String,
    index: String,
    auth: Mutex<Option<PeerAuth>>,
}

impl Service for FakePeer {
    async fn handle(self: &Arc<Self>, conn: &Arc<ConnCtx>, id: u32, _forward: bool, req: Request) {
        let result = match req {
            Request::CreateTopic { topic, peer, .. } => {
                assert!(peer.is_none(), "the index strips the placement hint");
                let auth = self.auth.lock().unwrap().clone().expect("registered");
                let to_index = Connection::connect(&self.index, None).await.unwrap();
                match announce(&to_index, &auth, &[&topic]).await {
                    Ok(_) => Ok(Response::Location(TopicLocation {
                        topic,
                        peer_id: auth.peer_id,
                        peer_name: "fake".into(),
                        addr: self.addr.clone(),
                    })),
                    Err(ClientError::Server(e)) => Err(e),
                    Err(e) => panic!("announce failed: {e}"),
                }
            }
            Request::Publish { batch, .. } => Ok(Response::Published {
                first_offset: 41,
                count: batch.len() as u32,
            }),
            other => panic!("unexpected request {other:?}"),
        };
        conn.reply(id, result).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_and_topic_requests_are_forwarded_to_the_host() -> Result<()> {
    let (index, shutdown) = start(Duration::from_secs(30), None).await?;
    let conn = connect(&index).await?;
    let create = |topic: &str, peer: Option<&str>| Request::CreateTopic {
        topic: topic.into(),
        retention: Retention::default(),
        peer: peer.map(Into::into),
    };
    let e = conn.request(create("t", None), false).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unavailable));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let peer_addr = listener.local_addr()?.to_string();
    let fake = Arc::new(FakePeer {
        addr: peer_addr.clone(),
        index: index.addr().to_string(),
        auth: Mutex::new(None),
    });
    let peer_stop = CancellationToken::new();
    let peer_server = tokio::spawn(peerbus_net::serve(
        listener,
        fake.clone(),
        ServerConfig::new(NodeKind::Peer),
        peer_stop.clone(),
    ));
    let (auth, _) = register(&conn, "fake", &peer_addr, None).await?;
    *fake.auth.lock().unwrap() = Some(auth.clone());

    let Response::Location(loc) = conn.request(create("made", None), false).await? else {
        bail!("expected a location");
    };
    assert_eq!(
        (loc.peer_id, loc.addr.as_str()),
        (auth.peer_id, peer_addr.as_str())
    );
    assert_eq!(lookup(&conn, "made").await?.peer_name, "fake");
    let e = conn.request(create("made", None), false).await.unwrap_err();
    assert_eq!(e.to_string(), "topic 'made' exists on peer fake");
    let e = conn
        .request(create("other", Some("nobody")), false)
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "peer 'nobody' not found or not active");
    conn.request(create("by.addr", Some(&peer_addr)), false)
        .await
        .context("placing by address")?;

    let publish = Request::Publish {
        topic: "made".into(),
        batch: Batch::from_payloads(["x", "y"]),
    };
    assert_eq!(
        conn.request(publish, false).await?,
        Response::Published {
            first_offset: 41,
            count: 2
        }
    );

    // A host that cannot be reached makes the topic unavailable, not missing.
    peer_stop.cancel();
    peer_server.await?;
    let publish = Request::Publish {
        topic: "made".into(),
        batch: Batch::from_payloads(["z"]),
    };
    let e = conn.request(publish, false).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unavailable), "{e}");
    stop(index, shutdown).await;
    Ok(())
}
