//! The index's state: peers with their leases, and the topic directory.
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
    ErrorCode, PeerAuth, PeerInfo, RegisterPeer, TopicLocation, WireError, validate_peer_name,
    validate_topic,
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
    /// Times of the registrations of the last 30 days, oldest first.
    pub registrations: Vec<u64>,
    pub last_registered_ms: u64,
}

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
}

/// A peer that left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Left {
    pub name: String,
    /// Topics withdrawn with it.
    pub topics: usize,
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
    /// A BTreeMap so listing by prefix is a range scan, whatever the number of topics.
    directory: BTreeMap<String, u64>,
}

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

impl Registry {
    /// An empty registry whose leases last `ttl_ms`.
    pub fn new(ttl_ms: u64) -> Self {
        Registry {
            ttl_ms,
            next_id: 1,
            peers: BTreeMap::new(),
            names: HashMap::new(),
            leases: BTreeSet::new(),
            directory: BTreeMap::new(),
        }
    }

    /// Rebuilds the registry from what was persisted. Directory entries that cannot stand
    /// (their peer is unknown or inactive) are dropped, and so is a second peer claiming a
    /// name already taken; the returned changes remove them from storage too.
    pub fn load(
        ttl_ms: u64,
        next_id: u64,
        peers: impl IntoIterator<Item = (u64, PeerRecord)>,
        directory: impl IntoIterator<Item = (String, u64)>,
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
            }
            reg.peers.insert(
                id,
                Peer {
                    rec,
                    topics: BTreeSet::new(),
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
        (reg, changes)
    }

    /// Number of known peers and of directory entries.
    pub fn counts(&self) -> (usize, usize) {
        (self.peers.len(), self.directory.len())
    }

    fn check_cookie(&self, auth: &PeerAuth) -> Result<&Peer, WireError> {
        let peer = self.peers.get(&auth.peer_id).ok_or_else(|| {
            WireError::new(
                ErrorCode::NotFound,
                format!("peer {} is not registered; register again", auth.peer_id),
            )
        })?;
        if peer.rec.cookie != auth.cookie {
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
                Some(p) if p.rec.cookie == auth.cookie => Some(auth.peer_id),
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
                rec.last_registered_ms = now_ms;
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
                        },
                        topics: BTreeSet::new(),
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

    /// Marks the peer inactive at once and withdraws all its topics. Leaving twice is fine.
    pub fn leave(&mut self, auth: &PeerAuth) -> Result<(Left, Vec<Change>), WireError> {
        let name = self.check_cookie(auth)?.rec.name.clone();
        let mut changes = Vec::new();
        let topics = self.deactivate(auth.peer_id, &mut changes);
        Ok((Left { name, topics }, changes))
    }

    /// Ends every lease due by `now_ms` (a deadline equal to `now_ms` is due): those peers
    /// become inactive and lose their topics.
    pub fn expire(&mut self, now_ms: u64) -> (Vec<Expired>, Vec<Change>) {
        let mut expired = Vec::new();
        let mut changes = Vec::new();
        while let Some(&(deadline, id)) = self.leases.first() {
            if deadline > now_ms {
                break;
            }
            let topics = self.deactivate(id, &mut changes);
            expired.push(Expired {
                id,
                name: self.peers[&id].rec.name.clone(),
                topics,
            });
        }
        (expired, changes)
    }

    /// Returns the number of topics withdrawn.
    fn deactivate(&mut self, id: u64, changes: &mut Vec<Change>) -> usize {
        let Some(peer) = self.peers.get_mut(&id) else {
            return 0;
        };
        if !peer.rec.active && peer.topics.is_empty() {
            return 0;
        }
        self.leases.remove(&(peer.rec.expires_ms, id));
        peer.rec.active = false;
        let topics = std::mem::take(&mut peer.topics);
        let count = topics.len();
        for t in topics {
            self.directory.remove(&t);
            changes.push(Change::TopicRemoved(t));
        }
        changes.push(self.peer_change(id));
        count
    }

    fn forget_peer(&mut self, id: u64, changes: &mut Vec<Change>) {
        self.deactivate(id, changes);
        if let Some(peer) = self.peers.remove(&id) {
            self.names.remove(&peer.rec.name);
            changes.retain(|c| !matches!(c, Change::Peer(p, _) if *p == id));
            changes.push(Change::PeerRemoved(id));
        }
    }

    /// The peer claims `topics`. All or nothing: a topic held by another peer fails the
    /// whole request before anything changes. With `replace`, topics the peer held but no
    /// longer lists are withdrawn.
    ///
    /// Both sets are sorted, so the diff is one merge pass and only topics new to the peer
    /// are looked up in the directory: a peer re-announcing a million unchanged topics
    /// costs a linear walk, not a million lookups.
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
        let mut held = peer.topics.iter().peekable();
        for t in &topics.0 {
            while let Some(&h) = held.peek()
                && h < t
            {
                if replace {
                    removed.push(h.clone());
                }
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
        if replace {
            removed.extend(held.cloned());
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
    pub fn list_topics(&self, prefix: Option<&str>) -> Vec<TopicLocation> {
        let prefix = prefix.unwrap_or("");
        self.directory
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(t, _)| t.starts_with(prefix))
            .filter_map(|(t, &id)| self.location(t, id))
            .collect()
    }

    /// Every known peer, by id.
    pub fn list_peers(&self, now_ms: u64) -> Vec<PeerInfo> {
        self.peers
            .iter()
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
                    files: 0,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: u64 = 30_000;
    const DAY: u64 = 24 * 60 * 60 * 1000;
    /// Some time well after the epoch, so subtracting 30 days cannot underflow.
    const T0: u64 = 1_700_000_000_000;

    fn req(name: &str, previous: Option<PeerAuth>) -> RegisterPeer {
        RegisterPeer {
            name: name.into(),
            addr: format!("{name}.example:7000"),
            http: None,
            previous,
        }
    }

    fn cookie(n: u8) -> String {
        format!("{n:032x}")
    }

    fn register(reg: &mut Registry, name: &str, now: u64) -> PeerAuth {
        let (r, _) = reg
            .register(&req(name, None), cookie(name.len() as u8), now)
            .expect("register");
        PeerAuth {
            peer_id: r.peer_id,
            cookie: r.cookie,
        }
    }

    fn set(names: &[&str]) -> TopicSet {
        TopicSet::new(topics(names)).expect("valid names")
    }

    fn topics(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn peer_info(reg: &Registry, id: u64, now: u64) -> PeerInfo {
        reg.list_peers(now)
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
        reg.leave(&a).unwrap();
        let (r, changes) = reg.register(&req("a", None), cookie(5), T0).unwrap();
        assert_eq!(
            r.peer_id, 2,
            "the inactive record is replaced by a fresh id"
        );
        assert_eq!(r.replaced, Some(1));
        assert!(changes.contains(&Change::PeerRemoved(1)));
        assert!(!changes.iter().any(|c| matches!(c, Change::Peer(1, _))));
        assert_eq!(reg.list_peers(T0).len(), 1);
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
                topics: 2
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
                topics: 2
            }
        );
        assert_eq!(changes.len(), 3);
        assert!(reg.lookup("x").is_err());
        assert!(reg.list_topics(None).is_empty());
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
        let listed: Vec<String> = reg.list_topics(None).into_iter().map(|l| l.topic).collect();
        assert_eq!(listed, topics(&["k2", "k5"]));
        let (diff, _) = reg.announce(&a, &set(&[]), true).unwrap();
        assert_eq!(diff.removed, topics(&["k2", "k5"]));
        assert!(reg.list_topics(None).is_empty());
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
            reg.list_topics(p).into_iter().map(|l| l.topic).collect()
        };
        assert_eq!(names(Some("news")), topics(&["news", "news.a", "news.b"]));
        assert_eq!(names(Some("zz")), Vec::<String>::new());
        assert_eq!(
            names(None),
            topics(&["new", "news", "news.a", "news.b", "sport"])
        );
        let loc = &reg.list_topics(Some("sport"))[0];
        assert_eq!(loc.addr, "a.example:7000");
        assert_eq!(loc.peer_id, 1);
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
        let (loaded, cleanup) = Registry::load(TTL, 3, records, dir);
        assert_eq!(
            cleanup,
            vec![
                Change::TopicRemoved("y".into()),
                Change::TopicRemoved("z".into())
            ]
        );
        assert_eq!(loaded.lookup("x").unwrap().peer_name, "a");
        assert!(loaded.lookup("y").is_err());
        assert_eq!(loaded.counts(), (2, 1));
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
        assert_eq!(reg.counts(), (1, 100_000));
        let listed = reg.list_topics(Some("t01234"));
        assert_eq!(listed.len(), 10);
        assert_eq!(listed[0].topic, "t012340");
        assert!(reg.lookup("t099999").is_ok());
        let (diff, changes) = reg.announce(&auth, &set, true).unwrap();
        assert!(diff.added.is_empty() && diff.removed.is_empty() && changes.is_empty());
    }
}
