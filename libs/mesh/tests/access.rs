//! Connecting as an identity against a real nats-server that requires one: an NKEY user from a
//! credentials file, TLS with a CA and a client certificate, and the refusals when either is
//! missing or wrong.

use std::path::PathBuf;
use std::time::Duration;

use capstan_mesh::{Error, Mesh, NatsArgs};
use capstan_testkit::{NatsOptions, NatsServer, TestCa};
use tokio_util::sync::CancellationToken;

fn user_seed() -> String {
    nkeys::KeyPair::new_user()
        .seed()
        .expect("a new key pair has a seed")
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write");
    path
}

/// Whether a connection with `options` to `server` is accepted.
async fn accepted(server: &NatsServer, options: async_nats::ConnectOptions) -> bool {
    let client = options
        .connection_timeout(Duration::from_secs(2))
        .connect(server.url())
        .await;
    match client {
        Ok(client) => client.flush().await.is_ok(),
        Err(_) => false,
    }
}

/// Connects with `nats` as the administrator and opens the mesh (creating the topology), in
/// time.
async fn open(nats: &NatsArgs) -> Mesh {
    let shutdown = CancellationToken::new();
    let client = tokio::time::timeout(
        Duration::from_secs(30),
        capstan_mesh::connect(nats, &capstan_protocol::access::Identity::Admin, &shutdown),
    )
    .await
    .expect("connects in time")
    .expect("connected");
    Mesh::open(client).await.expect("the mesh opens")
}

#[tokio::test]
async fn a_service_holding_its_nkey_seed_opens_the_mesh_where_anonymous_and_unknown_users_are_refused()
 {
    let service = user_seed();
    let server = NatsServer::start_with(NatsOptions {
        nkey_seeds: vec![user_seed(), service.clone()],
        ..NatsOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let mut nats = NatsArgs::for_url(server.url());
    nats.nats_creds = Some(write(
        &dir,
        "scheduler.nk",
        &format!("# the scheduler's identity\n{service}\n"),
    ));
    let mesh = open(&nats).await;
    mesh.jobs
        .get("no-such-job")
        .await
        .expect("the identity reads the jobs bucket");

    assert!(
        accepted(&server, async_nats::ConnectOptions::new().nkey(service)).await,
        "the known user is accepted"
    );
    assert!(
        !accepted(&server, async_nats::ConnectOptions::new()).await,
        "an anonymous connection was accepted"
    );
    assert!(
        !accepted(&server, async_nats::ConnectOptions::new().nkey(user_seed())).await,
        "an unknown NKEY user was accepted"
    );
}

#[tokio::test]
async fn a_credentials_file_that_is_missing_or_holds_no_user_seed_fails_at_once_without_showing_its_content()
 {
    let dir = tempfile::tempdir().expect("dir");
    let account_seed = nkeys::KeyPair::new_account().seed().expect("a seed");
    let cases = [
        (dir.path().join("absent.nk"), "absent.nk"),
        (write(&dir, "empty.nk", "# nothing here\n\n"), "no seed"),
        (
            write(&dir, "garbage.nk", "SUNOTASEED-secret-looking\n"),
            "not a valid NKEY seed",
        ),
        (write(&dir, "account.nk", &account_seed), "not a user's"),
        (
            write(
                &dir,
                "user.creds",
                "-----BEGIN NATS USER JWT-----\neyJ0eXAi.secret-jwt\n------END NATS USER JWT------\n",
            ),
            "JWT",
        ),
    ];
    let shutdown = CancellationToken::new();
    for (path, expected) in cases {
        let mut nats = NatsArgs::for_url("nats://127.0.0.1:1");
        nats.nats_creds = Some(path.clone());
        let started = std::time::Instant::now();
        let error =
            capstan_mesh::connect(&nats, &capstan_protocol::access::Identity::Admin, &shutdown)
                .await
                .expect_err("a bad credentials file is refused");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "refused at once, not after retries"
        );
        assert!(matches!(error, Error::Setup { .. }), "{error:?}");
        let message = format!("{error}: {:?}", std::error::Error::source(&error));
        assert!(
            message.contains(&path.display().to_string()) && message.contains(expected),
            "{message}"
        );
        for secret in [account_seed.as_str(), "secret-looking", "secret-jwt"] {
            assert!(
                !message.contains(secret),
                "the error shows the file: {message}"
            );
        }
    }
}

#[tokio::test]
async fn a_service_with_the_ca_and_a_client_certificate_connects_over_mutual_tls_and_a_client_without_them_is_refused()
 {
    let ca = TestCa::generate();
    let seed = user_seed();
    let server = NatsServer::start_with(NatsOptions {
        nkey_seeds: vec![seed.clone()],
        tls: Some(ca.files.clone()),
        ..NatsOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let mut nats = NatsArgs::for_url(server.url());
    nats.nats_creds = Some(write(&dir, "api.nk", &seed));
    nats.nats_ca = Some(ca.files.ca.clone());
    nats.nats_cert = Some(ca.files.client_cert.clone());
    nats.nats_key = Some(ca.files.client_key.clone());
    let mesh = open(&nats).await;
    mesh.nodes
        .get("no-such-node")
        .await
        .expect("the connection works");

    let trusted = async_nats::ConnectOptions::new()
        .nkey(seed.clone())
        .require_tls(true)
        .add_root_certificates(ca.files.ca.clone())
        .add_client_certificate(ca.files.client_cert.clone(), ca.files.client_key.clone());
    assert!(
        accepted(&server, trusted).await,
        "the trusted client is accepted"
    );
    let plain = async_nats::ConnectOptions::new().nkey(seed.clone());
    assert!(
        !accepted(&server, plain).await,
        "a plain connection was accepted"
    );
    let no_client_certificate = async_nats::ConnectOptions::new()
        .nkey(seed.clone())
        .require_tls(true)
        .add_root_certificates(ca.files.ca.clone());
    assert!(
        !accepted(&server, no_client_certificate).await,
        "a TLS connection without a client certificate was accepted"
    );
    let other = TestCa::generate();
    let untrusted_server = async_nats::ConnectOptions::new()
        .nkey(seed)
        .require_tls(true)
        .add_root_certificates(other.files.ca.clone())
        .add_client_certificate(
            other.files.client_cert.clone(),
            other.files.client_key.clone(),
        );
    assert!(
        !accepted(&server, untrusted_server).await,
        "a client trusting another CA connected"
    );

    let shutdown = CancellationToken::new();
    let mut missing = NatsArgs::for_url(server.url());
    missing.nats_ca = Some(ca.dir().join("no-such-ca.pem"));
    let error = capstan_mesh::connect(
        &missing,
        &capstan_protocol::access::Identity::Admin,
        &shutdown,
    )
    .await
    .expect_err("a missing CA file is refused");
    assert!(error.to_string().contains("no-such-ca.pem"), "{error}");

    let mut half = NatsArgs::for_url(server.url());
    half.nats_cert = Some(ca.files.client_cert.clone());
    let refused =
        capstan_mesh::connect(&half, &capstan_protocol::access::Identity::Admin, &shutdown)
            .await
            .expect_err("a certificate without its key is refused");
    assert!(matches!(refused, Error::Setup { .. }), "{refused:?}");
}

#[tokio::test]
async fn a_server_given_the_generated_identities_admits_each_one_and_the_client_only_to_submit_and_read()
 {
    use capstan_mesh::identities::{self, ClientName, Grants, Identity};
    use capstan_protocol::subjects::ClientCall;
    use capstan_protocol::{NodeId, subjects};
    use futures::StreamExt;

    let dir = tempfile::tempdir().expect("dir");
    let node = NodeId::new("exec-1").expect("valid");
    let viewer = Identity::Viewer(ClientName::new("auditor").expect("valid"));
    let mut all = Identity::all(std::slice::from_ref(&node));
    all.push(viewer.clone());
    let written = identities::init_with(dir.path(), &all, Grants::Least).expect("written");
    let seed = |identity: &Identity| {
        std::fs::read_to_string(written.seed_file(identity))
            .expect("seed")
            .trim()
            .to_owned()
    };
    let server = NatsServer::start_with(NatsOptions {
        include: Some(written.accounts.clone()),
        connect_seed: Some(seed(&Identity::Admin)),
        ..NatsOptions::default()
    })
    .await;
    // The admin creates the topology.
    let admin = server.client().await;
    Mesh::open(admin.clone())
        .await
        .expect("the admin creates the topology");
    for identity in &all {
        assert!(
            accepted(
                &server,
                async_nats::ConnectOptions::new().nkey(seed(identity))
            )
            .await,
            "{} refused",
            identity.name()
        );
    }
    assert!(
        !accepted(&server, async_nats::ConnectOptions::new()).await,
        "an anonymous connection was accepted"
    );

    let client = async_nats::ConnectOptions::new()
        .nkey(seed(&Identity::client()))
        .connect(server.url())
        .await
        .expect("the client connects");
    let js = async_nats::jetstream::new(client.clone());
    // Stored on the subject that names the client, whatever header claims otherwise.
    let mut claim = async_nats::HeaderMap::new();
    claim.insert(
        capstan_protocol::headers::SUBMITTED_BY,
        r#"{"principal": "admin", "via": "password"}"#,
    );
    let ack = js
        .publish_with_headers(subjects::SUBMIT, claim, r#"{"command": "true"}"#.into())
        .await
        .expect("sent")
        .await
        .expect("the client's submission is stored");
    let admin_js = async_nats::jetstream::new(admin.clone());
    let submissions = admin_js
        .get_stream(capstan_protocol::topology::SUBMISSIONS.name)
        .await
        .expect("stream");
    let stored = submissions
        .get_raw_message(ack.sequence)
        .await
        .expect("the submission");
    assert_eq!(
        stored.subject.as_str(),
        ClientCall::Submit.from("client"),
        "the stored subject names the client"
    );
    // A plain publish (`nats pub`) arrives the same way.
    client
        .publish(subjects::SUBMIT, r#"{"command": "true"}"#.into())
        .await
        .expect("published");
    client.flush().await.expect("flushed");
    capstan_testkit::wait_until("the plain publish stored", Duration::from_secs(10), || {
        let submissions = submissions.clone();
        async move {
            submissions
                .get_raw_message(ack.sequence + 1)
                .await
                .is_ok_and(|message| message.subject.as_str() == ClientCall::Submit.from("client"))
                .then_some(())
        }
    })
    .await;

    // A viewer follows events but cannot submit.
    let viewing = async_nats::ConnectOptions::new()
        .nkey(seed(&viewer))
        .connect(server.url())
        .await
        .expect("the viewer connects");
    let mut viewed = viewing
        .subscribe(subjects::EVENTS_ALL)
        .await
        .expect("subscribed");
    viewing.flush().await.expect("flushed");
    let refused = tokio::time::timeout(Duration::from_secs(2), async {
        async_nats::jetstream::new(viewing.clone())
            .publish(subjects::SUBMIT, r#"{"command": "true"}"#.into())
            .await
            .ok()?
            .await
            .ok()
    })
    .await;
    assert!(
        !matches!(refused, Ok(Some(_))),
        "the viewer's submission was stored"
    );
    assert!(
        submissions.get_raw_message(ack.sequence + 2).await.is_err(),
        "a third submission is stored"
    );
    let mut events = client
        .subscribe(subjects::EVENTS_ALL)
        .await
        .expect("subscribed");
    client.flush().await.expect("flushed");

    // What the client may not do is dropped by the server: a dispatch and an event.
    let dispatch = subjects::dispatch(&node);
    let forged = subjects::job_event(
        capstan_protocol::JobId::generate(),
        capstan_protocol::JobEventKind::Succeeded,
    );
    for subject in [dispatch.clone(), forged.clone()] {
        let stored = tokio::time::timeout(Duration::from_secs(2), async {
            js.publish(subject.clone(), "{}".into())
                .await
                .ok()?
                .await
                .ok()
        })
        .await;
        assert!(
            !matches!(stored, Ok(Some(_))),
            "the client stored a message on {subject}"
        );
    }
    for (stream, subject) in [
        (capstan_protocol::topology::DISPATCH.name, dispatch),
        (capstan_protocol::topology::EVENTS.name, forged),
    ] {
        let stream = admin_js.get_stream(stream).await.expect("stream");
        assert!(
            stream
                .get_last_raw_message_by_subject(&subject)
                .await
                .is_err(),
            "{subject} holds a message"
        );
    }
    // An event the admin publishes reaches the client.
    admin
        .publish(
            subjects::job_event(
                capstan_protocol::JobId::generate(),
                capstan_protocol::JobEventKind::Pending,
            ),
            "{}".into(),
        )
        .await
        .expect("published");
    let event = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("an event in time");
    assert!(event.is_some());
    let event = tokio::time::timeout(Duration::from_secs(10), viewed.next())
        .await
        .expect("an event in time for the viewer");
    assert!(event.is_some());
}

#[tokio::test]
async fn the_server_configuration_init_writes_runs_a_server_that_admits_only_the_mesh_and_services_verify_its_topology()
 {
    use capstan_mesh::identities::{self, Identity};
    use capstan_protocol::NodeId;

    let dir = tempfile::tempdir().expect("dir");
    let node = NodeId::new("exec-1").expect("valid");
    let written = identities::init(dir.path(), std::slice::from_ref(&node)).expect("written");
    let config = identities::server_config(&written, &dir.path().join("jetstream"))
        .expect("a server configuration");
    // Written once: an operator's edits are kept.
    std::fs::write(
        &config,
        std::fs::read_to_string(&config).expect("read") + "# edited\n",
    )
    .expect("edit");
    identities::server_config(&written, &dir.path().join("elsewhere")).expect("kept");
    assert!(
        std::fs::read_to_string(&config)
            .expect("read")
            .ends_with("# edited\n")
    );

    // The configuration as written (its client and monitoring ports moved off the defaults).
    let binary = capstan_testkit::natsbin::ensure().expect("a nats-server");
    let port = capstan_testkit::server::free_port();
    let monitor = capstan_testkit::server::free_port();
    let mut server = std::process::Command::new(binary)
        .arg("-c")
        .arg(&config)
        .args(["-p", &port.to_string(), "-m", &monitor.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("nats-server runs");
    let url = format!("nats://127.0.0.1:{port}");
    let seed = |identity: &Identity| {
        std::fs::read_to_string(written.seed_file(identity))
            .expect("seed")
            .trim()
            .to_owned()
    };
    let admin =
        capstan_testkit::wait_until("the server to admit admin", Duration::from_secs(30), || {
            let options = async_nats::ConnectOptions::new().nkey(seed(&Identity::Admin));
            let url = url.clone();
            async move { options.connect(url).await.ok() }
        })
        .await;
    let anonymous = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .connect(url.clone())
        .await;
    assert!(anonymous.is_err(), "an anonymous connection was accepted");

    // A service finds no topology, says so, and creates nothing.
    let mut nats = NatsArgs::for_url(url.clone());
    nats.nats_creds = Some(written.seed_file(&Identity::Scheduler));
    let shutdown = CancellationToken::new();
    let refused = tokio::time::timeout(
        Duration::from_secs(60),
        Mesh::connect(&nats, &Identity::Scheduler, &shutdown),
    )
    .await
    .expect("in time")
    .expect_err("no topology yet");
    assert!(
        refused.to_string().contains("capstan nats apply")
            || format!("{:?}", std::error::Error::source(&refused)).contains("capstan nats apply"),
        "{refused}: {:?}",
        std::error::Error::source(&refused)
    );
    let js = async_nats::jetstream::new(admin.clone());
    assert!(
        js.get_stream(capstan_protocol::topology::EVENTS.name)
            .await
            .is_err(),
        "the service created a stream"
    );

    // The administrator applies it; then the service opens the mesh.
    let applied = capstan_mesh::topology::apply(&js, &Default::default())
        .await
        .expect("applied");
    assert_eq!(applied.streams, capstan_protocol::topology::STREAMS.len());
    tokio::time::timeout(
        Duration::from_secs(60),
        Mesh::connect(&nats, &Identity::Scheduler, &shutdown),
    )
    .await
    .expect("in time")
    .expect("the scheduler opens the applied mesh");
    let _ = server.kill();
    let _ = server.wait();
}
