//! A full disk through the built binary: a peer whose data directory is a small tmpfs
//! fills it. The publish that does not fit fails with an error that says why, the peer keeps
//! serving what it stored, refuses later writes instead of leaving holes, and after the
//! disk has room again and the peer restarts, every acknowledged message is there exactly
//! once and publishing goes on from the next offset.
//!
//! Mounting the tmpfs needs root (as CI runs); the test says so if the mount fails.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::spawn;
use peerbus_client::Client;
use peerbus_proto::Retention;

const PAYLOAD: usize = 4096;

/// A tmpfs mounted for the test, unmounted when dropped.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn mount(path: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .expect("mount runs");
        assert!(
            out.status.success(),
            "this test fills a small tmpfs and needs root to mount it: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk {
            path: path.to_path_buf(),
        }
    }

    fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount of the tmpfs with {size}");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Message `i`: its number, then pseudo-random bytes, so compression cannot shrink it.
fn payload(i: u64) -> Bytes {
    let mut v = format!("message {i} ").into_bytes();
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while v.len() < PAYLOAD {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(PAYLOAD);
    Bytes::from(v)
}

fn peer_args(index: &str, data: &Path) -> Vec<String> {
    [
        "--index",
        index,
        "peer",
        "--listen",
        "127.0.0.1:0",
        "--name",
        "small",
        "--durability",
        "sync",
        "--data",
    ]
    .map(String::from)
    .into_iter()
    .chain([data.display().to_string()])
    .collect()
}

/// Creates `topic` on the peer once it has registered, polling until a deadline.
async fn create_when_registered(client: &Client, topic: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client.create_topic(topic, None, Retention::default()).await {
            Ok(_) => return,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot create topic {topic}: {e}"),
        }
    }
}

/// Every message of `topic` from offset 0, by a fresh subscriber.
async fn pull_all(client: &Client, topic: &str, subscriber: &str) -> Vec<(u64, Bytes)> {
    let mut all = Vec::new();
    loop {
        let set = client
            .pull(topic, subscriber, 1000, Duration::ZERO)
            .await
            .expect("pull");
        if set.is_empty() {
            return all;
        }
        all.extend(set.messages().map(|m| (m.offset, m.payload)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_refuses_writes_loses_nothing_and_recovers_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(&dir.path().join("small"), "16m");
    let index = spawn([
        "index".to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--http".into(),
        "off".into(),
        "--data".into(),
        dir.path().join("index").display().to_string(),
    ]);
    let data = disk.path.join("peer");
    let mut peer = spawn(peer_args(&index.addr, &data));
    let client = Client::new(index.addr.clone());
    create_when_registered(&client, "fill").await;

    // Publish until the disk is full: 16 MiB cannot hold 8,192 × 4 KiB plus overhead.
    let mut acked = 0u64;
    let error = loop {
        assert!(
            acked < 8192,
            "16 MiB took 32 MiB of messages: the disk never filled"
        );
        match client.publish("fill", payload(acked)).await {
            Ok(offset) => {
                assert_eq!(offset, acked);
                acked += 1;
            }
            Err(e) => break e.to_string(),
        }
    };
    eprintln!("after {acked} messages: {error}");
    assert!(acked > 0, "the first publish already failed: {error}");
    assert!(
        error.contains("No space left on device"),
        "the error says the disk is full: {error}"
    );

    // A later publish is refused too, with the reason, instead of being stored after a hole.
    let again = client
        .publish("fill", payload(acked))
        .await
        .expect_err("writes stay refused after a failed one")
        .to_string();
    assert!(
        again.contains("No space left on device") && again.contains("restart"),
        "{again}"
    );

    // The peer still serves: everything acknowledged is readable, nothing else.
    let stored = pull_all(&client, "fill", "reader1").await;
    assert_eq!(stored.len() as u64, acked);
    for (i, (offset, body)) in stored.iter().enumerate() {
        assert_eq!(*offset, i as u64);
        assert_eq!(*body, payload(i as u64));
    }

    // Room again, restart: every acknowledged message once, and publishing goes on.
    disk.resize("256m");
    peer.kill9();
    let _peer = spawn(peer_args(&index.addr, &data));
    let deadline = Instant::now() + Duration::from_secs(30);
    let offset = loop {
        match client.publish("fill", payload(acked)).await {
            Ok(offset) => break offset,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("publishing after the restart failed: {e}"),
        }
    };
    assert!(
        offset >= acked,
        "an acknowledged offset was reused: {offset} < {acked}"
    );
    let stored = pull_all(&client, "fill", "reader2").await;
    let mut copies: HashMap<Bytes, usize> = HashMap::new();
    for (_, body) in &stored {
        *copies.entry(body.clone()).or_default() += 1;
    }
    for i in 0..acked {
        assert_eq!(
            copies.get(&payload(i)).copied(),
            Some(1),
            "acknowledged message {i} is stored exactly once"
        );
    }
    for (i, (o, _)) in stored.iter().enumerate() {
        assert_eq!(*o, stored[0].0 + i as u64, "offsets without holes");
    }
    assert_eq!(stored[0].0, 0);
    assert_eq!(stored.last().unwrap().1, payload(acked));
}
