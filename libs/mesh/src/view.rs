//! A live, in-memory copy of a KV bucket, kept current by a watch. The registry's liveness
//! sweeper and the scheduler's placement read the nodes bucket through it instead of asking
//! NATS on every decision.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv::Operation;
use futures::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::store::{Bucket, Versioned};

type Entries<T> = Arc<RwLock<HashMap<String, Versioned<T>>>>;

/// The current values of a bucket, by key.
pub struct BucketView<T> {
    entries: Entries<T>,
    changed: Arc<Notify>,
    ready: watch::Receiver<bool>,
}

impl<T> Clone for BucketView<T> {
    fn clone(&self) -> Self {
        Self {
            entries: self.entries.clone(),
            changed: self.changed.clone(),
            ready: self.ready.clone(),
        }
    }
}

impl<T> BucketView<T>
where
    T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    /// Starts watching `bucket` until `shutdown`. Values that do not decode are skipped with a
    /// warning; a broken watch is re-created from the last revision seen.
    pub async fn start(bucket: Bucket<T>, shutdown: CancellationToken) -> Result<Self, Error> {
        let entries: Entries<T> = Arc::default();
        let changed = Arc::new(Notify::new());
        let (ready_tx, ready) = watch::channel(false);
        let empty = bucket
            .kv()
            .status()
            .await
            .map_err(|e| Error::unavailable("kv status", e))?
            .values()
            == 0;
        if empty {
            ready_tx.send_replace(true);
        }
        tokio::spawn(follow(
            bucket,
            entries.clone(),
            changed.clone(),
            ready_tx,
            shutdown,
        ));
        Ok(Self {
            entries,
            changed,
            ready,
        })
    }

    /// Waits until the view holds every value the bucket had when the view started, or
    /// `timeout` passes. Returns whether it is complete.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut ready = self.ready.clone();
        tokio::time::timeout(timeout, ready.wait_for(|ready| *ready))
            .await
            .is_ok_and(|result| result.is_ok())
    }

    /// The value under `key`.
    pub fn get(&self, key: &str) -> Option<Versioned<T>> {
        self.read(|entries| entries.get(key).cloned())
    }

    /// Every value.
    pub fn values(&self) -> Vec<Versioned<T>> {
        self.read(|entries| entries.values().cloned().collect())
    }

    /// Runs `f` over the entries under the read lock.
    pub fn read<R>(&self, f: impl FnOnce(&HashMap<String, Versioned<T>>) -> R) -> R {
        let entries = self
            .entries
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&entries)
    }

    /// Notified after every change.
    pub fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }
}

async fn follow<T>(
    bucket: Bucket<T>,
    entries: Entries<T>,
    changed: Arc<Notify>,
    ready: watch::Sender<bool>,
    shutdown: CancellationToken,
) where
    T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    let mut next_revision = 1;
    while !shutdown.is_cancelled() {
        let mut watch = match bucket.kv().watch_all_from_revision(next_revision).await {
            Ok(watch) => watch,
            Err(error) => {
                tracing::warn!(error = %error, "cannot watch bucket, retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let entry = tokio::select! {
                _ = shutdown.cancelled() => return,
                entry = watch.next() => entry,
            };
            let entry = match entry {
                Some(Ok(entry)) => entry,
                Some(Err(error)) => {
                    tracing::warn!(error = %error, "bucket watch failed, re-creating it");
                    break;
                }
                None => break,
            };
            next_revision = entry.revision + 1;
            {
                let mut map = entries
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                match entry.operation {
                    Operation::Put => match bucket.decode(&entry.key, &entry.value) {
                        Ok(value) => {
                            map.insert(
                                entry.key.clone(),
                                Versioned {
                                    value,
                                    revision: entry.revision,
                                },
                            );
                        }
                        Err(error) => tracing::warn!(error = %error, "skipping unreadable value"),
                    },
                    Operation::Delete | Operation::Purge => {
                        map.remove(&entry.key);
                    }
                }
            }
            if entry.seen_current {
                ready.send_replace(true);
            }
            changed.notify_waiters();
        }
    }
}
