//! Creates the streams and KV buckets described in [`capstan_protocol::topology`]. Every
//! service calls [`ensure`] at start; it is idempotent and safe when replicas race. Each
//! service creates its own durable consumers from their specs ([`consumer_config`], through
//! [`crate::consume::durable`]), with the ack wait and pending limit of its configuration.

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::{self, kv, stream};
use capstan_protocol::topology::{
    self as spec, BucketSpec, ConsumerSpec, Retention, StartAt, StreamSpec,
};

use crate::error::Error;

/// The buckets, opened.
pub struct Buckets {
    /// Job records.
    pub jobs: kv::Store,
    /// Node records.
    pub nodes: kv::Store,
    /// Idempotency reservations.
    pub idempotency: kv::Store,
    /// Revoked users, sessions and API tokens.
    pub revocations: kv::Store,
}

/// Creates or updates every stream and bucket, and opens the buckets.
pub async fn ensure(js: &jetstream::Context) -> Result<Buckets, Error> {
    for stream in spec::STREAMS {
        ensure_stream(js, &stream).await?;
    }
    Ok(Buckets {
        jobs: ensure_bucket(js, &spec::JOBS).await?,
        nodes: ensure_bucket(js, &spec::NODES).await?,
        idempotency: ensure_bucket(js, &spec::IDEMPOTENCY).await?,
        revocations: ensure_bucket(js, &spec::REVOCATIONS).await?,
    })
}

/// The async-nats configuration of a stream.
pub fn stream_config(spec: &StreamSpec) -> stream::Config {
    stream::Config {
        name: spec.name.to_owned(),
        description: Some(spec.description.to_owned()),
        subjects: spec.subjects.iter().map(|s| (*s).to_owned()).collect(),
        retention: match spec.retention {
            Retention::WorkQueue => stream::RetentionPolicy::WorkQueue,
            Retention::Limits => stream::RetentionPolicy::Limits,
        },
        max_age: spec.max_age,
        max_bytes: spec.max_bytes,
        duplicate_window: spec.duplicate_window,
        storage: stream::StorageType::File,
        allow_message_schedules: spec.schedules,
        ..Default::default()
    }
}

/// The async-nats configuration of a durable pull consumer.
pub fn consumer_config(spec: &ConsumerSpec) -> pull::Config {
    let (filter_subject, filter_subjects) = match spec.subjects.as_slice() {
        [one] => (one.clone(), Vec::new()),
        many => (String::new(), many.to_vec()),
    };
    pull::Config {
        durable_name: Some(spec.name.clone()),
        description: Some(spec.description.clone()),
        filter_subject,
        filter_subjects,
        deliver_policy: match spec.start {
            StartAt::First => DeliverPolicy::All,
            StartAt::New => DeliverPolicy::New,
        },
        ack_policy: AckPolicy::Explicit,
        ack_wait: spec.ack_wait,
        max_deliver: spec.max_deliver,
        max_ack_pending: spec.max_ack_pending,
        ..Default::default()
    }
}

/// Tries after the first to create a stream or bucket, 100 ms apart: enough for a replica
/// racing to create the same one to have finished.
const SETUP_ROUNDS: u32 = 4;

async fn ensure_stream(js: &jetstream::Context, spec: &StreamSpec) -> Result<(), Error> {
    let config = stream_config(spec);
    // Two services starting together may both see "not found" and race to create; the loser
    // finds the stream on its next round.
    with_setup_rounds(format!("stream {}", spec.name), || {
        js.create_or_update_stream(config.clone())
    })
    .await
    .map(drop)
}

async fn ensure_bucket(js: &jetstream::Context, spec: &BucketSpec) -> Result<kv::Store, Error> {
    let config = kv::Config {
        bucket: spec.name.to_owned(),
        description: spec.description.to_owned(),
        history: spec.history,
        max_age: spec.max_age,
        storage: stream::StorageType::File,
        // Entries that expire by their own TTL leave a delete marker, itself kept this long,
        // so that watchers see the removal.
        limit_markers: spec.per_key_ttl.then_some(Duration::from_secs(300)),
        ..Default::default()
    };
    with_setup_rounds(format!("bucket {}", spec.name), || {
        js.create_or_update_key_value(config.clone())
    })
    .await
}

/// Runs `create` until it succeeds, [`SETUP_ROUNDS`] more times at most; the last refusal is
/// the [`Error::Setup`] of `what`.
async fn with_setup_rounds<T, E, F>(what: String, mut create: impl FnMut() -> F) -> Result<T, Error>
where
    F: std::future::Future<Output = Result<T, E>>,
    E: Into<crate::error::BoxError>,
{
    let mut round = 0;
    loop {
        match create().await {
            Ok(created) => return Ok(created),
            Err(error) if round == SETUP_ROUNDS => return Err(Error::setup(what, error)),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
        round += 1;
    }
}
