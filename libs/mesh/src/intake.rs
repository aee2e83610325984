//! Reading a submission off its message: the job's id (the `Capstan-Job-Id` header, or one
//! derived from the stream sequence, the same on every redelivery), who sent it (the subject a
//! client's import delivers on, else the API's header on the plain subject), when it was
//! submitted, and its spec within the size limit; or the rejection it earns. No round trip:
//! whatever accepts submissions reads them with [`read`], and then claims, creates and places
//! as its part does.
//!
//! A submission that needs placement can be handed on to the schedulers ([`forward`]) on
//! `capstan.jobs.place.<job>`, with what was read off the original in headers (its id, its
//! sender, when it was stored), so that [`read`] gives the same submission back from it.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream::LastRawMessageErrorKind};
use capstan_protocol::codec::{self, Encoding, largest_field};
use capstan_protocol::subjects::{self, ClientCall};
use capstan_protocol::{
    AuditId, DecodeError, JobId, JobRecord, JobSpec, RejectionCode, SubmittedBy, Timestamp,
    headers, topology,
};

use crate::connect::Mesh;
use crate::error::Error;
use crate::submit::Claim;
use crate::wire;

/// A submission as its message says it.
#[derive(Debug, Clone)]
pub struct Submission {
    /// The job's id.
    pub id: JobId,
    /// Who submitted it.
    pub submitted_by: SubmittedBy,
    /// Whether a client identity sent it (the subject names the client); the mesh audits
    /// those submissions.
    pub from_client: bool,
    /// When it was first stored, in milliseconds since the epoch: a delay counts from here.
    pub submitted_ms: u64,
    /// The stream sequence of the original submission (not of a hand-on): the job's record
    /// keeps it, so that a redelivery is told from another submission under the same id.
    pub seq: u64,
    /// What to run.
    pub spec: JobSpec,
}

impl Submission {
    /// The record id, time and deduplication id of the audit of its acceptance: the same
    /// whichever service accepts it, and on every redelivery. The time is the submission's.
    pub fn audit_key(&self) -> crate::events::AuditKey {
        crate::events::AuditKey {
            id: AuditId::derived(self.submitted_ms, self.seq),
            at: self.submitted_at(),
            dedupe: format!("job.submit.{}.{}", self.id, self.seq),
        }
    }

    /// When it was first stored.
    pub fn submitted_at(&self) -> Timestamp {
        Timestamp::from_millis(i64::try_from(self.submitted_ms).unwrap_or(i64::MAX))
    }

    /// The job as it stands before anything has created its record: pending, or scheduled
    /// when it starts later (counted from its submission), no attempt yet, and carrying the
    /// submission's sequence as a scheduler's record would.
    pub fn record(&self) -> JobRecord {
        let at = self.submitted_at();
        let mut record = match self.spec.start {
            Some(start) => JobRecord::scheduled(self.id, self.spec.clone(), at, start.due(at)),
            None => JobRecord::new(self.id, self.spec.clone(), at),
        };
        record.submission_seq = Some(self.seq);
        record.submitted_by = Some(self.submitted_by.clone());
        record
    }
}

/// The stored submission of job `id`, read as [`read`] reads it (the size is the schedulers' to
/// judge): on the job's own subject, or handed on for placement. It is stored until a scheduler
/// or executor has created the job's record and acknowledged it. `None` when neither is stored,
/// or when what is stored would be refused or names another job.
pub async fn find(js: &jetstream::Context, id: JobId) -> Result<Option<Submission>, Error> {
    let stream = js
        .get_stream(topology::SUBMISSIONS.name)
        .await
        .map_err(|e| Error::unavailable("submission get", e))?;
    for subject in [subjects::submit_job(id), subjects::place_job(id)] {
        let message = match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(message) => message,
            Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => continue,
            Err(error) => return Err(Error::unavailable("submission get", error)),
        };
        let stored = Stored {
            seq: message.sequence,
            published_ms: (message.time.unix_timestamp_nanos() / 1_000_000) as u64,
        };
        let read = read(
            &message.subject,
            Some(&message.headers),
            &message.payload,
            stored,
            usize::MAX,
        );
        return Ok(read.ok().filter(|submission| submission.id == id));
    }
    Ok(None)
}

/// Why a submission is refused, as its rejection event says it.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// The job, when the id could be read.
    pub job: Option<JobId>,
    /// What kind of refusal.
    pub code: RejectionCode,
    /// The header or field at fault.
    pub field: Option<String>,
    /// What is wrong, for the sender.
    pub reason: String,
}

impl Refusal {
    fn new(job: Option<JobId>, code: RejectionCode, field: Option<&str>, reason: String) -> Self {
        Self {
            job,
            code,
            field: field.map(str::to_owned),
            reason,
        }
    }
}

/// Where JetStream stored a submission.
#[derive(Debug, Clone, Copy)]
pub struct Stored {
    /// Its stream sequence.
    pub seq: u64,
    /// When it was published, in milliseconds since the epoch.
    pub published_ms: u64,
}

/// The stored submission of job `id` ([`find`]) as a scheduler would accept it: with its
/// idempotency key, if it has one, claimed for it here as a scheduler claims it. `None` also
/// when the key names another job (the submission is that job's repeat, which a scheduler
/// refuses). For acting on a job accepted but not yet created: cancelling it.
pub async fn claimed(mesh: &Mesh, id: JobId) -> Result<Option<Submission>, Error> {
    let Some(submission) = find(&mesh.js, id).await? else {
        return Ok(None);
    };
    if let Some(key) = &submission.spec.idempotency_key
        && let Claim::Existing(_) = mesh.idempotency.claim(key, id).await?
    {
        return Ok(None);
    }
    Ok(Some(submission))
}

/// Reads the submission stored at `stored` on `subject`, refusing a body over
/// `max_job_bytes`.
pub fn read(
    subject: &str,
    map: Option<&HeaderMap>,
    payload: &[u8],
    stored: Stored,
    max_job_bytes: usize,
) -> Result<Submission, Refusal> {
    if subjects::is_place(subject) {
        let Some(named) = subjects::parse_place(subject) else {
            return Err(Refusal::new(
                None,
                RejectionCode::Invalid,
                Some("subject"),
                format!("`{subject}` names no job"),
            ));
        };
        return read_forwarded(named, map, payload, stored, max_job_bytes);
    }
    let id = match wire::header(map, headers::JOB_ID) {
        Some(text) => text.trim().parse::<JobId>().map_err(|error| {
            Refusal::new(
                None,
                RejectionCode::Invalid,
                Some(headers::JOB_ID),
                error.to_string(),
            )
        })?,
        None => JobId::derived(stored.published_ms, stored.seq),
    };
    // A client's submission arrives on a subject naming it, which only the server's import for
    // that client delivers on: that, not a header, says who sent it. On the plain subject, only
    // the API and the schedulers may publish (the API sets the header from the request's
    // principal); a server without identities trusts everyone anyway.
    let client = ClientCall::Submit.client_of(subject);
    let submitted_by = match (client, wire::header(map, headers::SUBMITTED_BY)) {
        (Some(client), _) => SubmittedBy::nats_client(client),
        (None, Some(text)) => sender(id, text)?,
        (None, None) => SubmittedBy::nats(),
    };
    let spec = read_spec(id, map, payload, max_job_bytes)?;
    Ok(Submission {
        id,
        submitted_by,
        from_client: client.is_some(),
        submitted_ms: stored.published_ms,
        seq: stored.seq,
        spec,
    })
}

/// Reads a submission handed on for placement on the subject of job `named`: its id, sender and
/// submission time are the headers [`forward`] wrote, all required.
fn read_forwarded(
    named: JobId,
    map: Option<&HeaderMap>,
    payload: &[u8],
    stored: Stored,
    max_job_bytes: usize,
) -> Result<Submission, Refusal> {
    let missing = |header: &str| {
        Refusal::new(
            Some(named),
            RejectionCode::Invalid,
            Some(header),
            format!("a submission handed on for placement must carry `{header}`"),
        )
    };
    let id = wire::header(map, headers::JOB_ID).ok_or_else(|| missing(headers::JOB_ID))?;
    if id.trim() != named.to_string() {
        return Err(Refusal::new(
            Some(named),
            RejectionCode::Invalid,
            Some(headers::JOB_ID),
            format!(
                "`{}` names job {id} on the subject of job {named}",
                headers::JOB_ID
            ),
        ));
    }
    let by =
        wire::header(map, headers::SUBMITTED_BY).ok_or_else(|| missing(headers::SUBMITTED_BY))?;
    let submitted_by = sender(named, by)?;
    let submitted_ms = match wire::header(map, headers::SUBMITTED_AT) {
        Some(at) => at
            .trim()
            .parse::<u64>()
            .map_err(|error| bad_header(named, headers::SUBMITTED_AT, error))?,
        None => stored.published_ms,
    };
    let seq = match wire::header(map, headers::SUBMISSION_SEQ) {
        Some(seq) => seq
            .trim()
            .parse::<u64>()
            .map_err(|error| bad_header(named, headers::SUBMISSION_SEQ, error))?,
        None => stored.seq,
    };
    let spec = read_spec(named, map, payload, max_job_bytes)?;
    Ok(Submission {
        id: named,
        submitted_by,
        from_client: wire::header(map, headers::FROM_CLIENT) == Some("true"),
        submitted_ms,
        seq,
        spec,
    })
}

/// The sender a `Capstan-Submitted-By` header names (JSON), for job `job`.
fn sender(job: JobId, text: &str) -> Result<SubmittedBy, Refusal> {
    codec::decode::<SubmittedBy>(Encoding::Json, text.as_bytes())
        .map_err(|error| bad_header(job, headers::SUBMITTED_BY, error))
}

/// The refusal of job `job` for a header that cannot be read.
fn bad_header(job: JobId, header: &str, error: impl std::fmt::Display) -> Refusal {
    Refusal::new(
        Some(job),
        RejectionCode::Invalid,
        Some(header),
        format!("{header}: {error}"),
    )
}

/// A submission handed on for placement: where to publish it, and its headers (the body goes
/// as it came).
#[derive(Debug, Clone)]
pub struct Forward {
    /// `capstan.jobs.place.<job>`.
    pub subject: String,
    /// The job's id, its sender and when it was submitted, the original's content type and
    /// trace context, and the job's id as the deduplication id.
    pub headers: HeaderMap,
}

/// How to hand `submission`, read off a message with headers `map`, on to the schedulers. The
/// body goes as it came; a second hand-on of the same job within the stream's deduplication
/// window is dropped by the stream.
pub fn forward(submission: &Submission, map: Option<&HeaderMap>) -> Forward {
    let mut out = HeaderMap::new();
    for name in [
        headers::CONTENT_TYPE,
        headers::TRACEPARENT,
        headers::TRACESTATE,
    ] {
        if let Some(value) = wire::header(map, name) {
            out.insert(name, value);
        }
    }
    let id = submission.id.to_string();
    out.insert(headers::JOB_ID, id.as_str());
    out.insert(headers::MSG_ID, format!("place.{id}").as_str());
    // A principal and a token name serialize as JSON whatever they hold.
    let by = serde_json::to_string(&submission.submitted_by).unwrap_or_default();
    out.insert(headers::SUBMITTED_BY, by.as_str());
    out.insert(
        headers::SUBMITTED_AT,
        submission.submitted_ms.to_string().as_str(),
    );
    out.insert(headers::SUBMISSION_SEQ, submission.seq.to_string().as_str());
    // Whether the acceptance is audited is the original's: a client's submission stored by the
    // create endpoint names the client, and is audited there, not again.
    out.insert(
        headers::FROM_CLIENT,
        if submission.from_client {
            "true"
        } else {
            "false"
        },
    );
    Forward {
        subject: subjects::place_job(submission.id),
        headers: out,
    }
}

/// The spec of job `id` within `max_job_bytes`, or why not.
fn read_spec(
    id: JobId,
    map: Option<&HeaderMap>,
    payload: &[u8],
    max_job_bytes: usize,
) -> Result<JobSpec, Refusal> {
    let encoding = wire::encoding_of(map, payload);
    if payload.len() > max_job_bytes {
        let (field, reason) = too_large(encoding, payload, max_job_bytes);
        return Err(Refusal {
            job: Some(id),
            code: RejectionCode::TooLarge,
            field,
            reason,
        });
    }
    codec::decode_spec(encoding, payload).map_err(
        |DecodeError {
             code,
             field,
             reason,
             ..
         }| {
            let reason = match code {
                RejectionCode::Malformed => format!("malformed submission: {reason}"),
                _ => reason,
            };
            Refusal {
                job: Some(id),
                code,
                field,
                reason,
            }
        },
    )
}

/// The reason for a too-large rejection, naming the field that holds most of the bytes.
fn too_large(encoding: Encoding, payload: &[u8], limit: usize) -> (Option<String>, String) {
    let base = format!(
        "the job is {} bytes, over the limit of {limit} bytes (CAPSTAN_MAX_JOB_BYTES)",
        payload.len()
    );
    match largest_field(encoding, payload) {
        Some((field, size)) => {
            let reason = format!("{base}; `{field}` holds {size} bytes");
            (Some(field), reason)
        }
        None => (None, base),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STORED: Stored = Stored {
        seq: 42,
        published_ms: 1_700_000_000_000,
    };
    const LIMIT: usize = 64 * 1024;

    fn json(body: &str) -> Vec<u8> {
        body.as_bytes().to_vec()
    }

    #[test]
    fn a_plain_json_job_gets_the_id_derived_from_where_it_was_stored() {
        let submission = read(
            subjects::SUBMIT,
            None,
            &json(r#"{"argv": ["/bin/true"]}"#),
            STORED,
            LIMIT,
        )
        .expect("accepted");
        assert_eq!(
            submission.id,
            JobId::derived(STORED.published_ms, STORED.seq)
        );
        assert_eq!(submission.submitted_by, SubmittedBy::nats());
        assert!(!submission.from_client);
        assert_eq!(submission.spec.argv(), ["/bin/true"]);
    }

    #[test]
    fn the_id_header_names_the_job_and_a_bad_one_is_refused_by_that_header() {
        let id = JobId::generate();
        let mut map = HeaderMap::new();
        map.insert(headers::JOB_ID, id.to_string().as_str());
        let body = json(r#"{"argv": ["true"]}"#);
        let named = read(subjects::SUBMIT, Some(&map), &body, STORED, LIMIT).expect("accepted");
        assert_eq!(named.id, id);

        let mut bad = HeaderMap::new();
        bad.insert(headers::JOB_ID, "not-an-id");
        let refused =
            read(subjects::SUBMIT, Some(&bad), &body, STORED, LIMIT).expect_err("refused");
        assert_eq!(refused.code, RejectionCode::Invalid);
        assert_eq!(refused.field.as_deref(), Some(headers::JOB_ID));
        assert_eq!(refused.job, None);
    }

    #[test]
    fn a_client_is_known_by_its_subject_whatever_header_it_sets() {
        let mut map = HeaderMap::new();
        map.insert(
            headers::SUBMITTED_BY,
            r#"{"principal": "admin", "via": "password"}"#,
        );
        let subject = format!("{}.from.ops", subjects::SUBMIT);
        let submission = read(
            &subject,
            Some(&map),
            &json(r#"{"argv": ["true"]}"#),
            STORED,
            LIMIT,
        )
        .expect("accepted");
        assert_eq!(submission.submitted_by, SubmittedBy::nats_client("ops"));
        assert!(submission.from_client);
    }

    #[test]
    fn an_unreadable_submitted_by_header_is_refused_by_name() {
        let mut map = HeaderMap::new();
        map.insert(headers::SUBMITTED_BY, "{not json");
        let refused = read(
            subjects::SUBMIT,
            Some(&map),
            &json(r#"{"argv": ["true"]}"#),
            STORED,
            LIMIT,
        )
        .expect_err("refused");
        assert_eq!(refused.code, RejectionCode::Invalid);
        assert_eq!(refused.field.as_deref(), Some(headers::SUBMITTED_BY));
        assert!(refused.job.is_some());
    }

    #[test]
    fn an_oversized_job_is_refused_naming_the_field_that_holds_most_of_it() {
        let body = json(&format!(
            r#"{{"argv": ["cat"], "stdin": "{}"}}"#,
            "x".repeat(200)
        ));
        let refused = read(subjects::SUBMIT, None, &body, STORED, 100).expect_err("refused");
        assert_eq!(refused.code, RejectionCode::TooLarge);
        assert_eq!(refused.field.as_deref(), Some("stdin"));
        assert!(refused.reason.contains("over the limit of 100 bytes"));
    }

    #[test]
    fn a_submission_handed_on_for_placement_reads_back_as_the_same_submission_stored_where_it_was()
    {
        let body = json(r#"{"argv": ["true"], "delay": 60}"#);
        let subject = format!("{}.from.ops", subjects::SUBMIT);
        let mut map = HeaderMap::new();
        map.insert(
            headers::TRACEPARENT,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        );
        let original = read(&subject, Some(&map), &body, STORED, LIMIT).expect("accepted");
        let forward = forward(&original, Some(&map));
        assert_eq!(forward.subject, subjects::place_job(original.id));
        assert_eq!(
            wire::header(Some(&forward.headers), headers::TRACEPARENT),
            wire::header(Some(&map), headers::TRACEPARENT)
        );
        assert_eq!(
            wire::header(Some(&forward.headers), headers::MSG_ID),
            Some(format!("place.{}", original.id).as_str())
        );
        // Stored again later under another sequence: the same job, sender and submission time.
        let later = Stored {
            seq: 900,
            published_ms: STORED.published_ms + 5_000,
        };
        let read_back = |forward: &Forward| {
            read(
                &forward.subject,
                Some(&forward.headers),
                &body,
                later,
                LIMIT,
            )
            .expect("accepted")
        };
        let again = read_back(&forward);
        assert_eq!(again.id, original.id);
        assert_eq!(again.submitted_by, SubmittedBy::nats_client("ops"));
        assert!(again.from_client);
        assert_eq!(again.submitted_ms, STORED.published_ms);
        assert_eq!(
            again.seq, STORED.seq,
            "the original's sequence, not the hand-on's"
        );
        assert_eq!(again.spec, original.spec);

        // A client's job stored by the create endpoint names the client but was audited
        // there: handed on, it is still not the mesh's to audit.
        let mut created = HeaderMap::new();
        created.insert(headers::JOB_ID, JobId::generate().to_string().as_str());
        created.insert(
            headers::SUBMITTED_BY,
            r#"{"principal": "nats:ops", "via": "nats"}"#,
        );
        let stored = read(subjects::SUBMIT, Some(&created), &body, STORED, LIMIT).expect("read");
        assert!(!stored.from_client);
        let again = read_back(&super::forward(&stored, None));
        assert_eq!(again.submitted_by, SubmittedBy::nats_client("ops"));
        assert!(!again.from_client);

        // The mesh's own submission stays the mesh's.
        let plain = read(subjects::SUBMIT, None, &body, STORED, LIMIT).expect("accepted");
        let again = read_back(&super::forward(&plain, None));
        assert_eq!(again.id, JobId::derived(STORED.published_ms, STORED.seq));
        assert_eq!(again.submitted_by, SubmittedBy::nats());
        assert!(!again.from_client);
    }

    #[test]
    fn a_placement_subject_without_its_headers_or_naming_another_job_is_refused() {
        let body = json(r#"{"argv": ["true"]}"#);
        let job = JobId::generate();
        let subject = subjects::place_job(job);
        let refused = read(&subject, None, &body, STORED, LIMIT).expect_err("refused");
        assert_eq!(refused.code, RejectionCode::Invalid);
        assert_eq!(refused.field.as_deref(), Some(headers::JOB_ID));
        assert_eq!(refused.job, Some(job));

        let mut map = HeaderMap::new();
        map.insert(headers::JOB_ID, job.to_string().as_str());
        let refused = read(&subject, Some(&map), &body, STORED, LIMIT).expect_err("refused");
        assert_eq!(refused.field.as_deref(), Some(headers::SUBMITTED_BY));

        let mut other = HeaderMap::new();
        other.insert(headers::JOB_ID, JobId::generate().to_string().as_str());
        other.insert(
            headers::SUBMITTED_BY,
            r#"{"principal": "nats", "via": "nats"}"#,
        );
        let refused = read(&subject, Some(&other), &body, STORED, LIMIT).expect_err("refused");
        assert_eq!(refused.field.as_deref(), Some(headers::JOB_ID));
        assert!(
            refused.reason.contains(&job.to_string()),
            "{}",
            refused.reason
        );

        let mut unreadable = HeaderMap::new();
        unreadable.insert(headers::JOB_ID, job.to_string().as_str());
        unreadable.insert(
            headers::SUBMITTED_BY,
            r#"{"principal": "nats", "via": "nats"}"#,
        );
        unreadable.insert(headers::SUBMISSION_SEQ, "the first");
        let refused = read(&subject, Some(&unreadable), &body, STORED, LIMIT).expect_err("refused");
        assert_eq!(refused.field.as_deref(), Some(headers::SUBMISSION_SEQ));

        // A placement subject naming no job is refused, whatever its headers claim.
        let refused = read(
            &subjects::PLACE_ALL.replace('*', "not-a-job"),
            Some(&other),
            &body,
            STORED,
            LIMIT,
        )
        .expect_err("refused");
        assert_eq!(refused.field.as_deref(), Some("subject"));
    }

    #[test]
    fn malformed_json_is_refused_as_malformed_and_says_so() {
        let refused = read(subjects::SUBMIT, None, &json("{\"argv\": ["), STORED, LIMIT)
            .expect_err("refused");
        assert_eq!(refused.code, RejectionCode::Malformed);
        assert!(refused.reason.starts_with("malformed submission: "));
        assert_eq!(
            refused.job,
            Some(JobId::derived(STORED.published_ms, STORED.seq))
        );
    }
}
