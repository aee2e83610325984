//! `jobs`: one row per job, its latest known state.

use sea_orm::entity::prelude::*;

/// A job's row.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "jobs")]
pub struct Model {
    /// Job id (ULID text); ordering by it orders by submission time.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// The job's name.
    pub name: Option<String>,
    /// Current status.
    pub status: String,
    /// Current attempt.
    pub attempt: i32,
    /// Node of the current attempt.
    pub node: Option<String>,
    /// The spec as JSON, without `stdin` (payloads are not kept in history).
    #[sea_orm(column_type = "Text")]
    pub spec: String,
    /// Accepted at.
    pub created_at: i64,
    /// Last change.
    pub updated_at: i64,
    /// Current attempt dispatched at.
    pub dispatched_at: Option<i64>,
    /// Current attempt started at.
    pub started_at: Option<i64>,
    /// Finished at.
    pub finished_at: Option<i64>,
    /// Exit code of the last attempt.
    pub exit_code: Option<i32>,
    /// Signal that killed the last attempt.
    pub signal: Option<i32>,
    /// Why it failed.
    #[sea_orm(column_type = "Text", nullable)]
    pub error: Option<String>,
    /// Bytes of standard output.
    pub stdout_bytes: Option<i64>,
    /// Bytes of standard error.
    pub stderr_bytes: Option<i64>,
    /// Output was truncated.
    pub truncated: Option<bool>,
    /// Stream sequence of the newest event applied to this row.
    pub last_seq: i64,
    /// Who submitted it (the principal's name).
    pub submitted_by: Option<String>,
    /// How the submitter authenticated.
    pub submitted_via: Option<String>,
    /// The API token the submitter used, by name.
    pub submitted_token: Option<String>,
    /// The schedule it is a run of (`capstan.io/schedule` in its metadata, when that is a
    /// schedule's name).
    pub schedule: Option<String>,
}

/// No relations are navigated through sea-orm.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
