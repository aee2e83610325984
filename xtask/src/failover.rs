//! `cargo xtask bench --failover`: how fast a mesh with default settings recovers.
//!
//! - kill -9 of the executor running a job → the job running again on the other executor
//!   (the registry's heartbeat timeout, 10 s by default, dominates it);
//! - a cancel request for a running job whose process has children → no process of its group
//!   left.
//!
//! Every service runs with its defaults; only node ids and work directories are set.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use capstan_protocol::{JobId, JobRecord, JobStatus, NodeRecord, NodeStatus, headers, subjects};
use capstan_testkit::{NatsOptions, NatsServer};

use crate::bench::{Process, ms, percentile, spawn};

/// Runs the recovery measurements and prints their tables.
pub async fn run(bin: &Path, durable: bool, kills: usize, cancels: usize) -> anyhow::Result<()> {
    let nats = NatsServer::start_with(NatsOptions {
        sync_always: durable,
        ..NatsOptions::default()
    })
    .await;
    let dir = tempfile::Builder::new()
        .prefix("capstan-failover-")
        .tempdir()?;
    let base = vec![("CAPSTAN_NATS_URL", nats.url())];
    let mut services = vec![
        spawn(&bin.join("capstan-registry"), "registry", &base, dir.path())?,
        spawn(
            &bin.join("capstan-scheduler"),
            "scheduler",
            &base,
            dir.path(),
        )?,
    ];
    let executor = |node: &str| -> anyhow::Result<Process> {
        let mut env = base.clone();
        env.push(("CAPSTAN_NODE_ID", node.to_owned()));
        env.push(("CAPSTAN_SLOTS", "4".to_owned()));
        env.push((
            "CAPSTAN_WORK_DIR",
            dir.path().join(node).display().to_string(),
        ));
        spawn(&bin.join("capstan-executor"), node, &env, dir.path())
    };
    let mut executors = vec![executor("node-a")?, executor("node-b")?];
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    wait_for(Duration::from_secs(60), "both executors up", || async {
        let nodes = js.get_key_value("capstan_nodes").await.ok()?;
        let mut up = 0;
        for node in ["node-a", "node-b"] {
            let value = nodes.get(node).await.ok()??;
            let record: NodeRecord = serde_json::from_slice(&value).ok()?;
            up += usize::from(record.status == NodeStatus::Up);
        }
        (up == 2).then_some(())
    })
    .await?;
    let jobs = js.get_key_value("capstan_jobs").await?;
    let record = |id: JobId| {
        let jobs = jobs.clone();
        async move {
            let value = jobs.get(id.to_string()).await.ok()??;
            serde_json::from_slice::<JobRecord>(&value).ok()
        }
    };
    let submit = |id: JobId, command: String| {
        let js = js.clone();
        async move {
            let mut map = async_nats::HeaderMap::new();
            map.insert(headers::JOB_ID, id.to_string().as_str());
            let body = serde_json::json!({ "command": command }).to_string();
            js.publish_with_headers(subjects::SUBMIT, map, body.into())
                .await?
                .await?;
            anyhow::Ok(())
        }
    };

    // kill -9 → running again elsewhere.
    let mut failovers = Vec::new();
    for round in 0..kills {
        let marker = dir.path().join(format!("ran-{round}"));
        let id = JobId::generate();
        submit(
            id,
            format!(
                "if [ -e {m} ]; then exit 0; fi; touch {m}; sleep 600",
                m = marker.display()
            ),
        )
        .await?;
        let first = wait_for(Duration::from_secs(60), "the job to run", || async {
            record(id).await.filter(|r| r.status == JobStatus::Running)
        })
        .await?;
        let node = first.node.context("a running job has a node")?.to_string();
        let index = executors
            .iter()
            .position(|p| p.name == node)
            .context("the job's executor")?;
        let killed = Instant::now();
        kill9(&mut executors[index]);
        let again = wait_for(Duration::from_secs(120), "the job to run again", || async {
            record(id).await.filter(|r| {
                r.attempt >= 2 && matches!(r.status, JobStatus::Running | JobStatus::Succeeded)
            })
        })
        .await?;
        failovers.push(killed.elapsed());
        eprintln!(
            "round {round}: {node} killed; attempt {} {} on {} after {}",
            again.attempt,
            again.status,
            again.node.map(|n| n.to_string()).unwrap_or_default(),
            ms(killed.elapsed())
        );
        // The restarted executor reaps the killed instance's orphan.
        executors[index] = executor(&node)?;
        wait_for(Duration::from_secs(60), "the job to succeed", || async {
            record(id)
                .await
                .filter(|r| r.status == JobStatus::Succeeded)
        })
        .await?;
        wait_for(
            Duration::from_secs(60),
            "the node to be up again",
            || async {
                let nodes = js.get_key_value("capstan_nodes").await.ok()?;
                let value = nodes.get(&node).await.ok()??;
                let record: NodeRecord = serde_json::from_slice(&value).ok()?;
                (record.status == NodeStatus::Up).then_some(())
            },
        )
        .await?;
    }

    // cancel → process group gone.
    let mut stops = Vec::new();
    for round in 0..cancels {
        let pid_file = dir.path().join(format!("cancel-{round}.pid"));
        let id = JobId::generate();
        submit(
            id,
            format!(
                "echo $$ > {}; sleep 600 & sleep 600 & wait",
                pid_file.display()
            ),
        )
        .await?;
        let group: i32 = wait_for(Duration::from_secs(60), "the job to start", || async {
            std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok()
        })
        .await?;
        wait_for(Duration::from_secs(10), "its children", || async {
            (group_members(group) >= 3).then_some(())
        })
        .await?;
        let asked = Instant::now();
        let reply = client
            .request(
                subjects::CANCEL,
                serde_json::json!({ "id": id.to_string() })
                    .to_string()
                    .into(),
            )
            .await?;
        if !String::from_utf8_lossy(&reply.payload).contains("ok") {
            bail!(
                "cancel refused: {}",
                String::from_utf8_lossy(&reply.payload)
            );
        }
        wait_for(Duration::from_secs(30), "the group to be gone", || async {
            (group_members(group) == 0).then_some(())
        })
        .await?;
        stops.push(asked.elapsed());
    }

    failovers.sort();
    stops.sort();
    println!();
    println!(
        "## Recovery, default settings (heartbeat every 2 s, node down after 10 s), NATS {}",
        if durable {
            "sync_interval: always"
        } else {
            "default sync"
        }
    );
    println!();
    println!("| measure | rounds | p50 | max |");
    println!("|---|---|---|---|");
    println!(
        "| kill -9 of the executor → the job running again on the other | {} | {} | {} |",
        failovers.len(),
        ms(percentile(&failovers, 0.5)),
        ms(percentile(&failovers, 1.0))
    );
    println!(
        "| cancel request → no process of the job's group left | {} | {} | {} |",
        stops.len(),
        ms(percentile(&stops, 0.5)),
        ms(percentile(&stops, 1.0))
    );
    drop(executors);
    drop(services.drain(..));
    Ok(())
}

/// Processes whose process group is `group`, zombies excluded.
fn group_members(group: i32) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| std::fs::read_to_string(entry.path().join("stat")).ok())
        .filter(|stat| {
            let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
                return false;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // After the command: state, ppid, pgrp.
            fields.first() != Some(&"Z") && fields.get(2) == Some(&group.to_string().as_str())
        })
        .count()
}

fn kill9(process: &mut Process) {
    let _ = process.child.kill();
    let _ = process.child.wait();
}

async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
