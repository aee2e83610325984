//! The job spec: what a client asks Capstan to run.
//!
//! [`JobSpecWire`] is the shape on the wire (JSON from people and foreign clients, MessagePack
//! between services); [`JobSpec`] is the validated form every service works with. Converting
//! from the wire form is the only way to build a `JobSpec` from outside, so a service holding
//! one never re-checks it. Errors name the field they are about.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::retry::{RetryPolicy, RetryPolicyWire};
use crate::secret::{SECRET_NAME_RULE, SealedSecret, valid_secret_name};
use crate::timestamp::Timestamp;

/// Labels of an executor, and a job's selector over them: `key = value` pairs.
pub type Labels = BTreeMap<String, String>;

/// True when every `key = value` of `selector` is among `labels`.
pub fn selects(selector: &Labels, labels: &Labels) -> bool {
    selector
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value))
}

/// True when node `node`, carrying `labels`, has every `key = value` of `selector`; the key
/// [`crate::fanout::NODE_LABEL`] (`capstan.io/node`) matches the node's id, whatever its
/// labels say.
pub fn selects_node(selector: &Labels, node: &str, labels: &Labels) -> bool {
    selector.iter().all(|(key, value)| {
        if key == crate::fanout::NODE_LABEL {
            value == node
        } else {
            labels.get(key) == Some(value)
        }
    })
}

/// What to execute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Program {
    /// A string run with `sh -c`.
    Shell(String),
    /// A program and its arguments, run without a shell.
    Argv(Vec<String>),
}

/// A validated job spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(try_from = "JobSpecWire", into = "JobSpecWire")]
// NOTE: on the wire a spec is a `JobSpecWire`, whose schema this is; the description says
// what the schema alone cannot, the checks of `TryFrom<JobSpecWire>`.
#[cfg_attr(
    feature = "schema",
    schemars(
        description = "A job spec: what to run, and where. Exactly one of `command` and \
        `argv`; unknown fields are refused. On arrival the values are checked further (a \
        non-empty program, an absolute `cwd`, label keys and values of A-Z, a-z, 0-9, `-`, `_`, \
        `.` and `/`, sizes within limits); a spec that fails is rejected naming the field."
    )
)]
pub struct JobSpec {
    /// The command or argv.
    pub program: Program,
    /// Environment variables added for the process.
    pub env: BTreeMap<String, String>,
    /// Secret environment variables, sealed: opened only by the executor running an attempt.
    pub secrets: BTreeMap<String, SealedSecret>,
    /// Secret environment variables taken from secrets an administrator stored
    /// (`/api/v1/secrets`): variable name → stored secret's name. The executor running an
    /// attempt reads and opens them, if the job's submitter may use them.
    pub secret_refs: BTreeMap<String, String>,
    /// Working directory (absolute); the executor's per-job directory when absent.
    pub cwd: Option<String>,
    /// Written to the process's standard input, which is then closed. The job's payload.
    pub stdin: Option<String>,
    /// Wall-clock limit of one attempt.
    pub timeout: Option<Duration>,
    /// Selector: the job runs only on executors carrying all of these labels.
    pub labels: Labels,
    /// The remote system (`/api/v1/systems`) the command runs on over SSH, through a gateway
    /// executor; on the executor itself when absent.
    pub system: Option<String>,
    /// Run once on each of several systems or nodes, as a parent of one job per target
    /// (`crate::fanout`).
    pub fanout: Option<crate::fanout::FanOut>,
    /// A human name, for listing and filtering.
    pub name: Option<String>,
    /// Free-form annotations kept with the job.
    pub metadata: BTreeMap<String, String>,
    /// Submissions with the same key, within the idempotency window, are one job.
    pub idempotency_key: Option<String>,
    /// How failed, timed-out and lost attempts are retried.
    pub retry: RetryPolicy,
    /// When the first attempt may start; at once when absent.
    pub start: Option<Start>,
    /// Among jobs waiting for room, higher goes first (0 to 9).
    pub priority: u8,
    /// At most `limit` jobs sharing `key` run at once across the mesh.
    pub concurrency: Option<Concurrency>,
}

/// Why a job needs a scheduler to place it (see [`JobSpec::needs_placement`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NeedsPlacement {
    /// It runs on a remote system, through a gateway the scheduler picks.
    System,
    /// It fans out over targets the scheduler resolves.
    FanOut,
    /// It waits for a slot under a concurrency key.
    Concurrency,
    /// It starts later (a delay or a start time).
    Start,
    /// Its idempotency key must be claimed first.
    IdempotencyKey,
    /// It asks for labels the node does not carry.
    Labels,
}

/// The priority of a job that gives none: the middle, so that a job can be put before or
/// after the others.
pub const DEFAULT_PRIORITY: u8 = 5;
/// The highest priority.
pub const MAX_PRIORITY: u8 = 9;

/// A limit on how many jobs sharing a key run at once, across the whole mesh.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Concurrency {
    /// The key jobs share: letters, digits, `_`, `-` and `.` (not first or last), at most 128.
    pub key: String,
    /// How many of them may run at once (1 to 10,000). Jobs sharing a key should give the
    /// same limit; each job is admitted under its own.
    pub limit: u32,
}

impl Concurrency {
    /// The largest limit.
    pub const MAX_LIMIT: u32 = 10_000;
    /// The longest key.
    pub const MAX_KEY_LEN: usize = 128;

    /// Checks the key and the limit, naming the field that is wrong.
    pub fn validate(&self) -> Result<(), SpecError> {
        let key = &self.key;
        let charset = key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if key.is_empty()
            || key.len() > Self::MAX_KEY_LEN
            || !charset
            || key.starts_with('.')
            || key.ends_with('.')
            || key.contains("..")
        {
            return Err(SpecError::new(
                "concurrency.key",
                format!(
                    "1 to {} letters, digits, `_`, `-` or `.` (not first, last or twice in a row)",
                    Self::MAX_KEY_LEN
                ),
            ));
        }
        if !(1..=Self::MAX_LIMIT).contains(&self.limit) {
            return Err(SpecError::new(
                "concurrency.limit",
                format!("must be 1 to {}, got {}", Self::MAX_LIMIT, self.limit),
            ));
        }
        Ok(())
    }
}

/// When a delayed job's first attempt may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// At this instant (`run_at`).
    At(Timestamp),
    /// This long after the job was submitted (`delay`).
    After(Duration),
}

impl Start {
    /// The instant, for a job submitted at `submitted`.
    pub fn due(self, submitted: Timestamp) -> Timestamp {
        match self {
            Self::At(at) => at,
            Self::After(delay) => submitted.plus(delay),
        }
    }
}

/// The job spec as it travels. Unknown fields are rejected.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
#[cfg_attr(
    feature = "schema",
    schemars(extend("oneOf" = [{"required": ["command"]}, {"required": ["argv"]}]))
)]
pub struct JobSpecWire {
    /// A command line run with `sh -c`. Exactly one of `command` and `argv`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// A program and its arguments, run without a shell. Exactly one of `command` and `argv`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    pub argv: Option<Vec<String>>,
    /// Environment variables for the process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// Secret environment variables: name → sealed value (`sealed:v1:…`). The REST API
    /// seals values given in clear; anything else must send them sealed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<BTreeMap<String, String>>,
    /// Secret environment variables from secrets an administrator stored: variable name →
    /// stored secret's name. What a job sent as plain JSON on NATS uses for its secrets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_refs: Option<BTreeMap<String, String>>,
    /// Absolute working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// The job's payload, given on standard input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Timeout of one attempt, in seconds (fractions allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "schema",
        schemars(extend("exclusiveMinimum" = 0, "maximum" = limits::MAX_TIMEOUT.as_secs()))
    )]
    pub timeout: Option<f64>,
    /// Selector over executor labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Labels>,
    /// Run on this remote system (by name, over SSH through a gateway executor) instead of
    /// on an executor. Takes no `secrets`, `secret_refs` or `cwd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Fan out over remote systems: run once on each system named, or on each active system
    /// carrying the labels. The job becomes a parent of one job per system
    /// (`GET /api/v1/jobs/{id}/targets`). At most one of `system`, `systems` and `nodes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub systems: Option<crate::fanout::SystemTargetsWire>,
    /// Fan out over executor nodes: run once on each node that is up and carries the labels
    /// (every node when none are given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<crate::fanout::NodeTargetsWire>,
    /// With `systems` or `nodes`: most targets running at once (all when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = 1000)))]
    pub max_parallel: Option<u32>,
    /// With `systems` or `nodes`: a target that ends unsuccessfully cancels the running ones
    /// and skips those not started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_fast: Option<bool>,
    /// A human name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Free-form annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
    /// Deduplication key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Retry policy. Without it, lost attempts are retried (3 attempts in all) and failures
    /// are not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicyWire>,
    /// Do not start before this instant (RFC 3339). At most one of `run_at` and `delay`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(extend("format" = "date-time")))]
    pub run_at: Option<String>,
    /// Do not start before this many seconds after submission (fractions allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "schema",
        schemars(extend("minimum" = 0, "maximum" = limits::MAX_DELAY.as_secs()))
    )]
    pub delay: Option<f64>,
    /// Among jobs waiting for room, higher goes first; equal ones in submission order
    /// (0 to 9, default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(range(min = 0, max = 9)))]
    pub priority: Option<u8>,
    /// At most `limit` jobs sharing `key` run at once across the mesh; the others wait
    /// `pending`, in priority and then submission order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<Concurrency>,
}

/// A spec that parsed but does not make sense. `field` names the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SpecError {
    /// The field, as a path (`env.FOO`, `argv[0]`).
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl SpecError {
    pub(crate) fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Limits on the parts of a spec. The payload size limit is configuration, enforced on the
/// encoded message before it is decoded; these bound what a valid spec can hold.
pub mod limits {
    use std::time::Duration;

    /// Longest `timeout`.
    pub const MAX_TIMEOUT: Duration = Duration::from_secs(30 * 24 * 3600);
    /// Most labels in a selector or on a node.
    pub const MAX_LABELS: usize = 32;
    /// Longest label key or value.
    pub const MAX_LABEL_LEN: usize = 63;
    /// Most metadata entries.
    pub const MAX_METADATA: usize = 64;
    /// Longest metadata key.
    pub const MAX_METADATA_KEY_LEN: usize = 128;
    /// Longest metadata value.
    pub const MAX_METADATA_VALUE_LEN: usize = 4096;
    /// Longest name.
    pub const MAX_NAME_LEN: usize = 200;
    /// Longest idempotency key.
    pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;
    /// Most environment variables.
    pub const MAX_ENV: usize = 256;
    /// Furthest a job may be delayed (`delay`, or `run_at` from now).
    pub const MAX_DELAY: Duration = Duration::from_secs(366 * 24 * 3600);
}

impl TryFrom<JobSpecWire> for JobSpec {
    type Error = SpecError;

    fn try_from(wire: JobSpecWire) -> Result<Self, SpecError> {
        let program = match (wire.command, wire.argv) {
            (Some(_), Some(_)) => {
                return Err(SpecError::new(
                    "command",
                    "give exactly one of `command` (run with sh -c) and `argv`, not both",
                ));
            }
            (None, None) => {
                return Err(SpecError::new(
                    "command",
                    "missing: give `command` (a string run with sh -c) or `argv` (an array)",
                ));
            }
            (Some(command), None) => {
                if command.trim().is_empty() {
                    return Err(SpecError::new("command", "must not be empty"));
                }
                no_nul("command", &command)?;
                Program::Shell(command)
            }
            (None, Some(argv)) => {
                if argv.is_empty() {
                    return Err(SpecError::new(
                        "argv",
                        "must hold at least the program to run",
                    ));
                }
                if argv[0].is_empty() {
                    return Err(SpecError::new("argv[0]", "the program must not be empty"));
                }
                for (index, arg) in argv.iter().enumerate() {
                    no_nul(&format!("argv[{index}]"), arg)?;
                }
                Program::Argv(argv)
            }
        };

        let env = wire.env.unwrap_or_default();
        if env.len() > limits::MAX_ENV {
            return Err(SpecError::new(
                "env",
                format!("at most {} variables", limits::MAX_ENV),
            ));
        }
        for (key, value) in &env {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(SpecError::new(
                    format!("env.{key}"),
                    "a variable name must be non-empty without `=` or NUL",
                ));
            }
            no_nul(&format!("env.{key}"), value)?;
        }

        let mut secrets = BTreeMap::new();
        for (name, value) in wire.secrets.unwrap_or_default() {
            let field = format!("secrets.{name}");
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return Err(SpecError::new(
                    field,
                    "a variable name must be non-empty without `=` or NUL",
                ));
            }
            if env.contains_key(&name) {
                return Err(SpecError::new(field, "also set in `env`: give it once"));
            }
            let sealed =
                SealedSecret::parse(value).map_err(|reason| SpecError::new(&field, reason))?;
            secrets.insert(name, sealed);
        }
        let mut secret_refs = BTreeMap::new();
        for (name, stored) in wire.secret_refs.unwrap_or_default() {
            let field = format!("secret_refs.{name}");
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return Err(SpecError::new(
                    field,
                    "a variable name must be non-empty without `=` or NUL",
                ));
            }
            if env.contains_key(&name) || secrets.contains_key(&name) {
                return Err(SpecError::new(
                    field,
                    "also set in `env` or `secrets`: give it once",
                ));
            }
            if !valid_secret_name(&stored) {
                return Err(SpecError::new(field, SECRET_NAME_RULE));
            }
            secret_refs.insert(name, stored);
        }
        if env.len() + secrets.len() + secret_refs.len() > limits::MAX_ENV {
            return Err(SpecError::new(
                if secret_refs.is_empty() {
                    "secrets"
                } else {
                    "secret_refs"
                },
                format!(
                    "at most {} variables with `env` and `secret_refs`",
                    limits::MAX_ENV
                ),
            ));
        }

        let fanout = crate::fanout::FanOut::from_wire(
            wire.systems,
            wire.nodes,
            wire.max_parallel,
            wire.fail_fast,
        )?;
        if let Some(fanout) = &fanout {
            if wire.system.is_some() {
                return Err(SpecError::new(
                    "system",
                    "give one of `system` (one system) and `systems` or `nodes` (a fan-out)",
                ));
            }
            // Sealed secrets are bound to the job they were sealed for: a fan-out's targets
            // are jobs of their own.
            if !secrets.is_empty() {
                return Err(SpecError::new(
                    "secrets",
                    "a fan-out takes no sealed `secrets`: store them and use `secret_refs`",
                ));
            }
            if !fanout.on_systems() && wire.labels.as_ref().is_some_and(|l| !l.is_empty()) {
                return Err(SpecError::new(
                    "labels",
                    "a fan-out over nodes selects them with `nodes.labels`",
                ));
            }
            if wire.metadata.as_ref().map_or(0, BTreeMap::len)
                > limits::MAX_METADATA - crate::fanout::CHILD_METADATA
            {
                return Err(SpecError::new(
                    "metadata",
                    format!(
                        "a fan-out has at most {} entries (each target's job adds its parent's \
                         and its target's)",
                        limits::MAX_METADATA - crate::fanout::CHILD_METADATA
                    ),
                ));
            }
        }
        let remote = wire.system.is_some() || fanout.as_ref().is_some_and(|f| f.on_systems());
        if let Some(system) = &wire.system
            && !crate::system::valid_system_name(system)
        {
            return Err(SpecError::new("system", crate::system::SYSTEM_NAME_RULE));
        }
        if remote {
            // A remote command gets its variables on its command line, where the remote host's
            // other users can read them: secrets are not sent that way.
            if !secrets.is_empty() || !secret_refs.is_empty() {
                return Err(SpecError::new(
                    if secrets.is_empty() {
                        "secret_refs"
                    } else {
                        "secrets"
                    },
                    "a job on a remote system takes no secrets: its variables travel on the \
                     remote command line",
                ));
            }
            if wire.cwd.is_some() {
                return Err(SpecError::new(
                    "cwd",
                    "a job on a remote system starts in its account's home directory: `cd` \
                     in the command instead",
                ));
            }
        }

        if let Some(cwd) = &wire.cwd {
            if !cwd.starts_with('/') {
                return Err(SpecError::new("cwd", "must be an absolute path"));
            }
            no_nul("cwd", cwd)?;
        }

        let timeout = match wire.timeout {
            None => None,
            Some(seconds) if !seconds.is_finite() || seconds <= 0.0 => {
                return Err(SpecError::new(
                    "timeout",
                    format!("must be a positive number of seconds, got {seconds}"),
                ));
            }
            Some(seconds) if seconds > limits::MAX_TIMEOUT.as_secs_f64() => {
                return Err(SpecError::new(
                    "timeout",
                    format!(
                        "must be at most {} seconds (30 days), got {seconds}",
                        limits::MAX_TIMEOUT.as_secs()
                    ),
                ));
            }
            Some(seconds) => Some(Duration::from_secs_f64(seconds).max(Duration::from_millis(1))),
        };

        let labels = wire.labels.unwrap_or_default();
        validate_labels("labels", &labels)?;

        if let Some(name) = &wire.name
            && (name.trim().is_empty() || name.chars().count() > limits::MAX_NAME_LEN)
        {
            return Err(SpecError::new(
                "name",
                format!("must be 1 to {} characters", limits::MAX_NAME_LEN),
            ));
        }

        let metadata = wire.metadata.unwrap_or_default();
        if metadata.len() > limits::MAX_METADATA {
            return Err(SpecError::new(
                "metadata",
                format!("at most {} entries", limits::MAX_METADATA),
            ));
        }
        for (key, value) in &metadata {
            if key.is_empty() || key.len() > limits::MAX_METADATA_KEY_LEN {
                return Err(SpecError::new(
                    format!("metadata.{key}"),
                    format!("keys are 1 to {} bytes", limits::MAX_METADATA_KEY_LEN),
                ));
            }
            if value.len() > limits::MAX_METADATA_VALUE_LEN {
                return Err(SpecError::new(
                    format!("metadata.{key}"),
                    format!(
                        "values are at most {} bytes",
                        limits::MAX_METADATA_VALUE_LEN
                    ),
                ));
            }
        }

        if let Some(key) = &wire.idempotency_key
            && (key.is_empty()
                || key.len() > limits::MAX_IDEMPOTENCY_KEY_LEN
                || key.chars().any(char::is_control))
        {
            return Err(SpecError::new(
                "idempotency_key",
                format!(
                    "must be 1 to {} bytes without control characters",
                    limits::MAX_IDEMPOTENCY_KEY_LEN
                ),
            ));
        }

        let retry = match wire.retry {
            Some(policy) => RetryPolicy::try_from(policy)?,
            None => RetryPolicy::default(),
        };

        let start = match (wire.run_at, wire.delay) {
            (Some(_), Some(_)) => {
                return Err(SpecError::new(
                    "run_at",
                    "give at most one of `run_at` and `delay`",
                ));
            }
            (Some(text), None) => {
                let at = Timestamp::parse_rfc3339(text.trim()).map_err(|error| {
                    SpecError::new(
                        "run_at",
                        format!("must be an RFC 3339 instant like 2030-01-02T03:04:05Z: {error}"),
                    )
                })?;
                if at > Timestamp::now().plus(limits::MAX_DELAY) {
                    return Err(SpecError::new("run_at", "must be within a year from now"));
                }
                Some(Start::At(at))
            }
            (None, Some(seconds)) => {
                if !seconds.is_finite()
                    || seconds < 0.0
                    || seconds > limits::MAX_DELAY.as_secs_f64()
                {
                    return Err(SpecError::new(
                        "delay",
                        format!(
                            "must be 0 to {} seconds, got {seconds}",
                            limits::MAX_DELAY.as_secs()
                        ),
                    ));
                }
                Some(Start::After(Duration::from_secs_f64(seconds)))
            }
            (None, None) => None,
        };

        let priority = match wire.priority {
            Some(priority) if priority > MAX_PRIORITY => {
                return Err(SpecError::new(
                    "priority",
                    format!("must be 0 to {MAX_PRIORITY}, got {priority}"),
                ));
            }
            Some(priority) => priority,
            None => DEFAULT_PRIORITY,
        };
        if let Some(concurrency) = &wire.concurrency {
            concurrency.validate()?;
        }

        Ok(JobSpec {
            program,
            env,
            secrets,
            secret_refs,
            cwd: wire.cwd,
            stdin: wire.stdin,
            timeout,
            labels,
            system: wire.system,
            fanout,
            name: wire.name,
            metadata,
            idempotency_key: wire.idempotency_key,
            retry,
            start,
            priority,
            concurrency: wire.concurrency,
        })
    }
}

/// Checks a set of labels (a node's, or a job's selector) for size and characters.
pub fn validate_labels(field: &str, labels: &Labels) -> Result<(), SpecError> {
    if labels.len() > limits::MAX_LABELS {
        return Err(SpecError::new(
            field,
            format!("at most {} labels", limits::MAX_LABELS),
        ));
    }
    let valid = |text: &str, allow_empty: bool| {
        (allow_empty || !text.is_empty())
            && text.len() <= limits::MAX_LABEL_LEN
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
    };
    for (key, value) in labels {
        if !valid(key, false) || !valid(value, true) {
            return Err(SpecError::new(
                format!("{field}.{key}"),
                format!(
                    "label keys (1 to {max}) and values (0 to {max}) use A-Z, a-z, 0-9, `-`, `_`, `.` and `/`",
                    max = limits::MAX_LABEL_LEN
                ),
            ));
        }
    }
    Ok(())
}

fn no_nul(field: &str, text: &str) -> Result<(), SpecError> {
    if text.contains('\0') {
        Err(SpecError::new(field, "must not contain NUL bytes"))
    } else {
        Ok(())
    }
}

impl From<JobSpec> for JobSpecWire {
    fn from(spec: JobSpec) -> Self {
        let (command, argv) = match spec.program {
            Program::Shell(command) => (Some(command), None),
            Program::Argv(argv) => (None, Some(argv)),
        };
        let non_empty = |map: BTreeMap<String, String>| (!map.is_empty()).then_some(map);
        let (systems, nodes, max_parallel, fail_fast) = match &spec.fanout {
            Some(fanout) => fanout.to_wire(),
            None => (None, None, None, None),
        };
        JobSpecWire {
            systems,
            nodes,
            max_parallel,
            fail_fast,
            command,
            argv,
            env: non_empty(spec.env),
            secrets: (!spec.secrets.is_empty()).then(|| {
                spec.secrets
                    .into_iter()
                    .map(|(name, sealed)| (name, sealed.into()))
                    .collect()
            }),
            secret_refs: non_empty(spec.secret_refs),
            cwd: spec.cwd,
            stdin: spec.stdin,
            timeout: spec.timeout.map(|t| t.as_secs_f64()),
            labels: non_empty(spec.labels),
            system: spec.system,
            name: spec.name,
            metadata: non_empty(spec.metadata),
            idempotency_key: spec.idempotency_key,
            retry: (spec.retry != RetryPolicy::default()).then(|| spec.retry.into()),
            run_at: match spec.start {
                Some(Start::At(at)) => Some(at.to_rfc3339()),
                _ => None,
            },
            delay: match spec.start {
                Some(Start::After(delay)) => Some(delay.as_secs_f64()),
                _ => None,
            },
            priority: (spec.priority != DEFAULT_PRIORITY).then_some(spec.priority),
            concurrency: spec.concurrency,
        }
    }
}

impl JobSpec {
    /// A spec running `command` with `sh -c` and nothing else set.
    pub fn shell(command: impl Into<String>) -> Self {
        Self {
            program: Program::Shell(command.into()),
            env: BTreeMap::new(),
            secrets: BTreeMap::new(),
            secret_refs: BTreeMap::new(),
            cwd: None,
            stdin: None,
            timeout: None,
            labels: Labels::new(),
            system: None,
            fanout: None,
            name: None,
            metadata: BTreeMap::new(),
            idempotency_key: None,
            retry: RetryPolicy::default(),
            start: None,
            priority: DEFAULT_PRIORITY,
            concurrency: None,
        }
    }

    /// The labels a node must carry to run the job: its own selector, and for a job on a
    /// remote system the gateway label ([`crate::system::SSH_GATEWAY_LABEL`]` = true`).
    pub fn placement(&self) -> Labels {
        let mut selector = self.labels.clone();
        if self.system.is_some() {
            selector.insert(crate::system::SSH_GATEWAY_LABEL.into(), "true".into());
        }
        selector
    }

    /// Why this job must be placed by a scheduler rather than run at once by the executor
    /// of node `node` (with `labels`) that took its submission; `None` when that executor may
    /// run it (the fast lane): any node carrying its labels would do, it waits for nothing,
    /// and nothing is shared with other jobs (a concurrency slot, an idempotency key) or
    /// resolved first (a fan-out's targets, a remote system).
    pub fn needs_placement(&self, node: &str, labels: &Labels) -> Option<NeedsPlacement> {
        if self.system.is_some() {
            Some(NeedsPlacement::System)
        } else if self.fanout.is_some() {
            Some(NeedsPlacement::FanOut)
        } else if self.concurrency.is_some() {
            Some(NeedsPlacement::Concurrency)
        } else if self.start.is_some() {
            Some(NeedsPlacement::Start)
        } else if self.idempotency_key.is_some() {
            Some(NeedsPlacement::IdempotencyKey)
        } else if !selects_node(&self.placement(), node, labels) {
            Some(NeedsPlacement::Labels)
        } else {
            None
        }
    }

    /// The program as an argv vector: `["sh", "-c", command]` for a shell command.
    pub fn argv(&self) -> Vec<String> {
        match &self.program {
            Program::Shell(command) => vec!["sh".into(), "-c".into(), command.clone()],
            Program::Argv(argv) => argv.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_job_runs_where_it_was_taken_and_anything_shared_delayed_or_elsewhere_is_placed() {
        let labels: Labels = [("zone".to_owned(), "a".to_owned())].into();
        let plain = JobSpec::shell("true");
        assert_eq!(plain.needs_placement("exec-1", &labels), None);
        let mut here = plain.clone();
        here.labels = labels.clone();
        assert_eq!(
            here.needs_placement("exec-1", &labels),
            None,
            "its labels are the node's"
        );
        here.labels
            .insert(crate::fanout::NODE_LABEL.to_owned(), "exec-1".to_owned());
        assert_eq!(
            here.needs_placement("exec-1", &labels),
            None,
            "it names this node"
        );
        assert_eq!(
            here.needs_placement("exec-2", &labels),
            Some(NeedsPlacement::Labels),
            "it names another node"
        );
        let mut elsewhere = plain.clone();
        elsewhere.labels = [("zone".to_owned(), "b".to_owned())].into();
        assert_eq!(
            elsewhere.needs_placement("exec-1", &labels),
            Some(NeedsPlacement::Labels)
        );
        let placed = |json: &str| {
            parse(json)
                .expect("a valid spec")
                .needs_placement("exec-1", &labels)
        };
        assert_eq!(
            placed(r#"{"argv": ["true"], "system": "db-1"}"#),
            Some(NeedsPlacement::System)
        );
        assert_eq!(
            placed(r#"{"argv": ["true"], "delay": 5}"#),
            Some(NeedsPlacement::Start)
        );
        assert_eq!(
            placed(r#"{"argv": ["true"], "idempotency_key": "order-1"}"#),
            Some(NeedsPlacement::IdempotencyKey)
        );
        assert_eq!(
            placed(r#"{"argv": ["true"], "concurrency": {"key": "db", "limit": 1}}"#),
            Some(NeedsPlacement::Concurrency)
        );
        assert_eq!(
            placed(r#"{"argv": ["true"], "nodes": {}}"#),
            Some(NeedsPlacement::FanOut)
        );
        assert_eq!(placed(r#"{"argv": ["true"], "priority": 9}"#), None);
    }

    fn parse(json: &str) -> Result<JobSpec, SpecError> {
        let wire: JobSpecWire = serde_json::from_str(json).expect("wire form parses");
        JobSpec::try_from(wire)
    }

    fn field_of(json: &str) -> String {
        parse(json).expect_err("must be rejected").field
    }

    #[test]
    fn a_job_on_a_system_is_placed_on_a_gateway_and_takes_no_secrets_or_cwd() {
        let spec = parse(r#"{"command": "df -h", "system": "web-1", "labels": {"zone": "eu"}}"#)
            .expect("valid");
        assert_eq!(spec.system.as_deref(), Some("web-1"));
        let placement = spec.placement();
        assert_eq!(placement.get("zone").map(String::as_str), Some("eu"));
        assert_eq!(
            placement
                .get(crate::system::SSH_GATEWAY_LABEL)
                .map(String::as_str),
            Some("true")
        );
        assert!(
            parse(r#"{"command": "true"}"#)
                .expect("valid")
                .placement()
                .is_empty()
        );
        assert_eq!(
            field_of(r#"{"command": "true", "system": "web.1"}"#),
            "system"
        );
        assert_eq!(
            field_of(r#"{"command": "true", "system": "web-1", "secret_refs": {"A": "db"}}"#),
            "secret_refs"
        );
        assert_eq!(
            field_of(r#"{"command": "true", "system": "web-1", "cwd": "/tmp"}"#),
            "cwd"
        );
        let round = JobSpecWire::from(spec.clone());
        assert_eq!(JobSpec::try_from(round).expect("valid"), spec);
    }

    #[test]
    fn a_plain_command_is_a_valid_spec() {
        let spec = parse(r#"{"command": "echo hello"}"#).expect("valid");
        assert_eq!(spec.program, Program::Shell("echo hello".into()));
        assert_eq!(spec.argv(), ["sh", "-c", "echo hello"]);
    }

    #[test]
    fn a_secret_is_accepted_only_sealed_and_only_once() {
        let spec = parse(r#"{"command": "true", "secrets": {"TOKEN": "sealed:v1:k1:QUJD"}}"#)
            .expect("valid");
        assert_eq!(spec.secrets["TOKEN"].key_id(), "k1");
        assert_eq!(
            field_of(r#"{"command": "true", "secrets": {"TOKEN": "hunter2"}}"#),
            "secrets.TOKEN"
        );
        let clear =
            parse(r#"{"command": "true", "secrets": {"TOKEN": "hunter2"}}"#).expect_err("clear");
        assert!(!clear.to_string().contains("hunter2"), "{clear}");
        assert_eq!(
            field_of(
                r#"{"command": "true", "env": {"TOKEN": "x"}, "secrets": {"TOKEN": "sealed:v1:k1:QUJD"}}"#
            ),
            "secrets.TOKEN"
        );
        assert_eq!(
            field_of(r#"{"command": "true", "secrets": {"A=B": "sealed:v1:k1:QUJD"}}"#),
            "secrets.A=B"
        );
    }

    #[test]
    fn a_secret_ref_names_a_stored_secret_under_a_variable_given_once() {
        let spec = parse(r#"{"command": "true", "secret_refs": {"DB_PASSWORD": "db-main"}}"#)
            .expect("valid");
        assert_eq!(spec.secret_refs["DB_PASSWORD"], "db-main");
        for (json, field) in [
            (
                r#"{"command": "true", "secret_refs": {"DB": "no spaces"}}"#,
                "secret_refs.DB",
            ),
            (
                r#"{"command": "true", "env": {"DB": "x"}, "secret_refs": {"DB": "db"}}"#,
                "secret_refs.DB",
            ),
            (
                r#"{"command": "true", "secrets": {"DB": "sealed:v1:k1:QUJD"}, "secret_refs": {"DB": "db"}}"#,
                "secret_refs.DB",
            ),
            (
                r#"{"command": "true", "secret_refs": {"": "db"}}"#,
                "secret_refs.",
            ),
        ] {
            assert_eq!(field_of(json), field, "{json}");
        }
    }

    #[test]
    fn every_field_round_trips_through_json_and_msgpack() {
        let json = r#"{"argv":["/bin/echo","hi"],"env":{"A":"1"},"secrets":{"S":"sealed:v1:k1:QUJD"},"secret_refs":{"R":"stored"},"cwd":"/tmp","stdin":"payload",
            "timeout":1.5,"labels":{"zone":"eu"},"name":"n","metadata":{"k":"v"},
            "idempotency_key":"order-1"}"#;
        let spec = parse(json).expect("valid");
        assert_eq!(spec.timeout, Some(Duration::from_millis(1500)));
        let back: JobSpec =
            serde_json::from_str(&serde_json::to_string(&spec).expect("encodes")).expect("decodes");
        assert_eq!(back, spec);
        let packed = rmp_serde::to_vec_named(&spec).expect("encodes");
        assert_eq!(
            rmp_serde::from_slice::<JobSpec>(&packed).expect("decodes"),
            spec
        );
    }

    #[test]
    fn a_spec_without_a_program_is_rejected_naming_command() {
        assert_eq!(field_of(r#"{"name": "x"}"#), "command");
    }

    #[test]
    fn a_spec_with_both_command_and_argv_is_rejected() {
        let err = parse(r#"{"command": "true", "argv": ["true"]}"#).expect_err("rejected");
        assert_eq!(err.field, "command");
        assert!(err.reason.contains("not both"), "{err}");
    }

    #[test]
    fn negative_zero_and_huge_timeouts_are_rejected_naming_timeout() {
        for timeout in ["-1", "0", "1e12"] {
            let json = format!(r#"{{"command": "true", "timeout": {timeout}}}"#);
            assert_eq!(field_of(&json), "timeout", "{timeout}");
        }
    }

    #[test]
    fn empty_programs_are_rejected() {
        assert_eq!(field_of(r#"{"command": "  "}"#), "command");
        assert_eq!(field_of(r#"{"argv": []}"#), "argv");
        assert_eq!(field_of(r#"{"argv": [""]}"#), "argv[0]");
    }

    #[test]
    fn bad_env_cwd_labels_and_keys_are_rejected_naming_the_field() {
        assert_eq!(
            field_of(r#"{"command":"true","env":{"A=B":"1"}}"#),
            "env.A=B"
        );
        assert_eq!(field_of(r#"{"command":"true","cwd":"relative"}"#), "cwd");
        assert_eq!(
            field_of(r#"{"command":"true","labels":{"bad key":"x"}}"#),
            "labels.bad key"
        );
        assert_eq!(
            field_of(r#"{"command":"true","idempotency_key":""}"#),
            "idempotency_key"
        );
        assert_eq!(field_of(r#"{"command":"true","name":""}"#), "name");
    }

    #[test]
    fn retry_run_at_and_delay_round_trip_through_json_and_msgpack() {
        let json = r#"{"command":"true","retry":{"max_attempts":5,"retry_on":["failed"]},
            "run_at":"2020-01-02T03:04:05Z"}"#;
        let spec = parse(json).expect("valid");
        assert_eq!(spec.retry.max_attempts, 5);
        assert_eq!(
            spec.start,
            Some(Start::At(
                Timestamp::parse_rfc3339("2020-01-02T03:04:05Z").expect("valid")
            ))
        );
        let packed = rmp_serde::to_vec_named(&spec).expect("encodes");
        assert_eq!(
            rmp_serde::from_slice::<JobSpec>(&packed).expect("decodes"),
            spec
        );
        let delayed = parse(r#"{"command":"true","delay":2.5}"#).expect("valid");
        let back: JobSpec =
            serde_json::from_str(&serde_json::to_string(&delayed).expect("encodes"))
                .expect("decodes");
        assert_eq!(back.start, Some(Start::After(Duration::from_millis(2500))));
        assert_eq!(back.retry, RetryPolicy::default());
    }

    #[test]
    fn bad_start_times_are_rejected_naming_the_field() {
        assert_eq!(
            field_of(r#"{"command":"true","run_at":"tomorrow"}"#),
            "run_at"
        );
        assert_eq!(
            field_of(r#"{"command":"true","run_at":"2999-01-01T00:00:00Z"}"#),
            "run_at"
        );
        assert_eq!(field_of(r#"{"command":"true","delay":-1}"#), "delay");
        assert_eq!(
            field_of(r#"{"command":"true","delay":1,"run_at":"2030-01-01T00:00:00Z"}"#),
            "run_at"
        );
        assert_eq!(
            field_of(r#"{"command":"true","retry":{"max_attempts":0}}"#),
            "retry.max_attempts"
        );
    }

    #[test]
    fn selectors_match_only_nodes_carrying_every_label() {
        let node: Labels = [("zone".into(), "eu".into()), ("gpu".into(), "yes".into())].into();
        assert!(selects(&Labels::new(), &node));
        assert!(selects(&[("zone".into(), "eu".into())].into(), &node));
        assert!(!selects(&[("zone".into(), "us".into())].into(), &node));
        assert!(!selects(&[("arch".into(), "arm".into())].into(), &node));
    }
}
