//! `users`: the people who log in with a password, with their role and state.

use sea_orm::entity::prelude::*;

/// A user's row. The password is kept only as its Argon2id hash (PHC string).
#[derive(Clone, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "users")]
pub struct Model {
    /// The user name: unique, the principal's name in tokens, jobs and audit records.
    #[sea_orm(primary_key, auto_increment = false)]
    pub name: String,
    /// The role's name.
    pub role: String,
    /// The Argon2id hash of the password (PHC string format).
    #[sea_orm(column_type = "Text")]
    pub password_hash: String,
    /// A disabled user cannot log in, refresh, or use an access or API token.
    pub disabled: bool,
    /// Created at.
    pub created_at: i64,
    /// Last changed at (role, state, password).
    pub updated_at: i64,
}

// NOTE: by hand, so that a row printed in a log or a panic never shows the password hash.
impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("disabled", &self.disabled)
            .finish_non_exhaustive()
    }
}

/// No relations are navigated through sea-orm.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
