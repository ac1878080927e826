//! The `download` scenario: centralized vs peer-to-peer downloads, and one large file from
//! one and from three sources next to raw loopback TCP.
//!
//! Every peer is a real in-process peer with a share directory; files are written into the
//! shares and offered the way users offer them (the peer's rescan hashes and registers
//! them). A "peer downloading" is a client standing in for that peer: it looks the file up
//! at the index and downloads it from its holders with [`peerbus_client::Client::download`]
//! (verified pieces, temporary file, fsync, rename). Downloads land in a scratch directory
//! outside the shares (on tmpfs when `/dev/shm` exists, so the machine's disk is not what is
//! measured), so the set of holders stays what each task defines.
//!
//! * Task 1 (centralized): P0 holds 60 files; P1..P(N-1) each download 50 of them from P0,
//!   one at a time, all downloaders at once.
//! * Task 2 (peer to peer): every peer holds its own files (10 at N = 6) and downloads 50 it
//!   lacks from their holders. Best case: at every step the downloaders ask different
//!   holders (step s: peer i asks holder i + 1 + s mod (N-1)). Worst case: every peer asks
//!   for the files in the same holder order (all of P0's first, then P1's, ...), so the
//!   requests pile onto one holder at a time.
//! * The same with N up to 32 peers: time until the last downloader is done.
//! * One large file from 1 and from 3 sources, in MB/s, next to a tokio TCP sender/receiver
//!   pair on 127.0.0.1 pushing the same number of bytes, and next to the local work a
//!   verified download cannot skip (reading the file, BLAKE3, writing the copy), each timed
//!   on one core: spread over every core, that work is the ceiling this machine allows.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use peerbus_client::{Client, tree};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Options;
use crate::report::{Plot, Series, Table};
use crate::stats::mb_per_s;
use crate::target::{Spec, Target, progress};

/// Files each downloader fetches in every task (fewer in smoke runs).
const DOWNLOADS: usize = 50;
/// Files P0 holds in task 1 beyond those the downloaders fetch.
const CENTRAL_SPARE: usize = 10;
/// Files each peer holds in task 2 (at least; more when N is small, so 50 exist elsewhere).
const OWN_FILES: usize = 10;
/// How long files may take to be hashed and registered.
const REGISTERED: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Central,
    Best,
    Worst,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Central => "centralized",
            Mode::Best => "p2p-best",
            Mode::Worst => "p2p-worst",
        }
    }
}

/// One task's result: for each downloading peer (by peer number), the time since the task
/// started at which it finished each of its files.
struct TaskRun {
    mode: Mode,
    peers: usize,
    curves: Vec<(usize, Vec<f64>)>,
    bytes: u64,
    elapsed: Duration,
}

impl TaskRun {
    /// Time until the last downloader finished.
    fn makespan(&self) -> f64 {
        self.curves
            .iter()
            .filter_map(|(_, c)| c.last().copied())
            .fold(0.0, f64::max)
    }

    fn mean_peer(&self) -> f64 {
        let ends: Vec<f64> = self
            .curves
            .iter()
            .filter_map(|(_, c)| c.last().copied())
            .collect();
        ends.iter().sum::<f64>() / ends.len().max(1) as f64
    }
}

/// Runs the scenario; returns its summary lines.
pub(crate) async fn run(options: &Options) -> anyhow::Result<Vec<String>> {
    if options.index.is_some() {
        bail!(
            "scenario 'download' starts its own peers with share directories; it cannot run \
             against --index"
        );
    }
    let file_size: usize = options.pick(64 << 10, 1 << 20, 1 << 20);
    let downloads: usize = options.pick(10, DOWNLOADS, DOWNLOADS);
    let sizes: Vec<usize> = options.pick(vec![3], vec![2, 4, 6, 8], vec![2, 4, 6, 8, 16, 32]);
    let large: u64 = options.pick(4 << 20, 256 << 20, 1 << 30);
    let scratch = scratch_dir()?;
    let mut lines = Vec::new();

    // Tasks 1 and 2 at 6 peers (3 in smoke runs), then the same at every size.
    let main_n = options.pick(3, 6, 6);
    let mut runs: Vec<TaskRun> = Vec::new();
    let mut all_n = sizes.clone();
    if !all_n.contains(&main_n) {
        all_n.push(main_n);
        all_n.sort_unstable();
    }
    for &n in &all_n {
        let mut got = tasks_at(options, n, file_size, downloads, scratch.path()).await?;
        runs.append(&mut got);
    }

    let mb = |n: usize| n as f64 / (1 << 20) as f64;
    let mut curves = Table::new(
        "download-curves",
        &["peers", "mode", "peer", "files", "cumulative_s"],
    );
    for r in &runs {
        for (p, c) in &r.curves {
            for (j, t) in c.iter().enumerate() {
                curves.row([
                    r.peers.to_string(),
                    r.mode.name().to_string(),
                    format!("P{p}"),
                    (j + 1).to_string(),
                    format!("{t:.4}"),
                ]);
            }
        }
    }
    curves.write(&options.out)?;

    for r in runs.iter().filter(|r| r.peers == main_n) {
        let (name, title) = match r.mode {
            Mode::Central => (
                "download-task1",
                format!(
                    "Task 1 (centralized): P1-P{} download {downloads} files of {} MiB from P0",
                    main_n - 1,
                    mb(file_size)
                ),
            ),
            Mode::Best => (
                "download-task2-best",
                format!(
                    "Task 2 (P2P, best case): {main_n} peers each download {downloads} files of {} MiB",
                    mb(file_size)
                ),
            ),
            Mode::Worst => (
                "download-task2-worst",
                format!(
                    "Task 2 (P2P, worst case): {main_n} peers each download {downloads} files of {} MiB",
                    mb(file_size)
                ),
            ),
        };
        let mut plot = Plot::new(name, &title, "files downloaded", "cumulative time (s)");
        for (p, c) in &r.curves {
            let points = c
                .iter()
                .enumerate()
                .map(|(j, &t)| ((j + 1) as f64, t))
                .collect();
            plot.series.push(Series::new(format!("P{p}"), points));
        }
        plot.write(&options.out)?;
        lines.push(format!(
            "download {} ({} peers, {} downloaders x {downloads} files of {} MiB): last done in {:.2} s, mean {:.2} s per downloader",
            r.mode.name(),
            r.peers,
            r.curves.len(),
            mb(file_size),
            r.makespan(),
            r.mean_peer()
        ));
    }

    let mut scaling = Table::new(
        "download-scaling",
        &[
            "peers",
            "mode",
            "downloaders",
            "last_done_s",
            "mean_per_downloader_s",
            "aggregate_mb_per_s",
        ],
    );
    let mut plot = Plot::new(
        "download-scaling",
        &format!(
            "Time until every downloader has {downloads} files of {} MiB",
            mb(file_size)
        ),
        "peers",
        "time until the last downloader is done (s)",
    );
    for mode in [Mode::Central, Mode::Best, Mode::Worst] {
        let mut points = Vec::new();
        for r in runs.iter().filter(|r| r.mode == mode) {
            scaling.row([
                r.peers.to_string(),
                mode.name().to_string(),
                r.curves.len().to_string(),
                format!("{:.3}", r.makespan()),
                format!("{:.3}", r.mean_peer()),
                format!("{:.1}", mb_per_s(r.bytes, r.elapsed)),
            ]);
            points.push((r.peers as f64, r.makespan()));
        }
        plot.series.push(Series::new(mode.name(), points));
    }
    scaling.write(&options.out)?;
    plot.write(&options.out)?;
    if options.progress {
        eprintln!("{}", scaling.render());
    }
    let span = |mode: Mode| -> String {
        let rs: Vec<&TaskRun> = runs.iter().filter(|r| r.mode == mode).collect();
        match (rs.first(), rs.last()) {
            (Some(a), Some(b)) => format!(
                "{} {:.2} s at {} peers -> {:.2} s at {}",
                mode.name(),
                a.makespan(),
                a.peers,
                b.makespan(),
                b.peers
            ),
            _ => String::new(),
        }
    };
    lines.push(format!(
        "download scaling: {}; {}; {}",
        span(Mode::Central),
        span(Mode::Best),
        span(Mode::Worst)
    ));

    let big = large_file(options, large, scratch.path()).await?;
    lines.extend(big);
    Ok(lines)
}

/// Scratch space for downloads: tmpfs when there is one.
fn scratch_dir() -> anyhow::Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::Builder::new()
            .prefix("peerbus-bench-")
            .tempdir_in(shm)
            .or_else(|_| tempfile::tempdir())
    } else {
        tempfile::tempdir()
    };
    dir.context("cannot create a scratch directory for downloads")
}

/// Deterministic incompressible bytes: `len` of them from `seed`, written to `path` through
/// a temporary name beside the share (so the peer never hashes a half-written file).
fn write_file(path: &Path, seed: u64, len: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let share = path.parent().context("a share file has a directory")?;
    let tmp = share
        .parent()
        .context("a share has a parent directory")?
        .join(format!(
            ".incoming-{}",
            path.file_name().unwrap_or_default().to_string_lossy()
        ));
    let mut w = std::io::BufWriter::with_capacity(
        1 << 20,
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?,
    );
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for word in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    w.flush()?;
    drop(w);
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move {}", path.display()))?;
    Ok(())
}

/// Waits until the index lists every name in `want` with at least `holders` holders.
async fn wait_registered(
    client: &Client,
    pattern: &str,
    want: &[String],
    holders: usize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + REGISTERED;
    loop {
        if let Ok(hits) = client.search_files(pattern).await {
            let ok = want.iter().all(|name| {
                hits.iter()
                    .any(|h| &h.name == name && h.peers.len() >= holders)
            });
            if ok {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the index did not list the {} '{pattern}' files with {holders} holder(s) within {REGISTERED:?}",
                want.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn central_name(k: usize) -> String {
    format!("central-{k:03}.bin")
}

fn own_name(peer: usize, k: usize) -> String {
    format!("own-p{peer:02}-{k:03}.bin")
}

/// Files each peer holds in task 2 with `n` peers: enough that 50 exist on the others.
fn own_count(n: usize, downloads: usize) -> usize {
    OWN_FILES.max(downloads.div_ceil(n - 1))
}

/// The files peer `i` downloads in task 2, in order.
fn p2p_order(mode: Mode, n: usize, i: usize, downloads: usize) -> Vec<String> {
    match mode {
        Mode::Best => (0..downloads)
            .map(|s| {
                let holder = (i + 1 + s % (n - 1)) % n;
                own_name(holder, s / (n - 1))
            })
            .collect(),
        _ => (0..n)
            .filter(|&h| h != i)
            .flat_map(|h| (0..own_count(n, downloads)).map(move |k| own_name(h, k)))
            .take(downloads)
            .collect(),
    }
}

/// Task 1 and both cases of task 2 on a new cluster of `n` peers.
async fn tasks_at(
    options: &Options,
    n: usize,
    file_size: usize,
    downloads: usize,
    scratch: &Path,
) -> anyhow::Result<Vec<TaskRun>> {
    let target = Target::start(
        options,
        Spec {
            shares: true,
            ..Spec::peers(n)
        },
    )
    .await?;
    let cluster = target.local().context("an in-process cluster")?;
    let client = target.client();

    let (sz, own) = (file_size as u64, own_count(n, downloads));
    let central_files = downloads + CENTRAL_SPARE;
    let (share0, shares): (PathBuf, Vec<PathBuf>) = (
        cluster.peer_share(0),
        (0..n).map(|i| cluster.peer_share(i)).collect(),
    );
    let written = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        for k in 0..central_files {
            write_file(&share0.join(central_name(k)), 1_000 + k as u64, sz)?;
        }
        for (i, share) in shares.iter().enumerate() {
            for k in 0..own {
                write_file(
                    &share.join(own_name(i, k)),
                    (1_000_000 + i * 1_000 + k) as u64,
                    sz,
                )?;
            }
        }
        Ok(())
    });
    written.await??;
    let central: Vec<String> = (0..central_files).map(central_name).collect();
    let owned: Vec<String> = (0..n)
        .flat_map(|i| (0..own).map(move |k| own_name(i, k)))
        .collect();
    wait_registered(&client, "central-", &central, 1).await?;
    wait_registered(&client, "own-p", &owned, 1).await?;

    let mut runs = Vec::new();
    for mode in [Mode::Central, Mode::Best, Mode::Worst] {
        let plans: Vec<(usize, Vec<String>)> = match mode {
            Mode::Central => (1..n)
                .map(|i| (i, central.iter().take(downloads).cloned().collect()))
                .collect(),
            _ => (0..n)
                .map(|i| (i, p2p_order(mode, n, i, downloads)))
                .collect(),
        };
        runs.push(run_task(options, &target, mode, n, plans, sz, scratch).await?);
    }
    target.close().await;
    Ok(runs)
}

/// Every downloader fetches its list one file at a time, all downloaders at once.
async fn run_task(
    options: &Options,
    target: &Target,
    mode: Mode,
    n: usize,
    plans: Vec<(usize, Vec<String>)>,
    file_size: u64,
    scratch: &Path,
) -> anyhow::Result<TaskRun> {
    let total: usize = plans.iter().map(|(_, p)| p.len()).sum();
    let bar = Arc::new(progress(
        options,
        total as u64,
        &format!("{} {n}", mode.name()),
    ));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (peer, plan) in plans {
        let client = target.client();
        let dir = scratch.join(format!("{}-{n}-P{peer}", mode.name()));
        std::fs::create_dir_all(&dir)?;
        let bar = bar.clone();
        tasks.spawn(async move {
            let mut done = Vec::with_capacity(plan.len());
            for name in plan {
                let dest = dir.join(&name);
                client
                    .download(&name, &dest, None)
                    .await
                    .with_context(|| format!("P{peer} downloading {name}"))?;
                done.push(start.elapsed().as_secs_f64());
                bar.inc(1);
                let _ = tokio::fs::remove_file(&dest).await;
            }
            anyhow::Ok((peer, done))
        });
    }
    let mut curves = Vec::new();
    while let Some(r) = tasks.join_next().await {
        curves.push(r.context("a downloader failed")??);
    }
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    curves.sort_by_key(|(p, _)| *p);
    Ok(TaskRun {
        mode,
        peers: n,
        curves,
        bytes: total as u64 * file_size,
        elapsed,
    })
}

/// One `size`-byte file from 1 and from 3 sources, and loopback TCP with the same bytes.
async fn large_file(options: &Options, size: u64, scratch: &Path) -> anyhow::Result<Vec<String>> {
    let target = Target::start(
        options,
        Spec {
            shares: true,
            ..Spec::peers(3)
        },
    )
    .await?;
    let cluster = target.local().context("an in-process cluster")?;
    let client = target.client();
    let name = "large.bin".to_string();
    let first = cluster.peer_share(0).join(&name);
    let path = first.clone();
    tokio::task::spawn_blocking(move || write_file(&path, 42, size)).await??;
    let human = human_size(size);

    let mut table = Table::new(
        "download-large",
        &["transfer", "sources", "bytes", "seconds", "mb_per_s"],
    );
    let mut results = Vec::new();
    for sources in [1usize, 3] {
        for i in 1..sources {
            let copy = cluster.peer_share(i).join(&name);
            if !copy.exists() {
                let from = first.clone();
                tokio::task::spawn_blocking(move || {
                    std::fs::hard_link(&from, &copy)
                        .or_else(|_| std::fs::copy(&from, &copy).map(|_| ()))
                })
                .await??;
            }
        }
        wait_registered(&client, &name, std::slice::from_ref(&name), sources).await?;
        let dest = scratch.join(format!("large-{sources}.bin"));
        let fresh = target.client();
        let start = Instant::now();
        let report = fresh.download(&name, &dest, None).await?;
        let took = start.elapsed();
        if report.sources.len() < sources.min(2) {
            tracing::warn!("the {sources}-source download used {:?}", report.sources);
        }
        let _ = tokio::fs::remove_file(&dest).await;
        let rate = mb_per_s(size, took);
        table.row([
            format!("peerbus download ({} used)", report.sources.len()),
            sources.to_string(),
            size.to_string(),
            format!("{:.3}", took.as_secs_f64()),
            format!("{rate:.1}"),
        ]);
        results.push((sources, took, rate));
    }
    let (source, dir) = (first.clone(), scratch.to_path_buf());
    let work = tokio::task::spawn_blocking(move || local_work(&source, &dir, size)).await??;
    target.close().await;

    // Raw loopback TCP: best of three, so the ratio is not flattered by a slow sample.
    let mut loopback = f64::MIN;
    let mut loop_took = Duration::ZERO;
    for _ in 0..3 {
        let took = loopback_tcp(size).await?;
        let rate = mb_per_s(size, took);
        if rate > loopback {
            (loopback, loop_took) = (rate, took);
        }
    }
    table.row([
        "tokio TCP on 127.0.0.1 (best of 3)".to_string(),
        "-".to_string(),
        size.to_string(),
        format!("{:.3}", loop_took.as_secs_f64()),
        format!("{loopback:.1}"),
    ]);
    for (what, took) in [
        ("read it from the share's file (pread, one core)", work.read),
        ("BLAKE3 it (one core)", work.hash),
        (
            "write it to a new file beside the downloads (one core)",
            work.write,
        ),
    ] {
        table.row([
            what.to_string(),
            "-".to_string(),
            size.to_string(),
            format!("{:.3}", took.as_secs_f64()),
            format!("{:.1}", mb_per_s(size, took)),
        ]);
    }
    // What a verified download cannot avoid: the holder reads the file, both ends copy
    // through the socket (what the loopback pair measures, one core each), the downloader
    // hashes and writes. Spread perfectly over every core, that work is the ceiling.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let core_seconds = (work.read + work.hash + work.write).as_secs_f64()
        + cores.min(2) as f64 * loop_took.as_secs_f64();
    let ceiling = size as f64 / (1 << 20) as f64 / (core_seconds / cores as f64);
    table.row([
        format!("ceiling: all of the above spread over {cores} cores"),
        "-".to_string(),
        size.to_string(),
        format!("{:.3}", core_seconds / cores as f64),
        format!("{ceiling:.1}"),
    ]);
    table.write(&options.out)?;
    if options.progress {
        eprintln!("{}", table.render());
    }

    let mut plot = Plot::new(
        "download-large",
        &format!("One {human} file: download vs raw loopback TCP"),
        "sources",
        "MB/s",
    );
    plot.series.push(Series::new(
        "peerbus download",
        results.iter().map(|&(s, _, r)| (s as f64, r)).collect(),
    ));
    plot.series.push(Series::new(
        "loopback TCP",
        vec![(1.0, loopback), (3.0, loopback)],
    ));
    plot.series.push(Series::new(
        "ceiling: the download's own work on every core",
        vec![(1.0, ceiling), (3.0, ceiling)],
    ));
    plot.write(&options.out)?;

    let best = results.iter().map(|r| r.2).fold(0.0, f64::max);
    let mut lines: Vec<String> = results
        .iter()
        .map(|(s, took, rate)| {
            format!(
                "download {human} from {s} source{}: {:.2} s, {rate:.1} MB/s",
                if *s == 1 { "" } else { "s" },
                took.as_secs_f64()
            )
        })
        .collect();
    lines.push(format!(
        "loopback TCP {human}: {:.2} s, {loopback:.1} MB/s",
        loop_took.as_secs_f64()
    ));
    lines.push(format!(
        "verified download ceiling on {cores} cores: {ceiling:.1} MB/s ({:.3} of loopback): \
         read {:.2} s, BLAKE3 {:.2} s and write {:.2} s per {human} on one core",
        ceiling / loopback.max(f64::MIN_POSITIVE),
        work.read.as_secs_f64(),
        work.hash.as_secs_f64(),
        work.write.as_secs_f64(),
    ));
    lines.push(format!(
        "download/loopback bandwidth ratio: {:.3}",
        if loopback > 0.0 { best / loopback } else { 0.0 }
    ));
    Ok(lines)
}

/// One core's time for each piece of local work a verified download of the file does.
struct LocalWork {
    read: Duration,
    hash: Duration,
    write: Duration,
}

/// Times reading `source` in download-sized pieces, hashing it with BLAKE3 and writing it to a new
/// file in `dir`, each on this thread alone, with one reused buffer.
fn local_work(source: &Path, dir: &Path, size: u64) -> anyhow::Result<LocalWork> {
    use std::os::unix::fs::FileExt;
    let file =
        std::fs::File::open(source).with_context(|| format!("cannot open {}", source.display()))?;
    let len = tree::PIECE_LEN;
    let mut buf = vec![0u8; len as usize];
    let pieces = tree::piece_count(size, len);
    let piece = |i: u64| tree::piece_size(size, len, i);
    let at = |i: u64| i * u64::from(len);
    let start = Instant::now();
    for i in 0..pieces {
        file.read_exact_at(&mut buf[..piece(i)], at(i))?;
    }
    let read = start.elapsed();
    let start = Instant::now();
    let mut hasher = blake3::Hasher::new();
    for i in 0..pieces {
        hasher.update(&buf[..piece(i)]);
    }
    std::hint::black_box(hasher.finalize());
    let hash = start.elapsed();
    let path = dir.join("local-write.bin");
    let out = std::fs::File::create(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    out.set_len(size)?;
    let start = Instant::now();
    for i in 0..pieces {
        out.write_all_at(&buf[..piece(i)], at(i))?;
    }
    let write = start.elapsed();
    drop(out);
    std::fs::remove_file(&path)?;
    Ok(LocalWork { read, hash, write })
}

fn human_size(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

/// Pushes `bytes` through a tokio TCP connection on 127.0.0.1 in 1 MiB writes; returns the
/// time from connecting until the receiver has read the last byte.
async fn loopback_tcp(bytes: u64) -> anyhow::Result<Duration> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let receiver = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while got < bytes {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                anyhow::bail!("the loopback sender closed after {got} bytes");
            }
            got += n as u64;
        }
        anyhow::Ok(Instant::now())
    });
    let start = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let buf = vec![0x5au8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    s.flush().await?;
    let end = receiver.await.context("loopback receiver")??;
    Ok(end - start)
}
