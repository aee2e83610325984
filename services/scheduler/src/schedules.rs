//! Running schedules: each fired tick is decided by [`ScheduleRecord::decide`] and acted on by
//! the replica the shared ticks consumer hands it to. The steps are ordered so that repeating
//! them is harmless: the run is submitted with an idempotency key naming the tick, the next
//! tick is armed with a deduplication id, and only then does the record move on, by
//! compare-and-swap; the tick is acknowledged last. A replica that dies on the way leaves the
//! tick to be delivered again, and the record tells the next one what is already done.
//!
//! Two more duties: a run queued behind its predecessor (`overlap: queue`) starts when any
//! replica hears the predecessor end (or at the next tick, if none did), and every replica
//! re-arms, now and then, a schedule whose tick is long overdue (its arming was lost with the
//! writer that made it).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use capstan_mesh::{BucketView, Error, Submitter, Versioned, consume, schedules};
use capstan_protocol::schedule::{Decision, ScheduleEvent, ScheduleRecord, Tick, TickOutcome};
use capstan_protocol::subjects::Origin;
use capstan_protocol::{JobId, Timestamp, topology};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::Scheduler;

/// How many times a tick's record is read again when another writer changed it meanwhile.
const ATTEMPTS: usize = 8;
/// How often each replica looks for schedules whose tick is overdue.
const SWEEP_EVERY: Duration = Duration::from_secs(15);
/// How long past its time a schedule's next tick may be, unhandled, before it is armed again.
const OVERDUE: Duration = Duration::from_secs(30);

impl Scheduler {
    /// Consumes fired ticks until `shutdown`; fails when its consumer cannot be created.
    pub(crate) async fn consume_ticks(
        self: Arc<Self>,
        submitter: Submitter,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let spec = topology::ConsumerSpec {
            ack_wait: self.config.ack_wait,
            ..topology::ticks_consumer()
        };
        let consumer = consume::durable(&self.mesh.js, &spec, &shutdown).await?;
        consume::batches(
            &consumer,
            256,
            Duration::from_millis(5),
            &shutdown,
            |batch| {
                let scheduler = self.clone();
                let submitter = submitter.clone();
                async move {
                    let ticks = batch.into_iter().map(|message| {
                        let (scheduler, submitter) = (scheduler.clone(), submitter.clone());
                        async move { scheduler.tick(&submitter, message).await }
                    });
                    futures::future::join_all(ticks).await;
                }
            },
        )
        .await;
        Ok(())
    }

    async fn tick(&self, submitter: &Submitter, message: jetstream::Message) {
        let Some(tick) = self
            .mesh
            .events
            .decode_stored::<Tick>(Origin::Timer, &message)
            .await
        else {
            return;
        };
        let fired_at = message
            .info()
            .ok()
            .map(|info| {
                Timestamp::from_millis((info.published.unix_timestamp_nanos() / 1_000_000) as i64)
            })
            .unwrap_or_else(Timestamp::now);
        let span = tracing::info_span!(
            "schedule tick",
            otel.kind = "consumer",
            schedule = %tick.schedule,
            tick = %tick.at.to_rfc3339(),
        );
        capstan_telemetry::propagation::follow(&span, message.headers.as_ref());
        let handled = self
            .handle_tick(submitter, &tick, fired_at)
            .instrument(span)
            .await;
        match handled {
            Ok(()) => {
                let _ = message.ack().await;
            }
            Err(error) => {
                tracing::warn!(schedule = %tick.schedule, error = %error, "cannot handle a schedule's tick; retrying");
                let _ = message
                    .ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            }
        }
    }

    async fn handle_tick(
        &self,
        submitter: &Submitter,
        tick: &Tick,
        fired_at: Timestamp,
    ) -> Result<(), Error> {
        // A run submitted in an earlier pass, whose record changed before it was written.
        let mut submitted: Option<(Timestamp, JobId)> = None;
        for _ in 0..ATTEMPTS {
            let Some(current) = self.mesh.schedules.get(&tick.schedule).await? else {
                // Deleted since the tick was armed.
                return Ok(());
            };
            let Versioned {
                value: record,
                revision,
            } = current;
            let previous_running = self.running(record.last_job).await?;
            if record.queued.is_some() && !previous_running {
                // The run queued behind the last one was not started when it ended.
                self.start_queued(submitter, &tick.schedule).await?;
                continue;
            }
            let now = Timestamp::now();
            let Decision::Act {
                outcome,
                label,
                cancel_previous,
                next,
            } = record.decide(tick, fired_at, now, previous_running)
            else {
                // Paused or changed meanwhile; a run already submitted for the tick is still
                // the schedule's, and counted.
                let Some((label, job)) = submitted else {
                    return Ok(());
                };
                let handled = ScheduleEvent {
                    schedule: record.name.clone(),
                    tick: label,
                    outcome: TickOutcome::Ran,
                    job: Some(job),
                    at: now,
                };
                let next = record.next;
                if self.record(record, revision, &handled, next).await? {
                    return Ok(());
                }
                continue;
            };
            let mut job = None;
            if outcome == TickOutcome::Ran {
                if cancel_previous
                    && let Some(previous) = record.last_job
                    && let Err(error) = crate::cancel_job_now(&self.mesh, previous).await
                {
                    tracing::debug!(job = %previous, error = %error.message, "cannot cancel the previous run");
                }
                let created = submitter
                    .submit_as(&record.run_spec(label), Some(&record.owner))
                    .await?;
                job = Some(created.id);
                submitted = Some((label, created.id));
            }
            if let Some(at) = next {
                let following = Tick {
                    schedule: record.name.clone(),
                    generation: record.generation,
                    at,
                    armed_at: now,
                };
                schedules::arm(&self.mesh, &following).await?;
            }
            let handled = ScheduleEvent {
                schedule: record.name.clone(),
                tick: label,
                outcome,
                job,
                at: now,
            };
            // Changed meanwhile (a person's change, or another replica with the same tick):
            // read it again; what was done is idempotent.
            if self.record(record, revision, &handled, next).await? {
                return Ok(());
            }
        }
        Err(Error::KeptChanging {
            key: tick.schedule.clone(),
        })
    }

    /// Records `handled` in `record` (read at `revision`), its next tick `next`, and announces
    /// it: false when the record changed meanwhile and nothing was written.
    async fn record(
        &self,
        mut record: ScheduleRecord,
        revision: u64,
        handled: &ScheduleEvent,
        next: Option<Timestamp>,
    ) -> Result<bool, Error> {
        record.record_tick(handled.tick, handled.outcome, handled.job, next, handled.at);
        match self
            .mesh
            .schedules
            .update(&handled.schedule, &record, revision)
            .await
        {
            Ok(_) => {
                crate::metrics::scheduler().schedule_tick(handled.outcome.as_str());
                if let Err(error) = self.mesh.events.schedule(handled).await {
                    tracing::debug!(error = %error, "cannot announce a schedule's tick");
                }
                Ok(true)
            }
            Err(Error::Conflict { .. }) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Whether `job` has not ended yet.
    async fn running(&self, job: Option<JobId>) -> Result<bool, Error> {
        let Some(job) = job else { return Ok(false) };
        Ok(match self.mesh.jobs.get(&job.to_string()).await? {
            Some(record) => !record.value.status.is_terminal(),
            // Expired, or its submission is still on its way: a run just submitted counts as
            // going only once its record exists.
            None => false,
        })
    }

    /// Starts the run queued behind the schedule's last one, if that one has ended.
    pub(crate) async fn start_queued(
        &self,
        submitter: &Submitter,
        schedule: &str,
    ) -> Result<(), Error> {
        for _ in 0..ATTEMPTS {
            let Some(Versioned {
                value: record,
                revision,
            }) = self.mesh.schedules.get(schedule).await?
            else {
                return Ok(());
            };
            let Some(tick) = record.queued else {
                return Ok(());
            };
            if self.running(record.last_job).await? {
                return Ok(());
            }
            let created = submitter
                .submit_as(&record.run_spec(tick), Some(&record.owner))
                .await?;
            let handled = ScheduleEvent {
                schedule: record.name.clone(),
                tick,
                outcome: TickOutcome::Ran,
                job: Some(created.id),
                at: Timestamp::now(),
            };
            let next = record.next;
            if self.record(record, revision, &handled, next).await? {
                return Ok(());
            }
        }
        Err(Error::KeptChanging {
            key: schedule.to_owned(),
        })
    }

    /// Re-arms, every [`SWEEP_EVERY`], the schedules whose next tick is more than
    /// [`OVERDUE`] past: their arming was lost, or no scheduler ran when it fired. Reads the
    /// schedules from a live view of their bucket, not key by key.
    pub(crate) async fn sweep_schedules(self: Arc<Self>, shutdown: CancellationToken) {
        let view = match BucketView::start(self.mesh.schedules.clone(), shutdown.clone()).await {
            Ok(view) => view,
            Err(error) => {
                tracing::error!(error = %error, "cannot watch the schedules; overdue ones will not be re-armed");
                return;
            }
        };
        let mut every = tokio::time::interval(SWEEP_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = every.tick() => {}
            }
            let now = Timestamp::now();
            let due: Vec<Tick> = view.read(|all| {
                all.values()
                    .filter_map(|versioned| overdue(&versioned.value, now))
                    .collect()
            });
            for tick in due {
                if let Err(error) = schedules::arm(&self.mesh, &tick).await {
                    tracing::debug!(schedule = %tick.schedule, error = %error, "cannot re-arm a schedule");
                }
            }
        }
    }
}

/// The tick to arm again for `record`, if its next one is overdue.
fn overdue(record: &ScheduleRecord, now: Timestamp) -> Option<Tick> {
    let tick = record.armed(now)?;
    (tick.at.plus(OVERDUE) < now).then_some(tick)
}
