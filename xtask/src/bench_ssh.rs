//! `cargo xtask bench --ssh`: jobs on a remote system, measured on the mesh `up` runs (one
//! registry, one scheduler, the API) with its one executor labelled as an SSH gateway, and a
//! real `sshd` on loopback standing in for the remote host.
//!
//! It reports the latency of a remote `true`, submit to terminal event, one job at a time
//! over the gateway's kept connection (warm); the round trip of a fresh connection, login and
//! `true` (cold: the gateway's health checks, which never reuse a connection); and the time
//! from submitting one `true` on each of `systems` names of the host, all at once, to the
//! last one ending, and the same as one fan-out (`systems` by label), from its submission to
//! its end. The names share one host, account and credential, so the gateway runs
//! them over one kept connection, a channel each: that figure is the gateway's slots and the
//! channels' multiplexing, not many hosts' handshakes.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use capstan_protocol::{JobId, headers, subjects};
use futures::StreamExt;
use serde_json::json;

use crate::bench::{Ends, ms, percentile};

/// Runs the SSH benchmark with `jobs` one-at-a-time jobs and `systems` names.
pub async fn run(bin: &Path, jobs: usize, systems: usize) -> anyhow::Result<()> {
    crate::sshd::ensure()?;
    let host = capstan_testkit::sshd::SshHost::start().map_err(anyhow::Error::msg)?;
    // Its one executor is a gateway, with a gateway's identity.
    let mesh =
        crate::small_mesh::SmallMesh::start(bin, "capstan-bench-ssh-", 1, 1, |name, command| {
            if name.starts_with("exec-") {
                command
                    .env("CAPSTAN_LABELS", "capstan.io/ssh=true")
                    // Each check is a fresh connection and login (the host hashes the password
                    // each time): 50 names every 10 s keep the host's CPU mostly for the jobs.
                    .env("CAPSTAN_SYSTEM_CHECK_INTERVAL", "10s");
            }
        })
        .await?;
    eprintln!(
        "the mesh `cargo xtask up --release` runs (1 registry, 1 scheduler, 1 API), its one \
         executor ({} slots) a gateway (capstan.io/ssh=true); one sshd on loopback, registered \
         under {systems} names",
        crate::up::DEFAULT_SLOTS
    );
    let (client, http) = (mesh.client.clone(), mesh.http.clone());
    let names: Vec<String> = (1..=systems.max(1)).map(|n| format!("web-{n}")).collect();
    for name in &names {
        let body = json!({
            "name": name,
            "hostname": "127.0.0.1",
            "port": host.port(),
            "username": capstan_testkit::sshd::LOGIN_USER,
            "auth": {"method": "password", "password": host.password()},
            "host_key": host.host_key(),
            "labels": {"bench": "ssh"},
        });
        let added = http.post_json("/api/v1/systems", &body.to_string()).await;
        if !added.status.is_success() {
            bail!("cannot add system {name}: {}", added.text());
        }
    }

    let js = async_nats::jetstream::new(client.clone());
    let mut ends = Ends::subscribe(&client).await?;
    let submit = |system: &str| {
        let id = JobId::generate();
        let mut map = async_nats::HeaderMap::new();
        map.insert(headers::JOB_ID, id.to_string().as_str());
        let body = json!({"argv": ["true"], "system": system}).to_string();
        (id, map, body)
    };
    // Warm-up: the gateway's connection is made.
    for _ in 0..5 {
        let (id, map, body) = submit(&names[0]);
        js.publish_with_headers(subjects::SUBMIT, map, body.into())
            .await?
            .await?;
        ends.wait_for(id).await?;
    }
    let mut warm = Vec::with_capacity(jobs);
    for _ in 0..jobs {
        let (id, map, body) = submit(&names[0]);
        let sent = Instant::now();
        js.publish_with_headers(subjects::SUBMIT, map, body.into())
            .await?
            .await?;
        ends.wait_for(id).await?;
        warm.push(sent.elapsed());
    }
    warm.sort();

    // One job on every name at once.
    let started = Instant::now();
    let mut pending = std::collections::HashSet::new();
    for name in &names {
        let (id, map, body) = submit(name);
        js.publish_with_headers(subjects::SUBMIT, map, body.into())
            .await?
            .await?;
        pending.insert(id);
    }
    while !pending.is_empty() {
        let id = ends.next().await?;
        pending.remove(&id);
    }
    let burst = started.elapsed();

    // The same as one fan-out: one parent, a target per name, each its own job.
    let mut fanouts = client.subscribe(subjects::FANOUT_EVENTS_ALL).await?;
    client.flush().await?;
    let (parent, map, _) = submit(&names[0]);
    let body = json!({"argv": ["true"], "systems": {"labels": {"bench": "ssh"}}}).to_string();
    let started = Instant::now();
    js.publish_with_headers(subjects::SUBMIT, map, body.into())
        .await?
        .await?;
    let fanned = loop {
        let event = tokio::time::timeout(Duration::from_secs(120), fanouts.next())
            .await
            .context("the fan-out did not end within 120 s")?
            .context("the fan-out events ended")?;
        let ours = event.subject.as_str().contains(&parent.to_string());
        if ours && !event.subject.ends_with(".running") {
            if !event.subject.ends_with(".succeeded") {
                bail!("the fan-out ended as {}", event.subject);
            }
            break started.elapsed();
        }
    };

    // Cold: the round trips the health checks recorded (a fresh connection each), the first
    // healthy one of each name.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = std::collections::HashMap::new();
    let cold = loop {
        let listed = http.get("/api/v1/systems").await.json();
        for system in listed["systems"].as_array().context("a systems list")? {
            if let (Some(name), Some(rtt)) =
                (system["name"].as_str(), system["health"]["rtt_ms"].as_u64())
            {
                seen.entry(name.to_owned())
                    .or_insert(Duration::from_millis(rtt));
            }
        }
        if seen.len() == names.len() {
            break seen.into_values().collect::<Vec<_>>();
        }
        if Instant::now() > deadline {
            let unseen: Vec<String> = listed["systems"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|s| !s["name"].as_str().is_some_and(|n| seen.contains_key(n)))
                .map(|s| format!("{}: {}", s["name"], s["health"]))
                .collect();
            bail!(
                "{} of {} systems were found healthy within 120 s; the others: {unseen:?}",
                seen.len(),
                names.len(),
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut cold = cold;
    cold.sort();
    drop(mesh);

    println!("## Jobs on a remote system over SSH");
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| remote `true`, submit → terminal event, warm connection ({jobs} jobs, one at a time) | p50 {}, p99 {} |",
        ms(percentile(&warm, 0.50)),
        ms(percentile(&warm, 0.99)),
    );
    println!(
        "| fresh connection + login + `true` (the gateway's health checks, {} samples) | p50 {}, p99 {} |",
        cold.len(),
        ms(percentile(&cold, 0.50)),
        ms(percentile(&cold, 0.99)),
    );
    println!(
        "| one `true` on each of {} names of the host, submitted at once, to the last one ended | {} ms |",
        names.len(),
        burst.as_millis()
    );
    println!(
        "| one fan-out of `true` over the {} names (`systems` by label), submitted → its `succeeded` event | {} ms |",
        names.len(),
        fanned.as_millis()
    );
    Ok(())
}
