//! The JSON API under `/api/v1`.

use std::collections::HashSet;
use std::convert::Infallible;
use std::time::{Duration, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::{Stream, StreamExt, stream};
use peerbus_client::{
    Client, FileHit, Message, PeerInfo, Retention, StartFrom, Subscription, TopicLocation,
    TopicStats,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::classic::Placed;
use crate::error::{ApiError, ErrorBody, JsonBody, P, Q};

/// Hosts asked for topic statistics at once when listing topics.
const STATS_CONCURRENCY: usize = 32;
/// Messages one v1 pull returns when the request does not say.
const DEFAULT_PULL: u32 = 100;
/// The longest a v1 pull may wait for a publish, so a request cannot hold a host's
/// waiter (and an HTTP connection) for hours.
const MAX_WAIT_MS: u32 = 60_000;

/// Which node serves this gateway.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct NodeView {
    /// This node's name.
    pub node: String,
    /// The index the gateway asks.
    pub index: String,
}

/// A peer as the index knows it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PeerView {
    /// Id given by the index.
    id: u64,
    /// Name.
    name: String,
    /// Binary protocol address.
    addr: String,
    /// HTTP address, if it serves HTTP.
    http: Option<String>,
    /// Holds a live lease.
    active: bool,
    /// Registrations in the last 30 days.
    registrations: u32,
    /// Time of the last registration, RFC 3339.
    last_registered: String,
    /// Whole seconds of lease left (0 when inactive).
    ttl_left: u64,
    /// Topics it hosts.
    topics: u32,
    /// Files it offers.
    files: u32,
}

impl From<PeerInfo> for PeerView {
    fn from(p: PeerInfo) -> Self {
        let at = UNIX_EPOCH + Duration::from_millis(p.last_registered_ms);
        PeerView {
            id: p.id,
            name: p.name,
            addr: p.addr,
            http: p.http,
            active: p.active,
            registrations: p.registrations,
            last_registered: humantime::format_rfc3339_seconds(at).to_string(),
            ttl_left: p.ttl_left_ms / 1000,
            topics: p.topics,
            files: p.files,
        }
    }
}

/// A topic's retention policy.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RetentionView {
    /// Keeps at most this many messages.
    max_messages: Option<u64>,
    /// Keeps at most this many payload bytes.
    max_bytes: Option<u64>,
    /// Drops messages older than this many seconds.
    max_age: Option<u64>,
    /// Drops a message once every subscriber has pulled it.
    consumed: bool,
}

impl From<Retention> for RetentionView {
    fn from(r: Retention) -> Self {
        RetentionView {
            max_messages: r.max_messages,
            max_bytes: r.max_bytes,
            max_age: r.max_age_secs,
            consumed: r.consumed,
        }
    }
}

/// A topic, where it lives and how it is doing.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct TopicView {
    /// The topic.
    topic: String,
    /// The hosting peer's name.
    peer: String,
    /// The hosting peer's binary protocol address.
    addr: String,
    /// Oldest retained offset.
    first_offset: u64,
    /// Offset the next message will get.
    next_offset: u64,
    /// Messages retained.
    messages: u64,
    /// Payload bytes retained.
    bytes: u64,
    /// Number of subscribers.
    subscribers: u32,
    /// Messages per second since this gateway last looked (0 on first sight).
    rate: f64,
    /// Retention policy (single-topic answers only).
    #[serde(skip_serializing_if = "Option::is_none")]
    retention: Option<RetentionView>,
    /// Why the statistics are missing (the host did not answer); counts are 0 then.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl TopicView {
    fn new(st: &AppState, loc: TopicLocation, stats: Result<TopicStats, String>) -> Self {
        let (s, error) = match stats {
            Ok(s) => (Some(s), None),
            Err(e) => (None, Some(e)),
        };
        let (first_offset, next_offset, bytes, subscribers) =
            s.as_ref().map_or((0, 0, 0, 0), |s| {
                (s.first_offset, s.next_offset, s.bytes, s.subscribers)
            });
        TopicView {
            rate: if s.is_some() {
                st.rate(&loc.topic, next_offset)
            } else {
                0.0
            },
            topic: loc.topic,
            peer: loc.peer_name,
            addr: loc.addr,
            first_offset,
            next_offset,
            messages: next_offset.saturating_sub(first_offset),
            bytes,
            subscribers,
            retention: None,
            error,
        }
    }
}

/// Filters the topic list.
#[derive(Debug, Deserialize, IntoParams)]
pub(crate) struct TopicsQuery {
    /// Only topics whose name starts with this.
    prefix: Option<String>,
    /// Only topics whose name sorts after this (the last name of the previous page).
    after: Option<String>,
    /// At most this many topics (default 1,000, at most 10,000); ask again with `after`
    /// for the next page.
    limit: Option<usize>,
}

/// Topics one `GET /api/v1/topics` lists when it is not told how many.
const TOPICS_PAGE: usize = 1000;

/// A topic's retention age: seconds, or a duration such as `"1h 30m"`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub(crate) enum Age {
    /// Seconds.
    Secs(u64),
    /// A human duration (`"90s"`, `"2h"`, `"7days"`).
    Text(String),
}

/// A topic to create.
#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct CreateTopicBody {
    /// The topic's name.
    topic: String,
    /// The hosting peer's name or address; the least-loaded live peer when absent.
    #[serde(default)]
    peer: Option<String>,
    /// Keep at most this many messages.
    #[serde(default)]
    max_messages: Option<u64>,
    /// Keep at most this many payload bytes (default 1 GiB).
    #[serde(default)]
    max_bytes: Option<u64>,
    /// Drop messages older than this.
    #[serde(default)]
    max_age: Option<Age>,
    /// Drop a message once every subscriber has pulled it.
    #[serde(default)]
    consumed: Option<bool>,
}

impl CreateTopicBody {
    fn retention(&self) -> Result<Retention, ApiError> {
        let default = Retention::default();
        let max_age_secs = match &self.max_age {
            None => None,
            Some(Age::Secs(s)) => Some(*s),
            Some(Age::Text(t)) => Some(
                humantime::parse_duration(t)
                    .map_err(|e| ApiError::bad_request(format!("max_age '{t}': {e}")))?
                    .as_secs(),
            ),
        };
        let r = Retention {
            max_messages: self.max_messages,
            max_bytes: self.max_bytes.or(default.max_bytes),
            max_age_secs,
            consumed: self.consumed.unwrap_or(false),
        };
        Ok(r)
    }
}

/// Messages to publish: `message` for one, `messages` for a batch.
#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct PublishBody {
    /// One message.
    #[serde(default)]
    message: Option<String>,
    /// Several messages, stored in order.
    #[serde(default)]
    messages: Option<Vec<String>>,
}

/// Where published messages were stored.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Offsets {
    /// The offset of each message, in order.
    offsets: Vec<u64>,
}

/// Where a subscription starts: `"earliest"`, `"latest"` or an offset.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub(crate) enum StartAt {
    /// This offset (clamped to what is retained).
    Offset(u64),
    /// `"earliest"` or `"latest"`.
    Named(String),
}

fn start_from(from: Option<StartAt>) -> Result<Option<StartFrom>, ApiError> {
    Ok(match from {
        None => None,
        Some(StartAt::Offset(o)) => Some(StartFrom::Offset(o)),
        Some(StartAt::Named(n)) => Some(parse_from(&n)?),
    })
}

fn parse_from(s: &str) -> Result<StartFrom, ApiError> {
    match s {
        "earliest" => Ok(StartFrom::Earliest),
        "latest" => Ok(StartFrom::Latest),
        n => n.parse().map(StartFrom::Offset).map_err(|_| {
            ApiError::bad_request(format!(
                "from '{n}': expected \"earliest\", \"latest\" or an offset"
            ))
        }),
    }
}

/// A subscription to record.
#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct SubscribeBody {
    /// The subscriber's name.
    subscriber: String,
    /// Where to start; a new subscription starts at the oldest message, an existing one
    /// keeps its position.
    #[serde(default)]
    from: Option<StartAt>,
}

/// Where a subscription reads next.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct NextOffset {
    /// The offset it reads next.
    next_offset: u64,
}

/// A subscriber and its position.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SubscriberView {
    /// The subscriber's name.
    name: String,
    /// The offset it reads next.
    next_offset: u64,
}

/// A pull.
#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct PullBody {
    /// The subscriber's name; pulling without a subscription subscribes from the oldest
    /// message.
    subscriber: String,
    /// At most this many messages (default 100).
    #[serde(default)]
    max: Option<u32>,
    /// When nothing is new, wait up to this many milliseconds for a publish (at most 60000).
    #[serde(default)]
    wait_ms: Option<u32>,
    /// `true` (the default): this pull acknowledges what the subscriber's previous pull
    /// through this node returned. `false`: nothing is acknowledged until
    /// `POST /api/v1/topics/{topic}/ack`, and pulls keep returning the same messages.
    #[serde(default)]
    commit: Option<bool>,
}

/// An acknowledgement.
#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct AckBody {
    /// The subscriber's name.
    subscriber: String,
    /// The last offset the subscriber has processed: it and everything before it are
    /// acknowledged.
    offset: u64,
}

/// One message.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct MessageView {
    /// Position in the topic.
    offset: u64,
    /// Publish time, milliseconds since the Unix epoch.
    timestamp: u64,
    /// The message (bytes that are not UTF-8 are replaced).
    message: String,
}

impl MessageView {
    fn of(m: &Message) -> Self {
        MessageView {
            offset: m.offset,
            timestamp: m.timestamp_ms,
            message: String::from_utf8_lossy(&m.payload).into_owned(),
        }
    }
}

/// Pulled messages.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PulledMessages {
    /// The messages, oldest first.
    messages: Vec<MessageView>,
}

/// Whom a stream is for and where it starts.
#[derive(Debug, Deserialize, IntoParams)]
pub(crate) struct StreamQuery {
    /// The subscriber's name: its position is committed as messages are sent. Without it
    /// the stream uses a temporary subscriber, removed when the stream ends.
    subscriber: Option<String>,
    /// `earliest`, `latest` or an offset. Default: the subscriber's position (or the
    /// oldest message for a new subscriber); `latest` for a temporary one.
    from: Option<String>,
}

/// A file search.
#[derive(Debug, Deserialize, IntoParams)]
pub(crate) struct FilesQuery {
    /// Substring of the name, case-insensitive; every file when absent.
    search: Option<String>,
    /// Ask every live peer instead of the index's directory.
    distributed: Option<bool>,
}

/// A shared file and its holders.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct FileView {
    /// Name (as the first holder calls it).
    name: String,
    /// Size in bytes.
    size: u64,
    /// BLAKE3 hash, hex.
    hash: String,
    /// Binary protocol addresses of the live peers holding it.
    peers: Vec<String>,
}

impl From<FileHit> for FileView {
    fn from(h: FileHit) -> Self {
        FileView {
            name: h.name,
            size: h.size,
            hash: h.hash,
            peers: h.peers.into_iter().map(|p| p.addr).collect(),
        }
    }
}

/// Which node serves this gateway.
#[utoipa::path(get, path = "/api/v1/node", tag = "v1", responses((status = 200, body = NodeView)))]
pub(crate) async fn node(State(st): State<AppState>) -> Json<NodeView> {
    crate::node_info(&st)
}

/// Every peer the index knows.
#[utoipa::path(get, path = "/api/v1/peers", tag = "v1",
    responses((status = 200, body = Vec<PeerView>), (status = 503, body = ErrorBody)))]
pub(crate) async fn peers(State(st): State<AppState>) -> Result<Json<Vec<PeerView>>, ApiError> {
    let peers = st.client.peers().await?;
    Ok(Json(peers.into_iter().map(PeerView::from).collect()))
}

/// Statistics of each listed topic, asked of the hosts concurrently, in list order.
async fn with_stats(
    client: &Client,
    locs: Vec<TopicLocation>,
) -> Vec<(TopicLocation, Result<TopicStats, String>)> {
    stream::iter(locs)
        .map(|loc| async move {
            let stats = client
                .topic_stats(&loc.topic)
                .await
                .map_err(|e| e.to_string());
            (loc, stats)
        })
        .buffered(STATS_CONCURRENCY)
        .collect()
        .await
}

/// Topics offered by live peers in name order, a page at a time (`after`, `limit`), with
/// statistics from their hosts.
#[utoipa::path(get, path = "/api/v1/topics", tag = "v1", params(TopicsQuery),
    responses((status = 200, body = Vec<TopicView>), (status = 503, body = ErrorBody)))]
pub(crate) async fn list_topics(
    State(st): State<AppState>,
    Q(q): Q<TopicsQuery>,
) -> Result<Json<Vec<TopicView>>, ApiError> {
    let limit = q.limit.unwrap_or(TOPICS_PAGE);
    if limit == 0 || limit > peerbus_proto::LIST_PAGE {
        return Err(ApiError::bad_request(format!(
            "limit {limit} is out of range: ask for 1 to {} topics a page",
            peerbus_proto::LIST_PAGE
        )));
    }
    // One index page holds at least `limit` names: a page asks for the statistics of at
    // most `limit` topics, however many the cluster has.
    let mut locs = st
        .client
        .list_topics_page(q.prefix.as_deref(), q.after.as_deref())
        .await?;
    locs.truncate(limit);
    if q.prefix.is_none() && q.after.is_none() && locs.len() < limit {
        // The whole set: rates of topics gone can go too.
        st.keep_rates(
            &locs
                .iter()
                .map(|l| l.topic.as_str())
                .collect::<HashSet<_>>(),
        );
    }
    let views = with_stats(&st.client, locs)
        .await
        .into_iter()
        .map(|(loc, stats)| TopicView::new(&st, loc, stats))
        .collect();
    Ok(Json(views))
}

/// Creates a topic.
#[utoipa::path(post, path = "/api/v1/topics", tag = "v1", request_body = CreateTopicBody,
    responses((status = 201, body = Placed), (status = 400, body = ErrorBody),
        (status = 404, description = "No such hosting peer", body = ErrorBody),
        (status = 409, description = "The topic exists", body = ErrorBody)))]
pub(crate) async fn create_topic(
    State(st): State<AppState>,
    JsonBody(b): JsonBody<CreateTopicBody>,
) -> Result<impl IntoResponse, ApiError> {
    let retention = b.retention()?;
    let loc = st
        .client
        .create_topic(&b.topic, b.peer.as_deref(), retention)
        .await?;
    Ok((StatusCode::CREATED, Json(Placed::from(loc))))
}

/// One topic: where it lives, its statistics and retention.
#[utoipa::path(get, path = "/api/v1/topics/{topic}", tag = "v1",
    params(("topic" = String, Path, description = "The topic")),
    responses((status = 200, body = TopicView), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_topic(
    State(st): State<AppState>,
    P(topic): P<String>,
) -> Result<Json<TopicView>, ApiError> {
    let loc = st.client.lookup(&topic).await?;
    let stats = st.client.topic_stats(&topic).await?;
    let retention = stats.retention;
    let mut view = TopicView::new(&st, loc, Ok(stats));
    view.retention = Some(retention.into());
    Ok(Json(view))
}

/// Deletes a topic and its messages.
#[utoipa::path(delete, path = "/api/v1/topics/{topic}", tag = "v1",
    params(("topic" = String, Path, description = "The topic")),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody)))]
pub(crate) async fn delete_topic(
    State(st): State<AppState>,
    P(topic): P<String>,
) -> Result<StatusCode, ApiError> {
    st.client.delete_topic(&topic).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Publishes one message or a batch.
#[utoipa::path(post, path = "/api/v1/topics/{topic}/messages", tag = "v1",
    params(("topic" = String, Path, description = "The topic")), request_body = PublishBody,
    responses((status = 200, body = Offsets), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 413, body = ErrorBody)))]
pub(crate) async fn publish(
    State(st): State<AppState>,
    P(topic): P<String>,
    JsonBody(b): JsonBody<PublishBody>,
) -> Result<Json<Offsets>, ApiError> {
    let offsets = match (b.message, b.messages) {
        (Some(m), None) => {
            let len = m.len();
            let offset = st.client.publish(&topic, m).await?;
            st.metrics.published(1, len);
            vec![offset]
        }
        (None, Some(ms)) if !ms.is_empty() => {
            let bytes: usize = ms.iter().map(String::len).sum();
            let first = st.client.publish_batch(&topic, &ms).await?;
            st.metrics.published(ms.len(), bytes);
            (first..first + ms.len() as u64).collect()
        }
        (None, Some(_)) => return Err(ApiError::bad_request("\"messages\" is empty")),
        _ => {
            return Err(ApiError::bad_request(
                "expected either \"message\" (one) or \"messages\" (a list)",
            ));
        }
    };
    Ok(Json(Offsets { offsets }))
}

/// Records a subscription.
#[utoipa::path(post, path = "/api/v1/topics/{topic}/subscriptions", tag = "v1",
    params(("topic" = String, Path, description = "The topic")), request_body = SubscribeBody,
    responses((status = 200, body = NextOffset), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub(crate) async fn subscribe(
    State(st): State<AppState>,
    P(topic): P<String>,
    JsonBody(b): JsonBody<SubscribeBody>,
) -> Result<Json<NextOffset>, ApiError> {
    let from = start_from(b.from)?;
    let next_offset = st.client.subscribe(&topic, &b.subscriber, from).await?;
    Ok(Json(NextOffset { next_offset }))
}

/// Removes a subscription and its position.
#[utoipa::path(delete, path = "/api/v1/topics/{topic}/subscriptions/{subscriber}", tag = "v1",
    params(("topic" = String, Path, description = "The topic"),
        ("subscriber" = String, Path, description = "The subscriber")),
    responses((status = 204, description = "Removed"), (status = 404, body = ErrorBody)))]
pub(crate) async fn unsubscribe(
    State(st): State<AppState>,
    P((topic, subscriber)): P<(String, String)>,
) -> Result<StatusCode, ApiError> {
    st.client.unsubscribe(&topic, &subscriber).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The subscribers of a topic and their positions.
#[utoipa::path(get, path = "/api/v1/topics/{topic}/subscribers", tag = "v1",
    params(("topic" = String, Path, description = "The topic")),
    responses((status = 200, body = Vec<SubscriberView>), (status = 404, body = ErrorBody)))]
pub(crate) async fn subscribers(
    State(st): State<AppState>,
    P(topic): P<String>,
) -> Result<Json<Vec<SubscriberView>>, ApiError> {
    let subs = st.client.subscribers(&topic).await?;
    Ok(Json(
        subs.into_iter()
            .map(|s| SubscriberView {
                name: s.name,
                next_offset: s.next_offset,
            })
            .collect(),
    ))
}

/// Returns messages the subscriber has not acknowledged. By default the next pull
/// acknowledges them; with `"commit": false` only an ack does.
#[utoipa::path(post, path = "/api/v1/topics/{topic}/pull", tag = "v1",
    params(("topic" = String, Path, description = "The topic")), request_body = PullBody,
    responses((status = 200, body = PulledMessages), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub(crate) async fn pull(
    State(st): State<AppState>,
    P(topic): P<String>,
    JsonBody(b): JsonBody<PullBody>,
) -> Result<Json<PulledMessages>, ApiError> {
    let max = b.max.unwrap_or(DEFAULT_PULL).max(1);
    let wait = Duration::from_millis(u64::from(b.wait_ms.unwrap_or(0).min(MAX_WAIT_MS)));
    let set = if b.commit.unwrap_or(true) {
        st.client.pull(&topic, &b.subscriber, max, wait).await?
    } else {
        st.client
            .pull_uncommitted(&topic, &b.subscriber, max, wait)
            .await?
    };
    let messages: Vec<MessageView> = set.messages().map(|m| MessageView::of(&m)).collect();
    st.metrics.pulled(messages.len(), set.batch.data.len());
    Ok(Json(PulledMessages { messages }))
}

/// Acknowledges a subscriber's messages up to and including `offset`.
#[utoipa::path(post, path = "/api/v1/topics/{topic}/ack", tag = "v1",
    params(("topic" = String, Path, description = "The topic")), request_body = AckBody,
    responses((status = 204, description = "Acknowledged"), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub(crate) async fn ack(
    State(st): State<AppState>,
    P(topic): P<String>,
    JsonBody(b): JsonBody<AckBody>,
) -> Result<StatusCode, ApiError> {
    st.client
        .ack_through(&topic, &b.subscriber, b.offset)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Removes a temporary stream subscriber once its stream is gone.
struct TemporarySubscriber {
    client: Client,
    topic: String,
    name: String,
}

impl Drop for TemporarySubscriber {
    fn drop(&mut self) {
        let (client, topic, name) = (
            self.client.clone(),
            std::mem::take(&mut self.topic),
            std::mem::take(&mut self.name),
        );
        // Dropped when the HTTP client leaves, inside the runtime; a position left behind
        // only if the runtime is already gone.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = client.unsubscribe(&topic, &name).await {
                    tracing::debug!("cannot remove stream subscriber {name} of {topic}: {e}");
                }
            });
        }
    }
}

/// Server-Sent Events, one per message: `data` is `{offset, timestamp, message}` and `id`
/// the offset. A failure ends the stream with an `error` event.
#[utoipa::path(get, path = "/api/v1/topics/{topic}/stream", tag = "v1",
    params(("topic" = String, Path, description = "The topic"), StreamQuery),
    responses((status = 200, description = "An event stream", content_type = "text/event-stream"),
        (status = 404, body = ErrorBody)))]
pub(crate) async fn stream(
    State(st): State<AppState>,
    P(topic): P<String>,
    Q(q): Q<StreamQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let mut from = q.from.as_deref().map(parse_from).transpose()?;
    let (name, temporary) = match q.subscriber {
        Some(s) => (s, None),
        None => {
            // A viewer that only watches should not replay history nor leave a position.
            from = from.or(Some(StartFrom::Latest));
            let name = format!("http-stream-{:016x}", rand::random::<u64>());
            let guard = TemporarySubscriber {
                client: st.client.clone(),
                topic: topic.clone(),
                name: name.clone(),
            };
            (name, Some(guard))
        }
    };
    let sub = st.client.follow(&topic, &name, from).await?;
    let events = events(st.clone(), sub, temporary);
    Ok(
        Sse::new(events.take_until(st.shutdown.clone().cancelled_owned()))
            .keep_alive(KeepAlive::default()),
    )
}

fn events(
    st: AppState,
    sub: Subscription,
    temporary: Option<TemporarySubscriber>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    stream::unfold(Some((sub, temporary)), move |state| {
        let st = st.clone();
        async move {
            let (mut sub, temporary) = state?;
            match sub.next().await {
                Some(Ok(m)) => {
                    st.metrics.pulled(1, m.payload.len());
                    let data = serde_json::to_string(&MessageView::of(&m))
                        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
                    let event = Event::default().id(m.offset.to_string()).data(data);
                    Some((Ok(event), Some((sub, temporary))))
                }
                Some(Err(e)) => {
                    let event = Event::default().event("error").data(e.to_string());
                    Some((Ok(event), None))
                }
                None => None,
            }
        }
    })
}

/// Shared files matching a search, with their holders' addresses.
#[utoipa::path(get, path = "/api/v1/files", tag = "v1", params(FilesQuery),
    responses((status = 200, body = Vec<FileView>), (status = 503, body = ErrorBody)))]
pub(crate) async fn files(
    State(st): State<AppState>,
    Q(q): Q<FilesQuery>,
) -> Result<Json<Vec<FileView>>, ApiError> {
    let pattern = q.search.unwrap_or_default();
    let hits = if q.distributed.unwrap_or(false) {
        st.client.search_files_distributed(&pattern).await?
    } else {
        st.client.search_files(&pattern).await?
    };
    Ok(Json(hits.into_iter().map(FileView::from).collect()))
}

/// One file by name or BLAKE3 hash.
#[utoipa::path(get, path = "/api/v1/files/{key}", tag = "v1",
    params(("key" = String, Path, description = "The file's name or BLAKE3 hash (hex)")),
    responses((status = 200, body = FileView), (status = 404, body = ErrorBody)))]
pub(crate) async fn file(
    State(st): State<AppState>,
    P(key): P<String>,
) -> Result<Json<FileView>, ApiError> {
    Ok(Json(st.client.lookup_file(&key).await?.into()))
}

/// Live peers, topics, subscriptions summed over topics, and distinct files.
pub(crate) async fn cluster_counts(
    st: &AppState,
) -> Result<(usize, usize, u64, usize), peerbus_client::ClientError> {
    let peers = st.client.peers().await?;
    let live: Vec<_> = peers.iter().filter(|p| p.active).collect();
    // From the index's per-peer counts and one request per live peer: a scrape costs the
    // same on a cluster of a million topics as on one of ten.
    let topics = live.iter().map(|p| p.topics as usize).sum();
    let addrs: Vec<String> = live.iter().map(|p| p.addr.clone()).collect();
    let subscribers = stream::iter(addrs)
        .map(|addr| {
            let client = st.client.clone();
            async move { client.node_stats(&addr).await }
        })
        .buffer_unordered(STATS_CONCURRENCY)
        .filter_map(|r| async move { r.ok() })
        .fold(0, |sum, t| async move { sum + t.subscribers })
        .await;
    let files = st.client.search_files("").await?.len();
    Ok((live.len(), topics, subscribers, files))
}
