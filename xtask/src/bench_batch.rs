//! `cargo xtask bench --atomic-batch`: what one job state change would cost written as a
//! single atomic batch (the record and its event, nats-server ≥ 2.12) against today's two
//! acknowledged writes, measured on nats-server alone.
//!
//! A state change here is a record written with a compare-and-set header
//! (`Nats-Expected-Last-Subject-Sequence`, as the job bucket's updates carry) and an event on
//! a second subject of the same stream. Two ways to write it:
//! - `two writes`: publish the record, await JetStream's acknowledgement, then the event;
//! - `atomic batch`: the record without a reply, then the event carrying the commit marker,
//!   one acknowledgement for both (the stream allows atomic publishing).
//!
//! Each is measured on a file stream and a memory stream, with the server's default
//! `sync_interval` and with `sync_interval: always`: state changes per second with 64 in
//! flight, one at a time (p50), and nats-server's CPU per state change.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use capstan_testkit::{NatsOptions, NatsServer};
use futures::{StreamExt, TryStreamExt};

use crate::bench::{cpu_seconds, ms, percentile};

/// State changes written in each throughput run.
const CHANGES: usize = 2_000;
/// Written at most this many at a time in a throughput run.
const IN_FLIGHT: usize = 64;
/// State changes written one at a time for the latency column.
const ONE_AT_A_TIME: usize = 200;
/// A job record's size, about what a `true` job's record weighs in MessagePack.
const RECORD_BYTES: usize = 300;

#[derive(Clone, Copy, PartialEq)]
enum Write {
    Two,
    Batch,
}

impl Write {
    fn label(self) -> &'static str {
        match self {
            Write::Two => "two writes",
            Write::Batch => "atomic batch",
        }
    }
}

/// Runs every combination and prints a table.
pub async fn run() -> anyhow::Result<()> {
    println!("## One state change: two writes, or one atomic batch");
    println!();
    println!(
        "nats-server alone; a {RECORD_BYTES}-byte record with a compare-and-set header and its \
         event; {CHANGES} changes with {IN_FLIGHT} in flight, {ONE_AT_A_TIME} one at a time."
    );
    println!();
    println!(
        "| sync | storage | written as | changes/s | one at a time p50 | nats-server CPU per change |"
    );
    println!("|---|---|---|---|---|---|");
    for sync_always in [false, true] {
        for storage in ["file", "memory"] {
            for write in [Write::Two, Write::Batch] {
                let row = one(sync_always, storage, write).await?;
                println!(
                    "| {} | {storage} | {} | {:.0} | {} | {:.0} µs |",
                    if sync_always { "always" } else { "default" },
                    write.label(),
                    row.per_second,
                    ms(row.p50),
                    row.cpu_per_change * 1e6,
                );
            }
        }
    }
    Ok(())
}

struct Row {
    per_second: f64,
    p50: Duration,
    cpu_per_change: f64,
}

async fn one(sync_always: bool, storage: &str, write: Write) -> anyhow::Result<Row> {
    let server = NatsServer::start_with(NatsOptions {
        sync_always,
        ..NatsOptions::default()
    })
    .await;
    let pid = server.pid().context("nats-server has no pid")?;
    let client = server.client().await;
    let config = serde_json::json!({
        "name": "CHANGES",
        "subjects": ["rec.>", "ev.>"],
        "storage": storage,
        "allow_atomic": true,
    });
    let reply = client
        .request("$JS.API.STREAM.CREATE.CHANGES", config.to_string().into())
        .await?;
    check(&reply.payload).context("cannot create the stream")?;
    let jetstream = async_nats::jetstream::new(client.clone());
    let record = vec![b'r'; RECORD_BYTES];

    let change = |index: usize| {
        let client = client.clone();
        let jetstream = jetstream.clone();
        let record = record.clone();
        async move {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
            let event = format!("{{\"kind\":\"succeeded\",\"job\":{index}}}").into_bytes();
            match write {
                Write::Two => {
                    jetstream
                        .publish_with_headers(format!("rec.{index}"), headers, record.into())
                        .await?
                        .await?;
                    jetstream
                        .publish(format!("ev.{index}"), event.into())
                        .await?
                        .await?;
                }
                Write::Batch => {
                    let id = format!("b{index}");
                    headers.insert("Nats-Batch-Id", id.as_str());
                    headers.insert("Nats-Batch-Sequence", "1");
                    client
                        .publish_with_headers(format!("rec.{index}"), headers, record.into())
                        .await?;
                    let mut commit = async_nats::HeaderMap::new();
                    commit.insert("Nats-Batch-Id", id.as_str());
                    commit.insert("Nats-Batch-Sequence", "2");
                    commit.insert("Nats-Batch-Commit", "1");
                    let reply = client
                        .request_with_headers(format!("ev.{index}"), commit, event.into())
                        .await?;
                    check(&reply.payload)?;
                }
            }
            anyhow::Ok(())
        }
    };

    let before = cpu_seconds(pid);
    let started = Instant::now();
    futures::stream::iter(0..CHANGES)
        .map(&change)
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<()>()
        .await?;
    let elapsed = started.elapsed();
    let cpu_per_change = (cpu_seconds(pid) - before) / CHANGES as f64;

    let mut one_at_a_time = Vec::with_capacity(ONE_AT_A_TIME);
    for index in CHANGES..CHANGES + ONE_AT_A_TIME {
        let started = Instant::now();
        change(index).await?;
        one_at_a_time.push(started.elapsed());
    }
    one_at_a_time.sort();

    let mut stream = jetstream.get_stream("CHANGES").await?;
    let stored = stream.info().await?.state.messages;
    let expected = 2 * (CHANGES + ONE_AT_A_TIME) as u64;
    if stored != expected {
        bail!("the stream holds {stored} messages where {expected} were written");
    }
    Ok(Row {
        per_second: CHANGES as f64 / elapsed.as_secs_f64(),
        p50: percentile(&one_at_a_time, 0.50),
        cpu_per_change,
    })
}

/// Fails with the server's error when a JetStream reply carries one.
fn check(reply: &[u8]) -> anyhow::Result<()> {
    let value: serde_json::Value = serde_json::from_slice(reply).context("reply is not JSON")?;
    match value.get("error") {
        Some(error) => bail!("nats-server refused: {error}"),
        None => Ok(()),
    }
}
