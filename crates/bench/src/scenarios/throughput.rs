//! The `throughput` scenario: publish→deliver messages/s and MB/s against payload size and
//! the number of publisher→subscriber pairs, measured end to end (from the first publish
//! until every following subscriber has received everything), plus the 128-byte 1→1 case
//! with `memory` and with `sync` durability.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use peerbus_client::{Client, PublishAck};
use peerbus_peer::Durability;
use peerbus_proto::{Retention, StartFrom};

use crate::Options;
use crate::report::{Plot, Series, Table};
use crate::stats::{mb_per_s, rate};
use crate::target::{self, Spec, Target};

/// Publishes a publisher keeps unacknowledged at most (bounded by bytes too), so a fast
/// publisher cannot queue its whole run in memory.
const WINDOW_MESSAGES: usize = 100_000;
/// Unacknowledged payload bytes per publisher at most.
const WINDOW_BYTES: usize = 16 << 20;
/// How long a run may go without a subscriber receiving anything before it fails.
const STALL: Duration = Duration::from_secs(30);

/// A name no other run (of this or another process) uses.
pub(crate) fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("bench.{prefix}.{}.{nanos:x}", std::process::id())
}

/// The result of one run of `pairs` publisher→subscriber pairs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Measured {
    /// Messages the subscribers received, in total.
    pub messages: u64,
    /// Payload bytes the subscribers received, in total.
    pub bytes: u64,
    /// From the first publish until the last subscriber had everything.
    pub elapsed: Duration,
    /// From the first publish until every publish was acknowledged.
    pub acked: Duration,
}

impl Measured {
    pub fn msgs_per_s(&self) -> f64 {
        rate(self.messages, self.elapsed)
    }
    pub fn mb_per_s(&self) -> f64 {
        mb_per_s(self.bytes, self.elapsed)
    }
}

/// Runs `pairs` publisher→subscriber pairs, each on its own topic with its own two clients,
/// every publisher sending `per_pair` messages of `size` bytes as fast as its window allows.
pub(crate) async fn pairs(
    target: &Target,
    name: &str,
    pairs: usize,
    size: usize,
    per_pair: u64,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<Measured> {
    let mut topics = Vec::new();
    let mut subs = Vec::new();
    let mut pubs = Vec::new();
    for i in 0..pairs {
        let topic = format!("{name}.{i}");
        let admin = target.client();
        admin
            .create_topic(&topic, None, Retention::default())
            .await
            .with_context(|| format!("cannot create topic {topic}"))?;
        let sub_client = target.client();
        let sub = sub_client
            .follow(&topic, "bench", Some(StartFrom::Earliest))
            .await
            .with_context(|| format!("cannot follow topic {topic}"))?;
        subs.push((sub_client, sub));
        let pub_client = target.client();
        // Resolve the host and open the connection before the clock starts.
        pub_client.lookup(&topic).await?;
        topics.push(topic);
        pubs.push(pub_client);
    }
    let payload = Bytes::from(vec![0xA5u8; size]);
    let start = Instant::now();
    let mut receivers = Vec::new();
    for (client, mut sub) in subs {
        let bar = bar.clone();
        receivers.push(tokio::spawn(async move {
            let mut messages = 0u64;
            let mut bytes = 0u64;
            while messages < per_pair {
                let next = tokio::time::timeout(STALL, sub.next_batch()).await;
                let set = match next {
                    Err(_) => anyhow::bail!(
                        "a subscriber received nothing for {} s ({messages} of {per_pair} messages)",
                        STALL.as_secs()
                    ),
                    Ok(None) => anyhow::bail!("a subscription ended early"),
                    Ok(Some(set)) => set?,
                };
                messages += set.len() as u64;
                bytes += set.batch.data.len() as u64;
                bar.inc(set.len() as u64);
            }
            drop(client);
            Ok((messages, bytes, start.elapsed()))
        }));
    }
    let mut senders = Vec::new();
    for (client, topic) in pubs.into_iter().zip(topics.iter().cloned()) {
        let payload = payload.clone();
        senders.push(tokio::spawn(async move {
            publish_all(&client, &topic, payload, per_pair).await?;
            Ok::<_, anyhow::Error>(start.elapsed())
        }));
    }
    let mut acked = Duration::ZERO;
    for s in senders {
        acked = acked.max(s.await??);
    }
    let (mut messages, mut bytes, mut elapsed) = (0, 0, Duration::ZERO);
    for r in receivers {
        let (m, b, e) = r.await??;
        messages += m;
        bytes += b;
        elapsed = elapsed.max(e);
    }
    let admin = target.client();
    for t in &topics {
        admin
            .delete_topic(t)
            .await
            .with_context(|| format!("cannot delete topic {t}"))?;
    }
    Ok(Measured {
        messages,
        bytes,
        elapsed,
        acked,
    })
}

/// Publishes `count` copies of `payload` through the client's automatic batching, keeping
/// at most a window of them unacknowledged; fails on the first failed publish.
pub(crate) async fn publish_all(
    client: &Client,
    topic: &str,
    payload: Bytes,
    count: u64,
) -> anyhow::Result<()> {
    let window = WINDOW_MESSAGES.min((WINDOW_BYTES / payload.len().max(1)).max(64));
    let mut acks: VecDeque<PublishAck> = VecDeque::with_capacity(window);
    for _ in 0..count {
        if acks.len() >= window {
            acks.pop_front().expect("non-empty window").await?;
        }
        acks.push_back(client.publish_nowait(topic, payload.clone()));
    }
    // Acknowledgements arrive in order: the last one implies the rest, but each is checked.
    for a in acks {
        a.await?;
    }
    Ok(())
}

fn size_label(size: usize) -> String {
    if size >= 1024 {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

/// Runs the scenario; returns its summary lines.
pub(crate) async fn run(options: &Options) -> anyhow::Result<Vec<String>> {
    let sizes: Vec<usize> = options.pick(
        vec![16, 1024],
        vec![16, 128, 1024, 16 << 10, 64 << 10],
        vec![16, 128, 1024, 16 << 10, 64 << 10],
    );
    let clients: Vec<usize> = options.pick(vec![1, 2], vec![1, 5, 20], vec![1, 2, 5, 10, 20, 50]);
    // Per run: this many messages in total, fewer for large payloads.
    let (max_messages, max_bytes): (u64, u64) =
        options.pick((400, 1 << 20), (100_000, 64 << 20), (400_000, 256 << 20));
    let plan: Vec<(usize, usize, u64)> = sizes
        .iter()
        .flat_map(|&size| {
            clients.iter().map(move |&n| {
                let total = max_messages.min(max_bytes / size as u64).max(n as u64);
                (size, n, total.div_ceil(n as u64))
            })
        })
        .collect();
    let total: u64 = plan.iter().map(|&(_, n, per)| n as u64 * per).sum();

    let target = Target::start(options, Spec::peers(1)).await?;
    let bar = target::progress(options, total, "throughput");
    let mut table = Table::new(
        "throughput",
        &[
            "payload_bytes",
            "pairs",
            "messages",
            "seconds",
            "msgs_per_s",
            "mb_per_s",
            "publish_acked_msgs_per_s",
        ],
    );
    let mut results = Vec::new();
    for &(size, n, per) in &plan {
        let name = unique(&format!("tp.{size}.{n}"));
        let m = pairs(&target, &name, n, size, per, &bar).await?;
        table.row([
            size.to_string(),
            n.to_string(),
            m.messages.to_string(),
            format!("{:.3}", m.elapsed.as_secs_f64()),
            format!("{:.0}", m.msgs_per_s()),
            format!("{:.2}", m.mb_per_s()),
            format!("{:.0}", rate(m.messages, m.acked)),
        ]);
        results.push((size, n, m));
    }
    bar.finish_and_clear();
    target.close().await;

    // The 128-byte 1→1 case with each durability, each on its own cluster.
    let mut summary = Vec::new();
    let mut durability = Table::new(
        "throughput_durability",
        &[
            "durability",
            "messages",
            "seconds",
            "msgs_per_s",
            "mb_per_s",
        ],
    );
    if options.index.is_none() {
        let per: u64 = options.pick(400, 100_000, 400_000);
        let bar = target::progress(options, 2 * per, "durability");
        let mut rates = Vec::new();
        for (label, d) in [("memory", Durability::Memory), ("sync", Durability::Sync)] {
            let target = Target::start(
                options,
                Spec {
                    durability: d,
                    ..Spec::peers(1)
                },
            )
            .await?;
            let m = pairs(&target, &unique(&format!("tp.{label}")), 1, 128, per, &bar).await?;
            durability.row([
                label.to_string(),
                m.messages.to_string(),
                format!("{:.3}", m.elapsed.as_secs_f64()),
                format!("{:.0}", m.msgs_per_s()),
                format!("{:.2}", m.mb_per_s()),
            ]);
            rates.push(m.msgs_per_s());
            target.close().await;
        }
        bar.finish_and_clear();
        durability.write(&options.out)?;
        summary.push(format!(
            "sync/memory publish throughput ratio: {:.2}",
            rates[1] / rates[0].max(f64::MIN_POSITIVE)
        ));
    }

    table.write(&options.out)?;
    let mut by_clients = Plot::new(
        "throughput_clients",
        "Messages/s delivered vs publisher→subscriber pairs",
        "pairs",
        "messages/s",
    );
    by_clients.log_x = true;
    for &size in &sizes {
        let points = results
            .iter()
            .filter(|(s, _, _)| *s == size)
            .map(|(_, n, m)| (*n as f64, m.msgs_per_s()))
            .collect();
        by_clients
            .series
            .push(Series::new(size_label(size), points));
    }
    by_clients.write(&options.out)?;
    let mut by_size = Plot::new(
        "throughput_size",
        "MB/s delivered vs payload size",
        "payload bytes",
        "MB/s",
    );
    by_size.log_x = true;
    for &n in &clients {
        let points = results
            .iter()
            .filter(|(_, c, _)| *c == n)
            .map(|(s, _, m)| (*s as f64, m.mb_per_s()))
            .collect();
        let label = if n == 1 {
            "1 pair".to_string()
        } else {
            format!("{n} pairs")
        };
        by_size.series.push(Series::new(label, points));
    }
    by_size.write(&options.out)?;

    println!("{}", table.render());
    if !durability.rows().is_empty() {
        println!();
        println!("{}", durability.render());
    }
    let best = results
        .iter()
        .map(|(_, _, m)| m.msgs_per_s())
        .fold(0.0f64, f64::max);
    let one = results
        .iter()
        .find(|(s, n, _)| *n == 1 && *s == sizes[0])
        .map(|(_, _, m)| m.msgs_per_s())
        .unwrap_or(0.0);
    let mut lines = vec![
        format!(
            "throughput: {one:.0} msgs/s with 1 pair of {}, at best {best:.0} msgs/s",
            size_label(sizes[0])
        ),
        format!(
            "throughput: at best {:.1} MB/s",
            results
                .iter()
                .map(|(_, _, m)| m.mb_per_s())
                .fold(0.0f64, f64::max)
        ),
    ];
    lines.extend(summary);
    Ok(lines)
}
