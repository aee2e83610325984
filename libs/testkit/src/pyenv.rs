//! Python tools the tests run (schema validators, API fuzzers, client generators), installed
//! from PyPI into a virtual environment in the user's cache, exactly pinned, once: later runs
//! and other clones reuse it while the interpreter and the pins stay the same. One process
//! installs at a time (a lock file beside it), and the stamp naming what is installed is
//! written last, so an environment left half made is made again.

use std::path::PathBuf;
use std::process::{Command, Output};

/// The cache directory Capstan's provisioned tools live in.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .map(|cache| cache.join("capstan"))
        .unwrap_or_else(|| crate::workspace_root().join(".capstan"))
}

/// Runs `command`, returning its standard output, or what it printed when it fails.
pub fn captured(command: &mut Command, what: &str) -> Result<String, String> {
    let output = command
        .output()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{what} failed ({}):\n{}",
            output.status,
            printed(&output)
        ))
    }
}

/// What a command printed, standard output then standard error.
pub fn printed(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The Python of the environment `name` (under [`cache_dir`]) holding exactly
/// `requirements` (`package==version`), installed with `pip install` and `pip_flags`
/// unless already there. Fails with what went wrong: nothing is skipped.
pub fn ensure(name: &str, requirements: &[&str], pip_flags: &[&str]) -> Result<PathBuf, String> {
    let parent = cache_dir();
    let venv = parent.join(name);
    std::fs::create_dir_all(&parent)
        .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    let lock = std::fs::File::create(parent.join(format!("{name}.lock")))
        .map_err(|e| format!("cannot create the lock file in {}: {e}", parent.display()))?;
    lock.lock()
        .map_err(|e| format!("cannot lock {}: {e}", parent.display()))?;

    let base = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let interpreter = captured(
        Command::new(&base).args(["-c", "import sys; print(sys.version)"]),
        &format!("{base} (Python 3 is needed to install {name})"),
    )?;
    let stamp = format!("{}\n{}\n", interpreter.trim(), requirements.join("\n"));
    let stamp_file = venv.join(".capstan-stamp");
    let python = venv.join("bin").join("python");
    let current = std::fs::read_to_string(&stamp_file).unwrap_or_default();
    if !(python.exists() && current == stamp) {
        eprintln!(
            "installing {} into {}",
            requirements.join(", "),
            venv.display()
        );
        match std::fs::remove_dir_all(&venv) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot remove {}: {e}", venv.display())),
        }
        captured(
            Command::new(&base).args(["-m", "venv"]).arg(&venv),
            &format!("{base} -m venv (Debian: apt-get install python3-venv)"),
        )?;
        captured(
            Command::new(&python)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--no-input",
                ])
                .args(pip_flags)
                .args(requirements),
            &format!("pip install of {name}"),
        )?;
        std::fs::write(&stamp_file, &stamp)
            .map_err(|e| format!("cannot write {}: {e}", stamp_file.display()))?;
    }
    Ok(python)
}
