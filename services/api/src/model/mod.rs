//! The REST API's resources, as poem-openapi objects, and their conversions from the protocol
//! and history types. OpenAPI types live only here (jobs and nodes in this file; identity,
//! tokens and the audit trail in `access`; fan-outs, secrets, systems, schedules and
//! workflows in their own modules); the rest of the service works with the protocol's types.

pub mod access;
pub mod fanout;
pub mod schedules;
pub mod secrets;
pub mod systems;
pub mod workflows;

use std::collections::BTreeMap;

use capstan_protocol::retry::{BackoffWire, RetryPolicyWire};
use capstan_protocol::spec::JobSpecWire;
use capstan_protocol::{JobRecord, NodeRecord, RetryOn, SubmittedBy, Timestamp};
use capstan_store::entity::{attempt, event, job};
use poem_openapi::{Enum, Object};

fn rfc3339(millis: i64) -> String {
    Timestamp::from_millis(millis).to_rfc3339()
}

/// A job to run. Exactly one of `command` and `argv`.
#[derive(Debug, Clone, Default, Object)]
#[oai(skip_serializing_if_is_none, deny_unknown_fields)]
pub struct JobSubmission {
    /// A command line, run with `sh -c`.
    pub command: Option<String>,
    /// A program and its arguments, run without a shell.
    pub argv: Option<Vec<String>>,
    /// Environment variables for the process.
    pub env: Option<BTreeMap<String, String>>,
    /// Secret environment variables for the process, given here in clear: the API seals each
    /// (XChaCha20-Poly1305, bound to the job and the name) before anything is stored, only the
    /// executor running an attempt opens them, and no response shows them again (the job lists
    /// their names). Needs the API to have secret keys (`CAPSTAN_SECRET_KEYS`).
    pub secrets: Option<BTreeMap<String, String>>,
    /// Secret environment variables from secrets an administrator stored
    /// (`/api/v1/secrets`): variable name → stored secret's name. The executor running an
    /// attempt opens them, if the stored secret lists the job's submitter in `usable_by`.
    pub secret_refs: Option<BTreeMap<String, String>>,
    /// Absolute working directory; a fresh per-job directory when absent.
    pub cwd: Option<String>,
    /// The job's payload, written to its standard input.
    pub stdin: Option<String>,
    /// Timeout of one attempt, in seconds.
    pub timeout: Option<f64>,
    /// Run only on executors carrying all these labels.
    pub labels: Option<BTreeMap<String, String>>,
    /// Run on this remote system (`/api/v1/systems`) over SSH, through a gateway executor,
    /// instead of on an executor. Takes no `secrets`, `secret_refs` or `cwd`.
    pub system: Option<String>,
    /// Fan out over remote systems: run once on each system named, or on each active system
    /// carrying the labels, as a parent of one job per system (`GET
    /// /api/v1/jobs/{id}/targets`). Takes no `secrets`, `secret_refs` or `cwd`.
    pub systems: Option<fanout::SystemTargets>,
    /// Fan out over executor nodes: run once on each node that is up and carries the labels
    /// (every such node when none are given). Takes no `labels` or sealed `secrets`.
    pub nodes: Option<fanout::NodeTargets>,
    /// With `systems` or `nodes`: most targets running at once (all when absent).
    #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
    pub max_parallel: Option<u32>,
    /// With `systems` or `nodes`: a target that ends unsuccessfully cancels the running
    /// ones and skips those not started.
    pub fail_fast: Option<bool>,
    /// A human name.
    pub name: Option<String>,
    /// Free-form annotations.
    pub metadata: Option<BTreeMap<String, String>>,
    /// Submissions with the same key within 24 hours are one job.
    pub idempotency_key: Option<String>,
    /// How unsuccessful attempts are retried. Without it, lost attempts (the executor died or
    /// went silent) are retried at once, up to 3 attempts in all, and failures are not.
    pub retry: Option<RetryPolicyBody>,
    /// Do not start before this instant (RFC 3339); the job is `scheduled` until then. At most
    /// one of `run_at` and `delay`.
    pub run_at: Option<String>,
    /// Do not start before this many seconds after submission.
    pub delay: Option<f64>,
    /// Among jobs waiting for room, higher goes first; equal ones in submission order (0 to
    /// 9, default 5).
    #[oai(validator(minimum(value = "0"), maximum(value = "9")))]
    pub priority: Option<u8>,
    /// At most `limit` jobs sharing `key` run at once across the mesh; the others wait
    /// `pending`, in priority and then submission order.
    pub concurrency: Option<ConcurrencyBody>,
}

/// A limit on how many jobs sharing a key run at once.
#[derive(Debug, Clone, Object)]
#[oai(deny_unknown_fields)]
pub struct ConcurrencyBody {
    /// The key: 1 to 128 letters, digits, `_`, `-` or `.` (not first, last or twice in a
    /// row).
    #[oai(validator(min_length = 1, max_length = 128))]
    pub key: String,
    /// How many may run at once (1 to 10,000).
    #[oai(validator(minimum(value = "1"), maximum(value = "10000")))]
    pub limit: u32,
}

impl From<ConcurrencyBody> for capstan_protocol::Concurrency {
    fn from(body: ConcurrencyBody) -> Self {
        Self {
            key: body.key,
            limit: body.limit,
        }
    }
}

impl From<capstan_protocol::Concurrency> for ConcurrencyBody {
    fn from(limit: capstan_protocol::Concurrency) -> Self {
        Self {
            key: limit.key,
            limit: limit.limit,
        }
    }
}

/// Why a pending job has not started: it waits for a slot under its concurrency key.
#[derive(Debug, Clone, Object)]
pub struct WaitingView {
    /// The key.
    pub concurrency_key: String,
    /// Its limit, as the job gives it.
    pub limit: u32,
    /// Jobs holding a slot now.
    pub running: u32,
    /// Jobs that get a slot before this one.
    pub ahead: u32,
}

/// How unsuccessful attempts of a job are retried. Every field is optional.
#[derive(Debug, Clone, Default, Object)]
#[oai(skip_serializing_if_is_none, deny_unknown_fields)]
pub struct RetryPolicyBody {
    /// Attempts in all, the first included (1 to 100; default 3).
    pub max_attempts: Option<u32>,
    /// Waits between attempts.
    pub backoff: Option<BackoffBody>,
    /// Fraction (0 to 1) of each wait that may be randomly taken off it (default 0.2).
    pub jitter: Option<f64>,
    /// Endings that are retried: `failed`, `timed_out`, `lost` (default: all three).
    pub retry_on: Option<Vec<RetryOnView>>,
}

/// Exponential backoff between attempts, in seconds.
#[derive(Debug, Clone, Default, Object)]
#[oai(skip_serializing_if_is_none, deny_unknown_fields)]
pub struct BackoffBody {
    /// Wait before the second attempt (default 1).
    pub initial: Option<f64>,
    /// Factor applied to the wait after each attempt (1 to 10; default 2).
    pub multiplier: Option<f64>,
    /// Longest wait (default 300).
    pub max: Option<f64>,
}

/// An attempt's ending that may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum RetryOnView {
    /// Exited non-zero, killed by a signal, or could not start.
    Failed,
    /// Ran past its timeout.
    TimedOut,
    /// Its executor died, went silent or handed it back.
    Lost,
}

impl From<RetryPolicyBody> for RetryPolicyWire {
    fn from(body: RetryPolicyBody) -> Self {
        RetryPolicyWire {
            max_attempts: body.max_attempts,
            backoff: body.backoff.map(|b| BackoffWire {
                initial: b.initial,
                multiplier: b.multiplier,
                max: b.max,
            }),
            jitter: body.jitter,
            retry_on: body.retry_on.map(|endings| {
                endings
                    .into_iter()
                    .map(|ending| match ending {
                        RetryOnView::Failed => RetryOn::Failed,
                        RetryOnView::TimedOut => RetryOn::TimedOut,
                        RetryOnView::Lost => RetryOn::Lost,
                    })
                    .collect()
            }),
        }
    }
}

impl From<RetryPolicyWire> for RetryPolicyBody {
    fn from(wire: RetryPolicyWire) -> Self {
        RetryPolicyBody {
            max_attempts: wire.max_attempts,
            backoff: wire.backoff.map(|b| BackoffBody {
                initial: b.initial,
                multiplier: b.multiplier,
                max: b.max,
            }),
            jitter: wire.jitter,
            retry_on: wire.retry_on.map(|endings| {
                endings
                    .into_iter()
                    .map(|ending| match ending {
                        RetryOn::Failed => RetryOnView::Failed,
                        RetryOn::TimedOut => RetryOnView::TimedOut,
                        RetryOn::Lost => RetryOnView::Lost,
                    })
                    .collect()
            }),
        }
    }
}

impl From<JobSubmission> for JobSpecWire {
    fn from(body: JobSubmission) -> Self {
        JobSpecWire {
            command: body.command,
            argv: body.argv,
            env: body.env,
            secrets: body.secrets,
            secret_refs: body.secret_refs,
            cwd: body.cwd,
            stdin: body.stdin,
            timeout: body.timeout,
            labels: body.labels,
            system: body.system,
            systems: body.systems.map(Into::into),
            nodes: body.nodes.map(Into::into),
            max_parallel: body.max_parallel,
            fail_fast: body.fail_fast,
            name: body.name,
            metadata: body.metadata,
            idempotency_key: body.idempotency_key,
            retry: body.retry.map(Into::into),
            run_at: body.run_at,
            delay: body.delay,
            priority: body.priority,
            concurrency: body.concurrency.map(Into::into),
        }
    }
}

/// A job as submitted, without its payload.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct JobSpecView {
    /// Shell command.
    pub command: Option<String>,
    /// Program and arguments.
    pub argv: Option<Vec<String>>,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// The names of its secret variables (their values are never shown).
    pub secrets: Vec<String>,
    /// Its variables from stored secrets: variable name → stored secret's name.
    pub secret_refs: BTreeMap<String, String>,
    /// Working directory.
    pub cwd: Option<String>,
    /// Timeout in seconds.
    pub timeout: Option<f64>,
    /// Label selector.
    pub labels: BTreeMap<String, String>,
    /// The remote system it runs on.
    pub system: Option<String>,
    /// The systems it fans out over.
    pub systems: Option<fanout::SystemTargets>,
    /// The nodes it fans out over.
    pub nodes: Option<fanout::NodeTargets>,
    /// Most of its targets running at once.
    pub max_parallel: Option<u32>,
    /// Whether a failed target stops the others.
    pub fail_fast: Option<bool>,
    /// Name.
    pub name: Option<String>,
    /// Annotations.
    pub metadata: BTreeMap<String, String>,
    /// Idempotency key.
    pub idempotency_key: Option<String>,
    /// Retry policy, when one was given.
    pub retry: Option<RetryPolicyBody>,
    /// Start time asked for.
    pub run_at: Option<String>,
    /// Delay asked for, in seconds.
    pub delay: Option<f64>,
    /// Priority among waiting jobs, when not the default.
    pub priority: Option<u8>,
    /// Its concurrency limit.
    pub concurrency: Option<ConcurrencyBody>,
}

impl From<JobSpecWire> for JobSpecView {
    fn from(wire: JobSpecWire) -> Self {
        JobSpecView {
            command: wire.command,
            argv: wire.argv,
            env: wire.env.unwrap_or_default(),
            secrets: wire.secrets.unwrap_or_default().into_keys().collect(),
            secret_refs: wire.secret_refs.unwrap_or_default(),
            cwd: wire.cwd,
            timeout: wire.timeout,
            labels: wire.labels.unwrap_or_default(),
            system: wire.system,
            systems: wire.systems.map(Into::into),
            nodes: wire.nodes.map(Into::into),
            max_parallel: wire.max_parallel,
            fail_fast: wire.fail_fast,
            name: wire.name,
            metadata: wire.metadata.unwrap_or_default(),
            idempotency_key: wire.idempotency_key,
            retry: wire.retry.map(Into::into),
            run_at: wire.run_at,
            delay: wire.delay,
            priority: wire.priority,
            concurrency: wire.concurrency.map(Into::into),
        }
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum Status {
    /// Accepted with a start time still to come.
    Scheduled,
    /// Accepted, waiting for or dispatched to an executor.
    Pending,
    /// Running.
    Running,
    /// An attempt ended unsuccessfully; the next starts at `next_attempt_at`.
    Retrying,
    /// Exited 0.
    Succeeded,
    /// Exited non-zero, killed, or could not start.
    Failed,
    /// Killed at its timeout.
    TimedOut,
    /// Cancelled.
    Cancelled,
    /// Its executor died, went silent or handed it back, with no retry left.
    Lost,
    /// Set aside after its attempts kept taking executors down.
    Quarantined,
    /// A status this version of Capstan does not know, read from a history row a newer
    /// version wrote; upgrade this replica to see it. Never a filter.
    Unknown,
}

impl From<capstan_protocol::JobStatus> for Status {
    fn from(status: capstan_protocol::JobStatus) -> Self {
        use capstan_protocol::JobStatus as S;
        match status {
            S::Scheduled => Status::Scheduled,
            S::Pending => Status::Pending,
            S::Running => Status::Running,
            S::Retrying => Status::Retrying,
            S::Succeeded => Status::Succeeded,
            S::Failed => Status::Failed,
            S::TimedOut => Status::TimedOut,
            S::Cancelled => Status::Cancelled,
            S::Lost => Status::Lost,
            S::Quarantined => Status::Quarantined,
        }
    }
}

/// [`Status::Unknown`] names no job status: it cannot be asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("`unknown` is not a job status: it marks history rows a newer version wrote")]
pub struct UnknownStatus;

impl TryFrom<Status> for capstan_protocol::JobStatus {
    type Error = UnknownStatus;
    fn try_from(status: Status) -> Result<Self, UnknownStatus> {
        use capstan_protocol::JobStatus as S;
        Ok(match status {
            Status::Scheduled => S::Scheduled,
            Status::Pending => S::Pending,
            Status::Running => S::Running,
            Status::Retrying => S::Retrying,
            Status::Succeeded => S::Succeeded,
            Status::Failed => S::Failed,
            Status::TimedOut => S::TimedOut,
            Status::Cancelled => S::Cancelled,
            Status::Lost => S::Lost,
            Status::Quarantined => S::Quarantined,
            Status::Unknown => return Err(UnknownStatus),
        })
    }
}

/// The status a history row holds.
// NOTE: a status this version cannot parse reads `unknown`, neither an error nor a guess.
// Such a row was written by a newer version (during a rolling upgrade the replicas share one
// database); failing the request would let one new row break every list that includes it,
// and reading it as `failed` (as this once did) tells a client a job failed that may have
// succeeded. `unknown` is in the OpenAPI enum, so a client sees that it cannot tell.
fn status_of(text: &str) -> Status {
    match text.parse::<capstan_protocol::JobStatus>() {
        Ok(status) => status.into(),
        Err(_) => {
            tracing::debug!(
                status = text,
                "a history row holds a status this version does not know"
            );
            Status::Unknown
        }
    }
}

/// What happened to a job, as its history records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum EventKind {
    /// Accepted with a start time still to come.
    Scheduled,
    /// Accepted.
    Pending,
    /// An attempt was placed on an executor after the job had waited for one.
    Dispatched,
    /// The executor started the attempt's process.
    Running,
    /// An attempt ended unsuccessfully and another will follow.
    Retrying,
    /// Exited 0.
    Succeeded,
    /// Ended unsuccessfully.
    Failed,
    /// Killed at its timeout.
    TimedOut,
    /// Cancelled.
    Cancelled,
    /// The last attempt was lost with no retry left.
    Lost,
    /// Set aside after repeatedly taking executors down.
    Quarantined,
    /// A kind this version of Capstan does not know, read from a history row a newer version
    /// wrote (as with [`Status::Unknown`]).
    Unknown,
}

impl From<capstan_protocol::JobEventKind> for EventKind {
    fn from(kind: capstan_protocol::JobEventKind) -> Self {
        use capstan_protocol::JobEventKind as K;
        match kind {
            K::Scheduled => EventKind::Scheduled,
            K::Pending => EventKind::Pending,
            K::Dispatched => EventKind::Dispatched,
            K::Running => EventKind::Running,
            K::Retrying => EventKind::Retrying,
            K::Succeeded => EventKind::Succeeded,
            K::Failed => EventKind::Failed,
            K::TimedOut => EventKind::TimedOut,
            K::Cancelled => EventKind::Cancelled,
            K::Lost => EventKind::Lost,
            K::Quarantined => EventKind::Quarantined,
        }
    }
}

/// The event kind a history row holds; `unknown` for one this version cannot read, for the
/// reasons [`status_of`] gives.
fn event_kind_of(text: &str) -> EventKind {
    match text.parse::<capstan_protocol::JobEventKind>() {
        Ok(kind) => kind.into(),
        Err(_) => {
            tracing::debug!(
                kind = text,
                "a history row holds an event kind this version does not know"
            );
            EventKind::Unknown
        }
    }
}

/// Output sizes of an attempt.
#[derive(Debug, Clone, Copy, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct Output {
    /// Bytes written to standard output.
    pub stdout_bytes: u64,
    /// Bytes written to standard error.
    pub stderr_bytes: u64,
    /// Part of the output was not kept.
    pub truncated: bool,
}

impl From<capstan_protocol::OutputSummary> for Output {
    fn from(summary: capstan_protocol::OutputSummary) -> Self {
        Output {
            stdout_bytes: summary.stdout_bytes,
            stderr_bytes: summary.stderr_bytes,
            truncated: summary.truncated,
        }
    }
}

/// One attempt at running a job.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct Attempt {
    /// Attempt number, from 1.
    pub attempt: u32,
    /// The attempt's status.
    pub status: Status,
    /// Executor node.
    pub node: Option<String>,
    /// Dispatched at.
    pub dispatched_at: Option<String>,
    /// Started at.
    pub started_at: Option<String>,
    /// Finished at.
    pub finished_at: Option<String>,
    /// Exit code.
    pub exit_code: Option<i32>,
    /// Signal that killed it.
    pub signal: Option<i32>,
    /// Why it failed.
    pub error: Option<String>,
    /// Output sizes.
    pub output: Option<Output>,
}

impl From<attempt::Model> for Attempt {
    fn from(row: attempt::Model) -> Self {
        Attempt {
            attempt: u32::try_from(row.attempt).unwrap_or(0),
            status: status_of(&row.status),
            node: row.node,
            dispatched_at: row.dispatched_at.map(rfc3339),
            started_at: row.started_at.map(rfc3339),
            finished_at: row.finished_at.map(rfc3339),
            exit_code: row.exit_code,
            signal: row.signal,
            error: row.error,
            output: output_of(row.stdout_bytes, row.stderr_bytes, row.truncated),
        }
    }
}

impl Attempt {
    /// The current attempt of `record`, as the live record has it; `None` before any attempt
    /// (accepted, or scheduled to start later).
    pub fn current(record: &JobRecord) -> Option<Self> {
        use capstan_protocol::JobStatus as S;
        if record.attempt == 0 || record.status == S::Scheduled {
            return None;
        }
        // How the attempt itself ended, once it has (`attempt_status`: it stays `failed` while
        // the job is retrying, or is cancelled waiting for its next attempt); else where the
        // job is.
        let status = record
            .attempt_status
            .map_or_else(|| record.status.into(), Into::into);
        Some(Attempt {
            attempt: record.attempt,
            status,
            node: record.node.as_ref().map(ToString::to_string),
            dispatched_at: record.dispatched_at.map(Timestamp::to_rfc3339),
            started_at: record.started_at.map(Timestamp::to_rfc3339),
            finished_at: record.finished_at.map(Timestamp::to_rfc3339),
            exit_code: record.exit_code,
            signal: record.signal,
            error: record.error.clone(),
            output: record.output.map(Into::into),
        })
    }
}

fn output_of(stdout: Option<i64>, stderr: Option<i64>, truncated: Option<bool>) -> Option<Output> {
    Some(Output {
        stdout_bytes: u64::try_from(stdout?).unwrap_or(0),
        stderr_bytes: u64::try_from(stderr?).unwrap_or(0),
        truncated: truncated.unwrap_or(false),
    })
}

/// A job: its spec and where it is.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct Job {
    /// The job's id (a ULID).
    pub id: String,
    /// Status.
    pub status: Status,
    /// Current attempt; 0 before the first dispatch.
    pub attempt: u32,
    /// Executor node of the current attempt.
    pub node: Option<String>,
    /// Accepted at.
    pub created_at: String,
    /// Last change.
    pub updated_at: String,
    /// Current attempt dispatched at.
    pub dispatched_at: Option<String>,
    /// Current attempt started at.
    pub started_at: Option<String>,
    /// Finished at.
    pub finished_at: Option<String>,
    /// Exit code of the last attempt.
    pub exit_code: Option<i32>,
    /// Signal that killed the last attempt.
    pub signal: Option<i32>,
    /// Why it failed.
    pub error: Option<String>,
    /// Output sizes of the last attempt.
    pub output: Option<Output>,
    /// Cancellation was requested at (the executor is stopping the job).
    pub cancel_requested_at: Option<String>,
    /// When a `scheduled` or `retrying` job's next attempt starts.
    pub next_attempt_at: Option<String>,
    /// How the current attempt ended (`failed`, `timed_out` or `lost` while `retrying`).
    pub attempt_status: Option<Status>,
    /// Attempts lost so far (three quarantine the job).
    pub lost_attempts: u32,
    /// Who submitted it.
    pub submitted_by: Option<Submitter>,
    /// The spec, without its payload. `env` values read `***` unless the caller submitted the
    /// job or may read any job's secrets.
    pub spec: JobSpecView,
    /// Every attempt, first to last (from history).
    pub attempts: Vec<Attempt>,
    /// For a fan-out (a job with `systems` or `nodes`): its outcome and its targets by
    /// status; each target is a job of its own (`GET /api/v1/jobs/{id}/targets`).
    pub fanout: Option<fanout::FanOutSummary>,
    /// The schedule it is a run of (`capstan.io/schedule` in its metadata), if any.
    pub schedule: Option<String>,
    /// Why a `pending` job has not started: it waits for a slot under its concurrency key.
    pub waiting: Option<WaitingView>,
}

impl Job {
    /// From the live record (the jobs bucket), with attempts from history.
    pub fn from_record(record: JobRecord, mut attempts: Vec<Attempt>) -> Self {
        // The current attempt as the live record has it: the history may not have caught up
        // with it yet, and one response must agree with itself.
        if let Some(current) = Attempt::current(&record) {
            attempts.retain(|a| a.attempt != current.attempt);
            attempts.push(current);
            attempts.sort_by_key(|a| a.attempt);
        }
        let spec: JobSpecWire = {
            let mut spec = record.spec.clone();
            spec.stdin = None;
            spec.into()
        };
        let schedule =
            capstan_protocol::schedule::schedule_of(&record.spec.metadata).map(str::to_owned);
        Job {
            id: record.id.to_string(),
            status: record.status.into(),
            attempt: record.attempt,
            node: record.node.map(|n| n.to_string()),
            created_at: record.created_at.to_rfc3339(),
            updated_at: record.updated_at.to_rfc3339(),
            dispatched_at: record.dispatched_at.map(Timestamp::to_rfc3339),
            started_at: record.started_at.map(Timestamp::to_rfc3339),
            finished_at: record.finished_at.map(Timestamp::to_rfc3339),
            exit_code: record.exit_code,
            signal: record.signal,
            error: record.error,
            output: record.output.map(Into::into),
            cancel_requested_at: record.cancel_requested_at.map(Timestamp::to_rfc3339),
            next_attempt_at: record.next_attempt_at.map(Timestamp::to_rfc3339),
            attempt_status: record.attempt_status.map(Into::into),
            lost_attempts: record.lost_attempts,
            submitted_by: record.submitted_by.as_ref().map(Submitter::from),
            spec: spec.into(),
            attempts,
            fanout: None,
            schedule,
            waiting: None,
        }
    }

    /// From history alone (the live record has expired).
    pub fn from_row(row: job::Model, attempts: Vec<Attempt>) -> Self {
        let spec: JobSpecWire = serde_json::from_str(&row.spec).unwrap_or_default();
        let schedule = row.schedule.or_else(|| {
            spec.metadata
                .as_ref()
                .and_then(|metadata| capstan_protocol::schedule::schedule_of(metadata))
                .map(str::to_owned)
        });
        Job {
            id: row.id,
            status: status_of(&row.status),
            attempt: u32::try_from(row.attempt).unwrap_or(0),
            node: row.node,
            created_at: rfc3339(row.created_at),
            updated_at: rfc3339(row.updated_at),
            dispatched_at: row.dispatched_at.map(rfc3339),
            started_at: row.started_at.map(rfc3339),
            finished_at: row.finished_at.map(rfc3339),
            exit_code: row.exit_code,
            signal: row.signal,
            error: row.error,
            output: output_of(row.stdout_bytes, row.stderr_bytes, row.truncated),
            cancel_requested_at: None,
            next_attempt_at: None,
            lost_attempts: u32::try_from(
                attempts
                    .iter()
                    .filter(|attempt| attempt.status == Status::Lost)
                    .count(),
            )
            .unwrap_or(0),
            attempt_status: attempts.last().map(|attempt| attempt.status),
            submitted_by: row.submitted_by.map(|principal| Submitter {
                principal,
                via: row.submitted_via.unwrap_or_default(),
                token: row.submitted_token,
            }),
            spec: spec.into(),
            attempts,
            fanout: None,
            schedule,
            waiting: None,
        }
    }

    /// The job with every `env` value replaced by `***` (the names stay).
    pub fn masked(mut self) -> Self {
        for value in self.spec.env.values_mut() {
            *value = "***".to_owned();
        }
        self
    }
}

/// Who submitted a job.
#[derive(Debug, Clone, PartialEq, Eq, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct Submitter {
    /// The principal: a user name, `oidc:<subject>`, or `nats` for a job published on NATS.
    pub principal: String,
    /// How it authenticated: `password`, `token`, `oidc` or `nats`.
    pub via: String,
    /// The API token used, by name.
    pub token: Option<String>,
}

impl From<&SubmittedBy> for Submitter {
    fn from(by: &SubmittedBy) -> Self {
        Submitter {
            principal: by.principal.clone(),
            via: by.via.as_str().to_owned(),
            token: by.token.clone(),
        }
    }
}

impl Submitter {
    /// Back to the protocol's attribution.
    pub fn to_protocol(&self) -> Option<SubmittedBy> {
        Some(SubmittedBy {
            principal: self.principal.clone(),
            via: self.via.parse().ok()?,
            token: self.token.clone(),
        })
    }
}

/// A job in a list.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct JobSummary {
    /// Id.
    pub id: String,
    /// Name.
    pub name: Option<String>,
    /// Status.
    pub status: Status,
    /// Current attempt.
    pub attempt: u32,
    /// Node of the current attempt.
    pub node: Option<String>,
    /// Accepted at.
    pub created_at: String,
    /// Finished at.
    pub finished_at: Option<String>,
    /// Exit code.
    pub exit_code: Option<i32>,
    /// Who submitted it.
    pub submitted_by: Option<String>,
    /// The schedule it is a run of, if any.
    pub schedule: Option<String>,
}

impl From<job::Model> for JobSummary {
    fn from(row: job::Model) -> Self {
        JobSummary {
            id: row.id,
            name: row.name,
            status: status_of(&row.status),
            attempt: u32::try_from(row.attempt).unwrap_or(0),
            node: row.node,
            created_at: rfc3339(row.created_at),
            finished_at: row.finished_at.map(rfc3339),
            exit_code: row.exit_code,
            submitted_by: row.submitted_by,
            schedule: row.schedule,
        }
    }
}

/// A page of jobs, newest first.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct JobPage {
    /// The jobs.
    pub jobs: Vec<JobSummary>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// The id of a created job.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct JobCreated {
    /// The job's id.
    pub id: String,
    /// True when the idempotency key named an existing job.
    pub duplicate: bool,
}

/// One event in a job's history.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct JobEventView {
    /// Sequence in the event stream.
    pub seq: i64,
    /// What happened.
    pub kind: EventKind,
    /// Status after it.
    pub status: Status,
    /// Attempt.
    pub attempt: u32,
    /// Node.
    pub node: Option<String>,
    /// When.
    pub at: String,
    /// Exit code, on ends.
    pub exit_code: Option<i32>,
    /// Error, on failures.
    pub error: Option<String>,
}

impl From<event::Model> for JobEventView {
    fn from(row: event::Model) -> Self {
        JobEventView {
            seq: row.seq,
            kind: event_kind_of(&row.kind),
            status: status_of(&row.status),
            attempt: u32::try_from(row.attempt).unwrap_or(0),
            node: row.node,
            at: rfc3339(row.at),
            exit_code: row.exit_code,
            error: row.error,
        }
    }
}

/// A job's events.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct JobEvents {
    /// In the order they happened.
    pub events: Vec<JobEventView>,
}

/// What the job printed.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct JobLogs {
    /// The job.
    pub job_id: String,
    /// The attempt these logs are of.
    pub attempt: u32,
    /// Standard output (invalid UTF-8 replaced).
    pub stdout: String,
    /// Standard error (invalid UTF-8 replaced).
    pub stderr: String,
    /// Part of the output was not kept.
    pub truncated: bool,
    /// The attempt has ended: no more output will come.
    pub complete: bool,
}

/// What a message of a followed log carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum LogEventKind {
    /// Output on standard output.
    Stdout,
    /// Output on standard error.
    Stderr,
    /// The attempt ended: the last message, with its status.
    End,
}

impl LogEventKind {
    /// The snake_case name: the JSON value, and the server-sent event's type.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
            Self::End => "end",
        }
    }
}

/// One message of a followed log.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct LogEvent {
    /// `stdout`, `stderr`, or `end` (the last message).
    pub kind: LogEventKind,
    /// Attempt.
    pub attempt: u32,
    /// Output, for `stdout` and `stderr`.
    pub data: Option<String>,
    /// Final status, for `end`.
    pub status: Option<Status>,
    /// Exit code, for `end`.
    pub exit_code: Option<i32>,
}

/// What a cancel request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum CancelOutcome {
    /// The job had not started: it is cancelled now.
    Cancelled,
    /// The job is running: its executor is stopping it, and will record `cancelled`.
    Requested,
}

impl From<capstan_protocol::CancelOutcome> for CancelOutcome {
    fn from(outcome: capstan_protocol::CancelOutcome) -> Self {
        match outcome {
            capstan_protocol::CancelOutcome::Cancelled => Self::Cancelled,
            capstan_protocol::CancelOutcome::Requested => Self::Requested,
        }
    }
}

/// What a cancel request did.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct CancelAccepted {
    /// `cancelled` (it had not started) or `requested` (its executor is stopping it).
    pub outcome: CancelOutcome,
    /// The job's status now.
    pub status: Status,
}

/// Whether a node is heard from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum NodeStatus {
    /// Heartbeating within the timeout.
    Up,
    /// Missed heartbeats for longer than the timeout.
    Down,
    /// Deregistered on a clean shutdown.
    Left,
}

impl From<capstan_protocol::NodeStatus> for NodeStatus {
    fn from(status: capstan_protocol::NodeStatus) -> Self {
        use capstan_protocol::NodeStatus as S;
        match status {
            S::Up => Self::Up,
            S::Down => Self::Down,
            S::Left => Self::Left,
        }
    }
}

/// Whether a node takes new work, as operators set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum NodeAvailability {
    /// Takes new work.
    Active,
    /// Takes no new work; what it runs finishes normally.
    Cordoned,
    /// Takes no new work, and hands back what it still runs at the drain deadline.
    Draining,
    /// Holds nothing and takes no new work until uncordoned.
    Drained,
}

impl From<capstan_protocol::Availability> for NodeAvailability {
    fn from(availability: capstan_protocol::Availability) -> Self {
        use capstan_protocol::Availability as A;
        match availability {
            A::Active => Self::Active,
            A::Cordoned => Self::Cordoned,
            A::Draining => Self::Draining,
            A::Drained => Self::Drained,
        }
    }
}

/// An executor node.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct Node {
    /// Node id.
    pub id: String,
    /// `up`, `down` or `left`.
    pub status: NodeStatus,
    /// `active`, `cordoned`, `draining` or `drained`: whether it takes new work.
    pub availability: NodeAvailability,
    /// While draining: when jobs still running are handed back.
    pub drain_deadline: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Job slots.
    pub capacity: u32,
    /// Jobs it holds.
    pub running: u32,
    /// Dispatches waiting for it.
    pub queued: u64,
    /// The executor process.
    pub instance: String,
    /// Executor version.
    pub version: String,
    /// Host name.
    pub hostname: String,
    /// Registered at.
    pub registered_at: String,
    /// Last heartbeat.
    pub last_heartbeat_at: String,
    /// How the jobs it ran ended.
    pub finished: NodeFinished,
}

/// How the jobs a node ran ended: the attempts it ran to an end, as it reported them with its
/// heartbeats, and those it lost, as the registry counted them from the job events (at least
/// once).
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct NodeFinished {
    /// Exited 0.
    pub succeeded: u64,
    /// Exited unsuccessfully.
    pub failed: u64,
    /// Killed at their timeout.
    pub timed_out: u64,
    /// Cancelled while on the node.
    pub cancelled: u64,
    /// Attempts lost on the node.
    pub lost: u64,
    /// The job that ended last.
    pub last_job: Option<String>,
    /// When it ended.
    pub last_finished_at: Option<String>,
}

impl From<NodeRecord> for Node {
    fn from(node: NodeRecord) -> Self {
        Node {
            id: node.id.to_string(),
            status: node.status.into(),
            availability: node.availability.into(),
            drain_deadline: node.drain_deadline.map(Timestamp::to_rfc3339),
            labels: node.labels,
            capacity: node.capacity,
            running: u32::try_from(node.jobs.len()).unwrap_or(u32::MAX),
            queued: node.queued,
            instance: node.instance.to_string(),
            version: node.version,
            hostname: node.hostname,
            registered_at: node.registered_at.to_rfc3339(),
            last_heartbeat_at: node.last_heartbeat_at.to_rfc3339(),
            finished: NodeFinished {
                succeeded: node.finished.succeeded,
                failed: node.finished.failed,
                timed_out: node.finished.timed_out,
                cancelled: node.finished.cancelled,
                lost: node.finished.lost,
                last_job: node.finished.last_job.map(|id| id.to_string()),
                last_finished_at: node.finished.last_finished_at.map(|at| at.to_rfc3339()),
            },
        }
    }
}

/// The nodes.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct NodeList {
    /// By id.
    pub nodes: Vec<Node>,
}

/// A health answer.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct Health {
    /// `ok`.
    pub status: String,
    /// What was checked.
    pub checks: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use capstan_protocol::JobStatus;
    use poem_openapi::types::ToJSON;
    use serde_json::json;

    use super::*;

    fn ended_attempt(attempt: u32, status: Status) -> Attempt {
        Attempt {
            attempt,
            status,
            node: Some("exec-1".into()),
            dispatched_at: None,
            started_at: None,
            finished_at: None,
            exit_code: None,
            signal: None,
            error: None,
            output: None,
        }
    }

    #[test]
    fn the_current_attempt_is_listed_from_the_live_record_when_the_history_lags_behind_it() {
        let mut record = JobRecord::new(
            capstan_protocol::JobId::generate(),
            capstan_protocol::JobSpec::shell("true"),
            capstan_protocol::Timestamp::now(),
        );
        record.status = JobStatus::Succeeded;
        record.attempt = 3;
        record.exit_code = Some(0);
        record.node = Some(capstan_protocol::NodeId::new("exec-2").expect("valid"));
        // The history has the first two attempts, and the third still running.
        let history = vec![
            ended_attempt(1, Status::Failed),
            ended_attempt(2, Status::Failed),
            ended_attempt(3, Status::Running),
        ];
        let job = Job::from_record(record.clone(), history[..2].to_vec());
        let listed: Vec<(u32, Status)> =
            job.attempts.iter().map(|a| (a.attempt, a.status)).collect();
        assert_eq!(
            listed,
            [
                (1, Status::Failed),
                (2, Status::Failed),
                (3, Status::Succeeded)
            ]
        );
        assert_eq!(job.attempts[2].node.as_deref(), Some("exec-2"));
        let job = Job::from_record(record.clone(), history);
        assert_eq!(job.attempts.len(), 3);
        assert_eq!(job.attempts[2].status, Status::Succeeded);
        assert_eq!(job.attempts[2].exit_code, Some(0));

        // Waiting for its next attempt, a job lists how the last one ended; cancelled while
        // waiting, too.
        record.status = JobStatus::Retrying;
        record.attempt_status = Some(JobStatus::TimedOut);
        let job = Job::from_record(record.clone(), Vec::new());
        assert_eq!(job.attempts[0].status, Status::TimedOut);
        record.status = JobStatus::Cancelled;
        let job = Job::from_record(record.clone(), Vec::new());
        assert_eq!(job.attempts[0].status, Status::TimedOut);
        record.attempt_status = None;
        // Accepted, or waiting for its start time: no attempt yet.
        record.attempt = 0;
        record.status = JobStatus::Pending;
        assert!(Job::from_record(record, Vec::new()).attempts.is_empty());
    }

    #[test]
    fn every_job_status_in_a_history_row_reads_as_itself() {
        for status in JobStatus::ALL {
            let read = status_of(status.as_str());
            assert_eq!(JobStatus::try_from(read), Ok(status));
            assert_eq!(read.to_json(), Some(json!(status.as_str())));
        }
    }

    #[test]
    fn a_history_status_written_by_a_newer_version_reads_unknown_not_failed() {
        let read = status_of("paused");
        assert_eq!(read, Status::Unknown);
        assert_eq!(read.to_json(), Some(json!("unknown")));
        assert_eq!(JobStatus::try_from(read), Err(UnknownStatus));
    }

    #[test]
    fn every_event_kind_in_a_history_row_reads_as_itself_and_a_newer_one_reads_unknown() {
        for kind in capstan_protocol::JobEventKind::ALL {
            let read = event_kind_of(kind.as_str());
            assert_eq!(read, EventKind::from(kind));
            assert_eq!(read.to_json(), Some(json!(kind.as_str())));
        }
        let read = event_kind_of("paused");
        assert_eq!(read, EventKind::Unknown);
        assert_eq!(read.to_json(), Some(json!("unknown")));
    }

    #[test]
    fn node_log_and_cancel_enums_keep_their_wire_spelling() {
        use capstan_protocol::{Availability, CancelOutcome as Outcome, NodeStatus as Heard};
        for status in [Heard::Up, Heard::Down, Heard::Left] {
            assert_eq!(
                NodeStatus::from(status).to_json(),
                Some(json!(status.as_str()))
            );
        }
        for availability in [
            Availability::Active,
            Availability::Cordoned,
            Availability::Draining,
            Availability::Drained,
        ] {
            assert_eq!(
                NodeAvailability::from(availability).to_json(),
                Some(json!(availability.as_str()))
            );
        }
        for (outcome, spelled) in [
            (Outcome::Cancelled, "cancelled"),
            (Outcome::Requested, "requested"),
        ] {
            assert_eq!(
                CancelOutcome::from(outcome).to_json(),
                serde_json::to_value(outcome).ok()
            );
            assert_eq!(CancelOutcome::from(outcome).to_json(), Some(json!(spelled)));
        }
        for (kind, spelled) in [
            (LogEventKind::Stdout, "stdout"),
            (LogEventKind::Stderr, "stderr"),
            (LogEventKind::End, "end"),
        ] {
            assert_eq!(kind.to_json(), Some(json!(spelled)));
            assert_eq!(kind.as_str(), spelled, "the event type is the kind");
        }
    }
}
