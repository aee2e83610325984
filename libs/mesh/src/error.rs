//! The mesh's error: each variant tells the caller what to do about it.

use capstan_protocol::DecodeError;
use capstan_protocol::codec::EncodeError;

/// A failed NATS operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// NATS did not answer or refused for a passing reason: retry later (or let JetStream
    /// redeliver).
    #[error("NATS unavailable during {op}: {reason}")]
    Unavailable {
        /// What was being done.
        op: &'static str,
        /// The client's error.
        reason: String,
    },
    /// A compare-and-swap lost: someone else changed the key. Read it again and decide.
    #[error("{key} changed since revision {revision}")]
    Conflict {
        /// The key.
        key: String,
        /// The revision the write expected.
        revision: u64,
    },
    /// A read-decide-write ([`Bucket::modify`](crate::store::Bucket::modify)) lost its
    /// compare-and-swap [`MODIFY_ATTEMPTS`](crate::store::MODIFY_ATTEMPTS) times in a row:
    /// the key is contended. Retry later (or let JetStream redeliver).
    #[error("{key} kept changing: every compare-and-swap allowed lost to another writer")]
    KeptChanging {
        /// The key.
        key: String,
    },
    /// A create found the key already present.
    #[error("{key} already exists")]
    AlreadyExists {
        /// The key.
        key: String,
    },
    /// A stored value could not be decoded: it was not written by Capstan.
    #[error("stored value of {key} is unreadable: {source}")]
    Corrupt {
        /// The key.
        key: String,
        /// Why.
        source: DecodeError,
    },
    /// A value could not be encoded (a bug).
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The topology could not be created or does not match (a configuration problem).
    #[error("cannot set up {what}: {reason}")]
    Setup {
        /// The stream, bucket or consumer.
        what: String,
        /// The server's answer.
        reason: String,
    },
    /// The service is shutting down.
    #[error("shutting down")]
    ShuttingDown,
}

impl Error {
    /// An [`Error::Unavailable`] from any client error.
    pub fn unavailable(op: &'static str, error: impl std::fmt::Display) -> Self {
        Self::Unavailable {
            op,
            reason: error.to_string(),
        }
    }

    /// True when retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable { .. } | Self::KeptChanging { .. })
    }
}
