//! One attempt's life, from its dispatch to its acknowledgement: decode and route the
//! dispatch, claim the attempt on the job's record (what the record means is the protocol's
//! `claim::decide`), or hand it back while the node drains, or quarantine a job whose dispatch
//! keeps coming back; then run it, write its outcome and announce it, and only then
//! acknowledge the dispatch. The slot it runs in is `pull`'s; stopping it is `control`'s.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use capstan_mesh::{Change, Error, Modified, Versioned, lifecycle};
use capstan_protocol::claim::{self, Decision};
use capstan_protocol::job::Outcome;
use capstan_protocol::retry;
use capstan_protocol::subjects::Origin;
use capstan_protocol::{
    Dispatch, JobEvent, JobEventKind, JobId, JobRecord, JobStatus, NodeId, RejectionCode, Timestamp,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::Worker;
use super::held::Hold;
use super::slots::Slot;
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

/// What a claim found in the job's record instead of taking the attempt.
enum Found {
    /// The job has no record.
    Gone,
    /// The record moved on to this attempt, or to another node.
    Stale(u32),
    /// The attempt ended already.
    Ended(JobRecord),
    /// This instance's own claim, whose reply was lost.
    Ours(Versioned<JobRecord>),
    /// A predecessor's claim.
    Orphaned(Versioned<JobRecord>),
}

impl Worker {
    /// Handles one dispatch of this node's once it has a slot: `slot`, taken as it arrived,
    /// or, when a submission took the last one meanwhile, the next to be free (the dispatch is
    /// kept alive while it waits, and handed back if the executor stops first).
    pub(super) async fn dispatched(
        self: Arc<Self>,
        message: jetstream::Message,
        slot: Option<Slot>,
        stop: CancellationToken,
    ) {
        let slot = match slot {
            Some(slot) => slot,
            None => {
                let alive = self.keep_alive(&message, self.ack_wait);
                let slot = tokio::select! {
                    () = stop.cancelled() => None,
                    slot = self.slots.take() => Some(slot),
                };
                alive.cancel();
                let Some(slot) = slot else {
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                    return;
                };
                slot
            }
        };
        self.handle(message, slot, stop).await;
    }

    /// Handles one dispatch; `permit` is its slot.
    async fn handle(
        self: Arc<Self>,
        message: jetstream::Message,
        permit: Slot,
        stop: CancellationToken,
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
        match self.held.hold(record.id, record.attempt, stops.clone()) {
            Hold::Held => {}
            // Delivered while this instance holds the attempt: a progress ack came late, a
            // scheduler dispatched an attempt this node took from its submission (so that
            // the node's dispatches hold it), or a submission of the job is being taken
            // here this moment. Handled afresh once the attempt is released (its slot
            // given back meanwhile): the claim then finds it ended, or never run.
            Hold::AlreadyHeld => {
                drop(permit);
                let alive = self.keep_alive(&message, self.ack_wait);
                self.held.wait_released(record.id, record.attempt).await;
                alive.cancel();
                let slot = self.slots.try_take();
                return Box::pin(self.dispatched(message, slot, stop)).await;
            }
            Hold::OtherAttempt(previous) => {
                // A retry at once reached this node while the previous attempt is still
                // being settled here (its outcome written, or its process being stopped
                // because the job moved on): back in a moment rather than after the ack
                // wait, a second longer each time, so that a slow settlement does not
                // spend the deliveries after which a dispatch is quarantined.
                let delivered = message.info().map_or(1, |info| info.delivered.max(1));
                let delay = Duration::from_secs(u64::try_from(delivered).unwrap_or(1));
                tracing::debug!(job = %record.id, attempt = record.attempt, previous, "previous attempt still settling; dispatch handed back for a moment");
                let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
                return;
            }
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
        self.carry(&message, dispatch, stops, permit)
            .instrument(span)
            .await;
        self.held.release(id);
    }

    /// Claims, runs, records and announces one attempt, and settles its dispatch. `slot` is
    /// given back as soon as the process has ended: recording and announcing the outcome are
    /// NATS round trips (an fsync each in the durable mode), not a running process, and the
    /// next dispatch need not wait for them. The attempt stays held until its dispatch is
    /// settled, which is what a shutdown waits for.
    async fn carry(
        &self,
        message: &jetstream::Message,
        dispatch: Dispatch,
        stops: Stops,
        slot: Slot,
    ) {
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
                // Longer each time: NATS may be electing a leader for the jobs bucket for
                // seconds, and each delivery counts towards quarantine.
                let delay = retry::limits::unclaimed_dispatch_delay(delivered);
                let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
                return;
            }
        };
        self.run_claimed(message, self.ack_wait, running, revision, stops, slot)
            .await;
    }

    /// Runs an attempt this instance holds and has claimed (`running`, at `revision`), records
    /// and announces its outcome, and settles `message`, which brought it (a dispatch, or a
    /// submission taken at once) and is kept alive meanwhile for its consumer's `ack_wait`.
    pub(super) async fn run_claimed(
        &self,
        message: &jetstream::Message,
        ack_wait: Duration,
        running: JobRecord,
        revision: u64,
        stops: Stops,
        slot: Slot,
    ) {
        let id = running.id;
        let attempt = running.attempt;
        // The claim is what fences the attempt, so the start waits for no announcement. The
        // `running` event goes out once the process has run for `announce_after` (at once when
        // that is zero): an attempt that ends sooner is announced by its outcome alone, whose
        // record carries its start. Its acknowledgement is awaited while the process runs; the
        // stream keeps this connection's order, so it is stored before the outcome's event.
        tracing::debug!(job = %id, attempt, "attempt started");
        let keep_alive = self.keep_alive(message, ack_wait);
        if running.cancel_requested_at.is_some() {
            stops.cancel.cancel();
        }
        let handed_back = stops.shutdown.clone();
        let ended = CancellationToken::new();
        let run = async {
            let outcome = self.runner.run(&running, stops).await;
            ended.cancel();
            drop(slot);
            outcome
        };
        let announce = async {
            if !self.announce_after.is_zero() {
                tokio::select! {
                    biased;
                    () = ended.cancelled() => return,
                    () = tokio::time::sleep(self.announce_after) => {}
                }
            }
            let stored = match self
                .mesh
                .events
                .job_deferred(&JobEvent::new(JobEventKind::Running, &running))
                .await
            {
                Ok(ack) => ack
                    .await
                    .map(drop)
                    .map_err(|e| Error::unavailable("event publish", e)),
                Err(error) => Err(error),
            };
            if let Err(error) = stored {
                tracing::warn!(job = %id, error = %error, "cannot announce start");
            }
        };
        let (outcome, ()) = tokio::join!(run, announce);
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
        let attempt = dispatch.record.attempt;
        let known = Versioned {
            value: dispatch.record.clone(),
            revision: dispatch.revision,
        };
        // Stops with whether the claim path should take the dispatch over.
        let given = lifecycle::modify(&self.mesh, dispatch.record.id, Some(known), |current| {
            let Some(current) = current else {
                return Change::Stop(false);
            };
            let record = &current.value;
            if record.attempt != attempt || record.node.as_ref() != Some(&self.node) {
                return Change::Stop(false);
            }
            if record.status != JobStatus::Pending {
                // Claimed, ended, or handed back already (perhaps by an earlier try here whose
                // reply was lost): the claim path, starting from the dispatch as delivered,
                // finds out which and finishes what that change causes.
                return Change::Stop(true);
            }
            Change::Write(record.handed_back(&outcome, Timestamp::now()))
        })
        .await?;
        match given {
            Modified::Written { written, .. } => {
                lifecycle::follow_up(&self.mesh, &written.value).await?;
                Ok(Claimed::Settled)
            }
            Modified::Stopped(true) => self.claim(dispatch).await,
            Modified::Stopped(false) => Ok(Claimed::Settled),
        }
    }

    /// Sets aside a job whose dispatch was delivered `delivered` times without its attempt
    /// being settled: each delivery went to an instance that vanished with it.
    async fn quarantine(&self, dispatch: Dispatch, delivered: i64) -> Result<Claimed, Error> {
        let key = dispatch.record.id.to_string();
        let Some(current) = self.mesh.jobs.get(&key).await? else {
            return Ok(Claimed::Settled);
        };
        // Never claimed, its record is still the unplaced one the dispatch was made over.
        let record = &dispatch.basis(&current.value, current.revision);
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

    /// Sends progress acks for `message`, from a consumer whose ack wait is `ack_wait`, until
    /// the returned token is cancelled.
    pub(super) fn keep_alive(
        &self,
        message: &jetstream::Message,
        ack_wait: Duration,
    ) -> CancellationToken {
        let done = CancellationToken::new();
        let reply = message.reply.clone();
        let client = self.mesh.client.clone();
        let every = (ack_wait / 3).max(Duration::from_millis(100));
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

    /// Moves the record to `running` for this instance, by CAS on the revision read. Decides
    /// with [`claim::decide`] on the record in the bucket (with the dispatch's placement
    /// applied when the bucket still holds the job as created: [`Dispatch::basis`]), never on
    /// the dispatch's own copy: the spec that runs is the one the bucket holds.
    async fn claim(&self, dispatch: Dispatch) -> Result<Claimed, Error> {
        let id = dispatch.record.id;
        let attempt = dispatch.record.attempt;
        let claimed = lifecycle::modify(&self.mesh, id, None, |stored| {
            let current = stored.map(|c| Versioned {
                value: dispatch.basis(&c.value, c.revision),
                revision: c.revision,
            });
            let decision = claim::decide(
                current.as_ref().map(|c| &c.value),
                attempt,
                &self.node,
                self.instance,
            );
            let Some(current) = current else {
                return Change::Stop(Found::Gone);
            };
            match decision {
                Decision::Take => {
                    Change::Write(current.value.started(self.instance, Timestamp::now()))
                }
                Decision::Stale => Change::Stop(Found::Stale(current.value.attempt)),
                Decision::Ended => Change::Stop(Found::Ended(current.value.clone())),
                Decision::AlreadyOurs => Change::Stop(Found::Ours(current.clone())),
                Decision::Orphaned => Change::Stop(Found::Orphaned(current.clone())),
            }
        })
        .await?;
        let found = match claimed {
            Modified::Written { written, .. } => {
                return Ok(Claimed::Run(Box::new(written.value), written.revision));
            }
            Modified::Stopped(found) => found,
        };
        match found {
            Found::Gone => {
                tracing::warn!(job = %id, "dispatched job has no record; dropping the dispatch");
            }
            Found::Stale(current) => {
                tracing::info!(job = %id, attempt, current, "stale dispatch dropped");
            }
            Found::Ended(record) => {
                // Make sure what its end caused happened; timers and events are idempotent.
                lifecycle::follow_up(&self.mesh, &record).await?;
            }
            Found::Ours(current) => {
                tracing::info!(job = %id, attempt, "an earlier claim was stored though its reply was lost; running the attempt");
                return Ok(Claimed::Run(Box::new(current.value), current.revision));
            }
            Found::Orphaned(current) => {
                // Its process was killed at start-up; the attempt is retried per the job's
                // policy under a new number.
                let outcome = Outcome::lost(format!(
                    "lost: the executor instance running it ({}) on node {} stopped before it finished",
                    current
                        .value
                        .instance
                        .map(|i| i.to_string())
                        .unwrap_or_default(),
                    self.node
                ));
                match lifecycle::end_attempt(&self.mesh, &current.value, current.revision, &outcome)
                    .await
                {
                    Ok(_) | Err(Error::Conflict { .. }) => {}
                    Err(error) => return Err(error),
                }
            }
        }
        Ok(Claimed::Settled)
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
        let id = running.id;
        // The first write goes over the record as this attempt claimed it.
        let mut known = Some(Versioned {
            value: running.clone(),
            revision,
        });
        let mut delay = Duration::from_millis(200);
        // Every outcome record tried: any of them may have been stored though its reply never
        // came.
        let mut tried: Vec<JobRecord> = Vec::new();
        let written = loop {
            let decide = |current: Option<&Versioned<JobRecord>>| {
                let Some(current) = current else {
                    return Change::Stop(Err(None));
                };
                let record = &current.value;
                if tried.contains(record) {
                    // An earlier write of this outcome was stored; only its reply was lost.
                    return Change::Stop(Ok(record.clone()));
                }
                if record.attempt != running.attempt
                    || record.status != JobStatus::Running
                    || record.instance != running.instance
                {
                    return Change::Stop(Err(Some((record.status, record.attempt))));
                }
                // Still this attempt's, perhaps changed meanwhile (a cancel was asked).
                let now = Timestamp::now();
                let next = if handed_back {
                    record.handed_back(outcome, now)
                } else {
                    record.settled(outcome, now, lifecycle::jitter_sample())
                };
                tried.push(next.clone());
                Change::Write(next)
            };
            match lifecycle::modify(&self.mesh, id, known.take(), decide).await {
                Ok(Modified::Written { written, .. }) => break written.value,
                Ok(Modified::Stopped(Ok(stored))) => break stored,
                Ok(Modified::Stopped(Err(now))) => {
                    tracing::warn!(
                        job = %id,
                        attempt = running.attempt,
                        now = ?now,
                        "attempt finished after it lost the job; result discarded"
                    );
                    return Recorded::Stale;
                }
                Err(error) => {
                    tracing::warn!(job = %id, error = %error, "cannot record outcome yet, retrying");
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        };
        self.finished.count(&written);
        let mut delay = Duration::from_millis(200);
        for _ in 0..10 {
            match lifecycle::follow_up(&self.mesh, &written).await {
                Ok(()) => return Recorded::Done(Box::new(written)),
                Err(error) => {
                    tracing::warn!(job = %id, error = %error, "cannot announce the outcome, retrying");
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
