//! `/api/v1/users`: the people who log in with a password. Administrators manage them; every
//! user reads who they are and changes their own password.
//!
//! A change that matters for credentials already handed out (a new role, disabling, a new
//! password, deletion) ends the user's sessions and revokes their earlier access tokens on
//! every replica; disabling or deleting also revokes their API tokens. The last enabled
//! administrator cannot be demoted, disabled or deleted. A user who may no longer submit jobs
//! (disabled, deleted, or given a role without `jobs:submit`) has their schedules paused and
//! their running workflows, fan-outs and unfinished jobs cancelled ([`stop_owned`]): each would
//! otherwise go on starting processes as them.

use capstan_protocol::{AuditAction, JobId, JobStatus, RevocationKey, SubmittedBy, Timestamp};
use capstan_store::JobQuery;
use capstan_store::entity::user;
use capstan_store::identity::{self, UserChanges};
use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, OpenApi};

use super::{BearerAuth, Tag, served};
use crate::State;
use crate::auth::password::{self, check_password, check_username};
use crate::auth::{Permission, Role};
use crate::model::access::{Me, NewUser, PasswordChange, User, UserList, UserPatch};
use crate::problem::ApiError;

/// The users operations.
pub(crate) struct UsersApi(pub Option<std::sync::Arc<State>>);

#[derive(ApiResponse)]
enum Created {
    /// Created.
    #[oai(status = 201)]
    User(Json<User>, #[oai(header = "Location")] String),
}

#[derive(ApiResponse)]
enum Done {
    /// Done.
    #[oai(status = 204)]
    Done,
}

fn db_error(error: impl Into<capstan_store::Error>) -> ApiError {
    error.into().into()
}

fn parse_role(text: &str) -> Result<Role, ApiError> {
    text.parse::<Role>()
        .map_err(|reason| ApiError::bad_request(reason, Some("role")))
}

#[OpenApi(prefix_path = "/api/v1", tag = "Tag::Users")]
impl UsersApi {
    /// List users. Needs `users:manage`.
    #[oai(path = "/users", method = "get", operation_id = "listUsers")]
    async fn list(&self, auth: BearerAuth) -> Result<Json<UserList>, ApiError> {
        let state = served(&self.0)?;
        auth.allow_read(Permission::UsersManage)?;
        let users = identity::users(state.history.identity())
            .await
            .map_err(db_error)?;
        Ok(Json(UserList {
            users: users.into_iter().map(Into::into).collect(),
        }))
    }

    /// Create a user. Needs `users:manage`.
    #[oai(path = "/users", method = "post", operation_id = "createUser")]
    async fn create(&self, auth: BearerAuth, body: Json<NewUser>) -> Result<Created, ApiError> {
        let state = served(&self.0)?;
        let NewUser {
            name,
            password,
            role,
            disabled,
        } = body.0;
        auth.allow(
            Permission::UsersManage,
            AuditAction::UserCreate,
            Some(format!(
                "user/{}",
                name.chars().take(64).collect::<String>()
            )),
        )?;
        check_username(&name).map_err(|e| ApiError::bad_request(e.to_string(), Some("name")))?;
        let role = parse_role(&role)?;
        check_password(&password, state.access.password_min_length)
            .map_err(|e| ApiError::bad_request(e.to_string(), Some("password")))?;
        let now = Timestamp::now().as_millis();
        let row = user::Model {
            name: name.clone(),
            role: role.as_str().to_owned(),
            password_hash: password::hash(password).await,
            disabled,
            created_at: now,
            updated_at: now,
        };
        if !identity::create_user(state.history.identity(), row.clone())
            .await
            .map_err(db_error)?
        {
            return Err(ApiError::conflict(format!("the user `{name}` exists")));
        }
        auth.detail(format!(
            "role {role}{}",
            if disabled { ", disabled" } else { "" }
        ));
        Ok(Created::User(
            Json(row.into()),
            format!("/api/v1/users/{name}"),
        ))
    }

    /// Who the caller is: name, role, how it authenticated, and its permissions. Needs only a
    /// valid credential.
    #[oai(path = "/users/me", method = "get", operation_id = "getCurrentUser")]
    async fn me(&self, auth: BearerAuth) -> Result<Json<Me>, ApiError> {
        served(&self.0)?;
        let caller = auth.principal();
        Ok(Json(Me {
            name: caller.name.clone(),
            role: caller.role.as_str().to_owned(),
            via: caller.via.as_str().to_owned(),
            token: caller.token.as_ref().map(|t| t.name.clone()),
            permissions: caller
                .role
                .permissions()
                .iter()
                .map(|p| p.as_str().to_owned())
                .collect(),
        }))
    }

    /// Change one's own password, giving the current one. Every session of the user ends,
    /// this one included: log in again with the new password. Only for users who logged in
    /// with a password.
    #[oai(
        path = "/users/me/password",
        method = "post",
        operation_id = "changePassword"
    )]
    async fn change_password(
        &self,
        auth: BearerAuth,
        body: Json<PasswordChange>,
    ) -> Result<Done, ApiError> {
        let state = served(&self.0)?;
        let caller = auth.principal().clone();
        auth.note(
            AuditAction::UserPassword,
            Some(format!("user/{}", caller.name)),
        );
        if !caller.is_local_user() {
            return Err(
                auth.forbid("only a user logged in with a password changes their password here")
            );
        }
        let PasswordChange {
            current_password,
            new_password,
        } = body.0;
        if let Err(limited) = state.security.limits.login(&caller.name, None) {
            auth.detail(limited.describe());
            return Err(limited.into());
        }
        let user = identity::user(state.history.identity(), &caller.name)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ApiError::not_found(format!("no user {}", caller.name)))?;
        if current_password.len() > password::MAX_PASSWORD_BYTES
            || !password::verify(current_password, Some(user.password_hash.clone())).await
        {
            auth.detail("wrong current password");
            return Err(ApiError::forbidden_field(
                "the current password is wrong",
                "current_password",
            ));
        }
        check_password(&new_password, state.access.password_min_length)
            .map_err(|e| ApiError::bad_request(e.to_string(), Some("new_password")))?;
        let changes = UserChanges {
            password_hash: Some(password::hash(new_password).await),
            ..Default::default()
        };
        identity::update_user(
            state.history.identity(),
            &caller.name,
            changes,
            Timestamp::now().as_millis(),
        )
        .await
        .map_err(db_error)?;
        revoke_user(state, &caller.name, false, "user.password").await?;
        Ok(Done::Done)
    }

    /// Change a user: role, disabled, or a password reset. Disabling a user, or giving them a
    /// role that may not submit jobs, pauses their schedules, which nobody may resume until
    /// that is undone, and cancels their running workflows and fan-outs and their unfinished
    /// jobs. Needs `users:manage`.
    #[oai(path = "/users/:name", method = "patch", operation_id = "updateUser")]
    async fn update(
        &self,
        auth: BearerAuth,
        name: Path<String>,
        body: Json<UserPatch>,
    ) -> Result<Json<User>, ApiError> {
        let state = served(&self.0)?;
        let name = name.0;
        auth.allow(
            Permission::UsersManage,
            AuditAction::UserUpdate,
            Some(format!(
                "user/{}",
                name.chars().take(64).collect::<String>()
            )),
        )?;
        let UserPatch {
            role,
            disabled,
            password,
        } = body.0;
        let role = role.as_deref().map(parse_role).transpose()?;
        if let Some(password) = &password {
            check_password(password, state.access.password_min_length)
                .map_err(|e| ApiError::bad_request(e.to_string(), Some("password")))?;
        }
        let current = identity::user(state.history.identity(), &name)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ApiError::not_found(format!("no user {name}")))?;
        let loses_admin = current.role == Role::Admin.as_str()
            && !current.disabled
            && (role.is_some_and(|r| r != Role::Admin) || disabled == Some(true));
        let mut changed = Vec::new();
        if let Some(role) = role {
            changed.push(format!("role {} -> {role}", current.role));
        }
        if let Some(disabled) = disabled {
            changed.push(if disabled { "disabled" } else { "enabled" }.to_owned());
        }
        if password.is_some() {
            changed.push("password reset".to_owned());
        }
        let changes = UserChanges {
            role: role.map(|r| r.as_str().to_owned()),
            disabled,
            password_hash: match password {
                Some(password) => Some(password::hash(password).await),
                None => None,
            },
        };
        let now = Timestamp::now().as_millis();
        let db = state.history.identity();
        let updated = if loses_admin {
            kept(
                identity::change_keeping_an_admin(
                    db,
                    &name,
                    Some(changes),
                    Role::Admin.as_str(),
                    now,
                )
                .await,
            )?
        } else {
            identity::update_user(db, &name, changes, now)
                .await
                .map_err(db_error)?
        }
        .ok_or_else(|| ApiError::not_found(format!("no user {name}")))?;
        if !changed.is_empty() {
            auth.detail(changed.join(", "));
            revoke_user(state, &name, updated.disabled, "user.update").await?;
            // Asking again stops what an interrupted earlier request left running.
            if super::schedules::why_runs_refused(&updated).is_some() {
                changed.extend(stop_owned(state, &name).await?);
                auth.detail(changed.join(", "));
            }
        }
        Ok(Json(updated.into()))
    }

    /// Delete a user. Their sessions and API tokens stop working at once, their schedules
    /// are paused and their running workflows, fan-outs and unfinished jobs cancelled; the jobs
    /// they submitted keep their attribution. Needs `users:manage`.
    #[oai(path = "/users/:name", method = "delete", operation_id = "deleteUser")]
    async fn delete(&self, auth: BearerAuth, name: Path<String>) -> Result<Done, ApiError> {
        let state = served(&self.0)?;
        let name = name.0;
        auth.allow(
            Permission::UsersManage,
            AuditAction::UserDelete,
            Some(format!(
                "user/{}",
                name.chars().take(64).collect::<String>()
            )),
        )?;
        let current = identity::user(state.history.identity(), &name)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ApiError::not_found(format!("no user {name}")))?;
        let db = state.history.identity();
        if current.role == Role::Admin.as_str() && !current.disabled {
            kept(
                identity::change_keeping_an_admin(
                    db,
                    &name,
                    None,
                    Role::Admin.as_str(),
                    Timestamp::now().as_millis(),
                )
                .await,
            )?;
        } else {
            identity::delete_user(db, &name).await.map_err(db_error)?;
        }
        revoke_user(state, &name, true, "user.delete").await?;
        let stopped = stop_owned(state, &name).await?;
        if !stopped.is_empty() {
            auth.detail(stopped.join(", "));
        }
        Ok(Done::Done)
    }
}

/// Pauses the schedules and cancels the running workflows and fan-outs of local user `name`,
/// who may no longer submit jobs: each would go on submitting jobs as them (a fan-out holding
/// waiting targets, by `max_parallel` or a start to come, submits them later). Cancels their
/// unfinished jobs too, as the history lists them: a job waiting for its start, a concurrency
/// slot or a retry would start a process as them, and a running one would earn retries. Says
/// what it did, for the audit record's detail (nothing when there was nothing to stop).
async fn stop_owned(state: &State, name: &str) -> Result<Vec<String>, ApiError> {
    let mesh = &state.mesh;
    let paused = super::schedules::pause_owned_by(state, name).await?;
    let workflows = open_owned(mesh.workflows.values().await?, name, |w| {
        let stopping = w.status.is_terminal() || w.cancel_requested_at.is_some();
        (w.id, w.submitted_by.as_ref(), stopping)
    });
    let workflows = cancel_each(workflows, |id| async move {
        let asked = capstan_mesh::workflow::cancel(mesh, id).await?;
        Ok(matches!(asked, Some((_, true))))
    })
    .await?;
    let fanouts = open_owned(mesh.fanouts.values().await?, name, |f| {
        let stopping = f.status.is_terminal() || f.cancel_requested_at.is_some();
        (f.id, f.submitted_by.as_ref(), stopping)
    });
    let fanouts = cancel_each(fanouts, |id| async move {
        let asked = capstan_mesh::fanout::cancel(mesh, id).await?;
        Ok(matches!(asked, Some((_, true))))
    })
    .await?;
    let jobs = cancel_each(unfinished_jobs_of(state, name).await?, |id| async move {
        use capstan_mesh::lifecycle::{CancelError, cancel};
        let asked = Timestamp::now();
        match cancel(mesh, id).await {
            // Stopped now, unless its stop had been asked before (as a workflow's step).
            Ok((_, record)) => Ok(record.cancel_requested_at.is_none_or(|at| at >= asked)),
            // Ended meanwhile, perhaps as a step of a workflow cancelled above.
            Err(CancelError::NotFound(_) | CancelError::Finished { .. }) => Ok(false),
            Err(CancelError::Mesh(error)) => Err(error),
        }
    })
    .await?;
    Ok([
        ("paused their schedules", paused),
        ("cancelled their workflows", workflows),
        ("cancelled their fan-outs", fanouts),
        ("cancelled their jobs", jobs),
    ]
    .into_iter()
    .filter(|(_, names)| !names.is_empty())
    .map(|(what, names)| format!("{what} {}", names.join(", ")))
    .collect())
}

/// The jobs local user `name` submitted (with a password or one of their tokens) that the
/// history shows unfinished: waiting for their start, for an executor or for a retry, or
/// running.
async fn unfinished_jobs_of(state: &State, name: &str) -> Result<Vec<JobId>, ApiError> {
    const PAGE: u64 = 500;
    let mut ids = Vec::new();
    for status in JobStatus::ALL.into_iter().filter(|s| !s.is_terminal()) {
        let mut query = JobQuery {
            status: Some(status),
            submitted_by: Some(name.to_owned()),
            limit: PAGE,
            ..JobQuery::default()
        };
        loop {
            let page = state.history.list(&query).await?;
            query.before = page.last().and_then(|job| job.id.parse().ok());
            ids.extend(
                page.iter()
                    .filter(|job| {
                        job.submitted_via
                            .as_deref()
                            .and_then(|via| via.parse().ok())
                            .is_some_and(super::schedules::is_local_method)
                    })
                    .filter_map(|job| job.id.parse::<JobId>().ok()),
            );
            if (page.len() as u64) < PAGE || query.before.is_none() {
                break;
            }
        }
    }
    Ok(ids)
}

/// The ids of `records` created by local user `name` that are still going and were not asked
/// to stop; `of` gives a record's id, creator, and whether it ended or was asked to stop.
fn open_owned<T>(
    records: Vec<capstan_mesh::Versioned<T>>,
    name: &str,
    of: impl Fn(&T) -> (JobId, Option<&SubmittedBy>, bool),
) -> Vec<JobId> {
    records
        .iter()
        .filter_map(|stored| {
            let (id, by, stopping) = of(&stored.value);
            let owned = by.is_some_and(|by| super::schedules::is_local_user(by, name));
            (owned && !stopping).then_some(id)
        })
        .collect()
}

/// Asks `cancel` to stop each of `ids`; returns those it stopped (for which it says true).
async fn cancel_each<F, Fut>(ids: Vec<JobId>, cancel: F) -> Result<Vec<String>, ApiError>
where
    F: Fn(JobId) -> Fut,
    Fut: std::future::Future<Output = Result<bool, capstan_mesh::Error>>,
{
    let mut cancelled = Vec::new();
    for id in ids {
        if cancel(id).await? {
            cancelled.push(id.to_string());
        }
    }
    Ok(cancelled)
}

/// The user after a change that must keep an enabled administrator, or the refusal.
fn kept(
    outcome: Result<identity::Kept, impl Into<capstan_store::Error>>,
) -> Result<Option<capstan_store::entity::user::Model>, ApiError> {
    match outcome.map_err(db_error)? {
        identity::Kept::Done(user) => Ok(user),
        identity::Kept::LastAdmin => Err(ApiError::conflict(
            "this is the last enabled administrator: it cannot be demoted, disabled or deleted",
        )),
    }
}

/// Ends every session of `name` and refuses their earlier access tokens everywhere; with
/// `tokens`, revokes their API tokens too.
async fn revoke_user(
    state: &State,
    name: &str,
    tokens: bool,
    reason: &str,
) -> Result<(), ApiError> {
    let now = Timestamp::now().as_millis();
    let db = state.history.identity();
    let revocations = state.security.authenticator.revocations();
    // Each session is revoked by its id, which needs no clock: an access token of one of them
    // is refused whatever the time its replica wrote into it. The user's own revocation, by
    // time, covers what no session covers (API tokens looked up before, a login in flight).
    for session in identity::revoke_sessions_of(db, name, reason, now)
        .await
        .map_err(db_error)?
    {
        revocations
            .revoke(RevocationKey::Session(session), reason)
            .await?;
    }
    revocations
        .revoke(RevocationKey::User(name.to_owned()), reason)
        .await?;
    if tokens {
        for id in identity::revoke_tokens_of(db, name, now)
            .await
            .map_err(db_error)?
        {
            revocations.revoke(RevocationKey::Token(id), reason).await?;
        }
    }
    Ok(())
}
