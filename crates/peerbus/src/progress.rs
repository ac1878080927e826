//! Progress bars for long operations, shown only on a terminal.

use std::io::IsTerminal;
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};
use peerbus_client::DownloadProgress;

/// A bar for hashing a share directory, or `None` when stderr is not a terminal.
pub fn hashing_bar() -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "hashing {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template"),
    );
    Some(bar)
}

/// Draws a download: bytes, rate and the number of sources still in use.
pub struct DownloadBar {
    bar: ProgressBar,
    sources: std::sync::atomic::AtomicUsize,
}

impl DownloadBar {
    /// A bar on stderr, hidden when stderr is not a terminal.
    pub fn new() -> Arc<DownloadBar> {
        let bar = if std::io::stderr().is_terminal() {
            ProgressBar::new(0)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template"),
        );
        Arc::new(DownloadBar {
            bar,
            sources: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl DownloadProgress for DownloadBar {
    fn started(&self, name: &str, size: u64, sources: usize) {
        self.sources
            .store(sources, std::sync::atomic::Ordering::Relaxed);
        self.bar.set_length(size);
        self.bar
            .set_message(format!("{name} from {sources} sources"));
    }

    fn advanced(&self, bytes: u64) {
        self.bar.inc(bytes);
    }

    fn source_lost(&self, source: &str, why: &str) {
        let left = self
            .sources
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed)
            .saturating_sub(1);
        self.bar
            .println(format!("source {source} dropped ({why}); {left} left"));
        self.bar.set_message(format!("{left} sources"));
    }
}
