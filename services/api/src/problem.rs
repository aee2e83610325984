//! Errors as RFC 9457 `application/problem+json`: one type, one HTTP status per variant,
//! declared here. Errors raised by poem itself (a body that is not JSON, a missing parameter,
//! an unknown route, a body over the size limit) are turned into the same shape by
//! [`render`], so a client parses one error format everywhere.

use poem::http::StatusCode;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object};

/// The problem document.
#[derive(Debug, Clone, PartialEq, Object)]
pub struct Problem {
    /// A URI naming the kind of problem.
    #[oai(rename = "type")]
    pub kind: String,
    /// A short summary of the kind.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong with this request, precisely.
    pub detail: String,
    /// The request field at fault, when one is.
    #[oai(skip_serializing_if_is_none)]
    pub field: Option<String>,
}

/// Every error an API operation returns.
#[derive(Debug, ApiResponse)]
pub enum ApiError {
    /// The request is malformed or a parameter is invalid.
    #[oai(status = 400, content_type = "application/problem+json")]
    BadRequest(Json<Problem>),
    /// No such resource.
    #[oai(status = 404, content_type = "application/problem+json")]
    NotFound(Json<Problem>),
    /// The request conflicts with the resource's state.
    #[oai(status = 409, content_type = "application/problem+json")]
    Conflict(Json<Problem>),
    /// The body is larger than allowed.
    #[oai(status = 413, content_type = "application/problem+json")]
    TooLarge(Json<Problem>),
    /// The request parsed but its content is invalid.
    #[oai(status = 422, content_type = "application/problem+json")]
    Invalid(Json<Problem>),
    /// A dependency (NATS, the database) is unavailable; retry.
    #[oai(status = 503, content_type = "application/problem+json")]
    Unavailable(Json<Problem>),
}

fn problem(
    code: &str,
    title: &str,
    status: StatusCode,
    detail: String,
    field: Option<String>,
) -> Json<Problem> {
    Json(Problem {
        kind: format!("urn:capstan:problem:{code}"),
        title: title.to_owned(),
        status: status.as_u16(),
        detail,
        field,
    })
}

impl ApiError {
    /// 400.
    pub fn bad_request(detail: impl Into<String>, field: Option<&str>) -> Self {
        Self::BadRequest(problem(
            "bad-request",
            "Bad request",
            StatusCode::BAD_REQUEST,
            detail.into(),
            field.map(str::to_owned),
        ))
    }

    /// 404.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::NotFound(problem(
            "not-found",
            "Not found",
            StatusCode::NOT_FOUND,
            detail.into(),
            None,
        ))
    }

    /// 409.
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::Conflict(problem(
            "conflict",
            "Conflict",
            StatusCode::CONFLICT,
            detail.into(),
            None,
        ))
    }

    /// 413.
    pub fn too_large(detail: impl Into<String>, field: Option<String>) -> Self {
        Self::TooLarge(problem(
            "too-large",
            "Payload too large",
            StatusCode::PAYLOAD_TOO_LARGE,
            detail.into(),
            field,
        ))
    }

    /// 422.
    pub fn invalid(detail: impl Into<String>, field: Option<String>) -> Self {
        Self::Invalid(problem(
            "invalid",
            "Invalid job",
            StatusCode::UNPROCESSABLE_ENTITY,
            detail.into(),
            field,
        ))
    }

    /// 503.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::Unavailable(problem(
            "unavailable",
            "Service unavailable",
            StatusCode::SERVICE_UNAVAILABLE,
            detail.into(),
            None,
        ))
    }
}

impl ApiError {
    /// The problem for an error a service endpoint answered with.
    pub fn from_service(error: capstan_protocol::ServiceError) -> Self {
        use capstan_protocol::ErrorCode;
        match error.code {
            ErrorCode::BadRequest => Self::bad_request(error.message, error.field.as_deref()),
            ErrorCode::TooLarge => Self::too_large(error.message, error.field),
            ErrorCode::NotFound => Self::not_found(error.message),
            ErrorCode::Conflict => Self::conflict(error.message),
            ErrorCode::Unavailable => Self::unavailable(error.message),
        }
    }
}

impl From<capstan_mesh::Error> for ApiError {
    fn from(error: capstan_mesh::Error) -> Self {
        tracing::warn!(error = %error, "NATS operation failed");
        Self::unavailable(error.to_string())
    }
}

impl From<capstan_store::Error> for ApiError {
    fn from(error: capstan_store::Error) -> Self {
        tracing::warn!(error = %error, "history operation failed");
        Self::unavailable("the history database is unavailable")
    }
}

/// A problem response for an error raised outside the operations (poem's own parse errors,
/// unknown routes, size limits). An error that already carries a problem document (raised by
/// our own request parsing) passes through unchanged.
pub fn render(error: poem::Error) -> poem::Response {
    use poem::IntoResponse;
    let status = error.status();
    let detail = error.to_string();
    let response = error.into_response();
    if response
        .content_type()
        .is_some_and(|t| t.starts_with("application/problem+json"))
    {
        return response;
    }
    let api_error = match status {
        StatusCode::NOT_FOUND => ApiError::not_found(if detail.is_empty() {
            "no such route".to_owned()
        } else {
            detail
        }),
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large(
            "the request body is larger than the limit (CAPSTAN_MAX_JOB_BYTES)",
            None,
        ),
        status if status.is_server_error() => {
            tracing::error!(status = status.as_u16(), error = %detail, "request failed");
            ApiError::unavailable("internal error")
        }
        status => {
            let mut response = ApiError::bad_request(detail.clone(), None).into_response();
            response.set_status(status);
            if let Ok(body) = serde_json::to_vec(&serde_json::json!({
                "type": "urn:capstan:problem:bad-request",
                "title": status.canonical_reason().unwrap_or("Bad request"),
                "status": status.as_u16(),
                "detail": detail,
            })) {
                response.set_body(body);
            }
            return response;
        }
    };
    api_error.into_response()
}
