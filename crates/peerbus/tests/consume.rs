//! At-least-once consumption through the built binary: the CLI acknowledges only what it
//! wrote to stdout, `--no-commit` acknowledges nothing, and `peerbus ack` commits by hand.

use std::process::Stdio;

mod common;

use common::{Up, ok as run, peerbus};

#[test]
fn the_cli_commits_only_what_it_wrote() {
    let up = Up::start(1);
    let ix = up.index.clone();
    run(&ix, &["topic", "create", "jobs"]);
    let messages: Vec<String> = (0..50).map(|i| format!("job-{i}")).collect();
    let mut args = vec!["publish", "jobs"];
    args.extend(messages.iter().map(String::as_str));
    run(&ix, &args);

    // A reader that goes away before reading anything (`peerbus pull | head -0`): the
    // writes fail, and nothing is acknowledged.
    let mut child = peerbus()
        .args(["--index", &ix, "pull", "jobs", "--as", "worker"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "writing to a closed pipe must fail");

    // --no-commit prints and acknowledges nothing.
    let peek = run(
        &ix,
        &[
            "pull",
            "jobs",
            "--as",
            "worker",
            "--no-commit",
            "--max",
            "5",
        ],
    );
    assert_eq!(peek.lines().collect::<Vec<_>>(), messages[..5]);
    let again = run(
        &ix,
        &[
            "pull",
            "jobs",
            "--as",
            "worker",
            "--no-commit",
            "--max",
            "5",
        ],
    );
    assert_eq!(again, peek, "nothing was acknowledged");

    // An explicit ack of offsets 0..=4, then a pull prints the rest and commits it.
    let acked = run(&ix, &["ack", "jobs", "--as", "worker", "--offset", "4"]);
    assert!(acked.contains("up to offset 4"), "{acked}");
    let rest = run(&ix, &["pull", "jobs", "--as", "worker"]);
    assert_eq!(rest.lines().collect::<Vec<_>>(), messages[5..]);
    assert_eq!(run(&ix, &["pull", "jobs", "--as", "worker"]), "");

    // Acknowledging past the end is refused with the reason.
    let out = peerbus()
        .args([
            "--index", &ix, "ack", "jobs", "--as", "worker", "--offset", "99",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "cannot acknowledge topic 'jobs' up to offset 99: its messages end before offset 50"
        ),
        "{stderr}"
    );
    up.stop();
}

#[test]
fn small_things_a_new_user_meets() {
    let up = Up::start(1);
    let ix = up.index.clone();
    run(&ix, &["topic", "create", "one"]);
    assert_eq!(
        run(&ix, &["publish", "one", "hello"]),
        "published 1 message to 'one'\n"
    );
    assert_eq!(
        run(&ix, &["publish", "one", "a", "b"]),
        "published 2 messages to 'one'\n"
    );
    // Many names go in bulk, also from stdin.
    let names: String = (0..25_000).map(|i| format!("bulk.{i}\n")).collect();
    let mut child = peerbus()
        .args(["--index", &ix, "topic", "create", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        stdin.write_all(names.as_bytes())
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    let created: u64 = printed
        .lines()
        .map(|l| l.split(' ').nth(1).unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(created, 25_000, "{printed}");
    assert_eq!(
        run(&ix, &["topic", "list", "--prefix", "bulk."])
            .lines()
            .count(),
        25_000
    );
    // `--http off` works for a peer as it does for the index.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("p").display().to_string();
    let peer = common::spawn([
        "--index",
        &ix,
        "peer",
        "--listen",
        "127.0.0.1:0",
        "--http",
        "off",
        "--data",
        &data,
        "--name",
        "quiet",
    ]);
    assert!(!peer.addr.is_empty());
    drop(peer);
    up.stop();
}
