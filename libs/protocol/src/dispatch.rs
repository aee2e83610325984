//! The dispatch: one attempt of a job handed to one executor node on
//! `capstan.dispatch.<node>`, deduplicated by `Nats-Msg-Id` = `<job>.<attempt>`.

use serde::{Deserialize, Serialize};

use crate::job::JobRecord;

/// An attempt assigned to an executor.
///
/// It carries the record as the scheduler wrote it and that write's KV revision, so the
/// executor can claim the attempt with one compare-and-swap, without reading the bucket first.
/// If the CAS fails, the record changed since (cancelled, or re-placed), and the executor reads
/// it to decide.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Dispatch {
    /// The job's record with `node` and `attempt` set for this attempt.
    pub record: JobRecord,
    /// The KV revision of that record.
    pub revision: u64,
}

impl Dispatch {
    /// The deduplication id of this dispatch: `<job>.<attempt>`.
    pub fn message_id(&self) -> String {
        format!("{}.{}", self.record.id, self.record.attempt)
    }
}
