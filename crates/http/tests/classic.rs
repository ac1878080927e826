//! The classic endpoints against a real cluster, and every error status.

mod common;

use common::Gateway;
use peerbus_testkit::Cluster;
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

async fn send(
    http: &Client,
    method: reqwest::Method,
    url: String,
    body: Value,
) -> (StatusCode, Value) {
    let resp = http
        .request(method, url)
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = resp.status();
    let body = resp.json::<Value>().await.expect("JSON answer");
    (status, body)
}

async fn post(http: &Client, url: String, body: Value) -> (StatusCode, Value) {
    send(http, reqwest::Method::POST, url, body).await
}

/// The order a curl user follows: register, create, publish before subscribing,
/// subscribe, pull everything, pull nothing, ask who hosts, delete.
async fn curl_order(gw: &Gateway, participant: &str, topic: &str, hosts: &[String]) {
    let http = Client::new();
    let (s, b) = post(
        &http,
        gw.url("/register_peer_node"),
        json!({"peer_id": participant}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["ok"], true);

    let (s, b) = post(&http, gw.url("/create_topic"), json!({"topic": topic})).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["topic"], topic);
    let host = b["peer"].as_str().expect("peer").to_string();
    assert!(hosts.contains(&host), "{host} is not a cluster peer");
    assert!(b["addr"].as_str().is_some_and(|a| a.contains(':')));

    for (i, m) in ["one", "two", "three"].iter().enumerate() {
        let (s, b) = post(
            &http,
            gw.url("/publish"),
            json!({"peer_id": participant, "topic": topic, "message": m}),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{b}");
        assert_eq!(b["offset"], i as u64);
    }

    let (s, b) = post(
        &http,
        gw.url("/subscribe"),
        json!({"peer_id": participant, "topic": topic}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["ok"], true);

    let pull = json!({"peer_id": participant, "topic": topic});
    let (s, b) = post(&http, gw.url("/pull_messages"), pull.clone()).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b, json!({"messages": ["one", "two", "three"]}));
    let (s, b) = post(&http, gw.url("/pull_messages"), pull.clone()).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b, json!({"messages": []}));

    let resp = http
        .get(gw.url("/query_peers"))
        .query(&[("topic", topic)])
        .send()
        .await
        .expect("query_peers");
    assert_eq!(resp.status(), StatusCode::OK);
    // The participants subscribed to the topic, not its host.
    assert_eq!(
        resp.json::<Value>().await.expect("JSON"),
        json!({"peers": [participant]})
    );

    let (s, b) = send(
        &http,
        reqwest::Method::DELETE,
        gw.url("/delete_topic"),
        json!({"topic": topic}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = post(&http, gw.url("/pull_messages"), pull).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    assert_eq!(b["error"], format!("topic '{topic}' not found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn classic_order_on_index_and_peer_gateways() -> anyhow::Result<()> {
    let cluster = Cluster::start(2).await?;
    let hosts = vec![cluster.peer_name(0), cluster.peer_name(1)];
    let on_index = Gateway::start(cluster.index_addr(), "index", None).await;
    let on_peer = Gateway::start(cluster.index_addr(), &cluster.peer_name(0), None).await;
    curl_order(&on_index, "alice", "news", &hosts).await;
    curl_order(&on_peer, "bob", "sports", &hosts).await;

    // Participants live at the index: another node's gateway sees them.
    let http = Client::new();
    let (s, b) = post(
        &http,
        on_peer.url("/register_peer_node"),
        json!({"peer_id": "alice"}),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    let (s, b) = post(
        &http,
        on_peer.url("/unregister_peer_node"),
        json!({"peer_id": "alice"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = post(
        &http,
        on_index.url("/unregister_peer_node"),
        json!({"peer_id": "alice"}),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_error_status() -> anyhow::Result<()> {
    let cluster = Cluster::start(1).await?;
    let gw = Gateway::start(cluster.index_addr(), "index", None).await;
    let http = Client::new();

    // Malformed JSON.
    let resp = http
        .post(gw.url("/create_topic"))
        .body("{\"topic\": ")
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let b: Value = resp.json().await?;
    assert!(
        b["error"]
            .as_str()
            .is_some_and(|e| e.contains("invalid JSON")),
        "{b}"
    );

    // A missing field is named.
    let (s, b) = post(
        &http,
        gw.url("/publish"),
        json!({"peer_id": "p", "topic": "t"}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert!(
        b["error"].as_str().is_some_and(|e| e.contains("message")),
        "{b}"
    );
    let resp = http.get(gw.url("/query_peers")).send().await?;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(resp.json::<Value>().await?["error"].is_string());

    // Registrations.
    let (s, _) = post(
        &http,
        gw.url("/register_peer_node"),
        json!({"peer_id": "carol"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, b) = post(
        &http,
        gw.url("/register_peer_node"),
        json!({"peer_id": "carol"}),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    let (s, b) = post(
        &http,
        gw.url("/unregister_peer_node"),
        json!({"peer_id": "dave"}),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");

    // Unregistered participants.
    for path in ["/publish", "/subscribe", "/pull_messages"] {
        let (s, b) = post(
            &http,
            gw.url(path),
            json!({"peer_id": "mallory", "topic": "news", "message": "x"}),
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}: {b}");
        assert_eq!(b, json!({"error": "peer 'mallory' is not registered"}));
    }

    // Unknown topic.
    let (s, b) = post(
        &http,
        gw.url("/publish"),
        json!({"peer_id": "carol", "topic": "news", "message": "x"}),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    assert_eq!(b, json!({"error": "topic 'news' not found"}));
    let resp = http.get(gw.url("/query_peers?topic=news")).send().await?;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let (s, b) = send(
        &http,
        reqwest::Method::DELETE,
        gw.url("/delete_topic"),
        json!({"topic": "news"}),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");

    // Duplicate topic.
    let (s, _) = post(&http, gw.url("/create_topic"), json!({"topic": "news"})).await;
    assert_eq!(s, StatusCode::OK);
    let (s, b) = post(&http, gw.url("/create_topic"), json!({"topic": "news"})).await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    let e = b["error"].as_str().unwrap_or_default();
    assert!(
        e.contains("news") && e.contains(&cluster.peer_name(0)),
        "{b}"
    );

    // Invalid name.
    let (s, b) = post(
        &http,
        gw.url("/create_topic"),
        json!({"topic": "bad topic"}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");

    // No such endpoint, wrong method: still JSON errors.
    let resp = http.get(gw.url("/nope")).send().await?;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert!(resp.json::<Value>().await?["error"].is_string());
    let resp = http.get(gw.url("/publish")).send().await?;
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert!(resp.json::<Value>().await?["error"].is_string());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_is_required() -> anyhow::Result<()> {
    // No cluster needed: the token is checked before anything is asked of the index.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let app = peerbus_http::router(peerbus_http::HttpConfig {
        index: "127.0.0.1:1".into(),
        node: "n1".into(),
        token: Some("s3cret".into()),
    });
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let http = Client::new();

    let resp = http.get(format!("{base}/api/v1/node")).send().await?;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(resp.json::<Value>().await?["error"].is_string());
    let resp = http
        .get(format!("{base}/api/v1/node"))
        .bearer_auth("wrong")
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = http
        .post(format!("{base}/register_peer_node?token=nope"))
        .json(&json!({"peer_id": "p"}))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = http.get(format!("{base}/")).send().await?;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    let resp = http
        .get(format!("{base}/api/v1/node"))
        .bearer_auth("s3cret")
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.json::<Value>().await?["node"], "n1");
    let resp = http.get(format!("{base}/?token=s3cret")).send().await?;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()[reqwest::header::CONTENT_TYPE]
            .to_str()?
            .starts_with("text/html")
    );
    server.abort();
    Ok(())
}
