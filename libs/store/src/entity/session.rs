//! `sessions`: one per login, the family its rotating refresh tokens belong to.

use sea_orm::entity::prelude::*;

/// A login session.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "sessions")]
pub struct Model {
    /// The session's id (ULID text); access tokens carry it as `sid`.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// The user.
    pub username: String,
    /// Logged in at.
    pub created_at: i64,
    /// Revoked at (logout, refresh-token reuse, user disabled), when revoked.
    pub revoked_at: Option<i64>,
    /// Why it was revoked.
    pub revoked_reason: Option<String>,
}

/// No relations are navigated through sea-orm.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
