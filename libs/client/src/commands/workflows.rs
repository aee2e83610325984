//! Workflow commands: `workflows ls`, `get`, `submit` (from a YAML or JSON file, optionally
//! waiting for its end) and `cancel`, over `/api/v1/workflows`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

use super::{encode, query, read_document};
use crate::http::Api;
use crate::output::{Output, instant, text};
use crate::{Context, Error};

/// How often `submit --wait` reads the workflow again.
const POLL: Duration = Duration::from_millis(500);

/// `capstan workflows …`.
#[derive(clap::Subcommand, Debug)]
pub enum WorkflowsCommand {
    /// Workflows, newest first, with how far their steps got.
    Ls {
        /// Only workflows in this status (`running`, `succeeded`, `failed`, `cancelled`).
        #[arg(long, short = 's')]
        status: Option<String>,
    },
    /// One workflow and each of its steps: status, job, exit code, times.
    Get {
        /// Its id.
        id: String,
    },
    /// Create a workflow described in a YAML or JSON file (the body of
    /// `POST /api/v1/workflows`; `-` reads standard input); prints its id.
    Submit {
        /// The workflow's file.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        /// Wait for it to end; exit 0 only if it succeeded.
        #[arg(long, short = 'w')]
        wait: bool,
    },
    /// Cancel a workflow: no step starts any more, running steps are cancelled, and
    /// `always` steps still run.
    Cancel {
        /// Its id.
        id: String,
    },
}

/// Runs a `workflows` command.
pub(super) async fn run(context: &Context, command: WorkflowsCommand) -> Result<ExitCode, Error> {
    let api = context.api()?;
    match command {
        WorkflowsCommand::Ls { status } => {
            let filter: Vec<(&str, String)> = status.map(|s| ("status", s)).into_iter().collect();
            let list: Value = api
                .get(&format!("/api/v1/workflows{}", query(&filter)))
                .await?;
            let workflows = crate::output::items(&list, "items");
            context.out.print(&list, |out| rows(out, &workflows))?;
        }
        WorkflowsCommand::Get { id } => {
            let workflow: Value = api.get(&path(&id)).await?;
            context.out.print(&workflow, |out| detail(out, &workflow))?;
        }
        WorkflowsCommand::Submit { file, wait } => {
            let body = read_document(&file, "one workflow (a mapping with `name` and `steps`)")?;
            let created: Value = api.post("/api/v1/workflows", Some(&body)).await?;
            let id = text(&created, "/id");
            if !wait {
                context.out.print(&created, |_| format!("{id}\n"))?;
                return Ok(ExitCode::SUCCESS);
            }
            if std::io::stderr().is_terminal() {
                eprintln!("{}", context.out.dim(&format!("workflow {id} submitted")));
            }
            let ended = wait_for_end(&api, &id).await?;
            context.out.print(&ended, |out| detail(out, &ended))?;
            return Ok(if text(&ended, "/status") == "succeeded" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        WorkflowsCommand::Cancel { id } => {
            let answer: Value = api
                .post(&format!("{}/cancel", path(&id)), None::<&()>)
                .await?;
            context
                .out
                .print(&answer, |out| format!("{id} {}\n", out.status("cancelled")))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn path(id: &str) -> String {
    format!("/api/v1/workflows/{}", encode(id))
}

/// Reads workflow `id` until it has ended.
async fn wait_for_end(api: &Api, id: &str) -> Result<Value, Error> {
    loop {
        let workflow: Value = api.get(&path(id)).await?;
        if text(&workflow, "/status") != "running" {
            return Ok(workflow);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `<succeeded>/<total>`, with the failed, cancelled and skipped steps named when there are.
fn progress(workflow: &Value) -> String {
    let count = |name: &str| {
        workflow
            .pointer(&format!("/steps/{name}"))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let mut text = format!("{}/{}", count("succeeded"), count("total"));
    for name in ["running", "failed", "cancelled", "skipped"] {
        let n = count(name);
        if n > 0 {
            text.push_str(&format!(", {n} {name}"));
        }
    }
    text
}

fn rows(out: &Output, workflows: &[Value]) -> String {
    out.table(
        &[
            "id", "name", "status", "steps", "owner", "created", "finished",
        ],
        workflows
            .iter()
            .map(|workflow| {
                vec![
                    text(workflow, "/id"),
                    text(workflow, "/name"),
                    out.status(&text(workflow, "/status")),
                    progress(workflow),
                    text(workflow, "/owner"),
                    instant(workflow, "/created_at"),
                    instant(workflow, "/finished_at"),
                ]
            })
            .collect(),
    )
}

/// The workflow's fields, then a table of its steps.
fn detail(out: &Output, workflow: &Value) -> String {
    let mut text_out = out.fields(&[
        ("id", text(workflow, "/id")),
        ("name", text(workflow, "/name")),
        ("status", out.status(&text(workflow, "/status"))),
        ("fail fast", text(workflow, "/fail_fast")),
        ("owner", text(workflow, "/owner")),
        ("created", instant(workflow, "/created_at")),
        ("finished", instant(workflow, "/finished_at")),
        ("cancel asked", instant(workflow, "/cancel_requested_at")),
    ]);
    let steps = crate::output::items(workflow, "steps");
    text_out.push('\n');
    text_out.push_str(
        &out.table(
            &[
                "step", "status", "after", "when", "job", "exit", "started", "ended", "error",
            ],
            steps
                .iter()
                .map(|step| {
                    let after = crate::output::items(step, "depends_on")
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(",");
                    vec![
                        text(step, "/name"),
                        out.status(&text(step, "/status")),
                        after,
                        text(step, "/when"),
                        text(step, "/job"),
                        text(step, "/exit_code"),
                        instant(step, "/started_at"),
                        instant(step, "/ended_at"),
                        text(step, "/error"),
                    ]
                })
                .collect(),
        ),
    );
    text_out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_workflows_progress_counts_its_succeeded_steps_and_names_the_others() {
        let done = json!({"steps": {"total": 3, "succeeded": 3, "waiting": 0}});
        assert_eq!(progress(&done), "3/3");
        let mixed = json!({"steps": {"total": 5, "succeeded": 1, "running": 1, "failed": 1,
            "skipped": 2, "cancelled": 0}});
        assert_eq!(progress(&mixed), "1/5, 1 running, 1 failed, 2 skipped");
    }
}
