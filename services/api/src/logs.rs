//! Job output, read from the logs stream: everything captured so far for one attempt, or a
//! live follow that ends when the job does.
//!
//! The executor stores all of an attempt's output before it records the attempt's end, so
//! once a job is seen finished, reading the log subject to its current end reads everything.
//!
//! Output is stored on `capstan.logs.<job>.<node>`, and a node may publish only under its own
//! name; a chunk is kept only when its node is the one that ran its attempt (from the live
//! record, or the history's attempts), so no other node can put words in a job's output.

use std::collections::BTreeMap;

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::kv::Operation;
use capstan_mesh::{Mesh, wire};
use capstan_protocol::{JobId, JobRecord, NodeId, headers, subjects, topology};
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::mpsc;

use crate::State;
use crate::model::{JobLogs, LogEvent, LogEventKind, Status};
use crate::problem::ApiError;
use crate::replay;

/// What is known of a job when its logs are asked for.
#[derive(Debug, Clone)]
pub struct JobState {
    /// The current attempt.
    pub attempt: u32,
    /// The job has ended.
    pub finished: bool,
    /// Output was truncated (from the record).
    pub truncated: bool,
    /// The live record, while the jobs bucket still has it.
    pub record: Option<JobRecord>,
    /// The node of each attempt known so far.
    pub nodes: BTreeMap<u32, NodeId>,
}

impl JobState {
    /// Whether `chunk` was written by the node that ran its attempt.
    fn wrote(&self, chunk: &Chunk) -> bool {
        chunk.node.is_some() && self.nodes.get(&chunk.attempt) == chunk.node.as_ref()
    }

    /// Learns the node of the record's attempt.
    fn learn(&mut self, record: &JobRecord) {
        if let Some(node) = &record.node {
            self.nodes.insert(record.attempt, node.clone());
        }
    }
}

/// The node of each attempt the history knows.
async fn attempt_nodes(state: &State, id: JobId) -> Result<BTreeMap<u32, NodeId>, ApiError> {
    Ok(state
        .history
        .attempts(id)
        .await?
        .into_iter()
        .filter_map(|row| {
            let attempt = u32::try_from(row.attempt).ok()?;
            let node = row.node.as_deref().and_then(|n| NodeId::new(n).ok())?;
            Some((attempt, node))
        })
        .collect())
}

/// The job's current attempt and whether it ended, from the live record, the history, or
/// its stored submission (a job accepted that no scheduler has created yet: no output so
/// far, and a follow waits for its record); `404` when none knows the job.
pub(crate) async fn job_state(state: &State, id: JobId) -> Result<JobState, ApiError> {
    if let Some(live) = state.mesh.jobs.get(&id.to_string()).await? {
        let record = live.value;
        // Earlier attempts' nodes from the history; the current one's from the record.
        let nodes = if record.attempt > 1 {
            attempt_nodes(state, id).await?
        } else {
            BTreeMap::new()
        };
        let mut job = JobState {
            attempt: record.attempt,
            finished: record.status.is_terminal(),
            truncated: record.output.is_some_and(|o| o.truncated),
            record: None,
            nodes,
        };
        job.learn(&record);
        job.record = Some(record);
        return Ok(job);
    }
    match state.history.get(id).await? {
        Some(row) => Ok(JobState {
            attempt: u32::try_from(row.attempt).unwrap_or(0),
            finished: row
                .status
                .parse::<capstan_protocol::JobStatus>()
                .is_ok_and(|s| s.is_terminal()),
            truncated: row.truncated.unwrap_or(false),
            record: None,
            nodes: attempt_nodes(state, id).await?,
        }),
        None => match crate::routes::accepted(state, id).await? {
            Some(record) => {
                let mut job = JobState {
                    attempt: record.attempt,
                    finished: record.status.is_terminal(),
                    truncated: false,
                    record: None,
                    nodes: BTreeMap::new(),
                };
                job.learn(&record);
                job.record = Some(record);
                Ok(job)
            }
            None => Err(ApiError::not_found(format!("no job {id}"))),
        },
    }
}

/// Which of a process's outputs a chunk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    /// From the chunk's `Capstan-Stream` header: `stderr`, or standard output (also when the
    /// header is missing or names something else, as the executor never writes).
    fn of(header: Option<&str>) -> Self {
        match header {
            Some("stderr") => Self::Stderr,
            _ => Self::Stdout,
        }
    }
}

impl From<Stream> for LogEventKind {
    fn from(stream: Stream) -> Self {
        match stream {
            Stream::Stdout => Self::Stdout,
            Stream::Stderr => Self::Stderr,
        }
    }
}

/// One stored piece of output.
struct Chunk {
    stream: Stream,
    attempt: u32,
    truncated: bool,
    data: bytes::Bytes,
    /// The node that wrote it, from its subject.
    node: Option<NodeId>,
}

fn chunk_of(message: &async_nats::Message) -> Chunk {
    let map = message.headers.as_ref();
    Chunk {
        node: subjects::parse_logs(&message.subject).map(|(_, node)| node),
        stream: Stream::of(wire::header(map, headers::LOG_STREAM)),
        attempt: wire::header(map, headers::ATTEMPT)
            .and_then(|a| a.parse().ok())
            .unwrap_or(0),
        truncated: wire::header(map, headers::LOG_TRUNCATED).is_some(),
        data: message.payload.clone(),
    }
}

/// The stream sequence of the job's last stored chunk (0 when it has none).
async fn last_sequence(
    stream: &async_nats::jetstream::stream::Stream,
    id: JobId,
) -> Result<u64, String> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    match stream
        .get_last_raw_message_by_subject(&subjects::job_logs(id))
        .await
    {
        Ok(message) => Ok(message.sequence),
        Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(0),
        Err(error) => Err(error.to_string()),
    }
}

/// Every chunk stored so far, in order.
async fn stored(mesh: &Mesh, id: JobId) -> Result<Vec<Chunk>, ApiError> {
    let messages = replay::stored(
        mesh,
        topology::LOGS.name,
        subjects::job_logs(id),
        DeliverPolicy::All,
    )
    .await?;
    Ok(messages.iter().map(|m| chunk_of(&m.message)).collect())
}

/// The output of `attempt` (default: the current one) captured so far.
pub async fn captured(
    mesh: &Mesh,
    id: JobId,
    attempt: Option<u32>,
    state: &JobState,
) -> Result<JobLogs, ApiError> {
    let attempt = attempt.unwrap_or(state.attempt);
    if attempt > state.attempt {
        return Err(ApiError::not_found(format!(
            "job {id} has no attempt {attempt}"
        )));
    }
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let mut truncated = false;
    for chunk in stored(mesh, id)
        .await?
        .into_iter()
        .filter(|c| c.attempt == attempt && state.wrote(c))
    {
        if chunk.truncated {
            truncated = true;
            continue;
        }
        match chunk.stream {
            Stream::Stderr => stderr.extend_from_slice(&chunk.data),
            Stream::Stdout => stdout.extend_from_slice(&chunk.data),
        }
    }
    Ok(JobLogs {
        job_id: id.to_string(),
        attempt,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        truncated: truncated || (attempt == state.attempt && state.truncated),
        complete: state.finished || attempt < state.attempt,
    })
}

/// Output as it is produced, then an `end` event once the job has ended and every chunk was
/// sent. Ends early if the client goes away.
pub fn follow(mesh: Mesh, id: JobId, state: JobState) -> BoxStream<'static, LogEvent> {
    let (sender, receiver) = mpsc::channel::<LogEvent>(64);
    tokio::spawn(async move {
        if let Err(error) = pump(&mesh, id, state, &sender).await {
            tracing::debug!(job = %id, error = ?error, "log follow ended early");
        }
    });
    futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|event| (event, receiver))
    })
    .boxed()
}

async fn pump(
    mesh: &Mesh,
    id: JobId,
    mut state: JobState,
    sender: &mpsc::Sender<LogEvent>,
) -> Result<(), String> {
    let stream = replay::stream(mesh, topology::LOGS.name)
        .await
        .map_err(|e| format!("{e:?}"))?;
    let (mut messages, _) = replay::ordered(
        mesh,
        topology::LOGS.name,
        subjects::job_logs(id),
        DeliverPolicy::All,
    )
    .await
    .map_err(|e| format!("{e:?}"))?;
    let key = id.to_string();
    // The watch starts with the record's current value, so an end that happened just before
    // it was created is not missed.
    let mut watch = mesh
        .jobs
        .kv()
        .watch_with_history(&key)
        .await
        .map_err(|e| e.to_string())?;
    let mut ended: Option<(Status, Option<i32>, u32)> = match (&state.record, state.finished) {
        (Some(record), true) => Some((record.status.into(), record.exit_code, record.attempt)),
        // Only the history knows it: it ended long ago, and only its output matters now.
        (None, true) => Some((Status::Succeeded, None, state.attempt)),
        (_, false) => None,
    };
    // Output and the end travel on different subjects, so a chunk stored just before the end
    // may not have reached this reader when the end does. Once the end is known, the log
    // subject's last sequence at that moment is where the output stops.
    let mut last = match ended {
        Some(_) => Some(last_sequence(&stream, id).await?),
        None => None,
    };
    let mut delivered = 0u64;
    let mut looked_up = state.attempt;
    loop {
        if let (Some((status, exit_code, attempt)), Some(last)) = (ended, last)
            && delivered >= last
        {
            let end = LogEvent {
                kind: LogEventKind::End,
                attempt,
                data: None,
                status: Some(status),
                exit_code,
            };
            let _ = sender.send(end).await;
            return Ok(());
        }
        tokio::select! {
            _ = sender.closed() => return Ok(()),
            message = messages.next() => {
                let message = match message {
                    Some(Ok(message)) => message,
                    Some(Err(error)) => return Err(error.to_string()),
                    None => return Err("log stream closed".into()),
                };
                if let Ok(info) = message.info() {
                    delivered = delivered.max(info.stream_sequence);
                }
                let chunk = chunk_of(&message.message);
                // An attempt newer than what this follow has seen of the record: read it once
                // per attempt number, so chunks claiming unknown attempts cost one read each
                // number, not each chunk.
                if !state.nodes.contains_key(&chunk.attempt) && chunk.attempt > looked_up {
                    looked_up = chunk.attempt;
                    if let Ok(Some(live)) = mesh.jobs.get(&key).await {
                        state.learn(&live.value);
                    }
                }
                if chunk.truncated || !state.wrote(&chunk) {
                    continue;
                }
                let event = LogEvent {
                    kind: chunk.stream.into(),
                    attempt: chunk.attempt,
                    data: Some(String::from_utf8_lossy(&chunk.data).into_owned()),
                    status: None,
                    exit_code: None,
                };
                if sender.send(event).await.is_err() {
                    return Ok(());
                }
            }
            entry = watch.next(), if ended.is_none() => {
                let Some(Ok(entry)) = entry else {
                    return Err("job watch ended".into());
                };
                if entry.operation != Operation::Put {
                    continue;
                }
                if let Ok(record) = mesh.jobs.decode(&entry.key, &entry.value) {
                    state.learn(&record);
                    if record.status.is_terminal() {
                        ended = Some((record.status.into(), record.exit_code, record.attempt));
                        last = Some(last_sequence(&stream, id).await?);
                    }
                }
            }
        }
    }
}
