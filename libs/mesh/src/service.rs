//! NATS micro services: every Capstan service registers one, so `nats micro ls` lists it with
//! its endpoints and stats. Requests may be JSON or MessagePack; the reply uses the request's
//! encoding, so a person using `nats req` reads JSON.

use std::collections::HashMap;
use std::future::Future;

use async_nats::HeaderMap;
use async_nats::service::{self, Service, ServiceExt};
use bytes::Bytes;
use capstan_protocol::codec::{self, Encoding};
use capstan_protocol::subjects::Origin;
use capstan_protocol::{DecodeError, Rejection, Reply, ServiceError};
use futures::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::events::EventPublisher;
use crate::wire;

/// Registers the micro service `name` (e.g. `capstan-registry`).
pub async fn start(
    client: &async_nats::Client,
    name: &str,
    description: &str,
    metadata: HashMap<String, String>,
) -> Result<Service, Error> {
    client
        .service_builder()
        .description(description)
        .metadata(metadata)
        .start(name, capstan_protocol::VERSION)
        .await
        .map_err(|e| Error::setup(format!("micro service {name}"), e))
}

/// Adds an endpoint on `subject`.
pub async fn endpoint(
    service: &Service,
    name: &str,
    subject: &str,
) -> Result<service::endpoint::Endpoint, Error> {
    service
        .endpoint_builder()
        .name(name)
        .add(subject)
        .await
        .map_err(|e| Error::setup(format!("endpoint {subject}"), e))
}

/// Decodes a request body into `T`. A failure is the decoder's own error, which says whether
/// the body was not the encoding at all (`malformed`) or had a wrong field (`invalid`), with
/// the encoding the reply should use.
pub fn decode_request<T: DeserializeOwned>(
    request: &service::Request,
) -> Result<(T, Encoding), (DecodeError, Encoding)> {
    let message = &request.message;
    decode_body(message.headers.as_ref(), &message.payload)
}

fn decode_body<T: DeserializeOwned>(
    headers: Option<&HeaderMap>,
    payload: &[u8],
) -> Result<(T, Encoding), (DecodeError, Encoding)> {
    // `nats req subject ''` sends nothing: read it as an empty JSON object, so endpoints
    // without arguments accept it and the others name the missing field.
    let payload: &[u8] = if payload.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        payload
    };
    let encoding = wire::encoding_of(headers, payload);
    wire::decode(headers, payload).map_err(|e| (e, encoding))
}

/// The rejection of a `size`-byte request on `subject` that did not decode. Its code is the
/// one the decoder chose; nothing is read back from the message.
fn rejection_of(subject: &str, size: usize, error: &DecodeError) -> Rejection {
    Rejection::new(
        subject,
        size,
        error.code,
        error.field.clone(),
        error.to_string(),
    )
}

/// Sends `result` as the reply, in `encoding`. Errors also set `Nats-Service-Error` and
/// `Nats-Service-Error-Code` so micro-aware tools see them.
pub async fn reply<T: Serialize>(
    request: &service::Request,
    encoding: Encoding,
    result: Result<T, ServiceError>,
) {
    let mut map = HeaderMap::new();
    map.insert(
        capstan_protocol::headers::CONTENT_TYPE,
        encoding.content_type(),
    );
    if let Err(error) = &result {
        map.insert(
            "Nats-Service-Error",
            wire::header_text(&error.to_string()).as_str(),
        );
        map.insert(
            "Nats-Service-Error-Code",
            error.code.status().to_string().as_str(),
        );
    }
    let body = match codec::encode(encoding, &Reply::from(result)) {
        Ok(body) => Bytes::from(body),
        Err(error) => {
            tracing::error!(error = %error, "cannot encode reply");
            return;
        }
    };
    if let Err(error) = request.respond_with_headers(Ok(body), map).await {
        tracing::debug!(error = %error, "cannot send reply");
    }
}

/// Serves `endpoint` until `shutdown`: decodes each request into `Req`, runs `handler` on up
/// to `concurrency` requests at once, and replies in the request's encoding. A request that
/// does not decode is reported as a rejection from `origin` (`malformed` or `invalid`, as the
/// decoder found it) and gets the same rejection as its `bad_request` reply.
pub async fn serve<Req, Res, F, Fut>(
    endpoint: service::endpoint::Endpoint,
    shutdown: CancellationToken,
    concurrency: usize,
    rejections: (EventPublisher, Origin),
    handler: F,
) where
    Req: DeserializeOwned + Send + 'static,
    Res: Serialize + Send + 'static,
    F: Fn(Req) -> Fut + Send + Sync,
    Fut: Future<Output = Result<Res, ServiceError>> + Send,
{
    let handler = &handler;
    serve_on(endpoint, shutdown, concurrency, rejections, |request, _| {
        handler(request)
    })
    .await
}

/// Like [`serve`], for an endpoint on a wildcard subject: `handler` also gets the subject the
/// request was made on.
pub async fn serve_on<Req, Res, F, Fut>(
    endpoint: service::endpoint::Endpoint,
    shutdown: CancellationToken,
    concurrency: usize,
    rejections: (EventPublisher, Origin),
    handler: F,
) where
    Req: DeserializeOwned + Send + 'static,
    Res: Serialize + Send + 'static,
    F: Fn(Req, String) -> Fut + Send + Sync,
    Fut: Future<Output = Result<Res, ServiceError>> + Send,
{
    let handler = &handler;
    let rejections = &rejections;
    endpoint
        .take_until(shutdown.cancelled_owned())
        .for_each_concurrent(concurrency, |request| async move {
            match decode_request::<Req>(&request) {
                Ok((body, encoding)) => {
                    let subject = request.message.subject.to_string();
                    let result = handler(body, subject).await;
                    reply(&request, encoding, result).await;
                }
                Err((error, encoding)) => {
                    let (events, origin) = rejections;
                    let rejection = rejection_of(
                        request.message.subject.as_str(),
                        request.message.payload.len(),
                        &error,
                    );
                    events.rejection(*origin, &rejection).await;
                    let error = ServiceError::from(&rejection);
                    reply::<Res>(&request, encoding, Err(error)).await;
                }
            }
        })
        .await;
}

/// Serves `endpoint` until `shutdown` with a handler that reads the raw request (for endpoints
/// that check sizes or headers before decoding). The handler returns the reply's encoding
/// with the result.
pub async fn serve_raw<Res, F, Fut>(
    endpoint: service::endpoint::Endpoint,
    shutdown: CancellationToken,
    concurrency: usize,
    handler: F,
) where
    Res: Serialize + Send + 'static,
    F: Fn(service::Request) -> Fut + Send + Sync,
    Fut: Future<Output = (service::Request, Encoding, Result<Res, ServiceError>)> + Send,
{
    let handler = &handler;
    endpoint
        .take_until(shutdown.cancelled_owned())
        .for_each_concurrent(concurrency, |request| async move {
            let (request, encoding, result) = handler(request).await;
            reply(&request, encoding, result).await;
        })
        .await;
}

/// Decodes any body, even an empty one, as "no arguments": for list endpoints that a person
/// calls with `nats req subject ''`.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoArgs;

impl<'de> serde::Deserialize<'de> for NoArgs {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(deserializer)?;
        Ok(NoArgs)
    }
}

/// Calls the endpoint at `subject` with `body` (MessagePack) and decodes its reply: `Ok` with
/// the endpoint's own answer, success or [`ServiceError`]; `Err` when nobody answered within
/// `timeout` or the reply is unreadable.
pub async fn call<T: Serialize, R: DeserializeOwned>(
    client: &async_nats::Client,
    subject: &str,
    body: &T,
    timeout: std::time::Duration,
) -> Result<Result<R, ServiceError>, Error> {
    let payload = codec::to_msgpack(body)?;
    let request = client.request(subject.to_owned(), Bytes::from(payload));
    let reply = tokio::time::timeout(timeout, request)
        .await
        .map_err(|_| Error::unavailable("request", format!("{subject}: no answer in {timeout:?}")))?
        .map_err(|e| Error::unavailable("request", e))?;
    let reply: Reply<R> = codec::decode(Encoding::MsgPack, &reply.payload)
        .map_err(|e| Error::unavailable("request", format!("{subject}: unreadable reply: {e}")))?;
    Ok(reply.into_result())
}

/// How many instances of the micro service `name` answer a ping within `window`.
pub async fn count_instances(
    client: &async_nats::Client,
    name: &str,
    window: std::time::Duration,
) -> Result<usize, Error> {
    let inbox = client.new_inbox();
    let mut answers = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| Error::unavailable("micro ping", e))?;
    client
        .publish_with_reply(format!("$SRV.PING.{name}"), inbox, Bytes::new())
        .await
        .map_err(|e| Error::unavailable("micro ping", e))?;
    let mut count = 0;
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Some(_)) = tokio::time::timeout_at(deadline, answers.next()).await {
        count += 1;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use capstan_protocol::{ErrorCode, JobRef, RejectionCode};

    use super::*;

    fn rejected(payload: &[u8]) -> Rejection {
        let (error, _) = decode_body::<JobRef>(None, payload).expect_err("does not decode");
        rejection_of(capstan_protocol::subjects::CANCEL, payload.len(), &error)
    }

    #[test]
    fn a_body_that_is_not_json_is_rejected_as_malformed() {
        let rejection = rejected(b"{\"id\": ");
        assert_eq!(rejection.code, RejectionCode::Malformed);
        assert_eq!(ServiceError::from(&rejection).code, ErrorCode::BadRequest);
    }

    #[test]
    fn a_body_with_a_wrong_field_is_rejected_as_invalid_naming_the_field() {
        let rejection = rejected(br#"{"id": 5}"#);
        assert_eq!(rejection.code, RejectionCode::Invalid);
        assert_eq!(rejection.field.as_deref(), Some("id"));
        let reply = ServiceError::from(&rejection);
        assert_eq!(reply.code, ErrorCode::BadRequest);
        assert_eq!(reply.field.as_deref(), Some("id"));
    }

    #[test]
    fn a_rejection_keeps_the_decoders_code_whatever_its_reason_says() {
        let error = DecodeError {
            encoding: Encoding::Json,
            code: RejectionCode::Invalid,
            field: None,
            reason: "malformed-looking words from a field's own parser".into(),
        };
        let rejection = rejection_of(capstan_protocol::subjects::CANCEL, 10, &error);
        assert_eq!(rejection.code, RejectionCode::Invalid);
    }
}
