//! The peerbus client library.
//!
//! A [`Client`] asks the index where a topic lives, caches the answer and talks to the
//! hosting peer directly, over one pipelined [`Connection`] per node (many requests in
//! flight, answers matched by id). Publishes to one topic are batched automatically while a
//! batch is in flight, with no timers, so an idle client sends at once and a busy one sends
//! few, large batches. A following subscription is a [`Subscription`], a `Stream` of
//! messages. [`blocking::Client`] wraps it all for scripts.
//!
//! # Quick start
//!
//! ```
//! use futures::StreamExt;
//! use peerbus_client::{Client, Retention, StartFrom};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> anyhow::Result<()> {
//! # let cluster = peerbus_testkit::Cluster::start(2).await?;
//! # let index_addr = cluster.index_addr();
//! // `index_addr` is the index's host:port, e.g. "127.0.0.1:7400" after `peerbus up`.
//! let client = Client::new(index_addr);
//! client.create_topic("news", None, Retention::default()).await?;
//!
//! // Publish: each call resolves to the stored message's offset.
//! let offset = client.publish("news", "hello").await?;
//! assert_eq!(offset, 0);
//!
//! // Pull what "alice" has not seen yet (a new subscriber starts at the oldest message).
//! let got = client.pull("news", "alice", 100, Duration::ZERO).await?;
//! assert_eq!(got.batch.iter().next().unwrap(), "hello");
//!
//! // Or stream messages as they are published.
//! let mut sub = client.follow("news", "bob", Some(StartFrom::Earliest)).await?;
//! let first = sub.next().await.unwrap()?;
//! assert_eq!(first.payload, "hello");
//! # Ok(())
//! # }
//! ```

pub mod blocking;
mod bulk;
mod client;
mod conn;
mod error;
mod files;
mod subscription;
pub mod tree;

pub use client::{Client, PublishAck};
pub use conn::{Connection, SubEvent};
pub use error::{ClientError, Result};
pub use files::{DownloadProgress, DownloadReport};
pub use peerbus_proto::{
    CreatedOn, ErrorCode, FileHit, Message, MessageSet, NodeTotals, PeerInfo, Retention, StartFrom,
    SubscriberInfo, TopicLocation, TopicStats, WireError,
};
pub use subscription::Subscription;
