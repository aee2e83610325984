//! The SSH connector. Each run opens a connection, checks the server's key against the pin
//! (before any credential goes out: a mismatch ends the handshake), logs in with a password
//! or a key, and runs the wrapped command ([`crate::script`]) on one session channel, reading
//! the process group's id from the wrapper's first line. A stop sends `SIGTERM` to that group
//! over a second channel, then `SIGKILL` after the grace period; when the command has ended,
//! a last `SIGKILL` to the group takes whatever it left running in the background.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use russh::ChannelMsg;
use russh::client::{self, Handle};
use russh::keys::{HashAlg, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::script::{self, PID_MARKER};
use crate::{
    Connector, Credential, Ended, HostKeyCheck, Output, RemoteCommand, RemoteError, SeenKey, Stop,
    Target,
};

/// Connects over SSH.
#[derive(Debug, Clone)]
pub struct SshConnector {
    /// How long the TCP connection and the SSH handshake may take together.
    pub connect_timeout: Duration,
    /// How often an idle connection is probed; three probes unanswered end it.
    pub keepalive: Duration,
}

impl Default for SshConnector {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            keepalive: Duration::from_secs(15),
        }
    }
}

/// Checks the server's key and remembers it.
struct Checker {
    expected: HostKeyCheck,
    seen: Arc<Mutex<Option<SeenKey>>>,
}

fn seen_key(key: &PublicKey) -> SeenKey {
    let text = key.to_openssh().unwrap_or_default();
    let public_key = text
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    SeenKey {
        public_key,
        fingerprint: key.fingerprint(HashAlg::Sha256).to_string(),
    }
}

/// Whether `key` is the one `pin` names (a public key, or a `SHA256:` fingerprint).
pub fn matches_pin(pin: &str, key: &PublicKey) -> bool {
    let pin = pin.trim();
    if pin.starts_with("SHA256:") {
        return key.fingerprint(HashAlg::Sha256).to_string() == pin;
    }
    PublicKey::from_openssh(pin).is_ok_and(|pinned| pinned.key_data() == key.key_data())
}

impl client::Handler for Checker {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = server_public_key else {
            // Host certificates are not pinned here: refuse rather than guess.
            return Ok(false);
        };
        *self.seen.lock().unwrap_or_else(PoisonError::into_inner) = Some(seen_key(key));
        Ok(match &self.expected {
            HostKeyCheck::TrustOnFirstUse => true,
            HostKeyCheck::Pinned(pin) => matches_pin(pin, key),
        })
    }
}

impl SshConnector {
    async fn login(&self, target: &Target) -> Result<(Handle<Checker>, SeenKey), RemoteError> {
        let system = || target.name.clone();
        let address = format!("{}:{}", target.hostname, target.port);
        let seen = Arc::new(Mutex::new(None));
        let checker = Checker {
            expected: target.host_key.clone(),
            seen: seen.clone(),
        };
        let config = Arc::new(client::Config {
            keepalive_interval: Some(self.keepalive),
            keepalive_max: 3,
            nodelay: true,
            ..Default::default()
        });
        let connecting = client::connect(config, (target.hostname.as_str(), target.port), checker);
        let connected = tokio::time::timeout(self.connect_timeout, connecting).await;
        let shown = || seen.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let mut handle = match connected {
            Err(_) => {
                return Err(RemoteError::Unreachable {
                    system: system(),
                    address,
                    reason: format!(
                        "no SSH handshake within {} s",
                        self.connect_timeout.as_secs_f32()
                    ),
                });
            }
            Ok(Err(error)) => {
                if let (Some(key), HostKeyCheck::Pinned(pin)) = (shown(), &target.host_key)
                    && matches!(error, russh::Error::UnknownKey)
                {
                    return Err(RemoteError::HostKeyMismatch {
                        system: system(),
                        expected: pin.clone(),
                        seen: key.fingerprint,
                    });
                }
                return Err(match error {
                    russh::Error::IO(io) => RemoteError::Unreachable {
                        system: system(),
                        address,
                        reason: io.to_string(),
                    },
                    other => RemoteError::Session {
                        system: system(),
                        reason: format!("handshake failed: {other}"),
                    },
                });
            }
            Ok(Ok(handle)) => handle,
        };
        let key = shown().ok_or_else(|| RemoteError::Session {
            system: system(),
            reason: "the server showed no host key".into(),
        })?;
        let session = |error: russh::Error| RemoteError::Session {
            system: system(),
            reason: error.to_string(),
        };
        let result = match &target.credential {
            Credential::Password(password) => handle
                .authenticate_password(target.username.clone(), password.as_str())
                .await
                .map_err(session)?,
            Credential::PrivateKey { key, passphrase } => {
                let private = russh::keys::decode_secret_key(
                    key.as_str(),
                    passphrase.as_ref().map(|p| p.as_str()),
                )
                .map_err(|_| RemoteError::BadCredential {
                    system: system(),
                    reason: "the private key does not parse, or its passphrase is wrong".into(),
                })?;
                let hash = handle
                    .best_supported_rsa_hash()
                    .await
                    .map_err(session)?
                    .flatten();
                handle
                    .authenticate_publickey(
                        target.username.clone(),
                        PrivateKeyWithHashAlg::new(Arc::new(private), hash),
                    )
                    .await
                    .map_err(session)?
            }
        };
        if !result.success() {
            return Err(RemoteError::AuthFailed {
                system: system(),
                username: target.username.clone(),
            });
        }
        Ok((handle, key))
    }
}

/// Runs `line` on its own channel and waits for it to end (signalling a process group).
async fn side_command(handle: &Handle<Checker>, line: &str) -> Result<(), russh::Error> {
    let mut channel = handle.channel_open_session().await?;
    channel.exec(true, line).await?;
    channel.eof().await?;
    while let Some(message) = channel.wait().await {
        if matches!(message, ChannelMsg::Close) {
            break;
        }
    }
    Ok(())
}

/// Splits the wrapper's first line (the process group's id) off standard output.
#[derive(Default)]
struct Head {
    pid: Option<u32>,
    pending: Vec<u8>,
}

impl Head {
    /// Takes a chunk of standard output and returns what belongs to the command.
    fn take(&mut self, data: Bytes) -> Option<Bytes> {
        if self.pid.is_some() {
            return Some(data);
        }
        self.pending.extend_from_slice(&data);
        let end = self.pending.iter().position(|b| *b == b'\n')?;
        let line = String::from_utf8_lossy(&self.pending[..end]).into_owned();
        // No marker means the login shell did not run the wrapper; keep everything.
        self.pid = Some(
            line.strip_prefix(PID_MARKER)
                .and_then(|pid| pid.trim().parse().ok())
                .unwrap_or(0),
        );
        let rest = if line.starts_with(PID_MARKER) {
            self.pending.split_off(end + 1)
        } else {
            std::mem::take(&mut self.pending)
        };
        self.pending.clear();
        (!rest.is_empty()).then(|| Bytes::from(rest))
    }

    fn group(&self) -> Option<u32> {
        self.pid.filter(|pid| *pid > 1)
    }
}

impl Connector for SshConnector {
    async fn run(
        &self,
        target: &Target,
        command: &RemoteCommand,
        output: mpsc::Sender<Output>,
        stop: &Stop,
    ) -> Result<Ended, RemoteError> {
        let system = || target.name.clone();
        let line = script::wrap(&command.command, &command.env).map_err(|error| {
            RemoteError::BadCommand {
                system: system(),
                reason: error.to_string(),
            }
        })?;
        let (handle, host_key) = self.login(target).await?;
        let session = |error: russh::Error| RemoteError::Session {
            system: system(),
            reason: error.to_string(),
        };
        let mut channel = handle.channel_open_session().await.map_err(session)?;
        channel.exec(true, line).await.map_err(session)?;
        if let Some(stdin) = &command.stdin {
            channel.data(&stdin[..]).await.map_err(session)?;
        }
        channel.eof().await.map_err(session)?;

        let mut head = Head::default();
        let mut exit_code = None;
        let mut signal = None;
        let mut stopped = false;
        // Set once a stop asked for SIGTERM: when SIGKILL follows.
        let mut kill_at: Option<Instant> = None;
        let mut termed = false;
        loop {
            let message = tokio::select! {
                message = channel.wait() => message,
                () = stop.token.cancelled(), if !stopped => {
                    stopped = true;
                    kill_at = Some(Instant::now() + stop.grace);
                    if let Some(pid) = head.group() {
                        termed = true;
                        let _ = side_command(&handle, &script::signal_group("TERM", pid)).await;
                    }
                    continue;
                }
                () = async {
                    match kill_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    kill_at = None;
                    match head.group() {
                        Some(pid) => {
                            let _ = side_command(&handle, &script::signal_group("KILL", pid)).await;
                        }
                        // The wrapper never reported its group: all that is left is the channel.
                        None => {
                            let _ = channel.close().await;
                        }
                    }
                    continue;
                }
            };
            let Some(message) = message else { break };
            match message {
                ChannelMsg::Data { data } => {
                    let was_known = head.group().is_some();
                    if let Some(data) = head.take(data) {
                        let _ = output.send(Output::Stdout(data)).await;
                    }
                    // A stop that came before the group was known is delivered now.
                    if stopped
                        && !termed
                        && !was_known
                        && let Some(pid) = head.group()
                    {
                        termed = true;
                        let _ = side_command(&handle, &script::signal_group("TERM", pid)).await;
                    }
                }
                ChannelMsg::ExtendedData { data, ext: 1 } => {
                    let _ = output.send(Output::Stderr(data)).await;
                }
                ChannelMsg::ExitStatus { exit_status } => exit_code = Some(exit_status),
                ChannelMsg::ExitSignal { signal_name, .. } => {
                    signal = Some(signal_label(&signal_name));
                }
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        // Whatever the command left in its group goes with it.
        if let Some(pid) = head.group() {
            let _ = side_command(&handle, &script::signal_group("KILL", pid)).await;
        }
        let _ = handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
        Ok(Ended {
            exit_code,
            signal,
            stopped,
            host_key,
        })
    }
}

fn signal_label(signal: &russh::Sig) -> String {
    match signal {
        russh::Sig::Custom(name) => name.clone(),
        other => format!("{other:?}"),
    }
}
