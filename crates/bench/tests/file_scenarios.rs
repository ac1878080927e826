//! The `files` and `download` scenarios at smoke size: they run end to end, write every
//! table and plot, and print their summary lines in the documented form. Speed is not
//! checked here; that is what the scenarios themselves measure.

mod common;

use common::{assert_written, smoke};
use peerbus_bench::Scenario;

/// The number that follows `prefix` in `line`.
fn number_after(line: &str, prefix: &str) -> f64 {
    let rest = line
        .split_once(prefix)
        .unwrap_or_else(|| panic!("'{prefix}' not in '{line}'"))
        .1;
    let num: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    num.parse()
        .unwrap_or_else(|e| panic!("no number after '{prefix}' in '{line}': {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_scenario_writes_its_tables_plots_and_summary() {
    let dir = tempfile::tempdir().unwrap();
    let lines = peerbus_bench::run(Scenario::Files, &smoke(dir.path()))
        .await
        .unwrap();
    assert_written(
        dir.path(),
        &["files.csv", "files-latency.png", "files-throughput.png"],
    );
    let csv = std::fs::read_to_string(dir.path().join("files.csv")).unwrap();
    assert!(csv.starts_with("peers,op,ops,ops_per_s,mean_ms,p50_ms,p99_ms\n"));
    assert_eq!(csv.lines().count(), 1 + 2 * 3, "{csv}");
    for op in ["register", "search", "lookup"] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("files {op} with 2 concurrent peers: "))),
            "{lines:?}"
        );
    }
    let last = lines.last().unwrap();
    assert!(
        last.starts_with("files search over 100 sequential requests: average "),
        "{last}"
    );
    for p in ["average ", "p50 ", "p99 "] {
        assert!(number_after(last, p) >= 0.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_scenario_writes_its_tables_plots_and_ratio() {
    let dir = tempfile::tempdir().unwrap();
    let lines = peerbus_bench::run(Scenario::Download, &smoke(dir.path()))
        .await
        .unwrap();
    assert_written(
        dir.path(),
        &[
            "download-curves.csv",
            "download-scaling.csv",
            "download-large.csv",
            "download-task1.png",
            "download-task2-best.png",
            "download-task2-worst.png",
            "download-scaling.png",
            "download-large.png",
        ],
    );
    let curves = std::fs::read_to_string(dir.path().join("download-curves.csv")).unwrap();
    // 3 peers, 10 files each: 2 centralized downloaders and 3 peer-to-peer ones, twice.
    assert_eq!(curves.lines().count(), 1 + 10 * (2 + 3 + 3), "{curves}");
    for mode in ["centralized", "p2p-best", "p2p-worst"] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("download {mode} (3 peers, "))),
            "{lines:?}"
        );
    }
    assert!(lines.iter().any(|l| l.starts_with("download scaling: ")));
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("download 4 MiB from 1 source: ")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("download 4 MiB from 3 sources: ")),
        "{lines:?}"
    );
    let ceiling = lines
        .iter()
        .find(|l| l.starts_with("verified download ceiling on "))
        .unwrap_or_else(|| panic!("no ceiling line in {lines:?}"));
    assert!(number_after(ceiling, "cores: ") > 0.0, "{ceiling}");
    let large = std::fs::read_to_string(dir.path().join("download-large.csv")).unwrap();
    for row in ["BLAKE3 it (one core)", "ceiling: all of the above"] {
        assert!(large.contains(row), "{large}");
    }
    let last = lines.last().unwrap();
    assert!(
        last.starts_with("download/loopback bandwidth ratio: "),
        "{last}"
    );
    assert!(number_after(last, "ratio: ") > 0.0, "{last}");
}
