//! The SSH test hosts are real OpenSSH servers: they admit their login user by key and by
//! password, refuse anyone else, and a client that pinned a host's key is refused once the key
//! changes. Checked with OpenSSH's own client (only the tests do that; Capstan itself connects
//! through its own SSH library).

use std::path::Path;
use std::process::{Command, Output, Stdio};

use capstan_testkit::sshd::{LOGIN_USER, SshHost};

/// Runs `id -un` on `host` with OpenSSH's client, trusting only `known_host_key`.
fn ssh(host: &SshHost, known_host_key: &str, auth: &[&str], env: &[(&str, &Path)]) -> Output {
    let dir = tempfile::tempdir().expect("temp dir");
    let known = dir.path().join("known_hosts");
    std::fs::write(
        &known,
        format!("[127.0.0.1]:{} {known_host_key}\n", host.port()),
    )
    .expect("known_hosts");
    let mut command = Command::new("ssh");
    command
        .args(["-p", &host.port().to_string()])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known.display()))
        .args(["-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=10"])
        .args(auth)
        .arg(format!("{LOGIN_USER}@127.0.0.1"))
        .args(["id", "-un"])
        .stdin(Stdio::null());
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("ssh runs")
}

fn by_key(host: &SshHost, known_host_key: &str) -> Output {
    let key = host.client_key();
    ssh(
        host,
        known_host_key,
        &[
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-i",
            key.to_str().expect("utf-8 path"),
        ],
        &[],
    )
}

fn by_password(host: &SshHost, password: &str) -> Output {
    let dir = tempfile::tempdir().expect("temp dir");
    let askpass = dir.path().join("askpass");
    std::fs::write(&askpass, format!("#!/bin/sh\necho '{password}'\n")).expect("askpass");
    std::fs::set_permissions(
        &askpass,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .expect("mode");
    ssh(
        host,
        &host.host_key(),
        &[
            "-o",
            "PreferredAuthentications=password",
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "NumberOfPasswordPrompts=1",
        ],
        &[
            ("SSH_ASKPASS", &askpass),
            ("SSH_ASKPASS_REQUIRE", Path::new("force")),
            ("DISPLAY", Path::new(":0")),
        ],
    )
}

fn logged_in_as(output: &Output) -> String {
    assert!(
        output.status.success(),
        "ssh failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[test]
fn a_test_host_admits_its_user_by_key_and_by_password_and_refuses_a_wrong_password() {
    let host = SshHost::start().expect("sshd starts");
    assert!(
        host.greeting()
            .expect("a banner")
            .starts_with("SSH-2.0-OpenSSH")
    );
    assert_eq!(logged_in_as(&by_key(&host, &host.host_key())), LOGIN_USER);
    assert_eq!(
        logged_in_as(&by_password(&host, host.password())),
        LOGIN_USER
    );
    let wrong = by_password(&host, "not-the-password");
    assert!(!wrong.status.success(), "a wrong password was accepted");
}

#[test]
fn test_hosts_run_side_by_side_and_a_changed_host_key_is_refused_by_a_client_that_pinned_the_old_one()
 {
    let mut first = SshHost::start().expect("first sshd");
    let second = SshHost::start().expect("second sshd");
    assert_ne!(first.port(), second.port());
    assert_ne!(first.host_key_fingerprint(), second.host_key_fingerprint());
    assert!(first.host_key_fingerprint().starts_with("SHA256:"));
    assert_eq!(
        logged_in_as(&by_key(&second, &second.host_key())),
        LOGIN_USER
    );
    // The second host's key does not vouch for the first host.
    assert!(!by_key(&first, &second.host_key()).status.success());

    let pinned = first.host_key();
    let port = first.port();
    first.change_host_key().expect("restarted with a new key");
    assert_eq!(first.port(), port);
    assert_ne!(first.host_key(), pinned);
    let refused = by_key(&first, &pinned);
    assert!(!refused.status.success(), "a changed host key was accepted");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("IDENTIFICATION HAS CHANGED"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(logged_in_as(&by_key(&first, &first.host_key())), LOGIN_USER);
}
