//! File search and verified multi-source downloads.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use peerbus_proto::{ErrorCode, FileEntry, FileHit, Manifest, PeerAuth, Request, Response};
use tokio::task::JoinSet;

use crate::client::Client;
use crate::error::{ClientError, Result};
use crate::tree;

/// Pieces requested at once from one source: enough to keep a loopback or LAN link busy
/// while one piece is being verified and written.
const PIPELINE: usize = 4;

/// Told how a download goes, e.g. to draw a progress bar.
pub trait DownloadProgress: Send + Sync {
    /// The download starts: the file, its size and how many sources hold it.
    fn started(&self, name: &str, size: u64, sources: usize);
    /// `bytes` more arrived and were verified.
    fn advanced(&self, bytes: u64);
    /// A source was dropped (dead, or sent a bad piece); the others take over.
    fn source_lost(&self, source: &str, why: &str);
}

/// What a finished download produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadReport {
    /// The file's name.
    pub name: String,
    /// BLAKE3 hash, hex.
    pub hash: String,
    /// Size in bytes.
    pub size: u64,
    /// Names of the peers that supplied pieces.
    pub sources: Vec<String>,
    /// Where the file was written.
    pub path: PathBuf,
}

fn files_of(addr: &str, r: Response) -> Result<Vec<FileHit>> {
    match r {
        Response::Files(f) => Ok(f),
        other => Err(ClientError::Protocol {
            addr: addr.to_string(),
            what: format!("expected Files, got {other:?}"),
        }),
    }
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> ClientError {
    move |e| ClientError::Invalid(format!("{what}: {e}"))
}

impl Client {
    /// Offers `files` at the index in the name of the registered peer `auth` (what a peer's
    /// lease does after scanning its share). With `replace`, the list replaces everything
    /// the peer offered before.
    pub async fn register_files(
        &self,
        auth: &PeerAuth,
        files: Vec<FileEntry>,
        replace: bool,
    ) -> Result<()> {
        self.index_request(Request::RegisterFiles {
            auth: auth.clone(),
            files,
            replace,
        })
        .await
        .map(drop)
    }

    /// Stops offering the files with these hashes in the name of the peer `auth`.
    pub async fn unregister_files(&self, auth: &PeerAuth, hashes: Vec<String>) -> Result<()> {
        self.index_request(Request::UnregisterFiles {
            auth: auth.clone(),
            hashes,
        })
        .await
        .map(drop)
    }

    /// Files whose name contains `pattern` (case-insensitive), from the index, in
    /// `(name, hash)` order; asks page after page.
    pub async fn search_files(&self, pattern: &str) -> Result<Vec<FileHit>> {
        let index = self.index_addr().to_string();
        self.all_file_pages(&index, pattern).await
    }

    /// A peer's own file index, asked of the peer directly, page after page.
    pub async fn peer_files(&self, addr: &str, pattern: &str) -> Result<Vec<FileHit>> {
        self.all_file_pages(addr, pattern).await
    }

    /// One page of matching files from the node at `addr`: the hits after `after` (the
    /// `(name, hash)` of the previous page's last hit); an empty page is the end.
    pub async fn search_files_page(
        &self,
        addr: &str,
        pattern: &str,
        after: Option<(String, String)>,
    ) -> Result<Vec<FileHit>> {
        let req = Request::SearchFiles {
            pattern: pattern.to_string(),
            after,
        };
        files_of(addr, self.request_at(addr, req, true).await?)
    }

    async fn all_file_pages(&self, addr: &str, pattern: &str) -> Result<Vec<FileHit>> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let page = self.search_files_page(addr, pattern, after).await?;
            let Some(last) = page.last() else {
                return Ok(all);
            };
            after = Some((last.name.clone(), last.hash.clone()));
            all.extend(page);
        }
    }

    /// Asks every active peer for its own matching files and merges the answers by hash,
    /// so search works even when the index holds no file entries. Peers that do not
    /// answer are skipped.
    pub async fn search_files_distributed(&self, pattern: &str) -> Result<Vec<FileHit>> {
        let peers = self.peers().await?;
        let mut asks = JoinSet::new();
        for p in peers.into_iter().filter(|p| p.active) {
            let c = self.clone();
            let pattern = pattern.to_string();
            asks.spawn(async move { (p.addr.clone(), c.peer_files(&p.addr, &pattern).await) });
        }
        let mut merged: BTreeMap<String, FileHit> = BTreeMap::new();
        while let Some(done) = asks.join_next().await {
            let Ok((addr, answer)) = done else { continue };
            match answer {
                Ok(hits) => {
                    for h in hits {
                        match merged.get_mut(&h.hash) {
                            Some(m) => {
                                for p in h.peers {
                                    if !m.peers.iter().any(|q| q.addr == p.addr) {
                                        m.peers.push(p);
                                    }
                                }
                            }
                            None => {
                                merged.insert(h.hash.clone(), h);
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!("peer {addr} did not answer a file search: {e}"),
            }
        }
        let mut hits: Vec<FileHit> = merged.into_values().collect();
        for h in &mut hits {
            h.peers.sort_by(|a, b| a.name.cmp(&b.name));
        }
        hits.sort_by(|a, b| a.name.cmp(&b.name).then(a.hash.cmp(&b.hash)));
        Ok(hits)
    }

    /// One file by name or BLAKE3 hash with its live holders. Asks the index; when the index
    /// knows no such file, asks the peers directly.
    pub async fn lookup_file(&self, key: &str) -> Result<FileHit> {
        let from_index = self
            .index_request(Request::LookupFile {
                key: key.to_string(),
            })
            .await
            .and_then(|r| files_of(self.index_addr(), r));
        match from_index {
            Ok(mut hits) if !hits.is_empty() && !hits[0].peers.is_empty() => Ok(hits.remove(0)),
            Ok(_) => self.lookup_file_distributed(key).await,
            Err(e) if e.code() == Some(ErrorCode::NotFound) => {
                self.lookup_file_distributed(key).await
            }
            Err(e) => Err(e),
        }
    }

    async fn lookup_file_distributed(&self, key: &str) -> Result<FileHit> {
        let pattern = if peerbus_proto::is_hash(key) { "" } else { key };
        self.search_files_distributed(pattern)
            .await?
            .into_iter()
            .find(|h| h.hash.eq_ignore_ascii_case(key) || h.name == key)
            .filter(|h| !h.peers.is_empty())
            .ok_or_else(|| {
                ClientError::Server(peerbus_proto::WireError::new(
                    ErrorCode::NotFound,
                    format!("file '{key}' not found"),
                ))
            })
    }

    /// Downloads a file (by name or hash) from every live holder at once into `dest`.
    ///
    /// Pieces are pulled by a few workers per source, so faster sources take more. Each
    /// piece is checked against the file's BLAKE3 hash tree as it arrives; a bad piece goes
    /// back in the queue and its source is dropped, as is a source that fails. The file is
    /// written under a temporary name beside `dest` with positioned writes, fsynced and
    /// renamed once every piece has passed (which proves the whole file's hash); on failure
    /// nothing is left at `dest`.
    pub async fn download(
        &self,
        key: &str,
        dest: &Path,
        progress: Option<Arc<dyn DownloadProgress>>,
    ) -> Result<DownloadReport> {
        let hit = self.lookup_file(key).await?;
        let (manifest, sources) = self.manifest_from(&hit).await?;
        if let Some(p) = &progress {
            p.started(&hit.name, manifest.size, sources.len());
        }
        let dir = match dest.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir)
            .map_err(io_err(format!("cannot create {}", dir.display())))?;
        // Unpredictable, and created only if new (below), so nobody who can write into
        // the directory can plant a link there for the download to write through.
        let tmp = dir.join(format!(
            ".{}.{}.{:016x}.part",
            dest.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            &hit.hash[..16],
            rand::random::<u64>()
        ));
        let result = self
            .fetch_pieces(&hit, &manifest, sources, &tmp, progress.clone())
            .await;
        let used = match result {
            Ok(used) => used,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        // Every piece passed its check against a manifest that merges into the file's hash,
        // so the file is the one asked for; hashing it again would only read it twice.
        let (tmp2, dest2) = (tmp.clone(), dest.to_path_buf());
        let finish = tokio::task::spawn_blocking(move || -> Result<()> {
            let f = std::fs::File::open(&tmp2)
                .map_err(io_err(format!("cannot reopen {}", tmp2.display())))?;
            f.sync_all()
                .map_err(io_err(format!("cannot fsync {}", tmp2.display())))?;
            std::fs::rename(&tmp2, &dest2).map_err(io_err(format!(
                "cannot move the download to {}",
                dest2.display()
            )))?;
            Ok(())
        })
        .await
        .map_err(|e| ClientError::Invalid(format!("download task failed: {e}")))?;
        if let Err(e) = finish {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(DownloadReport {
            name: hit.name,
            hash: hit.hash,
            size: manifest.size,
            sources: used,
            path: dest.to_path_buf(),
        })
    }

    /// The first verified manifest any holder gives, and the holders to use.
    async fn manifest_from(&self, hit: &FileHit) -> Result<(Manifest, Vec<(String, String)>)> {
        let mut last = None;
        let holders: Vec<(String, String)> = hit
            .peers
            .iter()
            .map(|p| (p.name.clone(), p.addr.clone()))
            .collect();
        for (name, addr) in &holders {
            let req = Request::FileManifest {
                hash: hit.hash.clone(),
            };
            match self.request_at(addr, req, false).await {
                Ok(Response::Manifest(m)) => match tree::verify_manifest(&m, &hit.hash) {
                    Ok(()) => return Ok((m, holders)),
                    Err(e) => last = Some(ClientError::Invalid(format!("peer {name}: {e}"))),
                },
                Ok(other) => {
                    last = Some(ClientError::Protocol {
                        addr: addr.clone(),
                        what: format!("expected Manifest, got {other:?}"),
                    })
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            ClientError::Invalid(format!("file '{}' has no live holder", hit.name))
        }))
    }

    async fn fetch_pieces(
        &self,
        hit: &FileHit,
        m: &Manifest,
        sources: Vec<(String, String)>,
        tmp: &Path,
        progress: Option<Arc<dyn DownloadProgress>>,
    ) -> Result<Vec<String>> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tmp)
            .map_err(io_err(format!("cannot create {}", tmp.display())))?;
        file.set_len(m.size)
            .map_err(io_err(format!("cannot size {}", tmp.display())))?;
        let file = Arc::new(file);
        let n = tree::piece_count(m.size, m.piece_len);
        let queue = Arc::new(Work {
            pending: Mutex::new((0..n).collect()),
            done: std::sync::atomic::AtomicU64::new(0),
            total: n,
            changed: tokio::sync::Notify::new(),
        });
        let manifest = Arc::new(m.clone());
        let mut workers = JoinSet::new();
        for (name, addr) in sources {
            let conn = match self.connection(&addr).await {
                Ok(c) => c,
                Err(e) => {
                    if let Some(p) = &progress {
                        p.source_lost(&name, &e.to_string());
                    }
                    continue;
                }
            };
            // Shared by the source's workers: once one finds the source bad or dead, all stop.
            let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
            for _ in 0..PIPELINE {
                let dropped = dropped.clone();
                let (conn, queue, manifest, file, progress, name) = (
                    conn.clone(),
                    queue.clone(),
                    manifest.clone(),
                    file.clone(),
                    progress.clone(),
                    name.clone(),
                );
                workers.spawn(async move {
                    let mut got = 0u64;
                    loop {
                        if dropped.load(std::sync::atomic::Ordering::Relaxed) {
                            return (name, got, None);
                        }
                        let Some(i) = queue.next().await else {
                            return (name, got, None);
                        };
                        let req = Request::ReadPiece {
                            hash: manifest.hash.clone(),
                            index: i as u32,
                        };
                        let why = match conn.request(req, false).await {
                            Ok(Response::Piece(data)) => {
                                let (f, len) = (file.clone(), data.len() as u64);
                                let off = i * u64::from(manifest.piece_len);
                                // Checked and written on the blocking pool: hashing a piece
                                // takes long enough to stall other tasks, and the pieces of
                                // several workers are then checked on several cores at once.
                                let m = manifest.clone();
                                let w = tokio::task::spawn_blocking(move || {
                                    use std::os::unix::fs::FileExt;
                                    if !tree::verify_piece(&m, i, &data) {
                                        return Ok(false);
                                    }
                                    f.write_all_at(&data, off).map(|()| true)
                                })
                                .await;
                                match w {
                                    Ok(Ok(false)) => {
                                        format!("sent piece {i} that fails its BLAKE3 check")
                                    }
                                    Ok(Ok(true)) => {
                                        queue.finished();
                                        got += 1;
                                        if let Some(p) = &progress {
                                            p.advanced(len);
                                        }
                                        continue;
                                    }
                                    Ok(Err(e)) => {
                                        queue.give_back(i);
                                        return (
                                            name,
                                            got,
                                            Some(format!("local write failed: {e}")),
                                        );
                                    }
                                    Err(e) => format!("write task failed: {e}"),
                                }
                            }
                            Ok(other) => format!("answered {other:?} for piece {i}"),
                            Err(e) => e.to_string(),
                        };
                        queue.give_back(i);
                        dropped.store(true, std::sync::atomic::Ordering::Relaxed);
                        return (name, got, Some(why));
                    }
                });
            }
        }
        let mut used: BTreeMap<String, u64> = BTreeMap::new();
        let mut lost: BTreeMap<String, String> = BTreeMap::new();
        let mut local_failure = None;
        while let Some(done) = workers.join_next().await {
            let Ok((name, got, why)) = done else { continue };
            if got > 0 {
                *used.entry(name.clone()).or_default() += got;
            }
            if let Some(why) = why {
                if why.starts_with("local write failed") {
                    local_failure = Some(why.clone());
                }
                if let std::collections::btree_map::Entry::Vacant(slot) = lost.entry(name) {
                    if let Some(p) = &progress {
                        p.source_lost(slot.key(), &why);
                    }
                    tracing::warn!("dropping source {} for '{}': {why}", slot.key(), hit.name);
                    slot.insert(why);
                }
            }
        }
        if let Some(why) = local_failure {
            return Err(ClientError::Invalid(format!(
                "cannot write '{}': {why}",
                hit.name
            )));
        }
        let left = queue.pending.lock().expect("queue lock").len();
        if left > 0 {
            let reasons: Vec<String> = lost.iter().map(|(n, w)| format!("{n}: {w}")).collect();
            return Err(ClientError::Invalid(format!(
                "no source left for '{}' with {left} of {n} pieces missing ({})",
                hit.name,
                reasons.join("; ")
            )));
        }
        Ok(used.into_keys().collect())
    }
}

/// The pieces still to fetch, shared by every source's workers.
struct Work {
    pending: Mutex<VecDeque<u64>>,
    done: std::sync::atomic::AtomicU64,
    total: u64,
    changed: tokio::sync::Notify,
}

impl Work {
    /// The next piece to fetch; waits while others are in flight (one may come back when
    /// its source fails), and is `None` once every piece is done.
    async fn next(&self) -> Option<u64> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(i) = self.pending.lock().expect("queue lock").pop_front() {
                return Some(i);
            }
            if self.done.load(std::sync::atomic::Ordering::Acquire) >= self.total {
                return None;
            }
            changed.await;
        }
    }

    fn finished(&self) {
        let done = self.done.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1;
        if done >= self.total {
            self.changed.notify_waiters();
        }
    }

    fn give_back(&self, piece: u64) {
        self.pending.lock().expect("queue lock").push_front(piece);
        self.changed.notify_waiters();
    }
}
