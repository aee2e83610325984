//! Who did what, on the wire: the attribution every job carries ([`SubmittedBy`]), the audit
//! records published on `capstan.audit.<area>.<action>` ([`AuditRecord`]), and the
//! revocations API replicas share through the `capstan_revocations` bucket ([`Revocation`]).
//!
//! Deciding who may do what (roles, permissions, tokens) belongs to the API; this module only
//! names the facts that cross the mesh.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::AuditId;
use crate::timestamp::Timestamp;

/// How a principal proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    /// A user's password, then the access and refresh tokens it was exchanged for.
    Password,
    /// An API token, acting for the user who created it.
    Token,
    /// A bearer token issued by the configured OpenID Connect provider.
    Oidc,
    /// A message published on NATS, outside the REST API.
    Nats,
    /// The `capstan` admin command, run by someone with access to the database and NATS.
    Cli,
}

impl AuthMethod {
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Password => "password",
            Self::Token => "token",
            Self::Oidc => "oidc",
            Self::Nats => "nats",
            Self::Cli => "cli",
        }
    }
}

impl fmt::Display for AuthMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for AuthMethod {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [
            Self::Password,
            Self::Token,
            Self::Oidc,
            Self::Nats,
            Self::Cli,
        ]
        .into_iter()
        .find(|method| method.as_str() == s)
        .ok_or_else(|| format!("`{s}` is not an authentication method"))
    }
}

/// Who submitted a job: kept in its record, its events and its history row.
///
/// The API sets it from the request's principal, in the `Capstan-Submitted-By` header of the
/// stored submission. A client identity's submission is attributed to it from the subject it
/// arrives on ([`SubmittedBy::nats_client`], whatever its headers say); one without either
/// came over NATS from the administrator or a server without identities, and is attributed to
/// [`SubmittedBy::nats`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct SubmittedBy {
    /// The principal: a user name, `oidc:<subject>` for a provider's user, `nats:<client>` for
    /// a NATS client identity, or `nats` for a message published on NATS by no client
    /// identity. Operators own the jobs their principal submitted.
    pub principal: String,
    /// How the principal authenticated.
    pub via: AuthMethod,
    /// The API token's name, when one was used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl SubmittedBy {
    /// The attribution of a job published on NATS without one: on a server without identities,
    /// or by the administrator.
    pub fn nats() -> Self {
        Self {
            principal: "nats".to_owned(),
            via: AuthMethod::Nats,
            token: None,
        }
    }

    /// The attribution of a job a client identity sent over NATS: `nats:<client>`.
    pub fn nats_client(client: &str) -> Self {
        Self {
            principal: format!("nats:{client}"),
            via: AuthMethod::Nats,
            token: None,
        }
    }
}

/// What an audit record is about. Each is a subject suffix: `capstan.audit.auth.login`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum AuditAction {
    /// A login with a password, successful or not.
    #[serde(rename = "auth.login")]
    AuthLogin,
    /// A refresh token exchanged for new tokens.
    #[serde(rename = "auth.refresh")]
    AuthRefresh,
    /// A refresh token presented again after it was used: its whole family is revoked.
    #[serde(rename = "auth.refresh_reuse")]
    AuthRefreshReuse,
    /// A session ended.
    #[serde(rename = "auth.logout")]
    AuthLogout,
    /// A request without a valid credential.
    #[serde(rename = "auth.unauthenticated")]
    AuthUnauthenticated,
    /// A request refused for a missing permission.
    #[serde(rename = "auth.denied")]
    AuthDenied,
    /// A request refused by a rate limit or a login lockout.
    #[serde(rename = "auth.rate_limited")]
    AuthRateLimited,
    /// A request for a host or from an origin that is not allowed.
    #[serde(rename = "auth.host_refused")]
    AuthHostRefused,
    /// The first administrator created on an empty database.
    #[serde(rename = "user.bootstrap")]
    UserBootstrap,
    /// A user created.
    #[serde(rename = "user.create")]
    UserCreate,
    /// A user's role, state or password changed by an administrator.
    #[serde(rename = "user.update")]
    UserUpdate,
    /// A user deleted.
    #[serde(rename = "user.delete")]
    UserDelete,
    /// A user changed their own password.
    #[serde(rename = "user.password")]
    UserPassword,
    /// An API token created.
    #[serde(rename = "token.create")]
    TokenCreate,
    /// An API token revoked.
    #[serde(rename = "token.revoke")]
    TokenRevoke,
    /// A job submitted.
    #[serde(rename = "job.submit")]
    JobSubmit,
    /// A job's cancellation asked.
    #[serde(rename = "job.cancel")]
    JobCancel,
    /// Finished jobs purged.
    #[serde(rename = "job.purge")]
    JobPurge,
    /// A node cordoned.
    #[serde(rename = "node.cordon")]
    NodeCordon,
    /// A node uncordoned.
    #[serde(rename = "node.uncordon")]
    NodeUncordon,
    /// A node drained.
    #[serde(rename = "node.drain")]
    NodeDrain,
    /// The history tables rebuilt from the event stream.
    #[serde(rename = "history.rebuild")]
    HistoryRebuild,
    /// A stored secret created or given a new value or new users.
    #[serde(rename = "secret.put")]
    SecretPut,
    /// A stored secret deleted.
    #[serde(rename = "secret.delete")]
    SecretDelete,
    /// A stored secret opened by an executor for a job (or refused to it).
    #[serde(rename = "secret.read")]
    SecretRead,
    /// Stored secrets sealed again under the current key (`capstan secrets rotate`).
    #[serde(rename = "secret.rotate")]
    SecretRotate,
    /// A remote system added to the catalogue.
    #[serde(rename = "system.create")]
    SystemCreate,
    /// A remote system changed (address, account, credential, host key, labels, state).
    #[serde(rename = "system.update")]
    SystemUpdate,
    /// A remote system removed from the catalogue.
    #[serde(rename = "system.delete")]
    SystemDelete,
    /// A system's host key pinned on first use by the gateway that saw it.
    #[serde(rename = "system.pin")]
    SystemPin,
    /// A schedule created.
    #[serde(rename = "schedule.create")]
    ScheduleCreate,
    /// A schedule's definition or job changed, or it was paused or resumed.
    #[serde(rename = "schedule.update")]
    ScheduleUpdate,
    /// A schedule deleted.
    #[serde(rename = "schedule.delete")]
    ScheduleDelete,
    /// A schedule's job run at once, outside its ticks.
    #[serde(rename = "schedule.trigger")]
    ScheduleTrigger,
    /// A workflow created.
    #[serde(rename = "workflow.create")]
    WorkflowCreate,
    /// A workflow cancelled.
    #[serde(rename = "workflow.cancel")]
    WorkflowCancel,
    /// A changing request no operation claimed (an unknown route, a body refused before
    /// it reached one).
    #[serde(rename = "http.request")]
    HttpRequest,
}

impl AuditAction {
    /// Every action.
    pub const ALL: [AuditAction; 37] = [
        Self::AuthLogin,
        Self::AuthRefresh,
        Self::AuthRefreshReuse,
        Self::AuthLogout,
        Self::AuthUnauthenticated,
        Self::AuthDenied,
        Self::AuthRateLimited,
        Self::AuthHostRefused,
        Self::UserBootstrap,
        Self::UserCreate,
        Self::UserUpdate,
        Self::UserDelete,
        Self::UserPassword,
        Self::TokenCreate,
        Self::TokenRevoke,
        Self::JobSubmit,
        Self::JobCancel,
        Self::JobPurge,
        Self::NodeCordon,
        Self::NodeUncordon,
        Self::NodeDrain,
        Self::HistoryRebuild,
        Self::SecretPut,
        Self::SecretDelete,
        Self::SecretRead,
        Self::SecretRotate,
        Self::SystemCreate,
        Self::SystemUpdate,
        Self::SystemDelete,
        Self::SystemPin,
        Self::ScheduleCreate,
        Self::ScheduleUpdate,
        Self::ScheduleDelete,
        Self::ScheduleTrigger,
        Self::WorkflowCreate,
        Self::WorkflowCancel,
        Self::HttpRequest,
    ];

    /// The dotted name, as on the wire and in subjects.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AuthLogin => "auth.login",
            Self::AuthRefresh => "auth.refresh",
            Self::AuthRefreshReuse => "auth.refresh_reuse",
            Self::AuthLogout => "auth.logout",
            Self::AuthUnauthenticated => "auth.unauthenticated",
            Self::AuthDenied => "auth.denied",
            Self::AuthRateLimited => "auth.rate_limited",
            Self::AuthHostRefused => "auth.host_refused",
            Self::UserBootstrap => "user.bootstrap",
            Self::UserCreate => "user.create",
            Self::UserUpdate => "user.update",
            Self::UserDelete => "user.delete",
            Self::UserPassword => "user.password",
            Self::TokenCreate => "token.create",
            Self::TokenRevoke => "token.revoke",
            Self::JobSubmit => "job.submit",
            Self::JobCancel => "job.cancel",
            Self::JobPurge => "job.purge",
            Self::NodeCordon => "node.cordon",
            Self::NodeUncordon => "node.uncordon",
            Self::NodeDrain => "node.drain",
            Self::HistoryRebuild => "history.rebuild",
            Self::SecretPut => "secret.put",
            Self::SecretDelete => "secret.delete",
            Self::SecretRead => "secret.read",
            Self::SecretRotate => "secret.rotate",
            Self::SystemCreate => "system.create",
            Self::SystemUpdate => "system.update",
            Self::SystemDelete => "system.delete",
            Self::SystemPin => "system.pin",
            Self::ScheduleCreate => "schedule.create",
            Self::ScheduleUpdate => "schedule.update",
            Self::ScheduleDelete => "schedule.delete",
            Self::ScheduleTrigger => "schedule.trigger",
            Self::WorkflowCreate => "workflow.create",
            Self::WorkflowCancel => "workflow.cancel",
            Self::HttpRequest => "http.request",
        }
    }
}

impl fmt::Display for AuditAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for AuditAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|action| action.as_str() == s)
            .ok_or_else(|| format!("`{s}` is not an audit action"))
    }
}

/// How an audited request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum AuditOutcome {
    /// Done.
    Success,
    /// Refused for what the request said: a bad credential, bad input, a conflict.
    Failure,
    /// Refused for who asked: a missing permission, a rate limit, a host not allowed.
    Denied,
    /// Capstan could not do it (a dependency was unavailable).
    Error,
}

impl AuditOutcome {
    /// Every outcome.
    pub const ALL: [AuditOutcome; 4] = [Self::Success, Self::Failure, Self::Denied, Self::Error];

    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failure => "failure",
            Self::Denied => "denied",
            Self::Error => "error",
        }
    }
}

impl std::str::FromStr for AuditOutcome {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|outcome| outcome.as_str() == s)
            .ok_or_else(|| format!("`{s}` is not an audit outcome"))
    }
}

/// One audited action: published on `capstan.audit.<action>` (stream `CAPSTAN_AUDIT`, message
/// id = the record's id) before the response that reports its success, and projected into the
/// API's `audit` table. It never holds a secret: no password, token, header value or body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct AuditRecord {
    /// The record's id; also its deduplication id.
    pub id: AuditId,
    /// When it happened.
    pub at: Timestamp,
    /// Who: a user name, `oidc:<subject>`, or absent when no credential was valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    /// How the principal authenticated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<AuthMethod>,
    /// The API token's name, when one was used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// What was done.
    pub action: AuditAction,
    /// To what: `job/<id>`, `user/<name>`, `token/<id>`, `node/<id>`, or the request's method
    /// and path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// How it ended.
    pub outcome: AuditOutcome,
    /// The HTTP status answered, for requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The client's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// The request's id (its `X-Request-Id` response header).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The trace the request belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// Why, or what changed (never a secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl AuditRecord {
    /// A record of `action` ending with `outcome`, now, with nothing else known yet.
    pub fn new(action: AuditAction, outcome: AuditOutcome) -> Self {
        Self {
            id: AuditId::generate(),
            at: Timestamp::now(),
            principal: None,
            via: None,
            token: None,
            action,
            resource: None,
            outcome,
            status: None,
            client: None,
            request_id: None,
            trace_id: None,
            detail: None,
        }
    }
}

/// What a revocation is about, and its key in the `capstan_revocations` bucket.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RevocationKey {
    /// Every credential of a user issued before the revocation (disabled, deleted, role or
    /// password changed).
    User(String),
    /// One login session: the refresh-token family and its access tokens.
    Session(String),
    /// One API token.
    Token(String),
}

impl RevocationKey {
    /// The bucket key: a kind prefix and the id in hex, since KV keys allow only a few
    /// characters and user names and OIDC subjects are freer.
    pub fn key(&self) -> String {
        let (prefix, id) = match self {
            Self::User(name) => ("user_", name),
            Self::Session(id) => ("session_", id),
            Self::Token(id) => ("token_", id),
        };
        let mut key = String::with_capacity(prefix.len() + 2 * id.len());
        key.push_str(prefix);
        for byte in id.bytes() {
            use std::fmt::Write;
            let _ = write!(key, "{byte:02x}");
        }
        key
    }

    /// The revocation a bucket key names.
    pub fn parse(key: &str) -> Option<Self> {
        let (prefix, hex) = key.split_once('_')?;
        if hex.len() % 2 != 0 {
            return None;
        }
        let bytes: Option<Vec<u8>> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
            .collect();
        let id = String::from_utf8(bytes?).ok()?;
        match prefix {
            "user" => Some(Self::User(id)),
            "session" => Some(Self::Session(id)),
            "token" => Some(Self::Token(id)),
            _ => None,
        }
    }
}

/// A revocation in the `capstan_revocations` bucket: credentials of its key issued before `at`
/// are refused by every API replica from the moment the entry reaches it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Revocation {
    /// When it was revoked.
    pub at: Timestamp,
    /// Why (an audit action's name).
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_actions_round_trip_through_their_names_and_json() {
        for action in AuditAction::ALL {
            assert_eq!(action.as_str().parse::<AuditAction>(), Ok(action));
            let json = serde_json::to_string(&action).expect("encodes");
            assert_eq!(json, format!("\"{action}\""));
        }
    }

    #[test]
    fn revocation_keys_are_valid_kv_keys_and_parse_back() {
        for key in [
            RevocationKey::User("alice@example.com".into()),
            RevocationKey::User("oidc:auth0|123 ünï".into()),
            RevocationKey::Session("01JD0000000000000000000000".into()),
            RevocationKey::Token("01JD0000000000000000000001".into()),
        ] {
            let text = key.key();
            assert!(
                text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
                "{text}"
            );
            assert_eq!(RevocationKey::parse(&text), Some(key));
        }
        assert_eq!(RevocationKey::parse("user_4"), None);
        assert_eq!(RevocationKey::parse("group_41"), None);
    }

    #[test]
    fn attribution_without_a_token_leaves_the_field_out() {
        let json = serde_json::to_string(&SubmittedBy::nats()).expect("encodes");
        assert_eq!(json, r#"{"principal":"nats","via":"nats"}"#);
    }
}
