//! The streams and KV buckets of a Capstan mesh, described without a NATS client so that the
//! protocol stays the single source of truth; `capstan-mesh` creates them idempotently.

use std::time::Duration;

use crate::subjects;

/// How a stream keeps messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Until a consumer acknowledges them (each message is work for one consumer).
    WorkQueue,
    /// Until a size or age limit (history others may replay).
    Limits,
}

/// A stream's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamSpec {
    /// Stream name.
    pub name: &'static str,
    /// What it holds.
    pub description: &'static str,
    /// Subjects it stores.
    pub subjects: &'static [&'static str],
    /// Retention.
    pub retention: Retention,
    /// Age limit; zero keeps messages until other limits apply.
    pub max_age: Duration,
    /// Size limit in bytes, the oldest messages dropped past it; -1 for none.
    pub max_bytes: i64,
    /// Window in which a repeated `Nats-Msg-Id` is dropped.
    pub duplicate_window: Duration,
    /// Whether messages may carry a `Nats-Schedule` (nats-server 2.12 and later).
    pub schedules: bool,
}

const DAY: Duration = Duration::from_secs(24 * 3600);
const DEDUPE: Duration = Duration::from_secs(120);

/// Submitted jobs waiting to be accepted and placed by a scheduler.
pub const SUBMISSIONS: StreamSpec = StreamSpec {
    name: "CAPSTAN_SUBMISSIONS",
    description: "Job submissions waiting for a scheduler",
    subjects: &[subjects::SUBMIT],
    retention: Retention::WorkQueue,
    max_age: Duration::ZERO,
    max_bytes: -1,
    duplicate_window: DEDUPE,
    schedules: false,
};

/// Attempts assigned to executor nodes, one subject per node.
pub const DISPATCH: StreamSpec = StreamSpec {
    name: "CAPSTAN_DISPATCH",
    description: "Job attempts assigned to executor nodes",
    subjects: &[subjects::DISPATCH_ALL],
    retention: Retention::WorkQueue,
    max_age: Duration::ZERO,
    max_bytes: -1,
    duplicate_window: DEDUPE,
    schedules: false,
};

/// Job, node and rejection events.
pub const EVENTS: StreamSpec = StreamSpec {
    name: "CAPSTAN_EVENTS",
    description: "Job, node and rejection events",
    subjects: &[subjects::EVENTS_ALL],
    retention: Retention::Limits,
    max_age: Duration::from_secs(7 * 24 * 3600),
    max_bytes: -1,
    duplicate_window: DEDUPE,
    schedules: false,
};

/// Job output.
pub const LOGS: StreamSpec = StreamSpec {
    name: "CAPSTAN_LOGS",
    description: "Standard output and error of jobs, as produced",
    subjects: &[subjects::LOGS_ALL],
    retention: Retention::Limits,
    max_age: Duration::from_secs(7 * 24 * 3600),
    max_bytes: -1,
    duplicate_window: DEDUPE,
    schedules: false,
};

/// Durable timers: the start of delayed jobs and the next attempt of retried ones. A timer is
/// a scheduled message on `capstan.timers.set.<job>` that the server publishes onto
/// `capstan.timers.due.<job>` at its time, and removes; schedulers consume the due ones.
pub const TIMERS: StreamSpec = StreamSpec {
    name: "CAPSTAN_TIMERS",
    description: "Timers of delayed and retried jobs",
    subjects: &[subjects::TIMERS_ALL],
    retention: Retention::WorkQueue,
    max_age: Duration::ZERO,
    max_bytes: -1,
    duplicate_window: DEDUPE,
    schedules: true,
};

/// The audit trail: every audited action of every service. The API's `audit` table is its
/// queryable projection and keeps records past this stream's age limit.
pub const AUDIT: StreamSpec = StreamSpec {
    name: "CAPSTAN_AUDIT",
    description: "Audit records: who did what, when, from where, and how it ended",
    subjects: &[subjects::AUDIT_ALL],
    retention: Retention::Limits,
    max_age: Duration::from_secs(90 * 24 * 3600),
    // Records are small; a flood of refused requests must not fill the disk. The
    // `audit` table keeps what the stream drops.
    max_bytes: 1024 * 1024 * 1024,
    duplicate_window: DEDUPE,
    schedules: false,
};

/// Every stream.
pub const STREAMS: [StreamSpec; 6] = [SUBMISSIONS, DISPATCH, EVENTS, LOGS, TIMERS, AUDIT];

/// A KV bucket's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketSpec {
    /// Bucket name.
    pub name: &'static str,
    /// What it holds.
    pub description: &'static str,
    /// Revisions kept per key.
    pub history: i64,
    /// Age limit of every entry; zero for none.
    pub max_age: Duration,
    /// Whether entries may carry their own TTL.
    pub per_key_ttl: bool,
}

/// Job records by job id (JSON [`crate::JobRecord`]).
pub const JOBS: BucketSpec = BucketSpec {
    name: "capstan_jobs",
    description: "Current state of every job, by job id",
    history: 1,
    max_age: Duration::ZERO,
    per_key_ttl: true,
};

/// How long a finished job's record stays in the jobs bucket; the API's history keeps it after.
pub const FINISHED_JOB_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Executor nodes by node id (JSON [`crate::NodeRecord`]).
pub const NODES: BucketSpec = BucketSpec {
    name: "capstan_nodes",
    description: "Executor nodes, by node id",
    history: 1,
    max_age: Duration::ZERO,
    per_key_ttl: false,
};

/// Idempotency keys to job ids, for the idempotency window.
pub const IDEMPOTENCY: BucketSpec = BucketSpec {
    name: "capstan_idempotency",
    description: "Idempotency keys of submitted jobs, mapped to their job ids",
    history: 1,
    max_age: DAY,
    per_key_ttl: false,
};

/// Revoked users, sessions and API tokens ([`crate::Revocation`] by
/// [`crate::RevocationKey::key`]), watched by every API replica. An entry outlives every access
/// token it can concern: access tokens live at most [`MAX_ACCESS_TOKEN_TTL`].
pub const REVOCATIONS: BucketSpec = BucketSpec {
    name: "capstan_revocations",
    description: "Revoked users, sessions and API tokens, watched by every API replica",
    history: 1,
    max_age: DAY,
    per_key_ttl: false,
};

/// The longest an access token may live: revocations are kept this long.
pub const MAX_ACCESS_TOKEN_TTL: Duration = DAY;

/// Every bucket.
pub const BUCKETS: [BucketSpec; 4] = [JOBS, NODES, IDEMPOTENCY, REVOCATIONS];

/// The key of an idempotency key in the idempotency bucket: its bytes in hex, because KV keys
/// allow only a few characters and idempotency keys allow any printable text.
pub fn idempotency_bucket_key(key: &str) -> String {
    use std::fmt::Write;
    let mut hex = String::with_capacity(2 + key.len() * 2);
    hex.push_str("k_");
    for byte in key.bytes() {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// The durable consumer the schedulers share on the submissions stream.
pub const SCHEDULER_CONSUMER: &str = "scheduler";

/// The durable consumer the schedulers share on fired timers.
pub const TIMERS_CONSUMER: &str = "scheduler-timers";

/// The durable consumer the schedulers share on node events, to settle the attempts of
/// nodes that went down or restarted.
pub const NODES_CONSUMER: &str = "scheduler-nodes";

/// The durable consumer the API replicas share on the events stream, for the history.
pub const HISTORY_CONSUMER: &str = "api-history";

/// The durable consumer the API replicas share on the audit stream, for the `audit` table.
pub const AUDIT_CONSUMER: &str = "api-audit";

/// The durable consumer the registry replicas share to tally job outcomes per node.
pub const REGISTRY_CONSUMER: &str = "registry-tally";

/// Every shared durable consumer's name (each executor node's own is [`executor_consumer`]).
pub const CONSUMERS: [&str; 6] = [
    SCHEDULER_CONSUMER,
    TIMERS_CONSUMER,
    NODES_CONSUMER,
    HISTORY_CONSUMER,
    AUDIT_CONSUMER,
    REGISTRY_CONSUMER,
];

/// The prefix of an executor node's durable consumer name.
pub const EXECUTOR_CONSUMER_PREFIX: &str = "executor-";

/// The durable consumer of one executor node on the dispatch stream.
pub fn executor_consumer(node: &crate::NodeId) -> String {
    format!("{EXECUTOR_CONSUMER_PREFIX}{node}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_become_valid_kv_keys() {
        let key = idempotency_bucket_key("order:42 / ünïcode");
        assert!(key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
        assert_ne!(key, idempotency_bucket_key("order:43 / ünïcode"));
    }

    #[test]
    fn stream_subjects_do_not_overlap() {
        for (i, a) in STREAMS.iter().enumerate() {
            for b in &STREAMS[i + 1..] {
                for sa in a.subjects {
                    for sb in b.subjects {
                        let prefix_a = sa.trim_end_matches(['*', '>']);
                        let prefix_b = sb.trim_end_matches(['*', '>']);
                        assert!(
                            !prefix_a.starts_with(prefix_b) && !prefix_b.starts_with(prefix_a),
                            "{sa} overlaps {sb}"
                        );
                    }
                }
            }
        }
    }
}
