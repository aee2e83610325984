//! Who may do what on NATS: the mesh's identities and, for each, the subjects it may publish
//! and subscribe to. Everything not listed is denied.
//!
//! The lists are written against the subjects of [`crate::subjects`] and the streams, buckets
//! and durable consumers of [`crate::topology`], and against the JetStream API subjects that
//! using them takes (`$JS.API.…`): a JetStream consumer delivers whatever its filter selects,
//! whatever its reader may subscribe to, so each identity may create, read and acknowledge only
//! its own durable consumers, by name (and, for an executor node, by name and filter).
//!
//! - `admin` is unrestricted: it creates and upgrades the streams and buckets, and runs the
//!   administrative commands. Services only verify that topology.
//! - An executor node pulls from its own dispatch consumer only; registers, heartbeats and
//!   leaves as itself only (the registry calls carry the node in the subject); reads its own
//!   node record; publishes attempt events (never a placement: `pending`, `dispatched`), its
//!   rejections, output and retry timers; reads and writes job records.
//! - Only gateways (`Identity::Gateway`) read the remote systems' catalogue and record their
//!   health; a plain executor does not.
//! - Only schedulers publish dispatches and placement events; only registries write node
//!   records and node events; only the API writes revocations and publishes audit records.
//! - A client (`client`, and any added with `capstan nats init --client NAME`) may submit,
//!   create and cancel jobs, and read events and logs as they happen; a viewer (`--viewer NAME`)
//!   may only read them.
//!
//! The administrator and the services share one NATS account, [`MESH_ACCOUNT`], which holds the
//! streams and buckets. Each client and viewer has an account of its own, which sees only what
//! the mesh's exports and its imports ([`Identity::imports`]) let through: events and logs, and
//! for a client its calls, which arrive in the mesh's account on `<subject>.from.<client>`
//! ([`ClientCall`]). That subject is how a job submitted over NATS is attributed to who sent it:
//! nats-server fixes it, and no header a client sets can change it.
//!
//! Each mesh identity's replies come to an inbox prefix of its own ([`Identity::inbox_prefix`]),
//! so none can read the replies of another. Clients keep the `nats` CLI's default, `_INBOX`,
//! each in its own account.
//!
//! What permissions cannot say, the services check: a job record or job event names a job, not
//! the node that may touch it, so an executor could still write any job's record or publish an
//! attempt event for any job; executors claim attempts from the record in the bucket, not from
//! the dispatch. See ARCHITECTURE.md, "Trust".

use crate::auth::AuditAction;
use crate::event::JobEventKind;
use crate::ids::NodeId;
use crate::subjects::{self, ClientCall, Origin, registry::NodeCall};
use crate::topology::{self, BucketSpec, ConsumerSpec, StreamSpec};

/// Who connects.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// Creates and upgrades the topology; runs administrative commands.
    Admin,
    /// The registry service.
    Registry,
    /// The scheduler service.
    Scheduler,
    /// The API service.
    Api,
    /// The executor of one node.
    Executor(NodeId),
    /// The executor of one node that is also a gateway to remote systems (`capstan nats init
    /// --gateway`): what an executor may do, and reading the systems' catalogue, writing what
    /// its checks find, announcing health changes. Its seed is the node's executor seed.
    Gateway(NodeId),
    /// A person with the `nats` CLI, or a program, that submits, creates and cancels jobs and
    /// follows them: `client` ([`Identity::client`]), and any other named at init.
    Client(ClientName),
    /// One that only follows jobs' events and output.
    Viewer(ClientName),
}

/// The NATS account of the administrator and the services, which holds the streams and
/// buckets.
pub const MESH_ACCOUNT: &str = "CAPSTAN";

/// The name of a client or viewer identity: its seed file is `<name>.nk`, its account
/// `CLIENT_<name>`, its calls arrive on `<subject>.from.<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientName(String);

impl ClientName {
    /// The longest name accepted.
    pub const MAX_LEN: usize = 64;

    /// Parses a name: letters, digits, `_` and `-`, not a mesh identity's name.
    pub fn new(name: impl Into<String>) -> Result<Self, String> {
        let name = name.into();
        let charset = !name.is_empty()
            && name.len() <= Self::MAX_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !charset {
            return Err(format!(
                "client name {name:?}: 1 to {} letters, digits, `_` or `-`",
                Self::MAX_LEN
            ));
        }
        let reserved = ["admin", "registry", "scheduler", "api"].contains(&name.as_str())
            || name.starts_with("executor-");
        if reserved {
            return Err(format!(
                "client name {name:?} is a mesh identity's: choose another"
            ));
        }
        Ok(Self(name))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ClientName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for ClientName {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        Self::new(name)
    }
}

/// What an account shares with another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Share {
    /// Messages published on `to` in the importing account arrive on `subject` in the
    /// exporting one; replies find their way back.
    Service {
        /// The subject in the exporting account.
        subject: String,
        /// The subject the importing account publishes on.
        to: String,
    },
    /// Messages published on `subject` in the exporting account are delivered to the importing
    /// account's subscribers too.
    Stream {
        /// The subjects.
        subject: String,
    },
}

/// What an identity may publish and subscribe to; nothing else.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Permissions {
    /// Subjects it may publish to.
    pub publish: Vec<String>,
    /// Subjects it may subscribe to.
    pub subscribe: Vec<String>,
    /// Whether it may answer requests made to it (publish once to each reply subject of a
    /// request it received): the services' endpoints.
    pub answers: bool,
}

impl Identity {
    /// The identity's name: its seed file is `<name>.nk`.
    pub fn name(&self) -> String {
        match self {
            Self::Admin => "admin".to_owned(),
            Self::Registry => "registry".to_owned(),
            Self::Scheduler => "scheduler".to_owned(),
            Self::Api => "api".to_owned(),
            // Named as the node's dispatch consumer, `executor-<node>`.
            Self::Executor(node) | Self::Gateway(node) => topology::executor_consumer(node),
            Self::Client(name) | Self::Viewer(name) => name.as_str().to_owned(),
        }
    }

    /// Every identity of a mesh whose executor nodes are `nodes`, with the one client every
    /// mesh has.
    pub fn all(nodes: &[NodeId]) -> Vec<Self> {
        Self::all_with_gateways(nodes, &[])
    }

    /// Like [`Identity::all`], the nodes in `gateways` (added to `nodes` when missing) as
    /// gateways to remote systems.
    pub fn all_with_gateways(nodes: &[NodeId], gateways: &[NodeId]) -> Vec<Self> {
        let mut all = vec![Self::Admin, Self::Registry, Self::Scheduler, Self::Api];
        let missing = gateways.iter().filter(|gateway| !nodes.contains(gateway));
        for node in nodes.iter().chain(missing) {
            all.push(if gateways.contains(node) {
                Self::Gateway(node.clone())
            } else {
                Self::Executor(node.clone())
            });
        }
        all.push(Self::client());
        all
    }

    /// The identity of node `node`'s executor: a gateway's when `gateway`.
    pub fn executor(node: NodeId, gateway: bool) -> Self {
        if gateway {
            Self::Gateway(node)
        } else {
            Self::Executor(node)
        }
    }

    /// `client`, the client identity every mesh has (what the `nats` CLI is given).
    pub fn client() -> Self {
        Self::Client(ClientName("client".to_owned()))
    }

    /// Whether the identity is outside the mesh: a client or a viewer.
    pub fn is_outside(&self) -> bool {
        matches!(self, Self::Client(_) | Self::Viewer(_))
    }

    /// The NATS account the identity connects in: [`MESH_ACCOUNT`], or for a client or a
    /// viewer, `CLIENT_<name>`.
    pub fn account(&self) -> String {
        match self {
            Self::Client(name) | Self::Viewer(name) => format!("CLIENT_{name}"),
            _ => MESH_ACCOUNT.to_owned(),
        }
    }

    /// What the identity's account takes from the mesh's: for a client, its calls (each
    /// arriving on its own `from` subject) and the events and logs; for a viewer, the events
    /// and logs. Nothing for a mesh identity, which is in the mesh's account.
    pub fn imports(&self) -> Vec<Share> {
        let follow = [subjects::EVENTS_ALL, subjects::LOGS_ALL].map(|subject| Share::Stream {
            subject: subject.to_owned(),
        });
        match self {
            Self::Client(name) => ClientCall::ALL
                .map(|call| Share::Service {
                    subject: call.from(name.as_str()),
                    to: call.subject().to_owned(),
                })
                .into_iter()
                .chain(follow)
                .collect(),
            Self::Viewer(_) => follow.into(),
            _ => Vec::new(),
        }
    }

    /// Where replies to this identity's requests come: `_CAPSTAN_INBOX.<name>` for the mesh's
    /// own identities, the `nats` CLI's `_INBOX` for clients and viewers (each in its own
    /// account).
    pub fn inbox_prefix(&self) -> String {
        if self.is_outside() {
            "_INBOX".to_owned()
        } else {
            format!("_CAPSTAN_INBOX.{}", self.name())
        }
    }

    /// What the identity may do, or `None` for no restriction (`admin`).
    pub fn permissions(&self) -> Option<Permissions> {
        let mut allowed = Allowed::default();
        match self {
            Self::Admin => return None,
            Self::Client(_) => {
                allowed.publish(ClientCall::ALL.map(ClientCall::subject));
                allowed.subscribe([subjects::EVENTS_ALL, subjects::LOGS_ALL]);
            }
            Self::Viewer(_) => {
                allowed.subscribe([subjects::EVENTS_ALL, subjects::LOGS_ALL]);
            }
            Self::Registry => registry(&mut allowed),
            Self::Scheduler => scheduler(&mut allowed),
            Self::Api => api(&mut allowed),
            Self::Executor(node) => executor(&mut allowed, node),
            Self::Gateway(node) => {
                executor(&mut allowed, node);
                gateway(&mut allowed);
            }
        }
        allowed.subscribe([format!("{}.>", self.inbox_prefix())]);
        allowed.service(self);
        Some(Permissions {
            publish: allowed.publish,
            subscribe: allowed.subscribe,
            answers: !self.is_outside(),
        })
    }
}

/// What the mesh's account shares with the clients' and viewers': the calls of every client
/// and the events and logs.
pub fn exports() -> Vec<Share> {
    ClientCall::ALL
        .map(|call| Share::Service {
            subject: call.from_all(),
            to: call.from_all(),
        })
        .into_iter()
        .chain(
            [subjects::EVENTS_ALL, subjects::LOGS_ALL].map(|subject| Share::Stream {
                subject: subject.to_owned(),
            }),
        )
        .collect()
}

/// The registry's micro-service name on `$SRV` (`nats micro ls`).
pub const REGISTRY_SERVICE: &str = "capstan-registry";
/// The scheduler's micro-service name.
pub const SCHEDULER_SERVICE: &str = "capstan-scheduler";
/// The API's micro-service name.
pub const API_SERVICE: &str = "capstan-api";
/// Every executor's micro-service name.
pub const EXECUTOR_SERVICE: &str = "capstan-executor";

/// The micro-service name each service announces on `$SRV`.
pub fn service_name(identity: &Identity) -> Option<&'static str> {
    match identity {
        Identity::Registry => Some(REGISTRY_SERVICE),
        Identity::Scheduler => Some(SCHEDULER_SERVICE),
        Identity::Api => Some(API_SERVICE),
        Identity::Executor(_) | Identity::Gateway(_) => Some(EXECUTOR_SERVICE),
        Identity::Admin | Identity::Client(_) | Identity::Viewer(_) => None,
    }
}

fn registry(allowed: &mut Allowed) {
    allowed.subscribe([subjects::registry::GROUP.to_owned() + ".>"]);
    allowed.publish([subjects::NODE_EVENTS_ALL]);
    allowed.rejections([Origin::Registry]);
    allowed.open_mesh();
    allowed.bucket_write(&topology::NODES, "*");
    allowed.bucket_read(&topology::NODES, "*");
    allowed.bucket_watch(&topology::NODES);
    allowed.durable(&topology::registry_consumer());
}

fn scheduler(allowed: &mut Allowed) {
    allowed.subscribe([subjects::CREATE, subjects::CANCEL, subjects::JOB_EVENTS_ALL]);
    // The clients' calls, each arriving on the caller's own subject.
    allowed.subscribe([ClientCall::Create, ClientCall::Cancel].map(ClientCall::from_all));
    // Submissions of the create endpoint, each on its job's own subject.
    allowed.publish([
        subjects::SUBMIT_JOB_ALL,
        subjects::DISPATCH_ALL,
        subjects::JOB_EVENTS_ALL,
        subjects::FANOUT_EVENTS_ALL,
        subjects::SCHEDULE_EVENTS_ALL,
        subjects::WORKFLOW_EVENTS_ALL,
        subjects::TIMERS_ALL,
    ]);
    allowed.publish([subjects::control_any("cancel")]);
    // What clients do over NATS is audited by the scheduler that serves them.
    allowed.publish([AuditAction::JobSubmit, AuditAction::JobCancel].map(subjects::audit));
    allowed.rejections([Origin::Submit, Origin::Create, Origin::Timer, Origin::Nodes]);
    allowed.open_mesh();
    for bucket in [
        &topology::JOBS,
        &topology::IDEMPOTENCY,
        &topology::FANOUTS,
        &topology::SCHEDULES,
        &topology::CONCURRENCY,
        &topology::WORKFLOWS,
    ] {
        allowed.bucket_write(bucket, "*");
        allowed.bucket_read(bucket, "*");
    }
    // Finding the fan-outs and workflows still running, the schedules whose tick is overdue,
    // and the slots freed under concurrency keys.
    allowed.bucket_watch(&topology::FANOUTS);
    allowed.bucket_watch(&topology::WORKFLOWS);
    // A workflow step's dependants receive the end of its standard output.
    allowed.stream_watch(&topology::LOGS);
    allowed.bucket_watch(&topology::SCHEDULES);
    allowed.bucket_watch(&topology::CONCURRENCY);
    allowed.bucket_read(&topology::NODES, "*");
    allowed.bucket_watch(&topology::NODES);
    // A job on a remote system is accepted only when the system exists and is active; a
    // fan-out over systems by labels lists them.
    allowed.bucket_read(&topology::SYSTEMS, "*");
    allowed.bucket_watch(&topology::SYSTEMS);
    allowed.purge(&topology::TIMERS);
    // Cancelling a job accepted but not yet created, from its stored submission.
    allowed.stream_read(&topology::SUBMISSIONS, subjects::SUBMIT_JOB_ALL);
    allowed.stream_read(&topology::SUBMISSIONS, subjects::PLACE_ALL);
    // Settling a lost node reads the dispatches it still had, without consuming them.
    allowed.stream_read(&topology::DISPATCH, subjects::DISPATCH_ALL);
    for consumer in [
        topology::scheduler_consumer(),
        topology::place_consumer(),
        topology::timers_consumer(),
        topology::ticks_consumer(),
        topology::nodes_consumer(),
    ] {
        allowed.durable(&consumer);
    }
}

fn api(allowed: &mut Allowed) {
    allowed.publish([
        // Submissions, each on its job's own subject.
        subjects::SUBMIT_JOB_ALL.to_owned(),
        subjects::AUDIT_ALL.to_owned(),
        subjects::job_events_of_kind(JobEventKind::Cancelled),
        // A fan-out cancelled before any target ran ends here; a workflow starts here, and
        // may end here when it is cancelled.
        subjects::FANOUT_EVENTS_ALL.to_owned(),
        subjects::WORKFLOW_EVENTS_ALL.to_owned(),
        // Arming a schedule's next tick when it is created, changed or resumed.
        subjects::SCHEDULE_TIMERS_ALL.to_owned(),
        subjects::control_any("cancel"),
        subjects::registry::NODES_LIST.to_owned(),
        subjects::registry::NODES_GET.to_owned(),
        subjects::registry::NODES_CORDON.to_owned(),
        subjects::registry::NODES_UNCORDON.to_owned(),
        subjects::registry::NODES_DRAIN.to_owned(),
    ]);
    allowed.rejections([Origin::History, Origin::Audit]);
    // Counting its own replicas (each takes its share of the rate limits), and every
    // service's for the dashboard's view of the mesh.
    allowed.publish(
        [
            REGISTRY_SERVICE,
            SCHEDULER_SERVICE,
            EXECUTOR_SERVICE,
            API_SERVICE,
        ]
        .map(|service| format!("$SRV.PING.{service}")),
    );
    allowed.open_mesh();
    for bucket in [
        &topology::JOBS,
        &topology::IDEMPOTENCY,
        &topology::REVOCATIONS,
        &topology::SECRETS,
        &topology::FANOUTS,
        &topology::SCHEDULES,
        &topology::WORKFLOWS,
    ] {
        allowed.bucket_write(bucket, "*");
        allowed.bucket_read(bucket, "*");
    }
    // Listing the schedules and the workflows; finding a user's open fan-outs, to cancel them
    // when the user may no longer submit jobs.
    allowed.bucket_watch(&topology::SCHEDULES);
    allowed.bucket_watch(&topology::WORKFLOWS);
    allowed.bucket_watch(&topology::FANOUTS);
    // Saying why a job waits for a concurrency slot.
    allowed.bucket_read(&topology::CONCURRENCY, "*");
    // Listing the stored secrets (names and users, never values).
    allowed.bucket_watch(&topology::SECRETS);
    // The catalogue of remote systems: written here (administrators' changes), with the
    // gateways' findings read beside it, and removed with a system.
    for bucket in [&topology::SYSTEMS, &topology::SYSTEM_STATUS] {
        allowed.bucket_write(bucket, "*");
        allowed.bucket_read(bucket, "*");
        allowed.bucket_watch(bucket);
    }
    // Listing the systems for `nats` users, on the plain subject and on each client's.
    allowed.subscribe([
        subjects::SYSTEMS_LIST.to_owned(),
        ClientCall::ListSystems.from_all(),
    ]);
    allowed.bucket_read(&topology::NODES, "*");
    // Listing nodes reads the whole bucket through a consumer of its own.
    allowed.bucket_watch(&topology::NODES);
    allowed.bucket_watch(&topology::REVOCATIONS);
    // Following a job's output watches its record.
    allowed.bucket_watch(&topology::JOBS);
    allowed.stream_read(&topology::LOGS, subjects::LOGS_ALL);
    // The dashboard's live view follows the events as they are stored.
    allowed.stream_watch(&topology::EVENTS);
    allowed.stream_watch(&topology::LOGS);
    // Showing an accepted job that no scheduler has created yet, from its stored submission.
    allowed.stream_read(&topology::SUBMISSIONS, subjects::SUBMIT_JOB_ALL);
    allowed.stream_read(&topology::SUBMISSIONS, subjects::PLACE_ALL);
    // The purge of finished jobs, and a cancelled job's timer.
    for stream in [&topology::EVENTS, &topology::LOGS, &topology::TIMERS] {
        allowed.purge(stream);
    }
    for consumer in [topology::history_consumer(), topology::audit_consumer()] {
        allowed.durable(&consumer);
    }
    // The metrics report how far behind the schedulers are.
    let intake = topology::scheduler_consumer();
    allowed.publish([js_api(&format!(
        "CONSUMER.INFO.{}.{}",
        intake.stream, intake.name
    ))]);
}

fn executor(allowed: &mut Allowed, node: &NodeId) {
    allowed.subscribe([subjects::control_all(node), subjects::executor::jobs(node)]);
    allowed.publish(NodeCall::ALL.map(|call| call.subject(node)));
    // Attempt events: every kind but the placements, which only schedulers announce.
    allowed.publish(
        JobEventKind::ALL
            .into_iter()
            .filter(|kind| !matches!(kind, JobEventKind::Pending | JobEventKind::Dispatched))
            .map(subjects::job_events_of_kind),
    );
    // Output only under its own name: readers keep a chunk only from the node that ran its
    // attempt.
    allowed.publish([subjects::node_logs(node), subjects::TIMERS_ALL.to_owned()]);
    allowed.rejections([Origin::Dispatch, Origin::Control, Origin::Submit]);
    allowed.open_mesh();
    allowed.bucket_write(&topology::JOBS, "*");
    allowed.bucket_read(&topology::JOBS, "*");
    allowed.bucket_read(&topology::NODES, node.as_str());
    // Its own record, followed as operators cordon or drain the node: the writes to it as
    // they are stored (a plain subscription, not a consumer).
    allowed.subscribe([subjects::kv_key(topology::NODES.name, node.as_str())]);
    // The fast lane: plain jobs taken from their submissions (a client's audited), the rest
    // handed on to the schedulers for placement.
    allowed.pull(&topology::scheduler_consumer());
    allowed.publish([subjects::PLACE_ALL.to_owned()]);
    allowed.publish([subjects::audit(AuditAction::JobSubmit)]);
    // The stored secrets a job names, opened for its attempt; each opening is audited.
    allowed.bucket_read(&topology::SECRETS, "*");
    allowed.publish([subjects::audit(AuditAction::SecretRead)]);
    allowed.durable(&topology::executor_consumer_spec(node, 1));
}

/// What a gateway may do beside an executor's: reading the catalogue of remote systems
/// (credentials sealed), writing what its checks find, announcing health changes, and auditing
/// a host key pinned on first use.
fn gateway(allowed: &mut Allowed) {
    allowed.bucket_read(&topology::SYSTEMS, "*");
    allowed.bucket_watch(&topology::SYSTEMS);
    allowed.bucket_read(&topology::SYSTEM_STATUS, "*");
    allowed.bucket_watch(&topology::SYSTEM_STATUS);
    allowed.bucket_write(&topology::SYSTEM_STATUS, "*");
    allowed.publish([
        subjects::SYSTEM_EVENTS_ALL.to_owned(),
        subjects::audit(AuditAction::SystemPin),
    ]);
}

/// An identity's lists as they are built.
#[derive(Default)]
struct Allowed {
    publish: Vec<String>,
    subscribe: Vec<String>,
}

impl Allowed {
    fn publish<S: Into<String>>(&mut self, subjects: impl IntoIterator<Item = S>) {
        for subject in subjects {
            let subject = subject.into();
            if !self.publish.contains(&subject) {
                self.publish.push(subject);
            }
        }
    }

    fn subscribe<S: Into<String>>(&mut self, subjects: impl IntoIterator<Item = S>) {
        for subject in subjects {
            let subject = subject.into();
            if !self.subscribe.contains(&subject) {
                self.subscribe.push(subject);
            }
        }
    }

    fn rejections(&mut self, origins: impl IntoIterator<Item = Origin>) {
        self.publish(origins.into_iter().map(subjects::rejected));
    }

    /// Answering the micro-service discovery requests (`nats micro ls`) addressed to all, to
    /// its service, and to its instance.
    fn service(&mut self, identity: &Identity) {
        let Some(name) = service_name(identity) else {
            return;
        };
        for verb in ["PING", "INFO", "STATS"] {
            self.subscribe([
                format!("$SRV.{verb}"),
                format!("$SRV.{verb}.{name}"),
                format!("$SRV.{verb}.{name}.*"),
            ]);
        }
    }

    /// What opening the mesh takes: reading the configuration of every stream and bucket, to
    /// verify the topology.
    fn open_mesh(&mut self) {
        let streams = topology::STREAMS.iter().map(|s| s.name.to_owned());
        let buckets = topology::BUCKETS.iter().map(kv_stream);
        let names: Vec<String> = streams.chain(buckets).collect();
        self.publish(
            names
                .iter()
                .map(|name| js_api(&format!("STREAM.INFO.{name}"))),
        );
    }

    /// Reading the entries of `bucket` whose keys match `keys` (a key or `*`): from any copy
    /// (a direct get, whose subject names the key), and, for all its keys, from the leader of
    /// a bucket read there once it has copies ([`BucketSpec::leader_reads`]; the request names
    /// the key in its body, so it cannot be granted for one key).
    fn bucket_read(&mut self, bucket: &BucketSpec, keys: &str) {
        let stream = kv_stream(bucket);
        let key = subjects::kv_key(bucket.name, keys);
        self.publish([js_api(&format!("DIRECT.GET.{stream}.{key}"))]);
        if keys == "*" && bucket.read_from_leader {
            self.publish([js_api(&format!("STREAM.MSG.GET.{stream}"))]);
        }
    }

    /// Writing the entries of `bucket` whose keys match `keys`.
    fn bucket_write(&mut self, bucket: &BucketSpec, keys: &str) {
        self.publish([subjects::kv_key(bucket.name, keys)]);
    }

    /// Watching `bucket` (an ordered consumer, created unnamed, flow-controlled).
    fn bucket_watch(&mut self, bucket: &BucketSpec) {
        self.stream_watch_named(&kv_stream(bucket));
    }

    /// Reading ordered ranges of `stream` through consumers of its own.
    fn stream_watch(&mut self, stream: &StreamSpec) {
        self.stream_watch_named(stream.name);
    }

    fn stream_watch_named(&mut self, stream: &str) {
        self.publish([
            js_api(&format!("CONSUMER.CREATE.{stream}")),
            js_api(&format!("CONSUMER.CREATE.{stream}.*.>")),
            js_api(&format!("CONSUMER.INFO.{stream}.*")),
            js_api(&format!("CONSUMER.DELETE.{stream}.*")),
            js_api(&format!("CONSUMER.MSG.NEXT.{stream}.*")),
            format!("$JS.FC.{stream}.>"),
        ]);
    }

    /// Reading single messages of `stream` by subject (`subjects`) or sequence.
    fn stream_read(&mut self, stream: &StreamSpec, subjects: &str) {
        self.publish([
            js_api(&format!("DIRECT.GET.{}", stream.name)),
            js_api(&format!("DIRECT.GET.{}.{subjects}", stream.name)),
            js_api(&format!("STREAM.MSG.GET.{}", stream.name)),
        ]);
    }

    /// Purging messages of `stream`.
    fn purge(&mut self, stream: &StreamSpec) {
        self.publish([js_api(&format!("STREAM.PURGE.{}", stream.name))]);
    }

    /// Creating, reading, pulling from and acknowledging the durable consumer `consumer`; a
    /// consumer with one filter may only be created with that filter.
    /// Reading and pulling from `consumer`, acknowledging what it delivers; not creating or
    /// changing it.
    fn pull(&mut self, consumer: &ConsumerSpec) {
        let (stream, name) = (consumer.stream, consumer.name.as_str());
        self.publish([
            js_api(&format!("CONSUMER.INFO.{stream}.{name}")),
            js_api(&format!("CONSUMER.MSG.NEXT.{stream}.{name}")),
            format!("$JS.ACK.{stream}.{name}.>"),
        ]);
    }

    fn durable(&mut self, consumer: &ConsumerSpec) {
        let (stream, name) = (consumer.stream, consumer.name.as_str());
        let create = match consumer.subjects.as_slice() {
            [one] => format!("CONSUMER.CREATE.{stream}.{name}.{one}"),
            _ => format!("CONSUMER.CREATE.{stream}.{name}"),
        };
        self.publish([
            js_api(&create),
            js_api(&format!("CONSUMER.INFO.{stream}.{name}")),
            js_api(&format!("CONSUMER.MSG.NEXT.{stream}.{name}")),
            format!("$JS.ACK.{stream}.{name}.>"),
        ]);
    }
}

/// A JetStream API subject.
fn js_api(rest: &str) -> String {
    format!("$JS.API.{rest}")
}

/// The stream behind a KV bucket.
pub fn kv_stream(bucket: &BucketSpec) -> String {
    format!("KV_{}", bucket.name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subjects::covers;

    fn node(name: &str) -> NodeId {
        NodeId::new(name).expect("valid")
    }

    fn may_publish(identity: &Identity, subject: &str) -> bool {
        identity
            .permissions()
            .is_none_or(|p| p.publish.iter().any(|allowed| covers(allowed, subject)))
    }

    fn may_subscribe(identity: &Identity, subject: &str) -> bool {
        identity
            .permissions()
            .is_none_or(|p| p.subscribe.iter().any(|allowed| covers(allowed, subject)))
    }

    #[test]
    fn the_client_may_only_submit_cancel_list_systems_and_read_events_and_logs() {
        let permissions = Identity::client().permissions().expect("restricted");
        assert_eq!(
            permissions.publish,
            [
                subjects::SUBMIT,
                subjects::CREATE,
                subjects::CANCEL,
                subjects::SYSTEMS_LIST
            ]
        );
        assert_eq!(
            permissions.subscribe,
            [subjects::EVENTS_ALL, subjects::LOGS_ALL, "_INBOX.>"]
        );
        assert!(!permissions.answers);
    }

    #[test]
    fn only_the_api_writes_the_systems_catalogue_and_only_gateways_read_it_and_write_its_status() {
        let api = Identity::Api;
        let executor = Identity::Gateway(node("gw-1"));
        let plain = Identity::Executor(node("exec-1"));
        let record = format!(
            "$JS.API.DIRECT.GET.KV_{}.{}",
            topology::SYSTEMS.name,
            subjects::kv_key(topology::SYSTEMS.name, "web-1")
        );
        assert!(
            may_publish(&executor, &record),
            "a gateway reads the catalogue"
        );
        assert!(!may_publish(&plain, &record), "an executor does not");
        assert!(!may_publish(
            &plain,
            &subjects::kv_key(topology::SYSTEM_STATUS.name, "web-1")
        ));
        assert!(!may_publish(
            &plain,
            &subjects::system_event("web-1", crate::SystemHealth::Healthy)
        ));
        assert_eq!(executor.name(), plain.name().replace("exec-1", "gw-1"));
        assert_eq!(
            Identity::all_with_gateways(&[node("exec-1")], &[node("gw-1")])[4..6],
            [plain.clone(), executor.clone()]
        );
        let catalogue = subjects::kv_key(topology::SYSTEMS.name, "web-1");
        let status = subjects::kv_key(topology::SYSTEM_STATUS.name, "web-1");
        assert!(may_publish(&api, &catalogue) && may_publish(&api, &status));
        assert!(
            !may_publish(&executor, &catalogue),
            "a gateway rewrites no system"
        );
        assert!(may_publish(&executor, &status));
        for identity in [Identity::Scheduler, Identity::Registry, Identity::client()] {
            assert!(!may_publish(&identity, &catalogue), "{identity:?}");
            assert!(!may_publish(&identity, &status), "{identity:?}");
        }
        let event = subjects::system_event("web-1", crate::SystemHealth::Healthy);
        assert!(may_publish(&executor, &event));
        assert!(!may_publish(&api, &event));
        assert!(may_publish(
            &executor,
            &subjects::audit(AuditAction::SystemPin)
        ));
        assert!(!may_publish(
            &executor,
            &subjects::audit(AuditAction::SystemCreate)
        ));
        assert!(may_subscribe(&api, subjects::SYSTEMS_LIST));
        assert!(may_subscribe(&api, &ClientCall::ListSystems.from("ci")));
        assert!(!may_subscribe(&executor, subjects::SYSTEMS_LIST));
    }

    #[test]
    fn a_viewer_may_publish_nothing_and_imports_no_call() {
        let viewer = Identity::Viewer(ClientName::new("auditor").expect("valid"));
        let permissions = viewer.permissions().expect("restricted");
        assert!(permissions.publish.is_empty());
        assert_eq!(
            permissions.subscribe,
            [subjects::EVENTS_ALL, subjects::LOGS_ALL, "_INBOX.>"]
        );
        assert!(
            viewer
                .imports()
                .iter()
                .all(|share| matches!(share, Share::Stream { .. }))
        );
        assert_eq!(viewer.account(), "CLIENT_auditor");
    }

    #[test]
    fn a_clients_calls_arrive_on_its_own_subjects_which_the_mesh_exports_and_no_one_else_publishes()
    {
        let alice = Identity::Client(ClientName::new("alice").expect("valid"));
        let services: Vec<(String, String)> = alice
            .imports()
            .into_iter()
            .filter_map(|share| match share {
                Share::Service { subject, to } => Some((subject, to)),
                Share::Stream { .. } => None,
            })
            .collect();
        assert_eq!(services.len(), ClientCall::ALL.len());
        for (call, (subject, to)) in ClientCall::ALL.into_iter().zip(&services) {
            assert_eq!(to, call.subject());
            assert_eq!(call.client_of(subject), Some("alice"));
            assert!(exports().iter().any(|export| matches!(
                export,
                Share::Service { subject: exported, .. } if covers(exported, subject)
            )));
            for identity in Identity::all(&[node("exec-1")]) {
                if identity == Identity::Admin {
                    continue;
                }
                assert!(
                    !may_publish(&identity, subject),
                    "{} may publish {subject}",
                    identity.name()
                );
            }
        }
        for identity in Identity::all(&[node("exec-1")]) {
            assert_eq!(
                identity.account() == MESH_ACCOUNT,
                !identity.is_outside(),
                "{}",
                identity.name()
            );
        }
    }

    #[test]
    fn a_client_name_is_a_subject_token_and_not_a_mesh_identitys() {
        for good in ["alice", "ci-bot_2", "client"] {
            assert!(ClientName::new(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "a.b",
            "a*",
            "a>",
            "with space",
            "admin",
            "api",
            "executor-exec-1",
        ] {
            assert!(ClientName::new(bad).is_err(), "{bad:?}");
        }
        assert!(ClientName::new("x".repeat(65)).is_err());
    }

    #[test]
    fn only_admin_is_unrestricted() {
        for identity in Identity::all(&[node("exec-1")]) {
            assert_eq!(
                identity.permissions().is_none(),
                identity == Identity::Admin,
                "{}",
                identity.name()
            );
        }
    }

    #[test]
    fn an_executor_node_acts_for_itself_only() {
        let (one, two) = (node("exec-1"), node("exec-2"));
        let exec = Identity::Executor(one.clone());
        for call in NodeCall::ALL {
            assert!(may_publish(&exec, &call.subject(&one)));
            assert!(
                !may_publish(&exec, &call.subject(&two)),
                "{call:?} as another"
            );
        }
        assert!(may_publish(
            &exec,
            "$JS.API.CONSUMER.MSG.NEXT.CAPSTAN_DISPATCH.executor-exec-1"
        ));
        assert!(!may_publish(
            &exec,
            "$JS.API.CONSUMER.MSG.NEXT.CAPSTAN_DISPATCH.executor-exec-2"
        ));
        // Its consumer only with its own filter: not one reading another node's dispatches.
        assert!(may_publish(
            &exec,
            "$JS.API.CONSUMER.CREATE.CAPSTAN_DISPATCH.executor-exec-1.capstan.dispatch.exec-1"
        ));
        assert!(!may_publish(
            &exec,
            "$JS.API.CONSUMER.CREATE.CAPSTAN_DISPATCH.executor-exec-1.capstan.dispatch.exec-2"
        ));
        assert!(!may_publish(
            &exec,
            "$JS.API.CONSUMER.CREATE.CAPSTAN_DISPATCH.executor-exec-1"
        ));
        assert!(may_subscribe(&exec, &subjects::control(&one, "cancel")));
        assert!(!may_subscribe(&exec, &subjects::control(&two, "cancel")));
        assert!(may_publish(
            &exec,
            "$JS.API.DIRECT.GET.KV_capstan_nodes.$KV.capstan_nodes.exec-1"
        ));
        assert!(!may_publish(
            &exec,
            "$JS.API.DIRECT.GET.KV_capstan_nodes.$KV.capstan_nodes.exec-2"
        ));
    }

    #[test]
    fn an_executor_may_not_place_submit_or_administer() {
        let exec = Identity::Executor(node("exec-1"));
        let job = crate::JobId::generate();
        for subject in [
            subjects::dispatch(&node("exec-1")),
            subjects::SUBMIT.to_owned(),
            subjects::submit_job(job),
            subjects::CREATE.to_owned(),
            subjects::job_event(job, JobEventKind::Pending),
            subjects::job_event(job, JobEventKind::Dispatched),
            subjects::node_event(&node("exec-1"), crate::NodeEventKind::Registered),
            subjects::kv_key(topology::NODES.name, "exec-1"),
            "$JS.API.STREAM.DELETE.CAPSTAN_DISPATCH".to_owned(),
            "$JS.API.STREAM.PURGE.CAPSTAN_EVENTS".to_owned(),
            "$JS.API.CONSUMER.DELETE.CAPSTAN_DISPATCH.executor-exec-1".to_owned(),
            subjects::audit(crate::AuditAction::HistoryRebuild),
        ] {
            assert!(!may_publish(&exec, &subject), "{subject}");
        }
        assert!(may_publish(
            &exec,
            &subjects::job_event(job, JobEventKind::Succeeded)
        ));
        assert!(may_publish(&exec, &subjects::logs(job, &node("exec-1"))));
        assert!(!may_publish(&exec, &subjects::logs(job, &node("exec-2"))));
    }

    #[test]
    fn an_executor_takes_submissions_and_hands_them_on_without_reconfiguring_their_consumer() {
        let exec = Identity::Executor(node("exec-1"));
        let job = crate::JobId::generate();
        let intake = topology::scheduler_consumer();
        let (stream, name) = (intake.stream, intake.name.as_str());
        assert!(may_publish(
            &exec,
            &format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}")
        ));
        assert!(may_publish(
            &exec,
            &format!("$JS.API.CONSUMER.INFO.{stream}.{name}")
        ));
        assert!(may_publish(
            &exec,
            &format!("$JS.ACK.{stream}.{name}.1.2.3.4.5.6")
        ));
        assert!(!may_publish(
            &exec,
            &format!("$JS.API.CONSUMER.CREATE.{stream}.{name}")
        ));
        let place = topology::place_consumer();
        assert!(!may_publish(
            &exec,
            &format!("$JS.API.CONSUMER.MSG.NEXT.{}.{}", place.stream, place.name)
        ));
        assert!(may_publish(&exec, &subjects::place_job(job)));
        assert!(may_publish(
            &exec,
            &subjects::audit(crate::AuditAction::JobSubmit)
        ));
        assert!(!may_publish(
            &exec,
            &subjects::audit(crate::AuditAction::JobCancel)
        ));
        // Its own node record followed, no other's.
        assert!(may_subscribe(
            &exec,
            &subjects::kv_key(topology::NODES.name, "exec-1")
        ));
        assert!(!may_subscribe(
            &exec,
            &subjects::kv_key(topology::NODES.name, "exec-2")
        ));
    }

    #[test]
    fn only_schedulers_dispatch_and_only_registries_write_nodes() {
        let nodes = [node("exec-1")];
        let dispatch = subjects::dispatch(&nodes[0]);
        let node_record = subjects::kv_key(topology::NODES.name, "exec-1");
        for identity in Identity::all(&nodes) {
            if identity == Identity::Admin {
                continue;
            }
            assert_eq!(
                may_publish(&identity, &dispatch),
                identity == Identity::Scheduler,
                "{}",
                identity.name()
            );
            assert_eq!(
                may_publish(&identity, &node_record),
                identity == Identity::Registry,
                "{}",
                identity.name()
            );
        }
    }

    #[test]
    fn no_identity_reads_another_ones_replies() {
        let identities = Identity::all(&[node("exec-1"), node("exec-2")]);
        for reader in &identities {
            for other in &identities {
                if reader == other || *reader == Identity::Admin {
                    continue;
                }
                let reply = format!("{}.abc.1", other.inbox_prefix());
                assert!(
                    !may_subscribe(reader, &reply),
                    "{} reads {}'s replies",
                    reader.name(),
                    other.name()
                );
            }
        }
    }

    #[test]
    fn no_service_may_change_a_stream_or_a_bucket() {
        for identity in Identity::all(&[node("exec-1")]) {
            let Some(permissions) = identity.permissions() else {
                continue;
            };
            for subject in &permissions.publish {
                for verb in ["STREAM.CREATE", "STREAM.UPDATE", "STREAM.DELETE"] {
                    assert!(
                        !subject.contains(verb) && !covers(subject, &js_api(&format!("{verb}.X"))),
                        "{} may {verb}: {subject}",
                        identity.name()
                    );
                }
                assert_ne!(subject, "$JS.API.>", "{}", identity.name());
            }
        }
    }
}
