//! `capstan.jobs.create`: request/reply job submission. The reply comes once the submission is
//! stored, and carries the job's id (the existing job's when the idempotency key names one).
//! A client identity's request arrives on a subject naming it, and its job is attributed (and
//! the creation audited) under that name.

use capstan_mesh::{EventPublisher, Submitter, wire};
use capstan_protocol::codec::{self, largest_field};
use capstan_protocol::reply::Created;
use capstan_protocol::subjects::{ClientCall, Origin};
use capstan_protocol::{
    AuditAction, AuditOutcome, ErrorCode, Rejection, RejectionCode, ServiceError, SubmittedBy,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Serves the endpoint until `shutdown`.
pub(crate) async fn serve(
    endpoint: async_nats::service::endpoint::Endpoint,
    submitter: &Submitter,
    events: &EventPublisher,
    max_job_bytes: usize,
    shutdown: CancellationToken,
) {
    capstan_mesh::service::serve_raw(endpoint, shutdown, 256, move |request| async move {
        let message = &request.message;
        let map = message.headers.as_ref();
        let encoding = wire::encoding_of(map, &message.payload);
        let result = create(submitter, events, &request, max_job_bytes).await;
        (request, encoding, result)
    })
    .await;
}

async fn create(
    submitter: &Submitter,
    events: &EventPublisher,
    request: &async_nats::service::Request,
    max_job_bytes: usize,
) -> Result<Created, ServiceError> {
    let message = &request.message;
    let map = message.headers.as_ref();
    let payload = &message.payload;
    let encoding = wire::encoding_of(map, payload);
    let rejection = |code: RejectionCode, field: Option<String>, reason: String| {
        Rejection::new(message.subject.as_str(), payload.len(), code, field, reason)
    };
    if payload.len() > max_job_bytes {
        let largest = largest_field(encoding, payload);
        let reason = match &largest {
            Some((field, size)) => format!(
                "the job is {} bytes, over the limit of {max_job_bytes} bytes; `{field}` holds {size} bytes",
                payload.len()
            ),
            None => format!(
                "the job is {} bytes, over the limit of {max_job_bytes} bytes",
                payload.len()
            ),
        };
        let rejected = rejection(RejectionCode::TooLarge, largest.map(|(f, _)| f), reason);
        events.rejection(Origin::Create, &rejected).await;
        return Err(ServiceError::from(&rejected));
    }
    let spec = match codec::decode_spec(encoding, payload) {
        Ok(spec) => spec,
        Err(error) => {
            let rejected = rejection(error.code, error.field.clone(), error.to_string());
            events.rejection(Origin::Create, &rejected).await;
            return Err(ServiceError::from(&rejected));
        }
    };
    let span = tracing::info_span!("create job", otel.kind = "server");
    capstan_telemetry::propagation::follow(&span, map);
    let client = ClientCall::Create.client_of(&message.subject);
    let submitted_by = client.map(SubmittedBy::nats_client);
    let created = submitter
        .submit_as(&spec, submitted_by.as_ref())
        .instrument(span.clone())
        .await
        .map_err(|e| ServiceError::new(ErrorCode::Unavailable, e.to_string()))?;
    if let Some(by) = &submitted_by
        && !created.duplicate
    {
        // The job exists: it is answered even if its record could not be stored (the
        // failure is logged).
        let _ = events
            .audit_client(
                AuditAction::JobSubmit,
                by,
                created.id,
                AuditOutcome::Success,
                None,
            )
            .instrument(span)
            .await;
    }
    Ok(created)
}
