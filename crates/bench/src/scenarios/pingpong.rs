//! The `pingpong` scenario: two clients, each a publisher and a subscriber, bounce a message
//! over two topics (A publishes on `ping`, B follows `ping` and answers on `pong`, A follows
//! `pong`). First one message in flight (round-trip latency), then a window of messages in
//! flight (the most messages/s the pair moves), then N pairs at once.

use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use peerbus_client::{Client, PublishAck, Subscription};
use peerbus_proto::{Retention, StartFrom};

use crate::Options;
use crate::report::{Plot, Series, Table};
use crate::scenarios::throughput::unique;
use crate::stats::{Latencies, rate};
use crate::target::{self, Spec, Target};

/// How long a round trip may take before the run fails.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Payload of every ping and pong.
const PAYLOAD: usize = 128;

/// One pair's two topics and four ends.
pub(crate) struct Pair {
    ping: String,
    pong: String,
    a: Client,
    a_sub: Subscription,
    b: Client,
    b_sub: Subscription,
}

impl Pair {
    /// Creates the pair's topics (named after `name`) and its subscriptions, each client with
    /// its own connections.
    pub(crate) async fn open(target: &Target, name: &str) -> anyhow::Result<Pair> {
        let ping = format!("{name}.ping");
        let pong = format!("{name}.pong");
        let admin = target.client();
        for t in [&ping, &pong] {
            admin
                .create_topic(t, None, Retention::default())
                .await
                .with_context(|| format!("cannot create topic {t}"))?;
        }
        let a = target.client();
        let b = target.client();
        let a_sub = a.follow(&pong, "a", Some(StartFrom::Latest)).await?;
        let b_sub = b.follow(&ping, "b", Some(StartFrom::Latest)).await?;
        a.lookup(&ping).await?;
        b.lookup(&pong).await?;
        Ok(Pair {
            ping,
            pong,
            a,
            a_sub,
            b,
            b_sub,
        })
    }

    /// Deletes the pair's topics.
    pub(crate) async fn close(self, target: &Target) -> anyhow::Result<()> {
        drop(self.a_sub);
        drop(self.b_sub);
        let admin = target.client();
        for t in [&self.ping, &self.pong] {
            admin.delete_topic(t).await?;
        }
        Ok(())
    }

    /// Bounces `rounds` messages with at most `window` pings unanswered; returns each round
    /// trip's latency (publish on `ping` to receipt on `pong`) and the time it all took.
    pub(crate) async fn bounce(
        &mut self,
        rounds: u64,
        window: u64,
        bar: &indicatif::ProgressBar,
    ) -> anyhow::Result<(Latencies, Duration)> {
        let payload = Bytes::from(vec![0x5Au8; PAYLOAD]);
        let (b, pong) = (self.b.clone(), self.pong.clone());
        let b_sub = &mut self.b_sub;
        let answer = async move {
            let mut answered = 0u64;
            let mut acks: Vec<PublishAck> = Vec::new();
            while answered < rounds {
                let set = match tokio::time::timeout(TIMEOUT, b_sub.next_batch()).await {
                    Err(_) => anyhow::bail!("no ping arrived for {} s", TIMEOUT.as_secs()),
                    Ok(None) => anyhow::bail!("the ping subscription ended early"),
                    Ok(Some(set)) => set?,
                };
                for p in set.batch.iter() {
                    acks.push(b.publish_nowait(&pong, p));
                    answered += 1;
                }
                // Acknowledgements resolve in order; check the finished ones now and then.
                if acks.len() > 4096 {
                    let rest = acks.split_off(acks.len() - 1);
                    for a in std::mem::replace(&mut acks, rest) {
                        a.await?;
                    }
                }
            }
            for a in acks {
                a.await?;
            }
            Ok::<_, anyhow::Error>(())
        };
        let (a, ping) = (self.a.clone(), self.ping.clone());
        let a_sub = &mut self.a_sub;
        let ask = async move {
            let mut latencies = Latencies::new();
            let mut sent: std::collections::VecDeque<(Instant, PublishAck)> =
                std::collections::VecDeque::new();
            let mut received = 0u64;
            let start = Instant::now();
            let mut next = 0u64;
            while received < rounds {
                while next < rounds && (sent.len() as u64) < window {
                    sent.push_back((Instant::now(), a.publish_nowait(&ping, payload.clone())));
                    next += 1;
                }
                let set = match tokio::time::timeout(TIMEOUT, a_sub.next_batch()).await {
                    Err(_) => anyhow::bail!("no pong arrived for {} s", TIMEOUT.as_secs()),
                    Ok(None) => anyhow::bail!("the pong subscription ended early"),
                    Ok(Some(set)) => set?,
                };
                let now = Instant::now();
                for _ in 0..set.len() {
                    let (at, ack) = sent
                        .pop_front()
                        .context("a pong arrived that no ping asked for")?;
                    latencies.record(now - at);
                    ack.await?;
                }
                received += set.len() as u64;
                bar.inc(set.len() as u64);
            }
            Ok::<_, anyhow::Error>((latencies, start.elapsed()))
        };
        let (asked, answered) = tokio::join!(ask, answer);
        answered?;
        asked
    }
}

/// One line of results: `pairs` pairs with `window` messages in flight each.
struct Row {
    pairs: usize,
    window: u64,
    latencies: Latencies,
    msgs_per_s: f64,
}

/// Runs `n` pairs at once, each bouncing `rounds` messages with `window` in flight.
async fn concurrent(
    target: &Target,
    n: usize,
    rounds: u64,
    window: u64,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<Row> {
    let mut pairs = Vec::new();
    for i in 0..n {
        pairs.push(Pair::open(target, &unique(&format!("pp.{n}.{window}.{i}"))).await?);
    }
    // A few warm-up rounds open every connection and path before measuring.
    for p in &mut pairs {
        p.bounce(10, 1, &indicatif::ProgressBar::hidden()).await?;
    }
    let start = Instant::now();
    let runs = pairs.into_iter().map(|mut p| {
        let bar = bar.clone();
        async move {
            let r = p.bounce(rounds, window, &bar).await;
            (p, r)
        }
    });
    let done = futures::future::join_all(runs).await;
    let elapsed = start.elapsed();
    let mut latencies = Latencies::new();
    for (p, r) in done {
        let (l, _) = r?;
        latencies.merge(&l);
        p.close(target).await?;
    }
    // Every round trip moves two messages: the ping and the pong.
    let msgs_per_s = rate(2 * rounds * n as u64, elapsed);
    Ok(Row {
        pairs: n,
        window,
        latencies,
        msgs_per_s,
    })
}

/// Runs the scenario; returns its summary lines.
pub(crate) async fn run(options: &Options) -> anyhow::Result<Vec<String>> {
    let counts: Vec<usize> = options.pick(vec![1, 2], vec![1, 2, 4, 8], vec![1, 2, 4, 8]);
    let rounds: u64 = options.pick(50, 5_000, 20_000);
    let window: u64 = options.pick(16, 1_000, 1_000);
    let windowed_rounds: u64 = options.pick(200, 20_000, 100_000);
    let total: u64 = counts
        .iter()
        .map(|&n| n as u64 * (rounds + windowed_rounds))
        .sum();

    let target = Target::start(options, Spec::peers(1)).await?;
    let bar = target::progress(options, total, "pingpong");
    let mut rows = Vec::new();
    for &n in &counts {
        rows.push(concurrent(&target, n, rounds, 1, &bar).await?);
        rows.push(concurrent(&target, n, windowed_rounds, window, &bar).await?);
    }
    bar.finish_and_clear();

    let mut table = Table::new(
        "pingpong",
        &[
            "pairs",
            "in_flight",
            "round_trips",
            "p50_us",
            "p99_us",
            "mean_us",
            "msgs_per_s",
        ],
    );
    for r in &rows {
        table.row([
            r.pairs.to_string(),
            r.window.to_string(),
            r.latencies.count().to_string(),
            format!("{:.0}", r.latencies.p50_us()),
            format!("{:.0}", r.latencies.p99_us()),
            format!("{:.0}", r.latencies.mean_us()),
            format!("{:.0}", r.msgs_per_s),
        ]);
    }
    table.write(&options.out)?;

    let mut latency = Plot::new(
        "pingpong_latency",
        "Round trip (one message in flight per pair)",
        "pairs",
        "microseconds",
    );
    let single: Vec<&Row> = rows.iter().filter(|r| r.window == 1).collect();
    latency.series.push(Series::new(
        "p50",
        single
            .iter()
            .map(|r| (r.pairs as f64, r.latencies.p50_us()))
            .collect(),
    ));
    latency.series.push(Series::new(
        "p99",
        single
            .iter()
            .map(|r| (r.pairs as f64, r.latencies.p99_us()))
            .collect(),
    ));
    latency.series.push(Series::new(
        "mean",
        single
            .iter()
            .map(|r| (r.pairs as f64, r.latencies.mean_us()))
            .collect(),
    ));
    latency.write(&options.out)?;
    let mut rate_plot = Plot::new(
        "pingpong_rate",
        "Messages/s bounced (pings + pongs), all pairs together",
        "pairs",
        "messages/s",
    );
    for (label, w) in [
        ("1 in flight".to_string(), 1),
        (format!("{window} in flight"), window),
    ] {
        rate_plot.series.push(Series::new(
            label,
            rows.iter()
                .filter(|r| r.window == w)
                .map(|r| (r.pairs as f64, r.msgs_per_s))
                .collect(),
        ));
    }
    rate_plot.write(&options.out)?;

    println!("{}", table.render());
    let one = &rows[0];
    let max = rows.iter().map(|r| r.msgs_per_s).fold(0.0f64, f64::max);
    target.close().await;
    Ok(vec![
        format!(
            "pingpong round trip: p50 {:.0} µs, p99 {:.0} µs, mean {:.0} µs",
            one.latencies.p50_us(),
            one.latencies.p99_us(),
            one.latencies.mean_us()
        ),
        format!("pingpong max: {max:.0} msgs/s"),
    ])
}
