//! The OpenAPI document, generated from the handlers' annotations.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::OpenApi;

use crate::{api, classic, content};

#[derive(OpenApi)]
#[openapi(
    info(title = "peerbus HTTP gateway", description = "Served by every peerbus node: classic endpoints, the v1 JSON API, metrics and the dashboard. When the node runs with --auth-token, send `Authorization: Bearer TOKEN` or `?token=TOKEN`."),
    paths(
        crate::dashboard,
        crate::metrics,
        classic::register_peer_node,
        classic::unregister_peer_node,
        classic::create_topic,
        classic::delete_topic,
        classic::publish,
        classic::subscribe,
        classic::pull_messages,
        classic::query_peers,
        api::node,
        api::peers,
        api::list_topics,
        api::create_topic,
        api::get_topic,
        api::delete_topic,
        api::publish,
        api::subscribe,
        api::unsubscribe,
        api::subscribers,
        api::pull,
        api::ack,
        api::stream,
        api::files,
        api::file,
        content::download,
        document,
    ),
    tags(
        (name = "classic", description = "The flat API where peer_id names a registered participant"),
        (name = "v1", description = "The JSON API"),
    )
)]
struct Doc;

/// This document.
#[utoipa::path(get, path = "/api/openapi.json", tag = "v1",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json")))]
pub(crate) async fn document() -> impl IntoResponse {
    // Built once: it only depends on the code.
    static JSON: OnceLock<String> = OnceLock::new();
    let json = JSON.get_or_init(|| {
        Doc::openapi().to_pretty_json().unwrap_or_else(|e| {
            format!("{{\"error\":\"cannot render the OpenAPI document: {e}\"}}")
        })
    });
    ([(header::CONTENT_TYPE, "application/json")], json.as_str())
}
