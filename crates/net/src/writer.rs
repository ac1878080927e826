use bytes::BytesMut;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Frames a connection's outbox holds before senders wait: the bound that turns a slow
/// reader into backpressure instead of memory growth.
pub const OUTBOX_FRAMES: usize = 1024;

/// Flush once this much is buffered even if more frames are ready, so one busy connection
/// cannot grow the buffer without bound.
const FLUSH_AT: usize = 1 << 20;

/// Spawns the task that owns `w`: it encodes every frame from `rx` and writes when no more
/// frames are ready (or the buffer is large). It ends when every sender is gone or the
/// socket fails; the socket is shut down on the way out.
pub fn spawn_writer<T>(mut w: OwnedWriteHalf, mut rx: mpsc::Receiver<T>) -> JoinHandle<()>
where
    T: Serialize + Send + 'static,
{
    tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        while let Some(frame) = rx.recv().await {
            buf.clear();
            if let Err(e) = peerbus_proto::encode_frame(&frame, &mut buf) {
                tracing::error!("cannot encode an outgoing frame: {e}");
                break;
            }
            while buf.len() < FLUSH_AT {
                match rx.try_recv() {
                    Ok(frame) => {
                        if let Err(e) = peerbus_proto::encode_frame(&frame, &mut buf) {
                            tracing::error!("cannot encode an outgoing frame: {e}");
                            return;
                        }
                    }
                    Err(_) => break,
                }
            }
            if let Err(e) = w.write_all(&buf).await {
                tracing::debug!("connection write failed: {e}");
                return;
            }
        }
        let _ = w.shutdown().await;
    })
}
