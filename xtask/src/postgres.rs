//! PostgreSQL for the test suite: the history store is tested on both backends, so `test`
//! makes sure a server answers before running anything — it starts the machine's cluster when
//! one exists but is down, or installs one (Debian packages) when there is none. It never
//! skips: if no server can be had, the run fails saying why.

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The URL the store's tests use unless `CAPSTAN_TEST_POSTGRES_URL` says otherwise.
pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Makes sure the server behind `CAPSTAN_TEST_POSTGRES_URL` (or the default) accepts
/// connections, and returns its URL.
pub fn ensure() -> anyhow::Result<String> {
    let url = std::env::var("CAPSTAN_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_URL.into());
    let address = address_of(&url)?;
    if reachable(address) {
        return Ok(url);
    }
    let local = address.ip().is_loopback();
    if !local {
        bail!("PostgreSQL at {address} (CAPSTAN_TEST_POSTGRES_URL) does not answer");
    }
    eprintln!("PostgreSQL is not answering on {address}; starting it");
    if !has("pg_lsclusters") {
        install()?;
    }
    start_clusters()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if reachable(address) {
            return Ok(url);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    bail!("PostgreSQL did not start answering on {address}")
}

fn address_of(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url
        .split_once("://")
        .map(|(_, rest)| rest)
        .context("the PostgreSQL URL has no scheme")?;
    let host_port = rest.split('/').next().unwrap_or(rest);
    let host_port = host_port.rsplit('@').next().unwrap_or(host_port);
    let with_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5432")
    };
    let with_port = with_port.replace("localhost", "127.0.0.1");
    with_port
        .parse()
        .with_context(|| format!("cannot read a host and port from {with_port}"))
}

fn reachable(address: SocketAddr) -> bool {
    TcpStream::connect_timeout(&address, Duration::from_secs(2)).is_ok()
}

fn has(program: &str) -> bool {
    Command::new(program)
        .arg("--help")
        .output()
        .is_ok_and(|o| o.status.success() || !o.stdout.is_empty())
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("cannot run {program}"))?;
    if !status.success() {
        bail!("{program} {} failed: {status}", args.join(" "));
    }
    Ok(())
}

/// Installs Debian's PostgreSQL and lets local TCP connections in without a password, as
/// the tests expect of a throwaway server.
fn install() -> anyhow::Result<()> {
    eprintln!("installing PostgreSQL from the Debian packages");
    run("apt-get", &["update", "-q"])?;
    run("apt-get", &["install", "-y", "-q", "postgresql"])?;
    for line in clusters()? {
        let hba = format!("/etc/postgresql/{}/{}/pg_hba.conf", line.0, line.1);
        let current = std::fs::read_to_string(&hba).with_context(|| format!("reading {hba}"))?;
        let trust = "host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n";
        std::fs::write(&hba, format!("{trust}{current}"))
            .with_context(|| format!("writing {hba}"))?;
    }
    Ok(())
}

/// `(version, name, status)` of every cluster `pg_lsclusters` knows.
fn clusters() -> anyhow::Result<Vec<(String, String, String)>> {
    let output = Command::new("pg_lsclusters")
        .arg("--no-header")
        .output()
        .context("cannot run pg_lsclusters")?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let version = fields.next()?.to_owned();
            let name = fields.next()?.to_owned();
            let _port = fields.next()?;
            let status = fields.next()?.to_owned();
            Some((version, name, status))
        })
        .collect())
}

fn start_clusters() -> anyhow::Result<()> {
    let clusters = clusters()?;
    if clusters.is_empty() {
        bail!("pg_lsclusters lists no PostgreSQL cluster to start");
    }
    for (version, name, status) in clusters {
        if status.starts_with("online") {
            continue;
        }
        eprintln!("starting PostgreSQL cluster {version}/{name}");
        run(
            "pg_ctlcluster",
            &["--skip-systemctl-redirect", &version, &name, "start"],
        )?;
    }
    Ok(())
}
