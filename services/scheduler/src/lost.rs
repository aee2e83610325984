//! Settling the attempts of nodes that went away: when the registry marks a node down (it
//! stopped heartbeating), a node leaves (its executor shut down), or a node comes back as a new
//! instance (its executor restarted), the attempts it had started are recorded `lost` and
//! retried per each job's policy, and those it had not started are handed back.
//!
//! The node's dispatches still in the dispatch stream are exactly what it held or had queued:
//! a dispatch is acknowledged only after its attempt is settled. So the scheduler reads them
//! (without consuming them) and ends each attempt that the job's record still gives to that
//! node (or, for a job placed after waiting and not yet claimed, whose record still has the
//! revision the dispatch carries), by compare-and-swap, so a node that comes back and reports
//! at the same moment cannot both win. The schedulers share one durable consumer on node
//! events, so each event is handled once; a replica that dies mid-way leaves the event to be
//! redelivered, and settling again is harmless.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::stream::{LastRawMessageErrorKind, RawMessageErrorKind};
use capstan_mesh::{Change, Error, Modified, consume, lifecycle, wire};
use capstan_protocol::job::Outcome;
use capstan_protocol::subjects::{self, Origin};
use capstan_protocol::{
    Dispatch, InstanceId, JobStatus, NodeEvent, NodeEventKind, NodeId, NodeRecord, NodeStatus,
    Timestamp, topology,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::Scheduler;

/// How long a node that went away is kept out of placement by the replica settling it: far
/// longer than any lag between its `down` event and its record, far shorter than a restart.
const FENCE: Duration = Duration::from_secs(5);

impl Scheduler {
    /// Consumes node events until `shutdown`, settling the attempts of lost nodes; fails when
    /// its consumer cannot be created.
    pub(crate) async fn consume_node_events(
        self: Arc<Self>,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let consumer =
            consume::durable(&self.mesh.js, &topology::nodes_consumer(), &shutdown).await?;
        consume::batches(
            &consumer,
            64,
            Duration::from_millis(5),
            &shutdown,
            |batch| {
                let scheduler = self.clone();
                async move {
                    for message in batch {
                        scheduler.node_event(message).await;
                    }
                }
            },
        )
        .await;
        Ok(())
    }

    async fn node_event(&self, message: jetstream::Message) {
        let Some(event) = self
            .mesh
            .events
            .decode_stored::<NodeEvent>(Origin::Nodes, &message)
            .await
        else {
            return;
        };
        let node = event.node.id.clone();
        let (keep, reason) = match event.kind {
            NodeEventKind::Down => (
                None,
                format!("lost: node {node} stopped heartbeating while it held the attempt"),
            ),
            NodeEventKind::Deregistered => (
                None,
                format!("lost: node {node} left while it held the attempt"),
            ),
            NodeEventKind::Registered => (
                Some(event.node.instance),
                format!(
                    "lost: node {node} restarted (now instance {}) while it held the attempt",
                    event.node.instance
                ),
            ),
            _ => {
                let _ = message.ack().await;
                return;
            }
        };
        let span = tracing::info_span!("settle lost node", node = %node, event = %event.kind);
        capstan_telemetry::propagation::follow(&span, message.headers.as_ref());
        match self
            .settle_node(&event, keep, &reason)
            .instrument(span)
            .await
        {
            Ok(settled) => {
                if settled > 0 {
                    tracing::warn!(node = %node, attempts = settled, event = %event.kind, "settled the attempts of a lost node");
                }
                let _ = message.ack().await;
            }
            Err(error) => {
                tracing::warn!(node = %node, error = %error, "cannot settle a lost node's attempts yet");
                let _ = message
                    .ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(2))))
                    .await;
            }
        }
    }

    /// Whether the node `event` says went away has been heard from since by the same instance:
    /// a node that stalled past the heartbeat timeout (paused, swapping, cut off) and carried
    /// on. Its `down` event may reach a scheduler late (a backlog, a redelivery); the attempts
    /// it still holds then are alive, and so are the ones placed on it since it came back.
    /// When the record cannot be read the node is taken as gone, as the event says.
    async fn came_back(&self, event: &NodeEvent) -> bool {
        let Ok(Some(current)) = self.mesh.nodes.get(event.node.id.as_str()).await else {
            return false;
        };
        node_came_back(event, &current.value)
    }

    /// Ends as lost every attempt the node of `event` holds per its dispatches, except those
    /// started by instance `keep` (and, when `keep` is set, those not started yet: the new
    /// instance will run them). Returns how many were ended.
    ///
    /// Only the dispatches stored before the settling began are read: one placed on the node
    /// later was placed after it came back. And when the node that went away comes back while
    /// its attempts are being settled, the settling stops: what it still holds is alive.
    async fn settle_node(
        &self,
        event: &NodeEvent,
        keep: Option<InstanceId>,
        reason: &str,
    ) -> Result<usize, Error> {
        let node = &event.node.id;
        if keep.is_none() {
            if self.came_back(event).await {
                // Settling now would end attempts the node is running (and any placed on it
                // since it came back): they finish where they are.
                tracing::info!(node = %node, event = %event.kind, "the node came back before its attempts were settled; they carry on");
                return Ok(0);
            }
            // The node is gone: place nothing more on it, even before this replica's view of
            // its record says so (see `Cluster::fence`).
            self.cluster.fence(node, FENCE);
        }
        let stream = self
            .mesh
            .js
            .get_stream_no_info(topology::DISPATCH.name)
            .await
            .map_err(|e| Error::unavailable("dispatch stream", e))?;
        let subject = subjects::dispatch(node);
        let last = match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(last) => last.sequence,
            Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => 0,
            Err(error) => return Err(Error::unavailable("read dispatches", error)),
        };
        let mut next = 1;
        let mut settled = 0;
        while next <= last {
            let stored = stream
                .raw_message_builder()
                .sequence(next)
                .next_by_subject(subject.clone())
                .send()
                .await;
            let stored = match stored {
                Ok(stored) => stored,
                Err(error) if error.kind() == RawMessageErrorKind::NoMessageFound => break,
                Err(error) => return Err(Error::unavailable("read dispatches", error)),
            };
            next = stored.sequence + 1;
            if stored.sequence > last {
                break;
            }
            if keep.is_none() && self.came_back(event).await {
                tracing::info!(node = %node, settled, "the node came back while its attempts were settled; the rest carry on");
                break;
            }
            let Ok((dispatch, _)) =
                wire::decode::<Dispatch>(Some(&stored.headers), &stored.payload)
            else {
                continue;
            };
            if self.settle_attempt(node, &dispatch, keep, reason).await? {
                settled += 1;
            }
        }
        if keep.is_none() {
            settled += self.settle_held(event, reason).await?;
        }
        Ok(settled)
    }

    /// Ends as lost the attempts the node of `event` ran without a dispatch: the jobs it took
    /// from their submissions (the fast lane), as its last heartbeat listed them. One taken
    /// after that heartbeat is found when its submission comes back unacknowledged
    /// (`recover_running`).
    async fn settle_held(&self, event: &NodeEvent, reason: &str) -> Result<usize, Error> {
        let node = &event.node.id;
        let mut settled = 0;
        for job in &event.node.jobs {
            let Some(current) = self.mesh.jobs.get(&job.to_string()).await? else {
                continue;
            };
            let record = current.value;
            if record.status != JobStatus::Running
                || record.node.as_ref() != Some(node)
                || record.instance != Some(event.node.instance)
            {
                continue;
            }
            if self.came_back(event).await {
                break;
            }
            let held = Dispatch {
                record,
                revision: current.revision,
            };
            if self.settle_attempt(node, &held, None, reason).await? {
                settled += 1;
            }
        }
        Ok(settled)
    }

    /// Ends `dispatch`'s attempt as lost if its job's record still gives it to `node`.
    async fn settle_attempt(
        &self,
        node: &NodeId,
        dispatch: &Dispatch,
        keep: Option<InstanceId>,
        reason: &str,
    ) -> Result<bool, Error> {
        let settled = lifecycle::modify(&self.mesh, dispatch.record.id, None, |current| {
            let Some(current) = current else {
                return Change::Stop(None);
            };
            // A job placed after waiting keeps its unassigned record until its executor claims
            // it (the dispatch carries the assignment): still at the dispatch's revision, it
            // is this node's, not started.
            let record = &dispatch.basis(&current.value, current.revision);
            if record.attempt != dispatch.record.attempt || record.node.as_ref() != Some(node) {
                return Change::Stop(None);
            }
            match record.status {
                JobStatus::Running if keep.is_some() && record.instance == keep => {
                    return Change::Stop(None);
                }
                JobStatus::Pending if keep.is_some() => return Change::Stop(None),
                JobStatus::Pending | JobStatus::Running => {}
                // Ended already; what that caused is made sure of below.
                _ => return Change::Stop(Some(record.clone())),
            }
            let now = Timestamp::now();
            // An attempt that never started cannot have hurt anything: it is handed back (run
            // elsewhere at once, not counted as a loss). A started one is lost.
            Change::Write(if record.status == JobStatus::Running {
                record.settled(&Outcome::lost(reason), now, lifecycle::jitter_sample())
            } else {
                record.handed_back(
                    &Outcome::lost(format!(
                        "handed back unstarted: node {node} went away before taking it"
                    )),
                    now,
                )
            })
        })
        .await?;
        match settled {
            Modified::Written { written, .. } => {
                crate::metrics::scheduler().lost();
                lifecycle::follow_up(&self.mesh, &written.value).await?;
                tracing::info!(job = %written.value.id, attempt = written.value.attempt, status = %written.value.status, "attempt lost");
                Ok(true)
            }
            Modified::Stopped(Some(ended)) => {
                // Make sure what its end caused happened (idempotent).
                lifecycle::follow_up(&self.mesh, &ended).await?;
                Ok(false)
            }
            Modified::Stopped(None) => Ok(false),
        }
    }
}

/// Whether `current`, the node's record now, shows the instance that `event` reported gone
/// heartbeating again since.
fn node_came_back(event: &NodeEvent, current: &NodeRecord) -> bool {
    current.status == NodeStatus::Up
        && current.instance == event.node.instance
        && current.last_heartbeat_at > event.node.last_heartbeat_at
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: NodeEventKind) -> NodeEvent {
        let mut node: NodeRecord = serde_json::from_value(serde_json::json!({
            "id": "exec-1",
            "instance": InstanceId::generate(),
            "labels": {},
            "capacity": 4,
            "version": "test",
            "hostname": "host",
            "status": "down",
            "registered_at": Timestamp::from_millis(1_000),
            "last_heartbeat_at": Timestamp::from_millis(2_000),
        }))
        .expect("a node record");
        node.status = NodeStatus::Down;
        NodeEvent {
            kind,
            at: Timestamp::from_millis(12_000),
            node,
        }
    }

    #[test]
    fn a_node_heard_from_again_by_the_same_instance_came_back() {
        let down = event(NodeEventKind::Down);
        let mut now = down.node.clone();
        now.status = NodeStatus::Up;
        now.last_heartbeat_at = Timestamp::from_millis(13_000);
        assert!(node_came_back(&down, &now));
    }

    #[test]
    fn a_node_still_down_or_restarted_or_not_heard_from_since_did_not_come_back() {
        let down = event(NodeEventKind::Down);
        assert!(!node_came_back(&down, &down.node), "still down");

        let mut stale = down.node.clone();
        stale.status = NodeStatus::Up;
        assert!(
            !node_came_back(&down, &stale),
            "up, but no heartbeat after the one before the event"
        );

        let mut restarted = down.node.clone();
        restarted.status = NodeStatus::Up;
        restarted.instance = InstanceId::generate();
        restarted.last_heartbeat_at = Timestamp::from_millis(13_000);
        assert!(
            !node_came_back(&down, &restarted),
            "a new instance: the old one's attempts are lost"
        );
    }
}
