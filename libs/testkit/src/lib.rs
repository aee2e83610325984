//! The shared test harness, reused by every crate's integration tests and by the end-to-end
//! suite: a real `nats-server` per test (free port, its own store directory, removed
//! afterwards), service binaries run as child processes, and waiting on conditions with
//! generous deadlines instead of fixed sleeps; an OTLP receiver collects the spans the
//! service processes export.
//!
//! `xtask` uses [`natsbin`] too, to provision the server for the local mesh.

pub mod http;
pub mod natsbin;
pub mod otlp;
pub mod process;
pub mod server;
pub mod wait;

pub use otlp::{OtlpReceiver, ReceivedSpan};
pub use process::{ServiceProcess, bin_path};
pub use server::{NatsOptions, NatsServer};
pub use wait::{POLL_INTERVAL, wait_until};

use std::path::PathBuf;

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .nth(2)
        .map(PathBuf::from)
        .unwrap_or(manifest)
}
