//! The mesh `cargo xtask up --release` runs, started for a focused benchmark: its own
//! nats-server with least-privilege identities, one registry, one scheduler, the executors
//! asked for (the first `gateways` of them SSH gateways), the API on a free port; the
//! administrator's NATS client and the API's first administrator logged in.

use std::path::Path;
use std::process::Command;

use capstan_testkit::http::HttpClient;

use crate::bench::{Process, connect, logged_in, start, wait_nodes_up};

/// A running mesh; dropping it stops every process.
pub(crate) struct SmallMesh {
    /// nats-server, then every service (stopped in reverse on drop).
    pub(crate) processes: Vec<Process>,
    /// The administrator's NATS connection.
    pub(crate) client: async_nats::Client,
    /// The API, as its first administrator.
    pub(crate) http: HttpClient,
    /// Where every process logs (removed on drop).
    _dir: tempfile::TempDir,
}

impl SmallMesh {
    /// Starts the mesh from the release binaries in `bin`, `configure` given each service's
    /// name and command before it starts, and waits until every executor is up.
    pub(crate) async fn start(
        bin: &Path,
        prefix: &str,
        executors: u32,
        gateways: u32,
        mut configure: impl FnMut(&str, &mut Command),
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
        let logs = dir.path().to_owned();
        let data = dir.path().join("data");
        std::fs::create_dir_all(data.join("nats"))?;
        let nats_binary = capstan_testkit::natsbin::ensure().map_err(anyhow::Error::msg)?;
        let nats_port = capstan_testkit::server::free_port();
        let api_port = capstan_testkit::server::free_port();
        let nats_url = format!("nats://127.0.0.1:{nats_port}");
        let identities = crate::up::identities_of(
            &dir.path().join("identities"),
            executors,
            gateways,
            capstan_mesh::identities::Grants::Least,
        )?;
        let nats_command = crate::up::nats_command(
            &nats_binary,
            nats_port,
            &data.join("nats"),
            false,
            &identities.accounts,
            None,
        )?;
        let mut processes = vec![start("nats-server", nats_command, &logs)?];
        let plan = crate::up::Plan {
            bin_dir: bin.to_owned(),
            nats_url: nats_url.clone(),
            data: data.clone(),
            registries: 1,
            schedulers: 1,
            executors,
            slots: crate::up::DEFAULT_SLOTS,
            api_listen: format!("127.0.0.1:{api_port}"),
            admin_password: capstan_api::TEST_ADMIN_PASSWORD.to_owned(),
            secret_keys: crate::up::secret_keys(&dir.path().join("secret-keys"))?,
            identities: identities.clone(),
            tls: None,
        };
        plan.apply_topology()?;
        for (name, mut command) in plan.services() {
            configure(&name, &mut command);
            processes.push(start(&name, command, &logs)?);
        }
        let seed = std::fs::read_to_string(
            identities.seed_file(&capstan_mesh::identities::Identity::Admin),
        )?;
        let client = connect(&nats_url, seed.trim(), None).await?;
        let http = logged_in(api_port, &logs).await?;
        wait_nodes_up(&http, executors as usize, &logs).await?;
        Ok(Self {
            processes,
            client,
            http,
            _dir: dir,
        })
    }

    /// The process named `name`.
    pub(crate) fn process(&self, name: &str) -> Option<&Process> {
        self.processes.iter().find(|p| p.name == name)
    }
}
