//! The `download` scenario.

use crate::Options;

/// Runs the scenario; returns its summary lines.
pub(crate) async fn run(_options: &Options) -> anyhow::Result<Vec<String>> {
    anyhow::bail!("scenario 'download' is not built yet")
}
