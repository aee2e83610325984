//! The files under `schemas/` match the code, and the message schemas tell the truth: real
//! messages, built with the protocol's constructors and serialized as Capstan serializes them,
//! validate against their schemas, and job specs validate exactly when the decoder accepts
//! them.
//!
//! The schemas are checked by the small validator at the end of this file, which knows the
//! JSON Schema keywords schemars emits and refuses any other (rather than pulling in a full
//! validator and its dependencies); a schema using a keyword it does not know fails the tests.

use std::collections::BTreeSet;

use capstan_e2e::schemas::{self, Drift};
use capstan_protocol::codec::{self, Encoding};
use capstan_protocol::job::Outcome;
use capstan_protocol::node::NodeQuery;
use capstan_protocol::reply::{Cancelled, Created};
use capstan_protocol::{
    CancelNotice, CancelOutcome, Dispatch, ErrorCode, Heartbeat, HeartbeatReply, InstanceId,
    JobEvent, JobEventKind, JobId, JobRecord, JobRef, JobSpec, JobStatus, NodeEvent, NodeEventKind,
    NodeId, NodeRecord, OutputSummary, Registration, Rejection, RejectionCode, Reply, ServiceError,
    Timestamp,
};
use serde::Serialize;
use serde_json::{Value, json};

fn drifts_under(prefix: &str) -> Vec<Drift> {
    let root = capstan_testkit::workspace_root();
    schemas::drift(&root, &schemas::generate())
        .expect("the files under schemas/ are readable")
        .into_iter()
        .filter(|drift| drift.path().starts_with(prefix))
        .collect()
}

fn assert_current(drifts: &[Drift]) {
    let listed: Vec<String> = drifts.iter().map(ToString::to_string).collect();
    assert!(
        drifts.is_empty(),
        "generated files drifted from the code:\n  {}\nrun `{}` and commit the result",
        listed.join("\n  "),
        schemas::COMMAND
    );
}

#[test]
fn the_openapi_file_matches_the_code() {
    assert_current(&drifts_under(&schemas::openapi().path));
}

#[test]
fn the_message_schemas_match_the_code() {
    assert_current(&drifts_under(schemas::NATS_DIR));
}

/// The schema of the message with file stem `stem`.
fn schema(stem: &str) -> Value {
    capstan_protocol::schema::messages()
        .into_iter()
        .find(|(name, _)| *name == stem)
        .unwrap_or_else(|| panic!("no message schema `{stem}`"))
        .1
}

fn to_json(value: &impl Serialize) -> Value {
    serde_json::to_value(value).expect("a message serializes to JSON")
}

fn node_id() -> NodeId {
    NodeId::new("exec-1").expect("a valid node id")
}

/// A record that has been through every step: placed, started, finished, with every optional
/// field set.
fn finished_record() -> JobRecord {
    let spec: JobSpec = serde_json::from_value(json!({
        "argv": ["/bin/echo", "hi"], "env": {"A": "1"}, "cwd": "/tmp", "stdin": "payload",
        "timeout": 1.5, "labels": {"zone": "eu"}, "name": "n", "metadata": {"k": "v"},
        "idempotency_key": "order-1"
    }))
    .expect("a valid spec");
    let mut record = JobRecord::new(JobId::generate(), spec, Timestamp::from_millis(1_000))
        .assigned(node_id(), Timestamp::from_millis(2_000))
        .started(InstanceId::generate(), Timestamp::from_millis(3_000));
    record.submission_seq = Some(7);
    record.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
    record.cancel_requested_at = Some(Timestamp::from_millis(3_500));
    record.submitted_by = Some(capstan_protocol::SubmittedBy {
        principal: "alice".into(),
        via: capstan_protocol::AuthMethod::Token,
        token: Some("ci".into()),
    });
    record.finished(
        &Outcome {
            status: JobStatus::Failed,
            exit_code: Some(2),
            signal: Some(9),
            error: Some("killed".into()),
            output: OutputSummary {
                stdout_bytes: 3,
                stderr_bytes: 1,
                truncated: true,
            },
        },
        Timestamp::from_millis(4_000),
    )
}

/// A node record as the registry writes it, built from JSON so that fields added later with a
/// default do not break this test.
fn node_record() -> NodeRecord {
    serde_json::from_value(json!({
        "id": "exec-1", "instance": InstanceId::generate().to_string(),
        "labels": {"zone": "eu"}, "capacity": 8, "version": capstan_protocol::VERSION,
        "hostname": "host-1", "status": "up", "registered_at": "2024-01-01T00:00:00.000Z",
        "last_heartbeat_at": "2024-01-01T00:00:01.000Z", "jobs": [JobId::generate().to_string()],
        "queued": 1,
        "finished": {"succeeded": 1, "last_job": JobId::generate().to_string(),
                     "last_finished_at": "2024-01-01T00:00:01.000Z"}
    }))
    .expect("a valid node record")
}

/// An audit record with every field set.
fn full_audit_record() -> capstan_protocol::AuditRecord {
    let mut record = capstan_protocol::AuditRecord::new(
        capstan_protocol::AuditAction::JobSubmit,
        capstan_protocol::AuditOutcome::Success,
    );
    record.principal = Some("alice".into());
    record.via = Some(capstan_protocol::AuthMethod::Token);
    record.token = Some("ci".into());
    record.resource = Some(format!("job/{}", JobId::generate()));
    record.status = Some(202);
    record.client = Some("127.0.0.1".into());
    record.request_id = Some(capstan_protocol::AuditId::generate().to_string());
    record.trace_id = Some("0af7651916cd43dd8448eb211c80319c".into());
    record.detail = Some("a detail".into());
    record
}

fn error_reply<T>() -> Reply<T> {
    Reply::Error(ServiceError {
        code: ErrorCode::NotFound,
        message: "no such node".into(),
        field: Some("node".into()),
    })
}

/// Messages as Capstan writes them, by schema file stem: at least one for every stem.
fn samples() -> Vec<(&'static str, Value)> {
    let fresh = JobRecord::new(
        JobId::generate(),
        JobSpec::shell("echo hi"),
        Timestamp::now(),
    );
    let record = finished_record();
    let retried: JobSpec = serde_json::from_value(json!({
        "command": "make test", "delay": 1.5,
        "retry": {"max_attempts": 4, "backoff": {"initial": 2, "multiplier": 3, "max": 60},
                  "jitter": 0.1, "retry_on": ["failed", "lost"]}
    }))
    .expect("a valid spec");
    let retrying = JobRecord::new(JobId::generate(), retried.clone(), Timestamp::now())
        .assigned(node_id(), Timestamp::now())
        .started(InstanceId::generate(), Timestamp::now())
        .settled(
            &Outcome {
                status: JobStatus::Failed,
                exit_code: Some(2),
                signal: None,
                error: None,
                output: OutputSummary::default(),
            },
            Timestamp::now(),
            0.5,
        );
    assert_eq!(retrying.status, JobStatus::Retrying);
    let mut samples = vec![
        ("job-spec", to_json(&JobSpec::shell("echo hi"))),
        ("job-spec", to_json(&retried)),
        ("job-record", to_json(&retrying)),
        (
            "job-event",
            to_json(&JobEvent::new(JobEventKind::Retrying, &retrying)),
        ),
        ("job-spec", to_json(&record.spec)),
        ("job-record", to_json(&fresh)),
        ("job-record", to_json(&record)),
        (
            "dispatch",
            to_json(&Dispatch {
                record: fresh.assigned(node_id(), Timestamp::now()),
                revision: 3,
            }),
        ),
        (
            "cancel-notice",
            to_json(&CancelNotice {
                job: record.id,
                attempt: 1,
            }),
        ),
        (
            "rejection",
            to_json(&Rejection {
                subject: capstan_protocol::subjects::SUBMIT.into(),
                code: RejectionCode::Invalid,
                field: Some("timeout".into()),
                reason: "timeout: must be a positive number of seconds, got -1".into(),
                job: Some(record.id),
                size: 42,
                stream_seq: Some(9),
                at: Timestamp::now(),
            }),
        ),
        (
            "rejection",
            to_json(&Rejection {
                subject: capstan_protocol::subjects::SUBMIT.into(),
                code: RejectionCode::Malformed,
                field: None,
                reason: "malformed JSON".into(),
                job: None,
                size: 3,
                stream_seq: None,
                at: Timestamp::now(),
            }),
        ),
        ("node-record", to_json(&node_record())),
        (
            "node-event",
            to_json(&NodeEvent {
                kind: NodeEventKind::Down,
                at: Timestamp::now(),
                node: node_record(),
            }),
        ),
        (
            "registration",
            to_json(&Registration {
                node: node_id(),
                instance: InstanceId::generate(),
                labels: [("zone".to_owned(), "eu".to_owned())].into(),
                capacity: 8,
                version: capstan_protocol::VERSION.into(),
                hostname: "host-1".into(),
            }),
        ),
        (
            "heartbeat",
            to_json(&Heartbeat {
                node: node_id(),
                instance: InstanceId::generate(),
                jobs: vec![record.id],
                queued: 2,
                finished: {
                    let mut finished = capstan_protocol::NodeTally::default();
                    finished.count(
                        record.id,
                        capstan_protocol::JobStatus::Succeeded,
                        record.created_at,
                    );
                    finished
                },
            }),
        ),
        ("node-query", to_json(&NodeQuery { node: node_id() })),
        ("cancel-request", to_json(&JobRef { id: record.id })),
        (
            "create-reply",
            to_json(&Reply::Ok(Created {
                id: record.id,
                duplicate: false,
            })),
        ),
        ("create-reply", to_json(&error_reply::<Created>())),
        (
            "cancel-reply",
            to_json(&Reply::Ok(Cancelled {
                outcome: CancelOutcome::Requested,
                status: JobStatus::Running,
            })),
        ),
        (
            "heartbeat-reply",
            to_json(&Reply::Ok(HeartbeatReply::Superseded)),
        ),
        ("heartbeat-reply", to_json(&error_reply::<HeartbeatReply>())),
        ("node-reply", to_json(&Reply::Ok(node_record()))),
        ("node-list-reply", to_json(&Reply::Ok(vec![node_record()]))),
        (
            "node-list-reply",
            to_json(&error_reply::<Vec<NodeRecord>>()),
        ),
        ("executor-jobs-reply", to_json(&Reply::Ok(vec![record.id]))),
        (
            "node-command",
            to_json(&capstan_protocol::NodeCommand {
                node: node_id(),
                deadline_secs: Some(60),
            }),
        ),
        (
            "timer",
            to_json(&capstan_protocol::Timer {
                job: record.id,
                attempt: 1,
                at: Timestamp::now(),
            }),
        ),
        (
            "audit-record",
            to_json(&capstan_protocol::AuditRecord::new(
                capstan_protocol::AuditAction::AuthLogin,
                capstan_protocol::AuditOutcome::Failure,
            )),
        ),
        ("audit-record", to_json(&full_audit_record())),
        (
            "revocation",
            to_json(&capstan_protocol::Revocation {
                at: Timestamp::now(),
                reason: "auth.logout".into(),
            }),
        ),
    ];
    for kind in JobEventKind::ALL {
        samples.push(("job-event", to_json(&JobEvent::new(kind, &record))));
    }
    samples.extend(system_samples());
    samples.extend(fanout_samples());
    samples.extend(workflow_samples());
    samples
}

/// A workflow as created, one carried to its end through a failure, and the events of both.
fn workflow_samples() -> Vec<(&'static str, Value)> {
    use capstan_protocol::workflow::{WorkflowEvent, WorkflowRecord, WorkflowSpec};
    use capstan_protocol::{JobId, JobStatus, SubmittedBy, Timestamp};
    let spec: WorkflowSpec = serde_json::from_value(json!({
        "name": "release",
        "fail_fast": true,
        "steps": [
            {"name": "build", "job": {"command": "make"}},
            {"name": "test", "job": {"argv": ["make", "test"]}, "depends_on": ["build"]},
            {"name": "clean-up", "job": {"command": "make clean"}, "depends_on": ["test"],
             "when": "always"},
        ],
    }))
    .expect("a valid workflow");
    let now = Timestamp::now();
    let mut created = WorkflowRecord::new(JobId::generate(), spec, now);
    created.submitted_by = Some(SubmittedBy::nats());
    created.traceparent =
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned());
    let mut ended = created.clone();
    ended.advance(now, JobId::generate);
    let started = ended.clone();
    let build = ended.steps[0].job.expect("build runs");
    ended.observe(
        build,
        JobStatus::Succeeded,
        Some(0),
        Some("version=1.2.3\n"),
        now,
    );
    ended.advance(now, JobId::generate);
    let test = ended.steps[1].job.expect("test runs");
    ended.observe(test, JobStatus::Failed, Some(2), Some(""), now);
    ended.never_accepted(&[], "unused", now);
    ended.advance(now, JobId::generate);
    let clean = ended.steps[2].job.expect("clean-up runs");
    ended.observe(clean, JobStatus::Succeeded, Some(0), None, now);
    ended.advance(now, JobId::generate);
    let mut samples = vec![
        ("workflow", to_json(&created)),
        ("workflow", to_json(&started)),
        ("workflow", to_json(&ended)),
    ];
    for event in WorkflowEvent::between(None, &started)
        .into_iter()
        .chain(WorkflowEvent::between(Some(&started), &ended))
    {
        samples.push(("workflow-event", to_json(&event)));
    }
    samples
}

/// A fan-out over systems as it starts, stepped once (its first targets submitted), and one
/// over nodes that ended partial, with their events.
fn fanout_samples() -> Vec<(&'static str, Value)> {
    use capstan_protocol::fanout::{ChildState, FanOutEvent, FanOutRecord, Target, TargetKind};
    use capstan_protocol::{JobId, JobSpec, JobStatus, SubmittedBy, Timestamp};
    let spec = |json: Value| -> JobSpec { serde_json::from_value(json).expect("a valid spec") };
    let now = Timestamp::now();
    let on_systems = spec(serde_json::json!({
        "command": "systemctl restart app",
        "systems": {"labels": {"role": "web"}},
        "max_parallel": 2,
        "fail_fast": true,
    }));
    let targets = ["web-1", "web-2", "web-3"]
        .map(|name| Target::waiting(name, TargetKind::System))
        .to_vec();
    let mut started = FanOutRecord::new(JobId::generate(), on_systems, targets, None, now);
    started.submitted_by = Some(SubmittedBy::nats());
    let stepped = started
        .step(false, now, JobId::generate)
        .next
        .expect("targets start");
    let on_nodes = spec(serde_json::json!({"argv": ["uptime"], "nodes": {}}));
    let targets = ["exec-1", "exec-2"]
        .map(|name| Target::waiting(name, TargetKind::Node))
        .to_vec();
    let mut ended = FanOutRecord::new(JobId::generate(), on_nodes, targets, Some(now), now);
    ended = ended
        .step(false, now, JobId::generate)
        .next
        .expect("targets start");
    let children: Vec<ChildState> = ended
        .targets
        .iter()
        .zip([JobStatus::Succeeded, JobStatus::Failed])
        .map(|(target, status)| ChildState {
            job: target.job.expect("started"),
            status,
            exit_code: Some(i32::from(status == JobStatus::Failed)),
        })
        .collect();
    ended.observe(&children);
    ended = ended
        .step(true, now, JobId::generate)
        .next
        .expect("it ends");
    vec![
        ("fanout", to_json(&started)),
        ("fanout", to_json(&stepped)),
        ("fanout", to_json(&ended)),
        ("fanout-event", to_json(&FanOutEvent::of(&started))),
        ("fanout-event", to_json(&FanOutEvent::of(&ended))),
    ]
}

/// A system by password, one by key with a passphrase, their status before and after a check,
/// a health change and the listing.
fn system_samples() -> Vec<(&'static str, Value)> {
    use capstan_protocol::system::{CheckLease, SystemAuth, SystemHealth, SystemSummary};
    use capstan_protocol::{SealedSecret, System, SystemEvent, SystemStatus};
    let sealed = SealedSecret::parse("sealed:v1:k1:QUJD").expect("sealed");
    let by_password = System {
        name: "web-1".into(),
        hostname: "10.0.0.5".into(),
        port: 22,
        username: "deploy".into(),
        auth: SystemAuth::Password {
            password: sealed.clone(),
        },
        host_key: Some("SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU".into()),
        trust_on_first_use: false,
        labels: [("role".to_owned(), "web".to_owned())].into(),
        active: true,
        created_at: Timestamp::now(),
        updated_at: Timestamp::now(),
        updated_by: "admin".into(),
    };
    let by_key = System {
        name: "db-1".into(),
        auth: SystemAuth::PrivateKey {
            private_key: sealed.clone(),
            passphrase: Some(sealed),
        },
        host_key: None,
        trust_on_first_use: true,
        ..by_password.clone()
    };
    let unknown = SystemStatus::unknown("db-1");
    let checked = SystemStatus {
        health: SystemHealth::Healthy,
        checked_at: Some(Timestamp::now()),
        rtt_ms: Some(38),
        error: None,
        checked_by: Some("gw-1".into()),
        checking: Some(CheckLease {
            node: "gw-1".into(),
            until: Timestamp::now(),
        }),
        pinned_host_key: Some(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsab".into(),
        ),
        pinned_at: Some(Timestamp::now()),
        ..unknown.clone()
    };
    let event = SystemEvent {
        system: "web-1".into(),
        health: SystemHealth::AuthFailed,
        previous: SystemHealth::Healthy,
        checked_at: Timestamp::now(),
        rtt_ms: None,
        error: Some("web-1: authentication as deploy refused".into()),
        node: "gw-1".into(),
    };
    let listing = capstan_protocol::Reply::Ok(vec![
        SystemSummary::of(&by_password, Some(&checked)),
        SystemSummary::of(&by_key, None),
    ]);
    vec![
        ("system", to_json(&by_password)),
        ("system", to_json(&by_key)),
        ("system-status", to_json(&unknown)),
        ("system-status", to_json(&checked)),
        ("system-event", to_json(&event)),
        ("system-list-reply", to_json(&listing)),
    ]
}

#[test]
fn every_message_schema_has_real_messages_to_be_checked_against() {
    let stems: BTreeSet<&str> = capstan_protocol::schema::messages()
        .into_iter()
        .map(|(stem, _)| stem)
        .collect();
    let sampled: BTreeSet<&str> = samples().into_iter().map(|(stem, _)| stem).collect();
    assert_eq!(
        stems, sampled,
        "give every message schema a sample in `samples()`, and no sample without a schema"
    );
}

#[test]
fn messages_as_capstan_serializes_them_match_their_schemas() {
    let mut failures = Vec::new();
    for (stem, message) in samples() {
        for error in validate(&schema(stem), &message) {
            failures.push(format!("{stem}: {error}\n    in {message}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn job_specs_match_the_schema_exactly_when_the_decoder_accepts_their_shape() {
    let spec_schema = schema("job-spec");
    let cases = [
        (json!({"command": "echo hi"}), true),
        (
            json!({"argv": ["ls", "-l"], "timeout": 1.5, "labels": {"zone": "eu"}}),
            true,
        ),
        (json!({"command": "x", "timeout": 2_592_000}), true),
        (json!({"command": "x", "bogus": 1}), false),
        (json!({"command": "x", "argv": ["y"]}), false),
        (json!({"name": "no program"}), false),
        (json!({"argv": []}), false),
        (json!({"command": "x", "timeout": -1}), false),
        (json!({"command": "x", "timeout": 0}), false),
        (json!({"command": "x", "timeout": 2_592_001}), false),
        (json!({"command": "x", "timeout": "soon"}), false),
        (json!({"command": "x", "env": {"A": 1}}), false),
        (json!(["echo", "hi"]), false),
    ];
    for (spec, valid) in cases {
        let errors = validate(&spec_schema, &spec);
        assert_eq!(errors.is_empty(), valid, "{spec}: {errors:?}");
        let bytes = serde_json::to_vec(&spec).expect("encodes");
        let decoded = codec::decode_spec(Encoding::Json, &bytes);
        assert_eq!(decoded.is_ok(), valid, "{spec}: {decoded:?}");
    }
}

#[test]
fn ids_and_times_match_the_schemas_exactly_when_the_decoder_accepts_them() {
    let request = schema("cancel-request");
    let job = JobId::generate().to_string();
    for (id, valid) in [
        (json!(job), true),
        (json!(job.to_lowercase()), true),
        (json!("not-a-ulid"), false),
        (json!("0123456789ABCDEFGHJKMNPQR"), false),
        (json!("0123456789ABCDEFGHJKMNPQR!"), false),
        (json!(42), false),
    ] {
        let message = json!({ "id": id });
        let errors = validate(&request, &message);
        assert_eq!(errors.is_empty(), valid, "{message}: {errors:?}");
        let decoded = serde_json::from_value::<JobRef>(message.clone());
        assert_eq!(decoded.is_ok(), valid, "{message}: {decoded:?}");
    }

    let query = schema("node-query");
    for (node, valid) in [("exec-1_a", true), ("a.b", false), ("", false)] {
        let message = json!({ "node": node });
        assert_eq!(validate(&query, &message).is_empty(), valid, "{message}");
        let decoded = serde_json::from_value::<NodeQuery>(message.clone());
        assert_eq!(decoded.is_ok(), valid, "{message}: {decoded:?}");
    }

    let rejection = schema("rejection");
    let mut message = to_json(&Rejection {
        subject: "s".into(),
        code: RejectionCode::TooLarge,
        field: None,
        reason: "r".into(),
        job: None,
        size: 1,
        stream_seq: None,
        at: Timestamp::now(),
    });
    message["at"] = json!(1_700_000_000_000_i64);
    assert!(
        !validate(&rejection, &message).is_empty(),
        "JSON carries times as text, never as milliseconds"
    );
    message["at"] = json!("yesterday");
    assert!(!validate(&rejection, &message).is_empty());
}

#[test]
fn every_keyword_of_the_schemas_is_one_the_checks_here_understand() {
    for (stem, schema) in capstan_protocol::schema::messages() {
        let mut unknown = Vec::new();
        keywords_known(&schema, "#", &mut unknown);
        assert!(
            unknown.is_empty(),
            "{stem}: teach `validate` these keywords: {unknown:?}"
        );
    }
}

// --- A small JSON Schema (draft 2020-12) validator for what schemars emits ---------------

const ANNOTATIONS: [&str; 6] = [
    "$schema",
    "$comment",
    "title",
    "description",
    "default",
    "examples",
];
const ASSERTIONS: [&str; 22] = [
    "$defs",
    "$ref",
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
    "pattern",
    "enum",
    "const",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "format",
    "oneOf",
    "anyOf",
    "allOf",
];
const FORMATS: [&str; 11] = [
    "date-time",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "uint",
    "int8",
    "int16",
    "int32",
    "int64",
    "double",
];

/// Collects, under `at`, the keywords and formats `validate` does not know.
fn keywords_known(schema: &Value, at: &str, unknown: &mut Vec<String>) {
    let Some(object) = schema.as_object() else {
        return;
    };
    for (keyword, value) in object {
        let here = format!("{at}/{keyword}");
        match keyword.as_str() {
            "properties" | "$defs" => {
                for (name, subschema) in value.as_object().into_iter().flatten() {
                    keywords_known(subschema, &format!("{here}/{name}"), unknown);
                }
            }
            "items" | "additionalProperties" => keywords_known(value, &here, unknown),
            "oneOf" | "anyOf" | "allOf" => {
                for (index, subschema) in value.as_array().into_iter().flatten().enumerate() {
                    keywords_known(subschema, &format!("{here}/{index}"), unknown);
                }
            }
            "format" if !FORMATS.contains(&value.as_str().unwrap_or("")) => {
                unknown.push(format!("{here} = {value}"));
            }
            keyword if ANNOTATIONS.contains(&keyword) || ASSERTIONS.contains(&keyword) => {}
            _ => unknown.push(here),
        }
    }
}

/// Why `instance` does not match the root schema `root` (empty when it does).
fn validate(root: &Value, instance: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    check(root, root, instance, "", &mut errors);
    errors
}

fn type_matches(name: &str, instance: &Value) -> bool {
    match name {
        "null" => instance.is_null(),
        "boolean" => instance.is_boolean(),
        "object" => instance.is_object(),
        "array" => instance.is_array(),
        "string" => instance.is_string(),
        "number" => instance.is_number(),
        "integer" => {
            instance.is_i64()
                || instance.is_u64()
                || instance.as_f64().is_some_and(|n| n.fract() == 0.0)
        }
        other => panic!("unknown type `{other}`"),
    }
}

fn format_matches(format: &str, instance: &Value) -> bool {
    let integer_in = |min: i128, max: i128| {
        let n = instance
            .as_i64()
            .map(i128::from)
            .or(instance.as_u64().map(i128::from));
        n.is_none_or(|n| (min..=max).contains(&n))
    };
    match (format, instance) {
        ("date-time", Value::String(text)) => Timestamp::parse_rfc3339(text).is_ok(),
        ("uint8", _) => integer_in(0, u8::MAX.into()),
        ("uint16", _) => integer_in(0, u16::MAX.into()),
        ("uint32", _) => integer_in(0, u32::MAX.into()),
        ("uint64" | "uint", _) => integer_in(0, u64::MAX.into()),
        ("int8", _) => integer_in(i8::MIN.into(), i8::MAX.into()),
        ("int16", _) => integer_in(i16::MIN.into(), i16::MAX.into()),
        ("int32", _) => integer_in(i32::MIN.into(), i32::MAX.into()),
        ("int64", _) => integer_in(i64::MIN.into(), i64::MAX.into()),
        // Formats only constrain values of their type; `double` is any number.
        _ => true,
    }
}

fn check(root: &Value, schema: &Value, instance: &Value, at: &str, errors: &mut Vec<String>) {
    let object = match schema {
        Value::Bool(true) => return,
        Value::Bool(false) => return errors.push(format!("{at}: nothing is allowed here")),
        Value::Object(object) => object,
        other => panic!("not a schema: {other}"),
    };
    let number = instance.as_f64();
    let mut fail = |message: String| errors.push(format!("{at}: {message}"));
    let mut nested = Vec::new();
    for (keyword, value) in object {
        let keyword = keyword.as_str();
        match keyword {
            _ if ANNOTATIONS.contains(&keyword) || keyword == "$defs" => {}
            "$ref" => {
                let name = value
                    .as_str()
                    .and_then(|reference| reference.strip_prefix("#/$defs/"))
                    .unwrap_or_else(|| panic!("unsupported $ref {value}"));
                let target = &root["$defs"][name];
                assert!(!target.is_null(), "dangling $ref {value}");
                check(root, target, instance, at, &mut nested);
            }
            "type" => {
                let names: Vec<&str> = match value {
                    Value::String(name) => vec![name],
                    Value::Array(names) => names.iter().filter_map(Value::as_str).collect(),
                    other => panic!("bad type {other}"),
                };
                if !names.iter().any(|name| type_matches(name, instance)) {
                    fail(format!("{instance} is not of type {value}"));
                }
            }
            "properties" => {
                if let Value::Object(fields) = instance {
                    for (name, subschema) in value.as_object().into_iter().flatten() {
                        if let Some(field) = fields.get(name) {
                            check(root, subschema, field, &format!("{at}/{name}"), &mut nested);
                        }
                    }
                }
            }
            "required" => {
                if let Value::Object(fields) = instance {
                    for name in value.as_array().into_iter().flatten() {
                        let name = name.as_str().unwrap_or_default();
                        if !fields.contains_key(name) {
                            fail(format!("missing required `{name}`"));
                        }
                    }
                }
            }
            "additionalProperties" => {
                if let Value::Object(fields) = instance {
                    let declared = object.get("properties").and_then(Value::as_object);
                    for (name, field) in fields {
                        if declared.is_none_or(|declared| !declared.contains_key(name)) {
                            check(root, value, field, &format!("{at}/{name}"), &mut nested);
                        }
                    }
                }
            }
            "items" => {
                for (index, item) in instance.as_array().into_iter().flatten().enumerate() {
                    check(root, value, item, &format!("{at}/{index}"), &mut nested);
                }
            }
            "minItems" | "maxItems" => {
                if let (Some(items), Some(limit)) = (instance.as_array(), value.as_u64()) {
                    let count = items.len() as u64;
                    if (keyword == "minItems" && count < limit)
                        || (keyword == "maxItems" && count > limit)
                    {
                        fail(format!("{count} items breaks {keyword} {limit}"));
                    }
                }
            }
            "minLength" | "maxLength" => {
                if let (Some(text), Some(limit)) = (instance.as_str(), value.as_u64()) {
                    let count = text.chars().count() as u64;
                    if (keyword == "minLength" && count < limit)
                        || (keyword == "maxLength" && count > limit)
                    {
                        fail(format!("{count} characters breaks {keyword} {limit}"));
                    }
                }
            }
            "pattern" => {
                if let Some(text) = instance.as_str() {
                    let pattern = value.as_str().expect("a pattern is a string");
                    let regex = regex::Regex::new(pattern).expect("a valid pattern");
                    if !regex.is_match(text) {
                        fail(format!("{instance} does not match {pattern}"));
                    }
                }
            }
            "enum" => {
                if !value
                    .as_array()
                    .is_some_and(|values| values.contains(instance))
                {
                    fail(format!("{instance} is not one of {value}"));
                }
            }
            "const" => {
                if value != instance {
                    fail(format!("{instance} is not {value}"));
                }
            }
            "minimum" | "maximum" | "exclusiveMinimum" | "exclusiveMaximum" => {
                if let (Some(n), Some(limit)) = (number, value.as_f64()) {
                    let ok = match keyword {
                        "minimum" => n >= limit,
                        "maximum" => n <= limit,
                        "exclusiveMinimum" => n > limit,
                        _ => n < limit,
                    };
                    if !ok {
                        fail(format!("{n} breaks {keyword} {limit}"));
                    }
                }
            }
            "format" => {
                let format = value.as_str().expect("a format is a string");
                if !format_matches(format, instance) {
                    fail(format!("{instance} is not a {format}"));
                }
            }
            "oneOf" | "anyOf" | "allOf" => {
                let matching = value
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|subschema| {
                        let mut sub_errors = Vec::new();
                        check(root, subschema, instance, at, &mut sub_errors);
                        sub_errors.is_empty()
                    })
                    .count();
                let total = value.as_array().map_or(0, Vec::len);
                let ok = match keyword {
                    "oneOf" => matching == 1,
                    "anyOf" => matching >= 1,
                    _ => matching == total,
                };
                if !ok {
                    fail(format!("matches {matching} of the {total} in {keyword}"));
                }
            }
            other => panic!("the checks here do not know the keyword `{other}`"),
        }
    }
    errors.append(&mut nested);
}
