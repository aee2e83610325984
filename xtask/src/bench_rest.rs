//! Concurrent reads of the REST API (`cargo xtask bench --history-rows N`, after the queries
//! one at a time): an API process over the seeded history, first with one runtime thread and
//! then with its default of one per core, serves `GET /api/v1/jobs/{id}` and a first page of
//! `GET /api/v1/jobs?status=failed` to 1, 4, 16 and 64 clients at once. Each row reports the
//! requests served per second, their latency, and the API process's CPU per request.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use capstan_protocol::JobId;
use capstan_testkit::http::HttpClient;

use crate::bench::{cpu_seconds, logged_in, ms, percentile, spawn};

/// Requests sent at each level of concurrency, for each kind.
const REQUESTS: usize = 4_000;

/// Clients sending at once.
const CLIENTS: [usize; 4] = [1, 4, 16, 64];

/// Runs the table for an API started with `env` (its NATS, database and credentials), over
/// the seeded jobs `ids`.
pub(crate) async fn concurrent_reads(
    bin: &Path,
    env: &[(&'static str, String)],
    logs: &Path,
    ids: Arc<Vec<JobId>>,
) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    println!();
    println!(
        "### Concurrent reads: {REQUESTS} requests per row, each client sending its next request once its last is answered"
    );
    println!();
    println!("| API threads | request | clients | requests/s | p50 | p99 | API CPU per request |");
    println!("|---|---|---|---|---|---|---|");
    for threads in [1, cores] {
        let port = capstan_testkit::server::free_port();
        let mut env = env.to_vec();
        env.push(("CAPSTAN_API_LISTEN", format!("127.0.0.1:{port}")));
        env.push(("CAPSTAN_WORKER_THREADS", threads.to_string()));
        let api = spawn(
            &bin.join("capstan-api"),
            &format!("api-{threads}-threads"),
            &env,
            logs,
        )?;
        let http = logged_in(port, logs).await?;
        let pid = api.child.id();
        for (kind, path) in [
            ("job by id", None),
            (
                "list, status=failed",
                Some("/api/v1/jobs?status=failed&limit=50"),
            ),
        ] {
            // Warm the connections and the caches once.
            round(&http, 4, 200, &ids, path).await?;
            for clients in CLIENTS {
                let cpu = cpu_seconds(pid);
                let started = Instant::now();
                let mut times = round(&http, clients, REQUESTS, &ids, path).await?;
                let elapsed = started.elapsed();
                let cpu = cpu_seconds(pid) - cpu;
                times.sort();
                println!(
                    "| {threads} | {kind} | {clients} | {:.0} | {} | {} | {:.0} µs |",
                    REQUESTS as f64 / elapsed.as_secs_f64(),
                    ms(percentile(&times, 0.5)),
                    ms(percentile(&times, 0.99)),
                    cpu * 1e6 / REQUESTS as f64
                );
            }
        }
        drop(api);
    }
    Ok(())
}

/// Sends `requests` requests from `clients` clients at once: `path`, or each job of `ids` in
/// turn by id. Returns each request's time.
async fn round(
    http: &HttpClient,
    clients: usize,
    requests: usize,
    ids: &Arc<Vec<JobId>>,
    path: Option<&'static str>,
) -> anyhow::Result<Vec<Duration>> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(clients);
    for _ in 0..clients {
        let (http, ids, next) = (http.clone(), ids.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut times = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= requests {
                    return Ok::<_, anyhow::Error>(times);
                }
                let url = match path {
                    Some(path) => path.to_owned(),
                    None => format!("/api/v1/jobs/{}", ids[n % ids.len()]),
                };
                let sent = Instant::now();
                let reply = http.get(&url).await;
                times.push(sent.elapsed());
                if !reply.status.is_success() {
                    bail!("{url}: {}", reply.text());
                }
            }
        }));
    }
    let mut all = Vec::with_capacity(requests);
    for task in tasks {
        all.extend(task.await??);
    }
    Ok(all)
}
