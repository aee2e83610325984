//! Remote systems: hosts that run no Capstan, reached by a gateway executor over SSH. What the
//! catalogue says about a system's health is defined here, once, for the REST API, the events
//! on a change and the connector that finds it out.

use std::fmt;

use serde::{Deserialize, Serialize};

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
    fn each_health_is_written_on_the_wire_as_its_name() {
        for health in SystemHealth::ALL {
            let json = serde_json::to_string(&health).expect("serializes");
            assert_eq!(json, format!("\"{}\"", health.as_str()));
            let back: SystemHealth = serde_json::from_str(&json).expect("parses");
            assert_eq!(back, health);
        }
    }
}
