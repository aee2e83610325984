//! Command-line and environment options every service shares.

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

/// How to reach NATS.
#[derive(Debug, Clone, clap::Args)]
pub struct NatsArgs {
    /// NATS server URL; several may be given, separated by commas.
    #[arg(
        long = "nats-url",
        env = "CAPSTAN_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: String,

    /// Largest job submission accepted, in bytes (the encoded spec, stdin included).
    #[arg(long, env = "CAPSTAN_MAX_JOB_BYTES", default_value_t = 256 * 1024)]
    pub max_job_bytes: usize,

    /// Credentials file: the NKEY seed of this service's NATS identity. Without it the
    /// connection is anonymous.
    #[arg(long = "nats-creds", env = "CAPSTAN_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,

    /// CA certificates (PEM) the server's certificate must chain to. Given, the connection
    /// requires TLS.
    #[arg(long = "nats-ca", env = "CAPSTAN_NATS_CA")]
    pub nats_ca: Option<PathBuf>,

    /// Client certificate (PEM), for a server that verifies its clients (mutual TLS); with
    /// `--nats-key`.
    #[arg(long = "nats-cert", env = "CAPSTAN_NATS_CERT", requires = "nats_key")]
    pub nats_cert: Option<PathBuf>,

    /// The client certificate's private key (PEM); with `--nats-cert`.
    #[arg(long = "nats-key", env = "CAPSTAN_NATS_KEY", requires = "nats_cert")]
    pub nats_key: Option<PathBuf>,
}

impl NatsArgs {
    /// Options pointing at `url`, with defaults for the rest (for tests and tools).
    pub fn for_url(url: impl Into<String>) -> Self {
        Self {
            nats_url: url.into(),
            max_job_bytes: 256 * 1024,
            nats_creds: None,
            nats_ca: None,
            nats_cert: None,
            nats_key: None,
        }
    }
}

/// Where a service serves its metrics.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MetricsArgs {
    /// Address on which to serve Prometheus metrics at `/metrics`, with `/healthz` and
    /// `/readyz`, without a credential (e.g. `0.0.0.0:9464`; port 0 picks a free one). Unset,
    /// nothing is served.
    #[arg(long = "metrics-listen", env = "CAPSTAN_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
}

/// How many threads run a service's tasks.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RuntimeArgs {
    /// Threads running the service's tasks. Default: one per core; an executor's, half the
    /// cores (at least one), since the jobs it runs share its machine.
    #[arg(long, env = "CAPSTAN_WORKER_THREADS")]
    pub worker_threads: Option<NonZeroUsize>,
}

/// How many threads a service's runtime has when it is not told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// One per core (tokio's own default): a service with a machine or a container to itself.
    PerCore,
    /// Half the cores, at least one: an executor, which leaves the rest to its jobs. On two
    /// cores beside the rest of the mesh, its one thread spends 12–15 % less CPU per job than
    /// two did (docs/BENCHMARKS.md).
    HalfTheCores,
}

impl Threads {
    /// The number of threads on a machine of `cores`.
    pub fn on(self, cores: usize) -> usize {
        match self {
            Self::PerCore => cores.max(1),
            Self::HalfTheCores => (cores / 2).max(1),
        }
    }
}

impl RuntimeArgs {
    /// The number of threads: the one asked for, else what `default` gives on this machine.
    pub fn threads(&self, default: Threads) -> usize {
        self.worker_threads.map_or_else(
            || default.on(std::thread::available_parallelism().map_or(1, NonZeroUsize::get)),
            NonZeroUsize::get,
        )
    }

    /// The service's runtime, with [`RuntimeArgs::threads`] workers, I/O and timers.
    pub fn build(&self, default: Threads) -> std::io::Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(self.threads(default))
            .enable_all()
            .build()
    }

    /// What a service's `main` does: builds its runtime ([`RuntimeArgs::build`]), starts its
    /// telemetry as `name` inside it, and runs `service` until it returns, handing it the token
    /// a signal cancels ([`crate::shutdown::on_signal`]). The outer error is the runtime's.
    pub fn serve<T, F>(
        &self,
        name: &str,
        default: Threads,
        service: impl FnOnce(tokio_util::sync::CancellationToken) -> F,
    ) -> std::io::Result<T>
    where
        F: std::future::Future<Output = T>,
    {
        let runtime = self.build(default)?;
        Ok(runtime.block_on(async move {
            let _telemetry = capstan_telemetry::init(name);
            service(crate::shutdown::on_signal()).await
        }))
    }
}

/// How long a short state may last without an event of its own (`--announce-after`, the same
/// for the scheduler's placements and the executor's starts), as the option is written.
pub const ANNOUNCE_AFTER: &str = "100ms";

/// [`ANNOUNCE_AFTER`] as a duration (for tests and tools).
pub fn default_announce_after() -> Duration {
    parse_duration(ANNOUNCE_AFTER).expect("the default is a valid duration")
}

/// Parses a duration given as seconds (`30`, `1.5`) or with a unit (`500ms`, `30s`, `2m`, `1h`,
/// `7d`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (e.g. 30s, 500ms, 2m)"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86_400.0,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{text}` (use ms, s, m, h or d)"
            ));
        }
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("`{text}` is not a valid duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_and_without_units() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5 days").is_err());
        assert_eq!(default_announce_after(), Duration::from_millis(100));
    }

    #[test]
    fn a_runtime_has_the_threads_asked_for_else_its_services_default_and_never_none() {
        assert_eq!(Threads::PerCore.on(1), 1);
        assert_eq!(Threads::PerCore.on(8), 8);
        assert_eq!(Threads::HalfTheCores.on(1), 1);
        assert_eq!(Threads::HalfTheCores.on(2), 1);
        assert_eq!(Threads::HalfTheCores.on(3), 1);
        assert_eq!(Threads::HalfTheCores.on(8), 4);

        #[derive(clap::Parser)]
        struct Options {
            #[command(flatten)]
            runtime: RuntimeArgs,
        }
        use clap::Parser;
        let told = Options::try_parse_from(["service", "--worker-threads", "3"])
            .expect("a number of threads is an option");
        assert_eq!(told.runtime.threads(Threads::HalfTheCores), 3);
        let runtime = told.runtime.build(Threads::PerCore).expect("a runtime");
        assert_eq!(runtime.metrics().num_workers(), 3);
        // A service runs on the runtime it is given, with a stop token no signal has cancelled.
        let (workers, stopped) = told
            .runtime
            .serve("test", Threads::PerCore, |shutdown| async move {
                let workers = tokio::runtime::Handle::current().metrics().num_workers();
                (workers, shutdown.is_cancelled())
            })
            .expect("a runtime");
        assert_eq!((workers, stopped), (3, false));
        assert!(Options::try_parse_from(["service", "--worker-threads", "0"]).is_err());
        let cores = std::thread::available_parallelism()
            .expect("the cores are known here")
            .get();
        for default in [Threads::PerCore, Threads::HalfTheCores] {
            assert_eq!(RuntimeArgs::default().threads(default), default.on(cores));
        }
    }
}
