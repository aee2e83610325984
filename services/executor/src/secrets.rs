//! Opening an attempt's secrets: the sealed values its spec carries (`secrets`), and the
//! secrets an administrator stored that it names (`secret_refs`), read from the secrets bucket,
//! served only to the submitters each one lists, and audited one by one (`secret.read`) before
//! the value is handed over. Values exist in clear only in what [`Secrets::open`] returns
//! (wiped from memory when it is dropped) and in the copy the process's command keeps until it
//! is spawned; no error names more than a secret's name.

use capstan_mesh::Bucket;
use capstan_mesh::events::EventPublisher;
use capstan_protocol::{AuditAction, AuditOutcome, AuditRecord, JobRecord, NodeId, StoredSecret};
use zeroize::Zeroizing;

/// Reads and audit publishes tried per stored secret before the attempt fails: with the
/// delays doubling from [`FIRST_RETRY`], about six seconds of NATS trouble are waited out.
const TRIES: u32 = 5;
const FIRST_RETRY: std::time::Duration = std::time::Duration::from_millis(400);

/// Environment variables holding secret values, for one process.
pub type Opened = Vec<(String, Zeroizing<String>)>;

/// What opening secrets takes.
#[derive(Debug, Clone)]
pub struct Secrets {
    /// The keys; without them, no job with secrets runs here.
    pub keys: Option<capstan_secrets::KeyRing>,
    /// The secrets administrators stored.
    pub stored: Bucket<StoredSecret>,
    /// Where each use of a stored secret is audited.
    pub events: EventPublisher,
    /// This node, named in the audit records.
    pub node: NodeId,
}

impl Secrets {
    /// Opens every secret of `record`'s attempt, or says (by name only) which one cannot be.
    pub async fn open(&self, record: &JobRecord) -> Result<Opened, String> {
        let spec = &record.spec;
        if spec.secrets.is_empty() && spec.secret_refs.is_empty() {
            return Ok(Vec::new());
        }
        let Some(keys) = &self.keys else {
            let name = spec
                .secrets
                .keys()
                .chain(spec.secret_refs.keys())
                .next()
                .map_or("", String::as_str);
            return Err(format!(
                "secret `{name}` cannot be opened: this executor has no secret keys \
                 (CAPSTAN_SECRET_KEYS)"
            ));
        };
        let mut opened = Opened::with_capacity(spec.secrets.len() + spec.secret_refs.len());
        for (name, sealed) in &spec.secrets {
            let value = keys
                .open(record.id, name, sealed)
                .map_err(|error| format!("secret `{name}` cannot be opened: {error}"))?;
            opened.push((name.clone(), value));
        }
        for (variable, name) in &spec.secret_refs {
            // A passing NATS failure is waited out, not made the job's failure.
            let mut read = self.read(keys, record, name).await;
            let mut delay = FIRST_RETRY;
            for _ in 1..TRIES {
                if !read
                    .as_ref()
                    .is_err_and(|refused| refused.outcome == AuditOutcome::Error)
                {
                    break;
                }
                tokio::time::sleep(delay).await;
                delay *= 2;
                read = self.read(keys, record, name).await;
            }
            self.audit(record, variable, name, &read).await?;
            let value = read.map_err(|refused| {
                format!(
                    "secret_refs.{variable}: stored secret `{name}` {}",
                    refused.reason
                )
            })?;
            opened.push((variable.clone(), value));
        }
        Ok(opened)
    }

    /// Reads and opens the stored secret `name` for `record`'s job.
    async fn read(
        &self,
        keys: &capstan_secrets::KeyRing,
        record: &JobRecord,
        name: &str,
    ) -> Result<Zeroizing<String>, Refused> {
        let stored = match self.stored.get(name).await {
            Ok(Some(stored)) => stored.value,
            Ok(None) => return Err(Refused::failure("does not exist")),
            Err(error) => {
                return Err(Refused {
                    outcome: AuditOutcome::Error,
                    reason: format!("cannot be read: {error}"),
                });
            }
        };
        let submitter = record.submitted_by.as_ref().map(|by| by.principal.as_str());
        if !stored.usable_by(submitter) {
            return Err(Refused {
                outcome: AuditOutcome::Denied,
                reason: format!(
                    "is not for jobs submitted by {}",
                    submitter
                        .map_or_else(|| "no one in particular".to_owned(), |s| format!("`{s}`"))
                ),
            });
        }
        keys.open_stored(name, &stored.sealed)
            .map_err(|error| Refused::failure(format!("cannot be opened: {error}")))
    }

    /// Records the use of (or the refusal of) a stored secret; the value is handed over only
    /// once the record is stored.
    async fn audit(
        &self,
        record: &JobRecord,
        variable: &str,
        name: &str,
        read: &Result<Zeroizing<String>, Refused>,
    ) -> Result<(), String> {
        let outcome = match read {
            Ok(_) => AuditOutcome::Success,
            Err(refused) => refused.outcome,
        };
        let mut audit = AuditRecord::new(AuditAction::SecretRead, outcome);
        if let Some(by) = &record.submitted_by {
            audit.principal = Some(by.principal.clone());
            audit.via = Some(by.via);
            audit.token = by.token.clone();
        }
        audit.resource = Some(format!("secret/{name}"));
        audit.trace_id = capstan_telemetry::propagation::trace_id();
        let mut detail = format!(
            "for job {} attempt {} on node {} as `{variable}`",
            record.id, record.attempt, self.node
        );
        if let Err(refused) = read {
            detail.push_str(&format!(": {}", refused.reason));
        }
        audit.detail = Some(detail);
        let mut delay = FIRST_RETRY;
        let mut published = self.events.audit(&audit).await;
        for _ in 1..TRIES {
            if published.is_ok() {
                break;
            }
            tokio::time::sleep(delay).await;
            delay *= 2;
            // The same record id: the audit stream keeps one copy.
            published = self.events.audit(&audit).await;
        }
        published.map_err(|error| {
            format!(
                "secret_refs.{variable}: the use of stored secret `{name}` cannot be audited: \
                 {error}"
            )
        })
    }
}

/// Why a stored secret was not opened, and how the audit records it.
struct Refused {
    outcome: AuditOutcome,
    reason: String,
}

impl Refused {
    fn failure(reason: impl Into<String>) -> Self {
        Self {
            outcome: AuditOutcome::Failure,
            reason: reason.into(),
        }
    }
}
