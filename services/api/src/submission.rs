//! The body of `POST /jobs`: documented as [`JobSubmission`], parsed with the protocol's own
//! decoder so that an error names its field (`timeout: invalid type: string "soon", expected
//! f64`) — a type error is `400`, a value that parses but makes no sense is `422`. Secrets,
//! given in clear, are sealed before the spec is checked ([`SubmissionBody::seal_and_check`]).

use capstan_protocol::codec::{self, Encoding};
use capstan_protocol::spec::JobSpecWire;
use capstan_protocol::{JobId, JobSpec, RejectionCode};
use capstan_secrets::KeyRing;
use poem::{FromRequest, IntoResponse, Request, RequestBody};
use poem_openapi::payload::{ParsePayload, Payload};
use poem_openapi::registry::{MetaMediaType, MetaRequest, MetaSchemaRef, Registry};
use poem_openapi::types::Type;
use poem_openapi::{ApiExtractor, ApiExtractorType, ExtractParamOptions};

use crate::model::JobSubmission;
use crate::problem::ApiError;

/// A job spec from a request body, parsed, not yet sealed and checked.
pub struct SubmissionBody(pub JobSpecWire);

fn reject(error: ApiError) -> poem::Error {
    poem::Error::from_response(error.into_response())
}

impl Payload for SubmissionBody {
    const CONTENT_TYPE: &'static str = "application/json";

    fn check_content_type(content_type: &str) -> bool {
        matches!(content_type.parse::<mime::Mime>(), Ok(mime)
            if mime.type_() == "application" && (mime.subtype() == "json" || mime.suffix().is_some_and(|s| s == "json")))
    }

    fn schema_ref() -> MetaSchemaRef {
        JobSubmission::schema_ref()
    }

    fn register(registry: &mut Registry) {
        JobSubmission::register(registry);
    }
}

impl ParsePayload for SubmissionBody {
    const IS_REQUIRED: bool = true;

    async fn from_request(request: &Request, body: &mut RequestBody) -> poem::Result<Self> {
        let bytes = <Vec<u8> as FromRequest>::from_request(request, body).await?;
        let wire: JobSpecWire = codec::decode(Encoding::Json, &bytes).map_err(|error| {
            let detail = error.to_string();
            reject(match error.code {
                RejectionCode::Malformed => ApiError::bad_request(detail, None),
                _ => ApiError::bad_request(detail, error.field.as_deref()),
            })
        })?;
        Ok(SubmissionBody(wire))
    }
}

impl SubmissionBody {
    /// The spec of job `id`, its secrets sealed with `keys` (every value a REST client gives is
    /// taken as clear text), checked as any spec is.
    pub fn seal_and_check(self, id: JobId, keys: Option<&KeyRing>) -> Result<JobSpec, ApiError> {
        let mut wire = self.0;
        if let Some(secrets) = wire.secrets.as_mut().filter(|s| !s.is_empty()) {
            let Some(keys) = keys else {
                return Err(ApiError::invalid(
                    "this API has no secret keys (CAPSTAN_SECRET_KEYS), so it cannot take \
                     secrets",
                    Some("secrets".into()),
                ));
            };
            for (name, value) in secrets.iter_mut() {
                let clear = zeroize::Zeroizing::new(std::mem::take(value));
                let sealed = keys.seal(id, name, &clear).map_err(|e| {
                    ApiError::unavailable(format!("cannot seal secret `{name}`: {e}"))
                })?;
                *value = sealed.into();
            }
        }
        JobSpec::try_from(wire)
            .map_err(|error| ApiError::invalid(error.to_string(), Some(error.field)))
    }
}

impl<'a> ApiExtractor<'a> for SubmissionBody {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::RequestObject];

    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        <Self as Payload>::register(registry);
    }

    fn request_meta() -> Option<MetaRequest> {
        Some(MetaRequest {
            description: Some("The job to run."),
            content: vec![MetaMediaType {
                content_type: <Self as Payload>::CONTENT_TYPE,
                schema: <Self as Payload>::schema_ref(),
            }],
            required: true,
        })
    }

    async fn from_request(
        request: &'a Request,
        body: &mut RequestBody,
        _options: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        match request.content_type() {
            Some(content_type) if Self::check_content_type(content_type) => {
                <Self as ParsePayload>::from_request(request, body).await
            }
            Some(content_type) => Err(poem_openapi::error::ContentTypeError::NotSupported {
                content_type: content_type.to_owned(),
            }
            .into()),
            None => Err(poem_openapi::error::ContentTypeError::ExpectContentType.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: &str) -> SubmissionBody {
        SubmissionBody(codec::decode(Encoding::Json, json.as_bytes()).expect("a wire spec"))
    }

    #[test]
    fn secrets_are_sealed_for_their_job_and_refused_without_keys() {
        let json = r#"{"command": "true", "secrets": {"TOKEN": "hunter2"}}"#;
        let refused = body(json)
            .seal_and_check(JobId::generate(), None)
            .expect_err("no keys");
        let ApiError::Invalid(problem) = refused else {
            panic!("not a 422: {refused:?}");
        };
        assert_eq!(problem.0.field.as_deref(), Some("secrets"));
        let keys: KeyRing = KeyRing::generate_entry("k1")
            .expect("a key")
            .parse()
            .expect("keys");
        let id = JobId::generate();
        let spec = body(json).seal_and_check(id, Some(&keys)).expect("sealed");
        let sealed = &spec.secrets["TOKEN"];
        assert!(!sealed.as_str().contains("hunter2"));
        assert_eq!(
            keys.open(id, "TOKEN", sealed).expect("opens").as_str(),
            "hunter2"
        );
        // What a client sends is always its clear value, even one shaped like a sealed value.
        let shaped = r#"{"command": "true", "secrets": {"TOKEN": "sealed:v1:k1:QUJD"}}"#;
        let spec = body(shaped)
            .seal_and_check(id, Some(&keys))
            .expect("sealed");
        assert_eq!(
            keys.open(id, "TOKEN", &spec.secrets["TOKEN"])
                .expect("opens")
                .as_str(),
            "sealed:v1:k1:QUJD"
        );
    }
}
