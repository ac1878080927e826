//! File sharing across a cluster: share, search, verified multi-source download, replication.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use peerbus_client::{Client, DownloadProgress, FileHit};
use peerbus_testkit::{Cluster, ClusterOptions};

fn bytes(n: usize, seed: u64) -> Vec<u8> {
    // Deterministic, incompressible-looking bytes (not all zero) so a wrong piece shows.
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Puts a file into a share the way a careful user does: written beside it, then renamed
/// in, so the peer never hashes a half-written file.
fn put(path: &std::path::Path, data: impl AsRef<[u8]>) {
    let tmp = path.parent().unwrap().parent().unwrap().join(format!(
        ".incoming-{}",
        path.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&tmp, data).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn wait_for_hit(c: &Client, name: &str, holders: usize) -> FileHit {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(hits) = c.search_files(name).await
            && let Some(h) = hits.into_iter().find(|h| h.name == name)
            && h.peers.len() >= holders
        {
            return h;
        }
        assert!(
            Instant::now() < deadline,
            "'{name}' never had {holders} holders"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn shares(peers: usize) -> ClusterOptions {
    ClusterOptions {
        peers,
        shares: true,
        ..ClusterOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_and_binary_files_arrive_identical_and_search_finds_them() {
    let cluster = Cluster::start_with(shares(2)).await.unwrap();
    let c = cluster.client();
    let big = bytes(50 * 1024 * 1024 + 12_345, 7);
    std::fs::create_dir_all(cluster.peer_share(0).join("docs")).unwrap();
    std::fs::write(
        cluster.peer_share(0).join("docs/Readme.TXT"),
        "hello, peers\n",
    )
    .unwrap();
    put(&cluster.peer_share(0).join("big.bin"), &big);
    let hit = wait_for_hit(&c, "big.bin", 1).await;
    assert_eq!(hit.size, big.len() as u64);
    assert_eq!(hit.hash, blake3::hash(&big).to_hex().to_string());

    // Case-insensitive substring search, from the index and from the peers directly.
    let found = c.search_files("readme").await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].name, "docs/Readme.TXT");
    assert_eq!(found[0].peers[0].addr, cluster.peer_addr(0));
    let dist = c.search_files_distributed("README").await.unwrap();
    assert_eq!(dist.len(), 1);
    assert_eq!(dist[0].hash, found[0].hash);
    assert_eq!(
        c.peer_files(&cluster.peer_addr(0), "").await.unwrap().len(),
        2
    );

    let out = tempfile::tempdir().unwrap();
    let r = c
        .download("docs/Readme.TXT", &out.path().join("r.txt"), None)
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(out.path().join("r.txt")).unwrap(),
        b"hello, peers\n"
    );
    assert_eq!(r.sources, vec![cluster.peer_name(0)]);
    let r = c
        .download(&hit.hash, &out.path().join("big.bin"), None)
        .await
        .unwrap();
    assert_eq!(r.size, big.len() as u64);
    assert!(
        std::fs::read(out.path().join("big.bin")).unwrap() == big,
        "binary file identical"
    );
    let leftovers: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 2, "no temporary files left: {leftovers:?}");

    // An unknown file is a clear error.
    let e = c
        .download("nope.bin", &out.path().join("nope"), None)
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "file 'nope.bin' not found");
    assert!(!out.path().join("nope").exists());
}

/// Stops a source after a number of pieces have arrived.
struct KillAfter {
    pieces: AtomicUsize,
    at: usize,
    fire: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    lost: AtomicUsize,
    bytes: AtomicU64,
}

impl DownloadProgress for KillAfter {
    fn started(&self, _: &str, _: u64, _: usize) {}
    fn advanced(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        if self.pieces.fetch_add(1, Ordering::Relaxed) + 1 == self.at
            && let Some(tx) = self.fire.lock().unwrap().take()
        {
            let _ = tx.send(());
        }
    }
    fn source_lost(&self, _: &str, _: &str) {
        self.lost.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_source_download_survives_a_source_dying_mid_way() {
    let mut cluster = Cluster::start_with(shares(4)).await.unwrap();
    let c = cluster.client();
    let data = bytes(40 * 1024 * 1024, 3);
    for i in 0..3 {
        put(&cluster.peer_share(i).join("shared.bin"), &data);
    }
    let hit = wait_for_hit(&c, "shared.bin", 3).await;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let progress = Arc::new(KillAfter {
        pieces: AtomicUsize::new(0),
        at: 5,
        fire: std::sync::Mutex::new(Some(tx)),
        lost: AtomicUsize::new(0),
        bytes: AtomicU64::new(0),
    });
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("shared.bin");
    let download = {
        let (c, dest, p, hash) = (c.clone(), dest.clone(), progress.clone(), hit.hash.clone());
        tokio::spawn(async move { c.download(&hash, &dest, Some(p)).await })
    };
    rx.await.unwrap();
    cluster.stop_peer(1).await;
    let report = download.await.unwrap().unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    assert_eq!(progress.bytes.load(Ordering::Relaxed), data.len() as u64);
    assert!(report.sources.len() >= 2, "{:?}", report.sources);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_piece_is_detected_and_fetched_again_from_another_source() {
    let cluster = Cluster::start_with(ClusterOptions {
        peers: 2,
        shares: true,
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let c = cluster.client();
    let data = bytes(8 * 1024 * 1024, 11);
    put(&cluster.peer_share(0).join("f.bin"), &data);
    put(&cluster.peer_share(1).join("f.bin"), &data);
    let hit = wait_for_hit(&c, "f.bin", 2).await;
    // Flip bytes in peer2's copy in place (same length, so its listing stays until a
    // rescan notices): every piece it serves from there on fails verification.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(cluster.peer_share(1).join("f.bin"))
            .unwrap();
        let mtime = f.metadata().unwrap().modified().unwrap();
        for piece in 0..8u64 {
            f.write_all_at(b"XXXX", piece * 1024 * 1024 + 100).unwrap();
        }
        // Keep the old mtime so a rescan does not re-hash it: the peer keeps offering the
        // old hash and serving bad bytes, which is what a failing disk looks like.
        f.set_modified(mtime).unwrap();
    }
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("f.bin");
    let report = c.download(&hit.hash, &dest, None).await.unwrap();
    assert_eq!(
        std::fs::read(&dest).unwrap(),
        data,
        "the corrupt copy never reached the file"
    );
    assert_eq!(report.sources, vec![cluster.peer_name(0)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_source_left_the_download_fails_and_leaves_no_file() {
    let mut cluster = Cluster::start_with(shares(1)).await.unwrap();
    let c = cluster.client();
    put(
        &cluster.peer_share(0).join("x.bin"),
        bytes(4 * 1024 * 1024, 5),
    );
    let hit = wait_for_hit(&c, "x.bin", 1).await;
    cluster.stop_peer(0).await;
    let out = tempfile::tempdir().unwrap();
    let e = c
        .download(&hit.hash, &out.path().join("x.bin"), None)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("x.bin") || e.to_string().contains(&hit.hash),
        "{e}"
    );
    assert_eq!(
        std::fs::read_dir(out.path()).unwrap().count(),
        0,
        "nothing left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_reaches_two_holders_and_repairs_after_a_holder_leaves() {
    let mut cluster = Cluster::start_with(ClusterOptions {
        peers: 3,
        shares: true,
        replication: Some(2),
        ttl: Duration::from_secs(2),
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let c = cluster.client();
    let data = bytes(3 * 1024 * 1024, 9);
    put(&cluster.peer_share(0).join("r.bin"), &data);
    let hit = wait_for_hit(&c, "r.bin", 2).await;
    let holders: Vec<String> = hit.peers.iter().map(|p| p.name.clone()).collect();
    assert_eq!(holders.len(), 2);
    let copy = holders.iter().find(|n| *n != "peer1").unwrap().clone();
    let copy_idx: usize = copy.trim_start_matches("peer").parse::<usize>().unwrap() - 1;
    // The copy lives where its holder chose: under the hash, never at the name another
    // peer registered.
    let copy_path = cluster
        .peer_share(copy_idx)
        .join(peerbus_peer::share::fetched_path(&hit.hash));
    assert_eq!(std::fs::read(copy_path).unwrap(), data);
    assert!(!cluster.peer_share(copy_idx).join("r.bin").exists());

    // The original holder leaves: the third peer gets a copy.
    cluster.stop_peer(0).await;
    let hit = wait_for_hit(&c, "r.bin", 2).await;
    assert!(hit.peers.iter().all(|p| p.name != "peer1"));
}
