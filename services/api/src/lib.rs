//! The API service: REST under `/api/v1` (described by OpenAPI, browsable at `/docs`), the
//! job history in SQL projected from the job events, job output from the logs stream, and
//! the operational endpoints (`/healthz`, `/readyz`, `/metrics`).
//!
//! Module map: `routes` declares the operations; `model` their resources; `problem` the one
//! error shape; `projection` keeps the history tables current; `logs` reads and follows job
//! output; `metrics` renders Prometheus text; `rebuild` replays the event stream into empty
//! tables (the `capstan history rebuild` command).

pub mod logs;
pub mod metrics;
pub mod model;
pub mod problem;
pub mod projection;
pub mod rebuild;
mod routes;
mod submission;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use capstan_mesh::{Mesh, NatsArgs, Submitter};
use capstan_store::History;
use poem::listener::{Acceptor, Listener, TcpListener};
use poem::{EndpointExt, Route, Server};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// The API's configuration.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "capstan-api",
    version,
    about = "Capstan API: REST, history, logs"
)]
pub struct Config {
    /// NATS connection and submission limits.
    #[command(flatten)]
    pub nats: NatsArgs,

    /// Address to listen on.
    #[arg(long, env = "CAPSTAN_API_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,

    /// History database: `sqlite://path?mode=rwc` or `postgres://user:password@host/db`.
    /// Default: `history.db` in the data directory.
    #[arg(long, env = "CAPSTAN_DATABASE_URL")]
    pub database_url: Option<String>,

    /// Directory for local state (the default SQLite history).
    #[arg(long, env = "CAPSTAN_DATA_DIR", default_value = ".capstan/data")]
    pub data_dir: PathBuf,
}

impl Config {
    /// Defaults, pointing at `nats_url` and `database_url`, listening on a free port.
    pub fn for_urls(nats_url: impl Into<String>, database_url: impl Into<String>) -> Self {
        Self {
            nats: NatsArgs::for_url(nats_url),
            listen: "127.0.0.1:0".into(),
            database_url: Some(database_url.into()),
            data_dir: PathBuf::from(".capstan/data"),
        }
    }

    /// The history database URL to use.
    pub fn database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("history.db").display()
            )
        })
    }
}

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
}

/// What request handlers share.
pub(crate) struct State {
    pub mesh: Mesh,
    pub history: History,
    pub submitter: Submitter,
    pub metrics: Arc<Metrics>,
}

/// The OpenAPI document of the REST API, as JSON.
pub fn openapi_json() -> String {
    routes::service_description().spec()
}

/// A started API: where it listens, and the task serving it.
pub struct Running {
    /// The bound address (useful with port 0).
    pub address: SocketAddr,
    /// Ends when the API has stopped.
    pub task: tokio::task::JoinHandle<Result<(), Error>>,
}

/// Runs the API until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let running = start(config, shutdown).await?;
    running.task.await.unwrap_or(Ok(()))
}

/// Connects, migrates, binds, and serves in the background until `shutdown`. Returns once the
/// address is bound, so a caller (a test) can send requests at once.
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Running, Error> {
    let database_url = config.database_url();
    if database_url.starts_with("sqlite:") {
        let _ = std::fs::create_dir_all(&config.data_dir);
    }
    let history = History::connect(&database_url).await?;
    tracing::info!(database = %capstan_store::redact(&database_url), "history database ready");
    let mesh = Mesh::connect(&config.nats.nats_url, "capstan-api", &shutdown).await?;
    let metrics = Arc::new(Metrics::default());
    let state = Arc::new(State {
        submitter: Submitter::new(mesh.js.clone(), mesh.idempotency.clone()),
        mesh: mesh.clone(),
        history: history.clone(),
        metrics: metrics.clone(),
    });

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

    let description = routes::service_description();
    let app = Route::new()
        .nest("/", routes::service(state.clone()))
        .at("/openapi.json", description.spec_endpoint())
        .nest("/docs", description.swagger_ui())
        .with(routes::Tracing)
        .with(routes::BodyLimit(config.nats.max_job_bytes))
        .catch_all_error(|error: poem::Error| async move { problem::render(error) });

    // Listed by `nats micro ls` beside the other services; its interface is HTTP, so it has
    // no NATS endpoints, and its metadata says where to find it.
    let micro = capstan_mesh::service::start(
        &mesh.client,
        "capstan-api",
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
    let projection = tokio::spawn(projection::run(
        mesh.clone(),
        history.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    tracing::info!(%address, "api ready");
    let task = tokio::spawn(async move {
        let served = Server::new_with_acceptor(acceptor)
            .run_with_graceful_shutdown(
                app,
                shutdown.clone().cancelled_owned(),
                Some(Duration::from_secs(10)),
            )
            .await;
        let _ = projection.await;
        if let Err(error) = micro.stop().await {
            tracing::debug!(error = %error, "stopping the micro service");
        }
        tracing::info!("api stopped");
        served.map_err(|source| Error::Listen {
            address: address.to_string(),
            source,
        })
    });
    Ok(Running { address, task })
}
