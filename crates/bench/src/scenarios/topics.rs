//! The `topics` scenario: register many topics (1,000,000 in a full run), check that they
//! are really hosted and found, then measure lookup latency at 100, 1,000 and 10,000
//! queries (and 100,000 in a full run, for a steadier p99) from 8 concurrent clients after
//! a warm-up, and the memory the process gained.
//!
//! Also the loading and lookup helpers the `query` scenario shares.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use peerbus_client::Retention;

use crate::Options;
use crate::report::{Plot, Series, Table};
use crate::stats::{Latencies, rate};
use crate::target::{Spec, Target, progress};

/// Topics per `CreateTopics` request: about 0.5 MB of names, well inside one frame.
const CHUNK: usize = 20_000;
/// `CreateTopics` requests in flight at once, so the index, the peers and the client
/// overlap their work.
const IN_FLIGHT: usize = 4;
/// Concurrent clients for the lookup measurements.
const LOOKUP_CLIENTS: usize = 8;

/// A topic-name prefix no other run (nor anything else on a shared cluster) uses.
pub(crate) fn unique_prefix(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("bench-{what}-{:x}{nanos:08x}", std::process::id())
}

/// The `i`-th topic under `prefix`.
pub(crate) fn topic_name(prefix: &str, i: usize) -> String {
    format!("{prefix}.{i:07}")
}

/// A small, fast pseudo-random sequence (xorshift64*), so picking topics costs nothing
/// next to a lookup and each client's sequence is reproducible.
pub(crate) struct Rng(u64);

impl Rng {
    /// A sequence seeded with `seed` (any value).
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// A number in `0..n` (`n` > 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n as u64) as usize
    }
}

/// How a bulk registration went.
pub(crate) struct Registered {
    /// Wall time from the first request to the last answer.
    pub elapsed: Duration,
    /// `(seconds since start, topics registered so far)` after each answer.
    pub curve: Vec<(f64, u64)>,
    /// Topics per host, as the hosts reported them.
    pub hosts: Vec<(String, String, u64)>,
}

/// Registers `prefix.0000000` … `prefix.{n-1}` through the index's bulk create, in chunks of
/// [`CHUNK`] with [`IN_FLIGHT`] chunks in flight; fails unless the hosts report exactly `n`.
pub(crate) async fn register(
    target: &Target,
    options: &Options,
    prefix: &str,
    n: usize,
) -> anyhow::Result<Registered> {
    let client = target.client();
    // Connect first, so the measurement starts with a warm connection.
    client.peers().await.context("cannot reach the index")?;
    let bar = progress(options, n as u64, "registering");
    let chunks: Vec<(usize, usize)> = (0..n)
        .step_by(CHUNK)
        .map(|lo| (lo, (lo + CHUNK).min(n)))
        .collect();
    let start = Instant::now();
    let mut curve = vec![(0.0, 0)];
    let mut done = 0u64;
    let mut hosts: Vec<(String, String, u64)> = Vec::new();
    let mut pending = futures::stream::iter(chunks.into_iter().map(|(lo, hi)| {
        let client = client.clone();
        let names: Vec<String> = (lo..hi).map(|i| topic_name(prefix, i)).collect();
        async move {
            client
                .create_topics(names, None, Retention::default())
                .await
                .with_context(|| format!("creating topics {lo}..{hi}"))
        }
    }))
    .buffer_unordered(IN_FLIGHT);
    while let Some(created) = pending.next().await {
        for c in created? {
            done += c.count;
            bar.inc(c.count);
            match hosts.iter_mut().find(|h| h.1 == c.addr) {
                Some(h) => h.2 += c.count,
                None => hosts.push((c.peer_name, c.addr, c.count)),
            }
        }
        curve.push((start.elapsed().as_secs_f64(), done));
    }
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    if done != n as u64 {
        bail!("asked for {n} topics but the hosts report {done}");
    }
    Ok(Registered {
        elapsed,
        curve,
        hosts,
    })
}

/// Looks up `sample` random topics of the `n` under `prefix` and checks each is hosted by one
/// of `hosts` (addresses).
pub(crate) async fn verify(
    target: &Target,
    prefix: &str,
    n: usize,
    sample: usize,
    hosts: &[String],
) -> anyhow::Result<()> {
    let client = target.client();
    let mut rng = Rng::new(n as u64);
    let mut picks: Vec<usize> = (0..sample.min(n)).map(|_| rng.below(n)).collect();
    // The ends too: the first and last chunks.
    picks.extend([0, n - 1]);
    for i in picks {
        let name = topic_name(prefix, i);
        let loc = client
            .lookup(&name)
            .await
            .with_context(|| format!("topic '{name}' was registered but its lookup failed"))?;
        if !hosts.contains(&loc.addr) {
            bail!(
                "topic '{name}' is located at {} which reported creating none",
                loc.addr
            );
        }
    }
    Ok(())
}

/// Lookups before the measured ones, whose figures are reported but kept out of the table:
/// right after a bulk registration the stores are still flushing it in the background, and
/// the rows should show lookups in steady state. Returns the summary line.
pub(crate) async fn warm_up(
    target: &Target,
    options: &Options,
    prefix: &str,
    n: usize,
    clients: usize,
) -> anyhow::Result<String> {
    let per_client = options.pick(16, 1_000, 5_000);
    let (warm, _) = lookups(
        target,
        options,
        prefix,
        n,
        clients,
        per_client,
        "warm-up lookups",
    )
    .await?;
    Ok(format!(
        "lookup warm-up, not in the table ({} queries, {clients} clients, right after registering): p50 {:.0} µs, p99 {:.0} µs, mean {:.0} µs",
        warm.count(),
        warm.p50_us(),
        warm.p99_us(),
        warm.mean_us()
    ))
}

/// `clients` concurrent clients, each with its own connections, look up `per_client`
/// random topics of the `n` under `prefix`, one after another. Returns every latency and the
/// wall time of the whole run.
pub(crate) async fn lookups(
    target: &Target,
    options: &Options,
    prefix: &str,
    n: usize,
    clients: usize,
    per_client: usize,
    what: &str,
) -> anyhow::Result<(Latencies, Duration)> {
    let bar = progress(options, (clients * per_client) as u64, what);
    let mut warm = Vec::with_capacity(clients);
    for c in 0..clients {
        let client = target.client();
        // The first request opens the connection; it is not measured.
        client.lookup(&topic_name(prefix, c % n)).await?;
        warm.push(client);
    }
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for (c, client) in warm.into_iter().enumerate() {
        let (bar, prefix) = (bar.clone(), prefix.to_string());
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(c as u64 + 7);
            let mut lat = Latencies::new();
            let names: Vec<String> = (0..per_client)
                .map(|_| topic_name(&prefix, rng.below(n)))
                .collect();
            for (i, name) in names.iter().enumerate() {
                let t = Instant::now();
                client.lookup(name).await?;
                lat.record(t.elapsed());
                if i % 64 == 63 {
                    bar.inc(64);
                }
            }
            anyhow::Ok(lat)
        }));
    }
    let mut all = Latencies::new();
    for t in tasks {
        all.merge(&t.await.context("a lookup client failed")??);
    }
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    Ok((all, elapsed))
}

/// Deletes what a run created on someone else's cluster (an in-process one just stops).
pub(crate) async fn clean_up(
    target: &Target,
    options: &Options,
    prefix: &str,
    n: usize,
) -> anyhow::Result<()> {
    if target.local().is_some() {
        return Ok(());
    }
    let client = target.client();
    let bar = progress(options, n as u64, "deleting");
    let mut deletes = futures::stream::iter((0..n).map(|i| {
        let client = client.clone();
        let name = topic_name(prefix, i);
        async move { client.delete_topic(&name).await }
    }))
    .buffer_unordered(64);
    while let Some(r) = deletes.next().await {
        r.context("deleting the topics this run created")?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(())
}

/// Resident memory gained per topic registered, when both figures are known.
fn per_topic(before: Option<u64>, after: Option<u64>, topics: usize) -> Option<u64> {
    Some(after?.saturating_sub(before?) / (topics.max(1) as u64))
}

/// This process's resident memory, in bytes (Linux), when it can be read.
pub(crate) fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

/// Microseconds with one decimal, for tables.
pub(crate) fn us(v: f64) -> String {
    format!("{v:.1}")
}

/// Runs the scenario; returns its summary lines.
pub(crate) async fn run(options: &Options) -> anyhow::Result<Vec<String>> {
    let n: usize = options.pick(1_000, 100_000, 1_000_000);
    let query_counts: Vec<usize> = options.pick(
        vec![16, 64, 256],
        vec![100, 1_000, 10_000],
        vec![100, 1_000, 10_000, 100_000],
    );
    let target = Target::start(options, Spec::peers(2)).await?;
    let prefix = unique_prefix("topics");

    let rss_before = target.local().and(rss_bytes());
    let reg = register(&target, options, &prefix, n).await?;
    let rss_after = target.local().and(rss_bytes());
    let secs = reg.elapsed.as_secs_f64();
    let addrs: Vec<String> = reg.hosts.iter().map(|h| h.1.clone()).collect();
    verify(&target, &prefix, n, options.pick(100, 1_000, 1_000), &addrs).await?;

    let mut reg_table = Table::new(
        "topics_register",
        &[
            "topics",
            "seconds",
            "topics_per_s",
            "hosts",
            "rss_before_mib",
            "rss_after_mib",
            "bytes_per_topic",
        ],
    );
    let na = || "unavailable".to_string();
    reg_table.row([
        n.to_string(),
        format!("{secs:.3}"),
        format!("{:.0}", rate(n as u64, reg.elapsed)),
        reg.hosts
            .iter()
            .map(|h| format!("{}={}", h.0, h.2))
            .collect::<Vec<_>>()
            .join(" "),
        rss_before.map_or_else(na, mib),
        rss_after.map_or_else(na, mib),
        per_topic(rss_before, rss_after, n).map_or_else(na, |b| b.to_string()),
    ]);

    let mut table = Table::new(
        "topics",
        &[
            "queries",
            "clients",
            "mean_us",
            "p50_us",
            "p99_us",
            "max_us",
            "ops_per_s",
        ],
    );
    let mut summary = vec![format!("registered {n} topics in {secs:.3} s")];
    let (mut p50s, mut p99s, mut means) = (Vec::new(), Vec::new(), Vec::new());
    summary.push(warm_up(&target, options, &prefix, n, LOOKUP_CLIENTS).await?);
    for &q in &query_counts {
        let per_client = q.div_ceil(LOOKUP_CLIENTS);
        let (lat, elapsed) = lookups(
            &target,
            options,
            &prefix,
            n,
            LOOKUP_CLIENTS,
            per_client,
            &format!("{q} lookups"),
        )
        .await?;
        table.row([
            lat.count().to_string(),
            LOOKUP_CLIENTS.to_string(),
            us(lat.mean_us()),
            us(lat.p50_us()),
            us(lat.p99_us()),
            us(lat.max_us()),
            format!("{:.0}", rate(lat.count(), elapsed)),
        ]);
        let x = lat.count() as f64;
        p50s.push((x, lat.p50_us()));
        p99s.push((x, lat.p99_us()));
        means.push((x, lat.mean_us()));
        summary.push(format!(
            "lookup at {} queries ({LOOKUP_CLIENTS} clients, {n} topics): p50 {:.0} µs, p99 {:.0} µs, mean {:.0} µs",
            lat.count(),
            lat.p50_us(),
            lat.p99_us(),
            lat.mean_us()
        ));
    }
    summary.push(match (rss_before, rss_after) {
        (Some(b), Some(a)) => format!(
            "memory: process RSS {} MiB before registering, {} MiB after (+{} MiB, {} bytes per topic; index, peers and bench share this process)",
            mib(b),
            mib(a),
            mib(a.saturating_sub(b)),
            per_topic(rss_before, rss_after, n).unwrap_or_default()
        ),
        _ => "memory: unavailable (the index runs in another process)".to_string(),
    });

    clean_up(&target, options, &prefix, n).await?;

    reg_table.write(&options.out)?;
    table.write(&options.out)?;
    let mut plot = Plot::new(
        "topics",
        &format!("Topic lookup latency with {n} topics registered"),
        "queries",
        "latency (µs)",
    );
    plot.log_x = true;
    plot.series = vec![
        Series::new("p50", p50s),
        Series::new("p99", p99s),
        Series::new("mean", means),
    ];
    plot.write(&options.out)?;
    let mut curve = Plot::new(
        "topics_register",
        &format!("Registering {n} topics (bulk create, {CHUNK} per request)"),
        "seconds",
        "topics registered",
    );
    let points = reg.curve.iter().map(|&(s, n)| (s, n as f64)).collect();
    curve.series = vec![Series::new("registered", points)];
    curve.write(&options.out)?;

    println!("{}", reg_table.render());
    println!();
    println!("{}", table.render());
    target.close().await;
    Ok(summary)
}
