//! Table definitions as sea-orm entities. The tables themselves are created by
//! [`crate::migrate`]; these describe them for queries. Times are milliseconds since the Unix
//! epoch, UTC.

pub mod api_token;
pub mod attempt;
pub mod audit;
pub mod event;
pub mod job;
pub mod job_label;
pub mod refresh_token;
pub mod session;
pub mod user;
