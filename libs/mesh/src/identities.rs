//! The NATS identities of a mesh: one NKEY user for the administrator, one per service, one per
//! executor node, `client` (what a person with the `nats` CLI gets), and any other clients and
//! viewers named. [`init`] writes each identity's seed into a directory (kept on later runs, so
//! re-running adds identities without changing anyone's key) and the server's `accounts` block:
//! the mesh's account with the administrator and the services, each with the permissions
//! [`capstan_protocol::access`] gives it, and one account per client or viewer, which imports
//! only what its role needs.
//!
//! No anonymous connection is accepted by a server using the block, and every identity but
//! `admin` may do only what its part needs.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use capstan_protocol::NodeId;
use capstan_protocol::access::{self, MESH_ACCOUNT, Permissions, Share};
pub use capstan_protocol::access::{ClientName, Identity};

use crate::error::Error;

/// What [`init`] wrote.
#[derive(Debug, Clone)]
pub struct Identities {
    /// The directory.
    pub dir: PathBuf,
    /// The `accounts` block for the server's configuration.
    pub accounts: PathBuf,
}

impl Identities {
    /// The seed file of `identity`.
    pub fn seed_file(&self, identity: &Identity) -> PathBuf {
        seed_path(&self.dir, identity)
    }
}

fn seed_path(dir: &Path, identity: &Identity) -> PathBuf {
    dir.join(format!("{}.nk", identity.name()))
}

/// The file holding the `accounts` block, beside the seeds.
pub const ACCOUNTS: &str = "accounts.conf";

/// What the `accounts` block grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grants {
    /// Each identity only what its part needs (what `capstan nats init` writes).
    Least,
    /// Every mesh identity everything: only for measuring what the permissions cost.
    All,
}

/// Writes a seed for each of `nodes`' mesh identities (and `client`) into `dir` that has none
/// yet (readable by its owner only), and the `accounts` block ([`ACCOUNTS`]) naming every one
/// with what it may do.
pub fn init(dir: &Path, nodes: &[NodeId]) -> Result<Identities, Error> {
    init_with(dir, &Identity::all(nodes), Grants::Least)
}

/// [`init`] for `identities`, granting `grants`.
pub fn init_with(dir: &Path, identities: &[Identity], grants: Grants) -> Result<Identities, Error> {
    let setup = |what: &str, error: std::io::Error| Error::setup(what.to_owned(), error);
    std::fs::create_dir_all(dir).map_err(|e| setup(&format!("directory {}", dir.display()), e))?;
    let mut mesh = String::new();
    let mut outside = String::new();
    for identity in identities {
        let public = public_key(dir, identity)?;
        let permissions = match grants {
            Grants::All if !identity.is_outside() => None,
            _ => identity.permissions(),
        };
        let user = user(identity, &public, permissions.as_ref());
        if identity.is_outside() {
            let _ = write!(
                outside,
                "  # {role} {name}: its own account, which sees only what it imports.\n  \
                 {account:?} {{\n    users = [\n{user}    ]\n    imports = [\n{imports}    ]\n  }}\n",
                role = if matches!(identity, Identity::Viewer(_)) {
                    "the viewer"
                } else {
                    "the client"
                },
                name = identity.name(),
                account = identity.account(),
                imports = shares(&identity.imports(), Some(MESH_ACCOUNT)),
            );
        } else {
            mesh.push_str(&user);
        }
    }
    let block = format!(
        "# The NATS identities of a Capstan mesh, written by `capstan nats init`; include it in\n\
         # the server's configuration. Each user is an NKEY whose seed is `<name>.nk` beside this\n\
         # file; no anonymous connection is accepted.\n\
         accounts {{\n  \
         # The administrator and the services: the streams and buckets live here.\n  \
         {MESH_ACCOUNT} {{\n    jetstream: enabled\n    users = [\n{mesh}    ]\n    \
         # What clients and viewers may import: each client's calls arrive on a subject\n    \
         # naming it, which no one in this account may publish on.\n    \
         exports = [\n{exports}    ]\n  }}\n{outside}}}\n",
        exports = shares(&access::exports(), None),
    );
    let accounts = dir.join(ACCOUNTS);
    std::fs::write(&accounts, block).map_err(|e| setup(&accounts.display().to_string(), e))?;
    Ok(Identities {
        dir: dir.to_owned(),
        accounts,
    })
}

/// The public key of `identity`'s seed in `dir`, writing a new seed when there is none.
fn public_key(dir: &Path, identity: &Identity) -> Result<String, Error> {
    let path = seed_path(dir, identity);
    if path.exists() {
        return Ok(crate::connect::read_seed(&path)?.public_key);
    }
    let pair = nkeys::KeyPair::new_user();
    let seed = pair
        .seed()
        .map_err(|e| Error::setup(path.display().to_string(), e.to_string()))?;
    let setup = |error: std::io::Error| Error::setup(path.display().to_string(), error);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(setup)?;
    writeln!(file, "{seed}").map_err(setup)?;
    Ok(pair.public_key())
}

/// One entry of a `users` list.
fn user(identity: &Identity, public: &str, permissions: Option<&Permissions>) -> String {
    let name = identity.name();
    let Some(permissions) = permissions else {
        return format!("      # {name}\n      {{ nkey: {public} }}\n");
    };
    let list = |subjects: &[String]| {
        subjects
            .iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(",\n            ")
    };
    let publish = if permissions.publish.is_empty() {
        "publish: { deny: \">\" }".to_owned()
    } else {
        format!(
            "publish: {{ allow: [\n            {}\n          ] }}",
            list(&permissions.publish)
        )
    };
    let answers = if permissions.answers {
        "\n          # answers requests made to it: one reply per request\n          allow_responses: true"
    } else {
        ""
    };
    format!(
        "      # {name}\n      {{ nkey: {public}, permissions: {{\n          {publish}\n          \
         subscribe: {{ allow: [\n            {}\n          ] }}{answers}\n      }} }}\n",
        list(&permissions.subscribe),
    )
}

/// The entries of an `exports` list (`from` is `None`) or an `imports` list from `from`.
fn shares(shares: &[Share], from: Option<&str>) -> String {
    let mut text = String::new();
    for share in shares {
        let _ = match (share, from) {
            (Share::Service { subject, .. }, None) => {
                writeln!(text, "      {{ service: {subject:?} }}")
            }
            (Share::Stream { subject }, None) => writeln!(text, "      {{ stream: {subject:?} }}"),
            (Share::Service { subject, to }, Some(account)) => writeln!(
                text,
                "      {{ service: {{ account: {account:?}, subject: {subject:?} }}, to: {to:?} }}"
            ),
            (Share::Stream { subject }, Some(account)) => writeln!(
                text,
                "      {{ stream: {{ account: {account:?}, subject: {subject:?} }} }}"
            ),
        };
    }
    text
}

/// The server configuration [`server_config`] writes.
pub const SERVER_CONFIG: &str = "nats-server.conf";

/// Writes a complete nats-server configuration into the identities' directory, unless one is
/// there already (an operator's edits are kept): the client port, JetStream with its store in
/// `store_dir`, the monitoring port, the `accounts` block included, and TLS ready to
/// uncomment. Returns its path.
pub fn server_config(identities: &Identities, store_dir: &Path) -> Result<PathBuf, Error> {
    let path = identities.dir.join(SERVER_CONFIG);
    if path.exists() {
        return Ok(path);
    }
    let text = format!(
        "# nats-server configuration for a Capstan mesh, written by `capstan nats init`. Run the\n\
         # server with `nats-server -c {SERVER_CONFIG}` from this directory's parent, or give the\n\
         # full path; `include` paths resolve beside this file. Capstan needs nats-server 2.12.6\n\
         # or newer.\n\
         \n\
         # Clients: the services, the executors, and the `nats` CLI.\n\
         port: 4222\n\
         \n\
         # Monitoring (health checks: /healthz?js-enabled-only=true). Not authenticated: keep it\n\
         # off public networks.\n\
         http_port: 8222\n\
         \n\
         # JetStream keeps the streams and buckets. Its store is sized to what their limits\n\
         # reserve together (raise it with any limit `capstan nats apply --max-bytes` raises);\n\
         # the disk must have room for what is actually written. For fsync on every write (the\n\
         # durable mode), add `sync_interval: always`.\n\
         jetstream {{\n  store_dir: {store:?}\n  max_file_store: {reserved}\n}}\n\
         \n\
         # Who may connect, and what each identity may do: no anonymous connection.\n\
         include \"{ACCOUNTS}\"\n\
         \n\
         # TLS: uncomment, give the server's certificate and key, and the CA that signs the\n\
         # clients' certificates for mutual TLS (`verify: true`); then give every service\n\
         # CAPSTAN_NATS_CA (and CAPSTAN_NATS_CERT / CAPSTAN_NATS_KEY).\n\
         # tls {{\n\
         #   cert_file: \"server-cert.pem\"\n\
         #   key_file: \"server-key.pem\"\n\
         #   ca_file: \"ca.pem\"\n\
         #   verify: true\n\
         # }}\n",
        store = store_dir.display().to_string(),
        reserved = capstan_protocol::topology::reserved_bytes(),
    );
    std::fs::write(&path, text).map_err(|e| Error::setup(path.display().to_string(), e))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use capstan_protocol::topology;

    fn nodes() -> Vec<NodeId> {
        ["exec-1", "exec-2"]
            .into_iter()
            .map(|n| NodeId::new(n).expect("valid"))
            .collect()
    }

    #[test]
    fn init_writes_one_private_seed_per_identity_and_names_each_in_the_accounts_block() {
        let dir = tempfile::tempdir().expect("dir");
        let written = init(dir.path(), &nodes()).expect("written");
        let block = std::fs::read_to_string(&written.accounts).expect("block");
        let names: Vec<String> = Identity::all(&nodes()).iter().map(Identity::name).collect();
        assert_eq!(
            names,
            [
                "admin".to_owned(),
                "registry".to_owned(),
                "scheduler".to_owned(),
                "api".to_owned(),
                topology::executor_consumer(&nodes()[0]),
                topology::executor_consumer(&nodes()[1]),
                "client".to_owned(),
            ]
        );
        for name in &names {
            let path = dir.path().join(format!("{name}.nk"));
            let mode = std::fs::metadata(&path)
                .expect("seed file")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}'s seed is private");
            let read = crate::connect::read_seed(&path).expect("a user seed");
            let (seed, public) = (read.seed, read.public_key);
            assert!(block.contains(&public), "{name} missing from the block");
            assert!(!block.contains(&seed), "the block holds a seed");
        }
        assert_eq!(block.matches("nkey: U").count(), names.len());
    }

    #[test]
    fn running_init_again_keeps_every_key_and_adds_new_nodes() {
        let dir = tempfile::tempdir().expect("dir");
        init(dir.path(), &nodes()).expect("written");
        let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).expect("read");
        let admin = read("admin.nk");
        let mut more = nodes();
        more.push(NodeId::new("exec-3").expect("valid"));
        init(dir.path(), &more).expect("written again");
        assert_eq!(read("admin.nk"), admin, "a key changed");
        let added = Identity::Executor(NodeId::new("exec-3").expect("valid"));
        assert!(dir.path().join(format!("{}.nk", added.name())).exists());
    }
}
