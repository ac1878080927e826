//! Requests about many topics at once.

use peerbus_proto::{CreatedOn, Request, Response, Retention};

use crate::client::Client;
use crate::error::{ClientError, Result};

impl Client {
    /// Creates every topic of `topics` in one request, all with `retention`. With `peer` (a
    /// peer's name or `host:port`) that peer hosts them all; without, the index spreads them
    /// over the live peers, least loaded first. Every name must be valid, new and listed
    /// once, or nothing is created. Returns how many topics each host took.
    ///
    /// One request creates at most [`peerbus_proto::MAX_CREATE_TOPICS`] topics (and must
    /// fit in one 8 MiB frame): split larger sets.
    pub async fn create_topics(
        &self,
        topics: Vec<String>,
        peer: Option<&str>,
        retention: Retention,
    ) -> Result<Vec<CreatedOn>> {
        peerbus_proto::check_create_count(topics.len())
            .map_err(|e| ClientError::Invalid(e.message))?;
        for t in &topics {
            peerbus_proto::validate_topic(t)?;
        }
        let req = Request::CreateTopics {
            topics,
            retention,
            peer: peer.map(str::to_string),
        };
        match self.index_request(req).await? {
            Response::Created(c) => Ok(c),
            other => Err(ClientError::Protocol {
                addr: self.index_addr().to_string(),
                what: format!("unexpected answer {other:?}"),
            }),
        }
    }
}
