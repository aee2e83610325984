//! The health check of a remote system: connect, check the host key, log in and run `true`,
//! within a deadline. What it finds is a [`SystemHealth`] with the round trip of the whole
//! check and, when it failed, why (never a credential: errors of this crate hold none).

use std::time::{Duration, Instant};

use capstan_protocol::SystemHealth;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{Connector, RemoteCommand, SeenKey, Stop, Target};

/// What one check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// The system's health.
    pub health: SystemHealth,
    /// How long the whole check took (connection, login and `true`), when it succeeded.
    pub round_trip: Option<Duration>,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// The host key the server showed, when the check got that far.
    pub host_key: Option<SeenKey>,
}

/// Checks `target` through `connector`, giving up after `deadline`.
pub async fn probe<C: Connector>(connector: &C, target: &Target, deadline: Duration) -> Probe {
    let command = RemoteCommand {
        command: "true".into(),
        ..RemoteCommand::default()
    };
    // `true` writes nothing; the receiver only keeps the channel open.
    let (output, _receiver) = mpsc::channel(1);
    let stop = Stop::new(CancellationToken::new(), Duration::from_secs(1));
    let started = Instant::now();
    let checked = tokio::time::timeout(deadline, connector.run(target, &command, output, &stop));
    match checked.await {
        Err(_) => Probe {
            health: SystemHealth::Unreachable,
            round_trip: None,
            error: Some(format!(
                "{}: no answer within {} s",
                target.name,
                deadline.as_secs_f32()
            )),
            host_key: None,
        },
        Ok(Err(error)) => Probe {
            health: error.health(),
            round_trip: None,
            error: Some(error.to_string()),
            host_key: None,
        },
        Ok(Ok(ended)) if ended.exit_code == Some(0) => Probe {
            health: SystemHealth::Healthy,
            round_trip: Some(started.elapsed()),
            error: None,
            host_key: Some(ended.host_key),
        },
        Ok(Ok(ended)) => Probe {
            health: SystemHealth::Unreachable,
            round_trip: None,
            error: Some(format!(
                "{}: `true` did not succeed (exit {:?}, signal {:?})",
                target.name, ended.exit_code, ended.signal
            )),
            host_key: Some(ended.host_key),
        },
    }
}
