use peerbus_proto::Request;

/// One line describing a request for `--trace-messages`: its kind and arguments, with
/// payloads reduced to counts and sizes so a line stays a line.
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
            "withdraw_topics peer_id={} topics={:?}",
            auth.peer_id, topics
        ),
        other => format!("{other:?}"),
    }
}
