//! The attempts this executor instance holds: for each, its number, what stops it, and whether
//! its outcome is being written; and what a held attempt's record, read while it runs, means
//! for it (`held_check`, a pure function). Acting on that is `control`'s.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use capstan_protocol::{InstanceId, JobId, JobRecord, JobStatus, NodeId};
use tokio::sync::Notify;

use crate::runner::Stops;

/// An attempt this instance holds.
pub(crate) struct Held {
    /// Its number.
    attempt: u32,
    /// What stops it.
    stops: Stops,
    /// Its process ended and its outcome is being recorded: the record may already show it.
    finishing: bool,
}

/// What [`HeldAttempts::hold`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hold {
    /// The attempt is held now.
    Held,
    /// This attempt was held already: its dispatch was redelivered while it runs, and the
    /// running attempt acknowledges the message when it ends.
    AlreadyHeld,
    /// Another attempt of the job (this number) is still held: typically the previous one,
    /// its process ended and its outcome being settled, when a retry at once is dispatched to
    /// the same node. The dispatch should come back once that attempt is released.
    OtherAttempt(u32),
}

/// The attempts this instance holds, by job.
#[derive(Default)]
pub(crate) struct HeldAttempts {
    held: Mutex<HashMap<JobId, Held>>,
    /// Notified whenever an attempt is released.
    released: Notify,
}

impl HeldAttempts {
    fn lock(&self) -> MutexGuard<'_, HashMap<JobId, Held>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Holds attempt `attempt` of `job`, stopped through `stops`, unless the job is held
    /// already: then nothing changes, and what is held says what to do with the dispatch.
    pub(super) fn hold(&self, job: JobId, attempt: u32, stops: Stops) -> Hold {
        let mut held = self.lock();
        if let Some(current) = held.get(&job) {
            return if current.attempt == attempt {
                Hold::AlreadyHeld
            } else {
                Hold::OtherAttempt(current.attempt)
            };
        }
        held.insert(
            job,
            Held {
                attempt,
                stops,
                finishing: false,
            },
        );
        Hold::Held
    }

    /// Marks `job`'s attempt as having its outcome written: from now on its record changes
    /// because of the attempt itself, which the check must not take for it being taken away.
    pub(super) fn finishing(&self, job: JobId) {
        if let Some(held) = self.lock().get_mut(&job) {
            held.finishing = true;
        }
    }

    /// Stops holding `job`, and wakes whoever waits for the executor to be idle.
    pub(super) fn release(&self, job: JobId) {
        self.lock().remove(&job);
        self.released.notify_waiters();
    }

    /// The jobs held.
    pub(super) fn jobs(&self) -> Vec<JobId> {
        self.lock().keys().copied().collect()
    }

    /// How many attempts are held.
    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no attempt is held.
    pub(super) fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Stops every held attempt, to be handed back.
    pub(super) fn stop_all(&self) {
        for held in self.lock().values() {
            held.stops.shutdown.cancel();
        }
    }

    /// Stops `job`'s attempt `attempt`, if held, as cancelled. Returns whether it was held.
    pub(super) fn cancel(&self, job: JobId, attempt: u32) -> bool {
        match self.lock().get(&job) {
            Some(held) if held.attempt == attempt => {
                held.stops.cancel.cancel();
                true
            }
            _ => false,
        }
    }

    /// The attempts whose records the once-a-second check reads: those still running (not
    /// finishing).
    pub(super) fn running(&self) -> Vec<(JobId, u32)> {
        self.lock()
            .iter()
            .filter(|(_, held)| !held.finishing)
            .map(|(job, held)| (*job, held.attempt))
            .collect()
    }

    /// What stops `job`'s attempt `attempt`, while it is held and still running; `None` once
    /// it finishes (its record may then hold its own outcome) or is released.
    pub(super) fn stops_while_running(&self, job: JobId, attempt: u32) -> Option<Stops> {
        match self.lock().get(&job) {
            Some(held) if held.attempt == attempt && !held.finishing => Some(held.stops.clone()),
            _ => None,
        }
    }

    /// Waits until attempt `attempt` of `job` is no longer held.
    pub(super) async fn wait_released(&self, job: JobId, attempt: u32) {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if self
                .lock()
                .get(&job)
                .is_none_or(|held| held.attempt != attempt)
            {
                return;
            }
            released.await;
        }
    }

    /// Waits until no attempt is held, or `timeout` passes; true if none is.
    pub(super) async fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let released = self.released.notified();
            if self.is_empty() {
                return true;
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return self.is_empty();
            }
        }
    }
}

/// What the record of a held attempt, still running here, means for it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum HeldCheck {
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
pub(super) fn held_check(
    record: &JobRecord,
    attempt: u32,
    node: &NodeId,
    instance: InstanceId,
) -> HeldCheck {
    // Before the claim lands the record may still be the unplaced one of a job placed after
    // waiting: pending, no node, the attempt before this one (the dispatch carries the
    // assignment, and the claim writes it). That is this attempt on its way, not a loss.
    let unclaimed = record.is_unplaced() && record.attempt.checked_add(1) == Some(attempt);
    let ours = unclaimed
        || record.attempt == attempt
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

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_protocol::job::Outcome;
    use capstan_protocol::{JobSpec, Timestamp};

    fn running(node: &NodeId, instance: InstanceId) -> JobRecord {
        let now = Timestamp::now();
        JobRecord::new(JobId::generate(), JobSpec::shell("true"), now)
            .assigned(node.clone(), now)
            .started(instance, now)
    }

    #[tokio::test]
    async fn a_dispatch_for_a_held_job_is_told_apart_by_attempt_and_held_again_once_released() {
        let held = HeldAttempts::default();
        let job = JobId::generate();
        assert_eq!(held.hold(job, 1, Stops::default()), Hold::Held);
        // The same attempt again: a redelivery while it runs.
        assert_eq!(held.hold(job, 1, Stops::default()), Hold::AlreadyHeld);
        let waiting = held.wait_released(job, 1);
        tokio::pin!(waiting);
        assert!(
            futures::FutureExt::now_or_never(waiting.as_mut()).is_none(),
            "attempt 1 is still held"
        );
        // The next attempt while the first is still settled here.
        assert_eq!(held.hold(job, 2, Stops::default()), Hold::OtherAttempt(1));
        held.release(job);
        assert!(
            futures::FutureExt::now_or_never(waiting).is_some(),
            "released: whoever waits for it goes on"
        );
        assert_eq!(held.hold(job, 2, Stops::default()), Hold::Held);
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
    fn a_held_attempt_placed_after_waiting_and_not_yet_claimed_carries_on() {
        let node = NodeId::new("exec-1").expect("a node id");
        let instance = InstanceId::generate();
        let now = Timestamp::now();
        let waiting = JobRecord::new(JobId::generate(), JobSpec::shell("true"), now);
        let dispatched = waiting.assigned(node.clone(), now);
        assert_eq!(
            held_check(&waiting, dispatched.attempt, &node, instance),
            HeldCheck::Carry,
            "the record the dispatch was made over, before the claim writes it"
        );
        assert_eq!(
            held_check(&waiting.cancelled(now), dispatched.attempt, &node, instance),
            HeldCheck::Taken,
            "cancelled before the claim"
        );
        assert_eq!(
            held_check(&waiting, dispatched.attempt + 1, &node, instance),
            HeldCheck::Taken,
            "not the attempt placed over it"
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
