//! Header names Capstan sets or reads on NATS messages.
//!
//! Event headers repeat the facts a person watching `nats sub 'capstan.events.>'` wants
//! (status, node, exit code) in plain text; the MessagePack body stays the source of truth.

/// `application/json` or `application/msgpack`; optional on input (the payload is sniffed).
pub const CONTENT_TYPE: &str = "Content-Type";
/// JetStream deduplication id.
pub const MSG_ID: &str = "Nats-Msg-Id";
/// The job id to give a submission (set by the API and the create endpoint).
pub const JOB_ID: &str = "Capstan-Job-Id";
/// Who submitted a job ([`crate::SubmittedBy`] as JSON), set by the API on the submissions
/// it stores; a submission without it is attributed to NATS.
pub const SUBMITTED_BY: &str = "Capstan-Submitted-By";
/// When a submission handed on for placement was first stored, in milliseconds since the
/// epoch: a job's delay counts from it.
pub const SUBMITTED_AT: &str = "Capstan-Submitted-At";
/// On a submission handed on for placement: `true` when a client identity sent the original,
/// whose acceptance the mesh then audits.
pub const FROM_CLIENT: &str = "Capstan-From-Client";
/// On a submission handed on for placement: the original's stream sequence, which the job's
/// record and its audit name, whichever message a scheduler reads it from.
pub const SUBMISSION_SEQ: &str = "Capstan-Submission-Seq";
/// The attempt a message is about.
pub const ATTEMPT: &str = "Capstan-Attempt";
/// On a fan-out target's job events: the parent job's id.
pub const FANOUT: &str = "Capstan-Fanout";
/// On a workflow step's job events: the workflow's id (from its metadata).
pub const WORKFLOW: &str = "Capstan-Workflow";
/// The schedule a job's run belongs to, on its events (from its metadata).
pub const SCHEDULE_NAME: &str = "Capstan-Schedule";
/// The concurrency key a job shares, on its events (from its spec).
pub const CONCURRENCY_KEY: &str = "Capstan-Concurrency";
/// A job event's kind, or a node event's kind.
pub const EVENT: &str = "Capstan-Event";
/// The job's status after an event.
pub const STATUS: &str = "Capstan-Status";
/// The executor node.
pub const NODE: &str = "Capstan-Node";
/// The exit code of a finished attempt.
pub const EXIT_CODE: &str = "Capstan-Exit-Code";
/// The signal that killed a finished attempt.
pub const SIGNAL: &str = "Capstan-Signal";
/// Wall time of a finished attempt in milliseconds.
pub const DURATION_MS: &str = "Capstan-Duration-Ms";
/// Why something failed or was rejected.
pub const ERROR: &str = "Capstan-Error";
/// `stdout` or `stderr` on a log chunk.
pub const LOG_STREAM: &str = "Capstan-Stream";
/// Byte offset of a log chunk within its stream.
pub const LOG_OFFSET: &str = "Capstan-Offset";
/// Set to `true` on the log marker published when output passed the cap.
pub const LOG_TRUNCATED: &str = "Capstan-Truncated";
/// W3C trace context.
pub const TRACEPARENT: &str = "traceparent";
/// W3C trace state.
pub const TRACESTATE: &str = "tracestate";
/// JetStream message schedule: `@at <RFC 3339>` fires the message once at that instant.
pub const SCHEDULE: &str = "Nats-Schedule";
/// Where a scheduled message is published when it fires (a subject of the same stream).
pub const SCHEDULE_TARGET: &str = "Nats-Schedule-Target";
