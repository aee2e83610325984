//! The SSH connector. A run takes a connection to its target from the connector's pool, or
//! opens one: checks the server's key against the pin (before any credential goes out: a
//! mismatch ends the handshake) and logs in with a password or a key. Connections are kept
//! for reuse by later runs with the same host, account, credential and pin (a channel per
//! command, at most [`RUNS_PER_CONNECTION`] runs on one connection, more connections beside it
//! when more run at once), probed by keepalives, and dropped once no run has used them for
//! longer than the connector's idle time, or found closed. A run executes the wrapped command
//! ([`crate::script`]) on one session channel, reading
//! the process group's id from the wrapper's first line. A stop sends `SIGTERM` to that group
//! over a second channel, then `SIGKILL` after the grace period; when the command has ended,
//! a last `SIGKILL` to the group takes whatever it left running in the background.

use std::collections::HashMap;
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

/// Connects over SSH, keeping connections for reuse.
#[derive(Clone)]
pub struct SshConnector {
    connect_timeout: Duration,
    keepalive: Duration,
    idle: Duration,
    pool: Arc<Mutex<HashMap<PoolKey, Vec<Pooled>>>>,
    /// Taken by a run that logs in to a target, so that runs waiting for room there log in
    /// one at a time; it holds the last failed login, which the runs that waited for it share.
    logins: Arc<Mutex<HashMap<PoolKey, LoginGate>>>,
    observer: Option<Observer>,
}

/// How a run got its connection, told to the connector's observer (for metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connected {
    /// A kept connection was reused.
    Reused,
    /// A new connection was made and logged in, in this long.
    Made(Duration),
    /// Connecting or logging in failed after this long.
    Failed(Duration),
}

/// Told how each run got its connection.
pub type Observer = Arc<dyn Fn(Connected) + Send + Sync>;

/// What makes two targets share a connection: the same server, account, pin and credential
/// (the credential by digest).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    hostname: String,
    port: u16,
    username: String,
    host_key: HostKeyCheck,
    credential: [u8; 32],
}

impl PoolKey {
    fn of(target: &Target) -> Self {
        use sha2::Digest;
        let mut digest = sha2::Sha256::new();
        match &target.credential {
            Credential::Password(password) => {
                digest.update(b"password\0");
                digest.update(password.as_bytes());
            }
            Credential::PrivateKey { key, passphrase } => {
                digest.update(b"key\0");
                digest.update(key.as_bytes());
                digest.update(b"\0");
                digest.update(passphrase.as_ref().map_or(&b""[..], |p| p.as_bytes()));
            }
        }
        Self {
            hostname: target.hostname.clone(),
            port: target.port,
            username: target.username.clone(),
            host_key: target.host_key.clone(),
            credential: digest.finalize().into(),
        }
    }
}

/// Runs one kept connection carries at once. OpenSSH's sshd opens at most 10 sessions on one
/// connection unless told otherwise (`MaxSessions`), and a run may open a second session
/// beside its own, one at a time, to signal its process group: 5 runs and their signals fit.
pub const RUNS_PER_CONNECTION: usize = 5;

/// Held by the run logging in to one target; holds that target's last failed login.
type LoginGate = Arc<tokio::sync::Mutex<Option<Failed>>>;

/// A login that failed, and when it ended.
struct Failed {
    at: Instant,
    error: RemoteError,
}

struct Pooled {
    handle: Arc<Handle<Checker>>,
    host_key: SeenKey,
    usage: Arc<Usage>,
}

/// The runs on a kept connection now, and when the last one ended.
#[derive(Default)]
struct Usage(Mutex<Runs>);

struct Runs {
    now: usize,
    idle_since: Instant,
}

impl Default for Runs {
    fn default() -> Self {
        Self {
            now: 0,
            idle_since: Instant::now(),
        }
    }
}

impl Usage {
    fn runs(&self) -> std::sync::MutexGuard<'_, Runs> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Pooled {
    /// Whether to keep it: open, and running something or idle for less than `idle`.
    fn kept(&self, now: Instant, idle: Duration) -> bool {
        let runs = self.usage.runs();
        !self.handle.is_closed() && (runs.now > 0 || now.duration_since(runs.idle_since) < idle)
    }
}

/// A run's place on a kept connection, given back when the run ends; the connection's idle
/// time runs from the end of its last run.
struct Place(Arc<Usage>);

impl Place {
    fn take(usage: &Arc<Usage>) -> Self {
        usage.runs().now += 1;
        Self(usage.clone())
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut runs = self.0.runs();
        runs.now -= 1;
        runs.idle_since = Instant::now();
    }
}

/// A connection a run goes on.
struct Connection {
    handle: Arc<Handle<Checker>>,
    host_key: SeenKey,
    reused: bool,
    place: Place,
}

impl std::fmt::Debug for SshConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshConnector")
            .field("connect_timeout", &self.connect_timeout)
            .field("keepalive", &self.keepalive)
            .field("idle", &self.idle)
            .finish_non_exhaustive()
    }
}

impl Default for SshConnector {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            keepalive: Duration::from_secs(15),
            idle: Duration::from_secs(60),
            pool: Arc::default(),
            logins: Arc::default(),
            observer: None,
        }
    }
}

impl SshConnector {
    /// Tells `observer` how each run got its connection.
    pub fn observe(mut self, observer: Observer) -> Self {
        self.observer = Some(observer);
        self
    }

    /// How long the TCP connection and the SSH handshake may take together (10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How often an idle connection is probed; three probes unanswered end it (15 s).
    pub fn keepalive(mut self, interval: Duration) -> Self {
        self.keepalive = interval;
        self
    }

    /// How long a connection no run uses is kept (60 s).
    pub fn idle(mut self, idle: Duration) -> Self {
        self.idle = idle;
        self
    }

    /// Connections kept for reuse (open ones only).
    pub fn pooled(&self) -> usize {
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        pool.retain(|_, kept| {
            kept.retain(|pooled| !pooled.handle.is_closed());
            !kept.is_empty()
        });
        pool.values().map(Vec::len).sum()
    }

    /// A connection to `target` for one run: a kept one with room for it when there is one
    /// (unless `fresh`), else a new one, kept for later runs. Runs that find no room log in one
    /// at a time, so a burst of runs opens as many connections as it needs, not one each; a
    /// run that waited for a login that failed fails with it rather than trying again.
    async fn connection(&self, target: &Target, fresh: bool) -> Result<Connection, RemoteError> {
        let key = PoolKey::of(target);
        if !fresh && let Some(kept) = self.room_on_kept(&key) {
            return Ok(kept);
        }
        let gate = {
            let mut logins = self.logins.lock().unwrap_or_else(PoisonError::into_inner);
            // Gates nobody holds or waits for are dropped.
            logins.retain(|_, gate| Arc::strong_count(gate) > 1);
            logins.entry(key.clone()).or_default().clone()
        };
        let asked = Instant::now();
        let mut failed = gate.lock().await;
        if let Some(last) = failed.as_ref()
            && last.at >= asked
        {
            return Err(last.error.clone());
        }
        // Another run may have logged in while this one waited.
        if !fresh && let Some(kept) = self.room_on_kept(&key) {
            return Ok(kept);
        }
        let started = Instant::now();
        let login = self.login(target).await;
        self.tell(match login {
            Ok(_) => Connected::Made(started.elapsed()),
            Err(_) => Connected::Failed(started.elapsed()),
        });
        let (handle, host_key) = match login {
            Ok(login) => {
                *failed = None;
                login
            }
            Err(error) => {
                *failed = Some(Failed {
                    at: Instant::now(),
                    error: error.clone(),
                });
                return Err(error);
            }
        };
        let handle = Arc::new(handle);
        let usage = Arc::new(Usage::default());
        let place = Place::take(&usage);
        self.pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_default()
            .push(Pooled {
                handle: handle.clone(),
                host_key: host_key.clone(),
                usage,
            });
        Ok(Connection {
            handle,
            host_key,
            reused: false,
            place,
        })
    }

    /// A place on a kept connection to `key` with room for one more run, if there is one.
    fn room_on_kept(&self, key: &PoolKey) -> Option<Connection> {
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        pool.retain(|_, kept| {
            kept.retain(|pooled| pooled.kept(now, self.idle));
            !kept.is_empty()
        });
        let pooled = pool
            .get(key)?
            .iter()
            .find(|pooled| pooled.usage.runs().now < RUNS_PER_CONNECTION)?;
        self.tell(Connected::Reused);
        Some(Connection {
            handle: pooled.handle.clone(),
            host_key: pooled.host_key.clone(),
            reused: true,
            place: Place::take(&pooled.usage),
        })
    }

    fn tell(&self, connected: Connected) {
        if let Some(observer) = &self.observer {
            observer(connected);
        }
    }

    /// Forgets the kept connection `handle` to `target` (it failed under a run).
    fn forget(&self, target: &Target, handle: &Arc<Handle<Checker>>) {
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        let key = PoolKey::of(target);
        if let Some(kept) = pool.get_mut(&key) {
            kept.retain(|pooled| !Arc::ptr_eq(&pooled.handle, handle));
            if kept.is_empty() {
                pool.remove(&key);
            }
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
        let session = |error: russh::Error| RemoteError::Session {
            system: system(),
            reason: error.to_string(),
        };
        let connect = tracing::info_span!(
            "ssh connect",
            system = %target.name,
            address = %format_args!("{}:{}", target.hostname, target.port),
            reused = tracing::field::Empty,
        );
        let mut connection = {
            use tracing::Instrument;
            self.connection(target, false)
                .instrument(connect.clone())
                .await?
        };
        connect.record("reused", connection.reused);
        let mut channel = match connection.handle.channel_open_session().await {
            Ok(channel) => channel,
            // A kept connection can die between keepalives: once more on a new one.
            Err(_) if connection.reused => {
                self.forget(target, &connection.handle);
                connection = self.connection(target, true).await?;
                match connection.handle.channel_open_session().await {
                    Ok(channel) => channel,
                    Err(error) => {
                        self.forget(target, &connection.handle);
                        return Err(session(error));
                    }
                }
            }
            Err(error) => {
                self.forget(target, &connection.handle);
                return Err(session(error));
            }
        };
        let Connection {
            handle,
            host_key,
            place,
            ..
        } = connection;
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
                    kill_at = Some(Instant::now() + stop.grace());
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
        drop(place);
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
