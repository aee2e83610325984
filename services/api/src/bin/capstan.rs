//! `capstan`: administration commands. `capstan history rebuild` empties the history tables
//! and replays the events stream into them.

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
}

#[derive(Subcommand)]
enum HistoryCommand {
    /// Empty the history tables and replay every job event the events stream holds.
    Rebuild {
        /// Where NATS and the database are (same options and variables as the API).
        #[command(flatten)]
        config: capstan_api::Config,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = capstan_telemetry::init("admin");
    match cli.command {
        Command::History {
            command: HistoryCommand::Rebuild { config },
        } => {
            let shutdown = capstan_mesh::shutdown::on_signal();
            let url = config.database_url();
            let history = capstan_store::History::connect(&url).await?;
            let mesh =
                capstan_mesh::Mesh::connect(&config.nats.nats_url, "capstan-admin", &shutdown)
                    .await?;
            let rebuilt = capstan_api::rebuild::rebuild(&mesh, &history)
                .await
                .map_err(anyhow::Error::msg)?;
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
