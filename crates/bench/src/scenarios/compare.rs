//! The `compare` scenario: the same workloads against a nats-server started for the run and
//! against peerbus, in alternating rounds, reporting medians and their ratio:
//! (a) throughput, 128-byte messages from 1 publisher to 1 subscriber;
//! (b) request/response latency: NATS request-reply against the peerbus ping-pong round trip.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use futures::StreamExt;

use crate::Options;
use crate::report::{Plot, Series, Table};
use crate::scenarios::pingpong::Pair;
use crate::scenarios::throughput::{pairs, unique};
use crate::stats::{Latencies, rate};
use crate::target::{self, Spec, Target};

/// Payload of every message in both workloads.
const PAYLOAD: usize = 128;
/// How long nats-server may take to accept connections.
const NATS_START: Duration = Duration::from_secs(10);
/// How long the NATS subscriber may go without a message before the run fails.
const STALL: Duration = Duration::from_secs(30);

/// A nats-server on a free loopback port, killed when dropped.
struct NatsServer {
    child: Child,
    url: String,
}

impl NatsServer {
    async fn start() -> anyhow::Result<NatsServer> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("cannot pick a free port for nats-server")?
            .port();
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    anyhow::anyhow!("nats-server is not installed: apt-get install nats-server")
                } else {
                    anyhow::anyhow!("cannot start nats-server: {e}")
                }
            })?;
        let mut server = NatsServer {
            child,
            url: format!("127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + NATS_START;
        loop {
            if let Some(status) = server.child.try_wait()? {
                anyhow::bail!("nats-server exited at start ({status}); is port {port} taken?");
            }
            if tokio::net::TcpStream::connect(&server.url).await.is_ok() {
                return Ok(server);
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "nats-server did not accept connections within {} s",
                    NATS_START.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn connect(&self) -> anyhow::Result<async_nats::Client> {
        async_nats::ConnectOptions::new()
            // Room for a whole run, so a briefly slower subscriber never drops messages.
            .subscription_capacity(1 << 20)
            .connect(&self.url)
            .await
            .with_context(|| format!("cannot connect to nats-server at {}", self.url))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// NATS: one publisher sends `count` messages on a subject one subscriber listens to; returns
/// the messages/s the subscriber received (first publish to last receipt).
async fn nats_throughput(
    server: &NatsServer,
    count: u64,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<f64> {
    let subject = async_nats::Subject::from(unique("cmp.tp"));
    let sub_client = server.connect().await?;
    let pub_client = server.connect().await?;
    let mut sub = sub_client.subscribe(subject.clone()).await?;
    sub_client.flush().await?;
    let payload = Bytes::from(vec![0xA5u8; PAYLOAD]);
    let start = Instant::now();
    let bar2 = bar.clone();
    let published = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = published.clone();
    // nats-server drops messages for a subscriber that falls too far behind (core NATS has
    // no flow control), so the receiver stops once publishing is over and nothing more came
    // for a moment, and the rate counts what actually arrived.
    let receiver = tokio::spawn(async move {
        let mut n = 0u64;
        let mut last = start;
        let mut shown = 0u64;
        while n < count {
            match tokio::time::timeout(Duration::from_millis(500), sub.next()).await {
                Err(_) if done.load(std::sync::atomic::Ordering::Acquire) => break,
                Err(_) if last.elapsed() > STALL => {
                    anyhow::bail!("the NATS subscriber stalled at {n} of {count} messages")
                }
                Err(_) => {}
                Ok(None) => anyhow::bail!("the NATS subscription ended at {n} of {count}"),
                Ok(Some(_)) => {
                    n += 1;
                    last = Instant::now();
                    if n - shown >= 4096 {
                        bar2.inc(n - shown);
                        shown = n;
                    }
                }
            }
        }
        bar2.inc(count - shown);
        Ok((n, last - start))
    });
    for _ in 0..count {
        pub_client.publish(subject.clone(), payload.clone()).await?;
    }
    pub_client.flush().await?;
    published.store(true, std::sync::atomic::Ordering::Release);
    let (received, elapsed) = receiver.await??;
    if received < count {
        tracing::warn!(
            "nats-server dropped {} of {count} messages for the slow subscriber",
            count - received
        );
    }
    Ok(rate(received, elapsed))
}

/// NATS: `rounds` sequential requests answered by a responder on another connection.
async fn nats_request_reply(
    server: &NatsServer,
    rounds: u64,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<Latencies> {
    let subject = async_nats::Subject::from(unique("cmp.rr"));
    let responder = server.connect().await?;
    let requester = server.connect().await?;
    let mut sub = responder.subscribe(subject.clone()).await?;
    responder.flush().await?;
    let answer = responder.clone();
    let serve = tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if let Some(reply) = m.reply {
                let _ = answer.publish(reply, m.payload).await;
            }
        }
    });
    let payload = Bytes::from(vec![0x5Au8; PAYLOAD]);
    // Until the responder's interest has reached the server, requests find no responder:
    // warm up until ten in a row are answered.
    let deadline = Instant::now() + NATS_START;
    let mut answered = 0;
    while answered < 10 {
        match requester.request(subject.clone(), payload.clone()).await {
            Ok(_) => answered += 1,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("NATS warm-up request: {e}");
                answered = 0;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => return Err(e).context("the NATS responder never answered"),
        }
    }
    let mut latencies = Latencies::new();
    for _ in 0..rounds {
        let at = Instant::now();
        requester
            .request(subject.clone(), payload.clone())
            .await
            .context("NATS request failed")?;
        latencies.record(at.elapsed());
        bar.inc(1);
    }
    serve.abort();
    Ok(latencies)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Runs the scenario; returns its summary lines.
pub(crate) async fn run(options: &Options) -> anyhow::Result<Vec<String>> {
    let rounds: usize = options.pick(1, 3, 3);
    let count: u64 = options.pick(2_000, 200_000, 1_000_000);
    let requests: u64 = options.pick(50, 5_000, 20_000);

    let nats = NatsServer::start().await?;
    let target = Target::start(options, Spec::peers(1)).await?;
    let per_round = 2 * (count + requests);
    let bar = target::progress(options, rounds as u64 * per_round, "compare");

    let mut table = Table::new(
        "compare",
        &[
            "round",
            "system",
            "msgs_per_s",
            "request_p50_us",
            "request_p99_us",
            "request_mean_us",
        ],
    );
    let (mut nats_rates, mut pb_rates) = (Vec::new(), Vec::new());
    let (mut nats_p50, mut pb_p50) = (Vec::new(), Vec::new());
    let (mut nats_p99, mut pb_p99) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        // Alternate which system goes first, so neither always runs on a warmer machine.
        let order = if round % 2 == 1 {
            ["nats", "peerbus"]
        } else {
            ["peerbus", "nats"]
        };
        for system in order {
            let (msgs, lat) = if system == "nats" {
                let msgs = nats_throughput(&nats, count, &bar).await?;
                let lat = nats_request_reply(&nats, requests, &bar).await?;
                nats_rates.push(msgs);
                nats_p50.push(lat.p50_us());
                nats_p99.push(lat.p99_us());
                (msgs, lat)
            } else {
                let m = pairs(&target, &unique("cmp.tp"), 1, PAYLOAD, count, &bar).await?;
                let mut pair = Pair::open(&target, &unique("cmp.rr")).await?;
                pair.bounce(10, 1, &indicatif::ProgressBar::hidden())
                    .await?;
                let (lat, _) = pair.bounce(requests, 1, &bar).await?;
                pair.close(&target).await?;
                pb_rates.push(m.msgs_per_s());
                pb_p50.push(lat.p50_us());
                pb_p99.push(lat.p99_us());
                (m.msgs_per_s(), lat)
            };
            table.row([
                round.to_string(),
                system.to_string(),
                format!("{msgs:.0}"),
                format!("{:.0}", lat.p50_us()),
                format!("{:.0}", lat.p99_us()),
                format!("{:.0}", lat.mean_us()),
            ]);
        }
    }
    bar.finish_and_clear();
    drop(nats);

    let (nr, pr) = (median(nats_rates.clone()), median(pb_rates.clone()));
    let (n50, p50) = (median(nats_p50.clone()), median(pb_p50.clone()));
    let (n99, p99) = (median(nats_p99.clone()), median(pb_p99.clone()));
    for (system, msgs, l50, l99) in [("nats", nr, n50, n99), ("peerbus", pr, p50, p99)] {
        table.row([
            "median".to_string(),
            system.to_string(),
            format!("{msgs:.0}"),
            format!("{l50:.0}"),
            format!("{l99:.0}"),
            String::new(),
        ]);
    }
    table.write(&options.out)?;

    let mut tp = Plot::new(
        "compare_throughput",
        "128-byte messages, 1 publisher → 1 subscriber: messages/s received, per round",
        "round",
        "messages/s",
    );
    let mut lat = Plot::new(
        "compare_latency",
        "Request/response round trip p50 (lower is better), per round",
        "round",
        "microseconds",
    );
    for (label, rates, p50s) in [
        ("nats-server", &nats_rates, &nats_p50),
        ("peerbus", &pb_rates, &pb_p50),
    ] {
        tp.series.push(Series::new(
            label,
            rates
                .iter()
                .enumerate()
                .map(|(i, &r)| ((i + 1) as f64, r))
                .collect(),
        ));
        lat.series.push(Series::new(
            label,
            p50s.iter()
                .enumerate()
                .map(|(i, &r)| ((i + 1) as f64, r))
                .collect(),
        ));
    }
    tp.write(&options.out)?;
    lat.write(&options.out)?;

    println!("{}", table.render());
    target.close().await;
    Ok(vec![
        format!(
            "compare: {count} messages of {PAYLOAD} B, median of {rounds} rounds: peerbus {pr:.0} msgs/s, nats-server {nr:.0} msgs/s"
        ),
        format!(
            "compare: request/response p50 peerbus {p50:.0} µs, nats-server {n50:.0} µs; p99 peerbus {p99:.0} µs, nats-server {n99:.0} µs"
        ),
        format!(
            "peerbus/nats throughput ratio: {:.2}",
            pr / nr.max(f64::MIN_POSITIVE)
        ),
        format!(
            "peerbus/nats request-reply p50 ratio: {:.2} (lower is better for peerbus)",
            p50 / n50.max(f64::MIN_POSITIVE)
        ),
    ])
}
