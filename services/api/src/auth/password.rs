//! Passwords: the policy a new password must meet, hashing with Argon2id (the `argon2` crate's
//! defaults: 19 MiB, two passes, one lane, a random salt per hash) and checking. Both cost tens
//! of milliseconds of CPU on purpose, so they run on the blocking pool, never on a request's
//! task; and a login for a user that does not exist checks against a dummy hash, so that the
//! answer takes as long as for one that does.

use std::sync::OnceLock;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

/// The longest password accepted: Argon2 takes any length, but hashing megabytes per request
/// would hand an attacker the CPU.
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// The longest user name.
pub const MAX_USERNAME_LEN: usize = 64;

/// Why a user name or a password is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The user name breaks the naming rule.
    #[error(
        "a user name is 1 to {MAX_USERNAME_LEN} characters from A-Z, a-z, 0-9, `.`, `_`, `-` \
         and `@`"
    )]
    Username,
    /// The password is shorter than the minimum.
    #[error("the password must be at least {0} characters long")]
    TooShort(usize),
    /// The password is longer than the maximum.
    #[error("the password must be at most {MAX_PASSWORD_BYTES} bytes long")]
    TooLong,
}

/// Checks a user name: what login, tokens, jobs and audit records may carry. `:` is left out
/// so that no user can be mistaken for a provider's (`oidc:<subject>`); `nats` (the attribution
/// of jobs published on NATS) and `me` (the caller, in `/users/me`) are taken.
pub fn check_username(name: &str) -> Result<(), PolicyError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_USERNAME_LEN
        && name != "nats"
        && name != "me"
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'));
    if valid {
        Ok(())
    } else {
        Err(PolicyError::Username)
    }
}

/// Checks a new password against the policy: at least `min_length` characters, at most
/// [`MAX_PASSWORD_BYTES`] bytes.
pub fn check_password(password: &str, min_length: usize) -> Result<(), PolicyError> {
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(PolicyError::TooLong);
    }
    if password.chars().count() < min_length {
        return Err(PolicyError::TooShort(min_length));
    }
    Ok(())
}

/// The Argon2id hash of `password` in PHC string form, computed on the blocking pool.
pub async fn hash(password: String) -> String {
    let hashed = tokio::task::spawn_blocking(move || hash_now(&password)).await;
    capstan_mesh::task::joined(hashed).expect("the blocking pool is cancelled only at shutdown")
}

fn hash_now(password: &str) -> String {
    let salt = SaltString::encode_b64(&super::secret::random_bytes(16))
        .expect("16 bytes make a valid salt");
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("the default parameters hash any password")
        .to_string()
}

/// True when `password` matches `stored` (a PHC string); checked on the blocking pool. With no
/// stored hash (an unknown user), checks against a dummy one and answers false.
pub async fn verify(password: String, stored: Option<String>) -> bool {
    let checked = tokio::task::spawn_blocking(move || {
        let known = stored.is_some();
        let hash = stored.unwrap_or_else(|| dummy().to_owned());
        let matches = PasswordHash::new(&hash).is_ok_and(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        });
        known && matches
    });
    // A panic in the check is raised again (a bug is not a wrong password); cancelled, at
    // shutdown, it matched nothing.
    capstan_mesh::task::joined(checked.await).unwrap_or(false)
}

/// A hash of a random password, made once: what an unknown user's login is checked against.
fn dummy() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| hash_now(&super::secret::new_password()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_password_verifies_against_its_own_hash_only() {
        let hashed = hash("correct horse battery".into()).await;
        assert!(hashed.starts_with("$argon2id$"), "{hashed}");
        assert!(verify("correct horse battery".into(), Some(hashed.clone())).await);
        assert!(!verify("correct horse battery!".into(), Some(hashed.clone())).await);
        assert!(!verify("correct horse battery".into(), None).await);
        assert_ne!(hashed, hash("correct horse battery".into()).await, "salted");
    }

    #[test]
    fn the_policy_refuses_short_and_huge_passwords_and_odd_names() {
        assert_eq!(check_password("short", 12), Err(PolicyError::TooShort(12)));
        assert!(check_password("twelve chars", 12).is_ok());
        assert_eq!(
            check_password(&"x".repeat(MAX_PASSWORD_BYTES + 1), 12),
            Err(PolicyError::TooLong)
        );
        assert!(check_username("alice.smith@example.com").is_ok());
        for bad in ["", "oidc:bob", "nats", "me", "a b", &"a".repeat(65)] {
            assert_eq!(check_username(bad), Err(PolicyError::Username), "{bad}");
        }
    }
}
