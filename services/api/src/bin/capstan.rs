//! `capstan`: the user commands (see [`capstan_client`]) and the administration commands
//! (see [`capstan_api::admin`]) in one binary.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = capstan_api::admin::Cli::parse();
    // The user commands print their results only; the administration commands log as the
    // services do and export their traces.
    let _telemetry = cli
        .is_administration()
        .then(|| capstan_telemetry::init("admin"));
    match capstan_api::admin::run(cli).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("Error: {error:?}");
            ExitCode::FAILURE
        }
    }
}
