//! The /api/v1 routes, SSE, file content with ranges, the OpenAPI document and metrics,
//! against a real cluster.

mod common;

use common::{DEADLINE, Gateway, eventually};
use peerbus_testkit::{Cluster, ClusterOptions};
use reqwest::{Client, StatusCode, header};
use serde_json::{Value, json};

async fn get(http: &Client, url: String) -> (StatusCode, Value) {
    let resp = http.get(url).send().await.expect("GET");
    let status = resp.status();
    (status, resp.json().await.expect("JSON answer"))
}

async fn post(http: &Client, url: String, body: Value) -> (StatusCode, Value) {
    let resp = http.post(url).json(&body).send().await.expect("POST");
    let status = resp.status();
    (status, resp.json().await.expect("JSON answer"))
}

async fn delete(http: &Client, url: String) -> StatusCode {
    http.delete(url).send().await.expect("DELETE").status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn topics_messages_and_subscriptions() -> anyhow::Result<()> {
    let cluster = Cluster::start(2).await?;
    let gw = Gateway::start(cluster.index_addr(), "index", None).await;
    let http = Client::new();

    let (s, peers) = get(&http, gw.url("/api/v1/peers")).await;
    assert_eq!(s, StatusCode::OK);
    let peers = peers.as_array().expect("a list").clone();
    assert_eq!(peers.len(), 2);
    for p in &peers {
        assert_eq!(p["active"], true);
        assert!(
            p["last_registered"]
                .as_str()
                .is_some_and(|t| t.contains('T'))
        );
        assert!(p["ttl_left"].as_u64().is_some());
        assert!(p["id"].as_u64().is_some() && p["addr"].is_string());
    }

    let peer2 = cluster.peer_name(1);
    let (s, b) = post(
        &http,
        gw.url("/api/v1/topics"),
        json!({"topic": "metrics.cpu", "peer": peer2, "max_messages": 1000, "max_age": "1h"}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(b["peer"], peer2.as_str());
    assert_eq!(b["addr"], cluster.peer_addr(1).as_str());
    let (s, b) = post(
        &http,
        gw.url("/api/v1/topics"),
        json!({"topic": "metrics.cpu"}),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");

    let msgs = gw.url("/api/v1/topics/metrics.cpu/messages");
    let (s, b) = post(&http, msgs.clone(), json!({"messages": ["a", "b", "c"]})).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b, json!({"offsets": [0, 1, 2]}));
    let (s, b) = post(&http, msgs.clone(), json!({"message": "d"})).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b, json!({"offsets": [3]}));
    let (s, b) = post(&http, msgs, json!({})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");

    let (s, list) = get(&http, gw.url("/api/v1/topics")).await;
    assert_eq!(s, StatusCode::OK);
    let cpu = list
        .as_array()
        .and_then(|l| l.iter().find(|t| t["topic"] == "metrics.cpu"))
        .expect("metrics.cpu listed")
        .clone();
    assert_eq!(cpu["messages"], 4);
    assert_eq!(cpu["peer"], peer2.as_str());
    assert!(cpu["rate"].as_f64().is_some());
    let (_, none) = get(&http, gw.url("/api/v1/topics?prefix=nothing.")).await;
    assert_eq!(none, json!([]));

    let (s, one) = get(&http, gw.url("/api/v1/topics/metrics.cpu")).await;
    assert_eq!(s, StatusCode::OK, "{one}");
    assert_eq!(one["next_offset"], 4);
    assert_eq!(one["retention"]["max_messages"], 1000);
    assert_eq!(one["retention"]["max_age"], 3600);

    let subs = gw.url("/api/v1/topics/metrics.cpu/subscriptions");
    let (s, b) = post(
        &http,
        subs.clone(),
        json!({"subscriber": "s1", "from": "latest"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b, json!({"next_offset": 4}));
    let (_, b) = post(&http, subs.clone(), json!({"subscriber": "s2"})).await;
    assert_eq!(b, json!({"next_offset": 0}));
    let (_, b) = post(&http, subs.clone(), json!({"subscriber": "s3", "from": 2})).await;
    assert_eq!(b, json!({"next_offset": 2}));
    let (s, b) = post(&http, subs, json!({"subscriber": "s4", "from": "soon"})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");

    let (s, list) = get(&http, gw.url("/api/v1/topics/metrics.cpu/subscribers")).await;
    assert_eq!(s, StatusCode::OK);
    let list = list.as_array().expect("a list").clone();
    assert!(
        list.contains(&json!({"name": "s1", "next_offset": 4})),
        "{list:?}"
    );
    assert!(
        list.contains(&json!({"name": "s2", "next_offset": 0})),
        "{list:?}"
    );

    let pull = gw.url("/api/v1/topics/metrics.cpu/pull");
    let (s, b) = post(&http, pull.clone(), json!({"subscriber": "s2", "max": 2})).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let got: Vec<(u64, String)> = b["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            assert!(m["timestamp"].as_u64().is_some_and(|t| t > 0));
            (
                m["offset"].as_u64().unwrap_or(99),
                m["message"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(got, vec![(0, "a".to_string()), (1, "b".to_string())]);
    let (_, b) = post(&http, pull.clone(), json!({"subscriber": "s2"})).await;
    assert_eq!(b["messages"].as_array().map(Vec::len), Some(2));
    assert_eq!(b["messages"][1]["message"], "d");

    // At-least-once: with "commit": false nothing is acknowledged until the ack endpoint.
    let peek = json!({"subscriber": "s5", "commit": false});
    let (_, first) = post(&http, pull.clone(), peek.clone()).await;
    let (_, again) = post(&http, pull.clone(), peek.clone()).await;
    assert_eq!(first["messages"].as_array().map(Vec::len), Some(4));
    assert_eq!(
        first, again,
        "an unacknowledged pull reads the same messages"
    );
    let ack = gw.url("/api/v1/topics/metrics.cpu/ack");
    let resp = http
        .post(ack.clone())
        .json(&json!({"subscriber": "s5", "offset": 2}))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let (_, rest) = post(&http, pull.clone(), peek).await;
    assert_eq!(rest["messages"][0]["offset"], 3);
    let (s, b) = post(&http, ack, json!({"subscriber": "s5", "offset": 50})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert!(
        b["error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot acknowledge topic 'metrics.cpu' up to offset 50")),
        "{b}"
    );

    assert_eq!(
        delete(&http, gw.url("/api/v1/topics/metrics.cpu/subscriptions/s1")).await,
        StatusCode::NO_CONTENT
    );
    let (_, list) = get(&http, gw.url("/api/v1/topics/metrics.cpu/subscribers")).await;
    assert!(
        !list
            .as_array()
            .expect("a list")
            .iter()
            .any(|s| s["name"] == "s1")
    );

    assert_eq!(
        delete(&http, gw.url("/api/v1/topics/metrics.cpu")).await,
        StatusCode::NO_CONTENT
    );
    let (s, b) = get(&http, gw.url("/api/v1/topics/metrics.cpu")).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    assert_eq!(
        delete(&http, gw.url("/api/v1/topics/metrics.cpu")).await,
        StatusCode::NOT_FOUND
    );
    let (s, b) = post(&http, pull, json!({"subscriber": "s2"})).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    Ok(())
}

/// Reads the event stream until `want` shows up in it.
async fn read_until(resp: &mut reqwest::Response, want: &str) -> String {
    let mut seen = String::new();
    let found = tokio::time::timeout(DEADLINE, async {
        while let Some(chunk) = resp.chunk().await.expect("stream chunk") {
            seen.push_str(&String::from_utf8_lossy(&chunk));
            if seen.contains(want) {
                return true;
            }
        }
        false
    })
    .await;
    assert!(matches!(found, Ok(true)), "{want} not in stream: {seen}");
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_sent_events() -> anyhow::Result<()> {
    let cluster = Cluster::start(1).await?;
    let gw = Gateway::start(cluster.index_addr(), "index", None).await;
    let http = Client::new();
    let (s, _) = post(&http, gw.url("/api/v1/topics"), json!({"topic": "live"})).await;
    assert_eq!(s, StatusCode::CREATED);
    let msgs = gw.url("/api/v1/topics/live/messages");
    post(&http, msgs.clone(), json!({"message": "before"})).await;

    // A named subscriber from the start replays history, then gets new messages.
    let mut named = http
        .get(gw.url("/api/v1/topics/live/stream?subscriber=watcher&from=earliest"))
        .send()
        .await?;
    assert_eq!(named.status(), StatusCode::OK);
    assert!(
        named.headers()[header::CONTENT_TYPE]
            .to_str()?
            .starts_with("text/event-stream")
    );
    read_until(&mut named, "\"message\":\"before\"").await;

    // A temporary one starts at the latest message: the subscription exists once the
    // headers are back, so a publish now reaches it.
    let mut temp = http
        .get(gw.url("/api/v1/topics/live/stream"))
        .send()
        .await?;
    assert_eq!(temp.status(), StatusCode::OK);
    let (s, _) = post(&http, msgs, json!({"message": "hello stream"})).await;
    assert_eq!(s, StatusCode::OK);
    let seen = read_until(&mut temp, "hello stream").await;
    assert!(!seen.contains("before"), "{seen}");
    assert!(seen.contains("\"offset\":1"), "{seen}");
    read_until(&mut named, "hello stream").await;

    // Dropping the temporary stream removes its subscriber.
    drop(temp);
    eventually("the temporary subscriber to go", || {
        let (http, url) = (http.clone(), gw.url("/api/v1/topics/live/subscribers"));
        async move {
            let (_, list) = get(&http, url).await;
            let list = list.as_array()?.clone();
            (list.len() == 1 && list[0]["name"] == "watcher").then_some(())
        }
    })
    .await;

    let resp = http
        .get(gw.url("/api/v1/topics/none/stream"))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn file_search_and_ranged_content() -> anyhow::Result<()> {
    let cluster = Cluster::start_with(ClusterOptions {
        peers: 2,
        shares: true,
        ..ClusterOptions::default()
    })
    .await?;
    let gw = Gateway::start(cluster.index_addr(), &cluster.peer_name(1), None).await;
    let http = Client::new();

    // Over two pieces, with bytes that differ by position so a wrong slice shows.
    let data: Vec<u8> = (0..2_500_000u32)
        .map(|i| (i % 251) as u8 ^ (i >> 12) as u8)
        .collect();
    let share = cluster.peer_share(0);
    let staging = share.parent().expect("share parent").join("blob.staging");
    std::fs::write(&staging, &data)?;
    std::fs::rename(&staging, share.join("blob.bin"))?;

    let hit = eventually("the file in the index", || {
        let (http, url) = (http.clone(), gw.url("/api/v1/files?search=blob"));
        async move {
            let (_, list) = get(&http, url).await;
            list.as_array()?.first().cloned()
        }
    })
    .await;
    assert_eq!(hit["name"], "blob.bin");
    assert_eq!(hit["size"], data.len() as u64);
    assert_eq!(hit["peers"], json!([cluster.peer_addr(0)]));
    let hash = hit["hash"].as_str().expect("hash").to_string();

    let (s, dist) = get(&http, gw.url("/api/v1/files?search=BLOB&distributed=true")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(dist[0]["hash"], hash.as_str());
    let (s, one) = get(&http, gw.url(&format!("/api/v1/files/{hash}"))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(one["name"], "blob.bin");
    let (s, _) = get(&http, gw.url("/api/v1/files/nothing-like-it")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let content = gw.url(&format!("/api/v1/files/{hash}/content"));
    let whole = http.get(&content).send().await?;
    assert_eq!(whole.status(), StatusCode::OK);
    assert_eq!(whole.headers()[header::ACCEPT_RANGES], "bytes");
    assert_eq!(whole.bytes().await?.as_ref(), data.as_slice());

    // Across the first piece boundary.
    let (a, b) = (1_048_000usize, 1_049_999usize);
    let part = http
        .get(&content)
        .header(header::RANGE, format!("bytes={a}-{b}"))
        .send()
        .await?;
    assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        part.headers()[header::CONTENT_RANGE],
        format!("bytes {a}-{b}/{}", data.len()).as_str()
    );
    assert_eq!(part.bytes().await?.as_ref(), &data[a..=b]);

    let tail = http
        .get(&content)
        .header(header::RANGE, "bytes=-10")
        .send()
        .await?;
    assert_eq!(tail.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(tail.bytes().await?.as_ref(), &data[data.len() - 10..]);

    let outside = http
        .get(&content)
        .header(header::RANGE, format!("bytes={}-", data.len()))
        .send()
        .await?;
    assert_eq!(outside.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        outside.headers()[header::CONTENT_RANGE],
        format!("bytes */{}", data.len()).as_str()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn openapi_metrics_and_dashboard() -> anyhow::Result<()> {
    let cluster = Cluster::start(1).await?;
    let gw = Gateway::start(cluster.index_addr(), "index", None).await;
    let http = Client::new();

    let (s, doc) = get(&http, gw.url("/api/openapi.json")).await;
    assert_eq!(s, StatusCode::OK);
    let paths = doc["paths"].as_object().expect("paths");
    for p in [
        "/register_peer_node",
        "/unregister_peer_node",
        "/create_topic",
        "/delete_topic",
        "/publish",
        "/subscribe",
        "/pull_messages",
        "/query_peers",
        "/api/v1/peers",
        "/api/v1/topics",
        "/api/v1/topics/{topic}",
        "/api/v1/topics/{topic}/messages",
        "/api/v1/topics/{topic}/subscriptions",
        "/api/v1/topics/{topic}/subscriptions/{subscriber}",
        "/api/v1/topics/{topic}/subscribers",
        "/api/v1/topics/{topic}/pull",
        "/api/v1/topics/{topic}/stream",
        "/api/v1/files",
        "/api/v1/files/{key}",
        "/api/v1/files/{key}/content",
        "/metrics",
    ] {
        assert!(
            paths.contains_key(p),
            "{p} missing from the OpenAPI document"
        );
    }

    let (s, _) = post(&http, gw.url("/api/v1/topics"), json!({"topic": "m"})).await;
    assert_eq!(s, StatusCode::CREATED);
    post(
        &http,
        gw.url("/api/v1/topics/m/messages"),
        json!({"messages": ["x", "yy"]}),
    )
    .await;
    post(
        &http,
        gw.url("/api/v1/topics/m/pull"),
        json!({"subscriber": "s"}),
    )
    .await;
    get(&http, gw.url("/api/v1/topics/unknown")).await;

    let resp = http.get(gw.url("/metrics")).send().await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.text().await?;
    for want in [
        "peerbus_http_requests_total",
        "peerbus_http_request_duration_seconds_bucket",
        "route=\"/api/v1/topics/{topic}/messages\"",
        "status=\"404\"",
        "peerbus_http_messages_published_total 2",
        "peerbus_http_published_bytes_total 3",
        "peerbus_http_messages_pulled_total 2",
        "peerbus_live_peers 1",
        "peerbus_topics 1",
        "peerbus_subscribers 1",
        "peerbus_files 0",
    ] {
        assert!(text.contains(want), "{want} not in /metrics:\n{text}");
    }

    let resp = http.get(gw.url("/")).send().await?;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()[header::CONTENT_TYPE]
            .to_str()?
            .starts_with("text/html")
    );
    let (s, node) = get(&http, gw.url("/api/v1/node")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(node["node"], "index");
    Ok(())
}

/// A batch over the frame limit is refused by the gateway with the reason, before it
/// reaches the host, so the gateway's shared connection to the host (and every other user's
/// requests on it) is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_oversized_batch_is_refused_and_the_gateway_keeps_serving() -> anyhow::Result<()> {
    let cluster = Cluster::start(1).await?;
    let gw = Gateway::start(cluster.index_addr(), "index", None).await;
    let http = Client::new();
    let (s, b) = post(&http, gw.url("/api/v1/topics"), json!({"topic": "big"})).await;
    assert!(s.is_success(), "{b}");
    let msgs = gw.url("/api/v1/topics/big/messages");
    let (s, b) = post(&http, msgs.clone(), json!({"messages": ["small"]})).await;
    assert!(s.is_success(), "{b}");
    let four = "x".repeat(4 << 20);
    let (s, b) = post(&http, msgs.clone(), json!({"messages": [four, four, four]})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert!(
        b["error"]
            .as_str()
            .is_some_and(|e| e.contains("over the 8388608 byte limit of one publish")),
        "{b}"
    );
    let (s, b) = post(&http, msgs, json!({"messages": ["after"]})).await;
    assert!(s.is_success(), "{b}");
    let (_, b) = post(
        &http,
        gw.url("/api/v1/topics/big/pull"),
        json!({"subscriber": "r"}),
    )
    .await;
    let got: Vec<&str> = b["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["message"].as_str())
        .collect();
    assert_eq!(got, ["small", "after"]);
    Ok(())
}

/// Unknown HTTP methods share one metrics label, so random methods cannot create series.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_methods_do_not_grow_the_metrics() -> anyhow::Result<()> {
    let cluster = Cluster::start(1).await?;
    let gw = Gateway::start(cluster.index_addr(), "index", None).await;
    let http = Client::new();
    for m in ["FROB", "XYZZY", "WIBBLE"] {
        let method = reqwest::Method::from_bytes(m.as_bytes())?;
        http.request(method, gw.url("/api/v1/peers")).send().await?;
    }
    let metrics = http.get(gw.url("/metrics")).send().await?.text().await?;
    for m in ["FROB", "XYZZY", "WIBBLE"] {
        assert!(!metrics.contains(m), "{m} became a label");
    }
    assert!(metrics.contains("method=\"other\""), "{metrics}");
    Ok(())
}

/// A web page cannot use someone's browser against a token-less gateway: cross-origin
/// writes and rebound host names are refused; curl, the CLI and the dashboard are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cross_origin_writes_and_rebound_names_are_refused() -> anyhow::Result<()> {
    let cluster = Cluster::start(1).await?;
    let gw = Gateway::start(cluster.index_addr(), "index", None).await;
    let http = Client::new();
    let resp = http
        .post(gw.url("/create_topic"))
        .header(header::ORIGIN, "https://evil.example")
        .header(header::CONTENT_TYPE, "text/plain")
        .body(r#"{"topic": "csrf"}"#)
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let b: Value = resp.json().await?;
    assert!(
        b["error"]
            .as_str()
            .is_some_and(|e| e.contains("cross-origin POST")),
        "{b}"
    );
    let resp = http
        .get(gw.url("/api/v1/topics"))
        .header(header::HOST, "evil.example")
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    // Nothing was created, and a plain client is served.
    let (s, b) = post(&http, gw.url("/create_topic"), json!({"topic": "fine"})).await;
    assert!(s.is_success(), "{b}");
    let (s, _) = get(&http, gw.url("/api/v1/topics/csrf")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    Ok(())
}

/// `GET /api/v1/topics` is paged (`after`, `limit`), so one call asks the hosts for the
/// statistics of a bounded number of topics; `/metrics` takes its totals from one request
/// per peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn topics_are_listed_a_page_at_a_time_and_metrics_sum_over_peers() -> anyhow::Result<()> {
    let cluster = Cluster::start(2).await?;
    let gw = Gateway::start(cluster.index_addr(), "index", None).await;
    let http = Client::new();
    let c = cluster.client();
    for i in 0..5 {
        let (s, _) = post(
            &http,
            gw.url("/api/v1/topics"),
            json!({"topic": format!("p.{i}")}),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED);
        // Topic p.i gets i subscribers, on whichever peer hosts it.
        for j in 0..i {
            c.subscribe(&format!("p.{i}"), &format!("s{j}"), None)
                .await?;
        }
    }
    let names = |v: &Value| -> Vec<String> {
        v.as_array()
            .expect("a list")
            .iter()
            .map(|t| t["topic"].as_str().expect("a name").to_string())
            .collect()
    };
    let (s, page) = get(&http, gw.url("/api/v1/topics?limit=2")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(names(&page), ["p.0", "p.1"]);
    assert_eq!(page[1]["subscribers"], 1, "{page}");
    let (_, page) = get(&http, gw.url("/api/v1/topics?limit=2&after=p.1")).await;
    assert_eq!(names(&page), ["p.2", "p.3"]);
    let (_, page) = get(&http, gw.url("/api/v1/topics?after=p.3")).await;
    assert_eq!(names(&page), ["p.4"]);
    for bad in ["0", "10001"] {
        let (s, e) = get(&http, gw.url(&format!("/api/v1/topics?limit={bad}"))).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
        assert!(e["error"].as_str().unwrap().contains("1 to 10000"), "{e}");
    }

    let text = http.get(gw.url("/metrics")).send().await?.text().await?;
    for want in [
        "peerbus_live_peers 2",
        "peerbus_topics 5",
        "peerbus_subscribers 10",
    ] {
        assert!(text.contains(want), "{want} not in /metrics:\n{text}");
    }
    // The index does not host topics and says so.
    let e = c
        .request_at(
            &cluster.index_addr(),
            peerbus_proto::Request::NodeStats,
            false,
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("ask each peer"), "{e}");
    Ok(())
}
