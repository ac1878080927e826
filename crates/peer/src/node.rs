//! The peer's state and its request handlers.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use peerbus_client::{Client, ClientError};
use peerbus_net::{ConnCtx, Service};
use peerbus_proto::{
    Batch, ErrorCode, MessageSet, PeerAuth, Request, Response, Retention, ServerFrame, Subscribe,
    SubscriberInfo, TopicLocation, TopicStats, WireError,
};
use peerbus_store::{Backend, Op, Table, TopicMeta, Writer};
use tokio_util::sync::CancellationToken;

use crate::lease::LeaseCell;
use crate::retention::Retained;
use crate::topic::Topic;
use crate::{Durability, PeerConfig};

/// Most messages one pull or delivery carries.
const MAX_READ_MESSAGES: usize = 8192;
/// Most payload bytes one pull or delivery carries.
const MAX_READ_BYTES: usize = 4 << 20;
const AUTH_KEY: &[u8] = b"auth";

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn internal(e: impl std::fmt::Display) -> WireError {
    WireError::new(ErrorCode::Internal, format!("storage failure: {e}"))
}

fn relay(e: ClientError) -> WireError {
    match e {
        ClientError::Server(w) => w,
        other => WireError::new(ErrorCode::Unavailable, other.to_string()),
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SavedIdentity {
    name: String,
    auth: PeerAuth,
}

/// Everything a running peer shares between its connections and tasks.
pub(crate) struct Node {
    pub config: PeerConfig,
    pub name: String,
    pub advertise: String,
    pub backend: Arc<dyn Backend>,
    pub writer: Writer,
    pub topics: Mutex<HashMap<String, Arc<Topic>>>,
    pub lease: LeaseCell,
    pub client: Client,
    /// Following subscriptions by (connection, subscription id), to stop them on request.
    follows: Mutex<HashMap<(u64, u64), CancellationToken>>,
    next_topic_id: Mutex<u64>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("advertise", &self.advertise)
            .finish_non_exhaustive()
    }
}

impl Node {
    pub fn open(
        config: PeerConfig,
        backend: Arc<dyn Backend>,
        advertise: String,
        default_name: String,
    ) -> Result<Node, peerbus_store::StoreError> {
        let saved: Option<SavedIdentity> = backend
            .get(Table::Meta, AUTH_KEY)?
            .and_then(|v| postcard::from_bytes(&v).ok());
        let name = config
            .name
            .clone()
            .or_else(|| saved.as_ref().map(|s| s.name.clone()))
            .unwrap_or(default_name);
        let mut topics = HashMap::new();
        let mut max_id = 0;
        for (tname, meta) in backend.topics()? {
            max_id = max_id.max(meta.id);
            let mut retained = Retained::starting_at(meta.low);
            for (offset, ts, size) in backend.sizes(meta.id)? {
                retained.skip_to(offset);
                retained.push(size, ts);
            }
            let subscribers: BTreeMap<String, u64> =
                backend.offsets(meta.id)?.into_iter().collect();
            let topic = Topic::new(
                tname.clone(),
                meta.id,
                meta.retention,
                meta.created_ms,
                retained,
                subscribers,
            );
            tracing::info!(
                "loaded topic '{tname}': offsets {}..{}",
                topic.state.lock().expect("topic lock").retained.low(),
                topic.high_watermark()
            );
            topics.insert(tname, Arc::new(topic));
        }
        let writer = Writer::start(backend.clone());
        let client = Client::with_token(config.index.clone(), config.token.clone());
        Ok(Node {
            name,
            advertise,
            backend,
            writer,
            topics: Mutex::new(topics),
            lease: Arc::new(Mutex::new(None)),
            client,
            follows: Mutex::new(HashMap::new()),
            next_topic_id: Mutex::new(max_id + 1),
            config,
        })
    }

    pub fn saved_auth(&self) -> Option<PeerAuth> {
        let v = self.backend.get(Table::Meta, AUTH_KEY).ok()??;
        postcard::from_bytes::<SavedIdentity>(&v)
            .ok()
            .map(|s| s.auth)
    }

    pub async fn save_auth(&self, auth: &PeerAuth) {
        let saved = SavedIdentity {
            name: self.name.clone(),
            auth: auth.clone(),
        };
        let value = postcard::to_stdvec(&saved).expect("identity encodes");
        let op = Op::Put {
            table: Table::Meta,
            key: AUTH_KEY.to_vec(),
            value,
        };
        if let Ok(Err(e)) | Err(e) = self
            .writer
            .submit(vec![op], true)
            .await
            .map_err(|_| peerbus_store::StoreError::Closed)
        {
            tracing::error!("cannot save this peer's identity: {e}");
        }
    }

    pub fn topic_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .topics
            .lock()
            .expect("topics lock")
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    fn topic(&self, name: &str) -> Option<Arc<Topic>> {
        self.topics.lock().expect("topics lock").get(name).cloned()
    }

    fn sync(&self) -> bool {
        self.config.durability == Durability::Sync
    }

    fn location(&self, topic: &str) -> TopicLocation {
        let peer_id = self
            .lease
            .lock()
            .expect("lease lock")
            .as_ref()
            .map_or(0, |l| l.auth.peer_id);
        TopicLocation {
            topic: topic.to_string(),
            peer_id,
            peer_name: self.name.clone(),
            addr: self.advertise.clone(),
        }
    }

    async fn create_topic(
        &self,
        topic: String,
        retention: Retention,
    ) -> Result<Response, WireError> {
        peerbus_proto::validate_topic(&topic)?;
        if self.topic(&topic).is_some() {
            return Err(WireError::new(
                ErrorCode::Exists,
                format!("topic '{topic}' exists on peer {}", self.name),
            ));
        }
        let lease = self.lease.lock().expect("lease lock").clone();
        let Some(lease) = lease else {
            return Err(WireError::new(
                ErrorCode::Unavailable,
                format!(
                    "peer {} is not registered with the index at {} right now, so it cannot claim topic '{topic}'",
                    self.name, self.config.index
                ),
            ));
        };
        // Claim at the index first: it refuses names another peer hosts.
        lease
            .conn
            .request(
                Request::AnnounceTopics {
                    auth: lease.auth.clone(),
                    topics: vec![topic.clone()],
                    replace: false,
                },
                false,
            )
            .await
            .map_err(relay)?;
        let id = {
            let mut n = self.next_topic_id.lock().expect("id lock");
            let id = *n;
            *n += 1;
            id
        };
        let meta = TopicMeta {
            id,
            retention,
            low: 0,
            created_ms: now_ms(),
        };
        let t = Arc::new(Topic::new(
            topic.clone(),
            id,
            retention,
            meta.created_ms,
            Retained::starting_at(0),
            BTreeMap::new(),
        ));
        {
            let mut topics = self.topics.lock().expect("topics lock");
            if topics.contains_key(&topic) {
                return Err(WireError::new(
                    ErrorCode::Exists,
                    format!("topic '{topic}' exists on peer {}", self.name),
                ));
            }
            topics.insert(topic.clone(), t);
        }
        let done = self.writer.submit(
            vec![Op::PutTopic {
                name: topic.clone(),
                meta,
            }],
            self.config.durability != Durability::Memory,
        );
        match done.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(internal(e)),
            Err(_) => return Err(internal("the storage writer stopped")),
        }
        tracing::info!("created topic '{topic}'");
        Ok(Response::Location(self.location(&topic)))
    }

    async fn delete_topic(&self, topic: &str) -> Result<Response, WireError> {
        let t = self
            .topics
            .lock()
            .expect("topics lock")
            .remove(topic)
            .ok_or_else(|| WireError::topic_not_found(topic))?;
        t.deleted.cancel();
        let done = self.writer.submit(
            vec![Op::DeleteTopic {
                name: topic.to_string(),
                id: t.id,
            }],
            self.config.durability != Durability::Memory,
        );
        let stored = done.await;
        let lease = self.lease.lock().expect("lease lock").clone();
        if let Some(lease) = lease {
            let req = Request::WithdrawTopics {
                auth: lease.auth,
                topics: vec![topic.to_string()],
            };
            if let Err(e) = lease.conn.request(req, false).await {
                // The next re-announce (replace) corrects the index.
                tracing::warn!("could not withdraw topic '{topic}' at the index: {e}");
            }
        }
        match stored {
            Ok(Ok(())) => {
                tracing::info!("deleted topic '{topic}'");
                Ok(Response::Ok)
            }
            Ok(Err(e)) => Err(internal(e)),
            Err(_) => Err(internal("the storage writer stopped")),
        }
    }

    /// Assigns offsets and queues the batch for storage while holding the topic lock, so the
    /// writer sees batches in offset order. Returns what to await outside the lock.
    fn append(
        &self,
        t: &Arc<Topic>,
        batch: Batch,
    ) -> Result<
        (
            u64,
            u32,
            tokio::sync::oneshot::Receiver<peerbus_store::Result<()>>,
        ),
        WireError,
    > {
        batch
            .check()
            .map_err(|e| WireError::new(ErrorCode::BadRequest, e))?;
        if batch.is_empty() {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                "publish of an empty batch",
            ));
        }
        if let Some(&big) = batch
            .lens
            .iter()
            .find(|&&l| l as usize > peerbus_proto::DEFAULT_MAX_PAYLOAD)
        {
            return Err(WireError::new(
                ErrorCode::TooLarge,
                format!(
                    "message of {big} bytes is over the {} byte limit",
                    peerbus_proto::DEFAULT_MAX_PAYLOAD
                ),
            ));
        }
        let now = now_ms();
        let n = batch.len() as u32;
        let mut st = t.state.lock().expect("topic lock");
        let first = st.retained.next();
        for &len in &batch.lens {
            st.retained.push(len, now);
        }
        let mut ops = vec![Op::Append {
            topic_id: t.id,
            first_offset: first,
            timestamps: vec![now; n as usize],
            batch,
        }];
        let min = st.min_committed();
        let cut = st.retained.cutoff(&t.retention, now, min);
        if cut > st.retained.low() {
            st.retained.drop_below(cut);
            ops.extend(self.truncate_ops(t, cut));
        }
        let rx = self.writer.submit(ops, self.sync());
        Ok((first, n, rx))
    }

    fn truncate_ops(&self, t: &Topic, below: u64) -> Vec<Op> {
        vec![
            Op::Truncate {
                topic_id: t.id,
                below,
            },
            Op::PutTopic {
                name: t.name.clone(),
                meta: TopicMeta {
                    id: t.id,
                    retention: t.retention,
                    low: below,
                    created_ms: t.created_ms,
                },
            },
        ]
    }

    /// Reads from `from` up to the durable watermark.
    fn read(&self, t: &Topic, from: u64, max: usize) -> Result<MessageSet, WireError> {
        let hw = t.high_watermark();
        let mut set = MessageSet {
            topic: t.name.clone(),
            first_offset: from,
            ..MessageSet::default()
        };
        if from >= hw || max == 0 {
            set.first_offset = from.min(hw);
            return Ok(set);
        }
        let want = max.min((hw - from) as usize).min(MAX_READ_MESSAGES);
        let msgs = self
            .backend
            .read(t.id, from, want, MAX_READ_BYTES)
            .map_err(internal)?;
        let Some(first) = msgs.first() else {
            return Ok(set);
        };
        set.first_offset = first.offset;
        let mut lens = Vec::with_capacity(msgs.len());
        let mut data = Vec::with_capacity(msgs.iter().map(|m| m.payload.len()).sum());
        for (expect, m) in (first.offset..).zip(&msgs) {
            // A gap (messages lost to a failed write) ends the set; the next read starts past it.
            if m.offset != expect || m.offset >= hw {
                break;
            }
            lens.push(m.payload.len() as u32);
            data.extend_from_slice(&m.payload);
            set.timestamps.push(m.timestamp_ms);
        }
        set.batch = Batch {
            lens,
            data: Bytes::from(data),
        };
        Ok(set)
    }

    /// Moves a subscriber's committed position and applies `consumed` retention.
    fn commit(&self, t: &Topic, subscriber: &str, offset: u64) {
        let mut ops = vec![Op::SetOffset {
            topic_id: t.id,
            subscriber: subscriber.to_string(),
            offset,
        }];
        let mut st = t.state.lock().expect("topic lock");
        match st.subscribers.get_mut(subscriber) {
            Some(o) if *o >= offset => return,
            Some(o) => *o = offset,
            // Unsubscribed meanwhile: do not bring it back.
            None => return,
        }
        if t.retention.consumed {
            let min = st.min_committed();
            let cut = st.retained.cutoff(&t.retention, now_ms(), min);
            if cut > st.retained.low() {
                st.retained.drop_below(cut);
                ops.extend(self.truncate_ops(t, cut));
            }
        }
        self.writer.submit_detached(ops);
    }

    fn subscribe(&self, t: &Topic, s: &Subscribe) -> Result<u64, WireError> {
        peerbus_proto::validate_subscriber(&s.subscriber)?;
        let hw = t.high_watermark();
        let mut st = t.state.lock().expect("topic lock");
        let current = st.subscribers.get(&s.subscriber).copied();
        let pos = st.start_position(current, s.from, hw);
        if current != Some(pos) {
            st.subscribers.insert(s.subscriber.clone(), pos);
            self.writer.submit_detached(vec![Op::SetOffset {
                topic_id: t.id,
                subscriber: s.subscriber.clone(),
                offset: pos,
            }]);
        }
        Ok(pos)
    }

    fn pull_now(&self, t: &Topic, subscriber: &str, max: u32) -> Result<MessageSet, WireError> {
        let pos = self.subscribe(
            t,
            &Subscribe {
                topic: t.name.clone(),
                subscriber: subscriber.to_string(),
                from: None,
                follow: None,
            },
        )?;
        let set = self.read(t, pos, max as usize)?;
        if !set.is_empty() {
            self.commit(t, subscriber, set.next_offset());
        }
        Ok(set)
    }

    fn stats(&self, t: &Topic) -> TopicStats {
        let st = t.state.lock().expect("topic lock");
        TopicStats {
            topic: t.name.clone(),
            first_offset: st.retained.low(),
            next_offset: t.high_watermark(),
            bytes: st.retained.bytes(),
            subscribers: st.subscribers.len() as u32,
            retention: t.retention,
        }
    }
}

/// The peer as a [`Service`] for the accept loop.
#[derive(Debug)]
pub(crate) struct PeerService {
    pub node: Arc<Node>,
}

impl Service for PeerService {
    async fn handle(self: &Arc<Self>, conn: &Arc<ConnCtx>, id: u32, forward: bool, req: Request) {
        let node = &self.node;
        if let Some(topic) = req.hosted_topic()
            && node.topic(topic).is_none()
        {
            let topic = topic.to_string();
            if !forward {
                let e = WireError::new(
                    ErrorCode::NotHost,
                    format!("peer {} does not host topic '{topic}'", node.name),
                );
                conn.reply(id, Err(e)).await;
                return;
            }
            let (node, conn) = (node.clone(), conn.clone());
            tokio::spawn(async move { forward_topic_request(node, conn, id, topic, req).await });
            return;
        }
        match req {
            Request::Ping => {
                conn.reply(id, Ok(Response::Pong)).await;
            }
            Request::Publish { topic, batch } => {
                let t = node.topic(&topic).expect("checked above");
                match node.append(&t, batch) {
                    Ok((first, count, rx)) => {
                        let conn = conn.clone();
                        tokio::spawn(async move {
                            let r = match rx.await {
                                Ok(Ok(())) => {
                                    t.mark_durable(first + u64::from(count));
                                    Ok(Response::Published {
                                        first_offset: first,
                                        count,
                                    })
                                }
                                Ok(Err(e)) => Err(internal(e)),
                                Err(_) => Err(internal("the storage writer stopped")),
                            };
                            conn.reply(id, r).await;
                        });
                    }
                    Err(e) => {
                        conn.reply(id, Err(e)).await;
                    }
                }
            }
            Request::Pull {
                topic,
                subscriber,
                max,
                wait_ms,
            } => {
                let t = node.topic(&topic).expect("checked above");
                let first = node.pull_now(&t, &subscriber, max);
                match first {
                    Ok(set) if set.is_empty() && wait_ms > 0 => {
                        let (node, conn) = (node.clone(), conn.clone());
                        tokio::spawn(async move {
                            let mut rx = t.durable.subscribe();
                            let deadline = tokio::time::Instant::now()
                                + Duration::from_millis(u64::from(wait_ms));
                            let start = set.first_offset;
                            let r = loop {
                                if *rx.borrow_and_update() > start {
                                    break node.pull_now(&t, &subscriber, max);
                                }
                                tokio::select! {
                                    c = rx.changed() => if c.is_err() { break Ok(set.clone()) },
                                    _ = tokio::time::sleep_until(deadline) => break Ok(set.clone()),
                                    _ = t.deleted.cancelled() => break Err(WireError::topic_not_found(&t.name)),
                                    _ = conn.closed.cancelled() => return,
                                }
                            };
                            conn.reply(id, r.map(Response::Messages)).await;
                        });
                    }
                    r => {
                        conn.reply(id, r.map(Response::Messages)).await;
                    }
                }
            }
            Request::Subscribe(s) => {
                let t = node.topic(&s.topic).expect("checked above");
                match node.subscribe(&t, &s) {
                    Ok(pos) => {
                        conn.reply(id, Ok(Response::Subscribed { next_offset: pos }))
                            .await;
                        if let Some(sub) = s.follow {
                            let stop = conn.closed.child_token();
                            node.follows
                                .lock()
                                .expect("follows lock")
                                .insert((conn.id, sub), stop.clone());
                            let (node, conn) = (node.clone(), conn.clone());
                            tokio::spawn(async move {
                                follow(&node, &conn, t, s.subscriber, sub, pos, stop).await;
                                node.follows
                                    .lock()
                                    .expect("follows lock")
                                    .remove(&(conn.id, sub));
                            });
                        }
                    }
                    Err(e) => {
                        conn.reply(id, Err(e)).await;
                    }
                }
            }
            Request::StopFollow { sub } => {
                if let Some(stop) = node
                    .follows
                    .lock()
                    .expect("follows lock")
                    .remove(&(conn.id, sub))
                {
                    stop.cancel();
                }
                conn.reply(id, Ok(Response::Ok)).await;
            }
            Request::Unsubscribe { topic, subscriber } => {
                let t = node.topic(&topic).expect("checked above");
                let removed = t
                    .state
                    .lock()
                    .expect("topic lock")
                    .subscribers
                    .remove(&subscriber)
                    .is_some();
                let r = if removed {
                    node.writer.submit_detached(vec![Op::DeleteOffset {
                        topic_id: t.id,
                        subscriber: subscriber.clone(),
                    }]);
                    Ok(Response::Ok)
                } else {
                    Err(WireError::new(
                        ErrorCode::NotFound,
                        format!("'{subscriber}' is not subscribed to topic '{topic}'"),
                    ))
                };
                conn.reply(id, r).await;
            }
            Request::Subscribers { topic } => {
                let t = node.topic(&topic).expect("checked above");
                let list = t
                    .state
                    .lock()
                    .expect("topic lock")
                    .subscribers
                    .iter()
                    .map(|(name, &next_offset)| SubscriberInfo {
                        name: name.clone(),
                        next_offset,
                    })
                    .collect();
                conn.reply(id, Ok(Response::Subscribers(list))).await;
            }
            Request::TopicStats { topic } => {
                let t = node.topic(&topic).expect("checked above");
                conn.reply(id, Ok(Response::TopicStats(node.stats(&t))))
                    .await;
            }
            Request::CreateTopic {
                topic,
                retention,
                peer: _,
            } => {
                let (node, conn) = (node.clone(), conn.clone());
                tokio::spawn(async move {
                    let r = node.create_topic(topic, retention).await;
                    conn.reply(id, r).await;
                });
            }
            Request::DeleteTopic { topic } => {
                let (node, conn) = (node.clone(), conn.clone());
                tokio::spawn(async move {
                    let r = node.delete_topic(&topic).await;
                    conn.reply(id, r).await;
                });
            }
            req @ (Request::ListPeers
            | Request::LookupTopic { .. }
            | Request::ListTopics { .. }) => {
                // A thin client may use any node: ask the index on its behalf.
                let (node, conn) = (node.clone(), conn.clone());
                tokio::spawn(async move {
                    let r = node.client.index_request(req).await.map_err(relay);
                    conn.reply(id, r).await;
                });
            }
            other => {
                let e = WireError::new(
                    ErrorCode::Unsupported,
                    format!(
                        "peer {} does not serve {} requests; send them to the index",
                        node.name,
                        other.kind()
                    ),
                );
                conn.reply(id, Err(e)).await;
            }
        }
    }
}

/// Streams a topic to a connection from `pos`, committing as it goes, until stopped, the
/// topic is deleted or the connection closes.
async fn follow(
    node: &Node,
    conn: &ConnCtx,
    t: Arc<Topic>,
    subscriber: String,
    sub: u64,
    mut pos: u64,
    stop: CancellationToken,
) {
    let mut rx = t.durable.subscribe();
    loop {
        let hw = *rx.borrow_and_update();
        if pos < hw {
            match node.read(&t, pos, MAX_READ_MESSAGES) {
                Ok(set) if !set.is_empty() => {
                    pos = set.next_offset();
                    let frame = ServerFrame::Delivery { sub, messages: set };
                    tokio::select! {
                        ok = conn.send(frame) => if !ok { return },
                        _ = stop.cancelled() => return,
                    }
                    node.commit(&t, &subscriber, pos);
                    continue;
                }
                Ok(set) => {
                    // Retention removed what we were about to read: skip ahead.
                    pos = pos
                        .max(set.first_offset)
                        .max(t.state.lock().expect("topic lock").retained.low());
                    if pos < hw {
                        continue;
                    }
                }
                Err(e) => {
                    conn.send(ServerFrame::SubscriptionEnded { sub, reason: e })
                        .await;
                    return;
                }
            }
        }
        tokio::select! {
            c = rx.changed() => if c.is_err() { return },
            _ = stop.cancelled() => return,
            _ = t.deleted.cancelled() => {
                conn.send(ServerFrame::SubscriptionEnded {
                    sub,
                    reason: WireError::new(ErrorCode::NotFound, format!("topic '{}' was deleted", t.name)),
                })
                .await;
                return;
            }
        }
    }
}

/// Serves a request for a topic hosted elsewhere by asking its host, so a thin client
/// needs only one address.
async fn forward_topic_request(
    node: Arc<Node>,
    conn: Arc<ConnCtx>,
    id: u32,
    topic: String,
    req: Request,
) {
    if let Request::Subscribe(s) = &req
        && let Some(sub) = s.follow
    {
        match node.client.follow(&topic, &s.subscriber, s.from).await {
            Ok(mut upstream) => {
                conn.reply(
                    id,
                    Ok(Response::Subscribed {
                        next_offset: upstream.next_offset(),
                    }),
                )
                .await;
                let stop = conn.closed.child_token();
                node.follows
                    .lock()
                    .expect("follows lock")
                    .insert((conn.id, sub), stop.clone());
                loop {
                    tokio::select! {
                        next = upstream.next_batch() => match next {
                            Some(Ok(set)) => {
                                if !conn.send(ServerFrame::Delivery { sub, messages: set }).await {
                                    break;
                                }
                            }
                            Some(Err(e)) => {
                                conn.send(ServerFrame::SubscriptionEnded { sub, reason: relay(e) }).await;
                                break;
                            }
                            None => break,
                        },
                        _ = stop.cancelled() => break,
                    }
                }
                node.follows
                    .lock()
                    .expect("follows lock")
                    .remove(&(conn.id, sub));
            }
            Err(e) => {
                conn.reply(id, Err(relay(e))).await;
            }
        }
        return;
    }
    let r = node.client.topic_request(&topic, req).await.map_err(relay);
    conn.reply(id, r).await;
}
