//! OpenSSH for the test suite: the tests of remote systems run real `sshd`s on loopback
//! (`capstan_testkit::sshd`), so `test` makes sure the daemon is on the machine, installing
//! Debian's `openssh-server` when it is missing. The package's own service is kept from
//! starting during the install: the tests start their daemons themselves, on ports of their
//! own. It never skips: if the daemon cannot be had, the run fails saying why.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// Makes sure `sshd` is installed and returns where it is.
pub fn ensure() -> anyhow::Result<PathBuf> {
    let sshd = capstan_testkit::sshd::sshd_path();
    if sshd.exists() {
        return Ok(sshd);
    }
    eprintln!(
        "{} is missing; installing Debian's openssh-server",
        sshd.display()
    );
    install()?;
    if !sshd.exists() {
        bail!(
            "openssh-server was installed but {} is still missing",
            sshd.display()
        );
    }
    Ok(sshd)
}

/// `apt-get install openssh-server` with a `policy-rc.d` that forbids starting services
/// (Debian's way to install a daemon without running it), removed afterwards unless one was
/// there before.
fn install() -> anyhow::Result<()> {
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy.exists();
    if ours {
        std::fs::write(policy, "#!/bin/sh\nexit 101\n").context("writing policy-rc.d")?;
        std::fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let installed = run("apt-get", &["update", "-q"])
        .and_then(|()| run("apt-get", &["install", "-y", "-q", "openssh-server"]));
    if ours {
        let _ = std::fs::remove_file(policy);
    }
    installed
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(program)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .with_context(|| format!("cannot run {program}"))?;
    if !status.success() {
        bail!("{program} {} failed: {status}", args.join(" "));
    }
    Ok(())
}
