//! Identifiers: job ids and executor instance ids are ULIDs, node ids are operator-chosen names
//! restricted to what is valid as a single NATS subject token, a consumer name and a KV key.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use ulid::Ulid;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Not a 26-character Crockford base32 ULID.
    #[error("`{0}` is not a valid ULID (26 characters of Crockford base32)")]
    NotUlid(String),
    /// A node id that is empty, too long, or has characters outside `[A-Za-z0-9_-]`.
    #[error(
        "`{0}` is not a valid node id: use 1 to {max} characters from A-Z, a-z, 0-9, `_` and `-`",
        max = NodeId::MAX_LEN
    )]
    BadNodeId(String),
}

/// A fresh ULID, greater than every other this process made: within one millisecond the random
/// part is incremented, so ids made in a row (a burst of submissions through one API) sort in
/// the order they were made.
fn monotonic_ulid() -> Ulid {
    static GENERATOR: std::sync::Mutex<Option<ulid::Generator>> = std::sync::Mutex::new(None);
    let mut generator = GENERATOR
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    generator
        .get_or_insert_with(ulid::Generator::new)
        .generate()
        // The random part overflowed within one millisecond: fall back to a random id.
        .unwrap_or_else(|_| Ulid::generate())
}

macro_rules! ulid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(Ulid);

        impl $name {
            /// A fresh id with the current time as its timestamp, greater than any this
            /// process made before.
            pub fn generate() -> Self {
                Self(monotonic_ulid())
            }

            /// The underlying ULID.
            pub fn ulid(self) -> Ulid {
                self.0
            }

            /// Milliseconds since the Unix epoch encoded in the id.
            pub fn timestamp_ms(self) -> u64 {
                self.0.timestamp_ms()
            }
        }

        impl From<Ulid> for $name {
            fn from(ulid: Ulid) -> Self {
                Self(ulid)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Ulid::from_string(s)
                    .map(Self)
                    .map_err(|_| IdError::NotUlid(s.to_owned()))
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                self.0.serialize(serializer)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

ulid_id!(
    /// A job's id. Also the job's key in the jobs KV bucket and a token of its subjects.
    JobId
);
ulid_id!(
    /// One start of an executor process. A restarted executor keeps its [`NodeId`] and gets a
    /// new instance id, which is how the registry and the job records tell a restart apart from
    /// a live process.
    InstanceId
);
ulid_id!(
    /// One audit record's id: its time, and its place among the records one process wrote.
    AuditId
);

impl JobId {
    /// The id of a job submitted without one, derived from where its submission is stored: the
    /// publish time and the stream sequence of the submission message.
    ///
    /// A redelivered submission carries the same time and sequence, so every replica and every
    /// redelivery derives the same id: this is what makes accepting a submission idempotent.
    pub fn derived(published_ms: u64, stream_sequence: u64) -> Self {
        Self(derived_ulid(0xCA95, published_ms, stream_sequence))
    }
}

impl AuditId {
    /// The id of the audit record of a client's submission, derived from where the submission
    /// is stored, as [`JobId::derived`] is: every service that accepts it, and every
    /// redelivery, gives the record the same id, so the history keeps one row however often
    /// it is audited, even past the audit stream's deduplication window.
    pub fn derived(published_ms: u64, stream_sequence: u64) -> Self {
        Self(derived_ulid(0xA0D1, published_ms, stream_sequence))
    }
}

/// A ULID whose 80 random bits hold `sequence`, under `marker` in their top 16 bits: the
/// marker keeps derived ids apart from randomly generated ones with the same timestamp, and
/// one kind of derived id apart from another.
fn derived_ulid(marker: u16, ms: u64, sequence: u64) -> Ulid {
    Ulid::from_parts(ms, (u128::from(marker) << 64) | u128::from(sequence))
}

/// An executor node's name: stable across restarts, unique in a mesh.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(String);

impl NodeId {
    /// The longest node id accepted.
    pub const MAX_LEN: usize = 64;

    /// Parses a node id.
    pub fn new(id: impl Into<String>) -> Result<Self, IdError> {
        let id = id.into();
        let valid = !id.is_empty()
            && id.len() <= Self::MAX_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if valid {
            Ok(Self(id))
        } else {
            Err(IdError::BadNodeId(id))
        }
    }

    /// A node id made from a host name: characters a node id cannot hold become `-`.
    pub fn from_hostname(hostname: &str) -> Self {
        let mut id: String = hostname
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .take(Self::MAX_LEN)
            .collect();
        if id.is_empty() {
            id.push_str("executor");
        }
        Self(id)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.0)
    }
}

impl FromStr for NodeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::new(s)
    }
}

impl Serialize for NodeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::new(text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_made_in_a_row_sort_in_the_order_they_were_made() {
        let ids: Vec<JobId> = (0..2_000).map(|_| JobId::generate()).collect();
        assert!(ids.windows(2).all(|pair| pair[0] < pair[1]));
    }

    #[test]
    fn derived_audit_ids_are_stable_and_never_a_derived_job_id() {
        let a = AuditId::derived(1_700_000_000_000, 7);
        assert_eq!(a, AuditId::derived(1_700_000_000_000, 7));
        assert_ne!(a, AuditId::derived(1_700_000_000_000, 8));
        assert_ne!(a.ulid(), JobId::derived(1_700_000_000_000, 7).ulid());
        assert_eq!(a.timestamp_ms(), 1_700_000_000_000);
    }

    #[test]
    fn derived_job_ids_are_stable_and_distinct_per_sequence() {
        let a = JobId::derived(1_700_000_000_000, 7);
        assert_eq!(a, JobId::derived(1_700_000_000_000, 7));
        assert_ne!(a, JobId::derived(1_700_000_000_000, 8));
        assert_eq!(a.timestamp_ms(), 1_700_000_000_000);
        assert_eq!(a.to_string().parse::<JobId>(), Ok(a));
    }

    #[test]
    fn node_ids_reject_subject_wildcards_and_dots() {
        for bad in ["", "a.b", "a*", ">", "a b", &"x".repeat(65)] {
            assert!(
                matches!(NodeId::new(bad), Err(IdError::BadNodeId(_))),
                "{bad}"
            );
        }
        assert!(NodeId::new("exec-1_a").is_ok());
    }

    #[test]
    fn node_ids_made_from_host_names_are_always_valid() {
        let id = NodeId::from_hostname("web.example.com");
        assert_eq!(id.as_str(), "web-example-com");
        assert!(NodeId::new(id.as_str()).is_ok());
        assert_eq!(NodeId::from_hostname("").as_str(), "executor");
    }

    #[test]
    fn job_ids_reject_text_that_is_not_a_ulid() {
        assert!(matches!(
            "not-a-ulid".parse::<JobId>(),
            Err(IdError::NotUlid(_))
        ));
    }
}
