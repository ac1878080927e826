//! Prometheus metrics of one gateway.
//!
//! Each gateway keeps its own recorder instead of installing a global one: `peerbus up`
//! runs several nodes in one process and tests start many routers, and a process has only
//! one global recorder. Recording goes through `metrics::with_local_recorder`, so the
//! `metrics` macros still work and each node's `/metrics` shows only its own traffic.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::AppState;

pub(crate) const REQUESTS: &str = "peerbus_http_requests_total";
pub(crate) const LATENCY: &str = "peerbus_http_request_duration_seconds";
pub(crate) const PUBLISHED: &str = "peerbus_http_messages_published_total";
pub(crate) const PUBLISHED_BYTES: &str = "peerbus_http_published_bytes_total";
pub(crate) const PULLED: &str = "peerbus_http_messages_pulled_total";
pub(crate) const PULLED_BYTES: &str = "peerbus_http_pulled_bytes_total";
pub(crate) const PEERS: &str = "peerbus_live_peers";
pub(crate) const TOPICS: &str = "peerbus_topics";
pub(crate) const SUBSCRIBERS: &str = "peerbus_subscribers";
pub(crate) const FILES: &str = "peerbus_files";

/// Latency buckets in seconds: from a cached answer on loopback to a slow forwarded pull.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// One gateway's recorder and the handle that renders it.
pub(crate) struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl Metrics {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(LATENCY.to_string()), BUCKETS)
            // Only fails for an empty bucket list, and `BUCKETS` is a non-empty constant.
            .expect("latency buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        let m = Metrics { recorder, handle };
        m.record(|| {
            describe_counter!(
                REQUESTS,
                "HTTP requests answered, by route, method and status"
            );
            describe_histogram!(LATENCY, Unit::Seconds, "Time to answer HTTP requests");
            describe_counter!(PUBLISHED, "Messages published through this gateway");
            describe_counter!(
                PUBLISHED_BYTES,
                Unit::Bytes,
                "Payload bytes published through this gateway"
            );
            describe_counter!(PULLED, "Messages pulled or streamed through this gateway");
            describe_counter!(
                PULLED_BYTES,
                Unit::Bytes,
                "Payload bytes pulled or streamed through this gateway"
            );
            describe_gauge!(PEERS, "Peers holding a live lease, as of the last scrape");
            describe_gauge!(
                TOPICS,
                "Topics offered by live peers, as of the last scrape"
            );
            describe_gauge!(
                SUBSCRIBERS,
                "Subscriptions summed over all topics, as of the last scrape"
            );
            describe_gauge!(FILES, "Distinct shared files, as of the last scrape");
        });
        m
    }

    /// Runs `f` with this gateway's recorder as the current one.
    pub fn record<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&self.recorder, f)
    }

    /// Counts messages published through the gateway.
    pub fn published(&self, messages: usize, bytes: usize) {
        self.record(|| {
            counter!(PUBLISHED).increment(messages as u64);
            counter!(PUBLISHED_BYTES).increment(bytes as u64);
        });
    }

    /// Counts messages pulled or streamed through the gateway.
    pub fn pulled(&self, messages: usize, bytes: usize) {
        self.record(|| {
            counter!(PULLED).increment(messages as u64);
            counter!(PULLED_BYTES).increment(bytes as u64);
        });
    }

    /// Sets the cluster gauges.
    pub fn cluster(&self, peers: usize, topics: usize, subscribers: u64, files: usize) {
        self.record(|| {
            gauge!(PEERS).set(peers as f64);
            gauge!(TOPICS).set(topics as f64);
            gauge!(SUBSCRIBERS).set(subscribers as f64);
            gauge!(FILES).set(files as f64);
        });
    }

    /// The Prometheus text exposition of everything recorded.
    pub fn render(&self) -> String {
        // Upkeep folds recent histogram samples in; on scrape is when it matters.
        self.handle.run_upkeep();
        self.handle.render()
    }
}

/// Middleware counting and timing every request by its route pattern (not the raw path,
/// which would make one series per topic).
pub(crate) async fn track(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    // hyper accepts any extension method: label only the standard ones, so random methods
    // cannot create unbounded series.
    let method = match req.method().as_str() {
        m @ ("GET" | "POST" | "PUT" | "DELETE" | "PATCH" | "HEAD" | "OPTIONS") => m,
        _ => "other",
    }
    .to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    let secs = start.elapsed().as_secs_f64();
    st.metrics.record(|| {
        counter!(REQUESTS, "route" => route.clone(), "method" => method.clone(), "status" => status.clone())
            .increment(1);
        histogram!(LATENCY, "route" => route, "method" => method, "status" => status).record(secs);
    });
    resp
}
