//! Keeping every file on `R` live peers: the index notices files held by too few live
//! peers and asks other live peers to fetch a copy.
//!
//! Deciding who fetches what is [`plan_replication`], a pure function; the loop in [`run`]
//! feeds it the registry's view each round and sends the `Fetch` requests. The asked peer
//! downloads the file from the holders and registers its copy itself, which is how the
//! index learns the copy exists: the index never tracks a fetch beyond its answer.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use peerbus_proto::{Request, Response};
use tokio_util::sync::CancellationToken;

use crate::registry::Shortfall;
use crate::service::IndexService;

/// At most this many fetches are asked of one peer at a time. Without a cap, a peer that
/// held 100k files expiring would send 100k simultaneous fetches to the emptiest peer;
/// with it, copies are made a few at a time per peer and spread over all of them.
pub(crate) const MAX_FETCHES_PER_PEER: usize = 4;

/// `(hash, target peer id)` of the fetches asked and not yet answered.
pub(crate) type InFlight = HashSet<(String, u64)>;

/// How often replication runs without being woken: a third of the lease, so a file whose
/// holder expired is re-replicated well within the next lease; never busier than ten
/// rounds a second, never lazier than one round in five seconds.
pub(crate) fn replication_period(ttl: Duration) -> Duration {
    (ttl / 3).clamp(Duration::from_millis(100), Duration::from_secs(5))
}

/// Chooses the fetches that bring `files` (those held by fewer than `replication` live
/// peers, each with its live holders) back to `replication` copies.
///
/// `live` lists `(peer id, files it offers)` of every live peer; `in_flight` the fetches
/// asked and not yet answered. A fetch in flight to a live peer counts as a copy already,
/// so a file never has more than `replication - holders` fetches asked at once; fetches to
/// peers no longer live are ignored, so a file waiting on a dead peer gets a new target.
///
/// For each file, in the order given, the targets are live peers that neither hold it nor
/// are fetching it, least loaded first (files offered plus fetches pending, including the
/// ones planned in this call, so many files spread over many peers), lowest id among
/// equals. No peer has more than [`MAX_FETCHES_PER_PEER`] fetches at a time.
pub(crate) fn plan_replication(
    replication: u32,
    files: &[Shortfall],
    live: &[(u64, usize)],
    in_flight: &InFlight,
) -> Vec<(String, u64)> {
    let wanted = usize::try_from(replication).unwrap_or(usize::MAX);
    let mut busy: HashMap<u64, usize> = live.iter().map(|&(id, _)| (id, 0)).collect();
    // Fetches in flight per hash, all of them (a busy target is skipped even if dead) and
    // those counting as copies (live targets only).
    let mut fetching: HashMap<&str, Vec<u64>> = HashMap::new();
    for (hash, id) in in_flight {
        fetching.entry(hash).or_default().push(*id);
        if let Some(n) = busy.get_mut(id) {
            *n += 1;
        }
    }
    // Peers that can take another fetch, least loaded first. Peers reaching the cap leave
    // the set, so each file skips only its own holders and fetchers, however many peers
    // are busy.
    let mut open: BTreeSet<(usize, u64)> = live
        .iter()
        .filter(|(id, _)| busy[id] < MAX_FETCHES_PER_PEER)
        .map(|&(id, files)| (files + busy[&id], id))
        .collect();

    let mut plan = Vec::new();
    for file in files {
        if open.is_empty() {
            break;
        }
        let flying = fetching
            .get(file.hash.as_str())
            .map_or(&[][..], Vec::as_slice);
        let pending = flying.iter().filter(|id| busy.contains_key(id)).count();
        let need = wanted.saturating_sub(file.holders.len() + pending);
        if need == 0 {
            continue;
        }
        let picked: Vec<(usize, u64)> = open
            .iter()
            .filter(|(_, id)| !file.holders.contains(id) && !flying.contains(id))
            .take(need)
            .copied()
            .collect();
        for (load, id) in picked {
            open.remove(&(load, id));
            let n = busy.get_mut(&id).expect("open peers are live");
            *n += 1;
            if *n < MAX_FETCHES_PER_PEER {
                open.insert((load + 1, id));
            }
            plan.push((file.hash.clone(), id));
        }
    }
    plan
}

/// The replication loop: a round every `period` and whenever files or liveness change,
/// until `shutdown`.
pub(crate) async fn run(
    service: Arc<IndexService>,
    replication: u32,
    period: Duration,
    shutdown: CancellationToken,
) {
    let in_flight = Arc::new(Mutex::new(InFlight::new()));
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = service.changed.notified() => {}
            () = shutdown.cancelled() => return,
        }
        for ask in service.plan_fetches(replication, &in_flight) {
            tracing::info!(
                "asking peer {} to fetch '{}' [{}] (held by {} of {replication})",
                ask.target.name,
                ask.file,
                short_hash(&ask.hash),
                ask.holders
            );
            let task_service = service.clone();
            let in_flight = in_flight.clone();
            let shutdown = shutdown.clone();
            service.spawn(async move {
                let service = task_service;
                let req = Request::Fetch {
                    key: ask.hash.clone(),
                };
                let result = tokio::select! {
                    r = service.client().request_at(&ask.target.addr, req, false) => r,
                    () = shutdown.cancelled() => return,
                };
                in_flight
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&(ask.hash.clone(), ask.target.id));
                let peer = &ask.target.name;
                match result {
                    Ok(Response::Fetched(report)) if service.offers(ask.target.id, &ask.hash) => {
                        tracing::info!(
                            "peer {peer} fetched '{}' ({} bytes) from {}",
                            report.name,
                            report.size,
                            if report.sources.is_empty() {
                                "nobody".to_string()
                            } else {
                                report.sources.join(", ")
                            }
                        );
                        // The peer has room for another fetch now: plan the next round at
                        // once rather than at the next tick.
                        service.changed.notify_one();
                    }
                    // Not waking the loop here: re-asking at once would spin on a peer
                    // that keeps answering without registering its copy.
                    Ok(Response::Fetched(_)) => tracing::warn!(
                        "peer {peer} reported fetching '{}' [{}] but does not offer it; \
                         will ask again later",
                        ask.file,
                        short_hash(&ask.hash)
                    ),
                    Ok(other) => tracing::warn!(
                        "peer {peer} answered the fetch of '{}' [{}] with {}; will ask again later",
                        ask.file,
                        short_hash(&ask.hash),
                        answer_kind(&other)
                    ),
                    Err(e) => tracing::warn!(
                        "peer {peer} could not fetch '{}' [{}]: {e}; will ask again later",
                        ask.file,
                        short_hash(&ask.hash)
                    ),
                }
            });
        }
    }
}

/// Enough of a hash to tell files apart in a log line.
fn short_hash(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// The variant of an unexpected answer; its contents may be large.
fn answer_kind(r: &Response) -> String {
    let debug = format!("{r:?}");
    match debug.find(['(', ' ', '{']) {
        Some(end) => debug[..end].to_string(),
        None => debug,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn short(hash: &str, holders: &[u64]) -> Shortfall {
        Shortfall {
            hash: hash.into(),
            holders: holders.to_vec(),
        }
    }

    fn flying(pairs: &[(&str, u64)]) -> InFlight {
        pairs.iter().map(|&(h, id)| (h.to_string(), id)).collect()
    }

    fn pairs(plan: &[(String, u64)]) -> Vec<(&str, u64)> {
        plan.iter().map(|(h, id)| (h.as_str(), *id)).collect()
    }

    #[test]
    fn the_period_is_a_third_of_the_ttl_within_bounds() {
        assert_eq!(
            replication_period(Duration::from_secs(3)),
            Duration::from_secs(1)
        );
        assert_eq!(
            replication_period(Duration::from_millis(150)),
            Duration::from_millis(100)
        );
        assert_eq!(
            replication_period(Duration::from_secs(30)),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn targets_are_the_least_loaded_non_holders_then_the_lowest_id() {
        let live = [(1, 5), (2, 3), (3, 3), (4, 0)];
        let plan = plan_replication(2, &[short("h", &[4])], &live, &InFlight::new());
        assert_eq!(pairs(&plan), [("h", 2)], "4 holds it; 2 and 3 tie on load");
        let plan = plan_replication(3, &[short("h", &[1])], &live, &InFlight::new());
        assert_eq!(pairs(&plan), [("h", 4), ("h", 2)]);
    }

    #[test]
    fn never_more_than_the_missing_copies() {
        let live = [(1, 0), (2, 0), (3, 0), (4, 0), (5, 0)];
        let files = [
            short("a", &[1]),
            short("b", &[1, 2]),
            short("c", &[1, 2, 3]),
        ];
        let plan = plan_replication(3, &files, &live, &InFlight::new());
        let per_file = |h: &str| plan.iter().filter(|(f, _)| f == h).count();
        assert_eq!((per_file("a"), per_file("b"), per_file("c")), (2, 1, 0));
        assert!(
            plan.iter()
                .all(|(h, id)| !files.iter().any(|f| &f.hash == h && f.holders.contains(id)))
        );
        // Fewer live non-holders than missing copies: all of them, no more.
        let plan = plan_replication(5, &[short("a", &[1])], &live[..3], &InFlight::new());
        assert_eq!(pairs(&plan), [("a", 2), ("a", 3)]);
        assert!(plan_replication(1, &[short("a", &[])], &[], &InFlight::new()).is_empty());
    }

    #[test]
    fn fetches_in_flight_count_as_copies_and_are_not_repeated() {
        let live = [(1, 0), (2, 0), (3, 0)];
        let files = [short("a", &[1])];
        let plan = plan_replication(2, &files, &live, &flying(&[("a", 2)]));
        assert!(plan.is_empty(), "the copy being made is enough");
        let plan = plan_replication(3, &files, &live, &flying(&[("a", 2)]));
        assert_eq!(pairs(&plan), [("a", 3)], "2 is not asked twice");
        // A fetch asked of a peer that is no longer live does not count.
        let plan = plan_replication(2, &files, &live, &flying(&[("a", 9)]));
        assert_eq!(pairs(&plan), [("a", 2)]);
    }

    #[test]
    fn load_counts_planned_and_pending_fetches_so_work_spreads() {
        let live = [(1, 10), (2, 0), (3, 0)];
        let files = [short("a", &[1]), short("b", &[1]), short("c", &[1])];
        let plan = plan_replication(2, &files, &live, &InFlight::new());
        assert_eq!(pairs(&plan), [("a", 2), ("b", 3), ("c", 2)]);
        // Peer 2 is already fetching something else: 3 is less loaded.
        let plan = plan_replication(2, &files[..1], &live, &flying(&[("x", 2)]));
        assert_eq!(pairs(&plan), [("a", 3)]);
    }

    #[test]
    fn no_peer_gets_more_than_the_cap() {
        let live = [(1, 0), (2, 0)];
        let files: Vec<Shortfall> = (0..10).map(|i| short(&format!("f{i}"), &[1])).collect();
        let plan = plan_replication(2, &files, &live, &InFlight::new());
        assert_eq!(plan.len(), MAX_FETCHES_PER_PEER);
        assert!(plan.iter().all(|&(_, id)| id == 2));
        let busy = flying(&[("x", 2), ("y", 2), ("z", 2)]);
        let plan = plan_replication(2, &files, &live, &busy);
        assert_eq!(pairs(&plan), [("f0", 2)]);
    }
}
