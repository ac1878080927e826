//! Framed TCP connections shared by every peerbus node and client.
//!
//! [`spawn_writer`] owns a socket's write half: it drains a queue of frames into one buffer
//! and writes it with one syscall, so a burst of responses or deliveries costs one write.
//! [`serve`] is a node's accept loop: connection limit, hello handshake with protocol and
//! token checks, a read loop that hands each request to a [`Service`] in arrival order,
//! and clean closing on garbage, oversized frames, connections that never ask anything
//! (`idle_timeout`) or shutdown.

mod server;
mod trace;
mod writer;

pub use server::{
    ConnCtx, DEFAULT_HELLO_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, ServerConfig,
    Service, serve,
};
pub use trace::summarize;
pub use writer::{OUTBOX_BYTES, OUTBOX_FRAMES, Queued, spawn_writer};
