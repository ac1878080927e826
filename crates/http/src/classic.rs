//! The classic endpoints: a flat JSON API where `peer_id` names a participant
//! ("light peer") registered at the index, which publishes and subscribes.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use peerbus_client::{Retention, TopicLocation};
use peerbus_proto::Request;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::error::{ApiError, ErrorBody, JsonBody, Q};

/// Messages one classic pull returns at most; the rest wait for the next pull. The host
/// also caps one answer at 4 MiB of payload, so the answer is bounded in bytes too.
const PULL_MAX: u32 = 8192;

/// Names a participant.
#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct PeerBody {
    /// The participant's name.
    peer_id: String,
}

/// The answer to a participant (un)registration.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PeerDone {
    /// Always true.
    ok: bool,
    /// The participant.
    peer_id: String,
}

/// A topic to create.
#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct CreateBody {
    /// The topic's name.
    topic: String,
    /// The hosting peer's name or address; the least-loaded live peer when absent.
    #[serde(default)]
    peer_id: Option<String>,
}

/// Names a topic.
#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct TopicBody {
    /// The topic's name.
    topic: String,
}

/// Where a topic lives.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Placed {
    /// The topic.
    pub topic: String,
    /// The hosting peer's name.
    pub peer: String,
    /// The hosting peer's binary protocol address.
    pub addr: String,
}

impl From<TopicLocation> for Placed {
    fn from(l: TopicLocation) -> Self {
        Placed {
            topic: l.topic,
            peer: l.peer_name,
            addr: l.addr,
        }
    }
}

/// The answer to a topic deletion.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct TopicDone {
    /// Always true.
    ok: bool,
    /// The topic.
    topic: String,
}

/// A message to publish in a participant's name.
#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct PublishBody {
    /// The publishing participant.
    peer_id: String,
    /// The topic.
    topic: String,
    /// The message.
    message: String,
}

/// Where a published message was stored.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PublishDone {
    /// The topic.
    topic: String,
    /// The message's offset.
    offset: u64,
}

/// A participant and a topic.
#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct PeerTopicBody {
    /// The participant.
    peer_id: String,
    /// The topic.
    topic: String,
}

/// The answer to a subscription.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SubscribeDone {
    /// Always true.
    ok: bool,
    /// The participant.
    peer_id: String,
    /// The topic.
    topic: String,
    /// The offset its next pull starts at.
    next_offset: u64,
}

/// Pulled messages.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Pulled {
    /// The messages, oldest first.
    messages: Vec<String>,
}

/// Names a topic, in the query string.
#[derive(Debug, Deserialize, IntoParams)]
pub(crate) struct TopicQuery {
    /// The topic.
    topic: String,
}

/// The participants subscribed to a topic.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct HostingPeers {
    /// Names of the participants (subscribers) subscribed to the topic, in name order.
    peers: Vec<String>,
}

/// Fails with 404 unless `name` is a participant registered at the index.
async fn require_participant(st: &AppState, name: &str) -> Result<(), ApiError> {
    st.client
        .index_request(Request::ParticipantExists {
            name: name.to_string(),
        })
        .await?;
    Ok(())
}

/// Registers a participant (a "light peer" that hosts nothing) at the index.
#[utoipa::path(post, path = "/register_peer_node", tag = "classic", request_body = PeerBody,
    responses((status = 200, body = PeerDone), (status = 400, body = ErrorBody),
        (status = 409, description = "Already registered", body = ErrorBody)))]
pub(crate) async fn register_peer_node(
    State(st): State<AppState>,
    JsonBody(b): JsonBody<PeerBody>,
) -> Result<Json<PeerDone>, ApiError> {
    st.client
        .index_request(Request::RegisterParticipant {
            name: b.peer_id.clone(),
        })
        .await?;
    Ok(Json(PeerDone {
        ok: true,
        peer_id: b.peer_id,
    }))
}

/// Removes a participant.
#[utoipa::path(post, path = "/unregister_peer_node", tag = "classic", request_body = PeerBody,
    responses((status = 200, body = PeerDone), (status = 400, body = ErrorBody),
        (status = 404, description = "Not registered", body = ErrorBody)))]
pub(crate) async fn unregister_peer_node(
    State(st): State<AppState>,
    JsonBody(b): JsonBody<PeerBody>,
) -> Result<Json<PeerDone>, ApiError> {
    st.client
        .index_request(Request::UnregisterParticipant {
            name: b.peer_id.clone(),
        })
        .await?;
    Ok(Json(PeerDone {
        ok: true,
        peer_id: b.peer_id,
    }))
}

/// Creates a topic on the named peer or the least-loaded live one.
#[utoipa::path(post, path = "/create_topic", tag = "classic", request_body = CreateBody,
    responses((status = 200, body = Placed), (status = 400, body = ErrorBody),
        (status = 404, description = "No such hosting peer", body = ErrorBody),
        (status = 409, description = "The topic exists", body = ErrorBody)))]
pub(crate) async fn create_topic(
    State(st): State<AppState>,
    JsonBody(b): JsonBody<CreateBody>,
) -> Result<Json<Placed>, ApiError> {
    let loc = st
        .client
        .create_topic(&b.topic, b.peer_id.as_deref(), Retention::default())
        .await?;
    Ok(Json(loc.into()))
}

/// Deletes a topic and its messages.
#[utoipa::path(delete, path = "/delete_topic", tag = "classic", request_body = TopicBody,
    responses((status = 200, body = TopicDone), (status = 400, body = ErrorBody),
        (status = 404, description = "No such topic", body = ErrorBody)))]
pub(crate) async fn delete_topic(
    State(st): State<AppState>,
    JsonBody(b): JsonBody<TopicBody>,
) -> Result<Json<TopicDone>, ApiError> {
    st.client.delete_topic(&b.topic).await?;
    Ok(Json(TopicDone {
        ok: true,
        topic: b.topic,
    }))
}

/// Publishes one message in a participant's name.
#[utoipa::path(post, path = "/publish", tag = "classic", request_body = PublishBody,
    responses((status = 200, body = PublishDone), (status = 400, body = ErrorBody),
        (status = 404, description = "Unknown participant or topic", body = ErrorBody)))]
pub(crate) async fn publish(
    State(st): State<AppState>,
    JsonBody(b): JsonBody<PublishBody>,
) -> Result<Json<PublishDone>, ApiError> {
    require_participant(&st, &b.peer_id).await?;
    let len = b.message.len();
    let offset = st.client.publish(&b.topic, b.message).await?;
    st.metrics.published(1, len);
    Ok(Json(PublishDone {
        topic: b.topic,
        offset,
    }))
}

/// Subscribes a participant to a topic; a new subscription starts at the oldest message.
#[utoipa::path(post, path = "/subscribe", tag = "classic", request_body = PeerTopicBody,
    responses((status = 200, body = SubscribeDone), (status = 400, body = ErrorBody),
        (status = 404, description = "Unknown participant or topic", body = ErrorBody)))]
pub(crate) async fn subscribe(
    State(st): State<AppState>,
    JsonBody(b): JsonBody<PeerTopicBody>,
) -> Result<Json<SubscribeDone>, ApiError> {
    require_participant(&st, &b.peer_id).await?;
    let next_offset = st.client.subscribe(&b.topic, &b.peer_id, None).await?;
    Ok(Json(SubscribeDone {
        ok: true,
        peer_id: b.peer_id,
        topic: b.topic,
        next_offset,
    }))
}

/// Returns messages the participant has not pulled yet (subscribing it first if needed), at
/// most one host answer. The participant's next pull acknowledges them, so an answer lost
/// on the way (a dropped connection, a proxy timeout) is sent again rather than skipped.
#[utoipa::path(post, path = "/pull_messages", tag = "classic", request_body = PeerTopicBody,
    responses((status = 200, body = Pulled), (status = 400, body = ErrorBody),
        (status = 404, description = "Unknown participant or topic", body = ErrorBody)))]
pub(crate) async fn pull_messages(
    State(st): State<AppState>,
    JsonBody(b): JsonBody<PeerTopicBody>,
) -> Result<Json<Pulled>, ApiError> {
    require_participant(&st, &b.peer_id).await?;
    // One host answer: reading more would acknowledge the first part before this answer
    // reached anyone.
    let set = st
        .client
        .pull(&b.topic, &b.peer_id, PULL_MAX, Duration::ZERO)
        .await?;
    let messages: Vec<String> = set
        .batch
        .iter()
        .map(|p| String::from_utf8_lossy(&p).into_owned())
        .collect();
    st.metrics.pulled(messages.len(), set.batch.data.len());
    Ok(Json(Pulled { messages }))
}

/// The participants subscribed to a topic, as the original API's "peers that are subscribed
/// to a specified topic" (`GET /api/v1/topics/{topic}` names its host).
#[utoipa::path(get, path = "/query_peers", tag = "classic", params(TopicQuery),
    responses((status = 200, body = HostingPeers), (status = 400, body = ErrorBody),
        (status = 404, description = "No such topic", body = ErrorBody)))]
pub(crate) async fn query_peers(
    State(st): State<AppState>,
    Q(q): Q<TopicQuery>,
) -> Result<Json<HostingPeers>, ApiError> {
    let subs = st.client.subscribers(&q.topic).await?;
    Ok(Json(HostingPeers {
        peers: subs.into_iter().map(|s| s.name).collect(),
    }))
}
