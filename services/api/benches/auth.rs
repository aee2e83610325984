//! What authentication adds to a request: `GET /api/v1/jobs/{id}` with an access token through
//! the guard, against the same route over the same state with the caller set directly (see
//! `capstan_api::bench`). Both run in this process, one request at a time, in alternating
//! rounds, against a real nats-server and a SQLite history; the report gives each one's
//! latency (p50, p99) and CPU per request, and the cost of verifying the token alone.
//!
//! Run with `cargo xtask bench --auth` (or `cargo bench -p capstan-api --bench auth`).

use std::time::{Duration, Instant};

use capstan_api::bench::AuthBench;
use poem::http::{HeaderMap, Method};
use poem::{Endpoint, Request};
use tokio_util::sync::CancellationToken;

/// Requests per round and side.
const PER_ROUND: usize = 1_000;
/// Rounds, alternating sides.
const ROUNDS: usize = 30;

fn cpu() -> Duration {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .expect("getrusage");
    let micros = |t: nix::sys::time::TimeVal| {
        Duration::from_micros(
            u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000
                + u64::try_from(t.tv_usec()).unwrap_or(0),
        )
    };
    micros(usage.user_time()) + micros(usage.system_time())
}

fn request(path: &str, token: &str) -> Request {
    Request::builder()
        .method(Method::GET)
        .uri(path.parse().expect("a path"))
        .header("host", "127.0.0.1:8080")
        .header("authorization", format!("Bearer {token}"))
        .finish()
}

async fn call(endpoint: &poem::endpoint::BoxEndpoint<'static>, path: &str, token: &str) {
    let response = endpoint
        .call(request(path, token))
        .await
        .expect("an answer");
    assert!(
        response.status().is_success(),
        "{path}: {}",
        response.status()
    );
    let _ = response.into_body().into_bytes().await;
}

struct Side {
    latencies: Vec<Duration>,
    cpu: Duration,
    /// CPU per request of each round.
    rounds: Vec<Duration>,
}

impl Side {
    fn new() -> Self {
        Self {
            latencies: Vec::with_capacity(PER_ROUND * ROUNDS),
            cpu: Duration::ZERO,
            rounds: Vec::with_capacity(ROUNDS),
        }
    }

    fn p(&mut self, q: f64) -> Duration {
        self.latencies.sort();
        let index = ((self.latencies.len() as f64 - 1.0) * q).round() as usize;
        self.latencies[index]
    }

    fn cpu_per_request(&self) -> Duration {
        self.cpu / u32::try_from(self.latencies.len()).unwrap_or(u32::MAX)
    }
}

async fn round(
    endpoint: &poem::endpoint::BoxEndpoint<'static>,
    path: &str,
    token: &str,
    side: &mut Side,
) {
    let started = cpu();
    for _ in 0..PER_ROUND {
        let at = Instant::now();
        call(endpoint, path, token).await;
        side.latencies.push(at.elapsed());
    }
    let used = cpu() - started;
    side.cpu += used;
    side.rounds
        .push(used / u32::try_from(PER_ROUND).unwrap_or(u32::MAX));
}

fn micros(duration: Duration) -> String {
    format!("{:.1} µs", duration.as_secs_f64() * 1e6)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(run());
}

async fn run() {
    let nats = capstan_testkit::NatsServer::start().await;
    let dir = tempfile::tempdir().expect("a directory");
    let database = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("history.db").display()
    );
    let mut config = capstan_api::Config::for_urls(nats.url(), database);
    // The limiter stays in the path, with a limit no request reaches.
    config.auth.rate_limit = 1_000_000_000;
    config.auth.rate_limit_burst = 1_000_000_000;
    let shutdown = CancellationToken::new();
    // A scheduler accepts the job (no executor runs it: it stays pending, read from its live
    // record and the history like any job in flight).
    tokio::spawn(capstan_scheduler::run(
        capstan_scheduler::Config::for_url(nats.url()),
        shutdown.clone(),
    ));
    let bench = AuthBench::new(config, &shutdown)
        .await
        .expect("the API assembles");

    let submit = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/jobs".parse().expect("a path"))
        .header("host", "127.0.0.1:8080")
        .header("authorization", format!("Bearer {}", bench.token))
        .header("content-type", "application/json")
        .body(r#"{"command": "true", "env": {"A": "1"}}"#);
    let created = bench.guarded.call(submit).await.expect("submitted");
    let body = created.into_body().into_string().await.expect("a body");
    let id = serde_json::from_str::<serde_json::Value>(&body).expect("JSON")["id"]
        .as_str()
        .expect("an id")
        .to_owned();
    let path = format!("/api/v1/jobs/{id}");
    capstan_testkit::wait_until(
        "the job to be accepted",
        Duration::from_secs(30),
        || async {
            let answer = bench
                .guarded
                .call(request(&path, &bench.token))
                .await
                .ok()?;
            answer.status().is_success().then_some(())
        },
    )
    .await;

    for _ in 0..500 {
        call(&bench.guarded, &path, &bench.token).await;
        call(&bench.unguarded, &path, &bench.token).await;
    }
    let (mut guarded, mut unguarded) = (Side::new(), Side::new());
    // Which side goes first alternates, so neither gains from running after the other.
    for n in 0..ROUNDS {
        if n % 2 == 0 {
            round(&bench.guarded, &path, &bench.token, &mut guarded).await;
            round(&bench.unguarded, &path, &bench.token, &mut unguarded).await;
        } else {
            round(&bench.unguarded, &path, &bench.token, &mut unguarded).await;
            round(&bench.guarded, &path, &bench.token, &mut guarded).await;
        }
    }

    // Verifying alone: a token seen before (remembered), and a token seen for the first time
    // (decoded, its HMAC checked).
    let bearer = |token: &str| {
        let mut headers = HeaderMap::new();
        headers.insert(
            "authorization",
            format!("Bearer {token}").parse().expect("a header"),
        );
        headers
    };
    let verifications = 50_000u32;
    let seen = bearer(&bench.token);
    let started = cpu();
    for _ in 0..verifications {
        assert!(bench.authenticate(&seen).await);
    }
    let verify_seen = (cpu() - started) / verifications;
    let fresh: Vec<HeaderMap> = (0..verifications)
        .map(|_| bearer(&bench.fresh_token()))
        .collect();
    let started = cpu();
    for headers in &fresh {
        assert!(bench.authenticate(headers).await);
    }
    let verify_fresh = (cpu() - started) / verifications;

    // The guard alone, around an endpoint that does nothing: no database, no NATS, so no
    // other thread's noise.
    let alone = 100_000u32;
    let mut alone_cpu = [Duration::ZERO; 2];
    for (side, endpoint) in [&bench.guard_alone, &bench.nothing_alone]
        .into_iter()
        .enumerate()
    {
        let started = cpu();
        for _ in 0..alone {
            let response = endpoint
                .call(request("/", &bench.token))
                .await
                .expect("an answer");
            assert!(response.status().is_success());
        }
        alone_cpu[side] = (cpu() - started) / alone;
    }
    // The other threads of the process (the NATS client, SQLite's workers, the consumers) add
    // noise to each round's CPU: the median of the rounds' differences resists it.
    let mut differences: Vec<f64> = guarded
        .rounds
        .iter()
        .zip(&unguarded.rounds)
        .map(|(g, u)| g.as_secs_f64() - u.as_secs_f64())
        .collect();
    differences.sort_by(f64::total_cmp);
    let added = differences[differences.len() / 2] * 1e6;
    println!();
    println!(
        "## Authentication cost: GET /api/v1/jobs/{{id}}, {} requests each, one at a time, in process",
        PER_ROUND * ROUNDS
    );
    println!();
    println!("| | p50 | p99 | CPU per request |");
    println!("|---|---|---|---|");
    println!(
        "| with an access token (guard) | {} | {} | {} |",
        micros(guarded.p(0.5)),
        micros(guarded.p(0.99)),
        micros(guarded.cpu_per_request())
    );
    println!(
        "| caller set directly (no guard) | {} | {} | {} |",
        micros(unguarded.p(0.5)),
        micros(unguarded.p(0.99)),
        micros(unguarded.cpu_per_request())
    );
    println!();
    println!(
        "Added by authentication: {added:.1} µs of CPU per request (the median of {ROUNDS} \
         rounds' differences; p50 latency {} → {}). Verifying the token alone: {} the first \
         time a token is seen (decoded, HMAC checked), {} after (remembered until it expires).",
        micros(unguarded.p(0.5)),
        micros(guarded.p(0.5)),
        micros(verify_fresh),
        micros(verify_seen)
    );
    println!(
        "The guard alone, around an endpoint that does nothing ({alone} calls): {} of CPU per \
         request, against {} with the caller set directly: {} added.",
        micros(alone_cpu[0]),
        micros(alone_cpu[1]),
        micros(alone_cpu[0].saturating_sub(alone_cpu[1]))
    );
    shutdown.cancel();
}
