//! The `api` scenario: latency and throughput of each topic API (create topic, delete
//! topic, publish, subscribe, pull, lookup) with 1, 2, 4 and 8 concurrent clients, each
//! client its own connections, each making its requests one after another.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use peerbus_client::{Client, Retention};

use crate::Options;
use crate::report::{Plot, Series, Table};
use crate::stats::{Latencies, rate};
use crate::target::{Spec, Target, progress};

use super::topics::{unique_prefix, us};

/// The APIs measured, in the order they run (publish fills what pull reads).
const APIS: [&str; 6] = ["create", "delete", "publish", "subscribe", "pull", "lookup"];
/// Concurrent clients.
const CLIENTS: [usize; 4] = [1, 2, 4, 8];
/// Bytes per published message.
const PAYLOAD: usize = 100;

/// Runs `ops` operations on each client at once, each client one after another; `op(c, i)`
/// is client `c`'s `i`-th. Returns every latency and the wall time of the whole run.
async fn phase<F, Fut>(
    clients: &[Client],
    ops: usize,
    bar: &indicatif::ProgressBar,
    op: F,
) -> anyhow::Result<(Latencies, Duration)>
where
    F: Fn(Client, usize, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(clients.len());
    for (c, client) in clients.iter().enumerate() {
        let (client, op, bar) = (client.clone(), op.clone(), bar.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Latencies::new();
            for i in 0..ops {
                let t = Instant::now();
                op(client.clone(), c, i).await?;
                lat.record(t.elapsed());
                bar.inc(1);
            }
            anyhow::Ok(lat)
        }));
    }
    let mut all = Latencies::new();
    for t in tasks {
        all.merge(&t.await.context("a client task failed")??);
    }
    Ok((all, start.elapsed()))
}

/// Runs the scenario; returns its summary lines.
pub(crate) async fn run(options: &Options) -> anyhow::Result<Vec<String>> {
    let ops: usize = options.pick(5, 200, 1_000);
    let target = Target::start(options, Spec::peers(2)).await?;
    let prefix = unique_prefix("api");
    let total: usize = CLIENTS.iter().sum::<usize>() * ops * APIS.len();
    let bar = progress(options, total as u64, "api requests");
    let payload = Bytes::from(vec![b'x'; PAYLOAD]);

    // results[api][k] for CLIENTS[k].
    let mut results: Vec<Vec<(Latencies, Duration)>> = vec![Vec::new(); APIS.len()];
    for &n in &CLIENTS {
        let clients: Vec<Client> = (0..n).map(|_| target.client()).collect();
        for c in &clients {
            // Open each client's index connection outside the measurement.
            c.peers().await.context("cannot reach the index")?;
        }
        let own = |c: usize| format!("{prefix}.x{n}.t{c}");

        let p = prefix.clone();
        let r = phase(&clients, ops, &bar, move |client, c, i| {
            let name = format!("{p}.c{n}.t{c}.{i}");
            async move {
                client
                    .create_topic(&name, None, Retention::default())
                    .await?;
                Ok(())
            }
        })
        .await
        .context("create topic")?;
        results[0].push(r);
        let p = prefix.clone();
        let r = phase(&clients, ops, &bar, move |client, c, i| {
            let name = format!("{p}.c{n}.t{c}.{i}");
            async move {
                client.delete_topic(&name).await?;
                Ok(())
            }
        })
        .await
        .context("delete topic")?;
        results[1].push(r);

        // One topic per client for the message APIs, created and located outside the
        // measurement.
        for (c, client) in clients.iter().enumerate() {
            client
                .create_topic(&own(c), None, Retention::default())
                .await
                .context("creating the clients' topics")?;
            client.lookup(&own(c)).await?;
        }
        let (p, data) = (prefix.clone(), payload.clone());
        let r = phase(&clients, ops, &bar, move |client, c, _| {
            let (topic, data) = (format!("{p}.x{n}.t{c}"), data.clone());
            async move {
                client.publish(&topic, data).await?;
                Ok(())
            }
        })
        .await
        .context("publish")?;
        results[2].push(r);
        let p = prefix.clone();
        let r = phase(&clients, ops, &bar, move |client, c, i| {
            let topic = format!("{p}.x{n}.t{c}");
            async move {
                client.subscribe(&topic, &format!("sub{i}"), None).await?;
                Ok(())
            }
        })
        .await
        .context("subscribe")?;
        results[3].push(r);
        let p = prefix.clone();
        let r = phase(&clients, ops, &bar, move |client, c, i| {
            let topic = format!("{p}.x{n}.t{c}");
            async move {
                let got = client.pull(&topic, "puller", 1, Duration::ZERO).await?;
                anyhow::ensure!(
                    got.len() == 1 && got.first_offset == i as u64,
                    "pull {i} of topic '{topic}' returned {} messages from offset {}",
                    got.len(),
                    got.first_offset
                );
                Ok(())
            }
        })
        .await
        .context("pull")?;
        results[4].push(r);
        let p = prefix.clone();
        let r = phase(&clients, ops, &bar, move |client, c, _| {
            let topic = format!("{p}.x{n}.t{c}");
            async move {
                client.lookup(&topic).await?;
                Ok(())
            }
        })
        .await
        .context("lookup")?;
        results[5].push(r);
        for (c, client) in clients.iter().enumerate() {
            client
                .delete_topic(&own(c))
                .await
                .context("deleting the clients' topics")?;
        }
    }
    bar.finish_and_clear();

    let mut table = Table::new(
        "api",
        &[
            "api",
            "clients",
            "ops",
            "mean_us",
            "p50_us",
            "p99_us",
            "ops_per_s",
        ],
    );
    let mut summary = Vec::new();
    let mut throughput = Plot::new(
        "api",
        &format!("Throughput per API ({ops} requests per client, one at a time)"),
        "concurrent clients",
        "operations per second",
    );
    let mut latency = Plot::new(
        "api_latency",
        "Median latency per API",
        "concurrent clients",
        "p50 latency (µs)",
    );
    for (a, api) in APIS.iter().enumerate() {
        let mut tput = Vec::new();
        let mut p50 = Vec::new();
        for (k, &n) in CLIENTS.iter().enumerate() {
            let (lat, elapsed) = &results[a][k];
            let ops_s = rate(lat.count(), *elapsed);
            table.row([
                api.to_string(),
                n.to_string(),
                lat.count().to_string(),
                us(lat.mean_us()),
                us(lat.p50_us()),
                us(lat.p99_us()),
                format!("{ops_s:.0}"),
            ]);
            tput.push((n as f64, ops_s));
            p50.push((n as f64, lat.p50_us()));
        }
        let (first, last) = (&results[a][0], &results[a][CLIENTS.len() - 1]);
        summary.push(format!(
            "{api}: 1 client {:.0} ops/s (mean {:.3} ms), {} clients {:.0} ops/s (mean {:.3} ms)",
            rate(first.0.count(), first.1),
            first.0.mean_us() / 1000.0,
            CLIENTS[CLIENTS.len() - 1],
            rate(last.0.count(), last.1),
            last.0.mean_us() / 1000.0
        ));
        throughput.series.push(Series::new(*api, tput));
        latency.series.push(Series::new(*api, p50));
    }
    table.write(&options.out)?;
    throughput.write(&options.out)?;
    latency.write(&options.out)?;
    println!("{}", table.render());
    target.close().await;
    Ok(summary)
}
