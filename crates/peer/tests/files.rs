//! File sharing over real sockets: a peer with `--share` serves manifests and pieces,
//! answers searches from its own share, registers its files with the index, and fetches
//! files from other peers into its share.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use peerbus_client::{ClientError, Connection, tree};
use peerbus_index::{Index, IndexConfig};
use peerbus_peer::{Peer, PeerConfig};
use peerbus_proto::{ErrorCode, FileHit, Manifest, Request, Response};
use tokio_util::sync::CancellationToken;

const READY: Duration = Duration::from_secs(15);
/// How long to poll for something another node does in the background.
const DEADLINE: Duration = Duration::from_secs(15);

struct Net {
    index: Index,
    stop: CancellationToken,
    peers: Vec<Peer>,
}

impl Net {
    async fn start() -> Result<Net> {
        let stop = CancellationToken::new();
        let index = Index::start(IndexConfig::new("127.0.0.1:0"), stop.clone()).await?;
        Ok(Net {
            index,
            stop,
            peers: Vec::new(),
        })
    }

    async fn peer(&mut self, name: &str, share: Option<&Path>) -> Result<usize> {
        self.peer_with(name, share, |_| {}).await
    }

    async fn peer_with(
        &mut self,
        name: &str,
        share: Option<&Path>,
        tune: impl FnOnce(&mut PeerConfig),
    ) -> Result<usize> {
        let mut config = PeerConfig::new("127.0.0.1:0", self.index.addr().to_string());
        config.name = Some(name.into());
        config.share = share.map(Path::to_path_buf);
        // Rescans are driven by the tests; the periodic one must not race them.
        config.rescan = Duration::from_secs(3600);
        tune(&mut config);
        let peer = Peer::start(config, self.stop.clone()).await?;
        if !peer.registered(READY).await {
            bail!("peer {name} did not register within {READY:?}");
        }
        self.peers.push(peer);
        Ok(self.peers.len() - 1)
    }

    async fn conn(&self, i: usize) -> Result<Connection> {
        Ok(Connection::connect(&self.peers[i].addr().to_string(), None).await?)
    }

    async fn index_conn(&self) -> Result<Connection> {
        Ok(Connection::connect(&self.index.addr().to_string(), None).await?)
    }

    async fn stop(self) {
        self.stop.cancel();
        for p in self.peers {
            p.wait().await;
        }
        self.index.wait().await;
    }
}

/// Deterministic bytes that do not repeat at piece boundaries.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn write(path: &Path, data: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, data)?;
    Ok(())
}

fn hash(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

async fn search(conn: &Connection, pattern: &str) -> Result<Vec<FileHit>, ClientError> {
    match conn
        .request(
            Request::SearchFiles {
                pattern: pattern.into(),
                after: None,
            },
            false,
        )
        .await?
    {
        Response::Files(f) => Ok(f),
        other => panic!("expected Files, got {other:?}"),
    }
}

async fn manifest(conn: &Connection, hash: &str) -> Result<Manifest, ClientError> {
    match conn
        .request(Request::FileManifest { hash: hash.into() }, false)
        .await?
    {
        Response::Manifest(m) => Ok(m),
        other => panic!("expected Manifest, got {other:?}"),
    }
}

async fn piece(conn: &Connection, hash: &str, index: u32) -> Result<bytes::Bytes, ClientError> {
    match conn
        .request(
            Request::ReadPiece {
                hash: hash.into(),
                index,
            },
            false,
        )
        .await?
    {
        Response::Piece(p) => Ok(p),
        other => panic!("expected Piece, got {other:?}"),
    }
}

/// Polls the index's file search until `done` holds for its answer. Returns false when the
/// index does not serve file searches (yet); fails at the deadline.
async fn index_sees(net: &Net, pattern: &str, done: impl Fn(&[FileHit]) -> bool) -> Result<bool> {
    let conn = net.index_conn().await?;
    let deadline = Instant::now() + DEADLINE;
    loop {
        match search(&conn, pattern).await {
            Ok(hits) if done(&hits) => return Ok(true),
            Ok(hits) if Instant::now() > deadline => {
                bail!("the index still answers {hits:?} for '{pattern}'")
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) if e.code() == Some(ErrorCode::Unsupported) => {
                eprintln!(
                    "the index does not serve file searches yet ({e}); index side not checked"
                );
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_serves_manifests_pieces_and_searches_of_its_share() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let share = dir.path().join("share");
    let big = noise(3 * tree::PIECE_LEN as usize + 12_345, 7);
    write(&share.join("big.bin"), &big)?;
    write(&share.join("docs/ReadMe.txt"), b"read me")?;
    let mut net = Net::start().await?;
    let p = net.peer("sharer", Some(&share)).await?;
    let conn = net.conn(p).await?;
    let big_hash = hash(&big);

    let m = manifest(&conn, &big_hash).await?;
    tree::verify_manifest(&m, &big_hash)?;
    assert_eq!(m.size, big.len() as u64);
    assert_eq!(m.pieces.len(), 4);
    // All pieces at once: the peer reads them off its connection's loop.
    let pieces = futures::future::try_join_all((0..4).map(|i| piece(&conn, &big_hash, i))).await?;
    let mut joined = Vec::new();
    for (i, data) in pieces.iter().enumerate() {
        assert!(tree::verify_piece(&m, i as u64, data), "piece {i}");
        joined.extend_from_slice(data);
    }
    assert!(joined == big, "the pieces put together are the file");

    let unknown = hash(b"not shared");
    let e = manifest(&conn, &unknown).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}");
    assert!(
        e.to_string().contains("is not shared by peer sharer"),
        "{e}"
    );
    let e = piece(&conn, &unknown, 0).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}");
    let e = piece(&conn, &big_hash, 4).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{e}");

    let peer = &net.peers[p];
    let all = search(&conn, "").await?;
    let names: Vec<&str> = all.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["big.bin", "docs/ReadMe.txt"]);
    for h in &all {
        assert_eq!(h.peers.len(), 1);
        assert_eq!(h.peers[0].name, "sharer");
        assert_eq!(h.peers[0].addr, peer.addr().to_string());
        assert_ne!(h.peers[0].peer_id, 0, "registered, so the id is known");
    }
    assert_eq!(all[0].hash, big_hash);
    assert_eq!(all[0].size, big.len() as u64);
    let found = search(&conn, "readme").await?;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].hash, hash(b"read me"));
    assert!(search(&conn, "nothing like it").await?.is_empty());

    // Lookups the peer can answer itself, by name and by hash.
    for key in ["docs/ReadMe.txt".to_string(), hash(b"read me")] {
        match conn.request(Request::LookupFile { key }, false).await? {
            Response::Files(hits) => assert_eq!(hits, found),
            other => bail!("expected Files, got {other:?}"),
        }
    }

    // The index learned the files at registration.
    let sharer_id = all[0].peers[0].peer_id;
    let checked = index_sees(&net, "", |hits| {
        hits.iter().any(|h| {
            h.hash == big_hash
                && h.name == "big.bin"
                && h.peers.iter().any(|p| p.peer_id == sharer_id)
        }) && hits.iter().any(|h| h.name == "docs/ReadMe.txt")
    })
    .await?;
    if checked {
        match net
            .index_conn()
            .await?
            .request(
                Request::LookupFile {
                    key: "big.bin".into(),
                },
                false,
            )
            .await?
        {
            Response::Files(hits) => assert_eq!(hits[0].hash, big_hash),
            other => bail!("expected Files, got {other:?}"),
        }
    }
    net.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rescans_are_served_and_told_to_the_index() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let share = dir.path().join("share");
    write(&share.join("first.txt"), b"first")?;
    let mut net = Net::start().await?;
    let p = net.peer("rescanner", Some(&share)).await?;
    let conn = net.conn(p).await?;

    write(&share.join("more/second.txt"), b"second")?;
    let changes = net.peers[p].rescan_share().await;
    assert_eq!(changes.added.len(), 1);
    assert_eq!(changes.added[0].name, "more/second.txt");
    assert_eq!(piece(&conn, &hash(b"second"), 0).await?, &b"second"[..]);
    let names: Vec<String> = search(&conn, "")
        .await?
        .into_iter()
        .map(|h| h.name)
        .collect();
    assert_eq!(names, ["first.txt", "more/second.txt"]);
    index_sees(&net, "second", |hits| {
        hits.iter().any(|h| h.hash == hash(b"second"))
    })
    .await?;

    std::fs::remove_file(share.join("first.txt"))?;
    let changes = net.peers[p].rescan_share().await;
    assert_eq!(changes.removed, [hash(b"first")]);
    let e = manifest(&conn, &hash(b"first")).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}");
    index_sees(&net, "first", |hits| {
        hits.iter().all(|h| h.hash != hash(b"first"))
    })
    .await?;
    net.stop().await;
    Ok(())
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_swapped_for_a_symlink_out_of_the_share_is_not_served() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let share = dir.path().join("share");
    let outside = dir.path().join("outside.txt");
    write(&share.join("a.txt"), b"alpha")?;
    write(&outside, b"alpha")?;
    let mut net = Net::start().await?;
    let p = net.peer("swapper", Some(&share)).await?;
    let conn = net.conn(p).await?;
    let a = hash(b"alpha");
    assert_eq!(piece(&conn, &a, 0).await?, &b"alpha"[..]);

    std::fs::remove_file(share.join("a.txt"))?;
    std::os::unix::fs::symlink(&outside, share.join("a.txt"))?;
    let e = piece(&conn, &a, 0).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}");
    assert!(e.to_string().contains("outside the share"), "{e}");

    // The next rescan stops offering it altogether.
    let changes = net.peers[p].rescan_share().await;
    assert_eq!(changes.removed, std::slice::from_ref(&a));
    assert_eq!(
        manifest(&conn, &a).await.unwrap_err().code(),
        Some(ErrorCode::NotFound)
    );
    net.stop().await;
    Ok(())
}

/// A file replaced by another of the same size and modification time (a different file at
/// the same path) is not served as the one that was hashed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_swapped_for_another_at_its_path_is_not_served() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let share = dir.path().join("share");
    write(&share.join("a.txt"), b"alpha")?;
    let mut net = Net::start().await?;
    let p = net.peer("swapped", Some(&share)).await?;
    let conn = net.conn(p).await?;
    let a = hash(b"alpha");
    assert_eq!(piece(&conn, &a, 0).await?, &b"alpha"[..]);

    let mtime = std::fs::metadata(share.join("a.txt"))?.modified()?;
    let other = share.join("other.tmp");
    write(&other, b"omega")?;
    std::fs::File::options()
        .write(true)
        .open(&other)?
        .set_modified(mtime)?;
    std::fs::rename(&other, share.join("a.txt"))?;
    let e = piece(&conn, &a, 0).await.unwrap_err();
    assert!(e.to_string().contains("changed since it was hashed"), "{e}");
    net.stop().await;
    Ok(())
}

async fn fetch(conn: &Connection, key: &str) -> Result<peerbus_proto::FetchReport, ClientError> {
    let req = Request::Fetch { key: key.into() };
    match conn.request(req, false).await? {
        Response::Fetched(r) => Ok(r),
        other => panic!("expected Fetched, got {other:?}"),
    }
}

/// Where a fetched copy of `hash` lands in `share`.
fn fetched_copy(share: &Path, hash: &str) -> PathBuf {
    share.join(peerbus_peer::share::fetched_path(hash))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_fetches_a_file_into_its_share_and_offers_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (share_a, share_b) = (dir.path().join("a"), dir.path().join("b"));
    let data = noise(2 * tree::PIECE_LEN as usize + 99, 3);
    let h = hash(&data);
    write(&share_a.join("sets/data.bin"), &data)?;
    std::fs::create_dir_all(&share_b)?;
    let mut net = Net::start().await?;
    let a = net.peer("holder", Some(&share_a)).await?;
    let b = net.peer("fetcher", Some(&share_b)).await?;
    let plain = net.peer("plain", None).await?;

    let e = fetch(&net.conn(plain).await?, "sets/data.bin")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{e}");
    assert!(
        e.to_string()
            .contains("peer plain has no share directory (--share) to download into"),
        "{e}"
    );

    // Already held: answered at once, nothing downloaded.
    let r = fetch(&net.conn(a).await?, "sets/data.bin").await?;
    assert_eq!(
        (r.name.as_str(), r.hash.as_str()),
        ("sets/data.bin", h.as_str())
    );
    assert!(r.sources.is_empty());
    assert_eq!(
        PathBuf::from(&r.path),
        std::fs::canonicalize(share_a.join("sets/data.bin"))?
    );

    let conn_b = net.conn(b).await?;
    // A file put in the fetcher's share behind its back waits for the periodic rescan: a
    // fetch hashes only what it fetched, never walking the whole share.
    write(&share_b.join("late.txt"), b"late")?;
    let r = fetch(&conn_b, "sets/data.bin")
        .await
        .context("fetch from holder")?;
    assert_eq!(r.sources, ["holder"]);
    assert_eq!((r.hash.as_str(), r.size), (h.as_str(), data.len() as u64));
    // The copy lands where the fetcher chose, named by its hash, not by the holder's name.
    assert!(std::fs::read(fetched_copy(&share_b, &h))? == data);
    assert!(!share_b.join("sets").exists());
    assert!(
        !share_b.join(".peerbus-partial").exists(),
        "the partial directory is cleaned up"
    );
    // The fetcher now offers it itself, under the name it was registered with.
    let hits = search(&conn_b, "data").await?;
    assert_eq!(hits.len(), 1);
    assert_eq!(
        (hits[0].name.as_str(), hits[0].hash.as_str()),
        ("sets/data.bin", h.as_str())
    );
    let m = manifest(&conn_b, &h).await?;
    assert!(tree::verify_piece(&m, 2, &piece(&conn_b, &h, 2).await?));
    index_sees(&net, "data", |hits| {
        hits.iter()
            .any(|hit| hit.hash == h && hit.peers.iter().any(|p| p.name == "fetcher"))
    })
    .await?;
    assert!(search(&conn_b, "late").await?.is_empty(), "not walked");
    let changes = net.peers[b].rescan_share().await;
    assert_eq!(changes.added.len(), 1, "{changes:?}");
    assert_eq!(changes.added[0].name, "late.txt");
    // A second fetch has nothing to do, by hash or by name.
    assert!(fetch(&conn_b, &h).await?.sources.is_empty());
    assert!(fetch(&conn_b, "sets/data.bin").await?.sources.is_empty());
    net.stop().await;
    Ok(())
}

/// A holder registers a file under a name that would be dangerous as a path (a dotfile in a
/// nested directory); the fetcher keeps its copy under the hash and creates nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_name_chosen_by_another_peer_never_becomes_a_path() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (share_a, share_b) = (dir.path().join("a"), dir.path().join("b"));
    let key = b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEXAMPLEKEY attacker\n";
    let h = hash(key);
    write(&share_a.join(".ssh/authorized_keys"), key)?;
    std::fs::create_dir_all(&share_b)?;
    let mut net = Net::start().await?;
    net.peer("rogue", Some(&share_a)).await?;
    let b = net.peer("victim", Some(&share_b)).await?;
    let conn_b = net.conn(b).await?;
    let r = fetch(&conn_b, ".ssh/authorized_keys").await?;
    assert_eq!(r.sources, ["rogue"]);
    assert!(!share_b.join(".ssh").exists(), "no path named by the rogue");
    assert_eq!(std::fs::read(fetched_copy(&share_b, &h))?, key);
    let listed: Vec<_> = std::fs::read_dir(&share_b)?
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(listed, [peerbus_peer::share::FETCHED_DIR]);
    net.stop().await;
    Ok(())
}

/// The old wire shape of `Fetch` carried an output path on the peer's machine. A client that
/// still sends one (an old client or an attacker) gets the file into the share and nothing
/// written at the path.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fetch_that_names_a_path_on_the_peer_writes_nothing_there() -> Result<()> {
    use futures::StreamExt;
    use peerbus_proto::{ClientFrame, FrameCodec, PROTOCOL, ServerFrame, decode_server};
    use tokio::io::AsyncWriteExt;

    let dir = tempfile::tempdir()?;
    let (share_a, share_b) = (dir.path().join("a"), dir.path().join("b"));
    let data = noise(1000, 9);
    let h = hash(&data);
    write(&share_a.join("k.txt"), &data)?;
    std::fs::create_dir_all(&share_b)?;
    let victim = dir.path().join("victim/authorized_keys");
    write(&victim, b"the owner's keys")?;
    let mut net = Net::start().await?;
    net.peer("rogue", Some(&share_a)).await?;
    let b = net.peer("victim", Some(&share_b)).await?;

    let frame = |f: &ClientFrame, tail: &[u8]| {
        let mut body = postcard::to_allocvec(f).unwrap();
        body.extend_from_slice(tail);
        let mut out = (body.len() as u32).to_be_bytes().to_vec();
        out.extend(body);
        out
    };
    // `Some(path)` as the old trailing `output: Option<String>` field.
    let path = victim.display().to_string();
    let mut tail = vec![1, path.len() as u8];
    tail.extend_from_slice(path.as_bytes());
    let stream = tokio::net::TcpStream::connect(net.peers[b].addr()).await?;
    let (r, mut w) = stream.into_split();
    let mut r = tokio_util::codec::FramedRead::new(r, FrameCodec::default());
    w.write_all(&frame(
        &ClientFrame::Hello {
            protocol: PROTOCOL.into(),
            token: None,
        },
        &[],
    ))
    .await?;
    w.write_all(&frame(
        &ClientFrame::Request {
            id: 7,
            forward: true,
            body: Request::Fetch {
                key: "k.txt".into(),
            },
        },
        &tail,
    ))
    .await?;
    let answer = loop {
        let next = tokio::time::timeout(DEADLINE, r.next())
            .await
            .context("the peer did not answer the fetch")?
            .context("the peer closed the connection")??;
        if let ServerFrame::Response { id: 7, body } = decode_server(&next)? {
            break body;
        }
    };
    // Trailing bytes are ignored or refused; either way the victim's file is untouched.
    if let Ok(Response::Fetched(r)) = &answer {
        assert!(r.path.ends_with(&h), "{}", r.path);
    }
    assert_eq!(std::fs::read(&victim)?, b"the owner's keys");
    net.stop().await;
    Ok(())
}

/// Fetched copies count against the peer's quota; a fetch past it is refused with the reason
/// and leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fetch_past_the_quota_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (share_a, share_b) = (dir.path().join("a"), dir.path().join("b"));
    write(&share_a.join("small.bin"), &noise(600, 1))?;
    write(&share_a.join("big.bin"), &noise(1500, 2))?;
    std::fs::create_dir_all(&share_b)?;
    let mut net = Net::start().await?;
    net.peer("holder", Some(&share_a)).await?;
    let b = net
        .peer_with("small", Some(&share_b), |c| c.fetch_quota = 2000)
        .await?;
    let conn_b = net.conn(b).await?;
    fetch(&conn_b, "small.bin").await?;
    let e = fetch(&conn_b, "big.bin").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::TooLarge), "{e}");
    assert!(
        e.to_string().contains(
            "peer small will not fetch 'big.bin' (1500 bytes): its fetched copies would take \
             more than its fetch quota of 2000 bytes (600 in use)"
        ),
        "{e}"
    );
    let copies = std::fs::read_dir(share_b.join(peerbus_peer::share::FETCHED_DIR))?.count();
    assert_eq!(copies, 2, "one copy and its name file");
    net.stop().await;
    Ok(())
}
