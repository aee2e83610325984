//! `cargo xtask bench --schedules N[,N…]`: how many schedules one scheduler replica holds
//! without missing a tick, and how late a tick's job starts, on the mesh `up` runs (one
//! registry, one scheduler, two executors, the API).
//!
//! For each N, on a fresh mesh: N schedules created over REST, schedule `i` on the cron
//! expression `<i mod 60> * * * * *` (once a minute, at its own second: N/60 ticks every
//! second), each running `/bin/true`. Over the window that follows, every tick the expressions
//! call for is counted against what the schedulers announced (`capstan.events.schedules.>`),
//! and each run's start against its tick (its terminal event's record).

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use capstan_protocol::codec::{self, Encoding};
use capstan_protocol::schedule::{ScheduleEvent, TICK_KEY, TickOutcome};
use capstan_protocol::{JobEvent, JobEventKind, Timestamp, headers, subjects};
use futures::StreamExt;
use serde_json::json;

use crate::bench::{ms, percentile};
use crate::small_mesh::SmallMesh;

/// Runs the schedules benchmark for each count in `counts`, observing `window` of ticks.
pub async fn run(bin: &Path, counts: &[usize], window: Duration) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for &count in counts {
        rows.push(one(bin, count, window).await?);
    }
    println!("## Schedules");
    println!();
    println!(
        "One scheduler replica; schedule `i` ticks once a minute at second `i mod 60`; \
         {} s observed after the last one was created.",
        window.as_secs()
    );
    println!();
    println!(
        "| schedules | ticks due | ran | skipped | missed | not handled | tick → handled p50, p99, max | tick → job started p50, p99 | scheduler CPU per tick | created per second (REST) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
    Ok(())
}

async fn one(bin: &Path, count: usize, window: Duration) -> anyhow::Result<String> {
    // One administrator creates every schedule: the API's per-principal rate limit is off
    // for that, as the end-to-end tests have it.
    let mesh = SmallMesh::start(bin, "capstan-bench-schedules-", 2, 0, |name, command| {
        if name.starts_with("api") {
            command.env("CAPSTAN_RATE_LIMIT", "0");
        }
    })
    .await?;
    eprintln!(
        "the mesh `cargo xtask up --release` runs (1 registry, 1 scheduler, 2 executors × {} \
         slots, 1 API without its per-principal rate limit); {count} schedules",
        crate::up::DEFAULT_SLOTS
    );
    let mut handled = mesh.client.subscribe(subjects::SCHEDULE_EVENTS_ALL).await?;
    let mut ended = mesh
        .client
        .subscribe(subjects::job_events_of_kind(JobEventKind::Succeeded))
        .await?;
    mesh.client.flush().await?;

    let creating = Instant::now();
    let http = mesh.http.clone();
    let created: Vec<anyhow::Result<()>> = futures::stream::iter(0..count)
        .map(|i| {
            let http = http.clone();
            async move {
                let body = json!({
                    "name": format!("bench-{i}"),
                    "cron": format!("{} * * * * *", i % 60),
                    "job": {"argv": ["/bin/true"]},
                });
                let reply = http.post_json("/api/v1/schedules", &body.to_string()).await;
                if reply.status.as_u16() != 201 {
                    bail!("cannot create schedule bench-{i}: {}", reply.text());
                }
                Ok(())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    created.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    let create_rate = count as f64 / creating.elapsed().as_secs_f64();

    // The window starts at the next whole second after the last creation, with a second to
    // spare for its tick to be armed.
    let start = Timestamp::from_millis((Timestamp::now().as_millis() / 1000 + 2) * 1000);
    let end = start.plus(window);
    let scheduler = mesh.process("scheduler-1").context("no scheduler")?;
    let pid = scheduler.child.id();
    let mut cpu_start = None;
    let mut cpu_end = None;

    let mut outcomes: HashMap<TickOutcome, usize> = HashMap::new();
    let mut handled_after = Vec::new();
    let mut started_after = Vec::new();
    // Events may trail the window by the scheduler's lag; give them half a minute.
    let stop_at = end.plus(Duration::from_secs(30));
    loop {
        let now = Timestamp::now();
        if cpu_start.is_none() && now >= start {
            cpu_start = Some(crate::bench::cpu_seconds(pid));
        }
        if cpu_end.is_none() && now >= end {
            cpu_end = Some(crate::bench::cpu_seconds(pid));
        }
        if now >= stop_at {
            break;
        }
        let wait = Duration::from_millis(200);
        tokio::select! {
            Some(message) = handled.next() => {
                let event: ScheduleEvent = codec::decode(Encoding::MsgPack, &message.payload)?;
                if event.tick >= start && event.tick < end {
                    *outcomes.entry(event.outcome).or_default() += 1;
                    handled_after.push(event.at.since(event.tick));
                }
            }
            Some(message) = ended.next() => {
                if capstan_mesh::wire::header(message.headers.as_ref(), headers::SCHEDULE_NAME).is_none() {
                    continue;
                }
                let event: JobEvent = codec::decode(Encoding::MsgPack, &message.payload)?;
                let record = event.record;
                let tick = record
                    .spec
                    .metadata
                    .get(TICK_KEY)
                    .and_then(|tick| Timestamp::parse_rfc3339(tick).ok());
                if let (Some(tick), Some(started)) = (tick, record.started_at)
                    && tick >= start
                    && tick < end
                {
                    started_after.push(started.since(tick));
                }
            }
            () = tokio::time::sleep(wait) => {}
        }
    }
    // Ticks due in the window: each second of it, the schedules whose second it is.
    let mut due = 0usize;
    let mut second = start;
    while second < end {
        let of_minute = (second.as_millis() / 1000).rem_euclid(60) as usize;
        due += (0..count).filter(|i| i % 60 == of_minute).count();
        second = second.plus(Duration::from_secs(1));
    }
    let got = |outcome| outcomes.get(&outcome).copied().unwrap_or(0);
    let handled_count: usize = outcomes.values().sum();
    handled_after.sort();
    started_after.sort();
    let cpu = match (cpu_start, cpu_end) {
        (Some(a), Some(b)) if handled_count > 0 => {
            format!("{:.0} µs", (b - a) * 1_000_000.0 / handled_count as f64)
        }
        _ => "—".to_owned(),
    };
    let max = handled_after.last().copied().unwrap_or_default();
    drop(mesh);
    Ok(format!(
        "| {count} | {due} | {} | {} | {} | {} | {}, {}, {} | {}, {} | {cpu} | {create_rate:.0} |",
        got(TickOutcome::Ran),
        got(TickOutcome::Skipped),
        got(TickOutcome::Missed),
        due.saturating_sub(handled_count),
        ms(percentile(&handled_after, 0.50)),
        ms(percentile(&handled_after, 0.99)),
        ms(max),
        ms(percentile(&started_after, 0.50)),
        ms(percentile(&started_after, 0.99)),
    ))
}
