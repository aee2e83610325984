//! `capstan login`, `logout` and `whoami`: starting, ending and inspecting the stored login.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::{Value, json};

use crate::config::{Credential, Login};
use crate::http::{Api, TokenPair};
use crate::output::{Format, text};
use crate::{Context, Error, TOKEN_ENV};

/// What `capstan login` takes.
#[derive(clap::Args, Debug)]
pub struct LoginArgs {
    /// The user to log in as (asked for on a terminal when absent).
    #[arg(long, short = 'u', conflicts_with = "token_stdin")]
    username: Option<String>,
    /// Read the password from the first line of standard input instead of asking.
    #[arg(long)]
    password_stdin: bool,
    /// Log in with an API token read from standard input (or from CAPSTAN_TOKEN) instead of a
    /// password.
    #[arg(long, conflicts_with = "password_stdin")]
    token_stdin: bool,
    /// A PEM file of certificate authorities to trust for the API (a private CA).
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
}

pub(super) async fn login(context: &Context, args: LoginArgs) -> Result<ExitCode, Error> {
    let store = context.store()?;
    let previous = store.load().ok().flatten();
    let url = context
        .url_override()
        .map(str::to_owned)
        .or_else(|| previous.as_ref().map(|login| login.url.clone()))
        .ok_or_else(|| {
            Error::Usage("which API? give `--url https://…` (or set CAPSTAN_URL)".into())
        })?;
    let ca_file = args
        .ca_file
        .or_else(|| previous.and_then(|login| login.ca_file));
    let api = Api::new(&url, ca_file.as_deref())?;
    let env_token = std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty());
    let credential = if args.token_stdin || (args.username.is_none() && env_token.is_some()) {
        let token = match env_token {
            Some(token) if !args.token_stdin => token,
            _ => super::read_secret("API token: ", true, "--token-stdin")?,
        };
        Credential::Token { token }
    } else {
        let username = match args.username {
            Some(username) => username,
            None => ask("User name: ")?,
        };
        let password = zeroize::Zeroizing::new(super::read_secret(
            &format!("Password for {username}: "),
            args.password_stdin,
            "--password-stdin",
        )?);
        let pair: TokenPair = api
            .post(
                "/api/v1/auth/login",
                Some(&json!({ "username": username, "password": password.as_str() })),
            )
            .await?;
        pair.into_credential(username)
    };
    let login = Login {
        url: api.base().to_owned(),
        ca_file,
        credential,
    };
    let me: Value = client_for(&api, &login).get("/api/v1/users/me").await?;
    store.save(&login)?;
    match context.out.format {
        Format::Table => eprintln!(
            "Logged in to {} as {} ({}). The login is stored in {}.",
            login.url,
            text(&me, "/name"),
            text(&me, "/role"),
            store.path().display()
        ),
        _ => context.out.print(&me, |_| String::new())?,
    }
    Ok(ExitCode::SUCCESS)
}

/// A client using the credential just obtained as it is: a session's fresh access token is
/// not renewed here (nothing is stored yet to renew it from).
fn client_for(api: &Api, login: &Login) -> Api {
    match &login.credential {
        Credential::Token { token } => api.clone().with_token(token.clone()),
        Credential::Session { access_token, .. } => api.clone().with_token(access_token.clone()),
    }
}

fn ask(prompt: &str) -> Result<String, Error> {
    if !std::io::stdin().is_terminal() {
        return Err(Error::Usage(format!(
            "no terminal to ask `{}` on: give it as an option",
            prompt.trim_end_matches([':', ' '])
        )));
    }
    eprint!("{prompt}");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let answer = line.trim().to_owned();
    if answer.is_empty() {
        return Err(Error::Usage("nothing was given".into()));
    }
    Ok(answer)
}

pub(super) async fn logout(context: &Context) -> Result<ExitCode, Error> {
    let store = context.store()?;
    let Some(login) = store.load()? else {
        eprintln!("Not logged in.");
        return Ok(ExitCode::SUCCESS);
    };
    if let Credential::Session { refresh_token, .. } = &login.credential {
        let api = Api::new(&login.url, login.ca_file.as_deref())?;
        let ended: Result<Value, Error> = api
            .post(
                "/api/v1/auth/logout",
                Some(&json!({ "refresh_token": refresh_token })),
            )
            .await;
        match ended {
            Ok(_) => {}
            // Already ended (expired, revoked, logged out elsewhere): forgetting it is all
            // that is left to do.
            Err(Error::Api(problem)) if problem.status == http::StatusCode::UNAUTHORIZED => {}
            Err(error) => return Err(error),
        }
    }
    store.remove()?;
    eprintln!("Logged out of {}.", login.url);
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn whoami(context: &Context) -> Result<ExitCode, Error> {
    let api = context.api()?;
    let me: Value = api.get("/api/v1/users/me").await?;
    context.out.print(&me, |out| {
        let permissions = me
            .get("permissions")
            .and_then(Value::as_array)
            .map(|list| {
                list.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        out.fields(&[
            ("api", api.base().to_owned()),
            ("name", text(&me, "/name")),
            ("role", text(&me, "/role")),
            ("via", text(&me, "/via")),
            ("token", text(&me, "/token")),
            ("permissions", permissions),
        ])
    })?;
    Ok(ExitCode::SUCCESS)
}
