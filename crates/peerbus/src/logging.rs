//! Logs to stderr and, for nodes, to DATA/peerbus.log; timestamped; `RUST_LOG` decides.

use std::path::Path;
use std::sync::Mutex;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, fmt};

/// Installs logging. `default` is the level when `RUST_LOG` is unset; `trace_messages`
/// turns on the one-line-per-request log; `file` adds a log file beside the node's data.
pub fn init(default: &str, trace_messages: bool, file: Option<&Path>) -> anyhow::Result<()> {
    init_with(default, None, trace_messages, file)
}

/// Like [`init`], with the terminal held to `terminal` (e.g. "warn") when `RUST_LOG` is
/// unset, so a banner stays readable while the file gets everything at `default`, as
/// nats-server does.
pub fn init_with(
    default: &str,
    terminal: Option<&str>,
    trace_messages: bool,
    file: Option<&Path>,
) -> anyhow::Result<()> {
    let quiet = std::env::var_os("RUST_LOG")
        .is_none()
        .then_some(terminal)
        .flatten();
    // The storage engine's own info lines (flushes, compactions) drown peerbus's.
    let mut directives =
        std::env::var("RUST_LOG").unwrap_or_else(|_| format!("{default},fjall=warn,lsm_tree=warn"));
    if trace_messages {
        directives.push_str(",peerbus::trace=info");
    }
    let filter = || EnvFilter::new(&directives);
    let terminal_filter = match quiet {
        Some(level) => EnvFilter::new(format!("{level},fjall=warn,lsm_tree=warn")),
        None => filter(),
    };
    let stderr = fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_filter(terminal_filter);
    let file_layer = match file {
        Some(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    anyhow::anyhow!("cannot create log directory {}: {e}", dir.display())
                })?;
            }
            let mut open = std::fs::OpenOptions::new();
            open.create(true).append(true);
            // Logs may name peers, topics and addresses: readable by their owner only.
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut open, 0o600);
            let f = open
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
