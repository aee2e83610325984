//! Every replica's view of what is revoked: users (disabled, deleted, role or password
//! changed), login sessions (logout, refresh-token reuse) and API tokens, kept in memory from a
//! watch of the `capstan_revocations` bucket.
//!
//! Access tokens are verified without the database, so this view is what makes a revocation
//! reach a token that is still within its lifetime: a replica that revokes writes the entry
//! (and applies it to itself at once); the others see it through their watch within
//! milliseconds. Each check is a hash-map lookup.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

use async_nats::jetstream::kv::Operation;
use capstan_mesh::Bucket;
use capstan_protocol::{Revocation, RevocationKey, Timestamp, topology};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// Revoked users, sessions and tokens, as this replica knows them.
pub struct Revocations {
    bucket: Bucket<Revocation>,
    revoked: RwLock<HashMap<RevocationKey, Timestamp>>,
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocations").finish_non_exhaustive()
    }
}

impl Revocations {
    /// A view of `bucket`, loaded with what it holds now.
    pub async fn load(bucket: Bucket<Revocation>) -> Result<Self, capstan_mesh::Error> {
        let mut revoked = HashMap::new();
        let keys: Vec<String> = match bucket.kv().keys().await {
            Ok(keys) => keys.filter_map(|k| async move { k.ok() }).collect().await,
            Err(error) => return Err(capstan_mesh::Error::unavailable("kv keys", error)),
        };
        for key in keys {
            if let (Some(parsed), Some(entry)) =
                (RevocationKey::parse(&key), bucket.get(&key).await?)
            {
                revoked.insert(parsed, entry.value.at);
            }
        }
        Ok(Self {
            bucket,
            revoked: RwLock::new(revoked),
        })
    }

    /// When `key` was revoked, if it was.
    pub fn revoked_at(&self, key: &RevocationKey) -> Option<Timestamp> {
        self.revoked
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(key)
            .copied()
    }

    /// True when `key` was revoked at or after `issued_at` (milliseconds): a credential issued
    /// before a revocation is refused, one issued after it (a new login once re-enabled) is not.
    pub fn revoked_since(&self, key: &RevocationKey, issued_at: i64) -> bool {
        self.revoked_at(key)
            .is_some_and(|at| at.as_millis() >= issued_at)
    }

    /// Revokes `key` now, for `reason`: in this replica at once, in the others through the
    /// bucket.
    pub async fn revoke(
        &self,
        key: RevocationKey,
        reason: &str,
    ) -> Result<(), capstan_mesh::Error> {
        let revocation = Revocation {
            at: Timestamp::now(),
            reason: reason.to_owned(),
        };
        self.remember(key.clone(), revocation.at);
        self.bucket.put(&key.key(), &revocation).await?;
        Ok(())
    }

    fn remember(&self, key: RevocationKey, at: Timestamp) {
        let mut revoked = self
            .revoked
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = revoked.entry(key).or_insert(at);
        if *entry < at {
            *entry = at;
        }
    }

    /// Forgets revocations older than the longest access-token lifetime, as the bucket does:
    /// every credential they concern has expired or is checked against the database.
    fn forget_expired(&self) {
        let horizon = Timestamp::now().as_millis()
            - i64::try_from(topology::MAX_ACCESS_TOKEN_TTL.as_millis()).unwrap_or(i64::MAX);
        self.revoked
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|_, at| at.as_millis() >= horizon);
    }

    /// Follows the bucket until `shutdown`, re-watching after interruptions.
    pub async fn follow(&self, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            let watch = match self.bucket.kv().watch_with_history(">").await {
                Ok(watch) => watch,
                Err(error) => {
                    tracing::warn!(error = %error, "cannot watch revocations, retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            let mut watch = watch;
            let mut prune = tokio::time::interval(Duration::from_secs(600));
            loop {
                let entry = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = prune.tick() => {
                        self.forget_expired();
                        continue;
                    }
                    entry = watch.next() => entry,
                };
                match entry {
                    Some(Ok(entry)) if entry.operation == Operation::Put => {
                        let parsed = RevocationKey::parse(&entry.key);
                        match (parsed, self.bucket.decode(&entry.key, &entry.value)) {
                            (Some(key), Ok(revocation)) => self.remember(key, revocation.at),
                            _ => {
                                tracing::warn!(key = %entry.key, "ignoring an unreadable revocation")
                            }
                        }
                    }
                    // Entries age out after the longest access-token lifetime: by then every
                    // credential they concern has expired, so forgetting them is safe.
                    Some(Ok(_)) => {}
                    Some(Err(error)) => {
                        tracing::debug!(error = %error, "revocation watch interrupted");
                        break;
                    }
                    None => break,
                }
            }
        }
    }
}
