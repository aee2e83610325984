//! `/api/v1/auth`: logging in with a password, refreshing tokens, logging out. These are the
//! routes reached without a bearer credential: each checks its own (a password, a refresh
//! token), counts attempts against the login limits, and names its action for the audit trail.

use capstan_protocol::{AuditAction, RevocationKey, Timestamp};
use capstan_store::identity::{self, Rotation};
use poem::Request;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, OpenApi};

use super::{Tag, client_of, served, slot_of};
use crate::State;
use crate::auth::Role;
use crate::auth::password::{self, MAX_PASSWORD_BYTES};
use crate::auth::secret::{REFRESH_TOKEN_PREFIX, digest, new_token};
use crate::model::access::{LoginRequest, RefreshRequest, TokenPair};
use crate::problem::ApiError;

/// The answer to a wrong user name or password: the same for both, so it does not tell which
/// user names exist.
const WRONG_CREDENTIALS: &str = "wrong user name or password";

/// The login operations.
pub(crate) struct AuthApi(pub Option<std::sync::Arc<State>>);

#[derive(ApiResponse)]
enum LoggedOut {
    /// The session has ended: its refresh tokens and access tokens are refused.
    #[oai(status = 204)]
    Done,
}

#[OpenApi(prefix_path = "/api/v1", tag = "Tag::Auth")]
impl AuthApi {
    /// Log in with a user name and password.
    ///
    /// Returns a short-lived access token (a JWT) and a refresh token. Repeated attempts for
    /// one user name, or from one address, are locked out for a while: `429` with
    /// `Retry-After`.
    #[oai(path = "/auth/login", method = "post", operation_id = "login")]
    async fn login(
        &self,
        request: &Request,
        body: Json<LoginRequest>,
    ) -> Result<Json<TokenPair>, ApiError> {
        let state = served(&self.0)?;
        let slot = slot_of(request)?;
        let LoginRequest { username, password } = body.0;
        slot.action(
            AuditAction::AuthLogin,
            Some(format!(
                "user/{}",
                username.chars().take(64).collect::<String>()
            )),
        );
        slot.claimed(&username);
        if password::check_username(&username).is_err() || password.len() > MAX_PASSWORD_BYTES {
            slot.detail("malformed user name or password");
            return Err(ApiError::unauthorized(WRONG_CREDENTIALS));
        }
        if let Err(limited) = state.security.limits.login(&username, client_of(request)) {
            slot.detail(limited.describe());
            return Err(limited.into());
        }
        let user = identity::user(state.history.identity(), &username)
            .await
            .map_err(capstan_store::Error::from)?;
        let matches =
            password::verify(password, user.as_ref().map(|u| u.password_hash.clone())).await;
        let Some(user) = user.filter(|_| matches) else {
            slot.detail(WRONG_CREDENTIALS);
            return Err(ApiError::unauthorized(WRONG_CREDENTIALS));
        };
        if user.disabled {
            slot.detail("the user is disabled");
            return Err(ApiError::unauthorized("this user is disabled"));
        }
        Ok(Json(start_session(state, &user.name).await?))
    }

    /// Exchange a refresh token for new tokens.
    ///
    /// The refresh token is used up: the answer carries the next one. Presenting a used
    /// refresh token again ends its whole session (whoever copied it is logged out too).
    #[oai(
        path = "/auth/refresh",
        method = "post",
        operation_id = "refreshSession"
    )]
    async fn refresh(
        &self,
        request: &Request,
        body: Json<RefreshRequest>,
    ) -> Result<Json<TokenPair>, ApiError> {
        let state = served(&self.0)?;
        let slot = slot_of(request)?;
        slot.action(AuditAction::AuthRefresh, None);
        if let Err(limited) = state.security.limits.refresh(client_of(request)) {
            slot.detail(limited.describe());
            return Err(limited.into());
        }
        let next = new_token(REFRESH_TOKEN_PREFIX);
        let now = Timestamp::now().as_millis();
        let rotation = identity::rotate_refresh(
            state.history.identity(),
            &digest(&body.0.refresh_token),
            &digest(&next),
            now,
            now + millis(state.access.refresh_token_ttl),
        )
        .await
        .map_err(capstan_store::Error::from)?;
        match rotation {
            Rotation::Rotated { session, username } => {
                slot.resource(format!("user/{username}"));
                slot.claimed(&username);
                let user = identity::user(state.history.identity(), &username)
                    .await
                    .map_err(capstan_store::Error::from)?;
                let role = user
                    .filter(|user| !user.disabled)
                    .and_then(|user| user.role.parse::<Role>().ok());
                let Some(role) = role else {
                    end_session(state, &session, "user_disabled").await?;
                    slot.detail("the user is disabled or deleted");
                    return Err(ApiError::unauthorized("this user is disabled or deleted"));
                };
                let keys = state.security.authenticator.keys();
                Ok(Json(TokenPair {
                    access_token: keys.issue(&username, role, &session),
                    refresh_token: next,
                    token_type: "Bearer".into(),
                    expires_in: keys.ttl().as_secs(),
                }))
            }
            Rotation::Reused { session, username } => {
                slot.action(
                    AuditAction::AuthRefreshReuse,
                    Some(format!("user/{username}")),
                );
                slot.claimed(&username);
                slot.detail(format!("session {session} ended"));
                state
                    .security
                    .authenticator
                    .revocations()
                    .revoke(RevocationKey::Session(session), "auth.refresh_reuse")
                    .await?;
                Err(ApiError::unauthorized(
                    "this refresh token was used before: its session has been ended; log in again",
                ))
            }
            Rotation::Revoked => {
                slot.detail("the session had ended");
                Err(ApiError::unauthorized(
                    "the session has ended: log in again",
                ))
            }
            Rotation::Expired => {
                slot.detail("expired refresh token");
                Err(ApiError::unauthorized(
                    "the refresh token has expired: log in again",
                ))
            }
            Rotation::Unknown => {
                slot.detail("unknown refresh token");
                Err(ApiError::unauthorized("unknown refresh token"))
            }
        }
    }

    /// Log out: end the session a refresh token belongs to.
    ///
    /// Its refresh tokens stop working at once, and so do its access tokens, on every API
    /// replica.
    #[oai(path = "/auth/logout", method = "post", operation_id = "logout")]
    async fn logout(
        &self,
        request: &Request,
        body: Json<RefreshRequest>,
    ) -> Result<LoggedOut, ApiError> {
        let state = served(&self.0)?;
        let slot = slot_of(request)?;
        slot.action(AuditAction::AuthLogout, None);
        if let Err(limited) = state.security.limits.refresh(client_of(request)) {
            slot.detail(limited.describe());
            return Err(limited.into());
        }
        let session =
            identity::session_of_refresh(state.history.identity(), &digest(&body.0.refresh_token))
                .await
                .map_err(capstan_store::Error::from)?
                .ok_or_else(|| {
                    slot.detail("unknown refresh token");
                    ApiError::unauthorized("unknown refresh token")
                })?;
        slot.resource(format!("user/{}", session.username));
        slot.claimed(&session.username);
        end_session(state, &session.id, "logout").await?;
        Ok(LoggedOut::Done)
    }
}

fn millis(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Starts a session for `user`: its first refresh token, stored by digest, and an access
/// token with the user's role.
///
/// The role is read after the session is stored, not before: a change to the user that
/// revokes its sessions either sees this one (and revokes it) or was written before the read
/// (and the token carries the new role, or the user is found disabled).
async fn start_session(state: &State, user: &str) -> Result<TokenPair, ApiError> {
    let session = ulid::Ulid::generate().to_string();
    let refresh = new_token(REFRESH_TOKEN_PREFIX);
    let now = Timestamp::now().as_millis();
    identity::start_session(
        state.history.identity(),
        &session,
        user,
        &digest(&refresh),
        now,
        now + millis(state.access.refresh_token_ttl),
    )
    .await
    .map_err(capstan_store::Error::from)?;
    let current = identity::user(state.history.identity(), user)
        .await
        .map_err(capstan_store::Error::from)?;
    let role = current
        .filter(|user| !user.disabled)
        .and_then(|user| user.role.parse::<Role>().ok());
    let Some(role) = role else {
        end_session(state, &session, "user_disabled").await?;
        return Err(ApiError::unauthorized("this user is disabled or deleted"));
    };
    let keys = state.security.authenticator.keys();
    Ok(TokenPair {
        access_token: keys.issue(user, role, &session),
        refresh_token: refresh,
        token_type: "Bearer".into(),
        expires_in: keys.ttl().as_secs(),
    })
}

/// Ends session `id`: in the database (its refresh tokens) and in every replica's revocation
/// view (its access tokens).
async fn end_session(state: &State, id: &str, reason: &str) -> Result<(), ApiError> {
    identity::revoke_session(
        state.history.identity(),
        id,
        reason,
        Timestamp::now().as_millis(),
    )
    .await
    .map_err(capstan_store::Error::from)?;
    state
        .security
        .authenticator
        .revocations()
        .revoke(RevocationKey::Session(id.to_owned()), reason)
        .await?;
    Ok(())
}
