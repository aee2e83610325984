//! `/api/v1/audit`: the audit trail, newest first, filtered and keyset paginated like jobs.

use capstan_protocol::AuditId;
use capstan_store::AuditQuery;
use poem_openapi::OpenApi;
use poem_openapi::param::Query;
use poem_openapi::payload::Json;

use super::{BearerAuth, Tag, page, parse_cursor, served, time_parameter};
use crate::auth::Permission;
use crate::model::access::AuditPage;
use crate::problem::ApiError;

/// The audit operations.
pub(crate) struct AuditApi(pub Option<std::sync::Arc<crate::State>>);

#[OpenApi(prefix_path = "/api/v1", tag = "Tag::Audit")]
impl AuditApi {
    /// Read the audit trail: every changing request and every security event, newest first.
    /// Needs `audit:read`.
    #[oai(path = "/audit", method = "get", operation_id = "listAudit")]
    #[allow(clippy::too_many_arguments)]
    async fn list(
        &self,
        auth: BearerAuth,
        /// Only records of this principal.
        principal: Query<Option<String>>,
        /// Only records of this action (`auth.login`, `job.submit`, `user.update`, …).
        action: Query<Option<String>>,
        /// Only records about this resource (`job/<id>`, `user/<name>`, `token/<id>`,
        /// `node/<id>`).
        resource: Query<Option<String>>,
        /// Only records with this outcome: `success`, `failure`, `denied` or `error`.
        outcome: Query<Option<String>>,
        /// Only records at or after this time (RFC 3339).
        since: Query<Option<String>>,
        /// Only records before this time (RFC 3339).
        until: Query<Option<String>>,
        /// Page size, 1 to 500.
        #[oai(
            default = "default_limit",
            validator(minimum(value = "1"), maximum(value = "500"))
        )]
        limit: Query<u32>,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
    ) -> Result<Json<AuditPage>, ApiError> {
        let state = served(&self.0)?;
        auth.allow_read(Permission::AuditRead)?;
        if let Some(action) = &action.0 {
            action
                .parse::<capstan_protocol::AuditAction>()
                .map_err(|reason| ApiError::bad_request(reason, Some("action")))?;
        }
        if let Some(outcome) = &outcome.0 {
            outcome
                .parse::<capstan_protocol::AuditOutcome>()
                .map_err(|reason| ApiError::bad_request(reason, Some("outcome")))?;
        }
        let query = AuditQuery {
            principal: principal.0,
            action: action.0,
            resource: resource.0,
            outcome: outcome.0,
            since: time_parameter(since.0.as_deref(), "since")?,
            until: time_parameter(until.0.as_deref(), "until")?,
            before: parse_cursor::<AuditId>(cursor.0.as_deref())?,
            limit: u64::from(limit.0) + 1,
        };
        let rows = state.history.audit(&query).await?;
        let (rows, next_cursor) = page(rows, limit.0, |row| row.id.clone());
        Ok(Json(AuditPage {
            records: rows.into_iter().map(Into::into).collect(),
            next_cursor,
        }))
    }
}

fn default_limit() -> u32 {
    100
}
