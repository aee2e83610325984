//! Concurrency limits: at most `limit` jobs sharing a key run at once, across the mesh.
//!
//! Each key has a [`Slots`] record in `capstan_concurrency`, written by schedulers by
//! compare-and-swap: the jobs holding a slot and the jobs waiting for one, in the order they
//! get it (higher priority first, then the older job id: submission order). A job takes a slot
//! before it is placed ([`Slots::admit`]) and gives it back when its attempt ends
//! ([`Slots::release`]); a job waiting for a retry or a delayed start holds none. The record
//! is the one place every replica agrees on, so two schedulers cannot both take the last slot.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::JobId;
use crate::timestamp::Timestamp;

/// A job holding a slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Holder {
    /// The attempt it holds the slot for.
    pub attempt: u32,
    /// Since when.
    pub since: Timestamp,
}

/// A job waiting for a slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Waiter {
    /// The job.
    pub job: JobId,
    /// Its priority.
    pub priority: u8,
    /// Since when it waits.
    pub since: Timestamp,
}

impl Waiter {
    /// The order waiters get slots in: higher priority first, then the older job.
    fn rank(&self) -> (std::cmp::Reverse<u8>, JobId) {
        (std::cmp::Reverse(self.priority), self.job)
    }
}

/// One key's slots (JSON in `capstan_concurrency`, by key).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Slots {
    /// The jobs holding a slot, by job id.
    #[serde(default)]
    pub holders: BTreeMap<JobId, Holder>,
    /// The jobs waiting, in the order they get a slot.
    #[serde(default)]
    pub waiting: Vec<Waiter>,
}

/// What [`Slots::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The job holds a slot now (it did already, or took one).
    Admitted,
    /// The job waits: `ahead` jobs will get a slot before it, while `running` hold one.
    Waiting {
        /// Waiters before it.
        ahead: usize,
        /// Jobs holding a slot.
        running: usize,
    },
}

impl Slots {
    /// Admits `job` for `attempt` under `limit` if a slot is free and no job waits before it;
    /// otherwise it waits in line. True in the second value when the record changed.
    pub fn admit(
        &mut self,
        job: JobId,
        attempt: u32,
        priority: u8,
        limit: u32,
        now: Timestamp,
    ) -> (Admission, bool) {
        if let Some(holder) = self.holders.get_mut(&job) {
            // Already admitted (a redelivery, or the attempt after a retry that was not
            // released yet).
            let changed = holder.attempt != attempt;
            holder.attempt = attempt;
            return (Admission::Admitted, changed);
        }
        let mut changed = false;
        let position = match self.waiting.iter().position(|w| w.job == job) {
            Some(position) => position,
            None => {
                let waiter = Waiter {
                    job,
                    priority,
                    since: now,
                };
                let position = self
                    .waiting
                    .partition_point(|other| other.rank() < waiter.rank());
                self.waiting.insert(position, waiter);
                changed = true;
                position
            }
        };
        let free = (limit as usize).saturating_sub(self.holders.len());
        if position < free {
            self.waiting.remove(position);
            self.holders.insert(
                job,
                Holder {
                    attempt,
                    since: now,
                },
            );
            (Admission::Admitted, true)
        } else {
            (
                Admission::Waiting {
                    ahead: position,
                    running: self.holders.len(),
                },
                changed,
            )
        }
    }

    /// Gives back `job`'s slot (and its place in line, if it waits): its attempt ended, or
    /// the job did. True when the record changed.
    pub fn release(&mut self, job: JobId) -> bool {
        let held = self.holders.remove(&job).is_some();
        let before = self.waiting.len();
        self.waiting.retain(|w| w.job != job);
        held || self.waiting.len() != before
    }

    /// Where `job` stands: admitted, waiting (with how many before it), or unknown here.
    pub fn standing(&self, job: JobId) -> Option<Admission> {
        if self.holders.contains_key(&job) {
            return Some(Admission::Admitted);
        }
        self.waiting
            .iter()
            .position(|w| w.job == job)
            .map(|ahead| Admission::Waiting {
                ahead,
                running: self.holders.len(),
            })
    }

    /// Every job the record names.
    pub fn jobs(&self) -> impl Iterator<Item = JobId> + '_ {
        self.holders
            .keys()
            .copied()
            .chain(self.waiting.iter().map(|w| w.job))
    }

    /// True when it names no job (the record can be removed).
    pub fn is_empty(&self) -> bool {
        self.holders.is_empty() && self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(n: u64) -> JobId {
        // Ids in creation order, as ULIDs made one millisecond apart would be.
        format!("01J00000000000000000000{n:03}")
            .parse()
            .expect("a valid id")
    }

    #[test]
    fn jobs_take_free_slots_up_to_the_limit_and_the_rest_wait_in_line() {
        let mut slots = Slots::default();
        let now = Timestamp::from_millis(0);
        assert_eq!(slots.admit(job(1), 1, 5, 2, now).0, Admission::Admitted);
        assert_eq!(slots.admit(job(2), 1, 5, 2, now).0, Admission::Admitted);
        assert_eq!(
            slots.admit(job(3), 1, 5, 2, now).0,
            Admission::Waiting {
                ahead: 0,
                running: 2
            }
        );
        assert_eq!(
            slots.admit(job(4), 1, 5, 2, now).0,
            Admission::Waiting {
                ahead: 1,
                running: 2
            }
        );
        // Asking again changes nothing.
        assert!(!slots.admit(job(4), 1, 5, 2, now).1);
        assert!(slots.release(job(1)));
        // The slot goes to the first in line, not to whoever asks first.
        assert!(matches!(
            slots.admit(job(4), 1, 5, 2, now).0,
            Admission::Waiting { .. }
        ));
        assert_eq!(slots.admit(job(3), 1, 5, 2, now).0, Admission::Admitted);
        assert_eq!(slots.holders.len(), 2);
    }

    #[test]
    fn a_higher_priority_goes_before_older_jobs_and_equal_ones_keep_submission_order() {
        let mut slots = Slots::default();
        let now = Timestamp::from_millis(0);
        slots.admit(job(1), 1, 5, 1, now);
        slots.admit(job(3), 1, 5, 1, now);
        slots.admit(job(2), 1, 5, 1, now);
        slots.admit(job(4), 1, 9, 1, now);
        let order: Vec<JobId> = slots.waiting.iter().map(|w| w.job).collect();
        assert_eq!(order, vec![job(4), job(2), job(3)]);
    }

    #[test]
    fn a_job_admitted_again_for_its_next_attempt_keeps_its_slot() {
        let mut slots = Slots::default();
        let now = Timestamp::from_millis(0);
        slots.admit(job(1), 1, 5, 1, now);
        assert_eq!(
            slots.admit(job(1), 2, 5, 1, now),
            (Admission::Admitted, true)
        );
        assert_eq!(slots.holders[&job(1)].attempt, 2);
        assert!(slots.release(job(1)));
        assert!(!slots.release(job(1)));
        assert!(slots.is_empty());
    }

    #[test]
    fn a_lower_limit_admits_no_one_while_more_than_it_run() {
        let mut slots = Slots::default();
        let now = Timestamp::from_millis(0);
        for n in 1..=3 {
            slots.admit(job(n), 1, 5, 3, now);
        }
        assert!(matches!(
            slots.admit(job(4), 1, 5, 2, now).0,
            Admission::Waiting { running: 3, .. }
        ));
        slots.release(job(1));
        assert!(matches!(
            slots.admit(job(4), 1, 5, 2, now).0,
            Admission::Waiting { .. }
        ));
        slots.release(job(2));
        assert_eq!(slots.admit(job(4), 1, 5, 2, now).0, Admission::Admitted);
    }
}
