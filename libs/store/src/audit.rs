//! The audit table: writing records (idempotent by id, so the replica that recorded one and
//! the projection of the audit stream may both write it) and reading them newest first with
//! keyset pagination, like jobs.

use capstan_protocol::{AuditId, AuditRecord, Timestamp};
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, DatabaseConnection, DbErr, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect,
};
use ulid::Ulid;

use crate::entity::audit;

/// Rows per INSERT statement.
const CHUNK: usize = 200;

/// Which audit records to list.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Only records of this principal.
    pub principal: Option<String>,
    /// Only records of this action (`job.submit`).
    pub action: Option<String>,
    /// Only records about this resource (`job/01J…`).
    pub resource: Option<String>,
    /// Only records that ended so (`success`, `failure`, `denied`, `error`).
    pub outcome: Option<String>,
    /// Only records at or after this time.
    pub since: Option<Timestamp>,
    /// Only records before this time.
    pub until: Option<Timestamp>,
    /// Only records older than this one (the cursor).
    pub before: Option<AuditId>,
    /// Page size.
    pub limit: u64,
}

/// `text` cut to `max` characters, the width of its column: a record is stored whatever a
/// client put into it (a long path, a long header), so that one hostile request cannot make a
/// batch of records fail.
fn fit(text: &Option<String>, max: usize) -> Option<String> {
    text.as_ref().map(|text| text.chars().take(max).collect())
}

fn row(record: &AuditRecord) -> audit::ActiveModel {
    audit::ActiveModel {
        id: Set(record.id.to_string()),
        at: Set(record.at.as_millis()),
        principal: Set(fit(&record.principal, 256)),
        via: Set(record.via.map(|via| via.as_str().to_owned())),
        token: Set(fit(&record.token, 128)),
        action: Set(record.action.as_str().to_owned()),
        resource: Set(fit(&record.resource, 256)),
        outcome: Set(record.outcome.as_str().to_owned()),
        status: Set(record.status.map(i32::from)),
        client: Set(fit(&record.client, 64)),
        request_id: Set(fit(&record.request_id, 64)),
        trace_id: Set(fit(&record.trace_id, 32)),
        detail: Set(fit(&record.detail, 4096)),
    }
}

/// Writes `records`, skipping those already written.
pub async fn insert(db: &DatabaseConnection, records: &[AuditRecord]) -> Result<(), DbErr> {
    for chunk in records.chunks(CHUNK) {
        audit::Entity::insert_many(chunk.iter().map(row))
            .on_conflict(
                OnConflict::column(audit::Column::Id)
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(db)
            .await?;
    }
    Ok(())
}

fn id_at(at: Timestamp) -> String {
    Ulid::from_parts(u64::try_from(at.as_millis()).unwrap_or(0), 0).to_string()
}

/// A page of records, newest first.
pub async fn list(db: &DatabaseConnection, query: &AuditQuery) -> Result<Vec<audit::Model>, DbErr> {
    let mut condition = Condition::all();
    if let Some(principal) = &query.principal {
        condition = condition.add(audit::Column::Principal.eq(principal.as_str()));
    }
    if let Some(action) = &query.action {
        condition = condition.add(audit::Column::Action.eq(action.as_str()));
    }
    if let Some(resource) = &query.resource {
        condition = condition.add(audit::Column::Resource.eq(resource.as_str()));
    }
    if let Some(outcome) = &query.outcome {
        condition = condition.add(audit::Column::Outcome.eq(outcome.as_str()));
    }
    if let Some(since) = query.since {
        condition = condition.add(audit::Column::Id.gte(id_at(since)));
    }
    if let Some(until) = query.until {
        condition = condition.add(audit::Column::Id.lt(id_at(until)));
    }
    if let Some(before) = query.before {
        condition = condition.add(audit::Column::Id.lt(before.to_string()));
    }
    audit::Entity::find()
        .filter(condition)
        .order_by_desc(audit::Column::Id)
        .limit(query.limit)
        .all(db)
        .await
}
