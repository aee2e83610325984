//! `events`: every job event, keyed by its sequence in the events stream.

use sea_orm::entity::prelude::*;

/// One event.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "events")]
pub struct Model {
    /// Sequence in the events stream: unique, and the order events happened in.
    #[sea_orm(primary_key, auto_increment = false)]
    pub seq: i64,
    /// The job.
    pub job_id: String,
    /// Event kind.
    pub kind: String,
    /// Job status after the event.
    pub status: String,
    /// Attempt.
    pub attempt: i32,
    /// Node.
    pub node: Option<String>,
    /// When it happened.
    pub at: i64,
    /// Exit code, for ends.
    pub exit_code: Option<i32>,
    /// Error, for failures.
    #[sea_orm(column_type = "Text", nullable)]
    pub error: Option<String>,
}

/// No relations are navigated through sea-orm.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
