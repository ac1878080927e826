//! Framed TCP connections shared by every peerbus node and client.
//!
//! [`Outbox`] is a socket's sending side: a sender writes its frame from its own task when
//! the socket is free, and a flusher task writes whatever the socket did not take at once,
//! so a round trip crosses no extra task while a burst still leaves in large writes.
//! [`serve`] is a node's accept loop: connection limit, hello handshake with protocol and
//! token checks, a read loop that hands each request to a [`Service`] in arrival order,
//! and clean closing on garbage, oversized frames, connections that never ask anything
//! (`idle_timeout`) or shutdown.

mod inflight;
mod server;
mod trace;
mod writer;

pub use inflight::{MAX_IN_FLIGHT, MAX_IN_FLIGHT_BYTES, MAX_PENDING_READS};
pub use server::{
    ConnCtx, DEFAULT_HELLO_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, ServerConfig,
    Service, serve,
};
pub use trace::summarize;
pub use writer::{OUTBOX_BYTES, Outbox, OutboxClosed, Queued};
