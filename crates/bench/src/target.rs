//! The cluster a scenario runs against: started in-process on port 0 with temporary data
//! directories, or an existing one reached through its index (`--index`).

use peerbus_client::Client;
use peerbus_peer::Durability;
use peerbus_testkit::{Cluster, ClusterOptions};

use crate::Options;

/// What a scenario needs from a cluster it starts itself.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Number of peers.
    pub peers: usize,
    /// When peers acknowledge a publish.
    pub durability: Durability,
    /// Give every peer a share directory.
    pub shares: bool,
}

impl Spec {
    /// `peers` peers, memory durability, no shares.
    pub fn peers(peers: usize) -> Spec {
        Spec {
            peers,
            durability: Durability::Memory,
            shares: false,
        }
    }
}

/// A running cluster.
#[derive(Debug)]
pub enum Target {
    /// Started by the scenario, stopped when dropped.
    Local(Box<Cluster>),
    /// Someone else's; left as it was found except for what the scenario created.
    Remote {
        /// The index address.
        index: String,
        /// The token its nodes require.
        token: Option<String>,
    },
}

impl Target {
    /// The cluster `options` names, or a new one made to `spec`.
    pub async fn start(options: &Options, spec: Spec) -> anyhow::Result<Target> {
        match &options.index {
            Some(index) => Ok(Target::Remote {
                index: index.clone(),
                token: options.token.clone(),
            }),
            None => {
                let cluster = Cluster::start_with(ClusterOptions {
                    peers: spec.peers,
                    durability: spec.durability,
                    shares: spec.shares,
                    ..ClusterOptions::default()
                })
                .await?;
                Ok(Target::Local(Box::new(cluster)))
            }
        }
    }

    /// The index's address.
    pub fn index(&self) -> String {
        match self {
            Target::Local(c) => c.index_addr(),
            Target::Remote { index, .. } => index.clone(),
        }
    }

    /// A new client (its own connections) of this cluster.
    pub fn client(&self) -> Client {
        match self {
            Target::Local(c) => c.client(),
            Target::Remote { index, token } => Client::with_token(index.clone(), token.clone()),
        }
    }

    /// Stops an in-process cluster and waits for its nodes to close their storage, so
    /// nothing is still writing when its directory is removed; a remote one is left as is.
    pub async fn close(self) {
        if let Target::Local(c) = self {
            c.shutdown().await;
        }
    }

    /// The in-process cluster, for scenarios that need its peers' shares or addresses.
    pub fn local(&self) -> Option<&Cluster> {
        match self {
            Target::Local(c) => Some(c),
            Target::Remote { .. } => None,
        }
    }

    /// The in-process cluster, mutably (to add or stop peers).
    pub fn local_mut(&mut self) -> Option<&mut Cluster> {
        match self {
            Target::Local(c) => Some(c),
            Target::Remote { .. } => None,
        }
    }
}

/// A progress bar for `total` steps of `what`, hidden when `options.progress` is off.
pub fn progress(options: &Options, total: u64, what: &str) -> indicatif::ProgressBar {
    if !options.progress {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>14} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})",
        )
        .expect("valid progress template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}
