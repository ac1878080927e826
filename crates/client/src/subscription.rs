use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use peerbus_proto::{Message, MessageSet};
use tokio::sync::mpsc;

use crate::conn::{Connection, SubEvent};
use crate::error::{ClientError, Result};

/// A following subscription: a [`Stream`] of messages in offset order, pushed by the host
/// as they are published. Dropping it stops the stream on the host.
///
/// What the host sends is committed only once the application has it: asking for the next
/// message (or batch) after the last one of a batch acknowledges that batch. A subscription
/// that ends, or a process that dies, before that resumes with the batch again
/// (at-least-once).
#[derive(Debug)]
pub struct Subscription {
    conn: Connection,
    id: u64,
    topic: String,
    subscriber: String,
    /// Everything below this was handed to the application and acknowledged.
    acked: u64,
    /// Acknowledge what was handed out (off for a relay, whose own client acknowledges).
    auto_ack: bool,
    next_offset: u64,
    rx: mpsc::Receiver<SubEvent>,
    ready: VecDeque<Message>,
    ended: bool,
}

impl Subscription {
    pub(crate) fn new(
        conn: Connection,
        id: u64,
        topic: String,
        subscriber: String,
        next_offset: u64,
        rx: mpsc::Receiver<SubEvent>,
    ) -> Self {
        Subscription {
            conn,
            id,
            topic,
            subscriber,
            acked: next_offset,
            auto_ack: true,
            next_offset,
            rx,
            ready: VecDeque::new(),
            ended: false,
        }
    }

    /// The offset of the next message this subscription yields.
    pub fn next_offset(&self) -> u64 {
        self.ready.front().map_or(self.next_offset, |m| m.offset)
    }

    /// The next batch of messages as the host sent it (cheaper than one at a time).
    /// `None` once the subscription has ended without error.
    pub async fn next_batch(&mut self) -> Option<Result<MessageSet>> {
        if self.ended {
            return None;
        }
        // Everything handed out so far was a whole batch: asking for more acknowledges it.
        if self.ready.is_empty() {
            self.ack_handed();
        }
        match self.rx.recv().await {
            Some(SubEvent::Messages(set)) => {
                self.next_offset = set.next_offset();
                Some(Ok(set))
            }
            Some(SubEvent::Ended(e)) => {
                self.ended = true;
                Some(Err(e))
            }
            None => {
                self.ended = true;
                Some(Err(ClientError::Closed {
                    addr: self.conn.addr().to_string(),
                    reason: "the connection ended".into(),
                }))
            }
        }
    }
}

impl Stream for Subscription {
    type Item = Result<Message>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(m) = self.ready.pop_front() {
                return Poll::Ready(Some(Ok(m)));
            }
            if self.ended {
                return Poll::Ready(None);
            }
            // The application has every message of the batches before: acknowledge them.
            self.ack_handed();
            match self.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(SubEvent::Messages(set))) => {
                    self.next_offset = set.next_offset();
                    let msgs: Vec<Message> = set.messages().collect();
                    self.ready.extend(msgs);
                }
                Poll::Ready(Some(SubEvent::Ended(e))) => {
                    self.ended = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    self.ended = true;
                    let addr = self.conn.addr().to_string();
                    return Poll::Ready(Some(Err(ClientError::Closed {
                        addr,
                        reason: "the connection ended".into(),
                    })));
                }
            }
        }
    }
}

impl Subscription {
    /// Leaves acknowledging to someone else: a node that relays this subscription to a
    /// client of its own passes that client's acknowledgements on instead.
    pub fn without_acks(mut self) -> Self {
        self.auto_ack = false;
        self
    }

    /// Acknowledges what the application has been handed, if that moved.
    fn ack_handed(&mut self) {
        if self.auto_ack && self.next_offset > self.acked && !self.ended {
            self.acked = self.next_offset;
            self.conn
                .ack_nowait(&self.topic, &self.subscriber, self.next_offset);
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if !self.ended {
            self.conn.stop_follow(self.id);
        }
    }
}
