//! The index scenarios run end to end at their smallest size and leave every file behind.
//! Only that they work is checked here, never how fast.

mod common;

use common::{assert_written, smoke};
use peerbus_bench::Scenario;

/// True for a decimal number such as `1.234`.
fn is_decimal(s: &str) -> bool {
    let mut parts = s.splitn(2, '.');
    let whole = parts.next().unwrap_or("");
    let frac = parts.next().unwrap_or("0");
    !whole.is_empty()
        && whole.bytes().all(|b| b.is_ascii_digit())
        && !frac.is_empty()
        && frac.bytes().all(|b| b.is_ascii_digit())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_registers_then_measures_lookups() {
    let dir = tempfile::tempdir().unwrap();
    let summary = peerbus_bench::run(Scenario::Topics, &smoke(dir.path()))
        .await
        .unwrap();
    let first = &summary[0];
    let secs = first
        .strip_prefix("registered 1000 topics in ")
        .and_then(|rest| rest.strip_suffix(" s"))
        .unwrap_or_else(|| panic!("unexpected summary line: {first}"));
    assert!(is_decimal(secs), "not a decimal number of seconds: {first}");
    assert!(
        summary
            .iter()
            .any(|l| l.starts_with("lookup at ") && l.contains("p99")),
        "{summary:?}"
    );
    assert!(
        summary.iter().any(|l| l.starts_with("memory: ")),
        "{summary:?}"
    );
    assert_written(
        dir.path(),
        &[
            "topics.csv",
            "topics.png",
            "topics_register.csv",
            "topics_register.png",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_measures_lookups_with_2_4_and_8_clients() {
    let dir = tempfile::tempdir().unwrap();
    let summary = peerbus_bench::run(Scenario::Query, &smoke(dir.path()))
        .await
        .unwrap();
    assert!(
        summary[0].starts_with("loaded 1000 topics in "),
        "{summary:?}"
    );
    for clients in [2, 4, 8] {
        let prefix = format!("lookup with {clients} clients");
        assert!(
            summary
                .iter()
                .any(|l| l.starts_with(&prefix) && l.contains("p99")),
            "{summary:?}"
        );
    }
    assert_written(dir.path(), &["query.csv", "query.png"]);
    let csv = std::fs::read_to_string(dir.path().join("query.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "{csv}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_measures_every_api_with_1_to_8_clients() {
    let dir = tempfile::tempdir().unwrap();
    let summary = peerbus_bench::run(Scenario::Api, &smoke(dir.path()))
        .await
        .unwrap();
    for api in ["create", "delete", "publish", "subscribe", "pull", "lookup"] {
        assert!(
            summary
                .iter()
                .any(|l| l.starts_with(&format!("{api}: 1 client ")) && l.contains("ops/s")),
            "{summary:?}"
        );
    }
    assert_written(dir.path(), &["api.csv", "api.png", "api_latency.png"]);
    let csv = std::fs::read_to_string(dir.path().join("api.csv")).unwrap();
    // A header and one row per API and client count.
    assert_eq!(csv.lines().count(), 1 + 6 * 4, "{csv}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_runs_against_an_existing_cluster_and_cleans_up() {
    let cluster = peerbus_testkit::Cluster::start(2).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut options = smoke(dir.path());
    options.index = Some(cluster.index_addr());
    let summary = peerbus_bench::run(Scenario::Topics, &options)
        .await
        .unwrap();
    assert!(summary[0].starts_with("registered 1000 topics in "));
    assert!(
        summary.iter().any(|l| l.contains("memory: unavailable")),
        "{summary:?}"
    );
    let left = cluster.client().list_topics(None).await.unwrap();
    assert!(left.is_empty(), "{} topics left behind", left.len());
}
