//! The messaging scenarios at smoke size: they run, write every file and print their summary
//! lines in the agreed format. How fast they are is for `peerbus bench`, not for tests.

mod common;

use common::{assert_written, smoke};
use peerbus_bench::Scenario;

/// The number after `prefix` on the line that starts with it.
fn number_after(lines: &[String], prefix: &str) -> f64 {
    let line = lines
        .iter()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?} in {lines:?}"));
    let rest = line[prefix.len()..].split_whitespace().next().unwrap_or("");
    assert!(
        rest.chars().all(|c| c.is_ascii_digit() || c == '.') && rest.contains('.'),
        "not a decimal after {prefix:?}: {line:?}"
    );
    rest.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_writes_tables_plots_and_the_durability_ratio() {
    let dir = tempfile::tempdir().unwrap();
    let lines = peerbus_bench::run(Scenario::Throughput, &smoke(dir.path()))
        .await
        .unwrap();
    assert_written(
        dir.path(),
        &[
            "throughput.csv",
            "throughput_durability.csv",
            "throughput_clients.png",
            "throughput_size.png",
        ],
    );
    let csv = std::fs::read_to_string(dir.path().join("throughput.csv")).unwrap();
    assert!(csv.starts_with("payload_bytes,pairs,messages,"), "{csv}");
    let ratio = number_after(&lines, "sync/memory publish throughput ratio: ");
    assert!(ratio > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pingpong_writes_tables_plots_and_latency_lines() {
    let dir = tempfile::tempdir().unwrap();
    let lines = peerbus_bench::run(Scenario::Pingpong, &smoke(dir.path()))
        .await
        .unwrap();
    assert_written(
        dir.path(),
        &["pingpong.csv", "pingpong_latency.png", "pingpong_rate.png"],
    );
    let csv = std::fs::read_to_string(dir.path().join("pingpong.csv")).unwrap();
    // Two rows (one in flight, a window in flight) for each of 1 and 2 pairs.
    assert_eq!(csv.lines().count(), 1 + 4, "{csv}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("pingpong round trip: p50 ")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("pingpong max: ")),
        "{lines:?}"
    );
}

fn nats_installed() -> bool {
    std::process::Command::new("nats-server")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_prints_the_ratios() {
    if !nats_installed() {
        eprintln!("nats-server is not installed; skipping the compare smoke test");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lines = peerbus_bench::run(Scenario::Compare, &smoke(dir.path()))
        .await
        .unwrap();
    assert_written(
        dir.path(),
        &[
            "compare.csv",
            "compare_throughput.png",
            "compare_latency.png",
        ],
    );
    assert!(number_after(&lines, "peerbus/nats throughput ratio: ") > 0.0);
    assert!(number_after(&lines, "peerbus/nats request-reply p50 ratio: ") > 0.0);
}
