//! Running an attempt on a remote system, on a gateway node: the system is read from the
//! catalogue and its credential opened here (as for a health check), the command runs over
//! SSH through a kept connection (one per system and credential, a channel per attempt), its
//! output goes to the job's log subject like a local process's, and a timeout, a cancel or
//! the executor's shutdown stops the remote process group (`SIGTERM`, the grace, `SIGKILL`).
//! The attempt's span has a child for the connection (`ssh connect`, made or reused) and is
//! itself the remote command's.

use std::sync::Arc;
use std::time::Duration;

use capstan_protocol::job::Outcome;
use capstan_protocol::job_env;
use capstan_protocol::spec::Program;
use capstan_protocol::{JobRecord, JobStatus};
use capstan_remote::{Connector, Output, RemoteCommand, SshConnector, Stop};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::runner::{LogSink, Runner, Stops, Stream, failed_to_start};
use crate::systems::Checker;

/// What a gateway runs remote attempts with.
#[derive(Debug)]
pub struct Remote {
    /// Reads the catalogue and opens credentials.
    pub checker: Checker,
    /// Keeps connections for reuse across attempts.
    pub connector: SshConnector,
}

impl Remote {
    /// Runs `record`'s current attempt on `system` to its end, or until `stops` end it.
    pub async fn run(
        &self,
        runner: &Runner,
        record: &JobRecord,
        system: &str,
        stops: Stops,
    ) -> Outcome {
        let catalogue = match self.checker.systems.get(system).await {
            Ok(Some(found)) => found.value,
            Ok(None) => return failed_to_start(format!("no system `{system}` in the catalogue")),
            Err(error) => {
                return failed_to_start(format!("cannot read system `{system}`: {error}"));
            }
        };
        if !catalogue.active {
            return failed_to_start(format!("system `{system}` is inactive"));
        }
        let pinned = match self.checker.status.get(system).await {
            Ok(status) => status.and_then(|s| s.value.pinned_host_key),
            Err(error) => {
                return failed_to_start(format!("cannot read system `{system}`'s status: {error}"));
            }
        };
        let target = match self.checker.target(&catalogue, pinned.as_deref()) {
            Ok(target) => target,
            Err(reason) => return failed_to_start(format!("system `{system}`: {reason}")),
        };
        let span = tracing::info_span!(
            "remote command",
            system = %system,
            address = %format_args!("{}:{}", target.hostname, target.port),
            username = %target.username,
        );
        async {
            // Built inside the span, so the command's TRACEPARENT is this span's.
            let command = remote_command(runner, record);
            let sink = Arc::new(LogSink::new(
                runner.js.clone(),
                record,
                &runner.node,
                runner.max_output_bytes,
            ));
            let (output, mut received) = mpsc::channel::<Output>(64);
            let pump = tokio::spawn({
                let sink = sink.clone();
                async move {
                    while let Some(chunk) = received.recv().await {
                        match chunk {
                            Output::Stdout(bytes) => sink.write(Stream::Stdout, &bytes).await,
                            Output::Stderr(bytes) => sink.write(Stream::Stderr, &bytes).await,
                        }
                    }
                }
            });
            let stop = Stop::new(CancellationToken::new(), runner.kill_grace);
            let timeout = async {
                match record.spec.timeout {
                    Some(limit) => tokio::time::sleep(limit).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(timeout);
            let running = self.connector.run(&target, &command, output, &stop);
            tokio::pin!(running);
            let mut ended_by = None;
            let ended = loop {
                tokio::select! {
                    ended = &mut running => break ended,
                    () = &mut timeout, if ended_by.is_none() => {
                        ended_by = Some(JobStatus::TimedOut);
                        stop.stop_with(runner.kill_grace);
                    }
                    () = stops.cancel.cancelled(), if ended_by.is_none() => {
                        ended_by = Some(JobStatus::Cancelled);
                        stop.stop_with(runner.cancel_grace);
                    }
                    () = stops.shutdown.cancelled(), if ended_by.is_none() => {
                        ended_by = Some(JobStatus::Lost);
                        stop.stop_with(runner.kill_grace);
                    }
                }
            };
            // The sender went with the run; the pump drains what is left and ends (or is ended,
            // so that nothing is published after the summary).
            let abort = pump.abort_handle();
            match tokio::time::timeout(Duration::from_secs(5), pump).await {
                Ok(Err(error)) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
                Ok(_) => {}
                Err(_) => abort.abort(),
            }
            sink.finish().await;
            if let (Ok(ended), capstan_remote::HostKeyCheck::TrustOnFirstUse) =
                (&ended, &target.host_key)
            {
                self.checker
                    .pin_first_use(&catalogue, &ended.host_key)
                    .await;
            }
            let mut outcome = outcome(runner, record, ended_by, ended);
            outcome.output = sink.summary();
            outcome
        }
        .instrument(span)
        .await
    }
}

/// The command line, with the variables the job gets: its `env`, and the job's own.
fn remote_command(runner: &Runner, record: &JobRecord) -> RemoteCommand {
    let spec = &record.spec;
    let command = match &spec.program {
        Program::Shell(command) => command.clone(),
        Program::Argv(argv) => argv
            .iter()
            .map(|arg| capstan_remote::script::quote(arg))
            .collect::<Vec<_>>()
            .join(" "),
    };
    let mut env: Vec<(String, String)> = spec
        .env
        .iter()
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    env.push((job_env::JOB_ID.into(), record.id.to_string()));
    env.push((job_env::ATTEMPT.into(), record.attempt.to_string()));
    env.push((job_env::NODE_ID.into(), runner.node.to_string()));
    if let Some(traceparent) =
        capstan_telemetry::propagation::traceparent().or_else(|| record.traceparent.clone())
    {
        env.push((job_env::TRACEPARENT.into(), traceparent));
    }
    RemoteCommand {
        command,
        env,
        stdin: spec.stdin.clone().map(Into::into),
    }
}

/// What the attempt's end was, from what stopped it (if anything did) and how the run ended.
fn outcome(
    runner: &Runner,
    record: &JobRecord,
    ended_by: Option<JobStatus>,
    ended: Result<capstan_remote::Ended, capstan_remote::RemoteError>,
) -> Outcome {
    let (exit_code, signal) = match &ended {
        Ok(ended) => (
            ended.exit_code.and_then(|code| i32::try_from(code).ok()),
            ended.signal.as_deref().and_then(signal_number),
        ),
        Err(_) => (None, None),
    };
    let (status, error) = match (ended_by, &ended) {
        (Some(stopped), _) => runner.stopped(stopped, record.spec.timeout),
        (None, Err(error)) => (JobStatus::Failed, Some(error.to_string())),
        (None, Ok(ended)) if ended.exit_code == Some(0) => (JobStatus::Succeeded, None),
        (None, Ok(ended)) => (
            JobStatus::Failed,
            // An exit code says it all, as for a local process.
            match (&ended.signal, ended.exit_code) {
                (Some(signal), _) => Some(format!("killed by signal {signal}")),
                (None, Some(_)) => None,
                (None, None) => Some(
                    "the SSH session ended without the command's exit status: the server or \
                     the connection went away"
                        .to_owned(),
                ),
            },
        ),
    };
    Outcome {
        status,
        exit_code,
        signal,
        error,
        output: Default::default(),
    }
}

/// The number of a signal named as SSH names it (`TERM`, `KILL`, …).
fn signal_number(name: &str) -> Option<i32> {
    let name = name.trim_start_matches("SIG");
    nix::sys::signal::Signal::iterator()
        .find(|signal| signal.as_str().trim_start_matches("SIG") == name)
        .map(|signal| signal as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_named_by_ssh_get_their_numbers() {
        assert_eq!(signal_number("TERM"), Some(15));
        assert_eq!(signal_number("KILL"), Some(9));
        assert_eq!(signal_number("SIGINT"), Some(2));
        assert_eq!(signal_number("NOPE"), None);
    }
}
