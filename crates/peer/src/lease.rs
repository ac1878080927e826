//! The peer's lease with the index: register (keeping the identity across restarts with the
//! cookie), announce hosted topics and shared files, renew every TTL/3, reconnect with
//! backoff, leave on stop.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use peerbus_client::{ClientError, Connection};
use peerbus_proto::{ErrorCode, PeerAuth, RegisterPeer, Request, Response};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::node::Node;

/// What the peer needs to act in its own name at the index.
#[derive(Debug, Clone)]
pub(crate) struct Lease {
    pub auth: PeerAuth,
    pub conn: Connection,
}

/// Shared lease state: `None` while (re)connecting.
pub(crate) type LeaseCell = Arc<Mutex<Option<Lease>>>;

pub(crate) async fn run(node: Arc<Node>, shutdown: CancellationToken, ready: watch::Sender<bool>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        match session(&node, &shutdown, &ready).await {
            Ok(()) => return,
            Err(e) => {
                *node.lease.lock().expect("lease lock") = None;
                tracing::warn!(
                    "lost the index at {}: {e}; retrying in {} ms",
                    node.config.index,
                    backoff.as_millis()
                );
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// One connection's worth of lease: returns Ok after leaving on shutdown, Err when the
/// connection must be made again.
async fn session(
    node: &Arc<Node>,
    shutdown: &CancellationToken,
    ready: &watch::Sender<bool>,
) -> Result<(), ClientError> {
    let conn = Connection::connect(&node.config.index, node.config.token.as_deref()).await?;
    loop {
        let (auth, ttl) = register(node, &conn).await?;
        announce(node, &conn, &auth).await?;
        let sent = register_files(node, &conn, &auth).await?;
        *node.lease.lock().expect("lease lock") = Some(Lease {
            auth: auth.clone(),
            conn: conn.clone(),
        });
        // A rescan that finished between the file list going out and the lease being set
        // saw no lease and told nobody: send the whole list again.
        if let Some(share) = &node.share
            && share.snapshot().0 != sent
        {
            register_files(node, &conn, &auth).await?;
        }
        let _ = ready.send(true);
        let period = (ttl / 3).max(Duration::from_millis(50));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = shutdown.cancelled() => {
                    match conn.request(Request::Leave(auth.clone()), false).await {
                        Ok(_) => tracing::info!("left the index at {}", node.config.index),
                        Err(e) => tracing::warn!("could not leave the index: {e}"),
                    }
                    *node.lease.lock().expect("lease lock") = None;
                    return Ok(());
                }
            }
            match conn.request(Request::Keepalive(auth.clone()), false).await {
                Ok(_) => {}
                Err(e) if e.code() == Some(ErrorCode::NotFound) => {
                    tracing::warn!("index forgot this peer ({e}); registering again");
                    break;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

async fn register(node: &Node, conn: &Connection) -> Result<(PeerAuth, Duration), ClientError> {
    let previous = node.saved_auth();
    let req = RegisterPeer {
        name: node.name.clone(),
        addr: node.advertise.clone(),
        http: node.config.http.clone(),
        previous: previous.clone(),
        keeps_identity: node.config.data.is_some(),
    };
    let resp = match conn.request(Request::Register(req.clone()), false).await {
        Err(e) if previous.is_some() && e.code() == Some(ErrorCode::Unauthorized) => {
            // The index no longer recognises our cookie (its data was reset): start a new identity.
            tracing::warn!("index refused the saved identity ({e}); registering afresh");
            let fresh = RegisterPeer {
                previous: None,
                ..req
            };
            conn.request(Request::Register(fresh), false).await?
        }
        r => r?,
    };
    match resp {
        Response::Registered {
            peer_id,
            cookie,
            ttl_secs,
            registrations,
        } => {
            let auth = PeerAuth { peer_id, cookie };
            node.save_auth(&auth).await;
            tracing::info!(
                "registered with the index at {} as peer {} (id {peer_id}, registration #{registrations}, lease {ttl_secs} s)",
                node.config.index,
                node.name
            );
            Ok((auth, Duration::from_secs(ttl_secs.max(1))))
        }
        other => Err(ClientError::Protocol {
            addr: node.config.index.clone(),
            what: format!("expected Registered, got {other:?}"),
        }),
    }
}

/// A number for one sync pass, different from the last one's.
fn generation() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Tells the index every topic this peer hosts, in chunks of
/// [`peerbus_proto::SYNC_TOPICS_CHUNK`], so a peer hosting a million topics still fits every
/// message in a frame. The last chunk makes the index drop what this peer no longer hosts.
/// A topic the index gives to another peer meanwhile is fenced here: kept on disk, not
/// served.
async fn announce(node: &Node, conn: &Connection, auth: &PeerAuth) -> Result<(), ClientError> {
    // No topic is created or deleted here while the pass runs, so its list stays true.
    let _directory = node.directory.lock().await;
    let topics = node.topic_names();
    let generation = generation();
    let sync = |topics: Vec<String>, last: bool| Request::SyncTopics {
        auth: auth.clone(),
        generation,
        topics,
        last,
    };
    for chunk in topics.chunks(peerbus_proto::SYNC_TOPICS_CHUNK) {
        match conn.request(sync(chunk.to_vec(), false), false).await {
            Ok(_) => {}
            Err(e) if e.code() == Some(ErrorCode::Exists) => {
                // Someone else took a topic of this chunk while we were away: offer the
                // chunk's topics one by one and fence the contested ones.
                for t in chunk {
                    if let Err(e) = conn.request(sync(vec![t.clone()], false), false).await {
                        if e.code() == Some(ErrorCode::Exists) {
                            // Another peer hosts it now: serving this copy too would split
                            // the topic in two. Its data stays on disk, unserved.
                            node.fence(t);
                            tracing::error!(
                                "topic '{t}' is kept on disk here but no longer served: {e}"
                            );
                        } else {
                            return Err(e);
                        }
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    conn.request(sync(Vec::new(), true), false).await?;
    if !topics.is_empty() {
        tracing::info!("announced {} topics to the index", topics.len());
    }
    Ok(())
}

/// Offers the whole share to the index in chunks (at most
/// [`peerbus_proto::SYNC_FILES_CHUNK`] files and about 4 MiB each), the last of which makes
/// the index drop what this peer no longer offers (files removed while it was away).
/// Returns the share version sent. An index that does not take file lists is tolerated:
/// topics still work.
async fn register_files(
    node: &Node,
    conn: &Connection,
    auth: &PeerAuth,
) -> Result<u64, ClientError> {
    let (version, files) = node
        .share
        .as_ref()
        .map(|s| s.snapshot())
        .unwrap_or_default();
    let n = files.len();
    let generation = generation();
    let mut chunks = file_chunks(files);
    // At least one (empty) chunk, marked last, so an emptied share is emptied at the index.
    if chunks.is_empty() {
        chunks.push(Vec::new());
    }
    let count = chunks.len();
    let mut result = Ok(());
    for (i, files) in chunks.into_iter().enumerate() {
        let req = Request::SyncFiles {
            auth: auth.clone(),
            generation,
            files,
            last: i + 1 == count,
        };
        if let Err(e) = conn.request(req, false).await {
            result = Err(e);
            break;
        }
    }
    match result {
        Ok(()) => {
            if n > 0 {
                tracing::info!("registered {n} files with the index");
            }
        }
        Err(e) if e.code() == Some(ErrorCode::Unsupported) => {
            if n > 0 {
                tracing::warn!(
                    "the index does not take file lists, so {n} shared files are not offered there: {e}"
                );
            }
        }
        // A refused list must not cost the lease (and with it every hosted topic); only a
        // broken connection makes the session start over.
        Err(e) if e.code().is_some() => {
            tracing::error!("the index refused this peer's {n} shared files: {e}");
        }
        Err(e) => return Err(e),
    }
    Ok(version)
}

/// Bytes of file entries one sync chunk carries at most, well under the frame limit.
const SYNC_FILES_BYTES: usize = 4 << 20;

/// `files` cut into sync chunks by count and by size (names may be long).
fn file_chunks(files: Vec<peerbus_proto::FileEntry>) -> Vec<Vec<peerbus_proto::FileEntry>> {
    let mut chunks = Vec::new();
    let mut chunk = Vec::new();
    let mut bytes = 0;
    for f in files {
        let size = f.name.len() + f.hash.len() + 16;
        if !chunk.is_empty()
            && (chunk.len() == peerbus_proto::SYNC_FILES_CHUNK || bytes + size > SYNC_FILES_BYTES)
        {
            chunks.push(std::mem::take(&mut chunk));
            bytes = 0;
        }
        bytes += size;
        chunk.push(f);
    }
    if !chunk.is_empty() {
        chunks.push(chunk);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_chunks_stay_under_the_count_and_the_size() {
        let entry = |i: usize, len: usize| peerbus_proto::FileEntry {
            name: format!("{i:0len$}"),
            hash: "a".repeat(64),
            size: 1,
        };
        let many: Vec<_> = (0..10_000).map(|i| entry(i, 8)).collect();
        let chunks = file_chunks(many);
        assert_eq!(chunks.len(), 3);
        assert!(
            chunks
                .iter()
                .all(|c| c.len() <= peerbus_proto::SYNC_FILES_CHUNK)
        );
        let long: Vec<_> = (0..3000).map(|i| entry(i, 4000)).collect();
        let chunks = file_chunks(long);
        assert!(
            chunks.iter().all(|c| {
                c.iter().map(|f| f.name.len() + 80).sum::<usize>() <= SYNC_FILES_BYTES
            })
        );
        assert_eq!(chunks.iter().map(Vec::len).sum::<usize>(), 3000);
        assert!(file_chunks(Vec::new()).is_empty());
    }
}
