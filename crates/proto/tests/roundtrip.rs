//! Every wire message survives encode → frame split → decode unchanged.

use bytes::BytesMut;
use peerbus_proto::*;
use proptest::prelude::*;
use tokio_util::codec::Decoder;

fn name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9.]{0,12}"
}

fn batch() -> impl Strategy<Value = Batch> {
    prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 0..6)
        .prop_map(Batch::from_payloads)
}

fn auth() -> impl Strategy<Value = PeerAuth> {
    (any::<u64>(), name()).prop_map(|(peer_id, cookie)| PeerAuth { peer_id, cookie })
}

fn retention() -> impl Strategy<Value = Retention> {
    (
        any::<Option<u64>>(),
        any::<Option<u64>>(),
        any::<Option<u64>>(),
        any::<bool>(),
    )
        .prop_map(
            |(max_messages, max_bytes, max_age_secs, consumed)| Retention {
                max_messages,
                max_bytes,
                max_age_secs,
                consumed,
            },
        )
}

fn start() -> impl Strategy<Value = StartFrom> {
    prop_oneof![
        Just(StartFrom::Earliest),
        Just(StartFrom::Latest),
        any::<u64>().prop_map(StartFrom::Offset)
    ]
}

fn message_set() -> impl Strategy<Value = MessageSet> {
    (name(), any::<u64>(), batch()).prop_flat_map(|(topic, first_offset, batch)| {
        let n = batch.len();
        prop::collection::vec(any::<u64>(), n).prop_map(move |timestamps| MessageSet {
            topic: topic.clone(),
            first_offset,
            timestamps,
            batch: batch.clone(),
        })
    })
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        Just(Request::Ping),
        (
            name(),
            name(),
            any::<Option<String>>(),
            prop::option::of(auth()),
            any::<bool>()
        )
            .prop_map(|(name, addr, http, previous, keeps_identity)| {
                Request::Register(RegisterPeer {
                    name,
                    addr,
                    http,
                    previous,
                    keeps_identity,
                })
            }),
        auth().prop_map(Request::Keepalive),
        auth().prop_map(Request::Leave),
        any::<Option<u64>>().prop_map(|after| Request::ListPeers { after }),
        (auth(), prop::collection::vec(name(), 0..4), any::<bool>()).prop_map(
            |(auth, topics, replace)| Request::AnnounceTopics {
                auth,
                topics,
                replace
            }
        ),
        (auth(), prop::collection::vec(name(), 0..4))
            .prop_map(|(auth, topics)| Request::WithdrawTopics { auth, topics }),
        name().prop_map(|topic| Request::LookupTopic { topic }),
        (prop::option::of(name()), prop::option::of(name()))
            .prop_map(|(prefix, after)| Request::ListTopics { prefix, after }),
        (name(), retention(), prop::option::of(name())).prop_map(|(topic, retention, peer)| {
            Request::CreateTopic {
                topic,
                retention,
                peer,
            }
        }),
        (
            prop::collection::vec(name(), 0..4),
            retention(),
            prop::option::of(name())
        )
            .prop_map(|(topics, retention, peer)| Request::CreateTopics {
                topics,
                retention,
                peer,
            }),
        name().prop_map(|topic| Request::DeleteTopic { topic }),
        (name(), batch()).prop_map(|(topic, batch)| Request::Publish { topic, batch }),
        (name(), batch(), any::<u64>(), any::<u64>()).prop_map(
            |(topic, batch, producer, sequence)| Request::PublishIdempotent {
                topic,
                batch,
                producer,
                sequence,
            }
        ),
        (
            name(),
            name(),
            prop::option::of(start()),
            any::<Option<u64>>()
        )
            .prop_map(
                |(topic, subscriber, from, follow)| Request::Subscribe(Subscribe {
                    topic,
                    subscriber,
                    from,
                    follow
                })
            ),
        (
            name(),
            name(),
            any::<u32>(),
            any::<u32>(),
            any::<Option<u64>>()
        )
            .prop_map(|(topic, subscriber, max, wait_ms, commit)| Request::Pull {
                topic,
                subscriber,
                max,
                wait_ms,
                commit
            }),
        (name(), name(), any::<u64>()).prop_map(|(topic, subscriber, offset)| Request::Ack {
            topic,
            subscriber,
            offset
        }),
        (name(), name()).prop_map(|(topic, subscriber)| Request::Unsubscribe { topic, subscriber }),
        name().prop_map(|topic| Request::Subscribers { topic }),
        any::<u64>().prop_map(|sub| Request::StopFollow { sub }),
        name().prop_map(|topic| Request::TopicStats { topic }),
    ]
}

fn error() -> impl Strategy<Value = WireError> {
    (0usize..11, ".{0,20}").prop_map(|(c, message)| {
        let code = [
            ErrorCode::NotFound,
            ErrorCode::Exists,
            ErrorCode::BadRequest,
            ErrorCode::Unauthorized,
            ErrorCode::NotHost,
            ErrorCode::Unavailable,
            ErrorCode::Internal,
            ErrorCode::TooLarge,
            ErrorCode::Unsupported,
            ErrorCode::LimitReached,
            ErrorCode::UnknownProducer,
        ][c];
        WireError { code, message }
    })
}

fn location() -> impl Strategy<Value = TopicLocation> {
    (name(), any::<u64>(), name(), name()).prop_map(|(topic, peer_id, peer_name, addr)| {
        TopicLocation {
            topic,
            peer_id,
            peer_name,
            addr,
        }
    })
}

fn response() -> impl Strategy<Value = Response> {
    prop_oneof![
        Just(Response::Ok),
        Just(Response::Pong),
        (any::<u64>(), name(), any::<u64>(), any::<u32>()).prop_map(
            |(peer_id, cookie, ttl_secs, registrations)| Response::Registered {
                peer_id,
                cookie,
                ttl_secs,
                registrations
            }
        ),
        prop::collection::vec(
            (
                any::<u64>(),
                name(),
                name(),
                any::<Option<String>>(),
                any::<bool>(),
                any::<(u32, u64, u64, u32, u32)>()
            ),
            0..3
        )
        .prop_map(|v| Response::Peers(
            v.into_iter()
                .map(
                    |(id, name, addr, http, active, (r, l, t, tp, f))| PeerInfo {
                        id,
                        name,
                        addr,
                        http,
                        active,
                        registrations: r,
                        last_registered_ms: l,
                        ttl_left_ms: t,
                        topics: tp,
                        files: f
                    }
                )
                .collect()
        )),
        location().prop_map(Response::Location),
        prop::collection::vec((any::<u64>(), name(), name(), any::<u64>()), 0..3).prop_map(|v| {
            Response::Created(
                v.into_iter()
                    .map(|(peer_id, peer_name, addr, count)| CreatedOn {
                        peer_id,
                        peer_name,
                        addr,
                        count,
                    })
                    .collect(),
            )
        }),
        prop::collection::vec(location(), 0..3).prop_map(Response::Topics),
        any::<(u64, u32)>().prop_map(|(first_offset, count)| Response::Published {
            first_offset,
            count
        }),
        any::<u64>().prop_map(|next_offset| Response::Subscribed { next_offset }),
        message_set().prop_map(Response::Messages),
        prop::collection::vec((name(), any::<u64>()), 0..3).prop_map(|v| Response::Subscribers(
            v.into_iter()
                .map(|(name, next_offset)| SubscriberInfo { name, next_offset })
                .collect()
        )),
        (name(), any::<(u64, u64, u64, u32)>(), retention()).prop_map(
            |(topic, (first_offset, next_offset, bytes, subscribers), retention)| {
                Response::TopicStats(TopicStats {
                    topic,
                    first_offset,
                    next_offset,
                    bytes,
                    subscribers,
                    retention,
                })
            }
        ),
    ]
}

fn client_frame() -> impl Strategy<Value = ClientFrame> {
    prop_oneof![
        (".{0,12}", any::<Option<String>>())
            .prop_map(|(protocol, token)| ClientFrame::Hello { protocol, token }),
        (any::<u32>(), any::<bool>(), request())
            .prop_map(|(id, forward, body)| ClientFrame::Request { id, forward, body }),
    ]
}

fn server_frame() -> impl Strategy<Value = ServerFrame> {
    prop_oneof![
        (".{0,12}", ".{0,12}", any::<bool>()).prop_map(|(protocol, version, idx)| {
            ServerFrame::Welcome {
                protocol,
                version,
                node: if idx { NodeKind::Index } else { NodeKind::Peer },
            }
        }),
        error().prop_map(ServerFrame::Refused),
        (any::<u32>(), response()).prop_map(|(id, r)| ServerFrame::Response { id, body: Ok(r) }),
        (any::<u32>(), error()).prop_map(|(id, e)| ServerFrame::Response { id, body: Err(e) }),
        (any::<u64>(), message_set())
            .prop_map(|(sub, messages)| ServerFrame::Delivery { sub, messages }),
        (any::<u64>(), error())
            .prop_map(|(sub, reason)| ServerFrame::SubscriptionEnded { sub, reason }),
    ]
}

fn through_codec(buf: &mut BytesMut) -> BytesMut {
    let mut codec = FrameCodec::default();
    let body = codec.decode(buf).unwrap().expect("a whole frame");
    assert!(buf.is_empty(), "the frame must consume exactly its bytes");
    body
}

proptest! {
    #[test]
    fn client_frames_round_trip(frame in client_frame()) {
        let mut buf = BytesMut::new();
        encode_frame(&frame, &mut buf).unwrap();
        let body = through_codec(&mut buf);
        prop_assert_eq!(decode_client(&body).unwrap(), frame);
    }

    #[test]
    fn server_frames_round_trip(frame in server_frame()) {
        let mut buf = BytesMut::new();
        encode_frame(&frame, &mut buf).unwrap();
        let body = through_codec(&mut buf);
        prop_assert_eq!(decode_server(&body).unwrap(), frame);
    }

    #[test]
    fn batches_slice_back_into_their_payloads(payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..10)) {
        let b = Batch::from_payloads(&payloads);
        prop_assert!(b.check().is_ok());
        let back: Vec<Vec<u8>> = b.iter().map(|p| p.to_vec()).collect();
        prop_assert_eq!(back, payloads);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let mut codec = FrameCodec::new(1024);
        let mut src = BytesMut::from(&bytes[..]);
        while let Ok(Some(body)) = codec.decode(&mut src) {
            let _ = decode_client(&body);
            let _ = decode_server(&body);
        }
    }
}
