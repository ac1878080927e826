//! The index server over real sockets: registration, leases, the topic and file
//! directories, persistence across restarts, forwarding to peers and file replication.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use peerbus_client::{ClientError, Connection};
use peerbus_index::{Index, IndexConfig, IndexError};
use peerbus_net::{ConnCtx, ServerConfig, Service};
use peerbus_proto::{
    Batch, ErrorCode, FetchReport, FileEntry, FileHit, NodeKind, PeerAuth, PeerInfo, RegisterPeer,
    Request, Response, Retention, Subscribe, TopicLocation, WireError,
};
use tokio::task::JoinHandle;
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
        keeps_identity: false,
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

/// A valid BLAKE3-looking hash made from `digit`.
fn hash(digit: char) -> String {
    digit.to_string().repeat(64)
}

fn entry(name: &str, digit: char, size: u64) -> FileEntry {
    FileEntry {
        name: name.into(),
        hash: hash(digit),
        size,
    }
}

async fn register_files(
    conn: &Connection,
    auth: &PeerAuth,
    files: Vec<FileEntry>,
    replace: bool,
) -> Result<Response, ClientError> {
    let req = Request::RegisterFiles {
        auth: auth.clone(),
        files,
        replace,
    };
    conn.request(req, false).await
}

async fn search(conn: &Connection, pattern: &str) -> Result<Vec<FileHit>> {
    let req = Request::SearchFiles {
        pattern: pattern.into(),
        after: None,
    };
    match conn.request(req, false).await? {
        Response::Files(hits) => Ok(hits),
        other => bail!("expected Files, got {other:?}"),
    }
}

async fn lookup_file(conn: &Connection, key: &str) -> Result<FileHit, ClientError> {
    match conn
        .request(Request::LookupFile { key: key.into() }, false)
        .await?
    {
        Response::Files(mut hits) => {
            assert_eq!(hits.len(), 1, "a lookup finds one file: {hits:?}");
            Ok(hits.remove(0))
        }
        other => panic!("expected Files, got {other:?}"),
    }
}

/// Names of a hit's holders, in the order given.
fn holders(hit: &FileHit) -> Vec<&str> {
    hit.peers.iter().map(|p| p.name.as_str()).collect()
}

fn holders_owned(peers: &[peerbus_proto::FileHolder]) -> Vec<String> {
    peers.iter().map(|p| p.name.clone()).collect()
}

async fn peers(conn: &Connection) -> Result<Vec<PeerInfo>> {
    match conn
        .request(Request::ListPeers { after: None }, false)
        .await?
    {
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
                after: None,
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
    register_files(&conn, &auth, vec![entry("kept.bin", 'e', 9)], false).await?;
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
    assert_eq!(list[0].files, 1);
    assert_eq!(holders(&lookup_file(&conn, "kept.bin").await?), ["keeper"]);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_registered_searched_looked_up_and_withdrawn() -> Result<()> {
    let (index, shutdown) = start(Duration::from_secs(30), None).await?;
    let conn = connect(&index).await?;
    let (a, _) = register(&conn, "alpha", "127.0.0.1:7001", None).await?;
    let (b, _) = register(&conn, "beta", "127.0.0.1:7002", None).await?;
    let alpha_files = vec![
        entry("Music/Song.mp3", '1', 3000),
        entry("notes.txt", '2', 20),
    ];
    register_files(&conn, &a, alpha_files, false).await?;
    let beta_files = vec![entry("song.mp3", '1', 3000), entry("photo.jpg", '3', 500)];
    register_files(&conn, &b, beta_files, false).await?;

    let bad = vec![FileEntry {
        name: "x".into(),
        hash: "not-a-hash".into(),
        size: 1,
    }];
    let e = register_files(&conn, &a, bad, false).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::BadRequest));
    assert_eq!(
        e.to_string(),
        "file 'x': hash 'not-a-hash' is not a BLAKE3 hash (64 hex digits)"
    );

    let hits = search(&conn, "SONG").await?;
    assert_eq!(hits.len(), 1, "one content under two names: {hits:?}");
    assert_eq!(
        (hits[0].name.as_str(), hits[0].size, hits[0].hash.as_str()),
        ("Music/Song.mp3", 3000, hash('1').as_str())
    );
    assert_eq!(holders(&hits[0]), ["alpha", "beta"]);
    assert_eq!(hits[0].peers[1].addr, "127.0.0.1:7002");
    let all: Vec<String> = search(&conn, "")
        .await?
        .into_iter()
        .map(|h| h.name)
        .collect();
    assert_eq!(all, ["Music/Song.mp3", "notes.txt", "photo.jpg"]);

    assert_eq!(holders(&lookup_file(&conn, &hash('3')).await?), ["beta"]);
    let notes = lookup_file(&conn, "notes.txt").await?;
    assert_eq!(notes.hash, hash('2'));
    assert_eq!(holders(&notes), ["alpha"]);
    let e = lookup_file(&conn, "nope").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound));
    assert_eq!(e.to_string(), "file 'nope' not found");
    let counts: Vec<u32> = peers(&conn).await?.iter().map(|p| p.files).collect();
    assert_eq!(counts, [2, 2]);

    for (req, message) in [
        (
            Request::FileManifest { hash: hash('1') },
            "ask a peer holding the file: look it up first",
        ),
        (
            Request::ReadPiece {
                hash: hash('1'),
                index: 0,
            },
            "ask a peer holding the file: look it up first",
        ),
        (
            Request::Fetch { key: hash('1') },
            "send fetch to the peer that should download",
        ),
    ] {
        let e = conn.request(req, false).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::Unsupported));
        assert_eq!(e.to_string(), message);
    }

    // Replacing beta's list drops the song from it; unregistering drops the photo.
    register_files(&conn, &b, vec![entry("photo.jpg", '3', 500)], true).await?;
    assert_eq!(holders(&lookup_file(&conn, &hash('1')).await?), ["alpha"]);
    let unregister = Request::UnregisterFiles {
        auth: b.clone(),
        hashes: vec![hash('3')],
    };
    conn.request(unregister, false).await?;
    assert_eq!(
        lookup_file(&conn, "photo.jpg").await.unwrap_err().code(),
        Some(ErrorCode::NotFound)
    );

    // Leaving withdraws every file of the peer at once.
    conn.request(Request::Leave(a.clone()), false).await?;
    assert!(search(&conn, "").await?.is_empty());
    assert_eq!(peers(&conn).await?[0].files, 0);
    let e = register_files(&conn, &a, vec![entry("late", '4', 1)], false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound));
    assert_eq!(e.to_string(), "lease of peer 1 expired; register again");
    stop(index, shutdown).await;
    Ok(())
}

/// A stand-in peer for replication: asked to fetch a file, it looks the file up at the
/// index and registers a copy in its own name (as a real peer does once its download is
/// verified), then reports the fetch. It records every key it was asked for.
struct FilePeer {
    index: String,
    auth: PeerAuth,
    fetches: Mutex<Vec<String>>,
}

impl FilePeer {
    async fn fetch(&self, key: &str) -> Result<Response, ClientError> {
        let conn = Connection::connect(&self.index, None).await?;
        let hit = lookup_file(&conn, key).await?;
        let copy = FileEntry {
            name: hit.name.clone(),
            hash: hit.hash.clone(),
            size: hit.size,
        };
        register_files(&conn, &self.auth, vec![copy], false).await?;
        Ok(Response::Fetched(FetchReport {
            path: format!("/share/{}", hit.name),
            sources: holders_owned(&hit.peers),
            name: hit.name,
            hash: hit.hash,
            size: hit.size,
        }))
    }
}

impl Service for FilePeer {
    async fn handle(self: &Arc<Self>, conn: &Arc<ConnCtx>, id: u32, _forward: bool, req: Request) {
        let result = match req {
            Request::Fetch { key } => {
                self.fetches.lock().unwrap().push(key.clone());
                self.fetch(&key).await.map_err(|e| match e {
                    ClientError::Server(e) => e,
                    e => WireError::new(ErrorCode::Internal, e.to_string()),
                })
            }
            other => Err(WireError::new(
                ErrorCode::Unsupported,
                format!("stand-in peer got {}", other.kind()),
            )),
        };
        conn.reply(id, result).await;
    }
}

/// A registered stand-in peer that keeps its lease until `lease` is cancelled.
struct StandIn {
    peer: Arc<FilePeer>,
    lease: CancellationToken,
    server_stop: CancellationToken,
    server: JoinHandle<()>,
    keepalive: JoinHandle<()>,
}

impl StandIn {
    async fn start(index: &Index, name: &str, ttl: Duration) -> Result<StandIn> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let conn = connect(index).await?;
        // Registered before serving: a fetch the index sends at once waits in the listen
        // backlog rather than reaching a peer that does not know its identity yet.
        let (auth, _) = register(&conn, name, &addr, None).await?;
        let peer = Arc::new(FilePeer {
            index: index.addr().to_string(),
            auth: auth.clone(),
            fetches: Mutex::new(Vec::new()),
        });
        let server_stop = CancellationToken::new();
        let server = tokio::spawn(peerbus_net::serve(
            listener,
            peer.clone(),
            ServerConfig::new(NodeKind::Peer),
            server_stop.clone(),
        ));
        let lease = CancellationToken::new();
        let keepalive = tokio::spawn({
            let lease = lease.clone();
            let mut every = tokio::time::interval(ttl / 6);
            async move {
                loop {
                    tokio::select! {
                        _ = every.tick() => {
                            // A failure shows up as the peer expiring, which the test sees.
                            let _ = conn.request(Request::Keepalive(auth.clone()), false).await;
                        }
                        () = lease.cancelled() => return,
                    }
                }
            }
        });
        Ok(StandIn {
            peer,
            lease,
            server_stop,
            server,
            keepalive,
        })
    }

    fn fetches(&self) -> Vec<String> {
        self.peer.fetches.lock().unwrap().clone()
    }

    async fn stop(self) -> Result<()> {
        self.lease.cancel();
        self.server_stop.cancel();
        self.keepalive.await?;
        self.server.await?;
        Ok(())
    }
}

/// Polls the holders of `key` until they are `want`, or fails after a deadline.
async fn await_holders(conn: &Connection, key: &str, want: &[&str]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    loop {
        poll.tick().await;
        let now = match lookup_file(conn, key).await {
            Ok(hit) => holders_owned(&hit.peers),
            Err(e) if e.code() == Some(ErrorCode::NotFound) => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        if now == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("holders of {key} are still {now:?}, not {want:?}, after 15 s");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn files_are_replicated_and_re_replicated_after_a_holder_expires() -> Result<()> {
    let ttl = Duration::from_millis(1500);
    let mut config = IndexConfig::new("127.0.0.1:0");
    config.ttl = ttl;
    config.replication = Some(2);
    let shutdown = CancellationToken::new();
    let index = Index::start(config, shutdown.clone()).await?;
    let conn = connect(&index).await?;

    let alpha = StandIn::start(&index, "alpha", ttl).await?;
    let file = entry("movie.mkv", 'f', 1 << 20);
    register_files(&conn, &alpha.peer.auth, vec![file.clone()], false).await?;
    // Nobody else is live, so the single copy stays single until beta arrives.
    let beta = StandIn::start(&index, "beta", ttl).await?;
    await_holders(&conn, &file.hash, &["alpha", "beta"]).await?;
    assert_eq!(lookup_file(&conn, "movie.mkv").await?.size, 1 << 20);

    // Two copies are enough: gamma is only asked once alpha's lease runs out.
    let gamma = StandIn::start(&index, "gamma", ttl).await?;
    alpha.lease.cancel();
    await_holders(&conn, &file.hash, &["beta", "gamma"]).await?;
    let list = peers(&conn).await?;
    assert!(!list[0].active, "alpha expired: {list:?}");
    assert_eq!(list.iter().map(|p| p.files).collect::<Vec<_>>(), [0, 1, 1]);

    assert!(alpha.fetches().is_empty(), "a holder is never asked");
    assert_eq!(beta.fetches(), [file.hash.as_str()]);
    assert_eq!(gamma.fetches(), [file.hash.as_str()]);
    for s in [alpha, beta, gamma] {
        s.stop().await?;
    }
    stop(index, shutdown).await;
    Ok(())
}

/// Found by the `request_handlers` fuzz target: a peer registered with the index's own
/// address made the index forward `CreateTopic` (and topic requests) to itself, which placed
/// it on that peer again, forever; the request was never answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_advertising_the_index_address_gets_no_forwarding_loop() -> Result<()> {
    let (index, shutdown) = start(Duration::from_secs(30), None).await?;
    let conn = connect(&index).await?;
    let (auth, _) = register(&conn, "mirror", &index.addr().to_string(), None).await?;
    let create = Request::CreateTopic {
        topic: "t".into(),
        retention: Retention::default(),
        peer: None,
    };
    let e = tokio::time::timeout(Duration::from_secs(10), conn.request(create, false))
        .await
        .context("create was not answered")?
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unavailable), "{e}");
    assert!(e.to_string().contains("not a peer"), "{e}");

    announce(&conn, &auth, &["claimed"]).await?;
    let publish = Request::Publish {
        topic: "claimed".into(),
        batch: Batch::from_payloads(["x"]),
    };
    let e = tokio::time::timeout(Duration::from_secs(10), conn.request(publish, false))
        .await
        .context("publish was not answered")?
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unavailable), "{e}");
    stop(index, shutdown).await;
    Ok(())
}
