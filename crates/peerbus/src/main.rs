//! The `peerbus` command: runs nodes (`index`, `peer`, `up`) and talks to a cluster.

mod commands;
mod logging;
mod nodes;
mod progress;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// peerbus: peer-to-peer publish/subscribe.
#[derive(Parser, Debug)]
#[command(name = "peerbus", version, about, propagate_version = true)]
pub struct Cli {
    /// The index server's address.
    #[arg(
        long,
        global = true,
        env = "PEERBUS_INDEX",
        default_value = "127.0.0.1:7400"
    )]
    pub index: String,
    /// Print one JSON object per line on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// More log output (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Print every protocol message a node receives, one line each.
    #[arg(long, global = true)]
    pub trace_messages: bool,
    /// Shared token nodes require (`--auth-token` on the nodes).
    #[arg(long, global = true, env = "PEERBUS_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Where a node keeps its data.
#[derive(Args, Debug, Clone)]
pub struct DataArgs {
    /// Data directory.
    #[arg(long, conflicts_with = "in_memory")]
    pub data: Option<PathBuf>,
    /// Keep everything in memory; nothing survives a restart.
    #[arg(long)]
    pub in_memory: bool,
}

/// Commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the index server.
    Index {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7400")]
        listen: String,
        /// Address for the HTTP API and dashboard ("off" to serve none).
        #[arg(long, default_value = "127.0.0.1:7480")]
        http: String,
        #[command(flatten)]
        data: DataArgs,
        /// Lease TTL in seconds; a peer silent this long is marked inactive.
        #[arg(long, default_value_t = 30)]
        ttl: u64,
        /// Keep every file on this many live peers, asking peers to fetch copies.
        #[arg(long)]
        replication: Option<u32>,
    },
    /// Run a peer node.
    Peer {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7401")]
        listen: String,
        /// Address other nodes reach this peer on (default: the listen address).
        #[arg(long)]
        advertise: Option<String>,
        /// Address for the HTTP API and dashboard (default: none; "off" also serves none).
        #[arg(long)]
        http: Option<String>,
        #[command(flatten)]
        data: DataArgs,
        /// Peer name (default: saved name, else peer-PORT).
        #[arg(long)]
        name: Option<String>,
        /// When a publish is acknowledged: sync (after fsync), os, or memory.
        #[arg(long, default_value = "sync")]
        durability: peerbus_peer::Durability,
        /// Share every file under this directory (hashed at start, rescanned while running).
        #[arg(long)]
        share: Option<PathBuf>,
        /// Most bytes the copies this peer fetches from others into its share may take.
        #[arg(long, default_value_t = peerbus_peer::DEFAULT_FETCH_QUOTA)]
        fetch_quota: u64,
    },
    /// Run an index and N peers in one process on loopback.
    Up {
        /// Number of peers.
        #[arg(long, default_value_t = 3)]
        peers: usize,
        /// Data directory for every node.
        #[arg(long, default_value = "./peerbus-data")]
        data: PathBuf,
    },
    /// Run a benchmark scenario, writing CSV and PNG files; the summary line comes last.
    /// With --index, it runs against that existing cluster instead of starting one.
    Bench {
        /// api, query, topics, throughput, pingpong, files, download or compare.
        scenario: peerbus_bench::Scenario,
        /// A smaller workload that finishes in under a minute.
        #[arg(long)]
        quick: bool,
        /// Directory for the CSV and PNG files.
        #[arg(long, default_value = "bench-results")]
        out: PathBuf,
    },
    /// Create, delete, list and look up topics.
    #[command(subcommand)]
    Topic(TopicCommand),
    /// Publish messages ("-" reads one message per stdin line).
    #[command(alias = "pub")]
    Publish {
        /// The topic.
        topic: String,
        /// The messages.
        #[arg(required = true)]
        messages: Vec<String>,
    },
    /// Subscribe; with --follow, stream messages as they are published.
    #[command(alias = "sub")]
    Subscribe {
        /// The topics.
        #[arg(required = true)]
        topics: Vec<String>,
        /// Subscriber name.
        #[arg(long = "as", value_name = "ID")]
        subscriber: String,
        /// Stream messages until interrupted.
        #[arg(long)]
        follow: bool,
        /// Where to start: earliest, latest or an offset.
        #[arg(long)]
        from: Option<String>,
    },
    /// Print the messages this subscriber has not pulled yet.
    Pull {
        /// The topic.
        topic: String,
        /// Subscriber name.
        #[arg(long = "as", value_name = "ID")]
        subscriber: String,
        /// At most this many messages.
        #[arg(long)]
        max: Option<u64>,
        /// Print without acknowledging: the next pull prints the same messages until
        /// `peerbus ack` (at most one batch of 8,192 messages or 4 MiB).
        #[arg(long)]
        no_commit: bool,
    },
    /// Acknowledge a subscriber's messages up to and including an offset.
    Ack {
        /// The topic.
        topic: String,
        /// Subscriber name.
        #[arg(long = "as", value_name = "ID")]
        subscriber: String,
        /// The last offset the subscriber has processed.
        #[arg(long)]
        offset: u64,
    },
    /// Remove a subscription and its position.
    Unsubscribe {
        /// The topic.
        topic: String,
        /// Subscriber name.
        #[arg(long = "as", value_name = "ID")]
        subscriber: String,
    },
    /// List the subscribers of a topic.
    Subscribers {
        /// The topic.
        topic: String,
    },
    /// List every peer the index knows.
    Peers,
    /// A peer's own file index, asked of the peer directly.
    Files {
        /// The peer's address.
        #[arg(long)]
        peer: String,
    },
    /// Find files by name (case-insensitive substring).
    Search {
        /// Part of the name.
        pattern: String,
        /// Ask every active peer for its own index instead of the index server.
        #[arg(long)]
        distributed: bool,
    },
    /// Download a file by name or hash from every peer holding it.
    Get {
        /// File name or BLAKE3 hash.
        key: String,
        /// Where to write it (default: the file's name in the current directory). With
        /// --peer, this command downloads it here too.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Ask this peer to download it into its share directory (at a place the peer
        /// chooses) and offer it.
        #[arg(long)]
        peer: Option<String>,
    },
}

/// Topic commands.
#[derive(Subcommand, Debug)]
pub enum TopicCommand {
    /// Create topics.
    Create {
        /// Topic names; "-" reads one name per stdin line. Many names are created in bulk.
        #[arg(required = true)]
        names: Vec<String>,
        /// Host them on this peer (name or address); default: the least-loaded live peer.
        #[arg(long)]
        peer: Option<String>,
        /// Keep at most this many messages.
        #[arg(long)]
        max_messages: Option<u64>,
        /// Keep at most this many payload bytes (default 1 GiB).
        #[arg(long)]
        max_bytes: Option<u64>,
        /// Drop messages older than this many seconds.
        #[arg(long)]
        max_age: Option<u64>,
        /// Drop a message once every subscriber has pulled it.
        #[arg(long)]
        consumed: bool,
    },
    /// Delete topics and their data.
    Delete {
        /// Topic names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// List topics.
    List {
        /// Only names starting with this.
        #[arg(long)]
        prefix: Option<String>,
    },
    /// Print the hosting peer's name and address.
    Lookup {
        /// Topic name.
        name: String,
    },
}

/// Fixes glibc's mmap threshold at 1 MiB. Left alone, glibc raises the threshold to the size
/// of any mapped block that is freed, after which multi-megabyte frames and batches come from
/// its arenas, where they fragment and stay: a peer with a stalled subscriber grew to
/// 450–550 MiB that way while 2 GiB went through it, against 111 MiB with the fixed
/// threshold, which hands every such buffer back to the system when it is freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn fix_malloc_threshold() {
    // SAFETY: mallopt only sets an allocator parameter; it is called first thing in main,
    // before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn fix_malloc_threshold() {}

fn main() {
    fix_malloc_threshold();
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    // `bench` starts its own cluster unless --index (or PEERBUS_INDEX) names one.
    let index_given = !matches!(
        matches.value_source("index"),
        None | Some(clap::parser::ValueSource::DefaultValue)
    );
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = rt.block_on(run(cli, index_given));
    // Do not wait for stray tasks (a follow stream's reader) at exit.
    rt.shutdown_background();
    if let Err(e) = result {
        eprintln!("error: {}", one_line(&e));
        std::process::exit(1);
    }
}

/// The error and its causes on one line, skipping causes whose text the line already holds
/// (library errors often print their source themselves).
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

async fn run(cli: Cli, index_given: bool) -> anyhow::Result<()> {
    match &cli.command {
        Command::Index { .. } | Command::Peer { .. } | Command::Up { .. } => nodes::run(cli).await,
        Command::Bench {
            scenario,
            quick,
            out,
        } => {
            logging::init("warn", false, None)?;
            let options = peerbus_bench::Options {
                quick: *quick,
                smoke: false,
                index: index_given.then(|| cli.index.clone()),
                token: cli.auth_token.clone(),
                out: out.clone(),
                progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            };
            let summary = peerbus_bench::run(*scenario, &options).await?;
            for line in summary {
                println!("{line}");
            }
            Ok(())
        }
        _ => {
            let level = match cli.verbose {
                0 => "warn",
                1 => "debug",
                _ => "trace",
            };
            logging::init(level, false, None)?;
            commands::run(cli).await
        }
    }
}
