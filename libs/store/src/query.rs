//! Reading history: one job, a filtered page of jobs (newest first, keyset pagination), a
//! job's attempts and events, counts by status.

use capstan_protocol::{JobId, JobStatus, Timestamp};
use sea_orm::sea_query::{Alias, Expr, ExprTrait, Order, Query};
use sea_orm::{
    ColumnTrait, Condition, DatabaseConnection, DbErr, EntityTrait, FromQueryResult, JoinType,
    QueryFilter, QueryOrder, QuerySelect,
};
use ulid::Ulid;

use crate::entity::{attempt, event, job, job_label};

/// Which jobs to list.
#[derive(Debug, Clone, Default)]
pub struct JobQuery {
    /// Only jobs in this status.
    pub status: Option<JobStatus>,
    /// Only jobs with this name.
    pub name: Option<String>,
    /// Only jobs whose current attempt is on this node.
    pub node: Option<String>,
    /// Only jobs submitted by this principal.
    pub submitted_by: Option<String>,
    /// Only runs of this schedule.
    pub schedule: Option<String>,
    /// Only jobs whose selector has all these labels.
    pub labels: Vec<(String, String)>,
    /// Only jobs submitted at or after this time.
    pub since: Option<Timestamp>,
    /// Only jobs submitted before this time.
    pub until: Option<Timestamp>,
    /// Only jobs older than this one (the cursor: the last id of the previous page).
    pub before: Option<JobId>,
    /// Page size.
    pub limit: u64,
}

fn id_at(at: Timestamp) -> String {
    let millis = u64::try_from(at.as_millis()).unwrap_or(0);
    Ulid::from_parts(millis, 0).to_string()
}

/// A page of jobs, newest first. Ids are ULIDs, so ordering by id orders by submission time,
/// and a page that starts below the previous page's last id is stable however many jobs are
/// added meanwhile.
pub async fn list(db: &DatabaseConnection, query: &JobQuery) -> Result<Vec<job::Model>, DbErr> {
    // With a label, the labels table drives: its `key, value, status, job_id` index (or
    // `key, value, job_id` without a status) yields exactly the matching jobs, newest first,
    // however rare or common they are. Otherwise the jobs table does, through the index its
    // filter column leads.
    let mut condition = Condition::all();
    let mut select = job::Entity::find();
    let (id_column, other_labels) = match query.labels.split_first() {
        Some(((key, value), others)) => {
            select = select.join(
                JoinType::InnerJoin,
                job::Entity::belongs_to(job_label::Entity)
                    .from(job::Column::Id)
                    .to(job_label::Column::JobId)
                    .into(),
            );
            condition = condition
                .add(job_label::Column::Key.eq(key.as_str()))
                .add(job_label::Column::Value.eq(value.as_str()));
            if let Some(status) = query.status {
                condition = condition.add(job_label::Column::Status.eq(status.as_str()));
            }
            (
                Expr::col((job_label::Entity, job_label::Column::JobId)),
                others,
            )
        }
        None => {
            if let Some(status) = query.status {
                condition = condition.add(job::Column::Status.eq(status.as_str()));
            }
            (Expr::col((job::Entity, job::Column::Id)), &[][..])
        }
    };
    if let Some(name) = &query.name {
        condition = condition.add(job::Column::Name.eq(name.as_str()));
    }
    if let Some(node) = &query.node {
        condition = condition.add(job::Column::Node.eq(node.as_str()));
    }
    if let Some(submitted_by) = &query.submitted_by {
        condition = condition.add(job::Column::SubmittedBy.eq(submitted_by.as_str()));
    }
    if let Some(schedule) = &query.schedule {
        condition = condition.add(job::Column::Schedule.eq(schedule.as_str()));
    }
    // Further labels: a correlated EXISTS, one primary-key probe per candidate row.
    for (key, value) in other_labels {
        condition = condition.add(Expr::exists(
            Query::select()
                .expr(Expr::val(1))
                .from_as(job_label::Entity, Alias::new("other"))
                .and_where(
                    Expr::col((Alias::new("other"), job_label::Column::JobId))
                        .equals((job::Entity, job::Column::Id)),
                )
                .and_where(
                    Expr::col((Alias::new("other"), job_label::Column::Key)).eq(key.as_str()),
                )
                .and_where(
                    Expr::col((Alias::new("other"), job_label::Column::Value)).eq(value.as_str()),
                )
                .to_owned(),
        ));
    }
    if let Some(since) = query.since {
        condition = condition.add(id_column.clone().gte(id_at(since)));
    }
    if let Some(until) = query.until {
        condition = condition.add(id_column.clone().lt(id_at(until)));
    }
    if let Some(before) = query.before {
        condition = condition.add(id_column.clone().lt(before.to_string()));
    }
    select
        .filter(condition)
        .order_by(id_column, Order::Desc)
        .limit(query.limit)
        .all(db)
        .await
}

/// One job's row.
pub async fn get(db: &DatabaseConnection, id: JobId) -> Result<Option<job::Model>, DbErr> {
    job::Entity::find_by_id(id.to_string()).one(db).await
}

/// A job's attempts, first to last.
pub async fn attempts(db: &DatabaseConnection, id: JobId) -> Result<Vec<attempt::Model>, DbErr> {
    attempt::Entity::find()
        .filter(attempt::Column::JobId.eq(id.to_string()))
        .order_by_asc(attempt::Column::Attempt)
        .all(db)
        .await
}

/// A job's events, in the order they happened.
pub async fn events(db: &DatabaseConnection, id: JobId) -> Result<Vec<event::Model>, DbErr> {
    event::Entity::find()
        .filter(event::Column::JobId.eq(id.to_string()))
        .order_by_asc(event::Column::Seq)
        .all(db)
        .await
}

#[derive(Debug, FromQueryResult)]
struct StatusCount {
    status: String,
    count: i64,
}

/// How many jobs are in each status.
pub async fn status_counts(db: &DatabaseConnection) -> Result<Vec<(String, i64)>, DbErr> {
    let rows = job::Entity::find()
        .select_only()
        .column(job::Column::Status)
        .column_as(job::Column::Id.count(), "count")
        .group_by(job::Column::Status)
        .into_model::<StatusCount>()
        .all(db)
        .await?;
    Ok(rows.into_iter().map(|r| (r.status, r.count)).collect())
}
