//! The OTLP/HTTP span exporter.
//!
//! The SDK's batch processor exports from its own thread, outside any tokio runtime, while the
//! hyper client needs one: [`RuntimeClient`] runs each request on the runtime that was current
//! when telemetry was initialised.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use opentelemetry_http::{HttpClient, HttpError, hyper::HyperClient};
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig, WithHttpConfig};

/// True when an OTLP endpoint is configured and export is not switched off.
pub(crate) fn configured() -> bool {
    let endpoint = [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .any(|name| std::env::var(name).is_ok_and(|v| !v.is_empty()));
    let disabled = std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v == "none");
    endpoint && !disabled
}

/// A span exporter sending protobuf over HTTP to the configured endpoint.
pub(crate) fn exporter() -> Result<SpanExporter, String> {
    let handle = tokio::runtime::Handle::try_current()
        .map_err(|_| "telemetry was initialised outside a tokio runtime".to_owned())?;
    let client = RuntimeClient {
        inner: HyperClient::with_default_connector(Duration::from_secs(10), None),
        handle,
    };
    SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_http_client(client)
        .build()
        .map_err(|e| e.to_string())
}

struct RuntimeClient {
    inner: HyperClient,
    handle: tokio::runtime::Handle,
}

impl fmt::Debug for RuntimeClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuntimeClient").finish_non_exhaustive()
    }
}

impl HttpClient for RuntimeClient {
    fn send_bytes<'a, 'r>(
        &'a self,
        request: Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Bytes>, HttpError>> + Send + 'r>>
    where
        'a: 'r,
    {
        let inner = self.inner.clone();
        let task = self
            .handle
            .spawn(async move { inner.send_bytes(request).await });
        Box::pin(async move { task.await.map_err(|e| Box::new(e) as HttpError)? })
    }
}
