//! The SSH connector against real OpenSSH servers (testkit `SshHost`): logging in by key and
//! by password, the host key checked before any credential is sent, unreachable and silent
//! hosts, output and exit codes, and stops that leave no remote process behind (checked with
//! `ps` on the test host).

use std::time::{Duration, Instant};

use capstan_remote::ssh::RUNS_PER_CONNECTION;
use capstan_remote::{
    Connector, Credential, Ended, HostKeyCheck, Output, RemoteCommand, RemoteError, SshConnector,
    Stop, Target,
};
use capstan_testkit::sshd::{LOGIN_USER, SshHost, login_processes};
use capstan_testkit::wait_until;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

fn key_of(host: &SshHost) -> Credential {
    Credential::PrivateKey {
        key: Zeroizing::new(std::fs::read_to_string(host.client_key()).expect("the client key")),
        passphrase: None,
    }
}

fn target(host: &SshHost, credential: Credential, host_key: HostKeyCheck) -> Target {
    Target {
        name: "web-1".into(),
        hostname: "127.0.0.1".into(),
        port: host.port(),
        username: LOGIN_USER.into(),
        credential,
        host_key,
    }
}

fn pinned(host: &SshHost) -> HostKeyCheck {
    HostKeyCheck::Pinned(host.host_key_fingerprint())
}

fn command(line: &str) -> RemoteCommand {
    RemoteCommand {
        command: line.into(),
        ..RemoteCommand::default()
    }
}

struct Run {
    result: Result<Ended, RemoteError>,
    stdout: String,
    stderr: String,
}

async fn run_with(
    connector: &SshConnector,
    target: &Target,
    command: &RemoteCommand,
    stop: &Stop,
) -> Run {
    let (sender, mut receiver) = mpsc::channel(64);
    let collect = tokio::spawn(async move {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        while let Some(chunk) = receiver.recv().await {
            match chunk {
                Output::Stdout(data) => stdout.extend_from_slice(&data),
                Output::Stderr(data) => stderr.extend_from_slice(&data),
            }
        }
        (stdout, stderr)
    });
    let result = connector.run(target, command, sender, stop).await;
    let (stdout, stderr) = collect.await.expect("collector");
    Run {
        result,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// A port that accepts connections and never says a word, and the task holding them.
async fn silent_host() -> (u16, tokio::task::JoinHandle<()>) {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = silent.local_addr().expect("address").port();
    let held = tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            kept.push(socket);
        }
    });
    (port, held)
}

fn no_stop() -> Stop {
    Stop::new(CancellationToken::new(), Duration::from_secs(1))
}

async fn run(target: &Target, command: &RemoteCommand) -> Run {
    run_with(&SshConnector::default(), target, command, &no_stop()).await
}

#[tokio::test]
async fn a_command_runs_with_its_environment_and_input_and_reports_its_output_and_exit_code() {
    let host = SshHost::start().expect("sshd");
    let target = target(&host, key_of(&host), pinned(&host));
    let command = RemoteCommand {
        command: "read line; echo \"got $line from $WHO\"; echo oops >&2; exit 3".into(),
        env: vec![("WHO".into(), "it's `capstan`".into())],
        stdin: Some("hello\n".into()),
    };
    let run = run(&target, &command).await;
    let ended = run.result.expect("it ran");
    assert_eq!(run.stdout, "got hello from it's `capstan`\n");
    assert_eq!(run.stderr, "oops\n");
    assert_eq!(ended.exit_code, Some(3));
    assert!(!ended.stopped);
    assert_eq!(ended.host_key.fingerprint, host.host_key_fingerprint());
}

#[tokio::test]
async fn a_password_logs_in_and_a_wrong_one_is_an_authentication_failure() {
    let host = SshHost::start().expect("sshd");
    let good = target(
        &host,
        Credential::Password(Zeroizing::new(host.password().into())),
        pinned(&host),
    );
    let logged_in = run(&good, &command("id -un")).await;
    assert_eq!(logged_in.result.expect("it ran").exit_code, Some(0));
    assert_eq!(logged_in.stdout.trim(), LOGIN_USER);

    let wrong = target(
        &host,
        Credential::Password(Zeroizing::new("wrong-password-canary".into())),
        pinned(&host),
    );
    let error = run(&wrong, &command("id -un"))
        .await
        .result
        .expect_err("refused");
    assert!(matches!(error, RemoteError::AuthFailed { .. }), "{error:?}");
    assert!(!error.to_string().contains("canary"));
}

#[tokio::test]
async fn a_host_key_that_is_not_the_pinned_one_fails_before_any_credential_is_sent() {
    let host = SshHost::start().expect("sshd");
    let other = SshHost::start().expect("another sshd");
    let password = Credential::Password(Zeroizing::new(host.password().into()));
    for pin in [other.host_key_fingerprint(), other.host_key()] {
        let target = target(&host, password.clone(), HostKeyCheck::Pinned(pin));
        let error = run(&target, &command("true"))
            .await
            .result
            .expect_err("refused");
        match error {
            RemoteError::HostKeyMismatch { seen, .. } => {
                assert_eq!(seen, host.host_key_fingerprint());
            }
            other => panic!("expected a host key mismatch, got {other:?}"),
        }
    }
    // The server never saw a login attempt.
    let log = host.log();
    assert!(!log.contains("password for"), "{log}");
    assert!(!log.contains("Accepted"), "{log}");

    // The right key, pinned as a public key, is accepted.
    let target = target(&host, password, HostKeyCheck::Pinned(host.host_key()));
    assert_eq!(
        run(&target, &command("true"))
            .await
            .result
            .expect("ran")
            .exit_code,
        Some(0)
    );
}

#[tokio::test]
async fn trust_on_first_use_reports_the_key_the_server_showed_for_pinning() {
    let host = SshHost::start().expect("sshd");
    let target = target(&host, key_of(&host), HostKeyCheck::TrustOnFirstUse);
    let ended = run(&target, &command("true")).await.result.expect("ran");
    assert_eq!(ended.host_key.public_key, host.host_key());
    assert_eq!(ended.host_key.fingerprint, host.host_key_fingerprint());
}

#[tokio::test]
async fn a_closed_port_and_a_host_that_never_greets_are_unreachable_within_the_connect_timeout() {
    let host = SshHost::start().expect("sshd");
    let connector = SshConnector::default().connect_timeout(Duration::from_secs(2));
    let mut closed = target(&host, key_of(&host), pinned(&host));
    closed.port = capstan_testkit::server::free_port();
    let error = run_with(&connector, &closed, &command("true"), &no_stop())
        .await
        .result
        .expect_err("nothing listens");
    assert!(
        matches!(error, RemoteError::Unreachable { .. }),
        "{error:?}"
    );

    let (port, held) = silent_host().await;
    let mut hanging = target(&host, key_of(&host), pinned(&host));
    hanging.port = port;
    let started = Instant::now();
    let error = run_with(&connector, &hanging, &command("true"), &no_stop())
        .await
        .result
        .expect_err("never greets");
    assert!(
        matches!(error, RemoteError::Unreachable { .. }),
        "{error:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    held.abort();
}

#[tokio::test]
async fn a_key_that_does_not_parse_is_a_credential_error_that_does_not_show_it() {
    let host = SshHost::start().expect("sshd");
    let broken = Credential::PrivateKey {
        key: Zeroizing::new("-----BEGIN OPENSSH PRIVATE KEY-----\nkey-canary\n".into()),
        passphrase: Some(Zeroizing::new("passphrase-canary".into())),
    };
    let target = target(&host, broken, pinned(&host));
    let error = run(&target, &command("true"))
        .await
        .result
        .expect_err("unusable");
    assert!(
        matches!(error, RemoteError::BadCredential { .. }),
        "{error:?}"
    );
    let shown = format!("{error} {error:?} {target:?}");
    assert!(!shown.contains("canary"), "{shown}");
}

#[tokio::test]
async fn a_stop_ends_the_remote_process_group_and_kills_a_child_that_ignores_sigterm() {
    let host = SshHost::start().expect("sshd");
    let target = target(&host, key_of(&host), pinned(&host));
    let stop = Stop::new(CancellationToken::new(), Duration::from_secs(1));
    // Sleeps named after this host's port, so that no other run's processes are counted.
    let (ignoring, plain) = (
        format!("sleep {}1", host.port()),
        format!("sleep {}2", host.port()),
    );
    let line = command(&format!(
        "(trap '' TERM; exec {ignoring}) & {plain}; echo not reached"
    ));
    let connector = SshConnector::default();
    let running = run_with(&connector, &target, &line, &stop);
    let stopper = async {
        wait_until(
            "both remote sleeps to run",
            Duration::from_secs(20),
            || async {
                (login_processes(&ignoring).len() == 1 && login_processes(&plain).len() == 1)
                    .then_some(())
            },
        )
        .await;
        stop.token.cancel();
    };
    let (run, ()) = tokio::join!(running, stopper);
    let ended = run.result.expect("stopped cleanly");
    assert!(ended.stopped);
    assert!(!run.stdout.contains("not reached"));
    wait_until("no remote sleep left", Duration::from_secs(20), || async {
        (login_processes(&ignoring).is_empty() && login_processes(&plain).is_empty()).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_command_that_exits_leaves_nothing_running_in_its_group() {
    let host = SshHost::start().expect("sshd");
    let target = target(&host, key_of(&host), pinned(&host));
    let background = format!("sleep {}3", host.port());
    let run = run(
        &target,
        &command(&format!("{background} >/dev/null 2>&1 & echo started")),
    )
    .await;
    let ended = run.result.expect("ran");
    assert_eq!(ended.exit_code, Some(0));
    assert_eq!(run.stdout, "started\n");
    wait_until(
        "the background sleep to end",
        Duration::from_secs(20),
        || async { login_processes(&background).is_empty().then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn a_command_whose_connection_goes_away_is_stopped_on_the_remote_host() {
    let host = SshHost::start().expect("sshd");
    let target = target(&host, key_of(&host), pinned(&host));
    // The second sleep ignores SIGTERM: only the watchdog's SIGKILL after its grace ends it.
    let (plain, stubborn) = (
        format!("sleep {}4", host.port()),
        format!("sleep {}5", host.port()),
    );
    let line = command(&format!("(trap '' TERM; exec {stubborn}) & exec {plain}"));
    {
        // The gateway goes away mid-run: its connection is dropped with the run, no stop sent.
        let (connector, stop) = (SshConnector::default(), no_stop());
        let running = run_with(&connector, &target, &line, &stop);
        let started = wait_until(
            "both remote sleeps to run",
            Duration::from_secs(20),
            || async {
                (login_processes(&plain).len() == 1 && login_processes(&stubborn).len() == 1)
                    .then_some(())
            },
        );
        tokio::select! {
            run = running => panic!("the run ended by itself: {:?}", run.result),
            () = started => {}
        }
    }
    wait_until(
        "no remote sleep left once the connection is gone",
        Duration::from_secs(30),
        || async {
            (login_processes(&plain).is_empty() && login_processes(&stubborn).is_empty())
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_health_check_tells_healthy_unreachable_auth_failed_and_host_key_mismatch_apart() {
    use capstan_protocol::SystemHealth;
    use capstan_remote::probe;

    let host = SshHost::start().expect("sshd");
    let other = SshHost::start().expect("another sshd");
    let connector = SshConnector::default();
    let deadline = Duration::from_secs(15);

    let healthy = probe(
        &connector,
        &target(&host, key_of(&host), pinned(&host)),
        deadline,
    )
    .await;
    assert_eq!(healthy.health, SystemHealth::Healthy, "{healthy:?}");
    assert!(healthy.round_trip.is_some_and(|rtt| rtt > Duration::ZERO));
    assert_eq!(
        healthy.host_key.map(|key| key.fingerprint),
        Some(host.host_key_fingerprint())
    );

    let wrong = Credential::Password(Zeroizing::new("wrong-password-canary".into()));
    let refused = probe(&connector, &target(&host, wrong, pinned(&host)), deadline).await;
    assert_eq!(refused.health, SystemHealth::AuthFailed, "{refused:?}");
    assert!(!format!("{refused:?}").contains("canary"));

    let mismatched = probe(
        &connector,
        &target(&host, key_of(&host), pinned(&other)),
        deadline,
    )
    .await;
    assert_eq!(
        mismatched.health,
        SystemHealth::HostKeyMismatch,
        "{mismatched:?}"
    );

    let mut closed = target(&host, key_of(&host), pinned(&host));
    closed.port = capstan_testkit::server::free_port();
    let unreachable = probe(&connector, &closed, deadline).await;
    assert_eq!(
        unreachable.health,
        SystemHealth::Unreachable,
        "{unreachable:?}"
    );
    assert!(unreachable.error.is_some());
}

#[tokio::test]
async fn runs_on_one_host_share_one_connection_with_a_channel_each_until_it_idles_out() {
    let host = SshHost::start().expect("sshd");
    let target = target(&host, key_of(&host), pinned(&host));
    let connector = SshConnector::default();
    let true_ = command("true");
    for _ in 0..3 {
        let run = run_with(&connector, &target, &true_, &no_stop()).await;
        assert_eq!(run.result.expect("ran").exit_code, Some(0));
    }
    let (echo_a, echo_b, echo_c) = (command("echo a"), command("echo b"), command("echo c"));
    let stop = no_stop();
    let (a, b, c) = tokio::join!(
        run_with(&connector, &target, &echo_a, &stop),
        run_with(&connector, &target, &echo_b, &stop),
        run_with(&connector, &target, &echo_c, &stop),
    );
    assert_eq!(
        (a.stdout, b.stdout, c.stdout),
        ("a\n".into(), "b\n".into(), "c\n".into())
    );
    assert_eq!(connector.pooled(), 1);
    assert_eq!(
        host.log().matches("Accepted publickey").count(),
        1,
        "{}",
        host.log()
    );

    // A connector that keeps nothing idle logs in for every run.
    let other = SshHost::start().expect("sshd");
    let target = self::target(&other, key_of(&other), pinned(&other));
    let fresh = SshConnector::default().idle(Duration::ZERO);
    for _ in 0..2 {
        run_with(&fresh, &target, &true_, &no_stop())
            .await
            .result
            .expect("ran");
    }
    assert_eq!(
        other.log().matches("Accepted publickey").count(),
        2,
        "{}",
        other.log()
    );
}

#[tokio::test]
async fn runs_beyond_what_one_connection_carries_open_only_the_connections_they_need() {
    let host = SshHost::start().expect("sshd");
    let target = target(&host, key_of(&host), pinned(&host));
    let connector = SshConnector::default();
    // The test server allows more sessions per connection than OpenSSH's default of 10, so
    // this counts connections and logins, not refusals. Each run outlasts the logins, one at
    // a time, of the connections the others need.
    let count = 2 * RUNS_PER_CONNECTION + 2;
    let mut runs = tokio::task::JoinSet::new();
    for i in 0..count {
        let (connector, target) = (connector.clone(), target.clone());
        runs.spawn(async move {
            let line = command(&format!("sleep 5; echo {i}"));
            (i, run_with(&connector, &target, &line, &no_stop()).await)
        });
    }
    while let Some(joined) = runs.join_next().await {
        let (i, run) = joined.expect("a run");
        let ended = run.result.expect("ran");
        assert_eq!(ended.exit_code, Some(0), "run {i}: {}", run.stderr);
        assert_eq!(run.stdout, format!("{i}\n"));
    }
    let needed = count.div_ceil(RUNS_PER_CONNECTION);
    assert_eq!(connector.pooled(), needed);
    assert_eq!(
        host.log().matches("Accepted publickey").count(),
        needed,
        "{}",
        host.log()
    );
}

#[tokio::test]
async fn runs_that_wait_for_a_login_that_fails_fail_with_it_instead_of_trying_in_turn() {
    let host = SshHost::start().expect("sshd");
    let (port, held) = silent_host().await;
    let mut hanging = target(&host, key_of(&host), pinned(&host));
    hanging.port = port;
    let connector = SshConnector::default().connect_timeout(Duration::from_secs(2));
    let started = Instant::now();
    let mut runs = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let (connector, hanging) = (connector.clone(), hanging.clone());
        runs.spawn(
            async move { run_with(&connector, &hanging, &command("true"), &no_stop()).await },
        );
    }
    while let Some(joined) = runs.join_next().await {
        let error = joined.expect("a run").result.expect_err("never greets");
        assert!(
            matches!(error, RemoteError::Unreachable { .. }),
            "{error:?}"
        );
    }
    // One connect timeout for all six, not six in turn (12 s).
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    held.abort();
}
