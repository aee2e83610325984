//! The files under `schemas/`, generated from the code: the REST API's OpenAPI document
//! (`schemas/openapi.json`, from [`capstan_api::openapi_json`]) and the JSON Schemas of the
//! public NATS messages (`schemas/nats/<stem>.json`, from
//! [`capstan_protocol::schema::messages`]).
//!
//! This is the one place that renders them: `cargo xtask schemas` writes what [`generate`]
//! returns, and `cargo xtask schemas --check` and the tests in `tests/schemas.rs` compare it
//! with the files on disk through [`drift`].

use std::io;
use std::path::{Path, PathBuf};

/// Where the generated files live, relative to the workspace root.
pub const DIR: &str = "schemas";

/// The folder of the message schemas, relative to the workspace root.
pub const NATS_DIR: &str = "schemas/nats";

/// The command that regenerates the files, for messages telling a person what to run.
pub const COMMAND: &str = "cargo xtask schemas";

/// One generated file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedFile {
    /// Its path relative to the workspace root, with `/` separators (`schemas/openapi.json`).
    pub path: String,
    /// Its exact contents: pretty-printed JSON ending in a newline.
    pub contents: String,
}

/// Why a file on disk is not what the code generates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drift {
    /// The file is not there.
    Missing(String),
    /// The file differs from what the code generates.
    Changed(String),
    /// A message schema file no message generates any more.
    Stale(String),
}

impl Drift {
    /// The file's path relative to the workspace root.
    pub fn path(&self) -> &str {
        match self {
            Self::Missing(path) | Self::Changed(path) | Self::Stale(path) => path,
        }
    }
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing(path) => write!(f, "{path}: missing"),
            Self::Changed(path) => write!(f, "{path}: differs from the code"),
            Self::Stale(path) => write!(f, "{path}: no message generates it any more"),
        }
    }
}

/// The OpenAPI document.
pub fn openapi() -> GeneratedFile {
    let mut contents = capstan_api::openapi_json().trim_end().to_owned();
    contents.push('\n');
    GeneratedFile {
        path: format!("{DIR}/openapi.json"),
        contents,
    }
}

/// The message schemas, one file per message.
pub fn messages() -> Vec<GeneratedFile> {
    capstan_protocol::schema::messages()
        .into_iter()
        .map(|(stem, schema)| {
            let mut contents =
                serde_json::to_string_pretty(&schema).expect("a JSON value always serializes");
            contents.push('\n');
            GeneratedFile {
                path: format!("{NATS_DIR}/{stem}.json"),
                contents,
            }
        })
        .collect()
}

/// Every generated file: the OpenAPI document, then the message schemas.
pub fn generate() -> Vec<GeneratedFile> {
    let mut files = vec![openapi()];
    files.extend(messages());
    files
}

/// How the files under `root` differ from `files`: missing or changed files, and message
/// schema files that `files` does not hold. Empty when everything is current.
pub fn drift(root: &Path, files: &[GeneratedFile]) -> io::Result<Vec<Drift>> {
    let mut drifts = Vec::new();
    for file in files {
        match std::fs::read_to_string(root.join(&file.path)) {
            Ok(on_disk) if on_disk == file.contents => {}
            Ok(_) => drifts.push(Drift::Changed(file.path.clone())),
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                drifts.push(Drift::Missing(file.path.clone()));
            }
            Err(error) => return Err(error),
        }
    }
    for path in stale(root, files)? {
        drifts.push(Drift::Stale(path));
    }
    Ok(drifts)
}

/// Writes `files` under `root`, leaving files that are already current untouched, and removes
/// stale message schema files. Returns what it fixed.
pub fn write(root: &Path, files: &[GeneratedFile]) -> io::Result<Vec<Drift>> {
    let mut fixed = Vec::new();
    for drift in drift(root, files)? {
        let path = root.join(drift.path());
        match &drift {
            Drift::Stale(_) => std::fs::remove_file(&path)?,
            Drift::Missing(relative) | Drift::Changed(relative) => {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                let file = files
                    .iter()
                    .find(|file| &file.path == relative)
                    .expect("a missing or changed file is one of `files`");
                std::fs::write(&path, &file.contents)?;
            }
        }
        fixed.push(drift);
    }
    Ok(fixed)
}

/// `.json` files in the message schema folder that `files` does not generate.
fn stale(root: &Path, files: &[GeneratedFile]) -> io::Result<Vec<String>> {
    let entries = match std::fs::read_dir(root.join(NATS_DIR)) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error),
    };
    let mut stale = Vec::new();
    for entry in entries {
        let name = PathBuf::from(entry?.file_name());
        if name.extension().is_none_or(|extension| extension != "json") {
            continue;
        }
        let path = format!("{NATS_DIR}/{}", name.display());
        if !files.iter().any(|file| file.path == path) {
            stale.push(path);
        }
    }
    stale.sort();
    Ok(stale)
}
