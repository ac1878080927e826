use peerbus_proto::{ErrorCode, WireError};

/// What can go wrong talking to peerbus nodes.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// A node could not be reached.
    #[error("cannot reach {addr}: {reason}")]
    Connect {
        /// The address tried.
        addr: String,
        /// Why it failed.
        reason: String,
    },
    /// A node refused the connection (wrong protocol version, token, connection limit).
    #[error("{addr} refused the connection: {error}")]
    Refused {
        /// The node's address.
        addr: String,
        /// The node's reason.
        error: WireError,
    },
    /// The node answered with an error.
    #[error("{0}")]
    Server(WireError),
    /// The connection closed before the answer arrived.
    #[error("connection to {addr} closed: {reason}")]
    Closed {
        /// The node's address.
        addr: String,
        /// Why, as far as known.
        reason: String,
    },
    /// The node sent something this client does not understand.
    #[error("unexpected answer from {addr}: {what}")]
    Protocol {
        /// The node's address.
        addr: String,
        /// What was unexpected.
        what: String,
    },
    /// Bad input caught before sending (invalid name, payload over the limit).
    #[error("{0}")]
    Invalid(String),
    /// No answer came within the request's deadline; whether the node acted on the request
    /// is unknown.
    #[error("no answer from {addr} to {what} within {ms} ms")]
    Timeout {
        /// The node's address.
        addr: String,
        /// The kind of request.
        what: &'static str,
        /// How long the client waited, in milliseconds.
        ms: u64,
    },
}

impl ClientError {
    /// The wire error class when the node answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server(e) | ClientError::Refused { error: e, .. } => Some(e.code),
            _ => None,
        }
    }

    /// True when the request may not have reached the node, or the node went away: another
    /// node (or a later try) might answer.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ClientError::Connect { .. } | ClientError::Closed { .. } | ClientError::Timeout { .. }
        ) || self.code() == Some(ErrorCode::Unavailable)
    }
}

impl From<WireError> for ClientError {
    fn from(e: WireError) -> Self {
        ClientError::Server(e)
    }
}

impl From<peerbus_proto::NameError> for ClientError {
    fn from(e: peerbus_proto::NameError) -> Self {
        ClientError::Invalid(e.to_string())
    }
}

/// Result of client calls.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;
