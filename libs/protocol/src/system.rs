//! Remote systems: hosts that run no Capstan, reached by a gateway executor over SSH.
//!
//! The catalogue keeps two records per system, in two buckets written by different hands: the
//! [`System`] an administrator describes (address, account, sealed credential, pinned host
//! key; written by the API only), and its [`SystemStatus`] (health, round trip, and the key
//! pinned on first use; written by the gateway executors that check it). The health a check
//! finds, the event a change publishes and the listing `nats` users read are defined here once.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::secret::SealedSecret;
use crate::spec::Labels;
use crate::timestamp::Timestamp;

/// The label naming where a system or a node is (`zone=eu-1`): a job on a system prefers a
/// gateway carrying its system's zone, and takes another when none of those has room.
pub const ZONE_LABEL: &str = "zone";

/// The label that makes an executor a gateway to remote systems (`capstan.io/ssh=true`).
pub const SSH_GATEWAY_LABEL: &str = "capstan.io/ssh";

/// What a system's name may be, for messages that refuse one.
pub const SYSTEM_NAME_RULE: &str =
    "a system's name is 1 to 64 characters of A-Z, a-z, 0-9, `-` and `_`";

/// Whether `name` can name a system: it is a bucket key and a subject token.
pub fn valid_system_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

/// The SSH public key algorithms a pinned key may name, as `known_hosts` writes them.
pub const HOST_KEY_ALGORITHMS: [&str; 8] = [
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "ssh-dss",
];

/// What a pinned host key may be, for messages that refuse one.
pub const HOST_KEY_RULE: &str = "a host key is the server's public key as `known_hosts` writes \
    it (`ssh-ed25519 AAAA…`, a comment after it is dropped) or its SHA-256 fingerprint \
    (`SHA256:` and 43 base64 characters, as `ssh-keygen -lf` prints it)";

/// Checks and normalises a pinned host key: `<algorithm> <base64>` (a trailing comment is
/// dropped) or `SHA256:<43 base64 characters>`. `None` when it is neither.
pub fn normalize_host_key(pin: &str) -> Option<String> {
    let pin = pin.trim();
    if let Some(digest) = pin.strip_prefix("SHA256:") {
        let base64 = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/');
        return (digest.len() == 43 && digest.bytes().all(base64)).then(|| pin.to_owned());
    }
    let mut parts = pin.split_ascii_whitespace();
    let (algorithm, key) = (parts.next()?, parts.next()?);
    let base64 = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=');
    (HOST_KEY_ALGORITHMS.contains(&algorithm)
        && (16..=8192).contains(&key.len())
        && key.bytes().all(base64))
    .then(|| format!("{algorithm} {key}"))
}

/// A remote system as an administrator describes it (bucket `capstan_systems`, by name;
/// written by the API alone). Its credential is sealed to its name: only an executor holding
/// the secret keys opens it, to connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct System {
    /// Its name: the key in the bucket, and what jobs give in `system`.
    pub name: String,
    /// Host name or address.
    pub hostname: String,
    /// SSH port.
    pub port: u16,
    /// The account to log in as.
    pub username: String,
    /// How to log in, sealed.
    pub auth: SystemAuth,
    /// The server's key as an administrator pinned it (public key or `SHA256:` fingerprint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_key: Option<String>,
    /// With no `host_key`: accept the first key a gateway sees, and pin it (audited).
    #[serde(default)]
    pub trust_on_first_use: bool,
    /// Its labels, for fan-out selectors.
    #[serde(default)]
    pub labels: Labels,
    /// Inactive systems are neither checked nor given jobs.
    pub active: bool,
    /// When it was added.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
    /// Who changed it last.
    pub updated_by: String,
}

impl System {
    /// The labels a gateway running its jobs should preferably carry: its zone
    /// ([`ZONE_LABEL`]), when it has one.
    pub fn zone_preference(&self) -> crate::spec::Labels {
        self.labels
            .get_key_value(ZONE_LABEL)
            .map(|(key, value)| (key.clone(), value.clone()))
            .into_iter()
            .collect()
    }
}

/// How a gateway logs in to a system, its secrets sealed (each bound to the system's name and
/// the field it fills).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum SystemAuth {
    /// A password.
    Password {
        /// The password, sealed.
        password: SealedSecret,
    },
    /// A private key, with its passphrase when it has one.
    PrivateKey {
        /// The key's text (OpenSSH or PEM), sealed.
        private_key: SealedSecret,
        /// Its passphrase, sealed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        passphrase: Option<SealedSecret>,
    },
}

impl SystemAuth {
    /// `password` or `private_key`.
    pub fn method(&self) -> &'static str {
        match self {
            Self::Password { .. } => "password",
            Self::PrivateKey { .. } => "private_key",
        }
    }

    /// Every sealed value, with the field it is bound to.
    pub fn sealed(&self) -> Vec<(&'static str, &SealedSecret)> {
        match self {
            Self::Password { password } => vec![("password", password)],
            Self::PrivateKey {
                private_key,
                passphrase,
            } => std::iter::once(("private_key", private_key))
                .chain(passphrase.iter().map(|p| ("passphrase", p)))
                .collect(),
        }
    }
}

/// What the gateways found of a system (bucket `capstan_system_status`, by name; written by the
/// gateways, each check by compare-and-swap).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SystemStatus {
    /// The system.
    pub name: String,
    /// What the last check found.
    pub health: SystemHealth,
    /// When the last check ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_at: Option<Timestamp>,
    /// Its round trip (connect, log in, run `true`), in milliseconds, when it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<u64>,
    /// Why it failed, when it did (never a credential).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The gateway that checked last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_by: Option<String>,
    /// A gateway that took the next check, and until when it holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checking: Option<CheckLease>,
    /// The host key pinned on first use (only for a system that allows it and pins none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned_host_key: Option<String>,
    /// When it was pinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned_at: Option<Timestamp>,
}

impl SystemStatus {
    /// The status of a system nobody checked yet.
    pub fn unknown(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            health: SystemHealth::Unknown,
            checked_at: None,
            rtt_ms: None,
            error: None,
            checked_by: None,
            checking: None,
            pinned_host_key: None,
            pinned_at: None,
        }
    }

    /// Whether a check is due at `now`: none was made for `interval`, and no gateway holds
    /// an unexpired lease on the next one.
    pub fn check_due(&self, now: Timestamp, interval: std::time::Duration) -> bool {
        let leased = self
            .checking
            .as_ref()
            .is_some_and(|lease| lease.until > now);
        let stale = self.checked_at.is_none_or(|at| now.since(at) >= interval);
        stale && !leased
    }
}

/// A gateway's hold on a system's next check, so that gateways do not all check at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CheckLease {
    /// The gateway's node.
    pub node: String,
    /// When the hold lapses (another gateway may check after).
    pub until: Timestamp,
}

/// A system's health changed (`capstan.events.systems.<name>.<health>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SystemEvent {
    /// The system.
    pub system: String,
    /// What the check found.
    pub health: SystemHealth,
    /// What the check before it found.
    pub previous: SystemHealth,
    /// When the check ended.
    pub checked_at: Timestamp,
    /// Its round trip in milliseconds, when it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<u64>,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The gateway that checked.
    pub node: String,
}

/// A system as `nats` users list it (`capstan.systems.list`): no credential, not even sealed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SystemSummary {
    /// Its name.
    pub name: String,
    /// Host name or address.
    pub hostname: String,
    /// SSH port.
    pub port: u16,
    /// The account jobs run as.
    pub username: String,
    /// `password` or `private_key`.
    pub auth_method: String,
    /// Its labels.
    pub labels: Labels,
    /// Whether it is checked and given jobs.
    pub active: bool,
    /// What the last check found.
    pub health: SystemHealth,
    /// When the last check ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_at: Option<Timestamp>,
}

impl SystemSummary {
    /// The listing of `system`, with what its gateways found (`None`: not checked yet).
    pub fn of(system: &System, status: Option<&SystemStatus>) -> Self {
        Self {
            name: system.name.clone(),
            hostname: system.hostname.clone(),
            port: system.port,
            username: system.username.clone(),
            auth_method: system.auth.method().to_owned(),
            labels: system.labels.clone(),
            active: system.active,
            health: status.map_or(SystemHealth::Unknown, |s| s.health),
            checked_at: status.and_then(|s| s.checked_at),
        }
    }
}

/// What the last check of a remote system found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum SystemHealth {
    /// Not checked yet.
    Unknown,
    /// Connected, logged in and ran `true`.
    Healthy,
    /// No connection could be made, or the server did not answer in time.
    Unreachable,
    /// The server refused the credential (or it could not be used).
    AuthFailed,
    /// The server showed another host key than the pinned one; no credential was sent.
    HostKeyMismatch,
}

impl SystemHealth {
    /// Every health, in declaration order.
    pub const ALL: [Self; 5] = [
        Self::Unknown,
        Self::Healthy,
        Self::Unreachable,
        Self::AuthFailed,
        Self::HostKeyMismatch,
    ];

    /// The snake_case name (also the last token of `capstan.events.systems.<name>.<health>`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Healthy => "healthy",
            Self::Unreachable => "unreachable",
            Self::AuthFailed => "auth_failed",
            Self::HostKeyMismatch => "host_key_mismatch",
        }
    }
}

impl fmt::Display for SystemHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_keys_are_accepted_as_known_hosts_lines_or_sha256_fingerprints_and_nothing_else() {
        let fingerprint = format!("SHA256:{}", "a".repeat(43));
        assert_eq!(normalize_host_key(&fingerprint), Some(fingerprint.clone()));
        let key =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
        assert_eq!(
            normalize_host_key(&format!("  {key} root@web-1 ")),
            Some(key.to_owned())
        );
        for bad in [
            "",
            "SHA256:short",
            "MD5:aa:bb",
            "ssh-ed25519",
            "ssh-foo AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0",
            "ssh-ed25519 not*base64!",
            "web-1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0",
        ] {
            assert_eq!(normalize_host_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_check_is_due_when_the_last_is_older_than_the_interval_and_no_lease_holds() {
        let interval = std::time::Duration::from_secs(60);
        let now = Timestamp::from_millis(1_000_000);
        let mut status = SystemStatus::unknown("web-1");
        assert!(status.check_due(now, interval), "never checked");
        status.checked_at = Some(Timestamp::from_millis(1_000_000 - 59_000));
        assert!(!status.check_due(now, interval), "checked 59 s ago");
        status.checked_at = Some(Timestamp::from_millis(1_000_000 - 60_000));
        assert!(status.check_due(now, interval), "checked 60 s ago");
        status.checking = Some(CheckLease {
            node: "gw-1".into(),
            until: Timestamp::from_millis(1_000_001),
        });
        assert!(!status.check_due(now, interval), "another gateway holds it");
        status.checking.as_mut().expect("lease").until = now;
        assert!(status.check_due(now, interval), "the lease lapsed");
    }

    #[test]
    fn a_systems_listing_holds_no_credential_even_sealed() {
        let sealed = SealedSecret::parse("sealed:v1:k1:QUJD").expect("sealed");
        let system = System {
            name: "web-1".into(),
            hostname: "10.0.0.5".into(),
            port: 22,
            username: "deploy".into(),
            auth: SystemAuth::PrivateKey {
                private_key: sealed.clone(),
                passphrase: Some(sealed),
            },
            host_key: None,
            trust_on_first_use: true,
            labels: Labels::from([("role".into(), "web".into())]),
            active: true,
            created_at: Timestamp::from_millis(1),
            updated_at: Timestamp::from_millis(1),
            updated_by: "admin".into(),
        };
        assert_eq!(system.auth.sealed().len(), 2);
        let summary = SystemSummary::of(&system, None);
        let json = serde_json::to_string(&summary).expect("serializes");
        assert!(!json.contains("sealed:"), "{json}");
        assert_eq!(summary.auth_method, "private_key");
        assert_eq!(summary.health, SystemHealth::Unknown);
        let stored = serde_json::to_value(&system).expect("serializes");
        assert_eq!(stored["auth"]["method"], "private_key", "{stored}");
    }

    #[test]
    fn each_health_is_written_on_the_wire_as_its_name() {
        for health in SystemHealth::ALL {
            let json = serde_json::to_string(&health).expect("serializes");
            assert_eq!(json, format!("\"{}\"", health.as_str()));
            let back: SystemHealth = serde_json::from_str(&json).expect("parses");
            assert_eq!(back, health);
        }
    }
}
