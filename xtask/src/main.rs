//! Project tasks, run as `cargo xtask <task>`:
//!
//! - `up`: the whole mesh on this machine — a provisioned nats-server with its store under
//!   `.capstan/`, and every service as a child process, logs prefixed by service — until Ctrl-C.
//! - `test`: every test of the workspace, with what they need provisioned first (nats-server,
//!   a PostgreSQL server answering for the history store's tests, sshd for the remote
//!   systems' tests, and Chromium with its chromedriver and axe-core, from the npm registry,
//!   for the dashboard's).
//! - `nats-server`: provisions nats-server and prints its path.
//! - `bench`: measures a fresh release-built mesh (numbers in `docs/BENCHMARKS.md`).
//! - `schemas`: writes the files under `schemas/` generated from the code (`--check`: lists
//!   the ones that drifted and fails).

mod axe;
mod bench;
mod bench_batch;
mod bench_rest;
mod bench_schedules;
mod bench_ssh;
mod bench_workflows;
mod chromium;
mod failover;
mod postgres;
mod schemas;
mod small_mesh;
mod sshd;
mod up;

use std::process::{Command, ExitCode};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Capstan project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run the whole mesh locally until Ctrl-C.
    Up(up::Args),
    /// Run every test (arguments after `--` go to `cargo test`).
    Test {
        /// Extra arguments for `cargo test`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Provision nats-server (≥ 2.12) and print its path.
    NatsServer,
    /// Benchmark a fresh release-built mesh (see docs/BENCHMARKS.md).
    Bench(bench::Args),
    /// Write `schemas/`: the OpenAPI document and the NATS message schemas.
    Schemas {
        /// Write nothing; fail listing the files that differ from the code.
        #[arg(long)]
        check: bool,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.task {
        Task::Up(args) => up::run(args),
        Task::Test { args } => test(&args),
        Task::Bench(args) => bench::run(args),
        Task::Schemas { check } => schemas::run(check),
        Task::NatsServer => {
            let path = capstan_testkit::natsbin::ensure().map_err(anyhow::Error::msg)?;
            println!("{}", path.display());
            Ok(())
        }
    }
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn test(args: &[String]) -> anyhow::Result<()> {
    let nats = capstan_testkit::natsbin::ensure().map_err(anyhow::Error::msg)?;
    let nats = std::fs::canonicalize(&nats).unwrap_or(nats);
    eprintln!("using nats-server at {}", nats.display());
    let postgres = postgres::ensure()?;
    // The URL may carry a password: name only where the server is.
    let server = postgres
        .rsplit('@')
        .next()
        .unwrap_or("the configured server");
    eprintln!("using PostgreSQL at {server}");
    let sshd = sshd::ensure()?;
    eprintln!("using sshd at {}", sshd.display());
    let (chromium, chromedriver) = chromium::ensure()?;
    eprintln!(
        "using chromium at {} and chromedriver at {}",
        chromium.display(),
        chromedriver.display()
    );
    let axe = axe::ensure()?;
    eprintln!("using axe-core at {}", axe.display());
    let status = cargo()
        .current_dir(capstan_testkit::workspace_root())
        .args(["test", "--workspace", "--locked"])
        .args(args)
        .env("CAPSTAN_NATS_SERVER", &nats)
        .env("CAPSTAN_TEST_POSTGRES_URL", &postgres)
        .env("CAPSTAN_SSHD", &sshd)
        .env("CAPSTAN_CHROMIUM", &chromium)
        .env("CAPSTAN_CHROMEDRIVER", &chromedriver)
        .env("CAPSTAN_AXE", &axe)
        .status()
        .context("cannot run cargo test")?;
    if !status.success() {
        bail!("tests failed");
    }
    Ok(())
}
