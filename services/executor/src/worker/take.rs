//! The fast lane: a submission taken from the shared consumer by this node while it has a
//! free slot. A plain job (`JobSpec::needs_placement` says none is needed) runs here at once:
//! its record is created already running on this node, in one write, where a scheduler would
//! have created it, dispatched it and had it claimed. Anything else is handed on to the
//! schedulers (`capstan.jobs.place.<job>`), as is a submission that finds no slot or its job
//! already recorded. The submission stays unacknowledged while the attempt runs, kept alive
//! like a dispatch: if this instance dies, it comes back, and whoever takes it finds the
//! record (a node that restarted ends its predecessor's attempt `lost`; a scheduler ends it,
//! or dispatches it to its node so that the lost-node settlement holds it from then on).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use capstan_mesh::intake::{self, Stored, Submission};
use capstan_mesh::{Error, lifecycle};
use capstan_protocol::claim::{self, Decision};
use capstan_protocol::job::Outcome;
use capstan_protocol::subjects::Origin;
use capstan_protocol::{AuditAction, AuditOutcome, JobRecord, Timestamp, retry};
use tracing::Instrument;

use super::Worker;
use super::held::Hold;
use super::slots::Slot;
use crate::runner::Stops;

impl Worker {
    /// Handles a submission taken from the shared consumer; `slot` is the slot it runs in,
    /// `None` when every slot was taken by the time it arrived.
    pub(super) async fn take(self: Arc<Self>, message: jetstream::Message, slot: Option<Slot>) {
        let Ok(info) = message.info() else {
            tracing::error!(subject = %message.subject, "submission without JetStream metadata");
            let _ = message.ack_with(AckKind::Term).await;
            return;
        };
        let stored = Stored {
            seq: info.stream_sequence,
            published_ms: (info.published.unix_timestamp_nanos() / 1_000_000) as u64,
        };
        let delivered = info.delivered;
        let submission = match intake::read(
            &message.subject,
            message.headers.as_ref(),
            &message.payload,
            stored,
            self.max_job_bytes,
        ) {
            Ok(submission) => submission,
            Err(refused) => {
                self.mesh
                    .events
                    .reject_stored(
                        Origin::Submit,
                        &message,
                        refused.job,
                        refused.code,
                        refused.field,
                        refused.reason,
                    )
                    .await;
                return;
            }
        };
        let span = tracing::info_span!(
            "accept job",
            otel.kind = "consumer",
            job_id = %submission.id,
            node = %self.node,
        );
        capstan_telemetry::propagation::follow(&span, message.headers.as_ref());
        async {
            let placement = submission
                .spec
                .needs_placement(self.node.as_str(), &self.labels);
            match slot {
                Some(slot) if placement.is_none() && self.takes_submissions() => {
                    self.run_here(&message, submission, slot, delivered).await;
                }
                _ => {
                    tracing::debug!(job = %submission.id, ?placement, "submission handed on for placement");
                    self.hand_on(&message, &submission, delivered).await;
                }
            }
        }
        .instrument(span)
        .await;
    }

    /// Creates the job's record running on this node and runs the attempt; a record that
    /// exists already is this submission come back.
    async fn run_here(
        &self,
        message: &jetstream::Message,
        submission: Submission,
        slot: Slot,
        delivered: i64,
    ) {
        let id = submission.id;
        let stops = Stops::default();
        match self.held.hold(id, 1, stops.clone()) {
            Hold::Held => {}
            // The job is held here already: this submission delivered again while it runs, or
            // another submission under the same id. The schedulers tell which (`resume`).
            Hold::AlreadyHeld | Hold::OtherAttempt(_) => {
                drop(slot);
                self.hand_on(message, &submission, delivered).await;
                return;
            }
        }
        // A client's submission is on the audit trail before its job exists (and so before
        // the submission is acknowledged); if it cannot be yet, the submission comes back.
        if !self.audited(&submission).await {
            self.held.release(id);
            let delay = retry::limits::unclaimed_dispatch_delay(delivered);
            let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
            return;
        }
        let now = Timestamp::now();
        let mut record = JobRecord::new(id, submission.spec.clone(), now)
            .assigned(self.node.clone(), now)
            .started(self.instance, now);
        record.submission_seq = Some(submission.seq);
        record.submitted_by = Some(submission.submitted_by.clone());
        record.traceparent = capstan_telemetry::propagation::traceparent();
        let created = self.mesh.jobs.create(&id.to_string(), &record).await;
        let revision = match created {
            Ok(revision) => revision,
            Err(Error::AlreadyExists { .. }) => {
                self.held.release(id);
                drop(slot);
                self.come_back(message, &submission, delivered).await;
                return;
            }
            Err(error) => {
                self.held.release(id);
                tracing::warn!(job = %id, error = %error, "cannot create a taken job's record; it will be redelivered");
                let delay = retry::limits::unclaimed_dispatch_delay(delivered);
                let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
                return;
            }
        };
        tracing::debug!(job = %id, "job taken at once");
        crate::metrics::executor().taken();
        let span = tracing::info_span!(
            "run attempt",
            job_id = %id,
            attempt = record.attempt,
            node = %self.node,
        );
        self.run_claimed(
            message,
            self.submission_ack_wait(),
            record,
            revision,
            stops,
            slot,
        )
        .instrument(span)
        .await;
        self.held.release(id);
    }

    /// Whether `submission` is on the audit trail, as a client's must be before it is
    /// acknowledged (under the key every service uses for it, so once however often it is
    /// tried); true at once for the mesh's own.
    async fn audited(&self, submission: &Submission) -> bool {
        if !submission.from_client {
            return true;
        }
        let stored = self
            .mesh
            .events
            .audit_client(
                AuditAction::JobSubmit,
                &submission.submitted_by,
                submission.id,
                AuditOutcome::Success,
                Some(submission.audit_key()),
            )
            .await;
        if let Err(error) = &stored {
            tracing::warn!(job = %submission.id, error = %error, "cannot audit a submission yet");
        }
        stored.is_ok()
    }

    /// A submission whose job is recorded already: delivered again after this node took it
    /// (its acknowledgement lost, or its taker gone), or the same id submitted twice.
    async fn come_back(
        &self,
        message: &jetstream::Message,
        submission: &Submission,
        delivered: i64,
    ) {
        let id = submission.id;
        let current = match self.mesh.jobs.get(&id.to_string()).await {
            Ok(Some(current)) => current,
            Ok(None) => {
                // Recorded, then removed: nothing left to do.
                let _ = message.ack().await;
                return;
            }
            Err(error) => {
                tracing::warn!(job = %id, error = %error, "cannot read a taken job's record");
                let delay = retry::limits::unclaimed_dispatch_delay(delivered);
                let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
                return;
            }
        };
        let record = current.value;
        if record.submission_seq != Some(submission.seq) {
            // Another submission's job, or the same one again: the schedulers tell which.
            self.hand_on(message, submission, delivered).await;
            return;
        }
        match claim::decide(Some(&record), record.attempt, &self.node, self.instance) {
            Decision::Ended => {
                let followed = if self.audited(submission).await {
                    lifecycle::follow_up(&self.mesh, &record).await
                } else {
                    Err(Error::unavailable("audit", "not stored"))
                };
                if let Err(error) = followed {
                    tracing::warn!(job = %id, error = %error, "cannot settle an ended job's submission yet");
                    let _ = message
                        .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                        .await;
                    return;
                }
                let _ = message.ack().await;
            }
            Decision::Orphaned => {
                // A predecessor of this node took it and died with it.
                let outcome = Outcome::lost(format!(
                    "lost: the executor instance running it ({}) on node {} stopped before it finished",
                    record.instance.map(|i| i.to_string()).unwrap_or_default(),
                    self.node
                ));
                match lifecycle::end_attempt(&self.mesh, &record, current.revision, &outcome).await
                {
                    Ok(_) | Err(Error::Conflict { .. }) => {
                        let _ = message.ack().await;
                    }
                    Err(error) => {
                        tracing::warn!(job = %id, error = %error, "cannot end a predecessor's attempt");
                        let _ = message
                            .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                            .await;
                    }
                }
            }
            // Running here, or on another node, or placed by a scheduler: the schedulers
            // settle it (`resume`), knowing which nodes are alive.
            Decision::AlreadyOurs | Decision::Stale | Decision::Take => {
                self.hand_on(message, submission, delivered).await;
            }
        }
    }

    /// Hands a submission on to the schedulers, then acknowledges it.
    async fn hand_on(&self, message: &jetstream::Message, submission: &Submission, delivered: i64) {
        let forward = intake::forward(submission, message.headers.as_ref());
        let stored = async {
            self.mesh
                .js
                .publish_with_headers(forward.subject, forward.headers, message.payload.clone())
                .await
                .map_err(|e| Error::unavailable("hand on", e))?
                .await
                .map_err(|e| Error::unavailable("hand on", e))
        }
        .await;
        match stored {
            Ok(_) => {
                crate::metrics::executor().handed_on();
                if let Err(error) = message.ack().await {
                    // Delivered again, it is handed on again under the same deduplication id.
                    tracing::debug!(error = %error, "cannot acknowledge a submission handed on");
                }
            }
            Err(error) => {
                tracing::warn!(job = %submission.id, error = %error, "cannot hand a submission on; it will be redelivered");
                let delay = retry::limits::unclaimed_dispatch_delay(delivered);
                let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
            }
        }
    }
}
