//! What the OpenAPI document says beyond what poem-openapi derives from the types: the rules
//! the handlers check themselves (names, roles, RFC 3339 times, `key=value` labels, a job's
//! `command` or `argv`, integer ranges, unknown fields refused), written into the schemas so
//! that a request the document calls valid is one the API accepts, and a client generated from
//! it can check its input before sending.
//!
//! Each rule names the check it describes; the constants are the checks' own where they are
//! public. Rules that depend on state (a stored secret or a system that must exist, a time
//! within a year of now) stay in the descriptions.

use serde_json::{Map, Value, json};

use capstan_protocol::spec::limits;

/// A 26-character ULID, as ids and cursors are.
const ULID: &str = "^[0-7][0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{25}$";

/// Writes the handlers' rules into `spec`.
pub(super) fn tighten(spec: &mut Value) {
    bound_integers(spec);
    refuse_unknown_fields(spec);
    status_filters(spec);
    events_as_sent(spec);
    other_checks(spec);
    targets_and_hosts(spec);
    times_and_filters(spec);
    names_and_roles(spec);
    job_submission(spec);
    logs_answer_json_too(spec);
    nullable_optionals(spec);
}

/// Every integer with a machine format gets the range the server parses it into: a value the
/// document allows is never refused as too large or negative.
fn bound_integers(value: &mut Value) {
    match value {
        Value::Object(object) => {
            if object.get("type").and_then(Value::as_str) == Some("integer") {
                let range: Option<(Value, Value)> =
                    match object.get("format").and_then(Value::as_str) {
                        Some("uint8") => Some((json!(0), json!(u8::MAX))),
                        Some("uint16") => Some((json!(0), json!(u16::MAX))),
                        Some("uint32") => Some((json!(0), json!(u32::MAX))),
                        Some("uint64") => Some((json!(0), json!(u64::MAX))),
                        Some("int32") => Some((json!(i32::MIN), json!(i32::MAX))),
                        Some("int64") => Some((json!(i64::MIN), json!(i64::MAX))),
                        _ => None,
                    };
                if let Some((minimum, maximum)) = range {
                    object.entry("minimum").or_insert(minimum);
                    object.entry("maximum").or_insert(maximum);
                }
            }
            object.values_mut().for_each(bound_integers);
        }
        Value::Array(items) => items.iter_mut().for_each(bound_integers),
        _ => {}
    }
}

/// Request bodies refuse fields they do not declare (`deny_unknown_fields` on every one):
/// their schemas, and the schemas they contain, say `additionalProperties: false`. Their
/// optional fields take `null` for absent, so the document says `nullable` (a reference
/// cannot carry it in OpenAPI 3.0, and is left as it is).
fn refuse_unknown_fields(spec: &mut Value) {
    let mut names: Vec<String> = Vec::new();
    if let Some(paths) = spec.get("paths").and_then(Value::as_object) {
        for operations in paths.values().filter_map(Value::as_object) {
            for operation in operations.values() {
                collect_refs(&operation["requestBody"], &mut names);
            }
        }
    }
    let mut index = 0;
    while index < names.len() {
        let schema = spec["components"]["schemas"][&names[index]].clone();
        collect_refs(&schema, &mut names);
        index += 1;
    }
    for name in names {
        if let Some(schema) = spec["components"]["schemas"][&name].as_object_mut()
            && schema.contains_key("properties")
        {
            schema.insert("additionalProperties".into(), json!(false));
        }
    }
}

/// The optional fields of request bodies (those refusing unknown fields) without a default
/// take `null` for absent, when written inline: the document says `nullable` (and adds
/// `null` to an enum).
/// A field that is a reference cannot say it in OpenAPI 3.0, and the server refuses `null`
/// there (see `strict`).
fn nullable_optionals(spec: &mut Value) {
    let Some(schemas) = spec["components"]["schemas"].as_object_mut() else {
        return;
    };
    for schema in schemas.values_mut().filter_map(Value::as_object_mut) {
        if schema.get("additionalProperties") != Some(&json!(false)) {
            continue;
        }
        let required: Vec<String> = schema
            .get("required")
            .and_then(Value::as_array)
            .map(|r| {
                r.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let Some(properties) = schema.get_mut("properties").and_then(Value::as_object_mut) else {
            continue;
        };
        for (field, property) in properties.iter_mut() {
            let Some(property) = property.as_object_mut() else {
                continue;
            };
            // A field with a default takes its default when absent, not `null`.
            if required.contains(field)
                || !property.contains_key("type")
                || property.contains_key("default")
            {
                continue;
            }
            property.insert("nullable".into(), json!(true));
            if let Some(allowed) = property.get_mut("enum").and_then(Value::as_array_mut) {
                allowed.push(Value::Null);
            }
        }
    }
}

fn collect_refs(value: &Value, names: &mut Vec<String>) {
    match value {
        Value::Object(object) => {
            if let Some(name) = object
                .get("$ref")
                .and_then(Value::as_str)
                .and_then(|r| r.strip_prefix("#/components/schemas/"))
                && !names.iter().any(|n| n == name)
            {
                names.push(name.to_owned());
            }
            object.values().for_each(|v| collect_refs(v, names));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, names)),
        _ => {}
    }
}

/// A drain's deadline, a stored secret's users, a system's host key or trust.
fn other_checks(spec: &mut Value) {
    extend(
        parameter(spec, "/api/v1/nodes/{id}/drain", "post", "deadline_seconds"),
        json!({"maximum": 7 * 24 * 3600}),
    );
    let printable =
        "^[^\\x00-\\x1f\\x7f-\\x9f]*[^\\s\\x00-\\x1f\\x7f-\\x9f][^\\x00-\\x1f\\x7f-\\x9f]*$";
    extend(
        property(spec, "SecretInput", "usable_by"),
        json!({"minItems": 1, "maxItems": 100, "items": {"type": "string", "maxLength": 256, "pattern": printable}}),
    );
    extend(
        property(spec, "SecretInput", "description"),
        json!({"maxLength": 256, "pattern": "^[^\\x00-\\x1f\\x7f-\\x9f]*$"}),
    );
    let account = json!({"pattern": "^[^\\s-][^\\s]{0,63}$"});
    for schema in ["SystemInput", "SystemPatch"] {
        extend(property(spec, schema, "username"), account.clone());
    }
}

/// Labels as `spec::validate_labels` takes them: at least `at_least`, at most
/// `MAX_LABELS`, keys and values of A-Z, a-z, 0-9, `-`, `_`, `.`, `/` (a key not empty).
/// NOTE: OpenAPI 3.0 tools may ignore `propertyNames` (a JSON Schema draft 6 keyword).
fn label_map(at_least: usize) -> Value {
    json!({
        "minProperties": at_least,
        "maxProperties": limits::MAX_LABELS,
        "propertyNames": {"pattern": format!("^[A-Za-z0-9._/-]{{1,{}}}$", limits::MAX_LABEL_LEN)},
        "additionalProperties": {"type": "string", "pattern": format!("^[A-Za-z0-9._/-]{{0,{}}}$", limits::MAX_LABEL_LEN)},
    })
}

/// A fan-out's targets: systems by name (1 to 1000, each once) or by labels (at least one);
/// nodes by labels. Host names as the systems routes check them.
fn targets_and_hosts(spec: &mut Value) {
    let systems = spec["components"]["schemas"]["SystemTargets"]
        .as_object_mut()
        .expect("SystemTargets");
    systems.insert(
        "not".into(),
        json!({"anyOf": [
            {"required": ["names", "labels"]},
            {"not": {"anyOf": [{"required": ["names"]}, {"required": ["labels"]}]}}
        ]}),
    );
    extend(property(spec, "SystemTargets", "labels"), label_map(1));
    extend(
        property(spec, "SystemTargets", "names"),
        json!({"minItems": 1, "maxItems": 1000, "uniqueItems": true,
               "items": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}}),
    );
    extend(property(spec, "NodeTargets", "labels"), label_map(0));
    let hostname = json!({"pattern": "^[A-Za-z0-9._:][A-Za-z0-9._:-]{0,252}$"});
    for schema in ["SystemInput", "SystemPatch"] {
        extend(property(spec, schema, "hostname"), hostname.clone());
    }
}

/// The job lists filter by a status a job can have (not `unknown`, which marks history rows
/// a newer version wrote); a purge by a final one.
fn status_filters(spec: &mut Value) {
    let statuses: Vec<&str> = capstan_protocol::JobStatus::ALL
        .iter()
        .map(|s| s.as_str())
        .collect();
    let finals: Vec<&str> = capstan_protocol::JobStatus::ALL
        .iter()
        .filter(|s| s.is_terminal())
        .map(|s| s.as_str())
        .collect();
    for (method, allowed) in [("get", statuses), ("delete", finals)] {
        let schema = parameter(spec, "/api/v1/jobs", method, "status");
        schema.clear();
        extend(schema, json!({"type": "string", "enum": allowed}));
    }
}

/// A followed log is a stream of server-sent events, each an `event` (`stdout`, `stderr`,
/// `end`) and a `data` line holding a `LogEvent` as JSON: what the stream's schema
/// describes, event by event.
fn events_as_sent(spec: &mut Value) {
    for path in [
        "/api/v1/jobs/{id}/logs",
        "/api/v1/jobs/{id}/targets/{target}/logs",
    ] {
        let media =
            &mut spec["paths"][path]["get"]["responses"]["200"]["content"]["text/event-stream"];
        if media.is_object() {
            media["schema"] = json!({
                "type": "object",
                "description": "One server-sent event: its type, and a `LogEvent` as JSON in its data.",
                "required": ["event", "data"],
                "properties": {
                    "event": {"type": "string", "enum": ["stdout", "stderr", "end"]},
                    "data": {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": {"$ref": "#/components/schemas/LogEvent"}
                    }
                }
            });
        }
    }
}

/// The schema of query parameter `name` of `method path`.
fn parameter<'a>(
    spec: &'a mut Value,
    path: &str,
    method: &str,
    name: &str,
) -> &'a mut Map<String, Value> {
    spec["paths"][path][method]["parameters"]
        .as_array_mut()
        .and_then(|parameters| parameters.iter_mut().find(|p| p["name"] == name))
        .and_then(|parameter| parameter["schema"].as_object_mut())
        .unwrap_or_else(|| panic!("{method} {path} has no parameter {name}"))
}

/// Property `name` of component schema `schema`.
fn property<'a>(spec: &'a mut Value, schema: &str, name: &str) -> &'a mut Map<String, Value> {
    spec["components"]["schemas"][schema]["properties"][name]
        .as_object_mut()
        .unwrap_or_else(|| panic!("{schema} has no property {name}"))
}

fn extend(target: &mut Map<String, Value>, rules: Value) {
    if let Value::Object(rules) = rules {
        target.extend(rules);
    }
}

/// Time filters are RFC 3339 (`Timestamp::parse_rfc3339`), label filters `key=value`, the
/// audit filters the names of actions and outcomes, cursors the ids they continue after.
fn times_and_filters(spec: &mut Value) {
    let date_time = || json!({"format": "date-time"});
    for (path, method, name) in [
        ("/api/v1/jobs", "get", "since"),
        ("/api/v1/jobs", "get", "until"),
        ("/api/v1/jobs", "delete", "finished_before"),
        ("/api/v1/audit", "get", "since"),
        ("/api/v1/audit", "get", "until"),
    ] {
        extend(parameter(spec, path, method, name), date_time());
    }
    for (path, method) in [("/api/v1/jobs", "get"), ("/api/v1/systems", "get")] {
        if let Some(items) = parameter(spec, path, method, "label")
            .get_mut("items")
            .and_then(Value::as_object_mut)
        {
            items.insert("pattern".into(), json!("="));
        }
    }
    let actions: Vec<&str> = capstan_protocol::AuditAction::ALL
        .iter()
        .map(|a| a.as_str())
        .collect();
    extend(
        parameter(spec, "/api/v1/audit", "get", "action"),
        json!({ "enum": actions }),
    );
    let outcomes: Vec<&str> = capstan_protocol::AuditOutcome::ALL
        .iter()
        .map(|o| o.as_str())
        .collect();
    extend(
        parameter(spec, "/api/v1/audit", "get", "outcome"),
        json!({ "enum": outcomes }),
    );
    for path in ["/api/v1/jobs", "/api/v1/audit"] {
        extend(
            parameter(spec, path, "get", "cursor"),
            json!({ "pattern": ULID }),
        );
    }
}

/// User, system, secret and token names, roles, passwords and token lifetimes, as the
/// handlers check them.
fn names_and_roles(spec: &mut Value) {
    let roles = json!({"enum": ["viewer", "operator", "admin"]});
    for (schema, field) in [
        ("NewUser", "role"),
        ("UserPatch", "role"),
        ("NewToken", "role"),
    ] {
        extend(property(spec, schema, field), roles.clone());
    }
    let user_name = json!({
        "pattern": format!("^[A-Za-z0-9._@-]{{1,{}}}$", crate::auth::password::MAX_USERNAME_LEN)
    });
    extend(property(spec, "NewUser", "name"), user_name);
    let password = json!({
        "minLength": crate::config::DEFAULT_PASSWORD_MIN_LENGTH,
        "maxLength": crate::auth::password::MAX_PASSWORD_BYTES,
    });
    for (schema, field) in [
        ("NewUser", "password"),
        ("UserPatch", "password"),
        ("PasswordChange", "new_password"),
    ] {
        extend(property(spec, schema, field), password.clone());
    }
    extend(
        property(spec, "SystemInput", "name"),
        json!({"pattern": "^[A-Za-z0-9_-]{1,64}$"}),
    );
    // Trimmed, 1 to 128 characters, none of them a control character.
    extend(
        property(spec, "NewToken", "name"),
        json!({
            "maxLength": 128,
            "pattern": "^[^\\x00-\\x1f\\x7f-\\x9f]*[^\\s\\x00-\\x1f\\x7f-\\x9f][^\\x00-\\x1f\\x7f-\\x9f]*$"
        }),
    );
    extend(
        property(spec, "NewToken", "expires_in"),
        json!({"minimum": 60, "maximum": 365 * 24 * 3600}),
    );
    // NOTE: byte limits are written as character limits: the same for ASCII, looser for
    // other text (the server's check counts bytes, and says so).
    extend(
        property(spec, "SecretInput", "value"),
        json!({"minLength": 1, "maxLength": 64 * 1024}),
    );
}

/// A job runs `command` or `argv`, exactly one; its other fields as `JobSpec` checks them.
fn job_submission(spec: &mut Value) {
    let schema = spec["components"]["schemas"]["JobSubmission"]
        .as_object_mut()
        .expect("JobSubmission");
    // NOTE: written as one `not` (of both, neither, or a time and a delay together) rather
    // than `oneOf`, which client generators turn into a union with no `JobSubmission` model.
    schema.insert(
        "not".into(),
        json!({"anyOf": [
            {"required": ["command", "argv"]},
            {"not": {"anyOf": [{"required": ["command"]}, {"required": ["argv"]}]}},
            {"required": ["run_at", "delay"]}
        ]}),
    );
    let variables = json!({
        "maxProperties": limits::MAX_ENV,
        "propertyNames": {"pattern": "^[^=\\x00]+$"},
    });
    let rules = [
        ("command", json!({"pattern": "^[^\\x00]*\\S[^\\x00]*$"})),
        (
            "argv",
            // NOTE: only the program (the first) must be non-empty; OpenAPI 3.0 cannot say
            // "the first item", so the document asks it of every argument.
            json!({"minItems": 1, "items": {"type": "string", "minLength": 1, "pattern": "^[^\\x00]*$"}}),
        ),
        ("cwd", json!({"pattern": "^/[^\\x00]*$"})),
        (
            "timeout",
            json!({"minimum": 0, "exclusiveMinimum": true, "maximum": limits::MAX_TIMEOUT.as_secs()}),
        ),
        (
            "delay",
            json!({"minimum": 0, "maximum": limits::MAX_DELAY.as_secs()}),
        ),
        ("run_at", json!({"format": "date-time"})),
        (
            "name",
            json!({"maxLength": limits::MAX_NAME_LEN, "pattern": "\\S"}),
        ),
        (
            "idempotency_key",
            json!({"minLength": 1, "maxLength": limits::MAX_IDEMPOTENCY_KEY_LEN, "pattern": "^[^\\x00-\\x1f\\x7f-\\x9f]+$"}),
        ),
        ("system", json!({"pattern": "^[A-Za-z0-9_-]{1,64}$"})),
    ];
    for (field, rule) in rules {
        extend(property(spec, "JobSubmission", field), rule);
    }
    extend(property(spec, "JobSubmission", "labels"), label_map(0));
    extend(property(spec, "JobSubmission", "env"), variables.clone());
    extend(
        property(spec, "JobSubmission", "secrets"),
        variables.clone(),
    );
    extend(property(spec, "JobSubmission", "secret_refs"), variables);
    if let Some(values) = property(spec, "JobSubmission", "secret_refs")
        .get_mut("additionalProperties")
        .and_then(Value::as_object_mut)
    {
        values.insert("pattern".into(), json!("^[A-Za-z0-9_-]{1,64}$"));
    }
    extend(
        property(spec, "JobSubmission", "metadata"),
        json!({
            "maxProperties": limits::MAX_METADATA - capstan_protocol::fanout::CHILD_METADATA,
            "propertyNames": {"minLength": 1, "maxLength": limits::MAX_METADATA_KEY_LEN},
            "additionalProperties": {"type": "string", "maxLength": limits::MAX_METADATA_VALUE_LEN},
        }),
    );
}

/// `GET …/logs` answers JSON without `follow` and server-sent events with it; poem-openapi
/// keeps one content type per status, so the JSON one is added back.
fn logs_answer_json_too(spec: &mut Value) {
    let content =
        &mut spec["paths"]["/api/v1/jobs/{id}/logs"]["get"]["responses"]["200"]["content"];
    if let Some(content) = content.as_object_mut() {
        content.insert(
            "application/json; charset=utf-8".into(),
            json!({"schema": {"$ref": "#/components/schemas/JobLogs"}}),
        );
    }
    let content = &mut spec["paths"]["/api/v1/jobs/{id}/targets/{target}/logs"]["get"]["responses"]
        ["200"]["content"];
    if let Some(content) = content.as_object_mut() {
        content.insert(
            "application/json; charset=utf-8".into(),
            json!({"schema": {"$ref": "#/components/schemas/JobLogs"}}),
        );
    }
}
