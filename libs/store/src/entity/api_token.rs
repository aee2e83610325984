//! `api_tokens`: long-lived credentials for machines, each acting for the user who made it.

use sea_orm::entity::prelude::*;

/// An API token's row. The secret is kept only as its SHA-256 digest: tokens carry 256 random
/// bits, so a fast hash is enough to make the table useless to whoever reads it.
#[derive(Clone, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "api_tokens")]
pub struct Model {
    /// The token's id (ULID text), shown in lists and used to revoke it.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// A human name.
    pub name: String,
    /// The role it grants (never more than its owner's).
    pub role: String,
    /// The user who created it and for whom it acts.
    pub owner: String,
    /// SHA-256 of the secret, in hex.
    #[sea_orm(unique)]
    pub secret_hash: String,
    /// Created at.
    pub created_at: i64,
    /// Refused from this time on, when set.
    pub expires_at: Option<i64>,
    /// Revoked at, when revoked.
    pub revoked_at: Option<i64>,
}

// NOTE: by hand, so that the digest never reaches a log.
impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiToken")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("role", &self.role)
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

/// No relations are navigated through sea-orm.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
