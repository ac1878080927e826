use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use peerbus_proto::{
    ClientFrame, FrameCodec, MessageSet, NodeKind, PROTOCOL, Request, Response, ServerFrame,
    WireError,
};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use crate::error::{ClientError, Result};

/// How long connecting and the hello exchange may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Deliveries buffered per subscription. When a subscriber lets this many pile up unread,
/// its follow is stopped on the host (as a slow consumer) rather than making the
/// connection's reader wait, which would stall every other request and subscription sharing
/// the connection; the subscription follows again from its last acknowledgement once its
/// reader has caught up, so nothing is lost or skipped.
const SUB_BUFFER: usize = 64;

/// How long a request waits for its answer (Kafka's `request.timeout.ms` is 30 s too), on
/// top of any wait the request asks for itself, so a black-holed or wedged node fails the
/// call instead of hanging it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

type Pending = oneshot::Sender<std::result::Result<Response, WireError>>;
/// Where a request's answer (or the node's error) arrives.
type AnswerSlot = oneshot::Receiver<std::result::Result<Response, WireError>>;

/// What a following subscription receives.
#[derive(Debug)]
pub enum SubEvent {
    /// New messages.
    Messages(MessageSet),
    /// The subscriber let its buffer fill, so the host was told to stop; the subscription
    /// follows again once what was buffered has been read.
    Paused,
    /// The subscription ended (topic deleted, node stopping, connection lost).
    Ended(ClientError),
}

#[derive(Debug)]
struct Shared {
    addr: String,
    node: NodeKind,
    tx: peerbus_net::Outbox<ClientFrame>,
    pending: Mutex<HashMap<u32, Pending>>,
    subs: Mutex<HashMap<u64, mpsc::Sender<SubEvent>>>,
    next_id: AtomicU32,
    next_sub: AtomicU64,
    closed: CancellationToken,
    close_reason: Mutex<Option<String>>,
    /// The base answer deadline in ms (see [`Connection::set_request_timeout`]).
    request_timeout_ms: AtomicU64,
}

/// One pipelined connection to a node: any number of requests in flight, answers matched by
/// request id, push deliveries routed to their subscription. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Connection {
    shared: Arc<Shared>,
}

impl Connection {
    /// Connects, says hello (with `token` if the node requires one) and starts the reader.
    pub async fn connect(addr: &str, token: Option<&str>) -> Result<Connection> {
        let fail = |reason: String| ClientError::Connect {
            addr: addr.to_string(),
            reason,
        };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| fail(format!("no answer within {} s", CONNECT_TIMEOUT.as_secs())))?
            .map_err(|e| fail(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        let (tx, _flusher) = peerbus_net::Outbox::new(w);
        let mut frames = FramedRead::with_capacity(
            r,
            FrameCodec::new(peerbus_proto::DEFAULT_MAX_FRAME),
            64 * 1024,
        );
        tx.send(
            ClientFrame::Hello {
                protocol: PROTOCOL.to_string(),
                token: token.map(str::to_string),
            }
            .into(),
        )
        .await
        .map_err(|_| fail("connection closed during hello".into()))?;
        let first = tokio::time::timeout(CONNECT_TIMEOUT, frames.next())
            .await
            .map_err(|_| fail("no answer to hello".into()))?;
        let node = match first {
            Some(Ok(body)) => match peerbus_proto::decode_server(&body) {
                Ok(ServerFrame::Welcome { node, .. }) => node,
                Ok(ServerFrame::Refused(error)) => {
                    return Err(ClientError::Refused {
                        addr: addr.to_string(),
                        error,
                    });
                }
                Ok(other) => return Err(fail(format!("expected a welcome, got {other:?}"))),
                Err(e) => return Err(fail(format!("not a peerbus node: {e}"))),
            },
            Some(Err(e)) => return Err(fail(format!("not a peerbus node: {e}"))),
            None => return Err(fail("connection closed during hello".into())),
        };
        let shared = Arc::new(Shared {
            addr: addr.to_string(),
            node,
            tx,
            pending: Mutex::new(HashMap::new()),
            subs: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(1),
            next_sub: AtomicU64::new(1),
            closed: CancellationToken::new(),
            close_reason: Mutex::new(None),
            request_timeout_ms: AtomicU64::new(REQUEST_TIMEOUT.as_millis() as u64),
        });
        tokio::spawn(read_loop(shared.clone(), frames));
        Ok(Connection { shared })
    }

    /// The address this connection goes to.
    pub fn addr(&self) -> &str {
        &self.shared.addr
    }

    /// The kind of node at the other end.
    pub fn node(&self) -> NodeKind {
        self.shared.node
    }

    /// True once the connection has closed; a new one must be made.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.is_cancelled()
    }

    fn closed_error(&self) -> ClientError {
        let reason = self
            .shared
            .close_reason
            .lock()
            .expect("close reason lock")
            .clone()
            .unwrap_or_else(|| "the node closed it".into());
        ClientError::Closed {
            addr: self.shared.addr.clone(),
            reason,
        }
    }

    /// Sets how long a request waits for its answer beyond any wait it asks for itself
    /// (30 s unless set).
    pub fn set_request_timeout(&self, timeout: Duration) {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self.shared.request_timeout_ms.store(ms, Ordering::Relaxed);
    }

    /// Sends a request and waits for its answer. Other requests may be in flight meanwhile.
    /// `forward` lets a peer that does not host the topic forward the request to the host.
    ///
    /// An answer that does not come within 30 s (plus the wait a long poll asks for; a
    /// fetch waits as long as its download takes) ends the wait with
    /// [`ClientError::Timeout`]; the connection stays open and a late answer is dropped.
    pub async fn request(&self, body: Request, forward: bool) -> Result<Response> {
        let deadline = self.answer_deadline(&body);
        let what = body.kind();
        let (id, rx) = self.send(body, forward).await?;
        self.wait_answer(id, rx, what, deadline).await
    }

    async fn send(&self, body: Request, forward: bool) -> Result<(u32, AnswerSlot)> {
        let (id, rx) = self.expect_answer();
        if self.is_closed() {
            self.forget_answer(id);
            return Err(self.closed_error());
        }
        let frame = ClientFrame::Request { id, forward, body };
        if self.shared.tx.send(frame.into()).await.is_err() {
            self.forget_answer(id);
            return Err(self.closed_error());
        }
        Ok((id, rx))
    }

    /// The deadline of a request's answer; `None` for a fetch, which the peer answers once
    /// it has downloaded the whole file, however large.
    fn answer_deadline(&self, req: &Request) -> Option<Duration> {
        let base = Duration::from_millis(self.shared.request_timeout_ms.load(Ordering::Relaxed));
        match req {
            Request::Fetch { .. } => None,
            Request::Pull { wait_ms, .. } => {
                Some(base + Duration::from_millis(u64::from(*wait_ms)))
            }
            _ => Some(base),
        }
    }

    async fn wait_answer(
        &self,
        id: u32,
        rx: AnswerSlot,
        what: &'static str,
        deadline: Option<Duration>,
    ) -> Result<Response> {
        let Some(deadline) = deadline else {
            return self.answer(rx.await);
        };
        match tokio::time::timeout(deadline, rx).await {
            Ok(r) => self.answer(r),
            Err(_) => {
                self.forget_answer(id);
                Err(ClientError::Timeout {
                    addr: self.shared.addr.clone(),
                    what,
                    ms: u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX),
                })
            }
        }
    }

    /// Sends a request from the caller's task without waiting: `None` when the connection
    /// is closed or its outbox is full right now (nothing was sent then). The returned
    /// future gives the answer, or an error once the connection closes.
    pub fn start_request(
        &self,
        body: Request,
        forward: bool,
    ) -> Option<impl Future<Output = Result<Response>> + Send + 'static> {
        let deadline = self.answer_deadline(&body);
        let what = body.kind();
        let (id, rx) = self.expect_answer();
        let frame = ClientFrame::Request { id, forward, body };
        if self.is_closed() || !self.shared.tx.try_send(frame.into()) {
            self.forget_answer(id);
            return None;
        }
        let conn = self.clone();
        Some(async move { conn.wait_answer(id, rx, what, deadline).await })
    }

    /// A fresh request id, with the slot its answer will arrive in.
    fn expect_answer(&self) -> (u32, AnswerSlot) {
        let (tx, rx) = oneshot::channel();
        let mut pending = self.shared.pending.lock().expect("pending lock");
        let id = free_id(&self.shared, &pending);
        pending.insert(id, tx);
        (id, rx)
    }

    /// Stops waiting for the answer to `id`, whose request was not sent.
    fn forget_answer(&self, id: u32) {
        self.shared
            .pending
            .lock()
            .expect("pending lock")
            .remove(&id);
    }

    /// What the caller gets for an answer slot's outcome.
    fn answer(
        &self,
        r: std::result::Result<std::result::Result<Response, WireError>, oneshot::error::RecvError>,
    ) -> Result<Response> {
        match r {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(ClientError::Server(e)),
            Err(_) => Err(self.closed_error()),
        }
    }

    /// Opens a following subscription: the node streams messages from the subscriber's
    /// position. Returns the first offset it will deliver and the event channel.
    pub async fn follow(
        &self,
        mut sub: peerbus_proto::Subscribe,
        forward: bool,
    ) -> Result<(u64, u64, mpsc::Receiver<SubEvent>)> {
        // The client picks the id and registers the route before asking, so no delivery can
        // arrive before there is somewhere to put it.
        let sub_id = self.shared.next_sub.fetch_add(1, Ordering::Relaxed);
        sub.follow = Some(sub_id);
        // One slot more than the buffer, kept for the event that pauses or ends it.
        let (tx, rx) = mpsc::channel(SUB_BUFFER + 1);
        self.shared
            .subs
            .lock()
            .expect("subs lock")
            .insert(sub_id, tx);
        match self.request(Request::Subscribe(sub), forward).await {
            Ok(Response::Subscribed { next_offset }) => Ok((sub_id, next_offset, rx)),
            Ok(other) => {
                self.forget_sub(sub_id);
                Err(ClientError::Protocol {
                    addr: self.shared.addr.clone(),
                    what: format!("expected Subscribed, got {other:?}"),
                })
            }
            Err(e) => {
                self.forget_sub(sub_id);
                Err(e)
            }
        }
    }

    fn forget_sub(&self, sub: u64) {
        self.shared.subs.lock().expect("subs lock").remove(&sub);
    }

    /// Ends a following subscription without waiting for the answer.
    pub fn stop_follow(&self, sub: u64) {
        self.forget_sub(sub);
        send_stop_follow(&self.shared, sub);
    }

    /// Acknowledges `subscriber`'s messages of `topic` below `offset` without waiting for
    /// the answer. One that is lost leaves those messages to be delivered again, which is
    /// what at-least-once allows.
    pub fn ack_nowait(&self, topic: &str, subscriber: &str, offset: u64) {
        let ack = Request::Ack {
            topic: topic.to_string(),
            subscriber: subscriber.to_string(),
            offset,
        };
        // A node relaying the subscription passes the acknowledgement to the host.
        send_nowait(&self.shared, true, ack);
    }

    /// Closes the connection; requests in flight fail with [`ClientError::Closed`].
    pub fn close(&self) {
        close(&self.shared, "closed by this client".into());
    }
}

fn close(shared: &Shared, reason: String) {
    {
        let mut r = shared.close_reason.lock().expect("close reason lock");
        if r.is_none() {
            *r = Some(reason.clone());
        }
    }
    shared.closed.cancel();
    // Dropping the senders wakes every waiter with "closed".
    shared.pending.lock().expect("pending lock").clear();
    let subs: Vec<_> = shared
        .subs
        .lock()
        .expect("subs lock")
        .drain()
        .map(|(_, s)| s)
        .collect();
    for s in subs {
        let _ = s.try_send(SubEvent::Ended(ClientError::Closed {
            addr: shared.addr.clone(),
            reason: reason.clone(),
        }));
    }
}

/// Hands a delivery to its subscription without ever waiting. A subscription whose buffer
/// is full is paused: stopped on the host, this delivery dropped (it is past everything
/// buffered, and the subscription follows again from there).
fn deliver(shared: &Shared, sub: u64, route: &mpsc::Sender<SubEvent>, messages: MessageSet) {
    if route.capacity() > 1 {
        if route.try_send(SubEvent::Messages(messages)).is_err() {
            shared.subs.lock().expect("subs lock").remove(&sub);
        }
        return;
    }
    shared.subs.lock().expect("subs lock").remove(&sub);
    let _ = route.try_send(SubEvent::Paused);
    send_stop_follow(shared, sub);
}

/// The next request id not waiting for an answer. Ids wrap after 2^32 requests: one still
/// pending (a long poll, a hung request) is skipped, so a late answer never resolves the
/// wrong request.
fn free_id(shared: &Shared, pending: &HashMap<u32, Pending>) -> u32 {
    loop {
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        if !pending.contains_key(&id) {
            return id;
        }
    }
}

fn send_stop_follow(shared: &Shared, sub: u64) {
    send_nowait(shared, false, Request::StopFollow { sub });
}

/// Sends a request whose answer nobody waits for (it is dropped when it arrives).
fn send_nowait(shared: &Shared, forward: bool, body: Request) {
    let id = free_id(shared, &shared.pending.lock().expect("pending lock"));
    let frame = ClientFrame::Request { id, forward, body };
    let _ = shared.tx.send_now(frame.into());
}

async fn read_loop(
    shared: Arc<Shared>,
    mut frames: FramedRead<tokio::net::tcp::OwnedReadHalf, FrameCodec>,
) {
    let reason = loop {
        let next = tokio::select! {
            f = frames.next() => f,
            _ = shared.closed.cancelled() => break "closed by this client".to_string(),
        };
        let body = match next {
            None => break "the node closed it".to_string(),
            Some(Err(e)) => break e.to_string(),
            Some(Ok(b)) => b,
        };
        let frame = match peerbus_proto::decode_server(&body) {
            Ok(f) => f,
            Err(e) => break e.to_string(),
        };
        match frame {
            ServerFrame::Response { id, body } => {
                let waiter = shared.pending.lock().expect("pending lock").remove(&id);
                if let Some(w) = waiter {
                    let _ = w.send(body);
                }
            }
            ServerFrame::Delivery { sub, messages } => {
                let route = shared.subs.lock().expect("subs lock").get(&sub).cloned();
                if let Some(route) = route {
                    deliver(&shared, sub, &route, messages);
                }
            }
            ServerFrame::SubscriptionEnded { sub, reason } => {
                let route = shared.subs.lock().expect("subs lock").remove(&sub);
                if let Some(route) = route {
                    // The kept slot has room unless the subscription already ended.
                    let _ = route.try_send(SubEvent::Ended(ClientError::Server(reason)));
                }
            }
            ServerFrame::Refused(e) => break e.message,
            ServerFrame::Welcome { .. } => break "second welcome from the node".to_string(),
        }
    };
    tracing::debug!("connection to {} closed: {reason}", shared.addr);
    close(&shared, reason);
}
