//! `capstan`: administration commands. `capstan history rebuild --yes` empties the history
//! tables and replays the events stream into them; it is audited like a request to the API.
//! `capstan nats init --dir DIR --node N…` writes the mesh's NATS identities.

use anyhow::Context;
use capstan_protocol::{AuditAction, AuditOutcome, AuditRecord, AuthMethod};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "capstan", version, about = "Capstan administration")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
}

#[derive(Subcommand)]
enum NatsCommand {
    /// Write an NKEY seed for each identity (the administrator, each service, each executor
    /// node, and `client` for the `nats` CLI) into DIR, keeping the ones already there, and
    /// the `authorization` block naming them for the server's configuration to include.
    Init {
        /// Where the seeds and the block go.
        #[arg(long)]
        dir: std::path::PathBuf,
        /// An executor node's id; repeat for each node.
        #[arg(long = "node", required = true)]
        nodes: Vec<capstan_protocol::NodeId>,
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
        config: Box<capstan_api::Config>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = capstan_telemetry::init("admin");
    match cli.command {
        Command::Nats {
            command: NatsCommand::Init { dir, nodes },
        } => {
            let written = capstan_mesh::identities::init(&dir, &nodes)?;
            println!(
                "NATS identities in {}: give each service its `<name>.nk` (CAPSTAN_NATS_CREDS), \
                 and add `include \"authorization.conf\"` to the server's configuration \
                 (copied beside it). For the nats CLI: --nkey {}",
                written.dir.display(),
                written
                    .seed_file(&capstan_mesh::identities::Identity::Client)
                    .display()
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
            let mesh =
                capstan_mesh::Mesh::connect(&config.nats, "capstan-admin", &shutdown).await?;
            // Recorded however it ends; the command fails when the record cannot be stored.
            let mut record = AuditRecord::new(AuditAction::HistoryRebuild, AuditOutcome::Success);
            record.principal = Some(operator());
            record.via = Some(AuthMethod::Cli);
            record.resource = Some(format!("history/{}", capstan_store::redact(&url)));
            let rebuilt = capstan_api::rebuild::rebuild(&mesh, &history).await;
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
    Ok(())
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
