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

#[test]
fn only_the_protocol_crate_spells_subjects_streams_and_buckets() {
    let mut offenders = Vec::new();
    for file in sources(&["services", "libs/mesh", "libs/telemetry"]) {
        // Tests may describe what they expect in their own words; production code may not.
        if file.components().any(|c| c.as_os_str() == "tests") {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("readable");
        for (number, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for needle in [
                "\"capstan.",
                "\"CAPSTAN_SUBMISSIONS\"",
                "\"CAPSTAN_DISPATCH\"",
                "\"CAPSTAN_EVENTS\"",
                "\"CAPSTAN_LOGS\"",
                "\"capstan_jobs\"",
                "\"capstan_nodes\"",
                "\"capstan_idempotency\"",
            ] {
                if code.contains(needle) {
                    offenders.push(format!(
                        "{}:{}: {}",
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
        "subjects spelled outside capstan-protocol:\n{}",
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
