//! The NATS identities of a mesh: one NKEY user for the administrator, one per service, one per
//! executor node, and `client`, what a person with the `nats` CLI gets. [`init`] writes each
//! identity's seed into a directory (kept on later runs, so re-running adds nodes without
//! changing anyone's key) and the server's `authorization` block naming them, for a
//! nats-server configuration to `include`.
//!
//! No anonymous connection is accepted by a server using the block. The `client` identity may
//! only submit (`capstan.jobs.submit`, `capstan.jobs.create`), cancel (`capstan.jobs.cancel`),
//! and read events and logs; the others are not yet narrowed to what each service needs.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use capstan_protocol::{NodeId, subjects, topology};

use crate::error::Error;

/// Who connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// Creates and upgrades the topology; runs administrative commands.
    Admin,
    /// The registry service.
    Registry,
    /// The scheduler service.
    Scheduler,
    /// The API service.
    Api,
    /// The executor of one node.
    Executor(NodeId),
    /// A person with the `nats` CLI, or a program submitting jobs.
    Client,
}

impl Identity {
    /// The identity's name: its seed file is `<name>.nk`.
    pub fn name(&self) -> String {
        match self {
            Self::Admin => "admin".to_owned(),
            Self::Registry => "registry".to_owned(),
            Self::Scheduler => "scheduler".to_owned(),
            Self::Api => "api".to_owned(),
            // Named as the node's dispatch consumer, `executor-<node>`.
            Self::Executor(node) => topology::executor_consumer(node),
            Self::Client => "client".to_owned(),
        }
    }

    /// Every identity of a mesh whose executor nodes are `nodes`.
    pub fn all(nodes: &[NodeId]) -> Vec<Self> {
        let mut all = vec![Self::Admin, Self::Registry, Self::Scheduler, Self::Api];
        all.extend(nodes.iter().cloned().map(Self::Executor));
        all.push(Self::Client);
        all
    }

    /// What the identity may publish and subscribe to, or `None` for no restriction.
    fn permissions(&self) -> Option<(Vec<&'static str>, Vec<&'static str>)> {
        match self {
            Self::Client => Some((
                vec![subjects::SUBMIT, subjects::CREATE, subjects::CANCEL],
                vec![subjects::EVENTS_ALL, subjects::LOGS_ALL, "_INBOX.>"],
            )),
            _ => None,
        }
    }
}

/// What [`init`] wrote.
#[derive(Debug, Clone)]
pub struct Identities {
    /// The directory.
    pub dir: PathBuf,
    /// The `authorization` block for the server's configuration.
    pub authorization: PathBuf,
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

/// Writes a seed for each of `nodes`' mesh identities into `dir` that has none yet (readable
/// by its owner only), and the `authorization` block (`authorization.conf`) naming every one.
pub fn init(dir: &Path, nodes: &[NodeId]) -> Result<Identities, Error> {
    let setup = |what: &str, error: std::io::Error| Error::setup(what.to_owned(), error);
    std::fs::create_dir_all(dir).map_err(|e| setup(&format!("directory {}", dir.display()), e))?;
    let mut block = String::from(
        "# The NATS identities of a Capstan mesh, written by `capstan nats init`; include it in\n\
         # the server's configuration. Each user is an NKEY whose seed is `<name>.nk` beside this\n\
         # file; no anonymous connection is accepted.\n\
         authorization {\n  users = [\n",
    );
    for identity in Identity::all(nodes) {
        let path = seed_path(dir, &identity);
        let public = if path.exists() {
            crate::connect::read_seed(&path)?.public_key
        } else {
            let pair = nkeys::KeyPair::new_user();
            let seed = pair
                .seed()
                .map_err(|e| Error::setup(path.display().to_string(), e.to_string()))?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| setup(&path.display().to_string(), e))?;
            writeln!(file, "{seed}").map_err(|e| setup(&path.display().to_string(), e))?;
            pair.public_key()
        };
        let _ = writeln!(block, "    # {}", identity.name());
        match identity.permissions() {
            None => {
                let _ = writeln!(block, "    {{ nkey: {public} }}");
            }
            Some((publish, subscribe)) => {
                let list = |subjects: &[&str]| {
                    subjects
                        .iter()
                        .map(|s| format!("{s:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let _ = writeln!(
                    block,
                    "    {{ nkey: {public}, permissions: {{\n        publish: {{ allow: [{}] }}\n        subscribe: {{ allow: [{}] }}\n    }} }}",
                    list(&publish),
                    list(&subscribe)
                );
            }
        }
    }
    block.push_str("  ]\n}\n");
    let authorization = dir.join("authorization.conf");
    std::fs::write(&authorization, block)
        .map_err(|e| setup(&authorization.display().to_string(), e))?;
    Ok(Identities {
        dir: dir.to_owned(),
        authorization,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn nodes() -> Vec<NodeId> {
        ["exec-1", "exec-2"]
            .into_iter()
            .map(|n| NodeId::new(n).expect("valid"))
            .collect()
    }

    #[test]
    fn init_writes_one_private_seed_per_identity_and_names_each_in_the_authorization_block() {
        let dir = tempfile::tempdir().expect("dir");
        let written = init(dir.path(), &nodes()).expect("written");
        let block = std::fs::read_to_string(&written.authorization).expect("block");
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

    #[test]
    fn the_client_may_only_submit_cancel_and_read_events_and_logs() {
        let (publish, subscribe) = Identity::Client.permissions().expect("restricted");
        assert_eq!(
            publish,
            [subjects::SUBMIT, subjects::CREATE, subjects::CANCEL]
        );
        assert_eq!(
            subscribe,
            [subjects::EVENTS_ALL, subjects::LOGS_ALL, "_INBOX.>"]
        );
    }
}
