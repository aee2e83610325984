//! The stored secrets resource: what an administrator sends (a value, shown never again) and
//! what anyone allowed sees (the name, who may use it, when and by whom it changed).

use capstan_protocol::StoredSecret;
use poem_openapi::Object;

/// A stored secret's value and its users, as an administrator sets them.
#[derive(Clone, Object)]
#[oai(skip_serializing_if_is_none, deny_unknown_fields)]
pub struct SecretInput {
    /// The value, in clear: sealed before it is stored, and never shown again.
    #[oai(write_only)]
    pub value: String,
    /// Whose jobs may use it: submitters as jobs record them (a user's name, `oidc:<subject>`,
    /// `nats:<client>`), or `*` for every submitter.
    pub usable_by: Vec<String>,
    /// What it is for.
    pub description: Option<String>,
}

impl std::fmt::Debug for SecretInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretInput")
            .field("usable_by", &self.usable_by)
            .field("description", &self.description)
            .finish_non_exhaustive()
    }
}

/// A stored secret, without its value.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct Secret {
    /// Its name: what jobs give in `secret_refs`.
    pub name: String,
    /// Whose jobs may use it (`*`: every submitter's).
    pub usable_by: Vec<String>,
    /// What it is for.
    pub description: Option<String>,
    /// The id of the key its value is sealed with.
    pub key_id: String,
    /// When it was first stored.
    pub created_at: String,
    /// When it last changed.
    pub updated_at: String,
    /// Who changed it last.
    pub updated_by: String,
}

impl From<StoredSecret> for Secret {
    fn from(stored: StoredSecret) -> Self {
        Secret {
            key_id: stored.sealed.key_id().to_owned(),
            name: stored.name,
            usable_by: stored.usable_by,
            description: stored.description,
            created_at: stored.created_at.to_rfc3339(),
            updated_at: stored.updated_at.to_rfc3339(),
            updated_by: stored.updated_by,
        }
    }
}

/// The stored secrets, by name.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct SecretList {
    /// Every stored secret, without values.
    pub secrets: Vec<Secret>,
}
