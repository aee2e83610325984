//! What authentication costs a request, measured in-process by `cargo xtask bench --auth`:
//! the same application twice over one state, the same in every layer but one: behind the
//! guard (host check, bearer verification, revocation lookups, rate limit, audit note), or
//! with the caller simply set to an administrator in its place. The difference between the two
//! is the guard's own cost.
//!
//! The unguarded application exists only here, for measuring; no server ever serves it.

use std::net::SocketAddr;
use std::sync::Arc;

use poem::endpoint::BoxEndpoint;
use poem::{Endpoint, EndpointExt, Request};

use tokio_util::sync::CancellationToken;

use crate::audit::AuditSlot;
use crate::auth::{Principal, Role};
use crate::{Config, Error, assemble};

/// The two applications, and an access token the guarded one accepts.
pub struct AuthBench {
    /// Behind the guard.
    pub guarded: BoxEndpoint<'static>,
    /// The caller set to an administrator, no guard.
    pub unguarded: BoxEndpoint<'static>,
    /// An administrator's access token.
    pub token: String,
    /// The guard around an endpoint that only answers `200`: the guard's cost alone.
    pub guard_alone: BoxEndpoint<'static>,
    /// The caller set directly around the same endpoint.
    pub nothing_alone: BoxEndpoint<'static>,
    authenticator: Arc<crate::auth::authenticator::Authenticator>,
}

impl AuthBench {
    /// Assembles both over `config` (which must name a reachable NATS and database).
    pub async fn new(config: Config, shutdown: &CancellationToken) -> Result<Self, Error> {
        let address: SocketAddr = "127.0.0.1:8080".parse().expect("a literal address");
        let assembled = assemble(&config, address, shutdown).await?;
        let state = assembled.state;
        let token =
            state
                .security
                .authenticator
                .keys()
                .issue("admin", Role::Admin, "bench-session");
        let unguarded = crate::outer(crate::routes_app(&state, &config).around(as_admin), &config);
        let empty = || poem::endpoint::make_sync(|_| "ok");
        let guard_alone = empty()
            .with(crate::guard::Guard(state.security.clone()))
            .map_to_response()
            .boxed();
        let nothing_alone = empty().around(as_admin).boxed();
        Ok(Self {
            guard_alone,
            nothing_alone,
            guarded: crate::app(&state, &config),
            unguarded,
            token,
            authenticator: state.security.authenticator.clone(),
        })
    }

    /// A new access token for the administrator, never seen by the API.
    pub fn fresh_token(&self) -> String {
        self.authenticator
            .keys()
            .issue("admin", Role::Admin, "bench-session")
    }

    /// Verifies the bearer of `headers` alone (the guard's main cost), for the breakdown.
    pub async fn authenticate(&self, headers: &poem::http::HeaderMap) -> bool {
        self.authenticator.authenticate(headers).await.is_ok()
    }
}

/// In the guard's place: the caller is an administrator, and the request has an audit note.
async fn as_admin<E: Endpoint>(
    endpoint: Arc<E>,
    mut request: Request,
) -> poem::Result<poem::Response> {
    request.extensions_mut().insert(Principal {
        name: "admin".into(),
        role: Role::Admin,
        via: capstan_protocol::AuthMethod::Password,
        token: None,
        session: None,
    });
    request
        .extensions_mut()
        .insert(Arc::new(AuditSlot::default()));
    endpoint
        .call(request)
        .await
        .map(poem::IntoResponse::into_response)
}
