//! The share directory: the files this peer offers for download, hashed into BLAKE3 piece
//! manifests, and kept up to date by rescans.
//!
//! A scan walks the directory with `std::fs`, following symlinks only while they resolve
//! inside the (canonical) share root, so a link cannot make the peer serve `/etc/passwd`.
//! Files are hashed on the blocking pool, several at once; a rescan re-hashes only files
//! whose size or modification time changed. Pieces are served with positioned reads after
//! checking once more that the file still resolves inside the share, because it may have
//! been swapped for a symlink since it was hashed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use bytes::Bytes;
use peerbus_client::tree;
use peerbus_proto::{FileEntry, Manifest};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::HashProgress;

/// Directory inside the share root that downloads are written to before they are moved
/// into place. Scans skip it, so a half-written file is never offered.
pub const PARTIAL_DIR: &str = ".peerbus-partial";

/// Directory inside the share root where copies this peer fetched from others live, each
/// named by its content hash (`.peerbus-fetched/<hash>`), with the name it is offered under
/// in `<hash>.name` beside it. The peer alone picks these paths: a name another peer
/// registered never becomes a path here (no dotfiles, no nested directories, no
/// `authorized_keys`), it is only what searches show.
pub const FETCHED_DIR: &str = ".peerbus-fetched";

/// Suffix of the file holding a fetched copy's offered name.
const NAME_SUFFIX: &str = ".name";

/// Longest offered name read back from a `<hash>.name` file.
const MAX_OFFERED_NAME: usize = 4096;

/// Where a fetched copy of the file with `hash` (lowercase hex) lives, relative to the root.
pub fn fetched_path(hash: &str) -> PathBuf {
    Path::new(FETCHED_DIR).join(hash)
}

/// Where the offered name of a fetched copy is kept, relative to the root.
pub fn fetched_name_path(hash: &str) -> PathBuf {
    Path::new(FETCHED_DIR).join(format!("{hash}{NAME_SUFFIX}"))
}

/// True when `name` may be offered as a fetched copy's name: what the index accepts, on
/// one line, without control characters.
pub fn valid_offered_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_OFFERED_NAME && !name.chars().any(char::is_control)
}

/// A hash spelled as this peer names fetched copies: lowercase.
fn is_lower_hash(s: &str) -> bool {
    peerbus_proto::is_hash(s) && !s.bytes().any(|b| b.is_ascii_uppercase())
}

/// A file this peer offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedFile {
    /// What the index is told: name (relative to the share root, or the recorded name of a
    /// fetched copy), hash, size.
    pub entry: FileEntry,
    /// Where it is, relative to the share root: what rescans compare by.
    pub rel: String,
    /// Where the content is: absolute and canonical (symlinks resolved) at scan time.
    pub path: PathBuf,
    /// The BLAKE3 piece tree, sent to downloaders.
    pub manifest: Manifest,
    /// Modification time when it was hashed (`None` where the platform has none).
    pub mtime: Option<SystemTime>,
    /// Size when it was hashed.
    pub len: u64,
    /// Reached through a symlink (to a file or a directory) inside the share. When equal
    /// files are found under several names, a name without a link is offered.
    pub linked: bool,
    /// Device and inode of the file that was hashed (where the platform has them): a read
    /// checks the file it opened against them, so whatever is put at the path between the
    /// path check and the open is never served.
    pub file_id: Option<(u64, u64)>,
}

/// What a rescan changed, as the index must be told.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Files that are new, changed content, or are now offered under another name.
    pub added: Vec<FileEntry>,
    /// Hashes of files no longer offered.
    pub removed: Vec<String>,
}

impl Changes {
    /// True when nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// Why a piece could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PieceError {
    /// The piece number is past the end of the file.
    #[error("piece {index} is past the end of the file ({pieces} pieces)")]
    PastEnd {
        /// The piece asked for.
        index: u32,
        /// How many pieces the file has.
        pieces: u64,
    },
    /// The file now resolves outside the share root (swapped for a symlink, or a parent
    /// directory was).
    #[error("the file now resolves outside the share directory; refusing to serve it")]
    Escaped,
    /// The file's size or modification time differs from when it was hashed, so its pieces
    /// would not match the manifest.
    #[error("the file changed since it was hashed; it is offered again after the next rescan")]
    Changed,
    /// Reading failed.
    #[error("cannot read the file: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Default)]
struct State {
    /// Every file found, by name: what a rescan compares against.
    by_name: BTreeMap<String, Arc<SharedFile>>,
    /// One file per content hash (when several files are equal, the first name in order
    /// not reached through a symlink): what is offered.
    by_hash: HashMap<String, Arc<SharedFile>>,
    /// Bumped on every change, so the lease can tell whether what it registered is stale.
    version: u64,
}

/// A file the walk found, before hashing.
#[derive(Debug)]
struct Found {
    /// Relative to the root.
    name: String,
    /// The name offered for it: `name`, except for fetched copies.
    offered: String,
    path: PathBuf,
    len: u64,
    mtime: Option<SystemTime>,
    linked: bool,
}

/// The share directory and the index of what it holds.
pub struct Share {
    root: PathBuf,
    progress: Option<HashProgress>,
    state: RwLock<State>,
    /// Serialises scans: two concurrent scans would hash the same files twice and report
    /// the same changes twice.
    scan: tokio::sync::Mutex<()>,
    /// Paths already warned about, so a rescan every few seconds does not repeat them.
    warned: Arc<Mutex<HashSet<String>>>,
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Share")
            .field("root", &self.root)
            .field(
                "files",
                &self.state.read().expect("share lock").by_name.len(),
            )
            .finish_non_exhaustive()
    }
}

impl Share {
    /// Opens the share at `dir` and hashes everything in it before returning, reporting
    /// `(bytes hashed, bytes to hash)` to `progress` as it goes.
    pub async fn open(dir: &Path, progress: Option<HashProgress>) -> std::io::Result<Share> {
        let root = tokio::fs::canonicalize(dir).await?;
        if !tokio::fs::metadata(&root).await?.is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                format!("{} is not a directory", root.display()),
            ));
        }
        let share = Share {
            root,
            progress,
            state: RwLock::new(State::default()),
            scan: tokio::sync::Mutex::new(()),
            warned: Arc::new(Mutex::new(HashSet::new())),
        };
        share.scan(true).await?;
        Ok(share)
    }

    /// The canonical share root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Walks the share again: hashes new files and files whose size or modification time
    /// changed, drops files that are gone, and returns what changed.
    pub async fn rescan(&self) -> std::io::Result<Changes> {
        self.scan(false).await
    }

    /// Adds the copy of `hash` a fetch just placed, hashing that one file instead of
    /// walking the whole share (a walk per fetch made copying many files quadratic), and
    /// returns what changed. It is offered unless a file with that content already is; the
    /// next periodic rescan settles which name wins, as for any other file.
    pub async fn add_fetched(&self, hash: &str) -> std::io::Result<Changes> {
        let _scanning = self.scan.lock().await;
        let (dir, name) = (self.root.join(FETCHED_DIR), hash.to_string());
        let found = tokio::task::spawn_blocking(move || fetched_found(&dir, &name))
            .await
            .map_err(std::io::Error::other)?
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no fetched copy of {hash} in the share"),
                )
            })?;
        let hashed = self
            .hash_all(vec![found], false)
            .await
            .pop()
            .ok_or_else(|| {
                std::io::Error::other(format!("cannot hash the fetched copy of {hash}"))
            })?;
        let s = Arc::new(hashed);
        let mut st = self.state.write().expect("share lock");
        st.by_name.insert(s.rel.clone(), s.clone());
        let mut changes = Changes::default();
        if !st.by_hash.contains_key(&s.entry.hash) {
            st.by_hash.insert(s.entry.hash.clone(), s.clone());
            changes.added.push(s.entry.clone());
            st.version += 1;
        }
        Ok(changes)
    }

    /// Every offered file (one per content hash), sorted by name.
    pub fn files(&self) -> Vec<FileEntry> {
        self.snapshot().1
    }

    /// The offered files and the version of the share they belong to.
    pub(crate) fn snapshot(&self) -> (u64, Vec<FileEntry>) {
        let st = self.state.read().expect("share lock");
        let mut files: Vec<FileEntry> = st.by_hash.values().map(|f| f.entry.clone()).collect();
        files.sort_by(|a, b| a.name.cmp(&b.name));
        (st.version, files)
    }

    /// The file with this BLAKE3 hash (hex, any case).
    pub fn get(&self, hash: &str) -> Option<Arc<SharedFile>> {
        let st = self.state.read().expect("share lock");
        st.by_hash
            .get(hash)
            .or_else(|| st.by_hash.get(&hash.to_ascii_lowercase()))
            .cloned()
    }

    /// The file with this hash or exactly this name (its path in the share, or the name a
    /// fetched copy is offered under).
    pub fn find(&self, key: &str) -> Option<Arc<SharedFile>> {
        self.get(key).or_else(|| {
            let st = self.state.read().expect("share lock");
            st.by_name
                .get(key)
                .cloned()
                .or_else(|| st.by_hash.values().find(|f| f.entry.name == key).cloned())
        })
    }

    /// Bytes of the fetched copies this share holds (what the fetch quota counts).
    pub fn fetched_bytes(&self) -> u64 {
        let st = self.state.read().expect("share lock");
        let prefix = format!("{FETCHED_DIR}/");
        st.by_name
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(_, f)| f.len)
            .sum()
    }

    /// Reads piece `index` of `file` with a positioned read on the blocking pool, after
    /// checking that the file still resolves inside the share and has not changed.
    pub async fn read_piece(&self, file: Arc<SharedFile>, index: u32) -> Result<Bytes, PieceError> {
        let m = &file.manifest;
        let pieces = tree::piece_count(m.size, m.piece_len);
        if u64::from(index) >= pieces {
            return Err(PieceError::PastEnd { index, pieces });
        }
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || read_piece_blocking(&root, &file, index))
            .await
            .map_err(|e| PieceError::Io(std::io::Error::other(e)))?
    }

    async fn scan(&self, initial: bool) -> std::io::Result<Changes> {
        let _scanning = self.scan.lock().await;
        let (root, warned) = (self.root.clone(), self.warned.clone());
        let found = tokio::task::spawn_blocking(move || walk(&root, &warned))
            .await
            .map_err(std::io::Error::other)??;
        let old = self.state.read().expect("share lock").by_name.clone();
        let mut kept: BTreeMap<String, Arc<SharedFile>> = BTreeMap::new();
        let mut to_hash = Vec::new();
        for f in found {
            match old.get(&f.name) {
                Some(s)
                    if s.path == f.path
                        && s.len == f.len
                        && s.mtime == f.mtime
                        && s.linked == f.linked =>
                {
                    kept.insert(f.name, s.clone());
                }
                _ => to_hash.push(f),
            }
        }
        let hashed = self.hash_all(to_hash, initial).await;
        kept.extend(hashed.into_iter().map(|s| (s.rel.clone(), Arc::new(s))));

        let mut by_hash: HashMap<String, Arc<SharedFile>> = HashMap::new();
        // Files reached directly first, each group in name order, so the same name of equal
        // files wins every time.
        for s in kept
            .values()
            .filter(|s| !s.linked)
            .chain(kept.values().filter(|s| s.linked))
        {
            by_hash
                .entry(s.entry.hash.clone())
                .or_insert_with(|| s.clone());
        }
        let mut st = self.state.write().expect("share lock");
        let mut changes = Changes::default();
        for (hash, s) in &by_hash {
            if st.by_hash.get(hash).map(|o| &o.entry) != Some(&s.entry) {
                changes.added.push(s.entry.clone());
            }
        }
        for hash in st.by_hash.keys() {
            if !by_hash.contains_key(hash) {
                changes.removed.push(hash.clone());
            }
        }
        changes.added.sort_by(|a, b| a.name.cmp(&b.name));
        changes.removed.sort();
        st.by_name = kept;
        st.by_hash = by_hash;
        if !changes.is_empty() {
            st.version += 1;
        }
        Ok(changes)
    }

    /// Hashes files on the blocking pool, as many at once as there are CPUs. Files that
    /// cannot be read are skipped with a warning. Progress is reported only for the first
    /// scan: that is the one the user waits for before the peer serves.
    async fn hash_all(&self, files: Vec<Found>, initial: bool) -> Vec<SharedFile> {
        if files.is_empty() {
            return Vec::new();
        }
        let total: u64 = files.iter().map(|f| f.len).sum();
        let report: Option<HashProgress> = if initial { self.progress.clone() } else { None };
        let done = Arc::new(AtomicU64::new(0));
        let width = std::thread::available_parallelism().map_or(1, |n| n.get());
        let permits = Arc::new(Semaphore::new(width));
        let mut tasks = JoinSet::new();
        for f in files {
            let (permits, done, report) = (permits.clone(), done.clone(), report.clone());
            tasks.spawn(async move {
                let _permit = permits
                    .acquire_owned()
                    .await
                    .expect("semaphore is never closed");
                tokio::task::spawn_blocking(move || {
                    let counted = |n: u64| {
                        let so_far = done.fetch_add(n, Ordering::Relaxed) + n;
                        if let Some(p) = &report {
                            p(so_far.min(total), total);
                        }
                    };
                    let r = hash_file(&f, &counted);
                    (f, r)
                })
                .await
            });
        }
        let mut out = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok((_, Ok(s)))) => out.push(s),
                Ok(Ok((f, Err(e)))) => {
                    self.warn_once(&f.name, format!("cannot hash shared file {}: {e}", f.name))
                }
                Ok(Err(e)) | Err(e) => tracing::error!("a hashing task failed: {e}"),
            }
        }
        if let Some(p) = &report {
            // Files that failed or shrank leave the count short; the bar still has to end.
            p(total, total);
        }
        out
    }

    fn warn_once(&self, key: &str, msg: String) {
        warn_once(&self.warned, key, msg);
    }
}

fn warn_once(warned: &Mutex<HashSet<String>>, key: &str, msg: String) {
    if warned.lock().expect("warned lock").insert(key.to_string()) {
        tracing::warn!("{msg}");
    } else {
        tracing::debug!("{msg}");
    }
}

/// Counts bytes as `tree::manifest` reads them, for the progress bar.
struct Counting<'a, R> {
    inner: R,
    on_read: &'a dyn Fn(u64),
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        (self.on_read)(n as u64);
        Ok(n)
    }
}

/// Device and inode of a file.
#[cfg(unix)]
fn file_id(m: &std::fs::Metadata) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    Some((m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn file_id(_m: &std::fs::Metadata) -> Option<(u64, u64)> {
    None
}

fn hash_file(f: &Found, on_read: &dyn Fn(u64)) -> std::io::Result<SharedFile> {
    let file = File::open(&f.path)?;
    let id = file_id(&file.metadata()?);
    let manifest = tree::manifest(
        Counting {
            inner: file,
            on_read,
        },
        tree::PIECE_LEN,
    )?;
    Ok(SharedFile {
        entry: FileEntry {
            name: f.offered.clone(),
            hash: manifest.hash.clone(),
            size: manifest.size,
        },
        rel: f.name.clone(),
        path: f.path.clone(),
        manifest,
        // The size and time from before hashing: if the file was written meanwhile, the
        // next rescan sees a newer time and hashes it again.
        mtime: f.mtime,
        len: f.len,
        linked: f.linked,
        file_id: id,
    })
}

/// Every regular file under `root` (canonical), in name order, following symlinks only
/// where they resolve inside `root`. Unreadable entries are skipped with a warning.
fn walk(root: &Path, warned: &Mutex<HashSet<String>>) -> std::io::Result<Vec<Found>> {
    let mut out = Vec::new();
    // Directories already walked, by canonical path: a symlinked directory is walked only
    // if its target was not, so symlink loops end. Real directories are always walked (no
    // loop is possible without a link), so their files keep their own names.
    let mut visited: HashSet<PathBuf> = HashSet::from([root.to_path_buf()]);
    // (canonical directory, its name relative to the root, reached through a link).
    let mut stack: Vec<(PathBuf, String, bool)> = Vec::new();
    // The root itself must be readable; anything below may be skipped.
    let mut first = true;
    let mut dirs = vec![(root.to_path_buf(), String::new(), false)];
    while let Some((dir, rel, dir_linked)) = dirs.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if first => return Err(e),
            Err(e) => {
                warn_once(
                    warned,
                    &rel,
                    format!("skipping shared directory {rel}: {e}"),
                );
                continue;
            }
        };
        first = false;
        let mut names = Vec::new();
        for entry in entries {
            match entry {
                Ok(e) => names.push(e.file_name()),
                Err(e) => warn_once(
                    warned,
                    &rel,
                    format!("cannot list all of shared directory {}: {e}", dir.display()),
                ),
            }
        }
        names.sort();
        // Reversed onto the stack below so directories are walked in name order, which
        // makes the name kept for duplicate content the same on every scan.
        for os_name in names {
            let Some(name) = os_name.to_str() else {
                warn_once(
                    warned,
                    &dir.join(&os_name).display().to_string(),
                    format!(
                        "skipping {}: its name is not UTF-8",
                        dir.join(&os_name).display()
                    ),
                );
                continue;
            };
            if rel.is_empty() && name == PARTIAL_DIR {
                continue;
            }
            if rel.is_empty() && name == FETCHED_DIR {
                out.extend(walk_fetched(&dir.join(name), warned));
                continue;
            }
            let rel_name = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            let path = dir.join(name);
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e) => {
                    warn_once(warned, &rel_name, format!("skipping {rel_name}: {e}"));
                    continue;
                }
            };
            let is_link = meta.file_type().is_symlink();
            let (canonical, meta) = if is_link {
                let target = match std::fs::canonicalize(&path) {
                    Ok(t) => t,
                    Err(e) => {
                        warn_once(
                            warned,
                            &rel_name,
                            format!("skipping symlink {rel_name}: {e}"),
                        );
                        continue;
                    }
                };
                if !target.starts_with(root) {
                    warn_once(
                        warned,
                        &rel_name,
                        format!(
                            "not sharing {rel_name}: it links to {}, outside the share directory",
                            target.display()
                        ),
                    );
                    continue;
                }
                match std::fs::metadata(&target) {
                    Ok(m) => (target, m),
                    Err(e) => {
                        warn_once(warned, &rel_name, format!("skipping {rel_name}: {e}"));
                        continue;
                    }
                }
            } else {
                // `dir` is canonical and `name` is no symlink, so the join is canonical too.
                (path, meta)
            };
            let linked = dir_linked || is_link;
            if meta.is_dir() {
                if visited.insert(canonical.clone()) || !is_link {
                    stack.push((canonical, rel_name, linked));
                }
            } else if meta.is_file() {
                out.push(Found {
                    offered: rel_name.clone(),
                    name: rel_name,
                    path: canonical,
                    len: meta.len(),
                    mtime: meta.modified().ok(),
                    linked,
                });
            }
            // Sockets, FIFOs and devices are not files anyone can download.
        }
        dirs.extend(stack.drain(..).rev());
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The fetched copies in `dir` (the share's [`FETCHED_DIR`]): regular files named by their
/// lowercase hash, offered under the name recorded beside them. Nothing in it is followed
/// through a symlink, and anything else in it is ignored, since only this peer writes there.
fn walk_fetched(dir: &Path, warned: &Mutex<HashSet<String>>) -> Vec<Found> {
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(_) => return Vec::new(),
    };
    if !meta.is_dir() {
        warn_once(
            warned,
            FETCHED_DIR,
            format!("not sharing {}: it is not a plain directory", dir.display()),
        );
        return Vec::new();
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            warn_once(
                warned,
                FETCHED_DIR,
                format!("skipping {}: {e}", dir.display()),
            );
            return Vec::new();
        }
    };
    entries
        .flatten()
        .filter_map(|entry| fetched_found(dir, entry.file_name().to_str()?))
        .collect()
}

/// The fetched copy named `hash` in the fetched directory `dir`, if it is one: a plain
/// file named by a lowercase hash, offered under the name recorded beside it.
fn fetched_found(dir: &Path, hash: &str) -> Option<Found> {
    if !is_lower_hash(hash) {
        return None;
    }
    let path = dir.join(hash);
    let meta = std::fs::symlink_metadata(&path).ok()?;
    if !meta.is_file() {
        return None;
    }
    let offered = std::fs::read_to_string(dir.join(format!("{hash}{NAME_SUFFIX}")))
        .ok()
        .map(|n| n.trim_end_matches('\n').to_string())
        .filter(|n| valid_offered_name(n))
        .unwrap_or_else(|| hash.to_string());
    Some(Found {
        name: format!("{FETCHED_DIR}/{hash}"),
        offered,
        path,
        len: meta.len(),
        mtime: meta.modified().ok(),
        linked: false,
    })
}

fn read_piece_blocking(root: &Path, f: &SharedFile, index: u32) -> Result<Bytes, PieceError> {
    // The file may have been replaced by a symlink (or a parent directory by one) since the
    // scan; resolve it again and refuse anything that lands outside the share.
    let resolved = std::fs::canonicalize(&f.path)?;
    if !resolved.starts_with(root) {
        return Err(PieceError::Escaped);
    }
    let file = File::open(&resolved)?;
    let meta = file.metadata()?;
    // The path may have been swapped between the check and the open: what was opened must
    // be the file that was hashed, unchanged.
    if file_id(&meta) != f.file_id || meta.len() != f.len || meta.modified().ok() != f.mtime {
        return Err(PieceError::Changed);
    }
    let m = &f.manifest;
    let offset = u64::from(index) * u64::from(m.piece_len);
    let len = tree::piece_size(m.size, m.piece_len, u64::from(index));
    Ok(peerbus_proto::pool::filled(len, |buf| {
        read_exact_at(&file, buf, offset)
    })?)
}

#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, offset)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}
