//! The scenarios, one module each.

mod api;
mod compare;
mod download;
mod files;
mod pingpong;
mod query;
mod throughput;
mod topics;

use crate::Options;

/// A benchmark scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Latency and throughput of each topic API with 1..8 concurrent clients.
    Api,
    /// Topic lookup with 1,000,000 topics loaded, 2/4/8 concurrent clients.
    Query,
    /// Registering 1,000,000 topics, then lookup latency.
    Topics,
    /// Publish→deliver rate vs payload size and number of clients.
    Throughput,
    /// Request/response between two clients over two topics; then N pairs.
    Pingpong,
    /// File register, search and lookup with 1..8 concurrent peers.
    Files,
    /// Peer-to-peer downloads among 6..32 peers vs one central source.
    Download,
    /// `throughput` and request/response against nats-server and peerbus in one run.
    Compare,
}

impl Scenario {
    /// Every scenario, in the order `all` would run them.
    pub const ALL: [Scenario; 8] = [
        Scenario::Api,
        Scenario::Query,
        Scenario::Topics,
        Scenario::Throughput,
        Scenario::Pingpong,
        Scenario::Files,
        Scenario::Download,
        Scenario::Compare,
    ];

    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Api => "api",
            Scenario::Query => "query",
            Scenario::Topics => "topics",
            Scenario::Throughput => "throughput",
            Scenario::Pingpong => "pingpong",
            Scenario::Files => "files",
            Scenario::Download => "download",
            Scenario::Compare => "compare",
        }
    }
}

impl std::str::FromStr for Scenario {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Scenario::ALL
            .into_iter()
            .find(|sc| sc.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Scenario::ALL.iter().map(|s| s.name()).collect();
                format!(
                    "unknown scenario '{s}': expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// Runs one scenario; returns its summary lines.
pub(crate) async fn run(scenario: Scenario, options: &Options) -> anyhow::Result<Vec<String>> {
    match scenario {
        Scenario::Api => api::run(options).await,
        Scenario::Query => query::run(options).await,
        Scenario::Topics => topics::run(options).await,
        Scenario::Throughput => throughput::run(options).await,
        Scenario::Pingpong => pingpong::run(options).await,
        Scenario::Files => files::run(options).await,
        Scenario::Download => download::run(options).await,
        Scenario::Compare => compare::run(options).await,
    }
}
