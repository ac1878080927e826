//! peerbus storage (being written).
