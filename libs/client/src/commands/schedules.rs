//! Schedule commands: `schedules ls`, `get`, `create` and `update` (from a YAML or JSON
//! file), `pause`, `resume`, `trigger`, `next` and `delete`, over `/api/v1/schedules`.

use std::path::PathBuf;
use std::process::ExitCode;

use http::Method;
use serde_json::Value;

use super::{encode, query, read_document};
use crate::output::{Output, instant, text};
use crate::{Context, Error};

/// `capstan schedules …`.
#[derive(clap::Subcommand, Debug)]
pub enum SchedulesCommand {
    /// Every schedule, by name: when it fires, its next tick and how its last one went.
    Ls,
    /// One schedule: its definition, its job, its next tick and what its ticks did.
    Get {
        /// Its name.
        name: String,
    },
    /// Create a schedule described in a YAML or JSON file (the body of
    /// `POST /api/v1/schedules`; `-` reads standard input).
    Create {
        /// The schedule's file.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
    },
    /// Change a schedule: the fields in a YAML or JSON file (the body of
    /// `PATCH /api/v1/schedules/{name}`; `-` reads standard input) replace its own, and its
    /// next tick is counted from now.
    Update {
        /// Its name.
        name: String,
        /// The fields to change.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
    },
    /// Stop a schedule's ticks until it is resumed.
    Pause {
        /// Its name.
        name: String,
    },
    /// Let a paused schedule tick again, from now.
    Resume {
        /// Its name.
        name: String,
    },
    /// Submit a schedule's job now, outside its ticks; prints the job's id.
    Trigger {
        /// Its name.
        name: String,
    },
    /// A schedule's next ticks (counted in its time zone, printed in UTC).
    Next {
        /// Its name.
        name: String,
        /// How many (1 to 100).
        #[arg(long, short = 'n', default_value_t = 5)]
        count: u32,
    },
    /// Delete a schedule; runs already submitted go on.
    Delete {
        /// Its name.
        name: String,
    },
}

/// Runs a `schedules` command.
pub(super) async fn run(context: &Context, command: SchedulesCommand) -> Result<ExitCode, Error> {
    let api = context.api()?;
    let path = |name: &str, action: &str| format!("/api/v1/schedules/{}{action}", encode(name));
    match command {
        SchedulesCommand::Ls => {
            let list: Value = api.get("/api/v1/schedules").await?;
            let schedules = crate::output::items(&list, "items");
            context.out.print(&list, |out| rows(out, &schedules))?;
        }
        SchedulesCommand::Get { name } => {
            let schedule: Value = api.get(&path(&name, "")).await?;
            context.out.print(&schedule, |out| fields(out, &schedule))?;
        }
        SchedulesCommand::Create { file } => {
            let body = read_document(&file, "one schedule (a mapping with `name` and `job`)")?;
            let schedule: Value = api.post("/api/v1/schedules", Some(&body)).await?;
            print_changed(context, &schedule, "created")?;
        }
        SchedulesCommand::Update { name, file } => {
            let body = read_document(&file, "the fields to change, as one mapping")?;
            let schedule: Value = api
                .call(Method::PATCH, &path(&name, ""), Some(&body))
                .await?;
            print_changed(context, &schedule, "updated")?;
        }
        SchedulesCommand::Pause { name } => change(context, &api, &path(&name, "/pause")).await?,
        SchedulesCommand::Resume { name } => {
            change(context, &api, &path(&name, "/resume")).await?;
        }
        SchedulesCommand::Trigger { name } => {
            let triggered: Value = api.post(&path(&name, "/trigger"), None::<&()>).await?;
            context
                .out
                .print(&triggered, |_| format!("{}\n", text(&triggered, "/id")))?;
        }
        SchedulesCommand::Next { name, count } => {
            let ticks: Value = api
                .get(&format!(
                    "{}{}",
                    path(&name, "/next"),
                    query(&[("count", count.to_string())])
                ))
                .await?;
            // In UTC, as every instant the command prints; `get` shows the schedule's zone.
            context.out.print(&ticks, |_| {
                crate::output::items(&ticks, "times")
                    .iter()
                    .map(|at| format!("{} UTC\n", instant(at, "")))
                    .collect()
            })?;
        }
        SchedulesCommand::Delete { name } => {
            let _: Value = api
                .call(Method::DELETE, &path(&name, ""), None::<&()>)
                .await?;
            context
                .out
                .print(&serde_json::json!({"deleted": name}), |_| {
                    format!("{name} deleted\n")
                })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints `<name> <what>; next tick <time>` for a schedule just created or changed.
fn print_changed(context: &Context, schedule: &Value, what: &str) -> Result<(), Error> {
    context.out.print(schedule, |out| {
        format!(
            "{} {what}; next tick {}\n",
            out.bold(&text(schedule, "/name")),
            next_of(schedule)
        )
    })
}

/// Pauses or resumes (the route `path`), printing the schedule's state after.
async fn change(context: &Context, api: &crate::http::Api, path: &str) -> Result<(), Error> {
    let schedule: Value = api.post(path, None::<&()>).await?;
    context.out.print(&schedule, |out| {
        format!(
            "{} {}\n",
            text(&schedule, "/name"),
            out.status(state_of(&schedule))
        )
    })
}

/// `paused` or `active`.
fn state_of(schedule: &Value) -> &'static str {
    if schedule.get("paused").and_then(Value::as_bool) == Some(true) {
        "paused"
    } else {
        "active"
    }
}

/// When it fires: its cron expression, or `every <interval>`.
fn when_of(schedule: &Value) -> String {
    match text(schedule, "/cron") {
        cron if !cron.is_empty() => cron,
        _ => format!("every {}", text(schedule, "/every")),
    }
}

/// Its next tick, or `none` (paused, or no tick to come).
fn next_of(schedule: &Value) -> String {
    match instant(schedule, "/next") {
        next if next.is_empty() => "none".to_owned(),
        next => next,
    }
}

/// How its last tick went: `<outcome> at <time>`, or nothing before the first.
fn last_of(schedule: &Value) -> String {
    match text(schedule, "/last/outcome") {
        outcome if outcome.is_empty() => String::new(),
        outcome => format!("{outcome} at {}", instant(schedule, "/last/at")),
    }
}

/// Its job's command line: `command`, or `argv` joined.
fn command_of(schedule: &Value) -> String {
    match text(schedule, "/job/command") {
        command if !command.is_empty() => command,
        _ => crate::output::items(&schedule["job"], "argv")
            .iter()
            .map(|arg| arg.as_str().map_or_else(|| arg.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

fn rows(out: &Output, schedules: &[Value]) -> String {
    out.table(
        &["name", "when", "timezone", "state", "next", "last", "owner"],
        schedules
            .iter()
            .map(|schedule| {
                vec![
                    text(schedule, "/name"),
                    when_of(schedule),
                    text(schedule, "/timezone"),
                    out.status(state_of(schedule)),
                    next_of(schedule),
                    last_of(schedule),
                    text(schedule, "/owner"),
                ]
            })
            .collect(),
    )
}

fn fields(out: &Output, schedule: &Value) -> String {
    out.fields(&[
        ("name", text(schedule, "/name")),
        ("when", when_of(schedule)),
        ("timezone", text(schedule, "/timezone")),
        ("overlap", text(schedule, "/overlap")),
        ("catchup", text(schedule, "/catchup")),
        ("state", out.status(state_of(schedule))),
        ("owner", text(schedule, "/owner")),
        ("command", command_of(schedule)),
        ("next tick", next_of(schedule)),
        ("last tick", last_of(schedule)),
        ("last job", text(schedule, "/last_job")),
        ("queued", text(schedule, "/queued")),
        (
            "ticks",
            format!(
                "{} ran, {} skipped, {} missed",
                count(schedule, "/counts/ran"),
                count(schedule, "/counts/skipped"),
                count(schedule, "/counts/missed"),
            ),
        ),
        ("created", instant(schedule, "/created_at")),
        ("updated", instant(schedule, "/updated_at")),
    ])
}

fn count(value: &Value, pointer: &str) -> u64 {
    value.pointer(pointer).and_then(Value::as_u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_schedule_reads_as_its_cron_or_interval_its_state_and_its_last_tick() {
        let cron = json!({"name": "nightly", "cron": "0 3 * * *", "paused": false,
            "job": {"argv": ["backup", "--all"]},
            "last": {"outcome": "ran", "at": "2026-12-04T03:00:00Z"}});
        assert_eq!(when_of(&cron), "0 3 * * *");
        assert_eq!(state_of(&cron), "active");
        assert_eq!(command_of(&cron), "backup --all");
        assert_eq!(last_of(&cron), "ran at 2026-12-04 03:00:00");
        assert_eq!(next_of(&cron), "none");
        let every = json!({"name": "poll", "every": "5m", "paused": true,
            "job": {"command": "curl -f http://x"}, "next": "2026-12-04T10:05:00+01:00"});
        assert_eq!(when_of(&every), "every 5m");
        assert_eq!(state_of(&every), "paused");
        assert_eq!(command_of(&every), "curl -f http://x");
        assert_eq!(last_of(&every), "");
        assert_eq!(next_of(&every), "2026-12-04 09:05:00", "shown in UTC");
    }
}
