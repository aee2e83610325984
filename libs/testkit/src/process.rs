//! Service binaries as child processes, for end-to-end tests: each writes its log to a file the
//! test can read, and is killed when dropped.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::wait::POLL_INTERVAL;

/// The path of a workspace binary built next to the running test (`cargo test` builds every
/// binary of the packages it tests).
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run the tests with `cargo xtask test` or build with `cargo build --bins`",
        path.display()
    );
    path
}

/// A running service process.
pub struct ServiceProcess {
    name: String,
    child: Child,
    log_path: PathBuf,
}

impl ServiceProcess {
    /// Starts `binary` (a name for [`bin_path`]) with `args` and extra `env`, logging to
    /// `<log_dir>/<name>.log`.
    pub fn spawn(
        name: &str,
        binary: &str,
        args: &[String],
        env: &[(String, String)],
        log_dir: &Path,
    ) -> Self {
        // A restarted process keeps the earlier log: `<name>.log`, `<name>.2.log`, ...
        let log_path = (1..)
            .map(|n| match n {
                1 => log_dir.join(format!("{name}.log")),
                n => log_dir.join(format!("{name}.{n}.log")),
            })
            .find(|path| !path.exists())
            .expect("a free log name");
        let log = File::create(&log_path).expect("create the service log");
        let mut command = Command::new(bin_path(binary));
        command
            .args(args)
            .env("CAPSTAN_LOG", "info,async_nats=warn,capstan=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("clone log handle")))
            .stderr(Stdio::from(log));
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
        Self {
            name: name.to_owned(),
            child,
            log_path,
        }
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends `signal`.
    pub fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits i32"));
        let _ = kill(pid, signal);
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// SIGTERM, then waits up to `timeout` for a clean exit.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.signal(Signal::SIGTERM);
        self.wait_exit(timeout)
    }

    /// SIGKILL, and reaps the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
