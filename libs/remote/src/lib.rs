//! Running a job's command on a system that runs no Capstan: the [`Connector`] trait an
//! executor acting as a gateway dispatches on, and its SSH implementation ([`ssh`]).
//!
//! A connector connects to a [`Target`] (where, as whom, with which credential, and which host
//! key to expect), checks the server's key before sending any credential, runs one
//! [`RemoteCommand`] in a process group of its own, streams its output as [`Output`] chunks,
//! and reports how it [`Ended`]. Stopping it (a timeout or a cancel) signals the remote process
//! group — `SIGTERM`, a grace period, then `SIGKILL` — rather than only closing the channel,
//! so no remote process outlives its job. Another protocol (WinRM) slots in as another
//! implementation of the same trait.
//!
//! Credentials arrive opened (the caller holds the sealing keys) and are kept in zeroizing
//! buffers; no error, log line or `Debug` output of this crate holds one.

pub mod probe;
pub mod script;
pub mod ssh;

use std::fmt;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

pub use probe::{Probe, probe};
pub use ssh::SshConnector;

/// A remote system and how to log in to it.
#[derive(Clone)]
pub struct Target {
    /// The system's name in the catalogue (for messages).
    pub name: String,
    /// Host name or address.
    pub hostname: String,
    /// TCP port.
    pub port: u16,
    /// The account to log in as.
    pub username: String,
    /// How to prove it.
    pub credential: Credential,
    /// Which host key to accept.
    pub host_key: HostKeyCheck,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("name", &self.name)
            .field("hostname", &self.hostname)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("credential", &self.credential)
            .field("host_key", &self.host_key)
            .finish()
    }
}

/// A login credential, opened.
#[derive(Clone)]
pub enum Credential {
    /// A password.
    Password(Zeroizing<String>),
    /// A private key (OpenSSH or PEM text), with its passphrase when it has one.
    PrivateKey {
        /// The key's text.
        key: Zeroizing<String>,
        /// Its passphrase.
        passphrase: Option<Zeroizing<String>>,
    },
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Password(_) => "Password(…)",
            Self::PrivateKey { .. } => "PrivateKey(…)",
        })
    }
}

/// Which server key a connection accepts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostKeyCheck {
    /// Only this key: its public key as `known_hosts` writes it (`ssh-ed25519 AAAA…`) or its
    /// SHA-256 fingerprint (`SHA256:…`).
    Pinned(String),
    /// Whatever key the server shows, reported in [`Ended::host_key`] so the caller pins it.
    /// Only for a system an administrator marked so.
    TrustOnFirstUse,
}

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct RemoteCommand {
    /// A command line for `/bin/sh -c` on the remote host.
    pub command: String,
    /// Environment variables exported before it runs.
    pub env: Vec<(String, String)>,
    /// Bytes for its standard input (closed after them, or at once when `None`).
    pub stdin: Option<Bytes>,
}

/// A chunk of the remote command's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// From standard output.
    Stdout(Bytes),
    /// From standard error.
    Stderr(Bytes),
}

/// How a stop is asked for, and how long the command gets between `SIGTERM` and `SIGKILL`
/// (which the one who stops it may choose when it does: a cancel may allow less than a
/// timeout).
#[derive(Debug, Clone)]
pub struct Stop {
    /// Cancelled to stop the command.
    pub token: CancellationToken,
    grace_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Stop {
    /// A stop that `token` fires, allowing `grace` between `SIGTERM` and `SIGKILL`.
    pub fn new(token: CancellationToken, grace: Duration) -> Self {
        let stop = Self {
            token,
            grace_ms: std::sync::Arc::default(),
        };
        stop.set_grace(grace);
        stop
    }

    /// Stops the command now, allowing it `grace` between `SIGTERM` and `SIGKILL`.
    pub fn stop_with(&self, grace: Duration) {
        self.set_grace(grace);
        self.token.cancel();
    }

    /// The time between `SIGTERM` and `SIGKILL`.
    pub fn grace(&self) -> Duration {
        Duration::from_millis(self.grace_ms.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn set_grace(&self, grace: Duration) {
        let millis = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        self.grace_ms
            .store(millis, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The key a server showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenKey {
    /// As `known_hosts` writes it: `ssh-ed25519 AAAA…`.
    pub public_key: String,
    /// Its SHA-256 fingerprint: `SHA256:…`.
    pub fingerprint: String,
}

/// How a remote command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    /// Its exit status, when it exited.
    pub exit_code: Option<u32>,
    /// The signal that ended it, when one did (`TERM`, `KILL`, …).
    pub signal: Option<String>,
    /// Whether it was stopped ([`Stop::token`]) rather than ending by itself.
    pub stopped: bool,
    /// The key the server showed.
    pub host_key: SeenKey,
}

/// Why a remote command could not run or finish.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemoteError {
    /// No connection could be made (refused, no route, name unknown, or no answer in time).
    #[error("{system}: cannot connect to {address}: {reason}")]
    Unreachable {
        /// The system.
        system: String,
        /// `host:port`.
        address: String,
        /// What failed.
        reason: String,
    },
    /// The server showed another key than the pinned one; no credential was sent.
    #[error("{system}: host key mismatch: expected {expected}, the server showed {seen}")]
    HostKeyMismatch {
        /// The system.
        system: String,
        /// The pinned key or fingerprint.
        expected: String,
        /// The fingerprint of the key shown.
        seen: String,
    },
    /// The server refused the credential.
    #[error("{system}: authentication as {username} refused")]
    AuthFailed {
        /// The system.
        system: String,
        /// The account.
        username: String,
    },
    /// The stored credential cannot be used (a key that does not parse, a wrong passphrase).
    #[error("{system}: the credential cannot be used: {reason}")]
    BadCredential {
        /// The system.
        system: String,
        /// Why (never the credential itself).
        reason: String,
    },
    /// The command cannot be sent as given.
    #[error("{system}: {reason}")]
    BadCommand {
        /// The system.
        system: String,
        /// Why.
        reason: String,
    },
    /// The connection failed after it was made.
    #[error("{system}: SSH session failed: {reason}")]
    Session {
        /// The system.
        system: String,
        /// What failed.
        reason: String,
    },
}

impl RemoteError {
    /// What this failure says about the system's health.
    pub fn health(&self) -> capstan_protocol::SystemHealth {
        use capstan_protocol::SystemHealth;
        match self {
            Self::Unreachable { .. } | Self::Session { .. } | Self::BadCommand { .. } => {
                SystemHealth::Unreachable
            }
            Self::HostKeyMismatch { .. } => SystemHealth::HostKeyMismatch,
            Self::AuthFailed { .. } | Self::BadCredential { .. } => SystemHealth::AuthFailed,
        }
    }
}

/// Runs commands on remote systems.
pub trait Connector: Send + Sync {
    /// Runs `command` on `target`, sending its output to `output` as it comes, until it ends
    /// or `stop` fires (then its process group is stopped and the result says so).
    fn run(
        &self,
        target: &Target,
        command: &RemoteCommand,
        output: mpsc::Sender<Output>,
        stop: &Stop,
    ) -> impl Future<Output = Result<Ended, RemoteError>> + Send;
}
