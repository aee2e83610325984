//! The audit trail: recording a record (the audit stream first, which is what makes it
//! durable, then the `audit` table), what a request's handler tells its record
//! ([`AuditSlot`]), and the projection of the audit stream into the table.
//!
//! The guard (`guard`) writes one record per audited request after the handler has answered
//! and before the answer leaves; if the record cannot be stored, a successful answer is
//! replaced by `503`, so no audited action is reported done unrecorded. The table is written
//! twice on purpose: by the replica that served the request (so the record can be read at
//! once) and by the projection (which also carries records other processes published, such
//! as `capstan history rebuild`'s, and those whose direct write failed); rows are keyed by the
//! record's id, so the second write is a no-op.

use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::AckKind;
use capstan_mesh::{Mesh, consume, wire};
use capstan_protocol::{AuditAction, AuditRecord, subjects, topology};
use capstan_store::History;
use tokio_util::sync::CancellationToken;

/// What a handler says about its request, for the request's audit record.
#[derive(Debug, Default, Clone)]
pub struct AuditNote {
    /// The action, once the handler knows it.
    pub action: Option<AuditAction>,
    /// What it was done to.
    pub resource: Option<String>,
    /// Why it was refused, or what changed (never a secret).
    pub detail: Option<String>,
    /// The user a login claimed to be, when no credential was verified.
    pub claimed: Option<String>,
}

/// The note of one request, shared between the guard and the handler through the request's
/// extensions.
#[derive(Debug, Default)]
pub struct AuditSlot(Mutex<AuditNote>);

impl AuditSlot {
    fn with(&self, change: impl FnOnce(&mut AuditNote)) {
        change(
            &mut self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
    }

    /// Names the request's action and resource.
    pub fn action(&self, action: AuditAction, resource: Option<String>) {
        self.with(|note| {
            note.action = Some(action);
            if resource.is_some() {
                note.resource = resource;
            }
        });
    }

    /// Sets the resource (once it is known: a new job's id).
    pub fn resource(&self, resource: String) {
        self.with(|note| note.resource = Some(resource));
    }

    /// Adds why the request was refused, or what it changed.
    pub fn detail(&self, detail: impl Into<String>) {
        let detail = detail.into();
        self.with(|note| note.detail = Some(detail));
    }

    /// Records the user name a login claimed (cut to a sane length, control characters
    /// replaced: it is whatever the client sent).
    pub fn claimed(&self, username: &str) {
        let cut: String = username
            .chars()
            .take(64)
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        self.with(|note| note.claimed = Some(cut));
    }

    /// The note so far.
    pub fn note(&self) -> AuditNote {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Stores audit records.
#[derive(Debug, Clone)]
pub struct Auditor {
    mesh: Mesh,
    history: History,
}

impl Auditor {
    /// An auditor publishing on `mesh` and writing to `history`.
    pub fn new(mesh: Mesh, history: History) -> Self {
        Self { mesh, history }
    }

    /// Stores `record`: published to the audit stream (an error means it is not stored), then
    /// written to the table (a failure there is left to the projection).
    pub async fn record(&self, record: &AuditRecord) -> Result<(), capstan_mesh::Error> {
        self.mesh.events.audit(record).await?;
        if let Err(error) = self
            .history
            .record_audit(std::slice::from_ref(record))
            .await
        {
            tracing::warn!(error = %error, "audit record stored in the stream only; the projection will write it");
        }
        Ok(())
    }
}

/// Records per transaction.
const BATCH: usize = 256;

/// Projects the audit stream into the table until `shutdown`; fails when its consumer cannot
/// be created.
pub async fn project(
    mesh: Mesh,
    history: History,
    shutdown: CancellationToken,
) -> Result<(), capstan_mesh::Error> {
    let consumer = consume::durable(&mesh.js, &topology::audit_consumer(), &shutdown).await?;
    consume::batches(
        &consumer,
        BATCH,
        Duration::from_millis(10),
        &shutdown,
        |messages| {
            let history = history.clone();
            let mesh = mesh.clone();
            async move {
                let mut records = Vec::with_capacity(messages.len());
                let mut accepted = Vec::with_capacity(messages.len());
                for message in messages {
                    match wire::decode::<AuditRecord>(message.headers.as_ref(), &message.payload) {
                        // Each identity may publish only some actions' subjects: a record
                        // whose action is not its subject's is one it could not publish.
                        Ok((record, _))
                            if message.subject.as_str() != subjects::audit(record.action) =>
                        {
                            mesh.events
                                .reject_stored(
                                    subjects::Origin::Audit,
                                    &message,
                                    None,
                                    capstan_protocol::RejectionCode::Forged,
                                    Some("action".into()),
                                    format!(
                                        "an audit record of `{}` on another action's subject",
                                        record.action
                                    ),
                                )
                                .await;
                        }
                        Ok((record, _)) => {
                            records.push(record);
                            accepted.push(message);
                        }
                        Err(error) => {
                            mesh.events
                                .reject_stored(
                                    subjects::Origin::Audit,
                                    &message,
                                    None,
                                    error.code,
                                    error.field.clone(),
                                    error.to_string(),
                                )
                                .await;
                        }
                    }
                }
                match history.record_audit(&records).await {
                    Ok(()) => {
                        for message in accepted {
                            if let Err(error) = message.ack().await {
                                tracing::debug!(error = %error, "cannot acknowledge an audit record");
                            }
                        }
                    }
                    Err(error) => {
                        tracing::warn!(error = %error, "cannot write audit records, retrying");
                        for message in accepted {
                            let _ = message
                                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                                .await;
                        }
                    }
                }
            }
        },
    )
    .await;
    Ok(())
}
