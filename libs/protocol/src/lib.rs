//! Capstan's wire protocol: the one place that knows every subject, stream, KV bucket, header
//! and message type that services exchange.
//!
//! Services never build a subject with `format!` or pick a wire encoding themselves: they call
//! the builders in [`subjects`], the stream and bucket descriptions in [`topology`], and the
//! encoders in [`codec`]. This crate has no NATS client dependency; `capstan-mesh` turns the
//! neutral descriptions here into async-nats configuration.
//!
//! Encodings: messages between services are MessagePack with named fields (rmp-serde); JSON is
//! accepted wherever a person or a foreign client publishes (see [`codec::Encoding::detect`]).
//! KV values are JSON so that `nats kv get` shows an operator the state as it is.

pub mod access;
pub mod auth;
pub mod claim;
pub mod codec;
pub mod concurrency;
pub mod cron;
pub mod dispatch;
pub mod event;
pub mod fanout;
pub mod headers;
pub mod ids;
pub mod job;
pub mod job_env;
pub mod node;
pub mod reply;
pub mod retry;
pub mod schedule;
#[cfg(feature = "schema")]
pub mod schema;
pub mod secret;
pub mod spec;
pub mod subjects;
pub mod system;
pub mod timer;
pub mod timestamp;
pub mod topology;
pub mod workflow;

pub use auth::{
    AuditAction, AuditOutcome, AuditRecord, AuthMethod, Revocation, RevocationKey, SubmittedBy,
};
pub use codec::{DecodeError, Encoding};
pub use dispatch::Dispatch;
pub use event::{JobEvent, JobEventKind, NodeEvent, NodeEventKind, Rejection, RejectionCode};
pub use fanout::{
    FanOut, FanOutEvent, FanOutRecord, FanOutStatus, Target, TargetKind, TargetStatus,
};
pub use ids::{AuditId, IdError, InstanceId, JobId, NodeId};
pub use job::{JobRecord, JobStatus, OutputSummary};
pub use node::{
    Availability, Heartbeat, HeartbeatReply, NodeCommand, NodeRecord, NodeStatus, NodeTally,
    Registration, TalliedBy,
};
pub use reply::{CancelNotice, CancelOutcome, ErrorCode, JobRef, Reply, ServiceError};
pub use retry::{RetryOn, RetryPolicy};
pub use secret::{SealedSecret, StoredSecret};
pub use spec::{Concurrency, JobSpec, Labels, NeedsPlacement, Program, SpecError, Start};
pub use system::{System, SystemAuth, SystemEvent, SystemHealth, SystemStatus, SystemSummary};
pub use timer::Timer;
pub use timestamp::Timestamp;

/// The protocol's version, carried by executors at registration so operators can see which
/// nodes run which build.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
