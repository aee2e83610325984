//! What every Capstan service does with NATS, written once: connect (as one of the mesh's
//! [`identities`]), create the streams and
//! buckets of [`capstan_protocol::topology`] idempotently, read typed KV records and change
//! them by compare-and-swap (read, decide, write, decide again on a lost race:
//! [`Bucket::modify`]), publish events and rejections, serve NATS micro endpoints, stop on a
//! signal, join spawned tasks without losing their panics, and submit jobs with idempotency
//! keys.
//!
//! It owns no business rules: what a scheduler or an executor decides stays in its service.

pub mod config;
pub mod connect;
pub mod consume;
pub mod error;
pub mod events;
pub mod fanout;
pub mod identities;
pub mod intake;
pub mod lifecycle;
pub mod metrics;
pub mod schedules;
pub mod service;
pub mod shutdown;
pub mod store;
pub mod submit;
pub mod task;
pub mod topology;
pub mod view;
pub mod wire;
pub mod workflow;

pub use config::{MetricsArgs, NatsArgs, RuntimeArgs, Threads};
pub use connect::{Mesh, connect};
pub use error::Error;
pub use events::EventPublisher;
pub use store::{Bucket, Change, Modified, Versioned};
pub use submit::{Claim, Idempotency, Submitter};
pub use view::BucketView;
