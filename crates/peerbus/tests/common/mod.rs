//! Shared by the end-to-end tests: the built binary and a running `peerbus up`.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Lines};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use assert_cmd::cargo::CommandCargoExt;

/// The built `peerbus` binary with no cluster settings inherited from the environment.
pub fn peerbus() -> Command {
    let mut c = Command::cargo_bin("peerbus").expect("the peerbus binary is built");
    c.env_remove("PEERBUS_INDEX")
        .env_remove("PEERBUS_TOKEN")
        .env("RUST_LOG", "info");
    c
}

/// Runs a client command against `index` and returns its stdout; fails the test with its
/// stderr unless it succeeds.
pub fn ok(index: &str, args: &[&str]) -> String {
    let out = peerbus()
        .arg("--index")
        .arg(index)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "peerbus {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A free loopback address (bound and released), for a node whose port must be known first.
pub fn free_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

/// A running `peerbus up`; its stdout stays open so its last lines can be read.
pub struct Up {
    /// The process.
    pub child: Child,
    /// The index's address.
    pub index: String,
    /// Everything printed up to and including the "Ctrl-C" line.
    pub banner: String,
    lines: Lines<BufReader<ChildStdout>>,
    _dir: tempfile::TempDir,
}

impl Up {
    /// Starts `peerbus up` with `peers` peers in a temporary data directory and waits for
    /// its banner.
    pub fn start(peers: usize) -> Up {
        let dir = tempfile::tempdir().unwrap();
        let index = free_addr();
        let mut child = peerbus()
            .args([
                "--index",
                &index,
                "up",
                "--peers",
                &peers.to_string(),
                "--data",
            ])
            .arg(dir.path().join("data"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut banner = String::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            banner.push_str(&line);
            banner.push('\n');
            if line.starts_with("Ctrl-C") {
                break;
            }
        }
        Up {
            child,
            index,
            banner,
            lines,
            _dir: dir,
        }
    }

    /// The data directory.
    pub fn data(&self) -> std::path::PathBuf {
        self._dir.path().join("data")
    }

    /// Sends Ctrl-C, asserts a clean exit 0 and returns what it printed meanwhile.
    pub fn stop(mut self) -> Vec<String> {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-INT", &pid])
                .status()
                .unwrap()
                .success()
        );
        let status = self.child.wait().unwrap();
        assert!(status.success(), "up exits 0 on Ctrl-C: {status:?}");
        self.lines.by_ref().map_while(Result::ok).collect()
    }
}

/// A node process (`peerbus index` or `peerbus peer`); killed when dropped.
pub struct Node {
    /// The process.
    pub child: Child,
    /// The binary protocol address it printed.
    pub addr: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    /// `kill -9`: no leave, no flush.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

/// Starts a node and reads its address from the "listening on ADDR" line it prints.
pub fn spawn<I, S>(args: I) -> Node
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut child = peerbus()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // Keeps draining stderr after the address so the node never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if !sent && let Some(rest) = line.split("listening on ").nth(1) {
                let addr = rest
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .trim_end_matches(',')
                    .to_string();
                let _ = tx.send(addr);
                sent = true;
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the node prints its address");
    Node { child, addr }
}
