//! The OpenAPI document tells the truth about the running API: schemathesis (from PyPI)
//! generates requests from `/openapi.json` for every operation, as an administrator, and
//! checks every answer against the document — status codes documented, bodies matching their
//! schemas (no `null` where a field is not nullable), content types, `401` without a
//! credential, `405` with an `Allow` header for an undeclared method, no server error.
//!
//! A client generated from the document by openapi-python-client (from PyPI) logs in,
//! submits a job, follows it to its end and reads it, its events, the list, the nodes and the
//! caller (`clients/python_client.py`).
//!
//! Every check runs, `positive_data_acceptance` included (a request the document calls valid
//! is accepted), except that one on the three operations whose validity OpenAPI 3.0 cannot
//! state ([`ACCEPTANCE_EXCEPTIONS`]).

use std::process::Command;

use capstan_e2e::Cluster;
use capstan_testkit::http::HttpClient;
use serde_json::json;

/// schemathesis, exactly; its own dependencies are what pip resolves for it.
const REQUIREMENTS: [&str; 1] = ["schemathesis==4.32.5"];

/// The client generator, exactly; its own dependencies are what pip resolves for it.
const CLIENT_GENERATOR: [&str; 1] = ["openapi-python-client==0.29.1"];

/// The operations where a request the document calls valid may still be refused, because
/// what makes it valid is more than OpenAPI 3.0 can state: every other check runs on them,
/// and every other operation runs every check.
///
/// - `POST /api/v1/jobs`: label keys (a map's keys cannot be constrained in 3.0), a program
///   (`argv[0]`) that is not empty while later arguments may be, `run_at` within a year of
///   now, `secret_refs` naming secrets that exist and may be used by the caller, fan-out
///   targets that exist;
/// - `POST /api/v1/systems` and `PATCH /api/v1/systems/{name}`: a host key and a private key
///   that parse as SSH keys, and label keys.
const ACCEPTANCE_EXCEPTIONS: &str = r#"
# Every check, named here: on the command line a selection of checks would override the
# operations' settings below.
[checks]
not_a_server_error.enabled = true
status_code_conformance.enabled = true
content_type_conformance.enabled = true
response_headers_conformance.enabled = true
response_schema_conformance.enabled = true
negative_data_rejection.enabled = true
positive_data_acceptance.enabled = true
missing_required_header.enabled = true
unsupported_method.enabled = true
allow_header_conformance.enabled = true
use_after_free.enabled = true
ensure_resource_availability.enabled = true
ignored_auth.enabled = true
object_level_authorization.enabled = true

[[operations]]
include-path = "/api/v1/jobs"
include-method = "POST"
checks.positive_data_acceptance.enabled = false

[[operations]]
include-path = "/api/v1/systems"
include-method = "POST"
checks.positive_data_acceptance.enabled = false

[[operations]]
include-path = "/api/v1/systems/{name}"
include-method = "PATCH"
checks.positive_data_acceptance.enabled = false
"#;

/// A fixed seed: the same cases every run, so a failure can be replayed.
const SEED: &str = "20261203";

/// How many operations the document describes.
fn operation_count() -> usize {
    let spec: serde_json::Value =
        serde_json::from_str(&capstan_api::openapi_json()).expect("the document is JSON");
    spec["paths"]
        .as_object()
        .expect("paths")
        .values()
        .map(|operations| operations.as_object().map_or(0, serde_json::Map::len))
        .sum()
}

#[test]
fn the_document_declares_an_operation_id_for_every_operation_and_no_two_alike() {
    let spec: serde_json::Value =
        serde_json::from_str(&capstan_api::openapi_json()).expect("the document is JSON");
    let mut ids = Vec::new();
    for (path, operations) in spec["paths"].as_object().expect("paths") {
        for (method, operation) in operations.as_object().expect("operations") {
            let id = operation["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {path} has no operationId"));
            ids.push(id.to_owned());
        }
    }
    let count = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), count, "operationIds repeat: {ids:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_every_answer_of_the_running_api_as_its_document_describes() {
    let python = tokio::task::spawn_blocking(|| {
        capstan_testkit::pyenv::ensure("pyenv-schemathesis", &REQUIREMENTS, &[])
    })
    .await
    .expect("provisioning ran")
    .unwrap_or_else(|error| panic!("cannot provision schemathesis: {error}"));
    let schemathesis = python.with_file_name("schemathesis");

    // Requests without a credential are part of the checks: the address's allowance for
    // refused credentials is raised so that they get their `401`, not a `429`.
    let (cluster, base) = mesh("exec-1").await;
    let login = HttpClient::new(base.clone())
        .login("admin", capstan_api::TEST_ADMIN_PASSWORD)
        .await;
    let token = login.bearer().expect("an access token").to_owned();
    // Something to find: a job, ended.
    let reply = cluster
        .http(&base)
        .post_json("/api/v1/jobs", &json!({"argv": ["true"]}).to_string())
        .await;
    assert_eq!(reply.status.as_u16(), 202, "{}", reply.text());

    // schemathesis keeps a cache of what it found where it runs: in a directory of its own,
    // each run starts afresh and the checkout stays clean.
    let work = tempfile::tempdir().expect("a temporary directory");
    let cwd = work.path().to_owned();
    std::fs::write(cwd.join("schemathesis.toml"), ACCEPTANCE_EXCEPTIONS).expect("written");
    let run = tokio::task::spawn_blocking(move || {
        Command::new(&schemathesis)
            .current_dir(&cwd)
            .args(["run", &format!("{base}/openapi.json")])
            .args(["--header", &format!("Authorization: Bearer {token}")])
            .args(["--max-examples", "20", "--seed", SEED, "--no-color"])
            .output()
    })
    .await
    .expect("schemathesis ran")
    .unwrap_or_else(|error| panic!("cannot run schemathesis: {error}"));
    let printed = capstan_testkit::pyenv::printed(&run);
    assert!(
        run.status.success(),
        "schemathesis found answers the document does not describe:\n{printed}"
    );
    let operations = operation_count();
    assert!(
        printed.contains(&format!("Tested: {operations}")),
        "schemathesis did not test all {operations} operations:\n{printed}"
    );
}

/// A mesh with one executor and an API that answers every refused credential with `401`.
/// The node is one the cluster's identities already know: a new one makes the server reload
/// its accounts, and a service starting during the reload finds no topology.
async fn mesh(node: &str) -> (Cluster, String) {
    let mut cluster = Cluster::start().await;
    cluster.registry("registry-1");
    cluster.scheduler("scheduler-1");
    cluster.executor(node, 2, &[]);
    let base = cluster
        .api_with(
            "api-1",
            &[
                ("CAPSTAN_LOGIN_ADDRESS_BURST", "1000000".to_owned()),
                // Stored secrets are part of the API: with keys, they can be stored.
                (
                    "CAPSTAN_SECRET_KEYS",
                    capstan_secrets::KeyRing::generate_entry("k1").expect("a key"),
                ),
            ],
        )
        .await;
    cluster.wait_nodes_up(&[node]).await;
    (cluster, base)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_python_client_generated_from_the_document_runs_a_job_and_reads_what_it_did() {
    let python = tokio::task::spawn_blocking(|| {
        capstan_testkit::pyenv::ensure("pyenv-openapi-client", &CLIENT_GENERATOR, &[])
    })
    .await
    .expect("provisioning ran")
    .unwrap_or_else(|error| panic!("cannot provision openapi-python-client: {error}"));
    let (_cluster, base) = mesh("exec-1").await;

    // The client is generated from the document the running API serves.
    let work = tempfile::tempdir().expect("a temporary directory");
    let spec = HttpClient::new(base.clone()).get("/openapi.json").await;
    assert!(spec.status.is_success(), "{}", spec.text());
    std::fs::write(work.path().join("openapi.json"), spec.text()).expect("write the document");
    // No formatter runs after generation: the machine need not have one.
    std::fs::write(work.path().join("config.yml"), "post_hooks: []\n").expect("write the config");
    let generator = python.with_file_name("openapi-python-client");
    let generated = Command::new(&generator)
        .current_dir(work.path())
        .args(["generate", "--path", "openapi.json", "--meta", "none"])
        .args(["--config", "config.yml"])
        .output()
        .expect("run openapi-python-client");
    let printed = capstan_testkit::pyenv::printed(&generated);
    assert!(generated.status.success(), "generation failed:\n{printed}");
    // A schema the generator cannot take is left out of the client with a warning.
    assert!(
        !printed.contains("Warning") && !printed.contains("Unable to process"),
        "the generator could not take all of the document:\n{printed}"
    );

    let script = capstan_testkit::workspace_root().join("tests/e2e/clients/python_client.py");
    let run = Command::new(&python)
        .current_dir(work.path())
        .env("PYTHONPATH", work.path())
        .arg(&script)
        .args([base.as_str(), "admin", capstan_api::TEST_ADMIN_PASSWORD])
        .output()
        .expect("run the client");
    let printed = capstan_testkit::pyenv::printed(&run);
    assert!(
        run.status.success(),
        "the generated client failed:\n{printed}"
    );
    assert!(printed.contains("succeeded"), "{printed}");
}
