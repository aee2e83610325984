//! Schedules: a job run again and again, on a cron expression or every so often.
//!
//! A schedule is a [`ScheduleRecord`] in `capstan_schedules`, by name, written by the API (its
//! definition) and by schedulers (what each tick did), always by compare-and-swap. Its next tick
//! is one durable timer on the server: a message scheduled for [`ScheduleRecord::next`] on
//! `capstan.timers.schedule.<name>`, which the server publishes onto
//! `capstan.timers.tick.<name>` at that instant. The schedulers share one durable consumer on
//! the fired ticks; the one that receives a tick decides it ([`ScheduleRecord::decide`]),
//! submits its run as the schedule's owner with an idempotency key naming the tick, arms the
//! following tick, and records what it did. A tick is acted on only while the record still
//! expects it (same generation, same `next`), and the record moves on by compare-and-swap, so
//! a tick delivered twice, or to two replicas at once, runs its job once; a replica that dies
//! half-way leaves the tick unacknowledged, and the next one repeats the same idempotent steps.
//!
//! Lateness: a tick fired on time but handled late (no scheduler was running) still runs, and
//! the ticks after it follow one by one, so a restart of every service loses none. A tick the
//! server itself could not fire on time (it was down) is handled by [`Catchup`]: run once for
//! the ticks missed, or not at all; so is a backlog older than [`MAX_BACKLOG`].

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::auth::SubmittedBy;
use crate::cron::{self, Cron, Zone};
use crate::ids::JobId;
use crate::spec::{JobSpec, SpecError};
use crate::timestamp::Timestamp;

/// A run's metadata entry naming its schedule.
pub const SCHEDULE_KEY: &str = "capstan.io/schedule";
/// A run's metadata entry naming the tick it ran for (RFC 3339).
pub const TICK_KEY: &str = "capstan.io/tick";
/// The longest schedule name.
pub const MAX_NAME_LEN: usize = 64;
/// How much later than its arming the server may fire a tick before the tick counts as one it
/// could not fire on time (it was down), which [`Catchup`] decides.
pub const FIRE_GRACE: Duration = Duration::from_secs(10);
/// A tick handled more than this after its time is not followed tick by tick: [`Catchup`]
/// decides, and the schedule resumes from now.
pub const MAX_BACKLOG: Duration = Duration::from_secs(3600);

/// What a tick does while the schedule's previous run is still going.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// Records the tick as skipped.
    #[default]
    Skip,
    /// Runs anyway, beside it.
    Allow,
    /// Cancels the previous run, then runs.
    CancelPrevious,
    /// Runs once the previous run ends; at most one tick waits, later ones are skipped.
    Queue,
}

/// What ticks the server could not fire on time (it was down) become.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Catchup {
    /// One run, as soon as the server is back, for however many ticks were missed.
    #[default]
    Last,
    /// No run: the missed ticks are recorded as missed.
    None,
}

/// A schedule's definition as a person writes it (`POST /api/v1/schedules`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ScheduleDefinition {
    /// A cron expression: 5 fields, or 6 with seconds first; names, ranges, steps, `@daily`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// An interval instead of `cron` (`30s`, `5m`, `1h30m`, at least a second), counted from
    /// the schedule's creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<String>,
    /// The IANA time zone `cron` is read in.
    #[serde(default = "utc")]
    pub timezone: String,
    /// What a tick does while the previous run is still going.
    #[serde(default)]
    pub overlap: Overlap,
    /// What ticks the server could not fire on time become.
    #[serde(default)]
    pub catchup: Catchup,
    /// Whether ticks are held.
    #[serde(default)]
    pub paused: bool,
}

fn utc() -> String {
    "UTC".to_owned()
}

/// When a schedule ticks, parsed.
#[derive(Debug, Clone)]
pub enum When {
    /// On a cron expression in a zone.
    Cron(Cron, Zone),
    /// Every interval from an anchor.
    Every(Duration),
}

impl ScheduleDefinition {
    /// Parses and checks `cron`/`every` and `timezone`, naming the field that is wrong.
    pub fn when(&self) -> Result<When, SpecError> {
        let zone =
            Zone::parse(&self.timezone).map_err(|e| SpecError::new("timezone", e.to_string()))?;
        match (&self.cron, &self.every) {
            (Some(_), Some(_)) => Err(SpecError::new(
                "every",
                "give either `cron` or `every`, not both",
            )),
            (None, None) => Err(SpecError::new("cron", "a schedule needs `cron` or `every`")),
            (Some(expr), None) => {
                let cron = Cron::parse(expr).map_err(|e| SpecError::new("cron", e.to_string()))?;
                Ok(When::Cron(cron, zone))
            }
            (None, Some(text)) => {
                let every =
                    cron::parse_every(text).map_err(|e| SpecError::new("every", e.to_string()))?;
                Ok(When::Every(every))
            }
        }
    }
}

/// Checks a schedule's name: 1 to 64 letters, digits, `_` or `-` (it is a subject token and a
/// key).
pub fn validate_name(name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(SpecError::new(
            "name",
            format!("1 to {MAX_NAME_LEN} letters, digits, `_` or `-`"),
        ))
    }
}

/// Checks that a job spec can be a schedule's run: it starts when its tick comes, and its
/// idempotency key is the tick's.
pub fn validate_job(job: &JobSpec) -> Result<(), SpecError> {
    if job.start.is_some() {
        return Err(SpecError::new(
            "job.run_at",
            "a schedule's run starts at its tick: give no `run_at` or `delay`",
        ));
    }
    if job.idempotency_key.is_some() {
        return Err(SpecError::new(
            "job.idempotency_key",
            "a schedule's runs carry their tick's own idempotency key",
        ));
    }
    if let Some(key) = job
        .metadata
        .keys()
        .find(|key| key.as_str() == SCHEDULE_KEY || key.as_str() == TICK_KEY)
    {
        return Err(SpecError::new(
            format!("job.metadata.{key}"),
            "is set by the schedule",
        ));
    }
    Ok(())
}

/// What one tick did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum TickOutcome {
    /// Its run was submitted.
    Ran,
    /// The previous run was still going (`overlap: skip`, or a tick already queued).
    Skipped,
    /// It waits for the previous run to end (`overlap: queue`).
    Queued,
    /// It was not run: the server could not fire it on time and `catchup` is `none`, or the
    /// ticks before it ran as one.
    Missed,
}

impl TickOutcome {
    /// Its name in subjects and metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ran => "ran",
            Self::Skipped => "skipped",
            Self::Queued => "queued",
            Self::Missed => "missed",
        }
    }
}

/// The last tick a schedule handled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct LastTick {
    /// Its time.
    pub at: Timestamp,
    /// What it did.
    pub outcome: TickOutcome,
    /// When it was handled.
    pub handled_at: Timestamp,
}

/// Ticks by outcome, since the schedule was created.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct TickCounts {
    /// Runs submitted.
    pub ran: u64,
    /// Ticks skipped while a run was going.
    pub skipped: u64,
    /// Ticks not run because they could not be fired on time.
    pub missed: u64,
}

/// A schedule as stored (JSON in `capstan_schedules`, by name).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ScheduleRecord {
    /// Its name.
    pub name: String,
    /// When it ticks and how.
    #[serde(flatten)]
    pub definition: ScheduleDefinition,
    /// What each tick runs.
    pub job: JobSpec,
    /// Who owns it; its runs are submitted as them.
    pub owner: SubmittedBy,
    /// Changes with every change of its definition or pause, so that a tick armed before the
    /// change does nothing.
    pub generation: u64,
    /// Its next tick (none while paused, or when its expression never matches again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<Timestamp>,
    /// The instant `every` counts from.
    pub anchor: Timestamp,
    /// The last tick handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<LastTick>,
    /// The last run submitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_job: Option<JobId>,
    /// A tick waiting for the previous run to end (`overlap: queue`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued: Option<Timestamp>,
    /// Ticks by outcome.
    #[serde(default)]
    pub counts: TickCounts,
    /// When it was created.
    pub created_at: Timestamp,
    /// When its definition last changed.
    pub updated_at: Timestamp,
}

/// A fired tick, as the timer carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Tick {
    /// The schedule.
    pub schedule: String,
    /// Its generation when the tick was armed.
    pub generation: u64,
    /// The tick's time.
    pub at: Timestamp,
    /// When it was armed.
    pub armed_at: Timestamp,
}

impl Tick {
    /// Its deduplication id: one per schedule, generation and time.
    pub fn message_id(&self) -> String {
        format!(
            "schedule.{}.{}.{}",
            self.schedule,
            self.generation,
            self.at.as_millis()
        )
    }
}

/// A tick handled (`capstan.events.schedules.<name>.<outcome>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ScheduleEvent {
    /// The schedule.
    pub schedule: String,
    /// The tick's time.
    pub tick: Timestamp,
    /// What it did.
    pub outcome: TickOutcome,
    /// The run it submitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobId>,
    /// When it was handled.
    pub at: Timestamp,
}

impl ScheduleEvent {
    /// Its deduplication id: one per schedule, tick and outcome.
    pub fn message_id(&self) -> String {
        format!(
            "schedule.{}.{}.{}",
            self.schedule,
            self.tick.as_millis(),
            self.outcome.as_str()
        )
    }
}

/// What a scheduler does with a fired tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing: the schedule is gone, paused, changed since the tick was armed, or already
    /// past it.
    Stale,
    /// Acts on it.
    Act {
        /// What the tick does.
        outcome: TickOutcome,
        /// The tick time its run is labelled with (the tick's own, or the last one missed).
        label: Timestamp,
        /// Whether to cancel the previous run first.
        cancel_previous: bool,
        /// The tick to arm next.
        next: Option<Timestamp>,
    },
}

impl ScheduleRecord {
    /// A new schedule created at `now`: its generation is the creation time in milliseconds
    /// (so a schedule deleted and created again under the same name never shares one with
    /// its predecessor), `every` counts from `now`, and its first tick is the first after
    /// `now` unless it is paused.
    pub fn new(
        name: String,
        definition: ScheduleDefinition,
        job: JobSpec,
        owner: SubmittedBy,
        now: Timestamp,
    ) -> Self {
        let mut record = Self {
            name,
            definition,
            job,
            owner,
            generation: u64::try_from(now.as_millis()).unwrap_or(0),
            next: None,
            anchor: now,
            last: None,
            last_job: None,
            queued: None,
            counts: TickCounts::default(),
            created_at: now,
            updated_at: now,
        };
        if !record.definition.paused {
            record.next = record.next_after(now);
        }
        record
    }

    /// When it ticks. A stored record was checked when written, so this fails only for a
    /// record written by hand.
    pub fn when(&self) -> Result<When, SpecError> {
        self.definition.when()
    }

    /// Its first tick strictly after `after`.
    pub fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        match self.when().ok()? {
            When::Cron(cron, zone) => cron.next_after(after, &zone),
            When::Every(every) => Some(cron::every_next_after(self.anchor, every, after)),
        }
    }

    /// The next `count` ticks after `after`.
    pub fn preview(&self, after: Timestamp, count: usize) -> Vec<Timestamp> {
        let mut ticks = Vec::with_capacity(count);
        let mut from = after;
        while ticks.len() < count {
            match self.next_after(from) {
                Some(tick) => {
                    ticks.push(tick);
                    from = tick;
                }
                None => break,
            }
        }
        ticks
    }

    /// The tick to arm for this record as it stands, if any.
    pub fn armed(&self, now: Timestamp) -> Option<Tick> {
        if self.definition.paused {
            return None;
        }
        self.next.map(|at| Tick {
            schedule: self.name.clone(),
            generation: self.generation,
            at,
            armed_at: now,
        })
    }

    /// Decides a fired `tick`: `fired_at` is when the server published it, `previous_running`
    /// whether the last run is still going. Pure: the whole of what a tick does.
    pub fn decide(
        &self,
        tick: &Tick,
        fired_at: Timestamp,
        now: Timestamp,
        previous_running: bool,
    ) -> Decision {
        if self.definition.paused
            || tick.generation != self.generation
            || self.next != Some(tick.at)
        {
            return Decision::Stale;
        }
        let fired_late = fired_at.as_millis() - tick.at.max(tick.armed_at).as_millis()
            > FIRE_GRACE.as_millis() as i64;
        let backlog = now.as_millis() - tick.at.as_millis() > MAX_BACKLOG.as_millis() as i64;
        if fired_late || backlog {
            // Ticks the server could not fire (or a backlog too old to follow): one run for
            // all of them, or none, then on from now.
            let label = self.last_tick_before(tick.at, now);
            let next = self.next_after(now);
            let outcome = match self.definition.catchup {
                Catchup::None => TickOutcome::Missed,
                Catchup::Last => self.overlap_outcome(previous_running),
            };
            return Decision::Act {
                outcome,
                label,
                cancel_previous: outcome == TickOutcome::Ran
                    && previous_running
                    && self.definition.overlap == Overlap::CancelPrevious,
                next,
            };
        }
        let outcome = self.overlap_outcome(previous_running);
        Decision::Act {
            outcome,
            label: tick.at,
            cancel_previous: outcome == TickOutcome::Ran
                && previous_running
                && self.definition.overlap == Overlap::CancelPrevious,
            next: self.next_after(tick.at),
        }
    }

    fn overlap_outcome(&self, previous_running: bool) -> TickOutcome {
        if !previous_running {
            return TickOutcome::Ran;
        }
        match self.definition.overlap {
            Overlap::Skip => TickOutcome::Skipped,
            Overlap::Allow | Overlap::CancelPrevious => TickOutcome::Ran,
            Overlap::Queue if self.queued.is_none() => TickOutcome::Queued,
            Overlap::Queue => TickOutcome::Skipped,
        }
    }

    /// The latest tick at or before `now`, from `first` on (`first` when none is later).
    fn last_tick_before(&self, first: Timestamp, now: Timestamp) -> Timestamp {
        let mut label = first;
        // Start near `now` when a tick lies close before it, so that a late tick of a
        // one-second schedule after a long outage does not walk every second since.
        for window in [60, 3600, 86_400] {
            let start = now.minus(Duration::from_secs(window));
            if start > label
                && let Some(tick) = self.next_after(start)
                && tick <= now
            {
                label = tick;
                break;
            }
        }
        for _ in 0..100_000 {
            match self.next_after(label) {
                Some(tick) if tick <= now => label = tick,
                _ => break,
            }
        }
        label
    }

    /// Records a handled tick: the record as it stands after it.
    pub fn record_tick(
        &mut self,
        tick: Timestamp,
        outcome: TickOutcome,
        job: Option<JobId>,
        next: Option<Timestamp>,
        now: Timestamp,
    ) {
        self.last = Some(LastTick {
            at: tick,
            outcome,
            handled_at: now,
        });
        match outcome {
            TickOutcome::Ran => {
                self.counts.ran += 1;
                self.last_job = job.or(self.last_job);
                if self.queued == Some(tick) {
                    self.queued = None;
                }
            }
            TickOutcome::Skipped => self.counts.skipped += 1,
            TickOutcome::Queued => self.queued = Some(tick),
            TickOutcome::Missed => self.counts.missed += 1,
        }
        self.next = next;
    }

    /// The job a tick runs: the schedule's, with the schedule and tick in its metadata and an
    /// idempotency key naming the tick, so that handling the tick again submits nothing new.
    pub fn run_spec(&self, tick: Timestamp) -> JobSpec {
        let mut spec = self.job.clone();
        spec.metadata.insert(SCHEDULE_KEY.into(), self.name.clone());
        spec.metadata.insert(TICK_KEY.into(), tick.to_rfc3339());
        spec.idempotency_key = Some(run_key(&self.name, self.generation, tick));
        spec
    }
}

/// The idempotency key of a schedule's run for one tick.
pub fn run_key(schedule: &str, generation: u64, tick: Timestamp) -> String {
    format!("schedule:{schedule}:{generation}:{}", tick.as_millis())
}

/// The schedule a job's metadata names, if it is a schedule's run.
pub fn schedule_of(metadata: &BTreeMap<String, String>) -> Option<&str> {
    metadata.get(SCHEDULE_KEY).map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AuthMethod;

    fn at(text: &str) -> Timestamp {
        Timestamp::parse_rfc3339(text).expect("valid")
    }

    fn record(every: &str, overlap: Overlap, catchup: Catchup) -> ScheduleRecord {
        let job: JobSpec =
            crate::codec::decode_spec(crate::Encoding::Json, br#"{"argv": ["/bin/true"]}"#)
                .expect("valid job");
        let mut record = ScheduleRecord::new(
            "nightly".into(),
            ScheduleDefinition {
                cron: None,
                every: Some(every.into()),
                timezone: "UTC".into(),
                overlap,
                catchup,
                paused: false,
            },
            job,
            SubmittedBy {
                principal: "alice".into(),
                via: AuthMethod::Password,
                token: None,
            },
            at("2030-01-01T00:00:00Z"),
        );
        record.generation = 7;
        record
    }

    fn fired(record: &ScheduleRecord) -> Tick {
        record.armed(record.anchor).expect("armed")
    }

    #[test]
    fn a_tick_on_time_runs_and_arms_the_one_after_it() {
        let record = record("10s", Overlap::Skip, Catchup::Last);
        let tick = fired(&record);
        assert_eq!(tick.at, at("2030-01-01T00:00:10Z"));
        let decision = record.decide(
            &tick,
            tick.at,
            tick.at.plus(Duration::from_millis(3)),
            false,
        );
        assert_eq!(
            decision,
            Decision::Act {
                outcome: TickOutcome::Ran,
                label: tick.at,
                cancel_previous: false,
                next: Some(at("2030-01-01T00:00:20Z")),
            }
        );
    }

    #[test]
    fn a_tick_the_record_has_moved_past_or_of_another_generation_is_stale() {
        let mut record = record("10s", Overlap::Skip, Catchup::Last);
        let tick = fired(&record);
        record.record_tick(
            tick.at,
            TickOutcome::Ran,
            None,
            record.next_after(tick.at),
            tick.at,
        );
        assert_eq!(
            record.decide(&tick, tick.at, tick.at, false),
            Decision::Stale
        );
        let mut other = fired(&record);
        other.generation += 1;
        assert_eq!(
            record.decide(&other, other.at, other.at, false),
            Decision::Stale
        );
        record.definition.paused = true;
        let tick = fired(&{
            let mut r = record.clone();
            r.definition.paused = false;
            r
        });
        assert_eq!(
            record.decide(&tick, tick.at, tick.at, false),
            Decision::Stale
        );
    }

    #[test]
    fn a_tick_handled_late_but_fired_on_time_runs_and_the_next_follows_it_not_now() {
        let record = record("10s", Overlap::Skip, Catchup::None);
        let tick = fired(&record);
        let now = tick.at.plus(Duration::from_secs(95));
        match record.decide(&tick, tick.at, now, false) {
            Decision::Act { outcome, next, .. } => {
                assert_eq!(outcome, TickOutcome::Ran);
                assert_eq!(next, Some(at("2030-01-01T00:00:20Z")));
            }
            Decision::Stale => panic!("a late tick must act"),
        }
    }

    #[test]
    fn ticks_the_server_fired_late_run_once_with_catchup_last_and_never_with_none() {
        let last = record("10s", Overlap::Skip, Catchup::Last);
        let tick = fired(&last);
        let back = tick.at.plus(Duration::from_secs(65));
        match last.decide(&tick, back, back, false) {
            Decision::Act {
                outcome,
                label,
                next,
                ..
            } => {
                assert_eq!(outcome, TickOutcome::Ran);
                assert_eq!(label, at("2030-01-01T00:01:10Z"));
                assert_eq!(next, Some(at("2030-01-01T00:01:20Z")));
            }
            Decision::Stale => panic!("must act"),
        }
        let none = record("10s", Overlap::Skip, Catchup::None);
        match none.decide(&tick, back, back, false) {
            Decision::Act { outcome, next, .. } => {
                assert_eq!(outcome, TickOutcome::Missed);
                assert_eq!(next, Some(at("2030-01-01T00:01:20Z")));
            }
            Decision::Stale => panic!("must act"),
        }
    }

    #[test]
    fn a_backlog_older_than_the_limit_is_not_followed_tick_by_tick() {
        let record = record("1s", Overlap::Skip, Catchup::Last);
        let tick = fired(&record);
        let now = tick.at.plus(MAX_BACKLOG).plus(Duration::from_secs(30));
        match record.decide(&tick, tick.at, now, false) {
            Decision::Act { label, next, .. } => {
                assert!(label <= now && label > now.minus(Duration::from_secs(2)));
                assert!(next > Some(now));
            }
            Decision::Stale => panic!("must act"),
        }
    }

    #[test]
    fn overlap_decides_what_a_tick_does_while_the_previous_run_goes_on() {
        for (overlap, queued, outcome, cancel) in [
            (Overlap::Skip, None, TickOutcome::Skipped, false),
            (Overlap::Allow, None, TickOutcome::Ran, false),
            (Overlap::CancelPrevious, None, TickOutcome::Ran, true),
            (Overlap::Queue, None, TickOutcome::Queued, false),
            (
                Overlap::Queue,
                Some(at("2030-01-01T00:00:00Z")),
                TickOutcome::Skipped,
                false,
            ),
        ] {
            let mut record = record("10s", overlap, Catchup::Last);
            record.queued = queued;
            let tick = fired(&record);
            match record.decide(&tick, tick.at, tick.at, true) {
                Decision::Act {
                    outcome: got,
                    cancel_previous,
                    ..
                } => {
                    assert_eq!((got, cancel_previous), (outcome, cancel), "{overlap:?}");
                }
                Decision::Stale => panic!("must act"),
            }
        }
    }

    #[test]
    fn a_run_carries_its_schedule_and_an_idempotency_key_naming_its_tick() {
        let record = record("10s", Overlap::Skip, Catchup::Last);
        let tick = at("2030-01-01T00:00:10Z");
        let spec = record.run_spec(tick);
        assert_eq!(schedule_of(&spec.metadata), Some("nightly"));
        assert_eq!(
            spec.idempotency_key.as_deref(),
            Some(run_key("nightly", 7, tick).as_str())
        );
        assert_ne!(run_key("nightly", 7, tick), run_key("nightly", 8, tick));
    }

    /// Follows a schedule tick by tick, as schedulers would, from `from`.
    fn fired_chain(record: &mut ScheduleRecord, from: Timestamp, count: usize) -> Vec<Timestamp> {
        record.next = record.next_after(from);
        let mut fired = Vec::new();
        while fired.len() < count {
            let tick = record.armed(from).expect("armed");
            let Decision::Act { label, next, .. } = record.decide(&tick, tick.at, tick.at, false)
            else {
                panic!("a tick on time must act");
            };
            record.record_tick(label, TickOutcome::Ran, None, next, tick.at);
            fired.push(label);
        }
        fired
    }

    #[test]
    fn what_fires_across_daylight_saving_changes_is_what_the_preview_shows() {
        for (cron, zone, from, expected) in [
            (
                "30 2 * * *",
                "America/New_York",
                "2026-03-07T00:00:00Z",
                // 02:30 EST, then the skipped 02:30 at the jump (03:00 EDT), then 02:30 EDT.
                [
                    "2026-03-07T07:30:00Z",
                    "2026-03-08T07:00:00Z",
                    "2026-03-09T06:30:00Z",
                ],
            ),
            (
                "30 1 * * *",
                "America/New_York",
                "2026-10-31T00:00:00Z",
                // 01:30 EDT, then the repeated 01:30 once (EDT), then 01:30 EST.
                [
                    "2026-10-31T05:30:00Z",
                    "2026-11-01T05:30:00Z",
                    "2026-11-02T06:30:00Z",
                ],
            ),
            (
                "0 * * * *",
                "Europe/Berlin",
                "2026-10-25T00:00:00Z",
                // 02:00 CEST, 03:00 CET: the repeated 02:00 runs once.
                [
                    "2026-10-25T00:00:00Z",
                    "2026-10-25T02:00:00Z",
                    "2026-10-25T03:00:00Z",
                ],
            ),
        ] {
            let mut record = record("10s", Overlap::Skip, Catchup::Last);
            record.definition.every = None;
            record.definition.cron = Some(cron.into());
            record.definition.timezone = zone.into();
            let from = at(from).minus(Duration::from_millis(1));
            let preview = record.preview(from, 3);
            let fired = fired_chain(&mut record, from, 3);
            let expected: Vec<Timestamp> = expected.iter().map(|text| at(text)).collect();
            assert_eq!(preview, expected, "{cron} in {zone}: preview");
            assert_eq!(fired, expected, "{cron} in {zone}: fired");
        }
    }

    #[test]
    fn a_definition_names_the_field_that_is_wrong() {
        let base = ScheduleDefinition {
            cron: Some("*/5 * * * *".into()),
            every: None,
            timezone: "UTC".into(),
            overlap: Overlap::Skip,
            catchup: Catchup::Last,
            paused: false,
        };
        assert!(base.when().is_ok());
        let field = |definition: ScheduleDefinition| {
            definition.when().map(|_| ()).expect_err("invalid").field
        };
        assert_eq!(
            field(ScheduleDefinition {
                cron: Some("61 * * * *".into()),
                ..base.clone()
            }),
            "cron"
        );
        assert_eq!(
            field(ScheduleDefinition {
                timezone: "Mars/Base".into(),
                ..base.clone()
            }),
            "timezone"
        );
        assert_eq!(
            field(ScheduleDefinition {
                cron: None,
                every: Some("500ms".into()),
                ..base.clone()
            }),
            "every"
        );
        assert_eq!(
            field(ScheduleDefinition {
                every: Some("5s".into()),
                ..base.clone()
            }),
            "every"
        );
        assert!(validate_name("nightly-backup_2").is_ok());
        assert!(validate_name("a.b").is_err());
        assert!(validate_name("").is_err());
    }
}
