//! The identity and audit resources: logins and tokens, users, API tokens, the audit trail,
//! and the purge report. Request bodies that carry a secret print `***` in their `Debug`.

use capstan_store::entity::{api_token, audit, user};
use poem_openapi::Object;

use super::rfc3339;

/// A login with a password.
#[derive(Clone, Object)]
#[oai(skip_serializing_if_is_none, deny_unknown_fields)]
pub struct LoginRequest {
    /// The user name.
    pub username: String,
    /// The password.
    #[oai(write_only)]
    pub password: String,
}

impl std::fmt::Debug for LoginRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginRequest")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// A refresh token, to exchange for new tokens or to end its session.
#[derive(Clone, Object)]
#[oai(skip_serializing_if_is_none, deny_unknown_fields)]
pub struct RefreshRequest {
    /// The refresh token from the login or the last refresh.
    #[oai(write_only)]
    pub refresh_token: String,
}

impl std::fmt::Debug for RefreshRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RefreshRequest { .. }")
    }
}

/// Tokens from a login or a refresh.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct TokenPair {
    /// A short-lived JWT: send it as `Authorization: Bearer <access_token>`.
    pub access_token: String,
    /// An opaque token, used once to get new tokens (`POST /api/v1/auth/refresh`).
    pub refresh_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds until the access token expires.
    pub expires_in: u64,
}

/// A user, as the API shows it (never the password or its hash).
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct User {
    /// The user name.
    pub name: String,
    /// `viewer`, `operator` or `admin`.
    pub role: String,
    /// A disabled user cannot log in or use a token.
    pub disabled: bool,
    /// Created at.
    pub created_at: String,
    /// Last changed at.
    pub updated_at: String,
}

impl From<user::Model> for User {
    fn from(row: user::Model) -> Self {
        User {
            name: row.name,
            role: row.role,
            disabled: row.disabled,
            created_at: rfc3339(row.created_at),
            updated_at: rfc3339(row.updated_at),
        }
    }
}

/// The users.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct UserList {
    /// By name.
    pub users: Vec<User>,
}

/// A new user.
#[derive(Clone, Object)]
#[oai(skip_serializing_if_is_none, deny_unknown_fields)]
pub struct NewUser {
    /// 1 to 64 characters from A-Z, a-z, 0-9, `.`, `_`, `-` and `@`.
    pub name: String,
    /// The password (see the password policy: at least `CAPSTAN_PASSWORD_MIN_LENGTH`
    /// characters).
    #[oai(write_only)]
    pub password: String,
    /// `viewer`, `operator` or `admin`.
    pub role: String,
    /// Create it disabled.
    #[oai(default)]
    pub disabled: bool,
}

impl std::fmt::Debug for NewUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewUser")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// Changes to a user; absent fields stay as they are.
#[derive(Clone, Default, Object)]
#[oai(skip_serializing_if_is_none, deny_unknown_fields)]
pub struct UserPatch {
    /// A new role.
    pub role: Option<String>,
    /// Disable (`true`) or enable.
    pub disabled: Option<bool>,
    /// A new password (a reset: every session of the user ends).
    #[oai(write_only)]
    pub password: Option<String>,
}

impl std::fmt::Debug for UserPatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserPatch")
            .field("role", &self.role)
            .field("disabled", &self.disabled)
            .finish_non_exhaustive()
    }
}

/// A user changing their own password.
#[derive(Clone, Object)]
#[oai(skip_serializing_if_is_none, deny_unknown_fields)]
pub struct PasswordChange {
    /// The current password.
    #[oai(write_only)]
    pub current_password: String,
    /// The new password.
    #[oai(write_only)]
    pub new_password: String,
}

impl std::fmt::Debug for PasswordChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PasswordChange { .. }")
    }
}

/// Who the caller is.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct Me {
    /// The principal's name.
    pub name: String,
    /// Its role.
    pub role: String,
    /// How it authenticated: `password`, `token` or `oidc`.
    pub via: String,
    /// The API token used, by name.
    pub token: Option<String>,
    /// Every permission it holds.
    pub permissions: Vec<String>,
}

/// A new API token.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none, deny_unknown_fields)]
pub struct NewToken {
    /// A name, to recognise it in lists (1 to 128 characters).
    pub name: String,
    /// Its role: at most the creator's (default: the creator's).
    pub role: Option<String>,
    /// Seconds until it expires (default 90 days, at most 365 days).
    pub expires_in: Option<u64>,
}

/// An API token, as lists show it (never the secret).
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct Token {
    /// Its id: revoke it with `DELETE /api/v1/tokens/{id}`.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its role.
    pub role: String,
    /// The user it acts for.
    pub owner: String,
    /// Created at.
    pub created_at: String,
    /// Expires at.
    pub expires_at: Option<String>,
    /// Revoked at.
    pub revoked_at: Option<String>,
}

impl From<api_token::Model> for Token {
    fn from(row: api_token::Model) -> Self {
        Token {
            id: row.id,
            name: row.name,
            role: row.role,
            owner: row.owner,
            created_at: rfc3339(row.created_at),
            expires_at: row.expires_at.map(rfc3339),
            revoked_at: row.revoked_at.map(rfc3339),
        }
    }
}

/// A created API token: the only time its secret is shown.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct CreatedToken {
    /// The secret: send it as `Authorization: Bearer <token>`. Keep it; it is not shown again.
    pub token: String,
    /// The token as lists show it.
    #[oai(flatten)]
    pub details: Token,
}

/// API tokens.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct TokenList {
    /// Newest first.
    pub tokens: Vec<Token>,
}

/// One audit record.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct AuditEntry {
    /// Its id (a ULID).
    pub id: String,
    /// When.
    pub at: String,
    /// Who (absent when no credential was valid).
    pub principal: Option<String>,
    /// How they authenticated.
    pub via: Option<String>,
    /// The API token used, by name.
    pub token: Option<String>,
    /// What was done (`job.submit`, `auth.login`, …).
    pub action: String,
    /// To what.
    pub resource: Option<String>,
    /// `success`, `failure`, `denied` or `error`.
    pub outcome: String,
    /// HTTP status answered.
    pub status: Option<i32>,
    /// Client address.
    pub client: Option<String>,
    /// The request's id (its `X-Request-Id`).
    pub request_id: Option<String>,
    /// The request's trace.
    pub trace_id: Option<String>,
    /// Why, or what changed.
    pub detail: Option<String>,
}

impl From<audit::Model> for AuditEntry {
    fn from(row: audit::Model) -> Self {
        AuditEntry {
            id: row.id,
            at: rfc3339(row.at),
            principal: row.principal,
            via: row.via,
            token: row.token,
            action: row.action,
            resource: row.resource,
            outcome: row.outcome,
            status: row.status,
            client: row.client,
            request_id: row.request_id,
            trace_id: row.trace_id,
            detail: row.detail,
        }
    }
}

/// A page of the audit trail, newest first.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct AuditPage {
    /// The records.
    pub records: Vec<AuditEntry>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// What a purge removed.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct Purged {
    /// Jobs removed from the history, the jobs bucket, and the events and logs streams.
    pub purged: u64,
    /// Jobs that matched but were left (their live record was not finished).
    pub skipped: u64,
    /// True when more jobs match than this request's limit: ask again.
    pub more: bool,
}
