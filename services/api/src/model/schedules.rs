//! The schedules resource: what a person sends to create or change a schedule (documented
//! here as poem-openapi objects, read by the protocol's decoder into the `*Wire` types so
//! that an error names its field, `job.argv` included), and what anyone allowed sees: the
//! definition, the job as `GET /api/v1/jobs/{id}` shows a spec, and what the ticks did.
//!
//! What a schedule means (when it ticks, what a tick does) is the protocol's
//! (`capstan_protocol::schedule`); this module only converts.

use capstan_protocol::schedule::{Catchup, Overlap, ScheduleRecord, TickOutcome};
use capstan_protocol::spec::JobSpecWire;
use capstan_protocol::{JobSpec, Timestamp};
use poem_openapi::{Enum, Object};
use serde::Deserialize;

use super::{JobSpecView, JobSubmission};

/// What a tick does while the schedule's previous run is still going.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum OverlapPolicy {
    /// The tick is recorded as skipped.
    Skip,
    /// The run starts anyway, beside the previous one.
    Allow,
    /// The previous run is cancelled, then the run starts.
    CancelPrevious,
    /// The run starts once the previous one ends; at most one tick waits, later ones are
    /// skipped.
    Queue,
}

impl From<Overlap> for OverlapPolicy {
    fn from(overlap: Overlap) -> Self {
        match overlap {
            Overlap::Skip => Self::Skip,
            Overlap::Allow => Self::Allow,
            Overlap::CancelPrevious => Self::CancelPrevious,
            Overlap::Queue => Self::Queue,
        }
    }
}

/// What ticks the server could not fire on time (it was down) become.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum CatchupPolicy {
    /// One run, as soon as the server is back, for however many ticks were missed.
    Last,
    /// No run: the missed ticks are counted as missed.
    None,
}

impl From<Catchup> for CatchupPolicy {
    fn from(catchup: Catchup) -> Self {
        match catchup {
            Catchup::Last => Self::Last,
            Catchup::None => Self::None,
        }
    }
}

/// What a tick did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum TickOutcomeName {
    /// Its run was submitted.
    Ran,
    /// The previous run was still going.
    Skipped,
    /// It waits for the previous run to end (`overlap: queue`).
    Queued,
    /// It was not run: the server could not fire it on time and `catchup` is `none`, or the
    /// ticks before it ran as one.
    Missed,
}

impl From<TickOutcome> for TickOutcomeName {
    fn from(outcome: TickOutcome) -> Self {
        match outcome {
            TickOutcome::Ran => Self::Ran,
            TickOutcome::Skipped => Self::Skipped,
            TickOutcome::Queued => Self::Queued,
            TickOutcome::Missed => Self::Missed,
        }
    }
}

/// A schedule to create: a job run on a cron expression or every so often. Exactly one of
/// `cron` and `every`.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none, deny_unknown_fields)]
pub struct ScheduleInput {
    /// Its name (1 to 64 of A-Z, a-z, 0-9, `-`, `_`).
    pub name: String,
    /// A cron expression: 5 fields (minute hour day-of-month month day-of-week), or 6 with
    /// seconds first; names (`MON`, `JAN`), ranges, steps and lists; `@hourly`, `@daily`,
    /// `@weekly`, `@monthly`, `@yearly`.
    pub cron: Option<String>,
    /// An interval instead of `cron` (`30s`, `5m`, `1h30m`; at least a second), counted from
    /// the schedule's creation.
    pub every: Option<String>,
    /// The IANA time zone `cron` is read in (`Europe/Berlin`); `UTC` when absent.
    pub timezone: Option<String>,
    /// The job each tick runs, as `POST /api/v1/jobs` takes it, without `run_at`, `delay`,
    /// `idempotency_key` or `secrets` (each run gets its tick's own idempotency key; stored
    /// secrets, `secret_refs`, are for the schedule's owner).
    pub job: JobSubmission,
    /// What a tick does while the previous run is still going (`skip`).
    pub overlap: Option<OverlapPolicy>,
    /// What ticks the server could not fire on time become (`last`).
    pub catchup: Option<CatchupPolicy>,
    /// Created paused: no tick until it is resumed.
    pub paused: Option<bool>,
}

/// A change to a schedule: the fields given are replaced, the others kept. `cron` replaces
/// `every` and `every` replaces `cron`.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none, deny_unknown_fields)]
pub struct SchedulePatch {
    /// A new cron expression (the schedule then has no `every`).
    pub cron: Option<String>,
    /// A new interval (the schedule then has no `cron`).
    pub every: Option<String>,
    /// A new time zone for `cron`.
    pub timezone: Option<String>,
    /// A new job, replacing the old one whole.
    pub job: Option<JobSubmission>,
    /// What a tick does while the previous run is still going.
    pub overlap: Option<OverlapPolicy>,
    /// What ticks the server could not fire on time become.
    pub catchup: Option<CatchupPolicy>,
    /// Whether ticks are held.
    pub paused: Option<bool>,
}

/// [`ScheduleInput`] as the protocol's decoder reads it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleInputWire {
    /// See [`ScheduleInput::name`].
    pub name: String,
    /// See [`ScheduleInput::cron`].
    #[serde(default)]
    pub cron: Option<String>,
    /// See [`ScheduleInput::every`].
    #[serde(default)]
    pub every: Option<String>,
    /// See [`ScheduleInput::timezone`].
    #[serde(default)]
    pub timezone: Option<String>,
    /// See [`ScheduleInput::job`].
    pub job: JobSpecWire,
    /// See [`ScheduleInput::overlap`].
    #[serde(default)]
    pub overlap: Option<Overlap>,
    /// See [`ScheduleInput::catchup`].
    #[serde(default)]
    pub catchup: Option<Catchup>,
    /// See [`ScheduleInput::paused`].
    #[serde(default)]
    pub paused: Option<bool>,
}

/// [`SchedulePatch`] as the protocol's decoder reads it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulePatchWire {
    /// See [`SchedulePatch::cron`].
    #[serde(default)]
    pub cron: Option<String>,
    /// See [`SchedulePatch::every`].
    #[serde(default)]
    pub every: Option<String>,
    /// See [`SchedulePatch::timezone`].
    #[serde(default)]
    pub timezone: Option<String>,
    /// See [`SchedulePatch::job`].
    #[serde(default)]
    pub job: Option<JobSpecWire>,
    /// See [`SchedulePatch::overlap`].
    #[serde(default)]
    pub overlap: Option<Overlap>,
    /// See [`SchedulePatch::catchup`].
    #[serde(default)]
    pub catchup: Option<Catchup>,
    /// See [`SchedulePatch::paused`].
    #[serde(default)]
    pub paused: Option<bool>,
}

/// The last tick a schedule handled.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct ScheduleLastTick {
    /// The tick's time.
    pub at: String,
    /// What it did.
    pub outcome: TickOutcomeName,
    /// When a scheduler handled it.
    pub handled_at: String,
}

/// A schedule's ticks by outcome, since it was created.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct ScheduleCounts {
    /// Runs submitted.
    pub ran: u64,
    /// Ticks skipped while a run was going.
    pub skipped: u64,
    /// Ticks not run because the server could not fire them on time.
    pub missed: u64,
}

/// A schedule.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct Schedule {
    /// Its name.
    pub name: String,
    /// Its cron expression (or `every`).
    pub cron: Option<String>,
    /// Its interval (or `cron`).
    pub every: Option<String>,
    /// The time zone `cron` is read in.
    pub timezone: String,
    /// What a tick does while the previous run is still going.
    pub overlap: OverlapPolicy,
    /// What ticks the server could not fire on time become.
    pub catchup: CatchupPolicy,
    /// Whether ticks are held.
    pub paused: bool,
    /// The job each tick runs. `env` values read `***` unless the caller owns the schedule
    /// or may read any job's secrets.
    pub job: JobSpecView,
    /// Who owns it; its runs are submitted as them.
    pub owner: String,
    /// Its next tick (absent while paused, or when its expression never matches again).
    pub next: Option<String>,
    /// The last tick handled.
    pub last: Option<ScheduleLastTick>,
    /// The last run its ticks submitted.
    pub last_job: Option<String>,
    /// A tick waiting for the previous run to end (`overlap: queue`).
    pub queued: Option<String>,
    /// Its ticks by outcome.
    pub counts: ScheduleCounts,
    /// Changes with every change of its definition, pause or resumption.
    pub generation: u64,
    /// When it was created.
    pub created_at: String,
    /// When it last changed.
    pub updated_at: String,
}

impl Schedule {
    /// The view of `record`, its job's `env` values shown when `reveal`.
    pub fn of(record: ScheduleRecord, reveal: bool) -> Self {
        let mut job: JobSpecView = JobSpecWire::from(without_payload(record.job)).into();
        if !reveal {
            for value in job.env.values_mut() {
                *value = "***".to_owned();
            }
        }
        let definition = record.definition;
        Schedule {
            name: record.name,
            cron: definition.cron,
            every: definition.every,
            timezone: definition.timezone,
            overlap: definition.overlap.into(),
            catchup: definition.catchup.into(),
            paused: definition.paused,
            job,
            owner: record.owner.principal,
            next: record.next.map(Timestamp::to_rfc3339),
            last: record.last.map(|last| ScheduleLastTick {
                at: last.at.to_rfc3339(),
                outcome: last.outcome.into(),
                handled_at: last.handled_at.to_rfc3339(),
            }),
            last_job: record.last_job.map(|id| id.to_string()),
            queued: record.queued.map(Timestamp::to_rfc3339),
            counts: ScheduleCounts {
                ran: record.counts.ran,
                skipped: record.counts.skipped,
                missed: record.counts.missed,
            },
            generation: record.generation,
            created_at: record.created_at.to_rfc3339(),
            updated_at: record.updated_at.to_rfc3339(),
        }
    }
}

/// A job spec as shown: without its payload, as a job's spec is.
fn without_payload(mut spec: JobSpec) -> JobSpec {
    spec.stdin = None;
    spec
}

/// The schedules.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct ScheduleList {
    /// By name.
    pub items: Vec<Schedule>,
}

/// A schedule's coming ticks.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct ScheduleTicks {
    /// The ticks, earliest first (RFC 3339, UTC); fewer than asked when the expression
    /// stops matching.
    pub times: Vec<String>,
    /// The time zone the schedule's `cron` is read in.
    pub timezone: String,
}

/// The run a trigger submitted.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct ScheduleTriggered {
    /// The run's job id.
    pub id: String,
}

#[cfg(test)]
mod tests {
    use poem_openapi::types::ToJSON;
    use serde_json::json;

    use super::*;

    #[test]
    fn policies_and_outcomes_keep_the_protocols_spelling() {
        for overlap in [
            Overlap::Skip,
            Overlap::Allow,
            Overlap::CancelPrevious,
            Overlap::Queue,
        ] {
            assert_eq!(
                OverlapPolicy::from(overlap).to_json(),
                serde_json::to_value(overlap).ok()
            );
        }
        for catchup in [Catchup::Last, Catchup::None] {
            assert_eq!(
                CatchupPolicy::from(catchup).to_json(),
                serde_json::to_value(catchup).ok()
            );
        }
        for outcome in [
            TickOutcome::Ran,
            TickOutcome::Skipped,
            TickOutcome::Queued,
            TickOutcome::Missed,
        ] {
            assert_eq!(
                TickOutcomeName::from(outcome).to_json(),
                Some(json!(outcome.as_str()))
            );
        }
    }
}
