//! The body of `POST /jobs`: documented as [`JobSubmission`], parsed with the protocol's own
//! decoder so that an error names its field (`timeout: invalid type: string "soon", expected
//! f64`) — a type error is `400`, a value that parses but makes no sense is `422`.

use capstan_protocol::codec::{self, Encoding};
use capstan_protocol::spec::JobSpecWire;
use capstan_protocol::{JobSpec, RejectionCode};
use poem::{FromRequest, IntoResponse, Request, RequestBody};
use poem_openapi::payload::{ParsePayload, Payload};
use poem_openapi::registry::{MetaMediaType, MetaRequest, MetaSchemaRef, Registry};
use poem_openapi::types::Type;
use poem_openapi::{ApiExtractor, ApiExtractorType, ExtractParamOptions};

use crate::model::JobSubmission;
use crate::problem::ApiError;

/// A validated job spec from a request body.
pub struct SubmissionBody(pub JobSpec);

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
        JobSpec::try_from(wire)
            .map(SubmissionBody)
            .map_err(|error| reject(ApiError::invalid(error.to_string(), Some(error.field))))
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
