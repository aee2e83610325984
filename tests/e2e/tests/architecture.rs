//! Architecture invariants that can be checked on the source: only the protocol crate names
//! subjects, streams and buckets; every source file opens with a `//!` doc.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir)
        .expect("readable directory")
        .flatten()
    {
        let path = entry.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn sources(parts: &[&str]) -> Vec<PathBuf> {
    let root = capstan_testkit::workspace_root();
    let mut files = Vec::new();
    for part in parts {
        rust_files(&root.join(part), &mut files);
    }
    files
}

/// Every name only `capstan-protocol` may spell, quoted as code would quote it: subjects (all
/// under `capstan.` or `$KV.`), streams, buckets, durable consumers, and the job process's
/// environment. Consumer names that are also a service's name (`scheduler`) cannot be told from
/// that name in code, and are left to review.
fn protocol_names() -> Vec<String> {
    use capstan_protocol::{job_env, topology};
    let services = ["registry", "scheduler", "executor", "api"];
    let mut names: Vec<String> = vec!["capstan.".into(), "$KV.".into()];
    names.extend(topology::STREAMS.iter().map(|s| format!("{}\"", s.name)));
    names.extend(topology::BUCKETS.iter().map(|b| format!("{}\"", b.name)));
    names.extend(
        topology::CONSUMERS
            .iter()
            .filter(|c| !services.contains(c))
            .map(|c| format!("{c}\"")),
    );
    names.push(topology::EXECUTOR_CONSUMER_PREFIX.into());
    // The executor's own configuration shares NODE_ID and WORK_DIR with the job environment.
    names.extend([job_env::JOB_ID, job_env::ATTEMPT].map(|n| format!("{n}\"")));
    names.into_iter().map(|n| format!("\"{n}")).collect()
}

#[test]
fn only_the_protocol_crate_spells_subjects_streams_buckets_consumers_and_the_job_environment() {
    let names = protocol_names();
    assert!(names.len() > 15, "the protocol's names: {names:?}");
    let mut offenders = Vec::new();
    for file in sources(&["services", "libs/mesh", "libs/telemetry", "libs/store"]) {
        // Tests may describe what they expect in their own words; production code may not.
        if file.components().any(|c| c.as_os_str() == "tests") {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("readable");
        for (number, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for name in &names {
                if code.contains(name.as_str()) {
                    offenders.push(format!(
                        "{}:{}: {} (spells {name})",
                        file.display(),
                        number + 1,
                        line.trim()
                    ));
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "names spelled outside capstan-protocol:\n{}",
        offenders.join("\n")
    );
}

#[test]
fn every_source_file_opens_with_a_module_doc() {
    let mut undocumented = Vec::new();
    for file in sources(&["services", "libs", "tests", "xtask"]) {
        let text = std::fs::read_to_string(&file).expect("readable");
        let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        if !first.starts_with("//!") {
            undocumented.push(file.display().to_string());
        }
    }
    assert!(undocumented.is_empty(), "no //! doc: {undocumented:?}");
}
