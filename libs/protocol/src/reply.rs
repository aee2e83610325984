//! Replies of request/reply endpoints: `{"ok": …}` or `{"error": {"code", "message", "field"}}`,
//! in the encoding the request came in.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::event::Rejection;
use crate::ids::JobId;

/// Error classes of request/reply endpoints; each maps to one `Nats-Service-Error-Code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request could not be parsed or failed validation.
    BadRequest,
    /// The request is larger than allowed.
    TooLarge,
    /// No such node or job.
    NotFound,
    /// The request conflicts with the current state.
    Conflict,
    /// Capstan could not complete it; retrying may succeed.
    Unavailable,
    /// The caller may not make it: a node acting for another, say.
    Forbidden,
}

impl ErrorCode {
    /// The HTTP-like status number sent as `Nats-Service-Error-Code`.
    pub fn status(self) -> u16 {
        match self {
            Self::BadRequest => 400,
            Self::NotFound => 404,
            Self::Conflict => 409,
            Self::TooLarge => 413,
            Self::Unavailable => 503,
            Self::Forbidden => 403,
        }
    }
}

/// A failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ServiceError {
    /// The class of error.
    pub code: ErrorCode,
    /// What went wrong, for a person.
    pub message: String,
    /// The offending field, when one is to blame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl fmt::Display for ServiceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) if !self.message.starts_with(field.as_str()) => {
                write!(f, "{field}: {}", self.message)
            }
            _ => f.write_str(&self.message),
        }
    }
}

impl ServiceError {
    /// An error of `code` with a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            field: None,
        }
    }
}

impl From<&Rejection> for ServiceError {
    fn from(rejection: &Rejection) -> Self {
        use crate::event::RejectionCode;
        let code = match rejection.code {
            RejectionCode::TooLarge => ErrorCode::TooLarge,
            RejectionCode::Conflict | RejectionCode::Duplicate => ErrorCode::Conflict,
            RejectionCode::Malformed | RejectionCode::Invalid | RejectionCode::Misrouted => {
                ErrorCode::BadRequest
            }
            RejectionCode::Forged => ErrorCode::Forbidden,
        };
        Self {
            code,
            message: rejection.reason.clone(),
            field: rejection.field.clone(),
        }
    }
}

/// The body of every reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Reply<T> {
    /// Success.
    Ok(T),
    /// Failure.
    Error(ServiceError),
}

impl<T> Reply<T> {
    /// As a `Result`.
    pub fn into_result(self) -> Result<T, ServiceError> {
        match self {
            Self::Ok(value) => Ok(value),
            Self::Error(error) => Err(error),
        }
    }
}

impl<T> From<Result<T, ServiceError>> for Reply<T> {
    fn from(result: Result<T, ServiceError>) -> Self {
        match result {
            Ok(value) => Self::Ok(value),
            Err(error) => Self::Error(error),
        }
    }
}

/// A job reference in a request (`capstan.jobs.cancel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct JobRef {
    /// The job's id.
    pub id: JobId,
}

/// What a cancel request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum CancelOutcome {
    /// The job had not started: it is cancelled now.
    Cancelled,
    /// The job is running: its executor has been told to stop it, and will record `cancelled`.
    Requested,
}

/// The reply of `capstan.jobs.cancel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Cancelled {
    /// What the request did.
    pub outcome: CancelOutcome,
    /// The job's status now (`cancelled`, or still `running` until its executor stops it).
    pub status: crate::job::JobStatus,
}

/// A command to an executor to stop one attempt (`capstan.control.<node>.cancel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CancelNotice {
    /// The job.
    pub job: JobId,
    /// The attempt to stop.
    pub attempt: u32,
}

/// The reply of `capstan.jobs.create`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Created {
    /// The job's id.
    pub id: JobId,
    /// True when the idempotency key named an existing job, whose id this is.
    pub duplicate: bool,
}
