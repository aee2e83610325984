//! Taking dispatches for this node and carrying each attempt through: claim it on the job's
//! record, run it, record the outcome, announce it, and only then acknowledge the dispatch.
//!
//! The executor pulls only as many dispatches as it has free slots. While an attempt runs its
//! dispatch stays unacknowledged, kept alive with progress acks; if the executor dies, the
//! dispatch is redelivered to the node's next instance, which finds the record claimed by its
//! predecessor and settles it instead of running the job twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, AckKind};
use capstan_mesh::{Error, Mesh, lifecycle};
use capstan_protocol::job::Outcome;
use capstan_protocol::retry;
use capstan_protocol::subjects::Origin;
use capstan_protocol::{
    Dispatch, InstanceId, JobEvent, JobEventKind, JobId, JobRecord, JobStatus, NodeId,
    RejectionCode, Timestamp,
};
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::runner::{Runner, Stops};

/// Pulls and runs dispatches for one node.
pub struct Worker {
    pub(crate) mesh: Mesh,
    pub(crate) node: NodeId,
    pub(crate) instance: InstanceId,
    pub(crate) runner: Runner,
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) capacity: usize,
    pub(crate) ack_wait: Duration,
    /// Attempts this instance holds.
    pub(crate) held: Mutex<HashMap<JobId, Held>>,
    /// Notified whenever an attempt is released.
    pub(crate) released: tokio::sync::Notify,
    /// Set while the node is draining: new dispatches are handed back, not run.
    pub(crate) draining: std::sync::atomic::AtomicBool,
}

impl Worker {
    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, Held>> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The jobs this instance holds.
    pub fn held_jobs(&self) -> Vec<JobId> {
        self.held().keys().copied().collect()
    }

    /// Pulls dispatches while slots are free, until `stop`. Each pull asks for exactly the
    /// slots free at that moment, and several pulls may be outstanding, so a slot that frees
    /// is offered to JetStream at once.
    pub async fn pull_until(self: Arc<Self>, consumer: PullConsumer, stop: CancellationToken) {
        loop {
            let first = tokio::select! {
                _ = stop.cancelled() => return,
                permit = self.slots.clone().acquire_owned() => permit.expect("never closed"),
            };
            let mut permits = vec![first];
            while permits.len() < self.capacity {
                match self.slots.clone().try_acquire_owned() {
                    Ok(permit) => permits.push(permit),
                    Err(_) => break,
                }
            }
            // NOTE: no idle heartbeat on purpose. async-nats 0.51's batch stream returns
            // `Pending` after consuming a heartbeat without re-arming its waker, so a dispatch
            // arriving after one sits unread until the batch's client-side timer ends it and
            // drops it (redelivered only after the ack wait). The server ends every pull at its
            // expiry with a 408, and the client's timer (expiry + 5 s) covers a lost 408.
            let batch = consumer
                .batch()
                .max_messages(permits.len())
                .expires(Duration::from_secs(10))
                .messages()
                .await;
            let mut batch = match batch {
                Ok(batch) => batch,
                Err(error) => {
                    drop(permits);
                    tracing::warn!(error = %error, "cannot pull dispatches, retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            let worker = self.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                while let Some(message) = batch.next().await {
                    let message = match message {
                        Ok(message) => message,
                        Err(error) => {
                            tracing::debug!(error = %error, "dispatch pull ended");
                            break;
                        }
                    };
                    if stop.is_cancelled() {
                        // Arrived after shutdown began: hand it back for the next instance.
                        let _ = message.ack_with(AckKind::Nak(None)).await;
                        continue;
                    }
                    let Some(permit) = permits.pop() else {
                        let _ = message.ack_with(AckKind::Nak(None)).await;
                        continue;
                    };
                    let worker = worker.clone();
                    tokio::spawn(async move { worker.handle(message, permit).await });
                }
                // Unused permits return to the pool here.
            });
        }
    }

    /// Handles one dispatch; `permit` is its slot.
    async fn handle(self: Arc<Self>, message: jetstream::Message, permit: OwnedSemaphorePermit) {
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
        {
            let mut held = self.held();
            if held.contains_key(&record.id) {
                // Redelivered while we run it (a progress ack came late): the running attempt
                // acknowledges the message when it ends.
                return;
            }
            held.insert(
                record.id,
                Held {
                    attempt: record.attempt,
                    stops: stops.clone(),
                    finishing: false,
                },
            );
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
        self.held().remove(&id);
        drop(permit);
        self.released.notify_waiters();
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
        if let Some(held) = self.held().get_mut(&id) {
            held.finishing = true;
        }
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

    /// True while this node is being drained: dispatches are handed back, not run.
    fn draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
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
        Err(Error::unavailable(
            "hand back",
            "the job's record kept changing",
        ))
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
        Err(Error::unavailable(
            "claim",
            "the job's record kept changing",
        ))
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

    /// Stops every held attempt (the shutdown deadline passed).
    pub fn stop_all(&self) {
        for held in self.held().values() {
            held.stops.shutdown.cancel();
        }
    }

    /// Stops `job`'s attempt `attempt`, if held, as cancelled. Returns whether it was held.
    pub fn cancel(&self, job: JobId, attempt: u32) -> bool {
        match self.held().get(&job) {
            Some(held) if held.attempt == attempt => {
                held.stops.cancel.cancel();
                true
            }
            _ => false,
        }
    }

    /// Follows cancel commands for this node until `stop`, and every second re-reads the records
    /// of the held attempts, so a command missed while disconnected only delays the stop.
    pub async fn follow_cancellations(self: Arc<Self>, stop: CancellationToken) {
        let commands = self
            .mesh
            .client
            .subscribe(capstan_protocol::subjects::control_all(&self.node))
            .await;
        let mut commands = match commands {
            Ok(commands) => Some(commands),
            Err(error) => {
                tracing::warn!(error = %error, "cannot follow control commands; polling only");
                None
            }
        };
        let mut poll = tokio::time::interval(Duration::from_secs(1));
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                command = async {
                    match commands.as_mut() {
                        Some(commands) => commands.next().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let Some(command) = command else {
                        commands = None;
                        continue;
                    };
                    match capstan_mesh::wire::decode::<capstan_protocol::CancelNotice>(
                        command.headers.as_ref(),
                        &command.payload,
                    ) {
                        Ok((notice, _)) => {
                            if self.cancel(notice.job, notice.attempt) {
                                tracing::info!(job = %notice.job, attempt = notice.attempt, "cancelling");
                            }
                        }
                        Err(error) => {
                            tracing::warn!(subject = %command.subject, error = %error, "unreadable command");
                            let reason = error.to_string();
                            let rejection = capstan_protocol::Rejection::new(
                                command.subject.as_str(),
                                command.payload.len(),
                                error.code,
                                error.field,
                                reason,
                            );
                            self.mesh.events.rejection(Origin::Control, &rejection).await;
                        }
                    }
                }
                _ = poll.tick() => {
                    self.check_held().await;
                    self.check_drain().await;
                }
            }
        }
    }

    /// Re-reads the records of the held attempts: stops those whose cancellation was asked,
    /// and those taken from this node (found lost while it was silent, or superseded), whose
    /// results could no longer be recorded anyway.
    async fn check_held(&self) {
        let held: Vec<(JobId, u32)> = self
            .held()
            .iter()
            .filter(|(_, held)| !held.finishing)
            .map(|(job, held)| (*job, held.attempt))
            .collect();
        for (job, attempt) in held {
            let Ok(Some(current)) = self.mesh.jobs.get(&job.to_string()).await else {
                continue;
            };
            let record = &current.value;
            let stops = match self.held().get(&job) {
                // Finishing since the list was made: the record may hold its own outcome.
                Some(held) if held.attempt == attempt && !held.finishing => held.stops.clone(),
                _ => continue,
            };
            match held_check(record, attempt, &self.node, self.instance) {
                HeldCheck::Carry => {}
                HeldCheck::Cancel => {
                    stops.cancel.cancel();
                }
                HeldCheck::Taken if !stops.shutdown.is_cancelled() => {
                    tracing::warn!(
                        job = %job,
                        attempt,
                        status = %record.status,
                        "this attempt was taken from the node; stopping its process"
                    );
                    stops.shutdown.cancel();
                }
                HeldCheck::Taken => {}
            }
        }
    }

    /// Follows the node's availability: while draining, dispatches are handed back, and at the
    /// drain deadline the attempts still running are stopped and handed back.
    async fn check_drain(&self) {
        use capstan_protocol::Availability;
        let Ok(Some(node)) = self.mesh.nodes.get(self.node.as_str()).await else {
            return;
        };
        let draining = matches!(
            node.value.availability,
            Availability::Draining | Availability::Drained
        );
        let was = self
            .draining
            .swap(draining, std::sync::atomic::Ordering::Relaxed);
        if draining != was {
            tracing::info!(draining, "node availability changed");
        }
        if node.value.availability == Availability::Draining
            && node
                .value
                .drain_deadline
                .is_some_and(|deadline| deadline <= Timestamp::now())
            && !self.held().is_empty()
        {
            tracing::warn!(
                jobs = self.held().len(),
                "drain deadline passed; handing running jobs back"
            );
            self.stop_all();
        }
    }

    /// Waits until no attempt is held, or `timeout` passes; true if none is.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let released = self.released.notified();
            if self.held().is_empty() {
                return true;
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return self.held().is_empty();
            }
        }
    }
}

/// An attempt this instance holds.
pub(crate) struct Held {
    /// Its number.
    attempt: u32,
    /// What stops it.
    stops: Stops,
    /// Its process ended and its outcome is being recorded: the record may already show it.
    finishing: bool,
}

/// What the record of a held attempt, still running here, means for it.
#[derive(Debug, PartialEq, Eq)]
enum HeldCheck {
    /// Still this instance's, nothing asked: carry on.
    Carry,
    /// Still this instance's, and its cancellation was asked.
    Cancel,
    /// No longer this instance's (a scheduler found the node lost, or the job moved on):
    /// whatever it would record would be refused, so its process is stopped.
    Taken,
}

/// Decides what `record`, read while attempt `attempt` runs here (on `node`, as `instance`)
/// and before its own outcome is written, means for it.
fn held_check(record: &JobRecord, attempt: u32, node: &NodeId, instance: InstanceId) -> HeldCheck {
    let ours = record.attempt == attempt
        && record.node.as_ref() == Some(node)
        && match record.status {
            JobStatus::Pending => true,
            JobStatus::Running => record.instance == Some(instance),
            _ => false,
        };
    if !ours {
        HeldCheck::Taken
    } else if record.cancel_requested_at.is_some() {
        HeldCheck::Cancel
    } else {
        HeldCheck::Carry
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_protocol::JobSpec;

    fn running(node: &NodeId, instance: InstanceId) -> JobRecord {
        let now = Timestamp::now();
        JobRecord::new(JobId::generate(), JobSpec::shell("true"), now)
            .assigned(node.clone(), now)
            .started(instance, now)
    }

    #[test]
    fn a_held_attempt_whose_record_is_still_ours_carries_on_or_is_cancelled_when_asked() {
        let node = NodeId::new("exec-1").expect("a node id");
        let instance = InstanceId::generate();
        let mut record = running(&node, instance);
        assert_eq!(
            held_check(&record, record.attempt, &node, instance),
            HeldCheck::Carry
        );
        record.cancel_requested_at = Some(Timestamp::now());
        assert_eq!(
            held_check(&record, record.attempt, &node, instance),
            HeldCheck::Cancel
        );
    }

    #[test]
    fn a_held_attempt_superseded_ended_or_claimed_by_another_instance_is_taken() {
        let node = NodeId::new("exec-1").expect("a node id");
        let instance = InstanceId::generate();
        let record = running(&node, instance);
        let attempt = record.attempt;
        assert_eq!(
            held_check(&record, attempt, &node, InstanceId::generate()),
            HeldCheck::Taken,
            "another instance of the node claimed it"
        );
        let other = NodeId::new("exec-2").expect("a node id");
        assert_eq!(
            held_check(&record, attempt, &other, instance),
            HeldCheck::Taken
        );
        let lost = record.finished(
            &Outcome::lost("lost: the node stopped heartbeating".to_owned()),
            Timestamp::now(),
        );
        assert_eq!(
            held_check(&lost, attempt, &node, instance),
            HeldCheck::Taken
        );
        assert_eq!(
            held_check(&record, attempt + 1, &node, instance),
            HeldCheck::Taken
        );
    }
}
