//! The streams and KV buckets described in [`capstan_protocol::topology`]: [`apply`] creates or
//! upgrades them and the shared durable consumers (what the `admin` identity does, through
//! `capstan nats apply`); [`verify`] checks that they are there and of this version, which is
//! all a service under least privilege may do. [`ensure`] creates what is missing and verifies
//! the rest: a service connecting without an identity (a development server with no
//! authorization) does that, and never changes what exists (an administrator's size limits). Both are idempotent and safe when replicas
//! race. Each service creates or tunes its own durable consumers from their specs
//! ([`consumer_config`], through [`crate::consume::durable`]) with the ack wait and pending limit
//! of its configuration.
//!
//! How many servers keep a copy of each stream and bucket is [`apply_with`]'s to set (the
//! operator's count, or [`Replicas::automatic`] from the JetStream servers that answer
//! [`jetstream_servers`]); consumers keep as many as their stream. [`verify`] does not look at
//! it: a service runs the same on one copy or three.

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PriorityPolicy, pull};
use async_nats::jetstream::{self, kv, stream};
use capstan_protocol::subjects;
use capstan_protocol::topology::{
    self as spec, BucketSpec, ConsumerSpec, Replicas, Retention, StartAt, StreamSpec,
};
use futures::StreamExt;

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
    /// Schedules.
    pub schedules: kv::Store,
    /// Concurrency slots.
    pub concurrency: kv::Store,
    /// Workflows.
    pub workflows: kv::Store,
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
    /// Updates it to this version's configuration, the given limits and this many copies.
    Upgrade(Replicas),
}

impl Mode {
    /// The copies a stream or bucket is created with: what is missing is created with one,
    /// the development server's (a cluster's topology is applied by `capstan nats apply`).
    fn replicas(self) -> usize {
        match self {
            Mode::CreateMissing => usize::from(Replicas::ONE.get()),
            Mode::Upgrade(replicas) => usize::from(replicas.get()),
        }
    }
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
    /// Copies of each stream and bucket (their consumers keep as many).
    pub replicas: Replicas,
    /// The JetStream servers of the cluster that answered, when the count was chosen from them
    /// (none given).
    pub servers: Option<usize>,
}

/// Creates or upgrades every stream, bucket and shared durable consumer (with their default
/// settings; each service tunes its own from its configuration when it starts), with the size
/// limits of `limits` where it names one. Each executor node creates its own dispatch
/// consumer: its pending limit follows the node's slots.
///
/// The number of copies is chosen as [`apply_with`] chooses it when given none.
pub async fn apply(js: &jetstream::Context, limits: &Limits) -> Result<Applied, Error> {
    apply_with(js, limits, None).await
}

/// [`apply`] keeping `replicas` copies of every stream and bucket: raised or lowered to it
/// (JetStream copies a raised stream to the servers it adds, and its consumers follow it).
/// Without a count, [`Replicas::automatic`] chooses from the JetStream servers that answer
/// ([`jetstream_servers`]) and never lowers what a stream or bucket has. Idempotent: a second
/// run with the same count changes nothing.
pub async fn apply_with(
    js: &jetstream::Context,
    limits: &Limits,
    replicas: Option<Replicas>,
) -> Result<Applied, Error> {
    let (replicas, servers) = match replicas {
        Some(replicas) => (replicas, None),
        None => {
            let servers = jetstream_servers(&js.client()).await;
            let existing = existing_replicas(js).await?;
            (Replicas::automatic(servers, existing), Some(servers))
        }
    };
    ensure_with(js, limits, Mode::Upgrade(replicas)).await?;
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
        replicas,
        servers,
    })
}

/// How long [`jetstream_servers`] waits for the first answer, and then for each next one.
const FIRST_ANSWER: Duration = Duration::from_secs(2);
/// See [`FIRST_ANSWER`]: the servers of a cluster answer within milliseconds of each other.
const NEXT_ANSWER: Duration = Duration::from_millis(300);

/// The JetStream servers of the cluster `client`'s server belongs to, counted by the servers'
/// own answers: 1 for a server outside any cluster (its INFO names none), else the servers of
/// its cluster that answer [`subjects::SERVER_ACCOUNT_STATS_PING`] saying they run JetStream
/// (0 when none answers: a server without a system account).
///
/// NOTE: a count of the servers' addresses in INFO (`connect_urls`) would be simpler, but it
/// counts addresses (a server listening on every interface advertises each), is empty under
/// `no_advertise`, and says nothing of JetStream. The ping is what any account may ask, and
/// each server answers it once, for itself.
pub async fn jetstream_servers(client: &async_nats::Client) -> usize {
    let info = client.server_info();
    let Some(cluster) = info.cluster.filter(|name| !name.is_empty()) else {
        return usize::from(info.jetstream);
    };
    let inbox = client.new_inbox();
    let Ok(mut answers) = client.subscribe(inbox.clone()).await else {
        return 0;
    };
    let asked = client
        .publish_with_reply(
            subjects::SERVER_ACCOUNT_STATS_PING,
            inbox,
            r#"{"include_unused":true}"#.into(),
        )
        .await;
    if asked.is_err() {
        return 0;
    }
    let mut servers = std::collections::BTreeSet::new();
    let mut wait = FIRST_ANSWER;
    while let Ok(Some(answer)) = tokio::time::timeout(wait, answers.next()).await {
        // A server without a system account answers "no responders", which is no JSON.
        if let Ok(stats) = serde_json::from_slice::<ServerStats>(&answer.payload)
            && stats.server.jetstream
            && stats.server.cluster.as_deref() == Some(cluster.as_str())
        {
            servers.insert(stats.server.name);
        }
        wait = NEXT_ANSWER;
    }
    servers.len()
}

/// What [`jetstream_servers`] reads of a server's answer.
#[derive(serde::Deserialize)]
struct ServerStats {
    server: AnsweringServer,
}

/// The server that answered.
#[derive(serde::Deserialize)]
struct AnsweringServer {
    name: String,
    #[serde(default)]
    cluster: Option<String>,
    #[serde(default)]
    jetstream: bool,
}

/// The copies every stream and bucket of the topology that exists keeps now. One that cannot
/// be read (its servers electing a leader) fails the apply rather than count as missing: the
/// automatic count would otherwise lower it.
async fn existing_replicas(js: &jetstream::Context) -> Result<Vec<Replicas>, Error> {
    let mut found = Vec::new();
    for stream in spec::STREAMS {
        let copies = with_setup_rounds(format!("stream {}", stream.name), || async {
            match js.get_stream(stream.name).await {
                Ok(opened) => Ok(Some(opened.cached_info().config.num_replicas)),
                Err(error) if stream_not_found(&error) => Ok(None),
                Err(error) => Err(crate::error::BoxError::from(error)),
            }
        })
        .await?;
        found.extend(copies);
    }
    for bucket in spec::BUCKETS {
        let copies = with_setup_rounds(format!("bucket {}", bucket.name), || async {
            match js.get_key_value(bucket.name).await {
                Ok(store) => Ok(Some(store.stream.cached_info().config.num_replicas)),
                Err(error) if stream_not_found(&error) => Ok(None),
                Err(error) => Err(crate::error::BoxError::from(error)),
            }
        })
        .await?;
        found.extend(copies);
    }
    Ok(found
        .into_iter()
        .filter_map(|count| Replicas::new(count as u64).ok())
        .collect())
}

/// Whether `error`, or an error it was caused by, is JetStream saying the stream does not exist.
fn stream_not_found(error: &(dyn std::error::Error + 'static)) -> bool {
    use async_nats::jetstream::context::{GetStreamError, GetStreamErrorKind};
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(get) = error.downcast_ref::<GetStreamError>()
            && let GetStreamErrorKind::JetStream(answer) = get.kind()
        {
            return answer.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND;
        }
        cause = error.source();
    }
    false
}

/// The copies of each stream and bucket of the topology, by name (its consumers' too, by
/// `stream/consumer`), as the server reports them now: what an operator, or a test, checks
/// after [`apply_with`].
pub async fn replicas_of(js: &jetstream::Context) -> Result<Vec<(String, usize)>, Error> {
    let mut found = Vec::new();
    for stream in spec::STREAMS {
        let mut opened = js
            .get_stream(stream.name)
            .await
            .map_err(|e| missing(format!("stream {}", stream.name), e))?;
        let info = opened
            .info()
            .await
            .map_err(|e| Error::setup(format!("stream {}", stream.name), e))?;
        found.push((stream.name.to_owned(), copies(info.config.num_replicas)));
    }
    for bucket in spec::BUCKETS {
        let store = js
            .get_key_value(bucket.name)
            .await
            .map_err(|e| missing(format!("bucket {}", bucket.name), e))?;
        let info = store.stream.cached_info();
        found.push((bucket.name.to_owned(), copies(info.config.num_replicas)));
    }
    for consumer in spec::consumers() {
        let what = || format!("consumer {}", consumer.name);
        let stream = js
            .get_stream(consumer.stream)
            .await
            .map_err(|e| missing(what(), e))?;
        let mut opened = stream
            .get_consumer::<pull::Config>(&consumer.name)
            .await
            .map_err(|e| missing(what(), e))?;
        let info = opened.info().await.map_err(|e| Error::setup(what(), e))?;
        // A consumer made without a count of its own keeps its stream's: its RAFT group holds
        // the leader and the other copies.
        let held = info
            .cluster
            .as_ref()
            .map_or(1, |cluster| 1 + cluster.replicas.len());
        found.push((format!("{}/{}", consumer.stream, consumer.name), held));
    }
    Ok(found)
}

/// A stream's configured copies: JetStream reads 0 as 1.
fn copies(configured: usize) -> usize {
    configured.max(1)
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
        schedules: verify_bucket(js, &spec::SCHEDULES).await?,
        concurrency: verify_bucket(js, &spec::CONCURRENCY).await?,
        workflows: verify_bucket(js, &spec::WORKFLOWS).await?,
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
        priority_policy: if spec.priority_group.is_some() {
            PriorityPolicy::Prioritized
        } else {
            PriorityPolicy::None
        },
        priority_groups: spec.priority_group.map(str::to_owned).into_iter().collect(),
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
        num_replicas: mode.replicas(),
        ..stream_config(spec)
    };
    // Two services starting together may both see "not found" and race to create; the loser
    // finds the stream on its next round.
    with_setup_rounds(format!("stream {}", spec.name), || async {
        match mode {
            Mode::Upgrade(_) => js.create_or_update_stream(config.clone()).await.map(drop),
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
        num_replicas: mode.replicas(),
        // Entries that expire by their own TTL leave a delete marker, itself kept this long,
        // so that watchers see the removal.
        limit_markers: spec.per_key_ttl.then_some(MARKER_TTL),
        ..Default::default()
    };
    let what = || format!("bucket {}", spec.name);
    // Created if missing; racing creators of the same bucket agree on it.
    with_setup_rounds(what(), || async {
        match js.get_key_value(spec.name).await {
            Ok(_) => Ok(()),
            Err(error) if stream_not_found(&error) => js
                .create_key_value(config.clone())
                .await
                .map(drop)
                .map_err(crate::error::BoxError::from),
            Err(error) => Err(crate::error::BoxError::from(error)),
        }
    })
    .await?;
    let Mode::Upgrade(replicas) = mode else {
        return Ok(());
    };
    // Upgraded in one update of its stream, and only if it changes anything: the client's own
    // update of a bucket would make it readable from any copy again, and a second update while
    // the first is still adding copies goes unanswered.
    with_setup_rounds(what(), || async {
        let store = js
            .get_key_value(spec.name)
            .await
            .map_err(crate::error::BoxError::from)?;
        let current = store.stream.cached_info().config.clone();
        let wanted = upgraded_bucket(current.clone(), spec, &config, replicas);
        if wanted == current {
            return Ok(());
        }
        js.update_stream(wanted)
            .await
            .map(drop)
            .map_err(crate::error::BoxError::from)
    })
    .await
}

/// How long the delete marker of an entry expired by its own TTL is kept.
const MARKER_TTL: Duration = Duration::from_secs(300);

/// The stream of a bucket as `config` and `replicas` want it, from what it is (`stream`): the
/// settings a bucket's configuration sets, and where it is read from
/// ([`BucketSpec::leader_reads`]).
fn upgraded_bucket(
    mut stream: stream::Config,
    spec: &BucketSpec,
    config: &kv::Config,
    replicas: Replicas,
) -> stream::Config {
    stream.description = Some(config.description.clone());
    stream.max_messages_per_subject = config.history.max(1);
    stream.max_age = config.max_age;
    stream.max_bytes = config.max_bytes;
    stream.num_replicas = usize::from(replicas.get());
    stream.allow_direct = !spec.leader_reads(replicas);
    if let Some(markers) = config.limit_markers {
        stream.allow_message_ttl = true;
        stream.subject_delete_marker_ttl = Some(markers);
    }
    stream
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
