//! `cargo xtask up`: the whole mesh on this machine.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use capstan_mesh::identities::{Identities, Identity};
use capstan_protocol::NodeId;
use capstan_testkit::TlsFiles;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Job slots per executor that `up` gives: the executor's own default.
pub(crate) const DEFAULT_SLOTS: u32 = capstan_executor::DEFAULT_SLOTS;

/// Options of `up`.
#[derive(clap::Args)]
pub struct Args {
    /// Executors to start.
    #[arg(long, default_value_t = 3)]
    executors: u32,
    /// Schedulers to start.
    #[arg(long, default_value_t = 1)]
    schedulers: u32,
    /// Registries to start.
    #[arg(long, default_value_t = 1)]
    registries: u32,
    /// Job slots per executor.
    #[arg(long, default_value_t = DEFAULT_SLOTS)]
    slots: u32,
    /// NATS port; 4222 when free, else any free port.
    #[arg(long, env = "CAPSTAN_NATS_PORT")]
    nats_port: Option<u16>,
    /// Where the REST API listens.
    #[arg(long, env = "CAPSTAN_API_LISTEN", default_value = "127.0.0.1:8080")]
    api_listen: String,
    /// Build and run release binaries.
    #[arg(long)]
    release: bool,
}

struct Running {
    name: String,
    child: Child,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let root = capstan_testkit::workspace_root();
    let profile = if args.release { "release" } else { "debug" };
    eprintln!("building the services ({profile})");
    let mut build = super::cargo();
    build
        .current_dir(&root)
        .args(["build", "--bins", "--locked"]);
    if args.release {
        build.arg("--release");
    }
    if !build.status().context("cannot run cargo build")?.success() {
        bail!("build failed");
    }
    let bin_dir = target_dir(&root).join(profile);
    let nats = capstan_testkit::natsbin::ensure().map_err(anyhow::Error::msg)?;

    let data = root.join(".capstan").join("data");
    std::fs::create_dir_all(data.join("nats"))?;
    let identities = identities(&root.join(".capstan").join("nats"), args.executors)?;
    let port = match args.nats_port {
        Some(port) => port,
        None if port_free(4222) => 4222,
        None => capstan_testkit::server::free_port(),
    };
    let url = format!("nats://127.0.0.1:{port}");

    let mut running: Vec<Running> = Vec::new();
    let plan = Plan {
        bin_dir: bin_dir.clone(),
        nats_url: url.clone(),
        data: data.clone(),
        registries: args.registries,
        schedulers: args.schedulers,
        executors: args.executors,
        slots: args.slots,
        api_listen: args.api_listen.clone(),
        admin_password: admin_password(&root.join(".capstan").join("admin-password"))?,
        secret_keys: secret_keys(&root.join(".capstan").join("secret-keys"))?,
        identities: identities.clone(),
        tls: None,
    };
    running.push(spawn(
        "nats",
        nats_command(
            &nats,
            port,
            &data.join("nats"),
            false,
            &identities.accounts,
            None,
        )?,
    )?);
    wait_for_port(port, Duration::from_secs(20))?;
    plan.apply_topology()?;
    for (name, command) in plan.services() {
        running.push(spawn(&name, command)?);
    }
    let password = plan.admin_password.clone();
    let token = session_token(&args.api_listen, &password);

    eprintln!();
    eprintln!("Capstan is up: NATS at {url}, store in {}", data.display());
    let client_seed = identities.seed_file(&Identity::client());
    eprintln!(
        "For the nats CLI (no anonymous connection is accepted; the `client` identity may \
         submit, cancel, and read events and logs; `admin.nk` beside it may do anything):"
    );
    if port != 4222 {
        eprintln!("  export NATS_URL={url}");
    }
    eprintln!("  export NATS_NKEY={}", client_seed.display());
    eprintln!("  nats pub capstan.jobs.submit '{{\"command\": \"echo hello\"}}'");
    eprintln!("  nats sub 'capstan.events.>'");
    eprintln!(
        "  nats micro ls --nkey {}   # as the administrator",
        identities.seed_file(&Identity::Admin).display()
    );
    eprintln!(
        "REST API at http://{}/api/v1 (Swagger UI at /docs); log in as `admin` with the \
         password in .capstan/admin-password:",
        args.api_listen
    );
    match &token {
        Ok(token) => {
            eprintln!("  export CAPSTAN_TOKEN={token}   # an admin API token, valid 24 h");
        }
        Err(error) => {
            eprintln!("  (no token made: {error:#})");
            eprintln!(
                "  export CAPSTAN_TOKEN=$(curl -s -XPOST http://{}/api/v1/auth/login -H 'content-type: application/json' \
                 -d '{{\"username\": \"admin\", \"password\": \"…\"}}' | sed -E 's/.*\"access_token\":\"([^\"]+)\".*/\\1/')",
                args.api_listen
            );
        }
    }
    eprintln!(
        "  curl -s -XPOST http://{}/api/v1/jobs -H \"Authorization: Bearer $CAPSTAN_TOKEN\" -H 'content-type: application/json' -d '{{\"command\": \"echo hello\"}}'",
        args.api_listen
    );
    eprintln!(
        "The `capstan` command (target/debug/capstan) reads the same token, or logs in itself:"
    );
    eprintln!("  export CAPSTAN_URL=http://{}", args.api_listen);
    eprintln!("  capstan run -- uname -a        # or: capstan login -u admin");
    eprintln!("Ctrl-C stops everything.");
    eprintln!();

    wait_for_signal()?;
    eprintln!("stopping");
    // Services first (newest first), NATS last, each given time to finish its work.
    while let Some(mut process) = running.pop() {
        stop(&mut process, Duration::from_secs(40));
    }
    Ok(())
}

/// The mesh `up` runs: which services, how many, and how each is started. `cargo xtask bench`
/// starts the same processes from the same plan, so what it measures is what `up` runs.
pub(crate) struct Plan {
    /// Where the service binaries are.
    pub(crate) bin_dir: PathBuf,
    /// The NATS server's URL.
    pub(crate) nats_url: String,
    /// The data directory: executors' work directories, the API's SQLite history and keys.
    pub(crate) data: PathBuf,
    pub(crate) registries: u32,
    pub(crate) schedulers: u32,
    pub(crate) executors: u32,
    /// Job slots per executor.
    pub(crate) slots: u32,
    pub(crate) api_listen: String,
    pub(crate) admin_password: String,
    /// The file of keys sealing job secrets, shared by the API and the executors.
    pub(crate) secret_keys: PathBuf,
    /// The NATS identities; each service connects as its own.
    pub(crate) identities: Identities,
    /// The CA and client certificate for mutual TLS to NATS, when the server requires it.
    pub(crate) tls: Option<TlsFiles>,
}

impl Plan {
    /// A command of `binary` connecting to NATS as `identity`.
    fn command(&self, binary: &str, identity: &Identity) -> Command {
        let mut command = Command::new(self.bin_dir.join(binary));
        command
            .env("CAPSTAN_NATS_URL", &self.nats_url)
            .env("CAPSTAN_NATS_CREDS", self.identities.seed_file(identity));
        if let Some(tls) = &self.tls {
            command
                .env("CAPSTAN_NATS_CA", &tls.ca)
                .env("CAPSTAN_NATS_CERT", &tls.client_cert)
                .env("CAPSTAN_NATS_KEY", &tls.client_key);
        }
        command
    }

    /// Creates or upgrades the topology as the administrator (`capstan nats apply`), which
    /// the services then only verify; fails if the command does.
    pub(crate) fn apply_topology(&self) -> anyhow::Result<()> {
        let mut command = self.command("capstan", &Identity::Admin);
        command.args(["nats", "apply"]).stdin(Stdio::null());
        let output = command.output().context("cannot run capstan nats apply")?;
        if !output.status.success() {
            bail!(
                "capstan nats apply failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }

    /// Every service's name and command, in start order: registries, schedulers, executors
    /// (`exec-<n>`), the API.
    pub(crate) fn services(&self) -> Vec<(String, Command)> {
        let service = |binary: &str, identity: Identity| self.command(binary, &identity);
        let mut services = Vec::new();
        for n in 1..=self.registries {
            services.push((
                format!("registry-{n}"),
                service("capstan-registry", Identity::Registry),
            ));
        }
        for n in 1..=self.schedulers {
            services.push((
                format!("scheduler-{n}"),
                service("capstan-scheduler", Identity::Scheduler),
            ));
        }
        for n in 1..=self.executors {
            let node = format!("exec-{n}");
            let mut command = service("capstan-executor", Identity::Executor(node_id(&node)));
            command
                .env("CAPSTAN_NODE_ID", &node)
                .env("CAPSTAN_SLOTS", self.slots.to_string())
                .env("CAPSTAN_WORK_DIR", self.data.join("work").join(&node))
                .env("CAPSTAN_SECRET_KEYS_FILE", &self.secret_keys);
            services.push((node, command));
        }
        // The API keeps its SQLite history and its generated signing key in the data
        // directory; the first administrator's password is generated once and kept beside it.
        let mut api = service("capstan-api", Identity::Api);
        api.env("CAPSTAN_API_LISTEN", &self.api_listen)
            .env("CAPSTAN_DATA_DIR", &self.data)
            .env("CAPSTAN_ADMIN_PASSWORD", &self.admin_password)
            .env("CAPSTAN_SECRET_KEYS_FILE", &self.secret_keys);
        services.push(("api".to_owned(), api));
        services
    }
}

/// The nats-server command: JetStream on `port` (loopback only) with its store in `store`,
/// admitting only the users of the `accounts` block, over mutual TLS with `tls`;
/// `sync_always` fsyncs every write (`sync_interval: always`).
pub(crate) fn nats_command(
    binary: &Path,
    port: u16,
    store: &Path,
    sync_always: bool,
    accounts: &Path,
    tls: Option<&TlsFiles>,
) -> anyhow::Result<Command> {
    let config = store.with_extension("conf");
    // nats-server resolves an include beside the including file.
    let included = config.with_file_name(capstan_mesh::identities::ACCOUNTS);
    std::fs::copy(accounts, &included)
        .with_context(|| format!("cannot copy {}", accounts.display()))?;
    let sync = if sync_always {
        "  sync_interval: always\n"
    } else {
        ""
    };
    let tls = match tls {
        Some(tls) => format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n}}\n",
            tls.server_cert, tls.server_key, tls.ca
        ),
        None => String::new(),
    };
    // The store's limit is what the streams and buckets reserve: the server's default, three
    // quarters of the free disk, can be less on a laptop.
    std::fs::write(
        &config,
        format!(
            "listen: \"127.0.0.1:{port}\"\nserver_name: capstan-dev\n\
             jetstream {{\n  store_dir: {store:?}\n  max_file_store: {reserved}\n{sync}}}\ninclude {accounts:?}\n{tls}",
            accounts = capstan_mesh::identities::ACCOUNTS,
            reserved = capstan_protocol::topology::reserved_bytes(),
        ),
    )
    .with_context(|| format!("cannot write {}", config.display()))?;
    let mut command = Command::new(binary);
    command.arg("-c").arg(config);
    Ok(command)
}

/// The mesh's NATS identities in `dir` for executors `exec-1` … `exec-<executors>`, kept from
/// one run to the next.
pub(crate) fn identities(dir: &Path, executors: u32) -> anyhow::Result<Identities> {
    identities_with(dir, executors, capstan_mesh::identities::Grants::Least)
}

/// [`identities`], granting `grants`.
pub(crate) fn identities_with(
    dir: &Path,
    executors: u32,
    grants: capstan_mesh::identities::Grants,
) -> anyhow::Result<Identities> {
    identities_of(dir, executors, 0, grants)
}

/// [`identities_with`], the first `gateways` executors gateways to remote systems.
pub(crate) fn identities_of(
    dir: &Path,
    executors: u32,
    gateways: u32,
    grants: capstan_mesh::identities::Grants,
) -> anyhow::Result<Identities> {
    let nodes: Vec<NodeId> = (1..=executors)
        .map(|n| node_id(&format!("exec-{n}")))
        .collect();
    let gateways = &nodes[..(gateways.min(executors) as usize)];
    let all = Identity::all_with_gateways(&nodes, gateways);
    capstan_mesh::identities::init_with(dir, &all, grants)
        .with_context(|| format!("cannot write the NATS identities into {}", dir.display()))
}

fn node_id(name: &str) -> NodeId {
    NodeId::new(name).expect("exec-<n> is a valid node id")
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn wait_for_port(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nats-server did not open port {port}")
}

/// Starts `command`, copying its output to ours with `[name]` before each line.
fn spawn(name: &str, mut command: Command) -> anyhow::Result<Running> {
    use std::os::unix::process::CommandExt;
    // Own process group: a Ctrl-C in the terminal reaches only `up`, which then stops the
    // services before NATS, so they can finish their work while NATS is still there.
    let mut child = command
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    for output in [
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|e| Box::new(e) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let prefix = format!("[{name:>11}] ");
        std::thread::spawn(move || {
            for line in BufReader::new(output).lines().map_while(Result::ok) {
                eprintln!("{prefix}{line}");
            }
        });
    }
    Ok(Running {
        name: name.to_owned(),
        child,
    })
}

fn stop(process: &mut Running, grace: Duration) {
    if let Ok(pid) = i32::try_from(process.child.id()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = process.child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("{} did not stop in time; killing it", process.name);
    let _ = process.child.kill();
    let _ = process.child.wait();
}

fn wait_for_signal() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        Ok::<(), std::io::Error>(())
    })?;
    Ok(())
}

/// The first administrator's password: read from `path`, or generated there (readable by its
/// owner only) on the first `up`.
fn admin_password(path: &Path) -> anyhow::Result<String> {
    if let Ok(text) = std::fs::read_to_string(path) {
        return Ok(text.trim().to_owned());
    }
    let mut bytes = [0u8; 18];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| std::io::Read::read_exact(&mut random, &mut bytes))
        .context("cannot read random bytes")?;
    let password: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_private(path, &password)?;
    Ok(password)
}

/// Writes `text` into a new file at `path`, readable by its owner only.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The file of secret keys at `path`, with one key (`local`) written into it (readable by its
/// owner only) when there is none yet.
pub(crate) fn secret_keys(path: &Path) -> anyhow::Result<PathBuf> {
    if !path.exists() {
        write_private(path, &capstan_secrets::KeyRing::generate_entry("local")?)?;
    }
    Ok(path.to_owned())
}

/// Logs in as the first administrator once the API answers and makes an API token for this
/// session (24 hours).
fn session_token(listen: &str, password: &str) -> anyhow::Result<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let http = capstan_testkit::http::HttpClient::new(format!("http://{listen}"));
        let deadline = Instant::now() + Duration::from_secs(120);
        while !http
            .try_get("/readyz")
            .await
            .is_ok_and(|r| r.status.is_success())
        {
            if Instant::now() > deadline {
                bail!("the API did not become ready");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let body = serde_json::json!({"username": "admin", "password": password}).to_string();
        let login = http
            .try_send(
                "POST".parse().expect("a method"),
                "/api/v1/auth/login",
                &[("content-type", "application/json")],
                body,
            )
            .await
            .map_err(anyhow::Error::msg)?;
        if !login.status.is_success() {
            bail!(
                "the login as admin was refused ({}): was its password changed?",
                login.status
            );
        }
        let access = login.json()["access_token"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let created = http
            .with_bearer(access)
            .try_send(
                "POST".parse().expect("a method"),
                "/api/v1/tokens",
                &[("content-type", "application/json")],
                serde_json::json!({"name": "cargo xtask up", "expires_in": 86_400}).to_string(),
            )
            .await
            .map_err(anyhow::Error::msg)?;
        if !created.status.is_success() {
            bail!("no API token: {} {}", created.status, created.text());
        }
        Ok(created.json()["token"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    })
}
