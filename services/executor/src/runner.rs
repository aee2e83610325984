//! Running one attempt of a job as a process: its own process group, a scrubbed environment,
//! stdin written and closed, stdout and stderr streamed to the logs stream as produced (up to
//! a cap), the timeout enforced on the whole group (SIGTERM, a grace period, SIGKILL), and
//! whatever the process left behind killed when it exits.
//!
//! The process is started by `spawn` (a vfork-style clone and `execve`, in its own process
//! group, with none of this process's descriptors); the program is looked up in the job's
//! `PATH` here, before it starts. A node that runs jobs as another user (`--run-as`) starts
//! them through the standard library's fork path, with no supplementary group and that
//! user's id and group; each job's directory then belongs to that user.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishAckFuture};
use bytes::Bytes;
use capstan_protocol::job::Outcome;
use capstan_protocol::job_env;
use capstan_protocol::{JobRecord, JobStatus, NodeId, OutputSummary, headers, subjects};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::spawn::{Launch, Process};

/// How attempts are run on this node.
#[derive(Debug, Clone)]
pub struct Runner {
    /// This node.
    pub node: NodeId,
    /// Per-job directories and pid records live here.
    pub work_dir: PathBuf,
    /// Variables of the executor's own environment passed to jobs.
    pub pass_env: Vec<String>,
    /// Output kept per attempt (stdout and stderr together); the rest is counted, not kept.
    pub max_output_bytes: u64,
    /// Time between SIGTERM and SIGKILL at a timeout or shutdown.
    pub kill_grace: Duration,
    /// Time between SIGTERM and SIGKILL when a job is cancelled.
    pub cancel_grace: Duration,
    /// JetStream, for the logs stream.
    pub js: jetstream::Context,
    /// Clean job directories ready for reuse.
    pub directories: std::sync::Arc<DirectoryPool>,
    /// The user jobs run as, when not the executor's own.
    pub run_as: Option<JobUser>,
    /// Opens job secrets.
    pub secrets: crate::secrets::Secrets,
    /// Runs jobs on remote systems, on a gateway node.
    pub remote: Option<std::sync::Arc<crate::remote::Remote>>,
}

/// The user and group a job runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobUser {
    /// User id.
    pub uid: u32,
    /// Primary group id; the job has no other.
    pub gid: u32,
}

/// Per-job working directories, recycled: creating and removing a directory for every job was
/// the executor's largest cost after spawning. A job gets an empty directory of its own; when
/// it ends, a directory it left empty goes back to the pool, and one it filled is wiped off the
/// runtime and dropped.
#[derive(Debug, Default)]
pub struct DirectoryPool {
    free: std::sync::Mutex<Vec<PathBuf>>,
    created: std::sync::atomic::AtomicU64,
}

impl DirectoryPool {
    /// An empty directory under `work_dir`, owned by `owner` when given.
    fn take(&self, work_dir: &std::path::Path, owner: Option<JobUser>) -> std::io::Result<PathBuf> {
        if let Some(dir) = self.free.lock().ok().and_then(|mut free| free.pop()) {
            return Ok(dir);
        }
        let n = self
            .created
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = work_dir
            .join("jobs")
            .join(format!("{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        if let Some(owner) = owner {
            use std::os::unix::fs::PermissionsExt;
            std::os::unix::fs::chown(&dir, Some(owner.uid), Some(owner.gid))?;
            // Its parent must let the job's user through, whatever the umask made of it.
            let jobs = work_dir.join("jobs");
            let mut permissions = std::fs::metadata(&jobs)?.permissions();
            permissions.set_mode(permissions.mode() | 0o011);
            std::fs::set_permissions(&jobs, permissions)?;
        }
        Ok(dir)
    }

    /// Returns `dir` after a job: reused if empty, otherwise wiped in the background.
    fn give_back(&self, dir: PathBuf) {
        let empty = std::fs::read_dir(&dir).is_ok_and(|mut entries| entries.next().is_none());
        if empty {
            if let Ok(mut free) = self.free.lock() {
                free.push(dir);
            }
        } else {
            tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir));
        }
    }
}

impl Runner {
    /// Runs the current attempt of `record` to its end. `stops` end it early: the job was
    /// cancelled, or the executor's shutdown deadline passed.
    pub async fn run(&self, record: &JobRecord, stops: Stops) -> Outcome {
        let span = tracing::info_span!(
            "process",
            command = %record.spec.argv().first().map(String::as_str).unwrap_or_default(),
            exit_code = tracing::field::Empty,
            signal = tracing::field::Empty,
            status = tracing::field::Empty,
        );
        let started = std::time::Instant::now();
        let outcome = self
            .run_traced(record, stops)
            .instrument(span.clone())
            .await;
        crate::metrics::executor().attempt(
            outcome.status.as_str(),
            record.spec.system.is_some(),
            started.elapsed(),
        );
        if let Some(code) = outcome.exit_code {
            span.record("exit_code", code);
        }
        if let Some(signal) = outcome.signal {
            span.record("signal", signal);
        }
        span.record("status", outcome.status.as_str());
        outcome
    }

    async fn run_traced(&self, record: &JobRecord, stops: Stops) -> Outcome {
        if let Some(system) = &record.spec.system {
            return match &self.remote {
                Some(remote) => remote.run(self, record, system, stops).await,
                None => failed_to_start(format!(
                    "node {} is no gateway to remote systems (label capstan.io/ssh=true): \
                     cannot run on system `{system}`",
                    self.node
                )),
            };
        }
        let job_dir = match self.directories.take(&self.work_dir, self.run_as) {
            Ok(dir) => dir,
            Err(error) => {
                return failed_to_start(format!(
                    "cannot create a job directory under {}: {error}",
                    self.work_dir.display()
                ));
            }
        };
        let outcome = self.run_in(record, &job_dir, stops).await;
        self.directories.give_back(job_dir);
        outcome
    }

    async fn run_in(&self, record: &JobRecord, job_dir: &std::path::Path, stops: Stops) -> Outcome {
        let spec = &record.spec;
        let argv = spec.argv();
        let search_path: Option<std::ffi::OsString> =
            spec.env.get("PATH").map(Into::into).or_else(|| {
                self.pass_env
                    .iter()
                    .any(|name| name == "PATH")
                    .then(|| std::env::var_os("PATH"))
                    .flatten()
            });
        let Some(program) = resolve(&argv[0], search_path.as_deref()) else {
            return failed_to_start(format!(
                "cannot start `{}`: not found in PATH ({})",
                argv[0],
                search_path
                    .as_deref()
                    .map_or_else(|| "unset".into(), |p| p.to_string_lossy())
            ));
        };
        let cwd = spec.cwd.as_deref().map_or(job_dir, std::path::Path::new);
        let mut command = match Launch::new(&program, &argv[0], &argv[1..], cwd) {
            Ok(command) => command,
            Err(error) => return failed_to_start(format!("cannot start `{}`: {error}", argv[0])),
        };
        for name in &self.pass_env {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        for (name, value) in &spec.env {
            command.env(name, value);
        }
        // Secrets are opened here, in memory, and handed to the process only.
        let secrets = match self.secrets.open(record).await {
            Ok(secrets) => secrets,
            Err(error) => return failed_to_start(error),
        };
        for (name, value) in &secrets {
            command.env(name, value.as_str());
        }
        drop(secrets);
        command
            .env(job_env::JOB_ID, record.id.to_string())
            .env(job_env::ATTEMPT, record.attempt.to_string())
            .env(job_env::NODE_ID, self.node.as_str())
            .env(job_env::WORK_DIR, job_dir);
        // The process's own spans, if it makes any, nest under this attempt's process span.
        if let Some(traceparent) =
            capstan_telemetry::propagation::traceparent().or_else(|| record.traceparent.clone())
        {
            command.env(job_env::TRACEPARENT, traceparent);
        }
        command.stdin_piped(spec.stdin.is_some()).user(self.run_as);

        let spawning = std::time::Instant::now();
        let spawned = command.spawn();
        crate::metrics::executor().spawned(spawning.elapsed());
        let mut child = match spawned {
            Ok(child) => child,
            Err(error) => {
                return failed_to_start(format!("cannot start `{}`: {error}", argv[0]));
            }
        };
        let group = Pid::from_raw(i32::try_from(child.id()).expect("pids fit in i32"));

        if let (Some(mut stdin), Some(input)) = (child.stdin.take(), spec.stdin.clone()) {
            tokio::spawn(async move {
                // A process that exits without reading its input closes the pipe: not an error.
                let _ = stdin.write_all(input.as_bytes()).await;
                let _ = stdin.shutdown().await;
            });
        }
        let sink = Arc::new(LogSink::new(
            self.js.clone(),
            record,
            &self.node,
            self.max_output_bytes,
        ));
        let stdout = child
            .stdout
            .take()
            .map(|out| tokio::spawn(pump(out, sink.clone(), Stream::Stdout)));
        let stderr = child
            .stderr
            .take()
            .map(|err| tokio::spawn(pump(err, sink.clone(), Stream::Stderr)));

        let timeout = async {
            match spec.timeout {
                Some(limit) => tokio::time::sleep(limit).await,
                None => std::future::pending().await,
            }
        };
        let (status, ended_by) = tokio::select! {
            status = child.wait() => (status, None),
            _ = timeout => {
                (self.terminate(&mut child, group, self.kill_grace).await, Some(JobStatus::TimedOut))
            }
            _ = stops.cancel.cancelled() => {
                (self.terminate(&mut child, group, self.cancel_grace).await, Some(JobStatus::Cancelled))
            }
            _ = stops.shutdown.cancelled() => {
                (self.terminate(&mut child, group, self.kill_grace).await, Some(JobStatus::Failed))
            }
        };
        // Whatever the process left in its group (background children) dies with it.
        let _ = killpg(group, Signal::SIGKILL);
        // Pumps end at EOF; a descendant that left the group may still hold the pipes open. A
        // pump that panicked raises its panic here.
        for pump in [stdout, stderr].into_iter().flatten() {
            let abort = pump.abort_handle();
            match tokio::time::timeout(Duration::from_secs(2), pump).await {
                Ok(pumped) => {
                    capstan_mesh::task::joined(pumped);
                }
                Err(_) => abort.abort(),
            }
        }
        sink.finish().await;
        let output = sink.summary();

        let (exit_code, signal) = match &status {
            Ok(status) => (status.code(), status.signal()),
            Err(_) => (None, None),
        };
        let (status, error) = match (ended_by, &status) {
            (Some(stopped), _) => self.stopped(stopped, spec.timeout),
            (None, Err(error)) => (
                JobStatus::Failed,
                Some(format!("lost track of the process: {error}")),
            ),
            (None, Ok(status)) if status.success() => (JobStatus::Succeeded, None),
            (None, Ok(status)) => (
                JobStatus::Failed,
                status
                    .signal()
                    .map(|signal| format!("killed by signal {signal}")),
            ),
        };
        Outcome {
            status,
            exit_code,
            signal,
            error,
            output,
        }
    }

    /// How an attempt stopped before it ended by itself ended: `TimedOut` at its `timeout`,
    /// `Cancelled` on request, anything else handed back (`Lost`) by this node.
    pub(crate) fn stopped(
        &self,
        by: JobStatus,
        timeout: Option<Duration>,
    ) -> (JobStatus, Option<String>) {
        match by {
            JobStatus::TimedOut => (
                JobStatus::TimedOut,
                Some(format!(
                    "timed out after {:.3}s",
                    timeout.unwrap_or_default().as_secs_f64()
                )),
            ),
            JobStatus::Cancelled => (
                JobStatus::Cancelled,
                Some("cancelled by request".to_owned()),
            ),
            _ => (
                JobStatus::Lost,
                Some(format!(
                    "handed back: node {} stopped the attempt before it finished (shutdown or \
                     drain)",
                    self.node
                )),
            ),
        }
    }

    /// SIGTERM to the group, then SIGKILL after `grace`; returns the exit status.
    async fn terminate(
        &self,
        child: &mut Process,
        group: Pid,
        grace: Duration,
    ) -> std::io::Result<std::process::ExitStatus> {
        let _ = killpg(group, Signal::SIGTERM);
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                let _ = killpg(group, Signal::SIGKILL);
                child.wait().await
            }
        }
    }
}

/// The program to run: `program` itself when it names a path, else the first executable file
/// of that name in `search_path` (default `/usr/local/bin:/usr/bin:/bin`).
fn resolve(program: &str, search_path: Option<&std::ffi::OsStr>) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if program.contains('/') {
        return Some(program.into());
    }
    let default = std::ffi::OsStr::new("/usr/local/bin:/usr/bin:/bin");
    std::env::split_paths(search_path.unwrap_or(default))
        .map(|dir| dir.join(program))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// What can stop an attempt before it ends by itself.
#[derive(Debug, Clone, Default)]
pub struct Stops {
    /// The job was cancelled.
    pub cancel: CancellationToken,
    /// The executor hands the attempt back: its shutdown or drain deadline passed, or the
    /// attempt was taken from it.
    pub shutdown: CancellationToken,
}

pub(crate) fn failed_to_start(error: String) -> Outcome {
    Outcome {
        status: JobStatus::Failed,
        exit_code: None,
        signal: None,
        error: Some(error),
        output: OutputSummary::default(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

async fn pump(mut reader: impl AsyncRead + Unpin, sink: Arc<LogSink>, stream: Stream) {
    let mut buffer = vec![0u8; 32 * 1024];
    loop {
        match reader.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => sink.write(stream, &buffer[..read]).await,
        }
    }
}

/// Publishes output chunks to the job's log subject, keeping at most the cap.
pub(crate) struct LogSink {
    js: jetstream::Context,
    subject: String,
    attempt: String,
    cap: u64,
    kept: AtomicU64,
    stdout_bytes: AtomicU64,
    stderr_bytes: AtomicU64,
    state: Mutex<SinkState>,
}

#[derive(Default)]
struct SinkState {
    truncated: bool,
    pending: std::collections::VecDeque<PublishAckFuture>,
}

/// Unacknowledged log publishes allowed before writing waits; bounds memory and applies
/// backpressure to a process that writes faster than the stream stores.
const MAX_PENDING_LOG_ACKS: usize = 64;

impl LogSink {
    pub(crate) fn new(js: jetstream::Context, record: &JobRecord, node: &NodeId, cap: u64) -> Self {
        Self {
            js,
            subject: subjects::logs(record.id, node),
            attempt: record.attempt.to_string(),
            cap,
            kept: AtomicU64::new(0),
            stdout_bytes: AtomicU64::new(0),
            stderr_bytes: AtomicU64::new(0),
            state: Mutex::new(SinkState::default()),
        }
    }

    fn counter(&self, stream: Stream) -> &AtomicU64 {
        match stream {
            Stream::Stdout => &self.stdout_bytes,
            Stream::Stderr => &self.stderr_bytes,
        }
    }

    pub(crate) async fn write(&self, stream: Stream, chunk: &[u8]) {
        let offset = self
            .counter(stream)
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        let mut state = self.state.lock().await;
        if state.truncated {
            return;
        }
        let kept = self.kept.load(Ordering::Relaxed);
        let room = self.cap.saturating_sub(kept);
        let take = usize::try_from(room).unwrap_or(usize::MAX).min(chunk.len());
        if take > 0 {
            self.kept.fetch_add(take as u64, Ordering::Relaxed);
            let mut map = self.headers(stream);
            map.insert(headers::LOG_OFFSET, offset.to_string().as_str());
            self.publish(&mut state, map, Bytes::copy_from_slice(&chunk[..take]))
                .await;
        }
        if take < chunk.len() {
            state.truncated = true;
            let mut map = self.headers(stream);
            map.insert(headers::LOG_TRUNCATED, "true");
            let note = format!(
                "[capstan: output truncated after {} bytes; the rest was counted, not kept]\n",
                self.cap
            );
            self.publish(&mut state, map, Bytes::from(note)).await;
        }
    }

    fn headers(&self, stream: Stream) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert(headers::LOG_STREAM, stream.as_str());
        map.insert(headers::ATTEMPT, self.attempt.as_str());
        map
    }

    async fn publish(&self, state: &mut SinkState, map: HeaderMap, payload: Bytes) {
        match self
            .js
            .publish_with_headers(self.subject.clone(), map, payload)
            .await
        {
            Ok(ack) => state.pending.push_back(ack),
            Err(error) => {
                tracing::warn!(subject = %self.subject, error = %error, "cannot publish output")
            }
        }
        while state.pending.len() > MAX_PENDING_LOG_ACKS {
            if let Some(ack) = state.pending.pop_front()
                && let Err(error) = ack.await
            {
                tracing::warn!(subject = %self.subject, error = %error, "output chunk not stored");
            }
        }
    }

    /// Waits until every chunk is stored, so the job's end is announced after its output.
    pub(crate) async fn finish(&self) {
        let mut state = self.state.lock().await;
        while let Some(ack) = state.pending.pop_front() {
            if let Err(error) = ack.await {
                tracing::warn!(subject = %self.subject, error = %error, "output chunk not stored");
            }
        }
    }

    pub(crate) fn summary(&self) -> OutputSummary {
        let stdout_bytes = self.stdout_bytes.load(Ordering::Relaxed);
        let stderr_bytes = self.stderr_bytes.load(Ordering::Relaxed);
        OutputSummary {
            stdout_bytes,
            stderr_bytes,
            truncated: stdout_bytes + stderr_bytes > self.cap,
        }
    }
}
