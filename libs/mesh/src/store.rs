//! Typed KV buckets: JSON values read with their revision and written by compare-and-swap.
//!
//! A change that depends on the value it replaces goes through [`Bucket::modify`]: read, let a
//! decision say what to write, compare-and-swap on the revision read, and on a lost race read
//! and decide again, a bounded number of times. What the decision means (and what the write
//! causes afterwards) stays with the caller.

use std::fmt;
use std::marker::PhantomData;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self};
use bytes::Bytes;
use capstan_protocol::codec::{self, Encoding};
use futures::TryStreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::Error;
use crate::metrics;

/// A value and the KV revision it was read at (or written as).
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    /// The value.
    pub value: T,
    /// Its revision: pass it to [`Bucket::update`] to write over exactly this version.
    pub revision: u64,
}

/// How many times [`Bucket::modify`] decides and writes before it gives up with
/// [`Error::KeptChanging`]. Each lost compare-and-swap means another writer got in between: a
/// key that changes this often is contended, and its writer is better off retrying later.
pub const MODIFY_ATTEMPTS: usize = 8;

/// What a [`Bucket::modify`] decision does with the value it was shown.
#[derive(Debug, Clone, PartialEq)]
pub enum Change<T, S> {
    /// Write this value over the revision read (create the key when it was absent).
    Write(T),
    /// Like [`Change::Write`], and the entry expires `ttl` after this write. Needs a bucket
    /// with per-key TTLs.
    WriteExpiring(T, Duration),
    /// Write nothing: [`Bucket::modify`] returns [`Modified::Stopped`] with this.
    Stop(S),
}

/// What [`Bucket::modify`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Modified<T, S> {
    /// The decision's value was written.
    Written {
        /// The value as written, with its new revision.
        written: Versioned<T>,
        /// The value it was decided from (`None`: the key was absent).
        previous: Option<Versioned<T>>,
    },
    /// The decision wrote nothing and returned this.
    Stopped(S),
}

/// A KV bucket holding JSON values of one type.
pub struct Bucket<T> {
    kv: kv::Store,
    js: jetstream::Context,
    name: String,
    _value: PhantomData<fn() -> T>,
}

impl<T> Clone for Bucket<T> {
    fn clone(&self) -> Self {
        Self {
            kv: self.kv.clone(),
            js: self.js.clone(),
            name: self.name.clone(),
            _value: PhantomData,
        }
    }
}

impl<T> fmt::Debug for Bucket<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bucket").field("name", &self.name).finish()
    }
}

impl<T: Serialize + DeserializeOwned> Bucket<T> {
    /// Wraps an open bucket.
    pub fn new(kv: kv::Store, js: jetstream::Context, name: &str) -> Self {
        Self {
            kv,
            js,
            name: name.to_owned(),
            _value: PhantomData,
        }
    }

    /// The underlying store, for watching.
    pub fn kv(&self) -> &kv::Store {
        &self.kv
    }

    /// The current value of `key`, or `None` if absent or deleted.
    pub async fn get(&self, key: &str) -> Result<Option<Versioned<T>>, Error> {
        let started = Instant::now();
        let entry = self
            .kv
            .entry(key)
            .await
            .map_err(|e| Error::unavailable("kv get", e))?;
        metrics::mesh().request("kv get", started);
        match entry {
            Some(entry) if entry.operation == Operation::Put => Ok(Some(Versioned {
                value: self.decode(key, &entry.value)?,
                revision: entry.revision,
            })),
            _ => Ok(None),
        }
    }

    /// Decodes a stored value (for watchers that receive raw entries).
    pub fn decode(&self, key: &str, value: &[u8]) -> Result<T, Error> {
        codec::decode(Encoding::Json, value).map_err(|source| Error::Corrupt {
            key: format!("{}/{key}", self.name),
            source,
        })
    }

    /// Writes `value` under `key` if the key is absent; [`Error::AlreadyExists`] otherwise.
    pub async fn create(&self, key: &str, value: &T) -> Result<u64, Error> {
        self.create_expiring(key, value, None).await
    }

    /// Like [`Bucket::create`], the entry expiring `ttl` after this write when `ttl` is set.
    async fn create_expiring(
        &self,
        key: &str,
        value: &T,
        ttl: Option<Duration>,
    ) -> Result<u64, Error> {
        let bytes = self.encode(value)?;
        let started = Instant::now();
        let created = match ttl {
            Some(ttl) => self.kv.create_with_ttl(key, bytes, ttl).await,
            None => self.kv.create(key, bytes).await,
        };
        metrics::mesh().request("kv create", started);
        created.map_err(|e| match e.kind() {
            CreateErrorKind::AlreadyExists => Error::AlreadyExists {
                key: key.to_owned(),
            },
            _ => Error::unavailable("kv create", e),
        })
    }

    /// Writes `value` over revision `revision` of `key`; [`Error::Conflict`] if it changed.
    pub async fn update(&self, key: &str, value: &T, revision: u64) -> Result<u64, Error> {
        let bytes = self.encode(value)?;
        let started = Instant::now();
        let updated = self.kv.update(key, bytes, revision).await;
        metrics::mesh().request("kv update", started);
        updated.map_err(|e| match e.kind() {
            UpdateErrorKind::WrongLastRevision => Error::Conflict {
                key: key.to_owned(),
                revision,
            },
            _ => Error::unavailable("kv update", e),
        })
    }

    /// Like [`Bucket::update`], and the entry expires `ttl` after this write. Needs a bucket
    /// with per-key TTLs.
    pub async fn update_with_ttl(
        &self,
        key: &str,
        value: &T,
        revision: u64,
        ttl: Duration,
    ) -> Result<u64, Error> {
        let bytes = self.encode(value)?;
        // async-nats exposes a TTL on create only; an update is the same publish to the
        // bucket's subject with the expected-revision header, plus Nats-TTL.
        let subject = capstan_protocol::subjects::kv_key(&self.name, key);
        let publish = PublishMessage::build()
            .payload(bytes)
            .expected_last_subject_sequence(revision)
            .ttl(ttl);
        let started = Instant::now();
        let ack = self
            .js
            .send_publish(subject, publish)
            .await
            .map_err(|e| Error::unavailable("kv update", e))?
            .await;
        metrics::mesh().request("kv update", started);
        match ack {
            Ok(ack) => Ok(ack.sequence),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Err(Error::Conflict {
                key: key.to_owned(),
                revision,
            }),
            Err(e) => Err(Error::unavailable("kv update", e)),
        }
    }

    /// Writes `value` under `key` whatever was there.
    pub async fn put(&self, key: &str, value: &T) -> Result<u64, Error> {
        let bytes = self.encode(value)?;
        let started = Instant::now();
        let put = self.kv.put(key, bytes).await;
        metrics::mesh().request("kv put", started);
        put.map_err(|e| Error::unavailable("kv put", e))
    }

    /// Changes `key` by compare-and-swap on what it holds: reads it, asks `decide` what to do
    /// with the value read (`None`: absent), writes that over the revision read (a create
    /// where the key was absent), and when another writer got in between, reads again and asks
    /// again. `decide` is called once per read, at most [`MODIFY_ATTEMPTS`] times, so it
    /// should only decide; what the write causes is the caller's to do once this returns.
    ///
    /// Fails with [`Error::KeptChanging`] when every write lost, and with the first other
    /// error as it came (a write that failed for want of NATS may have been stored: a caller
    /// that must know reads the key back, as [`crate::lifecycle::modify`] does for jobs).
    pub async fn modify<S>(
        &self,
        key: &str,
        decide: impl FnMut(Option<&Versioned<T>>) -> Change<T, S>,
    ) -> Result<Modified<T, S>, Error> {
        let current = self.get(key).await?;
        self.modify_from(key, current, decide).await
    }

    /// Applies `mark` to the value at `key` and writes it when `mark` says it changed it (a
    /// request to stop, say, asked once). `None` when there is no such key; otherwise whether
    /// this wrote.
    pub async fn mark(
        &self,
        key: &str,
        mut mark: impl FnMut(&mut T) -> bool,
    ) -> Result<Option<bool>, Error>
    where
        T: Clone,
    {
        let modified = self
            .modify(key, |found| {
                let Some(found) = found else {
                    return Change::Stop(false);
                };
                let mut value = found.value.clone();
                if mark(&mut value) {
                    Change::Write(value)
                } else {
                    Change::Stop(true)
                }
            })
            .await?;
        Ok(match modified {
            Modified::Stopped(false) => None,
            Modified::Stopped(true) => Some(false),
            Modified::Written { .. } => Some(true),
        })
    }

    /// Like [`Bucket::modify`], starting from `known`, what the caller already holds of the
    /// key (a copy carried by a message; `None`: the key is taken to be absent), so the first
    /// write costs no read. When `known` was out of date its write loses, and the key is read
    /// as usual.
    pub async fn modify_from<S>(
        &self,
        key: &str,
        known: Option<Versioned<T>>,
        mut decide: impl FnMut(Option<&Versioned<T>>) -> Change<T, S>,
    ) -> Result<Modified<T, S>, Error> {
        let mut current = known;
        let mut lost = 0;
        loop {
            let (value, ttl) = match decide(current.as_ref()) {
                Change::Stop(result) => return Ok(Modified::Stopped(result)),
                Change::Write(value) => (value, None),
                Change::WriteExpiring(value, ttl) => (value, Some(ttl)),
            };
            let written = match (&current, ttl) {
                (None, ttl) => self.create_expiring(key, &value, ttl).await,
                (Some(current), None) => self.update(key, &value, current.revision).await,
                (Some(current), Some(ttl)) => {
                    self.update_with_ttl(key, &value, current.revision, ttl)
                        .await
                }
            };
            match written {
                Ok(revision) => {
                    return Ok(Modified::Written {
                        written: Versioned { value, revision },
                        previous: current,
                    });
                }
                Err(Error::Conflict { .. } | Error::AlreadyExists { .. }) => {}
                Err(error) => return Err(error),
            }
            lost += 1;
            if lost == MODIFY_ATTEMPTS {
                return Err(Error::KeptChanging {
                    key: key.to_owned(),
                });
            }
            current = self.get(key).await?;
        }
    }

    /// Every key that holds a value.
    pub async fn keys(&self) -> Result<Vec<String>, Error> {
        match self.kv.keys().await {
            Ok(keys) => keys
                .try_collect()
                .await
                .map_err(|e| Error::unavailable("kv keys", e)),
            Err(e) => Err(Error::unavailable("kv keys", e)),
        }
    }

    /// Every current value. Reads key by key: meant for small buckets (nodes).
    pub async fn values(&self) -> Result<Vec<Versioned<T>>, Error> {
        let keys = self.keys().await?;
        let mut values = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some(value) = self.get(&key).await? {
                values.push(value);
            }
        }
        Ok(values)
    }

    fn encode(&self, value: &T) -> Result<Bytes, Error> {
        Ok(Bytes::from(codec::encode(Encoding::Json, value)?))
    }
}
