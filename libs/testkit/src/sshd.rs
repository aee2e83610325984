//! Real OpenSSH servers for the tests of remote systems: each [`SshHost`] is an `sshd` on a
//! free loopback port with its own host key, configuration and authorized key, admitting one
//! unprivileged login user by password or by key. Several hosts on different ports stand in
//! for a fleet. Nothing here is mocked: a connector under test talks to the same daemon an
//! operator's machines run.
//!
//! The login user ([`LOGIN_USER`]) is a local account the harness creates on first use. Its
//! password is drawn at random once per test process and set again then, so no password is
//! written into the project and none outlives the run that needs it. Creating the account and
//! starting `sshd` (which changes to the user after authenticating) take root, as on the
//! machines `cargo xtask test` runs on; `cargo xtask test` installs Debian's `openssh-server`
//! when `sshd` is missing. Without either, [`SshHost::start`] fails saying what is missing:
//! the harness never skips.

use std::io::Read;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The account the test hosts admit.
pub const LOGIN_USER: &str = "capstan-ssh";

/// Where `sshd` is: `CAPSTAN_SSHD`, else Debian's place for it.
pub fn sshd_path() -> PathBuf {
    std::env::var_os("CAPSTAN_SSHD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/sshd"))
}

/// One running `sshd`, stopped when dropped.
pub struct SshHost {
    port: u16,
    dir: TempDir,
    child: Child,
}

impl SshHost {
    /// Starts an `sshd` on a free loopback port and waits until it greets a connection.
    pub fn start() -> Result<Self, String> {
        let sshd = sshd_path();
        if !sshd.exists() {
            return Err(format!(
                "{} is missing: install Debian's openssh-server (`cargo xtask test` does)",
                sshd.display()
            ));
        }
        login_password()?;
        // sshd insists on its privilege-separation directory.
        std::fs::create_dir_all("/run/sshd").map_err(|e| format!("creating /run/sshd: {e}"))?;
        let dir = tempfile::Builder::new()
            .prefix("capstan-sshd-")
            .tempdir()
            .map_err(|e| format!("creating the host's directory: {e}"))?;
        // The login user reads its authorized keys from here.
        set_mode(dir.path(), 0o755)?;
        keygen(&dir.path().join("host_ed25519"))?;
        keygen(&dir.path().join("client_ed25519"))?;
        let authorized = dir.path().join("authorized_keys");
        std::fs::copy(dir.path().join("client_ed25519.pub"), &authorized)
            .map_err(|e| format!("writing authorized_keys: {e}"))?;
        set_mode(&authorized, 0o644)?;
        let port = crate::server::free_port();
        let config = dir.path().join("sshd_config");
        std::fs::write(&config, config_text(dir.path(), port))
            .map_err(|e| format!("writing sshd_config: {e}"))?;
        let child = spawn(dir.path())?;
        let mut host = Self { port, dir, child };
        host.wait_for_greeting()?;
        Ok(host)
    }

    fn wait_for_greeting(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("sshd exited with {status}: {}", self.log()));
            }
            if self
                .greeting()
                .is_some_and(|line| line.starts_with("SSH-2.0-"))
            {
                return Ok(());
            }
            std::thread::sleep(crate::wait::POLL_INTERVAL);
        }
        Err(format!(
            "sshd did not answer on port {}: {}",
            self.port,
            self.log()
        ))
    }

    /// The first line the server sends a new connection (its protocol banner), if it answers.
    pub fn greeting(&self) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut buffer = [0u8; 256];
        let read = stream.read(&mut buffer).ok()?;
        let text = String::from_utf8_lossy(&buffer[..read]);
        text.lines().next().map(str::to_owned)
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The login user's password.
    pub fn password(&self) -> &'static str {
        login_password().expect("set when the host started")
    }

    /// The private key (OpenSSH format, no passphrase) the host accepts for the login user.
    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client_ed25519")
    }

    /// The host's public key as `known_hosts` writes it: `ssh-ed25519 AAAA…`.
    pub fn host_key(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("host_ed25519.pub"))
            .expect("the host key was written at start");
        let mut fields = text.split_whitespace();
        format!(
            "{} {}",
            fields.next().unwrap_or_default(),
            fields.next().unwrap_or_default()
        )
    }

    /// The host key's SHA-256 fingerprint as `ssh-keygen -l` prints it: `SHA256:…`.
    pub fn host_key_fingerprint(&self) -> String {
        let output = Command::new("ssh-keygen")
            .args(["-l", "-E", "sha256", "-f"])
            .arg(self.dir.path().join("host_ed25519.pub"))
            .output()
            .expect("ssh-keygen runs");
        String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_owned()
    }

    /// Replaces the host key with a new one and restarts the daemon on the same port: the
    /// host a pinned key no longer matches.
    pub fn change_host_key(&mut self) -> Result<(), String> {
        self.stop();
        for name in ["host_ed25519", "host_ed25519.pub"] {
            let _ = std::fs::remove_file(self.dir.path().join(name));
        }
        keygen(&self.dir.path().join("host_ed25519"))?;
        self.child = spawn(self.dir.path())?;
        self.wait_for_greeting()
    }

    /// What the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// Stops the listening daemon (sessions it forked keep running, as when a host's sshd is
    /// restarted); [`Drop`] does the same.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The process ids of the login user's live processes (zombies left out) whose command line
/// is exactly `args`: what a remote command left running on the test host. Tests name their
/// commands after their host's port (`sleep <port>1`), so no other test's are counted.
pub fn login_processes(args: &str) -> Vec<i32> {
    let output = Command::new("ps")
        .args(["-u", LOGIN_USER, "-o", "pid=,stat=,args="])
        .output()
        .expect("ps runs");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let pid = fields.next()?.parse().ok()?;
            let stat = fields.next()?;
            let command = fields.collect::<Vec<_>>().join(" ");
            (!stat.starts_with('Z') && command == args).then_some(pid)
        })
        .collect()
}

impl Drop for SshHost {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `sshd` in the foreground on the configuration in `dir`, appending its log to
/// `dir/sshd.log`.
fn spawn(dir: &Path) -> Result<Child, String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("sshd.log"))
        .map_err(|e| format!("opening sshd.log: {e}"))?;
    let sshd = sshd_path();
    Command::new(&sshd)
        .arg("-D")
        .arg("-e")
        .arg("-f")
        .arg(dir.join("sshd_config"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", sshd.display()))
}

fn config_text(dir: &Path, port: u16) -> String {
    let dir = dir.display();
    format!(
        "Port {port}\n\
         ListenAddress 127.0.0.1\n\
         HostKey {dir}/host_ed25519\n\
         PidFile {dir}/sshd.pid\n\
         AuthorizedKeysFile {dir}/authorized_keys\n\
         StrictModes no\n\
         UsePAM no\n\
         PasswordAuthentication yes\n\
         KbdInteractiveAuthentication no\n\
         PubkeyAuthentication yes\n\
         PermitRootLogin no\n\
         AllowUsers {LOGIN_USER}\n\
         MaxStartups 100:30:200\n\
         MaxSessions 64\n\
         LogLevel VERBOSE\n"
    )
}

fn keygen(path: &Path) -> Result<(), String> {
    let output = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "capstan-test", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running ssh-keygen: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "ssh-keygen failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    set_mode(path, 0o600)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), String> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("setting the mode of {}: {e}", path.display()))
}

/// Creates [`LOGIN_USER`] when missing and gives it a password drawn for this process.
fn login_password() -> Result<&'static str, String> {
    static PASSWORD: OnceLock<Result<String, String>> = OnceLock::new();
    PASSWORD
        .get_or_init(|| {
            let exists = Command::new("id")
                .arg("-u")
                .arg(LOGIN_USER)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !exists {
                let status = Command::new("useradd")
                    .args(["--create-home", "--shell", "/bin/sh", LOGIN_USER])
                    .status()
                    .map_err(|e| format!("running useradd (root is needed): {e}"))?;
                if !status.success() {
                    return Err(format!(
                        "useradd {LOGIN_USER} failed ({status}): the SSH test hosts need root"
                    ));
                }
            }
            let password = shared_password()?;
            let mut chpasswd = Command::new("chpasswd")
                .stdin(Stdio::piped())
                .spawn()
                .map_err(|e| format!("running chpasswd: {e}"))?;
            {
                use std::io::Write;
                let mut stdin = chpasswd.stdin.take().expect("piped");
                writeln!(stdin, "{LOGIN_USER}:{password}")
                    .map_err(|e| format!("writing to chpasswd: {e}"))?;
            }
            let status = chpasswd
                .wait()
                .map_err(|e| format!("waiting for chpasswd: {e}"))?;
            if !status.success() {
                return Err(format!("chpasswd failed ({status})"));
            }
            Ok(password)
        })
        .as_ref()
        .map(String::as_str)
        .map_err(Clone::clone)
}

/// The login user's password, the same for every test process on the machine (test binaries
/// and test runners may run at once, and each sets it): made once at random and kept in a
/// file only its owner reads, in the temporary directory. A process writes its candidate in
/// a file of its own and links it into place; the first link wins, and every process reads
/// the winner's whole file.
fn shared_password() -> Result<String, String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = std::env::temp_dir().join("capstan-ssh-test-password");
    if !path.exists() {
        let candidate =
            std::env::temp_dir().join(format!("capstan-ssh-test-password.{}", std::process::id()));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&candidate)
            .map_err(|e| format!("creating {}: {e}", candidate.display()))?;
        file.write_all(random_password().as_bytes())
            .map_err(|e| format!("writing {}: {e}", candidate.display()))?;
        drop(file);
        let linked = std::fs::hard_link(&candidate, &path);
        let _ = std::fs::remove_file(&candidate);
        match linked {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(error) => return Err(format!("linking {}: {error}", path.display())),
        }
    }
    std::fs::read_to_string(&path)
        .map(|text| text.trim().to_owned())
        .map_err(|e| format!("reading {}: {e}", path.display()))
}

fn random_password() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 18];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system's random source");
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}
