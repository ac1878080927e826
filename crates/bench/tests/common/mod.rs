//! Helpers the scenario smoke tests share.

use std::path::Path;

use peerbus_bench::Options;

/// Smoke-size options writing to `out`, without progress bars.
pub fn smoke(out: &Path) -> Options {
    Options {
        smoke: true,
        progress: false,
        out: out.to_path_buf(),
        ..Options::default()
    }
}

/// Every file of `files` exists in `dir` and is not empty; the PNGs are PNGs.
pub fn assert_written(dir: &Path, files: &[&str]) {
    for f in files {
        let path = dir.join(f);
        let meta = std::fs::metadata(&path).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(meta.len() > 0, "{f} is empty");
        if f.ends_with(".png") {
            assert_eq!(&std::fs::read(&path).unwrap()[1..4], b"PNG", "{f}");
        }
    }
}
