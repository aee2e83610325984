//! The `capstan-api` binary: configuration in, service out.

use clap::Parser;

// mimalloc: the services allocate many small, short-lived buffers across threads, where glibc's
// allocator spent a fifth of the scheduler's time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let config = capstan_api::Config::parse();
    let runtime = config.runtime.clone();
    runtime.serve("api", capstan_mesh::Threads::PerCore, |shutdown| {
        capstan_api::run(config, shutdown)
    })??;
    Ok(())
}
