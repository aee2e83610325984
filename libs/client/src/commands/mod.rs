//! The user commands: what each takes ([`Command`]) and which module runs it. Arguments that
//! several commands share (durations, `key=value` pairs, query strings) are parsed here.

mod jobs;
mod nodes;
mod people;
mod schedules;
mod session;
mod workflows;

use std::process::ExitCode;

use crate::{Context, Error};

/// A user command.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Log in to an API: with a user name and password (asked for on the terminal, or
    /// `--password-stdin`), or with an API token (`--token-stdin`, or CAPSTAN_TOKEN). The
    /// login is kept in the configuration directory, readable by you only.
    Login(session::LoginArgs),
    /// End the session and forget the stored login.
    Logout,
    /// Who you are to the API, and what you may do.
    Whoami,
    /// Run a command on the fleet, stream its output as it runs, and exit with its exit code
    /// (Ctrl-C cancels the job).
    Run(jobs::RunArgs),
    /// Submit a job described in a YAML or JSON file (`-` for standard input).
    Submit(jobs::SubmitArgs),
    /// List jobs, newest first.
    #[command(visible_alias = "jobs")]
    Ls(jobs::ListArgs),
    /// Show one job: its spec (secrets masked), attempts and outcome.
    Get {
        /// The job's id.
        id: String,
    },
    /// Print a job's output (`-f` to follow it while it runs).
    Logs(jobs::LogsArgs),
    /// A job's events, in order.
    Events {
        /// The job's id.
        id: String,
    },
    /// Cancel jobs.
    Cancel {
        /// The jobs' ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Follow jobs (or a fan-out's targets) until they end, with a progress bar on a
    /// terminal; exits 0 only if all succeeded.
    Watch(jobs::WatchArgs),
    /// List the executor nodes, or show one.
    Nodes {
        /// One node's id.
        id: Option<String>,
    },
    /// Stop placing new jobs on a node (running ones continue).
    Cordon {
        /// The node's id.
        id: String,
    },
    /// Let a cordoned or drained node take jobs again.
    Uncordon {
        /// The node's id.
        id: String,
    },
    /// Move a node's work elsewhere: no new jobs, queued ones placed elsewhere, running ones
    /// stopped and handed back after the deadline.
    Drain {
        /// The node's id.
        id: String,
        /// How long running jobs may continue (`90s`, `5m`; default 5m).
        #[arg(long, value_parser = parse_duration)]
        deadline: Option<u64>,
    },
    /// List the remote systems jobs run on over SSH, or show one.
    Systems {
        /// One system's name.
        name: Option<String>,
    },
    /// Your API tokens.
    Tokens {
        /// What to do.
        #[command(subcommand)]
        command: people::TokensCommand,
    },
    /// Users (administrators).
    Users {
        /// What to do.
        #[command(subcommand)]
        command: people::UsersCommand,
    },
    /// Change your password.
    Passwd(people::PasswdArgs),
    /// Schedules: jobs submitted on a cron expression or an interval.
    Schedules {
        /// What to do.
        #[command(subcommand)]
        command: schedules::SchedulesCommand,
    },
    /// Workflows: jobs run as the steps of a graph.
    Workflows {
        /// What to do.
        #[command(subcommand)]
        command: workflows::WorkflowsCommand,
    },
}

/// Runs `command`.
pub async fn run(context: &Context, command: Command) -> Result<ExitCode, Error> {
    match command {
        Command::Login(args) => session::login(context, args).await,
        Command::Logout => session::logout(context).await,
        Command::Whoami => session::whoami(context).await,
        Command::Run(args) => jobs::run(context, args).await,
        Command::Submit(args) => jobs::submit(context, args).await,
        Command::Ls(args) => jobs::list(context, args).await,
        Command::Get { id } => jobs::get(context, &id).await,
        Command::Logs(args) => jobs::logs(context, args).await,
        Command::Events { id } => jobs::events(context, &id).await,
        Command::Cancel { ids } => jobs::cancel(context, &ids).await,
        Command::Watch(args) => jobs::watch(context, args).await,
        Command::Nodes { id } => nodes::show(context, id.as_deref()).await,
        Command::Cordon { id } => nodes::change(context, &id, "cordon", None).await,
        Command::Uncordon { id } => nodes::change(context, &id, "uncordon", None).await,
        Command::Drain { id, deadline } => nodes::change(context, &id, "drain", deadline).await,
        Command::Systems { name } => nodes::systems(context, name.as_deref()).await,
        Command::Tokens { command } => people::tokens(context, command).await,
        Command::Users { command } => people::users(context, command).await,
        Command::Passwd(args) => people::passwd(context, args).await,
        Command::Schedules { command } => schedules::run(context, command).await,
        Command::Workflows { command } => workflows::run(context, command).await,
    }
}

/// A duration in whole seconds: `90`, `90s`, `5m`, `2h`, `7d`, or several (`1h30m`).
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(seconds);
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(format!("`{text}`: unknown unit `{c}` (use s, m, h or d)")),
        };
        let amount: u64 = digits
            .parse()
            .map_err(|_| format!("`{text}`: a number must come before `{c}`"))?;
        digits.clear();
        total = amount
            .checked_mul(unit)
            .and_then(|part| total.checked_add(part))
            .ok_or_else(|| format!("`{text}` is too long"))?;
    }
    if !digits.is_empty() {
        return Err(format!(
            "`{text}`: the last number needs a unit (s, m, h or d)"
        ));
    }
    Ok(total)
}

/// A `key=value` argument.
pub fn parse_pair(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("`{text}` is not `key=value`")),
    }
}

/// `pairs` as a query string (`?a=1&b=2`), each value percent-encoded; empty when none.
pub fn query(pairs: &[(&str, String)]) -> String {
    let mut text = String::new();
    for (key, value) in pairs {
        text.push(if text.is_empty() { '?' } else { '&' });
        text.push_str(key);
        text.push('=');
        text.push_str(&encode(value));
    }
    text
}

/// `segment` percent-encoded for a URL path or query.
pub fn encode(segment: &str) -> String {
    let mut text = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            text.push(byte as char);
        } else {
            text.push_str(&format!("%{byte:02X}"));
        }
    }
    text
}

/// The YAML or JSON document in `file` (`-`: standard input) as the API's JSON: JSON when it
/// parses as JSON, else YAML. It must be one mapping: `what` says what it should hold.
pub fn read_document(file: &std::path::Path, what: &str) -> Result<serde_json::Value, Error> {
    let (name, source) = if file.as_os_str() == "-" {
        let mut source = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut source)?;
        ("standard input".to_owned(), source)
    } else {
        let source = std::fs::read_to_string(file)
            .map_err(|e| Error::Usage(format!("cannot read {}: {e}", file.display())))?;
        (file.display().to_string(), source)
    };
    parse_document(&name, &source, what)
}

fn parse_document(name: &str, source: &str, what: &str) -> Result<serde_json::Value, Error> {
    let value: serde_json::Value = match serde_json::from_str(source) {
        Ok(value) => value,
        Err(json_error) if source.trim_start().starts_with('{') => {
            return Err(Error::Usage(format!(
                "{name} is not valid JSON: {json_error}"
            )));
        }
        Err(_) => serde_norway::from_str(source)
            .map_err(|e| Error::Usage(format!("{name} is not valid YAML: {e}")))?,
    };
    if !value.is_object() {
        return Err(Error::Usage(format!("{name} must hold {what}")));
    }
    Ok(value)
}

/// Reads a secret: the first line of standard input with `from_stdin`, else asked on the
/// terminal without echo.
pub fn read_secret(prompt: &str, from_stdin: bool, flag: &str) -> Result<String, Error> {
    if from_stdin {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        let secret = line.trim_end_matches(['\r', '\n']).to_owned();
        if secret.is_empty() {
            return Err(Error::Usage("standard input held nothing".into()));
        }
        return Ok(secret);
    }
    rpassword::prompt_password(prompt).map_err(|e| {
        Error::Usage(format!(
            "cannot ask on a terminal ({e}): give it on standard input with `{flag}`"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_seconds_units_and_combinations() {
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("90s"), Ok(90));
        assert_eq!(parse_duration("5m"), Ok(300));
        assert_eq!(parse_duration("1h30m"), Ok(5400));
        assert_eq!(parse_duration("7d"), Ok(604_800));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("1h5").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(
            query(&[("label", "env=prod".into()), ("name", "a b&c".into())]),
            "?label=env%3Dprod&name=a%20b%26c"
        );
        assert_eq!(query(&[]), "");
    }

    #[test]
    fn a_document_may_be_yaml_or_json_but_must_be_one_mapping() {
        use serde_json::json;
        let what = "one job";
        let yaml = parse_document("job.yaml", "argv: [echo, hi]\nlabels:\n  zone: eu\n", what)
            .expect("yaml");
        assert_eq!(
            yaml,
            json!({"argv": ["echo", "hi"], "labels": {"zone": "eu"}})
        );
        let json_job = parse_document("job.json", r#"{"command": "true"}"#, what).expect("json");
        assert_eq!(json_job, json!({"command": "true"}));
        let broken = parse_document("job.json", r#"{"command": "#, what).expect_err("broken json");
        assert!(broken.to_string().contains("not valid JSON"), "{broken}");
        let list = parse_document("list.yaml", "- a\n- b\n", what).expect_err("a list");
        assert!(list.to_string().contains("must hold one job"), "{list}");
    }

    #[test]
    fn a_pair_needs_a_key_and_an_equals_sign() {
        assert_eq!(parse_pair("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(parse_pair("=x").is_err());
        assert!(parse_pair("novalue").is_err());
    }
}
