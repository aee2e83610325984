//! Connecting to NATS (as the service's NKEY identity, over TLS when configured, with the
//! identity's own inbox prefix) and opening the mesh: topology verified (or, on a server with
//! no authorization, created), typed stores opened.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream;
use capstan_protocol::access::Identity;
use capstan_protocol::topology;
use capstan_protocol::{
    FanOutRecord, JobRecord, NodeRecord, Revocation, StoredSecret, System, SystemStatus,
};
use tokio_util::sync::CancellationToken;

use crate::config::NatsArgs;
use crate::error::Error;
use crate::events::EventPublisher;
use crate::store::Bucket;
use crate::submit::Idempotency;

/// How this service proves who it is to NATS, and how it checks the server: read once, at
/// start, so a missing or malformed file fails the service at once instead of on every retry.
struct Access {
    seed: Option<String>,
    ca: Option<PathBuf>,
    client_cert: Option<(PathBuf, PathBuf)>,
}

impl Access {
    fn load(nats: &NatsArgs) -> Result<Self, Error> {
        let seed = match &nats.nats_creds {
            Some(path) => Some(read_seed(path)?.seed),
            None => None,
        };
        if nats.nats_cert.is_some() != nats.nats_key.is_some() {
            return Err(Error::setup(
                "NATS client certificate",
                "a client certificate and its key go together: give both or neither",
            ));
        }
        for path in [&nats.nats_ca, &nats.nats_cert, &nats.nats_key]
            .into_iter()
            .flatten()
        {
            if let Err(error) = std::fs::metadata(path) {
                return Err(Error::setup(
                    format!("NATS TLS file {}", path.display()),
                    error,
                ));
            }
        }
        Ok(Self {
            seed,
            ca: nats.nats_ca.clone(),
            client_cert: nats.nats_cert.clone().zip(nats.nats_key.clone()),
        })
    }

    fn apply(&self, mut options: async_nats::ConnectOptions) -> async_nats::ConnectOptions {
        if let Some(seed) = &self.seed {
            options = options.nkey(seed.clone());
        }
        if let Some(ca) = &self.ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let Some((cert, key)) = &self.client_cert {
            options = options
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true);
        }
        options
    }
}

/// An NKEY user's seed, as read from a credentials file, and its public key.
pub(crate) struct UserSeed {
    /// The seed: the secret.
    pub(crate) seed: String,
    /// The public key, which a server's configuration names.
    pub(crate) public_key: String,
}

/// The NKEY user seed in the credentials file at `path`: its first line that is not blank or
/// a comment. The seed itself never appears in an error.
pub(crate) fn read_seed(path: &Path) -> Result<UserSeed, Error> {
    let what = || format!("NATS credentials file {}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| Error::setup(what(), e))?;
    if text.contains("BEGIN NATS USER JWT") {
        return Err(Error::setup(
            what(),
            "it holds a JWT; Capstan's identities are NKEY users: give the file holding the seed",
        ));
    }
    let seed = text
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty() && !line.starts_with('#') && !line.starts_with("//"))
        .ok_or_else(|| Error::setup(what(), "the file holds no seed"))?;
    match nkeys::KeyPair::from_seed(seed) {
        Ok(pair) if seed.starts_with("SU") => {
            let public_key = pair.public_key();
            tracing::debug!(identity = %public_key, "NATS identity loaded");
            Ok(UserSeed {
                seed: seed.to_owned(),
                public_key,
            })
        }
        Ok(_) => Err(Error::setup(
            what(),
            "the seed is not a user's (it must start with SU)",
        )),
        Err(_) => Err(Error::setup(
            what(),
            "the file's first line is not a valid NKEY seed",
        )),
    }
}

/// Connects to NATS as `who` with the credentials and TLS settings of `nats`, retrying with
/// backoff until it succeeds or `shutdown` fires. Fails at once when a credentials or TLS file
/// cannot be read. Replies come to `who`'s inbox prefix, which its permissions let it read.
/// Once connected, the client reconnects by itself for as long as the process lives.
pub async fn connect(
    nats: &NatsArgs,
    who: &Identity,
    shutdown: &CancellationToken,
) -> Result<async_nats::Client, Error> {
    let access = Access::load(nats)?;
    let url = nats.nats_url.as_str();
    let servers = server_addresses(url)?;
    let name = format!("capstan-{}", who.name());
    let mut delay = Duration::from_millis(100);
    loop {
        let options = access.apply(
            async_nats::ConnectOptions::new()
                .name(&name)
                .custom_inbox_prefix(who.inbox_prefix())
                .connection_timeout(Duration::from_secs(5))
                .max_reconnects(None)
                .event_callback(|event| async move {
                    match event {
                        async_nats::Event::Connected => tracing::info!("connected to NATS"),
                        async_nats::Event::Disconnected => {
                            tracing::warn!("disconnected from NATS")
                        }
                        other => tracing::debug!(event = %other, "NATS client event"),
                    }
                }),
        );
        match options.connect(servers.clone()).await {
            Ok(client) => return Ok(client),
            Err(error) => {
                tracing::warn!(url, error = %error, retry_in_ms = delay.as_millis() as u64, "cannot connect to NATS");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Err(Error::ShuttingDown),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// The servers of `urls`, separated by commas (blanks around each ignored): the client tries
/// them in turn until one answers, and moves to another when its server goes away. A cluster's
/// servers tell the client of each other too, but only once it has reached one of them.
pub fn server_addresses(urls: &str) -> Result<Vec<async_nats::ServerAddr>, Error> {
    let servers = urls
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(|url| {
            url.parse::<async_nats::ServerAddr>()
                .map_err(|e| Error::setup(format!("NATS server address {url}"), e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if servers.is_empty() {
        return Err(Error::setup(
            "NATS server address",
            "none given: name at least one server",
        ));
    }
    Ok(servers)
}

/// A connected mesh: the client, JetStream, and the typed buckets.
#[derive(Clone, Debug)]
pub struct Mesh {
    /// The core client.
    pub client: async_nats::Client,
    /// JetStream.
    pub js: jetstream::Context,
    /// Job records by job id.
    pub jobs: Bucket<JobRecord>,
    /// Node records by node id.
    pub nodes: Bucket<NodeRecord>,
    /// Idempotency reservations.
    pub idempotency: Idempotency,
    /// Revoked users, sessions and API tokens (written and watched by the API).
    pub revocations: Bucket<Revocation>,
    /// Secrets stored by administrators, sealed (written by the API, read by executors).
    pub secrets: Bucket<StoredSecret>,
    /// Remote systems, credentials sealed (written by the API, read by the gateways).
    pub systems: Bucket<System>,
    /// What the gateways found of the remote systems (written by the gateways).
    pub system_status: Bucket<SystemStatus>,
    /// Fan-out parents and their targets (written by schedulers and the API's cancel).
    pub fanouts: Bucket<FanOutRecord>,
    /// Schedules (written by the API and, for what their ticks did, by schedulers).
    pub schedules: Bucket<capstan_protocol::schedule::ScheduleRecord>,
    /// Concurrency slots by key (written by schedulers).
    pub concurrency: Bucket<capstan_protocol::concurrency::Slots>,
    /// Workflows (created by the API, carried forward by schedulers and the API's cancel).
    pub workflows: Bucket<capstan_protocol::workflow::WorkflowRecord>,
    /// Event and audit publishing.
    pub events: EventPublisher,
}

impl Mesh {
    /// Ensures the topology on `client`'s server (creating what is missing, verifying the
    /// rest) and opens the buckets: for a client allowed to create streams and buckets.
    pub async fn open(client: async_nats::Client) -> Result<Self, Error> {
        let js = jetstream::new(client.clone());
        let buckets = crate::topology::ensure(&js).await?;
        Ok(Self::from_buckets(client, js, buckets))
    }

    /// Verifies the topology on `client`'s server, changing nothing, and opens the buckets.
    pub async fn open_verified(client: async_nats::Client) -> Result<Self, Error> {
        let js = jetstream::new(client.clone());
        let buckets = crate::topology::verify(&js).await?;
        Ok(Self::from_buckets(client, js, buckets))
    }

    fn from_buckets(
        client: async_nats::Client,
        js: jetstream::Context,
        buckets: crate::topology::Buckets,
    ) -> Self {
        let jobs = Bucket::new(buckets.jobs, js.clone(), topology::JOBS.name);
        let nodes = Bucket::new(buckets.nodes, js.clone(), topology::NODES.name);
        let idempotency = Idempotency::new(
            Bucket::new(buckets.idempotency, js.clone(), topology::IDEMPOTENCY.name),
            jobs.clone(),
        );
        let revocations = Bucket::new(buckets.revocations, js.clone(), topology::REVOCATIONS.name);
        let secrets = Bucket::new(buckets.secrets, js.clone(), topology::SECRETS.name);
        let systems = Bucket::new(buckets.systems, js.clone(), topology::SYSTEMS.name);
        let system_status = Bucket::new(
            buckets.system_status,
            js.clone(),
            topology::SYSTEM_STATUS.name,
        );
        let fanouts = Bucket::new(buckets.fanouts, js.clone(), topology::FANOUTS.name);
        let schedules = Bucket::new(buckets.schedules, js.clone(), topology::SCHEDULES.name);
        let concurrency = Bucket::new(buckets.concurrency, js.clone(), topology::CONCURRENCY.name);
        let workflows = Bucket::new(buckets.workflows, js.clone(), topology::WORKFLOWS.name);
        Self {
            concurrency,
            workflows,
            fanouts,
            schedules,
            secrets,
            systems,
            system_status,
            client,
            events: EventPublisher::new(js.clone()),
            revocations,
            js,
            jobs,
            nodes,
            idempotency,
        }
    }

    /// Connects as `who` (retrying until `shutdown`) and opens the mesh. With an identity
    /// (`--nats-creds`), the topology is the administrator's: it is verified, and a missing or
    /// outdated one stops the service with an error that says so. Without one, the server has
    /// no authorization (a development server): what is missing is created, and the rest
    /// verified.
    pub async fn connect(
        nats: &NatsArgs,
        who: &Identity,
        shutdown: &CancellationToken,
    ) -> Result<Self, Error> {
        let client = connect(nats, who, shutdown).await?;
        if nats.nats_creds.is_some() {
            Self::open_verified(client).await
        } else {
            Self::open(client).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_comma_separated_list_names_every_server_of_a_cluster() {
        let servers =
            server_addresses("nats://10.0.0.1:4222, nats://10.0.0.2:4223,nats-3").expect("valid");
        let ports: Vec<u16> = servers.iter().map(|s| s.port()).collect();
        assert_eq!(ports, [4222, 4223, 4222]);
        assert_eq!(servers[2].host(), "nats-3");
        assert_eq!(
            server_addresses("nats://127.0.0.1:4222")
                .expect("valid")
                .len(),
            1
        );
    }

    #[test]
    fn an_empty_or_malformed_server_list_is_refused() {
        assert!(matches!(server_addresses(" , "), Err(Error::Setup { .. })));
        assert!(matches!(
            server_addresses("nats://127.0.0.1:4222,nats://bad host:1"),
            Err(Error::Setup { .. })
        ));
    }
}
