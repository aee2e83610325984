//! JSON Schemas of the messages a person or a foreign client can see on NATS: what is published
//! on each subject of ARCHITECTURE.md's table, the requests and replies of the request/reply
//! endpoints, and the values of the KV buckets (only with the `schema` feature).
//!
//! [`messages`] is the list behind the files under `schemas/nats/` (written by
//! `cargo xtask schemas`, compared with the code by the end-to-end tests). The message types
//! derive their schemas, so serde's attributes (renames, tags, skipped and defaulted fields,
//! `deny_unknown_fields`) are honoured; the types with hand-written serde impls (ids,
//! [`Timestamp`]) describe their wire form here.
//!
//! Each schema describes the message's JSON form. Between services the same messages travel as
//! MessagePack with the same field names; there, and only there, a timestamp is an integer
//! number of milliseconds since the Unix epoch instead of RFC 3339 text. Messages Capstan reads
//! from outside (job specs, requests) are described as it reads them: defaulted fields are
//! optional, unknown fields are refused where the decoder refuses them. Messages it writes
//! (records, events, replies) are described as it writes them: fields always written are
//! required.
//!
//! Left out: the idempotency bucket's entries (`capstan-mesh` owns that type) and the raw
//! bytes of `capstan.logs.<job>.<node>`, which are not JSON.

use std::borrow::Cow;

use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde_json::Value;

use crate::auth::{AuditRecord, Revocation};
use crate::dispatch::Dispatch;
use crate::event::{JobEvent, NodeEvent, Rejection};
use crate::fanout::{FanOutEvent, FanOutRecord};
use crate::ids::{AuditId, InstanceId, JobId, NodeId};
use crate::job::JobRecord;
use crate::node::{Heartbeat, HeartbeatReply, NodeCommand, NodeQuery, NodeRecord, Registration};
use crate::reply::{CancelNotice, Cancelled, Created, JobRef, Reply};
use crate::spec::JobSpec;
use crate::subjects;
use crate::system::{System, SystemEvent, SystemStatus, SystemSummary};
use crate::timer::Timer;
use crate::timestamp::Timestamp;

/// Every public message's schema, keyed by its file stem (`job-spec` for
/// `schemas/nats/job-spec.json`), in a fixed order. Each schema is a draft 2020-12 root schema
/// whose `$comment` names the subjects or bucket carrying the message.
pub fn messages() -> Vec<(&'static str, Value)> {
    let registry = subjects::registry::GROUP;
    vec![
        read::<JobSpec>(
            "job-spec",
            format!(
                "{}, {} and {} (stored submissions); request of {}",
                subjects::SUBMIT,
                subjects::SUBMIT_JOB_ALL,
                subjects::PLACE_ALL,
                subjects::CREATE
            ),
        ),
        written::<Reply<Created>>("create-reply", format!("reply of {}", subjects::CREATE)),
        read::<JobRef>("cancel-request", format!("request of {}", subjects::CANCEL)),
        written::<Reply<Cancelled>>("cancel-reply", format!("reply of {}", subjects::CANCEL)),
        written::<JobRecord>(
            "job-record",
            "$KV.capstan_jobs.<job> (bucket capstan_jobs)".into(),
        ),
        written::<JobEvent>("job-event", "capstan.events.jobs.<job>.<kind>".into()),
        written::<Dispatch>("dispatch", "capstan.dispatch.<node>".into()),
        written::<CancelNotice>("cancel-notice", "capstan.control.<node>.cancel".into()),
        written::<Rejection>("rejection", "capstan.events.rejected.<origin>".into()),
        written::<NodeRecord>(
            "node-record",
            "$KV.capstan_nodes.<node> (bucket capstan_nodes)".into(),
        ),
        written::<NodeEvent>("node-event", "capstan.events.nodes.<node>.<kind>".into()),
        read::<Registration>(
            "registration",
            format!(
                "request of {}",
                subjects::registry::NodeCall::Register.subject_all()
            ),
        ),
        read::<Heartbeat>(
            "heartbeat",
            format!(
                "request of {} and {}",
                subjects::registry::NodeCall::Heartbeat.subject_all(),
                subjects::registry::NodeCall::Deregister.subject_all()
            ),
        ),
        written::<Reply<HeartbeatReply>>(
            "heartbeat-reply",
            format!(
                "reply of {}",
                subjects::registry::NodeCall::Heartbeat.subject_all()
            ),
        ),
        read::<NodeQuery>(
            "node-query",
            format!("request of {}", subjects::registry::NODES_GET),
        ),
        written::<Reply<NodeRecord>>(
            "node-reply",
            format!(
                "reply of {registry}.register.*, {registry}.deregister.* and {registry}.nodes.get"
            ),
        ),
        written::<Reply<Vec<NodeRecord>>>(
            "node-list-reply",
            format!("reply of {}", subjects::registry::NODES_LIST),
        ),
        written::<Reply<Vec<JobId>>>(
            "executor-jobs-reply",
            "reply of capstan.executor.<node>.jobs".into(),
        ),
        read::<NodeCommand>(
            "node-command",
            format!(
                "request of {registry}.nodes.cordon, {registry}.nodes.uncordon and {registry}.nodes.drain"
            ),
        ),
        written::<Timer>(
            "timer",
            "capstan.timers.set.<job> (scheduled) and capstan.timers.due.<job> (fired)".into(),
        ),
        written::<AuditRecord>("audit-record", "capstan.audit.<area>.<action>".into()),
        written::<Revocation>(
            "revocation",
            "$KV.capstan_revocations.<kind>_<id> (bucket capstan_revocations)".into(),
        ),
        written::<System>(
            "system",
            "$KV.capstan_systems.<name> (bucket capstan_systems)".into(),
        ),
        written::<SystemStatus>(
            "system-status",
            "$KV.capstan_system_status.<name> (bucket capstan_system_status)".into(),
        ),
        written::<SystemEvent>(
            "system-event",
            "capstan.events.systems.<name>.<health>".into(),
        ),
        written::<FanOutRecord>(
            "fanout",
            "$KV.capstan_fanouts.<job> (bucket capstan_fanouts)".into(),
        ),
        written::<FanOutEvent>(
            "fanout-event",
            "capstan.events.fanouts.<job>.<status>".into(),
        ),
        written::<crate::workflow::WorkflowRecord>(
            "workflow",
            "$KV.capstan_workflows.<id> (bucket capstan_workflows)".into(),
        ),
        written::<crate::workflow::WorkflowEvent>(
            "workflow-event",
            "capstan.events.workflows.<id>.<status> and capstan.events.workflows.<id>.steps.<step>.<status>".into(),
        ),
        written::<Reply<Vec<SystemSummary>>>(
            "system-list-reply",
            format!("reply of {}", subjects::SYSTEMS_LIST),
        ),
    ]
}

/// A message Capstan reads: described as its decoder accepts it.
fn read<T: JsonSchema>(stem: &'static str, carried_by: String) -> (&'static str, Value) {
    (
        stem,
        root::<T>(SchemaSettings::draft2020_12().for_deserialize(), carried_by),
    )
}

/// A message Capstan writes: described as its encoder writes it.
fn written<T: JsonSchema>(stem: &'static str, carried_by: String) -> (&'static str, Value) {
    (
        stem,
        root::<T>(SchemaSettings::draft2020_12().for_serialize(), carried_by),
    )
}

fn root<T: JsonSchema>(settings: SchemaSettings, carried_by: String) -> Value {
    let mut schema = settings.into_generator().into_root_schema_for::<T>();
    schema.insert(
        "$comment".into(),
        format!("Carried by: {carried_by}").into(),
    );
    schema.to_value()
}

/// A ULID as on the wire: 26 characters of Crockford base32. Capstan writes upper case with a
/// first character of 0 to 7; its decoder also takes lower case and any first character.
fn ulid_schema(description: &str) -> Schema {
    json_schema!({
        "type": "string",
        "pattern": "^[0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{26}$",
        "description": description,
    })
}

impl JsonSchema for JobId {
    fn schema_name() -> Cow<'static, str> {
        "JobId".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        ulid_schema("A job's id: a ULID (26 characters of Crockford base32).")
    }
}

impl JsonSchema for InstanceId {
    fn schema_name() -> Cow<'static, str> {
        "InstanceId".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        ulid_schema("One start of an executor process: a ULID (26 characters of Crockford base32).")
    }
}

impl JsonSchema for AuditId {
    fn schema_name() -> Cow<'static, str> {
        "AuditId".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        ulid_schema("An audit record's id: a ULID (26 characters of Crockford base32).")
    }
}

impl JsonSchema for NodeId {
    fn schema_name() -> Cow<'static, str> {
        "NodeId".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": format!("^[A-Za-z0-9_-]{{1,{}}}$", NodeId::MAX_LEN),
            "description": format!(
                "An executor node's name, stable across restarts: 1 to {} characters from \
                 A-Z, a-z, 0-9, `_` and `-`.",
                NodeId::MAX_LEN
            ),
        })
    }
}

impl JsonSchema for Timestamp {
    fn schema_name() -> Cow<'static, str> {
        "Timestamp".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "format": "date-time",
            "description": "An instant as RFC 3339 text, written in UTC with millisecond \
                precision (`2023-11-14T22:13:20.123Z`); any offset is read. In MessagePack \
                bodies the same instant is an integer: milliseconds since the Unix epoch.",
        })
    }
}
