//! The claim decision: what an executor does with a dispatch it pulled, given the job's record
//! as it reads it. Like [`JobRecord::settled`], it is a pure function of its inputs; the
//! executor performs what it decides (the compare-and-swap, the follow-up, the ack).
//!
//! The executor reads the job's record, applies the dispatch's placement to it when it is still
//! the unplaced record the dispatch was made over ([`crate::Dispatch::basis`]; never the
//! dispatch's copy of the spec), and asks [`decide`]; when its compare-and-swap loses, it reads
//! again and asks again. What the record can have become since the dispatch is the list of
//! [`Decision`]s.

use crate::ids::{InstanceId, NodeId};
use crate::job::{JobRecord, JobStatus};

/// What to do with a dispatched attempt, given the job's record now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The record still gives the attempt to this node, not started: claim it (write
    /// `running` for this instance over the revision read).
    Take,
    /// The job has no record any more, or the record moved on to another attempt or another
    /// node: the dispatch is stale. Acknowledge and drop it.
    Stale,
    /// The attempt ended already (its outcome written by a previous instance, a canceller, or
    /// a scheduler that found the node lost), or waits to be retried: make sure what that
    /// caused happened (timers and events are idempotent), then acknowledge.
    Ended,
    /// The record says this very instance runs the attempt, yet it does not hold it: an
    /// earlier claim of this instance was stored while its reply was lost. Nothing of the
    /// attempt ran; run it as recorded.
    AlreadyOurs,
    /// The record says another instance of this node runs the attempt: a predecessor that
    /// died with it (its process was killed at start-up). End the attempt `lost`, to be
    /// retried per the job's policy, rather than run it again under the same number.
    Orphaned,
}

/// Decides what the executor `instance` of `node`, which does not hold attempt `attempt` of
/// the job, does with its dispatch when the job's record is `record` (`None`: no record).
pub fn decide(
    record: Option<&JobRecord>,
    attempt: u32,
    node: &NodeId,
    instance: InstanceId,
) -> Decision {
    let Some(record) = record else {
        return Decision::Stale;
    };
    if record.attempt != attempt || record.node.as_ref() != Some(node) {
        return Decision::Stale;
    }
    match record.status {
        // NOTE: a dispatched record is `pending`; `scheduled` with this attempt and node is
        // never written, and is taken as the claim always took it.
        JobStatus::Pending | JobStatus::Scheduled => Decision::Take,
        JobStatus::Running if record.instance == Some(instance) => Decision::AlreadyOurs,
        JobStatus::Running => Decision::Orphaned,
        JobStatus::Retrying
        | JobStatus::Succeeded
        | JobStatus::Failed
        | JobStatus::TimedOut
        | JobStatus::Cancelled
        | JobStatus::Lost
        | JobStatus::Quarantined => Decision::Ended,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::JobId;
    use crate::job::Outcome;
    use crate::spec::JobSpec;
    use crate::timestamp::Timestamp;

    fn node() -> NodeId {
        NodeId::new("exec-1").expect("a node id")
    }

    fn dispatched() -> JobRecord {
        let now = Timestamp::from_millis(1_000);
        JobRecord::new(JobId::generate(), JobSpec::shell("true"), now).assigned(node(), now)
    }

    #[test]
    fn a_dispatched_attempt_still_waiting_for_its_node_is_taken() {
        let record = dispatched();
        assert_eq!(
            decide(
                Some(&record),
                record.attempt,
                &node(),
                InstanceId::generate()
            ),
            Decision::Take
        );
    }

    #[test]
    fn a_dispatch_of_a_job_without_a_record_is_stale() {
        assert_eq!(
            decide(None, 1, &node(), InstanceId::generate()),
            Decision::Stale
        );
    }

    #[test]
    fn a_dispatch_superseded_by_another_attempt_or_node_is_stale() {
        let record = dispatched();
        let instance = InstanceId::generate();
        assert_eq!(
            decide(Some(&record), record.attempt + 1, &node(), instance),
            Decision::Stale,
            "the record moved on to a later attempt"
        );
        let replaced = record.assigned(
            NodeId::new("exec-2").expect("a node id"),
            Timestamp::from_millis(2_000),
        );
        assert_eq!(
            decide(Some(&replaced), replaced.attempt, &node(), instance),
            Decision::Stale,
            "the attempt went to another node"
        );
        assert_eq!(
            decide(Some(&replaced), record.attempt, &node(), instance),
            Decision::Stale,
            "a later attempt elsewhere"
        );
    }

    #[test]
    fn an_attempt_that_ended_or_waits_to_be_retried_is_followed_up() {
        let instance = InstanceId::generate();
        let running = dispatched().started(instance, Timestamp::from_millis(2_000));
        let now = Timestamp::from_millis(3_000);
        let lost = Outcome::lost("lost: the node stopped heartbeating");
        let retrying = running.settled(&lost, now, 0.0);
        assert_eq!(retrying.status, JobStatus::Retrying);
        let cancelled = dispatched().cancelled(now);
        let quarantined = running.quarantined("delivered too often".into(), now);
        for ended in [retrying, cancelled, quarantined] {
            assert_eq!(
                decide(Some(&ended), ended.attempt, &node(), instance),
                Decision::Ended,
                "{}",
                ended.status
            );
        }
    }

    #[test]
    fn a_running_record_of_this_instance_is_its_own_claim_whose_reply_was_lost() {
        let instance = InstanceId::generate();
        let running = dispatched().started(instance, Timestamp::from_millis(2_000));
        assert_eq!(
            decide(Some(&running), running.attempt, &node(), instance),
            Decision::AlreadyOurs
        );
    }

    #[test]
    fn a_running_record_of_another_instance_of_the_node_is_an_orphan_to_end_lost() {
        let predecessor = InstanceId::generate();
        let running = dispatched().started(predecessor, Timestamp::from_millis(2_000));
        assert_eq!(
            decide(
                Some(&running),
                running.attempt,
                &node(),
                InstanceId::generate()
            ),
            Decision::Orphaned
        );
    }
}
