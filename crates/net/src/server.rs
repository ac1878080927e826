use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use peerbus_proto::{
    ClientFrame, CodecError, ErrorCode, FrameCodec, NodeKind, PROTOCOL, Request, Response,
    ServerFrame, WireError,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::inflight::InFlight;
use crate::writer::{Budget, Outbox};

/// Default for [`ServerConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// Default for [`ServerConfig::hello_timeout`].
pub const DEFAULT_HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Default for [`ServerConfig::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// How a node's accept loop behaves.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Which kind of node this is (told to clients in the welcome).
    pub node: NodeKind,
    /// Shared token every connection must present, if set.
    pub token: Option<String>,
    /// Largest frame body accepted.
    pub max_frame: usize,
    /// Connections served at once; more are refused with a clear error.
    pub max_connections: usize,
    /// How long a new connection may take to say hello.
    pub hello_timeout: Duration,
    /// How long a connection that has sent no request since its hello may stay silent
    /// before it is closed. Connections that have sent a request are never closed for
    /// idleness: they may hold subscriptions or long-polls that are legitimately quiet,
    /// and the server cannot tell those apart from forgotten sockets.
    pub idle_timeout: Duration,
    /// Log every request received, one line each.
    pub trace_messages: bool,
}

impl ServerConfig {
    /// Defaults for a node of this kind: no token, 8 MiB frames, 10,000 connections, 10 s
    /// to say hello, [`DEFAULT_IDLE_TIMEOUT`] of silence after it.
    pub fn new(node: NodeKind) -> Self {
        ServerConfig {
            node,
            token: None,
            max_frame: peerbus_proto::DEFAULT_MAX_FRAME,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            hello_timeout: DEFAULT_HELLO_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            trace_messages: false,
        }
    }
}

/// What a node does with requests. `handle` runs in the connection's read loop, so requests
/// of one connection are handled in arrival order; a handler that must wait (a long-poll, a
/// forward to another node) spawns that part and answers from the task.
pub trait Service: Send + Sync + 'static {
    /// Handles one request; the answer goes out through [`ConnCtx::reply`].
    fn handle(
        self: &Arc<Self>,
        conn: &Arc<ConnCtx>,
        id: u32,
        forward: bool,
        req: Request,
    ) -> impl Future<Output = ()> + Send;

    /// What answering `req` holds in memory until its answer is queued, counted against
    /// the connection's [`crate::MAX_IN_FLIGHT_BYTES`]. By default the request frame itself
    /// (`frame_len` bytes), which covers requests kept while they wait (a publish until it
    /// is durable, a forward until the other node answers).
    fn cost(&self, req: &Request, frame_len: usize) -> usize {
        let _ = req;
        frame_len
    }
}

/// One accepted connection, as handlers see it.
#[derive(Debug)]
pub struct ConnCtx {
    /// Number of this connection within the node, for logs.
    pub id: u64,
    /// The client's address.
    pub remote: SocketAddr,
    out: Outbox<ServerFrame>,
    budget: Budget,
    inflight: InFlight,
    /// Cancelled when the connection closes, so tasks serving it (subscriptions) stop.
    pub closed: CancellationToken,
}

impl ConnCtx {
    /// Queues a frame; waits while the outbox is full, in frames or in bytes
    /// ([`crate::OUTBOX_BYTES`]), so a reader that stops reading stops its senders.
    /// Returns false once the connection is gone.
    pub async fn send(&self, frame: ServerFrame) -> bool {
        let bytes = frame.wire_size();
        let queue = async {
            let queued = self.budget.queue(frame, bytes).await?;
            self.out.send(queued).await.ok()
        };
        tokio::select! {
            r = queue => r.is_some(),
            _ = self.closed.cancelled() => false,
        }
    }

    /// Queues a frame only if the byte budget and the outbox have room right now; `false`
    /// otherwise (or once the connection is gone), and nothing was sent.
    pub fn try_send(&self, frame: ServerFrame) -> bool {
        if self.closed.is_cancelled() {
            return false;
        }
        let bytes = frame.wire_size();
        match self.budget.try_queue(frame, bytes) {
            Some(queued) => self.out.try_send(queued),
            None => false,
        }
    }

    /// Answers request `id`, and gives back what it held of the connection's in-flight
    /// limits.
    pub async fn reply(&self, id: u32, body: Result<Response, WireError>) -> bool {
        let sent = self.send(ServerFrame::Response { id, body }).await;
        self.inflight.answered(id);
        sent
    }

    /// Waits for one of the connection's few read slots ([`crate::MAX_PENDING_READS`]).
    /// Work that reads for this connection after its request was answered (a following
    /// subscription, a woken long poll) holds one from before the read until the read is
    /// queued, so a client that stops reading leaves at most that many reads in memory.
    pub async fn read_slot(&self) -> tokio::sync::OwnedSemaphorePermit {
        self.inflight.read_slot().await
    }
}

/// Serves connections from `listener` until `shutdown` is cancelled, then waits for every
/// connection task to end.
pub async fn serve<S: Service>(
    listener: TcpListener,
    service: Arc<S>,
    config: ServerConfig,
    shutdown: CancellationToken,
) {
    let config = Arc::new(config);
    let limit = Arc::new(Semaphore::new(config.max_connections));
    let tracker = TaskTracker::new();
    let ids = AtomicU64::new(1);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => break,
        };
        let (stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let permit = limit.clone().try_acquire_owned();
        let service = service.clone();
        let config = config.clone();
        let shutdown = shutdown.child_token();
        tracker.spawn(async move {
            match permit {
                Ok(_permit) => connection(stream, remote, id, service, &config, shutdown).await,
                Err(_) => {
                    tracing::warn!(
                        "refused connection from {remote}: {} connections already open",
                        config.max_connections
                    );
                    refuse(
                        stream,
                        WireError::new(
                            ErrorCode::Unavailable,
                            format!(
                                "too many connections: this node serves at most {} at once",
                                config.max_connections
                            ),
                        ),
                    )
                    .await;
                }
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

async fn refuse(stream: TcpStream, err: WireError) {
    let (_, w) = stream.into_split();
    let (tx, writer) = Outbox::new(w);
    let _ = tx.send(ServerFrame::Refused(err).into()).await;
    drop(tx);
    let _ = writer.await;
}

fn codec_error(e: &CodecError) -> WireError {
    let code = match e {
        CodecError::TooLarge { .. } => ErrorCode::TooLarge,
        _ => ErrorCode::BadRequest,
    };
    WireError::new(code, e.to_string())
}

async fn connection<S: Service>(
    stream: TcpStream,
    remote: SocketAddr,
    id: u64,
    service: Arc<S>,
    config: &ServerConfig,
    shutdown: CancellationToken,
) {
    let (r, w) = stream.into_split();
    let (tx, writer) = Outbox::new(w);
    // Small until the hello is accepted (Kafka caps unauthenticated frames the same way).
    let first_max = peerbus_proto::MAX_HELLO_FRAME.min(config.max_frame);
    let mut frames = FramedRead::with_capacity(r, FrameCodec::new(first_max), 4 * 1024);
    let ctx = Arc::new(ConnCtx {
        id,
        remote,
        out: tx.clone(),
        budget: Budget::new(),
        inflight: InFlight::new(),
        closed: shutdown.clone(),
    });

    match hello(&mut frames, config).await {
        Ok(()) => {
            frames.decoder_mut().set_max(config.max_frame);
            let welcome = ServerFrame::Welcome {
                protocol: PROTOCOL.to_string(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                node: config.node,
            };
            if tx.send(welcome.into()).await.is_err() {
                return;
            }
        }
        Err(e) => {
            tracing::warn!("refused connection {id} from {remote}: {e}");
            let _ = tx.send(ServerFrame::Refused(e).into()).await;
            drop(tx);
            drop(ctx);
            let _ = writer.await;
            return;
        }
    }
    tracing::debug!("connection {id} from {remote} open");

    // Only a connection that has never asked anything is timed out for silence: once it
    // has sent a request it may hold a subscription or long-poll, whose quiet is normal.
    let mut asked = false;
    loop {
        let idle = async {
            if asked {
                std::future::pending::<()>().await;
            } else {
                tokio::time::sleep(config.idle_timeout).await;
            }
        };
        let next = tokio::select! {
            f = frames.next() => f,
            _ = idle => {
                let err = WireError::new(
                    ErrorCode::BadRequest,
                    format!("idle for {} s: closing", config.idle_timeout.as_secs()),
                );
                tracing::info!("closing connection {id} from {remote}: {err}");
                let _ = tx.send(ServerFrame::Refused(err).into()).await;
                break;
            }
            _ = shutdown.cancelled() => break,
        };
        let body = match next {
            None => break,
            Some(Ok(body)) => body,
            Some(Err(e)) => {
                let err = codec_error(&e);
                if !matches!(e, CodecError::Io(_)) {
                    tracing::warn!("closing connection {id} from {remote}: {err}");
                    let _ = tx.send(ServerFrame::Refused(err).into()).await;
                }
                break;
            }
        };
        let frame_len = body.len();
        match peerbus_proto::decode_client(&body) {
            Ok(ClientFrame::Request {
                id: req_id,
                forward,
                body,
            }) => {
                asked = true;
                // Waiting here stops reading this connection until earlier answers are out.
                let cost = service.cost(&body, frame_len);
                tokio::select! {
                    () = ctx.inflight.admit(req_id, cost) => {}
                    _ = shutdown.cancelled() => break,
                }
                if config.trace_messages {
                    tracing::info!(
                        target: "peerbus::trace",
                        "recv conn={id} from={remote} req={req_id} {}",
                        crate::summarize(&body)
                    );
                }
                service.handle(&ctx, req_id, forward, body).await;
            }
            Ok(ClientFrame::Hello { .. }) => {
                let err = WireError::new(
                    ErrorCode::BadRequest,
                    "hello sent twice: a connection says hello once, first",
                );
                let _ = tx.send(ServerFrame::Refused(err).into()).await;
                break;
            }
            Err(e) => {
                let err = codec_error(&e);
                tracing::warn!("closing connection {id} from {remote}: {err}");
                let _ = tx.send(ServerFrame::Refused(err).into()).await;
                break;
            }
        }
    }
    shutdown.cancel();
    drop(tx);
    drop(ctx);
    let _ = writer.await;
    tracing::debug!("connection {id} from {remote} closed");
}

async fn hello(
    frames: &mut FramedRead<tokio::net::tcp::OwnedReadHalf, FrameCodec>,
    config: &ServerConfig,
) -> Result<(), WireError> {
    let first = tokio::time::timeout(config.hello_timeout, frames.next())
        .await
        .map_err(|_| {
            WireError::new(
                ErrorCode::BadRequest,
                format!(
                    "no hello within {} s: a client must say hello first",
                    config.hello_timeout.as_secs()
                ),
            )
        })?;
    let body = match first {
        None => {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                "connection closed before hello",
            ));
        }
        Some(Err(e)) => return Err(codec_error(&e)),
        Some(Ok(body)) => body,
    };
    match peerbus_proto::decode_client(&body) {
        Ok(ClientFrame::Hello { protocol, token }) => {
            if protocol != PROTOCOL {
                return Err(WireError::new(
                    ErrorCode::Unsupported,
                    format!("unsupported protocol {protocol:?}: this node speaks {PROTOCOL}"),
                ));
            }
            if let Some(expected) = &config.token {
                match token {
                    None => {
                        return Err(WireError::new(
                            ErrorCode::Unauthorized,
                            "this node requires a token (--auth-token / PEERBUS_TOKEN)",
                        ));
                    }
                    Some(t) if !peerbus_proto::same_secret(t.as_bytes(), expected.as_bytes()) => {
                        return Err(WireError::new(
                            ErrorCode::Unauthorized,
                            "wrong token: it does not match this node's --auth-token",
                        ));
                    }
                    Some(_) => {}
                }
            }
            Ok(())
        }
        Ok(ClientFrame::Request { .. }) => Err(WireError::new(
            ErrorCode::BadRequest,
            "request before hello: a client must say hello first",
        )),
        Err(e) => Err(codec_error(&e)),
    }
}
