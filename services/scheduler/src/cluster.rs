//! The scheduler's picture of the cluster: which executor nodes are up, what they carry, and
//! how many jobs each has been given — and the placement decision made from it.
//!
//! Node records come from the registry's bucket (a live view). Assignments are counted from
//! three sources: this replica's own placements (counted the moment they are decided), the job
//! events every replica publishes (so each replica sees the others' placements and every
//! job's end), and the executors' heartbeats, which correct whatever the first two missed
//! (an event lost while reconnecting, a replica that just started).

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use capstan_mesh::BucketView;
use capstan_protocol::spec::selects_node;
use capstan_protocol::{JobId, Labels, NodeId, NodeRecord, NodeStatus};

/// Nodes and their assignments.
pub struct Cluster {
    nodes: BucketView<NodeRecord>,
    state: Mutex<State>,
    depth: f64,
    grace: Duration,
}

#[derive(Default)]
struct State {
    /// Jobs assigned to each node and not known finished, with when we learnt of them.
    assigned: HashMap<NodeId, HashMap<JobId, Instant>>,
    /// When each node was last picked, to spread ties.
    last_pick: HashMap<NodeId, Instant>,
    /// Nodes kept out of placement until the time given (see [`Cluster::fence`]).
    fenced: HashMap<NodeId, Instant>,
    /// Jobs seen ending, with the attempt that ended and when, until they are assigned again
    /// or the record of it is older than any heartbeat could be: a heartbeat written before a
    /// job ended still lists it, and an announcement of its placement that arrives after its
    /// end (published before it, or by a replica that had not seen it yet), and neither may
    /// count it again.
    ended: HashMap<JobId, (u32, Instant)>,
}

impl State {
    fn load(&self, node: &NodeId) -> usize {
        self.assigned.get(node).map_or(0, HashMap::len)
    }
}

/// Why a job is still waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortage {
    /// No up node carries the job's labels.
    NoMatchingNode,
    /// Matching nodes exist, all at their limit.
    NoFreeSlot,
}

impl Cluster {
    /// A cluster over the nodes in `nodes`. A node is given at most `depth` × its slots
    /// (running plus waiting in its queue); assignments missing from a node's heartbeat are
    /// dropped once older than `grace`.
    pub fn new(nodes: BucketView<NodeRecord>, depth: f64, grace: Duration) -> Self {
        Self {
            nodes,
            state: Mutex::new(State::default()),
            depth: depth.max(1.0),
            grace,
        }
    }

    /// The nodes that are up and schedulable and carry `selector`'s labels, by id: the
    /// targets of a fan-out over nodes.
    pub fn schedulable_matching(&self, selector: &Labels) -> Vec<NodeId> {
        let mut found = self.nodes.read(|entries| {
            entries
                .values()
                .map(|entry| &entry.value)
                .filter(|node| {
                    node.is_schedulable() && selects_node(selector, node.id.as_str(), &node.labels)
                })
                .map(|node| node.id.clone())
                .collect::<Vec<_>>()
        });
        found.sort();
        found
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn limit(&self, capacity: u32) -> usize {
        (f64::from(capacity) * self.depth).ceil() as usize
    }

    /// Picks the up node that carries `selector`'s labels, has room, and is least loaded
    /// relative to its slots (ties: the one picked longest ago), and counts `job` against it.
    pub fn reserve(&self, selector: &Labels, job: JobId) -> Result<NodeId, Shortage> {
        self.reserve_preferring(selector, &Labels::new(), job)
    }

    /// Like [`Cluster::reserve`], preferring, among the nodes with room, those that also carry
    /// `preferred`'s labels (a job on a remote system: the gateways in the system's zone).
    pub fn reserve_preferring(
        &self,
        selector: &Labels,
        preferred: &Labels,
        job: JobId,
    ) -> Result<NodeId, Shortage> {
        let mut state = self.state();
        let mut matched = false;
        let now = Instant::now();
        state.fenced.retain(|_, until| *until > now);
        let best = self.nodes.read(|entries| {
            entries
                .values()
                .map(|entry| &entry.value)
                .filter(|node| {
                    node.is_schedulable()
                        && !state.fenced.contains_key(&node.id)
                        && selects_node(selector, node.id.as_str(), &node.labels)
                })
                .inspect(|_| matched = true)
                .filter_map(|node| {
                    let load = state.load(&node.id);
                    (load < self.limit(node.capacity)).then(|| {
                        (
                            node.id.clone(),
                            load as u64,
                            u64::from(node.capacity.max(1)),
                            state.last_pick.get(&node.id).copied(),
                            !selects_node(preferred, node.id.as_str(), &node.labels),
                        )
                    })
                })
                .min_by(|a, b| {
                    // Preferred nodes first; then load/capacity as fractions, then least
                    // recently picked first.
                    a.4.cmp(&b.4)
                        .then_with(|| (a.1 * b.2).cmp(&(b.1 * a.2)))
                        .then_with(|| match (a.3, b.3) {
                            (None, None) => Ordering::Equal,
                            (None, Some(_)) => Ordering::Less,
                            (Some(_), None) => Ordering::Greater,
                            (Some(x), Some(y)) => x.cmp(&y),
                        })
                        .then_with(|| a.0.cmp(&b.0))
                })
                .map(|(id, ..)| id)
        });
        match best {
            Some(node) => {
                state
                    .assigned
                    .entry(node.clone())
                    .or_default()
                    .insert(job, now);
                state.ended.remove(&job);
                state.last_pick.insert(node.clone(), now);
                Ok(node)
            }
            None if matched => Err(Shortage::NoFreeSlot),
            None => Err(Shortage::NoMatchingNode),
        }
    }

    /// Keeps `node` out of placement for `period`. A replica settling the attempts of a node
    /// that went away fences it first: the record saying it is down reaches this replica's view
    /// through another subscription than the event that started the settlement, and may come
    /// a little later; without the fence, an attempt handed back (and woken at once) could be
    /// placed on the same node again, found by the settlement still scanning it, and handed
    /// back again, attempt after attempt, until its retries ran out.
    pub fn fence(&self, node: &NodeId, period: Duration) {
        self.state()
            .fenced
            .insert(node.clone(), Instant::now() + period);
    }

    /// Takes back a reservation whose dispatch did not happen.
    pub fn release(&self, node: &NodeId, job: JobId) {
        if let Some(jobs) = self.state().assigned.get_mut(node) {
            jobs.remove(&job);
        }
    }

    /// Counts an assignment of `attempt` (when known) seen in an event (another replica's, or
    /// our own again), unless that attempt, or a later one, was seen ending: an assignment
    /// counted after its end would hold a slot of the node until the grace period ran out.
    pub fn observe_assigned(&self, node: NodeId, job: JobId, attempt: Option<u32>) {
        let mut state = self.state();
        if let Some((ended, _)) = state.ended.get(&job) {
            if attempt.is_none_or(|attempt| attempt <= *ended) {
                return;
            }
            state.ended.remove(&job);
        }
        state
            .assigned
            .entry(node)
            .or_default()
            .entry(job)
            .or_insert_with(Instant::now);
    }

    /// True while `job` counts against `node`: assigned to it and not seen ending.
    pub fn is_assigned(&self, node: &NodeId, job: JobId) -> bool {
        self.state()
            .assigned
            .get(node)
            .is_some_and(|jobs| jobs.contains_key(&job))
    }

    /// Forgets a job whose `attempt` (every attempt, when not known) ended, and remembers that
    /// it did (see [`Cluster::reconcile`]).
    pub fn observe_finished(&self, node: Option<&NodeId>, job: JobId, attempt: Option<u32>) {
        let mut state = self.state();
        let attempt = attempt.unwrap_or(u32::MAX);
        let now = Instant::now();
        state
            .ended
            .entry(job)
            .and_modify(|ended| *ended = (ended.0.max(attempt), now))
            .or_insert((attempt, now));
        match node {
            Some(node) => {
                if let Some(jobs) = state.assigned.get_mut(node) {
                    jobs.remove(&job);
                }
            }
            None => {
                for jobs in state.assigned.values_mut() {
                    jobs.remove(&job);
                }
            }
        }
    }

    /// Aligns the counts with what each up node last reported: jobs it holds are counted
    /// (unless seen ending since: the report may predate the end), and jobs it does not hold
    /// are kept only while they may still be on their way to it (younger than the grace
    /// period, or among the newest `queued` it reported waiting).
    pub fn reconcile(&self) {
        let nodes: Vec<NodeRecord> = self.nodes.read(|entries| {
            entries
                .values()
                .filter(|entry| entry.value.status == NodeStatus::Up)
                .map(|entry| entry.value.clone())
                .collect()
        });
        let now = Instant::now();
        let mut state = self.state();
        // A heartbeat is written at most one grace period before it is read here (a node
        // silent for longer is not up); older ends cannot be listed in one any more.
        let grace = self.grace;
        state
            .ended
            .retain(|_, (_, at)| now.duration_since(*at) < grace.saturating_mul(2));
        let State {
            assigned, ended, ..
        } = &mut *state;
        for node in nodes {
            let held: HashSet<JobId> = node
                .jobs
                .iter()
                .copied()
                .filter(|job| !ended.contains_key(job))
                .collect();
            let jobs = assigned.entry(node.id.clone()).or_default();
            let mut others: Vec<(JobId, Instant)> = jobs
                .iter()
                .filter(|(job, _)| !held.contains(job))
                .map(|(job, at)| (*job, *at))
                .collect();
            others.sort_by_key(|(_, at)| std::cmp::Reverse(*at));
            let queued = usize::try_from(node.queued).unwrap_or(usize::MAX);
            let mut kept: HashMap<JobId, Instant> = others
                .into_iter()
                .enumerate()
                .filter(|(index, (_, at))| *index < queued || now.duration_since(*at) < self.grace)
                .map(|(_, entry)| entry)
                .collect();
            for job in held {
                let at = jobs.get(&job).copied().unwrap_or(now);
                kept.insert(job, at);
            }
            *jobs = kept;
        }
    }

    /// The jobs counted against `node`.
    pub fn assigned_to(&self, node: &NodeId) -> Vec<JobId> {
        self.state()
            .assigned
            .get(node)
            .map(|jobs| jobs.keys().copied().collect())
            .unwrap_or_default()
    }

    /// How many jobs each node is counted for.
    pub fn loads(&self) -> HashMap<NodeId, usize> {
        self.state()
            .assigned
            .iter()
            .map(|(node, jobs)| (node.clone(), jobs.len()))
            .collect()
    }
}
