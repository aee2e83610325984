//! The dispatch: one attempt of a job handed to one executor node on
//! `capstan.dispatch.<node>`, deduplicated by `Nats-Msg-Id` = `<job>.<attempt>`.

use serde::{Deserialize, Serialize};

use crate::job::JobRecord;

/// An attempt assigned to an executor.
///
/// It carries the record assigned to the node and a KV revision, so the executor can claim the
/// attempt with one compare-and-swap, without reading the bucket first. The revision is the
/// assignment's own write, or, for a job placed after waiting for room, that of its unplaced
/// record (pending, no node), which the placement leaves as it is: the claim then writes the
/// assignment and the start at once. If the CAS fails, the record changed since (cancelled, or
/// re-placed), and the executor reads it to decide.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Dispatch {
    /// The job's record with `node` and `attempt` set for this attempt.
    pub record: JobRecord,
    /// The KV revision the claim writes over: that of this record, or of the job's unplaced
    /// record when the placement wrote nothing.
    pub revision: u64,
}

impl Dispatch {
    /// The deduplication id of this dispatch: `<job>.<attempt>`.
    pub fn message_id(&self) -> String {
        format!("{}.{}", self.record.id, self.record.attempt)
    }

    /// True when `current`, read at `revision`, is still the unplaced record this dispatch was
    /// made over: its attempt is this dispatch's, on its way and not yet claimed.
    pub fn over_unplaced(&self, current: &JobRecord, revision: u64) -> bool {
        revision == self.revision && current.is_unplaced()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{JobId, NodeId};
    use crate::spec::JobSpec;
    use crate::timestamp::Timestamp;

    #[test]
    fn a_record_is_the_unplaced_one_a_dispatch_was_made_over_only_at_its_revision_and_unchanged() {
        let now = Timestamp::from_millis(1_000);
        let waiting = JobRecord::new(JobId::generate(), JobSpec::shell("true"), now);
        let node = NodeId::new("exec-1").expect("a node id");
        let dispatch = Dispatch {
            record: waiting.assigned(node.clone(), now),
            revision: 7,
        };
        assert!(dispatch.over_unplaced(&waiting, 7));
        assert!(!dispatch.over_unplaced(&waiting, 8), "written since");
        assert!(
            !dispatch.over_unplaced(&waiting.cancelled(now), 7),
            "not pending"
        );
        assert!(
            !dispatch.over_unplaced(&dispatch.record, 7),
            "an assignment written by its placement"
        );
    }
}
