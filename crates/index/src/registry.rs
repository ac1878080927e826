//! The index's state: peers with their leases, the topic directory and the file directory.
//!
//! Nothing here reads a clock, touches the network or the disk. Every operation takes the
//! current time as `now_ms` (milliseconds since the Unix epoch) and returns the [`Change`]s
//! it made, so the caller decides how to persist them and tests can drive time by hand.
//!
//! Invariant kept by the caller: [`Registry::expire`] runs with the same `now_ms` before any
//! other operation, so the `active` flag is the whole truth about liveness and no other
//! method has to compare deadlines.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use peerbus_proto::{
    ErrorCode, FileEntry, FileHit, FileHolder, PeerAuth, PeerInfo, RegisterPeer, TopicLocation,
    WireError, validate_peer_name, validate_topic,
};
use serde::{Deserialize, Serialize};

/// Registrations older than this no longer count in a peer's registration total.
pub(crate) const REGISTRATION_WINDOW_MS: u64 = 30 * 24 * 60 * 60 * 1000;

/// A peer as persisted (`Table::Peers`, postcard). Its topics are not part of it: they live
/// in the directory table, one entry per topic, so announcing a topic writes one small entry
/// instead of rewriting a record that may list a million topics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PeerRecord {
    pub name: String,
    pub addr: String,
    pub http: Option<String>,
    pub cookie: String,
    /// Lease deadline on the wall clock, so a quickly restarted index still honours it.
    pub expires_ms: u64,
    pub active: bool,
    /// Times of the registrations of the last 30 days, oldest first (at most
    /// [`MAX_REGISTRATIONS_KEPT`]).
    pub registrations: Vec<u64>,
    pub last_registered_ms: u64,
    /// The peer saves its identity, so its name is kept for it for [`NAME_GRACE_MS`] after
    /// its lease ends.
    pub keeps_identity: bool,
}

/// [`PeerRecord`] as stored before peers said whether they keep their identity.
#[derive(Debug, Deserialize)]
struct LegacyPeerRecord {
    name: String,
    addr: String,
    http: Option<String>,
    cookie: String,
    expires_ms: u64,
    active: bool,
    registrations: Vec<u64>,
    last_registered_ms: u64,
}

impl PeerRecord {
    /// Decodes a stored record, also in its earlier form (whose peers then count as not
    /// keeping their identity, as the index treated them then).
    pub fn decode(v: &[u8]) -> Result<PeerRecord, postcard::Error> {
        postcard::from_bytes(v).or_else(|e| {
            let old: LegacyPeerRecord = postcard::from_bytes(v).map_err(|_| e)?;
            Ok(PeerRecord {
                name: old.name,
                addr: old.addr,
                http: old.http,
                cookie: old.cookie,
                expires_ms: old.expires_ms,
                active: old.active,
                registrations: old.registrations,
                last_registered_ms: old.last_registered_ms,
                keeps_identity: false,
            })
        })
    }
}

/// How long the name of a peer that keeps its identity stays reserved for it after its
/// lease ends (it is restarting, or down for maintenance): a newcomer under that name is
/// refused meanwhile, so nobody can take over a resting peer's name and its topics.
pub(crate) const NAME_GRACE_MS: u64 = 24 * 60 * 60 * 1000;

/// How long the index remembers a peer whose lease ended: its identity, cookie and
/// registration count. After that its record goes, and its name is free.
pub(crate) const RECORD_RETENTION_MS: u64 = REGISTRATION_WINDOW_MS;

/// Registration times one record keeps at most, so a peer that restarts in a loop does not
/// grow its record (written again on every keepalive) without bound.
pub(crate) const MAX_REGISTRATIONS_KEPT: usize = 1000;

/// One modification of the registry, for the caller to persist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// Peer `id` now has this record.
    Peer(u64, PeerRecord),
    /// Peer `id` is forgotten.
    PeerRemoved(u64),
    /// The topic is hosted by this peer.
    Topic(String, u64),
    /// The topic left the directory.
    TopicRemoved(String),
    /// The next fresh peer id.
    NextId(u64),
    /// Peer `id` offers this file (replacing what it said before about the same hash).
    File(u64, FileEntry),
    /// Peer `id` no longer offers the file with this hash.
    FileRemoved(u64, String),
}

/// What a successful registration handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Registration {
    pub peer_id: u64,
    pub cookie: String,
    /// Registrations in the last 30 days, this one included.
    pub registrations: u32,
    /// True when an existing identity was resumed with its cookie.
    pub resumed: bool,
    /// The inactive peer that held the name before and was dropped to free it.
    pub replaced: Option<u64>,
}

/// A peer whose lease ran out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Expired {
    pub id: u64,
    pub name: String,
    /// Topics it lost.
    pub topics: usize,
    /// Files it no longer offers.
    pub files: usize,
}

/// A peer that left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Left {
    pub name: String,
    /// Topics withdrawn with it.
    pub topics: usize,
    /// Files withdrawn with it.
    pub files: usize,
}

/// How a `RegisterFiles` or `UnregisterFiles` changed a peer's file list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct FileDiff {
    pub name: String,
    /// Hashes new to the peer.
    pub added: usize,
    /// Hashes the peer already offered under another name or size.
    pub updated: usize,
    /// Hashes the peer no longer offers.
    pub removed: usize,
    /// Files the peer offers now.
    pub total: usize,
}

/// A file held by fewer live peers than the replication factor asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Shortfall {
    pub hash: String,
    /// Its live holders, by id.
    pub holders: Vec<u64>,
}

/// How an announce changed a peer's topic set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct TopicDiff {
    pub name: String,
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

/// Valid topic names, sorted and without duplicates. Built before taking the registry lock,
/// so validating and sorting a large announce does not hold up other requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TopicSet(Vec<String>);

impl TopicSet {
    /// Checks every name; the first invalid one fails the whole set.
    pub fn new(mut topics: Vec<String>) -> Result<Self, WireError> {
        for t in &topics {
            validate_topic(t)?;
        }
        topics.sort_unstable();
        topics.dedup();
        Ok(TopicSet(topics))
    }

    /// Like [`TopicSet::new`], but a name listed twice is an error too: a request to create
    /// topics names each once.
    pub fn distinct(mut topics: Vec<String>) -> Result<Self, WireError> {
        for t in &topics {
            validate_topic(t)?;
        }
        topics.sort_unstable();
        if let Some(w) = topics.windows(2).find(|w| w[0] == w[1]) {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                format!("topic '{}' is listed twice", w[0]),
            ));
        }
        Ok(TopicSet(topics))
    }

    /// Number of topics.
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

pub(crate) use peerbus_proto::is_hash;

/// At most this much of a client-supplied string is quoted back in an error, so a garbage
/// megabyte-long "hash" does not come back as a megabyte-long message.
const QUOTED_CHARS: usize = 80;

fn quoted(s: &str) -> String {
    let mut q: String = s.chars().take(QUOTED_CHARS).collect();
    if q.len() < s.len() {
        q.push('…');
    }
    q
}

/// Valid file entries with lowercase hashes, sorted by hash, one per hash (the first one
/// listed wins). Built before taking the registry lock, like [`TopicSet`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileSet(Vec<FileEntry>);

impl FileSet {
    /// Checks every entry; the first invalid one fails the whole set.
    pub fn new(mut files: Vec<FileEntry>) -> Result<Self, WireError> {
        for f in &mut files {
            if !is_hash(&f.hash) {
                return Err(WireError::new(
                    ErrorCode::BadRequest,
                    format!(
                        "file '{}': hash '{}' is not a BLAKE3 hash (64 hex digits)",
                        quoted(&f.name),
                        quoted(&f.hash)
                    ),
                ));
            }
            if f.name.is_empty() {
                return Err(WireError::new(
                    ErrorCode::BadRequest,
                    format!("file with hash {} has an empty name", f.hash),
                ));
            }
            // Hashes are compared as strings: one spelling, so `AB…` and `ab…` are one file.
            f.hash.make_ascii_lowercase();
        }
        // A stable sort keeps the first of equal hashes first, which dedup then keeps.
        files.sort_by(|a, b| a.hash.cmp(&b.hash));
        files.dedup_by(|later, earlier| later.hash == earlier.hash);
        Ok(FileSet(files))
    }
}

/// Forgets that `id` holds `hash`, dropping the hash once nobody holds it, so the map
/// only ever lists files someone offers.
fn drop_holding(files: &mut HashMap<String, BTreeMap<u64, FileEntry>>, id: u64, hash: &str) {
    if let Some(holders) = files.get_mut(hash) {
        holders.remove(&id);
        if holders.is_empty() {
            files.remove(hash);
        }
    }
}

fn file_not_found(key: &str) -> WireError {
    WireError::new(
        ErrorCode::NotFound,
        format!("file '{}' not found", quoted(key)),
    )
}

fn no_live_holder(key: &str) -> WireError {
    WireError::new(
        ErrorCode::NotFound,
        format!("file '{}' has no live holder", quoted(key)),
    )
}

/// The peer a request should go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Host {
    pub id: u64,
    pub name: String,
    pub addr: String,
}

#[derive(Debug)]
struct Peer {
    rec: PeerRecord,
    topics: BTreeSet<String>,
    /// Hashes of the files it offers; sorted so a `replace` diff is one merge pass. The
    /// entries themselves live in [`Registry::files`].
    files: BTreeSet<String>,
}

/// Peers, leases and the topic directory.
#[derive(Debug)]
pub(crate) struct Registry {
    ttl_ms: u64,
    next_id: u64,
    peers: BTreeMap<u64, Peer>,
    /// Peer names are unique among all known peers, active or not.
    names: HashMap<String, u64>,
    /// `(expires_ms, id)` of active peers, so expiry only looks at the peers that are due
    /// and can run before every request for the cost of one comparison.
    leases: BTreeSet<(u64, u64)>,
    /// `(expires_ms, id)` of inactive peers, oldest first, so forgetting them after
    /// [`RECORD_RETENTION_MS`] only looks at the ones that are due.
    resting: BTreeSet<(u64, u64)>,
    /// A BTreeMap so listing by prefix is a range scan, whatever the number of topics.
    directory: BTreeMap<String, u64>,
    /// File hash → holder id → the holder's entry. Only live peers hold files (leaving and
    /// expiry withdraw them), so finding a file's holders by hash is one lookup however
    /// many files there are; searching by name scans.
    files: HashMap<String, BTreeMap<u64, FileEntry>>,
    /// Chunked topic and file syncs under way, by peer id.
    syncs: HashMap<u64, sync::Passes>,
}

mod sync;

fn unauthorized(id: u64) -> WireError {
    WireError::new(
        ErrorCode::Unauthorized,
        format!("wrong cookie for peer {id}"),
    )
}

fn topic_exists(topic: &str, holder: &str) -> WireError {
    WireError::new(
        ErrorCode::Exists,
        format!("topic '{topic}' exists on peer {holder}"),
    )
}

/// Picks the host of a new topic among `(peer id, topics hosted)` of the live peers: the
/// least loaded, the lowest id among equals, so placement is deterministic and spreads
/// topics evenly.
pub(crate) fn place(candidates: impl IntoIterator<Item = (u64, usize)>) -> Option<u64> {
    candidates
        .into_iter()
        .min_by_key(|&(id, load)| (load, id))
        .map(|(id, _)| id)
}

/// How many of `count` new topics each of the `(peer id, topics hosted)` peers takes so
/// that the loads end up as even as they can: like placing the topics one by one with
/// [`place`], in one pass. Returned in the order of `loads`.
pub(crate) fn spread(loads: &[(u64, usize)], count: usize) -> Vec<(u64, usize)> {
    let mut order: Vec<usize> = (0..loads.len()).collect();
    order.sort_by_key(|&i| (loads[i].1, loads[i].0));
    // Raise the water level over the least loaded peers until the topics run out.
    let mut left = count;
    let mut level = 0;
    let mut filled = 0;
    for (k, &i) in order.iter().enumerate() {
        let load = loads[i].1;
        let next = order.get(k + 1).map(|&j| loads[j].1);
        filled = k + 1;
        let width = filled;
        let cap = match next {
            Some(n) => (n - load) * width,
            None => usize::MAX,
        };
        if left <= cap {
            level = load + left / width;
            break;
        }
        left -= cap;
        level = next.unwrap_or(load);
    }
    let mut shares: Vec<usize> = vec![0; loads.len()];
    let mut given = 0;
    for &i in &order[..filled] {
        let n = level.saturating_sub(loads[i].1);
        shares[i] = n;
        given += n;
    }
    // The remainder goes one each to the peers at the level with the lowest ids, as
    // `place` would pick them.
    let mut rest = count - given;
    let mut at_level = order[..filled].to_vec();
    at_level.sort_by_key(|&i| loads[i].0);
    for i in at_level {
        if rest == 0 {
            break;
        }
        shares[i] += 1;
        rest -= 1;
    }
    loads.iter().map(|&(id, _)| id).zip(shares).collect()
}

impl Registry {
    /// An empty registry whose leases last `ttl_ms`.
    pub fn new(ttl_ms: u64) -> Self {
        Registry {
            ttl_ms,
            next_id: 1,
            peers: BTreeMap::new(),
            names: HashMap::new(),
            leases: BTreeSet::new(),
            resting: BTreeSet::new(),
            directory: BTreeMap::new(),
            files: HashMap::new(),
            syncs: HashMap::new(),
        }
    }

    /// Rebuilds the registry from what was persisted. Directory and file entries that
    /// cannot stand (their peer is unknown or inactive) are dropped, and so is a second peer
    /// claiming a name already taken; the returned changes remove them from storage too.
    pub fn load(
        ttl_ms: u64,
        next_id: u64,
        peers: impl IntoIterator<Item = (u64, PeerRecord)>,
        directory: impl IntoIterator<Item = (String, u64)>,
        files: impl IntoIterator<Item = (u64, FileEntry)>,
    ) -> (Self, Vec<Change>) {
        let mut reg = Registry::new(ttl_ms);
        let mut changes = Vec::new();
        reg.next_id = next_id.max(1);
        for (id, rec) in peers {
            if reg.names.contains_key(&rec.name) {
                changes.push(Change::PeerRemoved(id));
                continue;
            }
            reg.next_id = reg.next_id.max(id.saturating_add(1));
            reg.names.insert(rec.name.clone(), id);
            if rec.active {
                reg.leases.insert((rec.expires_ms, id));
            } else {
                reg.resting.insert((rec.expires_ms, id));
            }
            reg.peers.insert(
                id,
                Peer {
                    rec,
                    topics: BTreeSet::new(),
                    files: BTreeSet::new(),
                },
            );
        }
        for (topic, id) in directory {
            match reg.peers.get_mut(&id) {
                Some(p) if p.rec.active => {
                    p.topics.insert(topic.clone());
                    reg.directory.insert(topic, id);
                }
                _ => changes.push(Change::TopicRemoved(topic)),
            }
        }
        for (id, entry) in files {
            match reg.peers.get_mut(&id) {
                Some(p) if p.rec.active => {
                    p.files.insert(entry.hash.clone());
                    reg.files
                        .entry(entry.hash.clone())
                        .or_default()
                        .insert(id, entry);
                }
                _ => changes.push(Change::FileRemoved(id, entry.hash)),
            }
        }
        (reg, changes)
    }

    /// Number of known peers, of directory entries and of offered files (a file offered
    /// by two peers counts twice).
    pub fn counts(&self) -> (usize, usize, usize) {
        let files = self.files.values().map(BTreeMap::len).sum();
        (self.peers.len(), self.directory.len(), files)
    }

    fn check_cookie(&self, auth: &PeerAuth) -> Result<&Peer, WireError> {
        let peer = self.peers.get(&auth.peer_id).ok_or_else(|| {
            WireError::new(
                ErrorCode::NotFound,
                format!("peer {} is not registered; register again", auth.peer_id),
            )
        })?;
        if !peerbus_proto::same_secret(peer.rec.cookie.as_bytes(), auth.cookie.as_bytes()) {
            return Err(unauthorized(auth.peer_id));
        }
        Ok(peer)
    }

    /// The cookie must match and the lease must be live: what every action taken in a
    /// peer's name requires.
    fn check_live(&self, auth: &PeerAuth) -> Result<&Peer, WireError> {
        let peer = self.check_cookie(auth)?;
        if !peer.rec.active {
            return Err(WireError::new(
                ErrorCode::NotFound,
                format!("lease of peer {} expired; register again", auth.peer_id),
            ));
        }
        Ok(peer)
    }

    fn peer_change(&self, id: u64) -> Change {
        Change::Peer(id, self.peers[&id].rec.clone())
    }

    /// Registers a peer, or resumes its identity when `previous` carries a known id with
    /// its cookie. `new_cookie` is used only when a new identity is made; it is a parameter
    /// so this stays free of randomness.
    pub fn register(
        &mut self,
        req: &RegisterPeer,
        new_cookie: String,
        now_ms: u64,
    ) -> Result<(Registration, Vec<Change>), WireError> {
        validate_peer_name(&req.name)?;
        let resume = match &req.previous {
            Some(auth) => match self.peers.get(&auth.peer_id) {
                Some(p)
                    if peerbus_proto::same_secret(
                        p.rec.cookie.as_bytes(),
                        auth.cookie.as_bytes(),
                    ) =>
                {
                    Some(auth.peer_id)
                }
                Some(_) => return Err(unauthorized(auth.peer_id)),
                // The index lost this identity (its data was reset): the peer gets a new one
                // rather than an error it cannot recover from.
                None => None,
            },
            None => None,
        };
        let mut replaced = None;
        if let Some(&holder) = self.names.get(&req.name)
            && Some(holder) != resume
        {
            let h = &self.peers[&holder].rec;
            if h.active {
                return Err(WireError::new(
                    ErrorCode::Exists,
                    format!(
                        "peer name '{}' is taken by active peer {holder} at {}",
                        req.name, h.addr
                    ),
                ));
            }
            let kept_until = h.expires_ms.saturating_add(NAME_GRACE_MS);
            if h.keeps_identity && now_ms < kept_until {
                return Err(WireError::new(
                    ErrorCode::Exists,
                    format!(
                        "peer name '{}' is kept for peer {holder}, whose lease ended {} s ago, \
                         for another {} s: start that peer again with its data directory \
                         (it keeps its identity there), or choose another name",
                        req.name,
                        now_ms.saturating_sub(h.expires_ms) / 1000,
                        (kept_until - now_ms).div_ceil(1000)
                    ),
                ));
            }
            replaced = Some(holder);
        }

        // Every check has passed: from here on the registration happens.
        let mut changes = Vec::new();
        if let Some(old) = replaced {
            self.forget_peer(old, &mut changes);
        }
        let expires_ms = now_ms.saturating_add(self.ttl_ms);
        let id = match resume {
            Some(id) => {
                let peer = self.peers.get_mut(&id).expect("resumed peer exists");
                if peer.rec.active {
                    self.leases.remove(&(peer.rec.expires_ms, id));
                } else {
                    self.resting.remove(&(peer.rec.expires_ms, id));
                }
                if peer.rec.name != req.name {
                    self.names.remove(&peer.rec.name);
                    self.names.insert(req.name.clone(), id);
                }
                let rec = &mut peer.rec;
                rec.name.clone_from(&req.name);
                rec.addr.clone_from(&req.addr);
                rec.http.clone_from(&req.http);
                rec.expires_ms = expires_ms;
                rec.active = true;
                rec.registrations
                    .retain(|&t| now_ms.saturating_sub(t) < REGISTRATION_WINDOW_MS);
                rec.registrations.push(now_ms);
                if rec.registrations.len() > MAX_REGISTRATIONS_KEPT {
                    rec.registrations.remove(0);
                }
                rec.last_registered_ms = now_ms;
                rec.keeps_identity = req.keeps_identity;
                id
            }
            None => {
                let id = self.next_id;
                self.next_id += 1;
                changes.push(Change::NextId(self.next_id));
                self.names.insert(req.name.clone(), id);
                self.peers.insert(
                    id,
                    Peer {
                        rec: PeerRecord {
                            name: req.name.clone(),
                            addr: req.addr.clone(),
                            http: req.http.clone(),
                            cookie: new_cookie,
                            expires_ms,
                            active: true,
                            registrations: vec![now_ms],
                            last_registered_ms: now_ms,
                            keeps_identity: req.keeps_identity,
                        },
                        topics: BTreeSet::new(),
                        files: BTreeSet::new(),
                    },
                );
                id
            }
        };
        self.leases.insert((expires_ms, id));
        changes.push(self.peer_change(id));
        let rec = &self.peers[&id].rec;
        let registration = Registration {
            peer_id: id,
            cookie: rec.cookie.clone(),
            registrations: u32::try_from(rec.registrations.len()).unwrap_or(u32::MAX),
            resumed: resume.is_some(),
            replaced,
        };
        Ok((registration, changes))
    }

    /// Renews a live lease until `now_ms + ttl`.
    pub fn keepalive(&mut self, auth: &PeerAuth, now_ms: u64) -> Result<Vec<Change>, WireError> {
        let old = self.check_live(auth)?.rec.expires_ms;
        let id = auth.peer_id;
        let expires_ms = now_ms.saturating_add(self.ttl_ms);
        self.leases.remove(&(old, id));
        self.leases.insert((expires_ms, id));
        self.peers
            .get_mut(&id)
            .expect("authenticated peer exists")
            .rec
            .expires_ms = expires_ms;
        Ok(vec![self.peer_change(id)])
    }

    /// Marks the peer inactive at once and withdraws all its topics and files. Leaving
    /// twice is fine.
    pub fn leave(&mut self, auth: &PeerAuth) -> Result<(Left, Vec<Change>), WireError> {
        let name = self.check_cookie(auth)?.rec.name.clone();
        let mut changes = Vec::new();
        let (topics, files) = self.deactivate(auth.peer_id, &mut changes);
        Ok((
            Left {
                name,
                topics,
                files,
            },
            changes,
        ))
    }

    /// Ends every lease due by `now_ms` (a deadline equal to `now_ms` is due): those peers
    /// become inactive and lose their topics and files. Also forgets the peers whose lease
    /// ended more than [`RECORD_RETENTION_MS`] ago.
    pub fn expire(&mut self, now_ms: u64) -> (Vec<Expired>, Vec<Change>) {
        let mut expired = Vec::new();
        let mut changes = Vec::new();
        while let Some(&(ended, id)) = self.resting.first() {
            if ended.saturating_add(RECORD_RETENTION_MS) > now_ms {
                break;
            }
            tracing::info!(
                "forgetting peer {id} ({}): its lease ended over 30 days ago",
                self.peers[&id].rec.name
            );
            self.forget_peer(id, &mut changes);
        }
        while let Some(&(deadline, id)) = self.leases.first() {
            if deadline > now_ms {
                break;
            }
            let (topics, files) = self.deactivate(id, &mut changes);
            expired.push(Expired {
                id,
                name: self.peers[&id].rec.name.clone(),
                topics,
                files,
            });
        }
        (expired, changes)
    }

    /// Returns the numbers of topics and files withdrawn.
    fn deactivate(&mut self, id: u64, changes: &mut Vec<Change>) -> (usize, usize) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return (0, 0);
        };
        if !peer.rec.active && peer.topics.is_empty() && peer.files.is_empty() {
            return (0, 0);
        }
        self.leases.remove(&(peer.rec.expires_ms, id));
        peer.rec.active = false;
        self.resting.insert((peer.rec.expires_ms, id));
        let topics = std::mem::take(&mut peer.topics);
        let topic_count = topics.len();
        for t in topics {
            self.directory.remove(&t);
            changes.push(Change::TopicRemoved(t));
        }
        let files = std::mem::take(&mut peer.files);
        let file_count = files.len();
        for hash in files {
            drop_holding(&mut self.files, id, &hash);
            changes.push(Change::FileRemoved(id, hash));
        }
        changes.push(self.peer_change(id));
        (topic_count, file_count)
    }

    fn forget_peer(&mut self, id: u64, changes: &mut Vec<Change>) {
        self.deactivate(id, changes);
        if let Some(peer) = self.peers.remove(&id) {
            self.resting.remove(&(peer.rec.expires_ms, id));
            self.names.remove(&peer.rec.name);
            changes.retain(|c| !matches!(c, Change::Peer(p, _) if *p == id));
            changes.push(Change::PeerRemoved(id));
        }
    }

    /// The peer claims `topics`. All or nothing: a topic held by another peer fails the
    /// whole request before anything changes. With `replace`, topics the peer held but no
    /// longer lists are withdrawn.
    ///
    /// With `replace`, both sets are sorted, so the diff is one merge pass and only topics
    /// new to the peer are looked up in the directory: a peer re-announcing a million
    /// unchanged topics costs a linear walk, not a million lookups. Without, each listed
    /// topic is one directory lookup, so claiming a few topics costs nothing like a walk
    /// over everything the peer already holds.
    pub fn announce(
        &mut self,
        auth: &PeerAuth,
        topics: &TopicSet,
        replace: bool,
    ) -> Result<(TopicDiff, Vec<Change>), WireError> {
        let peer = self.check_live(auth)?;
        let id = auth.peer_id;
        let mut added = Vec::new();
        let mut removed = Vec::new();
        if replace {
            let mut held = peer.topics.iter().peekable();
            for t in &topics.0 {
                while let Some(&h) = held.peek()
                    && h < t
                {
                    removed.push(h.clone());
                    held.next();
                }
                if held.peek() == Some(&t) {
                    held.next();
                } else {
                    // Not the peer's, so any directory entry belongs to another peer.
                    if let Some(&holder) = self.directory.get(t) {
                        return Err(topic_exists(t, &self.peers[&holder].rec.name));
                    }
                    added.push(t.clone());
                }
            }
            removed.extend(held.cloned());
        } else {
            for t in &topics.0 {
                match self.directory.get(t) {
                    Some(&holder) if holder == id => {}
                    Some(&holder) => return Err(topic_exists(t, &self.peers[&holder].rec.name)),
                    None => added.push(t.clone()),
                }
            }
        }
        let name = peer.rec.name.clone();

        let mut changes = Vec::with_capacity(added.len() + removed.len());
        let peer = self.peers.get_mut(&id).expect("authenticated peer exists");
        for t in &removed {
            peer.topics.remove(t);
            self.directory.remove(t);
            changes.push(Change::TopicRemoved(t.clone()));
        }
        for t in &added {
            peer.topics.insert(t.clone());
            self.directory.insert(t.clone(), id);
            changes.push(Change::Topic(t.clone(), id));
        }
        Ok((
            TopicDiff {
                name,
                added,
                removed,
            },
            changes,
        ))
    }

    /// The peer gives up those of `topics` it holds; the others are ignored.
    pub fn withdraw(
        &mut self,
        auth: &PeerAuth,
        topics: &[String],
    ) -> Result<(TopicDiff, Vec<Change>), WireError> {
        let name = self.check_cookie(auth)?.rec.name.clone();
        let peer = self
            .peers
            .get_mut(&auth.peer_id)
            .expect("authenticated peer exists");
        let mut removed = Vec::new();
        let mut changes = Vec::new();
        for t in topics {
            if peer.topics.remove(t) {
                self.directory.remove(t);
                changes.push(Change::TopicRemoved(t.clone()));
                removed.push(t.clone());
            }
        }
        Ok((
            TopicDiff {
                name,
                added: Vec::new(),
                removed,
            },
            changes,
        ))
    }

    fn location(&self, topic: &str, id: u64) -> Option<TopicLocation> {
        let peer = self.peers.get(&id).filter(|p| p.rec.active)?;
        Some(TopicLocation {
            topic: topic.to_string(),
            peer_id: id,
            peer_name: peer.rec.name.clone(),
            addr: peer.rec.addr.clone(),
        })
    }

    /// Where `topic` is hosted, if a live peer hosts it.
    pub fn lookup(&self, topic: &str) -> Result<TopicLocation, WireError> {
        self.directory
            .get(topic)
            .and_then(|&id| self.location(topic, id))
            .ok_or_else(|| WireError::topic_not_found(topic))
    }

    /// Topics of live peers starting with `prefix`, in name order.
    /// One page of the topics starting with `prefix`, after `after`, in name order: at
    /// most [`peerbus_proto::LIST_PAGE`].
    pub fn list_topics(&self, prefix: Option<&str>, after: Option<&str>) -> Vec<TopicLocation> {
        let prefix = prefix.unwrap_or("");
        let start = match after {
            Some(a) if a >= prefix => std::ops::Bound::Excluded(a),
            _ => std::ops::Bound::Included(prefix),
        };
        self.directory
            .range::<str, _>((start, std::ops::Bound::Unbounded))
            .take_while(|(t, _)| t.starts_with(prefix))
            .filter_map(|(t, &id)| self.location(t, id))
            .take(peerbus_proto::LIST_PAGE)
            .collect()
    }

    /// Every known peer, by id.
    pub fn list_peers(&self, after: Option<u64>, now_ms: u64) -> Vec<PeerInfo> {
        let from = match after {
            Some(id) => std::ops::Bound::Excluded(id),
            None => std::ops::Bound::Unbounded,
        };
        self.peers
            .range((from, std::ops::Bound::Unbounded))
            .take(peerbus_proto::PEER_PAGE)
            .map(|(&id, p)| {
                let rec = &p.rec;
                let recent = rec
                    .registrations
                    .iter()
                    .filter(|&&t| now_ms.saturating_sub(t) < REGISTRATION_WINDOW_MS)
                    .count();
                PeerInfo {
                    id,
                    name: rec.name.clone(),
                    addr: rec.addr.clone(),
                    http: rec.http.clone(),
                    active: rec.active,
                    registrations: u32::try_from(recent).unwrap_or(u32::MAX),
                    last_registered_ms: rec.last_registered_ms,
                    ttl_left_ms: if rec.active {
                        rec.expires_ms.saturating_sub(now_ms)
                    } else {
                        0
                    },
                    topics: u32::try_from(p.topics.len()).unwrap_or(u32::MAX),
                    files: u32::try_from(p.files.len()).unwrap_or(u32::MAX),
                }
            })
            .collect()
    }

    /// The live peer that should create `topic`: the one named by `peer` (its name or its
    /// address), or the least loaded.
    pub fn plan_create(&self, topic: &str, peer: Option<&str>) -> Result<Host, WireError> {
        validate_topic(topic)?;
        if let Some(&holder) = self.directory.get(topic) {
            return Err(topic_exists(topic, &self.peers[&holder].rec.name));
        }
        let live = self.peers.iter().filter(|(_, p)| p.rec.active);
        let id = match peer {
            Some(wanted) => live
                .filter(|(_, p)| p.rec.name == wanted || p.rec.addr == wanted)
                .map(|(&id, _)| id)
                .next()
                .ok_or_else(|| {
                    WireError::new(
                        ErrorCode::NotFound,
                        format!("peer '{wanted}' not found or not active"),
                    )
                })?,
            None => place(live.map(|(&id, p)| (id, p.topics.len()))).ok_or_else(|| {
                WireError::new(
                    ErrorCode::Unavailable,
                    format!("no active peer to host topic '{topic}'"),
                )
            })?,
        };
        let rec = &self.peers[&id].rec;
        Ok(Host {
            id,
            name: rec.name.clone(),
            addr: rec.addr.clone(),
        })
    }

    /// Where each topic of `topics` should be created: on the live peer named by `peer`
    /// (its name or its address), or spread over the live peers so their topic counts end
    /// up as even as they can (the least loaded fill first, lower ids first among equals).
    /// Each host gets a contiguous run of the sorted names. Fails, changing nothing, when
    /// any of the topics exists already.
    pub fn plan_create_many(
        &self,
        topics: TopicSet,
        peer: Option<&str>,
    ) -> Result<Vec<(Host, Vec<String>)>, WireError> {
        if let Some(t) = topics
            .0
            .iter()
            .find(|t| self.directory.contains_key(t.as_str()))
        {
            let holder = self.directory[t.as_str()];
            return Err(topic_exists(t, &self.peers[&holder].rec.name));
        }
        if topics.0.is_empty() {
            return Ok(Vec::new());
        }
        let live: Vec<(u64, usize)> = self
            .peers
            .iter()
            .filter(|(_, p)| p.rec.active)
            .map(|(&id, p)| (id, p.topics.len()))
            .collect();
        let shares: Vec<(u64, usize)> = match peer {
            Some(wanted) => {
                let id = live
                    .iter()
                    .map(|&(id, _)| id)
                    .find(|id| {
                        let rec = &self.peers[id].rec;
                        rec.name == wanted || rec.addr == wanted
                    })
                    .ok_or_else(|| {
                        WireError::new(
                            ErrorCode::NotFound,
                            format!("peer '{wanted}' not found or not active"),
                        )
                    })?;
                vec![(id, topics.len())]
            }
            None => {
                if live.is_empty() {
                    return Err(WireError::new(
                        ErrorCode::Unavailable,
                        format!("no active peer to host {} topics", topics.len()),
                    ));
                }
                spread(&live, topics.len())
            }
        };
        let mut names = topics.0.into_iter();
        Ok(shares
            .into_iter()
            .filter(|&(_, n)| n > 0)
            .map(|(id, n)| {
                let rec = &self.peers[&id].rec;
                let host = Host {
                    id,
                    name: rec.name.clone(),
                    addr: rec.addr.clone(),
                };
                (host, names.by_ref().take(n).collect())
            })
            .collect())
    }

    /// The peer offers `files`. With `replace`, files it offered before but no longer
    /// lists are withdrawn. Entries it already offered unchanged produce no change, so a
    /// peer re-registering its whole share after a reconnect writes nothing.
    pub fn register_files(
        &mut self,
        auth: &PeerAuth,
        files: &FileSet,
        replace: bool,
    ) -> Result<(FileDiff, Vec<Change>), WireError> {
        let peer = self.check_live(auth)?;
        let id = auth.peer_id;
        let mut upserts = Vec::new();
        let mut added = 0;
        let mut removed = Vec::new();
        let mut held = peer.files.iter().peekable();
        for f in &files.0 {
            while let Some(&h) = held.peek()
                && *h < f.hash
            {
                if replace {
                    removed.push(h.clone());
                }
                held.next();
            }
            if held.peek() == Some(&&f.hash) {
                held.next();
                let known = self.files.get(&f.hash).and_then(|h| h.get(&id));
                if known != Some(f) {
                    upserts.push(f);
                }
            } else {
                added += 1;
                upserts.push(f);
            }
        }
        if replace {
            removed.extend(held.cloned());
        }
        let name = peer.rec.name.clone();

        let mut changes = Vec::with_capacity(upserts.len() + removed.len());
        let peer = self.peers.get_mut(&id).expect("authenticated peer exists");
        for hash in &removed {
            peer.files.remove(hash);
            drop_holding(&mut self.files, id, hash);
            changes.push(Change::FileRemoved(id, hash.clone()));
        }
        let updated = upserts.len() - added;
        for f in upserts {
            peer.files.insert(f.hash.clone());
            self.files
                .entry(f.hash.clone())
                .or_default()
                .insert(id, f.clone());
            changes.push(Change::File(id, f.clone()));
        }
        let diff = FileDiff {
            name,
            added,
            updated,
            removed: removed.len(),
            total: peer.files.len(),
        };
        Ok((diff, changes))
    }

    /// The peer stops offering those of `hashes` it offers; the others are ignored, so
    /// unregistering twice is fine. Like withdrawing topics, this needs the cookie but not
    /// a live lease: giving something up is always allowed.
    pub fn unregister_files(
        &mut self,
        auth: &PeerAuth,
        hashes: &[String],
    ) -> Result<(FileDiff, Vec<Change>), WireError> {
        let name = self.check_cookie(auth)?.rec.name.clone();
        let id = auth.peer_id;
        let peer = self.peers.get_mut(&id).expect("authenticated peer exists");
        let mut changes = Vec::new();
        for hash in hashes {
            let hash = hash.to_ascii_lowercase();
            if peer.files.remove(&hash) {
                drop_holding(&mut self.files, id, &hash);
                changes.push(Change::FileRemoved(id, hash));
            }
        }
        let diff = FileDiff {
            name,
            removed: changes.len(),
            total: peer.files.len(),
            ..FileDiff::default()
        };
        Ok((diff, changes))
    }

    /// A file with its live holders by id; named and sized as the first of them describes
    /// it. `None` when no holder is live.
    fn file_hit(&self, hash: &str, holders: &BTreeMap<u64, FileEntry>) -> Option<FileHit> {
        let mut first = None;
        let peers: Vec<FileHolder> = holders
            .iter()
            .filter_map(|(&id, entry)| {
                let p = self.peers.get(&id).filter(|p| p.rec.active)?;
                first.get_or_insert(entry);
                Some(FileHolder {
                    peer_id: id,
                    name: p.rec.name.clone(),
                    addr: p.rec.addr.clone(),
                })
            })
            .collect();
        let first = first?;
        Some(FileHit {
            name: first.name.clone(),
            size: first.size,
            hash: hash.to_string(),
            peers,
        })
    }

    /// Files some holder names with `pattern` in the name, case-insensitively (every file
    /// when `pattern` is empty), with their live holders, sorted by name then hash.
    ///
    /// Scans every file: a substring match cannot use an index, and 100k names are
    /// lowercased and compared in milliseconds.
    pub fn search_files(&self, pattern: &str, after: Option<&(String, String)>) -> Vec<FileHit> {
        let pattern = pattern.to_lowercase();
        let hits: Vec<FileHit> = self
            .files
            .iter()
            .filter(|(_, holders)| {
                pattern.is_empty()
                    || holders
                        .values()
                        .any(|e| e.name.to_lowercase().contains(&pattern))
            })
            .filter_map(|(hash, holders)| self.file_hit(hash, holders))
            .collect();
        peerbus_proto::page_of_hits(hits, after)
    }

    /// One file: by hash when `key` is 64 hex digits, else by exact name. Two different
    /// files may carry the same name; then the one with the most live holders wins (the
    /// lowest hash among equals), as the most likely to download well.
    pub fn lookup_file(&self, key: &str) -> Result<FileHit, WireError> {
        if is_hash(key) {
            let holders = self
                .files
                .get(&key.to_ascii_lowercase())
                .ok_or_else(|| file_not_found(key))?;
            return self
                .file_hit(&key.to_ascii_lowercase(), holders)
                .ok_or_else(|| no_live_holder(key));
        }
        let mut named = self
            .files
            .iter()
            .filter(|(_, holders)| holders.values().any(|e| e.name == key))
            .peekable();
        if named.peek().is_none() {
            return Err(file_not_found(key));
        }
        named
            .filter_map(|(hash, holders)| self.file_hit(hash, holders))
            .max_by(|a, b| {
                a.peers
                    .len()
                    .cmp(&b.peers.len())
                    .then_with(|| b.hash.cmp(&a.hash))
            })
            .ok_or_else(|| no_live_holder(key))
    }

    /// Files held by fewer than `replication` live peers, by hash.
    pub fn shortfalls(&self, replication: u32) -> Vec<Shortfall> {
        let wanted = usize::try_from(replication).unwrap_or(usize::MAX);
        let mut short: Vec<Shortfall> = self
            .files
            .iter()
            // Every holder is live (inactive peers hold nothing), so counting them all is
            // counting live ones, and well-replicated files cost no allocation.
            .filter(|(_, holders)| holders.len() < wanted)
            .map(|(hash, holders)| Shortfall {
                hash: hash.clone(),
                holders: holders
                    .keys()
                    .copied()
                    .filter(|id| self.peers.get(id).is_some_and(|p| p.rec.active))
                    .collect(),
            })
            .collect();
        short.sort_unstable_by(|a, b| a.hash.cmp(&b.hash));
        short
    }

    /// `(id, files offered)` of every live peer, by id.
    pub fn live_loads(&self) -> Vec<(u64, usize)> {
        self.peers
            .iter()
            .filter(|(_, p)| p.rec.active)
            .map(|(&id, p)| (id, p.files.len()))
            .collect()
    }

    /// The live peer `id`.
    pub fn live_peer(&self, id: u64) -> Option<Host> {
        let p = self.peers.get(&id).filter(|p| p.rec.active)?;
        Some(Host {
            id,
            name: p.rec.name.clone(),
            addr: p.rec.addr.clone(),
        })
    }

    /// The name the first holder gives the file `hash`.
    pub fn file_name(&self, hash: &str) -> Option<&str> {
        let (_, entry) = self.files.get(hash)?.first_key_value()?;
        Some(&entry.name)
    }

    /// True when peer `id` offers the file `hash`.
    pub fn offers(&self, id: u64, hash: &str) -> bool {
        self.files.get(hash).is_some_and(|h| h.contains_key(&id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) const TTL: u64 = 30_000;
    const DAY: u64 = 24 * 60 * 60 * 1000;
    /// Some time well after the epoch, so subtracting 30 days cannot underflow.
    pub(super) const T0: u64 = 1_700_000_000_000;

    fn req(name: &str, previous: Option<PeerAuth>) -> RegisterPeer {
        RegisterPeer {
            name: name.into(),
            addr: format!("{name}.example:7000"),
            http: None,
            previous,
            keeps_identity: true,
        }
    }

    fn cookie(n: u8) -> String {
        format!("{n:032x}")
    }

    pub(super) fn register(reg: &mut Registry, name: &str, now: u64) -> PeerAuth {
        let (r, _) = reg
            .register(&req(name, None), cookie(name.len() as u8), now)
            .expect("register");
        PeerAuth {
            peer_id: r.peer_id,
            cookie: r.cookie,
        }
    }

    pub(super) fn set(names: &[&str]) -> TopicSet {
        TopicSet::new(topics(names)).expect("valid names")
    }

    fn topics(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    /// A valid hash made from `n`.
    fn hash(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    fn file(name: &str, n: u8) -> FileEntry {
        FileEntry {
            name: name.into(),
            hash: hash(n),
            size: u64::from(n) * 100,
        }
    }

    fn files(entries: &[(&str, u8)]) -> FileSet {
        FileSet::new(entries.iter().map(|&(name, n)| file(name, n)).collect()).expect("valid")
    }

    fn hit_summary(hit: &FileHit) -> (String, String, Vec<u64>) {
        let ids = hit.peers.iter().map(|p| p.peer_id).collect();
        (hit.name.clone(), hit.hash.clone(), ids)
    }

    fn peer_info(reg: &Registry, id: u64, now: u64) -> PeerInfo {
        reg.list_peers(None, now)
            .into_iter()
            .find(|p| p.id == id)
            .expect("peer listed")
    }

    #[test]
    fn register_hands_out_sequential_ids_and_the_given_cookie() {
        let mut reg = Registry::new(TTL);
        let (a, changes) = reg.register(&req("a", None), cookie(1), T0).unwrap();
        assert_eq!(a.peer_id, 1);
        assert_eq!(a.cookie, cookie(1));
        assert_eq!(a.registrations, 1);
        assert!(!a.resumed);
        assert!(changes.contains(&Change::NextId(2)));
        let (b, _) = reg.register(&req("b", None), cookie(2), T0).unwrap();
        assert_eq!(b.peer_id, 2);
        let info = peer_info(&reg, 1, T0 + 1000);
        assert!(info.active);
        assert_eq!(info.ttl_left_ms, TTL - 1000);
        assert_eq!(info.last_registered_ms, T0);
    }

    #[test]
    fn reregistering_with_the_cookie_keeps_the_identity() {
        let mut reg = Registry::new(TTL);
        let auth = register(&mut reg, "a", T0);
        let mut again = req("a", Some(auth.clone()));
        again.addr = "moved.example:7001".into();
        let (r, _) = reg.register(&again, cookie(9), T0 + 5000).unwrap();
        assert_eq!(r.peer_id, auth.peer_id);
        assert_eq!(r.cookie, auth.cookie, "the old cookie stays valid");
        assert_eq!(r.registrations, 2);
        assert!(r.resumed);
        let info = peer_info(&reg, auth.peer_id, T0 + 5000);
        assert_eq!(info.addr, "moved.example:7001");
        assert_eq!(info.registrations, 2);
        assert_eq!(info.ttl_left_ms, TTL);
    }

    #[test]
    fn registrations_older_than_thirty_days_drop_out() {
        let mut reg = Registry::new(TTL);
        let auth = register(&mut reg, "a", T0);
        let again = req("a", Some(auth.clone()));
        reg.register(&again, cookie(0), T0 + DAY).unwrap();
        assert_eq!(peer_info(&reg, 1, T0 + DAY).registrations, 2);
        // Thirty days after the first, only the second still counts.
        assert_eq!(peer_info(&reg, 1, T0 + 30 * DAY).registrations, 1);
        let (r, _) = reg.register(&again, cookie(0), T0 + 30 * DAY).unwrap();
        assert_eq!(r.registrations, 2);
        let (r, _) = reg.register(&again, cookie(0), T0 + 32 * DAY).unwrap();
        assert_eq!(r.registrations, 2, "the day-1 registration has aged out");
    }

    #[test]
    fn a_wrong_cookie_is_refused_everywhere() {
        let mut reg = Registry::new(TTL);
        let auth = register(&mut reg, "a", T0);
        let bad = PeerAuth {
            peer_id: auth.peer_id,
            cookie: cookie(99),
        };
        let e = reg
            .register(&req("a", Some(bad.clone())), cookie(3), T0)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Unauthorized);
        assert_eq!(e.message, "wrong cookie for peer 1");
        assert_eq!(
            reg.keepalive(&bad, T0).unwrap_err().code,
            ErrorCode::Unauthorized
        );
        assert_eq!(reg.leave(&bad).unwrap_err().code, ErrorCode::Unauthorized);
        let e = reg.announce(&bad, &set(&["x"]), false).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unauthorized);
        let e = reg.withdraw(&bad, &topics(&["x"])).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unauthorized);
        assert!(peer_info(&reg, 1, T0).active);
    }

    #[test]
    fn an_unknown_id_with_a_cookie_gets_a_new_identity() {
        let mut reg = Registry::new(TTL);
        let stale = PeerAuth {
            peer_id: 42,
            cookie: cookie(1),
        };
        let (r, _) = reg.register(&req("a", Some(stale)), cookie(7), T0).unwrap();
        assert_eq!(r.peer_id, 1);
        assert_eq!(r.cookie, cookie(7));
        assert!(!r.resumed);
    }

    #[test]
    fn names_are_unique_among_active_peers_only() {
        let mut reg = Registry::new(TTL);
        let a = register(&mut reg, "a", T0);
        let e = reg.register(&req("a", None), cookie(5), T0).unwrap_err();
        assert_eq!(e.code, ErrorCode::Exists);
        assert_eq!(
            e.message,
            "peer name 'a' is taken by active peer 1 at a.example:7000"
        );
        // A peer that does not keep its identity cannot come back with it: its name is
        // free as soon as it has left.
        let volatile = |previous| RegisterPeer {
            keeps_identity: false,
            ..req("a", previous)
        };
        reg.register(&volatile(Some(a.clone())), cookie(1), T0)
            .unwrap();
        reg.leave(&a).unwrap();
        let (r, changes) = reg.register(&volatile(None), cookie(5), T0).unwrap();
        assert_eq!(
            r.peer_id, 2,
            "the inactive record is replaced by a fresh id"
        );
        assert_eq!(r.replaced, Some(1));
        assert!(changes.contains(&Change::PeerRemoved(1)));
        assert!(!changes.iter().any(|c| matches!(c, Change::Peer(1, _))));
        assert_eq!(reg.list_peers(None, T0).len(), 1);
    }

    #[test]
    fn a_resting_peer_keeps_its_name_for_a_day() {
        let mut reg = Registry::new(TTL);
        let a = register(&mut reg, "a", T0);
        // Its lease ends (a restart, maintenance): a newcomer may not take the name.
        reg.expire(T0 + TTL);
        let ended = T0 + TTL;
        let e = reg
            .register(&req("a", None), cookie(5), ended + 1000)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Exists);
        assert!(e.message.contains("is kept for peer 1"), "{e:?}");
        assert!(e.message.contains("choose another name"), "{e:?}");
        let e = reg
            .register(&req("a", None), cookie(5), ended + NAME_GRACE_MS - 1)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Exists);
        // The peer itself comes back with its identity at any time.
        let (r, _) = reg
            .register(&req("a", Some(a.clone())), cookie(6), ended + 1000)
            .unwrap();
        assert!(r.resumed);
        assert_eq!(r.peer_id, 1);
        // After the grace, the name is free again.
        reg.leave(&a).unwrap();
        let later = ended + 1000 + TTL + NAME_GRACE_MS;
        let (r, _) = reg.register(&req("a", None), cookie(7), later).unwrap();
        assert_eq!((r.peer_id, r.replaced), (2, Some(1)));
    }

    #[test]
    fn resting_peers_are_forgotten_after_thirty_days() {
        let mut reg = Registry::new(TTL);
        register(&mut reg, "a", T0);
        let b = register(&mut reg, "b", T0);
        reg.expire(T0 + TTL);
        // b comes back and stays; a does not.
        reg.register(&req("b", Some(b.clone())), cookie(9), T0 + TTL)
            .unwrap();
        let (_, changes) = reg.expire(T0 + TTL + RECORD_RETENTION_MS - 1);
        assert!(!changes.contains(&Change::PeerRemoved(1)));
        reg.register(
            &req("b", Some(b.clone())),
            cookie(9),
            T0 + TTL + RECORD_RETENTION_MS - 1,
        )
        .unwrap();
        let (_, changes) = reg.expire(T0 + TTL + RECORD_RETENTION_MS);
        assert!(changes.contains(&Change::PeerRemoved(1)), "{changes:?}");
        assert!(!changes.contains(&Change::PeerRemoved(2)));
        let names: Vec<String> = reg
            .list_peers(None, T0 + TTL + RECORD_RETENTION_MS)
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(names, ["b"]);
        // Its name is free.
        let (r, _) = reg
            .register(&req("a", None), cookie(3), T0 + TTL + RECORD_RETENTION_MS)
            .unwrap();
        assert_eq!(r.replaced, None);
    }

    #[test]
    fn a_record_keeps_a_bounded_number_of_registrations() {
        let mut reg = Registry::new(TTL);
        let a = register(&mut reg, "a", T0);
        for i in 1..=(MAX_REGISTRATIONS_KEPT as u64 + 50) {
            reg.register(&req("a", Some(a.clone())), cookie(2), T0 + i)
                .unwrap();
        }
        assert_eq!(
            reg.peers[&1].rec.registrations.len(),
            MAX_REGISTRATIONS_KEPT
        );
    }

    #[test]
    fn records_stored_before_keeps_identity_still_load() {
        #[derive(Serialize)]
        struct Old<'a> {
            name: &'a str,
            addr: &'a str,
            http: Option<&'a str>,
            cookie: &'a str,
            expires_ms: u64,
            active: bool,
            registrations: Vec<u64>,
            last_registered_ms: u64,
        }
        let old = postcard::to_allocvec(&Old {
            name: "a",
            addr: "h:1",
            http: None,
            cookie: "c",
            expires_ms: 5,
            active: false,
            registrations: vec![1, 2],
            last_registered_ms: 2,
        })
        .unwrap();
        let rec = PeerRecord::decode(&old).unwrap();
        assert_eq!((rec.name.as_str(), rec.expires_ms), ("a", 5));
        assert!(!rec.keeps_identity);
        let new = postcard::to_allocvec(&PeerRecord {
            keeps_identity: true,
            ..rec
        })
        .unwrap();
        assert!(PeerRecord::decode(&new).unwrap().keeps_identity);
        assert!(PeerRecord::decode(&[0xff; 3]).is_err());
    }

    #[test]
    fn invalid_peer_names_are_refused() {
        let mut reg = Registry::new(TTL);
        let e = reg.register(&req("a b", None), cookie(1), T0).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
    }

    #[test]
    fn keepalive_extends_the_lease() {
        let mut reg = Registry::new(TTL);
        let auth = register(&mut reg, "a", T0);
        let changes = reg.keepalive(&auth, T0 + 20_000).unwrap();
        assert!(matches!(&changes[..], [Change::Peer(1, r)] if r.expires_ms == T0 + 20_000 + TTL));
        // The original deadline passes without effect.
        assert!(reg.expire(T0 + TTL).0.is_empty());
        assert_eq!(peer_info(&reg, 1, T0 + TTL).ttl_left_ms, 20_000);
        let (expired, _) = reg.expire(T0 + 20_000 + TTL);
        assert_eq!(expired.len(), 1);
    }

    #[test]
    fn keepalive_of_unknown_or_expired_peers_asks_to_register_again() {
        let mut reg = Registry::new(TTL);
        let unknown = PeerAuth {
            peer_id: 7,
            cookie: cookie(1),
        };
        let e = reg.keepalive(&unknown, T0).unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound);
        assert_eq!(e.message, "peer 7 is not registered; register again");
        let auth = register(&mut reg, "a", T0);
        reg.expire(T0 + TTL);
        let e = reg.keepalive(&auth, T0 + TTL).unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound);
        assert_eq!(e.message, "lease of peer 1 expired; register again");
        // Registering with the cookie brings the same identity back.
        let (r, _) = reg
            .register(&req("a", Some(auth.clone())), cookie(0), T0 + TTL)
            .unwrap();
        assert_eq!(r.peer_id, 1);
        reg.keepalive(&auth, T0 + TTL + 1).unwrap();
    }

    #[test]
    fn expiry_happens_exactly_at_the_ttl() {
        let mut reg = Registry::new(TTL);
        let auth = register(&mut reg, "a", T0);
        register(&mut reg, "bb", T0 + 10);
        reg.announce(&auth, &set(&["t1", "t2"]), false).unwrap();
        let (expired, changes) = reg.expire(T0 + TTL - 1);
        assert!(expired.is_empty() && changes.is_empty());
        assert!(reg.lookup("t1").is_ok());
        let (expired, changes) = reg.expire(T0 + TTL);
        assert_eq!(
            expired,
            vec![Expired {
                id: 1,
                name: "a".into(),
                topics: 2,
                files: 0
            }]
        );
        assert!(changes.contains(&Change::TopicRemoved("t1".into())));
        assert!(changes.contains(&Change::TopicRemoved("t2".into())));
        assert!(matches!(changes.last(), Some(Change::Peer(1, r)) if !r.active));
        let info = peer_info(&reg, 1, T0 + TTL);
        assert!(!info.active);
        assert_eq!(info.ttl_left_ms, 0);
        assert_eq!(info.topics, 0);
        let e = reg.lookup("t1").unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound);
        assert_eq!(e.message, "topic 't1' not found");
        assert!(
            peer_info(&reg, 2, T0 + TTL).active,
            "the other peer is not due"
        );
        assert!(reg.expire(T0 + TTL).0.is_empty(), "expiry is reported once");
    }

    #[test]
    fn leave_withdraws_topics_at_once() {
        let mut reg = Registry::new(TTL);
        let auth = register(&mut reg, "a", T0);
        reg.announce(&auth, &set(&["x", "y"]), false).unwrap();
        let (left, changes) = reg.leave(&auth).unwrap();
        assert_eq!(
            left,
            Left {
                name: "a".into(),
                topics: 2,
                files: 0
            }
        );
        assert_eq!(changes.len(), 3);
        assert!(reg.lookup("x").is_err());
        assert!(reg.list_topics(None, None).is_empty());
        assert!(!peer_info(&reg, 1, T0).active);
        // Nothing is left to expire, and leaving again changes nothing.
        assert!(reg.expire(T0 + TTL).0.is_empty());
        assert!(reg.leave(&auth).unwrap().1.is_empty());
        let e = reg.announce(&auth, &set(&["x"]), false).unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound);
    }

    #[test]
    fn announce_conflicts_name_the_holder_and_change_nothing() {
        let mut reg = Registry::new(TTL);
        let a = register(&mut reg, "alpha", T0);
        let b = register(&mut reg, "beta", T0);
        reg.announce(&a, &set(&["shared"]), false).unwrap();
        let e = reg
            .announce(&b, &set(&["mine", "shared", "other"]), false)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Exists);
        assert_eq!(e.message, "topic 'shared' exists on peer alpha");
        assert!(
            reg.lookup("mine").is_err(),
            "nothing of the request applied"
        );
        assert_eq!(peer_info(&reg, b.peer_id, T0).topics, 0);
        let e = TopicSet::new(topics(&["fine", "bad..name"])).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        // Announcing what one already holds is not a conflict.
        let (diff, changes) = reg.announce(&a, &set(&["shared"]), false).unwrap();
        assert!(diff.added.is_empty() && changes.is_empty());
    }

    #[test]
    fn replace_swaps_the_whole_topic_set() {
        let mut reg = Registry::new(TTL);
        let a = register(&mut reg, "a", T0);
        reg.announce(&a, &set(&["k1", "k2", "k3"]), false).unwrap();
        let (diff, changes) = reg.announce(&a, &set(&["k2", "k4"]), false).unwrap();
        assert_eq!(diff.added, topics(&["k4"]));
        assert!(diff.removed.is_empty());
        assert_eq!(changes, vec![Change::Topic("k4".into(), 1)]);
        let (diff, changes) = reg.announce(&a, &set(&["k2", "k5"]), true).unwrap();
        assert_eq!(diff.added, topics(&["k5"]));
        assert_eq!(diff.removed, topics(&["k1", "k3", "k4"]));
        assert_eq!(changes.len(), 4);
        let listed: Vec<String> = reg
            .list_topics(None, None)
            .into_iter()
            .map(|l| l.topic)
            .collect();
        assert_eq!(listed, topics(&["k2", "k5"]));
        let (diff, _) = reg.announce(&a, &set(&[]), true).unwrap();
        assert_eq!(diff.removed, topics(&["k2", "k5"]));
        assert!(reg.list_topics(None, None).is_empty());
    }

    #[test]
    fn withdraw_removes_only_own_topics() {
        let mut reg = Registry::new(TTL);
        let a = register(&mut reg, "a", T0);
        let b = register(&mut reg, "bb", T0);
        reg.announce(&a, &set(&["x"]), false).unwrap();
        reg.announce(&b, &set(&["y"]), false).unwrap();
        let (diff, _) = reg.withdraw(&a, &topics(&["x", "y", "z"])).unwrap();
        assert_eq!(diff.removed, topics(&["x"]));
        assert!(reg.lookup("x").is_err());
        assert_eq!(reg.lookup("y").unwrap().peer_name, "bb");
    }

    #[test]
    fn list_topics_filters_by_prefix_in_name_order() {
        let mut reg = Registry::new(TTL);
        let a = register(&mut reg, "a", T0);
        reg.announce(
            &a,
            &set(&["news.b", "news.a", "new", "sport", "news"]),
            false,
        )
        .unwrap();
        let names = |p: Option<&str>| -> Vec<String> {
            reg.list_topics(p, None)
                .into_iter()
                .map(|l| l.topic)
                .collect()
        };
        assert_eq!(names(Some("news")), topics(&["news", "news.a", "news.b"]));
        assert_eq!(names(Some("zz")), Vec::<String>::new());
        assert_eq!(
            names(None),
            topics(&["new", "news", "news.a", "news.b", "sport"])
        );
        let loc = &reg.list_topics(Some("sport"), None)[0];
        assert_eq!(loc.addr, "a.example:7000");
        assert_eq!(loc.peer_id, 1);
    }

    #[test]
    fn spread_evens_out_the_loads_like_placing_one_by_one() {
        // Placing one topic at a time with `place` is the reference.
        let one_by_one = |loads: &[(u64, usize)], count: usize| {
            let mut now = loads.to_vec();
            let mut got = vec![0; loads.len()];
            for _ in 0..count {
                let id = place(now.iter().copied()).unwrap();
                let i = now.iter().position(|&(p, _)| p == id).unwrap();
                now[i].1 += 1;
                got[i] += 1;
            }
            loads.iter().map(|&(id, _)| id).zip(got).collect::<Vec<_>>()
        };
        let cases: &[&[(u64, usize)]] = &[
            &[(1, 0)],
            &[(1, 0), (2, 0), (3, 0)],
            &[(1, 5), (2, 0), (3, 2)],
            &[(3, 1), (1, 1), (2, 9)],
            &[(1, 100), (2, 0)],
        ];
        for loads in cases {
            for count in [0, 1, 2, 3, 7, 10, 101] {
                assert_eq!(
                    spread(loads, count),
                    one_by_one(loads, count),
                    "{loads:?} {count}"
                );
            }
        }
    }

    #[test]
    fn place_picks_the_least_loaded_then_the_lowest_id() {
        assert_eq!(place([]), None);
        assert_eq!(place([(5, 3)]), Some(5));
        assert_eq!(place([(1, 4), (2, 1), (3, 2)]), Some(2));
        assert_eq!(place([(9, 1), (4, 1), (7, 1)]), Some(4));
        assert_eq!(place([(3, 0), (1, 2), (2, 0)]), Some(2));
    }

    #[test]
    fn plan_create_places_on_live_peers() {
        let mut reg = Registry::new(TTL);
        let e = reg.plan_create("t", None).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unavailable);
        assert_eq!(e.message, "no active peer to host topic 't'");
        let a = register(&mut reg, "a", T0);
        let b = register(&mut reg, "bb", T0);
        reg.announce(&a, &set(&["one"]), false).unwrap();
        assert_eq!(reg.plan_create("t", None).unwrap().id, b.peer_id);
        reg.announce(&b, &set(&["two"]), false).unwrap();
        assert_eq!(reg.plan_create("t", None).unwrap().id, a.peer_id, "tie");
        let by_name = reg.plan_create("t", Some("bb")).unwrap();
        assert_eq!(by_name.addr, "bb.example:7000");
        let by_addr = reg.plan_create("t", Some("a.example:7000")).unwrap();
        assert_eq!(by_addr.name, "a");
        let e = reg.plan_create("one", None).unwrap_err();
        assert_eq!(e.code, ErrorCode::Exists);
        assert_eq!(e.message, "topic 'one' exists on peer a");
        assert_eq!(
            reg.plan_create("a..b", None).unwrap_err().code,
            ErrorCode::BadRequest
        );
        reg.leave(&b).unwrap();
        let e = reg.plan_create("t", Some("bb")).unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound);
        assert_eq!(e.message, "peer 'bb' not found or not active");
        assert_eq!(reg.plan_create("t", None).unwrap().id, a.peer_id);
    }

    #[test]
    fn registering_files_adds_them_and_repeats_change_nothing() {
        let mut reg = Registry::new(TTL);
        let a = register(&mut reg, "a", T0);
        let (diff, changes) = reg
            .register_files(&a, &files(&[("one.txt", 1), ("two.txt", 2)]), false)
            .unwrap();
        assert_eq!(
            diff,
            FileDiff {
                name: "a".into(),
                added: 2,
                updated: 0,
                removed: 0,
                total: 2
            }
        );
        assert_eq!(
            changes,
            vec![
                Change::File(1, file("one.txt", 1)),
                Change::File(1, file("two.txt", 2))
            ]
        );
        assert_eq!(peer_info(&reg, 1, T0).files, 2);
        let (diff, changes) = reg
            .register_files(&a, &files(&[("one.txt", 1)]), false)
            .unwrap();
        assert!(changes.is_empty(), "nothing new: nothing to persist");
        assert_eq!((diff.added, diff.total), (0, 2));
        // Same content under a new name: an update, not a second file.
        let (diff, changes) = reg
            .register_files(&a, &files(&[("renamed.txt", 1)]), false)
            .unwrap();
        assert_eq!((diff.added, diff.updated, diff.total), (0, 1, 2));
        assert_eq!(changes, vec![Change::File(1, file("renamed.txt", 1))]);
        assert_eq!(reg.lookup_file(&hash(1)).unwrap().name, "renamed.txt");
        assert_eq!(reg.counts(), (1, 0, 2));
    }

    #[test]
    fn replace_swaps_the_whole_file_list() {
        let mut reg = Registry::new(TTL);
        let a = register(&mut reg, "a", T0);
        reg.register_files(&a, &files(&[("f1", 1), ("f2", 2), ("f3", 3)]), false)
            .unwrap();
        let (diff, changes) = reg
            .register_files(&a, &files(&[("f2", 2), ("f4", 4)]), true)
            .unwrap();
        assert_eq!((diff.added, diff.removed, diff.total), (1, 2, 2));
        assert_eq!(
            changes,
            vec![
                Change::FileRemoved(1, hash(1)),
                Change::FileRemoved(1, hash(3)),
                Change::File(1, file("f4", 4)),
            ]
        );
        let names: Vec<String> = reg
            .search_files("", None)
            .into_iter()
            .map(|h| h.name)
            .collect();
        assert_eq!(names, ["f2", "f4"]);
        let (diff, _) = reg.register_files(&a, &files(&[]), true).unwrap();
        assert_eq!((diff.removed, diff.total), (2, 0));
        assert!(reg.search_files("", None).is_empty());
        assert_eq!(peer_info(&reg, 1, T0).files, 0);
    }

    #[test]
    fn unregistering_removes_only_own_files() {
        let mut reg = Registry::new(TTL);
        let a = register(&mut reg, "a", T0);
        let b = register(&mut reg, "bb", T0);
        reg.register_files(&a, &files(&[("x", 1), ("y", 2)]), false)
            .unwrap();
        reg.register_files(&b, &files(&[("x", 1)]), false).unwrap();
        // Hashes are matched whatever their case; unknown ones are ignored.
        let (diff, changes) = reg
            .unregister_files(&a, &[hash(1).to_uppercase(), hash(9), "junk".into()])
            .unwrap();
        assert_eq!((diff.removed, diff.total), (1, 1));
        assert_eq!(changes, vec![Change::FileRemoved(1, hash(1))]);
        let hit = reg.lookup_file(&hash(1)).unwrap();
        assert_eq!(hit_summary(&hit), ("x".into(), hash(1), vec![b.peer_id]));
        reg.unregister_files(&b, &[hash(1)]).unwrap();
        let e = reg.lookup_file(&hash(1)).unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound);
        assert_eq!(e.message, format!("file '{}' not found", hash(1)));
        assert_eq!(reg.counts(), (2, 0, 1));
    }

    #[test]
    fn invalid_or_unauthorized_file_registrations_change_nothing() {
        let mut reg = Registry::new(TTL);
        let a = register(&mut reg, "a", T0);
        let e = FileSet::new(vec![
            file("ok", 1),
            FileEntry {
                name: "bad".into(),
                hash: "abc".into(),
                size: 1,
            },
        ])
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert_eq!(
            e.message,
            "file 'bad': hash 'abc' is not a BLAKE3 hash (64 hex digits)"
        );
        let e = FileSet::new(vec![FileEntry {
            name: "g".into(),
            hash: "g".repeat(64),
            size: 1,
        }])
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        let e = FileSet::new(vec![file("", 1)]).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert_eq!(
            e.message,
            format!("file with hash {} has an empty name", hash(1))
        );
        // Upper-case hashes are the same files; the first of duplicates wins.
        let mut upper = file("first", 0xab);
        upper.hash = upper.hash.to_uppercase();
        let set = FileSet::new(vec![upper, file("second", 0xab)]).unwrap();
        assert_eq!(set.0, vec![file("first", 0xab)]);

        let bad = PeerAuth {
            peer_id: a.peer_id,
            cookie: cookie(99),
        };
        let e = reg.register_files(&bad, &set, false).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unauthorized);
        let e = reg.unregister_files(&bad, &[hash(1)]).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unauthorized);
        reg.expire(T0 + TTL);
        let e = reg.register_files(&a, &set, false).unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound);
        assert_eq!(e.message, "lease of peer 1 expired; register again");
        assert_eq!(reg.counts(), (1, 0, 0));
    }

    #[test]
    fn search_is_case_insensitive_grouped_by_hash_and_sorted() {
        let mut reg = Registry::new(TTL);
        let a = register(&mut reg, "a", T0);
        let b = register(&mut reg, "bb", T0);
        let c = register(&mut reg, "ccc", T0);
        reg.register_files(&c, &files(&[("Report.PDF", 1), ("zeta.pdf", 4)]), false)
            .unwrap();
        reg.register_files(&a, &files(&[("report.pdf", 1), ("notes.txt", 2)]), false)
            .unwrap();
        reg.register_files(&b, &files(&[("report.pdf", 3), ("other", 1)]), false)
            .unwrap();
        let found: Vec<_> = reg
            .search_files("REPORT", None)
            .iter()
            .map(hit_summary)
            .collect();
        assert_eq!(
            found,
            vec![
                // Named as its lowest-id holder names it, found because some holder's
                // name matches (bb calls it "other"), holders in id order.
                ("report.pdf".into(), hash(1), vec![1, 2, 3]),
                ("report.pdf".into(), hash(3), vec![2]),
            ]
        );
        let hit = &reg.search_files("zeta", None)[0];
        assert_eq!((hit.size, hit.peers[0].name.as_str()), (400, "ccc"));
        assert_eq!(hit.peers[0].addr, "ccc.example:7000");
        let all: Vec<String> = reg
            .search_files("", None)
            .into_iter()
            .map(|h| h.name)
            .collect();
        assert_eq!(all, ["notes.txt", "report.pdf", "report.pdf", "zeta.pdf"]);
        assert!(reg.search_files("nothing", None).is_empty());
        assert_eq!(reg.search_files(".PDF", None).len(), 3);
    }

    #[test]
    fn lookup_by_hash_or_exact_name() {
        let mut reg = Registry::new(TTL);
        let a = register(&mut reg, "a", T0);
        let b = register(&mut reg, "bb", T0);
        reg.register_files(&a, &files(&[("dup", 1), ("solo", 5)]), false)
            .unwrap();
        reg.register_files(&b, &files(&[("dup", 1), ("dup", 2)]), false)
            .unwrap();
        let hit = reg.lookup_file(&hash(5)).unwrap();
        assert_eq!(hit_summary(&hit), ("solo".into(), hash(5), vec![1]));
        assert_eq!(
            reg.lookup_file(&hash(5).to_uppercase()).unwrap().hash,
            hash(5)
        );
        assert_eq!(reg.lookup_file("solo").unwrap().hash, hash(5));
        // Two contents named "dup": the one with more live holders.
        assert_eq!(reg.lookup_file("dup").unwrap().hash, hash(1));
        assert!(reg.lookup_file("SOLO").is_err(), "names match exactly");
        let e = reg.lookup_file("missing").unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound);
        assert_eq!(e.message, "file 'missing' not found");
        assert!(reg.lookup_file(&hash(7)).is_err());
    }

    #[test]
    fn leave_and_expiry_withdraw_all_files() {
        let mut reg = Registry::new(TTL);
        let a = register(&mut reg, "a", T0);
        let b = register(&mut reg, "bb", T0 + 10);
        reg.register_files(&a, &files(&[("x", 1), ("y", 2)]), false)
            .unwrap();
        reg.register_files(&b, &files(&[("x", 1), ("z", 3)]), false)
            .unwrap();
        let (left, changes) = reg.leave(&a).unwrap();
        assert_eq!((left.topics, left.files), (0, 2));
        assert!(changes.contains(&Change::FileRemoved(1, hash(1))));
        assert!(changes.contains(&Change::FileRemoved(1, hash(2))));
        assert_eq!(reg.lookup_file("x").unwrap().peers.len(), 1);
        assert!(reg.lookup_file("y").is_err());
        assert_eq!(peer_info(&reg, 1, T0).files, 0);
        let e = reg
            .register_files(&a, &files(&[("x", 1)]), false)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound);

        let (expired, changes) = reg.expire(T0 + 10 + TTL);
        assert_eq!(
            expired,
            vec![Expired {
                id: 2,
                name: "bb".into(),
                topics: 0,
                files: 2
            }]
        );
        assert!(changes.contains(&Change::FileRemoved(2, hash(3))));
        assert!(reg.search_files("", None).is_empty());
        assert_eq!(reg.counts(), (2, 0, 0));
    }

    #[test]
    fn shortfalls_list_files_below_the_replication_factor() {
        let mut reg = Registry::new(TTL);
        let a = register(&mut reg, "a", T0);
        let b = register(&mut reg, "bb", T0);
        register(&mut reg, "ccc", T0);
        reg.register_files(&a, &files(&[("x", 2), ("y", 1)]), false)
            .unwrap();
        reg.register_files(&b, &files(&[("x", 2)]), false).unwrap();
        assert_eq!(
            reg.shortfalls(2),
            vec![Shortfall {
                hash: hash(1),
                holders: vec![1]
            }]
        );
        assert_eq!(
            reg.shortfalls(3),
            vec![
                Shortfall {
                    hash: hash(1),
                    holders: vec![1]
                },
                Shortfall {
                    hash: hash(2),
                    holders: vec![1, 2]
                },
            ]
        );
        assert_eq!(reg.live_loads(), vec![(1, 2), (2, 1), (3, 0)]);
        assert_eq!(reg.file_name(&hash(2)), Some("x"));
        assert!(reg.offers(2, &hash(2)) && !reg.offers(3, &hash(2)));
        reg.leave(&b).unwrap();
        assert_eq!(reg.shortfalls(2).len(), 2);
        assert_eq!(reg.live_loads(), vec![(1, 2), (3, 0)]);
        assert!(reg.live_peer(2).is_none());
        assert_eq!(reg.live_peer(3).unwrap().name, "ccc");
    }

    #[test]
    fn load_restores_live_peers_and_drops_orphans() {
        let mut reg = Registry::new(TTL);
        let a = register(&mut reg, "a", T0);
        let b = register(&mut reg, "bb", T0);
        reg.announce(&a, &set(&["x"]), false).unwrap();
        reg.announce(&b, &set(&["y"]), false).unwrap();
        let records: Vec<(u64, PeerRecord)> = reg
            .peers
            .iter()
            .map(|(&id, p)| {
                let mut rec = p.rec.clone();
                // As if b's expiry was persisted but the removal of its topic was not.
                if id == b.peer_id {
                    rec.active = false;
                }
                (id, rec)
            })
            .collect();
        let dir = vec![
            ("x".to_string(), a.peer_id),
            ("y".to_string(), b.peer_id),
            ("z".to_string(), 99),
        ];
        let files = vec![
            (a.peer_id, file("a.txt", 1)),
            (b.peer_id, file("b.txt", 2)),
            (99, file("orphan", 3)),
        ];
        let (loaded, cleanup) = Registry::load(TTL, 3, records, dir, files);
        assert_eq!(
            cleanup,
            vec![
                Change::TopicRemoved("y".into()),
                Change::TopicRemoved("z".into()),
                Change::FileRemoved(b.peer_id, hash(2)),
                Change::FileRemoved(99, hash(3)),
            ]
        );
        assert_eq!(loaded.lookup("x").unwrap().peer_name, "a");
        assert!(loaded.lookup("y").is_err());
        assert_eq!(loaded.counts(), (2, 1, 1));
        assert_eq!(loaded.lookup_file("a.txt").unwrap().peers[0].peer_id, 1);
        assert_eq!(peer_info(&loaded, a.peer_id, T0).files, 1);
        assert_eq!(loaded.next_id, 3);
        let mut loaded = loaded;
        // The lease deadline survives the reload.
        assert_eq!(loaded.expire(T0 + TTL).0.len(), 1);
    }
}

#[cfg(test)]
mod scale {
    use super::*;

    /// Many topics: prefix listing returns exactly the matching range and re-announcing the
    /// same set is recognised as no change (nothing to persist). Speed is measured by
    /// `peerbus bench`, not here.
    #[test]
    fn many_topics_list_by_prefix_and_re_announce_without_changes() {
        let mut reg = Registry::new(30_000);
        let (r, _) = reg
            .register(
                &RegisterPeer {
                    name: "big".into(),
                    addr: "h:1".into(),
                    http: None,
                    previous: None,
                    keeps_identity: false,
                },
                "c".into(),
                0,
            )
            .unwrap();
        let auth = PeerAuth {
            peer_id: r.peer_id,
            cookie: r.cookie,
        };
        let names: Vec<String> = (0..100_000).map(|i| format!("t{i:06}")).collect();
        let set = TopicSet::new(names).unwrap();
        reg.announce(&auth, &set, true).unwrap();
        assert_eq!(reg.counts(), (1, 100_000, 0));
        let listed = reg.list_topics(Some("t01234"), None);
        assert_eq!(listed.len(), 10);
        assert_eq!(listed[0].topic, "t012340");
        assert!(reg.lookup("t099999").is_ok());
        let (diff, changes) = reg.announce(&auth, &set, true).unwrap();
        assert!(diff.added.is_empty() && diff.removed.is_empty() && changes.is_empty());
    }

    /// Many files: lookups by hash and name, searches and an unchanged re-registration give
    /// exact results. Results only, no timings.
    #[test]
    fn many_files_look_up_search_and_re_register_without_changes() {
        let mut reg = Registry::new(30_000);
        let (r, _) = reg
            .register(
                &RegisterPeer {
                    name: "big".into(),
                    addr: "h:1".into(),
                    http: None,
                    previous: None,
                    keeps_identity: false,
                },
                "c".into(),
                0,
            )
            .unwrap();
        let auth = PeerAuth {
            peer_id: r.peer_id,
            cookie: r.cookie,
        };
        let hash = |i: u32| format!("{i:064x}");
        let entries: Vec<FileEntry> = (0..100_000)
            .map(|i| FileEntry {
                name: format!("dir/File{i:06}.bin"),
                hash: hash(i),
                size: u64::from(i),
            })
            .collect();
        let set = FileSet::new(entries).unwrap();
        let (diff, _) = reg.register_files(&auth, &set, true).unwrap();
        assert_eq!(diff.added, 100_000);
        assert_eq!(reg.counts(), (1, 0, 100_000));
        assert_eq!(reg.lookup_file(&hash(99_999)).unwrap().size, 99_999);
        assert_eq!(
            reg.lookup_file("dir/File012345.bin").unwrap().hash,
            hash(12_345)
        );
        let found = reg.search_files("file01234", None);
        let names: Vec<&str> = found.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names.len(), 10);
        assert_eq!(names[0], "dir/File012340.bin");
        assert!(names.is_sorted());
        assert!(reg.shortfalls(1).is_empty());
        assert_eq!(reg.shortfalls(2).len(), 100_000);
        let (diff, changes) = reg.register_files(&auth, &set, true).unwrap();
        assert!(changes.is_empty() && diff.added == 0 && diff.removed == 0);
    }
}
