//! Every subject Capstan publishes or consumes. Services call these builders and never format
//! a subject themselves; because ids are validated types, every built subject is valid.

use crate::auth::AuditAction;
use crate::event::{JobEventKind, NodeEventKind};
use crate::ids::{JobId, NodeId};

/// Job submissions (JSON or MessagePack job spec), stored in the submissions stream. Fire and
/// forget: `nats pub capstan.jobs.submit '{"command": "echo hello"}'`.
pub const SUBMIT: &str = "capstan.jobs.submit";

/// Job submissions from client identities, each on `capstan.jobs.submit.from.<client>` (see
/// [`ClientCall`]); the submissions stream holds them beside [`SUBMIT`].
pub const SUBMIT_FROM_ALL: &str = "capstan.jobs.submit.from.*";

/// Job submissions the mesh stores itself (the API's, the create endpoint's), each on
/// `capstan.jobs.submit.job.<job>`, so that an accepted job can be found by its id before a
/// scheduler has created its record.
pub const SUBMIT_JOB_ALL: &str = "capstan.jobs.submit.job.*";

/// The subject of the stored submission of job `id`.
pub fn submit_job(id: JobId) -> String {
    format!("capstan.jobs.submit.job.{id}")
}

/// Submissions handed on to the schedulers for placement, each on
/// `capstan.jobs.place.<job>`: the submissions stream holds them beside the submitted ones, and
/// the schedulers' intake reads them with the job's id, sender and submission time in headers
/// (see `capstan_mesh::intake::forward`).
pub const PLACE_ALL: &str = "capstan.jobs.place.*";

/// The subject of job `id`'s submission handed on for placement.
pub fn place_job(id: JobId) -> String {
    format!("capstan.jobs.place.{id}")
}

/// Whether `subject` is a placement subject, whatever its last token holds.
pub fn is_place(subject: &str) -> bool {
    subject.starts_with("capstan.jobs.place.")
}

/// The job a placement subject names.
pub fn parse_place(subject: &str) -> Option<JobId> {
    subject.strip_prefix("capstan.jobs.place.")?.parse().ok()
}

/// Request/reply job creation: replies with the new job's id once the submission is stored.
pub const CREATE: &str = "capstan.jobs.create";

/// Every dispatch subject (the dispatch stream's subjects).
pub const DISPATCH_ALL: &str = "capstan.dispatch.*";

/// The dispatches of one executor node.
pub fn dispatch(node: &NodeId) -> String {
    format!("capstan.dispatch.{node}")
}

/// Every event: jobs, nodes, rejections (the events stream's subjects).
pub const EVENTS_ALL: &str = "capstan.events.>";

/// Every job event.
pub const JOB_EVENTS_ALL: &str = "capstan.events.jobs.>";

/// One event of one job.
pub fn job_event(job: JobId, kind: JobEventKind) -> String {
    format!("capstan.events.jobs.{job}.{kind}")
}

/// Every event of one job.
pub fn job_events(job: JobId) -> String {
    format!("capstan.events.jobs.{job}.*")
}

/// Events of one kind, across jobs.
pub fn job_events_of_kind(kind: JobEventKind) -> String {
    format!("capstan.events.jobs.*.{kind}")
}

/// The job id and event kind of a job event subject.
pub fn parse_job_event(subject: &str) -> Option<(JobId, &str)> {
    let rest = subject.strip_prefix("capstan.events.jobs.")?;
    let (job, kind) = rest.split_once('.')?;
    Some((job.parse().ok()?, kind))
}

/// Every node event.
pub const NODE_EVENTS_ALL: &str = "capstan.events.nodes.>";

/// One event of one node.
pub fn node_event(node: &NodeId, kind: NodeEventKind) -> String {
    format!("capstan.events.nodes.{node}.{kind}")
}

/// The node id and event kind of a node event subject.
pub fn parse_node_event(subject: &str) -> Option<(&str, &str)> {
    let rest = subject.strip_prefix("capstan.events.nodes.")?;
    rest.split_once('.')
}

/// Where a rejected message was consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// The submissions consumer.
    Submit,
    /// The create endpoint.
    Create,
    /// An executor's dispatch consumer.
    Dispatch,
    /// A registry endpoint.
    Registry,
    /// The API's history projection.
    History,
    /// The schedulers' consumer of fired timers.
    Timer,
    /// The schedulers' consumer of node events.
    Nodes,
    /// An executor's control commands (`capstan.control.<node>.>`).
    Control,
    /// The API's audit projection.
    Audit,
}

impl Origin {
    /// The subject token.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Submit => "submit",
            Self::Create => "create",
            Self::Dispatch => "dispatch",
            Self::Registry => "registry",
            Self::History => "history",
            Self::Timer => "timer",
            Self::Nodes => "nodes",
            Self::Control => "control",
            Self::Audit => "audit",
        }
    }
}

/// Every rejection.
pub const REJECTED_ALL: &str = "capstan.events.rejected.*";

/// Rejections of messages consumed at `origin`.
pub fn rejected(origin: Origin) -> String {
    format!("capstan.events.rejected.{}", origin.as_str())
}

/// Every job's output (the logs stream's subjects): `capstan.logs.<job>.<node>`.
pub const LOGS_ALL: &str = "capstan.logs.*.*";

/// One job's stdout and stderr as written by `node`, chunk by chunk as produced; the body is
/// the raw bytes and headers say which stream and attempt (see [`crate::headers`]). The node is
/// in the subject so that permissions bind output to its writer: a node may publish only under
/// its own name, and readers keep only the chunks of the node that ran each attempt.
pub fn logs(job: JobId, node: &NodeId) -> String {
    format!("capstan.logs.{job}.{node}")
}

/// All of one job's output, whichever node wrote it (to subscribe, or to filter a consumer).
pub fn job_logs(job: JobId) -> String {
    format!("capstan.logs.{job}.*")
}

/// Everything `node` may write as output: any job's, under its own name.
pub fn node_logs(node: &NodeId) -> String {
    format!("capstan.logs.*.{node}")
}

/// The job and the writing node of an output subject.
pub fn parse_logs(subject: &str) -> Option<(JobId, NodeId)> {
    let rest = subject.strip_prefix("capstan.logs.")?;
    let (job, node) = rest.split_once('.')?;
    Some((job.parse().ok()?, NodeId::new(node).ok()?))
}

/// Every audit record (the audit stream's subjects).
pub const AUDIT_ALL: &str = "capstan.audit.>";

/// The audit records of one action: `capstan.audit.auth.login`.
pub fn audit(action: AuditAction) -> String {
    format!("capstan.audit.{action}")
}

/// Every timer subject (the timers stream's subjects).
pub const TIMERS_ALL: &str = "capstan.timers.>";

/// The schedule of one job's timer: a message with a `Nats-Schedule` header, fired by the
/// server onto [`timer_due`]. One per job: setting it again replaces it.
pub fn timer_set(job: JobId) -> String {
    format!("capstan.timers.set.{job}")
}

/// Every fired timer (the schedulers' consumer).
pub const TIMERS_DUE_ALL: &str = "capstan.timers.due.*";

/// One job's fired timer.
pub fn timer_due(job: JobId) -> String {
    format!("capstan.timers.due.{job}")
}

/// The next tick of one schedule: a message with a `Nats-Schedule` header, fired by the
/// server onto [`schedule_tick`]. One per schedule: arming it again replaces it.
pub fn schedule_timer(schedule: &str) -> String {
    format!("capstan.timers.schedule.{schedule}")
}

/// Every schedule's armed tick.
pub const SCHEDULE_TIMERS_ALL: &str = "capstan.timers.schedule.*";

/// One schedule's fired tick.
pub fn schedule_tick(schedule: &str) -> String {
    format!("capstan.timers.tick.{schedule}")
}

/// Every fired tick (the schedulers' consumer).
pub const SCHEDULE_TICKS_ALL: &str = "capstan.timers.tick.*";

/// Every schedule event.
pub const SCHEDULE_EVENTS_ALL: &str = "capstan.events.schedules.>";

/// A schedule's tick handled (`capstan.events.schedules.<name>.<outcome>`).
pub fn schedule_event(schedule: &str, outcome: crate::schedule::TickOutcome) -> String {
    format!("capstan.events.schedules.{schedule}.{}", outcome.as_str())
}

/// Every workflow event.
pub const WORKFLOW_EVENTS_ALL: &str = "capstan.events.workflows.>";

/// Every workflow's own start and end, without its steps' events (which have more tokens):
/// [`workflow_event`]'s subjects.
pub const WORKFLOW_RUN_EVENTS_ALL: &str = "capstan.events.workflows.*.*";

/// A workflow started or ended (`capstan.events.workflows.<id>.<status>`).
pub fn workflow_event(workflow: JobId, status: crate::workflow::WorkflowStatus) -> String {
    format!("capstan.events.workflows.{workflow}.{}", status.as_str())
}

/// A workflow's step started or ended
/// (`capstan.events.workflows.<id>.steps.<step>.<status>`); step names are subject tokens.
pub fn workflow_step_event(
    workflow: JobId,
    step: &str,
    status: crate::workflow::StepStatus,
) -> String {
    format!(
        "capstan.events.workflows.{workflow}.steps.{step}.{}",
        status.as_str()
    )
}

/// The registry's request/reply endpoints.
pub mod registry {
    /// Endpoint group.
    pub const GROUP: &str = "capstan.registry";
    use crate::ids::NodeId;

    /// What an executor node asks of the registry about itself. Each call has a subject per
    /// node, so that the server's permissions let only that node's identity make it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum NodeCall {
        /// Registers (request: `Registration`, reply: `Reply<NodeRecord>`).
        Register,
        /// Heartbeats (request: `Heartbeat`, reply: `Reply<HeartbeatReply>`).
        Heartbeat,
        /// Leaves (request: `Heartbeat`, reply: `Reply<NodeRecord>`).
        Deregister,
    }

    impl NodeCall {
        /// Every call.
        pub const ALL: [NodeCall; 3] = [Self::Register, Self::Heartbeat, Self::Deregister];

        /// The subject token.
        pub fn as_str(self) -> &'static str {
            match self {
                Self::Register => "register",
                Self::Heartbeat => "heartbeat",
                Self::Deregister => "deregister",
            }
        }

        /// The call's subject for `node`: `capstan.registry.register.<node>`.
        pub fn subject(self, node: &NodeId) -> String {
            format!("capstan.registry.{}.{node}", self.as_str())
        }

        /// The call's subject for every node (what the registry serves).
        pub fn subject_all(self) -> String {
            format!("capstan.registry.{}.*", self.as_str())
        }

        /// The node a subject of this call names, if it is one.
        pub fn node_of(self, subject: &str) -> Option<NodeId> {
            let rest = subject
                .strip_prefix("capstan.registry.")?
                .strip_prefix(self.as_str())?
                .strip_prefix('.')?;
            NodeId::new(rest).ok()
        }
    }

    /// Lists nodes (any request body, reply: `Reply<Vec<NodeRecord>>`).
    pub const NODES_LIST: &str = "capstan.registry.nodes.list";
    /// Gets one node (request: `NodeQuery`, reply: `Reply<NodeRecord>`).
    pub const NODES_GET: &str = "capstan.registry.nodes.get";
    /// Stops new placements on a node (request: `NodeCommand`, reply: `Reply<NodeRecord>`).
    pub const NODES_CORDON: &str = "capstan.registry.nodes.cordon";
    /// Lets a cordoned, draining or drained node take work again (request: `NodeCommand`,
    /// reply: `Reply<NodeRecord>`).
    pub const NODES_UNCORDON: &str = "capstan.registry.nodes.uncordon";
    /// Drains a node: no new placements, running jobs finish or are handed back at the
    /// deadline (request: `NodeCommand`, reply: `Reply<NodeRecord>`).
    pub const NODES_DRAIN: &str = "capstan.registry.nodes.drain";
}

/// Request/reply job cancellation: `{"id": "<job>"}`.
pub const CANCEL: &str = "capstan.jobs.cancel";

/// Lists the remote systems, without credentials (request: anything, reply:
/// `Reply<Vec<SystemSummary>>`), answered by the API.
pub const SYSTEMS_LIST: &str = "capstan.systems.list";

/// Every system health change.
pub const SYSTEM_EVENTS_ALL: &str = "capstan.events.systems.>";

/// Every fan-out parent's events.
pub const FANOUT_EVENTS_ALL: &str = "capstan.events.fanouts.>";

/// The server's own request (not Capstan's) that every server of the cluster answers with its
/// statistics for the requester's account, each naming itself, its cluster and whether it runs
/// JetStream, when asked with `{"include_unused": true}`. Every account may ask it (the server
/// imports it from the system account into each); `capstan nats apply` counts the JetStream
/// servers by it to choose how many copies of each stream to keep.
pub const SERVER_ACCOUNT_STATS_PING: &str = "$SYS.REQ.ACCOUNT.PING.STATZ";

/// A fan-out parent started or ended (`capstan.events.fanouts.<job>.<status>`).
pub fn fanout_event(job: crate::ids::JobId, status: crate::fanout::FanOutStatus) -> String {
    format!("capstan.events.fanouts.{job}.{}", status.as_str())
}

/// A change of `system`'s health (`capstan.events.systems.<name>.<health>`).
pub fn system_event(system: &str, health: crate::system::SystemHealth) -> String {
    format!("capstan.events.systems.{system}.{health}")
}

/// What a client outside the mesh asks of it: submit, create or cancel a job, list systems.
///
/// A client identity publishes on the plain subject ([`SUBMIT`], [`CREATE`], [`CANCEL`]) in a
/// NATS account of its own, and the server carries the message into the mesh's account as
/// `<subject>.from.<client>` (a service import the administrator's configuration fixes). No
/// identity can publish on a `from` subject in the mesh's account, so the subject says who sent
/// the message, whatever its headers claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientCall {
    /// [`SUBMIT`].
    Submit,
    /// [`CREATE`].
    Create,
    /// [`CANCEL`].
    Cancel,
    /// [`SYSTEMS_LIST`].
    ListSystems,
}

impl ClientCall {
    /// Every call.
    pub const ALL: [ClientCall; 4] = [Self::Submit, Self::Create, Self::Cancel, Self::ListSystems];

    /// The subject a client publishes on, and the mesh's own services too.
    pub fn subject(self) -> &'static str {
        match self {
            Self::Submit => SUBMIT,
            Self::Create => CREATE,
            Self::Cancel => CANCEL,
            Self::ListSystems => SYSTEMS_LIST,
        }
    }

    /// The subject the call of `client` arrives on in the mesh's account.
    pub fn from(self, client: &str) -> String {
        format!("{}.from.{client}", self.subject())
    }

    /// The calls of every client.
    pub fn from_all(self) -> String {
        self.from("*")
    }

    /// The client whose call arrived on `subject`; `None` for the plain subject (a service of
    /// the mesh, or a server without identities) and for any other subject.
    pub fn client_of(self, subject: &str) -> Option<&str> {
        let client = subject
            .strip_prefix(self.subject())?
            .strip_prefix(".from.")?;
        (!client.is_empty() && !client.contains(['.', '*', '>'])).then_some(client)
    }
}

/// Whether the subject pattern `pattern` (a stream's subjects, a consumer's filter, a
/// permission) covers `subject`, token by token: `*` matches one token, a final `>` the rest.
pub fn covers(pattern: &str, subject: &str) -> bool {
    let mut pattern = pattern.split('.');
    let mut subject = subject.split('.');
    loop {
        match (pattern.next(), subject.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(p), Some(s)) if p == s => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The subject a KV bucket stores `key` under (`$KV.<bucket>.<key>`): what a write with
/// headers the KV client does not offer (a TTL on update) publishes to.
pub fn kv_key(bucket: &str, key: &str) -> String {
    format!("$KV.{bucket}.{key}")
}

/// Commands for one executor node (core NATS, not stored): the executor also finds cancelled
/// attempts by reading their records, so a missed command only delays the stop.
pub fn control(node: &NodeId, command: &str) -> String {
    format!("capstan.control.{node}.{command}")
}

/// One command for every node (what a canceller may send).
pub fn control_any(command: &str) -> String {
    format!("capstan.control.*.{command}")
}

/// Every command for one node.
pub fn control_all(node: &NodeId) -> String {
    format!("capstan.control.{node}.>")
}

/// Endpoints of each executor, one set per node.
pub mod executor {
    use crate::ids::NodeId;

    /// Lists the jobs this node holds (reply: `Reply<Vec<JobId>>`).
    pub fn jobs(node: &NodeId) -> String {
        format!("capstan.executor.{node}.jobs")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_call_subject_names_its_node_and_parses_back_to_it() {
        let node = NodeId::new("exec-1").expect("valid");
        for call in registry::NodeCall::ALL {
            let subject = call.subject(&node);
            assert_eq!(call.node_of(&subject), Some(node.clone()));
            assert!(subject.starts_with(call.subject_all().trim_end_matches('*')));
        }
        let register = registry::NodeCall::Register;
        assert_eq!(
            register.node_of(&registry::NodeCall::Heartbeat.subject(&node)),
            None
        );
        assert_eq!(register.node_of("capstan.registry.register"), None);
    }

    #[test]
    fn a_client_call_subject_names_its_client_and_the_plain_subject_names_none() {
        for call in ClientCall::ALL {
            let subject = call.from("alice");
            assert_eq!(call.client_of(&subject), Some("alice"));
            assert!(covers(&call.from_all(), &subject));
            assert_eq!(call.client_of(call.subject()), None);
            assert_eq!(call.client_of(&format!("{}.from.", call.subject())), None);
            assert_eq!(
                call.client_of(&format!("{}.from.a.b", call.subject())),
                None
            );
        }
        assert_eq!(
            ClientCall::Submit.client_of(&ClientCall::Cancel.from("alice")),
            None
        );
        assert_eq!(ClientCall::Submit.from_all(), SUBMIT_FROM_ALL);
    }

    #[test]
    fn an_output_subject_names_its_job_and_writer_and_parses_back_to_them() {
        let job = JobId::generate();
        let node = NodeId::new("exec-1").expect("valid");
        let subject = logs(job, &node);
        assert_eq!(parse_logs(&subject), Some((job, node.clone())));
        assert!(covers(&job_logs(job), &subject));
        assert!(covers(&node_logs(&node), &subject));
        assert!(covers(LOGS_ALL, &subject));
        let other = NodeId::new("exec-2").expect("valid");
        assert!(!covers(&node_logs(&other), &subject));
        assert_eq!(parse_logs(&format!("capstan.logs.{job}")), None);
    }

    #[test]
    fn job_event_subjects_parse_back_to_job_and_kind() {
        let job = JobId::generate();
        let subject = job_event(job, JobEventKind::TimedOut);
        assert_eq!(parse_job_event(&subject), Some((job, "timed_out")));
        assert_eq!(parse_job_event("capstan.events.nodes.n1.down"), None);
    }

    #[test]
    fn node_event_subjects_parse_back_to_node_and_kind() {
        let node = NodeId::new("exec-1").expect("valid");
        let subject = node_event(&node, NodeEventKind::Down);
        assert_eq!(parse_node_event(&subject), Some(("exec-1", "down")));
        assert_eq!(
            parse_node_event(&job_event(JobId::generate(), JobEventKind::Running)),
            None
        );
    }
}
