//! Wire messages. Every request and response in peerbus is one of these types.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A frame sent by a client (a CLI, a library user, or a node talking to another node).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientFrame {
    /// First frame on every connection.
    Hello {
        /// Protocol the client speaks; must be [`crate::PROTOCOL`].
        protocol: String,
        /// Shared secret, required when the node runs with `--auth-token`.
        token: Option<String>,
    },
    /// A request; the response echoes `id`.
    Request {
        /// Chosen by the client, unique among its requests in flight.
        id: u32,
        /// When false, a peer that does not host the request's topic answers
        /// [`ErrorCode::NotHost`] instead of forwarding it, so a client with a stale location
        /// cache learns to look the topic up again.
        forward: bool,
        /// What is asked.
        body: Request,
    },
}

/// A frame sent by a server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerFrame {
    /// The hello was accepted.
    Welcome {
        /// The protocol the server speaks.
        protocol: String,
        /// The server's software version.
        version: String,
        /// Which kind of node answered.
        node: NodeKind,
    },
    /// The hello or the connection was refused; the server closes the connection next.
    Refused(WireError),
    /// The answer to the request with the same id.
    Response {
        /// The request's id.
        id: u32,
        /// The outcome.
        body: Result<Response, WireError>,
    },
    /// Messages pushed to a following subscription.
    Delivery {
        /// The id the client gave in [`Request::Subscribe`].
        sub: u64,
        /// The messages, in offset order.
        messages: MessageSet,
    },
    /// A following subscription ended on the server's side (topic deleted, node stopping).
    SubscriptionEnded {
        /// The id the client gave in [`Request::Subscribe`].
        sub: u64,
        /// Why it ended.
        reason: WireError,
    },
}

impl ServerFrame {
    /// Roughly how many bytes this frame takes on the wire: what a connection's outbox
    /// budget is charged for it. Exact for message and piece data, which dominate.
    pub fn wire_size(&self) -> usize {
        const SMALL: usize = 64;
        let set = |m: &MessageSet| SMALL + m.batch.data.len() + 13 * m.batch.len();
        match self {
            ServerFrame::Delivery { messages, .. } => set(messages),
            ServerFrame::Response { body: Ok(r), .. } => match r {
                Response::Messages(m) => set(m),
                Response::Piece(data) => SMALL + data.len(),
                Response::Peers(v) => SMALL + 128 * v.len(),
                Response::Topics(v) => SMALL + 64 * v.len(),
                Response::Subscribers(v) => SMALL + 64 * v.len(),
                Response::Files(v) => SMALL + 128 * v.len(),
                Response::Participants(v) => SMALL + 32 * v.len(),
                _ => SMALL,
            },
            _ => SMALL,
        }
    }
}

/// The kind of node at the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeKind {
    /// The index server (directory).
    Index,
    /// A peer node hosting topics and files.
    Peer,
}

/// A request. Index requests are answered by the index; topic requests by peers (and by the
/// index for `CreateTopic`, which it places on the least-loaded live peer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Liveness probe; answered with [`Response::Pong`].
    Ping,
    /// A peer joins (or rejoins, with its id and cookie) the index.
    Register(RegisterPeer),
    /// A peer renews its lease.
    Keepalive(PeerAuth),
    /// A peer leaves: it is marked inactive and its entries are withdrawn at once.
    Leave(PeerAuth),
    /// Lists the known peers in id order, at most [`crate::PEER_PAGE`] of them after `after`
    /// (the last id of the previous page); a full page may be followed by more.
    ListPeers {
        /// Only peers with a higher id.
        after: Option<u64>,
    },
    /// A peer claims topics as their host. With `replace`, the claimed set replaces everything
    /// the peer hosted before (used when re-announcing after a reconnect).
    AnnounceTopics {
        /// Who claims.
        auth: PeerAuth,
        /// The topics.
        topics: Vec<String>,
        /// Replace the peer's whole topic set instead of adding to it.
        replace: bool,
    },
    /// A peer gives up topics (deleted).
    WithdrawTopics {
        /// Who withdraws.
        auth: PeerAuth,
        /// The topics.
        topics: Vec<String>,
    },
    /// Where is this topic hosted?
    LookupTopic {
        /// The topic.
        topic: String,
    },
    /// Lists topics offered by live peers, optionally only those starting with `prefix`, in
    /// name order, one page of at most [`crate::LIST_PAGE`] at a time: a page that long
    /// may be followed by more, asked for with `after` = its last name.
    ListTopics {
        /// Only names starting with this.
        prefix: Option<String>,
        /// Only names after this one (the last of the previous page).
        after: Option<String>,
    },
    /// Creates a topic. Sent to a peer, that peer hosts it; sent to the index, the index picks
    /// the least-loaded live peer (or the one named by `peer`) and forwards it there.
    CreateTopic {
        /// The topic.
        topic: String,
        /// Retention policy.
        retention: Retention,
        /// Only for the index: the address or name of the peer that should host it.
        peer: Option<String>,
    },
    /// Deletes a topic and its data.
    DeleteTopic {
        /// The topic.
        topic: String,
    },
    /// Appends a batch of messages to a topic.
    Publish {
        /// The topic.
        topic: String,
        /// The payloads.
        batch: Batch,
    },
    /// Records a subscription, and with `follow` streams messages to this connection.
    Subscribe(Subscribe),
    /// Returns messages from the subscriber's committed position. Reading commits nothing:
    /// the subscriber acknowledges a batch once it has it, with `commit` on its next pull
    /// (Kafka's commit-then-poll) or an [`Request::Ack`], so a batch lost on the way is
    /// read again (at-least-once).
    Pull {
        /// The topic.
        topic: String,
        /// The subscriber's name.
        subscriber: String,
        /// At most this many messages.
        max: u32,
        /// If nothing is available, wait up to this many milliseconds for a publish.
        wait_ms: u32,
        /// Before reading, commit this position (the next offset to read), as with
        /// [`Request::Ack`].
        commit: Option<u64>,
    },
    /// Removes a subscription and its committed offset.
    Unsubscribe {
        /// The topic.
        topic: String,
        /// The subscriber's name.
        subscriber: String,
    },
    /// Lists the subscribers of a topic with their committed offsets.
    Subscribers {
        /// The topic.
        topic: String,
    },
    /// Stops a following subscription opened on this connection.
    StopFollow {
        /// The id given in [`Request::Subscribe`].
        sub: u64,
    },
    /// Describes one topic as its host sees it (offsets, counts, retention).
    TopicStats {
        /// The topic.
        topic: String,
    },
    /// A peer offers files (index). With `replace`, the list replaces everything the peer
    /// offered before (used after a reconnect and by rescans).
    RegisterFiles {
        /// Who offers.
        auth: PeerAuth,
        /// The files.
        files: Vec<FileEntry>,
        /// Replace the peer's whole file list instead of adding to it.
        replace: bool,
    },
    /// A peer stops offering files (index).
    UnregisterFiles {
        /// Who withdraws.
        auth: PeerAuth,
        /// BLAKE3 hashes (hex) of the files.
        hashes: Vec<String>,
    },
    /// Files whose name contains `pattern`, case-insensitively. The index answers from its
    /// directory; a peer answers from its own share.
    SearchFiles {
        /// Substring to look for.
        pattern: String,
        /// Only hits after this `(name, hash)`, the last hit of the previous page. Hits come
        /// in `(name, hash)` order, a page ([`crate::page_of_hits`]) at a time; an empty
        /// page is the end.
        after: Option<(String, String)>,
    },
    /// One file by exact name or BLAKE3 hash (hex), with its live holders.
    LookupFile {
        /// Name or hash.
        key: String,
    },
    /// A file's hash tree, from a peer holding it.
    FileManifest {
        /// BLAKE3 hash (hex).
        hash: String,
    },
    /// One piece of a file, from a peer holding it.
    ReadPiece {
        /// BLAKE3 hash (hex).
        hash: String,
        /// Piece number from 0.
        index: u32,
    },
    /// Asks a peer to download a file into its share directory, then offer it. The peer
    /// alone chooses where the copy lands (a place inside its share named by the content
    /// hash): no request names a path on a peer's machine.
    Fetch {
        /// Name or hash.
        key: String,
    },
    /// Registers a participant (index): a named publisher or subscriber that hosts nothing,
    /// such as a "light peer" of the HTTP gateway. Kept at the index so every node's gateway
    /// sees the same participants. Answered [`ErrorCode::Exists`] when already registered.
    RegisterParticipant {
        /// The participant's name (a valid subscriber name).
        name: String,
    },
    /// Removes a participant (index); [`ErrorCode::NotFound`] when it is not registered.
    UnregisterParticipant {
        /// The participant's name.
        name: String,
    },
    /// Lists every registered participant (index); answered with [`Response::Participants`].
    ListParticipants,
    /// Answers [`Response::Ok`] when the participant is registered and
    /// [`ErrorCode::NotFound`] when not (index).
    ParticipantExists {
        /// The participant's name.
        name: String,
    },
    /// Like [`Request::Publish`], but de-duplicated per producer (an idempotent producer):
    /// the host remembers the last `sequence` each `producer` published to the topic, answers
    /// a repeat of it with the offsets it already got instead of storing it again, and
    /// refuses any sequence other than the last or the next with [`ErrorCode::BadRequest`].
    /// This lets a client resend a batch whose acknowledgement it lost without duplicating it.
    PublishIdempotent {
        /// The topic.
        topic: String,
        /// The payloads.
        batch: Batch,
        /// The producer's id, random per client.
        producer: u64,
        /// The batch's number in the producer's sequence for this topic, one more per batch.
        sequence: u64,
    },
    /// Creates many topics in one request, all with the same retention. Sent to a peer, that
    /// peer hosts them all; sent to the index, the index spreads them over the live peers
    /// (least loaded first) or puts them all on the one named by `peer`, and each host
    /// claims its share at the index in one announce and stores it in one write. Every
    /// name must be valid, new and listed once, or nothing is created; the answer is
    /// [`Response::Created`].
    CreateTopics {
        /// The topics.
        topics: Vec<String>,
        /// Retention policy of every topic.
        retention: Retention,
        /// Only for the index: the address or name of the peer that should host them.
        peer: Option<String>,
    },
    /// Commits a subscriber's position: it has every message below `offset` (the next offset
    /// it reads). Positions move only forward this way and never past the durable end; with
    /// `consumed` retention, acknowledged messages may then be deleted. Answered
    /// [`Response::Ok`].
    Ack {
        /// The topic.
        topic: String,
        /// The subscriber's name.
        subscriber: String,
        /// The next offset the subscriber reads.
        offset: u64,
    },
    /// One chunk of everything a peer hosts, so that no message grows with the size of the
    /// whole set: chunks of one `generation` add topics as [`Request::AnnounceTopics`] does
    /// (a chunk is all or nothing); the `last` one then withdraws every topic of the peer
    /// that no chunk of the generation named. Sent after each (re)registration.
    SyncTopics {
        /// Who claims.
        auth: PeerAuth,
        /// Chosen by the peer for this pass; a new one starts over.
        generation: u64,
        /// The topics of this chunk.
        topics: Vec<String>,
        /// The pass is complete.
        last: bool,
    },
    /// The same for the files a peer offers: chunks add, the `last` one withdraws what no
    /// chunk of the generation named.
    SyncFiles {
        /// Who offers.
        auth: PeerAuth,
        /// Chosen by the peer for this pass; a new one starts over.
        generation: u64,
        /// The files of this chunk.
        files: Vec<FileEntry>,
        /// The pass is complete.
        last: bool,
    },
    /// Totals over every topic a peer hosts, answered [`Response::NodeStats`]: what a
    /// gateway's `/metrics` needs, in one request per peer instead of one per topic.
    NodeStats,
}

impl Request {
    /// The topic a peer must host to answer this request, if any.
    pub fn hosted_topic(&self) -> Option<&str> {
        match self {
            Request::DeleteTopic { topic }
            | Request::Publish { topic, .. }
            | Request::PublishIdempotent { topic, .. }
            | Request::Pull { topic, .. }
            | Request::Ack { topic, .. }
            | Request::Unsubscribe { topic, .. }
            | Request::Subscribers { topic }
            | Request::TopicStats { topic } => Some(topic),
            Request::Subscribe(s) => Some(&s.topic),
            _ => None,
        }
    }

    /// A short name of the request kind, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Ping => "ping",
            Request::Register(_) => "register",
            Request::Keepalive(_) => "keepalive",
            Request::Leave(_) => "leave",
            Request::ListPeers { .. } => "list_peers",
            Request::AnnounceTopics { .. } => "announce_topics",
            Request::WithdrawTopics { .. } => "withdraw_topics",
            Request::LookupTopic { .. } => "lookup_topic",
            Request::ListTopics { .. } => "list_topics",
            Request::CreateTopic { .. } => "create_topic",
            Request::DeleteTopic { .. } => "delete_topic",
            Request::Publish { .. } => "publish",
            Request::Subscribe(_) => "subscribe",
            Request::Pull { .. } => "pull",
            Request::Unsubscribe { .. } => "unsubscribe",
            Request::Subscribers { .. } => "subscribers",
            Request::StopFollow { .. } => "stop_follow",
            Request::TopicStats { .. } => "topic_stats",
            Request::RegisterFiles { .. } => "register_files",
            Request::UnregisterFiles { .. } => "unregister_files",
            Request::SearchFiles { .. } => "search_files",
            Request::LookupFile { .. } => "lookup_file",
            Request::FileManifest { .. } => "file_manifest",
            Request::ReadPiece { .. } => "read_piece",
            Request::Fetch { .. } => "fetch",
            Request::RegisterParticipant { .. } => "register_participant",
            Request::UnregisterParticipant { .. } => "unregister_participant",
            Request::ListParticipants => "list_participants",
            Request::ParticipantExists { .. } => "participant_exists",
            Request::PublishIdempotent { .. } => "publish_idempotent",
            Request::CreateTopics { .. } => "create_topics",
            Request::Ack { .. } => "ack",
            Request::SyncTopics { .. } => "sync_topics",
            Request::SyncFiles { .. } => "sync_files",
            Request::NodeStats => "node_stats",
        }
    }
}

/// A peer's registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterPeer {
    /// Human name, unique among peers.
    pub name: String,
    /// Address other nodes reach the peer's binary protocol on (`host:port`).
    pub addr: String,
    /// The peer's HTTP address, if it serves HTTP.
    pub http: Option<String>,
    /// Id and cookie from an earlier registration, to keep the same identity.
    pub previous: Option<PeerAuth>,
    /// True when the peer saves its identity (it has a data directory), so it comes back
    /// with it after a restart: the index then keeps its name for it for a while after its
    /// lease ends, instead of letting the first newcomer take it.
    pub keeps_identity: bool,
}

/// A peer's identity and the secret that proves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAuth {
    /// The id the index gave.
    pub peer_id: u64,
    /// The secret cookie the index gave.
    pub cookie: String,
}

/// Where a new subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StartFrom {
    /// The oldest retained message.
    Earliest,
    /// Only messages published from now on.
    Latest,
    /// This offset (clamped to what is retained).
    Offset(u64),
}

/// A subscribe request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscribe {
    /// The topic.
    pub topic: String,
    /// The subscriber's name.
    pub subscriber: String,
    /// Where to start. `None` resumes the committed offset, or starts at the oldest retained
    /// message for a new subscription.
    pub from: Option<StartFrom>,
    /// Stream messages to this connection as they are published.
    pub follow: Option<u64>,
}

/// How long a topic keeps messages. Every limit that is set applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// Keep at most this many messages.
    pub max_messages: Option<u64>,
    /// Keep at most this many payload bytes.
    pub max_bytes: Option<u64>,
    /// Drop messages older than this many seconds.
    pub max_age_secs: Option<u64>,
    /// Drop a message once every subscriber has pulled it.
    pub consumed: bool,
}

/// Default per-topic byte limit: 1 GiB.
pub const DEFAULT_RETENTION_BYTES: u64 = 1 << 30;

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_messages: None,
            max_bytes: Some(DEFAULT_RETENTION_BYTES),
            max_age_secs: None,
            consumed: false,
        }
    }
}

/// The smallest byte limit a topic may have: below it, a publish of one ordinary message
/// would be acknowledged and deleted in the same write.
pub const MIN_RETENTION_BYTES: u64 = 1024;

impl Retention {
    /// Refuses limits under which a publish would be acknowledged and deleted at once.
    pub fn validate(&self) -> Result<(), WireError> {
        let bad = |what: String| Err(WireError::new(ErrorCode::BadRequest, what));
        if self.max_messages == Some(0) {
            return bad(
                "retention of 0 messages would delete every message as it is stored; keep \
                 at least 1"
                    .into(),
            );
        }
        if let Some(b) = self.max_bytes
            && b < MIN_RETENTION_BYTES
        {
            return bad(format!(
                "retention of {b} bytes would delete messages as they are stored; keep at \
                 least {MIN_RETENTION_BYTES}"
            ));
        }
        if self.max_age_secs == Some(0) {
            return bad(
                "retention of 0 seconds would delete every message as it is stored; keep \
                 messages at least 1 s"
                    .into(),
            );
        }
        Ok(())
    }
}

/// Payloads packed into one buffer: `data` holds them back to back, `lens` their lengths.
/// Decoding copies the buffer out of the read buffer once per batch; single payloads are
/// then cheap slices of it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Batch {
    /// Length of each payload, in order.
    pub lens: Vec<u32>,
    /// The payloads, concatenated.
    pub data: Bytes,
}

impl Batch {
    /// Packs payloads into one batch.
    pub fn from_payloads<I, B>(payloads: I) -> Batch
    where
        I: IntoIterator<Item = B>,
        B: AsRef<[u8]>,
    {
        let mut lens = Vec::new();
        let mut data = Vec::new();
        for p in payloads {
            let p = p.as_ref();
            lens.push(p.len() as u32);
            data.extend_from_slice(p);
        }
        Batch {
            lens,
            data: Bytes::from(data),
        }
    }

    /// Number of payloads.
    pub fn len(&self) -> usize {
        self.lens.len()
    }

    /// True when the batch holds no payload.
    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    /// Checks that the lengths add up to the data, so slicing cannot panic.
    pub fn check(&self) -> Result<(), String> {
        let total: u64 = self.lens.iter().map(|&l| u64::from(l)).sum();
        if total != self.data.len() as u64 {
            return Err(format!(
                "batch lengths add up to {total} bytes but it carries {} bytes",
                self.data.len()
            ));
        }
        Ok(())
    }

    /// The payloads as slices of the shared buffer. Call [`Batch::check`] first on batches
    /// that came from the network.
    pub fn iter(&self) -> impl Iterator<Item = Bytes> + '_ {
        let mut at = 0usize;
        self.lens.iter().map(move |&l| {
            let end = at + l as usize;
            let b = self.data.slice(at..end);
            at = end;
            b
        })
    }
}

/// Consecutive messages of one topic, as delivered to subscribers.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MessageSet {
    /// The topic.
    pub topic: String,
    /// Offset of the first message; the others follow without gaps.
    pub first_offset: u64,
    /// Publish time of each message, milliseconds since the Unix epoch.
    pub timestamps: Vec<u64>,
    /// The payloads.
    pub batch: Batch,
}

impl MessageSet {
    /// Number of messages.
    pub fn len(&self) -> usize {
        self.batch.len()
    }

    /// True when no message is in the set.
    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }

    /// Offset one past the last message.
    pub fn next_offset(&self) -> u64 {
        self.first_offset + self.batch.len() as u64
    }

    /// The messages one by one.
    pub fn messages(&self) -> impl Iterator<Item = Message> + '_ {
        self.batch
            .iter()
            .zip(&self.timestamps)
            .enumerate()
            .map(|(i, (payload, &timestamp_ms))| Message {
                offset: self.first_offset + i as u64,
                timestamp_ms,
                payload,
            })
    }
}

/// One stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Position in the topic, from 0.
    pub offset: u64,
    /// Publish time, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// The bytes published.
    pub payload: Bytes,
}

/// A response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Done; nothing to report.
    Ok,
    /// Answer to [`Request::Ping`].
    Pong,
    /// Answer to [`Request::Register`].
    Registered {
        /// The peer's id (kept across re-registrations with the cookie).
        peer_id: u64,
        /// The secret to present with keepalive, leave and changes made in the peer's name.
        cookie: String,
        /// Lease length in seconds.
        ttl_secs: u64,
        /// Registrations in the last 30 days, this one included.
        registrations: u32,
    },
    /// Answer to [`Request::ListPeers`].
    Peers(Vec<PeerInfo>),
    /// Where a topic lives (lookup and create).
    Location(TopicLocation),
    /// Answer to [`Request::ListTopics`].
    Topics(Vec<TopicLocation>),
    /// Answer to [`Request::Publish`]: the batch got offsets `first_offset..first_offset+count`.
    Published {
        /// Offset of the batch's first message.
        first_offset: u64,
        /// Number of messages stored.
        count: u32,
    },
    /// Answer to [`Request::Subscribe`].
    Subscribed {
        /// The offset the subscriber reads next.
        next_offset: u64,
    },
    /// Answer to [`Request::Pull`].
    Messages(MessageSet),
    /// Answer to [`Request::Subscribers`].
    Subscribers(Vec<SubscriberInfo>),
    /// Answer to [`Request::TopicStats`].
    TopicStats(TopicStats),
    /// Answer to [`Request::SearchFiles`] and [`Request::LookupFile`].
    Files(Vec<FileHit>),
    /// Answer to [`Request::FileManifest`].
    Manifest(Manifest),
    /// Answer to [`Request::ReadPiece`]: the piece's bytes (decoded into a reused
    /// buffer, see [`crate::pool`]).
    Piece(#[serde(deserialize_with = "crate::pool::deserialize")] Bytes),
    /// Answer to [`Request::Fetch`].
    Fetched(FetchReport),
    /// Answer to [`Request::ListParticipants`]: the names, sorted.
    Participants(Vec<String>),
    /// Answer to [`Request::CreateTopics`]: how many topics each host took.
    Created(Vec<CreatedOn>),
    /// Answer to [`Request::NodeStats`].
    NodeStats(NodeTotals),
}

/// Totals over the topics one peer hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NodeTotals {
    /// Topics hosted.
    pub topics: u64,
    /// Durable subscribers, summed over the topics.
    pub subscribers: u64,
    /// Messages retained.
    pub messages: u64,
    /// Payload bytes retained.
    pub bytes: u64,
}

/// How many topics of a [`Request::CreateTopics`] one peer now hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedOn {
    /// Id of the hosting peer.
    pub peer_id: u64,
    /// Name of the hosting peer.
    pub peer_name: String,
    /// Binary protocol address of the hosting peer.
    pub addr: String,
    /// Number of topics it created.
    pub count: u64,
}

/// A file a peer offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to the share directory, `/`-separated.
    pub name: String,
    /// BLAKE3 hash of the content, hex.
    pub hash: String,
    /// Size in bytes.
    pub size: u64,
}

/// A peer holding a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileHolder {
    /// The peer's id.
    pub peer_id: u64,
    /// The peer's name.
    pub name: String,
    /// The peer's binary protocol address.
    pub addr: String,
}

/// A file and the live peers holding it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileHit {
    /// Name (as the first holder calls it).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// BLAKE3 hash, hex.
    pub hash: String,
    /// Who holds it.
    pub peers: Vec<FileHolder>,
}

/// A file's BLAKE3 hash tree cut at pieces: enough to verify each piece on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// BLAKE3 hash of the whole file, hex.
    pub hash: String,
    /// Size in bytes.
    pub size: u64,
    /// Bytes per piece (a power of two, at least 1024); the last piece may be shorter.
    pub piece_len: u32,
    /// The BLAKE3 chaining value of every piece, in order.
    pub pieces: Vec<[u8; 32]>,
}

/// What a peer's download produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchReport {
    /// The file's name.
    pub name: String,
    /// BLAKE3 hash, hex.
    pub hash: String,
    /// Size in bytes.
    pub size: u64,
    /// Names of the peers that supplied pieces.
    pub sources: Vec<String>,
    /// Where the peer keeps it, inside its share (for people; no request takes a path).
    pub path: String,
}

/// A peer as the index knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// Id given by the index.
    pub id: u64,
    /// Human name.
    pub name: String,
    /// Binary protocol address.
    pub addr: String,
    /// HTTP address, if any.
    pub http: Option<String>,
    /// Holds a live lease.
    pub active: bool,
    /// Registrations in the last 30 days.
    pub registrations: u32,
    /// Time of the last registration, milliseconds since the Unix epoch.
    pub last_registered_ms: u64,
    /// Milliseconds of lease left (0 when inactive).
    pub ttl_left_ms: u64,
    /// Topics it hosts.
    pub topics: u32,
    /// Files it offers.
    pub files: u32,
}

/// A topic and the peer hosting it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicLocation {
    /// The topic.
    pub topic: String,
    /// Id of the hosting peer.
    pub peer_id: u64,
    /// Name of the hosting peer.
    pub peer_name: String,
    /// Binary protocol address of the hosting peer.
    pub addr: String,
}

/// A subscriber of a topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriberInfo {
    /// The subscriber's name.
    pub name: String,
    /// The offset it reads next.
    pub next_offset: u64,
}

/// A topic as its host sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicStats {
    /// The topic.
    pub topic: String,
    /// Oldest retained offset.
    pub first_offset: u64,
    /// Offset the next message will get.
    pub next_offset: u64,
    /// Payload bytes retained.
    pub bytes: u64,
    /// Number of subscribers.
    pub subscribers: u32,
    /// Retention policy.
    pub retention: Retention,
}

/// Error classes. The numeric code on the wire is the variant index; keep the order stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The named topic, peer, subscriber or file does not exist.
    NotFound,
    /// It exists already.
    Exists,
    /// The request is malformed or a name is invalid.
    BadRequest,
    /// Missing or wrong token or cookie.
    Unauthorized,
    /// This peer does not host the topic (answered when forwarding is off).
    NotHost,
    /// A needed node cannot be reached right now.
    Unavailable,
    /// A bug or storage failure on the node.
    Internal,
    /// A frame or payload is over the limit.
    TooLarge,
    /// Unknown protocol version or a request this node kind does not serve.
    Unsupported,
    /// A per-topic, per-connection or per-node limit is reached (producers, subscribers,
    /// participants); trying again later, or with fewer, may work.
    LimitReached,
    /// An idempotent producer the host does not know sent a batch past its first sequence
    /// (its state expired, or the topic was made again): nothing was stored, and the
    /// producer should start again under a new id.
    UnknownProducer,
}

/// An error answer: a class for programs and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    /// The class.
    pub code: ErrorCode,
    /// What went wrong and why.
    pub message: String,
}

impl WireError {
    /// Builds an error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError {
            code,
            message: message.into(),
        }
    }

    /// `topic 'NAME' not found`.
    pub fn topic_not_found(topic: &str) -> Self {
        Self::new(ErrorCode::NotFound, format!("topic '{topic}' not found"))
    }
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for WireError {}

impl From<crate::NameError> for WireError {
    fn from(e: crate::NameError) -> Self {
        WireError::new(ErrorCode::BadRequest, e.to_string())
    }
}
