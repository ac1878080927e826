//! The gateway's shared token (`--auth-token`), in front of an index and a peer that
//! require the same token.
//!
//! Proves that every endpoint family — the classic endpoints, `/api/v1/*` (including the
//! Server-Sent Event stream and file content), `/api/openapi.json`, `/metrics` and the
//! dashboard page — answers 401 with `{"error": "..."}` saying what is wrong when the token
//! is missing, and when it is wrong (as a bearer header or as `?token=`), without doing
//! anything; that each works with `Authorization: Bearer TOKEN` and with `?token=TOKEN`; and
//! that a gateway configured with the wrong token (or none) for its cluster answers at
//! once with an error naming the refusal, not a hang or a bare 500.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{Gateway, eventually};
use peerbus_index::{Index, IndexConfig};
use peerbus_peer::{Peer, PeerConfig};
use reqwest::{Client, Method, StatusCode, header};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "gateway-s3cret";
const FILE: &[u8] = b"shared file content, served only with the token\n";

/// An index and one sharing peer, both requiring [`TOKEN`].
struct TokenCluster {
    _dir: tempfile::TempDir,
    stop: CancellationToken,
    index: Option<Index>,
    peer: Option<Peer>,
    share: PathBuf,
}

impl TokenCluster {
    async fn start() -> TokenCluster {
        let dir = tempfile::tempdir().expect("temporary directory");
        let stop = CancellationToken::new();
        let mut ic = IndexConfig::new("127.0.0.1:0");
        ic.data = Some(dir.path().join("index"));
        ic.token = Some(TOKEN.into());
        let index = Index::start(ic, stop.clone()).await.expect("index");
        let share = dir.path().join("share");
        std::fs::create_dir_all(&share).expect("share directory");
        let mut pc = PeerConfig::new("127.0.0.1:0", index.addr().to_string());
        pc.data = Some(dir.path().join("peer1"));
        pc.name = Some("peer1".into());
        pc.token = Some(TOKEN.into());
        pc.share = Some(share.clone());
        pc.rescan = Duration::from_millis(200);
        let peer = Peer::start(pc, stop.clone()).await.expect("peer");
        assert!(
            peer.registered(common::DEADLINE).await,
            "the peer registers with the token"
        );
        TokenCluster {
            _dir: dir,
            stop,
            index: Some(index),
            peer: Some(peer),
            share,
        }
    }

    fn index_addr(&self) -> String {
        self.index.as_ref().expect("running").addr().to_string()
    }

    async fn stop(mut self) {
        self.stop.cancel();
        if let Some(p) = self.peer.take() {
            p.wait().await;
        }
        if let Some(i) = self.index.take() {
            i.wait().await;
        }
    }
}

impl Drop for TokenCluster {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One HTTP request of the gateway's surface.
#[derive(Debug, Clone)]
struct Call {
    method: Method,
    path: String,
    body: Option<Value>,
}

fn call(method: Method, path: impl Into<String>, body: Option<Value>) -> Call {
    Call {
        method,
        path: path.into(),
        body,
    }
}

/// Every route the gateway serves, in an order in which each succeeds (names are made
/// unique by `tag`, so the list can run once per way of presenting the token). Topic `t`,
/// holding message "hello", and the shared file `hash` exist beforehand.
fn surface(tag: &str, hash: &str) -> Vec<Call> {
    let who = format!("p-{tag}");
    let classic = format!("classic-{tag}");
    let v1 = format!("v1-{tag}");
    let sub = format!("s-{tag}");
    vec![
        // The classic endpoints.
        call(
            Method::POST,
            "/register_peer_node",
            Some(json!({"peer_id": who})),
        ),
        call(
            Method::POST,
            "/create_topic",
            Some(json!({"topic": classic})),
        ),
        call(
            Method::POST,
            "/publish",
            Some(json!({"peer_id": who, "topic": "t", "message": "classic"})),
        ),
        call(
            Method::POST,
            "/subscribe",
            Some(json!({"peer_id": who, "topic": "t"})),
        ),
        call(
            Method::POST,
            "/pull_messages",
            Some(json!({"peer_id": who, "topic": "t"})),
        ),
        call(Method::GET, "/query_peers?topic=t", None),
        call(
            Method::DELETE,
            "/delete_topic",
            Some(json!({"topic": classic})),
        ),
        call(
            Method::POST,
            "/unregister_peer_node",
            Some(json!({"peer_id": who})),
        ),
        // /api/v1.
        call(Method::GET, "/api/v1/node", None),
        call(Method::GET, "/api/v1/peers", None),
        call(Method::GET, "/api/v1/topics", None),
        call(Method::GET, "/api/v1/topics?prefix=t", None),
        call(Method::POST, "/api/v1/topics", Some(json!({"topic": v1}))),
        call(Method::GET, format!("/api/v1/topics/{v1}"), None),
        call(
            Method::POST,
            format!("/api/v1/topics/{v1}/messages"),
            Some(json!({"messages": ["a", "b"]})),
        ),
        call(
            Method::POST,
            format!("/api/v1/topics/{v1}/subscriptions"),
            Some(json!({"subscriber": sub, "from": "earliest"})),
        ),
        call(
            Method::GET,
            format!("/api/v1/topics/{v1}/subscribers"),
            None,
        ),
        call(
            Method::POST,
            format!("/api/v1/topics/{v1}/pull"),
            Some(json!({"subscriber": sub})),
        ),
        call(
            Method::DELETE,
            format!("/api/v1/topics/{v1}/subscriptions/{sub}"),
            None,
        ),
        call(Method::DELETE, format!("/api/v1/topics/{v1}"), None),
        call(
            Method::GET,
            "/api/v1/topics/t/stream?subscriber=watcher&from=earliest",
            None,
        ),
        call(Method::GET, "/api/v1/files?search=shared", None),
        call(Method::GET, format!("/api/v1/files/{hash}"), None),
        call(Method::GET, format!("/api/v1/files/{hash}/content"), None),
        // The document, metrics and the dashboard page.
        call(Method::GET, "/api/openapi.json", None),
        call(Method::GET, "/metrics", None),
        call(Method::GET, "/", None),
    ]
}

/// How a request presents (or fails to present) the token.
#[derive(Debug, Clone, Copy)]
enum Cred<'a> {
    None,
    Bearer(&'a str),
    Query(&'a str),
    /// An `Authorization` header of another scheme, which carries no bearer token.
    OtherScheme,
}

fn with_query(path: &str, token: &str) -> String {
    let sep = if path.contains('?') { '&' } else { '?' };
    format!("{path}{sep}token={token}")
}

async fn send(http: &Client, gw: &Gateway, c: &Call, cred: Cred<'_>) -> reqwest::Response {
    let path = match cred {
        Cred::Query(t) => with_query(&c.path, t),
        _ => c.path.clone(),
    };
    let mut req = http.request(c.method.clone(), gw.url(&path));
    match cred {
        Cred::Bearer(t) => req = req.bearer_auth(t),
        Cred::OtherScheme => req = req.header(header::AUTHORIZATION, "Basic dXNlcjpwYXNz"),
        Cred::None | Cred::Query(_) => {}
    }
    if let Some(b) = &c.body {
        req = req.json(b);
    }
    req.send()
        .await
        .unwrap_or_else(|e| panic!("{} {path}: {e}", c.method))
}

/// Asserts a 401 whose JSON error contains `says`.
async fn assert_refused(resp: reqwest::Response, what: &str, says: &str) {
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{what}");
    let ct = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        ct.starts_with("application/json"),
        "{what}: content type {ct}"
    );
    let body: Value = resp.json().await.unwrap_or_else(|e| panic!("{what}: {e}"));
    let error = body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no error string in {body}"));
    assert!(
        error.contains(says),
        "{what}: {error:?} should say {says:?}"
    );
}

/// Checks a successful answer beyond its status, where the route's answer is easy to know.
async fn assert_served(resp: reqwest::Response, c: &Call, what: &str) {
    let status = resp.status();
    let ct = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if c.path.contains("/stream") {
        // An endless event stream: the headers are the answer; the body is not awaited.
        assert_eq!(status, StatusCode::OK, "{what}");
        assert!(ct.starts_with("text/event-stream"), "{what}: {ct}");
        return;
    }
    let bytes = resp.bytes().await.unwrap_or_else(|e| panic!("{what}: {e}"));
    let text = String::from_utf8_lossy(&bytes);
    assert!(status.is_success(), "{what}: {status} {text}");
    match c.path.as_str() {
        "/" => assert!(ct.starts_with("text/html"), "{what}: {ct}"),
        "/metrics" => assert!(text.contains("peerbus_http_requests_total"), "{what}"),
        "/api/openapi.json" => assert!(text.contains("\"paths\""), "{what}"),
        "/pull_messages" => assert!(text.contains("hello"), "{what}: {text}"),
        p if p.ends_with("/content") => assert_eq!(bytes.as_ref(), FILE, "{what}"),
        _ => {}
    }
}

async fn message_count(http: &Client, gw: &Gateway, topic: &str) -> u64 {
    let resp = http
        .get(gw.url(&format!("/api/v1/topics/{topic}")))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("topic");
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.expect("JSON");
    v["next_offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("no next_offset in {v}"))
}

async fn topic_names(http: &Client, gw: &Gateway) -> Vec<String> {
    let resp = http
        .get(gw.url("/api/v1/topics"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("topics");
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.expect("JSON");
    let mut names: Vec<String> = v
        .as_array()
        .expect("a list")
        .iter()
        .map(|t| t["topic"].as_str().expect("topic").to_string())
        .collect();
    names.sort();
    names
}

/// A client that gives up instead of hanging when an answer never comes.
fn http_client() -> Client {
    Client::builder()
        .timeout(common::DEADLINE)
        .build()
        .expect("HTTP client")
}

/// Starts the token cluster, a gateway with the same token, and puts topic `t` (holding
/// "hello") and a shared file in place; returns the file's hash.
async fn prepared() -> (TokenCluster, Gateway, String) {
    let cluster = TokenCluster::start().await;
    let gw = Gateway::start(cluster.index_addr(), "index", Some(TOKEN)).await;
    let http = http_client();
    let resp = http
        .post(gw.url("/api/v1/topics"))
        .bearer_auth(TOKEN)
        .json(&json!({"topic": "t"}))
        .send()
        .await
        .expect("create t");
    assert_eq!(resp.status(), StatusCode::CREATED);
    let resp = http
        .post(gw.url("/api/v1/topics/t/messages"))
        .bearer_auth(TOKEN)
        .json(&json!({"message": "hello"}))
        .send()
        .await
        .expect("publish");
    assert_eq!(resp.status(), StatusCode::OK);

    let staging = cluster.share.with_extension("staging");
    std::fs::write(&staging, FILE).expect("write file");
    std::fs::rename(&staging, cluster.share.join("shared.txt")).expect("move file");
    let hash = eventually("the shared file in the index", || {
        let (http, url) = (http.clone(), gw.url("/api/v1/files?search=shared"));
        async move {
            let v: Value = http
                .get(url)
                .bearer_auth(TOKEN)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            v.as_array()?.first()?["hash"].as_str().map(str::to_string)
        }
    })
    .await;
    (cluster, gw, hash)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_endpoint_refuses_a_missing_or_wrong_token() {
    let (cluster, gw, hash) = prepared().await;
    let http = http_client();
    let missing = "requires a token";
    for c in surface("refused", &hash) {
        let what = format!("{} {}", c.method, c.path);
        for (cred, says) in [
            (Cred::None, missing),
            (Cred::OtherScheme, missing),
            (Cred::Bearer("wrong"), "wrong token"),
            (Cred::Query("wrong"), "wrong token"),
            // Same length as the real one, differing only in the last byte.
            (Cred::Bearer("gateway-s3creT"), "wrong token"),
            // An empty bearer token is no token.
            (Cred::Bearer(""), missing),
        ] {
            let resp = send(&http, &gw, &c, cred).await;
            assert_refused(resp, &format!("{what} with {cred:?}"), says).await;
        }
    }
    // The message of a missing token tells how to send one.
    let resp = send(
        &http,
        &gw,
        &call(Method::GET, "/api/v1/peers", None),
        Cred::None,
    )
    .await;
    assert_refused(resp, "missing", "Authorization: Bearer").await;
    // Unknown routes are no way around it either.
    let resp = send(
        &http,
        &gw,
        &call(Method::GET, "/no/such/thing", None),
        Cred::None,
    )
    .await;
    assert_refused(resp, "an unknown route", missing).await;

    // Nothing refused had any effect.
    assert_eq!(message_count(&http, &gw, "t").await, 1);
    assert_eq!(topic_names(&http, &gw).await, ["t"]);
    let resp = http
        .get(gw.url("/api/v1/topics/t/subscribers"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("subscribers");
    assert_eq!(resp.json::<Value>().await.expect("JSON"), json!([]));

    drop(gw);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_endpoint_serves_a_bearer_or_query_token() {
    let (cluster, gw, hash) = prepared().await;
    let http = http_client();
    for (tag, cred) in [
        ("bearer", Cred::Bearer(TOKEN)),
        ("query", Cred::Query(TOKEN)),
    ] {
        for c in surface(tag, &hash) {
            let what = format!("{} {} with {cred:?}", c.method, c.path);
            let resp = send(&http, &gw, &c, cred).await;
            assert_served(resp, &c, &what).await;
        }
    }
    // Each round published one classic message to `t` and left its topics deleted.
    assert_eq!(message_count(&http, &gw, "t").await, 3);
    assert_eq!(topic_names(&http, &gw).await, ["t"]);

    drop(gw);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_with_the_wrong_cluster_token_says_it_was_refused() {
    let (cluster, good, hash) = prepared().await;
    let http = http_client();

    for (gw_token, says) in [
        (Some("not-the-cluster-token"), "wrong token"),
        (None, "requires a token"),
    ] {
        let gw = Gateway::start(cluster.index_addr(), "index", gw_token).await;
        let cred = gw_token.map_or(Cred::None, Cred::Bearer);
        // Every route that needs the cluster answers at once, naming the refusal: the
        // node's address, that it refused the connection, and why.
        for c in surface("misconfigured", &hash) {
            let what = format!(
                "{} {} via a gateway with token {gw_token:?}",
                c.method, c.path
            );
            let needs_cluster = !matches!(
                c.path.as_str(),
                "/" | "/metrics" | "/api/openapi.json" | "/api/v1/node"
            );
            let resp = send(&http, &gw, &c, cred).await;
            if needs_cluster {
                let status = resp.status();
                let body: Value = resp.json().await.unwrap_or_else(|e| panic!("{what}: {e}"));
                let error = body["error"].as_str().unwrap_or_default();
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
                assert!(
                    error.contains(&cluster.index_addr())
                        && error.contains("refused the connection")
                        && error.contains(says),
                    "{what}: {error:?}"
                );
            } else {
                // Pages that need nothing from the cluster still work; /metrics keeps
                // serving the gateway's own counters.
                assert_served(resp, &c, &what).await;
            }
        }
    }

    // The well-configured gateway saw none of it.
    assert_eq!(message_count(&http, &good, "t").await, 1);
    assert_eq!(topic_names(&http, &good).await, ["t"]);
    drop(good);
    cluster.stop().await;
}
