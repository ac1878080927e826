//! The `query` scenario: with many topics loaded on the index (1,000,000 in a full run),
//! the response time of topic lookup with 2, 4 and 8 concurrent clients, each making 1,000
//! requests one after another, after a warm-up that lets the stores settle.

use crate::Options;
use crate::report::{Plot, Series, Table};
use crate::stats::rate;
use crate::target::{Spec, Target};

use super::topics::{clean_up, lookups, register, unique_prefix, us, warm_up};

/// Runs the scenario; returns its summary lines.
pub(crate) async fn run(options: &Options) -> anyhow::Result<Vec<String>> {
    let n: usize = options.pick(1_000, 100_000, 1_000_000);
    let per_client: usize = options.pick(50, 1_000, 1_000);
    let target = Target::start(options, Spec::peers(2)).await?;
    let prefix = unique_prefix("query");
    let loaded = register(&target, options, &prefix, n).await?;

    let mut table = Table::new(
        "query",
        &[
            "clients",
            "requests",
            "mean_us",
            "p50_us",
            "p99_us",
            "max_us",
            "ops_per_s",
        ],
    );
    let mut summary = vec![format!(
        "loaded {n} topics in {:.3} s",
        loaded.elapsed.as_secs_f64()
    )];
    summary.push(warm_up(&target, options, &prefix, n, 8).await?);
    let (mut p50s, mut p99s, mut means) = (Vec::new(), Vec::new(), Vec::new());
    for clients in [2usize, 4, 8] {
        let (lat, elapsed) = lookups(
            &target,
            options,
            &prefix,
            n,
            clients,
            per_client,
            &format!("{clients} clients"),
        )
        .await?;
        table.row([
            clients.to_string(),
            lat.count().to_string(),
            us(lat.mean_us()),
            us(lat.p50_us()),
            us(lat.p99_us()),
            us(lat.max_us()),
            format!("{:.0}", rate(lat.count(), elapsed)),
        ]);
        let x = clients as f64;
        p50s.push((x, lat.p50_us()));
        p99s.push((x, lat.p99_us()));
        means.push((x, lat.mean_us()));
        summary.push(format!(
            "lookup with {clients} clients × {per_client} requests ({n} topics): mean {:.3} ms, p50 {:.3} ms, p99 {:.3} ms, {:.0} lookups/s",
            lat.mean_us() / 1000.0,
            lat.p50_us() / 1000.0,
            lat.p99_us() / 1000.0,
            rate(lat.count(), elapsed)
        ));
    }
    clean_up(&target, options, &prefix, n).await?;

    table.write(&options.out)?;
    let mut plot = Plot::new(
        "query",
        &format!("Topic lookup with {n} topics loaded ({per_client} requests per client)"),
        "concurrent clients",
        "response time (µs)",
    );
    plot.series = vec![
        Series::new("mean", means),
        Series::new("p50", p50s),
        Series::new("p99", p99s),
    ];
    plot.write(&options.out)?;
    println!("{}", table.render());
    target.close().await;
    Ok(summary)
}
