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
#[derive(Debug)]
pub struct Subscription {
    conn: Connection,
    id: u64,
    next_offset: u64,
    rx: mpsc::Receiver<SubEvent>,
    ready: VecDeque<Message>,
    ended: bool,
}

impl Subscription {
    pub(crate) fn new(
        conn: Connection,
        id: u64,
        next_offset: u64,
        rx: mpsc::Receiver<SubEvent>,
    ) -> Self {
        Subscription {
            conn,
            id,
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

impl Drop for Subscription {
    fn drop(&mut self) {
        if !self.ended {
            self.conn.stop_follow(self.id);
        }
    }
}
