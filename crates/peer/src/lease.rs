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

async fn announce(node: &Node, conn: &Connection, auth: &PeerAuth) -> Result<(), ClientError> {
    let topics = node.topic_names();
    let req = Request::AnnounceTopics {
        auth: auth.clone(),
        topics: topics.clone(),
        replace: true,
    };
    match conn.request(req, false).await {
        Ok(_) => {
            if !topics.is_empty() {
                tracing::info!("announced {} topics to the index", topics.len());
            }
            Ok(())
        }
        Err(e) if e.code() == Some(ErrorCode::Exists) => {
            // Someone else took a topic while we were away: offer the rest one by one and
            // keep the contested data locally, unoffered.
            conn.request(
                Request::AnnounceTopics {
                    auth: auth.clone(),
                    topics: Vec::new(),
                    replace: true,
                },
                false,
            )
            .await?;
            for t in topics {
                let one = Request::AnnounceTopics {
                    auth: auth.clone(),
                    topics: vec![t.clone()],
                    replace: false,
                };
                if let Err(e) = conn.request(one, false).await {
                    if e.code() == Some(ErrorCode::Exists) {
                        // Another peer hosts it now: serving this copy too would split the
                        // topic in two. Its data stays on disk, unserved.
                        node.fence(&t);
                        tracing::error!(
                            "topic '{t}' is kept on disk here but no longer served: {e}"
                        );
                    } else {
                        return Err(e);
                    }
                }
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Offers the whole share to the index in one request, replacing whatever this peer offered
/// before (files removed while it was away). Returns the share version sent. An index that
/// does not take file lists is tolerated: topics still work.
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
    let req = Request::RegisterFiles {
        auth: auth.clone(),
        files,
        replace: true,
    };
    match conn.request(req, false).await {
        Ok(_) => {
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
