//! Changes to a job's life requested from outside: cancellation. Shared by the API and the
//! scheduler's NATS endpoint so both behave the same.

use bytes::Bytes;
use capstan_protocol::topology::FINISHED_JOB_TTL;
use capstan_protocol::{
    CancelNotice, CancelOutcome, JobEvent, JobEventKind, JobId, JobRecord, JobStatus, Timestamp,
    codec, subjects,
};

use crate::connect::Mesh;
use crate::error::Error;
use crate::wire::msgpack_headers;

/// Why a job cannot be cancelled.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    /// No such job (or its record expired).
    #[error("no job {0}")]
    NotFound(JobId),
    /// The job already ended.
    #[error("job {id} already finished: {status}")]
    Finished {
        /// The job.
        id: JobId,
        /// How it ended.
        status: JobStatus,
    },
    /// NATS failed; retry.
    #[error(transparent)]
    Mesh(#[from] Error),
}

/// Cancels `id`. A job that has not started is cancelled at once (by compare-and-swap, so an
/// executor claiming it at the same moment either wins and the job is treated as running, or
/// loses and drops its dispatch). A running job is marked for cancellation and its executor is
/// told; the executor stops the process group and records `cancelled`. Asking again is
/// harmless.
pub async fn cancel(mesh: &Mesh, id: JobId) -> Result<(CancelOutcome, JobRecord), CancelError> {
    let key = id.to_string();
    for _ in 0..8 {
        let Some(current) = mesh.jobs.get(&key).await? else {
            return Err(CancelError::NotFound(id));
        };
        let record = current.value;
        if record.status.is_terminal() {
            return Err(CancelError::Finished {
                id,
                status: record.status,
            });
        }
        let now = Timestamp::now();
        if record.status == JobStatus::Pending {
            let cancelled = record.cancelled(now);
            match mesh
                .jobs
                .update_with_ttl(&key, &cancelled, current.revision, FINISHED_JOB_TTL)
                .await
            {
                Ok(_) => {
                    mesh.events
                        .job(&JobEvent::new(JobEventKind::Cancelled, &cancelled))
                        .await?;
                    tracing::info!(job = %id, "cancelled before it ran");
                    return Ok((CancelOutcome::Cancelled, cancelled));
                }
                Err(Error::Conflict { .. }) => continue,
                Err(error) => return Err(error.into()),
            }
        }
        // Running: mark it (once), then tell its node.
        let marked = if record.cancel_requested_at.is_some() {
            record
        } else {
            let marked = JobRecord {
                cancel_requested_at: Some(now),
                updated_at: now,
                ..record
            };
            match mesh.jobs.update(&key, &marked, current.revision).await {
                Ok(_) => marked,
                Err(Error::Conflict { .. }) => continue,
                Err(error) => return Err(error.into()),
            }
        };
        if let Some(node) = &marked.node {
            let notice = CancelNotice {
                job: id,
                attempt: marked.attempt,
            };
            let payload = Bytes::from(codec::to_msgpack(&notice).map_err(Error::from)?);
            mesh.client
                .publish_with_headers(
                    subjects::control(node, "cancel"),
                    msgpack_headers(),
                    payload,
                )
                .await
                .map_err(|e| Error::unavailable("cancel notice", e))?;
        }
        tracing::info!(job = %id, "cancellation requested");
        return Ok((CancelOutcome::Requested, marked));
    }
    Err(CancelError::Mesh(Error::Unavailable {
        op: "cancel",
        reason: "the job's record kept changing".into(),
    }))
}
