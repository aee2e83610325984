//! Jobs accepted but not yet placed because no executor had room.
//!
//! Their submission messages stay unacknowledged, kept alive with progress acks, so the
//! submissions stream remains their durable copy: if this replica dies, JetStream redelivers
//! them to another one once the ack wait passes. Jobs are grouped by label selector so a job
//! nobody can run does not hold up the jobs behind it; within a group they are placed in
//! arrival order, and the group whose oldest job is oldest goes first.
//!
//! A new job's `pending` event is published only if it is still waiting here a moment after
//! its creation ([`Waiting::due_announcements`]): under load most jobs wait a few
//! milliseconds for a slot, and announcing each would cost a stored write and five messages
//! for a state no one watches.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use capstan_mesh::Versioned;
use capstan_protocol::{Concurrency, JobId, JobRecord, Labels, NodeId};

use crate::cluster::Cluster;

/// A job waiting for a slot, with its held submission.
pub struct Held {
    /// The submission, unacknowledged.
    pub message: jetstream::Message,
    /// The job.
    pub job: JobId,
    /// Its label selector.
    pub selector: Labels,
    /// Labels it prefers its node to carry (see [`Cluster::reserve_preferring`]).
    pub preferred: Labels,
    /// For a job woken by its timer: the attempt number the timer names (the job is placed
    /// only if it still waits with it). `None` for a new submission.
    pub timer: Option<u32>,
    /// The job's record as last read or written here, so the placement can write before it
    /// reads; `None` when not known (the placement reads it).
    pub known: Option<Versioned<JobRecord>>,
    /// Its priority: higher is placed first.
    pub priority: u8,
    /// Its concurrency limit, if it has one.
    pub concurrency: Option<Concurrency>,
    /// Whether it holds a slot under its concurrency limit (always, without one).
    pub admitted: bool,
    /// When its creation is to be announced if it still waits; `None` once announced, or
    /// when there is nothing to announce.
    announce_at: Option<Instant>,
    order: u64,
    last_progress: Instant,
}

impl Held {
    /// The order jobs are placed in: higher priority first, then arrival.
    fn rank(&self) -> (std::cmp::Reverse<u8>, u64) {
        (std::cmp::Reverse(self.priority), self.order)
    }
}

/// A waiting job that needs a concurrency slot before it can be placed.
#[derive(Debug, Clone)]
pub struct Gated {
    /// The job.
    pub job: JobId,
    /// The attempt it will run.
    pub attempt: u32,
    /// Its priority.
    pub priority: u8,
    /// Its limit.
    pub concurrency: Concurrency,
}

/// The waiting jobs.
#[derive(Default)]
pub struct Waiting {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    groups: HashMap<Labels, VecDeque<Held>>,
    next_order: u64,
    len: usize,
    /// How many held jobs have an announcement to come.
    unannounced: usize,
}

impl Inner {
    /// Adds `held` to its group, in rank order.
    fn insert(&mut self, held: Held) {
        self.len += 1;
        self.unannounced += usize::from(held.announce_at.is_some());
        let queue = self.groups.entry(held.selector.clone()).or_default();
        let position = queue.partition_point(|other| other.rank() < held.rank());
        queue.insert(position, held);
    }
}

impl Waiting {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds a job at the back of its group, with its record as last read or written here (its
    /// id and label selector are the record's). `announce_at`: when its `pending` event is
    /// due if it still waits (`None`: nothing to announce).
    pub fn push(
        &self,
        message: jetstream::Message,
        known: Versioned<JobRecord>,
        timer: Option<u32>,
        preferred: Labels,
        announce_at: Option<Instant>,
    ) {
        let job = known.value.id;
        let selector = known.value.spec.placement();
        let priority = known.value.spec.priority;
        let concurrency = known.value.spec.concurrency.clone();
        let admitted = concurrency.is_none();
        let known = Some(known);
        let mut inner = self.inner();
        let order = inner.next_order;
        inner.next_order += 1;
        inner.insert(Held {
            message,
            job,
            selector,
            preferred,
            timer,
            known,
            priority,
            concurrency,
            admitted,
            announce_at,
            order,
            last_progress: Instant::now(),
        });
    }

    /// Puts back a job whose placement failed, in its place.
    pub fn push_front(&self, held: Held) {
        self.inner().insert(held);
    }

    /// The jobs waiting for a concurrency slot.
    pub fn gated(&self) -> Vec<Gated> {
        let inner = self.inner();
        let mut gated: Vec<(std::cmp::Reverse<u8>, u64, Gated)> = inner
            .groups
            .values()
            .flatten()
            .filter(|held| !held.admitted)
            .filter_map(|held| {
                let concurrency = held.concurrency.clone()?;
                let attempt = held.known.as_ref().map_or(1, |k| k.value.attempt + 1);
                let gated = Gated {
                    job: held.job,
                    attempt,
                    priority: held.priority,
                    concurrency,
                };
                Some((std::cmp::Reverse(held.priority), held.order, gated))
            })
            .collect();
        gated.sort_by_key(|(priority, order, _)| (*priority, *order));
        gated.into_iter().map(|(_, _, gated)| gated).collect()
    }

    /// Marks `job` as holding its concurrency slot; false when it no longer waits here.
    pub fn admitted(&self, job: JobId) -> bool {
        let mut inner = self.inner();
        for held in inner.groups.values_mut().flatten() {
            if held.job == job {
                held.admitted = true;
                return true;
            }
        }
        false
    }

    /// Removes and returns every job that now has a node, reserving the node in `cluster`.
    /// A job still waiting for its concurrency slot is passed over.
    pub fn take_placeable(&self, cluster: &Cluster) -> Vec<(Held, NodeId)> {
        let mut inner = self.inner();
        let mut fronts: Vec<((std::cmp::Reverse<u8>, u64), Labels)> = inner
            .groups
            .iter()
            .filter_map(|(selector, queue)| {
                let first = queue.iter().find(|h| h.admitted)?;
                Some((first.rank(), selector.clone()))
            })
            .collect();
        fronts.sort_by_key(|(rank, _)| *rank);
        let mut placed = Vec::new();
        let mut placed_unannounced = 0;
        for (_, selector) in fronts {
            let Some(queue) = inner.groups.get_mut(&selector) else {
                continue;
            };
            let mut index = 0;
            while index < queue.len() {
                let held = &queue[index];
                if !held.admitted {
                    index += 1;
                    continue;
                }
                match cluster.reserve_preferring(&selector, &held.preferred, held.job) {
                    Ok(node) => {
                        let held = queue.remove(index).expect("index is in range");
                        placed_unannounced += usize::from(held.announce_at.is_some());
                        placed.push((held, node));
                    }
                    Err(_) => break,
                }
            }
            if queue.is_empty() {
                inner.groups.remove(&selector);
            }
        }
        inner.len -= placed.len();
        inner.unannounced -= placed_unannounced;
        placed
    }

    /// The records of jobs still waiting whose creation is due to be announced at `now`; each
    /// is returned once.
    pub fn due_announcements(&self, now: Instant) -> Vec<JobRecord> {
        let mut inner = self.inner();
        if inner.unannounced == 0 {
            return Vec::new();
        }
        let mut due = Vec::new();
        let mut cleared = 0;
        for held in inner.groups.values_mut().flatten() {
            if held.announce_at.is_some_and(|at| at <= now) {
                held.announce_at = None;
                cleared += 1;
                // Its creation, as long as it is still the record it was created as.
                if let Some(known) = held.known.as_ref().filter(|k| k.value.is_unplaced()) {
                    due.push(known.value.clone());
                }
            }
        }
        inner.unannounced -= cleared;
        due
    }

    /// Reply subjects of held submissions not progress-acked for `every`; marks them done.
    pub fn due_for_progress(&self, every: Duration) -> Vec<async_nats::Subject> {
        let now = Instant::now();
        let mut inner = self.inner();
        let mut due = Vec::new();
        for queue in inner.groups.values_mut() {
            for held in queue.iter_mut() {
                if now.duration_since(held.last_progress) >= every {
                    held.last_progress = now;
                    if let Some(reply) = held.message.reply.clone() {
                        due.push(reply);
                    }
                }
            }
        }
        due
    }

    /// Removes every waiting job (at shutdown, to hand them back).
    pub fn drain(&self) -> Vec<Held> {
        let mut inner = self.inner();
        inner.len = 0;
        inner.unannounced = 0;
        inner.groups.drain().flat_map(|(_, queue)| queue).collect()
    }

    /// How many jobs wait.
    pub fn len(&self) -> usize {
        self.inner().len
    }

    /// True when none wait.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
