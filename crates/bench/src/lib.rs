//! peerbus benchmark scenarios (`peerbus bench SCENARIO`).
//!
//! Each scenario drives a cluster (started in-process on port 0, or an existing one given by
//! `--index`), measures with [`stats::Latencies`] (hdrhistogram) and counts, writes every
//! table as CSV and every plot as PNG into the output directory, and prints its summary line
//! last. Scripts read those summary lines, so their wording is a contract.

pub mod report;
pub mod scenarios;
pub mod stats;
pub mod target;

use std::path::PathBuf;

pub use scenarios::Scenario;

/// How a scenario runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// A smaller workload that finishes in under a minute.
    pub quick: bool,
    /// The smallest workload that still exercises every step and writes every file: for
    /// tests, which check that a scenario works, never how fast.
    pub smoke: bool,
    /// Run against the existing cluster whose index is here instead of starting one.
    pub index: Option<String>,
    /// Token for a cluster started with `--auth-token`.
    pub token: Option<String>,
    /// Where CSV and PNG files go (created if missing).
    pub out: PathBuf,
    /// Show progress bars (off when stderr is not a terminal, or in tests).
    pub progress: bool,
}

impl Options {
    /// Defaults: full workload, in-process cluster, `./bench-results`, progress bars.
    pub fn new() -> Options {
        Options {
            quick: false,
            smoke: false,
            index: None,
            token: None,
            out: PathBuf::from("bench-results"),
            progress: true,
        }
    }

    /// The workload size for this run: `smoke` in tests, `quick` with `--quick`, else `full`.
    pub fn pick<T>(&self, smoke: T, quick: T, full: T) -> T {
        if self.smoke {
            smoke
        } else if self.quick {
            quick
        } else {
            full
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Options::new()
    }
}

/// Runs `scenario`, writing its files into `options.out`, and returns its summary lines (the
/// caller prints them last, in order).
pub async fn run(scenario: Scenario, options: &Options) -> anyhow::Result<Vec<String>> {
    std::fs::create_dir_all(&options.out).map_err(|e| {
        anyhow::anyhow!(
            "cannot create the output directory {}: {e}",
            options.out.display()
        )
    })?;
    scenarios::run(scenario, options).await
}
