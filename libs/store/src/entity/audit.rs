//! `audit`: the audit trail, projected from the audit stream (and written directly by the API
//! replica that recorded it); one row per record, keyed by the record's id.

use sea_orm::entity::prelude::*;

/// One audit record (see `capstan_protocol::AuditRecord`).
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "audit")]
pub struct Model {
    /// The record's id (ULID text): ordering by it orders by time.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// When it happened.
    pub at: i64,
    /// Who, when known.
    pub principal: Option<String>,
    /// How they authenticated.
    pub via: Option<String>,
    /// The API token's name, when one was used.
    pub token: Option<String>,
    /// The action's name (`job.submit`).
    pub action: String,
    /// What it was done to.
    pub resource: Option<String>,
    /// `success`, `failure`, `denied` or `error`.
    pub outcome: String,
    /// HTTP status answered.
    pub status: Option<i32>,
    /// Client address.
    pub client: Option<String>,
    /// Request id.
    pub request_id: Option<String>,
    /// Trace id.
    pub trace_id: Option<String>,
    /// Why, or what changed.
    #[sea_orm(column_type = "Text", nullable)]
    pub detail: Option<String>,
}

/// No relations are navigated through sea-orm.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
