//! Health, readiness and metrics.

use poem_openapi::OpenApi;
use poem_openapi::payload::{Json, PlainText};

use super::{BearerAuth, Tag, served};
use crate::auth::Permission;
use crate::model::Health;
use crate::problem::ApiError;

/// The operational endpoints.
pub(crate) struct OperationsApi(pub Option<std::sync::Arc<crate::State>>);

#[OpenApi(tag = "Tag::Operations")]
impl OperationsApi {
    /// Liveness: the process is up. No credential needed.
    #[oai(path = "/healthz", method = "get", operation_id = "getHealth")]
    async fn healthz(&self) -> Json<Health> {
        Json(Health {
            status: "ok".into(),
            checks: Default::default(),
        })
    }

    /// Readiness: NATS and the history database are reachable. No credential needed.
    #[oai(path = "/readyz", method = "get", operation_id = "getReadiness")]
    async fn readyz(&self) -> Result<Json<Health>, ApiError> {
        let state = served(&self.0)?;
        let nats = state.mesh.client.connection_state();
        if nats != async_nats::connection::State::Connected {
            return Err(ApiError::unavailable(format!("NATS is {nats}")));
        }
        state
            .history
            .ping()
            .await
            .map_err(|_| ApiError::unavailable("the history database does not answer"))?;
        Ok(Json(Health {
            status: "ok".into(),
            checks: [
                ("nats".to_owned(), "ok".to_owned()),
                ("database".to_owned(), "ok".to_owned()),
            ]
            .into(),
        }))
    }

    /// Prometheus metrics: jobs by status, queue depths, latencies. Needs `metrics:read`
    /// (or use the open listener of `CAPSTAN_METRICS_LISTEN`).
    #[oai(path = "/metrics", method = "get", operation_id = "getMetrics")]
    async fn metrics(&self, auth: BearerAuth) -> Result<PlainText<String>, ApiError> {
        let state = served(&self.0)?;
        auth.allow_read(Permission::MetricsRead)?;
        Ok(PlainText(state.metrics.render().await))
    }
}
