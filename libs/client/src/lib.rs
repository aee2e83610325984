//! The user side of the `capstan` command: log in to an API, run and follow jobs, list and
//! manage nodes, systems, tokens and users. It talks to the API's REST routes only, exactly as
//! any client generated from the OpenAPI document would, so it needs no NATS credential.
//!
//! Module map: `config` the stored login (0600, locked while a session is renewed); `http` the
//! REST client, problem+json errors and server-sent events; `output` tables, JSON, YAML and
//! colours; `commands` one module per group of commands. The binary (in the API crate, beside
//! the administration commands) parses [`Command`] and [`Globals`] and calls [`run`].

pub mod commands;
pub mod config;
pub mod http;
pub mod output;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

pub use commands::Command;
use output::{Format, Output};

/// The environment variable holding an API token, used instead of the stored login (for
/// scripts and CI; never given on the command line, where other users could see it).
pub const TOKEN_ENV: &str = "CAPSTAN_TOKEN";

/// Options every user command takes.
#[derive(clap::Args, Debug, Clone)]
pub struct Globals {
    /// The API's URL, instead of the one `capstan login` stored.
    #[arg(long, global = true, env = "CAPSTAN_URL", value_name = "URL")]
    pub url: Option<String>,
    /// The login file, instead of `capstan/login.json` in the configuration directory.
    #[arg(long, global = true, env = "CAPSTAN_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// How to print results: `table` for people, `json` or `yaml` (the API's own resources)
    /// for scripts.
    #[arg(short, long, global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

/// What went wrong, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No login stored and no token given.
    #[error(
        "not logged in: run `capstan login --url <API URL>`, or set CAPSTAN_URL and CAPSTAN_TOKEN"
    )]
    NotLoggedIn,
    /// The session cannot be renewed.
    #[error("your session has ended ({0}): run `capstan login` again")]
    SessionEnded(String),
    /// The login file or a local file is unusable.
    #[error("{0}")]
    Config(String),
    /// The command was given something it cannot use.
    #[error("{0}")]
    Usage(String),
    /// The API could not be reached.
    #[error("cannot reach the API at {url}: {reason}")]
    Unreachable {
        /// Where.
        url: String,
        /// Why.
        reason: String,
    },
    /// The API refused.
    #[error("{}", describe(.0))]
    Api(http::Problem),
    /// The API answered something this command does not understand.
    #[error("unexpected answer to {path}: {reason} (is the URL the Capstan API's?)")]
    Decode {
        /// The request's path.
        path: String,
        /// What did not fit.
        reason: String,
    },
    /// Writing the output failed.
    #[error("cannot write the output: {0}")]
    Io(#[from] std::io::Error),
}

fn describe(problem: &http::Problem) -> String {
    let mut text = format!(
        "{} ({}): {}",
        problem.title,
        problem.status.as_u16(),
        problem.detail
    );
    if let Some(field) = &problem.field {
        text.push_str(&format!(" [field `{field}`]"));
    }
    let hint = match problem.status.as_u16() {
        401 => Some("log in again with `capstan login`".to_owned()),
        403 => Some(match &problem.permission {
            Some(permission) => {
                format!("your role lacks `{permission}`: ask an administrator")
            }
            None => "your role does not allow this: ask an administrator".to_owned(),
        }),
        429 => Some("too many requests: wait a little and try again".to_owned()),
        503 => Some("the mesh is not ready: try again shortly".to_owned()),
        _ => None,
    };
    if let Some(hint) = hint {
        text.push_str("\n  hint: ");
        text.push_str(&hint);
    }
    text
}

/// What a command needs: how to print, and how to reach the API.
pub struct Context {
    /// Where output goes.
    pub out: Output,
    globals: Globals,
}

impl Context {
    /// The login store these options name.
    pub fn store(&self) -> Result<config::Store, Error> {
        Ok(config::Store::new(match &self.globals.config {
            Some(path) => path.clone(),
            None => config::default_path()?,
        }))
    }

    /// The `--url` given, if any.
    pub fn url_override(&self) -> Option<&str> {
        self.globals.url.as_deref()
    }

    /// A client of the API with the caller's credential: `CAPSTAN_TOKEN` when set, else the
    /// stored login (with `--url` replacing its URL).
    pub fn api(&self) -> Result<http::Api, Error> {
        let stored = self.store()?.load()?;
        let env_token = std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty());
        match (env_token, stored) {
            (Some(token), stored) => {
                let url = self
                    .globals
                    .url
                    .clone()
                    .or_else(|| stored.as_ref().map(|login| login.url.clone()))
                    .ok_or(Error::NotLoggedIn)?;
                let ca_file = stored.and_then(|login| login.ca_file);
                Ok(http::Api::new(&url, ca_file.as_deref())?.with_token(token))
            }
            (None, Some(login)) => {
                let url = self
                    .globals
                    .url
                    .clone()
                    .unwrap_or_else(|| login.url.clone());
                let api = http::Api::new(&url, login.ca_file.as_deref())?;
                Ok(match &login.credential {
                    config::Credential::Token { token } => api.with_token(token.clone()),
                    config::Credential::Session { .. } => {
                        api.with_session(login, Arc::new(self.store()?))
                    }
                })
            }
            (None, None) => Err(Error::NotLoggedIn),
        }
    }
}

/// Runs `command` and returns the process's exit code: 0 on success, the job's own code for
/// `run`, 1 with the error on standard error otherwise.
pub async fn run(globals: Globals, command: Command) -> ExitCode {
    let context = Context {
        out: Output::detect(globals.output),
        globals,
    };
    match commands::run(&context, command).await {
        Ok(code) => code,
        Err(error) => {
            let prefix = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                "\u{1b}[1;31merror\u{1b}[0m"
            } else {
                "error"
            };
            eprintln!("{prefix}: {error}");
            ExitCode::FAILURE
        }
    }
}
