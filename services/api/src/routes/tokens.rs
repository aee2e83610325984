//! `/api/v1/tokens`: API tokens for machines. A token acts for the user who created it, with a
//! role no greater than theirs; its secret is shown once, at creation, and kept only as a
//! digest. Revoking one takes effect at once on every replica.

use std::time::Duration;

use capstan_protocol::{AuditAction, AuthMethod, RevocationKey, Timestamp};
use capstan_store::entity::api_token;
use capstan_store::identity;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, OpenApi};

use super::{BearerAuth, Tag, served};
use crate::State;
use crate::auth::secret::{API_TOKEN_PREFIX, digest, new_token};
use crate::auth::{Permission, Role};
use crate::model::access::{CreatedToken, NewToken, TokenList};
use crate::problem::ApiError;

/// How long a token lives when not said.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(90 * 86_400);
/// The longest a token may live.
const MAX_LIFETIME: Duration = Duration::from_secs(365 * 86_400);

/// The API token operations.
pub(crate) struct TokensApi(pub Option<std::sync::Arc<State>>);

#[derive(ApiResponse)]
enum Created {
    /// Created: the secret is in `token`, shown this once.
    #[oai(status = 201)]
    Token(Json<CreatedToken>),
}

#[derive(ApiResponse)]
enum Revoked {
    /// Revoked: it is refused from now on.
    #[oai(status = 204)]
    Done,
}

fn db_error(error: impl Into<capstan_store::Error>) -> ApiError {
    error.into().into()
}

#[OpenApi(prefix_path = "/api/v1", tag = "Tag::Tokens")]
impl TokensApi {
    /// Create an API token acting for the caller, with at most the caller's role. Needs
    /// `tokens:create` and a password login: tokens and a provider's users make none.
    #[oai(path = "/tokens", method = "post", operation_id = "createToken")]
    async fn create(&self, auth: BearerAuth, body: Json<NewToken>) -> Result<Created, ApiError> {
        let state = served(&self.0)?;
        let caller = auth
            .allow(Permission::TokensCreate, AuditAction::TokenCreate, None)?
            .clone();
        // Only a person makes tokens: a token that could make tokens would outlive its own
        // revocation through its children.
        if caller.via != AuthMethod::Password {
            return Err(auth.forbid(
                "API tokens are made by a user logged in with a password (not by a token, \
                 not by an identity provider's user)",
            ));
        }
        let NewToken {
            name,
            role,
            expires_in,
        } = body.0;
        let name = name.trim().to_owned();
        if name.is_empty() || name.chars().count() > 128 || name.chars().any(char::is_control) {
            return Err(ApiError::bad_request(
                "a token's name is 1 to 128 printable characters",
                Some("name"),
            ));
        }
        let role = match role {
            Some(text) => text
                .parse::<Role>()
                .map_err(|reason| ApiError::bad_request(reason, Some("role")))?,
            None => caller.role,
        };
        if !caller.role.includes(role) {
            return Err(auth.forbid(format!(
                "a token cannot have more permissions than its creator: `{role}` exceeds `{}`",
                caller.role
            )));
        }
        let lifetime = match expires_in {
            Some(seconds) => {
                let lifetime = Duration::from_secs(seconds);
                if !(Duration::from_secs(60)..=MAX_LIFETIME).contains(&lifetime) {
                    return Err(ApiError::bad_request(
                        format!(
                            "`expires_in` must be 60 to {} seconds",
                            MAX_LIFETIME.as_secs()
                        ),
                        Some("expires_in"),
                    ));
                }
                lifetime
            }
            None => DEFAULT_LIFETIME,
        };
        let secret = new_token(API_TOKEN_PREFIX);
        let now = Timestamp::now();
        let row = api_token::Model {
            id: ulid::Ulid::generate().to_string(),
            name,
            role: role.as_str().to_owned(),
            owner: caller.name.clone(),
            secret_hash: digest(&secret),
            created_at: now.as_millis(),
            expires_at: Some(now.plus(lifetime).as_millis()),
            revoked_at: None,
        };
        identity::create_token(state.history.identity(), row.clone())
            .await
            .map_err(db_error)?;
        auth.resource(format!("token/{}", row.id));
        auth.detail(format!("`{}`, role {role}", row.name));
        Ok(Created::Token(Json(CreatedToken {
            token: secret,
            details: row.into(),
        })))
    }

    /// List API tokens: the caller's own, or with `tokens:manage` anyone's (`owner` picks one
    /// user's). Never shows a secret.
    #[oai(path = "/tokens", method = "get", operation_id = "listTokens")]
    async fn list(
        &self,
        auth: BearerAuth,
        /// Only the tokens of this user (default: the caller's; any user's needs
        /// `tokens:manage`).
        owner: Query<Option<String>>,
    ) -> Result<Json<TokenList>, ApiError> {
        let state = served(&self.0)?;
        let caller = auth.allow_read(Permission::TokensCreate)?;
        let manager = caller.can(Permission::TokensManage);
        let owner = match owner.0 {
            Some(owner) if owner != caller.name && !manager => {
                return Err(auth.refuse(
                    Permission::TokensManage,
                    "listing another user's tokens needs `tokens:manage`",
                ));
            }
            Some(owner) => Some(owner),
            None if manager => None,
            None => Some(caller.name.clone()),
        };
        let tokens = identity::tokens(state.history.identity(), owner.as_deref())
            .await
            .map_err(db_error)?;
        Ok(Json(TokenList {
            tokens: tokens.into_iter().map(Into::into).collect(),
        }))
    }

    /// Revoke an API token: one's own with no more permissions than the caller's, or any with
    /// `tokens:manage`. Every replica refuses it from now on.
    #[oai(path = "/tokens/:id", method = "delete", operation_id = "revokeToken")]
    async fn revoke(&self, auth: BearerAuth, id: Path<String>) -> Result<Revoked, ApiError> {
        let state = served(&self.0)?;
        let id = id.0;
        let caller = auth
            .allow(
                Permission::TokensCreate,
                AuditAction::TokenRevoke,
                Some(format!("token/{}", id.chars().take(26).collect::<String>())),
            )?
            .clone();
        let token = identity::token(state.history.identity(), &id)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ApiError::not_found(format!("no token {id}")))?;
        let manager = caller.can(Permission::TokensManage);
        if token.owner != caller.name && !manager {
            return Err(auth.refuse(
                Permission::TokensManage,
                "revoking another user's token needs `tokens:manage`",
            ));
        }
        // A weaker credential of the same user (a leaked viewer token) cannot take away a
        // stronger one.
        let role = token.role.parse::<Role>().unwrap_or(Role::Admin);
        if !manager && !caller.role.includes(role) {
            return Err(auth.refuse(
                Permission::TokensManage,
                format!(
                    "revoking a token with more permissions than the caller (`{role}` over `{}`) \
                     needs `tokens:manage`",
                    caller.role
                ),
            ));
        }
        identity::revoke_token(state.history.identity(), &id, Timestamp::now().as_millis())
            .await
            .map_err(db_error)?;
        state
            .security
            .authenticator
            .revocations()
            .revoke(RevocationKey::Token(id), "token.revoke")
            .await?;
        auth.detail(format!("`{}` of {}", token.name, token.owner));
        Ok(Revoked::Done)
    }
}
