//! Submitting jobs, and the idempotency keys that make a repeated submission one job.
//!
//! Both the scheduler's create endpoint and the API submit through [`Submitter`]: it claims the
//! idempotency key, then stores the submission in the submissions stream with the job id in a
//! header. The scheduler's submissions consumer claims the key again when it accepts the job,
//! so submissions that did not come through a `Submitter` (a plain `nats pub`) are
//! deduplicated too.

use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use capstan_protocol::reply::Created;
use capstan_protocol::topology::idempotency_bucket_key;
use capstan_protocol::{
    JobId, JobRecord, JobSpec, SubmittedBy, Timestamp, codec, headers, subjects,
};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::store::{Bucket, Change, Modified};
use crate::wire::msgpack_headers;

/// A claimed idempotency key: which job it names, since when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reservation {
    /// The job the key belongs to.
    pub job: JobId,
    /// When it was claimed.
    pub reserved_at: Timestamp,
}

/// The outcome of claiming a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The key now names the job that claimed it.
    Claimed,
    /// The key already names another job.
    Existing(JobId),
}

/// Idempotency keys, in their bucket.
#[derive(Debug, Clone)]
pub struct Idempotency {
    bucket: Bucket<Reservation>,
    jobs: Bucket<JobRecord>,
}

/// A reservation whose job never appeared after this long was left by a submitter that died
/// between claiming the key and storing the submission; it may be taken over.
pub const ABANDONED_AFTER: Duration = Duration::from_secs(60);

impl Idempotency {
    /// Keys in `bucket`, checked against job records in `jobs`.
    pub fn new(bucket: Bucket<Reservation>, jobs: Bucket<JobRecord>) -> Self {
        Self { bucket, jobs }
    }

    /// The job a key names, if any.
    pub async fn lookup(&self, key: &str) -> Result<Option<JobId>, Error> {
        let found = self.bucket.get(&idempotency_bucket_key(key)).await?;
        Ok(found.map(|reservation| reservation.value.job))
    }

    /// Forgets `key` if it names `job` (a job being purged): the key may name a new job from
    /// then on. A key naming another job is left alone.
    pub async fn forget(&self, key: &str, job: JobId) -> Result<(), Error> {
        let bucket_key = idempotency_bucket_key(key);
        let Some(current) = self.bucket.get(&bucket_key).await? else {
            return Ok(());
        };
        if current.value.job != job {
            return Ok(());
        }
        self.bucket
            .kv()
            .delete_expect_revision(&bucket_key, Some(current.revision))
            .await
            .map_err(|e| Error::unavailable("kv delete", e))
    }

    /// Claims `key` for `job`. Claiming a key again for the same job succeeds, so a redelivered
    /// submission passes. Exactly one of two racing claims for different jobs wins.
    pub async fn claim(&self, key: &str, job: JobId) -> Result<Claim, Error> {
        let bucket_key = idempotency_bucket_key(key);
        let ours = Reservation {
            job,
            reserved_at: Timestamp::now(),
        };
        // The key is usually new: try to create it before reading it.
        let found = self
            .bucket
            .modify_from(&bucket_key, None, |current| match current {
                None => Change::Write(ours.clone()),
                Some(current) if current.value.job == job => Change::Stop(None),
                Some(current) => Change::Stop(Some(current.clone())),
            })
            .await?;
        let other = match found {
            Modified::Written { .. } | Modified::Stopped(None) => return Ok(Claim::Claimed),
            Modified::Stopped(Some(other)) => other,
        };
        if !self.abandoned(&other.value, ours.reserved_at).await? {
            return Ok(Claim::Existing(other.value.job));
        }
        // Take the key over from the abandoned reservation, and from nothing else.
        let taken = self
            .bucket
            .modify_from(&bucket_key, Some(other.clone()), |current| match current {
                None => Change::Write(ours.clone()),
                Some(current) if current.value == other.value => Change::Write(ours.clone()),
                Some(current) if current.value.job == job => Change::Stop(Claim::Claimed),
                Some(current) => Change::Stop(Claim::Existing(current.value.job)),
            })
            .await?;
        Ok(match taken {
            Modified::Written { .. } => Claim::Claimed,
            Modified::Stopped(claim) => claim,
        })
    }

    /// Whether `reservation`, seen at `now`, was left by a submitter that died between
    /// claiming the key and storing the submission: its job never appeared, and it is older
    /// than [`ABANDONED_AFTER`].
    async fn abandoned(&self, reservation: &Reservation, now: Timestamp) -> Result<bool, Error> {
        Ok(now.since(reservation.reserved_at) > ABANDONED_AFTER
            && self.jobs.get(&reservation.job.to_string()).await?.is_none())
    }
}

/// Stores job submissions.
#[derive(Debug, Clone)]
pub struct Submitter {
    js: jetstream::Context,
    idempotency: Idempotency,
}

impl Submitter {
    /// A submitter on `js`.
    pub fn new(js: jetstream::Context, idempotency: Idempotency) -> Self {
        Self { js, idempotency }
    }

    /// Stores `spec` as a new job and returns its id once the submissions stream holds it; or
    /// returns the existing job's id when the spec's idempotency key names one. The submission
    /// carries the current span's trace context, so the job joins the caller's trace.
    pub async fn submit(&self, spec: &JobSpec) -> Result<Created, Error> {
        self.submit_as(spec, None).await
    }

    /// Like [`Submitter::submit`], attributing the job to `submitted_by` (the
    /// `Capstan-Submitted-By` header); without it the job is attributed to NATS.
    pub async fn submit_as(
        &self,
        spec: &JobSpec,
        submitted_by: Option<&SubmittedBy>,
    ) -> Result<Created, Error> {
        self.submit_with_id(JobId::generate(), spec, submitted_by)
            .await
    }

    /// Like [`Submitter::submit_as`], as job `id` (a fresh id the caller chose, for instance to
    /// bind the job's sealed secrets to it).
    pub async fn submit_with_id(
        &self,
        id: JobId,
        spec: &JobSpec,
        submitted_by: Option<&SubmittedBy>,
    ) -> Result<Created, Error> {
        if let Some(key) = &spec.idempotency_key
            && let Some(existing) = self.idempotency.lookup(key).await?
        {
            return Ok(Created {
                id: existing,
                duplicate: true,
            });
        }
        if let Some(key) = &spec.idempotency_key
            && let Claim::Existing(existing) = self.idempotency.claim(key, id).await?
        {
            return Ok(Created {
                id: existing,
                duplicate: true,
            });
        }
        let mut map = msgpack_headers();
        map.insert(headers::JOB_ID, id.to_string().as_str());
        if let Some(submitted_by) = submitted_by {
            let json =
                serde_json::to_string(submitted_by).map_err(|e| Error::unavailable("submit", e))?;
            map.insert(headers::SUBMITTED_BY, json.as_str());
        }
        capstan_telemetry::propagation::inject(&mut map);
        let publish = PublishMessage::build()
            .payload(Bytes::from(codec::to_msgpack(spec)?))
            .headers(map)
            .message_id(id.to_string());
        let refused = |e: async_nats::jetstream::context::PublishError| {
            if crate::error::is_full(&e) {
                Error::Full {
                    what: "the submissions stream",
                }
            } else {
                Error::unavailable("submit", e)
            }
        };
        self.js
            .send_publish(subjects::submit_job(id), publish)
            .await
            .map_err(refused)?
            .await
            .map_err(refused)?;
        Ok(Created {
            id,
            duplicate: false,
        })
    }
}
