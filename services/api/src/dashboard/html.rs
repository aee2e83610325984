//! HTML for the dashboard: escaping, the page layout, and the small pieces every page uses
//! (status badges, times, forms carrying the CSRF token).
//!
//! Every value that came from a request, the history or the mesh goes through [`esc`] or
//! [`attr`] before it is written into a page; nothing else builds markup from data.

use std::fmt::Write as _;

use serde_json::Value;

/// `text`, safe between tags.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `text`, safe inside a double-quoted attribute value (the same escaping as [`esc`]).
pub fn attr(text: &str) -> String {
    esc(text)
}

/// A string field of `value`, or `""`.
pub fn field<'a>(value: &'a Value, name: &str) -> &'a str {
    value.get(name).and_then(Value::as_str).unwrap_or("")
}

/// A field of `value` as text: strings as they are, numbers and booleans written out,
/// anything else (absent, null) as `—`.
pub fn shown(value: &Value, name: &str) -> String {
    match value.get(name) {
        Some(Value::String(s)) if !s.is_empty() => esc(s),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(b)) => b.to_string(),
        _ => "—".to_owned(),
    }
}

/// A badge for a job, node or system status; its class picks the colour.
pub fn badge(status: &str) -> String {
    let tone = match status {
        "succeeded" | "up" | "active" | "healthy" | "success" => "good",
        "failed" | "timed_out" | "lost" | "quarantined" | "down" | "unreachable"
        | "auth_failed" | "host_key_mismatch" | "failure" | "error" | "denied" => "bad",
        "running" | "dispatched" | "draining" => "busy",
        "cancelled" | "cordoned" | "drained" | "left" => "muted",
        _ => "wait",
    };
    format!(
        r#"<span class="badge {tone}" data-status="{s}">{s}</span>"#,
        s = esc(status)
    )
}

/// An RFC 3339 instant as a `<time>` element: the full instant in its attribute, the
/// date and time to the second in its text (the script shows it in the reader's zone).
pub fn time(instant: &str) -> String {
    if instant.is_empty() {
        return "—".to_owned();
    }
    let short: String = instant.replace('T', " ").chars().take(19).collect();
    format!(
        r#"<time datetime="{}">{}</time>"#,
        attr(instant),
        esc(&short)
    )
}

/// A hidden field carrying the CSRF token, for every form that changes something.
pub fn csrf_field(token: &str) -> String {
    format!(
        r#"<input type="hidden" name="csrf" value="{}">"#,
        attr(token)
    )
}

/// A one-button form posting to `action`: the way every action is taken, so that it works
/// without the script and carries the CSRF token.
pub fn button_form(action: &str, class: &str, label: &str, csrf: &str, danger: bool) -> String {
    format!(
        r#"<form method="post" action="{}" class="{}">{}<button type="submit"{}>{}</button></form>"#,
        attr(action),
        attr(class),
        csrf_field(csrf),
        if danger { r#" class="danger""# } else { "" },
        esc(label)
    )
}

/// What the layout needs to know of the page and its reader.
pub struct Frame<'a> {
    /// The `<title>` and the page's heading.
    pub title: &'a str,
    /// Which navigation entry is current.
    pub section: &'a str,
    /// Who is logged in, with the role; `None` on the login page.
    pub user: Option<(&'a str, &'a str)>,
    /// Whether the audit trail is offered.
    pub audit: bool,
    /// The CSRF token for the logout form.
    pub csrf: &'a str,
    /// The mesh's health, already rendered.
    pub mesh: &'a str,
    /// Where the script listens for changes (`data-live` on `<body>`), if anywhere.
    pub live: Option<String>,
}

/// A whole page: head, header with navigation and the mesh's health, then `body`.
pub fn page(frame: &Frame<'_>, body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 2048);
    let live = frame
        .live
        .as_deref()
        .map(|url| format!(r#" data-live="{}""#, attr(url)))
        .unwrap_or_default();
    let _ = write!(
        out,
        r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>{title} · Capstan</title>
<link rel="icon" href="/ui/assets/icon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/ui/assets/app.css">
<script src="/ui/assets/app.js" defer></script>
</head>
<body{live}>
<a class="skip" href="#main">Skip to content</a>
<header class="top">
<span class="brand">Capstan</span>
"##,
        title = esc(frame.title),
    );
    if let Some((name, role)) = frame.user {
        let nav = [
            ("jobs", "/ui/jobs", "Jobs", true),
            ("nodes", "/ui/nodes", "Nodes", true),
            ("schedules", "/ui/schedules", "Schedules", true),
            ("workflows", "/ui/workflows", "Workflows", true),
            ("systems", "/ui/systems", "Systems", true),
            ("audit", "/ui/audit", "Audit", frame.audit),
        ];
        out.push_str(r#"<nav aria-label="Sections"><ul>"#);
        for (key, href, label, shown) in nav {
            if !shown {
                continue;
            }
            let current = if key == frame.section {
                r#" aria-current="page""#
            } else {
                ""
            };
            let _ = write!(out, r#"<li><a href="{href}"{current}>{label}</a></li>"#);
        }
        out.push_str("</ul></nav>");
        let _ = write!(
            out,
            r#"<div id="mesh" class="mesh" data-refresh>{mesh}</div>
<div class="who"><span title="role {role}">{name} <small>({role})</small></span>
<form id="logout" method="post" action="/ui/logout">{csrf}<button type="submit">Log out</button></form></div>
"#,
            mesh = frame.mesh,
            name = esc(name),
            role = esc(role),
            csrf = csrf_field(frame.csrf),
        );
    }
    let _ = write!(
        out,
        "</header>\n<main id=\"main\" tabindex=\"-1\">\n<h1>{}</h1>\n{}\n</main>\n</body>\n</html>\n",
        esc(frame.title),
        body
    );
    out
}

/// A refusal or failure shown in the page, announced to screen readers.
pub fn alert(message: &str) -> String {
    format!(r#"<p class="alert" role="alert">{}</p>"#, esc(message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_in_data_is_written_as_text() {
        assert_eq!(
            esc(r#"<script>alert("x")</script> & 'q'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;q&#39;"
        );
        let badge = badge("<img src=x onerror=alert(1)>");
        assert!(!badge.contains("<img"), "{badge}");
    }

    #[test]
    fn every_action_form_carries_the_csrf_token() {
        let form = button_form("/ui/jobs/X/cancel", "cancel", "Cancel", "tok\"en", true);
        assert!(
            form.contains(r#"name="csrf" value="tok&quot;en""#),
            "{form}"
        );
        assert!(form.contains(r#"method="post""#));
    }

    #[test]
    fn a_missing_field_is_shown_as_a_dash() {
        let value = serde_json::json!({"a": null, "b": 3, "c": "<x>"});
        assert_eq!(shown(&value, "a"), "—");
        assert_eq!(shown(&value, "b"), "3");
        assert_eq!(shown(&value, "c"), "&lt;x&gt;");
        assert_eq!(shown(&value, "d"), "—");
    }
}
