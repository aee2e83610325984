//! `capstan secrets rotate`: seals again, under the first of the secret keys, every secret that
//! something may still open — each stored secret, and the secrets of every job that has not
//! ended, and the credentials of the remote systems — so that the keys after it can be retired. Each record changes by compare-and-swap,
//! its revision checked, like every other write of a job.
//!
//! A job waiting unplaced (pending, no node) is left for a moment: a placement may be on its
//! way that a claim fences by that record's revision, and a write under it would make the
//! dispatch stale. Such jobs are tried again until they have moved on or `wait` is over; the
//! ones still waiting are reported, and their old key must stay until they start. A finished
//! job's secrets are never opened again and are left as they are (they expire with the record).

use std::time::Duration;

use capstan_mesh::{Change, Mesh, Modified};
use capstan_protocol::{JobId, JobRecord, StoredSecret, System, SystemAuth};
use capstan_secrets::KeyRing;

/// What a rotation did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Rotated {
    /// Stored secrets sealed again.
    pub stored: usize,
    /// Remote systems whose credentials were sealed again.
    pub systems: usize,
    /// Jobs whose secrets were sealed again.
    pub jobs: usize,
    /// Their secrets, counted one by one.
    pub job_secrets: usize,
    /// Jobs still waiting unplaced when the wait was over, holding old-key secrets.
    pub waiting: Vec<JobId>,
    /// Finished jobs holding old-key secrets, left as they are.
    pub finished: usize,
    /// What could not be opened (`job <id> secret <name>` or `secret <name>`) and why.
    pub unopenable: Vec<String>,
}

impl Rotated {
    /// One line for the operator.
    pub fn summary(&self, key: &str) -> String {
        format!(
            "sealed under `{key}`: {} stored secrets, {} system credentials, {} secrets of {} \
             jobs; {} jobs still waiting unplaced, {} finished jobs left as they are, {} values \
             that do not open",
            self.stored,
            self.systems,
            self.job_secrets,
            self.jobs,
            self.waiting.len(),
            self.finished,
            self.unopenable.len()
        )
    }

    /// True when every key but the first may be retired.
    pub fn complete(&self) -> bool {
        self.waiting.is_empty() && self.unopenable.is_empty()
    }
}

/// What to do with one job's record.
enum JobStep {
    /// Nothing sealed under another key.
    Current,
    /// Ended: left.
    Finished,
    /// Waiting unplaced: try again later.
    Unplaced,
    /// A secret does not open.
    Unopenable(String),
}

/// Seals again every stored secret and the secrets of every job not ended, under the first of
/// `keys`; waits up to `wait` for jobs waiting unplaced to move on.
pub async fn rotate(
    mesh: &Mesh,
    keys: &KeyRing,
    wait: Duration,
) -> Result<Rotated, capstan_mesh::Error> {
    let mut rotated = Rotated::default();
    for name in mesh.secrets.keys().await? {
        let changed = mesh
            .secrets
            .modify(&name, |current| {
                let Some(current) = current else {
                    return Change::Stop(Ok(()));
                };
                match keys.reseal_stored(&name, &current.value.sealed) {
                    Ok(None) => Change::Stop(Ok(())),
                    Ok(Some(sealed)) => Change::Write(StoredSecret {
                        sealed,
                        ..current.value.clone()
                    }),
                    Err(error) => Change::Stop(Err(format!("secret {name}: {error}"))),
                }
            })
            .await?;
        match changed {
            Modified::Written { .. } => rotated.stored += 1,
            Modified::Stopped(Err(reason)) => rotated.unopenable.push(reason),
            Modified::Stopped(Ok(())) => {}
        }
    }

    for name in mesh.systems.keys().await? {
        let changed = mesh
            .systems
            .modify(&name, |current| {
                let Some(current) = current else {
                    return Change::Stop(Ok(()));
                };
                match resealed_system(keys, &current.value) {
                    Ok(None) => Change::Stop(Ok(())),
                    Ok(Some(system)) => Change::Write(system),
                    Err(reason) => Change::Stop(Err(reason)),
                }
            })
            .await?;
        match changed {
            Modified::Written { .. } => rotated.systems += 1,
            Modified::Stopped(Err(reason)) => rotated.unopenable.push(reason),
            Modified::Stopped(Ok(())) => {}
        }
    }

    let mut pending: Vec<String> = mesh.jobs.keys().await?;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let mut unplaced = Vec::new();
        for key in pending {
            let mut resealed = 0;
            let changed = mesh
                .jobs
                .modify(&key, |current| {
                    let Some(current) = current else {
                        return Change::Stop(JobStep::Current);
                    };
                    let record = &current.value;
                    let stale = record
                        .spec
                        .secrets
                        .values()
                        .any(|sealed| sealed.key_id() != keys.sealing_key());
                    if !stale {
                        return Change::Stop(JobStep::Current);
                    }
                    if record.status.is_terminal() {
                        return Change::Stop(JobStep::Finished);
                    }
                    if record.is_unplaced() {
                        return Change::Stop(JobStep::Unplaced);
                    }
                    match resealed_record(keys, record) {
                        Ok((record, count)) => {
                            resealed = count;
                            Change::Write(record)
                        }
                        Err(reason) => Change::Stop(JobStep::Unopenable(reason)),
                    }
                })
                .await?;
            match changed {
                Modified::Written { .. } => {
                    rotated.jobs += 1;
                    rotated.job_secrets += resealed;
                }
                Modified::Stopped(JobStep::Current) => {}
                Modified::Stopped(JobStep::Finished) => rotated.finished += 1,
                Modified::Stopped(JobStep::Unplaced) => unplaced.push(key),
                Modified::Stopped(JobStep::Unopenable(reason)) => rotated.unopenable.push(reason),
            }
        }
        if unplaced.is_empty() || tokio::time::Instant::now() >= deadline {
            rotated.waiting = unplaced.iter().filter_map(|k| k.parse().ok()).collect();
            return Ok(rotated);
        }
        pending = unplaced;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `record` with every secret sealed under the first key, and how many changed.
fn resealed_record(keys: &KeyRing, record: &JobRecord) -> Result<(JobRecord, usize), String> {
    let mut next = record.clone();
    let mut count = 0;
    for (name, sealed) in next.spec.secrets.iter_mut() {
        match keys.reseal(record.id, name, sealed) {
            Ok(None) => {}
            Ok(Some(again)) => {
                *sealed = again;
                count += 1;
            }
            Err(error) => return Err(format!("job {} secret {name}: {error}", record.id)),
        }
    }
    Ok((next, count))
}

/// `system` with its credential sealed under the first key; `None` when it already is.
fn resealed_system(keys: &KeyRing, system: &System) -> Result<Option<System>, String> {
    let reseal = |field: &str, sealed| {
        keys.reseal_system(&system.name, field, sealed)
            .map_err(|error| format!("system {} {field}: {error}", system.name))
    };
    let auth = match &system.auth {
        SystemAuth::Password { password } => match reseal("password", password)? {
            None => return Ok(None),
            Some(password) => SystemAuth::Password { password },
        },
        SystemAuth::PrivateKey {
            private_key,
            passphrase,
        } => {
            let key = reseal("private_key", private_key)?;
            let phrase = passphrase
                .as_ref()
                .map(|p| reseal("passphrase", p))
                .transpose()?
                .flatten();
            if key.is_none() && phrase.is_none() {
                return Ok(None);
            }
            SystemAuth::PrivateKey {
                private_key: key.unwrap_or_else(|| private_key.clone()),
                passphrase: phrase.or_else(|| passphrase.clone()),
            }
        }
    };
    Ok(Some(System {
        auth,
        ..system.clone()
    }))
}
