//! What the deployment-file tests (`deploy.rs` for compose, `k8s.rs` for Kubernetes) read
//! from the code the files must agree with: the binaries the workspace builds, their
//! configuration, and the variables the telemetry crate reads.

use std::collections::HashSet;
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
