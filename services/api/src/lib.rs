//! The API service: REST under `/api/v1` (described by OpenAPI, browsable at `/docs`), the
//! job history in SQL projected from the job events, job output from the logs stream, and
//! the operational endpoints (`/healthz`, `/readyz`, `/metrics`).
//!
//! Every route but health and login needs a credential; the guard (`guard`) checks it, limits
//! the rate, and writes the audit record of every changing request and every refusal.
//!
//! Module map: `config` the options; `routes` declares the operations; `model` their
//! resources; `problem` the one error shape; `guard` the allow-list, authentication, rate limit
//! and audit of every request; `auth` identity (tokens, passwords, roles, revocations, limits);
//! `audit` the audit trail; `bootstrap` the first administrator; `projection` keeps the
//! history tables current; `purge` removes finished jobs; `logs` reads and follows job output;
//! `metrics` renders Prometheus text; `rebuild` replays the event stream into empty tables
//! (the `capstan history rebuild` command).

pub mod admin;
pub mod audit;
pub mod auth;
#[doc(hidden)]
pub mod bench;
mod bootstrap;
mod catalogue;
pub mod config;
mod dashboard;
pub mod guard;
pub mod logs;
pub mod metrics;
pub mod model;
pub mod problem;
pub mod projection;
mod purge;
pub mod rebuild;
pub(crate) mod replay;
pub mod rotate;
mod routes;
mod submission;

pub use config::{AuthArgs, Config, TEST_ADMIN_PASSWORD, TEST_JWT_KEY};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use capstan_mesh::shutdown::Stop;
use capstan_mesh::{Mesh, Submitter, task};
use capstan_store::History;
use poem::listener::{Acceptor, Listener, TcpListener};
use poem::{EndpointExt, Route, Server};
use tokio_util::sync::CancellationToken;

use crate::audit::Auditor;
use crate::auth::authenticator::Authenticator;
use crate::auth::limits::{Limits, Settings};
use crate::auth::revocations::Revocations;
use crate::auth::{jwt, oidc};
use crate::guard::{Guard, Hosts, Security};
use crate::metrics::Metrics;

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// NATS setup failed.
    #[error(transparent)]
    Mesh(#[from] capstan_mesh::Error),
    /// The history database could not be opened or migrated.
    #[error(transparent)]
    History(#[from] capstan_store::Error),
    /// The listen address could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Listen {
        /// The address.
        address: String,
        /// Why.
        source: std::io::Error,
    },
    /// The access-token keys could not be set up.
    #[error(transparent)]
    Keys(#[from] jwt::KeyError),
    /// The OpenID Connect provider is misconfigured.
    #[error(transparent)]
    Oidc(#[from] oidc::OidcError),
    /// A setting is out of range.
    #[error("{0}")]
    Config(String),
}

/// Settings handlers need beyond the guard's.
#[derive(Debug, Clone)]
pub(crate) struct AccessSettings {
    /// The shortest password accepted.
    pub password_min_length: usize,
    /// How long a refresh token lives.
    pub refresh_token_ttl: Duration,
}

/// What request handlers share.
pub(crate) struct State {
    pub mesh: Mesh,
    pub history: History,
    pub submitter: Submitter,
    pub metrics: Arc<Metrics>,
    pub security: Arc<Security>,
    pub access: AccessSettings,
    /// The keys sealing job secrets given in clear; without them such jobs are refused.
    pub secret_keys: Option<capstan_secrets::KeyRing>,
    /// What keeps the dashboard's open pages current.
    pub live: Arc<dashboard::Live>,
}

/// The OpenAPI document of the REST API, as JSON.
pub fn openapi_json() -> String {
    routes::spec_json()
}

/// A started API: where it listens, and the task serving it.
pub struct Running {
    /// The bound address (useful with port 0).
    pub address: SocketAddr,
    /// Ends when the API has stopped, or with the panic of the server or one of the API's
    /// tasks ([`capstan_mesh::task::joined`] raises it again).
    pub task: tokio::task::JoinHandle<Result<(), Error>>,
}

/// Runs the API until `shutdown`. A panic in the server or one of its tasks is raised again
/// here once the API has stopped, never returned as a clean stop.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let running = start(config, shutdown).await?;
    // Nothing aborts the task; were the runtime to cancel it, there is nothing left to report.
    task::joined(running.task.await).unwrap_or(Ok(()))
}

/// Everything a served API shares, assembled before it serves.
pub(crate) struct Assembled {
    state: Arc<State>,
    revocations: Arc<Revocations>,
    limits: Arc<Limits>,
}

/// Checks the configuration, connects to the database (migrating it) and to NATS, loads the
/// revocations, creates the first administrator if needed, and builds the shared state; the
/// API will listen on `address`.
pub(crate) async fn assemble(
    config: &Config,
    address: SocketAddr,
    shutdown: &CancellationToken,
) -> Result<Assembled, Error> {
    if config.auth.access_token_ttl > capstan_protocol::topology::MAX_ACCESS_TOKEN_TTL
        || config.auth.access_token_ttl < Duration::from_secs(10)
    {
        return Err(Error::Config(
            "CAPSTAN_ACCESS_TOKEN_TTL must be between 10s and 24h".into(),
        ));
    }
    let database_url = config.database_url();
    if database_url.starts_with("sqlite:") {
        let _ = std::fs::create_dir_all(&config.data_dir);
    }
    let keys = jwt::Keys::load(
        jwt::KeySource {
            key: config.auth.jwt_key.as_ref(),
            file: config.auth.jwt_key_file.as_deref(),
            previous: &config.auth.jwt_previous_keys,
            generated: &config.data_dir.join("jwt.key"),
        },
        config.auth.jwt_issuer.clone(),
        config.auth.jwt_audience.clone(),
        config.auth.access_token_ttl,
    )?;
    let oidc = match (&config.auth.oidc_issuer, &config.auth.oidc_audience) {
        (Some(issuer), Some(audience)) => Some(oidc::Provider::new(oidc::Settings {
            issuer: issuer.clone(),
            audience: audience.clone(),
            role_claim: config.auth.oidc_role_claim.clone(),
            roles: config.auth.oidc_roles.clone(),
            default_role: config.auth.oidc_default_role,
        })?),
        (Some(_), None) => {
            return Err(Error::Config(
                "CAPSTAN_OIDC_ISSUER needs CAPSTAN_OIDC_AUDIENCE".into(),
            ));
        }
        _ => None,
    };
    let history = History::connect(&database_url).await?;
    tracing::info!(database = %capstan_store::redact(&database_url), "history database ready");
    let mesh = Mesh::connect(
        &config.nats,
        &capstan_protocol::access::Identity::Api,
        shutdown,
    )
    .await?;
    let revocations = Arc::new(Revocations::load(mesh.revocations.clone()).await?);
    let auditor = Auditor::new(mesh.clone(), history.clone());
    bootstrap::first_admin(
        &history,
        &auditor,
        config.auth.admin_password.as_ref(),
        config.auth.password_min_length,
    )
    .await?;
    let limits = Arc::new(Limits::new(Settings {
        requests_per_second: config.auth.rate_limit,
        burst: config.auth.rate_limit_burst,
        login_burst: config.auth.login_burst,
        login_interval: config.auth.login_interval,
        address_burst: config.auth.login_address_burst,
        address_interval: Duration::from_secs(1),
    }));
    let security = Arc::new(Security {
        authenticator: Arc::new(Authenticator::new(
            keys,
            oidc,
            revocations.clone(),
            history.clone(),
        )),
        limits: limits.clone(),
        auditor,
        hosts: Hosts::new(
            &config.auth.allowed_hosts,
            &address,
            &config.auth.cors_origins,
        ),
        trusted_proxies: config.auth.trusted_proxies.clone(),
    });
    let metrics = Arc::new(Metrics::new(&mesh, history.clone()));
    let state = Arc::new(State {
        live: Arc::new(dashboard::Live::new(mesh.clone(), shutdown.clone())),
        submitter: Submitter::new(mesh.js.clone(), mesh.idempotency.clone()),
        mesh,
        history,
        metrics,
        security,
        access: AccessSettings {
            password_min_length: config.auth.password_min_length,
            refresh_token_ttl: config.auth.refresh_token_ttl,
        },
        secret_keys: config
            .secret_keys
            .load()
            .map_err(|e| Error::Config(e.to_string()))?,
    });
    Ok(Assembled {
        state,
        revocations,
        limits,
    })
}

/// The routes, behind the body limit, the guard, CORS when configured, and a server span.
/// Every answer is counted in the metrics, by method and status; a `405` says in `Allow`
/// which methods the path takes.
pub(crate) fn app(state: &Arc<State>, config: &Config) -> poem::endpoint::BoxEndpoint<'static> {
    let metrics = state.metrics.clone();
    let methods = Arc::new(routes::PathMethods::of_description());
    let api: dashboard::Api = Arc::new(poem::endpoint::ToDynEndpoint(
        routes_app(state, config).with(Guard(state.security.clone())),
    ));
    let pages = Arc::new(dashboard::Dashboard::new(api.clone(), state));
    let routes = dashboard::Front { api, pages };
    outer(routes, config)
        .around(move |endpoint, request| {
            let (metrics, methods) = (metrics.clone(), methods.clone());
            async move {
                let (method, started) = (request.method().clone(), std::time::Instant::now());
                let path = request.uri().path().to_owned();
                let mut response = endpoint.call(request).await?;
                if response.status() == poem::http::StatusCode::METHOD_NOT_ALLOWED
                    && let Some(allowed) = methods.allowed(&path)
                    && let Ok(value) = poem::http::HeaderValue::from_str(&allowed)
                {
                    response
                        .headers_mut()
                        .insert(poem::http::header::ALLOW, value);
                }
                metrics.request(
                    method.as_str(),
                    response.status().as_u16(),
                    started.elapsed(),
                );
                Ok(response)
            }
        })
        .boxed()
}

/// The routes and the documents describing them, behind the body limit.
pub(crate) fn routes_app(state: &Arc<State>, config: &Config) -> impl poem::Endpoint + 'static {
    let description = routes::service_description();
    Route::new()
        .nest("/", routes::service(state.clone()))
        .at("/openapi.json", {
            let spec = routes::spec_json();
            poem::endpoint::make_sync(move |_| {
                poem::Response::builder()
                    .content_type("application/json; charset=utf-8")
                    .body(spec.clone())
            })
        })
        .nest("/docs", description.swagger_ui())
        .with(routes::StrictTypes::of_description())
        .with(routes::BodyLimit(config.nats.max_job_bytes))
}

/// What wraps the guarded routes: CORS when configured, the server span, problem documents
/// for every error.
pub(crate) fn outer(
    inner: impl poem::Endpoint + 'static,
    config: &Config,
) -> poem::endpoint::BoxEndpoint<'static> {
    inner
        .with_if(
            !config.auth.cors_origins.is_empty(),
            poem::middleware::Cors::new()
                .allow_origins(config.auth.cors_origins.iter().map(String::as_str))
                .allow_credentials(false),
        )
        .with(routes::Tracing)
        .catch_all_error(|error: poem::Error| async move { problem::render(error) })
        .boxed()
}

/// Connects, migrates, binds, and serves in the background until `shutdown`. Returns once the
/// address is bound, so a caller (a test) can send requests at once.
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Running, Error> {
    // A projection whose consumer cannot be created stops this replica, loudly.
    let stop = Stop::new(&shutdown);
    let shutdown = stop.token().clone();
    let acceptor = TcpListener::bind(config.listen.clone())
        .into_acceptor()
        .await
        .map_err(|source| Error::Listen {
            address: config.listen.clone(),
            source,
        })?;
    let address = acceptor
        .local_addr()
        .first()
        .and_then(|addr| addr.as_socket_addr().copied())
        .ok_or_else(|| Error::Listen {
            address: config.listen.clone(),
            source: std::io::Error::other("no socket address"),
        })?;
    // Boxed: assembling is a deep, one-off future, kept off the caller's stack (a test's
    // runtime polls every service it starts on one thread).
    let Assembled {
        state,
        revocations,
        limits,
    } = Box::pin(assemble(&config, address, &shutdown)).await?;
    let app = app(&state, &config);
    let (mesh, history, metrics) = (
        state.mesh.clone(),
        state.history.clone(),
        state.metrics.clone(),
    );
    let database_url = config.database_url();

    // Listed by `nats micro ls` beside the other services; its interface is HTTP, so it has
    // no NATS endpoints, and its metadata says where to find it.
    let micro = capstan_mesh::service::start(
        &mesh.client,
        capstan_protocol::access::API_SERVICE,
        "REST API, job history and metrics",
        std::collections::HashMap::from([
            ("listen".to_owned(), address.to_string()),
            (
                "database".to_owned(),
                database_url
                    .split(':')
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            ),
        ]),
    )
    .await?;
    let [list_systems, list_systems_from] = catalogue::endpoints(&micro).await?;
    let systems_listing = tokio::spawn({
        let (mesh, shutdown) = (mesh.clone(), shutdown.clone());
        async move {
            tokio::join!(
                catalogue::serve(list_systems, mesh.clone(), shutdown.clone()),
                catalogue::serve(list_systems_from, mesh, shutdown),
            );
        }
    });
    let projection = tokio::spawn({
        let stop = stop.clone();
        let projection = projection::run(
            mesh.clone(),
            history.clone(),
            metrics.clone(),
            shutdown.clone(),
        );
        async move { stop.watch(projection).await }
    });
    let audit_projection = tokio::spawn({
        let stop = stop.clone();
        let projection = audit::project(mesh.clone(), history.clone(), shutdown.clone());
        async move { stop.watch(projection).await }
    });
    let revocation_watch = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move { revocations.follow(shutdown).await })
    };
    let housekeeping = tokio::spawn(housekeep(
        mesh.client.clone(),
        history.clone(),
        limits,
        shutdown.clone(),
    ));
    let open_metrics = match &config.auth.metrics_listen {
        Some(listen) => Some(state.metrics.serve(listen, shutdown.clone()).await?),
        None => None,
    };
    tracing::info!(%address, "api ready");
    let task = tokio::spawn(async move {
        let served = Server::new_with_acceptor(acceptor)
            .run_with_graceful_shutdown(
                app,
                shutdown.clone().cancelled_owned(),
                Some(Duration::from_secs(10)),
            )
            .await;
        let mut joined = vec![
            projection.await,
            audit_projection.await,
            revocation_watch.await,
            housekeeping.await,
            systems_listing.await,
        ];
        if let Some(open_metrics) = open_metrics {
            joined.push(open_metrics.await);
        }
        if let Err(error) = micro.stop().await {
            tracing::debug!(error = %error, "stopping the micro service");
        }
        // Every task has been waited for; one that panicked raises its panic now rather than
        // passing for a clean stop.
        for result in joined {
            task::joined(result);
        }
        tracing::info!("api stopped");
        served.map_err(|source| Error::Listen {
            address: address.to_string(),
            source,
        })?;
        Ok(stop.outcome()?)
    });
    Ok(Running { address, task })
}

/// Every 15 seconds: counts the API replicas (they share the rate limits) and forgets quiet
/// limiter keys; every hour, forgets expired refresh tokens.
async fn housekeep(
    client: async_nats::Client,
    history: History,
    limits: Arc<Limits>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(15));
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match capstan_mesh::service::count_instances(
            &client,
            capstan_protocol::access::API_SERVICE,
            Duration::from_millis(250),
        )
        .await
        {
            Ok(count) => limits.set_replicas(u32::try_from(count).unwrap_or(u32::MAX)),
            Err(error) => tracing::debug!(error = %error, "cannot count API replicas"),
        }
        limits.housekeep();
        // Hourly (replicas doing it together is harmless): refresh tokens expired for a day,
        // and the sessions they leave empty.
        if ticks.is_multiple_of(240) {
            let before = capstan_protocol::Timestamp::now().as_millis() - 86_400_000;
            match capstan_store::identity::forget_expired(history.identity(), before).await {
                Ok((tokens, sessions)) if tokens + sessions > 0 => {
                    tracing::info!(
                        tokens,
                        sessions,
                        "forgot expired refresh tokens and sessions"
                    );
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(error = %error, "cannot forget expired refresh tokens")
                }
            }
        }
        ticks += 1;
    }
}
