//! Timers: what a scheduled message carries to wake a job whose next attempt was put off
//! (`scheduled` until its start time, `retrying` until its backoff has passed).
//!
//! A timer names the job and the attempt number the job had when the wait began. The scheduler
//! that receives it starts the next attempt only if the job still waits with that attempt
//! number ([`crate::JobRecord::awaits_timer`]), so a timer that fires late, twice, or for a
//! job cancelled meanwhile does nothing.

use serde::{Deserialize, Serialize};

use crate::ids::JobId;
use crate::timestamp::Timestamp;

/// A job's timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Timer {
    /// The job.
    pub job: JobId,
    /// Its attempt number when the wait began (0 for a delayed start).
    pub attempt: u32,
    /// When it is due.
    pub at: Timestamp,
}

impl Timer {
    /// The deduplication id of this timer: `<job>.<attempt>.timer`.
    pub fn message_id(&self) -> String {
        format!("{}.{}.timer", self.job, self.attempt)
    }
}

/// The `Nats-Schedule` header value of a message the server fires once, at `at`.
pub fn at_schedule(at: Timestamp) -> String {
    format!("@at {}", at.to_rfc3339())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timer_schedules_itself_at_its_instant_in_rfc3339() {
        let timer = Timer {
            job: JobId::generate(),
            attempt: 2,
            at: Timestamp::parse_rfc3339("2030-01-02T03:04:05.250Z").expect("valid"),
        };
        assert_eq!(at_schedule(timer.at), "@at 2030-01-02T03:04:05.25Z");
        assert!(timer.message_id().ends_with(".2.timer"));
    }
}
