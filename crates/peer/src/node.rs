//! The peer's state and its request handlers.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use peerbus_client::{Client, ClientError};
use peerbus_net::{ConnCtx, Service};
use peerbus_proto::{
    Batch, ErrorCode, FileHit, FileHolder, MessageSet, NodeTotals, PeerAuth, Request, Response,
    Retention, ServerFrame, Subscribe, SubscriberInfo, TopicLocation, TopicStats, WireError,
};
use peerbus_store::{Backend, Op, Table, TopicMeta, Writer};
use tokio_util::sync::CancellationToken;

use crate::cursors::Cursors;
use crate::fetch::FetchLimits;
use crate::lease::LeaseCell;
use crate::producers::{Admission, Produced, Producers, parse_producer_key, producer_key};
use crate::retention::Retained;
use crate::share::{Changes, PieceError, Share, SharedFile};
use crate::topic::{Handback, Live, TailBudget, Topic, TopicState};
use crate::{Durability, PeerConfig};

/// How long a resent batch waits for its first copy to become durable before the
/// resender is told to try again.
const DUPLICATE_WAIT: Duration = Duration::from_secs(10);
/// Most messages one pull or delivery carries.
const MAX_READ_MESSAGES: usize = 8192;
/// Most payload bytes one pull or delivery carries.
const MAX_READ_BYTES: usize = 4 << 20;
const AUTH_KEY: &[u8] = b"auth";
/// The next topic id, kept so that an id is never given twice, not even after the topic
/// that had the highest id was deleted and the peer restarted: rows left under an old id
/// can then never be read as a new topic's.
const NEXT_TOPIC_ID_KEY: &[u8] = b"next_topic_id";

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn internal(e: impl std::fmt::Display) -> WireError {
    WireError::new(ErrorCode::Internal, format!("storage failure: {e}"))
}

pub(crate) fn relay(e: ClientError) -> WireError {
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
    /// The files this peer offers, when it runs with `--share`.
    pub share: Option<Arc<Share>>,
    /// Makes the temporary names of concurrent downloads of one file distinct.
    pub next_download: AtomicU64,
    /// What bounds fetches into the share.
    pub fetch_limits: FetchLimits,
    /// Following subscriptions by (connection, subscription id), to stop them on request.
    follows: Mutex<BTreeMap<(u64, u64), CancellationToken>>,
    /// Bytes of publishes queued for storage and not yet durable, for the whole node: a
    /// publisher waits (and its connection stops being read) while the disk is behind.
    write_budget: Arc<tokio::sync::Semaphore>,
    /// Held by topic creation and deletion from their claim or withdrawal at the index to
    /// their write, so a create cannot slip between a delete's write and its late
    /// withdrawal (which would remove the new topic's entry at the index).
    pub directory: tokio::sync::Mutex<()>,
    next_topic_id: Mutex<u64>,
    /// What the tails of all hosted topics hold in memory together.
    tails: TailBudget,
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
        share: Option<Arc<Share>>,
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
        let tails = TailBudget::default();
        // Idempotent producers' last batches, by topic id, so a restarted peer still
        // recognises a resent batch.
        let loaded_ms = now_ms();
        let mut producers: HashMap<u64, HashMap<u64, Produced>> = HashMap::new();
        for (k, v) in backend.scan(Table::Meta)? {
            if let Some((topic_id, producer)) = parse_producer_key(&k) {
                let p = Produced::decode(&v, loaded_ms).ok_or_else(|| {
                    peerbus_store::StoreError::Corrupt(format!(
                        "producer {producer} state of topic id {topic_id}"
                    ))
                })?;
                producers.entry(topic_id).or_default().insert(producer, p);
            }
        }
        // Stored state of expired producers, and of producers of topics that are gone.
        let mut forgotten = Vec::new();
        for (tname, meta) in backend.topics()? {
            max_id = max_id.max(meta.id);
            let mut retained = Retained::starting_at(meta.low);
            for (offset, ts, size) in backend.sizes(meta.id)? {
                retained.skip_to(offset);
                retained.push(size, ts);
            }
            let subscribers =
                Cursors::load(backend.offsets(meta.id)?.into_iter().collect(), loaded_ms);
            let topic = Topic::new(
                tname.clone(),
                meta.id,
                meta.retention,
                meta.created_ms,
                retained,
                subscribers,
                tails.clone(),
            );
            let (known, expired) =
                Producers::load(producers.remove(&meta.id).unwrap_or_default(), loaded_ms);
            topic.state.lock().expect("topic lock").producers = known;
            forgotten.extend(expired.into_iter().map(|p| forget_producer(meta.id, p)));
            tracing::info!(
                "loaded topic '{tname}': offsets {}..{}",
                topic.state.lock().expect("topic lock").retained.low(),
                topic.high_watermark()
            );
            topics.insert(tname, Arc::new(topic));
        }
        forgotten.extend(
            producers
                .into_iter()
                .flat_map(|(id, ps)| ps.into_keys().map(move |p| forget_producer(id, p))),
        );
        if !forgotten.is_empty() {
            tracing::info!("forgetting {} idle idempotent producers", forgotten.len());
            backend.apply(&forgotten)?;
            backend.persist(true)?;
        }
        let next_topic_id = backend
            .get(Table::Meta, NEXT_TOPIC_ID_KEY)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, u64::from_be_bytes);
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
            share,
            next_download: AtomicU64::new(0),
            fetch_limits: FetchLimits::new(),
            follows: Mutex::new(BTreeMap::new()),
            write_budget: Arc::new(tokio::sync::Semaphore::new(WRITE_BUDGET)),
            directory: tokio::sync::Mutex::new(()),
            next_topic_id: Mutex::new(next_topic_id.max(max_id + 1)),
            tails,
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

    /// Stops serving `name`, which the index says another peer hosts now: requests for it
    /// are forwarded to that host (or answered `NotHost`), so a client with a stale
    /// location cannot get acknowledgements here that the host's readers never see. The
    /// data stays on disk; a restart loads it and the index is asked again.
    pub fn fence(&self, name: &str) {
        let fenced = self.topics.lock().expect("topics lock").remove(name);
        if let Some(t) = fenced {
            // Under the topic lock, as a deletion: no append or commit lands after this,
            // and followers end. Unlike a deletion, nothing is removed from the store.
            let _st = t.state.lock().expect("topic lock");
            t.fenced.store(true, Ordering::Release);
            t.mark_deleted();
        }
    }

    fn topic(&self, name: &str) -> Option<Arc<Topic>> {
        self.topics.lock().expect("topics lock").get(name).cloned()
    }

    fn sync(&self) -> bool {
        self.config.durability == Durability::Sync
    }

    /// Stores `ops`; the receiver completes once they are stored (and fsynced if `sync`).
    ///
    /// In memory mode nothing goes to disk, so the ops are applied right here instead of
    /// by the writer thread: waking that thread for every publish and every delivered
    /// batch's commit was most of a round trip's task switches. The caller's lock is what
    /// orders them then (the topic lock, for a topic's appends).
    fn store(
        &self,
        ops: Vec<Op>,
        sync: bool,
    ) -> tokio::sync::oneshot::Receiver<peerbus_store::Result<()>> {
        match self.config.durability {
            Durability::Memory => {
                let (done, rx) = tokio::sync::oneshot::channel();
                let _ = done.send(self.backend.apply(&ops));
                rx
            }
            _ => self.writer.submit(ops, sync),
        }
    }

    /// Stores `ops` that nobody waits for (positions, retention); failures are logged.
    fn store_detached(&self, ops: Vec<Op>) {
        match self.config.durability {
            Durability::Memory => {
                if let Err(e) = self.backend.apply(&ops) {
                    tracing::error!("storage write failed: {e}");
                }
            }
            _ => self.writer.submit_detached(ops),
        }
    }

    /// How many following subscriptions connection `conn` holds.
    fn follows_of(&self, conn: u64) -> usize {
        self.follows
            .lock()
            .expect("follows lock")
            .range((conn, 0)..=(conn, u64::MAX))
            .count()
    }

    /// `count` fresh topic ids, and the op that records them as used; stored with the
    /// topics' metadata.
    fn take_topic_ids(&self, count: u64) -> (u64, Op) {
        let mut n = self.next_topic_id.lock().expect("id lock");
        let first = *n;
        *n += count;
        let op = Op::Put {
            table: Table::Meta,
            key: NEXT_TOPIC_ID_KEY.to_vec(),
            value: n.to_be_bytes().to_vec(),
        };
        (first, op)
    }

    /// This peer's id at the index; 0 while it holds no lease.
    fn peer_id(&self) -> u64 {
        self.lease
            .lock()
            .expect("lease lock")
            .as_ref()
            .map_or(0, |l| l.auth.peer_id)
    }

    fn location(&self, topic: &str) -> TopicLocation {
        TopicLocation {
            topic: topic.to_string(),
            peer_id: self.peer_id(),
            peer_name: self.name.clone(),
            addr: self.advertise.clone(),
        }
    }

    /// This peer as the holder of a file.
    fn holder(&self) -> FileHolder {
        FileHolder {
            peer_id: self.peer_id(),
            name: self.name.clone(),
            addr: self.advertise.clone(),
        }
    }

    fn hit(&self, f: &SharedFile) -> FileHit {
        FileHit {
            name: f.entry.name.clone(),
            size: f.entry.size,
            hash: f.entry.hash.clone(),
            peers: vec![self.holder()],
        }
    }

    /// One page of the files of this peer's own share whose name contains `pattern`,
    /// case-insensitively.
    fn search_share(&self, pattern: &str, after: Option<&(String, String)>) -> Vec<FileHit> {
        let Some(share) = &self.share else {
            return Vec::new();
        };
        let pattern = pattern.to_lowercase();
        let holder = self.holder();
        let hits = share
            .files()
            .into_iter()
            .filter(|e| e.name.to_lowercase().contains(&pattern))
            .map(|e| FileHit {
                name: e.name,
                size: e.size,
                hash: e.hash,
                peers: vec![holder.clone()],
            })
            .collect();
        peerbus_proto::page_of_hits(hits, after)
    }

    /// The shared file with this hash, or the error a downloader gets.
    fn shared(&self, hash: &str) -> Result<Arc<SharedFile>, WireError> {
        self.share
            .as_ref()
            .and_then(|s| s.get(hash))
            .ok_or_else(|| {
                WireError::new(
                    ErrorCode::NotFound,
                    format!("file {hash} is not shared by peer {}", self.name),
                )
            })
    }

    fn piece_error(&self, hash: &str, e: PieceError) -> WireError {
        let code = match &e {
            PieceError::PastEnd { .. } => ErrorCode::BadRequest,
            // Not found here any more: the downloader should take the piece from another
            // holder.
            PieceError::Escaped | PieceError::Changed => ErrorCode::NotFound,
            PieceError::Io(io) if io.kind() == std::io::ErrorKind::NotFound => ErrorCode::NotFound,
            PieceError::Io(_) => ErrorCode::Internal,
        };
        WireError::new(code, format!("file {hash} on peer {}: {e}", self.name))
    }

    /// Walks the share again and tells the index what changed. Returns the changes.
    pub async fn rescan_share(&self) -> Changes {
        let Some(share) = &self.share else {
            return Changes::default();
        };
        match share.rescan().await {
            Ok(changes) => {
                if !changes.is_empty() {
                    tracing::info!(
                        "share changed: {} files added or changed, {} removed",
                        changes.added.len(),
                        changes.removed.len()
                    );
                    self.tell_index(&changes).await;
                }
                changes
            }
            Err(e) => {
                tracing::warn!(
                    "cannot rescan the share directory {}: {e}",
                    share.root().display()
                );
                Changes::default()
            }
        }
    }

    /// Sends share changes to the index, if a lease is held. Without one there is nothing
    /// to do: the next session registers the whole share (and the lease notices a share
    /// that changed while it was registering).
    pub(crate) async fn tell_index(&self, changes: &Changes) {
        let lease = self.lease.lock().expect("lease lock").clone();
        let Some(lease) = lease else {
            return;
        };
        let mut reqs = Vec::new();
        if !changes.added.is_empty() {
            reqs.push(Request::RegisterFiles {
                auth: lease.auth.clone(),
                files: changes.added.clone(),
                replace: false,
            });
        }
        if !changes.removed.is_empty() {
            reqs.push(Request::UnregisterFiles {
                auth: lease.auth.clone(),
                hashes: changes.removed.clone(),
            });
        }
        for req in reqs {
            let kind = req.kind();
            match lease.conn.request(req, false).await {
                Ok(_) => {}
                Err(e) if e.code() == Some(ErrorCode::Unsupported) => {
                    tracing::debug!("the index does not take file lists: {e}");
                }
                // A lost connection is noticed by the lease, which registers everything again.
                Err(e) => tracing::warn!("cannot send {kind} to the index: {e}"),
            }
        }
    }

    async fn create_topic(
        &self,
        topic: String,
        retention: Retention,
    ) -> Result<Response, WireError> {
        peerbus_proto::validate_topic(&topic)?;
        retention.validate()?;
        let _directory = self.directory.lock().await;
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
        let (id, id_op) = self.take_topic_ids(1);
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
            Cursors::default(),
            self.tails.clone(),
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
        // Topic metadata is fsynced in os mode too, as before the writes of its messages.
        let done = self.store(
            vec![
                id_op,
                Op::PutTopic {
                    name: topic.clone(),
                    meta,
                },
            ],
            true,
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
        let _directory = self.directory.lock().await;
        let t = self
            .topics
            .lock()
            .expect("topics lock")
            .remove(topic)
            .ok_or_else(|| WireError::topic_not_found(topic))?;
        let done = {
            // Cancelled and queued under the topic lock. Every op for this topic is queued
            // under that lock by someone who checked `deleted` first (appends, commits,
            // subscriptions), so the deletion is the last op ever queued for its id: nothing
            // written after it brings the topic back or leaves rows behind.
            let st = t.state.lock().expect("topic lock");
            t.mark_deleted();
            let mut ops = vec![Op::DeleteTopic {
                name: topic.to_string(),
                id: t.id,
            }];
            // Producer state lives in `meta`, which DeleteTopic does not touch.
            ops.extend(st.producers.ids().map(|p| forget_producer(t.id, p)));
            self.store(ops, true)
        };
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
    ///
    /// With `producer` = (producer id, sequence) the batch is idempotent: a repeat of the
    /// producer's last sequence is not stored again but answered with the offsets it got, and
    /// the producer's new state is written in the same atomic write as the batch, so after a
    /// crash either both are stored or neither is.
    fn append(
        &self,
        t: &Arc<Topic>,
        batch: Batch,
        producer: Option<(u64, u64)>,
    ) -> Result<Appended, WireError> {
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
        if batch.len() > peerbus_proto::MAX_BATCH_MESSAGES {
            return Err(WireError::new(
                ErrorCode::TooLarge,
                format!(
                    "a publish of {} messages is over the {} message limit",
                    batch.len(),
                    peerbus_proto::MAX_BATCH_MESSAGES
                ),
            ));
        }
        let now = now_ms();
        let n = batch.len() as u32;
        let mut st = t.state.lock().expect("topic lock");
        // Checked under the lock that deleting takes to cancel, so nothing is stored for a
        // topic once its deletion was queued.
        if t.is_deleted() {
            return Err(WireError::topic_not_found(&t.name));
        }
        let mut record = None;
        if let Some((producer, sequence)) = producer {
            match st.producers.admit(&t.name, producer, sequence, now)? {
                Admission::Duplicate { first, count } => {
                    return Ok(Appended::Duplicate { first, count });
                }
                Admission::Next { previous, evicted } => {
                    record = Some((producer, sequence, previous, evicted));
                }
            }
        }
        let first = st.retained.next();
        for &len in &batch.lens {
            st.retained.push(len, now);
        }
        st.tail.push(first, now, batch.clone());
        let fresh = batch.clone();
        let mut ops = vec![Op::Append {
            topic_id: t.id,
            first_offset: first,
            timestamps: vec![now; n as usize],
            batch,
        }];
        let mut undo = None;
        if let Some((producer, sequence, previous, evicted)) = record {
            ops.extend(evicted.into_iter().map(|p| forget_producer(t.id, p)));
            let p = Produced {
                sequence,
                first,
                count: n,
                last_ms: now,
            };
            st.producers.record(producer, p);
            ops.push(Op::Put {
                table: Table::Meta,
                key: producer_key(t.id, producer),
                value: p.encode(),
            });
            undo = Some(Undo {
                producer,
                previous,
                recorded: p,
            });
        }
        let expired = st.subscribers.sweep(now);
        ops.extend(expired_subscriber_ops(t, expired));
        let min = st.min_committed();
        let cut = st.retained.cutoff(&t.retention, now, min);
        if cut > st.retained.low() {
            st.retained.drop_below(cut);
            ops.extend(self.truncate_ops(t, cut));
        }
        // Under the topic lock, which keeps a memory-mode store in offset order.
        let rx = self.store(ops, self.sync());
        Ok(Appended::Queued {
            first,
            count: n,
            rx,
            undo,
            fresh: Some((now, fresh)),
        })
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
        {
            // Recent messages come from the topic's tail in memory, unless retention has
            // removed them meanwhile.
            let st = t.state.lock().expect("topic lock");
            if from >= st.retained.low()
                && let Some(set) = st.tail.read(&t.name, from, hw, want)
            {
                return Ok(set);
            }
        }
        let msgs = self
            .backend
            .read(t.id, from, want, MAX_READ_BYTES)
            .map_err(internal)?;
        // Nothing stored at `from` although it is below the watermark means a hole: a write
        // that failed or was refused after its offsets were given out. The set then starts
        // at the next stored message (at most the watermark), so readers move past the hole
        // instead of asking for it again and again.
        let Some(first) = msgs.first() else {
            set.first_offset = hw;
            return Ok(set);
        };
        set.first_offset = first.offset.min(hw);
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
        let mut st = t.state.lock().expect("topic lock");
        self.commit_and_store(t, &mut st, subscriber, offset);
    }

    /// [`Node::commit_locked`] and storing what it decided, with the topic lock held: queued
    /// under the lock, so it cannot land after the topic's deletion.
    fn commit_and_store(&self, t: &Topic, st: &mut TopicState, subscriber: &str, offset: u64) {
        let mut ops = Vec::new();
        self.commit_locked(t, st, subscriber, offset, &mut ops);
        if !ops.is_empty() {
            self.store_detached(ops);
        }
    }

    /// Records a subscriber's position and adds the ops that store it (and any `consumed`
    /// retention it allows) to `ops`.
    fn commit_locked(
        &self,
        t: &Topic,
        st: &mut TopicState,
        subscriber: &str,
        offset: u64,
        ops: &mut Vec<Op>,
    ) {
        if t.is_deleted() {
            // The deletion is queued already; a commit after it would bring rows back.
            return;
        }
        // Not at all when unsubscribed meanwhile: that does not bring it back.
        if !st.subscribers.advance(subscriber, offset, now_ms()) {
            return;
        }
        ops.push(Op::SetOffset {
            topic_id: t.id,
            subscriber: subscriber.to_string(),
            offset,
        });
        if t.retention.consumed {
            let min = st.min_committed();
            let cut = st.retained.cutoff(&t.retention, now_ms(), min);
            if cut > st.retained.low() {
                st.retained.drop_below(cut);
                ops.extend(self.truncate_ops(t, cut));
            }
        }
    }

    /// Raises the durable watermark past a stored batch and hands the batch to the live
    /// followers that expect exactly it. Both under the topic lock, so a follower going live
    /// never misses a batch between its last read and joining. A follower the batch does
    /// not follow on from, or whose connection has no room now, is handed back to its task,
    /// which reads from the log as usual.
    fn made_durable(&self, t: &Topic, first: u64, count: u32, fresh: Option<(u64, Batch)>) {
        let end = first + u64::from(count);
        let mut st = t.state.lock().expect("topic lock");
        t.mark_durable(end);
        if st.live.is_empty() {
            return;
        }
        let mut live = std::mem::take(&mut st.live);
        live.retain_mut(|f| {
            let sent = match &fresh {
                Some((ts, batch)) if f.next == first => f.conn.try_send(ServerFrame::Delivery {
                    sub: f.sub,
                    messages: MessageSet {
                        topic: t.name.clone(),
                        first_offset: first,
                        timestamps: vec![*ts; count as usize],
                        batch: batch.clone(),
                    },
                }),
                _ => false,
            };
            if sent {
                // Committed when the subscriber acknowledges it, not when queued here.
                f.next = end;
            } else {
                f.handback.next.store(f.next, Ordering::Release);
                f.handback.wake.notify_one();
            }
            sent
        });
        st.live = live;
    }

    fn subscribe(&self, t: &Topic, s: &Subscribe) -> Result<u64, WireError> {
        peerbus_proto::validate_subscriber(&s.subscriber)?;
        let hw = t.high_watermark();
        let mut st = t.state.lock().expect("topic lock");
        if t.is_deleted() {
            return Err(WireError::topic_not_found(&t.name));
        }
        let now = now_ms();
        let current = st.subscribers.get(&s.subscriber);
        let pos = st.start_position(current, s.from, hw);
        if current != Some(pos) {
            let expired = st.subscribers.set(&t.name, &s.subscriber, pos, now)?;
            let mut ops = expired_subscriber_ops(t, expired);
            ops.push(Op::SetOffset {
                topic_id: t.id,
                subscriber: s.subscriber.clone(),
                offset: pos,
            });
            self.store_detached(ops);
        } else {
            st.subscribers.touch(&s.subscriber, now);
        }
        if s.follow.is_some() {
            st.subscribers.follow_started(&s.subscriber, now);
        }
        Ok(pos)
    }

    /// Reads what `subscriber` has not acknowledged, from its committed position, without
    /// committing it: the reader acknowledges a batch once it has it (with `commit` on its
    /// next pull, or an [`Request::Ack`]). `commit` is applied first.
    fn pull_now(
        &self,
        t: &Topic,
        subscriber: &str,
        max: u32,
        commit: Option<u64>,
    ) -> Result<MessageSet, WireError> {
        if let Some(offset) = commit {
            // A position the client remembered from before an unsubscribe, or from an
            // earlier topic of the same name, is stale: read from the committed position
            // rather than fail every later pull.
            if let Err(e) = self.ack(t, subscriber, offset) {
                if t.is_deleted() {
                    return Err(e);
                }
                tracing::debug!("ignored the commit sent with a pull: {e}");
            }
        }
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
        // An empty set that starts later skips a hole (a deleted range): nothing there can
        // be delivered, so the position moves past it without waiting for an ack.
        if set.is_empty() && set.next_offset() > pos {
            self.commit(t, subscriber, set.next_offset());
        }
        Ok(set)
    }

    /// Commits `subscriber`'s position at `offset` (the next offset it reads): it has every
    /// message before it. Positions only move forward this way, and never past what is
    /// durable, so an ack cannot skip a message nobody was given.
    fn ack(&self, t: &Topic, subscriber: &str, offset: u64) -> Result<(), WireError> {
        peerbus_proto::validate_subscriber(subscriber)?;
        let hw = t.high_watermark();
        if offset > hw {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                format!(
                    "cannot acknowledge topic '{}' up to offset {}: its messages end before \
                     offset {hw}",
                    t.name,
                    offset - 1
                ),
            ));
        }
        let mut st = t.state.lock().expect("topic lock");
        if t.is_deleted() {
            return Err(WireError::topic_not_found(&t.name));
        }
        if !st.subscribers.contains(subscriber) {
            return Err(WireError::new(
                ErrorCode::NotFound,
                format!("'{subscriber}' is not subscribed to topic '{}'", t.name),
            ));
        }
        self.commit_and_store(t, &mut st, subscriber, offset);
        Ok(())
    }

    /// Totals over every hosted topic, each topic's lock taken briefly in turn.
    fn totals(&self) -> NodeTotals {
        let topics: Vec<Arc<Topic>> = self
            .topics
            .lock()
            .expect("topics lock")
            .values()
            .cloned()
            .collect();
        let mut totals = NodeTotals {
            topics: topics.len() as u64,
            ..NodeTotals::default()
        };
        for t in topics {
            let st = t.state.lock().expect("topic lock");
            totals.subscribers += st.subscribers.len() as u64;
            // As `stats` counts them: from the oldest retained to the durable end.
            totals.messages += t.high_watermark().saturating_sub(st.retained.low());
            totals.bytes += st.retained.bytes();
        }
        totals
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

/// The op that removes a producer's stored state on a topic.
fn forget_producer(topic_id: u64, producer: u64) -> Op {
    Op::Remove {
        table: Table::Meta,
        key: producer_key(topic_id, producer),
    }
}

/// The ops that remove the stored positions of subscribers that expired.
fn expired_subscriber_ops(t: &Topic, expired: Vec<String>) -> Vec<Op> {
    if !expired.is_empty() {
        tracing::info!(
            "forgetting {} subscribers of topic '{}' unused for a week",
            expired.len(),
            t.name
        );
    }
    expired
        .into_iter()
        .map(|subscriber| Op::DeleteOffset {
            topic_id: t.id,
            subscriber,
        })
        .collect()
}

/// What [`Node::append`] did with a batch.
pub(crate) enum Appended {
    /// Offsets assigned and queued for storage; `rx` completes once written.
    Queued {
        first: u64,
        count: u32,
        rx: tokio::sync::oneshot::Receiver<peerbus_store::Result<()>>,
        /// For an idempotent batch: how to take back the recorded producer state if the
        /// write fails, so a resend is stored instead of answered with offsets never stored.
        undo: Option<Undo>,
        /// The batch and its timestamp, for the topic's live followers once it is durable.
        fresh: Option<(u64, Batch)>,
    },
    /// A resend of the producer's last batch, which got these offsets.
    Duplicate { first: u64, count: u32 },
}

/// A producer's state before an idempotent append, to restore when its write fails.
pub(crate) struct Undo {
    producer: u64,
    previous: Option<Produced>,
    recorded: Produced,
}

impl Appended {
    /// True when the storage outcome is known, so [`Appended::finish`] will not wait.
    fn is_stored(&self) -> bool {
        match self {
            Appended::Queued { rx, .. } => !rx.is_empty(),
            Appended::Duplicate { .. } => false,
        }
    }

    /// Waits until the batch is durable and returns the answer to the publish.
    async fn finish(self, node: &Node, t: &Topic, conn: &ConnCtx) -> Result<Response, WireError> {
        match self {
            Appended::Queued {
                first,
                count,
                rx,
                undo,
                fresh,
            } => {
                let r = match rx.await {
                    Ok(Ok(())) => {
                        node.made_durable(t, first, count, fresh);
                        return Ok(Response::Published {
                            first_offset: first,
                            count,
                        });
                    }
                    Ok(Err(e)) => Err(internal(e)),
                    Err(_) => Err(internal("the storage writer stopped")),
                };
                // What was not written must never be served from memory.
                t.state.lock().expect("topic lock").tail.clear();
                if let Some(u) = undo {
                    let mut st = t.state.lock().expect("topic lock");
                    st.producers.undo(u.producer, u.recorded, u.previous);
                }
                r
            }
            Appended::Duplicate { first, count } => {
                // The original may still be in the writer's queue: answer only once it is
                // durable, like the original would have been. If its write failed, that
                // never happens: after a while the resender is told to try again, and by
                // then the failed write has taken back the producer's state.
                let end = first + u64::from(count);
                tokio::select! {
                    r = t.durable_at(end) => match r {
                        Some(_) => Ok(Response::Published {
                            first_offset: first,
                            count,
                        }),
                        None => Err(WireError::topic_not_found(&t.name)),
                    },
                    _ = conn.closed.cancelled() => {
                        Err(WireError::new(ErrorCode::Unavailable, "connection closed"))
                    }
                    _ = tokio::time::sleep(DUPLICATE_WAIT) => Err(WireError::new(
                        ErrorCode::Unavailable,
                        format!(
                            "the first copy of this resent batch to topic '{}' is not durable \
                             after {} s: send it again",
                            t.name,
                            DUPLICATE_WAIT.as_secs()
                        ),
                    )),
                }
            }
        }
    }
}

/// Following subscriptions one connection may hold on a peer.
pub const MAX_FOLLOWS_PER_CONNECTION: usize = 1024;

/// Bytes of publishes a peer holds between their arrival and their fsync, across all
/// connections.
const WRITE_BUDGET: usize = 256 << 20;

/// The topic a topic request names, looked up before dispatch. Every request with a
/// [`Request::hosted_topic`] that reaches a handler had its topic found.
fn hosted_topic(hosted: Option<Arc<Topic>>) -> Arc<Topic> {
    hosted.expect("dispatch forwards or refuses topic requests whose topic is not hosted")
}

/// The peer as a [`Service`] for the accept loop.
#[derive(Debug)]
pub(crate) struct PeerService {
    pub node: Arc<Node>,
}

impl Service for PeerService {
    fn cost(&self, req: &Request, frame_len: usize) -> usize {
        match req {
            // The piece is read into memory and held until the answer is queued.
            Request::ReadPiece { .. } => frame_len.max(peerbus_client::tree::PIECE_LEN as usize),
            _ => frame_len,
        }
    }

    async fn handle(self: &Arc<Self>, conn: &Arc<ConnCtx>, id: u32, forward: bool, req: Request) {
        let node = &self.node;
        // A name that can never exist is refused before any lookup or forward, so the
        // client hears what is wrong with it rather than "not found" or "unavailable".
        if let Some(topic) = req.hosted_topic()
            && let Err(e) = peerbus_proto::validate_topic(topic)
        {
            conn.reply(id, Err(e.into())).await;
            return;
        }
        // Looked up once: a delete on another thread between a check and a second lookup
        // would otherwise leave a handler without its topic.
        let hosted = req.hosted_topic().and_then(|name| node.topic(name));
        if let Some(topic) = req.hosted_topic()
            && hosted.is_none()
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
            Request::Publish { topic: _, batch } => {
                publish(node, conn, id, hosted_topic(hosted), batch, None).await
            }
            Request::PublishIdempotent {
                topic: _,
                batch,
                producer,
                sequence,
            } => {
                let t = hosted_topic(hosted);
                publish(node, conn, id, t, batch, Some((producer, sequence))).await
            }
            Request::Pull {
                topic: _,
                subscriber,
                max,
                wait_ms,
                commit,
            } => {
                let t = hosted_topic(hosted);
                let first = node.pull_now(&t, &subscriber, max, commit);
                match first {
                    Ok(set) if set.is_empty() && wait_ms > 0 => {
                        let (node, conn) = (node.clone(), conn.clone());
                        tokio::spawn(async move {
                            let wait = Duration::from_millis(u64::from(wait_ms));
                            let start = set.first_offset;
                            let r = tokio::select! {
                                r = t.durable_at(start + 1) => match r {
                                    Some(_) => {
                                        // The read waits for outbox room below: hold a read
                                        // slot.
                                        let slot = tokio::select! {
                                            s = conn.read_slot() => s,
                                            _ = conn.closed.cancelled() => return,
                                        };
                                        let r = node.pull_now(&t, &subscriber, max, None);
                                        conn.reply(id, r.map(Response::Messages)).await;
                                        drop(slot);
                                        return;
                                    }
                                    None => Err(WireError::topic_not_found(&t.name)),
                                },
                                _ = tokio::time::sleep(wait) => Ok(set),
                                _ = conn.closed.cancelled() => return,
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
                let t = hosted_topic(hosted);
                if s.follow.is_some() && node.follows_of(conn.id) >= MAX_FOLLOWS_PER_CONNECTION {
                    let e = WireError::new(
                        ErrorCode::TooLarge,
                        format!(
                            "this connection follows {MAX_FOLLOWS_PER_CONNECTION} subscriptions \
                             on peer {} already; stop one or use another connection",
                            node.name
                        ),
                    );
                    conn.reply(id, Err(e)).await;
                    return;
                }
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
                                follow(&node, &conn, t.clone(), sub, pos, stop).await;
                                t.state
                                    .lock()
                                    .expect("topic lock")
                                    .subscribers
                                    .follow_ended(&s.subscriber, now_ms());
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
            Request::Ack {
                topic: _,
                subscriber,
                offset,
            } => {
                let t = hosted_topic(hosted);
                let r = node.ack(&t, &subscriber, offset).map(|()| Response::Ok);
                conn.reply(id, r).await;
            }
            Request::Unsubscribe { topic, subscriber } => {
                let t = hosted_topic(hosted);
                let removed = t
                    .state
                    .lock()
                    .expect("topic lock")
                    .subscribers
                    .remove(&subscriber);
                let r = if removed {
                    node.store_detached(vec![Op::DeleteOffset {
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
            Request::Subscribers { topic: _ } => {
                let t = hosted_topic(hosted);
                let list = t
                    .state
                    .lock()
                    .expect("topic lock")
                    .subscribers
                    .iter()
                    .map(|(name, next_offset)| SubscriberInfo {
                        name: name.to_string(),
                        next_offset,
                    })
                    .collect();
                conn.reply(id, Ok(Response::Subscribers(list))).await;
            }
            Request::TopicStats { topic: _ } => {
                let t = hosted_topic(hosted);
                conn.reply(id, Ok(Response::TopicStats(node.stats(&t))))
                    .await;
            }
            Request::NodeStats => {
                let totals = node.totals();
                conn.reply(id, Ok(Response::NodeStats(totals))).await;
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
            Request::CreateTopics {
                topics,
                retention,
                peer: _,
            } => {
                let (node, conn) = (node.clone(), conn.clone());
                tokio::spawn(async move {
                    let r = node.create_topics(topics, retention).await;
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
            Request::FileManifest { hash } => {
                let r = node
                    .shared(&hash)
                    .map(|f| Response::Manifest(f.manifest.clone()));
                conn.reply(id, r).await;
            }
            Request::ReadPiece { hash, index } => match node.shared(&hash) {
                Ok(f) => {
                    // Disk reads happen in a task so this connection keeps reading requests
                    // (a downloader pipelines several pieces).
                    let (node, conn) = (node.clone(), conn.clone());
                    tokio::spawn(async move {
                        let share = node.share.as_ref().expect("a shared file implies a share");
                        let r = share
                            .read_piece(f, index)
                            .await
                            .map(Response::Piece)
                            .map_err(|e| node.piece_error(&hash, e));
                        conn.reply(id, r).await;
                    });
                }
                Err(e) => {
                    conn.reply(id, Err(e)).await;
                }
            },
            Request::SearchFiles { pattern, after } => {
                let hits = node.search_share(&pattern, after.as_ref());
                conn.reply(id, Ok(Response::Files(hits))).await;
            }
            Request::LookupFile { key } => {
                match node.share.as_ref().and_then(|s| s.find(&key)) {
                    Some(f) => {
                        conn.reply(id, Ok(Response::Files(vec![node.hit(&f)])))
                            .await;
                    }
                    None => {
                        // Not here: the index knows who holds it.
                        let (node, conn) = (node.clone(), conn.clone());
                        tokio::spawn(async move {
                            let r = node
                                .client
                                .index_request(Request::LookupFile { key })
                                .await
                                .map_err(relay);
                            conn.reply(id, r).await;
                        });
                    }
                }
            }
            Request::Fetch { key } => {
                let slot = match node.share {
                    None => Err(node.no_share()),
                    Some(_) => node.fetch_slot(),
                };
                match slot {
                    Err(e) => {
                        conn.reply(id, Err(e)).await;
                    }
                    Ok(slot) => {
                        let (node, conn) = (node.clone(), conn.clone());
                        tokio::spawn(async move {
                            let r = node.fetch(key).await;
                            drop(slot);
                            conn.reply(id, r).await;
                        });
                    }
                }
            }
            req @ (Request::ListPeers { .. }
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

/// Appends a batch (plain or from an idempotent producer) and answers once it is durable,
/// from a task so the connection keeps reading meanwhile.
async fn publish(
    node: &Arc<Node>,
    conn: &Arc<ConnCtx>,
    id: u32,
    t: Arc<Topic>,
    batch: Batch,
    producer: Option<(u64, u64)>,
) {
    // Held until the batch is durable: with the disk behind, publishers wait here (and
    // their connections stop being read) instead of queueing without limit.
    let held = if node.config.durability != Durability::Memory {
        let cost = crate::retention::batch_charge(&batch).clamp(1, WRITE_BUDGET) as u32;
        match node.write_budget.clone().acquire_many_owned(cost).await {
            Ok(p) => Some(p),
            Err(_) => unreachable!("the write budget is never closed"),
        }
    } else {
        None
    };
    match node.append(&t, batch, producer) {
        Ok(appended) if appended.is_stored() => {
            // Stored already (memory mode): answering here saves a task switch.
            let r = appended.finish(node, &t, conn).await;
            conn.reply(id, r).await;
        }
        Ok(appended) => {
            let (node, conn) = (node.clone(), conn.clone());
            tokio::spawn(async move {
                let r = appended.finish(&node, &t, &conn).await;
                drop(held);
                conn.reply(id, r).await;
            });
        }
        Err(e) => {
            drop(held);
            conn.reply(id, Err(e)).await;
        }
    }
}

/// Streams a topic to a connection from `pos` until stopped, the topic is deleted or the
/// connection closes; it commits nothing (the subscriber acknowledges what it handled). Once caught up it joins the topic's live
/// followers, whose new batches the publishing side writes, and takes over again when
/// handed back.
async fn follow(
    node: &Node,
    conn: &Arc<ConnCtx>,
    t: Arc<Topic>,
    sub: u64,
    mut pos: u64,
    stop: CancellationToken,
) {
    let ended = |reason: WireError| ServerFrame::SubscriptionEnded { sub, reason };
    let deleted = || {
        ended(if t.fenced.load(Ordering::Acquire) {
            WireError::new(
                ErrorCode::NotHost,
                format!(
                    "peer {} no longer hosts topic '{}': another peer does",
                    node.name, t.name
                ),
            )
        } else {
            WireError::new(
                ErrorCode::NotFound,
                format!("topic '{}' was deleted", t.name),
            )
        })
    };
    loop {
        let hw = t.high_watermark();
        if pos > hw {
            // Retention may move the low end past what is durable yet (the rest of a
            // batch is still being written): wait for the watermark instead of spinning.
            tokio::select! {
                r = t.durable_at(pos) => if r.is_none() {
                    conn.send(deleted()).await;
                    return;
                },
                _ = stop.cancelled() => return,
            }
            continue;
        }
        if pos < hw {
            // A read waits for outbox room before it is queued: hold one of the
            // connection's few read slots meanwhile, so a client that stops reading keeps at
            // most that many reads in memory however many subscriptions it follows.
            let slot = tokio::select! {
                s = conn.read_slot() => s,
                _ = stop.cancelled() => return,
            };
            match node.read(&t, pos, MAX_READ_MESSAGES) {
                Ok(set) if !set.is_empty() => {
                    pos = set.next_offset();
                    let frame = ServerFrame::Delivery { sub, messages: set };
                    // Not committed here: the subscriber acknowledges what it handed to its
                    // application, so a delivery lost on the way is sent again on resume.
                    tokio::select! {
                        ok = conn.send(frame) => if !ok { return },
                        _ = stop.cancelled() => return,
                    }
                    drop(slot);
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
                    conn.send(ended(e)).await;
                    return;
                }
            }
        }
        let handback = Arc::new(Handback::default());
        {
            let mut st = t.state.lock().expect("topic lock");
            // The watermark only rises under this lock, so nothing durable is missed between
            // this check and joining.
            if t.high_watermark() != pos {
                continue;
            }
            if t.is_deleted() {
                drop(st);
                conn.send(deleted()).await;
                return;
            }
            st.live.push(Live {
                sub,
                conn: conn.clone(),
                next: pos,
                handback: handback.clone(),
            });
        }
        let leave = || {
            t.state
                .lock()
                .expect("topic lock")
                .live
                .retain(|f| !Arc::ptr_eq(&f.handback, &handback));
        };
        tokio::select! {
            _ = handback.wake.notified() => {
                pos = handback.next.load(Ordering::Acquire);
            }
            _ = stop.cancelled() => {
                leave();
                return;
            }
            _ = t.deleted() => {
                leave();
                conn.send(deleted()).await;
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
            // The client acknowledges to this node, which forwards its acks to the host.
            Ok(upstream) => {
                let mut upstream = upstream.without_acks();
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

// Bulk topic creation (`CreateTopics`).
impl Node {
    /// Creates every topic of `topics` on this peer: checks them all, claims them at the
    /// index in one announce, then stores them in one write. Nothing is created when a name
    /// is invalid, listed twice or taken.
    async fn create_topics(
        &self,
        mut topics: Vec<String>,
        retention: Retention,
    ) -> Result<Response, WireError> {
        peerbus_proto::check_create_count(topics.len())?;
        for t in &topics {
            peerbus_proto::validate_topic(t)?;
        }
        retention.validate()?;
        let _directory = self.directory.lock().await;
        topics.sort_unstable();
        if let Some(w) = topics.windows(2).find(|w| w[0] == w[1]) {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                format!("topic '{}' is listed twice", w[0]),
            ));
        }
        let exists = |topic: &str| {
            WireError::new(
                ErrorCode::Exists,
                format!("topic '{topic}' exists on peer {}", self.name),
            )
        };
        {
            let hosted = self.topics.lock().expect("topics lock");
            if let Some(t) = topics.iter().find(|t| hosted.contains_key(t.as_str())) {
                return Err(exists(t));
            }
        }
        let created = |count: usize| {
            Ok(Response::Created(vec![peerbus_proto::CreatedOn {
                peer_id: self.peer_id(),
                peer_name: self.name.clone(),
                addr: self.advertise.clone(),
                count: count as u64,
            }]))
        };
        if topics.is_empty() {
            return created(0);
        }
        let lease = self.lease.lock().expect("lease lock").clone();
        let Some(lease) = lease else {
            return Err(WireError::new(
                ErrorCode::Unavailable,
                format!(
                    "peer {} is not registered with the index at {} right now, so it cannot claim {} topics",
                    self.name,
                    self.config.index,
                    topics.len()
                ),
            ));
        };
        // Claim at the index first: it refuses names another peer hosts.
        lease
            .conn
            .request(
                Request::AnnounceTopics {
                    auth: lease.auth.clone(),
                    topics: topics.clone(),
                    replace: false,
                },
                false,
            )
            .await
            .map_err(relay)?;
        let count = topics.len();
        let (first_id, id_op) = self.take_topic_ids(count as u64);
        let created_ms = now_ms();
        let mut ops = Vec::with_capacity(count + 1);
        ops.push(id_op);
        let mut made = Vec::with_capacity(count);
        for (i, name) in topics.into_iter().enumerate() {
            let id = first_id + i as u64;
            let meta = TopicMeta {
                id,
                retention,
                low: 0,
                created_ms,
            };
            made.push(Arc::new(Topic::new(
                name.clone(),
                id,
                retention,
                created_ms,
                Retained::starting_at(0),
                Cursors::default(),
                self.tails.clone(),
            )));
            ops.push(Op::PutTopic { name, meta });
        }
        {
            let mut hosted = self.topics.lock().expect("topics lock");
            // A concurrent create may have taken a name since the check above.
            if let Some(t) = made.iter().find(|t| hosted.contains_key(&t.name)) {
                return Err(exists(&t.name));
            }
            hosted.reserve(count);
            for t in made {
                hosted.insert(t.name.clone(), t);
            }
        }
        let done = self.store(ops, true);
        match done.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(internal(e)),
            Err(_) => return Err(internal("the storage writer stopped")),
        }
        tracing::info!("created {count} topics");
        created(count)
    }
}
