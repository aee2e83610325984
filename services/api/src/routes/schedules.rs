//! `/api/v1/schedules`: jobs run on a cron expression or every so often. A schedule is a
//! [`ScheduleRecord`] in `capstan_schedules` by name; this module writes its definition (by
//! create, or compare-and-swap on the revision read) and arms its next tick; the schedulers
//! run the ticks and record what each did (`capstan_scheduler::schedules`).
//!
//! A schedule's job is checked as `POST /api/v1/jobs` checks a job (the same parser and the
//! same checks, its fields named `job.<field>`), and as a run: without a start time or an
//! idempotency key of its own, and with the metadata each run gets. Its runs are submitted as
//! its owner, the principal who created it, so creating one needs `jobs:submit` as well as
//! `schedules:manage`; changing, pausing, resuming, triggering or deleting one needs
//! `schedules:manage` for one's own and `schedules:manage:any` for another's. Every change is
//! audited (`schedule.create`, `schedule.update` — pause and resume too —, `schedule.delete`,
//! `schedule.trigger`) with `schedule/<name>` as its resource.
//!
//! Disabling, deleting or demoting (below `jobs:submit`) a local user pauses their schedules
//! ([`pause_owned_by`]), and none of them may be resumed while that lasts
//! ([`owner_may_run`]): a run carries its owner's authority (their secrets, their systems),
//! which the owner no longer has.

use capstan_mesh::{Change, Modified, Versioned};
use capstan_protocol::codec::{self, Encoding};
use capstan_protocol::schedule::{ScheduleDefinition, ScheduleRecord};
use capstan_protocol::spec::JobSpecWire;
use capstan_protocol::{
    AuditAction, AuthMethod, JobId, JobSpec, RejectionCode, SpecError, Timestamp,
};
use poem::{FromRequest, IntoResponse, Request, RequestBody};
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::registry::{MetaMediaType, MetaRequest, Registry};
use poem_openapi::types::Type;
use poem_openapi::{ApiExtractor, ApiExtractorType, ApiResponse, ExtractParamOptions, OpenApi};
use serde::de::DeserializeOwned;

use super::{BearerAuth, Tag, served};
use crate::auth::{Permission, Principal, Role};
use crate::model::schedules::{
    Schedule, ScheduleInput, ScheduleInputWire, ScheduleList, SchedulePatch, SchedulePatchWire,
    ScheduleTicks, ScheduleTriggered,
};
use crate::problem::ApiError;
use crate::submission::SubmissionBody;

/// The schedules operations.
pub(crate) struct SchedulesApi(pub Option<std::sync::Arc<crate::State>>);

#[derive(ApiResponse)]
enum Created {
    /// Created; its first tick is armed.
    #[oai(status = 201)]
    Done(Json<Schedule>),
}

#[derive(ApiResponse)]
enum Deleted {
    /// Deleted; a tick already armed does nothing.
    #[oai(status = 204)]
    Done,
}

#[derive(ApiResponse)]
enum Triggered {
    /// The run is submitted: its job's id; `Location` is its URL.
    #[oai(status = 202)]
    Accepted(Json<ScheduleTriggered>, #[oai(header = "Location")] String),
}

#[OpenApi(prefix_path = "/api/v1", tag = "Tag::Schedules")]
impl SchedulesApi {
    /// List the schedules, by name. Needs `schedules:read`.
    #[oai(path = "/schedules", method = "get", operation_id = "listSchedules")]
    async fn list(&self, auth: BearerAuth) -> Result<Json<ScheduleList>, ApiError> {
        let state = served(&self.0)?;
        let caller = auth.allow_read(Permission::SchedulesRead)?;
        let mut items: Vec<Schedule> = state
            .mesh
            .schedules
            .values()
            .await?
            .into_iter()
            .map(|stored| view(caller, stored.value))
            .collect();
        items.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Json(ScheduleList { items }))
    }

    /// Get a schedule: its definition, its job, its next tick and what its ticks did. `env`
    /// values read `***` unless the caller owns the schedule or holds `jobs:secrets`. Needs
    /// `schedules:read`.
    #[oai(
        path = "/schedules/:name",
        method = "get",
        operation_id = "getSchedule"
    )]
    async fn get(
        &self,
        auth: BearerAuth,
        #[oai(validator(pattern = "^[A-Za-z0-9_-]{1,64}$"))] name: Path<String>,
    ) -> Result<Json<Schedule>, ApiError> {
        let state = served(&self.0)?;
        let caller = auth.allow_read(Permission::SchedulesRead)?;
        let stored = existing(state, &name.0).await?;
        Ok(Json(view(caller, stored.value)))
    }

    /// Create a schedule.
    ///
    /// Its job is checked as `POST /api/v1/jobs` checks a job (a problem names the field as
    /// `job.<field>`), and takes no `run_at`, `delay`, `idempotency_key` or `secrets`. Each
    /// tick submits it as the caller, with `capstan.io/schedule` and `capstan.io/tick` in its
    /// metadata. `409` when a schedule of that name exists. Needs `schedules:manage` and
    /// `jobs:submit`.
    #[oai(path = "/schedules", method = "post", operation_id = "createSchedule")]
    async fn create(
        &self,
        auth: BearerAuth,
        body: ScheduleBody<ScheduleInputWire>,
    ) -> Result<Created, ApiError> {
        let state = served(&self.0)?;
        let input = body.0;
        let caller = auth.allow(
            Permission::SchedulesManage,
            AuditAction::ScheduleCreate,
            Some(resource(&input.name)),
        )?;
        // The runs are submitted as the caller.
        auth.allow_read(Permission::JobsSubmit)?;
        capstan_protocol::schedule::validate_name(&input.name).map_err(invalid)?;
        let definition = ScheduleDefinition {
            cron: input.cron,
            every: input.every,
            timezone: input.timezone.unwrap_or_else(|| "UTC".to_owned()),
            overlap: input.overlap.unwrap_or_default(),
            catchup: input.catchup.unwrap_or_default(),
            paused: input.paused.unwrap_or(false),
        };
        definition.when().map_err(invalid)?;
        let owner = caller.submitted_by();
        let job = checked_job(state, &auth, input.job, &owner.principal).await?;
        let now = Timestamp::now();
        let record = ScheduleRecord::new(input.name, definition, job, owner, now);
        checked_run(&record, now)?;
        // A create, not a put: of two requests for one name, one wins and the other is told.
        match state.mesh.schedules.create(&record.name, &record).await {
            Ok(_) => {}
            Err(capstan_mesh::Error::AlreadyExists { .. }) => {
                return Err(ApiError::conflict(format!(
                    "a schedule `{}` exists; change it with PATCH",
                    record.name
                )));
            }
            Err(error) => return Err(error.into()),
        }
        arm(state, &record, now).await;
        auth.detail(describe(&record));
        Ok(Created::Done(Json(Schedule::of(record, true))))
    }

    /// Change a schedule: the fields given are replaced (`cron` replaces `every`, and `every`
    /// replaces `cron`), everything is checked again, and the next tick is counted from now;
    /// a tick armed before the change does nothing. Needs `schedules:manage` for one's own
    /// schedule, `schedules:manage:any` for another's, and `jobs:submit` to change the job.
    #[oai(
        path = "/schedules/:name",
        method = "patch",
        operation_id = "updateSchedule"
    )]
    async fn update(
        &self,
        auth: BearerAuth,
        #[oai(validator(pattern = "^[A-Za-z0-9_-]{1,64}$"))] name: Path<String>,
        body: ScheduleBody<SchedulePatchWire>,
    ) -> Result<Json<Schedule>, ApiError> {
        let state = served(&self.0)?;
        let caller = auth.allow(
            Permission::SchedulesManage,
            AuditAction::ScheduleUpdate,
            Some(resource(&name.0)),
        )?;
        let name = name.0;
        let patch = body.0;
        let stored = existing(state, &name).await?;
        may_change(&auth, caller, &stored.value)?;
        if !patch.paused.unwrap_or(stored.value.definition.paused) {
            owner_may_run(state, &stored.value).await?;
        }
        let job = match patch.job {
            Some(wire) => {
                auth.allow_read(Permission::JobsSubmit)?;
                // Its runs are still submitted as the owner.
                Some(checked_job(state, &auth, wire, &stored.value.owner.principal).await?)
            }
            None => None,
        };
        let now = Timestamp::now();
        let mut changed: Vec<&'static str> = Vec::new();
        let written = state
            .mesh
            .schedules
            .modify_from(&name, Some(stored), |current| {
                let Some(current) = current else {
                    return Change::Stop(Some(gone(&name)));
                };
                let before = &current.value;
                let mut record = before.clone();
                let definition = &mut record.definition;
                if let Some(cron) = &patch.cron {
                    definition.cron = Some(cron.clone());
                    definition.every = None;
                }
                if let Some(every) = &patch.every {
                    definition.every = Some(every.clone());
                    if patch.cron.is_none() {
                        definition.cron = None;
                    }
                }
                if let Some(timezone) = &patch.timezone {
                    definition.timezone.clone_from(timezone);
                }
                if let Some(overlap) = patch.overlap {
                    definition.overlap = overlap;
                }
                if let Some(catchup) = patch.catchup {
                    definition.catchup = catchup;
                }
                if let Some(paused) = patch.paused {
                    definition.paused = paused;
                }
                if let Some(job) = &job {
                    record.job = job.clone();
                }
                if let Err(error) = record.definition.when() {
                    return Change::Stop(Some(invalid(error)));
                }
                changed = [
                    ("cron", record.definition.cron != before.definition.cron),
                    ("every", record.definition.every != before.definition.every),
                    (
                        "timezone",
                        record.definition.timezone != before.definition.timezone,
                    ),
                    (
                        "overlap",
                        record.definition.overlap != before.definition.overlap,
                    ),
                    (
                        "catchup",
                        record.definition.catchup != before.definition.catchup,
                    ),
                    (
                        "paused",
                        record.definition.paused != before.definition.paused,
                    ),
                    ("job", record.job != before.job),
                ]
                .into_iter()
                .filter_map(|(field, differs)| differs.then_some(field))
                .collect();
                moved_on(&mut record, before, now);
                if let Err(refused) = checked_run(&record, now) {
                    return Change::Stop(Some(refused));
                }
                Change::Write(record)
            })
            .await;
        let record = written_or_refused(written, &name)?;
        arm(state, &record, now).await;
        auth.detail(if changed.is_empty() {
            "nothing changed".to_owned()
        } else {
            format!("changed {}: {}", changed.join(", "), describe(&record))
        });
        Ok(Json(view(caller, record)))
    }

    /// Delete a schedule. Its runs already submitted go on. Needs `schedules:manage` for
    /// one's own schedule, `schedules:manage:any` for another's.
    #[oai(
        path = "/schedules/:name",
        method = "delete",
        operation_id = "deleteSchedule"
    )]
    async fn delete(
        &self,
        auth: BearerAuth,
        #[oai(validator(pattern = "^[A-Za-z0-9_-]{1,64}$"))] name: Path<String>,
    ) -> Result<Deleted, ApiError> {
        let state = served(&self.0)?;
        let caller = auth.allow(
            Permission::SchedulesManage,
            AuditAction::ScheduleDelete,
            Some(resource(&name.0)),
        )?;
        let stored = existing(state, &name.0).await?;
        may_change(&auth, caller, &stored.value)?;
        // NOTE: a plain delete, not one on the revision read: what may change meanwhile (the
        // ticks' records, a definition) does not change whether the caller may delete it —
        // its owner never changes.
        state
            .mesh
            .schedules
            .kv()
            .delete(&name.0)
            .await
            .map_err(|e| ApiError::unavailable(format!("cannot delete the schedule: {e}")))?;
        auth.detail(describe(&stored.value));
        Ok(Deleted::Done)
    }

    /// Pause a schedule: no tick runs until it is resumed (a tick already armed does
    /// nothing). Audited as `schedule.update`. Needs `schedules:manage` for one's own
    /// schedule, `schedules:manage:any` for another's.
    #[oai(
        path = "/schedules/:name/pause",
        method = "post",
        operation_id = "pauseSchedule"
    )]
    async fn pause(
        &self,
        auth: BearerAuth,
        #[oai(validator(pattern = "^[A-Za-z0-9_-]{1,64}$"))] name: Path<String>,
    ) -> Result<Json<Schedule>, ApiError> {
        set_paused(served(&self.0)?, &auth, &name.0, true).await
    }

    /// Resume a schedule: its next tick is counted from now (ticks missed while it was paused
    /// are not run). Refused (409) while its owner is disabled, deleted, or may not submit
    /// jobs. Audited as `schedule.update`. Needs `schedules:manage` for one's own schedule,
    /// `schedules:manage:any` for another's.
    #[oai(
        path = "/schedules/:name/resume",
        method = "post",
        operation_id = "resumeSchedule"
    )]
    async fn resume(
        &self,
        auth: BearerAuth,
        #[oai(validator(pattern = "^[A-Za-z0-9_-]{1,64}$"))] name: Path<String>,
    ) -> Result<Json<Schedule>, ApiError> {
        set_paused(served(&self.0)?, &auth, &name.0, false).await
    }

    /// Run a schedule's job now, outside its ticks, as the caller.
    ///
    /// The run carries `capstan.io/schedule` and `capstan.io/tick` (now) in its metadata like
    /// a tick's, and no idempotency key: each trigger is a run. It does not count as a tick.
    /// Needs `schedules:manage` for one's own schedule, `schedules:manage:any` for another's,
    /// and `jobs:submit`.
    #[oai(
        path = "/schedules/:name/trigger",
        method = "post",
        operation_id = "triggerSchedule"
    )]
    async fn trigger(
        &self,
        auth: BearerAuth,
        #[oai(validator(pattern = "^[A-Za-z0-9_-]{1,64}$"))] name: Path<String>,
    ) -> Result<Triggered, ApiError> {
        let state = served(&self.0)?;
        let caller = auth.allow(
            Permission::SchedulesManage,
            AuditAction::ScheduleTrigger,
            Some(resource(&name.0)),
        )?;
        auth.allow_read(Permission::JobsSubmit)?;
        let stored = existing(state, &name.0).await?;
        may_change(&auth, caller, &stored.value)?;
        let now = Timestamp::now();
        let mut spec = stored.value.run_spec(now);
        spec.idempotency_key = None;
        let submitted_by = caller.submitted_by();
        super::jobs::check_submission(state, &auth, &spec, &submitted_by.principal)
            .await
            .map_err(in_job)?;
        let created = state
            .submitter
            .submit_with_id(JobId::generate(), &spec, Some(&submitted_by))
            .await?;
        state.metrics.submitted();
        auth.detail(format!("job {}", created.id));
        Ok(Triggered::Accepted(
            Json(ScheduleTriggered {
                id: created.id.to_string(),
            }),
            format!("/api/v1/jobs/{}", created.id),
        ))
    }

    /// The schedule's next `count` ticks from now, paused or not. Needs `schedules:read`.
    #[oai(
        path = "/schedules/:name/next",
        method = "get",
        operation_id = "previewSchedule"
    )]
    async fn next(
        &self,
        auth: BearerAuth,
        #[oai(validator(pattern = "^[A-Za-z0-9_-]{1,64}$"))] name: Path<String>,
        /// How many ticks, 1 to 100.
        #[oai(
            default = "default_count",
            validator(minimum(value = "1"), maximum(value = "100"))
        )]
        count: Query<u32>,
    ) -> Result<Json<ScheduleTicks>, ApiError> {
        let state = served(&self.0)?;
        auth.allow_read(Permission::SchedulesRead)?;
        let record = existing(state, &name.0).await?.value;
        let times = record
            .preview(Timestamp::now(), count.0 as usize)
            .into_iter()
            .map(Timestamp::to_rfc3339)
            .collect();
        Ok(Json(ScheduleTicks {
            times,
            timezone: record.definition.timezone,
        }))
    }
}

fn default_count() -> u32 {
    10
}

/// The audit record's resource for the schedule `name` as asked (cut to a name's length: it
/// is recorded before the name is checked).
fn resource(name: &str) -> String {
    format!("schedule/{}", name.chars().take(64).collect::<String>())
}

/// Milliseconds since the epoch, as a generation.
fn millis(at: Timestamp) -> u64 {
    u64::try_from(at.as_millis()).unwrap_or(0)
}

/// A definition or job that is wrong, as `422` naming the field.
fn invalid(error: SpecError) -> ApiError {
    ApiError::invalid(error.to_string(), Some(error.field))
}

fn gone(name: &str) -> ApiError {
    ApiError::not_found(format!("no schedule `{name}`"))
}

async fn existing(state: &crate::State, name: &str) -> Result<Versioned<ScheduleRecord>, ApiError> {
    state
        .mesh
        .schedules
        .get(name)
        .await?
        .ok_or_else(|| gone(name))
}

/// The view of `record` for `caller`: its job's `env` values shown to its owner and to whoever
/// may read any job's secrets, as a job's are.
fn view(caller: &Principal, record: ScheduleRecord) -> Schedule {
    let reveal = caller.can(Permission::JobsSecrets) || caller.owns(Some(&record.owner));
    Schedule::of(record, reveal)
}

/// Refuses a change of another's schedule to a caller without `schedules:manage:any`.
fn may_change(
    auth: &BearerAuth,
    caller: &Principal,
    record: &ScheduleRecord,
) -> Result<(), ApiError> {
    if caller.can(Permission::SchedulesManageAny) || caller.owns(Some(&record.owner)) {
        return Ok(());
    }
    Err(auth.refuse(
        Permission::SchedulesManageAny,
        format!(
            "schedule `{}` is `{}`'s; changing another's schedule needs `{}`",
            record.name,
            record.owner.principal,
            Permission::SchedulesManageAny
        ),
    ))
}

/// `error`, a problem about a job, with its field named as the schedule's `job.<field>`.
fn in_job(mut error: ApiError) -> ApiError {
    if let ApiError::BadRequest(problem) | ApiError::Invalid(problem) | ApiError::Forbidden(problem) =
        &mut error
        && let Some(field) = problem.0.field.as_mut()
    {
        *field = format!("job.{field}");
    }
    error
}

/// A schedule's job from its request, checked as `POST /api/v1/jobs` checks one submitted by
/// `owner`, and as a schedule's run.
async fn checked_job(
    state: &crate::State,
    auth: &BearerAuth,
    wire: JobSpecWire,
    owner: &str,
) -> Result<JobSpec, ApiError> {
    // Secrets given in clear are sealed to one job's id; a schedule's runs each have their
    // own, so the secret has to be stored and named instead.
    if wire.secrets.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid(
            "a schedule's job takes no `secrets` (they are sealed to one job): store the \
             secret (`POST /api/v1/secrets`) and name it in `secret_refs`",
            Some("job.secrets".to_owned()),
        ));
    }
    // No secret to seal: this is `POST /api/v1/jobs`'s check of the spec, and nothing else.
    let spec = SubmissionBody(wire)
        .seal_and_check(JobId::generate(), None)
        .map_err(in_job)?;
    capstan_protocol::schedule::validate_job(&spec).map_err(invalid)?;
    super::jobs::check_submission(state, auth, &spec, owner)
        .await
        .map_err(in_job)?;
    Ok(spec)
}

/// Refuses a schedule whose runs would be refused: its job with the metadata and the
/// idempotency key each run gets must still be a valid job.
fn checked_run(record: &ScheduleRecord, now: Timestamp) -> Result<(), ApiError> {
    let run = JobSpecWire::from(record.run_spec(now));
    JobSpec::try_from(run)
        .map(|_| ())
        .map_err(|error| in_job(invalid(error)))
}

/// Its next tick from `now`: none while paused.
fn next_of(record: &ScheduleRecord, now: Timestamp) -> Option<Timestamp> {
    if record.definition.paused {
        None
    } else {
        record.next_after(now)
    }
}

/// Moves `record`, changed from `before`, on to a new generation (so a tick armed before is
/// stale) with its next tick from `now`; a tick waiting for the previous run is dropped.
fn moved_on(record: &mut ScheduleRecord, before: &ScheduleRecord, now: Timestamp) {
    record.generation = (before.generation + 1).max(millis(now));
    record.next = next_of(record, now);
    record.queued = None;
    record.updated_at = now;
}

/// The record a [`Bucket::modify`](capstan_mesh::store::Bucket::modify) wrote, or why not.
fn written_or_refused(
    written: Result<Modified<ScheduleRecord, Option<ApiError>>, capstan_mesh::Error>,
    name: &str,
) -> Result<ScheduleRecord, ApiError> {
    match written {
        Ok(Modified::Written { written, .. }) => Ok(written.value),
        Ok(Modified::Stopped(Some(refused))) => Err(refused),
        Ok(Modified::Stopped(None)) => Err(gone(name)),
        Err(capstan_mesh::Error::KeptChanging { .. }) => Err(ApiError::conflict(format!(
            "schedule `{name}` kept changing while this change was written; read it and retry"
        ))),
        Err(error) => Err(error.into()),
    }
}

/// Arms `record`'s next tick, if it has one. A failure is not the request's: the schedule is
/// stored, and the schedulers re-arm a schedule whose tick is overdue.
async fn arm(state: &crate::State, record: &ScheduleRecord, now: Timestamp) {
    let Some(tick) = record.armed(now) else {
        return;
    };
    if let Err(error) = capstan_mesh::schedules::arm(&state.mesh, &tick).await {
        tracing::warn!(
            schedule = %record.name,
            error = %error,
            "cannot arm the schedule's next tick; a scheduler arms it once it is overdue"
        );
    }
}

/// True when `owner` is a local user (password or API token), whom an administrator can
/// disable; a provider's user is the provider's to disable, and NATS publishers have no account.
fn local_user(owner: &capstan_protocol::SubmittedBy) -> bool {
    is_local_method(owner.via)
}

/// True for the ways a local user authenticates: a password, or one of their tokens.
pub(crate) fn is_local_method(via: AuthMethod) -> bool {
    matches!(via, AuthMethod::Password | AuthMethod::Token)
}

/// True when `owner` is local user `name`: what a change to that user stops.
pub(crate) fn is_local_user(owner: &capstan_protocol::SubmittedBy, name: &str) -> bool {
    owner.principal == name && local_user(owner)
}

/// Why schedules owned by `user` may not run, if they may not: their runs are submitted as
/// the owner, so the owner must still be able to sign in and to submit jobs.
pub(crate) fn why_runs_refused(user: &capstan_store::entity::user::Model) -> Option<&'static str> {
    if user.disabled {
        Some("is disabled")
    } else if !user
        .role
        .parse::<Role>()
        .is_ok_and(|role| role.grants(Permission::JobsSubmit))
    {
        Some("may no longer submit jobs")
    } else {
        None
    }
}

/// Refuses to let `record` tick when its owner is a local user who was disabled, deleted or
/// demoted below submitting jobs: its runs would carry an authority the owner no longer has.
async fn owner_may_run(state: &crate::State, record: &ScheduleRecord) -> Result<(), ApiError> {
    let owner = &record.owner;
    if !local_user(owner) {
        return Ok(());
    }
    let user = capstan_store::identity::user(state.history.identity(), &owner.principal)
        .await
        .map_err(|error| ApiError::from(capstan_store::Error::from(error)))?;
    let why = match &user {
        Some(user) => match why_runs_refused(user) {
            Some(why) => why,
            None => return Ok(()),
        },
        None => "no longer exists",
    };
    Err(ApiError::conflict(format!(
        "schedule `{}` runs as `{}`, who {why}: it stays paused until its owner may run it again",
        record.name, owner.principal
    )))
}

/// Pauses every schedule of local user `name`, who was just disabled, deleted or demoted
/// below submitting jobs, so that no run goes on with an authority they lost. Returns the
/// names of those it paused.
pub(crate) async fn pause_owned_by(
    state: &crate::State,
    name: &str,
) -> Result<Vec<String>, ApiError> {
    let now = Timestamp::now();
    let mut paused = Vec::new();
    for stored in state.mesh.schedules.values().await? {
        let record = &stored.value;
        if record.definition.paused || !is_local_user(&record.owner, name) {
            continue;
        }
        let schedule = record.name.clone();
        let written = state
            .mesh
            .schedules
            .modify_from(&schedule, Some(stored), |current| {
                let Some(current) = current else {
                    return Change::Stop(());
                };
                if current.value.definition.paused {
                    return Change::Stop(());
                }
                let mut record = current.value.clone();
                record.definition.paused = true;
                moved_on(&mut record, &current.value, now);
                Change::Write(record)
            })
            .await?;
        if let Modified::Written { .. } = written {
            paused.push(schedule);
        }
    }
    Ok(paused)
}

/// Pauses (`paused`) or resumes schedule `name`.
async fn set_paused(
    state: &crate::State,
    auth: &BearerAuth,
    name: &str,
    paused: bool,
) -> Result<Json<Schedule>, ApiError> {
    let caller = auth.allow(
        Permission::SchedulesManage,
        AuditAction::ScheduleUpdate,
        Some(resource(name)),
    )?;
    let stored = existing(state, name).await?;
    may_change(auth, caller, &stored.value)?;
    if !paused {
        owner_may_run(state, &stored.value).await?;
    }
    let now = Timestamp::now();
    let written = state
        .mesh
        .schedules
        .modify_from(name, Some(stored), |current| {
            let Some(current) = current else {
                return Change::Stop(Some(gone(name)));
            };
            let mut record = current.value.clone();
            record.definition.paused = paused;
            moved_on(&mut record, &current.value, now);
            Change::Write(record)
        })
        .await;
    let record = written_or_refused(written, name)?;
    arm(state, &record, now).await;
    auth.detail(match (paused, record.next) {
        (true, _) => "paused".to_owned(),
        (false, Some(next)) => format!("resumed, next tick {next}"),
        (false, None) => "resumed, no tick to come".to_owned(),
    });
    Ok(Json(view(caller, record)))
}

/// What the audit record says of a schedule: when it ticks and what program it runs, never
/// the job's arguments, environment or input.
fn describe(record: &ScheduleRecord) -> String {
    let definition = &record.definition;
    let when = match (&definition.cron, &definition.every) {
        (Some(cron), _) => format!("cron `{cron}` in {}", definition.timezone),
        (None, Some(every)) => format!("every {every}"),
        (None, None) => "never".to_owned(),
    };
    // The program, not its arguments or a command line, which may carry a credential.
    let program = match &record.job.program {
        capstan_protocol::Program::Shell(_) => "sh -c …".to_owned(),
        capstan_protocol::Program::Argv(argv) => argv.first().cloned().unwrap_or_default(),
    };
    format!(
        "{when}, overlap {}, catchup {}{}, runs `{program}`",
        wire_name(definition.overlap),
        wire_name(definition.catchup),
        if definition.paused { ", paused" } else { "" },
    )
}

/// A unit variant's name as the protocol spells it (`cancel_previous`).
fn wire_name(value: impl serde::Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        _ => String::new(),
    }
}

/// A request body read with the protocol's decoder, as `POST /api/v1/jobs` reads a job (a type
/// error names its field, `job.timeout` included: `400`), documented as `T::Document`.
pub(crate) struct ScheduleBody<T>(pub T);

/// A body [`ScheduleBody`] reads, and the object documenting it.
pub(crate) trait Documented: DeserializeOwned + Send {
    /// The documented object.
    type Document: Type;
    /// What the body is.
    const DESCRIPTION: &'static str;
}

impl Documented for ScheduleInputWire {
    type Document = ScheduleInput;
    const DESCRIPTION: &'static str = "The schedule to create.";
}

impl Documented for SchedulePatchWire {
    type Document = SchedulePatch;
    const DESCRIPTION: &'static str = "The fields to change.";
}

fn is_json(content_type: &str) -> bool {
    matches!(content_type.parse::<mime::Mime>(), Ok(mime)
        if mime.type_() == "application"
            && (mime.subtype() == "json" || mime.suffix().is_some_and(|s| s == "json")))
}

impl<'a, T: Documented> ApiExtractor<'a> for ScheduleBody<T> {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::RequestObject];

    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        T::Document::register(registry);
    }

    fn request_meta() -> Option<MetaRequest> {
        Some(MetaRequest {
            description: Some(T::DESCRIPTION),
            content: vec![MetaMediaType {
                content_type: "application/json",
                schema: T::Document::schema_ref(),
            }],
            required: true,
        })
    }

    async fn from_request(
        request: &'a Request,
        body: &mut RequestBody,
        _options: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        match request.content_type() {
            Some(content_type) if is_json(content_type) => {
                let bytes = <Vec<u8> as FromRequest>::from_request(request, body).await?;
                codec::decode::<T>(Encoding::Json, &bytes)
                    .map(ScheduleBody)
                    .map_err(|error| {
                        let detail = error.to_string();
                        let problem = match error.code {
                            RejectionCode::Malformed => ApiError::bad_request(detail, None),
                            _ => ApiError::bad_request(detail, error.field.as_deref()),
                        };
                        poem::Error::from_response(problem.into_response())
                    })
            }
            Some(content_type) => Err(poem_openapi::error::ContentTypeError::NotSupported {
                content_type: content_type.to_owned(),
            }
            .into()),
            None => Err(poem_openapi::error::ContentTypeError::ExpectContentType.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use capstan_protocol::auth::AuthMethod;
    use capstan_protocol::schedule::{Catchup, Overlap};

    use super::*;

    fn record(paused: bool) -> ScheduleRecord {
        let job: JobSpec =
            codec::decode_spec(Encoding::Json, br#"{"argv": ["/bin/true"]}"#).expect("a job");
        let anchor = Timestamp::parse_rfc3339("2030-01-01T00:00:00Z").expect("a time");
        let mut record = ScheduleRecord::new(
            "nightly".into(),
            ScheduleDefinition {
                cron: None,
                every: Some("10s".into()),
                timezone: "UTC".into(),
                overlap: Overlap::Skip,
                catchup: Catchup::Last,
                paused,
            },
            job,
            capstan_protocol::SubmittedBy {
                principal: "olivia".into(),
                via: AuthMethod::Password,
                token: None,
            },
            anchor,
        );
        record.next = None;
        record.queued = Some(anchor);
        record
    }

    #[test]
    fn a_change_moves_to_a_newer_generation_and_counts_the_next_tick_from_now() {
        let before = record(false);
        let now = before.anchor.plus(std::time::Duration::from_millis(12_500));
        let mut changed = before.clone();
        moved_on(&mut changed, &before, now);
        assert_eq!(changed.generation, millis(now));
        assert_eq!(
            changed.next,
            Some(before.anchor.plus(std::time::Duration::from_secs(20)))
        );
        assert_eq!(changed.queued, None, "a waiting tick is dropped");
        // A clock behind the last generation still moves it forward.
        let mut again = changed.clone();
        moved_on(&mut again, &changed, before.anchor);
        assert_eq!(again.generation, changed.generation + 1);
        // Paused: no next tick, and nothing to arm.
        let mut paused = changed.clone();
        paused.definition.paused = true;
        moved_on(&mut paused, &changed, now);
        assert_eq!((paused.next, paused.armed(now)), (None, None));
    }

    #[test]
    fn a_problem_about_a_job_names_the_schedules_job_field() {
        let ApiError::Invalid(problem) =
            in_job(ApiError::invalid("no", Some("argv[0]".to_owned())))
        else {
            panic!("still a 422");
        };
        assert_eq!(problem.0.field.as_deref(), Some("job.argv[0]"));
        let ApiError::NotFound(problem) = in_job(ApiError::not_found("none")) else {
            panic!("still a 404");
        };
        assert_eq!(problem.0.field, None);
    }

    #[test]
    fn a_job_with_the_most_metadata_is_refused_for_the_entries_each_run_adds() {
        let mut full = record(false);
        let limit = capstan_protocol::spec::limits::MAX_METADATA;
        full.job.metadata = (0..limit).map(|n| (format!("k{n}"), "v".into())).collect();
        let ApiError::Invalid(problem) =
            checked_run(&full, full.anchor).expect_err("too much metadata")
        else {
            panic!("a 422");
        };
        assert_eq!(problem.0.field.as_deref(), Some("job.metadata"));
        full.job.metadata.clear();
        checked_run(&full, full.anchor).expect("a run of a plain job is valid");
    }
}
