//! `attempts`: one row per attempt (execution) of a job.

use sea_orm::entity::prelude::*;

/// One attempt.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "attempts")]
pub struct Model {
    /// The job.
    #[sea_orm(primary_key, auto_increment = false)]
    pub job_id: String,
    /// Attempt number, from 1.
    #[sea_orm(primary_key, auto_increment = false)]
    pub attempt: i32,
    /// Where it ran.
    pub node: Option<String>,
    /// The executor instance that ran it.
    pub instance: Option<String>,
    /// The attempt's status.
    pub status: String,
    /// Dispatched at.
    pub dispatched_at: Option<i64>,
    /// Started at.
    pub started_at: Option<i64>,
    /// Finished at.
    pub finished_at: Option<i64>,
    /// Exit code.
    pub exit_code: Option<i32>,
    /// Killing signal.
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
    /// Newest event applied.
    pub last_seq: i64,
}

/// No relations are navigated through sea-orm.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
