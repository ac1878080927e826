//! Crash safety through the built binary: `kill -9` a peer in the middle of a large publish,
//! restart it on its data, and every acknowledged message is there exactly once, in order.
//! The index survives a `kill -9` too.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;

use common::{Node, free_addr, ok, peerbus, spawn};
use serde_json::Value;

/// The peer named `solo` as `peers --json` shows it, if the index is up and lists it.
fn solo(index: &str) -> Option<Value> {
    let out = peerbus()
        .args(["--index", index, "--json", "peers"])
        .output()
        .unwrap();
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|p| p["name"] == "solo")
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `solo` is active with more than `after` registrations; returns (id, registrations).
fn wait_registered(index: &str, after: u64) -> (u64, u64) {
    let mut seen = (0, 0);
    wait_for(
        "the peer to register again",
        Duration::from_secs(60),
        || match solo(index) {
            Some(p) if p["active"] == true && p["registrations"].as_u64().unwrap() > after => {
                seen = (
                    p["id"].as_u64().unwrap(),
                    p["registrations"].as_u64().unwrap(),
                );
                true
            }
            _ => false,
        },
    );
    seen
}

/// Waits until the index offers topic `t` again (the peer announces it after registering).
fn wait_topic(index: &str) {
    wait_for(
        "the topic to be offered again",
        Duration::from_secs(60),
        || {
            peerbus()
                .args(["--index", index, "topic", "lookup", "t"])
                .output()
                .unwrap()
                .status
                .success()
        },
    );
}

fn peer_args(index: &str, data: &str) -> Vec<String> {
    [
        "--index",
        index,
        "peer",
        "--listen",
        "127.0.0.1:0",
        "--name",
        "solo",
        "--durability",
        "sync",
        "--data",
        data,
    ]
    .map(String::from)
    .to_vec()
}

/// Publishes `lines` lines `r{round}-{i}` through `peerbus --json publish t -`, kills the peer
/// after `kill_after` acknowledgements, and returns the acknowledged offsets in order.
fn publish_and_kill_peer(
    index: &str,
    round: usize,
    lines: usize,
    kill_after: usize,
    peer: &mut Node,
) -> Vec<u64> {
    let mut publisher = peerbus()
        .args(["--index", index, "--json", "publish", "t", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = publisher.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let mut buf = std::io::BufWriter::new(&mut stdin);
        for i in 0..lines {
            // The publisher fails once its peer is gone and stops reading: a broken pipe.
            if writeln!(buf, "r{round}-{i}").is_err() {
                return;
            }
        }
        let _ = buf.flush();
    });
    let stdout = publisher.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let v: Value = serde_json::from_str(&line).unwrap();
            if tx.send(v["offset"].as_u64().unwrap()).is_err() {
                break;
            }
        }
    });

    let mut acked = Vec::new();
    let mut killed = false;
    let mut deadline = Instant::now() + Duration::from_secs(300);
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(offset) => acked.push(offset),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if !killed && acked.len() >= kill_after {
            peer.kill9();
            killed = true;
            deadline = Instant::now() + Duration::from_secs(60);
        }
        if Instant::now() > deadline {
            // The publisher neither finished nor gave up: stop it; what it printed stands.
            let _ = publisher.kill();
            deadline = Instant::now() + Duration::from_secs(3600);
        }
    }
    if !killed {
        // The publisher finished before enough acknowledgements arrived; still crash the peer.
        peer.kill9();
    }
    let _ = publisher.wait();
    writer.join().unwrap();
    acked
}

#[test]
fn kill_9_never_loses_or_duplicates_an_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).display().to_string();
    let ix = free_addr();
    let index_args: Vec<String> = [
        "index",
        "--listen",
        &ix,
        "--http",
        "127.0.0.1:0",
        "--data",
        &d("index"),
        "--ttl",
        "2",
    ]
    .map(String::from)
    .to_vec();
    let mut index = spawn(&index_args);
    let mut peer = spawn(peer_args(&ix, &d("solo")));
    let (id, mut regs) = wait_registered(&ix, 0);
    ok(&ix, &["topic", "create", "t"]);

    const LINES: usize = 200_000;
    const KILL_AFTER: usize = 5_000;
    // Every acknowledged (offset, message) so far.
    let mut all_acked: Vec<(u64, String)> = Vec::new();
    for round in 0..3 {
        let acked = publish_and_kill_peer(&ix, round, LINES, KILL_AFTER, &mut peer);
        assert!(!acked.is_empty(), "round {round}: nothing acknowledged");
        eprintln!("round {round}: {} of {LINES} acknowledged", acked.len());
        assert!(
            acked.windows(2).all(|w| w[0] < w[1]),
            "round {round}: offsets acknowledged out of order"
        );
        // The k-th acknowledgement is for the k-th line.
        all_acked.extend(
            acked
                .iter()
                .enumerate()
                .map(|(k, &o)| (o, format!("r{round}-{k}"))),
        );

        peer = spawn(peer_args(&ix, &d("solo")));
        let (again, r) = wait_registered(&ix, regs);
        assert_eq!(again, id, "round {round}: the restarted peer keeps its id");
        regs = r;

        if round == 1 {
            // kill -9 the index too: the topic and the peer's identity survive.
            index.kill9();
            index = spawn(&index_args);
            let (again, r) = wait_registered(&ix, regs);
            assert_eq!(again, id, "the peer keeps its id across an index crash");
            regs = r;
            wait_topic(&ix);
            let topics = ok(&ix, &["--json", "topic", "list"]);
            assert!(
                topics
                    .lines()
                    .map(|l| serde_json::from_str::<Value>(l).unwrap())
                    .any(|v| v["topic"] == "t"),
                "{topics}"
            );
            ok(&ix, &["topic", "lookup", "t"]);
        }

        wait_topic(&ix);
        let pulled = ok(&ix, &["pull", "t", "--as", &format!("checker{round}")]);
        let pulled: Vec<&str> = pulled.lines().collect();
        check(&pulled, &all_acked, round);
    }
    drop(peer);
    drop(index);
}

/// `pulled` holds the topic from offset 0: every acknowledged message sits at its offset, no
/// message appears twice, and messages appear in publish order.
fn check(pulled: &[&str], acked: &[(u64, String)], round: usize) {
    for (offset, message) in acked {
        assert_eq!(
            pulled.get(*offset as usize).copied(),
            Some(message.as_str()),
            "after round {round}: acknowledged message at offset {offset} is missing or wrong"
        );
    }
    let mut seen = HashSet::new();
    let mut last: Option<(usize, usize)> = None;
    for (offset, m) in pulled.iter().enumerate() {
        assert!(
            seen.insert(*m),
            "after round {round}: {m} appears twice (again at offset {offset})"
        );
        let (r, i) = m
            .strip_prefix('r')
            .and_then(|s| s.split_once('-'))
            .map(|(r, i)| (r.parse::<usize>().unwrap(), i.parse::<usize>().unwrap()))
            .unwrap_or_else(|| panic!("unexpected message {m:?}"));
        if let Some(prev) = last {
            assert!(
                (r, i) > prev,
                "after round {round}: {m} at offset {offset} is out of publish order"
            );
        }
        last = Some((r, i));
    }
}
