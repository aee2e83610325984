//! A real `nats-server` for one test: JetStream on, a free port on loopback, its own store
//! directory, killed and removed on drop.

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
}

impl NatsServer {
    /// Starts a server with default options and waits until JetStream answers.
    pub async fn start() -> Self {
        Self::start_with(NatsOptions::default()).await
    }

    /// Starts a server with `options` and waits until JetStream answers.
    pub async fn start_with(options: NatsOptions) -> Self {
        let binary = crate::natsbin::ensure().unwrap_or_else(|e| panic!("no nats-server: {e}"));
        let dir = tempfile::Builder::new()
            .prefix("capstan-nats-")
            .tempdir()
            .expect("a temporary directory for the server");
        let mut server = Self {
            child: None,
            port: 0,
            dir,
            binary,
            options,
        };
        for _ in 0..5 {
            server.port = free_port();
            if server.launch().await {
                return server;
            }
        }
        panic!("nats-server did not start:\n{}", server.log());
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
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
            "listen: 127.0.0.1:{port}\nserver_name: capstan-test-{port}\n\
             jetstream {{\n  store_dir: {store:?}\n  max_file_store: 1TB\n{sync}}}\n",
            port = self.port,
            store = self.store_dir(),
            sync = if self.options.sync_always {
                "  sync_interval: always\n"
            } else {
                ""
            },
        );
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
        let deadline = Instant::now() + Duration::from_secs(30);
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
