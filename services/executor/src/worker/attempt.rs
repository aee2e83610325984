//! One attempt's life, from its dispatch to its acknowledgement: decode and route the
//! dispatch, claim the attempt on the job's record, or hand it back while the node drains, or
//! quarantine a job whose dispatch keeps coming back; then run it, write its outcome and announce it, and only then
//! acknowledge the dispatch. The slot it runs in is `pull`'s; stopping it is `control`'s.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use capstan_mesh::{Error, lifecycle};
use capstan_protocol::job::Outcome;
use capstan_protocol::retry;
use capstan_protocol::subjects::Origin;
use capstan_protocol::{
    Dispatch, JobEvent, JobEventKind, JobId, JobRecord, JobStatus, NodeId, RejectionCode, Timestamp,
};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::Worker;
use crate::runner::Stops;

/// What became of an attempt's outcome.
enum Recorded {
    /// Written and followed up (timer armed, event published).
    Done(Box<JobRecord>),
    /// The attempt no longer owned the job; nothing written.
    Stale,
    /// Written, but the timer or event could not be published yet.
    Unannounced,
}

enum Claimed {
    /// Run it: the record (now `running`) and its revision.
    Run(Box<JobRecord>, u64),
    /// Nothing to run; acknowledge the dispatch.
    Settled,
}

impl Worker {
    /// Handles one dispatch; `permit` is its slot.
    pub(super) async fn handle(
        self: Arc<Self>,
        message: jetstream::Message,
        permit: OwnedSemaphorePermit,
    ) {
        let dispatch: Dispatch =
            match capstan_mesh::wire::decode(message.headers.as_ref(), &message.payload) {
                Ok((dispatch, _)) => dispatch,
                Err(error) => {
                    let reason = error.to_string();
                    self.reject(&message, None, error.code, error.field, reason)
                        .await;
                    return;
                }
            };
        let record = &dispatch.record;
        if record.node.as_ref() != Some(&self.node) {
            let reason = format!(
                "dispatch for node {} delivered to node {}",
                record.node.as_ref().map_or("none", NodeId::as_str),
                self.node
            );
            self.reject(
                &message,
                Some(record.id),
                RejectionCode::Misrouted,
                Some("record.node".into()),
                reason,
            )
            .await;
            return;
        }
        let stops = Stops::default();
        if !self.held.hold(record.id, record.attempt, stops.clone()) {
            // Redelivered while we run it (a progress ack came late): the running attempt
            // acknowledges the message when it ends.
            return;
        }
        let id = record.id;
        let span = tracing::info_span!(
            "run attempt",
            otel.kind = "consumer",
            job_id = %id,
            attempt = record.attempt,
            node = %self.node,
        );
        capstan_telemetry::propagation::follow(&span, message.headers.as_ref());
        self.carry(&message, dispatch, stops).instrument(span).await;
        self.held.release(id);
        drop(permit);
    }

    /// Claims, runs, records and announces one attempt, and settles its dispatch.
    async fn carry(&self, message: &jetstream::Message, dispatch: Dispatch, stops: Stops) {
        let id = dispatch.record.id;
        let attempt = dispatch.record.attempt;
        let delivered = message.info().map(|info| info.delivered).unwrap_or(1);
        let claimed = if self.draining() {
            self.give_back(dispatch).await
        } else if delivered > retry::limits::MAX_DISPATCH_DELIVERIES {
            self.quarantine(dispatch, delivered).await
        } else {
            self.claim(dispatch).await
        };
        let (running, revision) = match claimed {
            Ok(Claimed::Run(record, revision)) => (*record, revision),
            Ok(Claimed::Settled) => {
                let _ = message.ack().await;
                return;
            }
            Err(error) => {
                tracing::warn!(job = %id, attempt, error = %error, "cannot claim attempt; it will be redelivered");
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
                return;
            }
        };
        if let Err(error) = self
            .mesh
            .events
            .job(&JobEvent::new(JobEventKind::Running, &running))
            .await
        {
            tracing::warn!(job = %id, error = %error, "cannot announce start");
        }
        tracing::debug!(job = %id, attempt, "attempt started");

        let keep_alive = self.keep_alive(message);
        if running.cancel_requested_at.is_some() {
            stops.cancel.cancel();
        }
        let handed_back = stops.shutdown.clone();
        let outcome = self.runner.run(&running, stops).await;
        // From here on the record changes because of this attempt's own outcome: the check of
        // held attempts must not take that for the attempt being taken away.
        self.held.finishing(id);
        let finished = self
            .record_outcome(&running, revision, &outcome, handed_back.is_cancelled())
            .await;
        keep_alive.cancel();
        match finished {
            Recorded::Done(record) => {
                tracing::debug!(job = %id, attempt, status = %record.status, "attempt finished");
                if let Err(error) = message.ack().await {
                    tracing::warn!(job = %id, error = %error, "cannot acknowledge dispatch");
                }
            }
            Recorded::Stale => {
                let _ = message.ack().await;
            }
            Recorded::Unannounced => {
                // Written but not followed up: the redelivered dispatch finds the record and
                // arms its timer or announces it then.
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            }
        }
    }

    /// Hands a dispatch this draining node will not run back to the schedulers.
    async fn give_back(&self, dispatch: Dispatch) -> Result<Claimed, Error> {
        let outcome = Outcome::lost(format!(
            "handed back unstarted: node {} is draining",
            self.node
        ));
        let key = dispatch.record.id.to_string();
        let (mut record, mut revision) = (dispatch.record.clone(), dispatch.revision);
        for _ in 0..5 {
            if record.status != JobStatus::Pending {
                // Claimed, ended, or handed back already (perhaps by an earlier try here whose
                // reply was lost): the claim path, starting from the dispatch as delivered,
                // finds out which and finishes what that change causes.
                return self.claim(dispatch).await;
            }
            match lifecycle::hand_back(&self.mesh, &record, revision, &outcome).await {
                Ok(_) => return Ok(Claimed::Settled),
                Err(Error::Conflict { .. }) => {}
                Err(error) => return Err(error),
            }
            let Some(current) = self.mesh.jobs.get(&key).await? else {
                return Ok(Claimed::Settled);
            };
            if current.value.attempt != record.attempt
                || current.value.node.as_ref() != Some(&self.node)
            {
                return Ok(Claimed::Settled);
            }
            (record, revision) = (current.value, current.revision);
        }
        Err(Error::Unavailable {
            op: "hand back",
            reason: "the job's record kept changing".into(),
        })
    }

    /// Sets aside a job whose dispatch was delivered `delivered` times without its attempt
    /// being settled: each delivery went to an instance that vanished with it.
    async fn quarantine(&self, dispatch: Dispatch, delivered: i64) -> Result<Claimed, Error> {
        let key = dispatch.record.id.to_string();
        let Some(current) = self.mesh.jobs.get(&key).await? else {
            return Ok(Claimed::Settled);
        };
        let record = &current.value;
        if record.attempt != dispatch.record.attempt
            || record.node.as_ref() != Some(&self.node)
            || !matches!(record.status, JobStatus::Pending | JobStatus::Running)
        {
            return self.claim(dispatch).await;
        }
        let reason = format!(
            "attempt {} was delivered {delivered} times to node {} without ending; each \
             executor that took it stopped",
            record.attempt, self.node
        );
        tracing::error!(job = %key, delivered, "quarantining a job whose dispatch keeps coming back");
        lifecycle::quarantine(&self.mesh, record, current.revision, reason).await?;
        Ok(Claimed::Settled)
    }

    /// Sends progress acks for `message` until the returned token is cancelled.
    fn keep_alive(&self, message: &jetstream::Message) -> CancellationToken {
        let done = CancellationToken::new();
        let reply = message.reply.clone();
        let client = self.mesh.client.clone();
        let every = (self.ack_wait / 3).max(Duration::from_millis(100));
        let until = done.clone();
        if let Some(reply) = reply {
            tokio::spawn(async move {
                let mut ticker = tokio::time::interval(every);
                ticker.tick().await;
                loop {
                    tokio::select! {
                        _ = until.cancelled() => return,
                        _ = ticker.tick() => {
                            let _ = client.publish(reply.clone(), bytes::Bytes::from_static(b"+WPI")).await;
                        }
                    }
                }
            });
        }
        done
    }

    /// Moves the record to `running` for this instance, by CAS on the dispatch's revision. When
    /// the record changed since, decides from what it is now.
    async fn claim(&self, dispatch: Dispatch) -> Result<Claimed, Error> {
        let key = dispatch.record.id.to_string();
        let attempt = dispatch.record.attempt;
        let mut record = dispatch.record;
        let mut revision = dispatch.revision;
        for _ in 0..5 {
            let started = record.started(self.instance, Timestamp::now());
            match lifecycle::write(&self.mesh, &started, revision).await {
                Ok(new_revision) => return Ok(Claimed::Run(Box::new(started), new_revision)),
                Err(Error::Conflict { .. }) => {}
                Err(error) => return Err(error),
            }
            let Some(current) = self.mesh.jobs.get(&key).await? else {
                tracing::warn!(job = %key, "dispatched job has no record; dropping the dispatch");
                return Ok(Claimed::Settled);
            };
            let now = current.value;
            if now.attempt != attempt || now.node.as_ref() != Some(&self.node) {
                tracing::info!(job = %key, attempt, current = now.attempt, "stale dispatch dropped");
                return Ok(Claimed::Settled);
            }
            match now.status {
                status if status.is_terminal() || status == JobStatus::Retrying => {
                    // The attempt ended already (by our previous instance, a canceller, or a
                    // scheduler that found the node lost): make sure what it caused happened;
                    // timers and events are idempotent.
                    lifecycle::follow_up(&self.mesh, &now).await?;
                    return Ok(Claimed::Settled);
                }
                JobStatus::Running if now.instance == Some(self.instance) => {
                    // This instance does not hold the attempt (the caller checked), so nothing
                    // of it ran: an earlier claim was written but its reply was lost (NATS went
                    // away in between, and that delivery was nak'ed). The attempt is ours.
                    tracing::info!(job = %key, attempt, "an earlier claim was stored though its reply was lost; running the attempt");
                    return Ok(Claimed::Run(Box::new(now), current.revision));
                }
                JobStatus::Running => {
                    // Our previous instance started this attempt and died; its process was
                    // killed at start-up. The attempt is lost, and retried per the job's
                    // policy, rather than run again under the same attempt.
                    let outcome = Outcome::lost(format!(
                        "lost: the executor instance running it ({}) on node {} stopped before it finished",
                        now.instance.map(|i| i.to_string()).unwrap_or_default(),
                        self.node
                    ));
                    match lifecycle::end_attempt(&self.mesh, &now, current.revision, &outcome).await
                    {
                        Ok(_) | Err(Error::Conflict { .. }) => {}
                        Err(error) => return Err(error),
                    }
                    return Ok(Claimed::Settled);
                }
                _ => {
                    record = now;
                    revision = current.revision;
                }
            }
        }
        Err(Error::Unavailable {
            op: "claim",
            reason: "the job's record kept changing".into(),
        })
    }

    /// Writes the outcome over the running record (CAS): the job's end, or `retrying` as its
    /// policy decides (or at once when the attempt was `handed_back`), then arms the timer and
    /// announces. A record that no longer belongs to this attempt makes the result stale.
    /// Passing failures are retried: the outcome is not dropped while NATS recovers.
    async fn record_outcome(
        &self,
        running: &JobRecord,
        revision: u64,
        outcome: &Outcome,
        handed_back: bool,
    ) -> Recorded {
        let key = running.id.to_string();
        let mut base = running.clone();
        let mut revision = revision;
        let mut delay = Duration::from_millis(200);
        // Writes whose reply never came: any of them may have been stored.
        let mut unanswered: Vec<JobRecord> = Vec::new();
        let written = loop {
            let now = Timestamp::now();
            let next = if handed_back {
                base.handed_back(outcome, now)
            } else {
                base.settled(outcome, now, lifecycle::jitter_sample())
            };
            match lifecycle::write(&self.mesh, &next, revision).await {
                Ok(_) => break next,
                Err(Error::Conflict { .. }) => match self.mesh.jobs.get(&key).await {
                    Ok(Some(current)) if unanswered.contains(&current.value) => {
                        // An earlier write of this outcome was stored; only its reply was lost.
                        break current.value;
                    }
                    Ok(Some(current))
                        if current.value.attempt == running.attempt
                            && current.value.status == JobStatus::Running
                            && current.value.instance == running.instance =>
                    {
                        base = current.value;
                        revision = current.revision;
                        continue;
                    }
                    Ok(current) => {
                        tracing::warn!(
                            job = %key,
                            attempt = running.attempt,
                            now = ?current.map(|c| (c.value.status, c.value.attempt)),
                            "attempt finished after it lost the job; result discarded"
                        );
                        return Recorded::Stale;
                    }
                    Err(error) => tracing::warn!(job = %key, error = %error, "cannot read record"),
                },
                Err(error) => {
                    tracing::warn!(job = %key, error = %error, "cannot record outcome yet, retrying");
                    unanswered.push(next);
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        };
        let mut delay = Duration::from_millis(200);
        for _ in 0..10 {
            match lifecycle::follow_up(&self.mesh, &written).await {
                Ok(()) => return Recorded::Done(Box::new(written)),
                Err(error) => {
                    tracing::warn!(job = %key, error = %error, "cannot announce the outcome, retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        Recorded::Unannounced
    }

    async fn reject(
        &self,
        message: &jetstream::Message,
        job: Option<JobId>,
        code: RejectionCode,
        field: Option<String>,
        reason: String,
    ) {
        self.mesh
            .events
            .reject_stored(Origin::Dispatch, message, job, code, field, reason)
            .await;
    }
}
