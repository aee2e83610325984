//! Identity commands: `tokens` (list, create, revoke your API tokens), `users` (an
//! administrator's list, create, update, delete) and `passwd`. Passwords are read from the
//! terminal without echo, or from standard input; never from the command line.

use std::process::ExitCode;

use http::Method;
use serde_json::{Map, Value, json};
use zeroize::Zeroizing;

use super::{encode, parse_duration, read_secret};
use crate::output::{instant, text};
use crate::{Context, Error};

/// `capstan tokens …`.
#[derive(clap::Subcommand, Debug)]
pub enum TokensCommand {
    /// Your API tokens (never their secrets).
    Ls,
    /// Create an API token and print its secret (the only time it is shown).
    Create {
        /// A name to recognise it by.
        name: String,
        /// Its role, at most yours (default: yours).
        #[arg(long)]
        role: Option<String>,
        /// How long it lasts (`30d`, `12h`; default 90 days, at most 365 days).
        #[arg(long, value_parser = parse_duration)]
        expires_in: Option<u64>,
    },
    /// Revoke an API token at once.
    Revoke {
        /// Its id.
        id: String,
    },
}

/// `capstan users …`.
#[derive(clap::Subcommand, Debug)]
pub enum UsersCommand {
    /// Every user.
    Ls,
    /// Create a user (its password asked for, or read with `--password-stdin`).
    Create {
        /// Its name.
        name: String,
        /// `viewer`, `operator` or `admin`.
        #[arg(long)]
        role: String,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
        /// Create it disabled.
        #[arg(long)]
        disabled: bool,
    },
    /// Change a user's role, enable or disable it, or reset its password.
    Update {
        /// Its name.
        name: String,
        /// A new role.
        #[arg(long)]
        role: Option<String>,
        /// Disable it (its sessions end).
        #[arg(long, conflicts_with = "enable")]
        disable: bool,
        /// Enable it.
        #[arg(long)]
        enable: bool,
        /// Reset its password (asked for, or with `--password-stdin`; its sessions end).
        #[arg(long)]
        reset_password: bool,
        /// Read the new password from the first line of standard input.
        #[arg(long, requires = "reset_password")]
        password_stdin: bool,
    },
    /// Delete a user.
    Delete {
        /// Its name.
        name: String,
    },
}

/// What `capstan passwd` takes.
#[derive(clap::Args, Debug)]
pub struct PasswdArgs {
    /// Read the current and the new password from the first two lines of standard input.
    #[arg(long)]
    password_stdin: bool,
}

pub(super) async fn tokens(context: &Context, command: TokensCommand) -> Result<ExitCode, Error> {
    let api = context.api()?;
    match command {
        TokensCommand::Ls => {
            let list: Value = api.get("/api/v1/tokens").await?;
            let tokens = crate::output::items(&list, "tokens");
            context.out.print(&list, |out| {
                out.table(
                    &[
                        "id", "name", "role", "owner", "created", "expires", "revoked",
                    ],
                    tokens
                        .iter()
                        .map(|t| {
                            vec![
                                text(t, "/id"),
                                text(t, "/name"),
                                text(t, "/role"),
                                text(t, "/owner"),
                                instant(t, "/created_at"),
                                instant(t, "/expires_at"),
                                instant(t, "/revoked_at"),
                            ]
                        })
                        .collect(),
                )
            })?;
        }
        TokensCommand::Create {
            name,
            role,
            expires_in,
        } => {
            let mut body = Map::new();
            body.insert("name".into(), json!(name));
            if let Some(role) = role {
                body.insert("role".into(), json!(role));
            }
            if let Some(seconds) = expires_in {
                body.insert("expires_in".into(), json!(seconds));
            }
            let created: Value = api.post("/api/v1/tokens", Some(&body)).await?;
            context.out.print(&created, |_| {
                eprintln!(
                    "Token {} ({}) created; it expires {}. Its secret, shown only now:",
                    text(&created, "/id"),
                    text(&created, "/role"),
                    instant(&created, "/expires_at")
                );
                format!("{}\n", text(&created, "/token"))
            })?;
        }
        TokensCommand::Revoke { id } => {
            let _: Value = api
                .call(
                    Method::DELETE,
                    &format!("/api/v1/tokens/{}", encode(&id)),
                    None::<&()>,
                )
                .await?;
            eprintln!("Token {id} revoked.");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn users(context: &Context, command: UsersCommand) -> Result<ExitCode, Error> {
    let api = context.api()?;
    match command {
        UsersCommand::Ls => {
            let list: Value = api.get("/api/v1/users").await?;
            let users = crate::output::items(&list, "users");
            context.out.print(&list, |out| {
                out.table(
                    &["name", "role", "disabled", "created", "updated"],
                    users
                        .iter()
                        .map(|u| {
                            vec![
                                text(u, "/name"),
                                text(u, "/role"),
                                text(u, "/disabled"),
                                instant(u, "/created_at"),
                                instant(u, "/updated_at"),
                            ]
                        })
                        .collect(),
                )
            })?;
        }
        UsersCommand::Create {
            name,
            role,
            password_stdin,
            disabled,
        } => {
            let password = Zeroizing::new(read_secret(
                &format!("Password for {name}: "),
                password_stdin,
                "--password-stdin",
            )?);
            let user: Value = api
                .post(
                    "/api/v1/users",
                    Some(&json!({
                        "name": name, "role": role, "disabled": disabled,
                        "password": password.as_str(),
                    })),
                )
                .await?;
            context.out.print(&user, |_| {
                format!(
                    "User {} created ({}).\n",
                    text(&user, "/name"),
                    text(&user, "/role")
                )
            })?;
        }
        UsersCommand::Update {
            name,
            role,
            disable,
            enable,
            reset_password,
            password_stdin,
        } => {
            let mut patch = Map::new();
            if let Some(role) = role {
                patch.insert("role".into(), json!(role));
            }
            if disable || enable {
                patch.insert("disabled".into(), json!(disable));
            }
            let password;
            if reset_password {
                password = Zeroizing::new(read_secret(
                    &format!("New password for {name}: "),
                    password_stdin,
                    "--password-stdin",
                )?);
                patch.insert("password".into(), json!(password.as_str()));
            }
            if patch.is_empty() {
                return Err(Error::Usage(
                    "nothing to change: give --role, --disable, --enable or --reset-password"
                        .into(),
                ));
            }
            let user: Value = api
                .call(
                    Method::PATCH,
                    &format!("/api/v1/users/{}", encode(&name)),
                    Some(&Value::Object(patch)),
                )
                .await?;
            context.out.print(&user, |_| {
                format!(
                    "User {} is {}{}.\n",
                    text(&user, "/name"),
                    text(&user, "/role"),
                    if user.get("disabled").and_then(Value::as_bool) == Some(true) {
                        ", disabled"
                    } else {
                        ""
                    }
                )
            })?;
        }
        UsersCommand::Delete { name } => {
            let _: Value = api
                .call(
                    Method::DELETE,
                    &format!("/api/v1/users/{}", encode(&name)),
                    None::<&()>,
                )
                .await?;
            eprintln!("User {name} deleted.");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn passwd(context: &Context, args: PasswdArgs) -> Result<ExitCode, Error> {
    let api = context.api()?;
    let current = Zeroizing::new(read_secret(
        "Current password: ",
        args.password_stdin,
        "--password-stdin",
    )?);
    let new = Zeroizing::new(read_secret(
        "New password: ",
        args.password_stdin,
        "--password-stdin",
    )?);
    let _: Value = api
        .post(
            "/api/v1/users/me/password",
            Some(&json!({
                "current_password": current.as_str(),
                "new_password": new.as_str(),
            })),
        )
        .await?;
    eprintln!("Password changed. Every session of yours has ended: run `capstan login` again.");
    Ok(ExitCode::SUCCESS)
}
