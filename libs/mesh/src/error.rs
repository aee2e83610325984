//! The mesh's error: each variant tells the caller what to do about it.

use capstan_protocol::DecodeError;
use capstan_protocol::codec::EncodeError;

/// A failed NATS operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// NATS did not answer or refused for a passing reason: retry later (or let JetStream
    /// redeliver).
    // NOTE: the message repeats the source's, as `Corrupt` does and async-nats' own errors do:
    // most of our reports are one `error = %e` field, which shows only `Display`. A reporter
    // that walks `source()` as well prints the client's words twice.
    #[error("NATS unavailable during {op}: {source}")]
    Unavailable {
        /// What was being done.
        op: &'static str,
        /// The client's error, kept whole so its kind can still be asked for.
        source: BoxError,
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
    #[error("cannot set up {what}: {source}")]
    Setup {
        /// The stream, bucket or consumer.
        what: String,
        /// The server's answer, kept whole (its JetStream error code included).
        source: BoxError,
    },
    /// A stream or bucket is at its size limit and refused the write: nothing was stored.
    /// Retry once it has drained (or raise the limit with `capstan nats apply --max-bytes`).
    #[error("{what} is full (at its size limit): nothing was stored")]
    Full {
        /// The stream or bucket, for a person.
        what: &'static str,
    },
    /// The service is shutting down.
    #[error("shutting down")]
    ShuttingDown,
}

/// Whether `error` (or an error it wraps) is a stream's or bucket's refusal for being at its
/// size limit, as nats-server words it.
pub fn is_full(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        let text = error.to_string();
        if text.contains("maximum bytes exceeded") || text.contains("maximum messages exceeded") {
            return true;
        }
        current = error.source();
    }
    false
}

/// The source of an [`Error::Unavailable`]: any error a client returned, or a sentence when
/// Capstan itself gave up (a key that kept changing, a request nobody answered).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

impl Error {
    /// An [`Error::Setup`] of `what`, caused by `error` (kept as the source).
    pub fn setup(what: impl Into<String>, error: impl Into<BoxError>) -> Self {
        Self::Setup {
            what: what.into(),
            source: error.into(),
        }
    }

    /// An [`Error::Unavailable`] during `op`, caused by `error`: any client error (kept as the
    /// source, so `source()` reaches it), or a `String`/`&str` saying why.
    pub fn unavailable(op: &'static str, error: impl Into<BoxError>) -> Self {
        crate::metrics::mesh()
            .errors
            .get_or_create(&[("op", op)])
            .inc();
        Self::Unavailable {
            op,
            source: error.into(),
        }
    }

    /// True when retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable { .. } | Self::KeptChanging { .. })
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn an_unavailable_error_keeps_the_client_error_as_its_source() {
        let client = std::io::Error::new(std::io::ErrorKind::TimedOut, "no responders");
        let error = Error::unavailable("kv get", client);
        assert_eq!(
            error.to_string(),
            "NATS unavailable during kv get: no responders"
        );
        let source = error.source().expect("the client error is the source");
        let io = source
            .downcast_ref::<std::io::Error>()
            .expect("the source keeps its type");
        assert_eq!(io.kind(), std::io::ErrorKind::TimedOut);
        assert!(error.is_transient());
    }

    #[test]
    fn a_setup_error_keeps_the_servers_answer_as_its_source() {
        let refusal = std::io::Error::new(std::io::ErrorKind::AlreadyExists, "consumer exists");
        let error = Error::setup("consumer scheduler", refusal);
        assert_eq!(
            error.to_string(),
            "cannot set up consumer scheduler: consumer exists"
        );
        let source = error.source().expect("the refusal is the source");
        assert!(source.downcast_ref::<std::io::Error>().is_some());
        assert!(
            !error.is_transient(),
            "a refused set-up is not retried as passing"
        );
    }

    #[test]
    fn an_unavailable_error_can_say_why_in_words() {
        let error = Error::unavailable("cancel", "the job's record kept changing");
        assert_eq!(
            error.to_string(),
            "NATS unavailable during cancel: the job's record kept changing"
        );
        assert_eq!(
            error.source().map(ToString::to_string).as_deref(),
            Some("the job's record kept changing")
        );
    }
}
