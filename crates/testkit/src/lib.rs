//! A whole peerbus cluster in one process, for tests: an index and N peers on 127.0.0.1
//! port 0, each with its own temporary data directory, that can be stopped, killed and
//! restarted on the same data.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use peerbus_client::Client;
use peerbus_index::{Index, IndexConfig};
use peerbus_peer::{Durability, Peer, PeerConfig};
use tokio_util::sync::CancellationToken;

/// How to build a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Number of peers.
    pub peers: usize,
    /// Lease TTL the index grants.
    pub ttl: Duration,
    /// Durability of every peer.
    pub durability: Durability,
    /// Give every peer a share directory (see [`Cluster::peer_share`]).
    pub shares: bool,
    /// The index's `--replication`.
    pub replication: Option<u32>,
    /// `(max_connections, hello_timeout, idle_timeout)` for the index and every peer;
    /// `None` keeps the production defaults. Small values let tests hit the limits quickly.
    pub server_limits: Option<(usize, Duration, Duration)>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            peers: 3,
            ttl: Duration::from_secs(30),
            durability: Durability::Sync,
            shares: false,
            replication: None,
            server_limits: None,
        }
    }
}

struct Running<T> {
    node: T,
    stop: CancellationToken,
}

/// A running cluster. Dropping it stops every node.
pub struct Cluster {
    dir: tempfile::TempDir,
    options: ClusterOptions,
    index_addr: String,
    index: Option<Running<Index>>,
    peers: Vec<Option<Running<Peer>>>,
    peer_addrs: Vec<String>,
    peer_names: Vec<String>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("index", &self.index_addr)
            .field("peers", &self.peer_addrs)
            .finish()
    }
}

const READY: Duration = Duration::from_secs(15);

impl Cluster {
    /// An index and `peers` peers with default options; returns once every peer holds a lease.
    pub async fn start(peers: usize) -> anyhow::Result<Cluster> {
        Cluster::start_with(ClusterOptions {
            peers,
            ..ClusterOptions::default()
        })
        .await
    }

    /// A cluster built from `options`; returns once every peer holds a lease.
    pub async fn start_with(options: ClusterOptions) -> anyhow::Result<Cluster> {
        let dir = tempfile::tempdir().context("temporary directory")?;
        let mut c = Cluster {
            dir,
            options,
            index_addr: String::new(),
            index: None,
            peers: Vec::new(),
            peer_addrs: Vec::new(),
            peer_names: Vec::new(),
        };
        c.start_index("127.0.0.1:0").await?;
        for i in 0..c.options.peers {
            let r = c.spawn_peer(i, "127.0.0.1:0".into()).await?;
            c.peer_addrs.push(r.node.addr().to_string());
            c.peer_names.push(r.node.name().to_string());
            c.peers.push(Some(r));
        }
        Ok(c)
    }

    async fn start_index(&mut self, listen: &str) -> anyhow::Result<()> {
        let mut config = IndexConfig::new(listen);
        config.data = Some(self.dir.path().join("index"));
        config.ttl = self.options.ttl;
        config.replication = self.options.replication;
        if let Some((max, hello, idle)) = self.options.server_limits {
            config.max_connections = max;
            config.hello_timeout = hello;
            config.idle_timeout = idle;
        }
        let stop = CancellationToken::new();
        let node = Index::start(config, stop.clone()).await?;
        self.index_addr = node.addr().to_string();
        self.index = Some(Running { node, stop });
        Ok(())
    }

    fn peer_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("peer{}", i + 1))
    }

    async fn spawn_peer(&self, i: usize, listen: String) -> anyhow::Result<Running<Peer>> {
        let mut config = PeerConfig::new(listen, self.index_addr.clone());
        if self.options.shares {
            let share = self.peer_share(i);
            std::fs::create_dir_all(&share).context("share directory")?;
            config.share = Some(share);
            // Tests call for changes explicitly; a fast rescan keeps them short.
            config.rescan = Duration::from_millis(200);
        }
        config.data = Some(self.peer_dir(i));
        config.durability = self.options.durability;
        config.name = Some(format!("peer{}", i + 1));
        if let Some((max, hello, idle)) = self.options.server_limits {
            config.max_connections = max;
            config.hello_timeout = hello;
            config.idle_timeout = idle;
        }
        let stop = CancellationToken::new();
        let node = Peer::start(config, stop.clone()).await?;
        if !node.registered(READY).await {
            bail!(
                "peer{} did not register with the index within {READY:?}",
                i + 1
            );
        }
        Ok(Running { node, stop })
    }

    /// The index's address.
    pub fn index_addr(&self) -> String {
        self.index_addr.clone()
    }

    /// Peer `i`'s address (0-based).
    pub fn peer_addr(&self, i: usize) -> String {
        self.peer_addrs[i].clone()
    }

    /// Peer `i`'s name (`peer1`, `peer2`, …).
    pub fn peer_name(&self, i: usize) -> String {
        self.peer_names[i].clone()
    }

    /// Peer `i`'s share directory (with [`ClusterOptions::shares`]).
    pub fn peer_share(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("peer{}-share", i + 1))
    }

    /// Starts one more peer (with a share directory when the cluster has them); returns its
    /// index for the other methods.
    pub async fn add_peer(&mut self) -> anyhow::Result<usize> {
        let i = self.peers.len();
        let r = self.spawn_peer(i, "127.0.0.1:0".into()).await?;
        self.peer_addrs.push(r.node.addr().to_string());
        self.peer_names.push(r.node.name().to_string());
        self.peers.push(Some(r));
        Ok(i)
    }

    /// Peer `i`'s data directory.
    pub fn peer_data(&self, i: usize) -> PathBuf {
        self.peer_dir(i)
    }

    /// A client of this cluster.
    pub fn client(&self) -> Client {
        Client::new(self.index_addr.clone())
    }

    /// Stops peer `i` the way Ctrl-C does: it leaves the index and flushes storage.
    pub async fn stop_peer(&mut self, i: usize) {
        if let Some(r) = self.peers[i].take() {
            r.stop.cancel();
            r.node.wait().await;
        }
    }

    /// Restarts a stopped peer `i` on its old address and data directory; returns once it
    /// holds a lease again.
    pub async fn restart_peer(&mut self, i: usize) -> anyhow::Result<()> {
        self.stop_peer(i).await;
        let r = self.spawn_peer(i, self.peer_addrs[i].clone()).await?;
        self.peers[i] = Some(r);
        Ok(())
    }

    /// Stops the index (flushing its storage) and starts it again on the same address and
    /// data directory.
    pub async fn restart_index(&mut self) -> anyhow::Result<()> {
        self.stop_index().await;
        let addr = self.index_addr.clone();
        self.start_index(&addr).await
    }

    /// Stops every peer and then the index, waiting for each to flush and close its
    /// storage, before the data directory goes away. (Dropping a cluster only asks them to
    /// stop.)
    pub async fn shutdown(mut self) {
        for i in 0..self.peers.len() {
            self.stop_peer(i).await;
        }
        self.stop_index().await;
    }

    /// Stops the index.
    pub async fn stop_index(&mut self) {
        if let Some(r) = self.index.take() {
            r.stop.cancel();
            r.node.wait().await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for r in self.peers.iter().flatten() {
            r.stop.cancel();
        }
        if let Some(r) = &self.index {
            r.stop.cancel();
        }
    }
}
