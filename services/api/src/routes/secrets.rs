//! `/api/v1/secrets`: secrets an administrator stores once, by name, for jobs to name in
//! `secret_refs` (what a job sent as plain JSON on NATS, by someone holding no key, uses).
//! Values are write-only: sealed to their name before they are stored in the secrets bucket,
//! opened only by the executor running an attempt that names them (which audits each use), and
//! never shown again. Every change is audited (`secret.put`, `secret.delete`).

use capstan_mesh::{Change, Modified};
use capstan_protocol::secret::{EVERY_SUBMITTER, SECRET_NAME_RULE, valid_secret_name};
use capstan_protocol::{AuditAction, JobSpec, StoredSecret, Timestamp};
use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, OpenApi};

use super::{BearerAuth, Tag, served};
use crate::auth::Permission;
use crate::model::secrets::{Secret, SecretInput, SecretList};
use crate::problem::ApiError;

/// The longest stored value, in bytes.
const MAX_VALUE: usize = 64 * 1024;
/// The most submitters a secret may list.
const MAX_USERS: usize = 100;

/// The stored secrets operations.
pub(crate) struct SecretsApi(pub Option<std::sync::Arc<crate::State>>);

#[derive(ApiResponse)]
enum Stored {
    /// Stored: a new secret.
    #[oai(status = 201)]
    Created(Json<Secret>),
    /// Stored: the secret's value and users replaced.
    #[oai(status = 200)]
    Replaced(Json<Secret>),
}

#[derive(ApiResponse)]
enum Deleted {
    /// Deleted: jobs naming it fail to start from now on.
    #[oai(status = 204)]
    Done,
}

#[OpenApi(prefix_path = "/api/v1", tag = "Tag::Secrets")]
impl SecretsApi {
    /// List the stored secrets: names, users and history, never values. Needs `secrets:read`.
    #[oai(path = "/secrets", method = "get", operation_id = "listSecrets")]
    async fn list(&self, auth: BearerAuth) -> Result<Json<SecretList>, ApiError> {
        let state = served(&self.0)?;
        auth.allow_read(Permission::SecretsRead)?;
        let mut secrets: Vec<Secret> = state
            .mesh
            .secrets
            .values()
            .await?
            .into_iter()
            .map(|stored| stored.value.into())
            .collect();
        secrets.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Json(SecretList { secrets }))
    }

    /// Get a stored secret, without its value. Needs `secrets:read`.
    #[oai(path = "/secrets/:name", method = "get", operation_id = "getSecret")]
    async fn get(
        &self,
        auth: BearerAuth,
        #[oai(validator(pattern = "^[A-Za-z0-9_-]{1,64}$"))] name: Path<String>,
    ) -> Result<Json<Secret>, ApiError> {
        let state = served(&self.0)?;
        auth.allow_read(Permission::SecretsRead)?;
        checked_name(&name.0)?;
        match state.mesh.secrets.get(&name.0).await? {
            Some(stored) => Ok(Json(stored.value.into())),
            None => Err(ApiError::not_found(format!(
                "no stored secret `{}`",
                name.0
            ))),
        }
    }

    /// Store a secret, or replace its value and users.
    ///
    /// The value is sealed (XChaCha20-Poly1305, bound to the secret's name) before it is
    /// stored, and no response, log or audit record holds it. Jobs name it in `secret_refs`;
    /// those of a submitter `usable_by` does not list fail to start. Needs `secrets:manage` and
    /// the API's secret keys (`CAPSTAN_SECRET_KEYS`).
    #[oai(path = "/secrets/:name", method = "put", operation_id = "putSecret")]
    async fn put(
        &self,
        auth: BearerAuth,
        #[oai(validator(pattern = "^[A-Za-z0-9_-]{1,64}$"))] name: Path<String>,
        body: Json<SecretInput>,
    ) -> Result<Stored, ApiError> {
        let state = served(&self.0)?;
        let caller = auth.allow(
            Permission::SecretsManage,
            AuditAction::SecretPut,
            Some(format!("secret/{}", name.0)),
        )?;
        let name = checked_name(&name.0)?.to_owned();
        let SecretInput {
            value,
            usable_by,
            description,
        } = body.0;
        let value = zeroize::Zeroizing::new(value);
        if value.is_empty() || value.len() > MAX_VALUE {
            return Err(ApiError::bad_request(
                format!("a secret's value is 1 to {MAX_VALUE} bytes"),
                Some("value"),
            ));
        }
        let usable_by = checked_users(usable_by)?;
        if let Some(text) = &description
            && (text.chars().count() > 256 || text.chars().any(char::is_control))
        {
            return Err(ApiError::bad_request(
                "a description is at most 256 printable characters",
                Some("description"),
            ));
        }
        let Some(keys) = state.secret_keys.as_ref() else {
            return Err(ApiError::unavailable(
                "this API has no secret keys (CAPSTAN_SECRET_KEYS), so it cannot store secrets",
            ));
        };
        let sealed = keys
            .seal_stored(&name, &value)
            .map_err(|e| ApiError::unavailable(format!("cannot seal the secret: {e}")))?;
        let now = Timestamp::now();
        let by = caller.name.clone();
        let written = state
            .mesh
            .secrets
            .modify(&name, |current| {
                Change::<_, ()>::Write(StoredSecret {
                    name: name.clone(),
                    sealed: sealed.clone(),
                    usable_by: usable_by.clone(),
                    description: description.clone(),
                    created_at: current.map_or(now, |c| c.value.created_at),
                    updated_at: now,
                    updated_by: by.clone(),
                })
            })
            .await?;
        let Modified::Written { written, previous } = written else {
            unreachable!("the change always writes")
        };
        auth.detail(format!(
            "{}; usable by {}",
            if previous.is_some() {
                "value replaced"
            } else {
                "created"
            },
            written.value.usable_by.join(", ")
        ));
        let view = Json(written.value.into());
        Ok(if previous.is_some() {
            Stored::Replaced(view)
        } else {
            Stored::Created(view)
        })
    }

    /// Delete a stored secret. Jobs that name it and have not started fail to start. Needs
    /// `secrets:manage`.
    #[oai(
        path = "/secrets/:name",
        method = "delete",
        operation_id = "deleteSecret"
    )]
    async fn delete(
        &self,
        auth: BearerAuth,
        #[oai(validator(pattern = "^[A-Za-z0-9_-]{1,64}$"))] name: Path<String>,
    ) -> Result<Deleted, ApiError> {
        let state = served(&self.0)?;
        auth.allow(
            Permission::SecretsManage,
            AuditAction::SecretDelete,
            Some(format!("secret/{}", name.0)),
        )?;
        checked_name(&name.0)?;
        if state.mesh.secrets.get(&name.0).await?.is_none() {
            return Err(ApiError::not_found(format!(
                "no stored secret `{}`",
                name.0
            )));
        }
        state
            .mesh
            .secrets
            .kv()
            .delete(&name.0)
            .await
            .map_err(|e| ApiError::unavailable(format!("cannot delete the secret: {e}")))?;
        Ok(Deleted::Done)
    }
}

fn checked_name(name: &str) -> Result<&str, ApiError> {
    if valid_secret_name(name) {
        Ok(name)
    } else {
        Err(ApiError::bad_request(SECRET_NAME_RULE, Some("name")))
    }
}

fn checked_users(usable_by: Vec<String>) -> Result<Vec<String>, ApiError> {
    let field = Some("usable_by");
    if usable_by.is_empty() || usable_by.len() > MAX_USERS {
        return Err(ApiError::bad_request(
            format!(
                "name 1 to {MAX_USERS} submitters whose jobs may use it (`{EVERY_SUBMITTER}`: \
                 every one)"
            ),
            field,
        ));
    }
    let mut users = Vec::with_capacity(usable_by.len());
    for user in usable_by {
        let user = user.trim().to_owned();
        if user.is_empty() || user.len() > 256 || user.chars().any(char::is_control) {
            return Err(ApiError::bad_request(
                "each submitter is 1 to 256 printable characters",
                field,
            ));
        }
        if !users.contains(&user) {
            users.push(user);
        }
    }
    Ok(users)
}

/// Checks, at submission, that every stored secret `spec` names exists and serves `submitter`:
/// the executor checks again when it opens them, which is what holds, but a job bound to fail
/// is better refused now.
pub(crate) async fn check_refs(
    state: &crate::State,
    auth: &BearerAuth,
    spec: &JobSpec,
    submitter: &str,
) -> Result<(), ApiError> {
    for (variable, name) in &spec.secret_refs {
        let field = format!("secret_refs.{variable}");
        match state.mesh.secrets.get(name).await? {
            None => {
                return Err(ApiError::invalid(
                    format!("no stored secret `{name}`"),
                    Some(field),
                ));
            }
            Some(stored) if !stored.value.usable_by(Some(submitter)) => {
                return Err(auth.forbid(format!(
                    "{field}: stored secret `{name}` is not for jobs submitted by `{submitter}`"
                )));
            }
            Some(_) => {}
        }
    }
    Ok(())
}
