//! The dashboard's pages, rendered from the API's JSON answers: the job list with its
//! filters and submit form, one job, the nodes, the remote systems, and the audit trail.
//!
//! Elements the script refreshes in place carry an `id` and `data-refresh`; a page's forms
//! are shown only when the reader holds the permission their action needs (the API checks
//! again when the form is posted).

use std::fmt::Write as _;

use serde_json::Value;

use super::html::{attr, badge, button_form, csrf_field, esc, field, shown, time};

/// Statuses after which a job never changes again.
pub const FINAL: [&str; 6] = [
    "succeeded",
    "failed",
    "timed_out",
    "cancelled",
    "lost",
    "quarantined",
];

/// The statuses the list can be filtered by.
const STATUSES: [&str; 10] = [
    "scheduled",
    "pending",
    "running",
    "retrying",
    "succeeded",
    "failed",
    "timed_out",
    "cancelled",
    "lost",
    "quarantined",
];

/// The ranges of time the list can be narrowed to, with their length in seconds.
pub const RANGES: [(&str, &str, i64); 4] = [
    ("15m", "last 15 minutes", 900),
    ("1h", "last hour", 3600),
    ("24h", "last 24 hours", 86_400),
    ("7d", "last 7 days", 604_800),
];

/// What the reader may do, from the API's `users/me`.
#[derive(Debug, Default, Clone)]
pub struct Reader {
    /// The name.
    pub name: String,
    /// The role.
    pub role: String,
    permissions: Vec<String>,
}

impl Reader {
    /// The reader of a `Me` answer.
    pub fn of(me: &Value) -> Self {
        Self {
            name: field(me, "name").to_owned(),
            role: field(me, "role").to_owned(),
            permissions: me
                .get("permissions")
                .and_then(Value::as_array)
                .map(|all| {
                    all.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// Whether the reader holds `permission` (`jobs:submit`, …).
    pub fn can(&self, permission: &str) -> bool {
        self.permissions.iter().any(|p| p == permission)
    }
}

/// The filters of the job list, as the query string gave them.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(default)]
pub struct JobFilters {
    /// A status.
    pub status: String,
    /// `key=value`.
    pub label: String,
    /// A job name.
    pub name: String,
    /// A node id.
    pub node: String,
    /// A submitter.
    pub submitted_by: String,
    /// One of [`RANGES`].
    pub range: String,
    /// Where the page starts.
    pub cursor: String,
}

impl JobFilters {
    /// The filters as this page's query string (without the cursor).
    pub fn query(&self) -> String {
        let pairs = [
            ("status", &self.status),
            ("label", &self.label),
            ("name", &self.name),
            ("node", &self.node),
            ("submitted_by", &self.submitted_by),
            ("range", &self.range),
        ];
        serde_urlencoded::to_string(
            pairs
                .iter()
                .filter(|(_, v)| !v.is_empty())
                .collect::<Vec<_>>(),
        )
        .unwrap_or_default()
    }
}

/// The `<option>`s of a filter: "any" first, then each `(value, label)`, the `current`
/// one selected.
fn option_list<const N: usize>(any: &str, choices: [(&str, &str); N], current: &str) -> String {
    let mut out = format!(r#"<option value="">{}</option>"#, esc(any));
    for (value, label) in choices {
        let selected = if current == value { " selected" } else { "" };
        let _ = write!(
            out,
            r#"<option value="{}"{selected}>{}</option>"#,
            attr(value),
            esc(label)
        );
    }
    out
}

/// The `labels` of `value` as `key=value` code spans.
fn labels_of(value: &Value) -> String {
    let Some(labels) = value.get("labels").and_then(Value::as_object) else {
        return String::new();
    };
    labels
        .iter()
        .map(|(k, v)| format!("<code>{}={}</code>", esc(k), esc(v.as_str().unwrap_or(""))))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The login page.
pub fn login(csrf: &str, next: &str, error: Option<&str>) -> String {
    let mut out = String::new();
    if let Some(error) = error {
        out.push_str(&super::html::alert(error));
    }
    let _ = write!(
        out,
        r#"<form id="login" class="card narrow" method="post" action="/ui/login">
{csrf}<input type="hidden" name="next" value="{next}">
<label for="username">User name</label>
<input id="username" name="username" autocomplete="username" required autofocus maxlength="64">
<label for="password">Password</label>
<input id="password" name="password" type="password" autocomplete="current-password" required maxlength="1024">
<button type="submit" class="primary">Log in</button>
</form>"#,
        csrf = csrf_field(csrf),
        next = attr(next),
    );
    out
}

/// The job list: filters, the submit form when allowed, the table, the next page.
pub fn jobs(
    reader: &Reader,
    csrf: &str,
    filters: &JobFilters,
    page: &Value,
    notice: Option<&str>,
) -> String {
    let mut out = String::new();
    if let Some(notice) = notice {
        out.push_str(&super::html::alert(notice));
    }
    if reader.can("jobs:submit") {
        let _ = write!(
            out,
            r#"<details class="card" open><summary>Run a job</summary>
<form id="submit" method="post" action="/ui/jobs" class="grid">
{csrf}
<div class="wide"><label for="command">Command <small>(run by <code>sh -c</code>)</small></label>
<input id="command" name="command" required maxlength="65536" placeholder="echo hello" spellcheck="false"></div>
<div><label for="job-name">Name <small>(optional)</small></label>
<input id="job-name" name="name" maxlength="128" placeholder="nightly-backup"></div>
<div><label for="labels">On nodes labelled <small>(k=v, …)</small></label>
<input id="labels" name="labels" maxlength="1024" placeholder="zone=eu"></div>
<div><label for="timeout">Timeout <small>(seconds)</small></label>
<input id="timeout" name="timeout" inputmode="numeric" pattern="[0-9]*" maxlength="7"></div>
<div><label for="attempts">Attempts</label>
<input id="attempts" name="attempts" inputmode="numeric" pattern="[0-9]*" maxlength="3" placeholder="3"></div>
<div class="wide"><button type="submit" class="primary">Run</button></div>
</form></details>
"#,
            csrf = csrf_field(csrf)
        );
    }
    out.push_str(r#"<form class="filters" method="get" action="/ui/jobs" role="search" aria-label="Filter jobs">"#);
    let options = option_list("any status", STATUSES.map(|s| (s, s)), &filters.status);
    let _ = write!(
        out,
        r#"<div><label for="f-status">Status</label><select id="f-status" name="status">{options}</select></div>"#
    );
    for (name, label, value, hint) in [
        ("label", "Label", &filters.label, "key=value"),
        ("name", "Name", &filters.name, ""),
        ("node", "Node", &filters.node, ""),
        ("submitted_by", "Submitted by", &filters.submitted_by, ""),
    ] {
        let _ = write!(
            out,
            r#"<div><label for="f-{name}">{label}</label><input id="f-{name}" name="{name}" value="{value}" placeholder="{hint}"></div>"#,
            value = attr(value)
        );
    }
    let ranges = option_list(
        "any time",
        RANGES.map(|(key, label, _)| (key, label)),
        &filters.range,
    );
    let _ = write!(
        out,
        r#"<div><label for="f-range">Created</label><select id="f-range" name="range">{ranges}</select></div>
<div class="actions"><button type="submit">Filter</button> <a href="/ui/jobs">Clear</a></div></form>
"#
    );
    out.push_str(&jobs_table(page));
    if let Some(cursor) = page.get("next_cursor").and_then(Value::as_str) {
        let query = filters.query();
        let sep = if query.is_empty() { "" } else { "&amp;" };
        let _ = write!(
            out,
            r#"<p><a rel="next" href="/ui/jobs?{}{sep}cursor={}">Older jobs →</a></p>"#,
            attr(&query),
            attr(cursor)
        );
    }
    out
}

/// The table of jobs, refreshed in place by the script.
fn jobs_table(page: &Value) -> String {
    let empty = Vec::new();
    let rows = page.get("jobs").and_then(Value::as_array).unwrap_or(&empty);
    let mut out = String::from(
        r#"<div class="scroll" id="jobs-table" data-refresh><table id="jobs"><caption class="sr">Jobs, newest first</caption>
<thead><tr><th scope="col">Job</th><th scope="col">Status</th><th scope="col" class="opt">Node</th><th scope="col" class="opt">Submitted by</th><th scope="col">Created</th><th scope="col" class="opt">Exit</th></tr></thead><tbody>"#,
    );
    if rows.is_empty() {
        out.push_str(r#"<tr><td colspan="6" class="empty">No jobs match.</td></tr>"#);
    }
    for job in rows {
        let id = field(job, "id");
        let name = field(job, "name");
        let title = if name.is_empty() {
            format!("<code>{}</code>", esc(id))
        } else {
            format!("{} <small><code>{}</code></small>", esc(name), esc(id))
        };
        let _ = write!(
            out,
            r#"<tr data-job="{id_attr}"><th scope="row"><a href="/ui/jobs/{id_attr}">{title}</a></th><td class="status">{status}</td><td class="opt">{node}</td><td class="opt">{by}</td><td>{created}</td><td class="opt">{exit}</td></tr>"#,
            id_attr = attr(id),
            status = badge(field(job, "status")),
            node = shown(job, "node"),
            by = shown(job, "submitted_by"),
            created = time(field(job, "created_at")),
            exit = shown(job, "exit_code"),
        );
    }
    out.push_str("</tbody></table></div>");
    out
}

/// One job: its state, actions, spec, attempts, events and output.
pub fn job(
    reader: &Reader,
    csrf: &str,
    job: &Value,
    events: &Value,
    notice: Option<&str>,
) -> String {
    let id = field(job, "id");
    let status = field(job, "status");
    let mut out = String::new();
    if let Some(notice) = notice {
        out.push_str(&super::html::alert(notice));
    }
    let submitter = job
        .get("submitted_by")
        .map(|s| field(s, "principal"))
        .unwrap_or("");
    let mut actions = String::new();
    let own = submitter == reader.name;
    if !FINAL.contains(&status)
        && (reader.can("jobs:cancel:any") || (own && reader.can("jobs:cancel:own")))
    {
        let mut form = button_form(
            &format!("/ui/jobs/{id}/cancel"),
            "cancel",
            "Cancel",
            csrf,
            true,
        );
        form = form.replacen("<form ", r#"<form id="cancel" "#, 1);
        actions.push_str(&form);
    }
    if reader.can("jobs:submit") {
        let mut form = button_form(
            &format!("/ui/jobs/{id}/resubmit"),
            "resubmit",
            "Run again",
            csrf,
            false,
        );
        form = form.replacen("<form ", r#"<form id="resubmit" "#, 1);
        actions.push_str(&form);
    }
    let _ = write!(
        out,
        r#"<section id="summary" data-refresh class="card" aria-label="State" aria-live="polite">
<dl class="facts">
<dt>Status</dt><dd id="status" data-status="{status_attr}">{status_badge}</dd>
<dt>Attempt</dt><dd>{attempt}</dd>
<dt>Node</dt><dd>{node}</dd>
<dt>Exit code</dt><dd>{exit}</dd>
<dt>Submitted by</dt><dd>{by}</dd>
<dt>Created</dt><dd>{created}</dd>
<dt>Started</dt><dd>{started}</dd>
<dt>Finished</dt><dd>{finished}</dd>
</dl>
{error}
<div class="actions">{actions}</div>
</section>
"#,
        status_attr = attr(status),
        status_badge = badge(status),
        attempt = shown(job, "attempt"),
        node = shown(job, "node"),
        exit = shown(job, "exit_code"),
        by = if submitter.is_empty() {
            "—".to_owned()
        } else {
            esc(submitter)
        },
        created = time(field(job, "created_at")),
        started = time(field(job, "started_at")),
        finished = time(field(job, "finished_at")),
        error = match field(job, "error") {
            "" => String::new(),
            error => format!(r#"<p class="problem">{}</p>"#, esc(error)),
        },
    );
    let _ = write!(
        out,
        r#"<section class="card" aria-labelledby="output-h"><h2 id="output-h">Output</h2>
<pre id="output" tabindex="0" aria-live="polite" data-src="/ui/jobs/{id}/output"></pre></section>
"#,
        id = attr(id)
    );
    out.push_str(&spec(job.get("spec").unwrap_or(&Value::Null)));
    out.push_str(&attempts(job));
    out.push_str(&timeline(events));
    out
}

fn spec(spec: &Value) -> String {
    let mut rows = String::new();
    let mut row = |name: &str, value: String| {
        if !value.is_empty() {
            let _ = write!(rows, "<dt>{name}</dt><dd>{value}</dd>");
        }
    };
    row("Name", esc(field(spec, "name")));
    row(
        "Command",
        match spec.get("argv").and_then(Value::as_array) {
            Some(argv) => format!(
                "<code>{}</code>",
                esc(&argv
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(" "))
            ),
            None => format!("<code>{}</code>", esc(field(spec, "command"))),
        },
    );
    row("Working directory", esc(field(spec, "cwd")));
    row("System", esc(field(spec, "system")));
    if let Some(timeout) = spec.get("timeout").and_then(Value::as_f64) {
        row("Timeout", format!("{timeout} s"));
    }
    if let Some(attempts) = spec
        .get("retry")
        .and_then(|r| r.get("max_attempts"))
        .and_then(Value::as_u64)
    {
        row("Attempts", attempts.to_string());
    }
    for (key, title) in [
        ("labels", "On nodes labelled"),
        ("env", "Environment"),
        ("secrets", "Secrets"),
        ("secret_refs", "Stored secrets"),
        ("metadata", "Metadata"),
    ] {
        if let Some(map) = spec
            .get(key)
            .and_then(Value::as_object)
            .filter(|m| !m.is_empty())
        {
            let items: Vec<String> = map
                .iter()
                .map(|(k, v)| {
                    let v = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                    format!("<code>{}={}</code>", esc(k), esc(&v))
                })
                .collect();
            row(title, items.join(" "));
        }
    }
    format!(
        r#"<section class="card" aria-labelledby="spec-h"><h2 id="spec-h">Specification</h2><dl class="facts">{rows}</dl></section>
"#
    )
}

fn attempts(job: &Value) -> String {
    let empty = Vec::new();
    let all = job
        .get("attempts")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    let mut out = String::from(
        r#"<section class="card" aria-labelledby="attempts-h" id="attempts-card" data-refresh><h2 id="attempts-h">Attempts</h2><div class="scroll"><table id="attempts"><thead><tr><th scope="col">#</th><th scope="col">Status</th><th scope="col">Node</th><th scope="col" class="opt">Started</th><th scope="col" class="opt">Finished</th><th scope="col">Exit</th></tr></thead><tbody>"#,
    );
    if all.is_empty() {
        out.push_str(r#"<tr><td colspan="6" class="empty">Not started yet.</td></tr>"#);
    }
    for attempt in all {
        let exit = match (attempt.get("exit_code"), attempt.get("signal")) {
            (Some(Value::Number(code)), _) => code.to_string(),
            (_, Some(Value::Number(signal))) => format!("signal {signal}"),
            _ => "—".to_owned(),
        };
        let _ = write!(
            out,
            r#"<tr><td>{}</td><td>{}</td><td>{}</td><td class="opt">{}</td><td class="opt">{}</td><td>{}</td></tr>"#,
            shown(attempt, "attempt"),
            badge(field(attempt, "status")),
            shown(attempt, "node"),
            time(field(attempt, "started_at")),
            time(field(attempt, "finished_at")),
            esc(&exit),
        );
    }
    out.push_str("</tbody></table></div></section>\n");
    out
}

fn timeline(events: &Value) -> String {
    let empty = Vec::new();
    let all = events
        .get("events")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    let mut out = String::from(
        r#"<section class="card" aria-labelledby="events-h" id="events-card" data-refresh><h2 id="events-h">Events</h2><ol id="events" class="timeline">"#,
    );
    if all.is_empty() {
        out.push_str(r#"<li class="empty">No events recorded yet.</li>"#);
    }
    for event in all {
        let mut detail = String::new();
        if let Some(node) = event.get("node").and_then(Value::as_str) {
            let _ = write!(detail, " on {}", esc(node));
        }
        if let Some(code) = event.get("exit_code").and_then(Value::as_i64) {
            let _ = write!(detail, ", exit {code}");
        }
        if let Some(error) = event.get("error").and_then(Value::as_str) {
            let _ = write!(detail, " — {}", esc(error));
        }
        let _ = write!(
            out,
            "<li>{} {} <small>attempt {}{}</small></li>",
            time(field(event, "at")),
            badge(field(event, "kind")),
            shown(event, "attempt"),
            detail
        );
    }
    out.push_str("</ol></section>\n");
    out
}

/// The nodes, with cordon, uncordon and drain for who may manage them.
pub fn nodes(reader: &Reader, csrf: &str, list: &Value, notice: Option<&str>) -> String {
    let empty = Vec::new();
    let all = list
        .get("nodes")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    let manage = reader.can("nodes:manage");
    let mut out = String::new();
    if let Some(notice) = notice {
        out.push_str(&super::html::alert(notice));
    }
    out.push_str(
        r#"<div class="scroll" id="nodes-table" data-refresh><table id="nodes"><thead><tr><th scope="col">Node</th><th scope="col">Heard from</th><th scope="col">Takes work</th><th scope="col">Running</th><th scope="col" class="opt">Labels</th><th scope="col" class="opt">Finished</th><th scope="col" class="opt">Last heartbeat</th>"#,
    );
    if manage {
        out.push_str(r#"<th scope="col">Actions</th>"#);
    }
    out.push_str("</tr></thead><tbody>");
    if all.is_empty() {
        out.push_str(r#"<tr><td colspan="8" class="empty">No executor has registered.</td></tr>"#);
    }
    for node in all {
        let id = field(node, "id");
        let availability = field(node, "availability");
        let labels = labels_of(node);
        let finished = node.get("finished").unwrap_or(&Value::Null);
        let _ = write!(
            out,
            r#"<tr data-node="{id_attr}"><th scope="row">{id} <small>{host}</small></th><td class="liveness">{status}</td><td class="status">{availability}</td><td>{running}/{capacity} <small>+{queued} queued</small></td><td class="opt">{labels}</td><td class="opt"><small>{ok} succeeded, {failed} failed, {timed_out} timed out, {cancelled} cancelled, {lost} lost</small></td><td class="opt">{beat}</td>"#,
            id_attr = attr(id),
            id = esc(id),
            host = esc(field(node, "hostname")),
            status = badge(field(node, "status")),
            availability = badge(availability),
            running = shown(node, "running"),
            capacity = shown(node, "capacity"),
            queued = shown(node, "queued"),
            labels = labels,
            ok = shown(finished, "succeeded"),
            failed = shown(finished, "failed"),
            timed_out = shown(finished, "timed_out"),
            cancelled = shown(finished, "cancelled"),
            lost = shown(finished, "lost"),
            beat = time(field(node, "last_heartbeat_at")),
        );
        if manage {
            let base = format!("/ui/nodes/{id}");
            out.push_str(r#"<td class="actions">"#);
            if availability == "active" {
                out.push_str(&button_form(
                    &format!("{base}/cordon"),
                    "cordon",
                    "Cordon",
                    csrf,
                    false,
                ));
            } else {
                out.push_str(&button_form(
                    &format!("{base}/uncordon"),
                    "uncordon",
                    "Uncordon",
                    csrf,
                    false,
                ));
            }
            if matches!(availability, "active" | "cordoned") {
                let _ = write!(
                    out,
                    r#"<form method="post" action="{action}/drain" class="drain">{csrf}<label class="sr" for="deadline-{id}">Drain deadline in seconds for {name}</label><input id="deadline-{id}" name="deadline" inputmode="numeric" pattern="[0-9]*" maxlength="6" placeholder="300 s" size="5"><button type="submit" class="danger">Drain</button></form>"#,
                    action = attr(&base),
                    csrf = csrf_field(csrf),
                    id = attr(id),
                    name = esc(id),
                );
            }
            out.push_str("</td>");
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table></div>");
    out
}

/// The remote systems and their health.
pub fn systems(list: &Value) -> String {
    let empty = Vec::new();
    let all = list
        .get("systems")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    let mut out = String::from(
        r#"<div class="scroll" id="systems-table" data-refresh><table id="systems"><thead><tr><th scope="col">System</th><th scope="col">Health</th><th scope="col" class="opt">Address</th><th scope="col" class="opt">Logs in as</th><th scope="col" class="opt">Checked</th><th scope="col" class="opt">Round trip</th><th scope="col" class="opt">Labels</th></tr></thead><tbody>"#,
    );
    if all.is_empty() {
        out.push_str(
            r#"<tr><td colspan="7" class="empty">No remote system is registered.</td></tr>"#,
        );
    }
    for system in all {
        let health = system.get("health").unwrap_or(&Value::Null);
        let error = match field(health, "last_error") {
            "" => String::new(),
            e => format!(r#"<br><small class="problem">{}</small>"#, esc(e)),
        };
        let labels = labels_of(system);
        let rtt = health
            .get("rtt_ms")
            .and_then(Value::as_u64)
            .map_or_else(|| "—".to_owned(), |ms| format!("{ms} ms"));
        let _ = write!(
            out,
            r#"<tr data-system="{name_attr}"><th scope="row">{name}</th><td class="status">{health}{error}</td><td class="opt">{host}:{port}</td><td class="opt">{user} <small>({method})</small></td><td class="opt">{checked}</td><td class="opt">{rtt}</td><td class="opt">{labels}</td></tr>"#,
            name_attr = attr(field(system, "name")),
            name = esc(field(system, "name")),
            health = badge(field(health, "status")),
            host = esc(field(system, "hostname")),
            port = shown(system, "port"),
            user = esc(field(system, "username")),
            method = esc(field(system, "auth_method")),
            checked = time(field(health, "checked_at")),
            labels = labels,
        );
    }
    out.push_str("</tbody></table></div>");
    out
}

/// The filters of the audit trail.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(default)]
pub struct AuditFilters {
    /// Who.
    pub principal: String,
    /// What (`job.submit`, …).
    pub action: String,
    /// `success`, `failure`, `denied`, `error`.
    pub outcome: String,
    /// Where the page starts.
    pub cursor: String,
}

/// The audit trail, newest first.
pub fn audit(filters: &AuditFilters, page: &Value) -> String {
    let mut out = String::from(
        r#"<form class="filters" method="get" action="/ui/audit" role="search" aria-label="Filter the audit trail">"#,
    );
    for (name, label, value) in [
        ("principal", "Who", &filters.principal),
        ("action", "Action", &filters.action),
    ] {
        let _ = write!(
            out,
            r#"<div><label for="a-{name}">{label}</label><input id="a-{name}" name="{name}" value="{}"></div>"#,
            attr(value)
        );
    }
    let outcomes = ["success", "failure", "denied", "error"].map(|o| (o, o));
    let options = option_list("any outcome", outcomes, &filters.outcome);
    let _ = write!(
        out,
        r#"<div><label for="a-outcome">Outcome</label><select id="a-outcome" name="outcome">{options}</select></div><div class="actions"><button type="submit">Filter</button> <a href="/ui/audit">Clear</a></div></form>"#
    );
    out.push_str(
        r#"<div class="scroll"><table id="audit"><thead><tr><th scope="col">When</th><th scope="col">Who</th><th scope="col">Action</th><th scope="col">Outcome</th><th scope="col" class="opt">Resource</th><th scope="col" class="opt">Client</th><th scope="col" class="opt">Detail</th></tr></thead><tbody>"#,
    );
    let empty = Vec::new();
    let all = page
        .get("records")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    if all.is_empty() {
        out.push_str(r#"<tr><td colspan="7" class="empty">No record matches.</td></tr>"#);
    }
    for record in all {
        let _ = write!(
            out,
            r#"<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td class="opt">{}</td><td class="opt">{}</td><td class="opt"><small>{}</small></td></tr>"#,
            time(field(record, "at")),
            shown(record, "principal"),
            esc(field(record, "action")),
            badge(field(record, "outcome")),
            shown(record, "resource"),
            shown(record, "client"),
            esc(field(record, "detail")),
        );
    }
    out.push_str("</tbody></table></div>");
    if let Some(cursor) = page.get("next_cursor").and_then(Value::as_str) {
        let query = serde_urlencoded::to_string([
            ("principal", filters.principal.as_str()),
            ("action", filters.action.as_str()),
            ("outcome", filters.outcome.as_str()),
            ("cursor", cursor),
        ])
        .unwrap_or_default();
        let _ = write!(
            out,
            r#"<p><a rel="next" href="/ui/audit?{}">Older records →</a></p>"#,
            attr(&query)
        );
    }
    out
}

/// The mesh's health for the header.
pub fn mesh(health: &super::live::Health) -> String {
    let mut out = String::new();
    let nats = if health.nats { "good" } else { "bad" };
    let _ = write!(
        out,
        r#"<span class="dot {nats}" aria-hidden="true"></span><span>NATS {}</span>"#,
        if health.nats {
            "connected"
        } else {
            "disconnected"
        }
    );
    for (service, count) in &health.services {
        let (tone, text) = match count {
            Some(0) | None => (
                "bad",
                count.map_or_else(|| "?".to_owned(), |c| c.to_string()),
            ),
            Some(n) => ("good", n.to_string()),
        };
        let _ = write!(
            out,
            r#" <span class="svc {tone}" title="{service}: {text} replica(s) answering">{service} {text}</span>"#
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn reader(role: &str, permissions: &[&str]) -> Reader {
        Reader::of(&json!({"name": "ann", "role": role, "permissions": permissions}))
    }

    #[test]
    fn a_viewer_is_offered_no_submit_form_and_no_cancel_button() {
        let viewer = reader("viewer", &["jobs:read"]);
        let page = jobs(
            &viewer,
            "t",
            &JobFilters::default(),
            &json!({"jobs": []}),
            None,
        );
        assert!(!page.contains(r#"id="submit""#));
        let running =
            json!({"id": "01J", "status": "running", "submitted_by": {"principal": "ann"}});
        let page = job(&viewer, "t", &running, &json!({"events": []}), None);
        assert!(!page.contains(r#"id="cancel""#));
        assert!(!page.contains(r#"id="resubmit""#));
    }

    #[test]
    fn an_operator_cancels_only_its_own_unfinished_jobs() {
        let operator = reader("operator", &["jobs:read", "jobs:submit", "jobs:cancel:own"]);
        let mine = json!({"id": "01J", "status": "running", "submitted_by": {"principal": "ann"}});
        assert!(job(&operator, "t", &mine, &Value::Null, None).contains(r#"id="cancel""#));
        let theirs =
            json!({"id": "01J", "status": "running", "submitted_by": {"principal": "bob"}});
        assert!(!job(&operator, "t", &theirs, &Value::Null, None).contains(r#"id="cancel""#));
        let done =
            json!({"id": "01J", "status": "succeeded", "submitted_by": {"principal": "ann"}});
        assert!(!job(&operator, "t", &done, &Value::Null, None).contains(r#"id="cancel""#));
    }

    #[test]
    fn a_job_name_with_markup_is_shown_as_text() {
        let page =
            json!({"jobs": [{"id": "01J", "name": "<script>x</script>", "status": "pending"}]});
        let html = jobs(
            &reader("viewer", &[]),
            "t",
            &JobFilters::default(),
            &page,
            None,
        );
        assert!(html.contains("&lt;script&gt;x&lt;/script&gt;"));
        assert!(!html.contains("<script>x"));
    }

    #[test]
    fn the_filters_are_kept_in_the_next_pages_link() {
        let filters = JobFilters {
            status: "failed".into(),
            label: "zone=eu".into(),
            ..JobFilters::default()
        };
        let html = jobs(
            &reader("viewer", &[]),
            "t",
            &filters,
            &json!({"jobs": [], "next_cursor": "01K"}),
            None,
        );
        assert!(
            html.contains("status=failed&amp;label=zone%3Deu&amp;cursor=01K"),
            "{html}"
        );
    }
}
