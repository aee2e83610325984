//! The stored login: which API the `capstan` command talks to and with what credential, in
//! one JSON file in the user's configuration directory, readable by its owner only.
//!
//! A password login keeps the session's tokens: a short-lived access token and the refresh
//! token that renews it. Refresh tokens are single-use (presenting one twice ends the whole
//! session), so a renewal holds an exclusive lock on the file while it reads, exchanges and
//! writes, and two commands run at once never spend the same refresh token. An API token is
//! kept as given; it does not expire unless its creator said so.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Error;

/// The environment variable naming the file, replacing the default location.
pub const CONFIG_ENV: &str = "CAPSTAN_CONFIG";

/// What `capstan login` stored.
#[derive(Clone, Serialize, Deserialize)]
pub struct Login {
    /// The API's base URL (`https://capstan.example.com`).
    pub url: String,
    /// A PEM file of certificate authorities to trust for the API besides the public ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// The credential.
    pub credential: Credential,
}

/// How the command authenticates.
#[derive(Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Credential {
    /// An API token (`cap_…`).
    Token {
        /// The token.
        token: String,
    },
    /// A password login's session.
    Session {
        /// Who logged in.
        username: String,
        /// The current access token.
        access_token: String,
        /// When it expires, in Unix seconds.
        expires_at: i64,
        /// The refresh token that renews it (single use).
        refresh_token: String,
    },
}

impl std::fmt::Debug for Credential {
    // NOTE: never prints a token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Token { .. } => f.write_str("Token(…)"),
            Self::Session { username, .. } => write!(f, "Session({username})"),
        }
    }
}

/// Where the login is stored: `$CAPSTAN_CONFIG`, else `capstan/login.json` under
/// `$XDG_CONFIG_HOME`, else under `~/.config`.
pub fn default_path() -> Result<PathBuf, Error> {
    if let Some(path) = std::env::var_os(CONFIG_ENV).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|p| !p.is_empty())
                .map(|home| PathBuf::from(home).join(".config"))
        })
        .ok_or_else(|| {
            Error::Config(
                "no configuration directory: set HOME, XDG_CONFIG_HOME or CAPSTAN_CONFIG".into(),
            )
        })?;
    Ok(base.join("capstan").join("login.json"))
}

/// The login file at one path.
pub struct Store {
    path: PathBuf,
}

impl Store {
    /// The store at `path`.
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored login, if there is one.
    pub fn load(&self) -> Result<Option<Login>, Error> {
        let mut file = match File::open(&self.path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(self.io("read", error)),
        };
        file.lock_shared().map_err(|e| self.io("lock", e))?;
        read_login(&mut file, &self.path).map(Some)
    }

    /// Stores `login`, replacing what was there; the file is created readable and writable
    /// by its owner only, and its directory by its owner only.
    pub fn save(&self, login: &Login) -> Result<(), Error> {
        let mut file = self.open_locked()?;
        write_login(&mut file, login, &self.path)
    }

    /// Removes the stored login; nothing happens if there is none.
    pub fn remove(&self) -> Result<(), Error> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(self.io("remove", error)),
        }
    }

    /// Runs `change` on the stored login with the file locked exclusively, and stores what
    /// it returns: the read, the change (a token refresh) and the write are one step for
    /// every other `capstan` command.
    pub async fn update<F, Fut>(&self, change: F) -> Result<Login, Error>
    where
        F: FnOnce(Login) -> Fut,
        Fut: std::future::Future<Output = Result<Login, Error>>,
    {
        let mut file = self.open_locked()?;
        let current = read_login(&mut file, &self.path)?;
        let changed = change(current).await?;
        write_login(&mut file, &changed, &self.path)?;
        Ok(changed)
    }

    fn open_locked(&self) -> Result<File, Error> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            create_private_dir(dir).map_err(|e| self.io("create the directory of", e))?;
        }
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(&self.path).map_err(|e| self.io("open", e))?;
        file.lock().map_err(|e| self.io("lock", e))?;
        // A file made before (or by hand) may be readable by others: narrow it.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(|e| self.io("protect", e))?;
        }
        Ok(file)
    }

    fn io(&self, what: &str, error: std::io::Error) -> Error {
        Error::Config(format!("cannot {what} {}: {error}", self.path.display()))
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

fn read_login(file: &mut File, path: &Path) -> Result<Login, Error> {
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
    if text.trim().is_empty() {
        return Err(Error::NotLoggedIn);
    }
    serde_json::from_str(&text).map_err(|e| {
        Error::Config(format!(
            "{} is not a login this version understands ({e}): run `capstan login` again",
            path.display()
        ))
    })
}

fn write_login(file: &mut File, login: &Login, path: &Path) -> Result<(), Error> {
    use std::io::Seek;
    let text = serde_json::to_vec_pretty(login).expect("a login always serializes");
    let failed = |e: std::io::Error| Error::Config(format!("cannot write {}: {e}", path.display()));
    file.set_len(0).map_err(failed)?;
    file.seek(std::io::SeekFrom::Start(0)).map_err(failed)?;
    file.write_all(&text).map_err(failed)?;
    file.write_all(b"\n").map_err(failed)?;
    file.sync_all().map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_login() -> Login {
        Login {
            url: "http://127.0.0.1:1".into(),
            ca_file: None,
            credential: Credential::Token {
                token: "cap_secret".into(),
            },
        }
    }

    #[test]
    fn a_saved_login_is_readable_by_its_owner_only_and_reads_back_the_same() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::new(dir.path().join("nested").join("login.json"));
        store.save(&token_login()).expect("saved");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(store.path())
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
            let dir_mode = std::fs::metadata(store.path().parent().expect("parent"))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(dir_mode & 0o777, 0o700);
        }
        let loaded = store.load().expect("loads").expect("present");
        assert_eq!(loaded.url, "http://127.0.0.1:1");
        assert!(matches!(loaded.credential, Credential::Token { token } if token == "cap_secret"));
    }

    #[test]
    fn a_login_file_left_readable_by_others_is_narrowed_when_written() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("login.json");
        std::fs::write(&path, "").expect("written");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
            Store::new(path.clone())
                .save(&token_login())
                .expect("saved");
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn no_file_means_no_login_and_an_unreadable_one_says_to_log_in_again() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::new(dir.path().join("login.json"));
        assert!(store.load().expect("no error").is_none());
        std::fs::write(store.path(), "{not json").expect("written");
        let error = store.load().err().expect("refused");
        assert!(error.to_string().contains("capstan login"), "{error}");
    }

    #[test]
    fn a_credential_never_shows_its_token_when_debug_printed() {
        let printed = format!("{:?}", token_login().credential);
        assert!(!printed.contains("cap_secret"), "{printed}");
    }
}
