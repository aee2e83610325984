//! A real `nats-server` for one test: JetStream on, a free port on loopback, its own store
//! directory, killed and removed on drop; or [`NatsCluster`], three (or more) of them routed into
//! one JetStream cluster, each with its own ports and store, any of which a test may kill and
//! start again.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::tls::TlsFiles;
use crate::wait::POLL_INTERVAL;

/// Server settings a test may change.
#[derive(Debug, Clone, Default)]
pub struct NatsOptions {
    /// fsync every write (`sync_interval: always`), the durable mode.
    pub sync_always: bool,
    /// Largest message the server accepts, in bytes (default: the server's 1 MiB).
    pub max_payload: Option<usize>,
    /// NKEY user seeds: when any is given, only these users may connect (no anonymous
    /// connection), and the harness itself connects as the first.
    pub nkey_seeds: Vec<String>,
    /// Serve TLS only, with these files, and require a client certificate signed by their CA.
    pub tls: Option<TlsFiles>,
    /// A configuration file to include (an `accounts` block, say), copied beside the
    /// server's.
    pub include: Option<PathBuf>,
    /// The NKEY seed the harness connects with, when not the first of `nkey_seeds`.
    pub connect_seed: Option<String>,
}

impl NatsOptions {
    /// Connect options for this server: the first NKEY user, the TLS files' CA and client
    /// certificate.
    pub fn connect_options(&self) -> async_nats::ConnectOptions {
        let mut options = async_nats::ConnectOptions::new();
        if let Some(seed) = self.connect_seed.as_ref().or(self.nkey_seeds.first()) {
            options = options.nkey(seed.clone());
        }
        if let Some(tls) = &self.tls {
            options = options
                .require_tls(true)
                .add_root_certificates(tls.ca.clone())
                .add_client_certificate(tls.client_cert.clone(), tls.client_key.clone());
        }
        options
    }
}

/// A running server.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
    binary: PathBuf,
    options: NatsOptions,
    route: Option<Route>,
}

/// A clustered server's place in its cluster.
#[derive(Debug, Clone)]
struct Route {
    /// The cluster's name, the same on every server.
    cluster: String,
    /// This server's route port.
    port: u16,
    /// The other servers' route ports.
    peers: Vec<u16>,
}

impl NatsServer {
    /// Starts a server with default options and waits until JetStream answers.
    pub async fn start() -> Self {
        Self::start_with(NatsOptions::default()).await
    }

    /// Starts a server with `options` and waits until JetStream answers.
    pub async fn start_with(options: NatsOptions) -> Self {
        let mut server = Self::unstarted(options, None);
        for _ in 0..5 {
            server.port = free_port();
            if server.launch().await {
                return server;
            }
        }
        panic!("nats-server did not start:\n{}", server.log());
    }

    /// A server not started yet, with a store directory of its own.
    fn unstarted(options: NatsOptions, route: Option<Route>) -> Self {
        let binary = crate::natsbin::ensure().unwrap_or_else(|e| panic!("no nats-server: {e}"));
        let dir = tempfile::Builder::new()
            .prefix("capstan-nats-")
            .tempdir()
            .expect("a temporary directory for the server");
        Self {
            child: None,
            port: 0,
            dir,
            binary,
            options,
            route,
        }
    }

    /// The server's name, unique among the servers of its cluster.
    pub fn name(&self) -> String {
        format!("capstan-test-{}", self.port)
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The options it was started with.
    pub fn options(&self) -> &NatsOptions {
        &self.options
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// A connected client (as the first NKEY user, over TLS, when the server requires it).
    pub async fn client(&self) -> async_nats::Client {
        self.options
            .connect_options()
            .connect(self.url())
            .await
            .expect("connect to the test nats-server")
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Kills the server (SIGKILL) and waits for it to exit; its store stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server and starts it again on the same port with the same store.
    pub async fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.launch().await {
                return;
            }
        }
        panic!("nats-server did not restart:\n{}", self.log());
    }

    /// Rewrites the configuration (copying the included file again, as it is now) and has the
    /// running server reload it (SIGHUP), returning once the server has said it did.
    pub async fn reload(&mut self) {
        let before = self.log().matches(RELOADED).count();
        self.request_reload();
        crate::wait_until(
            "nats-server to reload its configuration",
            Duration::from_secs(30),
            || async { (self.log().matches(RELOADED).count() > before).then_some(()) },
        )
        .await;
    }

    /// Rewrites the configuration and signals the server to reload it, without waiting.
    pub fn request_reload(&mut self) {
        self.write_config();
        let pid = self.pid().expect("a running server");
        let pid = i32::try_from(pid).expect("a process id");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGHUP,
        )
        .expect("signal the server");
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    /// The store's limit is set, not left to the server: by default it is three quarters of
    /// the free disk, and the topology's streams and buckets reserve their limits (tens of
    /// GiB) however little a test writes, so a machine with less free disk would refuse them.
    fn write_config(&self) -> PathBuf {
        let path = self.dir.path().join("nats-server.conf");
        let mut config = format!(
            "listen: 127.0.0.1:{port}\nserver_name: {name}\n\
             jetstream {{\n  store_dir: {store:?}\n  max_file_store: 1TB\n{sync}}}\n",
            port = self.port,
            name = self.name(),
            store = self.store_dir(),
            sync = if self.options.sync_always {
                "  sync_interval: always\n"
            } else {
                ""
            },
        );
        if let Some(route) = &self.route {
            // Loopback routes, not authenticated: only this machine reaches them.
            let routes: Vec<String> = route
                .peers
                .iter()
                .map(|port| format!("    nats-route://127.0.0.1:{port}\n"))
                .collect();
            config.push_str(&format!(
                "cluster {{\n  name: {}\n  listen: 127.0.0.1:{}\n  routes: [\n{}  ]\n}}\n",
                route.cluster,
                route.port,
                routes.concat()
            ));
        }
        if let Some(max_payload) = self.options.max_payload {
            config.push_str(&format!("max_payload: {max_payload}\n"));
        }
        if !self.options.nkey_seeds.is_empty() {
            config.push_str("authorization {\n  users = [\n");
            for seed in &self.options.nkey_seeds {
                let user = nkeys::KeyPair::from_seed(seed).expect("a valid NKEY seed");
                config.push_str(&format!("    {{ nkey: {} }}\n", user.public_key()));
            }
            config.push_str("  ]\n}\n");
        }
        if let Some(include) = &self.options.include {
            // nats-server resolves an include beside the including file, even an absolute path.
            let local = self.dir.path().join("included.conf");
            std::fs::copy(include, &local).expect("copy the included configuration");
            config.push_str("include \"included.conf\"\n");
        }
        if let Some(tls) = &self.options.tls {
            config.push_str(&format!(
                "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n}}\n",
                tls.server_cert, tls.server_key, tls.ca
            ));
        }
        std::fs::write(&path, config).expect("write the server config");
        path
    }

    /// Starts the process and waits for JetStream; false if it exited (port taken).
    async fn launch(&mut self) -> bool {
        self.spawn();
        self.wait_ready(Instant::now() + Duration::from_secs(30))
            .await
    }

    /// Starts the process, without waiting for it.
    fn spawn(&mut self) {
        let config = self.write_config();
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the server log");
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::from(log.try_clone().expect("clone log handle")))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.binary.display()));
        self.child = Some(child);
    }

    /// Waits until the server answers a JetStream request (a clustered one: once the cluster
    /// has elected its leader); false if it exited (its port taken) or `deadline` passed, in
    /// which case it is killed.
    async fn wait_ready(&mut self, deadline: Instant) -> bool {
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                self.child = None;
                return false;
            }
            if jetstream_ready(&self.url(), self.options.connect_options()).await {
                return true;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        self.kill();
        false
    }
}

/// What nats-server logs once it has reloaded its configuration.
const RELOADED: &str = "Reloaded server configuration";

async fn jetstream_ready(url: &str, options: async_nats::ConnectOptions) -> bool {
    let Ok(client) = options
        .connection_timeout(Duration::from_secs(1))
        .connect(url)
        .await
    else {
        return false;
    };
    let js = async_nats::jetstream::new(client);
    js.query_account().await.is_ok()
}

/// Servers routed into one JetStream cluster on loopback: each with its own client and route
/// port and its own store, every stream placed by the cluster. Killed and removed on drop.
pub struct NatsCluster {
    servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `size` servers (three at least: a JetStream cluster needs a majority) with
    /// `options` each, and waits until each answers JetStream and knows all the others.
    pub async fn start_with(options: NatsOptions, size: usize) -> Self {
        assert!(
            size >= 3,
            "a JetStream cluster of {size} cannot lose a server"
        );
        let mut logs = String::new();
        for _ in 0..5 {
            let mut ports = std::collections::BTreeSet::new();
            while ports.len() < 2 * size {
                ports.insert(free_port());
            }
            let ports: Vec<u16> = ports.into_iter().collect();
            let (clients, routes) = ports.split_at(size);
            let name = format!("capstan-test-{}", clients[0]);
            let mut servers: Vec<NatsServer> = (0..size)
                .map(|i| {
                    let route = Route {
                        cluster: name.clone(),
                        port: routes[i],
                        peers: [&routes[..i], &routes[i + 1..]].concat(),
                    };
                    let mut server = NatsServer::unstarted(options.clone(), Some(route));
                    server.port = clients[i];
                    server
                })
                .collect();
            // Together: none is ready before a majority has elected the cluster's leader.
            for server in &mut servers {
                server.spawn();
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut ready = true;
            for server in &mut servers {
                ready = ready && server.wait_ready(deadline).await;
            }
            let cluster = Self { servers };
            if ready && cluster.wait_routed(deadline).await {
                return cluster;
            }
            // A port was taken in between: start again on others.
            logs = cluster.servers.iter().map(NatsServer::log).collect();
        }
        panic!("the nats-server cluster did not start:\n{logs}");
    }

    /// Waits until every running server's INFO names every server of the cluster (the routes are
    /// up); false if `deadline` passes first.
    async fn wait_routed(&self, deadline: Instant) -> bool {
        let size = self.servers.len();
        while Instant::now() < deadline {
            let mut routed = true;
            for server in self.servers.iter().filter(|s| s.child.is_some()) {
                let known = match server
                    .options
                    .connect_options()
                    .connection_timeout(Duration::from_secs(1))
                    .connect(server.url())
                    .await
                {
                    Ok(client) => client.server_info().connect_urls.len(),
                    Err(_) => 0,
                };
                routed = routed && known >= size;
            }
            if routed {
                return true;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        false
    }

    /// The servers' URLs, comma separated (what `CAPSTAN_NATS_URL` takes).
    pub fn urls(&self) -> String {
        self.servers
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Server number `index` (from 0).
    pub fn server(&self, index: usize) -> &NatsServer {
        &self.servers[index]
    }

    /// Every server.
    pub fn servers(&self) -> &[NatsServer] {
        &self.servers
    }

    /// Kills server `index` (SIGKILL); its store stays.
    pub fn kill(&mut self, index: usize) {
        self.servers[index].kill();
    }

    /// Starts server `index` again, on its ports with its store, and waits until it answers
    /// JetStream and is routed to the others again.
    pub async fn restart(&mut self, index: usize) {
        self.servers[index].restart().await;
        let routed = self
            .wait_routed(Instant::now() + Duration::from_secs(60))
            .await;
        assert!(routed, "the restarted server did not rejoin its cluster");
    }

    /// A client of the cluster: it connects to any server and moves to another when that one
    /// goes away.
    pub async fn client(&self) -> async_nats::Client {
        let addresses: Vec<async_nats::ServerAddr> = self
            .servers
            .iter()
            .map(|server| server.url().parse().expect("a server address"))
            .collect();
        self.servers[0]
            .options
            .connect_options()
            .connect(addresses)
            .await
            .expect("connect to the test nats-server cluster")
    }

    /// The servers, to be kept apart (each still killed and removed when dropped).
    pub fn into_servers(self) -> Vec<NatsServer> {
        self.servers
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port on loopback")
}

/// True if `path` exists (for assertions on store directories).
pub fn exists(path: &Path) -> bool {
    path.exists()
}
