//! Reading history: one job, a filtered page of jobs (newest first, keyset pagination), a
//! job's attempts and events, counts by status.

use capstan_protocol::{JobId, JobStatus, Timestamp};
use sea_orm::sea_query::{Expr, ExprTrait, Query};
use sea_orm::{
    ColumnTrait, Condition, DatabaseConnection, DbErr, EntityTrait, FromQueryResult, QueryFilter,
    QueryOrder, QuerySelect,
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
    let mut condition = Condition::all();
    if let Some(status) = query.status {
        condition = condition.add(job::Column::Status.eq(status.as_str()));
    }
    if let Some(name) = &query.name {
        condition = condition.add(job::Column::Name.eq(name.as_str()));
    }
    if let Some(node) = &query.node {
        condition = condition.add(job::Column::Node.eq(node.as_str()));
    }
    // A correlated EXISTS: each candidate row (already narrowed and ordered by an index) is
    // checked with one primary-key lookup, instead of materialising every job that carries
    // the label, which for a common label is most of the table.
    for (key, value) in &query.labels {
        condition = condition.add(Expr::exists(
            Query::select()
                .expr(Expr::val(1))
                .from(job_label::Entity)
                .and_where(
                    Expr::col((job_label::Entity, job_label::Column::JobId))
                        .equals((job::Entity, job::Column::Id)),
                )
                .and_where(Expr::col((job_label::Entity, job_label::Column::Key)).eq(key.as_str()))
                .and_where(
                    Expr::col((job_label::Entity, job_label::Column::Value)).eq(value.as_str()),
                )
                .to_owned(),
        ));
    }
    if let Some(since) = query.since {
        condition = condition.add(job::Column::Id.gte(id_at(since)));
    }
    if let Some(until) = query.until {
        condition = condition.add(job::Column::Id.lt(id_at(until)));
    }
    if let Some(before) = query.before {
        condition = condition.add(job::Column::Id.lt(before.to_string()));
    }
    job::Entity::find()
        .filter(condition)
        .order_by_desc(job::Column::Id)
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
