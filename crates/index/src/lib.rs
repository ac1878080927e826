//! The peerbus index server.
//!
//! The index knows which peers are alive, which peer hosts which topic and which peers
//! hold which file. Peers register and hold a lease they renew with keepalives; a peer
//! whose lease runs out is marked inactive and its topics and files leave the directory.
//! Clients look topics and files up here and then talk to the peers directly.
//! `CreateTopic` sent to the index is placed on the least-loaded live peer; other topic
//! requests sent here are forwarded to the host. With [`IndexConfig::replication`] set,
//! the index asks peers to fetch copies of files held by too few live peers.
//!
//! The registry survives restarts: peers keep their ids, cookies and lease deadlines, so an
//! index restarted quickly does not make every peer re-register.

#![warn(missing_docs)]

mod registry;
mod replication;
mod service;
mod storage;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use peerbus_net::ServerConfig;
use peerbus_proto::NodeKind;
use peerbus_store::{Backend, FjallBackend, MemoryBackend, StoreError, Writer};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::service::IndexService;

/// Default lease length.
const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// How an index runs.
#[derive(Clone)]
pub struct IndexConfig {
    /// Address to listen on, e.g. `127.0.0.1:7400` (port 0 picks a free port).
    pub listen: String,
    /// Data directory; the registry is stored in its `store` subdirectory. `None` keeps
    /// everything in memory.
    pub data: Option<PathBuf>,
    /// Lease length: a peer silent for this long is marked inactive.
    pub ttl: Duration,
    /// Shared secret every connection must present (`--auth-token`); also presented when
    /// the index forwards requests to peers.
    pub token: Option<String>,
    /// Log every request received, one line each.
    pub trace_messages: bool,
    /// Keep every file on this many live peers (`--replication R`): files held by fewer
    /// are fetched by other live peers at the index's request. `None` (or less than 2)
    /// leaves copies to the peers.
    pub replication: Option<u32>,
    /// Connections served at once; more are refused with "too many connections".
    pub max_connections: usize,
    /// How long a new connection may take to say hello before it is refused.
    pub hello_timeout: Duration,
    /// How long a connection that has sent no request since its hello may stay silent
    /// before it is closed (see [`peerbus_net::ServerConfig::idle_timeout`]).
    pub idle_timeout: Duration,
}

impl std::fmt::Debug for IndexConfig {
    // The token is a secret: configs end up in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexConfig")
            .field("listen", &self.listen)
            .field("data", &self.data)
            .field("ttl", &self.ttl)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("trace_messages", &self.trace_messages)
            .field("replication", &self.replication)
            .field("max_connections", &self.max_connections)
            .field("hello_timeout", &self.hello_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .finish()
    }
}

impl IndexConfig {
    /// Listens on `listen`, keeps the registry in memory, 30 s leases, no token, no
    /// tracing, no replication.
    pub fn new(listen: impl Into<String>) -> Self {
        IndexConfig {
            listen: listen.into(),
            data: None,
            ttl: DEFAULT_TTL,
            token: None,
            trace_messages: false,
            replication: None,
            max_connections: peerbus_net::DEFAULT_MAX_CONNECTIONS,
            hello_timeout: peerbus_net::DEFAULT_HELLO_TIMEOUT,
            idle_timeout: peerbus_net::DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Why an index could not start.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// The registry storage could not be opened or read.
    #[error("index storage in {}: {source}", dir.display())]
    Storage {
        /// The storage directory (`(memory)` for an in-memory index).
        dir: PathBuf,
        /// What failed.
        #[source]
        source: StoreError,
    },
    /// The lease TTL cannot work.
    #[error("invalid lease ttl {ttl:?}: it must be at least 1 ms")]
    Ttl {
        /// The TTL asked for.
        ttl: Duration,
    },
}

/// A running index server.
pub struct Index {
    addr: SocketAddr,
    server: JoinHandle<()>,
    timer: JoinHandle<()>,
    replicator: Option<JoinHandle<()>>,
    service: Arc<IndexService>,
    writer: Writer,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// How often leases are checked: often enough that an expiry is seen well within a tenth
/// of the TTL, never so often that an idle index spins.
fn expiry_period(ttl: Duration) -> Duration {
    (ttl / 10).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

impl Index {
    /// Binds, loads the registry from storage, spawns the server, the expiry timer and,
    /// with replication, the replication loop; returns once listening. Everything stops when `shutdown` is cancelled; then call
    /// [`Index::wait`].
    pub async fn start(
        config: IndexConfig,
        shutdown: CancellationToken,
    ) -> Result<Index, IndexError> {
        let ttl_ms = u64::try_from(config.ttl.as_millis()).unwrap_or(u64::MAX);
        if ttl_ms == 0 {
            return Err(IndexError::Ttl { ttl: config.ttl });
        }
        let (backend, dir): (Arc<dyn Backend>, PathBuf) = match &config.data {
            Some(data) => {
                let dir = data.join("store");
                // Opening fjall does blocking file I/O and recovery.
                let opened = {
                    let dir = dir.clone();
                    tokio::task::spawn_blocking(move || FjallBackend::open(&dir))
                        .await
                        .unwrap_or_else(|e| {
                            Err(StoreError::Backend(format!(
                                "opening the store failed: {e}"
                            )))
                        })
                };
                let backend = opened.map_err(|source| IndexError::Storage {
                    dir: dir.clone(),
                    source,
                })?;
                (Arc::new(backend), dir)
            }
            None => (Arc::new(MemoryBackend::new()), PathBuf::from("(memory)")),
        };
        let (registry, cleanup) =
            storage::load(&*backend, ttl_ms).map_err(|source| IndexError::Storage {
                dir: dir.clone(),
                source,
            })?;
        let (peers, topics, files) = registry.counts();
        if config.data.is_some() {
            tracing::info!(
                "loaded {peers} peers, {topics} topics and {files} files from {}",
                dir.display()
            );
        }

        let listener =
            TcpListener::bind(&config.listen)
                .await
                .map_err(|source| IndexError::Bind {
                    addr: config.listen.clone(),
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| IndexError::Bind {
            addr: config.listen.clone(),
            source,
        })?;

        let writer = Writer::start(backend);
        if !cleanup.is_empty() {
            writer.submit_detached(cleanup);
        }
        let client = peerbus_client::Client::with_token(addr.to_string(), config.token.clone());
        let service = Arc::new(IndexService::new(
            registry,
            writer.clone(),
            client,
            config.ttl,
        ));

        let mut server_config = ServerConfig::new(NodeKind::Index);
        server_config.token = config.token.clone();
        server_config.trace_messages = config.trace_messages;
        server_config.max_connections = config.max_connections;
        server_config.hello_timeout = config.hello_timeout;
        server_config.idle_timeout = config.idle_timeout;
        let server = tokio::spawn(peerbus_net::serve(
            listener,
            service.clone(),
            server_config,
            shutdown.clone(),
        ));
        let timer = tokio::spawn(expiry_timer(
            service.clone(),
            expiry_period(config.ttl),
            shutdown.clone(),
        ));
        // One copy is what the holder has anyway: nothing to do below two.
        let replication = config.replication.filter(|&r| r >= 2);
        let replicator = replication.map(|r| {
            tokio::spawn(replication::run(
                service.clone(),
                r,
                replication::replication_period(config.ttl),
                shutdown,
            ))
        });
        tracing::info!(
            "index listening on {addr} (lease ttl {} s{})",
            config.ttl.as_secs_f64(),
            match replication {
                Some(r) => format!(", files kept on {r} peers"),
                None => String::new(),
            }
        );
        Ok(Index {
            addr,
            server,
            timer,
            replicator,
            service,
            writer,
        })
    }

    /// The address the index listens on (port 0 resolved).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits until the server has stopped (after the shutdown token is cancelled) and the
    /// registry is flushed to storage.
    pub async fn wait(self) {
        if let Err(e) = self.server.await {
            tracing::error!("the index server task failed: {e}");
        }
        if let Err(e) = self.timer.await {
            tracing::error!("the lease expiry task failed: {e}");
        }
        // Before waiting for the peer tasks: the loop is what spawns fetches.
        if let Some(replicator) = self.replicator
            && let Err(e) = replicator.await
        {
            tracing::error!("the replication task failed: {e}");
        }
        self.service.wait_forwards().await;
        let writer = self.writer;
        // Joining the writer thread blocks until everything queued is fsynced.
        if let Err(e) = tokio::task::spawn_blocking(move || writer.shutdown()).await {
            tracing::error!("flushing the index storage failed: {e}");
        }
        tracing::info!("index at {} stopped", self.addr);
    }
}

async fn expiry_timer(service: Arc<IndexService>, period: Duration, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => service.expire_now(),
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_period_is_a_tenth_of_the_ttl_within_bounds() {
        assert_eq!(
            expiry_period(Duration::from_secs(1)),
            Duration::from_millis(100)
        );
        assert_eq!(
            expiry_period(Duration::from_millis(100)),
            Duration::from_millis(50)
        );
        assert_eq!(
            expiry_period(Duration::from_secs(30)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn config_debug_hides_the_token() {
        let mut c = IndexConfig::new("127.0.0.1:0");
        c.token = Some("s3cret".into());
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert_eq!(c.ttl, Duration::from_secs(30));
        assert!(c.data.is_none() && !c.trace_messages);
        assert_eq!(c.replication, None);
    }
}
