//! End-to-end: the built `peerbus` binary, run exactly as the README tells users.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{Node, Up, peerbus, spawn};
use serde_json::Value;

/// Runs a client command with `input` on its stdin.
fn with_stdin(args: &[&str], input: String) -> std::process::Output {
    use std::io::Write;
    let mut child = peerbus()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    out
}

fn run(index: &str, args: &[&str]) -> (bool, String, String) {
    let out = peerbus()
        .arg("--index")
        .arg(index)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(index: &str, args: &[&str]) -> String {
    let (success, stdout, stderr) = run(index, args);
    assert!(success, "peerbus {args:?} failed: {stderr}");
    stdout
}

fn fails(index: &str, args: &[&str]) -> String {
    let out = peerbus()
        .arg("--index")
        .arg(index)
        .args(args)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "peerbus {args:?} should fail with status 1"
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr
}

fn peers_json(index: &str) -> Vec<Value> {
    ok(index, &["--json", "peers"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn sigint(node: &mut Node) -> std::process::ExitStatus {
    let pid = node.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    node.child.wait().unwrap()
}

#[test]
fn classic_walkthrough() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).display().to_string();
    let index = spawn([
        "index",
        "--listen",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--data",
        &d("index"),
        "--ttl",
        "3",
    ]);
    let ix = index.addr.clone();
    let p1 = spawn([
        "--index",
        &ix,
        "peer",
        "--listen",
        "127.0.0.1:0",
        "--name",
        "p1",
        "--data",
        &d("p1"),
    ]);
    let mut p2 = spawn([
        "--index",
        &ix,
        "peer",
        "--listen",
        "127.0.0.1:0",
        "--name",
        "p2",
        "--data",
        &d("p2"),
        "--trace-messages",
    ]);
    wait_for("both peers active", Duration::from_secs(20), || {
        peers_json(&ix)
            .iter()
            .filter(|p| p["active"] == true)
            .count()
            == 2
    });

    // Topics created on each peer.
    assert!(ok(&ix, &["topic", "create", "news", "--peer", "p1"]).contains("on peer p1"));
    ok(
        &ix,
        &["topic", "create", "TV", "weather", "--peer", &p2.addr],
    );
    assert_eq!(
        ok(&ix, &["topic", "lookup", "TV"]).trim(),
        format!("p2 {}", p2.addr)
    );
    assert_eq!(
        ok(&ix, &["topic", "lookup", "news"]).trim(),
        format!("p1 {}", p1.addr)
    );
    let e = fails(&ix, &["topic", "create", "news"]);
    assert!(e.contains("topic 'news' exists on peer p1"), "{e}");
    let e = fails(&ix, &["topic", "create", "bad name"]);
    assert!(e.contains("whitespace"), "{e}");

    // Publish with arguments and from stdin, with --json acknowledgements.
    ok(&ix, &["publish", "news", "hello", "world"]);
    let out = with_stdin(
        &["--index", &ix, "--json", "pub", "news", "-"],
        "third\nfourth\n".into(),
    );
    assert!(out.status.success());
    let acks: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(acks.len(), 2);
    assert_eq!(acks[0]["topic"], "news");
    assert_eq!(acks[0]["offset"], 2);
    assert_eq!(acks[1]["offset"], 3);

    // A subscriber arriving after the publisher still gets every message.
    assert!(ok(&ix, &["subscribe", "news", "--as", "alice"]).contains("at offset 0"));
    assert_eq!(
        ok(&ix, &["pull", "news", "--as", "alice"]),
        "hello\nworld\nthird\nfourth\n"
    );
    assert_eq!(ok(&ix, &["pull", "news", "--as", "alice"]), "");
    ok(&ix, &["publish", "news", "fifth"]);
    assert_eq!(
        ok(&ix, &["pull", "news", "--as", "alice", "--max", "5"]),
        "fifth\n"
    );
    assert_eq!(
        ok(&ix, &["pull", "news", "--as", "bob", "--max", "2"]),
        "hello\nworld\n"
    );
    assert!(ok(&ix, &["subscribers", "news"]).contains("alice"));
    ok(&ix, &["unsubscribe", "news", "--as", "bob"]);
    assert!(!ok(&ix, &["subscribers", "news"]).contains("bob"));

    // Delete, then the topic is not found.
    ok(&ix, &["topic", "delete", "weather"]);
    let e = fails(&ix, &["topic", "lookup", "weather"]);
    assert_eq!(e.trim(), "error: topic 'weather' not found");
    let list = ok(&ix, &["topic", "list"]);
    assert!(
        list.contains("news") && list.contains("TV") && !list.contains("weather"),
        "{list}"
    );

    // Ctrl-C on p2: it leaves, exits 0, its topics answer "not found", peers shows it inactive.
    let status = sigint(&mut p2);
    assert!(status.success(), "peer exits 0 on Ctrl-C: {status:?}");
    let e = fails(&ix, &["topic", "lookup", "TV"]);
    assert_eq!(e.trim(), "error: topic 'TV' not found");
    let e = fails(&ix, &["publish", "TV", "x"]);
    assert!(e.contains("topic 'TV' not found"), "{e}");
    let peers = peers_json(&ix);
    let p2j = peers.iter().find(|p| p["name"] == "p2").unwrap();
    assert_eq!(p2j["active"], false);
    for field in [
        "id",
        "name",
        "addr",
        "active",
        "registrations",
        "last_registered",
        "ttl_left",
    ] {
        assert!(p2j.get(field).is_some(), "peers --json lacks {field}");
    }
    drop(p1);
    drop(index);
}

#[test]
fn a_killed_peer_expires_and_a_restart_keeps_its_identity_and_data() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).display().to_string();
    let index = spawn([
        "index",
        "--listen",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--data",
        &d("index"),
        "--ttl",
        "2",
    ]);
    let ix = index.addr.clone();
    let mut p = spawn([
        "--index",
        &ix,
        "peer",
        "--listen",
        "127.0.0.1:0",
        "--name",
        "solo",
        "--data",
        &d("solo"),
    ]);
    wait_for("peer active", Duration::from_secs(20), || {
        peers_json(&ix).iter().any(|p| p["active"] == true)
    });
    ok(&ix, &["topic", "create", "t"]);
    let out = with_stdin(
        &["--index", &ix, "--json", "publish", "t", "-"],
        (0..500).map(|i| format!("m{i}\n")).collect(),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 500);

    // kill -9: no leave. After the TTL the index marks it inactive and stops offering t.
    p.child.kill().unwrap();
    p.child.wait().unwrap();
    wait_for(
        "peer inactive after its TTL",
        Duration::from_secs(20),
        || peers_json(&ix).iter().all(|p| p["active"] == false),
    );
    let e = fails(&ix, &["topic", "lookup", "t"]);
    assert!(e.contains("not found"), "{e}");

    // Restart from the same data: same id, one more registration, every message served.
    let _p = spawn([
        "--index",
        &ix,
        "peer",
        "--listen",
        "127.0.0.1:0",
        "--data",
        &d("solo"),
    ]);
    wait_for("peer active again", Duration::from_secs(20), || {
        peers_json(&ix).iter().any(|p| p["active"] == true)
    });
    let peers = peers_json(&ix);
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0]["name"], "solo");
    assert_eq!(peers[0]["registrations"], 2);
    let pulled = ok(&ix, &["pull", "t", "--as", "late"]);
    let expect: String = (0..500).map(|i| format!("m{i}\n")).collect();
    assert_eq!(pulled, expect);
}

#[test]
fn up_starts_a_cluster_and_stops_cleanly_on_ctrl_c() {
    let up = Up::start(3);
    let (ix, banner) = (up.index.clone(), up.banner.clone());
    assert!(banner.contains(&format!("index  {ix}")), "{banner}");
    for p in ["peer1", "peer2", "peer3"] {
        assert!(banner.contains(p), "{banner}");
    }
    assert!(banner.contains("peerbus topic create"), "{banner}");
    assert_eq!(
        peers_json(&ix)
            .iter()
            .filter(|p| p["active"] == true)
            .count(),
        3
    );
    ok(&ix, &["topic", "create", "hello"]);
    ok(&ix, &["publish", "hello", "there"]);
    assert_eq!(ok(&ix, &["pull", "hello", "--as", "me"]), "there\n");
    assert!(up.data().join("peerbus.log").exists());
    let rest = up.stop();
    assert_eq!(rest.last().map(String::as_str), Some("stopped"), "{rest:?}");
}

#[test]
fn bad_usage_exits_2_and_unreachable_index_exits_1() {
    let out = peerbus().args(["topic", "frobnicate"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = fails(&format!("127.0.0.1:{port}"), &["peers"]);
    assert!(e.contains("cannot reach"), "{e}");
}

#[test]
fn napster_walkthrough_share_get_leave() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).display().to_string();
    std::fs::create_dir_all(dir.path().join("b-share")).unwrap();
    std::fs::create_dir_all(dir.path().join("a-share")).unwrap();
    std::fs::write(dir.path().join("b-share/notes.txt"), "text file\n").unwrap();
    let binary: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(dir.path().join("b-share/photo.bin"), &binary).unwrap();

    let index = spawn([
        "index",
        "--listen",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--data",
        &d("index"),
    ]);
    let ix = index.addr.clone();
    let a = spawn([
        "--index",
        &ix,
        "peer",
        "--listen",
        "127.0.0.1:0",
        "--name",
        "A",
        "--data",
        &d("a"),
        "--share",
        &d("a-share"),
    ]);
    let mut b = spawn([
        "--index",
        &ix,
        "peer",
        "--listen",
        "127.0.0.1:0",
        "--name",
        "B",
        "--data",
        &d("b"),
        "--share",
        &d("b-share"),
    ]);
    wait_for("B's files at the index", Duration::from_secs(20), || {
        ok(&ix, &["search", "."]).lines().count() == 2
    });
    let hits: Vec<Value> = ok(&ix, &["--json", "search", "PHOTO"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0]["name"], "photo.bin");
    assert_eq!(hits[0]["size"], 3_000_000);
    assert_eq!(hits[0]["peers"][0], b.addr.as_str());
    assert_eq!(ok(&ix, &["files", "--peer", &b.addr]).lines().count(), 2);
    assert_eq!(
        ok(&ix, &["search", "notes", "--distributed"])
            .lines()
            .count(),
        1
    );

    // A downloads one file from B into its share and then serves it.
    let got = ok(&ix, &["get", "photo.bin", "--peer", &a.addr]);
    assert!(
        got.contains("downloaded file 'photo.bin'") && got.contains("from B"),
        "{got}"
    );
    // A chose where its copy lives: under the hash, inside its share.
    let photo_hash = hits[0]["hash"].as_str().unwrap().to_string();
    let a_copy = dir
        .path()
        .join("a-share/.peerbus-fetched")
        .join(&photo_hash);
    assert_eq!(std::fs::read(&a_copy).unwrap(), binary);
    // With -o too, this command writes the path itself; no request names a path on A.
    let mine = dir.path().join("mine/photo.bin");
    std::fs::create_dir_all(mine.parent().unwrap()).unwrap();
    let got = ok(
        &ix,
        &[
            "get",
            "photo.bin",
            "--peer",
            &a.addr,
            "-o",
            &mine.display().to_string(),
        ],
    );
    assert!(got.contains("a copy already held"), "{got}");
    assert_eq!(std::fs::read(&mine).unwrap(), binary);
    let in_a: Vec<String> = std::fs::read_dir(dir.path().join("a-share"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(in_a, [".peerbus-fetched"]);
    wait_for("A offers its copy", Duration::from_secs(20), || {
        ok(&ix, &["--json", "search", "photo"]).contains(&a.addr)
    });

    // B leaves.
    assert!(sigint(&mut b).success());
    let peers = peers_json(&ix);
    assert_eq!(
        peers.iter().find(|p| p["name"] == "B").unwrap()["active"],
        false
    );
    // A's copy is still found and served; the CLI downloads it itself.
    let out = dir.path().join("fetched.bin");
    let got = ok(&ix, &["get", "photo.bin", "-o", &out.display().to_string()]);
    assert!(got.contains("from A"), "{got}");
    assert_eq!(std::fs::read(&out).unwrap(), binary);
    // B's other file has no live holder: a clear error and no file.
    let e = fails(&ix, &["get", "notes.txt", "-o", &d("notes.txt")]);
    assert!(e.contains("notes.txt") && e.contains("not found"), "{e}");
    assert!(!dir.path().join("notes.txt").exists());
}
