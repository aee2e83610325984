//! `capstan`: administration commands (see [`capstan_api::admin`]).

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = capstan_api::admin::Cli::parse();
    let _telemetry = capstan_telemetry::init("admin");
    capstan_api::admin::run(cli).await
}
