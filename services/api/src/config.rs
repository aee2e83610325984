//! The API's configuration: flags and `CAPSTAN_*` variables, with the defaults `--help` shows.
//! Secrets (the signing key, the first administrator's password) are held as
//! [`Secret`]s, which never print, and their variables' values are hidden from `--help`.

use std::path::PathBuf;
use std::time::Duration;

use capstan_mesh::NatsArgs;
use capstan_mesh::config::parse_duration;

use crate::auth::Role;
use crate::auth::secret::Secret;

/// The shortest password taken unless `CAPSTAN_PASSWORD_MIN_LENGTH` says otherwise.
pub const DEFAULT_PASSWORD_MIN_LENGTH: usize = 12;

/// The API's configuration.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "capstan-api",
    version,
    about = "Capstan API: REST, history, logs"
)]
pub struct Config {
    /// NATS connection and submission limits.
    #[command(flatten)]
    pub nats: NatsArgs,

    /// Address to listen on.
    #[arg(long, env = "CAPSTAN_API_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,

    /// History database: `sqlite://path?mode=rwc` or `postgres://user:password@host/db`.
    /// Default: `history.db` in the data directory.
    #[arg(long, env = "CAPSTAN_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Directory for local state (the default SQLite history, a generated signing key).
    #[arg(long, env = "CAPSTAN_DATA_DIR", default_value = ".capstan/data")]
    pub data_dir: PathBuf,

    /// Identity, access and rate limits.
    #[command(flatten)]
    pub auth: AuthArgs,

    /// The keys sealing job secrets.
    #[command(flatten)]
    pub secret_keys: capstan_secrets::SecretKeyArgs,

    /// How many threads run its tasks.
    #[command(flatten)]
    pub runtime: capstan_mesh::RuntimeArgs,
}

/// Identity and access.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthArgs {
    /// Key signing access tokens (HMAC-SHA256, at least 32 bytes), shared by every API
    /// replica. Default: the key in `jwt.key` in the data directory, generated on first start.
    #[arg(long, env = "CAPSTAN_JWT_KEY", hide_env_values = true)]
    pub jwt_key: Option<Secret>,

    /// A file holding the signing key (instead of `CAPSTAN_JWT_KEY`).
    #[arg(long, env = "CAPSTAN_JWT_KEY_FILE")]
    pub jwt_key_file: Option<PathBuf>,

    /// Earlier signing keys, comma separated: tokens they signed stay valid until they expire,
    /// so the key rotates without logging anyone out.
    #[arg(
        long,
        env = "CAPSTAN_JWT_PREVIOUS_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub jwt_previous_keys: Vec<Secret>,

    /// The issuer (`iss`) of access tokens.
    #[arg(long, env = "CAPSTAN_JWT_ISSUER", default_value = "capstan")]
    pub jwt_issuer: String,

    /// The audience (`aud`) of access tokens.
    #[arg(long, env = "CAPSTAN_JWT_AUDIENCE", default_value = "capstan-api")]
    pub jwt_audience: String,

    /// How long an access token lives (at most 24h).
    #[arg(long, env = "CAPSTAN_ACCESS_TOKEN_TTL", default_value = "15m", value_parser = parse_duration)]
    pub access_token_ttl: Duration,

    /// How long a refresh token lives unused; each refresh gives a new one.
    #[arg(long, env = "CAPSTAN_REFRESH_TOKEN_TTL", default_value = "7d", value_parser = parse_duration)]
    pub refresh_token_ttl: Duration,

    /// The first administrator's password, used once: when the database has no user, the
    /// user `admin` is created with it. Without it a password is generated and logged once.
    #[arg(long, env = "CAPSTAN_ADMIN_PASSWORD", hide_env_values = true)]
    pub admin_password: Option<Secret>,

    /// The shortest password accepted.
    #[arg(long, env = "CAPSTAN_PASSWORD_MIN_LENGTH", default_value_t = DEFAULT_PASSWORD_MIN_LENGTH)]
    pub password_min_length: usize,

    /// Requests per second per principal (0: no limit); each replica enforces its share.
    #[arg(long, env = "CAPSTAN_RATE_LIMIT", default_value_t = 100)]
    pub rate_limit: u32,

    /// Requests per principal allowed in a burst.
    #[arg(long, env = "CAPSTAN_RATE_LIMIT_BURST", default_value_t = 200)]
    pub rate_limit_burst: u32,

    /// Login attempts per user name allowed in a burst; then one per
    /// `CAPSTAN_LOGIN_INTERVAL`.
    #[arg(long, env = "CAPSTAN_LOGIN_BURST", default_value_t = 10)]
    pub login_burst: u32,

    /// After a burst of login attempts, the time between two more for the same user name.
    #[arg(long, env = "CAPSTAN_LOGIN_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub login_interval: Duration,

    /// Login and refresh attempts per client address allowed in a burst; then one per second.
    #[arg(long, env = "CAPSTAN_LOGIN_ADDRESS_BURST", default_value_t = 60)]
    pub login_address_burst: u32,

    /// Host names (with or without a port) requests may be addressed to, comma separated;
    /// `*` allows any. Default: the listen address and localhost on its port.
    #[arg(long, env = "CAPSTAN_API_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,

    /// Origins (`https://ops.example.com`) browsers may call the API from, comma separated.
    /// CORS is off when none is listed.
    #[arg(long, env = "CAPSTAN_API_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,

    /// Proxies (IP addresses) whose `X-Forwarded-For` names the client, comma separated: for
    /// the login limits and the audit trail behind a load balancer. None by default: the peer
    /// is the client.
    #[arg(long, env = "CAPSTAN_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<std::net::IpAddr>,

    /// An address serving `/metrics` without a credential, for Prometheus inside the
    /// cluster. Off by default: `/metrics` on the API needs a token.
    #[arg(long, env = "CAPSTAN_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,

    /// OpenID Connect provider whose tokens are accepted (its issuer URL).
    #[arg(long, env = "CAPSTAN_OIDC_ISSUER", requires = "oidc_audience")]
    pub oidc_issuer: Option<String>,

    /// The audience the provider's tokens must name.
    #[arg(long, env = "CAPSTAN_OIDC_AUDIENCE")]
    pub oidc_audience: Option<String>,

    /// The claim of the provider's tokens that maps to a role.
    #[arg(long, env = "CAPSTAN_OIDC_ROLE_CLAIM", default_value = "groups")]
    pub oidc_role_claim: String,

    /// Claim values and their roles, `value=role` comma separated
    /// (`capstan-admins=admin,sre=operator`).
    #[arg(long, env = "CAPSTAN_OIDC_ROLES", value_delimiter = ',', value_parser = parse_role_mapping)]
    pub oidc_roles: Vec<(String, Role)>,

    /// The role of a provider's user whose claim maps to none; unset refuses them.
    #[arg(long, env = "CAPSTAN_OIDC_DEFAULT_ROLE")]
    pub oidc_default_role: Option<Role>,
}

fn parse_role_mapping(text: &str) -> Result<(String, Role), String> {
    let (value, role) = text
        .rsplit_once('=')
        .ok_or_else(|| format!("`{text}` is not value=role"))?;
    Ok((value.trim().to_owned(), role.trim().parse()?))
}

impl AuthArgs {
    /// Defaults, with `key` as the signing key and `admin_password` for the first
    /// administrator (for tests and tools).
    pub fn for_tests(key: &str, admin_password: &str) -> Self {
        Self {
            jwt_key: Some(Secret::new(key)),
            jwt_key_file: None,
            jwt_previous_keys: Vec::new(),
            jwt_issuer: "capstan".into(),
            jwt_audience: "capstan-api".into(),
            access_token_ttl: Duration::from_secs(900),
            refresh_token_ttl: Duration::from_secs(7 * 86_400),
            admin_password: Some(Secret::new(admin_password)),
            password_min_length: DEFAULT_PASSWORD_MIN_LENGTH,
            rate_limit: 0,
            rate_limit_burst: 200,
            login_burst: 10,
            login_interval: Duration::from_secs(30),
            login_address_burst: 1_000,
            allowed_hosts: Vec::new(),
            cors_origins: Vec::new(),
            trusted_proxies: Vec::new(),
            metrics_listen: None,
            oidc_issuer: None,
            oidc_audience: None,
            oidc_role_claim: "groups".into(),
            oidc_roles: Vec::new(),
            oidc_default_role: None,
        }
    }
}

/// The signing key tests share, and the first administrator's password they log in with.
pub const TEST_JWT_KEY: &str = "capstan-test-signing-key-not-for-production-use";
/// See [`TEST_JWT_KEY`].
pub const TEST_ADMIN_PASSWORD: &str = "admin-password-for-tests";

impl Config {
    /// Defaults, pointing at `nats_url` and `database_url`, listening on a free port, with the
    /// test signing key and administrator password.
    pub fn for_urls(nats_url: impl Into<String>, database_url: impl Into<String>) -> Self {
        Self {
            nats: NatsArgs::for_url(nats_url),
            listen: "127.0.0.1:0".into(),
            database_url: Some(database_url.into()),
            data_dir: PathBuf::from(".capstan/data"),
            auth: AuthArgs::for_tests(TEST_JWT_KEY, TEST_ADMIN_PASSWORD),
            secret_keys: capstan_secrets::SecretKeyArgs::default(),
            runtime: capstan_mesh::RuntimeArgs::default(),
        }
    }

    /// The history database URL to use.
    pub fn database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("history.db").display()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn role_mappings_parse_and_unknown_roles_are_refused() {
        assert_eq!(
            parse_role_mapping("cn=admins,ou=x=admin"),
            Ok(("cn=admins,ou=x".to_owned(), Role::Admin))
        );
        assert!(parse_role_mapping("ops=root").is_err());
        assert!(parse_role_mapping("ops").is_err());
    }

    #[test]
    fn the_configuration_never_prints_its_secrets() {
        let config = Config::parse_from([
            "capstan-api",
            "--jwt-key",
            "a-very-secret-signing-key-of-32-bytes!",
            "--admin-password",
            "a-very-secret-password",
        ]);
        let printed = format!("{config:?}");
        assert!(!printed.contains("very-secret"), "{printed}");
    }
}
