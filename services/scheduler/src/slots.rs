//! Concurrency slots: a job with `concurrency` waits in the queue until it holds a slot under
//! its key ([`capstan_protocol::concurrency::Slots`], shared by every replica by
//! compare-and-swap), and gives it back when its attempt ends.
//!
//! Every replica tries to admit the gated jobs it holds whenever a slot may have freed (the
//! concurrency bucket changed, an attempt ended) and every second; a slot goes to the first job
//! in the key's line, whichever replica holds it. Every replica hears the attempts end (their
//! events carry the key) and gives their slots back; a sweep every ten seconds gives back the
//! slots of jobs that ended unheard, and the places in line of jobs that are gone.

use std::sync::Arc;
use std::time::Duration;

use capstan_mesh::{BucketView, Change, Error, Modified};
use capstan_protocol::concurrency::{Admission, Slots};
use capstan_protocol::{JobId, Timestamp};
use tokio_util::sync::CancellationToken;

use crate::Scheduler;
use crate::waiting::Gated;

/// How often gated jobs are tried without being woken.
const ADMIT_EVERY: Duration = Duration::from_secs(1);
/// How often the slots of jobs that ended unheard are given back.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

impl Scheduler {
    /// Admits the gated jobs this replica holds as slots free, until `shutdown`.
    pub(crate) async fn admit_gated(
        self: Arc<Self>,
        slots: BucketView<Slots>,
        shutdown: CancellationToken,
    ) {
        let changed = slots.changed();
        let mut every = tokio::time::interval(ADMIT_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = changed.notified() => {}
                _ = self.gate.notified() => {}
                _ = every.tick() => {}
                _ = sweep.tick() => self.sweep_slots(&slots).await,
            }
            for gated in self.waiting.gated() {
                // A job already in line that the view shows still behind the free slots
                // would only read the record to learn the same: skip the round trip. A
                // change of the record wakes this loop again.
                if still_behind(&slots, &gated) {
                    continue;
                }
                match self.admit(&gated).await {
                    Ok(Admission::Admitted) => {
                        if self.waiting.admitted(gated.job) {
                            self.wake.notify_one();
                        }
                    }
                    Ok(Admission::Waiting { .. }) => {}
                    Err(error) => {
                        tracing::debug!(job = %gated.job, key = %gated.concurrency.key, error = %error, "cannot take a concurrency slot yet");
                    }
                }
            }
        }
    }

    /// Takes a slot for `gated`, or puts it in line.
    async fn admit(&self, gated: &Gated) -> Result<Admission, Error> {
        let now = Timestamp::now();
        let mut decided = None;
        let modified = self
            .mesh
            .concurrency
            .modify(&gated.concurrency.key, |current| {
                let mut slots = current.map(|c| c.value.clone()).unwrap_or_default();
                let (admission, changed) = slots.admit(
                    gated.job,
                    gated.attempt,
                    gated.priority,
                    gated.concurrency.limit,
                    now,
                );
                decided = Some(admission);
                if changed {
                    Change::Write(slots)
                } else {
                    Change::Stop(admission)
                }
            })
            .await?;
        Ok(match modified {
            Modified::Stopped(admission) => admission,
            Modified::Written { .. } => decided.unwrap_or(Admission::Admitted),
        })
    }

    /// Gives back `job`'s slot under `key` (its attempt ended), and wakes the gated jobs.
    pub(crate) async fn release_slot(&self, key: &str, job: JobId) {
        let released = self
            .mesh
            .concurrency
            .modify(key, |current| {
                let Some(current) = current else {
                    return Change::Stop(());
                };
                let mut slots = current.value.clone();
                if slots.release(job) {
                    Change::Write(slots)
                } else {
                    Change::Stop(())
                }
            })
            .await;
        match released {
            Ok(_) => self.gate.notify_one(),
            Err(error) => {
                tracing::debug!(job = %job, key = %key, error = %error, "cannot give a slot back; the sweep will");
            }
        }
    }

    /// Gives back the slots, and the places in line, of jobs that ended, wait for a timer, or
    /// are gone.
    async fn sweep_slots(&self, slots: &BucketView<Slots>) {
        let named: Vec<(String, Vec<JobId>)> = slots.read(|all| {
            all.iter()
                .map(|(key, slots)| (key.clone(), slots.value.jobs().collect()))
                .collect()
        });
        for (key, jobs) in named {
            for job in jobs {
                let done = match self.mesh.jobs.get(&job.to_string()).await {
                    Ok(Some(record)) => {
                        let status = record.value.status;
                        status.is_terminal() || status.is_waiting_for_timer()
                    }
                    Ok(None) => true,
                    Err(_) => false,
                };
                if done {
                    self.release_slot(&key, job).await;
                }
            }
        }
    }
}

/// Whether the live view shows `gated` in its key's line, with at least as many jobs before it
/// as there are free slots under its limit.
fn still_behind(slots: &BucketView<Slots>, gated: &Gated) -> bool {
    let Some(current) = slots.get(&gated.concurrency.key) else {
        return false;
    };
    match current.value.standing(gated.job) {
        Some(Admission::Waiting { ahead, running }) => {
            ahead >= (gated.concurrency.limit as usize).saturating_sub(running)
        }
        _ => false,
    }
}
