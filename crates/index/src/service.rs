//! Requests to the index: registry operations answered locally, topic operations forwarded
//! to the hosting peer.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use peerbus_client::{Client, ClientError};
use peerbus_net::{ConnCtx, Service};
use peerbus_proto::{ErrorCode, NodeKind, RegisterPeer, Request, Response, Retention, WireError};
use peerbus_store::Writer;
use tokio::sync::Notify;
use tokio_util::task::TaskTracker;

use crate::registry::{Change, Expired, FileDiff, FileSet, Host, Registry, TopicDiff, TopicSet};
use crate::replication::{InFlight, plan_replication};
use crate::storage;

/// Topic names logged in full per announce or withdraw; beyond this a count is enough and
/// a peer re-announcing a million topics does not flood the log.
const LOGGED_TOPICS: usize = 10;

/// Milliseconds since the Unix epoch as of the index's start, plus the time elapsed since on
/// the monotonic clock. Leases are measured on it so that setting the machine's clock
/// forward does not expire every peer at once, nor setting it back keep dead peers alive;
/// anchoring it to wall time keeps persisted expiry times meaningful across restarts.
fn now_ms() -> u64 {
    static START: OnceLock<(u64, Instant)> = OnceLock::new();
    let (wall, mono) = START.get_or_init(|| {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        (wall, Instant::now())
    });
    wall.saturating_add(u64::try_from(mono.elapsed().as_millis()).unwrap_or(u64::MAX))
}

fn new_cookie() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn topic_list(topics: &[String]) -> String {
    let mut s = topics
        .iter()
        .take(LOGGED_TOPICS)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if topics.len() > LOGGED_TOPICS {
        s.push_str(&format!(" and {} more", topics.len() - LOGGED_TOPICS));
    }
    s
}

/// A forwarded request's outcome as the index's own answer: the host's error is relayed
/// as is, failing to reach the host means the topic is unavailable right now.
fn relay(result: Result<Response, ClientError>) -> Result<Response, WireError> {
    match result {
        Ok(r) => Ok(r),
        Err(ClientError::Server(e)) => Err(e),
        Err(e) => Err(WireError::new(ErrorCode::Unavailable, e.to_string())),
    }
}

/// Most participants the index keeps: a bound on what anyone reaching the classic API can
/// make it remember, and, with names of at most 255 bytes, a list that fits in one frame.
pub(crate) const MAX_PARTICIPANTS: usize = 10_000;

/// The answer about a participant that is not registered, worded as gateways show it.
fn participant_not_found(name: &str) -> WireError {
    WireError::new(
        ErrorCode::NotFound,
        format!("peer '{name}' is not registered"),
    )
}

/// A fetch the replication loop asks of a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ask {
    pub hash: String,
    /// The file's name, for the log.
    pub file: String,
    /// Live holders when asked.
    pub holders: usize,
    pub target: Host,
}

/// The index's request handler and state.
pub(crate) struct IndexService {
    registry: Mutex<Registry>,
    writer: Writer,
    /// Talks to peers for forwarded requests and fetches, with the index's own token.
    client: Client,
    ttl: Duration,
    /// Tasks talking to peers (forwarded requests, fetches), so shutdown waits for them.
    forwards: TaskTracker,
    /// Woken when files or peer liveness change, so replication reacts at once instead of
    /// at its next tick. A `Notify` keeps one wakeup while the loop is busy, so a burst of
    /// changes costs one round, not one each.
    pub(crate) changed: Notify,
    /// Participants registered through HTTP gateways ("light peers" that host nothing).
    /// Kept here rather than at each gateway so every node answers the same; not persisted,
    /// as gateway clients re-register after an index restart.
    participants: Mutex<BTreeSet<String>>,
}

impl IndexService {
    pub(crate) fn new(registry: Registry, writer: Writer, client: Client, ttl: Duration) -> Self {
        IndexService {
            registry: Mutex::new(registry),
            writer,
            client,
            ttl,
            forwards: TaskTracker::new(),
            changed: Notify::new(),
            participants: Mutex::new(BTreeSet::new()),
        }
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// Runs `task` among those shutdown waits for.
    pub(crate) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.forwards.spawn(task);
    }

    /// True when live peer `id` offers the file `hash`.
    pub(crate) fn offers(&self, id: u64, hash: &str) -> bool {
        self.read(|reg, _| reg.offers(id, hash))
    }

    /// Plans a replication round and records its fetches as in flight.
    ///
    /// Planned under the registry lock, so no peer can expire or register files between
    /// reading the state and choosing targets.
    pub(crate) fn plan_fetches(&self, replication: u32, in_flight: &Mutex<InFlight>) -> Vec<Ask> {
        self.read(|reg, _| {
            let short = reg.shortfalls(replication);
            if short.is_empty() {
                return Vec::new();
            }
            let live = reg.live_loads();
            let mut in_flight = in_flight.lock().unwrap_or_else(PoisonError::into_inner);
            let plan = plan_replication(replication, &short, &live, &in_flight);
            let holders = |hash: &str| {
                short
                    .binary_search_by(|s| s.hash.as_str().cmp(hash))
                    .map_or(0, |i| short[i].holders.len())
            };
            plan.into_iter()
                .filter_map(|(hash, id)| {
                    let target = reg.live_peer(id)?;
                    in_flight.insert((hash.clone(), id));
                    Some(Ask {
                        file: reg.file_name(&hash).unwrap_or_default().to_string(),
                        holders: holders(&hash),
                        hash,
                        target,
                    })
                })
                .collect()
        })
    }

    /// Locks the registry after ending every lease due, so each operation sees liveness as
    /// of now (the registry's invariant) without waiting for the expiry timer.
    fn registry(&self, now: u64) -> MutexGuard<'_, Registry> {
        // Registry operations check everything before changing anything, so a panic cannot
        // leave a half-made change behind; a poisoned lock is still consistent.
        let mut reg = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        let (expired, changes) = reg.expire(now);
        if !changes.is_empty() {
            // Submitted under the lock so the store sees changes in the registry's order.
            self.writer.submit_detached(storage::ops(changes));
        }
        let any_expired = !expired.is_empty();
        for Expired {
            id,
            name,
            topics,
            files,
        } in expired
        {
            tracing::info!(
                "peer {name} (id {id}) expired: no keepalive within {}s \
                 ({topics} topics and {files} files withdrawn)",
                self.ttl.as_secs_f64()
            );
        }
        if any_expired {
            self.changed.notify_one();
        }
        reg
    }

    /// Ends the leases due now; run by the expiry timer.
    pub(crate) fn expire_now(&self) {
        drop(self.registry(now_ms()));
    }

    pub(crate) async fn wait_forwards(&self) {
        self.forwards.close();
        self.forwards.wait().await;
    }

    /// Lease length as told to peers, in whole seconds. Rounded down, so a peer pacing its
    /// keepalives on it is early rather than late; never 0, which would read as no lease.
    fn ttl_secs(&self) -> u64 {
        self.ttl.as_secs().max(1)
    }

    async fn register(&self, req: &RegisterPeer) -> Result<Response, WireError> {
        let now = now_ms();
        let (reg, stored) = {
            let mut registry = self.registry(now);
            let (reg, changes) = registry.register(req, new_cookie(), now)?;
            // Fsynced before answering: a peer told its id must find it after a crash.
            (reg, self.writer.submit(storage::ops(changes), true))
        };
        let failure = match stored.await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("the storage writer stopped".to_string()),
        };
        // A new live peer can take copies of files: worth a replication round.
        self.changed.notify_one();
        if let Some(e) = failure {
            tracing::error!(
                "registration of peer {} (id {}) was not stored: {e}",
                req.name,
                reg.peer_id
            );
            return Err(WireError::new(
                ErrorCode::Internal,
                format!("the index could not store the registration: {e}"),
            ));
        }
        if let Some(old) = reg.replaced {
            tracing::info!(
                "peer name {} freed from inactive peer {old} for a new registration",
                req.name
            );
        }
        tracing::info!(
            "peer {} (id {}) registered at {}{}: registration #{} in 30 days",
            req.name,
            reg.peer_id,
            req.addr,
            if reg.resumed {
                ", resuming its identity"
            } else {
                ""
            },
            reg.registrations
        );
        Ok(Response::Registered {
            peer_id: reg.peer_id,
            cookie: reg.cookie,
            ttl_secs: self.ttl_secs(),
            registrations: reg.registrations,
        })
    }

    /// Runs a registry change and queues its persistence, both under the lock so the
    /// store sees changes in the registry's order.
    fn change<T>(
        &self,
        f: impl FnOnce(&mut Registry, u64) -> Result<(T, Vec<Change>), WireError>,
    ) -> Result<T, WireError> {
        let now = now_ms();
        let mut reg = self.registry(now);
        let (value, changes) = f(&mut reg, now)?;
        if !changes.is_empty() {
            self.writer.submit_detached(storage::ops(changes));
        }
        Ok(value)
    }

    /// Runs a registry query.
    fn read<T>(&self, f: impl FnOnce(&Registry, u64) -> T) -> T {
        let now = now_ms();
        f(&self.registry(now), now)
    }

    fn log_diff(diff: &TopicDiff, peer_id: u64) {
        if !diff.added.is_empty() {
            tracing::info!(
                "peer {} (id {peer_id}) announced {} topics: {}",
                diff.name,
                diff.added.len(),
                topic_list(&diff.added)
            );
        }
        if !diff.removed.is_empty() {
            tracing::info!(
                "peer {} (id {peer_id}) withdrew {} topics: {}",
                diff.name,
                diff.removed.len(),
                topic_list(&diff.removed)
            );
        }
    }

    fn log_files(diff: &FileDiff, peer_id: u64, listed: Option<usize>) {
        match listed {
            Some(listed) => tracing::info!(
                "peer {} (id {peer_id}) registered {listed} files \
                 ({} new, {} changed, {} withdrawn): it offers {}",
                diff.name,
                diff.added,
                diff.updated,
                diff.removed,
                diff.total
            ),
            None if diff.removed > 0 => tracing::info!(
                "peer {} (id {peer_id}) unregistered {} files: it offers {}",
                diff.name,
                diff.removed,
                diff.total
            ),
            None => {}
        }
    }

    /// Answers `req`, or hands it to a task that will.
    async fn answer(&self, conn: &Arc<ConnCtx>, id: u32, req: Request) -> Answer {
        let result = match req {
            Request::Ping => Ok(Response::Pong),
            Request::Register(r) => self.register(&r).await,
            Request::Keepalive(auth) => self
                .change(|reg, now| Ok(((), reg.keepalive(&auth, now)?)))
                .map(|()| Response::Ok),
            Request::Leave(auth) => self.change(|reg, _| reg.leave(&auth)).map(|left| {
                tracing::info!(
                    "peer {} (id {}) left ({} topics and {} files withdrawn)",
                    left.name,
                    auth.peer_id,
                    left.topics,
                    left.files
                );
                self.changed.notify_one();
                Response::Ok
            }),
            Request::AnnounceTopics {
                auth,
                topics,
                replace,
            } => TopicSet::new(topics)
                .and_then(|set| self.change(|reg, _| reg.announce(&auth, &set, replace)))
                .map(|diff| {
                    Self::log_diff(&diff, auth.peer_id);
                    Response::Ok
                }),
            Request::WithdrawTopics { auth, topics } => self
                .change(|reg, _| reg.withdraw(&auth, &topics))
                .map(|diff| {
                    Self::log_diff(&diff, auth.peer_id);
                    Response::Ok
                }),
            Request::ListPeers { after } => Ok(Response::Peers(
                self.read(|reg, now| reg.list_peers(after, now)),
            )),
            Request::LookupTopic { topic } => self
                .read(|reg, _| reg.lookup(&topic))
                .map(Response::Location),
            Request::ListTopics { prefix, after } => {
                Ok(Response::Topics(self.read(|reg, _| {
                    reg.list_topics(prefix.as_deref(), after.as_deref())
                })))
            }
            Request::SyncTopics {
                auth,
                generation,
                topics,
                last,
            } => TopicSet::new(topics)
                .and_then(|set| {
                    self.change(|reg, _| reg.sync_topics(&auth, generation, &set, last))
                })
                .map(|diff| {
                    Self::log_diff(&diff, auth.peer_id);
                    Response::Ok
                }),
            Request::SyncFiles {
                auth,
                generation,
                files,
                last,
            } => {
                let listed = files.len();
                FileSet::new(files)
                    .and_then(|set| {
                        self.change(|reg, _| reg.sync_files(&auth, generation, &set, last))
                    })
                    .map(|diff| {
                        Self::log_files(&diff, auth.peer_id, Some(listed));
                        self.changed.notify_one();
                        Response::Ok
                    })
            }
            Request::CreateTopic {
                topic,
                retention,
                peer,
            } => match self.read(|reg, _| reg.plan_create(&topic, peer.as_deref())) {
                Ok(host) => {
                    tracing::info!(
                        "creating topic '{topic}' on peer {} (id {}) at {}",
                        host.name,
                        host.id,
                        host.addr
                    );
                    let req = Request::CreateTopic {
                        topic,
                        retention,
                        peer: None,
                    };
                    self.forward(conn, id, host.addr, req);
                    return Answer::Later;
                }
                Err(e) => Err(e),
            },
            Request::CreateTopics {
                topics,
                retention,
                peer,
            } => match peerbus_proto::check_create_count(topics.len())
                .and_then(|()| TopicSet::distinct(topics))
                .and_then(|set| self.read(|reg, _| reg.plan_create_many(set, peer.as_deref())))
            {
                Ok(plan) => {
                    self.create_many(conn, id, plan, retention);
                    return Answer::Later;
                }
                Err(e) => Err(e),
            },
            Request::Subscribe(s) if s.follow.is_some() => Err(WireError::new(
                ErrorCode::Unsupported,
                "streaming subscriptions go to the hosting peer; look the topic up first",
            )),
            // Follows never start here, so there is nothing to stop.
            Request::StopFollow { .. } => Ok(Response::Ok),
            Request::RegisterFiles {
                auth,
                files,
                replace,
            } => {
                let listed = files.len();
                FileSet::new(files)
                    .and_then(|set| self.change(|reg, _| reg.register_files(&auth, &set, replace)))
                    .map(|diff| {
                        Self::log_files(&diff, auth.peer_id, Some(listed));
                        self.changed.notify_one();
                        Response::Ok
                    })
            }
            Request::UnregisterFiles { auth, hashes } => self
                .change(|reg, _| reg.unregister_files(&auth, &hashes))
                .map(|diff| {
                    Self::log_files(&diff, auth.peer_id, None);
                    self.changed.notify_one();
                    Response::Ok
                }),
            Request::SearchFiles { pattern, after } => Ok(Response::Files(
                self.read(|reg, _| reg.search_files(&pattern, after.as_ref())),
            )),
            Request::LookupFile { key } => self
                .read(|reg, _| reg.lookup_file(&key))
                .map(|hit| Response::Files(vec![hit])),
            // The index knows where files are, not what is in them.
            Request::FileManifest { .. } | Request::ReadPiece { .. } => Err(WireError::new(
                ErrorCode::Unsupported,
                "ask a peer holding the file: look it up first",
            )),
            Request::Fetch { .. } => Err(WireError::new(
                ErrorCode::Unsupported,
                "send fetch to the peer that should download",
            )),
            Request::NodeStats => Err(WireError::new(
                ErrorCode::Unsupported,
                "the index hosts no topics: ask each peer for its totals",
            )),
            Request::RegisterParticipant { name } => self.register_participant(name),
            Request::UnregisterParticipant { name } => {
                if self.participants().remove(&name) {
                    tracing::info!("participant {name} unregistered");
                    Ok(Response::Ok)
                } else {
                    Err(participant_not_found(&name))
                }
            }
            Request::ListParticipants => Ok(Response::Participants(
                self.participants().iter().cloned().collect(),
            )),
            Request::ParticipantExists { name } => {
                if self.participants().contains(&name) {
                    Ok(Response::Ok)
                } else {
                    Err(participant_not_found(&name))
                }
            }
            req => match req.hosted_topic() {
                // The name is checked before the lookup, so the client hears what is wrong
                // with it rather than "not found".
                Some(topic) => match peerbus_proto::validate_topic(topic)
                    .map_err(WireError::from)
                    .and_then(|()| self.read(|reg, _| reg.lookup(topic)))
                {
                    Ok(loc) => {
                        self.forward(conn, id, loc.addr, req);
                        return Answer::Later;
                    }
                    Err(e) => Err(e),
                },
                // Only requests added to the protocol after this index was written get here.
                None => Err(WireError::new(
                    ErrorCode::Unsupported,
                    format!("the index does not serve {} requests", req.kind()),
                )),
            },
        };
        Answer::Now(result)
    }

    fn participants(&self) -> MutexGuard<'_, BTreeSet<String>> {
        // A set insert or remove cannot be left half done, so a poisoned lock is consistent.
        self.participants
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn register_participant(&self, name: String) -> Result<Response, WireError> {
        peerbus_proto::validate_subscriber(&name)?;
        let mut participants = self.participants();
        if participants.contains(&name) {
            return Err(WireError::new(
                ErrorCode::Exists,
                format!("peer '{name}' is already registered"),
            ));
        }
        if participants.len() >= MAX_PARTICIPANTS {
            return Err(WireError::new(
                ErrorCode::LimitReached,
                format!(
                    "the index has {MAX_PARTICIPANTS} participants registered, its limit: \
                     unregister some first"
                ),
            ));
        }
        participants.insert(name.clone());
        drop(participants);
        tracing::info!("participant {name} registered");
        Ok(Response::Ok)
    }

    /// Sends `req` to the peer at `addr` in a task of its own, so this connection keeps
    /// serving meanwhile (the peer may call back on another connection before answering),
    /// and relays the answer.
    fn forward(&self, conn: &Arc<ConnCtx>, id: u32, addr: String, req: Request) {
        let client = self.client.clone();
        let conn = conn.clone();
        self.forwards.spawn(async move {
            let result = tokio::select! {
                r = forward_to_peer(&client, &addr, req) => r,
                // The asker is gone (or the index is stopping): nobody needs the answer.
                _ = conn.closed.cancelled() => return,
            };
            conn.reply(id, result).await;
        });
    }
}

/// Sends `req` to the peer at `addr`. A node there that answers as an index is refused: a
/// peer registered with this index's own address would otherwise have the request forwarded
/// back here, placed on the same peer and forwarded again, forever.
async fn forward_to_peer(client: &Client, addr: &str, req: Request) -> Result<Response, WireError> {
    let conn = match client.connection(addr).await {
        Ok(c) => c,
        Err(e) => return relay(Err(e)),
    };
    if conn.node() != NodeKind::Peer {
        return Err(WireError::new(
            ErrorCode::Unavailable,
            format!(
                "{addr} is not a peer but an index: the peer registered there advertises a wrong address"
            ),
        ));
    }
    relay(conn.request(req, false).await)
}

// Bulk topic creation (`CreateTopics`).
impl IndexService {
    /// Asks each host of `plan` to create its topics, all at once, in a task of its own (the
    /// hosts claim them here on other connections before answering), and answers with what
    /// each created, or with the first failure.
    fn create_many(
        &self,
        conn: &Arc<ConnCtx>,
        id: u32,
        plan: Vec<(Host, Vec<String>)>,
        retention: Retention,
    ) {
        let total: usize = plan.iter().map(|(_, t)| t.len()).sum();
        if total > 0 {
            tracing::info!("creating {total} topics on {} peers", plan.len());
        }
        let client = self.client.clone();
        let conn = conn.clone();
        self.forwards.spawn(async move {
            let asks = plan.into_iter().map(|(host, topics)| {
                let client = client.clone();
                let req = Request::CreateTopics {
                    topics,
                    retention,
                    peer: None,
                };
                async move { forward_to_peer(&client, &host.addr, req).await }
            });
            let result = tokio::select! {
                r = futures::future::join_all(asks) => r,
                _ = conn.closed.cancelled() => return,
            };
            let mut created = Vec::new();
            let mut failed = None;
            for r in result {
                match r {
                    Ok(Response::Created(c)) => created.extend(c),
                    Ok(other) => {
                        failed.get_or_insert(WireError::new(
                            ErrorCode::Internal,
                            format!("a peer answered create_topics with {other:?}"),
                        ));
                    }
                    Err(e) => {
                        failed.get_or_insert(e);
                    }
                }
            }
            let answer = match failed {
                Some(e) => Err(e),
                None => Ok(Response::Created(created)),
            };
            conn.reply(id, answer).await;
        });
    }
}

/// How a request is answered.
enum Answer {
    /// Right away, with this.
    Now(Result<Response, WireError>),
    /// By a forwarding task.
    Later,
}

impl Service for IndexService {
    async fn handle(self: &Arc<Self>, conn: &Arc<ConnCtx>, id: u32, _forward: bool, req: Request) {
        let kind = req.kind();
        let refusable = matches!(
            req,
            Request::Register(_)
                | Request::Keepalive(_)
                | Request::Leave(_)
                | Request::AnnounceTopics { .. }
                | Request::WithdrawTopics { .. }
                | Request::RegisterFiles { .. }
                | Request::UnregisterFiles { .. }
                | Request::SyncTopics { .. }
                | Request::SyncFiles { .. }
        );
        let Answer::Now(result) = self.answer(conn, id, req).await else {
            return;
        };
        if let Err(e) = &result
            && (e.code == ErrorCode::Unauthorized || refusable && e.code == ErrorCode::Exists)
        {
            tracing::warn!(
                "refused {kind} from {} (connection {}): {e}",
                conn.remote,
                conn.id
            );
        }
        conn.reply(id, result).await;
    }
}
