//! The `files` scenario: file registration, search and lookup at the index with 1, 2, 4 and
//! 8 concurrent peers.
//!
//! Each "peer" is a client holding a real peer identity: it registers with the index
//! (`Register`, getting an id and cookie) and then offers files in that identity's name
//! with `RegisterFiles`, exactly the request a peer's lease sends after scanning its share.
//! No share directory is read and no server listens at the identity's address: the index
//! keeps only names, hashes and sizes, so what is measured is the index's work and the
//! round trip, not disk hashing. Each peer registers its files one request per file (the
//! Napster-style "register" operation), then searches by name and looks files up by hash,
//! every peer at once; a barrier separates the three phases. Identities leave at the end,
//! which withdraws their files.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use peerbus_client::Client;
use peerbus_proto::{FileEntry, PeerAuth, RegisterPeer, Request, Response};
use tokio::sync::Barrier;

use crate::Options;
use crate::report::{Plot, Series, Table};
use crate::stats::{Latencies, rate};
use crate::target::{Spec, Target, progress};

const OPS: [&str; 3] = ["register", "search", "lookup"];

/// What one peer measured in each phase: latencies and how long the phase took it.
type PhaseResults = Vec<(Latencies, Duration)>;

/// Runs the scenario; returns its summary lines.
pub(crate) async fn run(options: &Options) -> anyhow::Result<Vec<String>> {
    let (registers, searches, lookups) =
        options.pick((20, 100, 80), (200, 1_000, 800), (200, 1_000, 800));
    let levels: Vec<usize> = options.pick(vec![1, 2], vec![1, 2, 4, 8], vec![1, 2, 4, 8]);
    let target = Target::start(options, Spec::peers(0)).await?;
    // Identity names must be new to the index, also when it is someone else's cluster.
    let run_id = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() % 1_000_000_000);
    let counts = [registers, searches, lookups];

    let mut table = Table::new(
        "files",
        &[
            "peers",
            "op",
            "ops",
            "ops_per_s",
            "mean_ms",
            "p50_ms",
            "p99_ms",
        ],
    );
    // (peers, op index, ops/s, mean ms)
    let mut points: Vec<(usize, usize, f64, f64)> = Vec::new();
    let mut sequential_search = None;
    let mut at_most = Vec::new();
    for &c in &levels {
        let total: usize = c * (registers + searches + lookups);
        let bar = Arc::new(progress(options, total as u64, &format!("files x{c}")));
        let barrier = Arc::new(Barrier::new(c));
        let names: Vec<String> = (0..c)
            .map(|i| format!("bench-files-{run_id}-c{c}-p{i}"))
            .collect();
        let mut tasks = tokio::task::JoinSet::new();
        for (i, name) in names.iter().enumerate() {
            let (client, barrier, bar) = (target.client(), barrier.clone(), bar.clone());
            let (name, names) = (name.clone(), names.clone());
            tasks.spawn(async move {
                peer_run(&client, &name, &names, i, counts, &barrier, &bar).await
            });
        }
        let mut phases: Vec<(Latencies, Duration)> = vec![(Latencies::new(), Duration::ZERO); 3];
        while let Some(r) = tasks.join_next().await {
            let r = r.context("a files worker failed")??;
            for (p, (l, d)) in phases.iter_mut().zip(r) {
                p.0.merge(&l);
                p.1 = p.1.max(d);
            }
        }
        bar.finish_and_clear();
        for (op, (l, d)) in phases.iter().enumerate() {
            let ops = l.count();
            let per_s = rate(ops, *d);
            table.row([
                c.to_string(),
                OPS[op].to_string(),
                ops.to_string(),
                format!("{per_s:.0}"),
                format!("{:.3}", l.mean_us() / 1e3),
                format!("{:.3}", l.p50_us() / 1e3),
                format!("{:.3}", l.p99_us() / 1e3),
            ]);
            points.push((c, op, per_s, l.mean_us() / 1e3));
            if c == 1 && op == 1 {
                sequential_search = Some(l.clone());
            }
            if Some(&c) == levels.last() {
                at_most.push(format!(
                    "files {} with {c} concurrent peers: {per_s:.0} ops/s, mean {:.3} ms, p99 {:.3} ms",
                    OPS[op],
                    l.mean_us() / 1e3,
                    l.p99_us() / 1e3
                ));
            }
        }
    }
    table.write(&options.out)?;
    if options.progress {
        eprintln!("{}", table.render());
    }

    let mut latency = Plot::new(
        "files-latency",
        "File operations at the index: mean response time",
        "concurrent peers",
        "mean response (ms)",
    );
    let mut throughput = Plot::new(
        "files-throughput",
        "File operations at the index: throughput",
        "concurrent peers",
        "operations per second",
    );
    for (op, name) in OPS.iter().enumerate() {
        let of_op = points.iter().filter(|p| p.1 == op);
        latency.series.push(Series::new(
            *name,
            of_op.clone().map(|p| (p.0 as f64, p.3)).collect(),
        ));
        throughput.series.push(Series::new(
            *name,
            of_op.map(|p| (p.0 as f64, p.2)).collect(),
        ));
    }
    latency.write(&options.out)?;
    throughput.write(&options.out)?;

    let mut lines = at_most;
    if let Some(l) = sequential_search {
        lines.push(format!(
            "files search over {} sequential requests: average {:.3} ms, p50 {:.3} ms, p99 {:.3} ms",
            l.count(),
            l.mean_us() / 1e3,
            l.p50_us() / 1e3,
            l.p99_us() / 1e3
        ));
    }
    target.close().await;
    Ok(lines)
}

fn entry(peer: &str, k: usize) -> FileEntry {
    let name = format!("{peer}/file-{k:04}.dat");
    FileEntry {
        hash: blake3::hash(name.as_bytes()).to_hex().to_string(),
        size: 4_096 * (k as u64 + 1),
        name,
    }
}

/// A small deterministic generator, so every run asks the same questions.
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// One peer: register an identity, then `counts` register, search and lookup operations,
/// waiting at `barrier` before each phase; leaves at the end.
async fn peer_run(
    client: &Client,
    name: &str,
    all: &[String],
    me: usize,
    counts: [usize; 3],
    barrier: &Barrier,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<PhaseResults> {
    let auth = match client
        .index_request(Request::Register(RegisterPeer {
            name: name.to_string(),
            addr: format!("{name}.bench.invalid:7000"),
            http: None,
            previous: None,
            keeps_identity: false,
        }))
        .await
        .with_context(|| format!("registering {name}"))?
    {
        Response::Registered {
            peer_id, cookie, ..
        } => PeerAuth { peer_id, cookie },
        other => bail!("the index answered {other:?} to a registration"),
    };
    let result = phases(client, &auth, name, all, me, counts, barrier, bar).await;
    // Leaving withdraws the identity's files, so the index is left as it was.
    let _ = client.index_request(Request::Leave(auth)).await;
    result
}

#[allow(clippy::too_many_arguments)]
async fn phases(
    client: &Client,
    auth: &PeerAuth,
    name: &str,
    all: &[String],
    me: usize,
    [registers, searches, lookups]: [usize; 3],
    barrier: &Barrier,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<PhaseResults> {
    let mut out = Vec::new();
    let mut x = 0x2545_F491_4F6C_DD1D ^ (me as u64 + 1);

    barrier.wait().await;
    let (mut l, start) = (Latencies::new(), Instant::now());
    for k in 0..registers {
        let t = Instant::now();
        client
            .register_files(auth, vec![entry(name, k)], false)
            .await
            .with_context(|| format!("{name} registering file {k}"))?;
        l.record(t.elapsed());
        bar.inc(1);
    }
    out.push((l, start.elapsed()));

    // Everyone has registered before anyone searches, so every question has an answer.
    barrier.wait().await;
    let (mut l, start) = (Latencies::new(), Instant::now());
    for _ in 0..searches {
        let peer = &all[next(&mut x) as usize % all.len()];
        let k = next(&mut x) as usize % registers;
        let pattern = format!("{peer}/file-{k:04}");
        let t = Instant::now();
        let hits = client.search_files(&pattern).await?;
        l.record(t.elapsed());
        if hits.len() != 1 {
            bail!("search for '{pattern}' found {} files, not 1", hits.len());
        }
        bar.inc(1);
    }
    out.push((l, start.elapsed()));

    barrier.wait().await;
    let (mut l, start) = (Latencies::new(), Instant::now());
    for _ in 0..lookups {
        let peer = &all[next(&mut x) as usize % all.len()];
        let want = entry(peer, next(&mut x) as usize % registers);
        let t = Instant::now();
        let hit = client.lookup_file(&want.hash).await?;
        l.record(t.elapsed());
        if hit.name != want.name {
            bail!("lookup of {} found '{}'", want.hash, hit.name);
        }
        bar.inc(1);
    }
    out.push((l, start.elapsed()));
    // Nobody leaves (withdrawing its files) while others may still look them up.
    barrier.wait().await;
    Ok(out)
}
