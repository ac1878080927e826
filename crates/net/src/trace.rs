use peerbus_proto::Request;

/// One line describing a request for `--trace-messages`: its kind and arguments, with
/// payloads and name lists reduced to counts and sizes so a line stays a line, and never a
/// cookie or a payload byte (logs are for people to read, not to hold secrets).
pub fn summarize(req: &Request) -> String {
    match req {
        Request::Publish { topic, batch } => format!(
            "publish topic={topic} messages={} bytes={}",
            batch.len(),
            batch.data.len()
        ),
        Request::Register(r) => format!(
            "register name={} addr={} http={:?} rejoin={}",
            r.name,
            r.addr,
            r.http,
            r.previous.as_ref().map(|p| p.peer_id).is_some()
        ),
        Request::Keepalive(a) => format!("keepalive peer_id={}", a.peer_id),
        Request::Leave(a) => format!("leave peer_id={}", a.peer_id),
        Request::AnnounceTopics {
            auth,
            topics,
            replace,
        } => format!(
            "announce_topics peer_id={} topics={} replace={replace}",
            auth.peer_id,
            topics.len()
        ),
        Request::WithdrawTopics { auth, topics } => format!(
            "withdraw_topics peer_id={} topics={}",
            auth.peer_id,
            topics.len()
        ),
        Request::PublishIdempotent {
            topic,
            batch,
            producer,
            sequence,
        } => format!(
            "publish_idempotent topic={topic} producer={producer:x} sequence={sequence} \
             messages={} bytes={}",
            batch.len(),
            batch.data.len()
        ),
        Request::RegisterFiles {
            auth,
            files,
            replace,
        } => format!(
            "register_files peer_id={} files={} replace={replace}",
            auth.peer_id,
            files.len()
        ),
        Request::UnregisterFiles { auth, hashes } => format!(
            "unregister_files peer_id={} files={}",
            auth.peer_id,
            hashes.len()
        ),
        Request::SyncTopics {
            auth,
            generation,
            topics,
            last,
        } => format!(
            "sync_topics peer_id={} generation={generation} topics={} last={last}",
            auth.peer_id,
            topics.len()
        ),
        Request::SyncFiles {
            auth,
            generation,
            files,
            last,
        } => format!(
            "sync_files peer_id={} generation={generation} files={} last={last}",
            auth.peer_id,
            files.len()
        ),
        Request::CreateTopics {
            topics,
            retention,
            peer,
        } => format!(
            "create_topics topics={} retention={retention:?} peer={peer:?}",
            topics.len()
        ),
        // The rest carry names and numbers only.
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peerbus_proto::{Batch, FileEntry, PeerAuth};

    #[test]
    fn trace_lines_carry_no_cookie_and_no_payload() {
        let auth = PeerAuth {
            peer_id: 7,
            cookie: "s3cret-cookie".into(),
        };
        let secret = b"payload-bytes".as_slice();
        for req in [
            Request::RegisterFiles {
                auth: auth.clone(),
                files: vec![FileEntry {
                    name: "f".into(),
                    hash: "a".repeat(64),
                    size: 1,
                }],
                replace: true,
            },
            Request::UnregisterFiles {
                auth: auth.clone(),
                hashes: vec!["a".repeat(64)],
            },
            Request::SyncTopics {
                auth: auth.clone(),
                generation: 1,
                topics: vec!["t".into()],
                last: true,
            },
            Request::PublishIdempotent {
                topic: "t".into(),
                batch: Batch::from_payloads([secret]),
                producer: 1,
                sequence: 2,
            },
            Request::Keepalive(auth.clone()),
        ] {
            let line = summarize(&req);
            assert!(!line.contains("s3cret"), "{line}");
            assert!(!line.contains("payload-bytes"), "{line}");
        }
    }
}
