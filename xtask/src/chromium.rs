//! Chromium for the test suite: the dashboard's end-to-end tests drive a real headless
//! browser through WebDriver (`capstan_e2e::browser`), so `test` makes sure Debian's
//! `chromium` and its `chromedriver` are on the machine, installing both packages when either
//! is missing. Starting the driver and the browser is the harness's business, not this
//! module's. It never skips: if the browser cannot be had, the run fails saying why.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// Where Debian's `chromium` package puts the browser's launcher.
const CHROMIUM: &str = "/usr/bin/chromium";

/// Where Debian's `chromium-driver` package puts the WebDriver server.
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Makes sure `chromium` and `chromedriver` are installed and returns where they are, in that
/// order. Installs both packages together when either is missing: their versions must match.
pub fn ensure() -> anyhow::Result<(PathBuf, PathBuf)> {
    let chromium = PathBuf::from(CHROMIUM);
    let chromedriver = PathBuf::from(CHROMEDRIVER);
    if chromium.exists() && chromedriver.exists() {
        return Ok((chromium, chromedriver));
    }
    eprintln!(
        "{CHROMIUM} or {CHROMEDRIVER} is missing; installing Debian's chromium and chromium-driver"
    );
    install()?;
    for path in [&chromium, &chromedriver] {
        if !path.exists() {
            bail!(
                "chromium and chromium-driver were installed but {} is still missing",
                path.display()
            );
        }
    }
    Ok((chromium, chromedriver))
}

/// `apt-get install chromium chromium-driver`, with a `policy-rc.d` that forbids starting
/// services for the duration (the packages' recommendations bring daemons such as avahi's,
/// which the tests do not want running), removed afterwards unless one was there before.
fn install() -> anyhow::Result<()> {
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy.exists();
    if ours {
        std::fs::write(policy, "#!/bin/sh\nexit 101\n").context("writing policy-rc.d")?;
        std::fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .context("making policy-rc.d executable")?;
    }
    let installed = apt_get(&["update", "-q"])
        .and_then(|()| apt_get(&["install", "-y", "-q", "chromium", "chromium-driver"]));
    if ours {
        // NOTE: a failure to remove it is not the install's failure; the next install of a
        // daemon would say so.
        let _ = std::fs::remove_file(policy);
    }
    installed
}

/// Runs `apt-get args…` without questions, failing when it does (also `axe`'s, for npm).
pub(crate) fn apt_get(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("cannot run apt-get")?;
    if !status.success() {
        bail!("apt-get {} failed: {status}", args.join(" "));
    }
    Ok(())
}
