//! Logs to stderr and, for nodes, to DATA/peerbus.log; timestamped; `RUST_LOG` decides.

use std::path::Path;
use std::sync::Mutex;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, fmt};

/// Installs logging. `default` is the level when `RUST_LOG` is unset; `trace_messages`
/// turns on the one-line-per-request log; `file` adds a log file beside the node's data.
pub fn init(default: &str, trace_messages: bool, file: Option<&Path>) -> anyhow::Result<()> {
    // The storage engine's own info lines (flushes, compactions) drown peerbus's.
    let mut directives =
        std::env::var("RUST_LOG").unwrap_or_else(|_| format!("{default},fjall=warn,lsm_tree=warn"));
    if trace_messages {
        directives.push_str(",peerbus::trace=info");
    }
    let filter = || EnvFilter::new(&directives);
    let stderr = fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_filter(filter());
    let file_layer = match file {
        Some(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    anyhow::anyhow!("cannot create log directory {}: {e}", dir.display())
                })?;
            }
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| anyhow::anyhow!("cannot open log file {}: {e}", path.display()))?;
            Some(
                fmt::layer()
                    .with_writer(Mutex::new(f))
                    .with_ansi(false)
                    .with_target(false)
                    .with_filter(filter()),
            )
        }
        None => None,
    };
    tracing_subscriber::registry()
        .with(stderr)
        .with(file_layer)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install logging: {e}"))
}
