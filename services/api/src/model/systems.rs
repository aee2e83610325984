//! The remote systems resource: what an administrator sends (address, account, credential,
//! host key; the credential shown never again) and what anyone allowed sees (the same without
//! the credential, with what the gateways' checks found).

use std::collections::BTreeMap;

use capstan_protocol::system::{System, SystemHealth, SystemStatus};
use poem_openapi::types::MaybeUndefined;
use poem_openapi::{Enum, Object};

/// How a gateway logs in to a system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum AuthMethodName {
    /// A password (`password`).
    Password,
    /// A private key (`private_key`, with `passphrase` when it has one).
    PrivateKey,
}

/// A system's credential, as an administrator sends it: sealed before it is stored, and never
/// shown again.
#[derive(Clone, Object)]
#[oai(skip_serializing_if_is_none, deny_unknown_fields)]
pub struct AuthInput {
    /// `password` or `private_key`.
    pub method: AuthMethodName,
    /// The password, for `password`.
    #[oai(write_only)]
    pub password: Option<String>,
    /// The private key (OpenSSH or PEM text), for `private_key`.
    #[oai(write_only)]
    pub private_key: Option<String>,
    /// The private key's passphrase, when it has one.
    #[oai(write_only)]
    pub passphrase: Option<String>,
}

impl std::fmt::Debug for AuthInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthInput")
            .field("method", &self.method)
            .finish_non_exhaustive()
    }
}

/// A system to add to the catalogue.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none, deny_unknown_fields)]
pub struct SystemInput {
    /// Its name (1 to 64 of A-Z, a-z, 0-9, `-`, `_`): what jobs give in `system`.
    pub name: String,
    /// Host name or address.
    pub hostname: String,
    /// SSH port (22).
    pub port: Option<u16>,
    /// The account to log in as.
    pub username: String,
    /// How to log in.
    pub auth: AuthInput,
    /// The server's host key as `known_hosts` writes it (`ssh-ed25519 AAAA…`) or its SHA-256
    /// fingerprint (`SHA256:…`). Required unless `trust_on_first_use` is set.
    pub host_key: Option<String>,
    /// With no `host_key`: pin the first key a gateway sees (audited as `system.pin`).
    #[oai(default)]
    pub trust_on_first_use: bool,
    /// Labels, for fan-out selectors.
    #[oai(default)]
    pub labels: BTreeMap<String, String>,
    /// Whether it is checked and given jobs (true).
    pub active: Option<bool>,
}

/// A change to a system: the fields given are replaced, the others kept.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none, deny_unknown_fields)]
pub struct SystemPatch {
    /// Host name or address (a new address forgets a key pinned on first use).
    pub hostname: Option<String>,
    /// SSH port (a new port forgets a key pinned on first use).
    pub port: Option<u16>,
    /// The account to log in as.
    pub username: Option<String>,
    /// A new credential, replacing the stored one.
    pub auth: Option<AuthInput>,
    /// A new pinned host key; `null` removes the pin (then `trust_on_first_use` must be set).
    pub host_key: MaybeUndefined<String>,
    /// Whether to pin the first key a gateway sees when no key is pinned.
    pub trust_on_first_use: Option<bool>,
    /// New labels, replacing the old ones.
    pub labels: Option<BTreeMap<String, String>>,
    /// Whether it is checked and given jobs.
    pub active: Option<bool>,
}

/// What the last check of a system found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum HealthName {
    /// Not checked yet.
    Unknown,
    /// Connected, logged in and ran `true`.
    Healthy,
    /// No connection could be made, or the server did not answer in time.
    Unreachable,
    /// The server refused the credential, or it could not be used.
    AuthFailed,
    /// The server showed another host key than the pinned one; no credential was sent.
    HostKeyMismatch,
}

impl From<SystemHealth> for HealthName {
    fn from(health: SystemHealth) -> Self {
        match health {
            SystemHealth::Unknown => Self::Unknown,
            SystemHealth::Healthy => Self::Healthy,
            SystemHealth::Unreachable => Self::Unreachable,
            SystemHealth::AuthFailed => Self::AuthFailed,
            SystemHealth::HostKeyMismatch => Self::HostKeyMismatch,
        }
    }
}

/// Where a system's host key comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum HostKeySource {
    /// An administrator pinned it.
    Pinned,
    /// A gateway pinned the first key it saw.
    FirstUse,
}

/// What the gateways' checks found of a system.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct SystemHealthView {
    /// What the last check found.
    pub status: HealthName,
    /// When it ended.
    pub checked_at: Option<String>,
    /// Its round trip (connect, log in, run `true`) in milliseconds, when it succeeded.
    pub rtt_ms: Option<u64>,
    /// Why it failed, when it did.
    pub last_error: Option<String>,
    /// The gateway node that checked.
    pub checked_by: Option<String>,
}

/// A remote system, without its credential.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none, rename = "System")]
pub struct SystemView {
    /// Its name.
    pub name: String,
    /// Host name or address.
    pub hostname: String,
    /// SSH port.
    pub port: u16,
    /// The account jobs run as.
    pub username: String,
    /// How gateways log in (the credential itself is never shown).
    pub auth_method: AuthMethodName,
    /// The id of the key its credential is sealed with.
    pub key_id: String,
    /// The host key connections accept, when one is pinned.
    pub host_key: Option<String>,
    /// Who pinned it.
    pub host_key_source: Option<HostKeySource>,
    /// Whether the first key a gateway sees is pinned.
    pub trust_on_first_use: bool,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Whether it is checked and given jobs.
    pub active: bool,
    /// What the last check found.
    pub health: SystemHealthView,
    /// When it was added.
    pub created_at: String,
    /// When it last changed.
    pub updated_at: String,
    /// Who changed it last.
    pub updated_by: String,
}

impl SystemView {
    /// The view of `system` with what its gateways found (`None`: nothing yet).
    pub fn of(system: System, status: Option<SystemStatus>) -> Self {
        let first_use = status.as_ref().and_then(|s| s.pinned_host_key.clone());
        let (host_key, host_key_source) = match (system.host_key, first_use) {
            (Some(key), _) => (Some(key), Some(HostKeySource::Pinned)),
            (None, Some(key)) if system.trust_on_first_use => {
                (Some(key), Some(HostKeySource::FirstUse))
            }
            (None, _) => (None, None),
        };
        let health = match status {
            Some(status) => SystemHealthView {
                status: status.health.into(),
                checked_at: status.checked_at.map(|at| at.to_rfc3339()),
                rtt_ms: status.rtt_ms,
                last_error: status.error,
                checked_by: status.checked_by,
            },
            None => SystemHealthView {
                status: HealthName::Unknown,
                checked_at: None,
                rtt_ms: None,
                last_error: None,
                checked_by: None,
            },
        };
        let sealed = system.auth.sealed();
        SystemView {
            key_id: sealed
                .first()
                .map(|(_, s)| s.key_id().to_owned())
                .unwrap_or_default(),
            auth_method: match system.auth.method() {
                "password" => AuthMethodName::Password,
                _ => AuthMethodName::PrivateKey,
            },
            name: system.name,
            hostname: system.hostname,
            port: system.port,
            username: system.username,
            host_key,
            host_key_source,
            trust_on_first_use: system.trust_on_first_use,
            labels: system.labels,
            active: system.active,
            health,
            created_at: system.created_at.to_rfc3339(),
            updated_at: system.updated_at.to_rfc3339(),
            updated_by: system.updated_by,
        }
    }
}

/// The remote systems, by name.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct SystemList {
    /// Every system, without credentials.
    pub systems: Vec<SystemView>,
}
