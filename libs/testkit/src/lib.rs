//! The shared test harness, reused by every crate's integration tests and by the end-to-end
//! suite: a real `nats-server` per test (free port, its own store directory, removed
//! afterwards; or three routed into one JetStream cluster, [`NatsCluster`]), service binaries
//! run as child processes, and waiting on conditions with generous deadlines instead of fixed
//! sleeps; an OTLP receiver collects the spans the
//! service processes export; an OpenID Connect issuer signs tokens for the API's tests; real
//! OpenSSH servers on loopback stand in for remote systems; Python tools from PyPI
//! ([`pyenv`]) check what the project serves and ships.
//!
//! `xtask` uses [`natsbin`] too, to provision the server for the local mesh.

pub mod http;
pub mod natsbin;
pub mod oidc;
pub mod otlp;
pub mod process;
pub mod pyenv;
pub mod server;
pub mod sshd;
pub mod tls;
pub mod wait;

pub use oidc::OidcIssuer;
pub use otlp::{OtlpReceiver, ReceivedSpan};
pub use process::{ServiceProcess, bin_path};
pub use server::{NatsCluster, NatsOptions, NatsServer};
pub use tls::{TestCa, TlsFiles};
pub use wait::{POLL_INTERVAL, wait_until};

use std::path::PathBuf;

/// The workspace's root directory: the nearest directory holding a workspace `Cargo.toml`
/// above the package cargo is running (`CARGO_MANIFEST_DIR` at run time, which `cargo run` and
/// `cargo test` set), so that a binary reused from a shared build cache works on the checkout
/// it was started from, not on the one it was first built in.
pub fn workspace_root() -> PathBuf {
    let start = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    start
        .ancestors()
        .find(|dir| {
            std::fs::read_to_string(dir.join("Cargo.toml"))
                .is_ok_and(|manifest| manifest.contains("[workspace]"))
        })
        .map(PathBuf::from)
        .unwrap_or(start)
}
