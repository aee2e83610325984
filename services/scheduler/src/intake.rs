//! Consuming submissions: read each one (`capstan_mesh::intake::read`: id, sender, spec, or its
//! rejection), claim the idempotency key, create the job's record (already assigned to a node
//! when one has room), dispatch, acknowledge.
//!
//! Each step is idempotent, keyed by the job id, which is fixed per submission (a header, or
//! derived from the message's stream sequence), so a redelivered submission resumes: a record
//! that exists is read back, and a dispatch already sent is sent again under the same
//! deduplication id.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use capstan_mesh::{Claim, Error, Versioned, consume, lifecycle};
use capstan_protocol::job::Outcome;
use capstan_protocol::subjects::Origin;
use capstan_protocol::topology;
use capstan_protocol::{
    AuditAction, AuditOutcome, JobEvent, JobEventKind, JobId, JobRecord, JobSpec, JobStatus,
    NodeStatus, Rejection, RejectionCode, SubmittedBy, Timestamp, headers,
};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::Scheduler;

/// What to do with a handled submission.
enum Handled {
    /// Done: acknowledge.
    Ack,
    /// Rejected: terminate (it will never succeed).
    Term,
    /// Failed for a passing reason: redeliver after the delay.
    Retry(Duration),
    /// Accepted and waiting for room: the waiting queue holds the message now.
    Held,
}

impl Scheduler {
    /// Consumes submissions until `shutdown`, then waits for the ones in hand. Fails when a
    /// consumer cannot be created: a scheduler without intake must not go on looking healthy.
    ///
    /// Two consumers feed it: the submitted subjects, shared with the executors, from which a
    /// scheduler takes only what waits there (`take_waiting`: every executor busy, or none
    /// running); and the submissions executors handed on for placement, which only
    /// schedulers read.
    pub(crate) async fn consume(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), Error> {
        let max_ack_pending =
            i64::try_from(self.config.max_waiting + self.config.concurrency).unwrap_or(i64::MAX);
        let submitted = topology::ConsumerSpec {
            ack_wait: self.config.submission_ack_wait,
            max_ack_pending,
            ..topology::scheduler_consumer()
        };
        let handed_on = topology::ConsumerSpec {
            ack_wait: self.config.ack_wait,
            max_ack_pending,
            ..topology::place_consumer()
        };
        let (submitted, handed_on) = tokio::join!(
            self.clone().pull_submissions(submitted, shutdown.clone()),
            self.clone().pull_submissions(handed_on, shutdown.clone()),
        );
        // Wait for submissions in hand: all permits back means none is being processed.
        let total = u32::try_from(self.config.concurrency.max(1)).unwrap_or(u32::MAX);
        let _ =
            tokio::time::timeout(Duration::from_secs(30), self.permits.acquire_many(total)).await;
        submitted.and(handed_on)
    }

    /// Pulls from the consumer `spec` while permits are free, until `shutdown`; a failure to
    /// create it stops the whole intake.
    async fn pull_submissions(
        self: Arc<Self>,
        spec: topology::ConsumerSpec,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let consumer = match consume::durable(&self.mesh.js, &spec, &shutdown).await {
            Ok(consumer) => consumer,
            Err(error) => {
                shutdown.cancel();
                return Err(error);
            }
        };
        if let Some(group) = spec.priority_group {
            self.take_waiting(consumer, group, shutdown).await;
            return Ok(());
        }
        let mut pull =
            consume::Pull::new(&consumer, self.config.concurrency.clamp(1, 512), &shutdown);
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                permit = self.permits.clone().acquire_owned() => permit.expect("never closed"),
            };
            let Some(message) = pull.next().await else {
                break;
            };
            let scheduler = self.clone();
            tokio::spawn(async move {
                scheduler.process(message).await;
                drop(permit);
            });
        }
        Ok(())
    }

    /// Takes the submissions that wait on the consumer shared with the executors, until
    /// `shutdown`: those still undelivered after a look at the consumer found nothing
    /// delivered since the look before (every executor busy, or none running). Executors with
    /// a free slot keep taking them meanwhile; a flood they are working through is theirs.
    /// What is taken here gets its record and waits for room in the placement queue, visible
    /// and cancellable, in priority order.
    async fn take_waiting(
        self: &Arc<Self>,
        mut consumer: jetstream::consumer::PullConsumer,
        group: &'static str,
        shutdown: CancellationToken,
    ) {
        let mut last: Option<u64> = None;
        loop {
            let look = consumer
                .info()
                .await
                .map(|info| (info.num_pending, info.delivered.consumer_sequence));
            let (pending, delivered) = match look {
                Ok(look) => look,
                Err(error) => {
                    tracing::debug!(error = %error, "cannot read the submissions consumer");
                    (0, 0)
                }
            };
            // Nothing delivered since the last look: what waits is left to this scheduler,
            // including deliveries that came back (their taker gone), which `num_pending`
            // does not count; a fetch that finds nothing costs one request.
            let stalled = last == Some(delivered);
            last = Some(delivered);
            if stalled {
                let free = self.permits.available_permits();
                let wanted = usize::try_from(pending)
                    .unwrap_or(usize::MAX)
                    .clamp(1, 256)
                    .min(free);
                if wanted > 0
                    && self
                        .fetch_waiting(&consumer, group, wanted, &shutdown)
                        .await
                        > 0
                {
                    // What was taken moved the consumer on: look afresh.
                    last = None;
                }
            }
            let pause = if pending > 0 {
                WAITING_LOOK_BUSY
            } else {
                WAITING_LOOK_IDLE
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Takes up to `wanted` submissions waiting now, each processed under a permit; returns
    /// how many.
    async fn fetch_waiting(
        self: &Arc<Self>,
        consumer: &jetstream::consumer::PullConsumer,
        group: &'static str,
        wanted: usize,
        shutdown: &CancellationToken,
    ) -> usize {
        let fetched = consumer
            .fetch()
            .max_messages(wanted)
            .group(group)
            .priority(topology::TAKE_PRIORITY_SCHEDULER)
            .messages()
            .await;
        let mut messages = match fetched {
            Ok(messages) => messages,
            Err(error) => {
                tracing::warn!(error = %error, "cannot take waiting submissions");
                return 0;
            }
        };
        let mut taken = 0;
        while let Some(message) = messages.next().await {
            let Ok(message) = message else { break };
            taken += 1;
            capstan_mesh::metrics::mesh().delivered(consumer, &message);
            let permit = tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                    continue;
                }
                permit = self.permits.clone().acquire_owned() => permit.expect("never closed"),
            };
            let scheduler = self.clone();
            tokio::spawn(async move {
                scheduler.process(message).await;
                drop(permit);
            });
        }
        taken
    }

    async fn process(self: &Arc<Self>, message: jetstream::Message) {
        let span = tracing::info_span!(
            "accept job",
            otel.kind = "consumer",
            job_id = tracing::field::Empty,
            node = tracing::field::Empty,
        );
        capstan_telemetry::propagation::follow(&span, message.headers.as_ref());
        let handled = self.handle(&message).instrument(span).await;
        let result = match handled {
            Handled::Ack => message.ack().await,
            Handled::Term => message.ack_with(AckKind::Term).await,
            Handled::Retry(delay) => message.ack_with(AckKind::Nak(Some(delay))).await,
            Handled::Held => {
                self.wake.notify_one();
                return;
            }
        };
        if let Err(error) = result {
            // The submission will be redelivered; handling it again is safe.
            tracing::warn!(error = %error, "cannot acknowledge submission");
        }
    }

    async fn handle(self: &Arc<Self>, message: &jetstream::Message) -> Handled {
        let Ok(info) = message.info() else {
            tracing::error!(subject = %message.subject, "submission without JetStream metadata");
            return Handled::Term;
        };
        let seq = info.stream_sequence;
        let published_ms = (info.published.unix_timestamp_nanos() / 1_000_000) as u64;
        let delivered = info.delivered;
        let stored = capstan_mesh::intake::Stored { seq, published_ms };
        let submission = match capstan_mesh::intake::read(
            &message.subject,
            message.headers.as_ref(),
            &message.payload,
            stored,
            self.config.nats.max_job_bytes,
        ) {
            Ok(submission) => submission,
            Err(refused) => {
                if let Some(job) = refused.job {
                    tracing::Span::current().record("job_id", tracing::field::display(job));
                }
                return self
                    .reject(
                        message,
                        seq,
                        refused.job,
                        refused.code,
                        refused.field.as_deref(),
                        refused.reason,
                    )
                    .await;
            }
        };
        let audit_key = submission.audit_key();
        let submitted = submission.submitted_at();
        let capstan_mesh::intake::Submission {
            id,
            submitted_by,
            from_client,
            seq: original,
            spec,
            ..
        } = submission;
        tracing::Span::current().record("job_id", tracing::field::display(id));

        // A fan-out's targets, resolved once, here.
        let targets = match &spec.fanout {
            None => None,
            Some(fanout) => match self.resolve_targets(fanout).await {
                Ok(targets) => Some(targets),
                Err(crate::fanouts::Unresolved::Refused(field, reason)) => {
                    return self
                        .reject(
                            message,
                            seq,
                            Some(id),
                            RejectionCode::Invalid,
                            Some(field),
                            reason,
                        )
                        .await;
                }
                Err(crate::fanouts::Unresolved::Unavailable(error)) => {
                    tracing::warn!(error = %error, "cannot resolve a fan-out's targets");
                    return Handled::Retry(retry_delay(delivered));
                }
            },
        };

        if let Some(name) = &spec.system {
            let refused = match self.mesh.systems.get(name).await {
                Ok(Some(system)) if system.value.active => None,
                Ok(Some(_)) => Some(format!(
                    "system `{name}` is inactive: an administrator must activate it first"
                )),
                Ok(None) => Some(format!("no system `{name}` in the catalogue")),
                Err(error) => {
                    tracing::warn!(error = %error, "cannot read the systems catalogue");
                    return Handled::Retry(Duration::from_secs(1));
                }
            };
            if let Some(reason) = refused {
                return self
                    .reject(
                        message,
                        seq,
                        Some(id),
                        RejectionCode::Invalid,
                        Some("system"),
                        reason,
                    )
                    .await;
            }
        }

        let accepted = match targets {
            Some(targets) => {
                self.accept_fanout(id, spec, targets, submitted_by.clone(), original, submitted)
                    .await
            }
            None => {
                self.accept(id, spec, submitted_by.clone(), original, submitted)
                    .await
            }
        };
        // A client's submission is on the audit trail before it is acknowledged: if the record
        // cannot be stored, the submission comes back, finds its job, and is audited again
        // under the same key.
        if from_client
            && matches!(accepted, Ok(Accepted::Done | Accepted::Waiting { .. }))
            && self
                .mesh
                .events
                .audit_client(
                    AuditAction::JobSubmit,
                    &submitted_by,
                    id,
                    AuditOutcome::Success,
                    Some(audit_key),
                )
                .await
                .is_err()
        {
            return Handled::Retry(retry_delay(delivered));
        }
        crate::metrics::scheduler().submission(match &accepted {
            Ok(Accepted::Done | Accepted::Waiting { .. }) => "accepted",
            Ok(Accepted::Duplicate(_)) => "duplicate",
            Ok(Accepted::Conflict(_)) => "conflict",
            Err(_) => "retry",
        });
        match accepted {
            Ok(Accepted::Done) => Handled::Ack,
            Ok(Accepted::Waiting { known, announced }) => {
                let preferred = self.preferred(&known.value.spec);
                let gated = known.value.spec.concurrency.is_some();
                // A creation not yet announced is, if the job still waits half of
                // `--announce-after` from now (before any start of it could be).
                let announce =
                    (!announced).then(|| Instant::now() + self.config.announce_after / 2);
                self.waiting
                    .push(message.clone(), *known, None, preferred, announce);
                if gated {
                    self.gate.notify_one();
                }
                Handled::Held
            }
            Ok(Accepted::Duplicate(existing)) => self.duplicate(message, seq, existing).await,
            Ok(Accepted::Conflict(reason)) => {
                self.reject(
                    message,
                    seq,
                    Some(id),
                    RejectionCode::Conflict,
                    Some(headers::JOB_ID),
                    reason,
                )
                .await
            }
            Err(error) => {
                tracing::warn!(job = %id, error = %error, delivered, "cannot accept submission yet");
                Handled::Retry(retry_delay(delivered))
            }
        }
    }

    /// Creates the job (placed if a node has room) or resumes it if it already exists.
    async fn accept(
        self: &Arc<Self>,
        id: JobId,
        spec: JobSpec,
        submitted_by: SubmittedBy,
        seq: u64,
        submitted: Timestamp,
    ) -> Result<Accepted, Error> {
        if let Some(key) = &spec.idempotency_key
            && let Claim::Existing(existing) = self.mesh.idempotency.claim(key, id).await?
        {
            return Ok(Accepted::Duplicate(existing));
        }
        let now = Timestamp::now();
        // The start time counts from the submission's publish time, the same on every
        // redelivery and replica.
        let due = spec.start.map(|start| start.due(submitted));
        let mut record = match due {
            Some(at) if at > now => JobRecord::scheduled(id, spec, now, at),
            _ => JobRecord::new(id, spec, now),
        };
        record.submission_seq = Some(seq);
        record.submitted_by = Some(submitted_by);
        // The job's trace: later hops without a message to carry it (re-placement) join it.
        record.traceparent = capstan_telemetry::propagation::traceparent();
        if record.status == JobStatus::Scheduled {
            let key = id.to_string();
            return match self.mesh.jobs.create(&key, &record).await {
                Ok(_) => {
                    lifecycle::follow_up(&self.mesh, &record).await?;
                    tracing::debug!(job = %id, at = %due.unwrap_or(now), "job scheduled");
                    Ok(Accepted::Done)
                }
                Err(Error::AlreadyExists { .. }) => self.resume(id, &record.spec, seq).await,
                Err(error) => Err(error),
            };
        }
        // A job under a concurrency limit waits for its slot before it is placed.
        let node = if record.spec.concurrency.is_some() {
            None
        } else {
            self.cluster
                .reserve_preferring(&record.spec.placement(), &self.preferred(&record.spec), id)
                .ok()
        };
        if let Some(node) = &node {
            record = record.assigned(node.clone(), now);
            tracing::Span::current().record("node", node.as_str());
        }
        let key = id.to_string();
        match self.mesh.jobs.create(&key, &record).await {
            Ok(revision) if node.is_some() && !self.config.announce_after.is_zero() => {
                // Placed at once: its `pending` lasts until the claim, a millisecond or two,
                // so it is announced only if the job is still going a moment later.
                if let Err(error) = self.dispatch(&record, revision).await {
                    self.release(&record);
                    return Err(error);
                }
                tracing::debug!(job = %id, node = ?node, "job accepted");
                self.announce_placed(JobEventKind::Pending, record);
                Ok(Accepted::Done)
            }
            Ok(revision) if node.is_none() && !self.config.announce_after.is_zero() => {
                // Waiting for room: like a placement, its `pending` is announced only if it
                // lasts (`Waiting::due_announcements`); a job placed within half of
                // `--announce-after` is announced by its later events alone.
                tracing::debug!(job = %id, "job accepted; waiting for room");
                Ok(Accepted::Waiting {
                    known: Box::new(Versioned {
                        value: record,
                        revision,
                    }),
                    announced: false,
                })
            }
            Ok(revision) => {
                let pending = JobEvent::new(JobEventKind::Pending, &record);
                let event = self.mesh.events.job_deferred(&pending);
                let dispatch = async {
                    match &node {
                        Some(_) => self.dispatch(&record, revision).await,
                        None => Ok(()),
                    }
                };
                let (event, dispatched) = tokio::join!(event, dispatch);
                if let Err(error) = dispatched {
                    self.release(&record);
                    return Err(error);
                }
                event?
                    .await
                    .map_err(|e| Error::unavailable("event publish", e))?;
                tracing::debug!(job = %id, node = ?node, "job accepted");
                Ok(match node {
                    Some(_) => Accepted::Done,
                    None => Accepted::Waiting {
                        known: Box::new(Versioned {
                            value: record,
                            revision,
                        }),
                        announced: true,
                    },
                })
            }
            Err(Error::AlreadyExists { .. }) => {
                if let Some(node) = &node {
                    self.cluster.release(node, id);
                }
                self.resume(id, &record.spec, seq).await
            }
            Err(error) => {
                if let Some(node) = &node {
                    self.cluster.release(node, id);
                }
                Err(error)
            }
        }
    }

    /// Continues with a job whose record exists: its submission was redelivered, or
    /// re-published outside the deduplication window.
    async fn resume(&self, id: JobId, spec: &JobSpec, seq: u64) -> Result<Accepted, Error> {
        let Some(current) = self.mesh.jobs.get(&id.to_string()).await? else {
            // Created, then expired or removed: nothing left to do.
            return Ok(Accepted::Done);
        };
        let record = current.value;
        if record.submission_seq != Some(seq) {
            if &record.spec == spec {
                // The same job submitted again under the same id.
                return Ok(Accepted::Done);
            }
            return Ok(Accepted::Conflict(format!(
                "job id {id} belongs to another submission"
            )));
        }
        if record.status == JobStatus::Running {
            return self.recover_running(record, current.revision).await;
        }
        // Events carry deduplication ids: publishing again is harmless.
        if record.status == JobStatus::Pending {
            self.mesh
                .events
                .job(&JobEvent::new(JobEventKind::Pending, &record))
                .await?;
        }
        if record.is_dispatched() {
            if let Some(node) = &record.node {
                self.cluster
                    .observe_assigned(node.clone(), id, Some(record.attempt));
            }
            self.dispatch(&record, current.revision).await?;
            return Ok(Accepted::Done);
        }
        if record.status == JobStatus::Pending {
            return Ok(Accepted::Waiting {
                known: Box::new(Versioned {
                    value: record,
                    revision: current.revision,
                }),
                announced: true,
            });
        }
        if record.status == JobStatus::Scheduled {
            // Its timer may not have been armed before the crash; arming replaces it.
            lifecycle::follow_up(&self.mesh, &record).await?;
        }
        Ok(Accepted::Done)
    }

    /// Takes over a job whose submission came back while its record shows it running: an
    /// executor took it from the submission (the fast lane) and has not acknowledged it. If
    /// the instance that runs it is gone (its node down, left, or restarted as another), the
    /// attempt is lost and retried per the job's policy; if it is still there, the attempt is
    /// dispatched to its node once more, so that the node's dispatches, which the lost-node
    /// settlement reads, hold it from now on. The node that runs it acknowledges that
    /// dispatch when the attempt ends.
    async fn recover_running(&self, record: JobRecord, revision: u64) -> Result<Accepted, Error> {
        let Some(node) = record.node.clone() else {
            return Ok(Accepted::Done);
        };
        let node_now = self.mesh.nodes.get(node.as_str()).await?;
        let alive = node_now.as_ref().is_some_and(|now| {
            now.value.status == NodeStatus::Up && Some(now.value.instance) == record.instance
        });
        if alive {
            self.cluster
                .observe_assigned(node.clone(), record.id, Some(record.attempt));
            self.dispatch(&record, revision).await?;
            // The node may have been found down between the look and the dispatch, its
            // dispatches settled without this one: then the attempt is lost after all.
            let still = self.mesh.nodes.get(node.as_str()).await?;
            let alive = still.as_ref().is_some_and(|now| {
                now.value.status == NodeStatus::Up && Some(now.value.instance) == record.instance
            });
            if alive {
                return Ok(Accepted::Done);
            }
        }
        let reason = format!(
            "lost: the executor instance running it ({}) on node {node} is gone",
            record.instance.map(|i| i.to_string()).unwrap_or_default()
        );
        tracing::warn!(job = %record.id, attempt = record.attempt, node = %node, "an attempt taken from its submission lost its executor");
        match lifecycle::end_attempt(&self.mesh, &record, revision, &Outcome::lost(reason)).await {
            // Changed meanwhile: whoever changed it carries it on.
            Ok(_) | Err(Error::Conflict { .. }) => Ok(Accepted::Done),
            Err(error) => Err(error),
        }
    }

    async fn reject(
        &self,
        message: &jetstream::Message,
        seq: u64,
        job: Option<JobId>,
        code: RejectionCode,
        field: Option<&str>,
        reason: String,
    ) -> Handled {
        if code != RejectionCode::Conflict {
            crate::metrics::scheduler().submission("rejected");
        }
        self.report(message, seq, job, code, field, reason).await;
        Handled::Term
    }

    /// Reports a submission whose idempotency key names job `existing`, and acknowledges it:
    /// no new job is created.
    async fn duplicate(&self, message: &jetstream::Message, seq: u64, existing: JobId) -> Handled {
        let reason = format!("the idempotency key names job {existing}; no new job created");
        self.report(
            message,
            seq,
            Some(existing),
            RejectionCode::Duplicate,
            Some("idempotency_key"),
            reason,
        )
        .await;
        Handled::Ack
    }

    async fn report(
        &self,
        message: &jetstream::Message,
        seq: u64,
        job: Option<JobId>,
        code: RejectionCode,
        field: Option<&str>,
        reason: String,
    ) {
        let rejection = Rejection::new(
            message.subject.as_str(),
            message.payload.len(),
            code,
            field.map(str::to_owned),
            reason,
        )
        .of_job(job)
        .at_seq(Some(seq));
        self.mesh.events.rejection(Origin::Submit, &rejection).await;
    }

    pub(crate) fn release(&self, record: &JobRecord) {
        if let Some(node) = &record.node {
            self.cluster.release(node, record.id);
        }
    }
}

pub(crate) enum Accepted {
    /// Created and dispatched, or nothing more to do.
    Done,
    /// Created; waits for a node with room, its record as known here.
    Waiting {
        /// The record as created or read here.
        known: Box<Versioned<JobRecord>>,
        /// Whether its `pending` event has been published.
        announced: bool,
    },
    /// The idempotency key names this existing job.
    Duplicate(JobId),
    /// The id is taken by a different job.
    Conflict(String),
}

/// How often a scheduler looks at the submissions consumer while submissions wait there: two
/// looks with nothing delivered between them and it takes them itself.
const WAITING_LOOK_BUSY: Duration = Duration::from_millis(100);

/// How often it looks while none waits.
const WAITING_LOOK_IDLE: Duration = Duration::from_millis(250);

/// Delay before a failed submission is redelivered: grows with each delivery, up to a minute.
fn retry_delay(delivered: i64) -> Duration {
    let exponent = u32::try_from(delivered.clamp(1, 7) - 1).unwrap_or(0);
    Duration::from_millis(500 * 2u64.pow(exponent)).min(Duration::from_secs(60))
}
