//! The `pingpong` scenario.

use crate::Options;

/// Runs the scenario; returns its summary lines.
pub(crate) async fn run(_options: &Options) -> anyhow::Result<Vec<String>> {
    anyhow::bail!("scenario 'pingpong' is not built yet")
}
