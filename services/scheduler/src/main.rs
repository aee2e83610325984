//! The `capstan-scheduler` binary: configuration in, service out.

use clap::Parser;

// mimalloc: the services allocate many small, short-lived buffers across threads, where glibc's
// allocator spent a fifth of the scheduler's time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let config = capstan_scheduler::Config::parse();
    let runtime = config.runtime.clone();
    runtime.serve("scheduler", capstan_mesh::Threads::PerCore, |shutdown| {
        capstan_scheduler::run(config, shutdown)
    })??;
    Ok(())
}
