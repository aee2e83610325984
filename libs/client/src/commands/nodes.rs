//! Fleet commands: `nodes` (list or show), `cordon`, `uncordon`, `drain`, and `systems`.

use std::process::ExitCode;

use serde_json::Value;

use super::{encode, query};
use crate::output::{Output, instant, pairs, text};
use crate::{Context, Error};

fn node_rows(out: &Output, nodes: &[Value]) -> String {
    out.table(
        &[
            "id",
            "status",
            "availability",
            "running",
            "queued",
            "labels",
            "hostname",
            "heartbeat",
        ],
        nodes
            .iter()
            .map(|node| {
                vec![
                    text(node, "/id"),
                    out.status(&text(node, "/status")),
                    out.status(&text(node, "/availability")),
                    format!("{}/{}", text(node, "/running"), text(node, "/capacity")),
                    text(node, "/queued"),
                    pairs(node, "/labels"),
                    text(node, "/hostname"),
                    instant(node, "/last_heartbeat_at"),
                ]
            })
            .collect(),
    )
}

fn node_fields(out: &Output, node: &Value) -> String {
    out.fields(&[
        ("id", text(node, "/id")),
        ("status", out.status(&text(node, "/status"))),
        ("availability", out.status(&text(node, "/availability"))),
        ("drain deadline", instant(node, "/drain_deadline")),
        (
            "running",
            format!("{} of {}", text(node, "/running"), text(node, "/capacity")),
        ),
        ("queued", text(node, "/queued")),
        ("labels", pairs(node, "/labels")),
        ("hostname", text(node, "/hostname")),
        ("version", text(node, "/version")),
        ("instance", text(node, "/instance")),
        ("registered", instant(node, "/registered_at")),
        ("last heartbeat", instant(node, "/last_heartbeat_at")),
        (
            "finished",
            format!(
                "{} succeeded, {} failed, {} cancelled, {} lost",
                num(node, "/finished/succeeded"),
                num(node, "/finished/failed"),
                num(node, "/finished/cancelled"),
                num(node, "/finished/lost"),
            ),
        ),
        ("last job", text(node, "/finished/last_job")),
    ])
}

fn num(value: &Value, pointer: &str) -> String {
    let number = text(value, pointer);
    if number.is_empty() {
        "0".into()
    } else {
        number
    }
}

pub(super) async fn show(context: &Context, id: Option<&str>) -> Result<ExitCode, Error> {
    let api = context.api()?;
    match id {
        Some(id) => {
            let node: Value = api.get(&format!("/api/v1/nodes/{}", encode(id))).await?;
            context.out.print(&node, |out| node_fields(out, &node))?;
        }
        None => {
            let list: Value = api.get("/api/v1/nodes").await?;
            let nodes = crate::output::items(&list, "nodes");
            context.out.print(&list, |out| node_rows(out, &nodes))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Cordons, uncordons or drains node `id` (`action` is the route's last segment).
pub(super) async fn change(
    context: &Context,
    id: &str,
    action: &str,
    deadline: Option<u64>,
) -> Result<ExitCode, Error> {
    let api = context.api()?;
    let parameters: Vec<(&str, String)> = deadline
        .map(|seconds| ("deadline_seconds", seconds.to_string()))
        .into_iter()
        .collect();
    let node: Value = api
        .post(
            &format!(
                "/api/v1/nodes/{}/{action}{}",
                encode(id),
                query(&parameters)
            ),
            None::<&()>,
        )
        .await?;
    context.out.print(&node, |out| {
        format!(
            "{} is {}\n",
            text(&node, "/id"),
            out.status(&text(&node, "/availability"))
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

fn system_rows(out: &Output, systems: &[Value]) -> String {
    out.table(
        &[
            "name", "address", "auth", "health", "active", "labels", "checked",
        ],
        systems
            .iter()
            .map(|system| {
                vec![
                    text(system, "/name"),
                    format!(
                        "{}@{}:{}",
                        text(system, "/username"),
                        text(system, "/hostname"),
                        text(system, "/port")
                    ),
                    text(system, "/auth_method"),
                    out.status(&text(system, "/health/status")),
                    text(system, "/active"),
                    pairs(system, "/labels"),
                    instant(system, "/health/checked_at"),
                ]
            })
            .collect(),
    )
}

pub(super) async fn systems(context: &Context, name: Option<&str>) -> Result<ExitCode, Error> {
    let api = context.api()?;
    match name {
        Some(name) => {
            let system: Value = api
                .get(&format!("/api/v1/systems/{}", encode(name)))
                .await?;
            context.out.print(&system, |out| {
                out.fields(&[
                    ("name", text(&system, "/name")),
                    (
                        "address",
                        format!(
                            "{}@{}:{}",
                            text(&system, "/username"),
                            text(&system, "/hostname"),
                            text(&system, "/port")
                        ),
                    ),
                    ("auth", text(&system, "/auth_method")),
                    ("credential", text(&system, "/key_id")),
                    ("host key", text(&system, "/host_key")),
                    ("active", text(&system, "/active")),
                    ("labels", pairs(&system, "/labels")),
                    ("health", out.status(&text(&system, "/health/status"))),
                    ("round trip ms", text(&system, "/health/rtt_ms")),
                    ("last error", text(&system, "/health/last_error")),
                    ("checked", instant(&system, "/health/checked_at")),
                    ("checked by", text(&system, "/health/checked_by")),
                    ("updated by", text(&system, "/updated_by")),
                ])
            })?;
        }
        None => {
            let list: Value = api.get("/api/v1/systems").await?;
            let systems = crate::output::items(&list, "systems");
            context.out.print(&list, |out| system_rows(out, &systems))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
