//! What the deployment-file tests (`deploy.rs` for compose and `deploy/nats`, `k8s.rs` for
//! Kubernetes) read from the code the files must agree with: the binaries the workspace builds,
//! their configuration, and the variables the telemetry crate reads; and how they read a
//! nats-server configuration.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use clap::CommandFactory;

/// Every Capstan binary a compose service may run, with its configuration.
pub fn known_binaries() -> [(&'static str, clap::Command); 5] {
    [
        ("capstan-registry", capstan_registry::Config::command()),
        ("capstan-scheduler", capstan_scheduler::Config::command()),
        ("capstan-executor", capstan_executor::Config::command()),
        ("capstan-api", capstan_api::Config::command()),
        ("capstan", capstan_api::admin::Cli::command()),
    ]
}

pub fn env_vars(command: &clap::Command) -> HashSet<String> {
    command
        .get_arguments()
        .filter_map(|arg| arg.get_env())
        .map(|env| env.to_string_lossy().into_owned())
        .collect()
}

/// The `OTEL_*` variables libs/telemetry reads: every string literal naming one in its sources.
/// Scanning keeps this in step with the crate; documentation mentions (in backticks, such as
/// variables the OpenTelemetry SDK reads by itself) do not count.
pub fn telemetry_otel_variables() -> HashSet<String> {
    fn scan(dir: &Path, found: &mut HashSet<String>) {
        for entry in std::fs::read_dir(dir)
            .expect("readable directory")
            .flatten()
        {
            let path = entry.path();
            if path.is_dir() {
                scan(&path, found);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("readable source");
                for (start, _) in text.match_indices("\"OTEL_") {
                    let rest = &text[start + 1..];
                    if let Some(end) = rest.find('"') {
                        found.insert(rest[..end].to_owned());
                    }
                }
            }
        }
    }
    let mut found = HashSet::new();
    scan(
        &capstan_testkit::workspace_root().join("libs/telemetry/src"),
        &mut found,
    );
    assert!(
        found.contains("OTEL_EXPORTER_OTLP_ENDPOINT"),
        "libs/telemetry no longer names OTEL_EXPORTER_OTLP_ENDPOINT; found {found:?}"
    );
    found
}

/// The `[[bin]]` names declared by the services' manifests.
pub fn service_binaries() -> Vec<String> {
    let root = capstan_testkit::workspace_root();
    let mut binaries = Vec::new();
    for entry in std::fs::read_dir(root.join("services"))
        .expect("services directory")
        .flatten()
    {
        let Ok(manifest) = std::fs::read_to_string(entry.path().join("Cargo.toml")) else {
            continue;
        };
        let mut in_bin = false;
        for line in manifest.lines().map(str::trim) {
            if line.starts_with('[') {
                in_bin = line == "[[bin]]";
            } else if in_bin && let Some(value) = line.strip_prefix("name") {
                let name = value.trim_start().trim_start_matches('=').trim();
                binaries.push(name.trim_matches('"').to_owned());
            }
        }
    }
    binaries
}

/// The (major, minor, patch) a NATS image tag names (`2.14.6`, `2.14.6-alpine`); a tag
/// without a patch (`2.14-alpine`) follows the newest patch of its minor version.
pub fn nats_version(tag: &str) -> (u32, u32, u32) {
    let mut version = tag.split(['.', '-']);
    let major: u32 = version.next().and_then(|v| v.parse().ok()).expect("major");
    let minor: u32 = version.next().and_then(|v| v.parse().ok()).expect("minor");
    let patch: u32 = version
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(u32::MAX);
    (major, minor, patch)
}

/// A nats-server configuration's settings, read line by line: `block.key` → value (blocks
/// joined by dots; top-level keys alone), and the quoted URLs of `cluster.routes`.
pub fn nats_settings(config: &str) -> (HashMap<String, String>, Vec<String>) {
    let mut settings = HashMap::new();
    let mut routes = Vec::new();
    let mut blocks: Vec<String> = Vec::new();
    let mut in_routes = false;
    for line in config.lines() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        if in_routes {
            if line.starts_with(']') {
                in_routes = false;
            } else {
                routes.push(line.trim_matches(['"', ',']).to_owned());
            }
            continue;
        }
        if line == "}" {
            blocks.pop();
            continue;
        }
        if let Some(block) = line.strip_suffix('{') {
            blocks.push(block.trim().trim_end_matches(':').trim().to_owned());
            continue;
        }
        if let Some((key, value)) = line.split_once([':', ' ']) {
            let key = key.trim();
            let value = value.trim().trim_start_matches(':').trim();
            let path = blocks
                .iter()
                .map(String::as_str)
                .chain(std::iter::once(key))
                .collect::<Vec<_>>()
                .join(".");
            if value == "[" {
                in_routes = path == "cluster.routes";
                continue;
            }
            settings.insert(path, value.trim_matches('"').to_owned());
        }
    }
    (settings, routes)
}

/// Bytes of a nats-server size (`45GB`: NATS counts `K`, `M`, `G` in thousands, `KB`, `MB`, `GB`
/// in powers of 1024).
pub fn nats_bytes(size: &str) -> i64 {
    let upper = size.to_ascii_uppercase();
    let split = upper
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(upper.len());
    let (number, unit) = upper.split_at(split);
    let number: i64 = number.parse().expect("a size");
    let factor = match unit {
        "" => 1,
        "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "KB" | "KIB" => 1 << 10,
        "MB" | "MIB" => 1 << 20,
        "GB" | "GIB" => 1 << 30,
        "TB" | "TIB" => 1 << 40,
        other => panic!("unknown size unit {other}"),
    };
    number * factor
}
