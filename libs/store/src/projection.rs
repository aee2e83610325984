//! Projecting job events into the tables.
//!
//! Applying is idempotent and order-tolerant: an event row is keyed by its stream sequence
//! (inserted once), and a job or attempt row is overwritten only by an event later in the
//! job's life than the one already applied to it. Later means a higher attempt; within one
//! attempt, waiting, then running, then ended; and only then a higher stream sequence. The
//! stream's order alone is not enough: an executor may announce `running` after a scheduler
//! already declared that attempt lost. So several API replicas may apply batches concurrently,
//! a batch may be applied twice after a redelivery, and a replayed stream rebuilds the same
//! rows. A job's label rows copy the job row's status after each batch.

use std::collections::HashMap;

use capstan_protocol::{JobEvent, JobId, JobStatus};
use sea_orm::sea_query::{Alias, Expr, ExprTrait, OnConflict};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, DbErr, EntityTrait, IntoActiveModel,
    QueryFilter, TransactionTrait,
};

use crate::entity::{attempt, event, job, job_label};

/// Rows per INSERT statement: well under every backend's parameter limit.
const CHUNK: usize = 200;

/// An event and its sequence in the events stream.
#[derive(Debug, Clone)]
pub struct Sequenced {
    /// Stream sequence.
    pub seq: u64,
    /// The event.
    pub event: JobEvent,
}

fn seq_of(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn job_row(item: &Sequenced) -> job::ActiveModel {
    let record = &item.event.record;
    let mut spec = capstan_protocol::spec::JobSpecWire::from(record.spec.clone());
    spec.stdin = None;
    // The names of its secrets, not their sealed values: nothing opens a secret from the
    // history, and a retired key then leaves nothing behind here.
    for sealed in spec
        .secrets
        .iter_mut()
        .flat_map(|secrets| secrets.values_mut())
    {
        sealed.clear();
    }
    let output = record.output;
    job::ActiveModel {
        id: Set(record.id.to_string()),
        name: Set(record.spec.name.clone()),
        status: Set(record.status.as_str().to_owned()),
        attempt: Set(i32::try_from(record.attempt).unwrap_or(i32::MAX)),
        node: Set(record.node.as_ref().map(ToString::to_string)),
        spec: Set(serde_json::to_string(&spec).unwrap_or_else(|_| "{}".to_owned())),
        created_at: Set(record.created_at.as_millis()),
        updated_at: Set(record.updated_at.as_millis()),
        dispatched_at: Set(record.dispatched_at.map(|t| t.as_millis())),
        started_at: Set(record.started_at.map(|t| t.as_millis())),
        finished_at: Set(record.finished_at.map(|t| t.as_millis())),
        exit_code: Set(record.exit_code),
        signal: Set(record.signal),
        error: Set(record.error.clone()),
        stdout_bytes: Set(output.map(|o| i64::try_from(o.stdout_bytes).unwrap_or(i64::MAX))),
        stderr_bytes: Set(output.map(|o| i64::try_from(o.stderr_bytes).unwrap_or(i64::MAX))),
        truncated: Set(output.map(|o| o.truncated)),
        last_seq: Set(seq_of(item.seq)),
        submitted_by: Set(record.submitted_by.as_ref().map(|by| by.principal.clone())),
        submitted_via: Set(record
            .submitted_by
            .as_ref()
            .map(|by| by.via.as_str().to_owned())),
        submitted_token: Set(record.submitted_by.as_ref().and_then(|by| by.token.clone())),
        schedule: Set(schedule_of(&record.spec)),
    }
}

/// The schedule a job is a run of, from its metadata. Anyone may write the entry into a job
/// they submit; only a value that can name a schedule is kept (it fits the column).
fn schedule_of(spec: &capstan_protocol::JobSpec) -> Option<String> {
    use capstan_protocol::schedule;
    schedule::schedule_of(&spec.metadata)
        .filter(|name| schedule::validate_name(name).is_ok())
        .map(str::to_owned)
}

fn attempt_row(item: &Sequenced) -> attempt::ActiveModel {
    let record = &item.event.record;
    let output = record.output;
    // While the job waits to retry, the attempt row keeps how the attempt itself ended.
    let (status, finished_at) = match record.status {
        JobStatus::Retrying => (
            record.attempt_status.unwrap_or(JobStatus::Failed),
            Some(record.updated_at),
        ),
        status => (status, record.finished_at),
    };
    attempt::ActiveModel {
        job_id: Set(record.id.to_string()),
        attempt: Set(i32::try_from(record.attempt).unwrap_or(i32::MAX)),
        node: Set(record.node.as_ref().map(ToString::to_string)),
        instance: Set(record.instance.map(|i| i.to_string())),
        status: Set(status.as_str().to_owned()),
        dispatched_at: Set(record.dispatched_at.map(|t| t.as_millis())),
        started_at: Set(record.started_at.map(|t| t.as_millis())),
        finished_at: Set(finished_at.map(|t| t.as_millis())),
        exit_code: Set(record.exit_code),
        signal: Set(record.signal),
        error: Set(record.error.clone()),
        stdout_bytes: Set(output.map(|o| i64::try_from(o.stdout_bytes).unwrap_or(i64::MAX))),
        stderr_bytes: Set(output.map(|o| i64::try_from(o.stderr_bytes).unwrap_or(i64::MAX))),
        truncated: Set(output.map(|o| o.truncated)),
        last_seq: Set(seq_of(item.seq)),
    }
}

impl Sequenced {
    /// The event as the history's `events` table holds it.
    pub fn event_model(&self) -> event::Model {
        let record = &self.event.record;
        event::Model {
            seq: seq_of(self.seq),
            job_id: record.id.to_string(),
            kind: self.event.kind.as_str().to_owned(),
            status: record.status.as_str().to_owned(),
            attempt: i32::try_from(record.attempt).unwrap_or(i32::MAX),
            node: record.node.as_ref().map(ToString::to_string),
            at: self.event.at.as_millis(),
            exit_code: record.exit_code,
            error: record.error.clone(),
        }
    }
}

fn event_row(item: &Sequenced) -> event::ActiveModel {
    // Every column is written: `reset_all` marks the model's values as set.
    item.event_model().into_active_model().reset_all()
}

/// Where `status` stands within one attempt: waiting, running, ended.
fn stage(status: JobStatus) -> u8 {
    match status {
        JobStatus::Scheduled | JobStatus::Pending => 0,
        JobStatus::Running => 1,
        _ => 2,
    }
}

/// An event's place in its job's life (see the module documentation).
fn place(item: &Sequenced) -> (u32, u8, u64) {
    let record = &item.event.record;
    (record.attempt, stage(record.status), item.seq)
}

/// [`stage`] in SQL, of the status in `status`.
fn stage_sql(status: Expr) -> Expr {
    let waiting = [JobStatus::Scheduled.as_str(), JobStatus::Pending.as_str()];
    Expr::case(status.clone().is_in(waiting), 0)
        .case(status.eq(JobStatus::Running.as_str()), 1)
        .finally(2)
        .into()
}

/// The row's conflict condition: the incoming row (`excluded`) is later in the job's life than
/// the stored one, by [`place`].
fn later_only<E>(entity: E, attempt: E::Column, status: E::Column, seq: E::Column) -> Expr
where
    E: EntityTrait + Copy,
    E::Column: Copy,
{
    let stored = |column: E::Column| Expr::col((entity, column));
    let incoming = |column: E::Column| Expr::col((Alias::new("excluded"), column));
    let same_attempt = incoming(attempt).eq(stored(attempt));
    let (new_stage, old_stage) = (stage_sql(incoming(status)), stage_sql(stored(status)));
    incoming(attempt)
        .gt(stored(attempt))
        .or(same_attempt
            .clone()
            .and(new_stage.clone().gt(old_stage.clone())))
        .or(same_attempt
            .and(new_stage.eq(old_stage))
            .and(incoming(seq).gt(stored(seq))))
}

/// Applies `batch` in one transaction.
pub async fn apply(db: &sea_orm::DatabaseConnection, batch: &[Sequenced]) -> Result<(), DbErr> {
    if batch.is_empty() {
        return Ok(());
    }
    // Within one statement a row may be written only once, so keep the latest event of each
    // job and of each attempt; the earlier ones only add event rows.
    let mut jobs: HashMap<JobId, &Sequenced> = HashMap::new();
    let mut attempts: HashMap<(JobId, u32), &Sequenced> = HashMap::new();
    for item in batch {
        let record = &item.event.record;
        let latest = jobs.entry(record.id).or_insert(item);
        if place(latest) < place(item) {
            *latest = item;
        }
        if record.attempt > 0 {
            let latest = attempts.entry((record.id, record.attempt)).or_insert(item);
            if place(latest) < place(item) {
                *latest = item;
            }
        }
    }

    let txn = db.begin().await?;
    for chunk in batch.chunks(CHUNK) {
        event::Entity::insert_many(chunk.iter().map(event_row))
            .on_conflict(
                OnConflict::column(event::Column::Seq)
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(&txn)
            .await?;
    }
    let jobs: Vec<&Sequenced> = jobs.into_values().collect();
    for chunk in jobs.chunks(CHUNK) {
        job::Entity::insert_many(chunk.iter().map(|item| job_row(item)))
            .on_conflict(
                OnConflict::column(job::Column::Id)
                    .update_columns([
                        job::Column::Status,
                        job::Column::Attempt,
                        job::Column::Node,
                        job::Column::UpdatedAt,
                        job::Column::DispatchedAt,
                        job::Column::StartedAt,
                        job::Column::FinishedAt,
                        job::Column::ExitCode,
                        job::Column::Signal,
                        job::Column::Error,
                        job::Column::StdoutBytes,
                        job::Column::StderrBytes,
                        job::Column::Truncated,
                        job::Column::LastSeq,
                    ])
                    .action_and_where(later_only(
                        job::Entity,
                        job::Column::Attempt,
                        job::Column::Status,
                        job::Column::LastSeq,
                    ))
                    .to_owned(),
            )
            .exec_without_returning(&txn)
            .await?;
        let labels: Vec<job_label::ActiveModel> = chunk
            .iter()
            .flat_map(|item| {
                let id = item.event.record.id.to_string();
                item.event
                    .record
                    .spec
                    .labels
                    .iter()
                    .map(move |(key, value)| job_label::ActiveModel {
                        job_id: Set(id.clone()),
                        key: Set(key.clone()),
                        value: Set(value.clone()),
                        status: Set(item.event.record.status.as_str().to_owned()),
                        last_seq: Set(seq_of(item.seq)),
                    })
            })
            .collect();
        for labels in labels.chunks(CHUNK) {
            job_label::Entity::insert_many(labels.to_vec())
                .on_conflict(
                    OnConflict::columns([job_label::Column::JobId, job_label::Column::Key])
                        .do_nothing()
                        .to_owned(),
                )
                .exec_without_returning(&txn)
                .await?;
        }
        // The labels carry their job's status: copied from the job row just written.
        let ids: Vec<String> = chunk
            .iter()
            .filter(|item| !item.event.record.spec.labels.is_empty())
            .map(|item| item.event.record.id.to_string())
            .collect();
        if !ids.is_empty() {
            job_label::Entity::update_many()
                .col_expr(
                    job_label::Column::Status,
                    Expr::cust("(SELECT jobs.status FROM jobs WHERE jobs.id = job_labels.job_id)"),
                )
                .col_expr(
                    job_label::Column::LastSeq,
                    Expr::cust(
                        "(SELECT jobs.last_seq FROM jobs WHERE jobs.id = job_labels.job_id)",
                    ),
                )
                .filter(job_label::Column::JobId.is_in(ids))
                .exec(&txn)
                .await?;
        }
    }
    let attempts: Vec<&Sequenced> = attempts.into_values().collect();
    for chunk in attempts.chunks(CHUNK) {
        attempt::Entity::insert_many(chunk.iter().map(|item| attempt_row(item)))
            .on_conflict(
                OnConflict::columns([attempt::Column::JobId, attempt::Column::Attempt])
                    .update_columns([
                        attempt::Column::Node,
                        attempt::Column::Instance,
                        attempt::Column::Status,
                        attempt::Column::DispatchedAt,
                        attempt::Column::StartedAt,
                        attempt::Column::FinishedAt,
                        attempt::Column::ExitCode,
                        attempt::Column::Signal,
                        attempt::Column::Error,
                        attempt::Column::StdoutBytes,
                        attempt::Column::StderrBytes,
                        attempt::Column::Truncated,
                        attempt::Column::LastSeq,
                    ])
                    .action_and_where(later_only(
                        attempt::Entity,
                        attempt::Column::Attempt,
                        attempt::Column::Status,
                        attempt::Column::LastSeq,
                    ))
                    .to_owned(),
            )
            .exec_without_returning(&txn)
            .await?;
    }
    txn.commit().await
}
