//! Errors as RFC 9457 `application/problem+json`: one type, one HTTP status per variant,
//! declared here. Errors raised by poem itself (a body that is not JSON, a missing parameter,
//! an unknown route, a body over the size limit) are turned into the same shape by
//! [`render`], so a client parses one error format everywhere.

use poem::http::StatusCode;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object};

/// The problem document.
#[derive(Debug, Clone, PartialEq, Object)]
#[oai(skip_serializing_if_is_none)]
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
    /// The permission the request needed and the caller lacks (403).
    #[oai(skip_serializing_if_is_none)]
    pub permission: Option<String>,
}

/// Every error an API operation returns.
#[derive(Debug, ApiResponse)]
pub enum ApiError {
    /// The request is malformed or a parameter is invalid.
    #[oai(status = 400, content_type = "application/problem+json")]
    BadRequest(Json<Box<Problem>>),
    /// No credential, or one that is not valid: send `Authorization: Bearer <token>`.
    #[oai(status = 401, content_type = "application/problem+json")]
    Unauthorized(
        Json<Box<Problem>>,
        #[oai(header = "WWW-Authenticate")] String,
    ),
    /// The credential is valid but lacks a permission this request needs (`permission`
    /// names it), or the request came for a host or from an origin that is not allowed.
    #[oai(status = 403, content_type = "application/problem+json")]
    Forbidden(Json<Box<Problem>>),
    /// No such resource.
    #[oai(status = 404, content_type = "application/problem+json")]
    NotFound(Json<Box<Problem>>),
    /// The request conflicts with the resource's state.
    #[oai(status = 409, content_type = "application/problem+json")]
    Conflict(Json<Box<Problem>>),
    /// The body is larger than allowed.
    #[oai(status = 413, content_type = "application/problem+json")]
    TooLarge(Json<Box<Problem>>),
    /// The body is not in a media type the operation reads (send `Content-Type:
    /// application/json`).
    #[oai(status = 415, content_type = "application/problem+json")]
    UnsupportedMediaType(Json<Box<Problem>>),
    /// The request parsed but its content is invalid.
    #[oai(status = 422, content_type = "application/problem+json")]
    Invalid(Json<Box<Problem>>),
    /// Too many requests, or a login locked out: `Retry-After` says in how many seconds.
    #[oai(status = 429, content_type = "application/problem+json")]
    TooManyRequests(Json<Box<Problem>>, #[oai(header = "Retry-After")] u64),
    /// A dependency (NATS, the database) is unavailable; retry.
    #[oai(status = 503, content_type = "application/problem+json")]
    Unavailable(Json<Box<Problem>>),
}

fn problem(
    code: &str,
    title: &str,
    status: StatusCode,
    detail: String,
    field: Option<String>,
) -> Json<Box<Problem>> {
    // Boxed: every operation returns `Result<_, ApiError>`, and a problem inline would make
    // each such result as large as the document.
    Json(Box::new(Problem {
        kind: format!("urn:capstan:problem:{code}"),
        title: title.to_owned(),
        status: status.as_u16(),
        detail,
        field,
        permission: None,
    }))
}

impl ApiError {
    /// 401, with the challenge a client must answer.
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::Unauthorized(
            problem(
                "unauthorized",
                "Unauthorized",
                StatusCode::UNAUTHORIZED,
                detail.into(),
                None,
            ),
            r#"Bearer realm="capstan""#.to_owned(),
        )
    }

    /// 403 for a missing permission, naming it.
    pub fn missing_permission(permission: &str, detail: impl Into<String>) -> Self {
        let mut body = problem(
            "forbidden",
            "Forbidden",
            StatusCode::FORBIDDEN,
            detail.into(),
            None,
        );
        body.0.permission = Some(permission.to_owned());
        Self::Forbidden(body)
    }

    /// 403 for any other refusal (a host or origin not allowed, a rule of ownership).
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::Forbidden(problem(
            "forbidden",
            "Forbidden",
            StatusCode::FORBIDDEN,
            detail.into(),
            None,
        ))
    }

    /// 403 for a proof the request carries that does not hold (a current password), naming
    /// the field.
    pub fn forbidden_field(detail: impl Into<String>, field: &str) -> Self {
        Self::Forbidden(problem(
            "forbidden",
            "Forbidden",
            StatusCode::FORBIDDEN,
            detail.into(),
            Some(field.to_owned()),
        ))
    }

    /// 429, retry after `retry_after`.
    pub fn too_many_requests(detail: impl Into<String>, retry_after: std::time::Duration) -> Self {
        Self::TooManyRequests(
            problem(
                "too-many-requests",
                "Too many requests",
                StatusCode::TOO_MANY_REQUESTS,
                detail.into(),
                None,
            ),
            retry_after.as_secs_f64().ceil() as u64,
        )
    }

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
            ErrorCode::Forbidden => Self::forbidden(error.message),
        }
    }
}

impl From<crate::auth::limits::Limited> for ApiError {
    fn from(limited: crate::auth::limits::Limited) -> Self {
        Self::too_many_requests(limited.describe(), limited.retry_after)
    }
}

impl From<capstan_mesh::Error> for ApiError {
    fn from(error: capstan_mesh::Error) -> Self {
        tracing::warn!(error = %error, "NATS operation failed");
        match error {
            capstan_mesh::Error::Full { .. } => Self::Unavailable(problem(
                "full",
                "Capstan is full",
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{error}; retry once jobs have drained"),
                None,
            )),
            error => Self::unavailable(error.to_string()),
        }
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
        StatusCode::UNAUTHORIZED => ApiError::unauthorized(
            "this request needs a credential: `Authorization: Bearer <token>`",
        ),
        StatusCode::NOT_FOUND => ApiError::not_found(if detail.is_empty() {
            "no such route".to_owned()
        } else {
            detail
        }),
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large(
            "the request body is larger than the limit (CAPSTAN_MAX_JOB_BYTES)",
            None,
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType(problem(
            "unsupported-media-type",
            "Unsupported media type",
            status,
            format!("{detail}: send the body as `Content-Type: application/json`"),
            None,
        )),
        status if status.is_server_error() => {
            tracing::error!(status = status.as_u16(), error = %detail, "request failed");
            ApiError::unavailable("internal error")
        }
        // A parameter the description constrains (a pattern, a range), refused before the
        // operation runs: the problem names it, as the operation's own checks do.
        StatusCode::BAD_REQUEST if parameter_of(&detail).is_some() => {
            ApiError::bad_request(detail.clone(), parameter_of(&detail))
        }
        status => {
            let mut response = ApiError::bad_request(detail.clone(), None).into_response();
            response.set_status(status);
            let kind = if status == StatusCode::METHOD_NOT_ALLOWED {
                "urn:capstan:problem:method-not-allowed"
            } else {
                "urn:capstan:problem:bad-request"
            };
            if let Ok(body) = serde_json::to_vec(&serde_json::json!({
                "type": kind,
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

/// The parameter poem-openapi names in a refusal ("failed to parse parameter `name`: …").
fn parameter_of(detail: &str) -> Option<&str> {
    let rest = detail.strip_prefix("failed to parse parameter `")?;
    rest.split_once('`').map(|(name, _)| name)
}
