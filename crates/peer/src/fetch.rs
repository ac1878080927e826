//! `Fetch`: a peer downloads a file from its holders into its own share and offers it.
//!
//! The request names a file, never a path: the copy lands at `.peerbus-fetched/<hash>`
//! inside the share, a place this peer picks, and the name another peer registered is only
//! recorded beside it for searches. Fetches are bounded: a few at a time, a byte quota for
//! all fetched copies together, and a reserve of free disk, so nobody can make a peer fill
//! the disk its topic log lives on.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use peerbus_proto::{ErrorCode, FetchReport, Response, WireError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::node::{Node, internal, relay};
use crate::share::{
    FETCHED_DIR, PARTIAL_DIR, Share, SharedFile, fetched_name_path, fetched_path,
    valid_offered_name,
};

/// Fetches a peer runs at once; more are refused until one ends.
pub const MAX_FETCHES: usize = 4;

/// Free disk space a fetch must leave on the share's file system.
pub const MIN_FREE_DISK: u64 = 1 << 30;

/// What bounds the fetches of one peer.
pub(crate) struct FetchLimits {
    permits: Arc<Semaphore>,
    /// Bytes of fetches under way, which the quota counts before they land.
    reserved: Mutex<u64>,
}

impl FetchLimits {
    pub fn new() -> Self {
        FetchLimits {
            permits: Arc::new(Semaphore::new(MAX_FETCHES)),
            reserved: Mutex::new(0),
        }
    }
}

/// A fetch's hold on the quota, given back when the fetch ends however it ends.
struct Reservation<'a> {
    limits: &'a FetchLimits,
    bytes: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        *self.limits.reserved.lock().expect("fetch reservations") -= self.bytes;
    }
}

impl Node {
    /// A slot for one more fetch, or why there is none.
    pub(crate) fn fetch_slot(&self) -> Result<OwnedSemaphorePermit, WireError> {
        self.fetch_limits
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                WireError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "peer {} is already running {MAX_FETCHES} fetches; try again when one ends",
                        self.name
                    ),
                )
            })
    }

    /// Serves [`peerbus_proto::Request::Fetch`]: downloads a file into the share and
    /// offers it.
    pub(crate) async fn fetch(&self, key: String) -> Result<Response, WireError> {
        let Some(share) = self.share.clone() else {
            return Err(self.no_share());
        };
        if let Some(f) = share.find(&key) {
            return Ok(fetched(f, Vec::new()));
        }
        let hit = self.client.lookup_file(&key).await.map_err(relay)?;
        if let Some(f) = share.get(&hit.hash) {
            return Ok(fetched(f, Vec::new()));
        }
        let hash = hit.hash.to_ascii_lowercase();
        if !peerbus_proto::is_hash(&hash) {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                format!("the index named '{}', which is not a BLAKE3 hash", hit.hash),
            ));
        }
        let _reserved = self.reserve(&share, hit.size, &hit.name).await?;
        let dest = share.root().join(fetched_path(&hash));
        // Downloaded under the hidden partial directory, which scans skip, and moved into
        // place whole, so a rescan never offers a half-written file.
        let n = self.next_download.fetch_add(1, Ordering::Relaxed);
        let partial = share
            .root()
            .join(PARTIAL_DIR)
            .join(format!("{hash}-{}-{n}", std::process::id()));
        tracing::info!(
            "downloading '{}' ({} bytes) into {}",
            hit.name,
            hit.size,
            dest.display()
        );
        let report = self
            .client
            .download(&hash, &partial, None)
            .await
            .map_err(|e| {
                let w = relay(e);
                WireError::new(
                    w.code,
                    format!("peer {} could not download '{}': {w}", self.name, hit.name),
                )
            })?;
        let offered = if valid_offered_name(&hit.name) {
            hit.name.clone()
        } else {
            hash.clone()
        };
        let (root, from, name) = (share.root().to_path_buf(), partial.clone(), hash.clone());
        let placed =
            tokio::task::spawn_blocking(move || place_fetched(&root, &from, &name, &offered))
                .await
                .map_err(internal)?;
        if let Err(e) = placed {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(WireError::new(
                ErrorCode::Internal,
                format!("peer {} cannot store {}: {e}", self.name, dest.display()),
            ));
        }
        tracing::info!(
            "downloaded '{}' from {}",
            hit.name,
            report.sources.join(", ")
        );
        // Hashed from disk (what is offered is what is stored) and registered at the index.
        match share.add_fetched(&hash).await {
            Ok(changes) if !changes.is_empty() => self.tell_index(&changes).await,
            Ok(_) => {}
            Err(e) => tracing::warn!("cannot add the fetched copy of {hash} to the share: {e}"),
        }
        let f = share.get(&report.hash).ok_or_else(|| {
            WireError::new(
                ErrorCode::Internal,
                format!(
                    "peer {} downloaded {} but did not find it in its share afterwards",
                    self.name,
                    dest.display()
                ),
            )
        })?;
        Ok(fetched(f, report.sources))
    }

    /// Holds `size` bytes of the fetch quota and checks the disk, or says why not.
    async fn reserve(
        &self,
        share: &Share,
        size: u64,
        name: &str,
    ) -> Result<Reservation<'_>, WireError> {
        let quota = self.config.fetch_quota;
        {
            let mut reserved = self
                .fetch_limits
                .reserved
                .lock()
                .expect("fetch reservations");
            let used = share.fetched_bytes() + *reserved;
            if used.saturating_add(size) > quota {
                return Err(WireError::new(
                    ErrorCode::TooLarge,
                    format!(
                        "peer {} will not fetch '{name}' ({size} bytes): its fetched copies \
                         would take more than its fetch quota of {quota} bytes ({used} in use)",
                        self.name
                    ),
                ));
            }
            *reserved += size;
        }
        let held = Reservation {
            limits: &self.fetch_limits,
            bytes: size,
        };
        let root = share.root().to_path_buf();
        let free = tokio::task::spawn_blocking(move || available_bytes(&root))
            .await
            .map_err(internal)?;
        if let Some(free) = free
            && free < size.saturating_add(MIN_FREE_DISK)
        {
            return Err(WireError::new(
                ErrorCode::TooLarge,
                format!(
                    "peer {} will not fetch '{name}' ({size} bytes): its disk has {free} bytes \
                     free and a fetch must leave {MIN_FREE_DISK}",
                    self.name
                ),
            ));
        }
        Ok(held)
    }

    pub(crate) fn no_share(&self) -> WireError {
        WireError::new(
            ErrorCode::BadRequest,
            format!(
                "peer {} has no share directory (--share) to download into",
                self.name
            ),
        )
    }
}

/// The answer to a fetch of `f`.
fn fetched(f: Arc<SharedFile>, sources: Vec<String>) -> Response {
    Response::Fetched(FetchReport {
        name: f.entry.name.clone(),
        hash: f.entry.hash.clone(),
        size: f.entry.size,
        sources,
        path: f.path.display().to_string(),
    })
}

/// Moves a verified download from the partial directory to `.peerbus-fetched/<hash>` with
/// its offered name beside it. Both are direct children of the share root, so this is one
/// rename on one file system; nothing is followed through a symlink a local user planted.
fn place_fetched(root: &Path, partial: &Path, hash: &str, offered: &str) -> std::io::Result<()> {
    let dir = root.join(FETCHED_DIR);
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    if !std::fs::symlink_metadata(&dir)?.is_dir() {
        return Err(std::io::Error::other(format!(
            "{} is not a plain directory",
            dir.display()
        )));
    }
    // The name first, so a scan that sees the file sees its name too. Removed and created
    // afresh (O_EXCL), which never writes through a link.
    let name_file: PathBuf = root.join(fetched_name_path(hash));
    match std::fs::remove_file(&name_file) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&name_file)?;
    f.write_all(offered.as_bytes())?;
    f.sync_all()?;
    // rename replaces a planted link itself rather than writing through it.
    std::fs::rename(partial, root.join(fetched_path(hash)))?;
    if let Some(dir) = partial.parent() {
        // Only succeeds once the partial directory is empty, which keeps the share tidy.
        let _ = std::fs::remove_dir(dir);
    }
    Ok(())
}

/// Bytes an unprivileged process may still write on the file system holding `path`.
#[cfg(unix)]
fn available_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path and `st` points to writable memory of the
    // right type; statvfs fills it or fails.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)]
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

#[cfg(not(unix))]
fn available_bytes(_path: &Path) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fetched_copy_lands_under_its_hash_and_never_through_a_planted_link() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"keep me").unwrap();
        std::fs::create_dir_all(root.join(PARTIAL_DIR)).unwrap();
        std::fs::create_dir_all(root.join(FETCHED_DIR)).unwrap();
        let hash = "ab".repeat(32);
        // A local user plants links where the copy and its name will go.
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&victim, root.join(fetched_path(&hash))).unwrap();
            std::os::unix::fs::symlink(&victim, root.join(fetched_name_path(&hash))).unwrap();
        }
        let partial = root.join(PARTIAL_DIR).join("x");
        std::fs::write(&partial, b"content").unwrap();
        place_fetched(&root, &partial, &hash, ".ssh/authorized_keys").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
        assert_eq!(
            std::fs::read(root.join(fetched_path(&hash))).unwrap(),
            b"content"
        );
        assert_eq!(
            std::fs::read_to_string(root.join(fetched_name_path(&hash))).unwrap(),
            ".ssh/authorized_keys"
        );
        assert!(!root.join(".ssh").exists());
        assert!(
            !root.join(PARTIAL_DIR).exists(),
            "the partial directory is tidied"
        );
    }

    #[test]
    fn free_space_is_known_on_unix() {
        if cfg!(unix) {
            assert!(available_bytes(Path::new("/")).is_some());
        }
    }
}
