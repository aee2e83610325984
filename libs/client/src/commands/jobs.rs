//! Job commands: `run` (submit, stream the output, exit with the job's code), `submit`, `ls`,
//! `get`, `logs`, `events`, `cancel` and `watch`.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{Map, Value, json};

use super::{encode, parse_duration, parse_pair, query, read_document};
use crate::http::Api;
use crate::output::{Format, Output, instant, pairs, text, write_stdout};
use crate::{Context, Error};

/// The statuses a job does not leave.
const TERMINAL: [&str; 6] = [
    "succeeded",
    "failed",
    "timed_out",
    "cancelled",
    "lost",
    "quarantined",
];

/// How often `watch` and a broken `run` stream poll.
const POLL: Duration = Duration::from_millis(500);

fn is_terminal_status(status: &str) -> bool {
    TERMINAL.contains(&status)
}

/// What `capstan run` takes.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  capstan run -- uname -a\n  capstan run --label zone=eu --timeout 5m -- ./backup.sh --full\n  capstan run --system db-1 --shell 'df -h | tail -n +2'\n  echo hello | capstan run --stdin -- tr a-z A-Z"
)]
pub struct RunArgs {
    /// A name for the job, to find it again (`capstan ls --name`).
    #[arg(long)]
    name: Option<String>,
    /// Run only on an executor carrying this label (`key=value`; repeat for several).
    #[arg(long = "label", short = 'l', value_name = "KEY=VALUE", value_parser = parse_pair)]
    labels: Vec<(String, String)>,
    /// Run on this remote system over SSH instead of on an executor.
    #[arg(long, conflicts_with = "labels")]
    system: Option<String>,
    /// An environment variable for the process (`NAME=value`; repeat for several).
    #[arg(long = "env", short = 'e', value_name = "NAME=VALUE", value_parser = parse_pair)]
    env: Vec<(String, String)>,
    /// Stop an attempt that runs longer than this (`30s`, `5m`).
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<u64>,
    /// Attempts in all: failures, timeouts and lost attempts are retried with backoff.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    attempts: Option<u32>,
    /// The working directory on the executor (absolute).
    #[arg(long)]
    cwd: Option<String>,
    /// Give the job this process's standard input (read to its end before submitting).
    #[arg(long, short = 'i')]
    stdin: bool,
    /// Run the arguments as one command line through `sh -c`.
    #[arg(long)]
    shell: bool,
    /// Print the job's id and return without waiting for it.
    #[arg(long, short = 'd')]
    detach: bool,
    /// The program and its arguments (after `--`).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    command: Vec<String>,
}

impl RunArgs {
    /// The submission these arguments describe.
    fn submission(&self, stdin: Option<String>) -> Value {
        let mut job = Map::new();
        if self.shell {
            job.insert("command".into(), json!(self.command.join(" ")));
        } else {
            job.insert("argv".into(), json!(self.command));
        }
        if let Some(name) = &self.name {
            job.insert("name".into(), json!(name));
        }
        if !self.labels.is_empty() {
            job.insert("labels".into(), object(&self.labels));
        }
        if let Some(system) = &self.system {
            job.insert("system".into(), json!(system));
        }
        if !self.env.is_empty() {
            job.insert("env".into(), object(&self.env));
        }
        if let Some(timeout) = self.timeout {
            job.insert("timeout".into(), json!(timeout));
        }
        if let Some(attempts) = self.attempts {
            job.insert("retry".into(), json!({ "max_attempts": attempts }));
        }
        if let Some(cwd) = &self.cwd {
            job.insert("cwd".into(), json!(cwd));
        }
        if let Some(stdin) = stdin {
            job.insert("stdin".into(), json!(stdin));
        }
        Value::Object(job)
    }
}

fn object(pairs: &[(String, String)]) -> Value {
    Value::Object(
        pairs
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect(),
    )
}

pub(super) async fn run(context: &Context, args: RunArgs) -> Result<ExitCode, Error> {
    let api = context.api()?;
    let stdin = if args.stdin {
        let mut input = String::new();
        std::io::stdin().read_to_string(&mut input).map_err(|e| {
            Error::Usage(format!(
                "standard input is not UTF-8 text ({e}); jobs take text"
            ))
        })?;
        Some(input)
    } else {
        None
    };
    let created: Value = api
        .post("/api/v1/jobs", Some(&args.submission(stdin)))
        .await?;
    let id = text(&created, "/id");
    if args.detach {
        context.out.print(&created, |_| format!("{id}\n"))?;
        return Ok(ExitCode::SUCCESS);
    }
    let chatty = std::io::stderr().is_terminal();
    if chatty {
        eprintln!("{}", context.out.dim(&format!("job {id} submitted")));
    }
    let job = follow_output(&api, &id, chatty, true).await?;
    if chatty || context.out.format != Format::Table {
        report_end(context, &job)?;
    }
    Ok(ExitCode::from(exit_code_of(&job)))
}

/// The exit code that stands for how `job` ended: its own code when its process exited,
/// 128 + the signal that killed it, 124 for a timeout (as `timeout(1)`), 130 for a cancel,
/// 1 otherwise.
pub fn exit_code_of(job: &Value) -> u8 {
    let status = text(job, "/status");
    // A timeout or a cancel stops the process with a signal: what the user asked about is
    // the timeout or the cancel.
    match status.as_str() {
        "timed_out" => return 124,
        "cancelled" => return 130,
        _ => {}
    }
    if let Some(code) = job.get("exit_code").and_then(Value::as_i64) {
        if status == "succeeded" {
            return 0;
        }
        return match u8::try_from(code) {
            Ok(0) => 1,
            Ok(code) => code,
            Err(_) => 1,
        };
    }
    if let Some(signal) = job.get("signal").and_then(Value::as_i64) {
        return u8::try_from(128 + signal).unwrap_or(1);
    }
    match status.as_str() {
        "succeeded" => 0,
        "timed_out" => 124,
        "cancelled" => 130,
        _ => 1,
    }
}

/// A one-line account of how `job` ended, on standard error (or the job as JSON/YAML on
/// standard output).
fn report_end(context: &Context, job: &Value) -> Result<(), Error> {
    if context.out.format != Format::Table {
        return context.out.print(job, |_| String::new());
    }
    let status = text(job, "/status");
    let mut line = format!(
        "job {} {} after {} attempt(s) on {}",
        text(job, "/id"),
        context.out.status(&status),
        text(job, "/attempt"),
        nonempty(text(job, "/node"), "no node"),
    );
    if let Some(code) = job.get("exit_code").and_then(Value::as_i64) {
        line.push_str(&format!(", exit code {code}"));
    }
    let error = text(job, "/error");
    if !error.is_empty() {
        line.push_str(&format!(": {error}"));
    }
    eprintln!("{line}");
    Ok(())
}

fn nonempty(value: String, otherwise: &str) -> String {
    if value.is_empty() {
        otherwise.to_owned()
    } else {
        value
    }
}

/// Streams job `id`'s output to this process's standard output and error until the job
/// ends, and returns the job as it ended. With `cancel_on_interrupt`, the first Ctrl-C
/// cancels the job (its end is still awaited and shown), a second one stops waiting.
async fn follow_output(
    api: &Api,
    id: &str,
    chatty: bool,
    cancel_on_interrupt: bool,
) -> Result<Value, Error> {
    let path = format!("/api/v1/jobs/{}/logs?follow=true", encode(id));
    let mut stream = api.events(&path).await?;
    let mut attempt: Option<i64> = None;
    let mut interrupted = false;
    let mut interrupt = Box::pin(tokio::signal::ctrl_c());
    loop {
        let event = tokio::select! {
            event = stream.next() => event,
            _ = &mut interrupt, if cancel_on_interrupt => {
                if interrupted {
                    return Err(Error::Usage(format!(
                        "stopped waiting; job {id} was asked to cancel (`capstan get {id}`)"
                    )));
                }
                interrupted = true;
                eprintln!("cancelling job {id} (Ctrl-C again to stop waiting)");
                let _: Value = api
                    .post(&format!("/api/v1/jobs/{}/cancel", encode(id)), None::<&()>)
                    .await?;
                interrupt = Box::pin(tokio::signal::ctrl_c());
                continue;
            }
        };
        let event = match event {
            Ok(Some(event)) => event,
            // The stream ended or broke without its `end` (an API restarted): the job's own
            // record says when it is over.
            Ok(None) | Err(_) => break,
        };
        let Ok(message) = serde_json::from_str::<Value>(&event.data) else {
            continue;
        };
        let this_attempt = message.get("attempt").and_then(Value::as_i64);
        if chatty && this_attempt.is_some() && attempt.is_some() && this_attempt != attempt {
            eprintln!("--- attempt {} ---", this_attempt.unwrap_or_default());
        }
        attempt = this_attempt.or(attempt);
        let data = text(&message, "/data");
        match event.event.as_str() {
            "stdout" => {
                let mut out = std::io::stdout().lock();
                out.write_all(data.as_bytes())?;
                out.flush()?;
            }
            "stderr" => {
                let mut err = std::io::stderr().lock();
                err.write_all(data.as_bytes())?;
                err.flush()?;
            }
            "end" => break,
            _ => {}
        }
    }
    wait_for_end(api, id).await
}

/// Job `id` once it has ended, read every [`POLL`].
async fn wait_for_end(api: &Api, id: &str) -> Result<Value, Error> {
    let path = format!("/api/v1/jobs/{}", encode(id));
    loop {
        let job: Value = api.get(&path).await?;
        if is_terminal_status(&text(&job, "/status")) {
            return Ok(job);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// What `capstan submit` takes.
#[derive(clap::Args, Debug)]
pub struct SubmitArgs {
    /// The job, as YAML or JSON (the body of `POST /api/v1/jobs`); `-` reads standard input.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    file: PathBuf,
    /// Wait for the job to end and exit with its exit code (as `run` does).
    #[arg(long, short = 'w')]
    wait: bool,
}

pub(super) async fn submit(context: &Context, args: SubmitArgs) -> Result<ExitCode, Error> {
    let job = read_document(&args.file, "one job (a mapping with `argv` or `command`)")?;
    let api = context.api()?;
    let created: Value = api.post("/api/v1/jobs", Some(&job)).await?;
    let id = text(&created, "/id");
    if args.wait {
        let chatty = std::io::stderr().is_terminal();
        if chatty {
            eprintln!("{}", context.out.dim(&format!("job {id} submitted")));
        }
        let ended = wait_for_end(&api, &id).await?;
        context.out.print(&ended, |out| {
            format!("{id} {}\n", out.status(&text(&ended, "/status")))
        })?;
        return Ok(ExitCode::from(exit_code_of(&ended)));
    }
    let duplicate = created.get("duplicate").and_then(Value::as_bool) == Some(true);
    context.out.print(&created, |_| {
        if duplicate {
            format!("{id} (already submitted with this idempotency key)\n")
        } else {
            format!("{id}\n")
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

/// What `capstan ls` takes: the API's filters.
#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Only jobs in this status.
    #[arg(long, short = 's')]
    status: Option<String>,
    /// Only jobs selecting this label (`key=value`; repeat for several).
    #[arg(long = "label", short = 'l', value_name = "KEY=VALUE", value_parser = parse_pair)]
    labels: Vec<(String, String)>,
    /// Only jobs with this name.
    #[arg(long)]
    name: Option<String>,
    /// Only jobs whose current attempt is on this node.
    #[arg(long)]
    node: Option<String>,
    /// Only jobs submitted by this principal.
    #[arg(long)]
    submitted_by: Option<String>,
    /// Only jobs submitted at or after this time (RFC 3339), or this long ago (`1h`).
    #[arg(long)]
    since: Option<String>,
    /// Only jobs submitted before this time (RFC 3339), or this long ago (`10m`).
    #[arg(long)]
    until: Option<String>,
    /// At most this many jobs.
    #[arg(long, short = 'n', default_value_t = 50)]
    limit: usize,
}

/// `text` as an RFC 3339 instant: given as one, or as a duration before now.
fn instant_arg(text: &str) -> Result<String, Error> {
    let rfc3339 = &time::format_description::well_known::Rfc3339;
    if time::OffsetDateTime::parse(text, rfc3339).is_ok() {
        return Ok(text.to_owned());
    }
    let ago = parse_duration(text).map_err(|e| {
        Error::Usage(format!(
            "`{text}` is neither an RFC 3339 time nor a duration ago: {e}"
        ))
    })?;
    let at = time::OffsetDateTime::now_utc()
        - time::Duration::seconds(i64::try_from(ago).unwrap_or(i64::MAX));
    at.format(rfc3339)
        .map_err(|e| Error::Usage(format!("`{text}`: {e}")))
}

pub(super) async fn list(context: &Context, args: ListArgs) -> Result<ExitCode, Error> {
    let api = context.api()?;
    let mut filters: Vec<(&str, String)> = Vec::new();
    if let Some(status) = &args.status {
        filters.push(("status", status.clone()));
    }
    for (key, value) in &args.labels {
        filters.push(("label", format!("{key}={value}")));
    }
    if let Some(name) = &args.name {
        filters.push(("name", name.clone()));
    }
    if let Some(node) = &args.node {
        filters.push(("node", node.clone()));
    }
    if let Some(who) = &args.submitted_by {
        filters.push(("submitted_by", who.clone()));
    }
    if let Some(since) = &args.since {
        filters.push(("since", instant_arg(since)?));
    }
    if let Some(until) = &args.until {
        filters.push(("until", instant_arg(until)?));
    }
    let mut jobs: Vec<Value> = Vec::new();
    let mut cursor: Option<String> = None;
    while jobs.len() < args.limit {
        let mut page_query = filters.clone();
        page_query.push(("limit", (args.limit - jobs.len()).min(500).to_string()));
        if let Some(cursor) = &cursor {
            page_query.push(("cursor", cursor.clone()));
        }
        let page: Value = api
            .get(&format!("/api/v1/jobs{}", query(&page_query)))
            .await?;
        if let Some(list) = page.get("jobs").and_then(Value::as_array) {
            jobs.extend(list.iter().cloned());
        }
        cursor = page
            .get("next_cursor")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if cursor.is_none() {
            break;
        }
    }
    jobs.truncate(args.limit);
    let value = json!({ "jobs": jobs });
    context.out.print(&value, |out| {
        out.table(
            &[
                "id", "name", "status", "attempt", "node", "exit", "by", "created",
            ],
            jobs.iter()
                .map(|job| {
                    vec![
                        text(job, "/id"),
                        text(job, "/name"),
                        out.status(&text(job, "/status")),
                        text(job, "/attempt"),
                        text(job, "/node"),
                        text(job, "/exit_code"),
                        text(job, "/submitted_by"),
                        instant(job, "/created_at"),
                    ]
                })
                .collect(),
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

/// How a job's spec runs its command, as one line.
fn command_line(job: &Value) -> String {
    match job.pointer("/spec/argv").and_then(Value::as_array) {
        Some(argv) => argv
            .iter()
            .map(|arg| {
                let arg = arg.as_str().unwrap_or_default();
                if arg.is_empty()
                    || arg.contains(|c: char| c.is_whitespace() || "'\"$\\".contains(c))
                {
                    format!("'{}'", arg.replace('\'', r"'\''"))
                } else {
                    arg.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
        None => format!("sh -c {}", text(job, "/spec/command")),
    }
}

pub(super) async fn get(context: &Context, id: &str) -> Result<ExitCode, Error> {
    let api = context.api()?;
    let job: Value = api.get(&format!("/api/v1/jobs/{}", encode(id))).await?;
    context.out.print(&job, |out| {
        let secrets = job
            .pointer("/spec/secrets")
            .and_then(Value::as_object)
            .map(|map| {
                map.keys()
                    .map(|k| format!("{k}=••••"))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        let mut text_out = out.fields(&[
            ("id", text(&job, "/id")),
            ("name", text(&job, "/spec/name")),
            ("status", out.status(&text(&job, "/status"))),
            ("attempt", text(&job, "/attempt")),
            ("node", text(&job, "/node")),
            ("system", text(&job, "/spec/system")),
            ("command", command_line(&job)),
            ("labels", pairs(&job, "/spec/labels")),
            ("env", pairs(&job, "/spec/env")),
            ("secrets", secrets),
            ("exit code", text(&job, "/exit_code")),
            ("signal", text(&job, "/signal")),
            ("error", text(&job, "/error")),
            ("submitted by", text(&job, "/submitted_by/principal")),
            ("created", instant(&job, "/created_at")),
            ("started", instant(&job, "/started_at")),
            ("finished", instant(&job, "/finished_at")),
        ]);
        if let Some(attempts) = job.get("attempts").and_then(Value::as_array)
            && !attempts.is_empty()
        {
            text_out.push('\n');
            text_out.push_str(
                &out.table(
                    &[
                        "attempt", "status", "node", "exit", "started", "finished", "error",
                    ],
                    attempts
                        .iter()
                        .map(|a| {
                            vec![
                                text(a, "/attempt"),
                                out.status(&text(a, "/status")),
                                text(a, "/node"),
                                text(a, "/exit_code"),
                                instant(a, "/started_at"),
                                instant(a, "/finished_at"),
                                text(a, "/error"),
                            ]
                        })
                        .collect(),
                ),
            );
        }
        text_out
    })?;
    Ok(ExitCode::SUCCESS)
}

/// What `capstan logs` takes.
#[derive(clap::Args, Debug)]
pub struct LogsArgs {
    /// The job's id.
    id: String,
    /// Keep printing output as it is produced, until the job ends.
    #[arg(long, short = 'f')]
    follow: bool,
    /// Which attempt's output (default: the current one).
    #[arg(long, conflicts_with = "follow")]
    attempt: Option<u32>,
}

pub(super) async fn logs(context: &Context, args: LogsArgs) -> Result<ExitCode, Error> {
    let api = context.api()?;
    if args.follow {
        follow_output(&api, &args.id, std::io::stderr().is_terminal(), false).await?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut pairs: Vec<(&str, String)> = Vec::new();
    if let Some(attempt) = args.attempt {
        pairs.push(("attempt", attempt.to_string()));
    }
    let logs: Value = api
        .get(&format!(
            "/api/v1/jobs/{}/logs{}",
            encode(&args.id),
            query(&pairs)
        ))
        .await?;
    if context.out.format != Format::Table {
        context.out.print(&logs, |_| String::new())?;
        return Ok(ExitCode::SUCCESS);
    }
    write_stdout(&text(&logs, "/stdout"))?;
    let stderr = text(&logs, "/stderr");
    if !stderr.is_empty() {
        let mut err = std::io::stderr().lock();
        err.write_all(stderr.as_bytes())?;
        err.flush()?;
    }
    if logs.get("truncated").and_then(Value::as_bool) == Some(true) {
        eprintln!("(part of this output was not kept)");
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn events(context: &Context, id: &str) -> Result<ExitCode, Error> {
    let api = context.api()?;
    let events: Value = api
        .get(&format!("/api/v1/jobs/{}/events", encode(id)))
        .await?;
    context.out.print(&events, |out| {
        let list = crate::output::items(&events, "events");
        out.table(
            &["seq", "at", "kind", "attempt", "node", "exit", "error"],
            list.iter()
                .map(|e| {
                    vec![
                        text(e, "/seq"),
                        instant(e, "/at"),
                        out.status(&text(e, "/kind")),
                        text(e, "/attempt"),
                        text(e, "/node"),
                        text(e, "/exit_code"),
                        text(e, "/error"),
                    ]
                })
                .collect(),
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn cancel(context: &Context, ids: &[String]) -> Result<ExitCode, Error> {
    let api = context.api()?;
    let mut results = Vec::new();
    let mut failed = 0;
    for id in ids {
        let answer: Result<Value, Error> = api
            .post(&format!("/api/v1/jobs/{}/cancel", encode(id)), None::<&()>)
            .await;
        match answer {
            Ok(answer) => results.push(json!({
                "id": id,
                "outcome": answer.get("outcome"),
                "status": answer.get("status"),
            })),
            Err(error) => {
                failed += 1;
                eprintln!("{id}: {error}");
            }
        }
    }
    let value = json!({ "cancelled": results });
    context.out.print(&value, |out| {
        out.table(
            &["id", "outcome", "status"],
            results
                .iter()
                .map(|r| {
                    vec![
                        text(r, "/id"),
                        text(r, "/outcome"),
                        out.status(&text(r, "/status")),
                    ]
                })
                .collect(),
        )
    })?;
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What `capstan watch` takes.
#[derive(clap::Args, Debug)]
pub struct WatchArgs {
    /// The jobs to follow; a fan-out's targets are followed one by one.
    #[arg(required = true)]
    ids: Vec<String>,
}

/// One thing `watch` follows: a job, or a fan-out target's job.
struct Watched {
    label: String,
    status: String,
    exit_code: String,
}

pub(super) async fn watch(context: &Context, args: WatchArgs) -> Result<ExitCode, Error> {
    let api = context.api()?;
    let bar =
        indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} ended  {msg}")
            .expect("the template is valid")
            .progress_chars("=> "),
    );
    let terminal = std::io::stderr().is_terminal();
    let mut last_line = String::new();
    let watched = loop {
        let mut watched: Vec<Watched> = Vec::new();
        let mut open_parents = 0;
        for id in &args.ids {
            let job: Value = api.get(&format!("/api/v1/jobs/{}", encode(id))).await?;
            if job.get("fanout").is_some() {
                let targets: Value = api
                    .get(&format!("/api/v1/jobs/{}/targets", encode(id)))
                    .await?;
                if !is_terminal_status(&text(&job, "/status")) {
                    open_parents += 1;
                }
                for target in targets
                    .get("targets")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    watched.push(Watched {
                        label: format!("{id}/{}", text(target, "/target")),
                        status: text(target, "/status"),
                        exit_code: text(target, "/exit_code"),
                    });
                }
            } else {
                watched.push(Watched {
                    label: id.clone(),
                    status: text(&job, "/status"),
                    exit_code: text(&job, "/exit_code"),
                });
            }
        }
        let ended = watched
            .iter()
            .filter(|w| is_terminal_status(&w.status) || w.status == "skipped")
            .count();
        let mut tally: BTreeMap<&str, usize> = BTreeMap::new();
        for item in &watched {
            *tally.entry(item.status.as_str()).or_default() += 1;
        }
        let summary = tally
            .iter()
            .map(|(status, count)| format!("{status} {count}"))
            .collect::<Vec<_>>()
            .join(", ");
        bar.set_length(watched.len() as u64);
        bar.set_position(ended as u64);
        bar.set_message(summary.clone());
        if !terminal {
            let line = format!("{ended}/{} ended: {summary}", watched.len());
            if line != last_line {
                eprintln!("{line}");
                last_line = line;
            }
        }
        if ended == watched.len() && open_parents == 0 {
            break watched;
        }
        bar.tick();
        tokio::time::sleep(POLL).await;
    };
    bar.finish_and_clear();
    let all_succeeded = watched.iter().all(|w| w.status == "succeeded");
    let value = json!({
        "jobs": watched
            .iter()
            .map(|w| json!({"id": w.label, "status": w.status, "exit_code": w.exit_code}))
            .collect::<Vec<_>>()
    });
    context.out.print(&value, |out: &Output| {
        out.table(
            &["job", "status", "exit"],
            watched
                .iter()
                .map(|w| vec![w.label.clone(), out.status(&w.status), w.exit_code.clone()])
                .collect(),
        )
    })?;
    Ok(if all_succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_exit_code_becomes_the_command_exit_code() {
        assert_eq!(
            exit_code_of(&json!({"status": "succeeded", "exit_code": 0})),
            0
        );
        assert_eq!(
            exit_code_of(&json!({"status": "failed", "exit_code": 3})),
            3
        );
        assert_eq!(exit_code_of(&json!({"status": "failed", "signal": 9})), 137);
        assert_eq!(exit_code_of(&json!({"status": "timed_out"})), 124);
        assert_eq!(exit_code_of(&json!({"status": "cancelled"})), 130);
        assert_eq!(
            exit_code_of(&json!({"status": "timed_out", "signal": 15})),
            124,
            "a timeout is reported as one, not as the signal that ended it"
        );
        assert_eq!(exit_code_of(&json!({"status": "lost"})), 1);
        assert_eq!(
            exit_code_of(&json!({"status": "failed", "exit_code": 300})),
            1,
            "a code that does not fit a process exit code is a plain failure"
        );
    }

    #[test]
    fn run_arguments_become_a_submission_with_argv_or_a_shell_line() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            run: RunArgs,
        }
        let parsed = Wrapper::parse_from([
            "run",
            "-l",
            "zone=eu",
            "-e",
            "A=1",
            "--timeout",
            "2m",
            "--attempts",
            "3",
            "--",
            "ls",
            "-la",
            "/tmp",
        ]);
        assert_eq!(
            parsed.run.submission(None),
            json!({
                "argv": ["ls", "-la", "/tmp"],
                "labels": {"zone": "eu"},
                "env": {"A": "1"},
                "timeout": 120,
                "retry": {"max_attempts": 3},
            })
        );
        let shell = Wrapper::parse_from(["run", "--shell", "echo $HOME | wc -c"]);
        assert_eq!(
            shell.run.submission(Some("in".into())),
            json!({"command": "echo $HOME | wc -c", "stdin": "in"})
        );
    }

    #[test]
    fn a_command_line_quotes_what_a_shell_would_split() {
        let job = json!({"spec": {"argv": ["echo", "a b", "it's", "plain"]}});
        assert_eq!(command_line(&job), r"echo 'a b' 'it'\''s' plain");
    }
}
