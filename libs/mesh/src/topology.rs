//! The streams and KV buckets described in [`capstan_protocol::topology`]: [`apply`] creates or
//! upgrades them and the shared durable consumers (what the `admin` identity does, through
//! `capstan nats apply`); [`verify`] checks that they are there and of this version, which is
//! all a service under least privilege may do. [`ensure`] creates what is missing and verifies
//! the rest: a service connecting without an identity (a development server with no
//! authorization) does that, and never changes what exists (an administrator's size limits). Both are idempotent and safe when replicas
//! race. Each service creates or tunes its own durable consumers from their specs
//! ([`consumer_config`], through [`crate::consume::durable`]) with the ack wait and pending limit
//! of its configuration.

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
    /// Secrets stored by administrators.
    pub secrets: kv::Store,
    /// Remote systems.
    pub systems: kv::Store,
    /// What the gateways found of the remote systems.
    pub system_status: kv::Store,
    /// Fan-out parents.
    pub fanouts: kv::Store,
}

/// Creates the streams and buckets that are missing (with their default size limits), leaves
/// the others as they are (an administrator's limits included), then verifies them all and
/// opens the buckets.
pub async fn ensure(js: &jetstream::Context) -> Result<Buckets, Error> {
    ensure_with(js, &Limits::default(), Mode::CreateMissing).await?;
    verify(js).await
}

/// What [`ensure_with`] does with a stream or bucket that exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Leaves it: only what is missing is created.
    CreateMissing,
    /// Updates it to this version's configuration and the given limits.
    Upgrade,
}

/// Size limits in bytes by stream or bucket name, replacing the topology's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits(std::collections::BTreeMap<String, i64>);

impl Limits {
    /// Sets `name`'s limit: a stream's or a bucket's name, as the topology spells it.
    pub fn set(&mut self, name: &str, bytes: i64) -> Result<(), String> {
        let known = spec::STREAMS.iter().any(|s| s.name == name)
            || spec::BUCKETS.iter().any(|b| b.name == name);
        if !known {
            return Err(format!("{name} is no stream or bucket of the topology"));
        }
        if bytes < 1024 {
            return Err(format!(
                "{name}: a limit under 1 KiB leaves no room for a message"
            ));
        }
        self.0.insert(name.to_owned(), bytes);
        Ok(())
    }

    fn of(&self, name: &str, default: i64) -> i64 {
        self.0.get(name).copied().unwrap_or(default)
    }
}

async fn ensure_with(js: &jetstream::Context, limits: &Limits, mode: Mode) -> Result<(), Error> {
    for stream in spec::STREAMS {
        ensure_stream(js, &stream, limits, mode).await?;
    }
    for bucket in spec::BUCKETS {
        ensure_bucket(js, &bucket, limits, mode).await?;
    }
    Ok(())
}

/// What [`apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Streams created or updated.
    pub streams: usize,
    /// Buckets created or updated.
    pub buckets: usize,
    /// Shared durable consumers created or updated.
    pub consumers: usize,
}

/// Creates or upgrades every stream, bucket and shared durable consumer (with their default
/// settings; each service tunes its own from its configuration when it starts), with the size
/// limits of `limits` where it names one. Each executor node creates its own dispatch
/// consumer: its pending limit follows the node's slots.
pub async fn apply(js: &jetstream::Context, limits: &Limits) -> Result<Applied, Error> {
    ensure_with(js, limits, Mode::Upgrade).await?;
    let consumers = spec::consumers();
    for consumer in &consumers {
        let config = consumer_config(consumer);
        with_setup_rounds(format!("consumer {}", consumer.name), || async {
            let stream = js.get_stream(consumer.stream).await?;
            stream
                .create_consumer(config.clone())
                .await
                .map_err(crate::error::BoxError::from)
        })
        .await?;
    }
    Ok(Applied {
        streams: spec::STREAMS.len(),
        buckets: spec::BUCKETS.len(),
        consumers: consumers.len(),
    })
}

/// What a service tells its operator when the topology is not what it needs.
const APPLY_HINT: &str =
    "create or upgrade the topology with `capstan nats apply` as the admin identity";

/// Checks that every stream and bucket exists with the subjects, retention and features this
/// version needs, changing nothing, and opens the buckets.
pub async fn verify(js: &jetstream::Context) -> Result<Buckets, Error> {
    for spec in spec::STREAMS {
        verify_stream(js, &spec).await?;
    }
    Ok(Buckets {
        jobs: verify_bucket(js, &spec::JOBS).await?,
        nodes: verify_bucket(js, &spec::NODES).await?,
        idempotency: verify_bucket(js, &spec::IDEMPOTENCY).await?,
        revocations: verify_bucket(js, &spec::REVOCATIONS).await?,
        secrets: verify_bucket(js, &spec::SECRETS).await?,
        systems: verify_bucket(js, &spec::SYSTEMS).await?,
        system_status: verify_bucket(js, &spec::SYSTEM_STATUS).await?,
        fanouts: verify_bucket(js, &spec::FANOUTS).await?,
    })
}

async fn verify_stream(js: &jetstream::Context, spec: &StreamSpec) -> Result<(), Error> {
    let what = || format!("stream {}", spec.name);
    let stream = match js.get_stream(spec.name).await {
        Ok(stream) => stream,
        Err(error) => return Err(missing(what(), error)),
    };
    let info = stream.cached_info();
    let want = stream_config(spec);
    let have = &info.config;
    let mut subjects = have.subjects.clone();
    subjects.sort();
    let mut wanted = want.subjects.clone();
    wanted.sort();
    if subjects != wanted
        || have.retention != want.retention
        || have.allow_message_schedules != want.allow_message_schedules
    {
        return Err(Error::setup(
            what(),
            format!("it differs from what this version needs: {APPLY_HINT}"),
        ));
    }
    Ok(())
}

async fn verify_bucket(js: &jetstream::Context, spec: &BucketSpec) -> Result<kv::Store, Error> {
    let what = || format!("bucket {}", spec.name);
    let store = js
        .get_key_value(spec.name)
        .await
        .map_err(|e| missing(what(), e))?;
    let info = store.stream.cached_info();
    let markers = info.config.subject_delete_marker_ttl.is_some();
    if info.config.max_messages_per_subject != spec.history || markers != spec.per_key_ttl {
        return Err(Error::setup(
            what(),
            format!("it differs from what this version needs: {APPLY_HINT}"),
        ));
    }
    Ok(store)
}

/// The error of a stream or bucket that cannot be opened: missing, or unreadable.
fn missing(what: String, error: impl std::fmt::Display) -> Error {
    Error::setup(what, format!("cannot open it ({error}): {APPLY_HINT}"))
}

/// The async-nats configuration of a stream, with its default size limit.
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
        // A full work queue refuses what it cannot keep, so that nothing it acknowledged is
        // dropped; a log-like stream drops its oldest. A stream of scheduled messages cannot
        // refuse (the server does not allow it): the timers hold one message per waiting job,
        // so the jobs bucket's own limit bounds them long before theirs.
        discard: match spec.retention {
            Retention::WorkQueue if !spec.schedules => stream::DiscardPolicy::New,
            _ => stream::DiscardPolicy::Old,
        },
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

async fn ensure_stream(
    js: &jetstream::Context,
    spec: &StreamSpec,
    limits: &Limits,
    mode: Mode,
) -> Result<(), Error> {
    let config = stream::Config {
        max_bytes: limits.of(spec.name, spec.max_bytes),
        ..stream_config(spec)
    };
    // Two services starting together may both see "not found" and race to create; the loser
    // finds the stream on its next round.
    with_setup_rounds(format!("stream {}", spec.name), || async {
        match mode {
            Mode::Upgrade => js.create_or_update_stream(config.clone()).await.map(drop),
            Mode::CreateMissing => js.get_or_create_stream(config.clone()).await.map(drop),
        }
        .map_err(crate::error::BoxError::from)
    })
    .await
}

async fn ensure_bucket(
    js: &jetstream::Context,
    spec: &BucketSpec,
    limits: &Limits,
    mode: Mode,
) -> Result<(), Error> {
    let config = kv::Config {
        bucket: spec.name.to_owned(),
        description: spec.description.to_owned(),
        history: spec.history,
        max_age: spec.max_age,
        max_bytes: limits.of(spec.name, spec.max_bytes),
        storage: stream::StorageType::File,
        // Entries that expire by their own TTL leave a delete marker, itself kept this long,
        // so that watchers see the removal.
        limit_markers: spec.per_key_ttl.then_some(Duration::from_secs(300)),
        ..Default::default()
    };
    with_setup_rounds(format!("bucket {}", spec.name), || async {
        if mode == Mode::CreateMissing && js.get_key_value(spec.name).await.is_ok() {
            return Ok(());
        }
        js.create_or_update_key_value(config.clone())
            .await
            .map(drop)
            .map_err(crate::error::BoxError::from)
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
