//! The streams and KV buckets of a Capstan mesh, described without a NATS client so that the
//! protocol stays the single source of truth; `capstan-mesh` creates them idempotently. How
//! many servers keep a copy of each ([`Replicas`]) is the deployment's, decided here from what
//! the servers report.

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
    /// Default size limit in bytes (`capstan nats apply --max-bytes` sets another), so that a
    /// flood cannot fill the disk. Past it a work queue refuses new messages, so nothing it
    /// accepted is lost and the publisher is told; a limits stream drops its oldest.
    pub max_bytes: i64,
    /// Window in which a repeated `Nats-Msg-Id` is dropped.
    pub duplicate_window: Duration,
    /// Whether messages may carry a `Nats-Schedule` (nats-server 2.12 and later).
    pub schedules: bool,
}

const DAY: Duration = Duration::from_secs(24 * 3600);
const MIB: i64 = 1024 * 1024;
const GIB: i64 = 1024 * MIB;
const DEDUPE: Duration = Duration::from_secs(120);

/// Submitted jobs waiting to be accepted and placed by a scheduler.
pub const SUBMISSIONS: StreamSpec = StreamSpec {
    name: "CAPSTAN_SUBMISSIONS",
    description: "Job submissions waiting for a scheduler",
    subjects: &[
        subjects::SUBMIT,
        subjects::SUBMIT_FROM_ALL,
        subjects::SUBMIT_JOB_ALL,
        subjects::PLACE_ALL,
    ],
    retention: Retention::WorkQueue,
    max_age: Duration::ZERO,
    max_bytes: GIB,
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
    max_bytes: GIB,
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
    max_bytes: 8 * GIB,
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
    max_bytes: 16 * GIB,
    duplicate_window: DEDUPE,
    schedules: false,
};

/// Durable timers: the start of delayed jobs, the next attempt of retried ones, and the next
/// tick of each schedule. A timer is a scheduled message on `capstan.timers.set.<job>` (or
/// `capstan.timers.schedule.<name>`) that the server publishes onto `capstan.timers.due.<job>`
/// (`capstan.timers.tick.<name>`) at its time, and removes; schedulers consume the fired ones.
pub const TIMERS: StreamSpec = StreamSpec {
    name: "CAPSTAN_TIMERS",
    description: "Timers of delayed and retried jobs",
    subjects: &[subjects::TIMERS_ALL],
    retention: Retention::WorkQueue,
    max_age: Duration::ZERO,
    // One timer per waiting job: far below this while the jobs bucket is within its own.
    max_bytes: GIB,
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
    max_bytes: GIB,
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
    /// Default size limit in bytes (`capstan nats apply --max-bytes` sets another); past it,
    /// writes are refused until entries expire or are purged.
    pub max_bytes: i64,
    /// Whether, kept in more than one copy, its entries are read from the stream's leader
    /// ([`BucketSpec::leader_reads`]).
    pub read_from_leader: bool,
}

impl BucketSpec {
    /// Whether entries are read from the leader of the bucket's stream, kept in `replicas`
    /// copies, rather than from whichever copy answers first (a JetStream "direct get"). A
    /// follower's copy may lag the leader, and JetStream does not yet promise a write is seen
    /// by a read that follows it there: a reader that decides from what it read (an executor
    /// dropping a dispatch whose job it finds changed or gone) must read the leader's. Only
    /// the nodes bucket is read from any copy: an executor may read its own node's record alone,
    /// which only a direct get's subject can say, and a record read late only delays a drain.
    pub fn leader_reads(&self, replicas: Replicas) -> bool {
        self.read_from_leader && replicas > Replicas::ONE
    }
}

/// Job records by job id (JSON [`crate::JobRecord`]).
pub const JOBS: BucketSpec = BucketSpec {
    name: "capstan_jobs",
    description: "Current state of every job, by job id",
    history: 1,
    max_age: Duration::ZERO,
    per_key_ttl: true,
    max_bytes: 8 * GIB,
    read_from_leader: true,
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
    max_bytes: 64 * MIB,
    read_from_leader: false,
};

/// Idempotency keys to job ids, for the idempotency window.
pub const IDEMPOTENCY: BucketSpec = BucketSpec {
    name: "capstan_idempotency",
    description: "Idempotency keys of submitted jobs, mapped to their job ids",
    history: 1,
    max_age: DAY,
    per_key_ttl: false,
    max_bytes: GIB,
    read_from_leader: true,
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
    max_bytes: 64 * MIB,
    read_from_leader: true,
};

/// The longest an access token may live: revocations are kept this long.
pub const MAX_ACCESS_TOKEN_TTL: Duration = DAY;

/// Secrets stored by administrators, by name (JSON [`crate::StoredSecret`]), their values
/// sealed: written by the API, read by the executors that open them for a job.
pub const SECRETS: BucketSpec = BucketSpec {
    name: "capstan_secrets",
    description: "Secrets stored by administrators, sealed, by name",
    history: 1,
    max_age: Duration::ZERO,
    per_key_ttl: false,
    max_bytes: 64 * MIB,
    read_from_leader: true,
};

/// Remote systems as administrators describe them, by name (JSON [`crate::system::System`],
/// credentials sealed): written by the API, read by the gateways that connect to them.
pub const SYSTEMS: BucketSpec = BucketSpec {
    name: "capstan_systems",
    description: "Remote systems reached over SSH, credentials sealed, by name",
    history: 1,
    max_age: Duration::ZERO,
    per_key_ttl: false,
    max_bytes: 64 * MIB,
    read_from_leader: true,
};

/// What the gateways found of each system, by name (JSON [`crate::system::SystemStatus`]):
/// written by the gateways that check them, read by the API.
pub const SYSTEM_STATUS: BucketSpec = BucketSpec {
    name: "capstan_system_status",
    description: "Health of remote systems and host keys pinned on first use, by name",
    history: 1,
    max_age: Duration::ZERO,
    per_key_ttl: false,
    max_bytes: 64 * MIB,
    read_from_leader: true,
};

/// Fan-out parents by job id (JSON [`crate::fanout::FanOutRecord`]): their targets and where
/// each stands, written by schedulers (and the API's cancel) by compare-and-swap; a finished
/// parent expires like a finished job.
pub const FANOUTS: BucketSpec = BucketSpec {
    name: "capstan_fanouts",
    description: "Fan-out parents and their targets, by job id",
    history: 1,
    max_age: Duration::ZERO,
    per_key_ttl: true,
    max_bytes: GIB,
    read_from_leader: true,
};

/// Schedules by name (JSON [`crate::schedule::ScheduleRecord`]): their definitions, written by
/// the API, and what their ticks did, written by schedulers, both by compare-and-swap.
pub const SCHEDULES: BucketSpec = BucketSpec {
    name: "capstan_schedules",
    description: "Schedules and what their last tick did, by name",
    history: 1,
    max_age: Duration::ZERO,
    per_key_ttl: false,
    max_bytes: GIB,
    read_from_leader: true,
};

/// Concurrency limits by key (JSON [`crate::concurrency::Slots`]): the jobs holding a slot
/// and those waiting for one, written by schedulers by compare-and-swap.
pub const CONCURRENCY: BucketSpec = BucketSpec {
    name: "capstan_concurrency",
    description: "Jobs running and waiting under each concurrency key",
    history: 1,
    max_age: Duration::ZERO,
    per_key_ttl: false,
    max_bytes: GIB,
    read_from_leader: true,
};

/// Workflows by id (JSON [`crate::workflow::WorkflowRecord`]): their graphs and where each
/// step stands, created by the API and carried forward by schedulers (and the API's cancel) by
/// compare-and-swap; a finished workflow expires like a finished job.
pub const WORKFLOWS: BucketSpec = BucketSpec {
    name: "capstan_workflows",
    description: "Workflows and where each of their steps stands, by id",
    history: 1,
    max_age: Duration::ZERO,
    per_key_ttl: true,
    max_bytes: GIB,
    read_from_leader: true,
};

/// Every bucket.
pub const BUCKETS: [BucketSpec; 11] = [
    JOBS,
    NODES,
    IDEMPOTENCY,
    REVOCATIONS,
    SECRETS,
    SYSTEMS,
    SYSTEM_STATUS,
    FANOUTS,
    SCHEDULES,
    CONCURRENCY,
    WORKFLOWS,
];

/// How many servers keep a copy of each stream and bucket: 1 to [`Replicas::MOST`] (what
/// JetStream allows). A shared durable consumer keeps as many as its stream (it is created
/// without a count of its own, so it follows its stream when that is raised). The topology's
/// shapes above do not say it: it is the deployment's choice, made when `capstan nats apply`
/// runs ([`Replicas::automatic`] when the operator does not say).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Replicas(u8);

/// A replica count JetStream does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} replicas: a stream has 1 to {most} copies", most = Replicas::MOST)]
pub struct InvalidReplicas(pub u64);

impl Replicas {
    /// The most copies JetStream keeps of a stream.
    pub const MOST: u8 = 5;

    /// One copy: a single server, or a cluster that shares its streams out without copying
    /// them.
    pub const ONE: Replicas = Replicas(1);

    /// Three copies: a cluster of three servers or more keeps every stream while one is down.
    pub const THREE: Replicas = Replicas(3);

    /// `count` copies, if JetStream allows it.
    pub fn new(count: u64) -> Result<Self, InvalidReplicas> {
        match u8::try_from(count) {
            Ok(count @ 1..=Self::MOST) => Ok(Self(count)),
            _ => Err(InvalidReplicas(count)),
        }
    }

    /// The count.
    pub fn get(self) -> u8 {
        self.0
    }

    /// What a cluster of `servers` JetStream servers can hold with one of them down: three
    /// copies from three servers on (a copy on a majority survives), else one (two copies
    /// would stop the stream whenever either server is away).
    pub fn for_servers(servers: usize) -> Self {
        if servers >= 3 { Self::THREE } else { Self::ONE }
    }

    /// The count `capstan nats apply` uses when the operator names none: what the servers that
    /// answered can hold ([`Replicas::for_servers`]), but never fewer than a stream or bucket
    /// of the topology already has (`existing`): an apply run while a server is down, or
    /// answering slowly, does not take copies away. Lowering is the operator's explicit choice.
    pub fn automatic(servers: usize, existing: impl IntoIterator<Item = Replicas>) -> Self {
        existing
            .into_iter()
            .fold(Self::for_servers(servers), Ord::max)
    }
}

impl std::fmt::Display for Replicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for Replicas {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let count: u64 = text
            .trim()
            .parse()
            .map_err(|_| format!("`{text}` is not a number of replicas (1 to {})", Self::MOST))?;
        Self::new(count).map_err(|e| e.to_string())
    }
}

/// The file store the topology reserves: every stream's and bucket's byte limit together.
/// A JetStream server must be given at least this much (`max_file_store`) to create them;
/// its default, three quarters of the disk's free space when it starts, can be less.
pub fn reserved_bytes() -> i64 {
    STREAMS.iter().map(|stream| stream.max_bytes).sum::<i64>()
        + BUCKETS.iter().map(|bucket| bucket.max_bytes).sum::<i64>()
}

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

/// Where a new durable consumer starts reading its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// The first message the stream holds.
    First,
    /// The next message stored after the consumer is created.
    New,
}

/// A durable pull consumer's shape. Every consumer acknowledges each message explicitly and
/// gives up on a message after `max_deliver` deliveries, so none redelivers forever. It keeps
/// as many copies as its stream ([`Replicas`]).
///
/// `ack_wait` and `max_ack_pending` are defaults: a service may set them from its own
/// configuration (how long its work may take, how much it holds at once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerSpec {
    /// The durable name, shared by every replica of the service that consumes.
    pub name: String,
    /// The stream it reads.
    pub stream: &'static str,
    /// What it is for.
    pub description: String,
    /// The subjects it receives.
    pub subjects: Vec<String>,
    /// Where it starts when first created.
    pub start: StartAt,
    /// How long a delivered message may go unacknowledged before it is delivered again.
    pub ack_wait: Duration,
    /// The most deliveries of one message.
    pub max_deliver: i64,
    /// The most messages delivered and not yet acknowledged.
    pub max_ack_pending: i64,
    /// The priority group its pulls name, when several kinds of puller share it and the
    /// server serves them in priority order (lowest first): see [`SUBMISSIONS_GROUP`].
    pub priority_group: Option<&'static str>,
}

/// The priority group of the submissions consumer ([`SCHEDULER_CONSUMER`]). Executors and
/// schedulers both pull from it: an executor with a free slot pulls at
/// [`TAKE_PRIORITY_EXECUTOR`] and runs a plain job itself (the fast lane); a scheduler takes
/// only what waits there, at [`TAKE_PRIORITY_SCHEDULER`], which the server serves only while
/// no executor is asking.
pub const SUBMISSIONS_GROUP: &str = "takers";

/// How long a submission taken from [`SCHEDULER_CONSUMER`] may go unacknowledged before it is
/// delivered again, by default: about a heartbeat timeout, so that a job an executor took and
/// died with is found about as soon as its node is found down.
pub const SUBMISSION_ACK_WAIT: Duration = Duration::from_secs(10);

/// The pull priority of an executor on the submissions consumer: served first.
pub const TAKE_PRIORITY_EXECUTOR: usize = 0;

/// The pull priority of a scheduler on the submissions consumer: served when no executor asks.
pub const TAKE_PRIORITY_SCHEDULER: usize = 1;

/// The durable consumer on the submitted subjects, shared by the schedulers and the executors
/// (in [`SUBMISSIONS_GROUP`]).
pub const SCHEDULER_CONSUMER: &str = "scheduler";

/// The durable consumer the schedulers share on the submissions handed on for placement
/// (`capstan.jobs.place.<job>`).
pub const PLACE_CONSUMER: &str = "scheduler-place";

/// The durable consumer the schedulers share on fired timers.
pub const TIMERS_CONSUMER: &str = "scheduler-timers";

/// The durable consumer the schedulers share on fired schedule ticks.
pub const TICKS_CONSUMER: &str = "scheduler-ticks";

/// The durable consumer the schedulers share on node events, to settle the attempts of
/// nodes that went down or restarted.
pub const NODES_CONSUMER: &str = "scheduler-nodes";

/// The durable consumer the API replicas share on the events stream, for the history.
pub const HISTORY_CONSUMER: &str = "api-history";

/// The durable consumer the API replicas share on the audit stream, for the `audit` table.
pub const AUDIT_CONSUMER: &str = "api-audit";

/// The durable consumer the registry replicas share to tally lost attempts per node.
pub const REGISTRY_CONSUMER: &str = "registry-tally";

/// Every shared durable consumer's name (each executor node's own is [`executor_consumer`]).
pub const CONSUMERS: [&str; 8] = [
    SCHEDULER_CONSUMER,
    PLACE_CONSUMER,
    TIMERS_CONSUMER,
    TICKS_CONSUMER,
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

/// Deliveries of one message to the shared consumers. A handler rejects bad input at once
/// (terminating it), so only passing failures count, each followed by a longer delay: twenty
/// span minutes of outage.
const SHARED_MAX_DELIVER: i64 = 20;

fn shared(
    name: &str,
    stream: &StreamSpec,
    description: &str,
    subjects: impl IntoIterator<Item = String>,
) -> ConsumerSpec {
    ConsumerSpec {
        name: name.to_owned(),
        stream: stream.name,
        description: description.to_owned(),
        subjects: subjects.into_iter().collect(),
        start: StartAt::First,
        ack_wait: Duration::from_secs(30),
        max_deliver: SHARED_MAX_DELIVER,
        max_ack_pending: 20_000,
        priority_group: None,
    }
}

/// Schedulers accepting submissions ([`SCHEDULER_CONSUMER`]).
pub fn scheduler_consumer() -> ConsumerSpec {
    ConsumerSpec {
        priority_group: Some(SUBMISSIONS_GROUP),
        ack_wait: SUBMISSION_ACK_WAIT,
        ..shared(
            SCHEDULER_CONSUMER,
            &SUBMISSIONS,
            "Executors running plain jobs at once, schedulers placing the rest",
            [
                subjects::SUBMIT.to_owned(),
                subjects::SUBMIT_FROM_ALL.to_owned(),
                subjects::SUBMIT_JOB_ALL.to_owned(),
            ],
        )
    }
}

/// Schedulers placing the submissions executors handed on ([`PLACE_CONSUMER`]).
pub fn place_consumer() -> ConsumerSpec {
    shared(
        PLACE_CONSUMER,
        &SUBMISSIONS,
        "Schedulers placing the submissions executors handed on",
        [subjects::PLACE_ALL.to_owned()],
    )
}

/// Schedulers waking delayed and retried jobs ([`TIMERS_CONSUMER`]).
pub fn timers_consumer() -> ConsumerSpec {
    shared(
        TIMERS_CONSUMER,
        &TIMERS,
        "Schedulers waking delayed and retried jobs",
        [subjects::TIMERS_DUE_ALL.to_owned()],
    )
}

/// Schedulers handling the fired ticks of schedules ([`TICKS_CONSUMER`]).
pub fn ticks_consumer() -> ConsumerSpec {
    shared(
        TICKS_CONSUMER,
        &TIMERS,
        "Schedulers running the ticks of schedules",
        [subjects::SCHEDULE_TICKS_ALL.to_owned()],
    )
}

/// Schedulers settling the attempts of lost nodes ([`NODES_CONSUMER`]). It starts from its
/// creation: events from before the mesh had it were settled by the executors' own restarts.
pub fn nodes_consumer() -> ConsumerSpec {
    ConsumerSpec {
        start: StartAt::New,
        // Settling a node reads its dispatches and writes each job: it may take a while.
        ack_wait: Duration::from_secs(60),
        ..shared(
            NODES_CONSUMER,
            &EVENTS,
            "Schedulers settling the attempts of lost nodes",
            [subjects::NODE_EVENTS_ALL.to_owned()],
        )
    }
}

/// API replicas projecting job events into the history ([`HISTORY_CONSUMER`]).
pub fn history_consumer() -> ConsumerSpec {
    shared(
        HISTORY_CONSUMER,
        &EVENTS,
        "API replicas projecting job events into the history",
        [subjects::JOB_EVENTS_ALL.to_owned()],
    )
}

/// API replicas projecting audit records into the `audit` table ([`AUDIT_CONSUMER`]).
pub fn audit_consumer() -> ConsumerSpec {
    ConsumerSpec {
        max_ack_pending: 10_000,
        ..shared(
            AUDIT_CONSUMER,
            &AUDIT,
            "API replicas projecting audit records into the audit table",
            [subjects::AUDIT_ALL.to_owned()],
        )
    }
}

/// Registry replicas tallying the attempts each node lost ([`REGISTRY_CONSUMER`]): only the
/// kinds that may carry a lost or quarantined attempt (`lost`, `quarantined`, and `retrying`,
/// whose record says how the attempt ended). The nodes count the rest themselves
/// ([`crate::TalliedBy`]), so a job that succeeds is delivered here not at all.
pub fn registry_consumer() -> ConsumerSpec {
    use crate::JobEventKind;
    shared(
        REGISTRY_CONSUMER,
        &EVENTS,
        "Registry replicas tallying lost attempts per node",
        [
            JobEventKind::Retrying,
            JobEventKind::Lost,
            JobEventKind::Quarantined,
        ]
        .map(subjects::job_events_of_kind),
    )
}

/// The shared durable consumers, in [`CONSUMERS`]' order.
pub fn consumers() -> [ConsumerSpec; 8] {
    [
        scheduler_consumer(),
        place_consumer(),
        timers_consumer(),
        ticks_consumer(),
        nodes_consumer(),
        history_consumer(),
        audit_consumer(),
        registry_consumer(),
    ]
}

/// The executor of `node` pulling its dispatches, two per slot at most (the ones running, the
/// ones next). The executor quarantines a job whose dispatch was delivered
/// [`crate::retry::limits::MAX_DISPATCH_DELIVERIES`] times, before this consumer's own limit
/// would strand it.
pub fn executor_consumer_spec(node: &crate::NodeId, slots: u32) -> ConsumerSpec {
    ConsumerSpec {
        name: executor_consumer(node),
        stream: DISPATCH.name,
        description: format!("Dispatches of executor node {node}"),
        subjects: vec![subjects::dispatch(node)],
        start: StartAt::First,
        ack_wait: Duration::from_secs(30),
        max_deliver: 10,
        max_ack_pending: i64::from(slots.max(1)) * 2,
        priority_group: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subjects::covers;

    #[test]
    fn every_stream_and_bucket_has_a_size_limit() {
        for stream in STREAMS {
            assert!(stream.max_bytes > 0, "{} is unbounded", stream.name);
        }
        for bucket in BUCKETS {
            assert!(bucket.max_bytes > 0, "{} is unbounded", bucket.name);
        }
    }

    #[test]
    fn every_bucket_but_the_nodes_is_read_from_its_leader_once_it_has_copies() {
        for bucket in BUCKETS {
            assert!(!bucket.leader_reads(Replicas::ONE), "{}", bucket.name);
            assert_eq!(
                bucket.leader_reads(Replicas::THREE),
                bucket.name != NODES.name,
                "{}",
                bucket.name
            );
        }
    }

    #[test]
    fn replicas_are_one_to_five() {
        assert_eq!("3".parse::<Replicas>(), Ok(Replicas::THREE));
        assert_eq!(Replicas::new(1), Ok(Replicas::ONE));
        assert_eq!(Replicas::new(5).map(Replicas::get), Ok(5));
        assert!(Replicas::new(0).is_err());
        assert!(Replicas::new(6).is_err());
        assert!(Replicas::new(256).is_err());
        assert!("three".parse::<Replicas>().is_err());
    }

    #[test]
    fn a_cluster_of_three_servers_or_more_keeps_three_copies_and_a_smaller_one_keeps_one() {
        assert_eq!(Replicas::for_servers(0), Replicas::ONE);
        assert_eq!(Replicas::for_servers(1), Replicas::ONE);
        assert_eq!(Replicas::for_servers(2), Replicas::ONE);
        assert_eq!(Replicas::for_servers(3), Replicas::THREE);
        assert_eq!(Replicas::for_servers(7), Replicas::THREE);
    }

    #[test]
    fn an_automatic_count_never_takes_copies_away_from_a_stream_that_has_them() {
        // A server of three down while apply runs: two answer, the streams keep three copies.
        assert_eq!(
            Replicas::automatic(2, [Replicas::THREE, Replicas::ONE]),
            Replicas::THREE
        );
        // A single server's first apply, and an R1 topology raised once the cluster has three.
        assert_eq!(Replicas::automatic(1, []), Replicas::ONE);
        assert_eq!(Replicas::automatic(3, [Replicas::ONE]), Replicas::THREE);
        let five = Replicas::new(5).expect("valid");
        assert_eq!(Replicas::automatic(3, [five]), five);
    }

    #[test]
    fn idempotency_keys_become_valid_kv_keys() {
        let key = idempotency_bucket_key("order:42 / ünïcode");
        assert!(key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
        assert_ne!(key, idempotency_bucket_key("order:43 / ünïcode"));
    }

    #[test]
    fn every_shared_consumer_is_declared_once_under_its_name_on_a_stream_holding_its_subjects() {
        let specs = consumers();
        let names: Vec<&str> = specs.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, CONSUMERS);
        let node = crate::NodeId::new("exec-1").expect("a node id");
        for consumer in specs.iter().chain([&executor_consumer_spec(&node, 4)]) {
            let stream = STREAMS
                .iter()
                .find(|s| s.name == consumer.stream)
                .unwrap_or_else(|| panic!("{} reads an unknown stream", consumer.name));
            assert!(!consumer.subjects.is_empty(), "{}", consumer.name);
            for subject in &consumer.subjects {
                assert!(
                    stream.subjects.iter().any(|s| covers(s, subject)),
                    "{} filters {subject}, which {} does not hold",
                    consumer.name,
                    stream.name
                );
            }
            assert!(
                (1..=SHARED_MAX_DELIVER).contains(&consumer.max_deliver),
                "{} must give up on a message",
                consumer.name
            );
            assert!(consumer.max_ack_pending > 0 && !consumer.ack_wait.is_zero());
        }
    }

    #[test]
    fn an_executor_quarantines_a_redelivered_dispatch_before_its_consumer_gives_up_on_it() {
        let node = crate::NodeId::new("exec-1").expect("a node id");
        let limit = executor_consumer_spec(&node, 1).max_deliver;
        assert!(crate::retry::limits::MAX_DISPATCH_DELIVERIES < limit);
    }

    #[test]
    fn a_work_queue_consumer_starts_at_the_first_message() {
        // The server refuses any other start on a work-queue stream.
        let node = crate::NodeId::new("exec-1").expect("a node id");
        for consumer in consumers()
            .iter()
            .chain([&executor_consumer_spec(&node, 1)])
        {
            let stream = STREAMS
                .iter()
                .find(|s| s.name == consumer.stream)
                .expect("its stream");
            if stream.retention == Retention::WorkQueue {
                assert_eq!(consumer.start, StartAt::First, "{}", consumer.name);
            }
        }
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
