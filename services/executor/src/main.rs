//! The `capstan-executor` binary: configuration in, service out.

use clap::Parser;

// mimalloc: the services allocate many small, short-lived buffers across threads, where glibc's
// allocator spent a fifth of the scheduler's time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let config = capstan_executor::Config::parse();
    let runtime = config.runtime.clone();
    runtime.serve(
        "executor",
        capstan_mesh::Threads::HalfTheCores,
        |shutdown| capstan_executor::run(config, shutdown),
    )??;
    Ok(())
}
