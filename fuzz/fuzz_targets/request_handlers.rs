//! Requests built from the fuzz input sent to a running index and peer over TCP, through
//! the real accept loop and request handlers.
//!
//! Once per process: a runtime, an in-memory index and a peer (memory durability, a share
//! directory with two small files) on 127.0.0.1 port 0, and topics `fz.a` and `fz.b`. For
//! each input: pick the node and an opening (a valid hello mostly; sometimes none, a wrong
//! protocol or garbage), then send a sequence of requests (mostly structured, with names
//! drawn from a small set so they hit existing topics, subscribers and files), raw frames
//! and raw bytes over one fresh connection, and read until every request is answered, the
//! node closes, or a deadline passes. Then the node must still serve a fresh connection.

#![no_main]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use arbitrary::{Arbitrary, Result, Unstructured};
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use peerbus_index::{Index, IndexConfig};
use peerbus_peer::{Durability, Peer, PeerConfig};
use peerbus_proto::{
    Batch, ClientFrame, ErrorCode, FileEntry, FrameCodec, NodeKind, PROTOCOL, PeerAuth,
    RegisterPeer, Request, Response, Retention, ServerFrame, StartFrom, Subscribe, decode_server,
    encode_frame,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio_stream_shim::next_frame;
use tokio_util::sync::CancellationToken;

/// Topics created at start-up (and again after each input, if the input deleted them).
const TOPICS: [&str; 2] = ["fz.a", "fz.b"];

/// The upper bound on one input's conversation. Answers normally take milliseconds.
const DEADLINE: Duration = Duration::from_secs(10);

struct Harness {
    rt: Runtime,
    index: SocketAddr,
    peer: SocketAddr,
    peer_name: String,
    tmp: PathBuf,
    /// Names and hashes of the shared files.
    files: Vec<(String, String)>,
    /// The running index and peer, and the token that would stop them; they serve until
    /// the process ends.
    _nodes: (Index, Peer, CancellationToken),
}

static HARNESS: OnceLock<Harness> = OnceLock::new();

fn harness() -> &'static Harness {
    HARNESS.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let tmp = tempfile::tempdir().expect("temporary directory").keep();
        let share = tmp.join("share");
        std::fs::create_dir_all(share.join("docs")).unwrap();
        std::fs::write(share.join("hello.txt"), b"hello from peerbus\n").unwrap();
        std::fs::write(
            share.join("docs/pieces.bin"),
            (0..5000u32).map(|i| i as u8).collect::<Vec<u8>>(),
        )
        .unwrap();
        std::fs::create_dir_all(tmp.join("out")).unwrap();
        let (index, peer) = rt.block_on(async {
            let stop = CancellationToken::new();
            let index = Index::start(IndexConfig::new("127.0.0.1:0"), stop.clone())
                .await
                .expect("index starts");
            let mut config = PeerConfig::new("127.0.0.1:0", index.addr().to_string());
            config.durability = Durability::Memory;
            config.name = Some("fuzzpeer".into());
            config.share = Some(share.clone());
            config.rescan = Duration::from_secs(3600);
            let peer = Peer::start(config, stop.clone())
                .await
                .expect("peer starts");
            assert!(
                peer.registered(Duration::from_secs(15)).await,
                "peer registered"
            );
            let r = (index.addr(), peer.addr(), peer.name().to_string());
            (r, (index, peer, stop))
        });
        let ((index, peer, peer_name), nodes) = (index, peer);
        let mut h = Harness {
            rt,
            index,
            peer,
            peer_name,
            tmp,
            files: Vec::new(),
            _nodes: nodes,
        };
        let files = h.rt.block_on(async {
            let mut c = Conn::open(peer).await.expect("connect to the peer");
            match c
                .ask(Request::SearchFiles {
                    pattern: String::new(),
                    after: None,
                })
                .await
            {
                Some(Ok(Response::Files(hits))) => hits
                    .into_iter()
                    .map(|f| (f.name, f.hash))
                    .collect::<Vec<_>>(),
                other => panic!("the peer did not list its share: {other:?}"),
            }
        });
        assert_eq!(files.len(), 2, "both shared files are offered");
        h.files = files;
        h.rt.block_on(ensure_topics(h.peer));
        h
    })
}

// ----- A minimal client over a raw socket, so nothing the client library does hides what
// the node sends. -----

mod tokio_stream_shim {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio_util::codec::Decoder;

    /// Reads one frame body; `None` at end of stream or on a socket error.
    pub async fn next_frame<R: AsyncReadExt + Unpin>(
        r: &mut R,
        buf: &mut BytesMut,
        codec: &mut FrameCodec,
    ) -> Option<BytesMut> {
        loop {
            match codec.decode(buf) {
                Ok(Some(body)) => return Some(body),
                Ok(None) => {}
                Err(e) => panic!("the node sent an unsplittable frame: {e}"),
            }
            match r.read_buf(buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }
}

struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    codec: FrameCodec,
    next_id: u32,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Option<Conn> {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let _ = stream.set_nodelay(true);
        let mut out = BytesMut::new();
        encode_frame(
            &ClientFrame::Hello {
                protocol: PROTOCOL.into(),
                token: None,
            },
            &mut out,
        )
        .unwrap();
        stream.write_all(&out).await.ok()?;
        let mut c = Conn {
            stream,
            buf: BytesMut::new(),
            codec: FrameCodec::default(),
            next_id: 1,
        };
        match c.read().await? {
            ServerFrame::Welcome { .. } => Some(c),
            _ => None,
        }
    }

    async fn read(&mut self) -> Option<ServerFrame> {
        let body = next_frame(&mut self.stream, &mut self.buf, &mut self.codec).await?;
        Some(decode_server(&body).expect("the node sent a frame that does not decode"))
    }

    async fn ask(&mut self, req: Request) -> Option<Result<Response, peerbus_proto::WireError>> {
        let id = self.next_id;
        self.next_id += 1;
        let mut out = BytesMut::new();
        encode_frame(
            &ClientFrame::Request {
                id,
                forward: true,
                body: req,
            },
            &mut out,
        )
        .unwrap();
        self.stream.write_all(&out).await.ok()?;
        loop {
            match self.read().await? {
                ServerFrame::Response { id: got, body } if got == id => return Some(body),
                _ => {}
            }
        }
    }
}

fn base_retention() -> Retention {
    Retention {
        max_messages: Some(1000),
        max_bytes: Some(1 << 20),
        max_age_secs: None,
        consumed: false,
    }
}

/// Creates the base topics on the peer if an input deleted them.
async fn ensure_topics(peer: SocketAddr) {
    let mut c = Conn::open(peer).await.expect("connect to the peer");
    for t in TOPICS {
        match c
            .ask(Request::CreateTopic {
                topic: t.into(),
                retention: base_retention(),
                peer: None,
            })
            .await
        {
            Some(Ok(_)) => {}
            Some(Err(e)) if e.code == ErrorCode::Exists => {}
            other => panic!("creating topic {t} failed: {other:?}"),
        }
    }
}

/// The node must still serve: a fresh connection, a ping, and a topic listing.
async fn still_serves(addr: SocketAddr, what: &str) {
    let check = async {
        let mut c = Conn::open(addr)
            .await
            .ok_or("no welcome on a fresh connection")?;
        match c.ask(Request::Ping).await {
            Some(Ok(Response::Pong)) => {}
            _ => return Err("no pong"),
        }
        match c.ask(Request::ListTopics {
            prefix: None,
            after: None,
        }).await {
            Some(Ok(Response::Topics(_))) => Ok(()),
            _ => Err("list topics failed"),
        }
    };
    match tokio::time::timeout(Duration::from_secs(20), check).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("the {what} stopped serving: {e}"),
        Err(_) => panic!("the {what} stopped serving: no answer within 20 s"),
    }
}

// ----- Building requests from the fuzz input. -----

fn pick<'a>(u: &mut Unstructured, names: &[&'a str]) -> Result<String> {
    // Mostly a known name; sometimes whatever the input says.
    if u.ratio(1, 8)? {
        Ok(String::arbitrary(u)?)
    } else {
        Ok((*u.choose(names)?).to_string())
    }
}

fn topic(u: &mut Unstructured) -> Result<String> {
    pick(
        u,
        &[
            "fz.a", "fz.a", "fz.b", "fz.c", "fz", "bad name", "", "a..b", "fz.a.",
        ],
    )
}

fn subscriber(u: &mut Unstructured) -> Result<String> {
    pick(u, &["s1", "s1", "s2", "s3", "bad sub", ""])
}

fn auth(u: &mut Unstructured) -> Result<PeerAuth> {
    Ok(PeerAuth {
        peer_id: u.int_in_range(0..=4)?,
        cookie: pick(u, &["", "cookie", "0000000000000000"])?,
    })
}

fn addr(u: &mut Unstructured, h: &Harness) -> Result<String> {
    // Never arbitrary: the index may connect to it, and a host name would go to DNS.
    let peer = h.peer.to_string();
    let index = h.index.to_string();
    Ok(u.choose(&[
        peer,
        index,
        "127.0.0.1:1".into(),
        "nonsense".into(),
        String::new(),
    ])?
    .clone())
}

fn peer_name(u: &mut Unstructured, h: &Harness) -> Result<String> {
    let names = [h.peer_name.as_str(), "fzp1", "fzp2", "bad name", ""];
    pick(u, &names)
}

fn file_key(u: &mut Unstructured, h: &Harness) -> Result<String> {
    let mut keys: Vec<&str> = Vec::new();
    for (name, hash) in &h.files {
        keys.push(name);
        keys.push(hash);
    }
    keys.extend(["hello", "../etc/passwd", "", "0000"]);
    pick(u, &keys)
}

fn hash(u: &mut Unstructured, h: &Harness) -> Result<String> {
    let hashes: Vec<&str> = h
        .files
        .iter()
        .map(|(_, hash)| hash.as_str())
        .chain([
            "",
            "zz",
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
        ])
        .collect();
    pick(u, &hashes)
}

fn batch(u: &mut Unstructured) -> Result<Batch> {
    let n = u.int_in_range(0..=8)?;
    let mut payloads = Vec::with_capacity(n);
    for _ in 0..n {
        let len = u.int_in_range(0..=64)?;
        payloads.push(u.bytes(len)?.to_vec());
    }
    let mut b = Batch::from_payloads(payloads);
    if u.ratio(1, 8)? {
        // Lengths that do not add up to the data.
        b.lens = Vec::<u32>::arbitrary(u)?;
    }
    if u.ratio(1, 16)? {
        b.data = Bytes::from(Vec::<u8>::arbitrary(u)?);
    }
    Ok(b)
}

fn retention(u: &mut Unstructured) -> Result<Retention> {
    Ok(Retention {
        max_messages: Option::<u64>::arbitrary(u)?,
        max_bytes: Option::<u64>::arbitrary(u)?,
        max_age_secs: Option::<u64>::arbitrary(u)?,
        consumed: bool::arbitrary(u)?,
    })
}

fn small_u64(u: &mut Unstructured) -> Result<u64> {
    if u.ratio(1, 4)? {
        u64::arbitrary(u)
    } else {
        u.int_in_range(0..=20)
    }
}

fn request(u: &mut Unstructured, h: &Harness) -> Result<Request> {
    Ok(match u.int_in_range(0..=34u8)? {
        0 => Request::Ping,
        1 => Request::Register(RegisterPeer {
            name: peer_name(u, h)?,
            addr: addr(u, h)?,
            http: if bool::arbitrary(u)? {
                Some(addr(u, h)?)
            } else {
                None
            },
            previous: if bool::arbitrary(u)? {
                Some(auth(u)?)
            } else {
                None
            },
            keeps_identity: bool::arbitrary(u)?,
        }),
        2 => Request::Keepalive(auth(u)?),
        3 => Request::Leave(auth(u)?),
        4 => Request::ListPeers {
            after: if u.ratio(1, 3)? {
                Some(small_u64(u)?)
            } else {
                None
            },
        },
        5 => Request::AnnounceTopics {
            auth: auth(u)?,
            topics: vec![topic(u)?, topic(u)?],
            replace: bool::arbitrary(u)?,
        },
        6 => Request::WithdrawTopics {
            auth: auth(u)?,
            topics: vec![topic(u)?],
        },
        7 => Request::LookupTopic { topic: topic(u)? },
        8 => Request::ListTopics {
            prefix: if bool::arbitrary(u)? {
                Some(pick(u, &["fz", "fz.", ""])?)
            } else {
                None
            },
            after: if bool::arbitrary(u)? {
                Some(pick(u, &["fz.a", "fz", "zz", ""])?)
            } else {
                None
            },
        },
        9 => Request::CreateTopic {
            topic: topic(u)?,
            retention: retention(u)?,
            peer: if u.ratio(1, 3)? {
                Some(if bool::arbitrary(u)? {
                    peer_name(u, h)?
                } else {
                    addr(u, h)?
                })
            } else {
                None
            },
        },
        10 => Request::DeleteTopic { topic: topic(u)? },
        11 => Request::Publish {
            topic: topic(u)?,
            batch: batch(u)?,
        },
        12 => Request::Subscribe(Subscribe {
            topic: topic(u)?,
            subscriber: subscriber(u)?,
            from: match u.int_in_range(0..=3)? {
                0 => None,
                1 => Some(StartFrom::Earliest),
                2 => Some(StartFrom::Latest),
                _ => Some(StartFrom::Offset(small_u64(u)?)),
            },
            follow: if bool::arbitrary(u)? {
                Some(small_u64(u)?)
            } else {
                None
            },
        }),
        13 => Request::Pull {
            topic: topic(u)?,
            subscriber: subscriber(u)?,
            max: if bool::arbitrary(u)? {
                u32::arbitrary(u)?
            } else {
                u.int_in_range(0..=4)?
            },
            // Long polls stay short: the harness waits for every answer.
            wait_ms: u.int_in_range(0..=50)?,
            commit: if bool::arbitrary(u)? {
                Some(small_u64(u)?)
            } else {
                None
            },
        },
        14 => Request::Unsubscribe {
            topic: topic(u)?,
            subscriber: subscriber(u)?,
        },
        15 => Request::Subscribers { topic: topic(u)? },
        16 => Request::StopFollow { sub: small_u64(u)? },
        17 => Request::TopicStats { topic: topic(u)? },
        18 => Request::RegisterFiles {
            auth: auth(u)?,
            files: vec![FileEntry {
                name: file_key(u, h)?,
                hash: hash(u, h)?,
                size: small_u64(u)?,
            }],
            replace: bool::arbitrary(u)?,
        },
        19 => Request::UnregisterFiles {
            auth: auth(u)?,
            hashes: vec![hash(u, h)?],
        },
        20 => Request::SearchFiles {
            pattern: pick(u, &["", "hello", "PIECES", "docs/", "x"])?,
            after: if u.ratio(1, 3)? {
                Some((pick(u, &["", "hello.txt", "z"])?, file_key(u, h)?))
            } else {
                None
            },
        },
        21 => Request::LookupFile {
            key: file_key(u, h)?,
        },
        22 => Request::FileManifest { hash: hash(u, h)? },
        23 => Request::ReadPiece {
            hash: hash(u, h)?,
            index: if bool::arbitrary(u)? {
                u32::arbitrary(u)?
            } else {
                u.int_in_range(0..=5)?
            },
        },
        24 => Request::Fetch {
            key: file_key(u, h)?,
        },
        25 => Request::RegisterParticipant {
            name: subscriber(u)?,
        },
        26 => Request::UnregisterParticipant {
            name: subscriber(u)?,
        },
        27 => Request::ListParticipants,
        28 => Request::ParticipantExists {
            name: subscriber(u)?,
        },
        29 => Request::PublishIdempotent {
            topic: topic(u)?,
            batch: batch(u)?,
            producer: u.int_in_range(0..=3)?,
            sequence: small_u64(u)?,
        },
        32 => Request::SyncTopics {
            auth: auth(u)?,
            generation: u.int_in_range(0..=2)?,
            topics: vec![topic(u)?, topic(u)?],
            last: bool::arbitrary(u)?,
        },
        33 => Request::SyncFiles {
            auth: auth(u)?,
            generation: u.int_in_range(0..=2)?,
            files: Vec::new(),
            last: bool::arbitrary(u)?,
        },
        31 => Request::Ack {
            topic: topic(u)?,
            subscriber: subscriber(u)?,
            offset: small_u64(u)?,
        },
        34 => Request::NodeStats,
        _ => Request::CreateTopics {
            topics: vec![topic(u)?, topic(u)?, topic(u)?],
            retention: retention(u)?,
            peer: if u.ratio(1, 3)? {
                Some(peer_name(u, h)?)
            } else {
                None
            },
        },
    })
}

/// Fails to compile when a request kind is added without teaching [`request`] to build it.
#[allow(dead_code)]
fn every_request_kind_is_generated(r: &Request) -> u8 {
    match r {
        Request::Ping => 0,
        Request::Register(_) => 1,
        Request::Keepalive(_) => 2,
        Request::Leave(_) => 3,
        Request::ListPeers { .. } => 4,
        Request::AnnounceTopics { .. } => 5,
        Request::WithdrawTopics { .. } => 6,
        Request::LookupTopic { .. } => 7,
        Request::ListTopics { .. } => 8,
        Request::CreateTopic { .. } => 9,
        Request::DeleteTopic { .. } => 10,
        Request::Publish { .. } => 11,
        Request::Subscribe(_) => 12,
        Request::Pull { .. } => 13,
        Request::Unsubscribe { .. } => 14,
        Request::Subscribers { .. } => 15,
        Request::StopFollow { .. } => 16,
        Request::TopicStats { .. } => 17,
        Request::RegisterFiles { .. } => 18,
        Request::UnregisterFiles { .. } => 19,
        Request::SearchFiles { .. } => 20,
        Request::LookupFile { .. } => 21,
        Request::FileManifest { .. } => 22,
        Request::ReadPiece { .. } => 23,
        Request::Fetch { .. } => 24,
        Request::RegisterParticipant { .. } => 25,
        Request::UnregisterParticipant { .. } => 26,
        Request::ListParticipants => 27,
        Request::ParticipantExists { .. } => 28,
        Request::PublishIdempotent { .. } => 29,
        Request::CreateTopics { .. } => 30,
        Request::Ack { .. } => 31,
        Request::SyncTopics { .. } => 32,
        Request::SyncFiles { .. } => 33,
        Request::NodeStats => 34,
    }
}

/// One thing sent on the connection.
#[derive(Debug)]
enum Op {
    /// A structured request, with the id the harness gave it.
    Request {
        id: u32,
        forward: bool,
        req: Request,
    },
    /// A frame with a valid length prefix and an arbitrary body.
    RawFrame(Vec<u8>),
    /// Bytes with no framing at all.
    RawBytes(Vec<u8>),
    /// A second hello.
    Hello,
}

/// How the connection starts.
#[derive(Debug, PartialEq)]
enum Opening {
    Hello { token: Option<String> },
    WrongProtocol(String),
    Garbage(Vec<u8>),
    Nothing,
}

fn conversation(u: &mut Unstructured, h: &Harness) -> Result<(Opening, Vec<Op>)> {
    let opening = match u.int_in_range(0..=15u8)? {
        0..=11 => Opening::Hello {
            token: Option::<String>::arbitrary(u)?,
        },
        12 => Opening::WrongProtocol(String::arbitrary(u)?),
        13 => Opening::Garbage(Vec::<u8>::arbitrary(u)?),
        _ => Opening::Nothing,
    };
    let mut ops = Vec::new();
    let mut id = 1_000_000u32;
    while !u.is_empty() && ops.len() < 24 {
        let op = match u.int_in_range(0..=31u8)? {
            0 => Op::RawFrame(Vec::<u8>::arbitrary(u)?),
            1 => Op::RawBytes(Vec::<u8>::arbitrary(u)?),
            2 => Op::Hello,
            _ => {
                id += 1;
                Op::Request {
                    id,
                    forward: u.ratio(3, 4)?,
                    req: request(u, h)?,
                }
            }
        };
        ops.push(op);
    }
    Ok((opening, ops))
}

fn frame(f: &ClientFrame, out: &mut BytesMut) {
    encode_frame(f, out).expect("a client frame encodes");
}

async fn run(h: &Harness, to_peer: bool, opening: Opening, ops: Vec<Op>) {
    let (addr, kind) = if to_peer {
        (h.peer, NodeKind::Peer)
    } else {
        (h.index, NodeKind::Index)
    };
    let Ok(stream) = TcpStream::connect(addr).await else {
        panic!("cannot connect to the {kind:?}");
    };
    let _ = stream.set_nodelay(true);
    let mut out = BytesMut::new();
    // A "wrong" protocol the input spelled right is a valid hello too.
    let hello_ok = match &opening {
        Opening::Hello { .. } => true,
        Opening::WrongProtocol(p) => p == PROTOCOL,
        _ => false,
    };
    match &opening {
        Opening::Hello { token } => frame(
            &ClientFrame::Hello {
                protocol: PROTOCOL.into(),
                token: token.clone(),
            },
            &mut out,
        ),
        Opening::WrongProtocol(p) => frame(
            &ClientFrame::Hello {
                protocol: p.clone(),
                token: None,
            },
            &mut out,
        ),
        Opening::Garbage(g) => out.extend_from_slice(g),
        Opening::Nothing => {}
    }
    // Every request must be answered when nothing but requests follows a valid hello.
    let only_requests = hello_ok && ops.iter().all(|o| matches!(o, Op::Request { .. }));
    let mut pending = std::collections::HashMap::new();
    for op in &ops {
        match op {
            Op::Request { id, forward, req } => {
                pending.insert(*id, req.clone());
                frame(
                    &ClientFrame::Request {
                        id: *id,
                        forward: *forward,
                        body: req.clone(),
                    },
                    &mut out,
                );
            }
            Op::RawFrame(body) => {
                out.extend_from_slice(&(body.len() as u32).to_be_bytes());
                out.extend_from_slice(body);
            }
            Op::RawBytes(b) => out.extend_from_slice(b),
            Op::Hello => frame(
                &ClientFrame::Hello {
                    protocol: PROTOCOL.into(),
                    token: None,
                },
                &mut out,
            ),
        }
    }

    let (mut r, mut w) = stream.into_split();
    // Written from its own task, so a node that answers while the harness is still writing
    // cannot deadlock the two.
    let writer = tokio::spawn(async move {
        let _ = w.write_all(&out).await;
        if !only_requests {
            // End of stream: a node still waiting for a hello or the rest of a frame
            // closes instead of waiting out its timeouts.
            let _ = w.shutdown().await;
        }
        w
    });
    let mut buf = BytesMut::new();
    let mut codec = FrameCodec::default();
    let mut first = true;
    let read = async {
        while !(only_requests && pending.is_empty() && !first) {
            let Some(body) = next_frame(&mut r, &mut buf, &mut codec).await else {
                break;
            };
            let f = decode_server(&body).expect("the node sent a frame that does not decode");
            if first {
                first = false;
                if hello_ok {
                    match &f {
                        ServerFrame::Welcome { node, .. } => assert_eq!(*node, kind),
                        other => panic!("a valid hello got {other:?}"),
                    }
                } else {
                    // Garbage may happen to spell a valid hello; anything else is refused.
                    assert!(
                        matches!(f, ServerFrame::Refused(_) | ServerFrame::Welcome { .. }),
                        "a connection without a valid hello got {f:?}"
                    );
                }
                continue;
            }
            match f {
                ServerFrame::Response { id, body } => {
                    if let Some(req) = pending.remove(&id) {
                        check_answer(&req, &body);
                    } else {
                        assert!(
                            !only_requests,
                            "response to request {id}, which was not asked (or answered twice)"
                        );
                    }
                }
                ServerFrame::Welcome { .. } => panic!("a second welcome"),
                ServerFrame::Delivery { messages, .. } => {
                    messages.batch.check().expect("a delivery's batch adds up");
                    assert_eq!(messages.timestamps.len(), messages.batch.len());
                }
                ServerFrame::Refused(_) | ServerFrame::SubscriptionEnded { .. } => {}
            }
        }
    };
    let done = tokio::time::timeout(DEADLINE, read).await.is_ok();
    if only_requests {
        // Fetch downloads a file and may be slow; everything else answers at once.
        let unanswered: Vec<_> = pending
            .values()
            .filter(|r| !matches!(r, Request::Fetch { .. }))
            .map(Request::kind)
            .collect();
        assert!(
            done || unanswered.is_empty(),
            "the {kind:?} left requests unanswered for {DEADLINE:?}: {unanswered:?}"
        );
    }
    drop(r);
    if let Ok(w) = writer.await {
        drop(w);
    }
}

/// What must hold of any answer, whatever the request was.
fn check_answer(req: &Request, body: &std::result::Result<Response, peerbus_proto::WireError>) {
    match (req, body) {
        (Request::Ping, r) => assert_eq!(r, &Ok(Response::Pong)),
        // (A repeated idempotent publish is answered with the offsets of the first, so
        // only plain publishes are checked against their batch.)
        (Request::Publish { batch, .. }, Ok(Response::Published { count, .. })) => {
            assert!(
                batch.check().is_ok(),
                "a batch that does not add up was stored"
            );
            assert_eq!(*count as usize, batch.len(), "publish stored another count");
        }
        (Request::Pull { max, .. }, Ok(Response::Messages(set))) => {
            set.batch.check().expect("a pulled batch adds up");
            assert_eq!(set.timestamps.len(), set.batch.len());
            assert!(set.len() <= *max as usize, "pull returned over max");
        }
        (_, Err(e)) => assert!(!e.message.is_empty(), "an error without a message"),
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    let mut u = Unstructured::new(data);
    let Ok(to_peer) = bool::arbitrary(&mut u) else {
        return;
    };
    let Ok((opening, ops)) = conversation(&mut u, h) else {
        return;
    };
    // Only these can remove a base topic (a raw frame might spell a delete).
    let may_delete = matches!(opening, Opening::Garbage(_))
        || ops.iter().any(|o| {
            matches!(
                o,
                Op::Request {
                    req: Request::DeleteTopic { .. },
                    ..
                } | Op::RawFrame(_)
                    | Op::RawBytes(_)
            )
        });
    if std::env::var_os("PEERBUS_FUZZ_DEBUG").is_some() {
        eprintln!("to_peer={to_peer} opening={opening:?}");
        for op in &ops {
            eprintln!("  {op:?}");
        }
    }
    h.rt.block_on(async {
        run(h, to_peer, opening, ops).await;
        let addr = if to_peer { h.peer } else { h.index };
        still_serves(addr, if to_peer { "peer" } else { "index" }).await;
        if may_delete {
            ensure_topics(h.peer).await;
        }
    });
});
