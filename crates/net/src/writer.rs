use std::sync::Arc;

use bytes::BytesMut;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinHandle;

/// Frames a connection's outbox holds before senders wait.
pub const OUTBOX_FRAMES: usize = 1024;

/// Bytes of frames a node's connection may have queued and not yet written before senders
/// wait. Frames alone are no bound (a delivery may carry megabytes), so this budget is what
/// turns a subscriber that stops reading into backpressure instead of memory growth.
pub const OUTBOX_BYTES: usize = 8 << 20;

/// Flush once this much is buffered even if more frames are ready, so one busy connection
/// cannot grow the buffer without bound.
const FLUSH_AT: usize = 1 << 20;

/// A frame in an outbox together with its share of the connection's byte budget, given back
/// when the frame has been written to the socket.
#[derive(Debug)]
pub struct Queued<T> {
    frame: T,
    _permit: Option<OwnedSemaphorePermit>,
}

impl<T> From<T> for Queued<T> {
    /// A frame outside any byte budget (handshakes, clients' own requests).
    fn from(frame: T) -> Self {
        Queued {
            frame,
            _permit: None,
        }
    }
}

/// A connection's byte budget: [`Budget::queue`] waits until the frame's bytes fit.
#[derive(Debug, Clone)]
pub(crate) struct Budget(Arc<Semaphore>);

impl Budget {
    pub(crate) fn new() -> Self {
        Budget(Arc::new(Semaphore::new(OUTBOX_BYTES)))
    }

    /// Reserves `bytes` (at most the whole budget, so one huge frame still goes out alone).
    pub(crate) async fn queue<T>(&self, frame: T, bytes: usize) -> Option<Queued<T>> {
        let n = bytes.clamp(1, OUTBOX_BYTES) as u32;
        let permit = self.0.clone().acquire_many_owned(n).await.ok()?;
        Some(Queued {
            frame,
            _permit: Some(permit),
        })
    }
}

/// Spawns the task that owns `w`: it encodes every frame from `rx` and writes when no more
/// frames are ready (or the buffer is large). Frames are kept until their bytes are written,
/// so their budget is given back only once the socket took them. It ends when every sender
/// is gone or the socket fails; the socket is shut down on the way out.
pub fn spawn_writer<T>(mut w: OwnedWriteHalf, mut rx: mpsc::Receiver<Queued<T>>) -> JoinHandle<()>
where
    T: Serialize + Send + 'static,
{
    tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let mut written: Vec<Queued<T>> = Vec::new();
        while let Some(queued) = rx.recv().await {
            buf.clear();
            if let Err(e) = peerbus_proto::encode_frame(&queued.frame, &mut buf) {
                tracing::error!("cannot encode an outgoing frame: {e}");
                break;
            }
            written.push(queued);
            while buf.len() < FLUSH_AT {
                match rx.try_recv() {
                    Ok(queued) => {
                        if let Err(e) = peerbus_proto::encode_frame(&queued.frame, &mut buf) {
                            tracing::error!("cannot encode an outgoing frame: {e}");
                            return;
                        }
                        written.push(queued);
                    }
                    Err(_) => break,
                }
            }
            if let Err(e) = w.write_all(&buf).await {
                tracing::debug!("connection write failed: {e}");
                return;
            }
            written.clear();
        }
        let _ = w.shutdown().await;
    })
}
