//! The deployment files agree with the code: `docker-compose.yml` starts binaries the
//! workspace builds (and the Dockerfile copies), sets only variables the services read, with
//! values they accept, runs a NATS recent enough, with JetStream, and gives the services a
//! database and a trace collector that it runs itself; `otel/collector.yaml` receives what the
//! services send and forwards it to the Jaeger that compose runs; NATS admits only the
//! identities `capstan nats init` writes, and each service connects as its own. The three
//! servers of `deploy/nats` form one cluster (each routed to the two others), each with room
//! for a copy of every stream, and nats-server accepts each beside the accounts block init
//! writes; the README says how to run them.
//!
//! These tests read files only (and ask `nats-server -t` about them): nothing here starts a
//! container or a server.

#[path = "shared/deployment.rs"]
mod deployment;
use deployment::{
    env_vars, known_binaries, nats_bytes, nats_settings, nats_version, service_binaries,
    telemetry_otel_variables,
};

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;

use yaml_rust2::{Yaml, YamlLoader};

/// Variables read by the shared telemetry set-up rather than by a flag.
const SHARED_CAPSTAN_VARIABLES: [&str; 2] = ["CAPSTAN_LOG", "CAPSTAN_LOG_FORMAT"];

fn read(relative: &str) -> String {
    let path = capstan_testkit::workspace_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

fn load_yaml(relative: &str) -> Yaml {
    YamlLoader::load_from_str(&read(relative))
        .unwrap_or_else(|e| panic!("{relative} is not valid YAML: {e}"))
        .pop()
        .unwrap_or_else(|| panic!("{relative} holds no document"))
}

fn compose() -> Yaml {
    load_yaml("docker-compose.yml")
}

/// The (sub)command a compose service's `command` runs: for `capstan nats apply`, the `apply`
/// subcommand of `nats`, whose options are the ones its variables stand for.
fn leaf(command: &clap::Command, args: &[String]) -> clap::Command {
    let mut leaf = command.clone();
    for arg in args.iter().skip(1) {
        match leaf.find_subcommand(arg) {
            Some(sub) => leaf = sub.clone(),
            None => break,
        }
    }
    leaf
}

/// The known binary `name`'s service runs, and the (sub)command it runs.
fn command_of(name: &str, binary: &str, service: &Yaml) -> clap::Command {
    let (_, command) = known_binaries()
        .into_iter()
        .find(|(known, _)| *known == binary)
        .unwrap_or_else(|| panic!("{name} runs {binary}, which the workspace does not build"));
    leaf(&command, &strings(&service["command"]))
}

fn strings(yaml: &Yaml) -> Vec<String> {
    yaml.as_vec()
        .map(|items| {
            items
                .iter()
                .filter_map(|item| item.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A scalar as compose would pass it to a container: numbers and booleans as their text.
fn scalar(yaml: &Yaml) -> Option<String> {
    match yaml {
        Yaml::String(text) | Yaml::Real(text) => Some(text.clone()),
        Yaml::Integer(number) => Some(number.to_string()),
        Yaml::Boolean(flag) => Some(flag.to_string()),
        _ => None,
    }
}

/// A service's `environment` map as (name, value) pairs (none when it sets none).
fn environment(name: &str, service: &Yaml) -> Vec<(String, String)> {
    if service["environment"].is_badvalue() {
        return Vec::new();
    }
    service["environment"]
        .as_hash()
        .unwrap_or_else(|| panic!("{name}: environment must be a map"))
        .iter()
        .map(|(key, value)| {
            let key = key.as_str().expect("variable name").to_owned();
            let value = scalar(value).unwrap_or_else(|| panic!("{name}: {key} has no value"));
            (key, value)
        })
        .collect()
}

fn variable(name: &str, service: &Yaml, key: &str) -> Option<String> {
    environment(name, service)
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, value)| value)
}

/// The compose services that run a Capstan binary: (service name, binary, definition).
fn capstan_services(compose: &Yaml) -> Vec<(String, String, Yaml)> {
    compose["services"]
        .as_hash()
        .expect("services")
        .iter()
        .filter_map(|(name, service)| {
            let binary = strings(&service["command"]).into_iter().next()?;
            binary.starts_with("capstan").then(|| {
                (
                    name.as_str().expect("service name").to_owned(),
                    binary,
                    service.clone(),
                )
            })
        })
        .collect()
}

fn service<'a>(compose: &'a Yaml, name: &str) -> &'a Yaml {
    let service = &compose["services"][name];
    assert!(!service.is_badvalue(), "compose runs no service {name}");
    service
}

/// `host` and `port` of an address such as `http://otel-collector:4318`, `jaeger:4317` or
/// `0.0.0.0:4318`.
fn host_and_port(address: &str) -> (String, u16) {
    let without_scheme = address.split_once("://").map_or(address, |(_, rest)| rest);
    let authority = without_scheme.split('/').next().unwrap_or_default();
    let (host, port) = authority
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{address} names no port"));
    let port = port
        .parse()
        .unwrap_or_else(|_| panic!("{address}: bad port"));
    (host.to_owned(), port)
}

/// The compose service that runs the collector with `otel/collector.yaml`: its name.
fn collector_service(compose: &Yaml) -> String {
    let services = compose["services"].as_hash().expect("services");
    let (name, collector) = services
        .iter()
        .find(|(_, service)| {
            strings(&service["volumes"])
                .iter()
                .any(|volume| volume.starts_with("./otel/collector.yaml:"))
        })
        .expect("a compose service mounts otel/collector.yaml");
    let name = name.as_str().expect("service name").to_owned();
    let image = collector["image"].as_str().expect("collector image");
    assert!(
        image.contains("opentelemetry-collector"),
        "{name} runs {image}, not an OpenTelemetry Collector"
    );
    let volume = strings(&collector["volumes"])
        .into_iter()
        .find(|volume| volume.starts_with("./otel/collector.yaml:"))
        .expect("the mount");
    let mut parts = volume.split(':').skip(1);
    let target = parts.next().expect("a target path");
    assert_eq!(
        parts.next(),
        Some("ro"),
        "{name} must mount its config read-only"
    );
    let config_flag = format!("--config={target}");
    assert!(
        strings(&collector["command"]).contains(&config_flag),
        "{name} must be started with {config_flag}"
    );
    name
}

/// The port the collector takes OTLP over HTTP on, from `otel/collector.yaml`.
fn collector_http_port(config: &Yaml) -> u16 {
    let endpoint = config["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
        .as_str()
        .expect("receivers.otlp.protocols.http.endpoint");
    let (host, port) = host_and_port(endpoint);
    // In a container, `localhost` would refuse every other container.
    assert_eq!(
        host, "0.0.0.0",
        "the OTLP/HTTP receiver listens on {endpoint}"
    );
    port
}

#[test]
fn compose_services_run_built_binaries_with_variables_they_read() {
    let compose = compose();
    let dockerfile = read("deploy/Dockerfile");
    let otel = telemetry_otel_variables();
    let mut seen = HashSet::new();
    for (name, binary, service) in capstan_services(&compose) {
        let vars = env_vars(&command_of(&name, &binary, &service));
        assert!(
            dockerfile.contains(binary.as_str()),
            "the image lacks {binary}"
        );
        seen.insert(binary.clone());
        for (key, _) in environment(&name, &service) {
            if key.starts_with("OTEL_") {
                assert!(
                    otel.contains(&key),
                    "{name} sets {key}, which libs/telemetry does not read"
                );
            } else {
                assert!(
                    vars.contains(&key) || SHARED_CAPSTAN_VARIABLES.contains(&key.as_str()),
                    "{name} sets {key}, which {binary} does not read"
                );
            }
        }
        if vars.contains("CAPSTAN_NATS_URL") {
            assert!(
                variable(&name, &service, "CAPSTAN_NATS_URL").is_some(),
                "{name} must be told where NATS is"
            );
        }
    }
    for (binary, _) in known_binaries() {
        assert!(seen.contains(binary), "compose does not run {binary}");
    }
}

/// `key` of a service, or of what it merges in (`<<: *capstan`) when it does not set it.
fn merged<'a>(service: &'a Yaml, key: &str) -> &'a Yaml {
    let own = &service[key];
    if own.is_badvalue() {
        &service["<<"][key]
    } else {
        own
    }
}

/// The seed file compose gives `identity`, in the identities volume.
fn seed_in_volume(identity: &capstan_mesh::identities::Identity) -> String {
    format!("/identities/{}.nk", identity.name())
}

#[test]
fn compose_nats_admits_only_the_identities_init_writes_and_each_service_connects_as_its_own() {
    use capstan_mesh::identities::{Identity, SERVER_CONFIG};
    let compose = compose();
    let init = strings(&service(&compose, "nats-init")["command"]);
    assert_eq!(init[..3], ["capstan", "nats", "init"], "{init:?}");
    let dir = init
        .windows(2)
        .find(|pair| pair[0] == "--dir")
        .map(|pair| pair[1].clone())
        .expect("nats-init names its directory");
    let nodes: Vec<String> = init
        .windows(2)
        .filter(|pair| pair[0] == "--node")
        .map(|pair| pair[1].clone())
        .collect();
    // The server runs the configuration init writes, which includes the accounts block.
    let nats = strings(&service(&compose, "nats")["command"]);
    assert_eq!(nats, ["-c".to_owned(), format!("{dir}/{SERVER_CONFIG}")]);
    // The administrator applies the topology; each service connects as its own identity.
    let topology = service(&compose, "nats-topology");
    assert_eq!(strings(&topology["command"]), ["capstan", "nats", "apply"]);
    let mut executors = HashSet::new();
    for (name, binary, service) in capstan_services(&compose) {
        // These two write files and connect to nothing.
        if binary == "capstan" && ["nats-init", "secret-keys"].contains(&name.as_str()) {
            continue;
        }
        let identity = match binary.as_str() {
            "capstan" => Identity::Admin,
            "capstan-registry" => Identity::Registry,
            "capstan-scheduler" => Identity::Scheduler,
            "capstan-api" => Identity::Api,
            "capstan-executor" => {
                let node = variable(&name, &service, "CAPSTAN_NODE_ID")
                    .unwrap_or_else(|| panic!("{name} names its node"));
                assert!(
                    nodes.contains(&node),
                    "nats-init writes no identity for {node}"
                );
                assert!(executors.insert(node.clone()), "two executors are {node}");
                Identity::Executor(capstan_protocol::NodeId::new(node).expect("valid"))
            }
            other => panic!("{name} runs {other}"),
        };
        assert_eq!(
            variable(&name, &service, "CAPSTAN_NATS_CREDS"),
            Some(seed_in_volume(&identity).replace("/identities", &dir)),
            "{name} must connect as {}",
            identity.name()
        );
        assert!(
            strings(merged(&service, "volumes"))
                .iter()
                .any(|volume| volume.ends_with(&format!(":{dir}:ro"))),
            "{name} must see the identities, read-only"
        );
    }
    assert!(executors.len() >= 2, "the mesh runs several executor nodes");
    let mut wanted: Vec<String> = executors.into_iter().collect();
    wanted.sort();
    let mut written = nodes.clone();
    written.sort();
    assert_eq!(written, wanted, "identities for nodes compose does not run");
}

#[test]
fn compose_gives_the_secret_keys_to_the_api_and_the_executors_only() {
    let compose = compose();
    let keys = strings(&service(&compose, "secret-keys")["command"]);
    assert_eq!(keys[..3], ["capstan", "secrets", "key"], "{keys:?}");
    let file = keys
        .windows(2)
        .find(|pair| pair[0] == "--out")
        .map(|pair| pair[1].clone())
        .expect("secret-keys names its file");
    let dir = file.rsplit_once('/').expect("a directory").0.to_owned();
    // A new volume takes its mount point's owner from the image: the unprivileged user must
    // own it to write the keys there.
    let owned = read("deploy/Dockerfile")
        .lines()
        .any(|line| line.contains("chown capstan") && line.contains(dir.as_str()));
    assert!(owned, "the image must give {dir} to its user");
    for (name, binary, service) in capstan_services(&compose) {
        let holds = matches!(binary.as_str(), "capstan-api" | "capstan-executor");
        let mounted = strings(merged(&service, "volumes"))
            .iter()
            .any(|volume| volume.ends_with(&format!(":{dir}:ro")));
        let keys_file = variable(&name, &service, "CAPSTAN_SECRET_KEYS_FILE");
        if holds {
            assert_eq!(
                keys_file.as_deref(),
                Some(file.as_str()),
                "{name} needs the keys"
            );
            assert!(mounted, "{name} must see the keys, read-only");
            assert!(
                !merged(&service, "depends_on")["secret-keys"].is_badvalue(),
                "{name} must start after the keys are written"
            );
            // Its jobs must not run as the user that owns the keys and the seeds.
            if binary == "capstan-executor" {
                let run_as = variable(&name, &service, "CAPSTAN_RUN_AS");
                assert!(
                    run_as.as_deref().is_some_and(|user| user != "capstan"),
                    "{name} must run its jobs as another user: {run_as:?}"
                );
                assert_eq!(
                    scalar(merged(&service, "user")).as_deref(),
                    Some("root"),
                    "{name} must be root to run jobs as another user"
                );
            }
        } else if name != "secret-keys" {
            assert!(
                keys_file.is_none() && !mounted,
                "{name} must not hold the keys"
            );
        }
    }
}

#[test]
fn compose_variables_hold_values_the_services_accept() {
    let compose = compose();
    let binaries = known_binaries();
    for (name, binary, service) in capstan_services(&compose) {
        let (_, command) = binaries
            .iter()
            .find(|(known, _)| *known == binary)
            .unwrap_or_else(|| panic!("{name} runs {binary}, which the workspace does not build"));
        // The service's own arguments, then each variable as the flag it stands for, so clap
        // parses the value as it would parse the variable, without touching this process's
        // environment.
        let mut args = strings(&service["command"]);
        let command_leaf = leaf(command, &args);
        for (key, value) in environment(&name, &service) {
            let flag = command_leaf
                .get_arguments()
                .find(|arg| arg.get_env().is_some_and(|env| env == key.as_str()))
                .and_then(|arg| arg.get_long());
            if let Some(flag) = flag {
                args.push(format!("--{flag}={value}"));
            }
        }
        if let Err(error) = command.clone().try_get_matches_from(&args) {
            panic!("{name}: {binary} rejects {args:?}:\n{error}");
        }
    }
}

#[test]
fn compose_runs_a_nats_server_with_jetstream_recent_enough_for_capstan() {
    let compose = compose();
    let nats = service(&compose, "nats");
    let image = nats["image"].as_str().expect("nats image");
    let tag = image.split(':').nth(1).expect("a pinned tag");
    assert!(
        nats_version(tag) >= capstan_testkit::natsbin::MIN_VERSION,
        "{image} is older than {:?}",
        capstan_testkit::natsbin::MIN_VERSION
    );
    // It runs the configuration `capstan nats init` writes, which turns JetStream on, keeps the
    // store where compose mounts its volume, serves the monitoring port the health check asks,
    // and includes the accounts block.
    let init = strings(&service(&compose, "nats-init")["command"]);
    let store = init
        .windows(2)
        .find(|pair| pair[0] == "--store-dir")
        .map(|pair| pair[1].clone())
        .expect("nats-init names the store");
    assert!(
        strings(&nats["volumes"])
            .iter()
            .any(|volume| volume.ends_with(&format!(":{store}"))),
        "the store {store} is not on a volume"
    );
    let dir = tempfile::tempdir().expect("dir");
    let node = capstan_protocol::NodeId::new("exec-1").expect("valid");
    let written = capstan_mesh::identities::init(dir.path(), &[node]).expect("identities");
    let config = capstan_mesh::identities::server_config(&written, Path::new(&store))
        .expect("a server configuration");
    let config = std::fs::read_to_string(config).expect("read");
    assert!(config.contains("jetstream {"), "{config}");
    assert!(
        config.contains(&format!("store_dir: {store:?}")),
        "{config}"
    );
    assert!(
        config.contains(&format!("include {:?}", capstan_mesh::identities::ACCOUNTS)),
        "{config}"
    );
    let health = strings(&nats["healthcheck"]["test"]).join(" ");
    assert!(
        config.contains("http_port: 8222") && health.contains("localhost:8222"),
        "the health check asks a port the server does not serve: {health}"
    );
}

#[test]
fn the_image_carries_every_binary_the_services_declare() {
    let dockerfile = read("deploy/Dockerfile");
    let copied: HashSet<&str> = dockerfile
        .split_whitespace()
        .filter_map(|word| word.strip_prefix("target/release/"))
        .collect();
    let binaries = service_binaries();
    for binary in ["capstan-api", "capstan"] {
        assert!(
            binaries.iter().any(|b| b == binary),
            "services declare no binary {binary}: {binaries:?}"
        );
    }
    for binary in &binaries {
        assert!(
            copied.contains(binary.as_str()),
            "deploy/Dockerfile does not copy {binary}"
        );
    }
}

#[test]
fn the_image_is_built_with_a_rust_at_least_the_workspace_rust_version() {
    fn version(text: &str) -> (u32, u32) {
        let mut parts = text.split('.').map(|p| p.parse().expect("a number"));
        (parts.next().expect("major"), parts.next().expect("minor"))
    }
    let manifest = read("Cargo.toml");
    let required = manifest
        .lines()
        .find_map(|line| line.trim().strip_prefix("rust-version"))
        .map(|value| {
            value
                .trim_start()
                .trim_start_matches('=')
                .trim()
                .trim_matches('"')
        })
        .expect("the workspace declares a rust-version");
    let dockerfile = read("deploy/Dockerfile");
    let builder = dockerfile
        .split_whitespace()
        .find_map(|word| word.strip_prefix("rust:"))
        .expect("the build stage uses the official rust image");
    let tag = builder.split('-').next().expect("a version tag");
    assert!(
        version(tag) >= version(required),
        "rust:{builder} is older than the workspace's rust-version {required}"
    );
}

#[test]
fn collector_config_parses_receives_otlp_over_http_on_4318_and_exports_traces_to_jaeger() {
    let config = load_yaml("otel/collector.yaml");
    assert_eq!(collector_http_port(&config), 4318);

    let traces = &config["service"]["pipelines"]["traces"];
    assert!(
        strings(&traces["receivers"]).contains(&"otlp".to_owned()),
        "the traces pipeline must take what the otlp receiver gets"
    );
    // Every component the pipeline names must be declared, or the collector will not start.
    for processor in strings(&traces["processors"]) {
        assert!(
            !config["processors"][processor.as_str()].is_badvalue(),
            "the traces pipeline uses undeclared processor {processor}"
        );
    }
    let exporters = strings(&traces["exporters"]);
    assert!(!exporters.is_empty(), "the traces pipeline exports nowhere");
    let compose = compose();
    let mut to_jaeger = Vec::new();
    for exporter in &exporters {
        let declared = &config["exporters"][exporter.as_str()];
        assert!(
            !declared.is_badvalue(),
            "the traces pipeline uses undeclared exporter {exporter}"
        );
        let kind = exporter.split('/').next().unwrap_or_default();
        if !["otlp", "otlp_grpc", "otlphttp", "otlp_http"].contains(&kind) {
            continue;
        }
        let endpoint = declared["endpoint"]
            .as_str()
            .unwrap_or_else(|| panic!("exporter {exporter} has no endpoint"));
        let (host, _) = host_and_port(endpoint);
        let target = service(&compose, &host);
        let image = target["image"].as_str().unwrap_or_default();
        if image.contains("jaeger") {
            to_jaeger.push(exporter.clone());
        }
    }
    assert!(
        !to_jaeger.is_empty(),
        "no exporter of the traces pipeline ({exporters:?}) sends to a Jaeger compose runs"
    );
    let jaeger_ports = strings(&service(&compose, "jaeger")["ports"]);
    assert!(
        jaeger_ports.iter().any(|port| port.ends_with(":16686")),
        "the Jaeger UI must be published: {jaeger_ports:?}"
    );
}

#[test]
fn every_capstan_service_in_compose_sends_traces_to_the_collector() {
    let compose = compose();
    let collector = collector_service(&compose);
    let port = collector_http_port(&load_yaml("otel/collector.yaml"));
    // The services export OTLP/HTTP (protobuf): the HTTP receiver's port, with an http URL.
    let expected = format!("http://{collector}:{port}");
    // The administration command's one-shot runs (identities, topology) are not the mesh.
    let services: Vec<_> = capstan_services(&compose)
        .into_iter()
        .filter(|(_, binary, _)| binary != "capstan")
        .collect();
    assert!(services.len() >= 4, "compose runs every Capstan service");
    for (name, _, service) in services {
        assert_eq!(
            variable(&name, &service, "OTEL_EXPORTER_OTLP_ENDPOINT").as_deref(),
            Some(expected.as_str()),
            "{name} must send its spans to {expected}"
        );
        // Every replica of a service reports under the same default name, capstan-<service>.
        assert!(
            variable(&name, &service, "OTEL_SERVICE_NAME").is_none(),
            "{name} must keep its default service name"
        );
    }
}

#[test]
fn postgres_in_compose_is_the_database_the_api_is_given() {
    let compose = compose();
    let (name, _, api) = capstan_services(&compose)
        .into_iter()
        .find(|(_, binary, _)| binary == "capstan-api")
        .expect("compose runs the api");
    let url = variable(&name, &api, "CAPSTAN_DATABASE_URL").expect("the api's database URL");
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .unwrap_or_else(|| panic!("{url} is not a PostgreSQL URL"));
    let (credentials, location) = rest.split_once('@').expect("credentials in the URL");
    let (user, password) = credentials.split_once(':').expect("user:password");
    let (address, database) = location.split_once('/').expect("a database name");
    let database = database.split('?').next().unwrap_or_default();
    let (host, port) = address
        .split_once(':')
        .map_or((address, "5432"), |(host, port)| (host, port));

    let postgres = service(&compose, host);
    let image = postgres["image"].as_str().expect("postgres image");
    assert!(
        image.starts_with("postgres:"),
        "{host} runs {image}, not the official PostgreSQL image"
    );
    assert_eq!(port, "5432", "the official image listens on 5432");
    assert_eq!(
        variable(host, postgres, "POSTGRES_USER").as_deref(),
        Some(user)
    );
    assert_eq!(
        variable(host, postgres, "POSTGRES_PASSWORD").as_deref(),
        Some(password)
    );
    // The image names the database after the user unless POSTGRES_DB says otherwise.
    let created = variable(host, postgres, "POSTGRES_DB").unwrap_or_else(|| user.to_owned());
    assert_eq!(created, database);

    let healthcheck = strings(&postgres["healthcheck"]["test"]);
    assert!(
        healthcheck.iter().any(|part| part.contains("pg_isready")),
        "{host} must report healthy only once it accepts connections"
    );
    assert!(
        strings(&postgres["volumes"])
            .iter()
            .any(|volume| volume.contains(":/var/lib/postgresql")),
        "{host} must keep its data in a volume"
    );
    assert_eq!(
        api["depends_on"][host]["condition"].as_str(),
        Some("service_healthy"),
        "{name} must wait for {host} to be healthy"
    );
}

#[test]
fn the_api_listens_on_the_port_compose_publishes() {
    let compose = compose();
    let (name, _, api) = capstan_services(&compose)
        .into_iter()
        .find(|(_, binary, _)| binary == "capstan-api")
        .expect("compose runs the api");
    let listen = variable(&name, &api, "CAPSTAN_API_LISTEN").expect("the api's listen address");
    let address: SocketAddr = listen.parse().unwrap_or_else(|e| panic!("{listen}: {e}"));
    assert!(
        address.ip().is_unspecified(),
        "{name} listens on {listen}, unreachable from outside its container"
    );
    let published = strings(&api["ports"]);
    assert!(
        published
            .iter()
            .any(|port| port.ends_with(&format!(":{}", address.port()))),
        "{name} listens on {listen} but publishes {published:?}"
    );
    assert!(
        read("deploy/Dockerfile").contains(&format!("EXPOSE {}", address.port())),
        "the image should declare the api's port"
    );
}

#[test]
fn the_api_in_compose_answers_its_own_healthcheck_and_keeps_its_key_on_a_volume() {
    let compose = compose();
    let (name, _, api) = capstan_services(&compose)
        .into_iter()
        .find(|(_, binary, _)| binary == "capstan-api")
        .expect("compose runs the api");
    // The healthcheck's request must name a host the API serves, or the guard refuses it.
    // (Every part must be a string: a bare `Host: x` in YAML would turn into a mapping.)
    let parts = &api["healthcheck"]["test"];
    let check = strings(parts).join(" ");
    assert_eq!(
        strings(parts).len(),
        parts.as_vec().map_or(0, Vec::len),
        "{name}'s healthcheck has a part that is not a string"
    );
    let host = check
        .split("Host:")
        .nth(1)
        .and_then(|rest| rest.split('\\').next())
        .map(str::trim)
        .unwrap_or_else(|| panic!("{name}'s healthcheck names no Host: {check}"));
    let allowed = variable(&name, &api, "CAPSTAN_API_ALLOWED_HOSTS")
        .unwrap_or_else(|| panic!("{name} listens on all addresses: it must list its hosts"));
    assert!(
        allowed
            .split(',')
            .any(|h| h.trim() == host || h.trim() == "*"),
        "{name}'s healthcheck asks for `{host}`, not in {allowed}"
    );
    // Its data directory (where a generated signing key lives) survives a new container.
    let data = variable(&name, &api, "CAPSTAN_DATA_DIR").expect("a data directory");
    let volumes = strings(&api["volumes"]);
    assert!(
        volumes.iter().any(|v| v.ends_with(&format!(":{data}"))),
        "{name} keeps {data} in {volumes:?}"
    );
    assert!(
        read("deploy/Dockerfile").contains(&format!("chown capstan {data}")),
        "the image should let the service user write {data}"
    );
    // No secret is written into the compose file.
    for secret in ["CAPSTAN_JWT_KEY", "CAPSTAN_ADMIN_PASSWORD"] {
        assert!(
            variable(&name, &api, secret).is_none(),
            "{secret} in compose"
        );
    }
}

/// The `host:port` targets each job of the Prometheus configuration scrapes: its static
/// targets, and `name:port` for each DNS name it discovers.
fn scrape_targets(config: &Yaml) -> Vec<(String, HashSet<String>)> {
    config["scrape_configs"]
        .as_vec()
        .expect("scrape_configs")
        .iter()
        .map(|job| {
            let name = job["job_name"].as_str().expect("job_name").to_owned();
            let mut targets = HashSet::new();
            for group in job["static_configs"].as_vec().into_iter().flatten() {
                targets.extend(strings(&group["targets"]));
            }
            for discovery in job["dns_sd_configs"].as_vec().into_iter().flatten() {
                let port = discovery["port"].as_i64().expect("a port");
                for host in strings(&discovery["names"]) {
                    targets.insert(format!("{host}:{port}"));
                }
            }
            (name, targets)
        })
        .collect()
}

#[test]
fn prometheus_scrapes_every_capstan_service_in_compose_where_it_serves_its_metrics() {
    let compose = compose();
    let jobs = scrape_targets(&load_yaml("deploy/prometheus/prometheus.yml"));
    let services: Vec<_> = capstan_services(&compose)
        .into_iter()
        .filter(|(_, binary, _)| binary != "capstan")
        .collect();
    assert!(services.len() >= 4, "compose runs every Capstan service");
    for (name, binary, service) in services {
        let listen = variable(&name, &service, "CAPSTAN_METRICS_LISTEN")
            .unwrap_or_else(|| panic!("{name} serves no metrics (CAPSTAN_METRICS_LISTEN)"));
        let (_, port) = host_and_port(&listen);
        let target = format!("{name}:{port}");
        // The job is named after the service the binary runs: capstan-executor → executor.
        let job = binary.trim_start_matches("capstan-");
        let scraped = jobs
            .iter()
            .find(|(job_name, _)| job_name == job)
            .unwrap_or_else(|| panic!("prometheus has no job {job}"));
        assert!(
            scraped.1.contains(&target),
            "prometheus job {job} does not scrape {target}: {:?}",
            scraped.1
        );
    }
    // Prometheus and Grafana, with the dashboard and its provisioning, run beside the mesh.
    let prometheus = service(&compose, "prometheus");
    assert!(
        strings(&prometheus["volumes"])
            .iter()
            .any(|volume| volume.starts_with("./deploy/prometheus/prometheus.yml:")),
        "compose's prometheus must use deploy/prometheus/prometheus.yml"
    );
    let grafana = strings(&service(&compose, "grafana")["volumes"]);
    for mounted in [
        "./deploy/grafana/provisioning:",
        "./deploy/grafana/capstan.json:",
    ] {
        assert!(
            grafana.iter().any(|volume| volume.starts_with(mounted)),
            "compose's grafana must mount {mounted}"
        );
    }
}

/// The servers of `deploy/nats`: each file's name (`nats-1.conf`…) and text, in name order.
fn nats_cluster_files() -> Vec<(String, String)> {
    let dir = capstan_testkit::workspace_root().join("deploy/nats");
    let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "conf"))
        .map(|path| {
            let name = path
                .file_name()
                .and_then(|name| name.to_str())
                .expect("a file name")
                .to_owned();
            let text = std::fs::read_to_string(&path).expect("readable");
            (name, text)
        })
        .collect();
    files.sort();
    files
}

#[test]
fn the_nats_cluster_files_route_each_of_three_servers_to_the_two_others_in_one_named_cluster() {
    let files = nats_cluster_files();
    let names: Vec<&str> = files.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["nats-1.conf", "nats-2.conf", "nats-3.conf"]);
    let servers: Vec<(String, HashMap<String, String>, Vec<String>)> = files
        .iter()
        .map(|(file, text)| {
            let (settings, routes) = nats_settings(text);
            (file.clone(), settings, routes)
        })
        .collect();
    let setting = |(file, settings, _): &(String, HashMap<String, String>, Vec<String>),
                   key: &str| {
        settings
            .get(key)
            .unwrap_or_else(|| panic!("{file} sets no {key}"))
            .clone()
    };
    let server_names: Vec<String> = servers.iter().map(|s| setting(s, "server_name")).collect();
    assert_eq!(
        server_names,
        ["nats-1", "nats-2", "nats-3"],
        "each server is named after its file"
    );
    // One cluster, one set of ports: each server runs on a host of its own.
    for key in ["cluster.name", "cluster.port", "port", "http_port"] {
        let values: HashSet<String> = servers.iter().map(|s| setting(s, key)).collect();
        assert_eq!(values.len(), 1, "the servers differ in {key}: {values:?}");
    }
    let cluster_port = setting(&servers[0], "cluster.port");
    for (index, server) in servers.iter().enumerate() {
        let (file, _, routes) = server;
        let others: HashSet<String> = server_names
            .iter()
            .enumerate()
            .filter(|(other, _)| *other != index)
            .map(|(_, name)| format!("nats://{name}:{cluster_port}"))
            .collect();
        let routes: HashSet<String> = routes.iter().cloned().collect();
        assert_eq!(
            routes, others,
            "{file}: the routes name the two other servers"
        );
        // Three copies on three servers: each server holds every stream and bucket.
        let max_store = nats_bytes(&setting(server, "jetstream.max_file_store"));
        assert!(
            max_store >= capstan_protocol::topology::reserved_bytes(),
            "{file}: {max_store} bytes cannot hold a copy of every stream and bucket"
        );
        assert!(!setting(server, "jetstream.store_dir").is_empty());
    }
}

#[test]
fn nats_server_accepts_each_cluster_file_beside_the_accounts_block_init_writes() {
    let dir = tempfile::tempdir().expect("dir");
    let node = capstan_protocol::NodeId::new("exec-1").expect("valid");
    capstan_mesh::identities::init(dir.path(), &[node]).expect("identities");
    let server = capstan_testkit::natsbin::ensure().expect("a nats-server");
    for (file, text) in nats_cluster_files() {
        assert!(
            text.contains(&format!("include {:?}", capstan_mesh::identities::ACCOUNTS)),
            "{file} includes the accounts block"
        );
        let path = dir.path().join(&file);
        std::fs::write(&path, &text).expect("write");
        let output = std::process::Command::new(&server)
            .arg("-t")
            .arg("-c")
            .arg(&path)
            .output()
            .expect("run nats-server");
        assert!(
            output.status.success(),
            "nats-server refuses {file}:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn the_readme_tells_how_to_run_the_nats_cluster_and_apply_three_copies() {
    let readme = read("README.md");
    let section = readme
        .split("\n## NATS cluster\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("the README has a NATS cluster section");
    for (file, _) in nats_cluster_files() {
        assert!(
            section.contains(&format!("deploy/nats/{file}")),
            "the section names {file}"
        );
    }
    assert!(section.contains("capstan nats apply"), "{section}");
    assert!(section.contains("--replicas"), "{section}");
}
