//! axe-core for the test suite: the dashboard's end-to-end tests check every page against
//! WCAG 2.1 AA by running Deque's axe-core in the real browser (`Browser::accessibility` in
//! `capstan_e2e::browser`), so `test` makes sure the pinned version's `axe.min.js` is in the
//! user's cache (`$XDG_CACHE_HOME/capstan/axe-core-<version>/`, else
//! `~/.cache/capstan/axe-core-<version>/`, shared by every clone), fetched once from the npm
//! registry with `npm pack` and checked against the pinned integrity. Debian's `npm` is
//! installed when there is none. Injecting the script and reading its results is the
//! harness's business. It never skips: if axe-core cannot be had, the run fails saying why.
//!
//! Nothing of axe-core is kept in the repository.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use serde_json::Value;

/// The axe-core release the dashboard is checked with (the latest 4.x when it was pinned).
pub const VERSION: &str = "4.14.1";

/// The registry's integrity of that release's tarball (`npm view axe-core@<version>
/// dist.integrity`): a tarball that does not match is refused.
const INTEGRITY: &str = "sha512-FHfa+lmNjQZfJz1q8wKqIDwC6DExcHt/pkjNQb09a3NPjCKg2rhu5qb2S4r76ASyFNNtuFooJpZe37OgudVGtQ==";

/// Makes sure axe-core [`VERSION`] is in the cache and returns the path of its
/// `axe.min.js`. One process fetches at a time (a lock file beside it); the package's
/// directory is moved into place whole, so one left half made is never taken for done.
pub fn ensure() -> anyhow::Result<PathBuf> {
    let cache = capstan_testkit::pyenv::cache_dir();
    let dir = cache.join(format!("axe-core-{VERSION}"));
    let script = dir.join("axe.min.js");
    if script.is_file() {
        return Ok(script);
    }
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let lock_path = cache.join(format!("axe-core-{VERSION}.lock"));
    let lock = std::fs::File::create(&lock_path)
        .with_context(|| format!("creating {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", lock_path.display()))?;
    // Another process may have fetched it while this one waited for the lock.
    if script.is_file() {
        return Ok(script);
    }
    ensure_npm()?;
    eprintln!(
        "fetching axe-core {VERSION} from the npm registry into {}",
        dir.display()
    );
    let staging = tempfile::Builder::new()
        .prefix("axe-core-download")
        .tempdir_in(&cache)
        .context("creating a download directory")?;
    let tarball = pack(staging.path())?;
    let status = Command::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(staging.path())
        .status()
        .context("cannot run tar")?;
    if !status.success() {
        bail!("tar could not unpack {}: {status}", tarball.display());
    }
    // npm tarballs hold the package under `package/`.
    let unpacked = staging.path().join("package");
    if !unpacked.join("axe.min.js").is_file() {
        bail!("axe-core {VERSION}'s tarball has no package/axe.min.js");
    }
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", dir.display())),
    }
    std::fs::rename(&unpacked, &dir)
        .with_context(|| format!("moving axe-core into {}", dir.display()))?;
    Ok(script)
}

/// `npm pack axe-core@<VERSION>` into `destination`; returns the tarball's path once its
/// integrity is the pinned one.
fn pack(destination: &Path) -> anyhow::Result<PathBuf> {
    let output = Command::new("npm")
        .args(["pack", "--json", "--ignore-scripts", "--pack-destination"])
        .arg(destination)
        .arg(format!("axe-core@{VERSION}"))
        // Out of the workspace: npm must not take the repository for a package of its own.
        .current_dir(destination)
        .output()
        .context("cannot run npm")?;
    if !output.status.success() {
        bail!(
            "npm pack axe-core@{VERSION} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let packed: Value = serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "npm pack printed no JSON:\n{}",
            String::from_utf8_lossy(&output.stdout)
        )
    })?;
    let filename = packed[0]["filename"]
        .as_str()
        .context("npm pack named no tarball")?;
    let integrity = packed[0]["integrity"].as_str().unwrap_or("(none)");
    if integrity != INTEGRITY {
        bail!("axe-core@{VERSION}'s tarball has integrity {integrity}, not the pinned {INTEGRITY}");
    }
    Ok(destination.join(filename))
}

/// Installs Debian's `npm` when there is no `npm` to run.
fn ensure_npm() -> anyhow::Result<()> {
    let runs = Command::new("npm")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success());
    if runs {
        return Ok(());
    }
    eprintln!("npm is missing; installing Debian's npm");
    crate::chromium::apt_get(&["update", "-q"])?;
    crate::chromium::apt_get(&["install", "-y", "-q", "npm"])?;
    Ok(())
}
