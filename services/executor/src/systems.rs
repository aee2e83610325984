//! The gateway's side of the remote systems: an executor labelled `capstan.io/ssh=true` checks
//! the systems of the catalogue — connect, verify the host key, log in, run `true` — and keeps
//! what it found in the status bucket.
//!
//! Gateways share the work without talking to each other: a check is due when the last one is
//! older than the interval, and a gateway takes it by writing a lease into the system's status
//! (compare-and-swap: one gateway wins). Its result is written only while that lease still
//! stands, so a check of an address the administrator has since changed (which forgets the
//! status) is dropped. A change of health is announced on
//! `capstan.events.systems.<name>.<health>`; a host key pinned on first use is audited
//! (`system.pin`). Credentials are opened here, for the connection, and nowhere else.

use std::sync::Arc;
use std::time::Duration;

use capstan_mesh::events::EventPublisher;
use capstan_mesh::{Bucket, Change, Modified};
use capstan_protocol::system::{CheckLease, SSH_GATEWAY_LABEL};
use capstan_protocol::{
    AuditAction, AuditOutcome, AuditRecord, Labels, NodeId, System, SystemAuth, SystemEvent,
    SystemHealth, SystemStatus, Timestamp,
};
use capstan_remote::{Credential, HostKeyCheck, SshConnector, Target};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Checks run at once by one gateway.
const CONCURRENT_CHECKS: usize = 8;

/// Whether a node with `labels` acts as a gateway to remote systems.
pub fn is_gateway(labels: &Labels) -> bool {
    labels.get(SSH_GATEWAY_LABEL).is_some_and(|v| v == "true")
}

/// What a gateway's checks need.
#[derive(Debug, Clone)]
pub struct Checker {
    /// The catalogue (credentials sealed).
    pub systems: Bucket<System>,
    /// What the checks found.
    pub status: Bucket<SystemStatus>,
    /// Health changes and pins are published here.
    pub events: EventPublisher,
    /// The keys that open credentials.
    pub keys: Option<capstan_secrets::KeyRing>,
    /// This gateway.
    pub node: NodeId,
    /// How often each system is checked.
    pub interval: Duration,
    /// How long one check may take.
    pub timeout: Duration,
}

impl Checker {
    /// Checks every active system whose check is due, until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let permits = Arc::new(Semaphore::new(CONCURRENT_CHECKS));
        // Checks in flight, ended with the checker (a panic in one is raised here).
        let mut checks = tokio::task::JoinSet::new();
        // Looked at four times per interval (at most once a minute), so a due check waits at
        // most a quarter of the interval.
        let tick = (this.interval / 4).clamp(Duration::from_millis(200), Duration::from_secs(60));
        // The first look is one tick after start, not at once: a gateway that starts with its
        // node does not add its checks to the start-up.
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    checks.abort_all();
                    while let Some(ended) = checks.join_next().await {
                        if let Err(error) = ended && error.is_panic() {
                            std::panic::resume_unwind(error.into_panic());
                        }
                    }
                    return;
                }
                _ = ticker.tick() => {}
            }
            while let Some(ended) = checks.try_join_next() {
                if let Err(error) = ended
                    && error.is_panic()
                {
                    std::panic::resume_unwind(error.into_panic());
                }
            }
            let systems = match this.due_first().await {
                Ok(systems) => systems,
                Err(error) => {
                    tracing::warn!(error = %error, "cannot read the systems catalogue");
                    continue;
                }
            };
            for system in systems {
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    break;
                };
                match this.take(&system.name).await {
                    Ok(Some(lease)) => {
                        let this = this.clone();
                        let span = tracing::info_span!("check system", system = %system.name);
                        checks.spawn(
                            async move {
                                this.check(system, lease).await;
                                drop(permit);
                            }
                            .instrument(span),
                        );
                    }
                    Ok(None) => {}
                    Err(error) => {
                        tracing::warn!(system = %system.name, error = %error, "cannot take a check");
                    }
                }
            }
        }
    }

    /// The active systems, those checked longest ago first (never checked before all): when
    /// checks take longer than the interval allows, every system still gets its turn.
    async fn due_first(&self) -> Result<Vec<System>, capstan_mesh::Error> {
        let checked: std::collections::HashMap<String, Option<Timestamp>> = self
            .status
            .values()
            .await?
            .into_iter()
            .map(|status| (status.value.name, status.value.checked_at))
            .collect();
        let mut systems: Vec<System> = self
            .systems
            .values()
            .await?
            .into_iter()
            .map(|system| system.value)
            .filter(|system| system.active)
            .collect();
        systems.sort_by_key(|system| checked.get(&system.name).copied().flatten());
        Ok(systems)
    }

    /// Takes the next check of `name` when it is due: writes this gateway's lease.
    async fn take(&self, name: &str) -> Result<Option<CheckLease>, capstan_mesh::Error> {
        let now = Timestamp::now();
        let lease = CheckLease {
            node: self.node.to_string(),
            until: now.plus(self.timeout + Duration::from_secs(5)),
        };
        let taken = self
            .status
            .modify(name, |current| {
                let mut status =
                    current.map_or_else(|| SystemStatus::unknown(name), |c| c.value.clone());
                if !status.check_due(now, self.interval) {
                    return Change::Stop(());
                }
                status.checking = Some(lease.clone());
                Change::Write(status)
            })
            .await?;
        Ok(matches!(taken, Modified::Written { .. }).then_some(lease))
    }

    /// Checks `system` under `lease` and records what it found.
    async fn check(&self, system: System, lease: CheckLease) {
        let pinned = match self.status.get(&system.name).await {
            Ok(status) => status.and_then(|s| s.value.pinned_host_key),
            Err(error) => {
                tracing::warn!(error = %error, "cannot read the system's status");
                return;
            }
        };
        let probe = match self.target(&system, pinned.as_deref()) {
            Ok(target) => {
                // A fresh connection each time: a kept one would not test the login.
                let connector = SshConnector::default()
                    .connect_timeout(self.timeout)
                    .idle(Duration::ZERO);
                capstan_remote::probe(&connector, &target, self.timeout).await
            }
            Err(reason) => capstan_remote::Probe {
                health: SystemHealth::AuthFailed,
                round_trip: None,
                error: Some(format!("{}: {reason}", system.name)),
                host_key: None,
            },
        };
        // An administrator's change since the check began (a new address, pin or credential, or
        // the system removed) makes its finding stale: it is dropped, and the next check is of
        // the system as it is now.
        if !self.unchanged(&system).await {
            tracing::debug!("the system changed during its check; the finding is dropped");
            return;
        }
        let first_use = system.host_key.is_none() && system.trust_on_first_use && pinned.is_none();
        let pin = probe
            .host_key
            .as_ref()
            .filter(|_| first_use)
            .map(|seen| seen.public_key.clone());
        let now = Timestamp::now();
        let rtt_ms = probe
            .round_trip
            .map(|rtt| u64::try_from(rtt.as_millis()).unwrap_or(u64::MAX));
        let recorded = self
            .status
            .modify(&system.name, |current| {
                // Only under this gateway's own lease: a status forgotten or taken over since
                // (a changed address, a lapsed lease) is not this check's to write.
                let Some(current) = current.filter(|c| c.value.checking.as_ref() == Some(&lease))
                else {
                    return Change::Stop(());
                };
                let mut status = current.value.clone();
                status.health = probe.health;
                status.checked_at = Some(now);
                status.rtt_ms = rtt_ms;
                status.error.clone_from(&probe.error);
                status.checked_by = Some(self.node.to_string());
                status.checking = None;
                if let Some(pin) = &pin
                    && status.pinned_host_key.is_none()
                {
                    status.pinned_host_key = Some(pin.clone());
                    status.pinned_at = Some(now);
                }
                Change::Write(status)
            })
            .await;
        let (previous, written) = match recorded {
            Ok(Modified::Written { written, previous }) => (
                previous.map_or(SystemHealth::Unknown, |p| p.value.health),
                written.value,
            ),
            Ok(Modified::Stopped(_)) => {
                tracing::debug!("the check's lease was gone; its result is dropped");
                return;
            }
            Err(error) => {
                tracing::warn!(error = %error, "cannot record the check");
                return;
            }
        };
        tracing::debug!(health = %written.health, rtt_ms = ?written.rtt_ms, "system checked");
        if written.pinned_at == Some(now)
            && let Some(key) = &written.pinned_host_key
        {
            self.audit_pin(&system, key, probe.host_key.as_ref()).await;
        }
        if previous != written.health {
            let event = SystemEvent {
                system: system.name.clone(),
                health: written.health,
                previous,
                checked_at: now,
                rtt_ms: written.rtt_ms,
                error: written.error.clone(),
                node: self.node.to_string(),
            };
            if let Err(error) = self.events.system(&event).await {
                tracing::warn!(error = %error, "cannot announce the system's health");
            }
        }
    }

    /// Where and how to connect to `system`, its credential opened; `pinned` is a key pinned
    /// on first use. Fails (naming no secret) when the credential does not open or no host
    /// key can be checked.
    pub fn target(&self, system: &System, pinned: Option<&str>) -> Result<Target, String> {
        let host_key = match (&system.host_key, pinned, system.trust_on_first_use) {
            (Some(key), _, _) => HostKeyCheck::Pinned(key.clone()),
            (None, Some(key), true) => HostKeyCheck::Pinned(key.to_owned()),
            (None, None, true) => HostKeyCheck::TrustOnFirstUse,
            (None, _, false) => {
                return Err("no host key is pinned and trust on first use is off".into());
            }
        };
        let keys = self.keys.as_ref().ok_or(
            "the credential cannot be opened: this executor has no secret keys \
             (CAPSTAN_SECRET_KEYS)",
        )?;
        let open = |field: &str, sealed| {
            keys.open_system(&system.name, field, sealed)
                .map_err(|error| format!("the credential's `{field}` cannot be opened: {error}"))
        };
        let credential = match &system.auth {
            SystemAuth::Password { password } => Credential::Password(open("password", password)?),
            SystemAuth::PrivateKey {
                private_key,
                passphrase,
            } => Credential::PrivateKey {
                key: open("private_key", private_key)?,
                passphrase: passphrase
                    .as_ref()
                    .map(|p| open("passphrase", p))
                    .transpose()?,
            },
        };
        Ok(Target {
            name: system.name.clone(),
            hostname: system.hostname.clone(),
            port: system.port,
            username: system.username.clone(),
            credential,
            host_key,
        })
    }

    /// Whether the catalogue still describes `system` as it was read (same last change).
    async fn unchanged(&self, system: &System) -> bool {
        match self.systems.get(&system.name).await {
            Ok(Some(now)) => now.value.updated_at == system.updated_at,
            Ok(None) => false,
            Err(error) => {
                tracing::warn!(system = %system.name, error = %error, "cannot read the system");
                false
            }
        }
    }

    /// Pins `seen` as the host key of `system`, which trusts its first key and has none pinned
    /// yet: for a job that connected before any check did. Audited like a check's pin; a key
    /// pinned meanwhile is kept, and nothing is pinned for a system changed since it was read.
    pub async fn pin_first_use(&self, system: &System, seen: &capstan_remote::SeenKey) {
        if !self.unchanged(system).await {
            return;
        }
        let now = Timestamp::now();
        let pinned = self
            .status
            .modify(&system.name, |current| {
                let mut status = current
                    .map_or_else(|| SystemStatus::unknown(&system.name), |c| c.value.clone());
                if status.pinned_host_key.is_some() {
                    return Change::Stop(());
                }
                status.pinned_host_key = Some(seen.public_key.clone());
                status.pinned_at = Some(now);
                Change::Write(status)
            })
            .await;
        match pinned {
            Ok(Modified::Written { .. }) => {
                self.audit_pin(system, &seen.public_key, Some(seen)).await;
            }
            Ok(Modified::Stopped(())) => {}
            Err(error) => {
                tracing::warn!(system = %system.name, error = %error, "cannot pin the host key");
            }
        }
    }

    async fn audit_pin(&self, system: &System, key: &str, seen: Option<&capstan_remote::SeenKey>) {
        let mut audit = AuditRecord::new(AuditAction::SystemPin, AuditOutcome::Success);
        audit.principal = Some(format!("node:{}", self.node));
        audit.resource = Some(format!("system/{}", system.name));
        audit.trace_id = capstan_telemetry::propagation::trace_id();
        let fingerprint = seen.map_or("", |s| s.fingerprint.as_str());
        audit.detail = Some(format!(
            "pinned on first use the host key {fingerprint} ({}) of {}:{}, seen by node {}",
            key.split_ascii_whitespace().next().unwrap_or_default(),
            system.hostname,
            system.port,
            self.node
        ));
        if let Err(error) = self.events.audit(&audit).await {
            tracing::error!(error = %error, system = %system.name, "cannot audit a pinned host key");
        }
    }
}
