//! Publishing job, node and system events and rejections to the events stream, and audit records
//! to the audit stream.
//!
//! Job events are published after the KV write they describe, with a deduplication id, so a
//! writer that crashed between the write and the publish can publish again on redelivery
//! without doubling the event. Every publish carries the current span's trace context.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage};
use bytes::Bytes;
use capstan_protocol::codec;
use capstan_protocol::subjects::{self, Origin};
use capstan_protocol::{
    AuditAction, AuditId, AuditOutcome, AuditRecord, FanOutEvent, JobEvent, JobId, NodeEvent,
    Rejection, SubmittedBy, SystemEvent, Timestamp, headers,
};

use crate::error::Error;
use crate::wire::{header_text, msgpack_headers};

/// Publishes events.
#[derive(Clone, Debug)]
pub struct EventPublisher {
    js: jetstream::Context,
}

impl EventPublisher {
    /// A publisher on `js`.
    pub fn new(js: jetstream::Context) -> Self {
        Self { js }
    }

    /// Publishes a job event and waits until the stream has stored it.
    pub async fn job(&self, event: &JobEvent) -> Result<(), Error> {
        let started = std::time::Instant::now();
        self.job_deferred(event)
            .await?
            .await
            .map_err(|e| Error::unavailable("event publish", e))?;
        crate::metrics::mesh().request("event publish", started);
        Ok(())
    }

    /// Sends a job event and returns the future of the stream's acknowledgement, so several
    /// publishes can be in flight at once.
    pub async fn job_deferred(&self, event: &JobEvent) -> Result<PublishAckFuture, Error> {
        let record = &event.record;
        let mut map = msgpack_headers();
        map.insert(headers::EVENT, event.kind.as_str());
        map.insert(headers::STATUS, record.status.as_str());
        map.insert(headers::ATTEMPT, record.attempt.to_string().as_str());
        if let Some(node) = &record.node {
            map.insert(headers::NODE, node.as_str());
        }
        if let Some(parent) = record
            .spec
            .metadata
            .get(capstan_protocol::fanout::PARENT_KEY)
        {
            map.insert(headers::FANOUT, header_text(parent).as_str());
        }
        if let Some(workflow) = record
            .spec
            .metadata
            .get(capstan_protocol::workflow::WORKFLOW_KEY)
        {
            map.insert(headers::WORKFLOW, header_text(workflow).as_str());
        }
        if let Some(schedule) = capstan_protocol::schedule::schedule_of(&record.spec.metadata) {
            map.insert(headers::SCHEDULE_NAME, header_text(schedule).as_str());
        }
        if let Some(concurrency) = &record.spec.concurrency {
            map.insert(headers::CONCURRENCY_KEY, concurrency.key.as_str());
        }
        if let Some(code) = record.exit_code {
            map.insert(headers::EXIT_CODE, code.to_string().as_str());
        }
        if let Some(signal) = record.signal {
            map.insert(headers::SIGNAL, signal.to_string().as_str());
        }
        if let (Some(started), Some(finished)) = (record.started_at, record.finished_at) {
            let millis = finished.since(started).as_millis().to_string();
            map.insert(headers::DURATION_MS, millis.as_str());
        }
        if let Some(error) = &record.error {
            map.insert(headers::ERROR, header_text(error).as_str());
        }
        capstan_telemetry::propagation::inject(&mut map);
        let payload = Bytes::from(codec::to_msgpack(event)?);
        let publish = PublishMessage::build()
            .payload(payload)
            .headers(map)
            .message_id(event.message_id());
        self.js
            .send_publish(subjects::job_event(record.id, event.kind), publish)
            .await
            .map_err(|e| Error::unavailable("event publish", e))
    }

    /// Publishes a node event and waits until it is stored.
    pub async fn node(&self, event: &NodeEvent) -> Result<(), Error> {
        let mut map = msgpack_headers();
        map.insert(headers::EVENT, event.kind.as_str());
        map.insert(headers::NODE, event.node.id.as_str());
        map.insert(headers::STATUS, event.node.status.as_str());
        capstan_telemetry::propagation::inject(&mut map);
        let payload = Bytes::from(codec::to_msgpack(event)?);
        let subject = subjects::node_event(&event.node.id, event.kind);
        self.publish_stored(subject, map, payload, "node event")
            .await
    }

    /// Publishes a fan-out parent's start or end and waits until it is stored.
    pub async fn fanout(&self, event: &FanOutEvent) -> Result<(), Error> {
        let mut map = msgpack_headers();
        map.insert(headers::EVENT, event.status.as_str());
        map.insert(headers::STATUS, event.status.as_str());
        map.insert(headers::MSG_ID, event.message_id().as_str());
        capstan_telemetry::propagation::inject(&mut map);
        let payload = Bytes::from(codec::to_msgpack(event)?);
        let subject = subjects::fanout_event(event.job, event.status);
        self.publish_stored(subject, map, payload, "fan-out event")
            .await
    }

    /// Publishes a workflow's or a step's start or end and waits until it is stored.
    pub async fn workflow(
        &self,
        event: &capstan_protocol::workflow::WorkflowEvent,
    ) -> Result<(), Error> {
        let mut map = msgpack_headers();
        map.insert(headers::STATUS, event.status.as_str());
        map.insert(headers::MSG_ID, event.message_id().as_str());
        let subject = match &event.step {
            Some(step) => {
                map.insert(headers::EVENT, step.status.as_str());
                if let Some(job) = step.job {
                    map.insert(headers::JOB_ID, job.to_string().as_str());
                }
                if let Some(code) = step.exit_code {
                    map.insert(headers::EXIT_CODE, code.to_string().as_str());
                }
                subjects::workflow_step_event(event.workflow, &step.name, step.status)
            }
            None => {
                map.insert(headers::EVENT, event.status.as_str());
                subjects::workflow_event(event.workflow, event.status)
            }
        };
        capstan_telemetry::propagation::inject(&mut map);
        let payload = Bytes::from(codec::to_msgpack(event)?);
        self.publish_stored(subject, map, payload, "workflow event")
            .await
    }

    /// Publishes what a schedule's tick did and waits until it is stored.
    pub async fn schedule(
        &self,
        event: &capstan_protocol::schedule::ScheduleEvent,
    ) -> Result<(), Error> {
        let mut map = msgpack_headers();
        map.insert(headers::EVENT, event.outcome.as_str());
        map.insert(headers::MSG_ID, event.message_id().as_str());
        capstan_telemetry::propagation::inject(&mut map);
        let payload = Bytes::from(codec::to_msgpack(event)?);
        let subject = subjects::schedule_event(&event.schedule, event.outcome);
        self.publish_stored(subject, map, payload, "schedule event")
            .await
    }

    /// Publishes a system's health change and waits until it is stored.
    pub async fn system(&self, event: &SystemEvent) -> Result<(), Error> {
        let mut map = msgpack_headers();
        map.insert(headers::EVENT, event.health.as_str());
        map.insert(headers::STATUS, event.health.as_str());
        capstan_telemetry::propagation::inject(&mut map);
        let payload = Bytes::from(codec::to_msgpack(event)?);
        let subject = subjects::system_event(&event.system, event.health);
        self.publish_stored(subject, map, payload, "system event")
            .await
    }

    /// Decodes a message consumed from a stream, or rejects it (see
    /// [`EventPublisher::reject_stored`]) and returns `None` when it does not decode.
    pub async fn decode_stored<T: serde::de::DeserializeOwned>(
        &self,
        origin: Origin,
        message: &async_nats::jetstream::Message,
    ) -> Option<T> {
        match crate::wire::decode(message.headers.as_ref(), &message.payload) {
            Ok((value, _)) => Some(value),
            Err(error) => {
                let reason = error.to_string();
                self.reject_stored(origin, message, None, error.code, error.field, reason)
                    .await;
                None
            }
        }
    }

    /// Rejects a message consumed from a stream: publishes why (see
    /// [`EventPublisher::rejection`]) and terminates it, so it is never delivered again.
    pub async fn reject_stored(
        &self,
        origin: Origin,
        message: &async_nats::jetstream::Message,
        job: Option<capstan_protocol::JobId>,
        code: capstan_protocol::RejectionCode,
        field: Option<String>,
        reason: impl Into<String>,
    ) {
        let seq = message.info().ok().map(|info| info.stream_sequence);
        let rejection = Rejection::new(
            message.subject.as_str(),
            message.payload.len(),
            code,
            field,
            reason,
        )
        .of_job(job)
        .at_seq(seq);
        self.rejection(origin, &rejection).await;
        if let Err(error) = message.ack_with(async_nats::jetstream::AckKind::Term).await {
            tracing::debug!(error = %error, "cannot terminate a rejected message");
        }
    }

    /// Rejects a job event from the events stream that could not be decoded (see
    /// [`EventPublisher::reject_stored`]), naming the job its subject names.
    pub async fn reject_job_event(
        &self,
        origin: Origin,
        message: &async_nats::jetstream::Message,
        error: &capstan_protocol::codec::DecodeError,
    ) {
        let job = capstan_protocol::subjects::parse_job_event(&message.subject).map(|(job, _)| job);
        self.reject_stored(
            origin,
            message,
            job,
            error.code,
            error.field.clone(),
            error.to_string(),
        )
        .await;
    }

    /// Publishes a rejection. Failing to report a rejection must not stop the consumer that
    /// rejected the message, so errors are logged, not returned.
    pub async fn rejection(&self, origin: Origin, rejection: &Rejection) {
        let mut map = msgpack_headers();
        let summary = match &rejection.field {
            Some(field) if !rejection.reason.starts_with(field.as_str()) => {
                format!("{field}: {}", rejection.reason)
            }
            _ => rejection.reason.clone(),
        };
        map.insert(headers::ERROR, header_text(&summary).as_str());
        map.insert(headers::EVENT, rejection.code.as_str());
        if let Some(job) = rejection.job {
            map.insert(headers::JOB_ID, job.to_string().as_str());
        }
        crate::metrics::mesh()
            .rejections
            .get_or_create(&[
                ("origin", origin.as_str().to_owned()),
                ("code", rejection.code.as_str().to_owned()),
            ])
            .inc();
        tracing::warn!(
            origin = origin.as_str(),
            subject = %rejection.subject,
            code = rejection.code.as_str(),
            reason = %summary,
            "rejected message"
        );
        let payload = match codec::to_msgpack(rejection) {
            Ok(payload) => Bytes::from(payload),
            Err(error) => {
                tracing::error!(error = %error, "cannot encode rejection");
                return;
            }
        };
        if let Err(error) = self
            .publish_stored(subjects::rejected(origin), map, payload, "rejection")
            .await
        {
            tracing::error!(error = %error, "cannot publish rejection");
        }
    }

    /// Publishes an audit record on `capstan.audit.<action>` and waits until the audit stream
    /// has stored it (its id is the deduplication id, so publishing it again is harmless).
    /// Unlike a rejection, a failure is returned: an action whose record cannot be stored must
    /// not be reported as done.
    pub async fn audit(&self, record: &AuditRecord) -> Result<(), Error> {
        self.audit_keyed(record, &record.id.to_string()).await
    }

    /// [`audit`](Self::audit) with `key` as the deduplication id instead of the record's: an
    /// action seen again, such as a redelivered submission, audited under the same key within
    /// the audit stream's deduplication window is stored once.
    pub async fn audit_keyed(&self, record: &AuditRecord, key: &str) -> Result<(), Error> {
        let mut map = msgpack_headers();
        map.insert(headers::EVENT, record.action.as_str());
        map.insert(headers::STATUS, record.outcome.as_str());
        capstan_telemetry::propagation::inject(&mut map);
        let payload = Bytes::from(codec::to_msgpack(record)?);
        let publish = PublishMessage::build()
            .payload(payload)
            .headers(map)
            .message_id(key);
        self.js
            .send_publish(subjects::audit(record.action), publish)
            .await
            .map_err(|e| Error::unavailable("audit publish", e))?
            .await
            .map_err(|e| Error::unavailable("audit publish", e))?;
        Ok(())
    }

    /// Records in the audit trail what a client identity `by` did to `job` over NATS (the API
    /// records what is done through it), and waits until the audit stream has stored it, so
    /// that an acknowledged submission or an answered request is on the trail. `key`, when
    /// given, is the record's id and deduplication id (see [`AuditKey`]). A failure is logged
    /// and returned.
    pub async fn audit_client(
        &self,
        action: AuditAction,
        by: &SubmittedBy,
        job: JobId,
        outcome: AuditOutcome,
        key: Option<AuditKey>,
    ) -> Result<(), Error> {
        let mut record = AuditRecord::new(action, outcome);
        record.principal = Some(by.principal.clone());
        record.via = Some(by.via);
        record.resource = Some(format!("job/{job}"));
        record.trace_id = capstan_telemetry::propagation::trace_id();
        let key = match key {
            Some(AuditKey { id, at, dedupe }) => {
                record.id = id;
                record.at = at;
                dedupe
            }
            None => record.id.to_string(),
        };
        let stored = self.audit_keyed(&record, &key).await;
        if let Err(error) = &stored {
            tracing::warn!(error = %error, action = record.action.as_str(), job = %job, "cannot record an audit record");
        }
        stored
    }

    async fn publish_stored(
        &self,
        subject: String,
        map: HeaderMap,
        payload: Bytes,
        op: &'static str,
    ) -> Result<(), Error> {
        let started = std::time::Instant::now();
        self.js
            .publish_with_headers(subject, map, payload)
            .await
            .map_err(|e| Error::unavailable(op, e))?
            .await
            .map_err(|e| Error::unavailable(op, e))?;
        crate::metrics::mesh().request(op, started);
        Ok(())
    }
}

/// How an action that may be audited more than once (a submission redelivered, or taken by
/// another service) is stored once: the deduplication id of its publish, which the audit
/// stream honours for its window (two minutes), and the record's id and time, which every
/// attempt shares, so the history (whose rows are keyed by the id) keeps one row even after
/// the window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditKey {
    /// The record's id.
    pub id: AuditId,
    /// When the action happened (for a submission, when it was stored).
    pub at: Timestamp,
    /// The publish's deduplication id (`Nats-Msg-Id`).
    pub dedupe: String,
}
