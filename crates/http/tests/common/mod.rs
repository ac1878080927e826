//! Shared test helpers: gateways on 127.0.0.1:0 in front of a test cluster, and polling.

#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use peerbus_http::HttpConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How long a test waits for something that should happen soon.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A gateway serving in the background; stopped when dropped.
pub struct Gateway {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    stop: CancellationToken,
}

impl Gateway {
    /// Starts `peerbus_http::serve` for `index`.
    pub async fn start(index: String, node: &str, token: Option<&str>) -> Gateway {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("local addr"));
        let stop = CancellationToken::new();
        let config = HttpConfig {
            index,
            node: node.to_string(),
            token: token.map(str::to_string),
        };
        tokio::spawn(peerbus_http::serve(listener, config, stop.clone()));
        Gateway { base, stop }
    }

    /// The full URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Polls `check` until it yields a value or the deadline passes.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
