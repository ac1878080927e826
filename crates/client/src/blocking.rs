//! A blocking wrapper for scripts and programs without an async runtime.

use std::time::Duration;

use peerbus_proto::{Message, PeerInfo, Retention, StartFrom, SubscriberInfo, TopicLocation};

use crate::error::{ClientError, Result};

/// The [`crate::Client`] behind a private runtime; every call blocks until answered.
#[derive(Debug)]
pub struct Client {
    rt: tokio::runtime::Runtime,
    inner: crate::Client,
}

impl Client {
    /// A client of the cluster whose index is at `index`.
    pub fn new(index: impl Into<String>) -> Result<Client> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| ClientError::Invalid(format!("cannot start a runtime: {e}")))?;
        Ok(Client {
            rt,
            inner: crate::Client::new(index),
        })
    }

    /// See [`crate::Client::create_topic`].
    pub fn create_topic(&self, topic: &str, peer: Option<&str>) -> Result<TopicLocation> {
        self.rt
            .block_on(self.inner.create_topic(topic, peer, Retention::default()))
    }

    /// See [`crate::Client::delete_topic`].
    pub fn delete_topic(&self, topic: &str) -> Result<()> {
        self.rt.block_on(self.inner.delete_topic(topic))
    }

    /// See [`crate::Client::lookup`].
    pub fn lookup(&self, topic: &str) -> Result<TopicLocation> {
        self.rt.block_on(self.inner.lookup(topic))
    }

    /// See [`crate::Client::publish`].
    pub fn publish(&self, topic: &str, payload: impl Into<bytes::Bytes>) -> Result<u64> {
        self.rt.block_on(self.inner.publish(topic, payload))
    }

    /// See [`crate::Client::subscribe`].
    pub fn subscribe(&self, topic: &str, subscriber: &str, from: Option<StartFrom>) -> Result<u64> {
        self.rt
            .block_on(self.inner.subscribe(topic, subscriber, from))
    }

    /// See [`crate::Client::pull`]; returns the messages one by one.
    pub fn pull(&self, topic: &str, subscriber: &str, max: u32) -> Result<Vec<Message>> {
        let set = self
            .rt
            .block_on(self.inner.pull(topic, subscriber, max, Duration::ZERO))?;
        Ok(set.messages().collect())
    }

    /// See [`crate::Client::unsubscribe`].
    pub fn unsubscribe(&self, topic: &str, subscriber: &str) -> Result<()> {
        self.rt.block_on(self.inner.unsubscribe(topic, subscriber))
    }

    /// See [`crate::Client::subscribers`].
    pub fn subscribers(&self, topic: &str) -> Result<Vec<SubscriberInfo>> {
        self.rt.block_on(self.inner.subscribers(topic))
    }

    /// See [`crate::Client::peers`].
    pub fn peers(&self) -> Result<Vec<PeerInfo>> {
        self.rt.block_on(self.inner.peers())
    }
}
