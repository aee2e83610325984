//! `/api/v1/systems`: the catalogue of remote systems that gateway executors reach over SSH.
//! Credentials are write-only: sealed to the system's name and field before they are stored,
//! opened only by the gateway that connects, and never shown again. A system must pin its
//! host key, or ask explicitly for the first key seen to be pinned. Administrators manage the
//! catalogue (`system.create`, `system.update`, `system.delete`, each audited); whoever reads
//! nodes reads it, with what the gateways' health checks found.

use capstan_mesh::{Change, Modified};
use capstan_protocol::spec::validate_labels;
use capstan_protocol::system::{
    HOST_KEY_RULE, SYSTEM_NAME_RULE, System, SystemAuth, normalize_host_key, valid_system_name,
};
use capstan_protocol::{AuditAction, Timestamp};
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::types::MaybeUndefined;
use poem_openapi::{ApiResponse, OpenApi};

use super::{BearerAuth, Tag, served};
use crate::auth::Permission;
use crate::model::systems::{
    AuthInput, AuthMethodName, SystemInput, SystemList, SystemPatch, SystemView,
};
use crate::problem::ApiError;

/// The longest password or passphrase, in bytes.
const MAX_PASSWORD: usize = 4096;
/// The longest private key, in bytes.
const MAX_PRIVATE_KEY: usize = 16 * 1024;
/// The longest host name.
const MAX_HOSTNAME: usize = 253;
/// The longest account name.
const MAX_USERNAME: usize = 64;

/// The remote systems operations.
pub(crate) struct SystemsApi(pub Option<std::sync::Arc<crate::State>>);

#[derive(ApiResponse)]
enum Created {
    /// Added; gateways check it within their check interval.
    #[oai(status = 201)]
    Done(Json<SystemView>),
}

#[derive(ApiResponse)]
enum Deleted {
    /// Removed, with what its checks found.
    #[oai(status = 204)]
    Done,
}

#[OpenApi(prefix_path = "/api/v1", tag = "Tag::Systems")]
impl SystemsApi {
    /// List the remote systems, without credentials, with their health, by name. Needs
    /// `systems:read`.
    #[oai(path = "/systems", method = "get", operation_id = "listSystems")]
    async fn list(
        &self,
        auth: BearerAuth,
        /// Only systems carrying this label, as `key=value`; repeat for several (all must
        /// match).
        #[oai(default)]
        label: Query<Vec<String>>,
    ) -> Result<Json<SystemList>, ApiError> {
        let state = served(&self.0)?;
        auth.allow_read(Permission::SystemsRead)?;
        let mut selector = capstan_protocol::Labels::new();
        for pair in &label.0 {
            let (key, value) = pair.split_once('=').ok_or_else(|| {
                ApiError::bad_request(format!("label `{pair}` is not key=value"), Some("label"))
            })?;
            selector.insert(key.to_owned(), value.to_owned());
        }
        let mut systems = Vec::new();
        for system in state.mesh.systems.values().await? {
            if !capstan_protocol::spec::selects(&selector, &system.value.labels) {
                continue;
            }
            let status = state.mesh.system_status.get(&system.value.name).await?;
            systems.push(SystemView::of(system.value, status.map(|s| s.value)));
        }
        systems.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Json(SystemList { systems }))
    }

    /// Get a remote system, without its credential. Needs `systems:read`.
    #[oai(path = "/systems/:name", method = "get", operation_id = "getSystem")]
    async fn get(
        &self,
        auth: BearerAuth,
        #[oai(validator(pattern = "^[A-Za-z0-9_-]{1,64}$"))] name: Path<String>,
    ) -> Result<Json<SystemView>, ApiError> {
        let state = served(&self.0)?;
        auth.allow_read(Permission::SystemsRead)?;
        let system = existing(state, checked_name(&name.0)?).await?;
        let status = state.mesh.system_status.get(&name.0).await?;
        Ok(Json(SystemView::of(system, status.map(|s| s.value))))
    }

    /// Add a remote system.
    ///
    /// Its credential is sealed (XChaCha20-Poly1305, bound to the system's name and the
    /// field) before it is stored; no response, log, event or audit record holds it. Without
    /// `host_key`, the system is refused unless `trust_on_first_use` asks for the first key a
    /// gateway sees to be pinned. Needs `systems:manage` and the API's secret keys.
    #[oai(path = "/systems", method = "post", operation_id = "createSystem")]
    async fn create(&self, auth: BearerAuth, body: Json<SystemInput>) -> Result<Created, ApiError> {
        let state = served(&self.0)?;
        let caller = auth.allow(
            Permission::SystemsManage,
            AuditAction::SystemCreate,
            Some(resource(&body.0.name)),
        )?;
        let input = body.0;
        let name = checked_name(&input.name)?.to_owned();
        let host_key = checked_pin(input.host_key.as_deref(), input.trust_on_first_use)?;
        let now = Timestamp::now();
        let system = System {
            hostname: checked_hostname(&input.hostname)?,
            port: checked_port(input.port.unwrap_or(22))?,
            username: checked_username(&input.username)?,
            auth: sealed(state, &name, input.auth)?,
            host_key,
            trust_on_first_use: input.trust_on_first_use,
            labels: checked_labels(input.labels)?,
            active: input.active.unwrap_or(true),
            created_at: now,
            updated_at: now,
            updated_by: caller.name.clone(),
            name,
        };
        match state.mesh.systems.create(&system.name, &system).await {
            Ok(_) => {}
            Err(capstan_mesh::Error::AlreadyExists { .. }) => {
                return Err(ApiError::conflict(format!(
                    "a system `{}` exists; change it with PATCH",
                    system.name
                )));
            }
            Err(error) => return Err(error.into()),
        }
        // A status left by a system of the same name removed earlier says nothing of this one.
        forget_status(state, &system.name).await?;
        auth.detail(describe(&system));
        Ok(Created::Done(Json(SystemView::of(system, None))))
    }

    /// Change a remote system: the fields given are replaced. A new address, port or pinned
    /// key forgets what the checks found and any key pinned on first use. Needs
    /// `systems:manage` (and the secret keys for a new credential).
    #[oai(
        path = "/systems/:name",
        method = "patch",
        operation_id = "updateSystem"
    )]
    async fn update(
        &self,
        auth: BearerAuth,
        #[oai(validator(pattern = "^[A-Za-z0-9_-]{1,64}$"))] name: Path<String>,
        body: Json<SystemPatch>,
    ) -> Result<Json<SystemView>, ApiError> {
        let state = served(&self.0)?;
        let caller = auth.allow(
            Permission::SystemsManage,
            AuditAction::SystemUpdate,
            Some(resource(&name.0)),
        )?;
        let name = checked_name(&name.0)?.to_owned();
        let patch = body.0;
        existing(state, &name).await?;
        // Everything given is checked, and the credential sealed, before anything is written.
        let hostname = patch
            .hostname
            .as_deref()
            .map(checked_hostname)
            .transpose()?;
        let port = patch.port.map(checked_port).transpose()?;
        let username = patch
            .username
            .as_deref()
            .map(checked_username)
            .transpose()?;
        let credential = patch.auth.map(|a| sealed(state, &name, a)).transpose()?;
        let labels = patch.labels.map(checked_labels).transpose()?;
        let pin = match &patch.host_key {
            MaybeUndefined::Value(pin) => MaybeUndefined::Value(
                normalize_host_key(pin)
                    .ok_or_else(|| ApiError::invalid(HOST_KEY_RULE, Some("host_key".into())))?,
            ),
            MaybeUndefined::Null => MaybeUndefined::Null,
            MaybeUndefined::Undefined => MaybeUndefined::Undefined,
        };
        let now = Timestamp::now();
        let by = caller.name.clone();
        // The change is applied to the record as each compare-and-swap reads it, so that a
        // concurrent change of another field is kept; what changed is told against that read.
        let mut changed: Vec<&'static str> = Vec::new();
        let written = state
            .mesh
            .systems
            .modify(&name, |stored| {
                let Some(stored) = stored else {
                    return Change::Stop(None);
                };
                let before = &stored.value;
                let mut system = before.clone();
                if let Some(hostname) = &hostname {
                    system.hostname.clone_from(hostname);
                }
                if let Some(port) = port {
                    system.port = port;
                }
                if let Some(username) = &username {
                    system.username.clone_from(username);
                }
                if let Some(credential) = &credential {
                    system.auth = credential.clone();
                }
                if let Some(labels) = &labels {
                    system.labels.clone_from(labels);
                }
                if let Some(active) = patch.active {
                    system.active = active;
                }
                if let Some(trust) = patch.trust_on_first_use {
                    system.trust_on_first_use = trust;
                }
                match &pin {
                    MaybeUndefined::Value(pin) => system.host_key = Some(pin.clone()),
                    MaybeUndefined::Null => system.host_key = None,
                    MaybeUndefined::Undefined => {}
                }
                if let Err(refused) =
                    checked_pin(system.host_key.as_deref(), system.trust_on_first_use)
                {
                    return Change::Stop(Some(refused));
                }
                changed = [
                    ("hostname", system.hostname != before.hostname),
                    ("port", system.port != before.port),
                    ("username", system.username != before.username),
                    ("auth", credential.is_some()),
                    ("host_key", system.host_key != before.host_key),
                    (
                        "trust_on_first_use",
                        system.trust_on_first_use != before.trust_on_first_use,
                    ),
                    ("labels", system.labels != before.labels),
                    ("active", system.active != before.active),
                ]
                .into_iter()
                .filter_map(|(field, differs)| differs.then_some(field))
                .collect();
                system.updated_at = now;
                system.updated_by.clone_from(&by);
                Change::Write(system)
            })
            .await?;
        let written = match written {
            Modified::Written { written, .. } => written,
            Modified::Stopped(Some(refused)) => return Err(refused),
            Modified::Stopped(None) => {
                return Err(ApiError::not_found(format!("no system `{name}`")));
            }
        };
        // A new address or pin makes what the checks found, and a key pinned on first use,
        // about another server.
        if changed
            .iter()
            .any(|f| matches!(*f, "hostname" | "port" | "host_key" | "trust_on_first_use"))
        {
            forget_status(state, &name).await?;
        }
        auth.detail(if changed.is_empty() {
            "nothing changed".to_owned()
        } else {
            format!("changed {}", changed.join(", "))
        });
        let status = state.mesh.system_status.get(&name).await?;
        Ok(Json(SystemView::of(written.value, status.map(|s| s.value))))
    }

    /// Remove a remote system, with what its checks found. Jobs naming it fail to start from
    /// now on. Needs `systems:manage`.
    #[oai(
        path = "/systems/:name",
        method = "delete",
        operation_id = "deleteSystem"
    )]
    async fn delete(
        &self,
        auth: BearerAuth,
        #[oai(validator(pattern = "^[A-Za-z0-9_-]{1,64}$"))] name: Path<String>,
    ) -> Result<Deleted, ApiError> {
        let state = served(&self.0)?;
        auth.allow(
            Permission::SystemsManage,
            AuditAction::SystemDelete,
            Some(resource(&name.0)),
        )?;
        let system = existing(state, checked_name(&name.0)?).await?;
        state
            .mesh
            .systems
            .kv()
            .delete(&name.0)
            .await
            .map_err(|e| ApiError::unavailable(format!("cannot delete the system: {e}")))?;
        forget_status(state, &name.0).await?;
        auth.detail(describe(&system));
        Ok(Deleted::Done)
    }
}

/// The audit record's resource for the system `name` as asked (cut to a name's length: it is
/// recorded before the name is checked).
fn resource(name: &str) -> String {
    format!("system/{}", name.chars().take(64).collect::<String>())
}

async fn existing(state: &crate::State, name: &str) -> Result<System, ApiError> {
    match state.mesh.systems.get(name).await? {
        Some(system) => Ok(system.value),
        None => Err(ApiError::not_found(format!("no system `{name}`"))),
    }
}

/// Removes what the checks of `name` found (its health and a key pinned on first use).
async fn forget_status(state: &crate::State, name: &str) -> Result<(), ApiError> {
    if state.mesh.system_status.get(name).await?.is_none() {
        return Ok(());
    }
    state
        .mesh
        .system_status
        .kv()
        .delete(name)
        .await
        .map_err(|e| ApiError::unavailable(format!("cannot reset the system's status: {e}")))
}

/// What the audit record says of a system: where and how, never the credential.
fn describe(system: &System) -> String {
    format!(
        "{}@{}:{} by {}, host key {}",
        system.username,
        system.hostname,
        system.port,
        system.auth.method(),
        system.host_key.as_deref().unwrap_or("pinned on first use")
    )
}

fn checked_name(name: &str) -> Result<&str, ApiError> {
    if valid_system_name(name) {
        Ok(name)
    } else {
        Err(ApiError::invalid(SYSTEM_NAME_RULE, Some("name".into())))
    }
}

fn checked_hostname(hostname: &str) -> Result<String, ApiError> {
    let hostname = hostname.trim();
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_');
    if hostname.is_empty()
        || hostname.len() > MAX_HOSTNAME
        || hostname.starts_with('-')
        || !hostname.chars().all(allowed)
    {
        return Err(ApiError::invalid(
            format!(
                "a host name or address is 1 to {MAX_HOSTNAME} characters of A-Z, a-z, 0-9, \
                 `.`, `-`, `_` and `:`, not starting with `-`"
            ),
            Some("hostname".into()),
        ));
    }
    Ok(hostname.to_owned())
}

fn checked_port(port: u16) -> Result<u16, ApiError> {
    if port == 0 {
        return Err(ApiError::invalid(
            "a port is 1 to 65535",
            Some("port".into()),
        ));
    }
    Ok(port)
}

fn checked_username(username: &str) -> Result<String, ApiError> {
    if username.is_empty()
        || username.len() > MAX_USERNAME
        || username.starts_with('-')
        || username
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(ApiError::invalid(
            format!(
                "an account name is 1 to {MAX_USERNAME} characters, without spaces, not \
                 starting with `-`"
            ),
            Some("username".into()),
        ));
    }
    Ok(username.to_owned())
}

fn checked_labels(
    labels: std::collections::BTreeMap<String, String>,
) -> Result<std::collections::BTreeMap<String, String>, ApiError> {
    validate_labels("labels", &labels)
        .map_err(|error| ApiError::invalid(error.to_string(), Some(error.field)))?;
    Ok(labels)
}

/// The host key to pin: `pin` normalised, or none when the first key seen is to be trusted.
fn checked_pin(pin: Option<&str>, trust_on_first_use: bool) -> Result<Option<String>, ApiError> {
    match pin {
        Some(pin) => normalize_host_key(pin)
            .map(Some)
            .ok_or_else(|| ApiError::invalid(HOST_KEY_RULE, Some("host_key".into()))),
        None if trust_on_first_use => Ok(None),
        None => Err(ApiError::invalid(
            "pin the server's host key in `host_key` (`ssh-keyscan` shows it), or set \
             `trust_on_first_use: true` to pin the first key a gateway sees",
            Some("host_key".into()),
        )),
    }
}

/// Checks the credential and seals each of its fields to the system `name`.
fn sealed(state: &crate::State, name: &str, auth: AuthInput) -> Result<SystemAuth, ApiError> {
    let AuthInput {
        method,
        password,
        private_key,
        passphrase,
    } = auth;
    let (password, private_key, passphrase) = (
        password.map(zeroize::Zeroizing::new),
        private_key.map(zeroize::Zeroizing::new),
        passphrase.map(zeroize::Zeroizing::new),
    );
    let invalid = |field: &str, detail: String| ApiError::invalid(detail, Some(field.into()));
    let sized = |field: &str, value: &str, max: usize| {
        if value.is_empty() || value.len() > max {
            Err(invalid(field, format!("`{field}` is 1 to {max} bytes")))
        } else {
            Ok(())
        }
    };
    match method {
        AuthMethodName::Password => {
            if private_key.is_some() || passphrase.is_some() {
                return Err(invalid(
                    if private_key.is_some() {
                        "auth.private_key"
                    } else {
                        "auth.passphrase"
                    },
                    "a password login takes `password` only".into(),
                ));
            }
            let Some(given) = &password else {
                return Err(invalid(
                    "auth.password",
                    "a password login needs `password`".into(),
                ));
            };
            sized("auth.password", given, MAX_PASSWORD)?;
        }
        AuthMethodName::PrivateKey => {
            if password.is_some() {
                return Err(invalid(
                    "auth.password",
                    "a key login takes `private_key` and `passphrase`, not `password`".into(),
                ));
            }
            let Some(key) = &private_key else {
                return Err(invalid(
                    "auth.private_key",
                    "a key login needs `private_key`".into(),
                ));
            };
            sized("auth.private_key", key, MAX_PRIVATE_KEY)?;
            if !key.contains("PRIVATE KEY-----") {
                return Err(invalid(
                    "auth.private_key",
                    "`private_key` is a private key in OpenSSH or PEM form (`-----BEGIN … \
                     PRIVATE KEY-----`)"
                        .into(),
                ));
            }
            if let Some(passphrase) = &passphrase {
                sized("auth.passphrase", passphrase, MAX_PASSWORD)?;
            }
        }
    }
    let Some(keys) = state.secret_keys.as_ref() else {
        return Err(ApiError::unavailable(
            "this API has no secret keys (CAPSTAN_SECRET_KEYS), so it cannot store credentials",
        ));
    };
    let seal = |field: &str, value: &str| {
        keys.seal_system(name, field, value)
            .map_err(|e| ApiError::unavailable(format!("cannot seal the credential: {e}")))
    };
    Ok(match method {
        AuthMethodName::Password => SystemAuth::Password {
            password: seal("password", password.as_deref().map_or("", String::as_str))?,
        },
        AuthMethodName::PrivateKey => SystemAuth::PrivateKey {
            private_key: seal(
                "private_key",
                private_key.as_deref().map_or("", String::as_str),
            )?,
            passphrase: passphrase
                .as_deref()
                .map(|p| seal("passphrase", p.as_str()))
                .transpose()?,
        },
    })
}

/// Checks, at submission, that the system a job names exists and is active (the schedulers
/// check again, and refuse the submission otherwise), so the caller hears of it at once.
pub(crate) async fn check_system(
    state: &crate::State,
    spec: &capstan_protocol::JobSpec,
) -> Result<(), ApiError> {
    use capstan_protocol::fanout::Targets;
    if let Some(fanout) = &spec.fanout {
        match &fanout.targets {
            Targets::SystemNames(names) => {
                for (index, name) in names.iter().enumerate() {
                    active_system(state, name, format!("systems.names[{index}]")).await?;
                }
            }
            Targets::SystemLabels(labels) => {
                let any = state.mesh.systems.values().await?.iter().any(|system| {
                    system.value.active
                        && capstan_protocol::spec::selects(labels, &system.value.labels)
                });
                if !any {
                    return Err(ApiError::invalid(
                        "no active system carries these labels: the fan-out would run nowhere",
                        Some("systems.labels".to_owned()),
                    ));
                }
            }
            Targets::Nodes(labels) => {
                let any = state.mesh.nodes.values().await?.iter().any(|node| {
                    node.value.is_schedulable()
                        && capstan_protocol::spec::selects_node(
                            labels,
                            node.value.id.as_str(),
                            &node.value.labels,
                        )
                });
                if !any {
                    return Err(ApiError::invalid(
                        "no node that is up and schedulable carries these labels: the fan-out \
                         would run nowhere",
                        Some("nodes.labels".to_owned()),
                    ));
                }
            }
        }
    }
    let Some(name) = &spec.system else {
        return Ok(());
    };
    active_system(state, name, "system".to_owned()).await
}

/// Refuses a job naming system `name` (in `field`) unless the catalogue has it active.
async fn active_system(state: &crate::State, name: &str, field: String) -> Result<(), ApiError> {
    let field = Some(field);
    match state.mesh.systems.get(name).await? {
        None => Err(ApiError::invalid(
            format!("no system `{name}` in the catalogue (GET /api/v1/systems lists them)"),
            field,
        )),
        Some(system) if !system.value.active => Err(ApiError::invalid(
            format!("system `{name}` is inactive: an administrator must activate it first"),
            field,
        )),
        Some(_) => Ok(()),
    }
}
