//! The `capstan` administration command, parsed and run here so that tests check deployment
//! files against its real options (the binary only parses and calls [`run`]).
//! `capstan history rebuild --yes` empties the history tables and replays the events stream
//! into them; it is audited like a request to the API.
//! `capstan nats init --dir DIR --node N…` writes the mesh's NATS identities; `capstan nats
//! apply` (as the `admin` identity) creates or upgrades the streams, buckets and shared
//! consumers, which the services, under their own identities, only verify.

use anyhow::Context;
use capstan_protocol::{AuditAction, AuditOutcome, AuditRecord, AuthMethod};
use clap::{Parser, Subcommand};

/// The `capstan` command line.
#[derive(Parser)]
#[command(
    name = "capstan",
    version,
    about = "Capstan: run jobs on the fleet, follow them, and administer the mesh",
    after_help = "Start with `capstan login --url <API URL>`, then `capstan run -- <command>`."
)]
pub struct Cli {
    #[command(flatten)]
    globals: capstan_client::Globals,
    #[command(subcommand)]
    command: Command,
}

impl Cli {
    /// Whether the command is one of the administration commands, which talk to NATS or
    /// the database directly and report through telemetry (the user commands talk to the
    /// API only and print nothing but their results).
    pub fn is_administration(&self) -> bool {
        !matches!(self.command, Command::User(_) | Command::Completions { .. })
    }
}

#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    User(capstan_client::Command),
    /// Print a completion script for a shell (`capstan completions bash >
    /// /etc/bash_completion.d/capstan`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// The job history in SQL.
    History {
        #[command(subcommand)]
        command: HistoryCommand,
    },
    /// The mesh's NATS identities.
    Nats {
        #[command(subcommand)]
        command: NatsCommand,
    },
    /// Keys for job secrets.
    Secrets {
        #[command(subcommand)]
        command: SecretsCommand,
    },
}

#[derive(Subcommand)]
enum SecretsCommand {
    /// Print a new random key, `<id>:<base64 of 32 bytes>`, for CAPSTAN_SECRET_KEYS. Put it
    /// first in the list the API and every executor get; keep the old keys after it while
    /// live jobs hold secrets sealed with them.
    Key {
        /// The key's id, named in every value it seals (1 to 32 letters, digits, `-`, `_`).
        #[arg(long)]
        id: String,
        /// Write the key list to this file (readable by its owner only) instead of printing
        /// it, unless the file holds a key list already, which is kept: what a deployment's
        /// first start runs, for CAPSTAN_SECRET_KEYS_FILE.
        #[arg(long, value_name = "FILE")]
        out: Option<std::path::PathBuf>,
    },
    /// Seal again, under the first secret key, every stored secret and the secrets of every
    /// job that has not ended, so that the keys after it can be retired. Run it as the admin
    /// identity after giving the API and every executor the new list (new key first, old keys
    /// after it); retire an old key once this reports nothing left under it. Audited.
    Rotate {
        /// Where NATS is, and as whom (the admin identity).
        #[command(flatten)]
        nats: capstan_mesh::NatsArgs,
        /// The key list, new key first.
        #[command(flatten)]
        keys: capstan_secrets::SecretKeyArgs,
        /// How long to wait for jobs waiting unplaced (whose placement may be under way) to
        /// move on before reporting them, e.g. `60s`.
        #[arg(long, default_value = "60s", value_parser = capstan_mesh::config::parse_duration)]
        wait: std::time::Duration,
    },
}

#[derive(Subcommand)]
enum NatsCommand {
    /// Write an NKEY seed for each identity (the administrator, each service, each executor
    /// node, `client` for the `nats` CLI, and each client and viewer named) into DIR, keeping
    /// the ones already there, the `accounts` block naming them with what each may do, and
    /// (unless there is one) a complete nats-server configuration including it. Run it again
    /// with more `--node`s, `--client`s or `--viewer`s (and all the earlier ones) to add them,
    /// then have the server reload (`nats-server --signal reload`).
    Init {
        /// Where the seeds, the block and the server configuration go.
        #[arg(long)]
        dir: std::path::PathBuf,
        /// An executor node's id; repeat for each node.
        #[arg(long = "node", required_unless_present = "gateways")]
        nodes: Vec<capstan_protocol::NodeId>,
        /// An executor node that is also a gateway to remote systems (its executor runs with
        /// `capstan.io/ssh=true`): its identity may read the systems' catalogue and record
        /// their health, which a plain node's may not. Repeat for each.
        #[arg(long = "gateway", value_name = "NODE")]
        gateways: Vec<capstan_protocol::NodeId>,
        /// Another client identity, beside `client`: may submit, create and cancel jobs and
        /// follow events and output; its jobs are attributed to `nats:<NAME>`. Repeat for each.
        #[arg(long = "client", value_name = "NAME")]
        clients: Vec<capstan_protocol::access::ClientName>,
        /// A viewer identity: may only follow events and output. Repeat for each.
        #[arg(long = "viewer", value_name = "NAME")]
        viewers: Vec<capstan_protocol::access::ClientName>,
        /// The server's JetStream store directory, as the server configuration names it
        /// (default: `jetstream` inside DIR).
        #[arg(long)]
        store_dir: Option<std::path::PathBuf>,
    },
    /// Create or upgrade the streams, KV buckets and shared durable consumers, as the `admin`
    /// identity (`--nats-creds admin.nk`). Run it before the services start, and again after
    /// an upgrade: a service with an identity only verifies the topology.
    Apply {
        /// Where NATS is and how to connect.
        #[command(flatten)]
        nats: capstan_mesh::NatsArgs,
        /// A stream's or bucket's size limit, replacing its default (`CAPSTAN_LOGS=64GiB`,
        /// `capstan_jobs=2GiB`); repeat for each. Past its limit a work queue refuses new
        /// messages (a submission gets a clear error), a log-like stream drops its oldest.
        #[arg(long = "max-bytes", value_name = "NAME=SIZE", value_parser = parse_limit)]
        max_bytes: Vec<(String, i64)>,
        /// Servers keeping a copy of each stream and bucket (1 to 5; their consumers keep as
        /// many), raised or lowered to it. Default: 3 when three JetStream servers or more of
        /// the cluster answer, else 1, and never fewer than a stream already has (an apply
        /// while a server is down takes no copy away).
        #[arg(long, env = "CAPSTAN_NATS_REPLICAS", value_name = "N")]
        replicas: Option<capstan_protocol::topology::Replicas>,
    },
}

#[derive(Subcommand)]
enum HistoryCommand {
    /// Empty the history tables and replay every job event the events stream holds.
    Rebuild {
        /// Confirm: the tables are emptied first, and jobs whose events the stream no longer
        /// holds (older than its retention) leave the history for good.
        #[arg(long)]
        yes: bool,
        /// Where NATS and the database are (same options and variables as the API).
        #[command(flatten)]
        config: Box<crate::Config>,
    },
}

/// Runs the command `cli` names; a user command's exit code is the one it chose (`run`
/// exits with its job's), an administration command's is 0 once it has succeeded.
pub async fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    match cli.command {
        Command::User(command) => return Ok(capstan_client::run(cli.globals, command).await),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "capstan",
                &mut std::io::stdout(),
            );
        }
        Command::Nats {
            command:
                NatsCommand::Init {
                    dir,
                    nodes,
                    gateways,
                    clients,
                    viewers,
                    store_dir,
                },
        } => {
            use capstan_mesh::identities::{Grants, Identity};
            let mut identities = Identity::all_with_gateways(&nodes, &gateways);
            identities.extend(clients.into_iter().map(Identity::Client));
            identities.extend(viewers.into_iter().map(Identity::Viewer));
            let mut names = std::collections::HashSet::new();
            if let Some(twice) = identities.iter().find(|i| !names.insert(i.name())) {
                anyhow::bail!("the identity {} is named twice", twice.name());
            }
            let written = capstan_mesh::identities::init_with(&dir, &identities, Grants::Least)?;
            let store = match store_dir {
                Some(store) => store,
                None => std::path::absolute(dir.join("jetstream"))?,
            };
            let config = capstan_mesh::identities::server_config(&written, &store)?;
            println!(
                "NATS identities in {}: give each service its `<name>.nk` (CAPSTAN_NATS_CREDS). \
                 Start the server with `nats-server -c {}` (or include `{}` in your own \
                 configuration), then run `capstan nats apply --nats-creds {}`. \
                 For the nats CLI: --nkey {}",
                written.dir.display(),
                config.display(),
                capstan_mesh::identities::ACCOUNTS,
                written.seed_file(&Identity::Admin).display(),
                written.seed_file(&Identity::client()).display()
            );
        }
        Command::Secrets {
            command: SecretsCommand::Key { id, out: None },
        } => {
            println!("{}", capstan_secrets::KeyRing::generate_entry(&id)?);
        }
        Command::Secrets {
            command:
                SecretsCommand::Key {
                    id,
                    out: Some(path),
                },
        } => {
            if path.exists() {
                let kept = capstan_secrets::KeyRing::from_file(&path)?;
                println!(
                    "{} holds secret keys already (sealing with `{}`): kept",
                    path.display(),
                    kept.sealing_key()
                );
            } else {
                let entry = zeroize::Zeroizing::new(capstan_secrets::KeyRing::generate_entry(&id)?);
                write_private(&path, entry.as_bytes())
                    .with_context(|| format!("cannot write {}", path.display()))?;
                println!(
                    "{}: a new secret key list, sealing with `{id}`",
                    path.display()
                );
            }
        }
        Command::Secrets {
            command: SecretsCommand::Rotate { nats, keys, wait },
        } => {
            let keys = keys.load()?.ok_or_else(|| {
                anyhow::anyhow!(
                    "give the key list: CAPSTAN_SECRET_KEYS or CAPSTAN_SECRET_KEYS_FILE"
                )
            })?;
            let shutdown = capstan_mesh::shutdown::on_signal();
            let mesh =
                within_connect_time(&nats, capstan_mesh::Mesh::connect(&nats, &ADMIN, &shutdown))
                    .await?;
            let rotated = crate::rotate::rotate(&mesh, &keys, wait).await;
            let mut record = AuditRecord::new(AuditAction::SecretRotate, AuditOutcome::Success);
            record.principal = Some(operator());
            record.via = Some(AuthMethod::Cli);
            record.resource = Some(format!("key/{}", keys.sealing_key()));
            match &rotated {
                Ok(rotated) => {
                    record.detail = Some(rotated.summary(keys.sealing_key()));
                    if !rotated.complete() {
                        record.outcome = AuditOutcome::Failure;
                    }
                }
                Err(error) => {
                    record.outcome = AuditOutcome::Error;
                    record.detail = Some(error.to_string());
                }
            }
            mesh.events
                .audit(&record)
                .await
                .context("the rotation could not be audited")?;
            let rotated = rotated?;
            println!("{}", rotated.summary(keys.sealing_key()));
            for job in &rotated.waiting {
                println!("still waiting unplaced: job {job}");
            }
            for what in &rotated.unopenable {
                println!("does not open: {what}");
            }
            if !rotated.complete() {
                anyhow::bail!(
                    "some values are still sealed under older keys: keep those keys listed, and \
                     run this again"
                );
            }
        }
        Command::Nats {
            command:
                NatsCommand::Apply {
                    nats,
                    max_bytes,
                    replicas,
                },
        } => {
            let mut limits = capstan_mesh::topology::Limits::default();
            for (name, bytes) in &max_bytes {
                limits.set(name, *bytes).map_err(anyhow::Error::msg)?;
            }
            let shutdown = capstan_mesh::shutdown::on_signal();
            let client =
                within_connect_time(&nats, capstan_mesh::connect(&nats, &ADMIN, &shutdown)).await?;
            let js = async_nats::jetstream::new(client);
            let applied = capstan_mesh::topology::apply_with(&js, &limits, replicas).await?;
            let chosen = match applied.servers {
                None => "as asked".to_owned(),
                Some(1) => "one JetStream server".to_owned(),
                Some(servers) => format!("{servers} JetStream servers answered"),
            };
            println!(
                "topology applied: {} streams, {} buckets, {} shared consumers, {} replicas \
                 each ({chosen})",
                applied.streams, applied.buckets, applied.consumers, applied.replicas
            );
        }
        Command::History {
            command: HistoryCommand::Rebuild { yes, config },
        } => {
            if !yes {
                anyhow::bail!(
                    "this empties the history tables and replays the events stream, which keeps \
                     jobs for its retention only: run again with --yes to go ahead"
                );
            }
            let shutdown = capstan_mesh::shutdown::on_signal();
            let url = config.database_url();
            let history = capstan_store::History::connect(&url).await?;
            let mesh = within_connect_time(
                &config.nats,
                capstan_mesh::Mesh::connect(&config.nats, &ADMIN, &shutdown),
            )
            .await?;
            // Recorded however it ends; the command fails when the record cannot be stored.
            let mut record = AuditRecord::new(AuditAction::HistoryRebuild, AuditOutcome::Success);
            record.principal = Some(operator());
            record.via = Some(AuthMethod::Cli);
            record.resource = Some(format!("history/{}", capstan_store::redact(&url)));
            let rebuilt = crate::rebuild::rebuild(&mesh, &history).await;
            match &rebuilt {
                Ok(rebuilt) => {
                    record.detail = Some(format!(
                        "{} events replayed, {} skipped",
                        rebuilt.events, rebuilt.skipped
                    ));
                }
                Err(error) => {
                    record.outcome = AuditOutcome::Error;
                    record.detail = Some(error.clone());
                }
            }
            mesh.events
                .audit(&record)
                .await
                .context("the rebuild ran but its audit record could not be stored")?;
            let rebuilt = rebuilt.map_err(anyhow::Error::msg)?;
            println!(
                "rebuilt {} from {} events ({} skipped)",
                capstan_store::redact(&url),
                rebuilt.events,
                rebuilt.skipped
            );
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Who the commands connect to NATS as.
const ADMIN: capstan_protocol::access::Identity = capstan_protocol::access::Identity::Admin;

/// How long a command keeps trying to reach NATS before it gives up: a one-shot command
/// should not wait forever on a wrong address or credentials, as a service may.
const CONNECT_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

/// `connecting`, given up after [`CONNECT_WITHIN`] with an error naming where and as whom.
async fn within_connect_time<T>(
    nats: &capstan_mesh::NatsArgs,
    connecting: impl std::future::Future<Output = Result<T, capstan_mesh::Error>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(CONNECT_WITHIN, connecting).await {
        Ok(connected) => Ok(connected?),
        Err(_) => anyhow::bail!(
            "cannot reach NATS at {} as the administrator within {} s: check CAPSTAN_NATS_URL, \
             and CAPSTAN_NATS_CREDS (the admin seed) when the server requires identities",
            nats.nats_url,
            CONNECT_WITHIN.as_secs()
        ),
    }
}

/// `NAME=SIZE`, the size in bytes or with a unit (`KiB`, `MiB`, `GiB`, `TiB`; `K`, `M`, `G`,
/// `T` alike, powers of 1024).
fn parse_limit(text: &str) -> Result<(String, i64), String> {
    let (name, size) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}` is not NAME=SIZE"))?;
    let size = size.trim();
    let split = size
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(size.len());
    let (number, unit) = size.split_at(split);
    let number: i64 = number
        .parse()
        .map_err(|_| format!("`{size}` is not a size (e.g. 512MiB, 8GiB)"))?;
    let scale: i64 = match unit.trim().trim_end_matches("iB").trim_end_matches('B') {
        "" => 1,
        "K" | "k" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        other => return Err(format!("`{other}` is not a size unit (KiB, MiB, GiB, TiB)")),
    };
    let bytes = number
        .checked_mul(scale)
        .ok_or_else(|| format!("`{size}` is too large"))?;
    Ok((name.trim().to_owned(), bytes))
}

/// Writes `bytes` to a new file at `path` that only its owner may read.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.write_all(b"\n")?;
    file.sync_all()
}

/// Who runs the command, as the audit trail names them: the operating-system user and host.
fn operator() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".to_owned());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    if host.is_empty() {
        format!("cli:{user}")
    } else {
        format!("cli:{user}@{host}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_limits_parse_with_or_without_a_unit_and_bad_ones_are_refused() {
        assert_eq!(
            parse_limit("SOME_STREAM=64GiB"),
            Ok(("SOME_STREAM".to_owned(), 64 << 30))
        );
        assert_eq!(
            parse_limit("some_bucket=512M"),
            Ok(("some_bucket".to_owned(), 512 << 20))
        );
        assert_eq!(parse_limit("X=4096"), Ok(("X".to_owned(), 4096)));
        assert!(parse_limit("SOME_STREAM").is_err());
        assert!(parse_limit("SOME_STREAM=lots").is_err());
        assert!(parse_limit("SOME_STREAM=3PB").is_err());
        assert!(parse_limit("SOME_STREAM=99999999999T").is_err());
    }

    #[tokio::test]
    async fn nats_init_writes_the_named_clients_and_viewers_and_refuses_a_name_taken_twice() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().display().to_string();
        let init = |extra: &[&str]| {
            let mut args = vec![
                "capstan", "nats", "init", "--dir", &path, "--node", "exec-1",
            ];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args)
        };
        run(init(&["--client", "ci", "--viewer", "ops"]).expect("parses"))
            .await
            .expect("written");
        for name in ["ci", "ops", "client", "admin"] {
            assert!(dir.path().join(format!("{name}.nk")).exists(), "{name}");
        }
        let accounts = std::fs::read_to_string(dir.path().join(capstan_mesh::identities::ACCOUNTS))
            .expect("the accounts block");
        assert!(accounts.contains("\"CLIENT_ci\""), "{accounts}");
        assert!(accounts.contains("\"CLIENT_ops\""), "{accounts}");
        assert!(
            init(&["--client", "admin"]).is_err(),
            "a mesh identity's name"
        );
        assert!(init(&["--client", "a.b"]).is_err(), "not a subject token");
        let twice = run(init(&["--client", "ops", "--viewer", "ops"]).expect("parses")).await;
        assert!(twice.is_err_and(|e| e.to_string().contains("named twice")));
    }

    #[tokio::test]
    async fn nats_init_gives_a_gateway_node_the_systems_catalogue_and_a_plain_node_not() {
        let status =
            capstan_protocol::subjects::kv_key(capstan_protocol::topology::SYSTEM_STATUS.name, "*");
        let writers = |extra: &[&str]| {
            let dir = tempfile::tempdir().expect("dir");
            let path = dir.path().display().to_string();
            let mut args = vec!["capstan", "nats", "init", "--dir", &path];
            args.extend_from_slice(extra);
            let cli = Cli::try_parse_from(args).expect("parses");
            let status = status.clone();
            async move {
                run(cli).await.expect("written");
                let accounts =
                    std::fs::read_to_string(dir.path().join(capstan_mesh::identities::ACCOUNTS))
                        .expect("the accounts block");
                let node = capstan_protocol::NodeId::new("exec-1").expect("valid");
                let seed = capstan_protocol::access::Identity::Executor(node).name();
                assert!(dir.path().join(format!("{seed}.nk")).exists());
                accounts.matches(&format!("\"{status}\"")).count()
            }
        };
        let plain = writers(&["--node", "exec-1"]).await;
        let with_gateway = writers(&["--node", "exec-1", "--gateway", "gw-1"]).await;
        assert_eq!(
            with_gateway,
            plain + 1,
            "only the gateway is added as a writer"
        );
        let only_gateways = writers(&["--gateway", "exec-1"]).await;
        assert_eq!(only_gateways, plain + 1, "exec-1 as a gateway");
    }
}
