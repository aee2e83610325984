//! The pages of what runs jobs on its own: the schedules (when each fires, its state, its next
//! and last tick; *Pause*, *Resume* and *Run now*) and the workflows (each with how far its
//! steps got, and one workflow's graph of steps with their jobs; *Cancel*). Buttons are shown
//! to readers who hold the permission; the API checks again, ownership included.

use std::fmt::Write as _;

use serde_json::Value;

use super::html::{attr, badge, button_form, esc, field, shown, time};
use super::pages::Reader;

/// The schedules, by name, with their actions for a reader who may manage schedules.
pub fn schedules(reader: &Reader, csrf: &str, list: &Value, notice: Option<&str>) -> String {
    let empty = Vec::new();
    let all = list
        .get("items")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    let manage = reader.can("schedules:manage");
    let mut out = String::new();
    if let Some(notice) = notice {
        out.push_str(&super::html::alert(notice));
    }
    out.push_str(
        r#"<div class="scroll" id="schedules-table" data-refresh><table id="schedules"><caption class="sr">Schedules, by name</caption>
<thead><tr><th scope="col">Schedule</th><th scope="col">State</th><th scope="col">When</th><th scope="col" class="opt">Time zone</th><th scope="col">Next tick</th><th scope="col" class="opt">Last tick</th><th scope="col" class="opt">Last job</th><th scope="col" class="opt">Owner</th>"#,
    );
    if manage {
        out.push_str(r#"<th scope="col">Actions</th>"#);
    }
    out.push_str("</tr></thead><tbody>");
    if all.is_empty() {
        let _ = write!(
            out,
            r#"<tr><td colspan="{}" class="empty">No schedule is defined.</td></tr>"#,
            if manage { 9 } else { 8 }
        );
    }
    for schedule in all {
        let state = if schedule.get("paused").and_then(Value::as_bool) == Some(true) {
            "paused"
        } else {
            "active"
        };
        let when = match field(schedule, "cron") {
            "" => format!("every {}", esc(field(schedule, "every"))),
            cron => format!("<code>{}</code>", esc(cron)),
        };
        let last = schedule.get("last").unwrap_or(&Value::Null);
        let last_tick = match field(last, "outcome") {
            "" => "—".to_owned(),
            outcome => format!("{} {}", badge(outcome), time(field(last, "at"))),
        };
        let last_job = match field(schedule, "last_job") {
            "" => "—".to_owned(),
            job => format!(
                r#"<a href="/ui/jobs/{id}"><code>{text}</code></a>"#,
                id = attr(job),
                text = esc(job)
            ),
        };
        let _ = write!(
            out,
            r#"<tr data-schedule="{name_attr}"><th scope="row">{name}</th><td class="status">{state}</td><td>{when}</td><td class="opt">{zone}</td><td>{next}</td><td class="opt">{last_tick}</td><td class="opt">{last_job}</td><td class="opt">{owner}</td>"#,
            name_attr = attr(field(schedule, "name")),
            name = esc(field(schedule, "name")),
            state = badge(state),
            zone = shown(schedule, "timezone"),
            next = time(field(schedule, "next")),
            owner = shown(schedule, "owner"),
        );
        if manage {
            let base = format!("/ui/schedules/{}", field(schedule, "name"));
            out.push_str(r#"<td class="actions">"#);
            let (action, label) = if state == "paused" {
                ("resume", "Resume")
            } else {
                ("pause", "Pause")
            };
            out.push_str(&button_form(
                &format!("{base}/{action}"),
                action,
                label,
                csrf,
                false,
            ));
            out.push_str(&button_form(
                &format!("{base}/trigger"),
                "trigger",
                "Run now",
                csrf,
                false,
            ));
            out.push_str("</td>");
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table></div>");
    out
}

/// How far a workflow's steps got: `<succeeded> of <total>`, and the others that ended
/// otherwise or still run.
fn progress(workflow: &Value) -> String {
    let steps = workflow.get("steps").unwrap_or(&Value::Null);
    let count = |name: &str| steps.get(name).and_then(Value::as_u64).unwrap_or(0);
    let mut text = format!("{} of {} succeeded", count("succeeded"), count("total"));
    for name in ["running", "failed", "cancelled", "skipped"] {
        let n = count(name);
        if n > 0 {
            let _ = write!(text, ", {n} {name}");
        }
    }
    text
}

/// The workflows, newest first.
pub fn workflows(list: &Value) -> String {
    let empty = Vec::new();
    let all = list
        .get("items")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    let mut out = String::from(
        r#"<div class="scroll" id="workflows-table" data-refresh><table id="workflows"><caption class="sr">Workflows, newest first</caption>
<thead><tr><th scope="col">Workflow</th><th scope="col">Status</th><th scope="col">Steps</th><th scope="col" class="opt">Owner</th><th scope="col">Created</th><th scope="col" class="opt">Finished</th></tr></thead><tbody>"#,
    );
    if all.is_empty() {
        out.push_str(r#"<tr><td colspan="6" class="empty">No workflow has run.</td></tr>"#);
    }
    for workflow in all {
        let id = field(workflow, "id");
        let _ = write!(
            out,
            r#"<tr data-workflow="{id_attr}"><th scope="row"><a href="/ui/workflows/{id_attr}">{name} <small><code>{id}</code></small></a></th><td class="status">{status}</td><td>{progress}</td><td class="opt">{owner}</td><td>{created}</td><td class="opt">{finished}</td></tr>"#,
            id_attr = attr(id),
            name = esc(field(workflow, "name")),
            id = esc(id),
            status = badge(field(workflow, "status")),
            progress = esc(&progress(workflow)),
            owner = shown(workflow, "owner"),
            created = time(field(workflow, "created_at")),
            finished = time(field(workflow, "finished_at")),
        );
    }
    out.push_str("</tbody></table></div>");
    out
}

/// One workflow: its state (and *Cancel* while it runs, for a reader who may cancel), then
/// each step in order with what it waits for and its job.
pub fn workflow(reader: &Reader, csrf: &str, workflow: &Value, notice: Option<&str>) -> String {
    let mut out = String::new();
    if let Some(notice) = notice {
        out.push_str(&super::html::alert(notice));
    }
    let status = field(workflow, "status");
    let actions = if status == "running"
        && workflow
            .get("cancel_requested_at")
            .is_none_or(Value::is_null)
        && reader.can("jobs:cancel:own")
    {
        let form = button_form(
            &format!("/ui/workflows/{}/cancel", field(workflow, "id")),
            "cancel",
            "Cancel",
            csrf,
            true,
        );
        form.replacen("<form ", r#"<form id="cancel" "#, 1)
    } else {
        String::new()
    };
    let _ = write!(
        out,
        r#"<section id="summary" data-refresh class="card" aria-label="State" aria-live="polite"><dl class="facts"><dt>Status</dt><dd id="status" data-status="{status_attr}">{status}</dd><dt>Owner</dt><dd>{owner}</dd><dt>Created</dt><dd>{created}</dd><dt>Finished</dt><dd>{finished}</dd><dt>Stops at the first failure</dt><dd>{fail_fast}</dd><dt>Cancel asked</dt><dd>{cancel_asked}</dd></dl><div class="actions">{actions}</div></section>"#,
        cancel_asked = time(field(workflow, "cancel_requested_at")),
        status_attr = attr(status),
        status = badge(status),
        owner = shown(workflow, "owner"),
        created = time(field(workflow, "created_at")),
        finished = time(field(workflow, "finished_at")),
        fail_fast = if workflow.get("fail_fast").and_then(Value::as_bool) == Some(true) {
            "yes"
        } else {
            "no"
        },
    );
    out.push_str(
        r#"<section class="card" aria-labelledby="steps-h" id="steps-card" data-refresh><h2 id="steps-h">Steps</h2><div class="scroll"><table id="steps"><caption class="sr">The workflow's steps, in order</caption>
<thead><tr><th scope="col">Step</th><th scope="col">Status</th><th scope="col" class="opt">After</th><th scope="col" class="opt">When</th><th scope="col">Job</th><th scope="col" class="opt">Exit</th><th scope="col" class="opt">Started</th><th scope="col" class="opt">Ended</th></tr></thead><tbody>"#,
    );
    let empty = Vec::new();
    for step in workflow
        .get("steps")
        .and_then(Value::as_array)
        .unwrap_or(&empty)
    {
        let after: Vec<String> = step
            .get("depends_on")
            .and_then(Value::as_array)
            .unwrap_or(&empty)
            .iter()
            .filter_map(Value::as_str)
            .map(esc)
            .collect();
        let job = match field(step, "job") {
            "" => "—".to_owned(),
            job => format!(
                r#"<a href="/ui/jobs/{id}"><code>{text}</code></a>"#,
                id = attr(job),
                text = esc(job)
            ),
        };
        let error = match field(step, "error") {
            "" => String::new(),
            e => format!(r#"<br><small class="problem">{}</small>"#, esc(e)),
        };
        let _ = write!(
            out,
            r#"<tr data-step="{name_attr}"><th scope="row">{name}</th><td class="status">{status}{error}</td><td class="opt">{after}</td><td class="opt">{when}</td><td>{job}</td><td class="opt">{exit}</td><td class="opt">{started}</td><td class="opt">{ended}</td></tr>"#,
            name_attr = attr(field(step, "name")),
            name = esc(field(step, "name")),
            status = badge(field(step, "status")),
            after = if after.is_empty() {
                "—".to_owned()
            } else {
                after.join(", ")
            },
            when = shown(step, "when"),
            exit = shown(step, "exit_code"),
            started = time(field(step, "started_at")),
            ended = time(field(step, "ended_at")),
        );
    }
    out.push_str("</tbody></table></div></section>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_schedule_row_shows_its_state_its_cron_or_interval_and_escapes_what_it_is_given() {
        let list = json!({"items": [
            {"name": "nightly", "cron": "0 3 * * *", "timezone": "Europe/Paris", "paused": true,
             "last": {"outcome": "ran", "at": "2026-12-04T02:00:00Z"}, "last_job": "01J",
             "owner": "<b>"},
            {"name": "poll", "every": "5m", "timezone": "UTC", "paused": false},
        ]});
        let viewer = Reader::of(&json!({"name": "v", "role": "viewer",
            "permissions": ["schedules:read"]}));
        let page = schedules(&viewer, "token", &list, None);
        assert!(!page.contains("<form"), "a viewer gets no button: {page}");
        let operator = Reader::of(&json!({"name": "o", "role": "operator",
            "permissions": ["schedules:read", "schedules:manage"]}));
        let managed = schedules(&operator, "token", &list, Some("no"));
        assert!(
            managed.contains(r#"action="/ui/schedules/nightly/resume""#),
            "{managed}"
        );
        assert!(
            managed.contains(r#"action="/ui/schedules/poll/pause""#),
            "{managed}"
        );
        assert!(
            managed.contains(r#"action="/ui/schedules/poll/trigger""#),
            "{managed}"
        );
        assert!(
            managed.contains(r#"role="alert""#),
            "the notice is shown: {managed}"
        );
        assert!(page.contains(r#"data-status="paused""#), "{page}");
        assert!(page.contains(r#"data-status="active""#), "{page}");
        assert!(page.contains("<code>0 3 * * *</code>"), "{page}");
        assert!(page.contains("every 5m"), "{page}");
        assert!(page.contains(r#"href="/ui/jobs/01J""#), "{page}");
        assert!(
            page.contains("&lt;b&gt;") && !page.contains("<b>"),
            "{page}"
        );
        assert!(
            schedules(&viewer, "token", &json!({"items": []}), None)
                .contains("No schedule is defined.")
        );
    }

    #[test]
    fn a_workflow_shows_each_step_with_what_it_waits_for_and_a_link_to_its_job() {
        let view = json!({"id": "01W", "name": "release", "status": "failed", "fail_fast": true,
        "steps": [
            {"name": "build", "status": "failed", "depends_on": [], "when": "on_success",
             "job": "01A", "exit_code": 2, "error": "exit 2"},
            {"name": "ship", "status": "skipped", "depends_on": ["build"],
             "when": "on_success"},
        ]});
        let canceller = Reader::of(&json!({"name": "o", "role": "operator",
            "permissions": ["jobs:read", "jobs:cancel:own"]}));
        let page = workflow(&canceller, "token", &view, None);
        assert!(
            !page.contains(r#"id="cancel""#),
            "an ended workflow has no Cancel: {page}"
        );
        let mut running = view.clone();
        running["status"] = json!("running");
        let live = workflow(&canceller, "token", &running, None);
        assert!(
            live.contains(r#"action="/ui/workflows/01W/cancel""#),
            "{live}"
        );
        let viewer =
            Reader::of(&json!({"name": "v", "role": "viewer", "permissions": ["jobs:read"]}));
        assert!(!workflow(&viewer, "token", &running, None).contains("<form"));
        assert!(page.contains(r#"<tr data-step="build">"#), "{page}");
        assert!(page.contains(r#"href="/ui/jobs/01A""#), "{page}");
        assert!(page.contains(r#"data-status="skipped""#), "{page}");
        assert!(page.contains("<td class=\"opt\">build</td>"), "{page}");
        assert!(page.contains("exit 2"), "{page}");
        let list = json!({"items": [{"id": "01W", "name": "release", "status": "running",
            "steps": {"total": 4, "succeeded": 1, "running": 2, "failed": 0}}]});
        let rows = workflows(&list);
        assert!(rows.contains(r#"href="/ui/workflows/01W""#), "{rows}");
        assert!(rows.contains("1 of 4 succeeded, 2 running"), "{rows}");
    }
}
