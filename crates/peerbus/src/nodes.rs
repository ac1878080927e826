//! `peerbus index`, `peerbus peer` and `peerbus up`: run nodes until Ctrl-C or SIGTERM.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use peerbus_index::{Index, IndexConfig};
use peerbus_peer::{Durability, Peer, PeerConfig};
use tokio_util::sync::CancellationToken;

use crate::{Cli, Command, DataArgs, logging};

/// Prints a line to stdout, ignoring a closed pipe: `peerbus up | head` must still stop
/// cleanly instead of panicking on its farewell lines.
macro_rules! say {
    () => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout());
    }};
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

fn level(verbose: u8) -> &'static str {
    match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    }
}

/// Resolves when the process is asked to stop (Ctrl-C or SIGTERM).
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn data_dir(data: &DataArgs, default: PathBuf) -> Option<PathBuf> {
    if data.in_memory {
        None
    } else {
        Some(data.data.clone().unwrap_or(default))
    }
}

fn log_file(dir: Option<&Path>) -> Option<PathBuf> {
    dir.map(|d| d.join("peerbus.log"))
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    match cli.command {
        Command::Index {
            ref listen,
            ref http,
            ref data,
            ttl,
            replication,
        } => {
            let dir = data_dir(data, PathBuf::from("peerbus-data/index"));
            logging::init(
                level(cli.verbose),
                cli.trace_messages,
                log_file(dir.as_deref()).as_deref(),
            )?;
            let mut config = IndexConfig::new(listen.clone());
            config.data = dir;
            config.ttl = Duration::from_secs(ttl.max(1));
            config.replication = replication;
            config.token = cli.auth_token.clone();
            config.trace_messages = cli.trace_messages;
            let index = Index::start(config, shutdown.clone()).await?;
            eprintln!("peerbus index listening on {}", index.addr());
            let gateway = if http == "off" {
                None
            } else {
                Some(start_http(http, index.addr().to_string(), "index", &cli, &shutdown).await?)
            };
            stop_signal().await;
            tracing::info!("stopping the index");
            shutdown.cancel();
            index.wait().await;
            if let Some(g) = gateway {
                let _ = g.await;
            }
            Ok(())
        }
        Command::Peer {
            ref listen,
            ref advertise,
            ref http,
            ref data,
            ref name,
            durability,
            ref share,
            fetch_quota,
        } => {
            let port = listen.rsplit(':').next().unwrap_or("0");
            let default_dir = PathBuf::from("peerbus-data")
                .join(name.clone().unwrap_or_else(|| format!("peer-{port}")));
            let dir = data_dir(data, default_dir);
            logging::init(
                level(cli.verbose),
                cli.trace_messages,
                log_file(dir.as_deref()).as_deref(),
            )?;
            let mut config = PeerConfig::new(listen.clone(), cli.index.clone());
            config.advertise = advertise.clone();
            config.data = dir;
            config.durability = if data.in_memory {
                Durability::Memory
            } else {
                durability
            };
            config.name = name.clone();
            config.token = cli.auth_token.clone();
            config.trace_messages = cli.trace_messages;
            config.share = share.clone();
            config.fetch_quota = fetch_quota;
            let bar = crate::progress::hashing_bar();
            if let Some(bar) = &bar {
                let bar = bar.clone();
                config.hash_progress = Some(std::sync::Arc::new(move |done: u64, total: u64| {
                    bar.set_length(total);
                    bar.set_position(done);
                }));
            }
            // Bound before the peer registers, so the index learns a working HTTP address.
            let http_listener = match http.as_deref() {
                // As for the index: "off" serves no HTTP.
                Some("off") | None => None,
                Some(addr) => Some(bind_http(addr).await?),
            };
            config.http = http_listener
                .as_ref()
                .and_then(|l| l.local_addr().ok())
                .map(|a| a.to_string());
            let peer = Peer::start(config, shutdown.clone()).await?;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            eprintln!("peerbus peer {} listening on {}", peer.name(), peer.addr());
            let gateway = http_listener.map(|l| {
                serve_http(
                    l,
                    cli.index.clone(),
                    peer.name().to_string(),
                    &cli,
                    &shutdown,
                )
            });
            stop_signal().await;
            tracing::info!("stopping peer {}", peer.name());
            shutdown.cancel();
            peer.wait().await;
            if let Some(g) = gateway {
                let _ = g.await;
            }
            Ok(())
        }
        Command::Up { peers, ref data } => up(&cli, peers, data, shutdown).await,
        _ => unreachable!("client commands are run by commands::run"),
    }
}

async fn bind_http(addr: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for HTTP on {addr}"))
}

async fn bind_http_or_any(
    addr: &str,
    host: std::net::IpAddr,
) -> anyhow::Result<tokio::net::TcpListener> {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(_) => bind_http(&format!("{host}:0")).await,
    }
}

fn serve_http(
    listener: tokio::net::TcpListener,
    index: String,
    node: String,
    cli: &Cli,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    eprintln!("peerbus {node} serving HTTP and the dashboard on http://{addr}/");
    if cli.auth_token.is_none() && listener.local_addr().is_ok_and(|a| !a.ip().is_loopback()) {
        eprintln!(
            "warning: the HTTP API on {addr} is reachable from other machines and has no \
             --auth-token: anyone who can reach it can publish, pull and delete"
        );
    }
    let config = peerbus_http::HttpConfig {
        index,
        node,
        token: cli.auth_token.clone(),
    };
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        if let Err(e) = peerbus_http::serve(listener, config, shutdown).await {
            tracing::error!("HTTP server on {addr} failed: {e}");
        }
    })
}

async fn start_http(
    addr: &str,
    index: String,
    node: &str,
    cli: &Cli,
    shutdown: &CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = bind_http(addr).await?;
    Ok(serve_http(listener, index, node.to_string(), cli, shutdown))
}

async fn up(
    cli: &Cli,
    peers: usize,
    data: &Path,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(data)
        .with_context(|| format!("cannot create data directory {}", data.display()))?;
    // The terminal shows the banner and warnings; the log file gets the INFO lines too.
    let terminal = (cli.verbose == 0 && !cli.trace_messages).then_some("warn");
    logging::init_with(
        level(cli.verbose),
        terminal,
        cli.trace_messages,
        Some(&data.join("peerbus.log")),
    )?;
    let mut config = IndexConfig::new(cli.index.clone());
    config.data = Some(data.join("index"));
    config.token = cli.auth_token.clone();
    config.trace_messages = cli.trace_messages;
    // The index stops only after every peer has left it.
    let index_stop = CancellationToken::new();
    let index = Index::start(config, index_stop.clone())
        .await
        .with_context(|| format!("cannot start the index on {} (is another peerbus running? set --index to another address)", cli.index))?;
    let index_addr = index.addr();
    let host = index_addr.ip();
    // HTTP ports sit 80 above the binary ones (7400 → 7480), or anywhere when taken.
    let http_port = |base: u16| format!("{host}:{}", base as usize + 80);
    let index_http = bind_http_or_any(&http_port(index_addr.port()), host).await?;
    let index_http_addr = index_http.local_addr()?;
    let mut gateways = vec![serve_http(
        index_http,
        index_addr.to_string(),
        "index".into(),
        cli,
        &index_stop,
    )];
    let mut running = Vec::new();
    for i in 0..peers {
        let name = format!("peer{}", i + 1);
        // Next to the index's port when free, so addresses are easy to read; else any port.
        let preferred = format!("{host}:{}", index_addr.port() as usize + 1 + i);
        let mut config = PeerConfig::new(preferred.clone(), index_addr.to_string());
        config.data = Some(data.join(&name));
        config.name = Some(name.clone());
        config.token = cli.auth_token.clone();
        config.trace_messages = cli.trace_messages;
        let peer_http =
            bind_http_or_any(&http_port(index_addr.port() + 1 + i as u16), host).await?;
        config.http = Some(peer_http.local_addr()?.to_string());
        gateways.push(serve_http(
            peer_http,
            index_addr.to_string(),
            name.clone(),
            cli,
            &shutdown,
        ));
        let peer = match Peer::start(config.clone(), shutdown.clone()).await {
            Ok(p) => p,
            Err(peerbus_peer::PeerError::Bind { .. }) => {
                config.listen = format!("{host}:0");
                Peer::start(config, shutdown.clone()).await?
            }
            Err(e) => return Err(e.into()),
        };
        running.push(peer);
    }
    for p in &running {
        if !p.registered(Duration::from_secs(10)).await {
            anyhow::bail!(
                "peer {} did not register with the index within 10 s",
                p.name()
            );
        }
    }
    say!(
        "peerbus is up: an index and {peers} peers, data in {}",
        data.display()
    );
    say!("  index  {index_addr}   dashboard http://{index_http_addr}/");
    for p in &running {
        say!("  {:<6} {}", p.name(), p.addr());
    }
    say!("  logs   {}", data.join("peerbus.log").display());
    say!();
    say!("Try, in another terminal:");
    say!("  peerbus topic create news");
    say!("  peerbus publish news \"hello\" \"world\"");
    say!("  peerbus pull news --as alice");
    say!();
    say!("Ctrl-C stops everything.");
    stop_signal().await;
    say!("stopping: peers leave the index, then the index stops");
    shutdown.cancel();
    for p in running {
        p.wait().await;
    }
    index_stop.cancel();
    index.wait().await;
    for g in gateways {
        let _ = g.await;
    }
    say!("stopped");
    Ok(())
}
