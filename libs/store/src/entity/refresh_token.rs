//! `refresh_tokens`: every refresh token a session was given, by the digest of its secret.

use sea_orm::entity::prelude::*;

/// A refresh token. Each is used once: using it marks it `used_at` and gives a new one in the
/// same session; presenting it again revokes the session.
#[derive(Clone, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "refresh_tokens")]
pub struct Model {
    /// SHA-256 of the secret, in hex.
    #[sea_orm(primary_key, auto_increment = false)]
    pub secret_hash: String,
    /// The session (token family).
    pub session_id: String,
    /// Issued at.
    pub issued_at: i64,
    /// Refused from this time on.
    pub expires_at: i64,
    /// Exchanged for a new token at, once used.
    pub used_at: Option<i64>,
}

// NOTE: by hand, so that the digest never reaches a log.
impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefreshToken")
            .field("session_id", &self.session_id)
            .field("used_at", &self.used_at)
            .finish_non_exhaustive()
    }
}

/// No relations are navigated through sea-orm.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
