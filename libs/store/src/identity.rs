//! Users, login sessions with their rotating refresh tokens, and API tokens, as rows.
//!
//! This module stores and answers; it decides nothing about who may do what (the API does),
//! and it never sees a password or a token in clear: callers pass the Argon2id hash of a
//! password and the SHA-256 digest of a token's secret.
//!
//! The one rule kept here is the refresh token's single use, because it must be atomic: a
//! refresh token is marked used by a conditional UPDATE, so of two requests presenting it only
//! one rotates it, and the other is told the token was already used.

use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait,
    PaginatorTrait, QueryFilter, QueryOrder, TransactionTrait,
};

use crate::entity::{api_token, refresh_token, session, user};

/// Changes to a user; `None` leaves a field as it is.
#[derive(Debug, Default, Clone)]
pub struct UserChanges {
    /// A new role.
    pub role: Option<String>,
    /// Disable or enable.
    pub disabled: Option<bool>,
    /// A new password hash.
    pub password_hash: Option<String>,
}

/// What presenting a refresh token did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rotation {
    /// It was valid and is now used; the new token is stored in the same session.
    Rotated {
        /// The session.
        session: String,
        /// Its user.
        username: String,
    },
    /// It had been used before: the session is now revoked.
    Reused {
        /// The revoked session.
        session: String,
        /// Its user.
        username: String,
    },
    /// Its session was revoked before.
    Revoked,
    /// It expired.
    Expired,
    /// No such token.
    Unknown,
}

/// The user named `name`.
pub async fn user(db: &DatabaseConnection, name: &str) -> Result<Option<user::Model>, DbErr> {
    user::Entity::find_by_id(name.to_owned()).one(db).await
}

/// Every user, by name.
pub async fn users(db: &DatabaseConnection) -> Result<Vec<user::Model>, DbErr> {
    user::Entity::find()
        .order_by_asc(user::Column::Name)
        .all(db)
        .await
}

/// True when no user exists yet.
pub async fn no_users(db: &DatabaseConnection) -> Result<bool, DbErr> {
    Ok(user::Entity::find().count(db).await? == 0)
}

/// Creates `row` unless a user of that name exists; true if created. Two replicas creating the
/// same user at once: exactly one gets true.
pub async fn create_user(db: &DatabaseConnection, row: user::Model) -> Result<bool, DbErr> {
    let model = user::ActiveModel {
        name: Set(row.name),
        role: Set(row.role),
        password_hash: Set(row.password_hash),
        disabled: Set(row.disabled),
        created_at: Set(row.created_at),
        updated_at: Set(row.updated_at),
    };
    let inserted = user::Entity::insert(model)
        .on_conflict(
            OnConflict::column(user::Column::Name)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(db)
        .await?;
    Ok(inserted == 1)
}

/// Applies `changes` to `name`; the user as it is now, or `None` if there is no such user.
pub async fn update_user(
    db: &DatabaseConnection,
    name: &str,
    changes: UserChanges,
    now: i64,
) -> Result<Option<user::Model>, DbErr> {
    if !update_user_in(db, name, changes, now).await? {
        return Ok(None);
    }
    user(db, name).await
}

/// Applies `changes` to `name`; true if there is such a user.
async fn update_user_in(
    db: &impl ConnectionTrait,
    name: &str,
    changes: UserChanges,
    now: i64,
) -> Result<bool, DbErr> {
    let mut update = user::Entity::update_many()
        .col_expr(user::Column::UpdatedAt, Expr::value(now))
        .filter(user::Column::Name.eq(name));
    if let Some(role) = changes.role {
        update = update.col_expr(user::Column::Role, Expr::value(role));
    }
    if let Some(disabled) = changes.disabled {
        update = update.col_expr(user::Column::Disabled, Expr::value(disabled));
    }
    if let Some(hash) = changes.password_hash {
        update = update.col_expr(user::Column::PasswordHash, Expr::value(hash));
    }
    Ok(update.exec(db).await?.rows_affected == 1)
}

/// Deletes `name`; true if it existed.
pub async fn delete_user(db: &DatabaseConnection, name: &str) -> Result<bool, DbErr> {
    Ok(user::Entity::delete_by_id(name.to_owned())
        .exec(db)
        .await?
        .rows_affected
        == 1)
}

/// What a change that could remove the last administrator did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kept {
    /// Done; the user as it is now (`None` once deleted, or if there was no such user).
    Done(Option<user::Model>),
    /// Refused: no enabled user would hold `admin_role` after it.
    LastAdmin,
}

/// Applies `changes` to `name` (or deletes it, when `changes` is `None`) unless that leaves no
/// enabled user holding `admin_role`. Two such changes racing each other cannot both pass: on
/// PostgreSQL the enabled administrators' rows are locked first; SQLite lets one writer at a
/// time in, and the change comes before the count.
pub async fn change_keeping_an_admin(
    db: &DatabaseConnection,
    name: &str,
    changes: Option<UserChanges>,
    admin_role: &str,
    now: i64,
) -> Result<Kept, DbErr> {
    use sea_orm::{DatabaseBackend, QuerySelect};
    let txn = db.begin().await?;
    if db.get_database_backend() == DatabaseBackend::Postgres {
        user::Entity::find()
            .filter(user::Column::Role.eq(admin_role))
            .filter(user::Column::Disabled.eq(false))
            .lock_exclusive()
            .all(&txn)
            .await?;
    }
    let changed = match changes {
        Some(changes) => update_user_in(&txn, name, changes, now).await?,
        None => {
            user::Entity::delete_by_id(name.to_owned())
                .exec(&txn)
                .await?
                .rows_affected
                == 1
        }
    };
    let remaining = user::Entity::find()
        .filter(user::Column::Role.eq(admin_role))
        .filter(user::Column::Disabled.eq(false))
        .count(&txn)
        .await?;
    if changed && remaining == 0 {
        txn.rollback().await?;
        return Ok(Kept::LastAdmin);
    }
    let current = user::Entity::find_by_id(name.to_owned()).one(&txn).await?;
    txn.commit().await?;
    Ok(Kept::Done(current))
}

/// Starts a session for `username` with its first refresh token.
pub async fn start_session(
    db: &DatabaseConnection,
    session_id: &str,
    username: &str,
    secret_hash: &str,
    now: i64,
    expires_at: i64,
) -> Result<(), DbErr> {
    let txn = db.begin().await?;
    session::Entity::insert(session::ActiveModel {
        id: Set(session_id.to_owned()),
        username: Set(username.to_owned()),
        created_at: Set(now),
        revoked_at: Set(None),
        revoked_reason: Set(None),
    })
    .exec_without_returning(&txn)
    .await?;
    insert_refresh(&txn, secret_hash, session_id, now, expires_at).await?;
    txn.commit().await
}

async fn insert_refresh(
    db: &impl ConnectionTrait,
    secret_hash: &str,
    session_id: &str,
    now: i64,
    expires_at: i64,
) -> Result<(), DbErr> {
    refresh_token::Entity::insert(refresh_token::ActiveModel {
        secret_hash: Set(secret_hash.to_owned()),
        session_id: Set(session_id.to_owned()),
        issued_at: Set(now),
        expires_at: Set(expires_at),
        used_at: Set(None),
    })
    .exec_without_returning(db)
    .await?;
    Ok(())
}

/// Presents the refresh token whose digest is `old_hash`: if it is valid it is used up and
/// `new_hash` joins its session; if it was used before, its session is revoked (the token was
/// copied: whoever holds the other copy is logged out too).
pub async fn rotate_refresh(
    db: &DatabaseConnection,
    old_hash: &str,
    new_hash: &str,
    now: i64,
    expires_at: i64,
) -> Result<Rotation, DbErr> {
    let txn = db.begin().await?;
    // The write comes first: SQLite takes its write lock at once instead of upgrading a read
    // lock (which fails at once when another writer is waiting).
    let used = refresh_token::Entity::update_many()
        .col_expr(refresh_token::Column::UsedAt, Expr::value(now))
        .filter(refresh_token::Column::SecretHash.eq(old_hash))
        .filter(refresh_token::Column::UsedAt.is_null())
        .filter(refresh_token::Column::ExpiresAt.gt(now))
        .exec(&txn)
        .await?
        .rows_affected
        == 1;
    let Some(token) = refresh_token::Entity::find_by_id(old_hash.to_owned())
        .one(&txn)
        .await?
    else {
        return Ok(Rotation::Unknown);
    };
    let Some(session) = session::Entity::find_by_id(token.session_id.clone())
        .one(&txn)
        .await?
    else {
        return Ok(Rotation::Unknown);
    };
    if session.revoked_at.is_some() {
        txn.commit().await?;
        return Ok(Rotation::Revoked);
    }
    if !used {
        if token.used_at.is_some() {
            revoke_session_in(&txn, &session.id, "refresh_reuse", now).await?;
            txn.commit().await?;
            return Ok(Rotation::Reused {
                session: session.id,
                username: session.username,
            });
        }
        return Ok(Rotation::Expired);
    }
    insert_refresh(&txn, new_hash, &session.id, now, expires_at).await?;
    txn.commit().await?;
    Ok(Rotation::Rotated {
        session: session.id,
        username: session.username,
    })
}

async fn revoke_session_in(
    db: &impl ConnectionTrait,
    id: &str,
    reason: &str,
    now: i64,
) -> Result<bool, DbErr> {
    Ok(session::Entity::update_many()
        .col_expr(session::Column::RevokedAt, Expr::value(now))
        .col_expr(session::Column::RevokedReason, Expr::value(reason))
        .filter(session::Column::Id.eq(id))
        .filter(session::Column::RevokedAt.is_null())
        .exec(db)
        .await?
        .rows_affected
        == 1)
}

/// The session the refresh token whose digest is `hash` belongs to, if any.
pub async fn session_of_refresh(
    db: &DatabaseConnection,
    hash: &str,
) -> Result<Option<session::Model>, DbErr> {
    let Some(token) = refresh_token::Entity::find_by_id(hash.to_owned())
        .one(db)
        .await?
    else {
        return Ok(None);
    };
    session::Entity::find_by_id(token.session_id).one(db).await
}

/// Revokes session `id` for `reason`; true if it was active.
pub async fn revoke_session(
    db: &DatabaseConnection,
    id: &str,
    reason: &str,
    now: i64,
) -> Result<bool, DbErr> {
    revoke_session_in(db, id, reason, now).await
}

/// Revokes every active session of `username`; their ids.
pub async fn revoke_sessions_of(
    db: &DatabaseConnection,
    username: &str,
    reason: &str,
    now: i64,
) -> Result<Vec<String>, DbErr> {
    let active: Vec<String> = session::Entity::find()
        .filter(session::Column::Username.eq(username))
        .filter(session::Column::RevokedAt.is_null())
        .all(db)
        .await?
        .into_iter()
        .map(|s| s.id)
        .collect();
    if !active.is_empty() {
        session::Entity::update_many()
            .col_expr(session::Column::RevokedAt, Expr::value(now))
            .col_expr(session::Column::RevokedReason, Expr::value(reason))
            .filter(session::Column::Id.is_in(active.clone()))
            .filter(session::Column::RevokedAt.is_null())
            .exec(db)
            .await?;
    }
    Ok(active)
}

/// Stores a new API token.
pub async fn create_token(db: &DatabaseConnection, row: api_token::Model) -> Result<(), DbErr> {
    api_token::Entity::insert(api_token::ActiveModel {
        id: Set(row.id),
        name: Set(row.name),
        role: Set(row.role),
        owner: Set(row.owner),
        secret_hash: Set(row.secret_hash),
        created_at: Set(row.created_at),
        expires_at: Set(row.expires_at),
        revoked_at: Set(row.revoked_at),
    })
    .exec_without_returning(db)
    .await?;
    Ok(())
}

/// The token whose secret has digest `hash`, with its owner.
pub async fn token_by_secret(
    db: &DatabaseConnection,
    hash: &str,
) -> Result<Option<(api_token::Model, Option<user::Model>)>, DbErr> {
    let Some(token) = api_token::Entity::find()
        .filter(api_token::Column::SecretHash.eq(hash))
        .one(db)
        .await?
    else {
        return Ok(None);
    };
    let owner = user(db, &token.owner).await?;
    Ok(Some((token, owner)))
}

/// One token by id.
pub async fn token(db: &DatabaseConnection, id: &str) -> Result<Option<api_token::Model>, DbErr> {
    api_token::Entity::find_by_id(id.to_owned()).one(db).await
}

/// The tokens of `owner` (every token when `None`), newest first.
pub async fn tokens(
    db: &DatabaseConnection,
    owner: Option<&str>,
) -> Result<Vec<api_token::Model>, DbErr> {
    let mut select = api_token::Entity::find().order_by_desc(api_token::Column::Id);
    if let Some(owner) = owner {
        select = select.filter(api_token::Column::Owner.eq(owner));
    }
    select.all(db).await
}

/// Revokes token `id`; true if it was active.
pub async fn revoke_token(db: &DatabaseConnection, id: &str, now: i64) -> Result<bool, DbErr> {
    Ok(api_token::Entity::update_many()
        .col_expr(api_token::Column::RevokedAt, Expr::value(now))
        .filter(api_token::Column::Id.eq(id))
        .filter(api_token::Column::RevokedAt.is_null())
        .exec(db)
        .await?
        .rows_affected
        == 1)
}

/// Revokes every active token of `owner`; their ids.
pub async fn revoke_tokens_of(
    db: &DatabaseConnection,
    owner: &str,
    now: i64,
) -> Result<Vec<String>, DbErr> {
    let active: Vec<String> = api_token::Entity::find()
        .filter(api_token::Column::Owner.eq(owner))
        .filter(api_token::Column::RevokedAt.is_null())
        .all(db)
        .await?
        .into_iter()
        .map(|t| t.id)
        .collect();
    if !active.is_empty() {
        api_token::Entity::update_many()
            .col_expr(api_token::Column::RevokedAt, Expr::value(now))
            .filter(api_token::Column::Id.is_in(active.clone()))
            .filter(api_token::Column::RevokedAt.is_null())
            .exec(db)
            .await?;
    }
    Ok(active)
}

/// Deletes refresh tokens that expired before `before` (milliseconds), and the sessions left
/// without any; how many rows of each went. Replaying a token deleted this way is answered as
/// an unknown token, which it is: its session could not be refreshed anyway.
pub async fn forget_expired(db: &DatabaseConnection, before: i64) -> Result<(u64, u64), DbErr> {
    use sea_orm::sea_query::Query;
    let tokens = refresh_token::Entity::delete_many()
        .filter(refresh_token::Column::ExpiresAt.lt(before))
        .exec(db)
        .await?
        .rows_affected;
    let sessions = session::Entity::delete_many()
        .filter(session::Column::CreatedAt.lt(before))
        .filter(
            session::Column::Id.not_in_subquery(
                Query::select()
                    .column(refresh_token::Column::SessionId)
                    .from(refresh_token::Entity)
                    .to_owned(),
            ),
        )
        .exec(db)
        .await?
        .rows_affected;
    Ok((tokens, sessions))
}
