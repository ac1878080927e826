//! The peerbus peer node: hosts topics as durable logs, serves publishers and subscribers,
//! forwards requests for topics hosted elsewhere, and keeps a lease with the index.
//!
//! Publishing assigns offsets under the topic's lock and hands the batch to the node's single
//! storage writer (group commit); the acknowledgement goes out once the batch is durable for
//! the configured [`Durability`], and only then do readers see it.

mod cursors;
mod fetch;
mod lease;
mod node;
mod producers;
pub mod retention;
pub mod share;
mod topic;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use peerbus_net::{ServerConfig, serve};
use peerbus_proto::NodeKind;
use peerbus_store::{Backend, FjallBackend, MemoryBackend};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use node::{Node, PeerService};
use share::Share;

/// Told how hashing the share goes: `(bytes hashed so far, total bytes to hash)`.
pub type HashProgress = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// When a publish is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// After the batch's group commit is fsynced (the default).
    #[default]
    Sync,
    /// After the write reaches the operating system.
    Os,
    /// Kept in memory only; nothing is written to disk.
    Memory,
}

impl std::str::FromStr for Durability {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sync" => Ok(Durability::Sync),
            "os" => Ok(Durability::Os),
            "memory" => Ok(Durability::Memory),
            other => Err(format!(
                "unknown durability {other:?}: expected sync, os or memory"
            )),
        }
    }
}

/// How to run a peer.
#[derive(Clone)]
pub struct PeerConfig {
    /// Address to listen on for the binary protocol.
    pub listen: String,
    /// Address other nodes reach this peer on; defaults to the bound address.
    pub advertise: Option<String>,
    /// The index's address.
    pub index: String,
    /// HTTP address announced to the index, if this peer serves HTTP.
    pub http: Option<String>,
    /// Data directory; `None` keeps everything in memory.
    pub data: Option<PathBuf>,
    /// When publishes are acknowledged.
    pub durability: Durability,
    /// Peer name; defaults to the name saved in the data directory, else `peer-PORT`.
    pub name: Option<String>,
    /// Shared token for every connection (`--auth-token`).
    pub token: Option<String>,
    /// Log every request received, one line each.
    pub trace_messages: bool,
    /// Directory whose files this peer offers for download (`--share`); downloads asked of
    /// this peer land here too. `None` shares nothing.
    pub share: Option<PathBuf>,
    /// Most bytes the copies this peer fetches into its share may take together
    /// (`--fetch-quota`); a fetch past it is refused.
    pub fetch_quota: u64,
    /// How often the share directory is walked again for added, changed and removed files.
    pub rescan: Duration,
    /// Called while [`Peer::start`] hashes the share, e.g. to draw a progress bar.
    pub hash_progress: Option<HashProgress>,
    /// Connections served at once; more are refused with "too many connections".
    pub max_connections: usize,
    /// How long a new connection may take to say hello before it is refused.
    pub hello_timeout: Duration,
    /// How long a connection that has sent no request since its hello may stay silent
    /// before it is closed (see [`peerbus_net::ServerConfig::idle_timeout`]).
    pub idle_timeout: Duration,
}

impl std::fmt::Debug for PeerConfig {
    // By hand: the progress callback has no Debug, and the token is a secret that must not
    // reach logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerConfig")
            .field("listen", &self.listen)
            .field("advertise", &self.advertise)
            .field("index", &self.index)
            .field("http", &self.http)
            .field("data", &self.data)
            .field("durability", &self.durability)
            .field("name", &self.name)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("trace_messages", &self.trace_messages)
            .field("share", &self.share)
            .field("fetch_quota", &self.fetch_quota)
            .field("rescan", &self.rescan)
            .field(
                "hash_progress",
                &self.hash_progress.as_ref().map(|_| "<callback>"),
            )
            .field("max_connections", &self.max_connections)
            .field("hello_timeout", &self.hello_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .finish()
    }
}

/// Default interval between share rescans.
pub const DEFAULT_RESCAN: Duration = Duration::from_secs(5);

/// Default bound on the bytes of fetched copies in a share: 16 GiB.
pub const DEFAULT_FETCH_QUOTA: u64 = 16 << 30;

pub use fetch::{MAX_FETCHES, MIN_FREE_DISK};

impl PeerConfig {
    /// A peer listening on `listen` that registers with the index at `index`, in memory.
    pub fn new(listen: impl Into<String>, index: impl Into<String>) -> Self {
        PeerConfig {
            listen: listen.into(),
            advertise: None,
            index: index.into(),
            http: None,
            data: None,
            durability: Durability::Sync,
            name: None,
            token: None,
            trace_messages: false,
            share: None,
            fetch_quota: DEFAULT_FETCH_QUOTA,
            rescan: DEFAULT_RESCAN,
            hash_progress: None,
            max_connections: peerbus_net::DEFAULT_MAX_CONNECTIONS,
            hello_timeout: peerbus_net::DEFAULT_HELLO_TIMEOUT,
            idle_timeout: peerbus_net::DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Why a peer could not start.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The OS's reason.
        source: std::io::Error,
    },
    /// The data directory could not be opened or read.
    #[error("cannot open peer data in {dir}: {source}")]
    Storage {
        /// The directory.
        dir: String,
        /// What failed.
        source: peerbus_store::StoreError,
    },
    /// The share directory could not be opened or read.
    #[error("cannot share {dir}: {source}")]
    Share {
        /// The directory.
        dir: String,
        /// The OS's reason.
        source: std::io::Error,
    },
}

/// A running peer.
#[derive(Debug)]
pub struct Peer {
    addr: SocketAddr,
    name: String,
    node: Arc<Node>,
    server: JoinHandle<()>,
    lease: JoinHandle<()>,
    rescan: Option<JoinHandle<()>>,
    registered: watch::Receiver<bool>,
}

impl Peer {
    /// Opens storage, binds, hashes the share directory (if any), and starts serving and the
    /// lease with the index. Returns once listening with the share hashed; registration
    /// proceeds in the background (see [`Peer::registered`]).
    pub async fn start(config: PeerConfig, shutdown: CancellationToken) -> Result<Peer, PeerError> {
        let listener =
            TcpListener::bind(&config.listen)
                .await
                .map_err(|source| PeerError::Bind {
                    addr: config.listen.clone(),
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| PeerError::Bind {
            addr: config.listen.clone(),
            source,
        })?;
        let backend: Arc<dyn Backend> = match (&config.data, config.durability) {
            (Some(dir), Durability::Sync | Durability::Os) => {
                let dir = dir.join("store");
                Arc::new(
                    FjallBackend::open(&dir).map_err(|source| PeerError::Storage {
                        dir: dir.display().to_string(),
                        source,
                    })?,
                )
            }
            _ => Arc::new(MemoryBackend::new()),
        };
        let advertise = config.advertise.clone().unwrap_or_else(|| addr.to_string());
        let default_name = format!("peer-{}", addr.port());
        let data_dir = config
            .data
            .as_ref()
            .map(|d| d.display().to_string())
            .unwrap_or_else(|| "memory".into());
        // Hashed before serving, so the first registration offers the whole share.
        let share = match &config.share {
            Some(dir) => {
                let share = Share::open(dir, config.hash_progress.clone())
                    .await
                    .map_err(|source| PeerError::Share {
                        dir: dir.display().to_string(),
                        source,
                    })?;
                let files = share.files();
                tracing::info!(
                    "sharing {} files ({} bytes) from {}",
                    files.len(),
                    files.iter().map(|f| f.size).sum::<u64>(),
                    share.root().display()
                );
                Some(Arc::new(share))
            }
            None => None,
        };
        let mut server_config = ServerConfig::new(NodeKind::Peer);
        server_config.token = config.token.clone();
        server_config.trace_messages = config.trace_messages;
        server_config.max_connections = config.max_connections;
        server_config.hello_timeout = config.hello_timeout;
        server_config.idle_timeout = config.idle_timeout;
        let node = Arc::new(
            Node::open(config, backend, advertise, default_name, share).map_err(|source| {
                PeerError::Storage {
                    dir: data_dir,
                    source,
                }
            })?,
        );
        let name = node.name.clone();
        tracing::info!(
            "peer {name} listening on {addr}, index {}",
            node.config.index
        );
        let service = Arc::new(PeerService { node: node.clone() });
        // The server stops after the lease has left the index, so the index stops sending
        // clients here before connections close.
        let server_stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, service, server_config, server_stop.clone()));
        let rescan = node.share.is_some().then(|| {
            let (node, stop) = (node.clone(), shutdown.clone());
            // A zero interval would spin walking the directory; a tenth of a second is
            // already more often than anyone needs.
            let every = node.config.rescan.max(Duration::from_millis(100));
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = stop.cancelled() => return,
                    }
                    tokio::select! {
                        _ = node.rescan_share() => {}
                        _ = stop.cancelled() => return,
                    }
                }
            })
        });
        let (ready_tx, registered) = watch::channel(false);
        let lease_node = node.clone();
        let lease = tokio::spawn(async move {
            lease::run(lease_node, shutdown, ready_tx).await;
            server_stop.cancel();
        });
        Ok(Peer {
            addr,
            name,
            node,
            server,
            lease,
            rescan,
            registered,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The peer's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The share directory's index, when the peer runs with one.
    pub fn share(&self) -> Option<&Share> {
        self.node.share.as_deref()
    }

    /// Walks the share directory now instead of waiting for the next periodic rescan, and
    /// tells the index what changed. Returns what changed (nothing without a share).
    pub async fn rescan_share(&self) -> share::Changes {
        self.node.rescan_share().await
    }

    /// Waits until the peer holds a lease with the index, up to `timeout`. Returns whether
    /// it did.
    pub async fn registered(&self, timeout: Duration) -> bool {
        let mut rx = self.registered.clone();
        tokio::time::timeout(timeout, rx.wait_for(|r| *r))
            .await
            .is_ok()
    }

    /// Waits for the peer to stop (after the shutdown token is cancelled): it leaves the
    /// index, closes its connections and flushes storage.
    pub async fn wait(self) {
        let _ = self.lease.await;
        let _ = self.server.await;
        if let Some(rescan) = self.rescan {
            let _ = rescan.await;
        }
        self.node.writer.shutdown();
        tracing::info!("peer {} stopped", self.name);
    }
}
