//! The peerbus HTTP/JSON gateway, served by every node (the index and each peer).
//!
//! It is built only on [`peerbus_client`]: every answer comes from the index or the
//! hosting peer through the client library, so each node's gateway answers the same.
//! It serves:
//!
//! - the classic endpoints (`/register_peer_node`, `/create_topic`, `/publish`,
//!   `/subscribe`, `/pull_messages`, `/query_peers`, …), where `peer_id` names a
//!   participant registered at the index;
//! - the JSON API under `/api/v1` (peers, topics, messages, subscriptions, Server-Sent
//!   Event streams, file search and file content with `Range` support);
//! - `/api/openapi.json`, the OpenAPI document generated from the handlers;
//! - `/metrics` in Prometheus text format, and the dashboard at `/`.
//!
//! Every error is `{"error": "what and why"}` with a status matching its class.

#![warn(missing_docs)]

mod api;
mod classic;
mod content;
mod error;
mod guard;
mod openapi;
mod telemetry;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use peerbus_client::Client;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::telemetry::Metrics;

/// Largest request body accepted: a batch of several messages at the protocol's payload
/// limit, JSON-escaped.
const MAX_BODY: usize = 4 * peerbus_proto::DEFAULT_MAX_PAYLOAD;

/// How a gateway runs.
#[derive(Clone)]
pub struct HttpConfig {
    /// The index's address (`host:port`); every request goes through a client of it.
    pub index: String,
    /// This node's name, shown on the dashboard.
    pub node: String,
    /// Shared secret (`--auth-token`). When set, every request must carry it as
    /// `Authorization: Bearer TOKEN` or `?token=TOKEN` (else 401), and the gateway presents
    /// it to the nodes it talks to.
    pub token: Option<String>,
}

impl std::fmt::Debug for HttpConfig {
    // The token is a secret: configs end up in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("index", &self.index)
            .field("node", &self.node)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// Serves the gateway on `listener` until `shutdown` is cancelled; open event streams end
/// then too, so shutdown does not wait for their clients.
pub async fn serve(
    listener: TcpListener,
    config: HttpConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = build(config, shutdown.clone());
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// The gateway's routes, for serving on a listener of one's own (tests). Event streams of
/// this router end only when their clients leave.
pub fn router(config: HttpConfig) -> Router {
    build(config, CancellationToken::new())
}

/// A rate estimate of one topic: the sample it is based on and the rate it gave.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RateSample {
    at: Instant,
    next_offset: u64,
    rate: f64,
}

/// Samples at least this far apart give a rate; closer ones (two dashboards refreshing at
/// once) would turn a burst into a huge or zero rate, so they reuse the last estimate.
const RATE_WINDOW_SECS: f64 = 1.0;

pub(crate) struct Inner {
    pub client: Client,
    pub node: String,
    token: Option<String>,
    pub metrics: Metrics,
    rates: Mutex<HashMap<String, RateSample>>,
    /// Ends event streams when the server stops.
    pub shutdown: CancellationToken,
}

/// Shared by every handler.
#[derive(Clone)]
pub(crate) struct AppState(Arc<Inner>);

impl std::ops::Deref for AppState {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl Inner {
    /// Messages per second of `topic`, estimated from the previous sample of its next
    /// offset this gateway saw; 0 on first sight.
    pub fn rate(&self, topic: &str, next_offset: u64) -> f64 {
        let now = Instant::now();
        let mut rates = self.rates.lock().unwrap_or_else(PoisonError::into_inner);
        match rates.get_mut(topic) {
            Some(s) => {
                let secs = now.duration_since(s.at).as_secs_f64();
                if next_offset < s.next_offset {
                    // The topic was deleted and created again: start over.
                    *s = RateSample {
                        at: now,
                        next_offset,
                        rate: 0.0,
                    };
                } else if secs >= RATE_WINDOW_SECS {
                    s.rate = (next_offset - s.next_offset) as f64 / secs;
                    s.at = now;
                    s.next_offset = next_offset;
                }
                s.rate
            }
            None => {
                rates.insert(
                    topic.to_string(),
                    RateSample {
                        at: now,
                        next_offset,
                        rate: 0.0,
                    },
                );
                0.0
            }
        }
    }

    /// Forgets rate samples of topics not in `live`, so deleted topics do not pile up.
    pub fn keep_rates(&self, live: &std::collections::HashSet<&str>) {
        self.rates
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|t, _| live.contains(t.as_str()));
    }
}

fn build(config: HttpConfig, shutdown: CancellationToken) -> Router {
    let state = AppState(Arc::new(Inner {
        client: Client::with_token(config.index, config.token.clone()),
        node: config.node,
        token: config.token,
        metrics: Metrics::new(),
        rates: Mutex::new(HashMap::new()),
        shutdown,
    }));
    Router::new()
        .route("/", get(dashboard))
        .route("/register_peer_node", post(classic::register_peer_node))
        .route("/unregister_peer_node", post(classic::unregister_peer_node))
        .route("/create_topic", post(classic::create_topic))
        .route("/delete_topic", delete(classic::delete_topic))
        .route("/publish", post(classic::publish))
        .route("/subscribe", post(classic::subscribe))
        .route("/pull_messages", post(classic::pull_messages))
        .route("/query_peers", get(classic::query_peers))
        .route("/api/v1/node", get(api::node))
        .route("/api/v1/peers", get(api::peers))
        .route(
            "/api/v1/topics",
            get(api::list_topics).post(api::create_topic),
        )
        .route(
            "/api/v1/topics/{topic}",
            get(api::get_topic).delete(api::delete_topic),
        )
        .route("/api/v1/topics/{topic}/messages", post(api::publish))
        .route("/api/v1/topics/{topic}/subscriptions", post(api::subscribe))
        .route(
            "/api/v1/topics/{topic}/subscriptions/{subscriber}",
            delete(api::unsubscribe),
        )
        .route("/api/v1/topics/{topic}/subscribers", get(api::subscribers))
        .route("/api/v1/topics/{topic}/pull", post(api::pull))
        .route("/api/v1/topics/{topic}/ack", post(api::ack))
        .route("/api/v1/topics/{topic}/stream", get(api::stream))
        .route("/api/v1/files", get(api::files))
        .route("/api/v1/files/{key}", get(api::file))
        .route("/api/v1/files/{key}/content", get(content::download))
        .route("/api/openapi.json", get(openapi::document))
        .route("/metrics", get(metrics))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            guard::same_origin,
        ))
        // Added last so it runs first: refused requests are counted too.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            telemetry::track,
        ))
        .with_state(state)
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// Compares without stopping at the first difference, so answer times do not tell how
/// much of a guessed token was right.
fn same_secret(a: &str, b: &str) -> bool {
    peerbus_proto::same_secret(a.as_bytes(), b.as_bytes())
}

/// Middleware refusing requests without the configured token.
async fn authorize(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let Some(want) = &st.token else {
        return next.run(req).await;
    };
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let query = Query::<TokenQuery>::try_from_uri(req.uri())
        .ok()
        .and_then(|Query(q)| q.token);
    let given = bearer.or(query.as_deref());
    match given {
        Some(t) if same_secret(t, want) => next.run(req).await,
        Some(_) => ApiError::new(StatusCode::UNAUTHORIZED, "wrong token").into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this node requires a token: send `Authorization: Bearer TOKEN` or `?token=TOKEN`",
        )
        .into_response(),
    }
}

async fn no_route(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {} {}", req.method(), req.uri().path()),
    )
}

async fn wrong_method(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} is not served at {}", req.method(), req.uri().path()),
    )
}

/// The dashboard page.
#[utoipa::path(get, path = "/", tag = "dashboard",
    responses((status = 200, description = "The dashboard", content_type = "text/html")))]
pub(crate) async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

/// Prometheus metrics; cluster gauges are refreshed from the index and hosts first.
#[utoipa::path(get, path = "/metrics", tag = "metrics",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain")))]
pub(crate) async fn metrics(State(st): State<AppState>) -> Response {
    match api::cluster_counts(&st).await {
        Ok((peers, topics, subscribers, files)) => {
            st.metrics.cluster(peers, topics, subscribers, files)
        }
        // Still answer: the gateway's own counters are worth scraping while the index is
        // away, and the gauges keep their last values.
        Err(e) => tracing::warn!("cannot refresh cluster gauges for /metrics: {e}"),
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics.render(),
    )
        .into_response()
}

/// `{"node": NAME, "index": ADDR}`: which node serves this gateway.
pub(crate) fn node_info(st: &AppState) -> Json<api::NodeView> {
    Json(api::NodeView {
        node: st.node.clone(),
        index: st.client.index_addr().to_string(),
    })
}
