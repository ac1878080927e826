use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use peerbus_proto::{Message, MessageSet, Subscribe};
use tokio::sync::mpsc;

use crate::conn::{Connection, SubEvent};
use crate::error::{ClientError, Result};

/// A follow being started again after a pause: the new subscription id, its position and
/// its deliveries.
type Resume = Pin<Box<dyn Future<Output = Result<(u64, u64, mpsc::Receiver<SubEvent>)>> + Send>>;

/// A following subscription: a [`Stream`] of messages in offset order, pushed by the host
/// as they are published. Dropping it stops the stream on the host.
///
/// What the host sends is committed only once the application has it: asking for the next
/// message (or batch) after the last one of a batch acknowledges that batch. A subscription
/// that ends, or a process that dies, before that resumes with the batch again
/// (at-least-once).
///
/// An application that stops reading does not stall the connection it shares with other
/// requests: once its buffer is full the host is told to stop, and when the application
/// has read what was buffered the subscription starts again from there by itself.
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
    resume: Option<Resume>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("topic", &self.topic)
            .field("subscriber", &self.subscriber)
            .field("next_offset", &self.next_offset)
            .field("resuming", &self.resume.is_some())
            .finish_non_exhaustive()
    }
}

/// What the subscription has for its reader.
enum Event {
    Messages(MessageSet),
    Ended(ClientError),
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
            resume: None,
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
        match std::future::poll_fn(|cx| self.poll_event(cx)).await {
            Event::Messages(set) => Some(Ok(set)),
            Event::Ended(e) => Some(Err(e)),
        }
    }

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

    /// The next batch or the end, following again after a pause.
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        loop {
            if let Some(resume) = &mut self.resume {
                match resume.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok((id, next, rx))) => {
                        self.resume = None;
                        (self.id, self.rx) = (id, rx);
                        self.next_offset = next;
                        self.acked = self.acked.max(next);
                    }
                    Poll::Ready(Err(e)) => {
                        self.resume = None;
                        self.ended = true;
                        return Poll::Ready(Event::Ended(e));
                    }
                }
            }
            match self.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(SubEvent::Messages(set))) => {
                    self.next_offset = set.next_offset();
                    return Poll::Ready(Event::Messages(set));
                }
                Poll::Ready(Some(SubEvent::Paused)) => {
                    // Everything buffered has been handed out: acknowledge it, then follow
                    // again from there (the host handles the ack first, in order).
                    self.ack_handed();
                    let conn = self.conn.clone();
                    let sub = Subscribe {
                        topic: self.topic.clone(),
                        subscriber: self.subscriber.clone(),
                        from: None,
                        follow: None,
                    };
                    self.resume = Some(Box::pin(async move { conn.follow(sub, false).await }));
                }
                Poll::Ready(Some(SubEvent::Ended(e))) => {
                    self.ended = true;
                    return Poll::Ready(Event::Ended(e));
                }
                Poll::Ready(None) => {
                    self.ended = true;
                    return Poll::Ready(Event::Ended(ClientError::Closed {
                        addr: self.conn.addr().to_string(),
                        reason: "the connection ended".into(),
                    }));
                }
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
            match self.poll_event(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Event::Messages(set)) => {
                    let msgs: Vec<Message> = set.messages().collect();
                    self.ready.extend(msgs);
                }
                Poll::Ready(Event::Ended(e)) => return Poll::Ready(Some(Err(e))),
            }
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
