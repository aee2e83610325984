//! The end-to-end harness: a real nats-server (or a cluster of three) and the Capstan service
//! binaries, each a separate process with its own log, started and stopped (gracefully, or with
//! kill -9) by the tests. On a failing test the logs of every process are printed.
//!
//! [`schemas`] renders the files under `schemas/` that are generated from the code;
//! [`browser`] drives a headless Chromium for the dashboard's tests.

pub mod browser;
pub mod faults;
pub mod schemas;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use capstan_mesh::Mesh;
use capstan_mesh::identities::{self, Identities, Identity};
use capstan_protocol::{JobId, JobRecord, NodeId, NodeStatus};
use capstan_testkit::{NatsCluster, NatsOptions, NatsServer, ServiceProcess, wait_until};
use nix::sys::signal::Signal;

/// A mesh of service processes.
pub struct Cluster {
    /// The server (the first of a NATS cluster's).
    pub nats: NatsServer,
    /// The NATS cluster's other servers, if it has any.
    peers: Vec<NatsServer>,
    /// Whether the test killed a server of the NATS cluster (see
    /// [`Cluster::unexpected_violations`]).
    nats_killed: bool,
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
        let cluster = Self::prepare(1).await;
        let js = async_nats::jetstream::new(cluster.client().await);
        capstan_mesh::topology::apply(&js, &Default::default())
            .await
            .expect("the administrator applies the topology");
        cluster
    }

    /// Like [`Cluster::start`] on a NATS cluster of `servers` servers (three at least), routed
    /// together on loopback, each with its own store; every process is given all their URLs.
    /// The topology is the test's to apply ([`Cluster::capstan`] `nats apply`): none exists yet.
    pub async fn start_clustered(servers: usize) -> Self {
        Self::prepare(servers).await
    }

    /// The servers (one, or a cluster of `servers`) admitting the mesh's identities, and the
    /// rest of the harness.
    async fn prepare(servers: usize) -> Self {
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
        let options = NatsOptions {
            include: Some(identities.accounts.clone()),
            connect_seed: Some(read_seed(&identities, &Identity::Admin)),
            ..NatsOptions::default()
        };
        let (nats, peers) = if servers <= 1 {
            (NatsServer::start_with(options).await, Vec::new())
        } else {
            let mut all = NatsCluster::start_with(options, servers)
                .await
                .into_servers();
            let first = all.remove(0);
            (first, all)
        };
        Self {
            nats,
            peers,
            nats_killed: false,
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

    /// The refusals the servers logged so far.
    pub fn violations(&self) -> Vec<String> {
        self.servers()
            .flat_map(|server| {
                server
                    .log()
                    .lines()
                    .filter(|line| line.contains(VIOLATION))
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Every NATS server: the first, then the cluster's others.
    fn servers(&self) -> impl Iterator<Item = &NatsServer> {
        std::iter::once(&self.nats).chain(&self.peers)
    }

    /// The URLs of every NATS server, comma separated: what each process is given.
    pub fn nats_urls(&self) -> String {
        self.servers()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// NATS server number `index` (0 is [`Cluster::nats`]).
    pub fn nats_server(&mut self, index: usize) -> &mut NatsServer {
        match index {
            0 => &mut self.nats,
            other => &mut self.peers[other - 1],
        }
    }

    /// Kills NATS server number `index` with SIGKILL; its store stays.
    pub fn kill_nats(&mut self, index: usize) {
        self.nats_killed = true;
        self.nats_server(index).kill();
    }

    /// Starts NATS server number `index` again on its ports with its store, and waits until it
    /// answers JetStream (in a cluster: until it has rejoined the others).
    pub async fn restart_nats(&mut self, index: usize) {
        self.nats_killed = true;
        self.nats_server(index).restart().await;
        if !self.peers.is_empty() {
            let size = self.peers.len() + 1;
            let server = self.nats_server(index);
            let (url, options) = (server.url(), server.options().clone());
            wait_until(
                "the restarted server to rejoin its cluster",
                Duration::from_secs(60),
                || {
                    let (url, options) = (url.clone(), options.connect_options());
                    async move {
                        let client = options.connect(url).await.ok()?;
                        (client.server_info().connect_urls.len() >= size).then_some(())
                    }
                },
            )
            .await;
        }
    }

    /// Runs the `capstan` command with `args` as the administrator, on every NATS server's URL,
    /// and returns its output; panics, showing it, when it fails.
    pub fn capstan(&self, args: &[&str]) -> std::process::Output {
        let output = std::process::Command::new(capstan_testkit::bin_path("capstan"))
            .args(args)
            .env("CAPSTAN_NATS_URL", self.nats_urls())
            .env(
                self.creds(&Identity::Admin).0,
                self.creds(&Identity::Admin).1,
            )
            .env_remove("CAPSTAN_NATS_REPLICAS")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("capstan runs");
        assert!(
            output.status.success(),
            "capstan {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    /// The refusals a correct mesh never causes: all of them but the replies refused after the
    /// server restarted (a server forgets, with its connections, which requests each service
    /// received, so an answer to a request made before the restart is refused; its asker had
    /// lost it anyway). In a NATS cluster, once a server was killed, its clients answer through
    /// another server, which never saw the request: such replies are refused on any server.
    fn unexpected_violations(&self) -> Vec<String> {
        let mut found = Vec::new();
        for server in self.servers() {
            found.extend(self.unexpected_violations_of(server));
        }
        found
    }

    fn unexpected_violations_of(&self, server: &NatsServer) -> Vec<String> {
        let mut starts = 0;
        let mut found = Vec::new();
        let moved = !self.peers.is_empty() && self.nats_killed;
        for line in server.log().lines() {
            if line.contains(STARTING) {
                starts += 1;
            }
            let restarted = starts > 1 || moved;
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
            ("CAPSTAN_NATS_URL".to_owned(), self.nats_urls()),
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
            for peer in &mut self.peers {
                peer.request_reload();
            }
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

    /// A connected client (of every server of a NATS cluster: it moves to another when its
    /// server goes away).
    pub async fn client(&self) -> async_nats::Client {
        if self.peers.is_empty() {
            return self.nats.client().await;
        }
        let addresses: Vec<async_nats::ServerAddr> = self
            .servers()
            .map(|server| server.url().parse().expect("a server address"))
            .collect();
        self.nats
            .options()
            .connect_options()
            .connect(addresses)
            .await
            .expect("connect to the test NATS cluster")
    }

    /// The mesh, for reading buckets.
    pub async fn mesh(&mut self) -> Mesh {
        if self.mesh.is_none() {
            let mesh = Mesh::open(self.client().await).await.expect("mesh opens");
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
        let js = async_nats::jetstream::new(self.client().await);
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
            for server in self.servers() {
                eprintln!("==== nats-server {} log (tail) ====", server.name());
                let log = server.log();
                let lines: Vec<&str> = log.lines().collect();
                for line in &lines[lines.len().saturating_sub(40)..] {
                    eprintln!("{line}");
                }
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
