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
//! - Only schedulers publish dispatches and placement events; only registries write node
//!   records and node events; only the API writes revocations and publishes audit records.
//! - `client` may submit, create and cancel jobs, and read events and logs as they happen.
//!
//! Each identity's replies come to an inbox prefix of its own ([`Identity::inbox_prefix`]), so
//! no identity can read the replies of another. `client` keeps the `nats` CLI's default,
//! `_INBOX`, which no service uses.
//!
//! What permissions cannot say, the services check: a job record or job event names a job, not
//! the node that may touch it, so an executor could still write any job's record or publish an
//! attempt event for any job; executors claim attempts from the record in the bucket, not from
//! the dispatch. See ARCHITECTURE.md, "Trust".

use crate::event::JobEventKind;
use crate::ids::NodeId;
use crate::subjects::{self, Origin, registry::NodeCall};
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
    /// A person with the `nats` CLI, or a program submitting jobs.
    Client,
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
            Self::Executor(node) => topology::executor_consumer(node),
            Self::Client => "client".to_owned(),
        }
    }

    /// Every identity of a mesh whose executor nodes are `nodes`.
    pub fn all(nodes: &[NodeId]) -> Vec<Self> {
        let mut all = vec![Self::Admin, Self::Registry, Self::Scheduler, Self::Api];
        all.extend(nodes.iter().cloned().map(Self::Executor));
        all.push(Self::Client);
        all
    }

    /// Where replies to this identity's requests come: `_CAPSTAN_INBOX.<name>` for the mesh's
    /// own identities, the `nats` CLI's `_INBOX` for `client`.
    pub fn inbox_prefix(&self) -> String {
        match self {
            Self::Client => "_INBOX".to_owned(),
            other => format!("_CAPSTAN_INBOX.{}", other.name()),
        }
    }

    /// What the identity may do, or `None` for no restriction (`admin`).
    pub fn permissions(&self) -> Option<Permissions> {
        let mut allowed = Allowed::default();
        match self {
            Self::Admin => return None,
            Self::Client => {
                allowed.publish([subjects::SUBMIT, subjects::CREATE, subjects::CANCEL]);
                allowed.subscribe([subjects::EVENTS_ALL, subjects::LOGS_ALL]);
            }
            Self::Registry => registry(&mut allowed),
            Self::Scheduler => scheduler(&mut allowed),
            Self::Api => api(&mut allowed),
            Self::Executor(node) => executor(&mut allowed, node),
        }
        allowed.subscribe([format!("{}.>", self.inbox_prefix())]);
        if !matches!(self, Self::Client) {
            allowed.service(self);
        }
        Some(Permissions {
            publish: allowed.publish,
            subscribe: allowed.subscribe,
            answers: !matches!(self, Self::Client),
        })
    }
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
        Identity::Executor(_) => Some(EXECUTOR_SERVICE),
        Identity::Admin | Identity::Client => None,
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
    allowed.publish([
        subjects::SUBMIT,
        subjects::DISPATCH_ALL,
        subjects::JOB_EVENTS_ALL,
        subjects::TIMERS_ALL,
    ]);
    allowed.publish([subjects::control_any("cancel")]);
    allowed.rejections([Origin::Submit, Origin::Create, Origin::Timer, Origin::Nodes]);
    allowed.open_mesh();
    for bucket in [&topology::JOBS, &topology::IDEMPOTENCY] {
        allowed.bucket_write(bucket, "*");
        allowed.bucket_read(bucket, "*");
    }
    allowed.bucket_read(&topology::NODES, "*");
    allowed.bucket_watch(&topology::NODES);
    allowed.purge(&topology::TIMERS);
    // Settling a lost node reads the dispatches it still had, without consuming them.
    allowed.stream_read(&topology::DISPATCH, subjects::DISPATCH_ALL);
    for consumer in [
        topology::scheduler_consumer(),
        topology::timers_consumer(),
        topology::nodes_consumer(),
    ] {
        allowed.durable(&consumer);
    }
}

fn api(allowed: &mut Allowed) {
    allowed.publish([
        subjects::SUBMIT.to_owned(),
        subjects::AUDIT_ALL.to_owned(),
        subjects::job_events_of_kind(JobEventKind::Cancelled),
        subjects::control_any("cancel"),
        subjects::registry::NODES_LIST.to_owned(),
        subjects::registry::NODES_GET.to_owned(),
        subjects::registry::NODES_CORDON.to_owned(),
        subjects::registry::NODES_UNCORDON.to_owned(),
        subjects::registry::NODES_DRAIN.to_owned(),
    ]);
    allowed.rejections([Origin::History, Origin::Audit]);
    // Counting its own replicas (each takes its share of the rate limits).
    allowed.publish([format!("$SRV.PING.{API_SERVICE}")]);
    allowed.open_mesh();
    for bucket in [
        &topology::JOBS,
        &topology::IDEMPOTENCY,
        &topology::REVOCATIONS,
    ] {
        allowed.bucket_write(bucket, "*");
        allowed.bucket_read(bucket, "*");
    }
    allowed.bucket_read(&topology::NODES, "*");
    // Listing nodes reads the whole bucket through a consumer of its own.
    allowed.bucket_watch(&topology::NODES);
    allowed.bucket_watch(&topology::REVOCATIONS);
    // Following a job's output watches its record.
    allowed.bucket_watch(&topology::JOBS);
    allowed.stream_read(&topology::LOGS, subjects::LOGS_ALL);
    allowed.stream_watch(&topology::LOGS);
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
    allowed.publish([subjects::LOGS_ALL, subjects::TIMERS_ALL]);
    allowed.rejections([Origin::Dispatch, Origin::Control]);
    allowed.open_mesh();
    allowed.bucket_write(&topology::JOBS, "*");
    allowed.bucket_read(&topology::JOBS, "*");
    allowed.bucket_read(&topology::NODES, node.as_str());
    allowed.durable(&topology::executor_consumer_spec(node, 1));
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

    /// Reading the entries of `bucket` whose keys match `keys` (a key or `*`).
    fn bucket_read(&mut self, bucket: &BucketSpec, keys: &str) {
        let stream = kv_stream(bucket);
        let key = subjects::kv_key(bucket.name, keys);
        self.publish([js_api(&format!("DIRECT.GET.{stream}.{key}"))]);
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
    fn the_client_may_only_submit_cancel_and_read_events_and_logs() {
        let permissions = Identity::Client.permissions().expect("restricted");
        assert_eq!(
            permissions.publish,
            [subjects::SUBMIT, subjects::CREATE, subjects::CANCEL]
        );
        assert_eq!(
            permissions.subscribe,
            [subjects::EVENTS_ALL, subjects::LOGS_ALL, "_INBOX.>"]
        );
        assert!(!permissions.answers);
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
        assert!(may_publish(&exec, &subjects::logs(job)));
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
