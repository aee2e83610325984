//! Table definitions as sea-orm entities. The tables themselves are created by
//! [`crate::migrate`]; these describe them for queries. Times are milliseconds since the Unix
//! epoch, UTC.

pub mod attempt;
pub mod event;
pub mod job;
pub mod job_label;
