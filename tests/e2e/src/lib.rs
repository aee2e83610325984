//! The end-to-end harness: a real nats-server and the Capstan service binaries, each a
//! separate process with its own log, started and stopped (gracefully, or with kill -9) by
//! the tests. On a failing test the logs of every process are printed.
//!
//! [`schemas`] renders the files under `schemas/` that are generated from the code.

pub mod faults;
pub mod schemas;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use capstan_mesh::Mesh;
use capstan_mesh::identities::{self, Identities, Identity};
use capstan_protocol::{JobId, JobRecord, NodeId, NodeStatus};
use capstan_testkit::{NatsOptions, NatsServer, ServiceProcess, wait_until};
use nix::sys::signal::Signal;

/// A mesh of service processes.
pub struct Cluster {
    /// The server.
    pub nats: NatsServer,
    dir: tempfile::TempDir,
    processes: Vec<ServiceProcess>,
    mesh: Option<Mesh>,
    shared_env: Vec<(String, String)>,
    admin_token: Option<String>,
    identities: Identities,
    nodes: Vec<NodeId>,
    violations_expected: bool,
}

/// The executor nodes every cluster has identities for from the start; another node's is
/// added when its executor starts.
const NODES: [&str; 8] = [
    "exec-1", "exec-2", "exec-3", "exec-4", "exec-5", "exec-6", "exec-7", "exec-8",
];

/// The nodes whose identities are gateways' (may read the remote systems' catalogue): a test
/// runs its gateways (`capstan.io/ssh=true`) under these names; the others are plain
/// executors, whose identities may not.
pub const GATEWAYS: [&str; 4] = ["exec-1", "exec-2", "exec-3", "exec-4"];

/// What nats-server logs when it refuses a publish or a subscription for want of permission.
pub const VIOLATION: &str = "Violation";

/// What nats-server logs as it starts.
const STARTING: &str = "Starting nats-server";

/// Heartbeat settings that make liveness tests quick.
pub const HEARTBEAT_INTERVAL: &str = "300ms";
/// See [`HEARTBEAT_INTERVAL`].
pub const HEARTBEAT_TIMEOUT: &str = "3s";

impl Cluster {
    /// A server and nothing else yet. The server admits only the mesh's identities, each with
    /// the permissions `capstan nats init` gives it; the administrator has applied the
    /// topology, and each service process connects as its own identity. The harness's own
    /// client is the administrator. A test that passes while the server refused anything to
    /// anyone fails when the cluster is dropped, unless it said it expects refusals
    /// ([`Cluster::expect_violations`]).
    pub async fn start() -> Self {
        remember_panics();
        let dir = tempfile::Builder::new()
            .prefix("capstan-e2e-")
            .tempdir()
            .expect("a directory for logs and side effects");
        let nodes: Vec<NodeId> = NODES
            .iter()
            .map(|n| NodeId::new(*n).expect("a valid node id"))
            .collect();
        let identities = write_identities(&dir.path().join("identities"), &nodes);
        let nats = NatsServer::start_with(NatsOptions {
            include: Some(identities.accounts.clone()),
            connect_seed: Some(read_seed(&identities, &Identity::Admin)),
            ..NatsOptions::default()
        })
        .await;
        let js = async_nats::jetstream::new(nats.client().await);
        capstan_mesh::topology::apply(&js, &Default::default())
            .await
            .expect("the administrator applies the topology");
        Self {
            nats,
            dir,
            processes: Vec::new(),
            mesh: None,
            shared_env: Vec::new(),
            admin_token: None,
            identities,
            nodes,
            violations_expected: false,
        }
    }

    /// The viewer identity every test mesh has beside `client`: it may only follow jobs.
    pub fn viewer() -> Identity {
        Identity::Viewer(identities::ClientName::new("viewer").expect("a valid name"))
    }

    /// The mesh's identities: their seed files and the server's accounts block.
    pub fn identities(&self) -> &Identities {
        &self.identities
    }

    /// The NKEY seed of `identity`.
    pub fn seed(&self, identity: &Identity) -> String {
        read_seed(&self.identities, identity)
    }

    /// Says the test provokes refusals from the server, so their presence in its log does not
    /// fail the test.
    pub fn expect_violations(&mut self) {
        self.violations_expected = true;
    }

    /// The refusals the server logged so far.
    pub fn violations(&self) -> Vec<String> {
        self.nats
            .log()
            .lines()
            .filter(|line| line.contains(VIOLATION))
            .map(str::to_owned)
            .collect()
    }

    /// The refusals a correct mesh never causes: all of them but the replies refused after the
    /// server restarted (a server forgets, with its connections, which requests each service
    /// received, so an answer to a request made before the restart is refused; its asker had
    /// lost it anyway).
    fn unexpected_violations(&self) -> Vec<String> {
        let mut starts = 0;
        let mut found = Vec::new();
        for line in self.nats.log().lines() {
            if line.contains(STARTING) {
                starts += 1;
            }
            let restarted = starts > 1;
            if !line.contains(VIOLATION) {
                continue;
            }
            let reply = ["\"_INBOX.", "\"_CAPSTAN_INBOX."]
                .iter()
                .any(|prefix| line.contains(&format!("Publish Violation - Subject {prefix}")));
            if !(restarted && reply) {
                found.push(line.to_owned());
            }
        }
        found
    }

    /// The credentials variable for `identity`.
    fn creds(&self, identity: &Identity) -> (&'static str, String) {
        (
            "CAPSTAN_NATS_CREDS",
            self.identities.seed_file(identity).display().to_string(),
        )
    }

    /// The working directory of this test: logs, executor work dirs, side-effect files.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    fn env(&self, extra: &[(&str, String)]) -> Vec<(String, String)> {
        let mut env = vec![
            ("CAPSTAN_NATS_URL".to_owned(), self.nats.url()),
            (
                "CAPSTAN_HEARTBEAT_TIMEOUT".to_owned(),
                HEARTBEAT_TIMEOUT.to_owned(),
            ),
            (
                "CAPSTAN_HEARTBEAT_INTERVAL".to_owned(),
                HEARTBEAT_INTERVAL.to_owned(),
            ),
        ];
        env.extend(self.shared_env.iter().cloned());
        env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        env
    }

    /// Sets `key` in the environment of every process started from now on.
    pub fn set_env(&mut self, key: &str, value: impl Into<String>) {
        self.shared_env.push((key.to_owned(), value.into()));
    }

    /// Starts an API process named `name` on a free port, with its history in a SQLite file of
    /// its own, and returns its base URL once it is ready. Every API of a cluster shares the
    /// signing key and the first administrator's password, so [`Cluster::http`] works on each.
    pub async fn api(&mut self, name: &str) -> String {
        self.api_with(name, &[]).await
    }

    /// Like [`Cluster::api`], with `extra` variables: each replaces the default of its name,
    /// and an empty value removes it.
    pub async fn api_with(&mut self, name: &str, extra: &[(&str, String)]) -> String {
        let port = capstan_testkit::server::free_port();
        let data = self.dir.path().join("data").join(name);
        let mut vars = vec![
            self.creds(&Identity::Api),
            ("CAPSTAN_API_LISTEN", format!("127.0.0.1:{port}")),
            ("CAPSTAN_DATA_DIR", data.display().to_string()),
            ("CAPSTAN_JWT_KEY", capstan_api::TEST_JWT_KEY.to_owned()),
            (
                "CAPSTAN_ADMIN_PASSWORD",
                capstan_api::TEST_ADMIN_PASSWORD.to_owned(),
            ),
            // Load tests submit thousands of jobs as one principal, and long runs outlive the
            // default token lifetime; the tests of the limits set their own.
            ("CAPSTAN_RATE_LIMIT", "0".to_owned()),
            ("CAPSTAN_ACCESS_TOKEN_TTL", "24h".to_owned()),
        ];
        // An extra variable replaces the default of the same name; an empty one removes it.
        vars.retain(|(key, _)| !extra.iter().any(|(k, _)| k == key));
        vars.extend(
            extra
                .iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| (*k, v.clone())),
        );
        let env = self.env(&vars);
        let process = ServiceProcess::spawn(name, "capstan-api", &[], &env, self.dir.path());
        self.processes.push(process);
        let base = format!("http://127.0.0.1:{port}");
        let http = capstan_testkit::http::HttpClient::new(base.clone());
        wait_until(
            &format!("{name} to be ready"),
            Duration::from_secs(60),
            || async {
                http.try_get("/readyz")
                    .await
                    .ok()
                    .filter(|reply| reply.status.is_success())
            },
        )
        .await;
        let default_credentials = !extra
            .iter()
            .any(|(k, _)| matches!(*k, "CAPSTAN_JWT_KEY" | "CAPSTAN_ADMIN_PASSWORD"));
        if self.admin_token.is_none() && default_credentials {
            let admin = http.login("admin", capstan_api::TEST_ADMIN_PASSWORD).await;
            self.admin_token = admin.bearer().map(str::to_owned);
        }
        base
    }

    /// A client of the API at `base`, logged in as the first administrator.
    pub fn http(&self, base: &str) -> capstan_testkit::http::HttpClient {
        let http = capstan_testkit::http::HttpClient::new(base);
        match &self.admin_token {
            Some(token) => http.with_bearer(token.clone()),
            None => panic!("no API of this cluster has been started yet"),
        }
    }

    /// Starts a registry process named `name`.
    pub fn registry(&mut self, name: &str) {
        let env = self.env(&[self.creds(&Identity::Registry)]);
        let process = ServiceProcess::spawn(name, "capstan-registry", &[], &env, self.dir.path());
        self.processes.push(process);
    }

    /// Starts a scheduler process named `name`.
    pub fn scheduler(&mut self, name: &str) {
        let env = self.env(&[self.creds(&Identity::Scheduler)]);
        let process = ServiceProcess::spawn(name, "capstan-scheduler", &[], &env, self.dir.path());
        self.processes.push(process);
    }

    /// Starts an executor process for `node` with `slots` and `labels` (`key=value`).
    pub fn executor(&mut self, node: &str, slots: u32, labels: &[&str]) {
        let id = NodeId::new(node).expect("a valid node id");
        if !self.nodes.contains(&id) {
            // A new node: its identity is added and the server reloads its accounts;
            // the executor keeps trying to connect until the server knows it.
            self.nodes.push(id.clone());
            self.identities = write_identities(&self.dir.path().join("identities"), &self.nodes);
            self.nats.request_reload();
        }
        let work = self.dir.path().join("work").join(node);
        let mut extra = vec![
            self.creds(&Identity::Executor(id)),
            ("CAPSTAN_NODE_ID", node.to_owned()),
            ("CAPSTAN_SLOTS", slots.to_string()),
            ("CAPSTAN_WORK_DIR", work.display().to_string()),
            ("CAPSTAN_KILL_GRACE", "1s".to_owned()),
        ];
        if !labels.is_empty() {
            extra.push(("CAPSTAN_LABELS", labels.join(",")));
        }
        let env = self.env(&extra);
        let process = ServiceProcess::spawn(node, "capstan-executor", &[], &env, self.dir.path());
        self.processes.push(process);
    }

    /// The process named `name` (the latest, if it was restarted).
    pub fn process(&mut self, name: &str) -> &mut ServiceProcess {
        self.processes
            .iter_mut()
            .rev()
            .find(|p| p.name() == name)
            .unwrap_or_else(|| panic!("no process {name}"))
    }

    /// The log of the process named `name` so far (the latest, if it was restarted).
    pub fn process_log(&self, name: &str) -> String {
        self.processes
            .iter()
            .rev()
            .find(|p| p.name() == name)
            .map(ServiceProcess::log)
            .unwrap_or_else(|| panic!("no process {name}"))
    }

    /// Kills `name` with SIGKILL (no chance to clean up) and reaps it. Its log stays for the
    /// failure report; starting a process of the same name again appends to a new log.
    pub fn kill9(&mut self, name: &str) {
        let process = self.process(name);
        process.signal(Signal::SIGKILL);
        process.kill();
    }

    /// A connected client.
    pub async fn client(&self) -> async_nats::Client {
        self.nats.client().await
    }

    /// The mesh, for reading buckets.
    pub async fn mesh(&mut self) -> Mesh {
        if self.mesh.is_none() {
            let mesh = Mesh::open(self.nats.client().await)
                .await
                .expect("mesh opens");
            self.mesh = Some(mesh);
        }
        self.mesh.clone().expect("opened")
    }

    /// Waits until `nodes` are registered and up.
    pub async fn wait_nodes_up(&mut self, nodes: &[&str]) {
        for node in nodes {
            self.wait_node_status(node, NodeStatus::Up).await;
        }
    }

    /// Waits until `node` has `status` in the nodes bucket.
    pub async fn wait_node_status(&mut self, node: &str, status: NodeStatus) {
        let mesh = self.mesh().await;
        wait_until(
            &format!("node {node} to be {status}"),
            Duration::from_secs(60),
            || async {
                mesh.nodes
                    .get(node)
                    .await
                    .ok()
                    .flatten()
                    .filter(|n| n.value.status == status)
            },
        )
        .await;
    }

    /// The record of `job`, if it exists.
    pub async fn job(&mut self, job: JobId) -> Option<JobRecord> {
        let mesh = self.mesh().await;
        mesh.jobs
            .get(&job.to_string())
            .await
            .expect("read the jobs bucket")
            .map(|v| v.value)
    }

    /// Waits until every job in `jobs` is terminal and returns their records.
    pub async fn wait_terminal(&mut self, jobs: &[JobId], timeout: Duration) -> Vec<JobRecord> {
        let mesh = self.mesh().await;
        let mut done: HashMap<JobId, JobRecord> = HashMap::new();
        let deadline = std::time::Instant::now() + timeout;
        while done.len() < jobs.len() {
            let missing: Vec<JobId> = jobs
                .iter()
                .filter(|j| !done.contains_key(j))
                .copied()
                .collect();
            for job in missing {
                if let Some(record) = mesh
                    .jobs
                    .get(&job.to_string())
                    .await
                    .ok()
                    .flatten()
                    .map(|v| v.value)
                    .filter(|r| r.status.is_terminal())
                {
                    done.insert(job, record);
                }
            }
            if done.len() == jobs.len() {
                break;
            }
            if std::time::Instant::now() >= deadline {
                let mut stuck = Vec::new();
                for job in jobs.iter().filter(|j| !done.contains_key(j)).take(5) {
                    let record = mesh.jobs.get(&job.to_string()).await.ok().flatten();
                    stuck.push(format!("{job}: {:?}", record.map(|r| r.value)));
                }
                stuck.push(self.dispatch_state().await);
                panic!(
                    "timed out after {timeout:?}: {} of {} jobs finished; some unfinished:\n{}",
                    done.len(),
                    jobs.len(),
                    stuck.join("\n")
                );
            }
            tokio::time::sleep(capstan_testkit::POLL_INTERVAL).await;
        }
        jobs.iter().map(|j| done[j].clone()).collect()
    }

    /// The dispatch stream's and its consumers' state, for failure reports.
    pub async fn dispatch_state(&self) -> String {
        let js = async_nats::jetstream::new(self.nats.client().await);
        let Ok(mut stream) = js.get_stream("CAPSTAN_DISPATCH").await else {
            return "no dispatch stream".into();
        };
        let mut report = match stream.info().await {
            Ok(info) => format!("dispatch stream: {:?}\n", info.state),
            Err(e) => format!("dispatch stream info failed: {e}\n"),
        };
        let names: Vec<String> = futures::TryStreamExt::try_collect(stream.consumer_names())
            .await
            .unwrap_or_default();
        for name in names {
            if let Ok(mut consumer) = stream
                .get_consumer::<async_nats::jetstream::consumer::pull::Config>(&name)
                .await
                && let Ok(info) = consumer.info().await
            {
                report.push_str(&format!(
                        "{name}: pending {} ack_pending {} redelivered {} waiting {} delivered {:?} ack_floor {:?}\n",
                        info.num_pending,
                        info.num_ack_pending,
                        info.num_redelivered,
                        info.num_waiting,
                        info.delivered,
                        info.ack_floor
                    ));
            }
        }
        report
    }

    /// A file jobs append their id to; each line is one real run.
    pub fn runs_file(&self) -> PathBuf {
        self.dir.path().join("runs.log")
    }

    /// How many times each job id appears in the runs file.
    pub fn runs(&self) -> HashMap<String, usize> {
        let text = std::fs::read_to_string(self.runs_file()).unwrap_or_default();
        let mut runs = HashMap::new();
        for line in text.lines().filter(|l| !l.is_empty()) {
            *runs.entry(line.to_owned()).or_insert(0) += 1;
        }
        runs
    }

    /// A shell command that records one run of its job, then runs `rest`.
    pub fn recording(&self, rest: &str) -> String {
        format!(
            "echo $CAPSTAN_JOB_ID >> {}; {rest}",
            self.runs_file().display()
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !std::thread::panicking() && !self.violations_expected {
            let violations = self.unexpected_violations();
            assert!(
                violations.is_empty(),
                "the server refused what a service or the harness asked for:\n{}",
                violations.join("\n")
            );
        }
        if std::thread::panicking() && std::env::var_os("CAPSTAN_E2E_KEEP").is_some() {
            let kept = self.dir.path().to_path_buf();
            eprintln!("keeping logs and work files in {}", kept.display());
            std::mem::forget(std::mem::replace(
                &mut self.dir,
                tempfile::tempdir().expect("a placeholder directory"),
            ));
        }
        if std::thread::panicking() {
            eprintln!("==== nats-server log (tail) ====");
            let log = self.nats.log();
            let lines: Vec<&str> = log.lines().collect();
            for line in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("{line}");
            }
            for process in &self.processes {
                eprintln!("==== {} log (tail) ====", process.name());
                let log = process.log();
                // A backtrace's frames would push the error they follow out of the tail.
                let lines: Vec<&str> = log.lines().filter(|line| !backtrace_frame(line)).collect();
                for line in &lines[lines.len().saturating_sub(60)..] {
                    eprintln!("{line}");
                }
            }
            // The logs above are long: say once more, last, what failed.
            eprintln!("==== the failure, again ====");
            for failure in panics_so_far() {
                eprintln!("{failure}");
            }
        }
    }
}

/// Whether `line` is a frame of a printed backtrace (`  12: name` or `      at file:line`).
fn backtrace_frame(line: &str) -> bool {
    let trimmed = line.trim_start();
    let indented = trimmed.len() < line.len();
    indented
        && (trimmed.starts_with("at ")
            || trimmed
                .split_once(": ")
                .is_some_and(|(number, _)| number.parse::<u32>().is_ok()))
}

thread_local! {
    static PANICS: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Installs (once per test binary) a panic hook that keeps the messages and locations of the
/// panics on each thread (a test's spawned tasks run on its thread, so a task's panic is kept
/// next to the one that reported it), then does what the previous hook did.
fn remember_panics() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(a panic without a message)".to_owned());
            let location = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            PANICS.with(|panics| {
                panics
                    .borrow_mut()
                    .push(format!("at {location}: {message}"))
            });
            previous(info);
        }));
    });
}

/// The identities of a mesh of `nodes`, with [`Cluster::viewer`], written into `dir`; the
/// nodes in [`GATEWAYS`] are gateways to remote systems.
fn write_identities(dir: &std::path::Path, nodes: &[NodeId]) -> Identities {
    let gateways: Vec<NodeId> = nodes
        .iter()
        .filter(|node| GATEWAYS.contains(&node.as_str()))
        .cloned()
        .collect();
    let mut all = Identity::all_with_gateways(nodes, &gateways);
    all.push(Cluster::viewer());
    identities::init_with(dir, &all, identities::Grants::Least).expect("the mesh's identities")
}

/// The seed in `identity`'s file.
fn read_seed(identities: &Identities, identity: &Identity) -> String {
    std::fs::read_to_string(identities.seed_file(identity))
        .expect("a seed file")
        .trim()
        .to_owned()
}

fn panics_so_far() -> Vec<String> {
    PANICS.with(|panics| panics.borrow().clone())
}

/// Adds `host` to the catalogue as the system `name` (a password login, its key pinned) through
/// the API at `http`: the remote system of the gateway tests.
pub async fn add_ssh_system(
    http: &capstan_testkit::http::HttpClient,
    name: &str,
    host: &capstan_testkit::sshd::SshHost,
) {
    let system = serde_json::json!({
        "name": name,
        "hostname": "127.0.0.1",
        "port": host.port(),
        "username": capstan_testkit::sshd::LOGIN_USER,
        "auth": {"method": "password", "password": host.password()},
        "host_key": host.host_key(),
    });
    let added = http.post_json("/api/v1/systems", &system.to_string()).await;
    assert_eq!(added.status.as_u16(), 201, "{}", added.text());
}
