//! Sealing job secrets. A secret's value is encrypted with XChaCha20-Poly1305 under one of the
//! mesh's secret keys, with a fresh random 192-bit nonce, and bound to its job and its name as
//! associated data: a sealed value copied into another job, or under another name, does not
//! open. A secret an administrator stores is bound to its stored name instead, and opens only
//! as that stored secret. Only the API (which seals what a REST client sends in clear) and the executors (which
//! open what an attempt needs, in memory) hold the keys.
//!
//! Keys come from `CAPSTAN_SECRET_KEYS` (or a file holding the same text): comma-separated
//! `<id>:<base64 of 32 bytes>`, the first the one new secrets are sealed with, the others still
//! opened, so that keys rotate without a flag day. `capstan secrets key` makes one.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use capstan_protocol::JobId;
use capstan_protocol::secret::{SealedSecret, valid_key_id};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use zeroize::Zeroizing;

/// Bytes of a key.
pub const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;

/// Why secrets could not be sealed or opened. No variant holds a secret's value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The key list could not be read.
    #[error("secret keys: {0}")]
    Keys(String),
    /// The value was sealed with a key this process does not hold.
    #[error("sealed with key `{0}`, which is not among the secret keys here")]
    UnknownKey(String),
    /// The value is not one this job's secret of this name was sealed into, or was altered.
    #[error("does not open: altered, or sealed for another job or name")]
    Tampered,
    /// The opened value is not UTF-8 text.
    #[error("does not hold UTF-8 text")]
    NotText,
    /// Sealing failed (the system's random source).
    #[error("cannot seal: {0}")]
    Seal(String),
}

/// One named key.
struct Key {
    id: String,
    cipher: XChaCha20Poly1305,
}

/// The secret keys of a process: the first seals, every one opens.
#[derive(Clone)]
pub struct KeyRing {
    keys: std::sync::Arc<Vec<Key>>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|k| k.id.as_str()).collect();
        f.debug_struct("KeyRing").field("ids", &ids).finish()
    }
}

impl FromStr for KeyRing {
    type Err = Error;

    /// Parses `<id>:<base64 key>[,<id>:<base64 key>…]`.
    fn from_str(text: &str) -> Result<Self, Error> {
        let mut keys: Vec<Key> = Vec::new();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (id, encoded) = entry
                .split_once(':')
                .ok_or_else(|| Error::Keys("each key is `<id>:<base64 of 32 bytes>`".into()))?;
            if !valid_key_id(id) {
                return Err(Error::Keys(format!(
                    "key id `{id}`: 1 to 32 letters, digits, `-` or `_`"
                )));
            }
            if keys.iter().any(|k| k.id == id) {
                return Err(Error::Keys(format!("key id `{id}` given twice")));
            }
            let bytes = Zeroizing::new(
                STANDARD
                    .decode(encoded.trim())
                    .map_err(|_| Error::Keys(format!("key `{id}` is not base64")))?,
            );
            if bytes.len() != KEY_LEN {
                return Err(Error::Keys(format!(
                    "key `{id}` is {} bytes; a key is {KEY_LEN}",
                    bytes.len()
                )));
            }
            let cipher = XChaCha20Poly1305::new_from_slice(&bytes)
                .map_err(|_| Error::Keys(format!("key `{id}` has the wrong length")))?;
            keys.push(Key {
                id: id.to_owned(),
                cipher,
            });
        }
        if keys.is_empty() {
            return Err(Error::Keys("no key given".into()));
        }
        Ok(Self {
            keys: std::sync::Arc::new(keys),
        })
    }
}

impl KeyRing {
    /// Reads a key list from the file at `path` (its whole text, as [`KeyRing::from_str`]).
    pub fn from_file(path: &std::path::Path) -> Result<Self, Error> {
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| Error::Keys(format!("{}: {e}", path.display())))?,
        );
        text.parse()
    }

    /// A new random key entry, `<id>:<base64>`, for a key list.
    pub fn generate_entry(id: &str) -> Result<String, Error> {
        if !valid_key_id(id) {
            return Err(Error::Keys(format!(
                "key id `{id}`: 1 to 32 letters, digits, `-` or `_`"
            )));
        }
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        getrandom::fill(key.as_mut()).map_err(|e| Error::Seal(e.to_string()))?;
        Ok(format!("{id}:{}", STANDARD.encode(key.as_ref())))
    }

    /// The id of the key new secrets are sealed with.
    pub fn sealing_key(&self) -> &str {
        &self.keys[0].id
    }

    /// Seals `value`, the secret `name` of `job`.
    pub fn seal(&self, job: JobId, name: &str, value: &str) -> Result<SealedSecret, Error> {
        self.seal_to(&Binding::Job(job, name), value)
    }

    /// Opens `sealed`, the secret `name` of `job`. The value is wiped from memory when dropped.
    pub fn open(
        &self,
        job: JobId,
        name: &str,
        sealed: &SealedSecret,
    ) -> Result<Zeroizing<String>, Error> {
        self.open_from(&Binding::Job(job, name), sealed)
    }

    /// Seals `value` again under the current sealing key, if it was sealed with another:
    /// what a key rotation does to each stored secret. `None` when it is current already.
    pub fn reseal(
        &self,
        job: JobId,
        name: &str,
        sealed: &SealedSecret,
    ) -> Result<Option<SealedSecret>, Error> {
        self.reseal_to(&Binding::Job(job, name), sealed)
    }

    /// Seals `value`, the secret an administrator stores as `name` (bound to that name, not to
    /// a job: a stored value copied into a job's `secrets` does not open).
    pub fn seal_stored(&self, name: &str, value: &str) -> Result<SealedSecret, Error> {
        self.seal_to(&Binding::Stored(name), value)
    }

    /// Opens the stored secret `name`.
    pub fn open_stored(
        &self,
        name: &str,
        sealed: &SealedSecret,
    ) -> Result<Zeroizing<String>, Error> {
        self.open_from(&Binding::Stored(name), sealed)
    }

    /// [`KeyRing::reseal`] for the stored secret `name`.
    pub fn reseal_stored(
        &self,
        name: &str,
        sealed: &SealedSecret,
    ) -> Result<Option<SealedSecret>, Error> {
        self.reseal_to(&Binding::Stored(name), sealed)
    }

    /// Seals the credential field `field` (`password`, `private_key`, `passphrase`) of the
    /// remote system `system` (bound to both: it opens for no other system, field or job).
    pub fn seal_system(
        &self,
        system: &str,
        field: &str,
        value: &str,
    ) -> Result<SealedSecret, Error> {
        self.seal_to(&Binding::System(system, field), value)
    }

    /// Opens the credential field `field` of the remote system `system`.
    pub fn open_system(
        &self,
        system: &str,
        field: &str,
        sealed: &SealedSecret,
    ) -> Result<Zeroizing<String>, Error> {
        self.open_from(&Binding::System(system, field), sealed)
    }

    /// [`KeyRing::reseal`] for a remote system's credential field.
    pub fn reseal_system(
        &self,
        system: &str,
        field: &str,
        sealed: &SealedSecret,
    ) -> Result<Option<SealedSecret>, Error> {
        self.reseal_to(&Binding::System(system, field), sealed)
    }

    fn seal_to(&self, binding: &Binding<'_>, value: &str) -> Result<SealedSecret, Error> {
        let key = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| Error::Seal(e.to_string()))?;
        let aad = binding.associated(&key.id);
        let sealed = key
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: value.as_bytes(),
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| Error::Seal("encryption failed".into()))?;
        let mut payload = Vec::with_capacity(NONCE_LEN + sealed.len());
        payload.extend_from_slice(&nonce);
        payload.extend_from_slice(&sealed);
        let text = format!(
            "{}{}:{}",
            SealedSecret::PREFIX,
            key.id,
            URL_SAFE_NO_PAD.encode(payload)
        );
        SealedSecret::parse(text).map_err(Error::Seal)
    }

    fn open_from(
        &self,
        binding: &Binding<'_>,
        sealed: &SealedSecret,
    ) -> Result<Zeroizing<String>, Error> {
        let key = self
            .keys
            .iter()
            .find(|k| k.id == sealed.key_id())
            .ok_or_else(|| Error::UnknownKey(sealed.key_id().to_owned()))?;
        let payload = URL_SAFE_NO_PAD
            .decode(sealed.payload())
            .map_err(|_| Error::Tampered)?;
        if payload.len() < NONCE_LEN + TAG_LEN {
            return Err(Error::Tampered);
        }
        let (nonce, ciphertext) = payload.split_at(NONCE_LEN);
        let aad = binding.associated(&key.id);
        let opened = Zeroizing::new(
            key.cipher
                .decrypt(
                    XNonce::from_slice(nonce),
                    Payload {
                        msg: ciphertext,
                        aad: aad.as_bytes(),
                    },
                )
                .map_err(|_| Error::Tampered)?,
        );
        let text = std::str::from_utf8(&opened).map_err(|_| Error::NotText)?;
        Ok(Zeroizing::new(text.to_owned()))
    }

    fn reseal_to(
        &self,
        binding: &Binding<'_>,
        sealed: &SealedSecret,
    ) -> Result<Option<SealedSecret>, Error> {
        if sealed.key_id() == self.sealing_key() {
            return Ok(None);
        }
        let value = self.open_from(binding, sealed)?;
        self.seal_to(binding, &value).map(Some)
    }
}

/// Where a service finds the secret keys (`CAPSTAN_SECRET_KEYS`, or a file).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SecretKeyArgs {
    /// Secret keys for job secrets, `<id>:<base64 of 32 bytes>`, comma separated: the first
    /// seals new secrets, every one opens (keep an old key listed until no live job needs it).
    /// Make one with `capstan secrets key --id ID`. The API and every executor need the same
    /// list; without one, jobs with secrets are refused.
    #[arg(
        long = "secret-keys",
        env = "CAPSTAN_SECRET_KEYS",
        hide_env_values = true
    )]
    pub keys: Option<KeyRing>,
    /// A file holding the secret keys (instead of `CAPSTAN_SECRET_KEYS`).
    #[arg(long = "secret-keys-file", env = "CAPSTAN_SECRET_KEYS_FILE")]
    pub file: Option<std::path::PathBuf>,
}

impl SecretKeyArgs {
    /// The keys given, if any.
    pub fn load(&self) -> Result<Option<KeyRing>, Error> {
        match (&self.keys, &self.file) {
            (Some(keys), _) => Ok(Some(keys.clone())),
            (None, Some(path)) => KeyRing::from_file(path).map(Some),
            (None, None) => Ok(None),
        }
    }
}

/// What a sealed value belongs to.
enum Binding<'a> {
    /// The secret of this name in this job's spec.
    Job(JobId, &'a str),
    /// The secret an administrator stored under this name.
    Stored(&'a str),
    /// A credential field of the remote system of this name.
    System(&'a str, &'a str),
}

impl Binding<'_> {
    /// The associated data: the format, what the value belongs to, and the key.
    fn associated(&self, key: &str) -> String {
        match self {
            Self::Job(job, name) => format!("capstan-secret/v1\n{job}\n{name}\n{key}"),
            Self::Stored(name) => format!("capstan-stored-secret/v1\n{name}\n{key}"),
            Self::System(system, field) => {
                format!("capstan-system-credential/v1\n{system}\n{field}\n{key}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(ids: &[&str]) -> KeyRing {
        ids.iter()
            .map(|id| KeyRing::generate_entry(id).expect("a key"))
            .collect::<Vec<_>>()
            .join(",")
            .parse()
            .expect("a key list")
    }

    #[test]
    fn a_sealed_secret_opens_for_its_job_and_name_only() {
        let keys = ring(&["k1"]);
        let job = JobId::generate();
        let sealed = keys.seal(job, "TOKEN", "canary-value").expect("sealed");
        assert!(!sealed.as_str().contains("canary-value"));
        assert_eq!(sealed.key_id(), "k1");
        assert_eq!(
            keys.open(job, "TOKEN", &sealed).expect("opens").as_str(),
            "canary-value"
        );
        assert_eq!(
            keys.open(JobId::generate(), "TOKEN", &sealed),
            Err(Error::Tampered)
        );
        assert_eq!(keys.open(job, "OTHER", &sealed), Err(Error::Tampered));
    }

    #[test]
    fn sealing_twice_gives_different_texts() {
        let keys = ring(&["k1"]);
        let job = JobId::generate();
        let one = keys.seal(job, "A", "same").expect("sealed");
        let two = keys.seal(job, "A", "same").expect("sealed");
        assert_ne!(one, two, "a nonce was reused");
    }

    #[test]
    fn an_altered_payload_or_a_foreign_key_does_not_open() {
        let keys = ring(&["k1"]);
        let job = JobId::generate();
        let sealed = keys.seal(job, "A", "value").expect("sealed");
        let mut payload = sealed.payload().to_owned().into_bytes();
        let last = payload.len() - 1;
        payload[last] = if payload[last] == b'A' { b'B' } else { b'A' };
        let altered = SealedSecret::parse(format!(
            "sealed:v1:k1:{}",
            String::from_utf8(payload).expect("ascii")
        ))
        .expect("still the form");
        assert_eq!(keys.open(job, "A", &altered), Err(Error::Tampered));
        let other = ring(&["k2"]);
        assert_eq!(
            other.open(job, "A", &sealed),
            Err(Error::UnknownKey("k1".into()))
        );
        // Same id, different key material.
        assert_eq!(ring(&["k1"]).open(job, "A", &sealed), Err(Error::Tampered));
    }

    #[test]
    fn after_a_rotation_old_secrets_open_and_reseal_under_the_new_key() {
        let old_entry = KeyRing::generate_entry("k1").expect("a key");
        let old: KeyRing = old_entry.parse().expect("keys");
        let job = JobId::generate();
        let sealed = old.seal(job, "A", "value").expect("sealed");
        // The new list: a new first key, the old one kept for opening.
        let new_entry = KeyRing::generate_entry("k2").expect("a key");
        let rotated: KeyRing = format!("{new_entry},{old_entry}").parse().expect("keys");
        assert_eq!(rotated.sealing_key(), "k2");
        assert_eq!(
            rotated.open(job, "A", &sealed).expect("opens").as_str(),
            "value"
        );
        let resealed = rotated
            .reseal(job, "A", &sealed)
            .expect("reseals")
            .expect("was on the old key");
        assert_eq!(resealed.key_id(), "k2");
        assert_eq!(rotated.reseal(job, "A", &resealed), Ok(None));
    }

    #[test]
    fn a_stored_secret_opens_under_its_name_only_and_never_as_a_jobs() {
        let keys = ring(&["k1"]);
        let sealed = keys.seal_stored("db", "canary-value").expect("sealed");
        assert!(!sealed.as_str().contains("canary-value"));
        assert_eq!(
            keys.open_stored("db", &sealed).expect("opens").as_str(),
            "canary-value"
        );
        assert_eq!(keys.open_stored("other", &sealed), Err(Error::Tampered));
        let job = JobId::generate();
        assert_eq!(keys.open(job, "db", &sealed), Err(Error::Tampered));
        let for_job = keys.seal(job, "db", "value").expect("sealed");
        assert_eq!(keys.open_stored("db", &for_job), Err(Error::Tampered));
        let rotated: KeyRing = format!(
            "{},{}",
            KeyRing::generate_entry("k2").expect("a key"),
            "k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
        )
        .parse()
        .expect("keys");
        // Another k1: does not open, so it is not resealed either.
        assert_eq!(rotated.reseal_stored("db", &sealed), Err(Error::Tampered));
    }

    #[test]
    fn a_systems_credential_opens_for_its_system_and_field_only() {
        let k1 = KeyRing::generate_entry("k1").expect("a key");
        let keys: KeyRing = k1.parse().expect("keys");
        let sealed = keys
            .seal_system("web-1", "password", "canary-value")
            .expect("sealed");
        assert!(!sealed.as_str().contains("canary-value"));
        let opened = keys.open_system("web-1", "password", &sealed);
        assert_eq!(opened.expect("opens").as_str(), "canary-value");
        for (system, field) in [("web-2", "password"), ("web-1", "passphrase")] {
            let opened = keys.open_system(system, field, &sealed);
            assert_eq!(opened, Err(Error::Tampered), "{system} {field}");
        }
        assert_eq!(keys.open_stored("web-1", &sealed), Err(Error::Tampered));
        let stored = keys.seal_stored("web-1", "value").expect("sealed");
        let opened = keys.open_system("web-1", "password", &stored);
        assert_eq!(opened, Err(Error::Tampered));
        let rotated: KeyRing = format!("{},{k1}", KeyRing::generate_entry("k2").expect("a key"))
            .parse()
            .expect("keys");
        let resealed = rotated
            .reseal_system("web-1", "password", &sealed)
            .expect("opens")
            .expect("was on the old key");
        assert_eq!(resealed.key_id(), "k2");
        let opened = rotated.open_system("web-1", "password", &resealed);
        assert_eq!(opened.expect("opens").as_str(), "canary-value");
    }

    #[test]
    fn a_bad_key_list_is_refused_naming_the_problem_not_the_key() {
        for (text, says) in [
            ("", "no key"),
            ("k1", "`<id>:<base64"),
            ("k.1:AAAA", "key id"),
            ("k1:***", "not base64"),
            ("k1:AAAA", "3 bytes"),
        ] {
            let error = text.parse::<KeyRing>().expect_err(text).to_string();
            assert!(error.contains(says), "{text}: {error}");
        }
        let entry = KeyRing::generate_entry("k1").expect("a key");
        let twice = format!("{entry},{entry}");
        let error = twice.parse::<KeyRing>().expect_err("twice").to_string();
        assert!(error.contains("twice"), "{error}");
        assert!(!error.contains(entry.split_once(':').expect("entry").1));
        let keys: KeyRing = entry.parse().expect("keys");
        assert!(!format!("{keys:?}").contains(entry.split_once(':').expect("entry").1));
    }
}
