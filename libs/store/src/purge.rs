//! Removing finished jobs from the history: find a bounded batch, delete its rows from every
//! table in one transaction. The caller (the API's purge) removes the jobs' other traces (KV
//! records, events, output) between the two.

use capstan_protocol::JobStatus;
use sea_orm::{
    ColumnTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    TransactionTrait,
};

use crate::entity::{attempt, event, job, job_label};

/// The ids of at most `limit` jobs in one of `statuses` (only the terminal ones count) that
/// finished before `finished_before` (milliseconds), after the id `after`, in id order.
pub async fn finished(
    db: &DatabaseConnection,
    statuses: &[JobStatus],
    finished_before: i64,
    after: Option<&str>,
    limit: u64,
) -> Result<Vec<String>, DbErr> {
    let statuses: Vec<&str> = statuses
        .iter()
        .filter(|status| status.is_terminal())
        .map(|status| status.as_str())
        .collect();
    let mut select = job::Entity::find().select_only().column(job::Column::Id);
    if let Some(after) = after {
        select = select.filter(job::Column::Id.gt(after));
    }
    select
        .filter(job::Column::Status.is_in(statuses))
        .filter(job::Column::FinishedAt.lt(finished_before))
        .order_by_asc(job::Column::Id)
        .limit(limit)
        .into_tuple::<String>()
        .all(db)
        .await
}

/// Deletes every row of the jobs `ids`: the job, its labels, attempts and events; how many
/// jobs were deleted.
pub async fn delete(db: &DatabaseConnection, ids: &[String]) -> Result<u64, DbErr> {
    if ids.is_empty() {
        return Ok(0);
    }
    let txn = db.begin().await?;
    event::Entity::delete_many()
        .filter(event::Column::JobId.is_in(ids.iter().cloned()))
        .exec(&txn)
        .await?;
    attempt::Entity::delete_many()
        .filter(attempt::Column::JobId.is_in(ids.iter().cloned()))
        .exec(&txn)
        .await?;
    job_label::Entity::delete_many()
        .filter(job_label::Column::JobId.is_in(ids.iter().cloned()))
        .exec(&txn)
        .await?;
    let deleted = job::Entity::delete_many()
        .filter(job::Column::Id.is_in(ids.iter().cloned()))
        .exec(&txn)
        .await?
        .rows_affected;
    txn.commit().await?;
    Ok(deleted)
}
