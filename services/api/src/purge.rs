//! The admin purge: removing finished jobs everywhere Capstan keeps them, in bounded batches.
//!
//! For each job of a batch, its live record is checked first (the jobs bucket is the truth
//! while a job lives: a record that is not finished is left alone, whatever the history says);
//! then its idempotency key (if it still names the job), its record, its events and its output
//! are removed from NATS, and last its history
//! rows, so a purge interrupted halfway leaves rows that a second purge finds again. Removing
//! the events too keeps `capstan history rebuild` from bringing purged jobs back.

use capstan_protocol::{JobId, JobStatus, Timestamp, subjects, topology};
use futures::StreamExt;

use crate::State;
use crate::model::access::Purged;
use crate::problem::ApiError;

/// Jobs purged at once within a batch.
const CONCURRENCY: usize = 16;

/// Purges at most `limit` jobs in `statuses` that finished before `before`, `batch` at a time.
pub(crate) async fn purge(
    state: &State,
    statuses: &[JobStatus],
    before: Timestamp,
    limit: u64,
    batch: u64,
) -> Result<Purged, ApiError> {
    let unavailable = |e: async_nats::jetstream::context::GetStreamError| {
        ApiError::unavailable(format!("cannot open a stream: {e}"))
    };
    let events = state
        .mesh
        .js
        .get_stream(topology::EVENTS.name)
        .await
        .map_err(unavailable)?;
    let logs = state
        .mesh
        .js
        .get_stream(topology::LOGS.name)
        .await
        .map_err(unavailable)?;
    let mut report = Purged {
        purged: 0,
        skipped: 0,
        more: false,
    };
    let mut after: Option<String> = None;
    loop {
        let room = limit.saturating_sub(report.purged);
        let want = batch.min(room).max(1);
        let ids = state
            .history
            .purgeable(statuses, before, after.as_deref(), want)
            .await?;
        if room == 0 {
            report.more = !ids.is_empty();
            break;
        }
        let Some(last) = ids.last() else { break };
        after = Some(last.clone());
        let outcomes: Vec<Result<Option<String>, ApiError>> = futures::stream::iter(ids)
            .map(|id| {
                let (events, logs) = (&events, &logs);
                async move {
                    let Ok(job) = id.parse::<JobId>() else {
                        return Ok(Some(id));
                    };
                    let live = state.mesh.jobs.get(&id).await?;
                    if let Some(live) = &live {
                        if !live.value.status.is_terminal() {
                            return Ok(None);
                        }
                        // Its idempotency key would name a job that no longer exists.
                        if let Some(key) = &live.value.spec.idempotency_key {
                            state.mesh.idempotency.forget(key, job).await?;
                        }
                    }
                    let failed = |what: &str, e: String| {
                        ApiError::unavailable(format!("cannot purge the {what} of job {job}: {e}"))
                    };
                    state
                        .mesh
                        .jobs
                        .kv()
                        .purge(&id)
                        .await
                        .map_err(|e| failed("record", e.to_string()))?;
                    events
                        .purge()
                        .filter(subjects::job_events(job))
                        .await
                        .map_err(|e| failed("events", e.to_string()))?;
                    logs.purge()
                        .filter(subjects::job_logs(job))
                        .await
                        .map_err(|e| failed("output", e.to_string()))?;
                    Ok(Some(id))
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let mut removable = Vec::with_capacity(outcomes.len());
        for outcome in outcomes {
            match outcome? {
                Some(id) => removable.push(id),
                None => report.skipped += 1,
            }
        }
        report.purged += state.history.delete_jobs(&removable).await?;
    }
    tracing::info!(
        purged = report.purged,
        skipped = report.skipped,
        more = report.more,
        "purged finished jobs"
    );
    Ok(report)
}
