//! `job_labels`: a job's label selector, one row per label, for filtering by label (and by
//! label and status together).

use sea_orm::entity::prelude::*;

/// One label of one job.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "job_labels")]
pub struct Model {
    /// The job.
    #[sea_orm(primary_key, auto_increment = false)]
    pub job_id: String,
    /// Label key.
    #[sea_orm(primary_key, auto_increment = false)]
    pub key: String,
    /// Label value.
    pub value: String,
    /// The job's current status, kept with each label so that a status-and-label filter is
    /// one index range scan (`key, value, status, job_id`).
    pub status: String,
    /// Stream sequence of the event that last set `status`.
    pub last_seq: i64,
}

/// No relations are navigated through sea-orm.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
