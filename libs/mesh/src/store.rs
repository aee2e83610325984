//! Typed KV buckets: JSON values read with their revision and written by compare-and-swap.

use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

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

/// A value and the KV revision it was read at (or written as).
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    /// The value.
    pub value: T,
    /// Its revision: pass it to [`Bucket::update`] to write over exactly this version.
    pub revision: u64,
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
        let entry = self
            .kv
            .entry(key)
            .await
            .map_err(|e| Error::unavailable("kv get", e))?;
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
        let bytes = self.encode(value)?;
        self.kv
            .create(key, bytes)
            .await
            .map_err(|e| match e.kind() {
                CreateErrorKind::AlreadyExists => Error::AlreadyExists {
                    key: key.to_owned(),
                },
                _ => Error::unavailable("kv create", e),
            })
    }

    /// Writes `value` over revision `revision` of `key`; [`Error::Conflict`] if it changed.
    pub async fn update(&self, key: &str, value: &T, revision: u64) -> Result<u64, Error> {
        let bytes = self.encode(value)?;
        self.kv
            .update(key, bytes, revision)
            .await
            .map_err(|e| match e.kind() {
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
        let ack = self
            .js
            .send_publish(subject, publish)
            .await
            .map_err(|e| Error::unavailable("kv update", e))?;
        match ack.await {
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
        self.kv
            .put(key, bytes)
            .await
            .map_err(|e| Error::unavailable("kv put", e))
    }

    /// Every current value. Reads key by key: meant for small buckets (nodes).
    pub async fn values(&self) -> Result<Vec<Versioned<T>>, Error> {
        let keys: Vec<String> = match self.kv.keys().await {
            Ok(keys) => keys
                .try_collect()
                .await
                .map_err(|e| Error::unavailable("kv keys", e))?,
            Err(e) => return Err(Error::unavailable("kv keys", e)),
        };
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
