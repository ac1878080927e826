use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use peerbus_proto::{
    Batch, ErrorCode, MessageSet, NodeTotals, PeerInfo, Request, Response, Retention, StartFrom,
    Subscribe, SubscriberInfo, TopicLocation, TopicStats,
};
use tokio::sync::oneshot;

use crate::conn::Connection;
use crate::error::{ClientError, Result};
use crate::subscription::Subscription;

/// Payload bytes one automatic publish batch carries at most (well under the frame limit).
const MAX_BATCH_BYTES: usize = 4 << 20;
/// Messages one automatic publish batch carries at most (what a host accepts).
const MAX_BATCH_MESSAGES: usize = peerbus_proto::MAX_BATCH_MESSAGES;
/// First pause before resending an automatic batch to a host that could not be reached.
const RESEND_FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// Longest pause between resends of an automatic batch.
const RESEND_MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How long an automatic batch keeps being resent before its messages fail.
const RESEND_DEADLINE: Duration = Duration::from_secs(30);

/// A peerbus client. It asks the index where topics live, caches the answers, and talks to
/// hosting peers directly over pipelined connections. Cheap to clone; clones share
/// connections, the location cache and publish batching.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    index: String,
    token: Option<String>,
    /// One slot per address, so connecting to a slow or dead node never delays requests to
    /// the others.
    conns: Mutex<HashMap<String, Slot>>,
    /// Numbers connect attempts, so an attempt settles only its own slot.
    next_attempt: AtomicU64,
    locations: Mutex<Bounded<String, String>>,
    batchers: Mutex<HashMap<String, Arc<Batcher>>>,
    /// Where each (topic, subscriber)'s last [`Client::pull`] ended: committed by its next
    /// pull, which is how the application says it has that batch.
    pulled: Mutex<Bounded<(String, String), u64>>,
}

/// One attempt to open a connection, shared by everyone waiting for it.
type Attempt = Shared<BoxFuture<'static, Result<Connection>>>;

/// The connection to one address: open, or being opened (attempt `id`).
enum Slot {
    Open(Connection),
    Connecting { id: u64, attempt: Attempt },
}

impl std::fmt::Debug for Slot {
    // By hand: an attempt in progress has nothing to show.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Slot::Open(c) => f.debug_tuple("Open").field(c).finish(),
            Slot::Connecting { id, .. } => write!(f, "Connecting({id})"),
        }
    }
}

/// Topic locations a client keeps at most. A client that touches more topics than this
/// (a gateway, a benchmark of random lookups over a million topics) looks the others up
/// again instead of holding every answer it ever got.
const MAX_LOCATIONS: usize = 1 << 16;

/// Topics a client keeps a publish batcher for; past it, the idle ones are dropped, so a
/// gateway publishing to names from anyone does not keep one per name it ever saw.
const MAX_BATCHERS: usize = 1 << 16;

/// Pull positions a client keeps at most; past it, a subscriber's last batch is read
/// again instead of committed (at-least-once either way).
const MAX_PULLED: usize = 1 << 16;

/// A map bounded in entries: a new key arriving at capacity starts it afresh. For topic
/// locations, forgetting everything costs one lookup per topic still in use; evicting one
/// entry at a time would need an order to evict in, kept on every hit.
#[derive(Debug)]
struct Bounded<K, V> {
    map: HashMap<K, V>,
    cap: usize,
}

impl<K: std::hash::Hash + Eq, V> Bounded<K, V> {
    fn new(cap: usize) -> Self {
        Bounded {
            map: HashMap::new(),
            cap: cap.max(1),
        }
    }

    fn insert(&mut self, key: K, value: V) {
        if self.map.len() >= self.cap && !self.map.contains_key(&key) {
            self.map.clear();
        }
        self.map.insert(key, value);
    }

    fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.map.get(key)
    }

    fn remove<Q>(&mut self, key: &Q)
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.map.remove(key);
    }

    fn retain(&mut self, keep: impl FnMut(&K, &mut V) -> bool) {
        self.map.retain(keep);
    }
}

fn unexpected(addr: &str, what: &Response) -> ClientError {
    ClientError::Protocol {
        addr: addr.to_string(),
        what: format!("unexpected answer {what:?}"),
    }
}

impl Client {
    /// A client of the cluster whose index is at `index` (`host:port`). Connections open on
    /// first use.
    pub fn new(index: impl Into<String>) -> Client {
        Client::with_token(index, None)
    }

    /// Like [`Client::new`], presenting `token` to nodes started with `--auth-token`.
    pub fn with_token(index: impl Into<String>, token: Option<String>) -> Client {
        Client {
            inner: Arc::new(Inner {
                index: index.into(),
                token,
                conns: Mutex::new(HashMap::new()),
                next_attempt: AtomicU64::new(0),
                locations: Mutex::new(Bounded::new(MAX_LOCATIONS)),
                batchers: Mutex::new(HashMap::new()),
                pulled: Mutex::new(Bounded::new(MAX_PULLED)),
            }),
        }
    }

    /// The index address this client asks.
    pub fn index_addr(&self) -> &str {
        &self.inner.index
    }

    /// A live connection to `addr`, reusing an open one. Callers that need one while it is
    /// being opened share that one attempt and its outcome, so against a node that does not
    /// answer they all fail after one connect timeout, not one after another.
    pub async fn connection(&self, addr: &str) -> Result<Connection> {
        let attempt = {
            let mut conns = self.inner.conns.lock().expect("connections lock");
            match conns.get(addr) {
                Some(Slot::Open(c)) if !c.is_closed() => return Ok(c.clone()),
                Some(Slot::Connecting { attempt, .. }) => attempt.clone(),
                _ => {
                    let id = self.inner.next_attempt.fetch_add(1, Ordering::Relaxed);
                    let attempt = self.start_connect(addr, id);
                    conns.insert(
                        addr.to_string(),
                        Slot::Connecting {
                            id,
                            attempt: attempt.clone(),
                        },
                    );
                    attempt
                }
            }
        };
        attempt.await
    }

    /// Opens a connection to `addr` in a task of its own, which also settles the slot: the
    /// attempt runs to its end even when every caller waiting for it gave up, so nobody
    /// later finds it half done (with a timeout long past) or stale.
    fn start_connect(&self, addr: &str, id: u64) -> Attempt {
        let (inner, addr) = (self.inner.clone(), addr.to_string());
        let target = addr.clone();
        let task = tokio::spawn(async move {
            let r = Connection::connect(&addr, inner.token.as_deref()).await;
            let mut conns = inner.conns.lock().expect("connections lock");
            if matches!(conns.get(&addr), Some(Slot::Connecting { id: current, .. }) if *current == id)
            {
                match &r {
                    Ok(c) => {
                        conns.insert(addr.clone(), Slot::Open(c.clone()));
                    }
                    Err(_) => {
                        conns.remove(&addr);
                    }
                }
            }
            r
        });
        async move {
            task.await.unwrap_or_else(|e| {
                Err(ClientError::Closed {
                    addr: target,
                    reason: format!("the connecting task failed: {e}"),
                })
            })
        }
        .boxed()
        .shared()
    }

    /// Sends a request to the node at `addr`.
    pub async fn request_at(&self, addr: &str, req: Request, forward: bool) -> Result<Response> {
        self.connection(addr).await?.request(req, forward).await
    }

    /// Sends a request to the index.
    pub async fn index_request(&self, req: Request) -> Result<Response> {
        let index = self.inner.index.clone();
        self.request_at(&index, req, true).await
    }

    /// Every peer the index knows.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>> {
        let mut all: Vec<PeerInfo> = Vec::new();
        loop {
            let after = all.last().map(|p| p.id);
            let page = match self.index_request(Request::ListPeers { after }).await? {
                Response::Peers(p) => p,
                other => return Err(unexpected(&self.inner.index, &other)),
            };
            let done = page.len() < peerbus_proto::PEER_PAGE;
            all.extend(page);
            if done {
                return Ok(all);
            }
        }
    }

    /// Asks the index which peer hosts `topic` (and refreshes the cache).
    pub async fn lookup(&self, topic: &str) -> Result<TopicLocation> {
        peerbus_proto::validate_topic(topic)?;
        match self
            .index_request(Request::LookupTopic {
                topic: topic.to_string(),
            })
            .await?
        {
            Response::Location(loc) => {
                self.remember(&loc);
                Ok(loc)
            }
            other => Err(unexpected(&self.inner.index, &other)),
        }
    }

    fn remember(&self, loc: &TopicLocation) {
        self.inner
            .locations
            .lock()
            .expect("locations lock")
            .insert(loc.topic.clone(), loc.addr.clone());
    }

    fn cached_host(&self, topic: &str) -> Option<String> {
        self.inner
            .locations
            .lock()
            .expect("locations lock")
            .get(topic)
            .cloned()
    }

    fn forget(&self, topic: &str) {
        self.inner
            .locations
            .lock()
            .expect("locations lock")
            .remove(topic);
    }

    /// Topics offered by live peers, optionally only names starting with `prefix`, in name
    /// order. Asks page after page; [`Client::list_topics_page`] lets a caller handle one
    /// page at a time instead of holding them all.
    pub async fn list_topics(&self, prefix: Option<&str>) -> Result<Vec<TopicLocation>> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let page = self.list_topics_page(prefix, after.as_deref()).await?;
            let done = page.len() < peerbus_proto::LIST_PAGE;
            after = page.last().map(|t| t.topic.clone());
            all.extend(page);
            if done || after.is_none() {
                return Ok(all);
            }
        }
    }

    /// One page of [`Client::list_topics`]: at most [`peerbus_proto::LIST_PAGE`] topics
    /// after `after`; a full page may be followed by more.
    pub async fn list_topics_page(
        &self,
        prefix: Option<&str>,
        after: Option<&str>,
    ) -> Result<Vec<TopicLocation>> {
        match self
            .index_request(Request::ListTopics {
                prefix: prefix.map(str::to_string),
                after: after.map(str::to_string),
            })
            .await?
        {
            Response::Topics(t) => Ok(t),
            other => Err(unexpected(&self.inner.index, &other)),
        }
    }

    /// Creates a topic. With `peer` (a peer's name or `host:port`) that peer hosts it;
    /// without, the index places it on the least-loaded live peer.
    pub async fn create_topic(
        &self,
        topic: &str,
        peer: Option<&str>,
        retention: Retention,
    ) -> Result<TopicLocation> {
        peerbus_proto::validate_topic(topic)?;
        let req = Request::CreateTopic {
            topic: topic.to_string(),
            retention,
            peer: peer.map(str::to_string),
        };
        let resp = self.index_request(req).await?;
        match resp {
            Response::Location(loc) => {
                self.remember(&loc);
                Ok(loc)
            }
            other => Err(unexpected(&self.inner.index, &other)),
        }
    }

    /// Deletes a topic and its data on its host.
    pub async fn delete_topic(&self, topic: &str) -> Result<()> {
        self.forget_pulled(topic, None);
        let r = self
            .topic_request(
                topic,
                Request::DeleteTopic {
                    topic: topic.to_string(),
                },
            )
            .await;
        self.forget(topic);
        r.map(|_| ())
    }

    /// Sends a request about `topic` to its host, looking the host up when it is not cached
    /// and once more when the cached host says it no longer hosts the topic.
    pub async fn topic_request(&self, topic: &str, req: Request) -> Result<Response> {
        peerbus_proto::validate_topic(topic)?;
        let cached = self.cached_host(topic);
        let addr = match cached {
            Some(a) => a,
            None => self.lookup(topic).await?.addr,
        };
        match self.request_at(&addr, req.clone(), false).await {
            Err(e) if e.code() == Some(ErrorCode::NotHost) || e.is_unreachable() => {
                // Only retry what cannot be stored twice: NotHost was refused before any
                // work, an unreachable node never got the request or is gone, and an
                // idempotent publish is de-duplicated by its host.
                if matches!(req, Request::Publish { .. })
                    && !matches!(e.code(), Some(ErrorCode::NotHost))
                {
                    self.forget(topic);
                    return Err(e);
                }
                self.forget(topic);
                let loc = self.lookup(topic).await?;
                self.request_at(&loc.addr, req, false).await
            }
            r => r,
        }
    }

    /// Publishes one message and waits for its acknowledgement; returns its offset.
    /// Concurrent publishes to the same topic are batched automatically.
    pub async fn publish(&self, topic: &str, payload: impl Into<Bytes>) -> Result<u64> {
        self.publish_nowait(topic, payload).await
    }

    /// Queues one message for publishing and returns at once; the returned future resolves
    /// to its offset once stored. While a batch is in flight, new messages for the topic
    /// join the next batch, so a burst costs a few round trips, not one per message, and an
    /// idle client sends at once (no timers).
    pub fn publish_nowait(&self, topic: &str, payload: impl Into<Bytes>) -> PublishAck {
        let (tx, rx) = oneshot::channel();
        if let Err(e) = peerbus_proto::validate_topic(topic) {
            let _ = tx.send(Err(e.into()));
            return PublishAck(rx);
        }
        let payload = payload.into();
        if payload.len() > peerbus_proto::DEFAULT_MAX_PAYLOAD {
            let _ = tx.send(Err(ClientError::Invalid(format!(
                "message of {} bytes is over the {} byte limit",
                payload.len(),
                peerbus_proto::DEFAULT_MAX_PAYLOAD
            ))));
            return PublishAck(rx);
        }
        let batcher = {
            let mut batchers = self.inner.batchers.lock().expect("batchers lock");
            // Looked up before inserting, so a publish to a known topic allocates nothing.
            match batchers.get(topic) {
                Some(b) => b.clone(),
                None => {
                    if batchers.len() >= MAX_BATCHERS {
                        // Only the map holds an idle batcher: nobody can be publishing
                        // through it, and a later publish to its topic starts a new one
                        // (under a new producer id, which the host de-duplicates apart).
                        batchers.retain(|_, b| Arc::strong_count(b) > 1);
                    }
                    batchers
                        .entry(topic.to_string())
                        .or_insert_with(|| Arc::new(Batcher::new()))
                        .clone()
                }
            }
        };
        let start = {
            let mut st = batcher.state.lock().expect("batcher lock");
            st.queue.push_back((payload, tx));
            !std::mem::replace(&mut st.in_flight, true)
        };
        if start {
            self.start_drain(topic, batcher);
        }
        PublishAck(rx)
    }

    async fn drain(self, topic: String, batcher: Arc<Batcher>) {
        loop {
            let next = batcher.state.lock().expect("batcher lock").take();
            let Some(next) = next else { return };
            let batch = Batch::from_payloads(&next.payloads);
            let r = self
                .publish_idempotent(&topic, batch, next.producer, next.sequence)
                .await;
            self.settle(&batcher, next.acks, r);
        }
    }

    /// Answers a batch's publishers with its outcome.
    fn settle(&self, batcher: &Batcher, acks: Vec<Ack>, r: Result<Sent>) {
        match r {
            Ok(Sent { first, restarted }) => {
                if let Some(producer) = restarted {
                    batcher
                        .state
                        .lock()
                        .expect("batcher lock")
                        .restarted(producer);
                }
                for (i, a) in acks.into_iter().enumerate() {
                    let _ = a.send(Ok(first + i as u64));
                }
            }
            Err(e) => {
                batcher.state.lock().expect("batcher lock").after_failure();
                for a in acks {
                    let _ = a.send(Err(e.clone()));
                }
            }
        }
    }

    /// Sends the first batch of an idle batcher from the caller's task when the topic's host
    /// is known and its connection open, so the batch is on the wire before any task is
    /// scheduled; the spawned task only waits for the answer (resending if it must) and
    /// goes on with what queued meanwhile. Without a ready connection, the task does it all.
    fn start_drain(&self, topic: &str, batcher: Arc<Batcher>) {
        let client = self.clone();
        let topic = topic.to_string();
        let Some(conn) = self.ready_connection(&topic) else {
            tokio::spawn(async move { client.drain(topic, batcher).await });
            return;
        };
        let Some(first) = batcher.state.lock().expect("batcher lock").take() else {
            return;
        };
        let batch = Batch::from_payloads(&first.payloads);
        let sent = conn.start_request(
            Request::PublishIdempotent {
                topic: topic.clone(),
                batch: batch.clone(),
                producer: first.producer,
                sequence: first.sequence,
            },
            false,
        );
        tokio::spawn(async move {
            let r = match sent {
                Some(answer) => match answer.await {
                    Ok(Response::Published { first_offset, .. }) => Ok(Sent {
                        first: first_offset,
                        restarted: None,
                    }),
                    Ok(other) => Err(unexpected(&topic, &other)),
                    // Unknown outcome or moved host: resend, which the host de-duplicates.
                    // An unknown producer is handled there too.
                    Err(e) if resendable(&e) || e.code() == Some(ErrorCode::UnknownProducer) => {
                        client
                            .publish_idempotent(&topic, batch, first.producer, first.sequence)
                            .await
                    }
                    Err(e) => Err(e),
                },
                None => {
                    client
                        .publish_idempotent(&topic, batch, first.producer, first.sequence)
                        .await
                }
            };
            client.settle(&batcher, first.acks, r);
            client.drain(topic, batcher).await;
        });
    }

    /// The open connection to `topic`'s cached host, if there is one and nobody is
    /// connecting it right now.
    fn ready_connection(&self, topic: &str) -> Option<Connection> {
        let addr = self.cached_host(topic)?;
        match self
            .inner
            .conns
            .lock()
            .expect("connections lock")
            .get(&addr)?
        {
            Slot::Open(c) if !c.is_closed() => Some(c.clone()),
            _ => None,
        }
    }

    /// Publishes `batch` as sequence `sequence` of this client's producer, resending the same
    /// batch with the same sequence while the host cannot be reached or moved: the host
    /// answers a resend of a batch it already stored with the offsets it got, so a lost
    /// acknowledgement never duplicates messages.
    ///
    /// A host that does not know the producer (its state expired, or the topic was made
    /// again) stored nothing, so the batch goes again once as sequence 0 of a new producer,
    /// which the answer names.
    async fn publish_idempotent(
        &self,
        topic: &str,
        batch: Batch,
        mut producer: u64,
        mut sequence: u64,
    ) -> Result<Sent> {
        let deadline = tokio::time::Instant::now() + RESEND_DEADLINE;
        let mut backoff = RESEND_FIRST_BACKOFF;
        let mut restarted = None;
        loop {
            let req = Request::PublishIdempotent {
                topic: topic.to_string(),
                batch: batch.clone(),
                producer,
                sequence,
            };
            match self.topic_request(topic, req).await {
                Ok(Response::Published { first_offset, .. }) => {
                    return Ok(Sent {
                        first: first_offset,
                        restarted,
                    });
                }
                Ok(other) => return Err(unexpected(topic, &other)),
                Err(e) if e.code() == Some(ErrorCode::UnknownProducer) && restarted.is_none() => {
                    tracing::debug!("starting a new producer for topic '{topic}': {e}");
                    producer = rand::random();
                    sequence = 0;
                    restarted = Some(producer);
                }
                Err(e) if resendable(&e) && tokio::time::Instant::now() + backoff < deadline => {
                    tracing::debug!("resending batch {sequence} to topic '{topic}': {e}");
                    // The host may have moved; ask the index again on the next try.
                    self.forget(topic);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RESEND_MAX_BACKOFF);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Publishes a batch in one request, without automatic batching; returns the first
    /// message's offset (the rest follow in order).
    pub async fn publish_batch<B: AsRef<[u8]>>(&self, topic: &str, payloads: &[B]) -> Result<u64> {
        let batch = Batch::from_payloads(payloads);
        // Refused here rather than by the host, whose codec would close the connection
        // (failing every other request on it) on a frame over the limit.
        let size = batch.data.len() + 5 * batch.len();
        if size > peerbus_proto::DEFAULT_MAX_PAYLOAD {
            return Err(ClientError::Invalid(format!(
                "a batch of {} messages and {size} bytes is over the {} byte limit of one \
                 publish; publish it in parts",
                batch.len(),
                peerbus_proto::DEFAULT_MAX_PAYLOAD
            )));
        }
        if batch.len() > peerbus_proto::MAX_BATCH_MESSAGES {
            return Err(ClientError::Invalid(format!(
                "a batch of {} messages is over the {} message limit of one publish; publish \
                 it in parts",
                batch.len(),
                peerbus_proto::MAX_BATCH_MESSAGES
            )));
        }
        let req = Request::Publish {
            topic: topic.to_string(),
            batch,
        };
        match self.topic_request(topic, req).await? {
            Response::Published { first_offset, .. } => Ok(first_offset),
            other => Err(unexpected(topic, &other)),
        }
    }

    /// Records a subscription. `from` = `None` keeps an existing position, or starts a new
    /// subscription at the oldest retained message. Returns the offset it reads next.
    pub async fn subscribe(
        &self,
        topic: &str,
        subscriber: &str,
        from: Option<StartFrom>,
    ) -> Result<u64> {
        peerbus_proto::validate_subscriber(subscriber)?;
        let req = Request::Subscribe(Subscribe {
            topic: topic.to_string(),
            subscriber: subscriber.to_string(),
            from,
            follow: None,
        });
        match self.topic_request(topic, req).await? {
            Response::Subscribed { next_offset } => Ok(next_offset),
            other => Err(unexpected(topic, &other)),
        }
    }

    /// Subscribes and streams messages as they are published, from the subscriber's
    /// committed position (or `from`).
    pub async fn follow(
        &self,
        topic: &str,
        subscriber: &str,
        from: Option<StartFrom>,
    ) -> Result<Subscription> {
        peerbus_proto::validate_topic(topic)?;
        peerbus_proto::validate_subscriber(subscriber)?;
        let sub = Subscribe {
            topic: topic.to_string(),
            subscriber: subscriber.to_string(),
            from,
            follow: None,
        };
        let mut tried_lookup = false;
        loop {
            let cached = self.cached_host(topic);
            let addr = match cached {
                Some(a) => a,
                None => {
                    tried_lookup = true;
                    self.lookup(topic).await?.addr
                }
            };
            let conn = self.connection(&addr).await?;
            match conn.follow(sub.clone(), false).await {
                Ok((id, next, rx)) => {
                    let (t, name) = (topic.to_string(), subscriber.to_string());
                    return Ok(Subscription::new(conn, id, t, name, next, rx));
                }
                Err(e)
                    if !tried_lookup
                        && (e.code() == Some(ErrorCode::NotHost) || e.is_unreachable()) =>
                {
                    self.forget(topic);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Returns up to `max` messages the subscriber has not acknowledged yet. Asking for the
    /// next batch acknowledges the one this client's previous `pull` returned for the same
    /// topic and subscriber (Kafka's auto-commit): a batch is committed only once the
    /// application has it, so one lost on the way, or held by a process that died, is read
    /// again. Pulling without a subscription subscribes from the oldest message. With a
    /// non-zero `wait`, an empty pull waits that long for a publish.
    pub async fn pull(
        &self,
        topic: &str,
        subscriber: &str,
        max: u32,
        wait: Duration,
    ) -> Result<MessageSet> {
        let key = (topic.to_string(), subscriber.to_string());
        let commit = self
            .inner
            .pulled
            .lock()
            .expect("pulled lock")
            .get(&key)
            .copied();
        let set = self.read(topic, subscriber, max, wait, commit).await?;
        if !set.is_empty() {
            self.inner
                .pulled
                .lock()
                .expect("pulled lock")
                .insert(key, set.next_offset());
        }
        Ok(set)
    }

    /// Like [`Client::pull`], but neither acknowledges the previous batch nor remembers this
    /// one: the caller acknowledges with [`Client::ack`] once it has processed the messages.
    /// Until then every such pull reads from the same committed position.
    pub async fn pull_uncommitted(
        &self,
        topic: &str,
        subscriber: &str,
        max: u32,
        wait: Duration,
    ) -> Result<MessageSet> {
        self.read(topic, subscriber, max, wait, None).await
    }

    async fn read(
        &self,
        topic: &str,
        subscriber: &str,
        max: u32,
        wait: Duration,
        commit: Option<u64>,
    ) -> Result<MessageSet> {
        peerbus_proto::validate_subscriber(subscriber)?;
        // Resent by `topic_request` after a lost connection: safe, since reading commits
        // nothing and committing the same position twice is committing it once.
        let req = Request::Pull {
            topic: topic.to_string(),
            subscriber: subscriber.to_string(),
            max,
            wait_ms: wait.as_millis().min(u128::from(u32::MAX)) as u32,
            commit,
        };
        match self.topic_request(topic, req).await? {
            Response::Messages(m) => Ok(m),
            other => Err(unexpected(topic, &other)),
        }
    }

    /// Acknowledges every message of `topic` up to and including offset `last` (what the
    /// CLI's `ack --offset` and the HTTP ack endpoint take).
    pub async fn ack_through(&self, topic: &str, subscriber: &str, last: u64) -> Result<()> {
        let next = last.checked_add(1).ok_or_else(|| {
            ClientError::Invalid(format!(
                "offset {last} is past the largest offset a topic can have"
            ))
        })?;
        self.ack(topic, subscriber, next).await
    }

    /// Acknowledges every message of `topic` below `next_offset` for `subscriber`: its
    /// committed position moves there (never backwards, never past the durable end), and
    /// `consumed` retention may delete them.
    pub async fn ack(&self, topic: &str, subscriber: &str, next_offset: u64) -> Result<()> {
        peerbus_proto::validate_subscriber(subscriber)?;
        let req = Request::Ack {
            topic: topic.to_string(),
            subscriber: subscriber.to_string(),
            offset: next_offset,
        };
        match self.topic_request(topic, req).await? {
            Response::Ok => Ok(()),
            other => Err(unexpected(topic, &other)),
        }
    }

    /// Forgets where this client's pulls of `topic` ended (all subscribers, or one), once
    /// those positions mean nothing: after an unsubscribe or a delete.
    fn forget_pulled(&self, topic: &str, subscriber: Option<&str>) {
        self.inner
            .pulled
            .lock()
            .expect("pulled lock")
            .retain(|(t, s), _| t != topic || subscriber.is_some_and(|n| n != s));
    }

    /// Removes a subscription and its position.
    pub async fn unsubscribe(&self, topic: &str, subscriber: &str) -> Result<()> {
        self.forget_pulled(topic, Some(subscriber));
        let req = Request::Unsubscribe {
            topic: topic.to_string(),
            subscriber: subscriber.to_string(),
        };
        self.topic_request(topic, req).await.map(|_| ())
    }

    /// The subscribers of a topic and their positions.
    pub async fn subscribers(&self, topic: &str) -> Result<Vec<SubscriberInfo>> {
        let req = Request::Subscribers {
            topic: topic.to_string(),
        };
        match self.topic_request(topic, req).await? {
            Response::Subscribers(s) => Ok(s),
            other => Err(unexpected(topic, &other)),
        }
    }

    /// Offsets, size and retention of a topic, from its host.
    pub async fn topic_stats(&self, topic: &str) -> Result<TopicStats> {
        let req = Request::TopicStats {
            topic: topic.to_string(),
        };
        match self.topic_request(topic, req).await? {
            Response::TopicStats(s) => Ok(s),
            other => Err(unexpected(topic, &other)),
        }
    }

    /// Totals over every topic the peer at `addr` hosts: one request, however many topics.
    pub async fn node_stats(&self, addr: &str) -> Result<NodeTotals> {
        match self.request_at(addr, Request::NodeStats, false).await? {
            Response::NodeStats(t) => Ok(t),
            other => Err(unexpected(addr, &other)),
        }
    }
}

#[derive(Debug)]
struct Batcher {
    state: Mutex<BatchState>,
}

impl Batcher {
    fn new() -> Batcher {
        Batcher {
            state: Mutex::new(BatchState {
                in_flight: false,
                producer: rand::random(),
                next_sequence: 0,
                queue: VecDeque::new(),
            }),
        }
    }
}

type Ack = oneshot::Sender<Result<u64>>;

/// Whether an idempotent batch that failed this way may be sent again as it is: the host
/// could not be reached (the outcome is unknown, and the host de-duplicates a resend) or
/// refused it before any work because the topic moved.
fn resendable(e: &ClientError) -> bool {
    e.is_unreachable() || e.code() == Some(ErrorCode::NotHost)
}

/// A batch the host stored.
struct Sent {
    /// Offset of its first message.
    first: u64,
    /// The new producer id the batch went under as sequence 0, when the host did not know
    /// the batcher's.
    restarted: Option<u64>,
}

/// A batch taken from a batcher's queue, with the publishers to answer.
struct NextBatch {
    payloads: Vec<Bytes>,
    acks: Vec<Ack>,
    producer: u64,
    sequence: u64,
}

#[derive(Debug)]
struct BatchState {
    in_flight: bool,
    /// The idempotent producer id for this topic: random, so that two clients (or one
    /// client after a restart) never share a sequence on a host.
    producer: u64,
    /// Sequence number of the next batch the producer sends to the topic.
    next_sequence: u64,
    queue: VecDeque<(Bytes, Ack)>,
}

impl BatchState {
    /// The next batch to send, with its sequence; `None` (and no longer in flight) when
    /// nothing is queued.
    fn take(&mut self) -> Option<NextBatch> {
        if self.queue.is_empty() {
            self.in_flight = false;
            return None;
        }
        let mut bytes = 0;
        let mut payloads = Vec::new();
        let mut acks = Vec::new();
        while let Some((p, _)) = self.queue.front() {
            if !payloads.is_empty()
                && (bytes + p.len() > MAX_BATCH_BYTES || payloads.len() >= MAX_BATCH_MESSAGES)
            {
                break;
            }
            bytes += p.len();
            let (p, a) = self.queue.pop_front().expect("front exists");
            payloads.push(p);
            acks.push(a);
        }
        // One batch in flight per topic, so sequences reach the host in order.
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        Some(NextBatch {
            payloads,
            acks,
            producer: self.producer,
            sequence,
        })
    }

    /// Keeps the producer in step with the host after a batch failed. The host may or may
    /// not hold the batch (a storage failure after the write, a lost answer), or may have
    /// refused it before recording its sequence; reusing the sequence could make a different
    /// batch look like a resend, and skipping it would look like a gap. So the producer
    /// starts afresh with a new id, as Kafka's does after an unknown outcome.
    fn after_failure(&mut self) {
        self.producer = rand::random();
        self.next_sequence = 0;
    }

    /// The last batch went as sequence 0 of the new producer `producer`.
    fn restarted(&mut self, producer: u64) {
        self.producer = producer;
        self.next_sequence = 1;
    }
}

/// Resolves to a published message's offset once the host has stored it.
#[derive(Debug)]
pub struct PublishAck(oneshot::Receiver<Result<u64>>);

impl Future for PublishAck {
    type Output = Result<u64>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|r| {
            r.unwrap_or_else(|_| {
                Err(ClientError::Closed {
                    addr: String::new(),
                    reason: "the publishing task stopped".into(),
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Bounded;

    #[test]
    fn locations_stay_within_their_bound() {
        let mut l: Bounded<String, String> = Bounded::new(3);
        for i in 0..10 {
            l.insert(format!("t{i}"), "a:1".into());
            assert!(l.map.len() <= 3);
        }
        // The newest answer is always kept, and replacing a known topic forgets nothing.
        assert_eq!(l.get("t9").map(String::as_str), Some("a:1"));
        let before: Vec<String> = l.map.keys().cloned().collect();
        l.insert("t9".into(), "b:2".into());
        let mut after: Vec<String> = l.map.keys().cloned().collect();
        let mut before = before;
        before.sort();
        after.sort();
        assert_eq!(before, after);
        assert_eq!(l.get("t9").map(String::as_str), Some("b:2"));
        l.remove("t9");
        assert_eq!(l.get("t9"), None);
    }
}
