//! Identity and access: who a request comes from ([`Principal`]) and what it may do
//! ([`Role`], [`Permission`]).
//!
//! Roles are named sets of permissions, declared once in [`Role::permissions`]; every check in
//! the API asks for a permission, never for a role, so splitting a role later changes that
//! table and nothing else.
//!
//! Module map: `jwt` issues and verifies Capstan's access tokens; `oidc` verifies a provider's
//! tokens against its published keys; `password` hashes and checks passwords; `secret` makes
//! and digests opaque tokens (refresh and API tokens); `authenticator` turns a bearer
//! credential into a principal; `revocations` keeps every replica's view of revoked users,
//! sessions and tokens; `limits` holds the rate limiters.

pub mod authenticator;
pub mod jwt;
pub mod limits;
pub mod oidc;
pub mod password;
pub mod revocations;
pub mod secret;

use std::fmt;
use std::str::FromStr;

use capstan_protocol::{AuthMethod, SubmittedBy};

/// One thing a principal may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    /// Read jobs, their events and output, with `env` values masked.
    JobsRead,
    /// Read the `env` values of any job (a job's submitter always reads its own).
    JobsSecrets,
    /// Submit jobs.
    JobsSubmit,
    /// Cancel the jobs one submitted.
    JobsCancelOwn,
    /// Cancel any job.
    JobsCancelAny,
    /// Remove finished jobs from the history.
    JobsPurge,
    /// Read executor nodes.
    NodesRead,
    /// Cordon, drain and uncordon nodes.
    NodesManage,
    /// Read the Prometheus metrics.
    MetricsRead,
    /// Create API tokens for oneself, with at most one's own permissions; list and revoke
    /// one's own.
    TokensCreate,
    /// List and revoke anyone's API tokens.
    TokensManage,
    /// Create, change and delete users.
    UsersManage,
    /// Read the audit trail.
    AuditRead,
    /// List the stored secrets (names and users, never values).
    SecretsRead,
    /// Store, replace and delete secrets.
    SecretsManage,
    /// List the remote systems and their health (never their credentials).
    SystemsRead,
    /// Add, change and remove remote systems.
    SystemsManage,
    /// List and read schedules, and preview their ticks.
    SchedulesRead,
    /// Create schedules (their runs are submitted as oneself, so this also needs
    /// `jobs:submit`); change, pause, resume, trigger and delete one's own.
    SchedulesManage,
    /// Change, pause, resume, trigger and delete anyone's schedules.
    SchedulesManageAny,
}

impl Permission {
    /// Every permission.
    pub const ALL: [Permission; 20] = [
        Self::JobsRead,
        Self::JobsSecrets,
        Self::JobsSubmit,
        Self::JobsCancelOwn,
        Self::JobsCancelAny,
        Self::JobsPurge,
        Self::NodesRead,
        Self::NodesManage,
        Self::MetricsRead,
        Self::TokensCreate,
        Self::TokensManage,
        Self::UsersManage,
        Self::AuditRead,
        Self::SecretsRead,
        Self::SecretsManage,
        Self::SystemsRead,
        Self::SystemsManage,
        Self::SchedulesRead,
        Self::SchedulesManage,
        Self::SchedulesManageAny,
    ];

    /// The permission's name, as problems and documentation show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::JobsRead => "jobs:read",
            Self::JobsSecrets => "jobs:secrets",
            Self::JobsSubmit => "jobs:submit",
            Self::JobsCancelOwn => "jobs:cancel:own",
            Self::JobsCancelAny => "jobs:cancel:any",
            Self::JobsPurge => "jobs:purge",
            Self::NodesRead => "nodes:read",
            Self::NodesManage => "nodes:manage",
            Self::MetricsRead => "metrics:read",
            Self::TokensCreate => "tokens:create",
            Self::TokensManage => "tokens:manage",
            Self::UsersManage => "users:manage",
            Self::AuditRead => "audit:read",
            Self::SecretsRead => "secrets:read",
            Self::SecretsManage => "secrets:manage",
            Self::SystemsRead => "systems:read",
            Self::SystemsManage => "systems:manage",
            Self::SchedulesRead => "schedules:read",
            Self::SchedulesManage => "schedules:manage",
            Self::SchedulesManageAny => "schedules:manage:any",
        }
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A named set of permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Reads jobs, output, events, nodes, systems and schedules.
    Viewer,
    /// A viewer who also submits jobs, cancels its own, manages its own schedules, and lists
    /// the stored secrets.
    Operator,
    /// Everything.
    Admin,
}

use Permission as P;

const VIEWER: &[Permission] = &[
    P::JobsRead,
    P::NodesRead,
    P::SystemsRead,
    P::SchedulesRead,
    P::MetricsRead,
    P::TokensCreate,
];
const OPERATOR: &[Permission] = &[
    P::JobsRead,
    P::NodesRead,
    P::SystemsRead,
    P::SchedulesRead,
    P::MetricsRead,
    P::TokensCreate,
    P::JobsSubmit,
    P::JobsCancelOwn,
    P::SchedulesManage,
    P::SecretsRead,
];

impl Role {
    /// Every role, least first.
    pub const ALL: [Role; 3] = [Self::Viewer, Self::Operator, Self::Admin];

    /// What the role grants: the one table of who may do what.
    pub fn permissions(self) -> &'static [Permission] {
        match self {
            Self::Viewer => VIEWER,
            Self::Operator => OPERATOR,
            Self::Admin => &Permission::ALL,
        }
    }

    /// True when the role grants `permission`.
    pub fn grants(self, permission: Permission) -> bool {
        self.permissions().contains(&permission)
    }

    /// True when every permission of `other` is one of this role's.
    pub fn includes(self, other: Role) -> bool {
        other.permissions().iter().all(|p| self.grants(*p))
    }

    /// The greater of two roles where one includes the other; the lesser of the two
    /// otherwise would be ambiguous, so this answers the one both include.
    pub fn at_most(self, ceiling: Role) -> Role {
        if ceiling.includes(self) {
            self
        } else {
            ceiling
        }
    }

    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|role| role.as_str() == s)
            .ok_or_else(|| format!("`{s}` is not a role: use one of viewer, operator, admin"))
    }
}

/// An API token a principal authenticated with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRef {
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
}

/// Who a request comes from, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The name jobs and audit records carry: a user name, or `oidc:<subject>`.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// How it authenticated.
    pub via: AuthMethod,
    /// The API token used, if any.
    pub token: Option<TokenRef>,
    /// The login session, for access tokens from a password login.
    pub session: Option<String>,
}

impl Principal {
    /// True when the principal's role grants `permission`.
    pub fn can(&self, permission: Permission) -> bool {
        self.role.grants(permission)
    }

    /// How jobs this principal submits are attributed.
    pub fn submitted_by(&self) -> SubmittedBy {
        SubmittedBy {
            principal: self.name.clone(),
            via: self.via,
            token: self.token.as_ref().map(|t| t.name.clone()),
        }
    }

    /// True when a job attributed to `submitted_by` is this principal's: the same principal,
    /// whichever way it authenticated (a user's API tokens act for the user). Jobs that came
    /// over NATS belong to no REST principal.
    pub fn owns(&self, submitted_by: Option<&SubmittedBy>) -> bool {
        submitted_by.is_some_and(|by| by.via != AuthMethod::Nats && by.principal == self.name)
    }

    /// True for a user who logged in with a password (not a token, not a provider's user).
    pub fn is_local_user(&self) -> bool {
        self.via == AuthMethod::Password
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_role_includes_the_roles_below_it_and_not_those_above() {
        assert!(Role::Admin.includes(Role::Operator) && Role::Operator.includes(Role::Viewer));
        assert!(!Role::Viewer.includes(Role::Operator) && !Role::Operator.includes(Role::Admin));
        for role in Role::ALL {
            assert!(role.includes(role));
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn viewers_only_read_and_operators_cancel_only_their_own() {
        assert!(Role::Viewer.grants(Permission::JobsRead));
        assert!(!Role::Viewer.grants(Permission::JobsSubmit));
        assert!(Role::Operator.grants(Permission::JobsCancelOwn));
        assert!(!Role::Operator.grants(Permission::JobsCancelAny));
        assert!(!Role::Operator.grants(Permission::NodesManage));
        assert!(Permission::ALL.iter().all(|p| Role::Admin.grants(*p)));
    }

    #[test]
    fn whoever_reads_jobs_reads_schedules_and_operators_manage_only_their_own() {
        for role in Role::ALL {
            assert_eq!(
                role.grants(Permission::SchedulesRead),
                role.grants(Permission::JobsRead),
                "{role}"
            );
        }
        assert!(!Role::Viewer.grants(Permission::SchedulesManage));
        assert!(Role::Operator.grants(Permission::SchedulesManage));
        assert!(Role::Operator.grants(Permission::JobsSubmit));
        assert!(!Role::Operator.grants(Permission::SchedulesManageAny));
        assert!(Role::Admin.grants(Permission::SchedulesManageAny));
        let names: std::collections::HashSet<&str> =
            Permission::ALL.iter().map(|p| p.as_str()).collect();
        assert_eq!(names.len(), Permission::ALL.len(), "each name once");
    }

    #[test]
    fn a_token_role_is_capped_by_its_owner_role() {
        assert_eq!(Role::Admin.at_most(Role::Operator), Role::Operator);
        assert_eq!(Role::Viewer.at_most(Role::Admin), Role::Viewer);
    }

    #[test]
    fn jobs_submitted_over_nats_belong_to_no_rest_principal() {
        let alice = Principal {
            name: "alice".into(),
            role: Role::Operator,
            via: AuthMethod::Token,
            token: None,
            session: None,
        };
        let by_password = SubmittedBy {
            principal: "alice".into(),
            via: AuthMethod::Password,
            token: None,
        };
        assert!(alice.owns(Some(&by_password)));
        let bob = SubmittedBy {
            principal: "bob".into(),
            ..by_password.clone()
        };
        assert!(!alice.owns(Some(&bob)));
        let nats = SubmittedBy {
            principal: "alice".into(),
            via: AuthMethod::Nats,
            token: None,
        };
        assert!(!alice.owns(Some(&nats)) && !alice.owns(None));
    }
}
