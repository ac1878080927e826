//! Model-based property test of one topic's message log on a one-peer cluster with sync
//! (fjall) durability.
//!
//! Random sequences of steps — plain batch publishes (empty payloads, small ones and a
//! few up to 64 KiB; an empty batch, which is refused), idempotent producer batches, resends
//! of a producer's last batch, out-of-order producer sequences, pulls with random maximum
//! counts by several subscribers, repositioning subscribers (earliest, latest, any offset),
//! resuming, unsubscribing, and restarting the peer from its data directory — run against
//! the real peer and against a plain `Vec` model, optionally under a count retention limit.
//! After every step the test checks that:
//!
//! - assigned offsets are contiguous and start at the model's next offset;
//! - every read returns exactly the model's messages for its range (same bytes, in order,
//!   none missing, none repeated) and honours its maximum count (and the documented 8,192
//!   message / 4 MiB cap of one read);
//! - a resent idempotent batch gets its original offsets and stores nothing new, and a
//!   sequence gap is refused without storing anything;
//! - the topic's first/next offsets, retained bytes and subscriber positions match the
//!   model, so after a restart every acknowledged message is there exactly once and every
//!   subscriber resumes where it was.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use peerbus_client::{Client, Connection, ErrorCode, MessageSet, Retention, StartFrom};
use peerbus_peer::Durability;
use peerbus_proto::{Batch, Request, Response};
use peerbus_testkit::{Cluster, ClusterOptions};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;

const SUBSCRIBERS: [&str; 3] = ["alice", "bob", "carol"];
const PRODUCERS: [u64; 2] = [0x5eed_0001, 0x5eed_0002];
/// One read returns at most this many messages …
const READ_MESSAGES: usize = 8192;
/// … and at most this many payload bytes (but always at least one message).
const READ_BYTES: usize = 4 << 20;

#[derive(Debug, Clone, Copy)]
enum Seek {
    Earliest,
    Latest,
    Offset(u64),
}

#[derive(Debug, Clone)]
enum Step {
    /// A plain `Publish` of the batch (an empty batch must be refused).
    Publish(Vec<Vec<u8>>),
    /// The producer's next batch as a `PublishIdempotent`.
    Produce(usize, Vec<Vec<u8>>),
    /// The producer's last batch again, with the same sequence.
    Resend(usize),
    /// A sequence two past the producer's last one, which must be refused.
    SkipSequence(usize),
    /// A pull of at most `max` messages.
    Pull {
        sub: usize,
        max: u32,
    },
    /// A subscribe with an explicit start.
    Seek {
        sub: usize,
        to: Seek,
    },
    /// A subscribe without a start: keeps (or creates) the position.
    Resume(usize),
    Unsubscribe(usize),
    /// Stop the peer the way Ctrl-C does and start it again on the same data.
    Restart,
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        12 => proptest::collection::vec(any::<u8>(), 0..24),
        3 => Just(Vec::new()),
        1 => (any::<u8>(), 1024usize..=64 * 1024).prop_map(|(seed, n)| {
            (0..n).map(|i| (i as u8).wrapping_mul(31) ^ (i >> 8) as u8 ^ seed).collect()
        }),
    ]
}

fn batch() -> impl Strategy<Value = Vec<Vec<u8>>> {
    proptest::collection::vec(payload(), 1..6)
}

fn step() -> impl Strategy<Value = Step> {
    let sub = 0..SUBSCRIBERS.len();
    let producer = 0..PRODUCERS.len();
    prop_oneof![
        6 => batch().prop_map(Step::Publish),
        1 => Just(Step::Publish(Vec::new())),
        4 => (producer.clone(), batch()).prop_map(|(p, b)| Step::Produce(p, b)),
        2 => producer.clone().prop_map(Step::Resend),
        1 => producer.prop_map(Step::SkipSequence),
        6 => (sub.clone(), prop_oneof![4 => 0u32..12, 1 => Just(u32::MAX)])
            .prop_map(|(sub, max)| Step::Pull { sub, max }),
        2 => (
            sub.clone(),
            prop_oneof![
                Just(Seek::Earliest),
                Just(Seek::Latest),
                (0u64..60).prop_map(Seek::Offset),
            ]
        )
            .prop_map(|(sub, to)| Step::Seek { sub, to }),
        1 => sub.clone().prop_map(Step::Resume),
        1 => sub.prop_map(Step::Unsubscribe),
        1 => Just(Step::Restart),
    ]
}

/// `None`: the default retention (1 GiB, never reached here); `Some(k)`: keep the newest k.
fn keep() -> impl Strategy<Value = Option<u64>> {
    prop_oneof![2 => Just(None), 1 => (1u64..12).prop_map(Some)]
}

/// An idempotent producer's last batch.
#[derive(Debug, Clone)]
struct Produced {
    sequence: u64,
    first: u64,
    batch: Vec<Vec<u8>>,
}

/// What the topic should hold.
#[derive(Debug, Default)]
struct Model {
    /// Every payload ever acknowledged; the index is the offset.
    log: Vec<Vec<u8>>,
    /// Oldest retained offset.
    low: u64,
    /// Count retention.
    keep: Option<u64>,
    /// Committed positions by subscriber.
    subs: BTreeMap<String, u64>,
    producers: [Option<Produced>; 2],
}

impl Model {
    fn next(&self) -> u64 {
        self.log.len() as u64
    }

    fn append(&mut self, batch: &[Vec<u8>]) -> u64 {
        let first = self.next();
        self.log.extend(batch.iter().cloned());
        if let Some(k) = self.keep {
            self.low = self.low.max(self.next().saturating_sub(k));
        }
        first
    }

    fn retained_bytes(&self) -> u64 {
        self.log[self.low as usize..]
            .iter()
            .map(|p| p.len() as u64)
            .sum()
    }

    /// Where `sub` reads next: its position, never below what is retained; a new
    /// subscription starts at the oldest retained message.
    fn position(&self, sub: &str) -> u64 {
        self.subs
            .get(sub)
            .copied()
            .unwrap_or(self.low)
            .max(self.low)
    }

    /// The offsets one read from `from` with at most `max` messages returns.
    fn read_range(&self, from: u64, max: u32) -> Range<u64> {
        let limit = (max as usize)
            .min(READ_MESSAGES)
            .min(self.next().saturating_sub(from) as usize);
        let (mut n, mut bytes) = (0usize, 0usize);
        while n < limit {
            let len = self.log[from as usize + n].len();
            if n > 0 && bytes + len > READ_BYTES {
                break;
            }
            bytes += len;
            n += 1;
        }
        from..from + n as u64
    }
}

/// The real cluster next to its model of one topic.
struct Harness<'a> {
    cluster: &'a mut Cluster,
    topic: String,
    client: Client,
    /// A direct connection to the peer for publishes, so producer ids and sequences are
    /// under the test's control.
    conn: Connection,
    model: Model,
    audits: u64,
    trace: Vec<String>,
}

fn published(first_offset: u64, count: usize) -> Response {
    Response::Published {
        first_offset,
        count: count as u32,
    }
}

impl<'a> Harness<'a> {
    /// A fresh topic on the cluster's one peer.
    async fn start(cluster: &'a mut Cluster, topic: String, keep: Option<u64>) -> Harness<'a> {
        let client = cluster.client();
        let retention = Retention {
            max_messages: keep,
            ..Retention::default()
        };
        client
            .create_topic(&topic, Some(&cluster.peer_name(0)), retention)
            .await
            .expect("create topic");
        let conn = Connection::connect(&cluster.peer_addr(0), None)
            .await
            .expect("connect to the peer");
        Harness {
            cluster,
            topic,
            client,
            conn,
            model: Model {
                keep,
                ..Model::default()
            },
            audits: 0,
            trace: Vec::new(),
        }
    }

    /// Context for assertion messages: the steps so far.
    fn ctx(&self) -> String {
        format!("after steps:\n  {}", self.trace.join("\n  "))
    }

    async fn send(&self, req: Request) -> peerbus_client::Result<Response> {
        self.conn.request(req, false).await
    }

    fn check_set(&self, what: &str, set: &MessageSet, want: Range<u64>) {
        let got: Vec<_> = set.batch.iter().collect();
        let expected: Vec<&[u8]> = self.model.log[want.start as usize..want.end as usize]
            .iter()
            .map(Vec::as_slice)
            .collect();
        assert_eq!(
            got.len(),
            expected.len(),
            "{what}: expected offsets {want:?}, got {} messages from {}; {}",
            set.len(),
            set.first_offset,
            self.ctx()
        );
        if !want.is_empty() {
            assert_eq!(
                set.first_offset,
                want.start,
                "{what}: first offset; {}",
                self.ctx()
            );
        }
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert!(
                g.as_ref() == *e,
                "{what}: payload of offset {} differs: got {} bytes, expected {} bytes; {}",
                want.start + i as u64,
                g.len(),
                e.len(),
                self.ctx()
            );
        }
        assert_eq!(
            set.timestamps.len(),
            set.len(),
            "{what}: one timestamp per message"
        );
    }

    async fn pull(&mut self, sub: &str, max: u32, what: &str) -> usize {
        let from = self.model.position(sub);
        let want = self.model.read_range(from, max);
        let set = self
            .client
            .pull_uncommitted(&self.topic, sub, max, Duration::ZERO)
            .await
            .unwrap_or_else(|e| panic!("{what}: pull failed: {e}; {}", self.ctx()));
        assert!(set.len() <= max as usize, "{what}: over the maximum");
        self.check_set(what, &set, want.clone());
        // Reading commits nothing; the model's consumer acknowledges at once.
        if !set.is_empty() {
            self.client
                .ack(&self.topic, sub, set.next_offset())
                .await
                .unwrap_or_else(|e| panic!("{what}: ack failed: {e}; {}", self.ctx()));
        }
        self.model.subs.insert(sub.to_string(), want.end);
        set.len()
    }

    async fn step(&mut self, step: &Step) {
        let sizes = |b: &[Vec<u8>]| b.iter().map(Vec::len).collect::<Vec<_>>();
        self.trace.push(match step {
            Step::Publish(b) => format!("Publish(sizes {:?})", sizes(b)),
            Step::Produce(p, b) => format!("Produce({p}, sizes {:?})", sizes(b)),
            other => format!("{other:?}"),
        });
        let m = &self.model;
        match step {
            Step::Publish(batch) => {
                let r = self
                    .send(Request::Publish {
                        topic: self.topic.clone(),
                        batch: Batch::from_payloads(batch),
                    })
                    .await;
                if batch.is_empty() {
                    let e = r.expect_err("an empty batch is refused");
                    assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{e}");
                } else {
                    let first = m.next();
                    assert_eq!(
                        r.unwrap_or_else(|e| panic!("publish failed: {e}; {}", self.ctx())),
                        published(first, batch.len()),
                        "{}",
                        self.ctx()
                    );
                    self.model.append(batch);
                }
            }
            Step::Produce(p, batch) => {
                let sequence = m.producers[*p].as_ref().map_or(0, |l| l.sequence + 1);
                let r = self
                    .send(Request::PublishIdempotent {
                        topic: self.topic.clone(),
                        batch: Batch::from_payloads(batch),
                        producer: PRODUCERS[*p],
                        sequence,
                    })
                    .await
                    .unwrap_or_else(|e| panic!("idempotent publish failed: {e}; {}", self.ctx()));
                assert_eq!(r, published(m.next(), batch.len()), "{}", self.ctx());
                let first = self.model.append(batch);
                self.model.producers[*p] = Some(Produced {
                    sequence,
                    first,
                    batch: batch.clone(),
                });
            }
            Step::Resend(p) => {
                let Some(last) = m.producers[*p].clone() else {
                    return;
                };
                let r = self
                    .send(Request::PublishIdempotent {
                        topic: self.topic.clone(),
                        batch: Batch::from_payloads(&last.batch),
                        producer: PRODUCERS[*p],
                        sequence: last.sequence,
                    })
                    .await
                    .unwrap_or_else(|e| panic!("resend failed: {e}; {}", self.ctx()));
                assert_eq!(
                    r,
                    published(last.first, last.batch.len()),
                    "a resend gets its original offsets; {}",
                    self.ctx()
                );
            }
            Step::SkipSequence(p) => {
                let Some(last) = m.producers[*p].clone() else {
                    return;
                };
                let e = self
                    .send(Request::PublishIdempotent {
                        topic: self.topic.clone(),
                        batch: Batch::from_payloads(["gap"]),
                        producer: PRODUCERS[*p],
                        sequence: last.sequence + 2,
                    })
                    .await
                    .expect_err("a sequence gap is refused");
                assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{e}");
                assert!(e.to_string().contains("out-of-order sequence"), "{e}");
            }
            Step::Pull { sub, max } => {
                self.pull(SUBSCRIBERS[*sub], *max, "pull").await;
            }
            Step::Seek { sub, to } => {
                let name = SUBSCRIBERS[*sub];
                let (from, want) = match *to {
                    Seek::Earliest => (StartFrom::Earliest, m.low),
                    Seek::Latest => (StartFrom::Latest, m.next()),
                    Seek::Offset(n) => (StartFrom::Offset(n), n.clamp(m.low, m.next())),
                };
                let got = self
                    .client
                    .subscribe(&self.topic, name, Some(from))
                    .await
                    .unwrap_or_else(|e| panic!("subscribe failed: {e}; {}", self.ctx()));
                assert_eq!(got, want, "subscribe {from:?}; {}", self.ctx());
                self.model.subs.insert(name.to_string(), want);
            }
            Step::Resume(sub) => {
                let name = SUBSCRIBERS[*sub];
                let want = m.position(name);
                let got = self
                    .client
                    .subscribe(&self.topic, name, None)
                    .await
                    .unwrap_or_else(|e| panic!("subscribe failed: {e}; {}", self.ctx()));
                assert_eq!(got, want, "resume {name}; {}", self.ctx());
                self.model.subs.insert(name.to_string(), want);
            }
            Step::Unsubscribe(sub) => {
                let name = SUBSCRIBERS[*sub];
                let r = self.client.unsubscribe(&self.topic, name).await;
                if self.model.subs.remove(name).is_some() {
                    r.unwrap_or_else(|e| panic!("unsubscribe failed: {e}; {}", self.ctx()));
                } else {
                    let e = r.expect_err("unsubscribing a stranger fails");
                    assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}");
                }
            }
            Step::Restart => {
                self.conn.close();
                self.cluster.restart_peer(0).await.expect("restart peer");
                self.conn = Connection::connect(&self.cluster.peer_addr(0), None)
                    .await
                    .expect("reconnect to the peer");
            }
        }
        self.check().await;
    }

    /// Compares the topic with the model: offsets, bytes, positions and every retained
    /// message, read by a fresh subscriber that is removed again.
    async fn check(&mut self) {
        let stats = self
            .client
            .topic_stats(&self.topic)
            .await
            .unwrap_or_else(|e| panic!("stats failed: {e}; {}", self.ctx()));
        let m = &self.model;
        assert_eq!(
            (stats.first_offset, stats.next_offset),
            (m.low, m.next()),
            "first and next offset; {}",
            self.ctx()
        );
        assert_eq!(stats.bytes, m.retained_bytes(), "bytes; {}", self.ctx());

        // Positions below the retained range read from its start either way.
        let listed: BTreeMap<String, u64> = self
            .client
            .subscribers(&self.topic)
            .await
            .unwrap_or_else(|e| panic!("subscribers failed: {e}; {}", self.ctx()))
            .into_iter()
            .map(|s| (s.name, s.next_offset.max(m.low)))
            .collect();
        let want: BTreeMap<String, u64> = m
            .subs
            .iter()
            .map(|(n, &o)| (n.clone(), o.max(m.low)))
            .collect();
        assert_eq!(listed, want, "subscriber positions; {}", self.ctx());

        self.audits += 1;
        let auditor = format!("audit{}", self.audits);
        let got = self
            .client
            .subscribe(&self.topic, &auditor, Some(StartFrom::Earliest))
            .await
            .expect("audit subscribe");
        assert_eq!(got, self.model.low, "earliest; {}", self.ctx());
        while self.pull(&auditor, u32::MAX, "audit read").await > 0 {}
        self.model.subs.remove(&auditor);
        self.client
            .unsubscribe(&self.topic, &auditor)
            .await
            .expect("audit unsubscribe");
    }
}

async fn run(cluster: &mut Cluster, topic: String, keep: Option<u64>, steps: Vec<Step>) {
    let mut h = Harness::start(cluster, topic, keep).await;
    for s in &steps {
        h.step(s).await;
    }
    // Whatever happened last, a restart keeps everything acknowledged.
    h.step(&Step::Restart).await;
    h.conn.close();
    // Deleting the topic keeps the peer small for the next case.
    h.client.delete_topic(&h.topic).await.expect("delete topic");
}

/// Runs the cases on one cluster (starting one costs more than a whole case), each on a
/// topic of its own; restarts restart the shared peer.
#[test]
fn the_log_matches_a_vec_model() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let cluster = rt
        .block_on(Cluster::start_with(ClusterOptions {
            peers: 1,
            durability: Durability::Sync,
            ..ClusterOptions::default()
        }))
        .expect("cluster");
    let cluster = Mutex::new(cluster);
    let cases = AtomicU64::new(0);
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 16,
        // Shrinking a failure should stay bounded.
        max_shrink_iters: 300,
        ..ProptestConfig::default()
    });
    let strategy = (keep(), proptest::collection::vec(step(), 1..48));
    let result = runner.run(&strategy, |(keep, steps)| {
        let topic = format!("log.model.{}", cases.fetch_add(1, Ordering::Relaxed));
        // A failed case panics while holding the lock; the cluster is still usable.
        let mut cluster = cluster.lock().unwrap_or_else(PoisonError::into_inner);
        rt.block_on(run(&mut cluster, topic, keep, steps));
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let mut cluster = cluster.into_inner().unwrap_or_else(PoisonError::into_inner);
    rt.block_on(async {
        cluster.stop_peer(0).await;
        cluster.stop_index().await;
    });
}
