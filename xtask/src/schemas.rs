//! `cargo xtask schemas`: writes the files under `schemas/` that are generated from the code,
//! or with `--check` lists the ones that drifted and fails. What the files hold is decided in
//! `capstan_e2e::schemas`, which the drift tests use too.

use anyhow::{Context, bail};
use capstan_e2e::schemas;

pub fn run(check: bool) -> anyhow::Result<()> {
    let root = capstan_testkit::workspace_root();
    let files = schemas::generate();
    if check {
        let drifts = schemas::drift(&root, &files).context("cannot read schemas/")?;
        if drifts.is_empty() {
            eprintln!("{} files under schemas/ match the code", files.len());
            return Ok(());
        }
        for drift in &drifts {
            eprintln!("{drift}");
        }
        bail!(
            "{} files under schemas/ drifted from the code: run `{}`",
            drifts.len(),
            schemas::COMMAND
        );
    }
    let fixed = schemas::write(&root, &files).context("cannot write schemas/")?;
    for drift in &fixed {
        let done = match drift {
            schemas::Drift::Missing(_) => "created",
            schemas::Drift::Changed(_) => "updated",
            schemas::Drift::Stale(_) => "removed",
        };
        eprintln!("{done} {}", drift.path());
    }
    if fixed.is_empty() {
        eprintln!(
            "{} files under schemas/ already match the code",
            files.len()
        );
    }
    Ok(())
}
