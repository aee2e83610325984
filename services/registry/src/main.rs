//! The `capstan-registry` binary: configuration in, service out.

use clap::Parser;

// mimalloc: the services allocate many small, short-lived buffers across threads, where glibc's
// allocator spent a fifth of the scheduler's time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let config = capstan_registry::Config::parse();
    let runtime = config.runtime.build(capstan_mesh::Threads::PerCore)?;
    runtime.block_on(async move {
        let _telemetry = capstan_telemetry::init("registry");
        let shutdown = capstan_mesh::shutdown::on_signal();
        capstan_registry::run(config, shutdown).await?;
        Ok(())
    })
}
