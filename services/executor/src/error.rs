//! Why the executor could not start, or stopped without being asked to. What went wrong with
//! NATS is the mesh's error, carried whole; what is the executor's own is about its node and
//! its machine: the registry's refusal, another instance taking the node over, a work
//! directory it cannot create.

use std::path::PathBuf;

use capstan_protocol::{NodeId, ServiceError};

/// The executor's error; each variant says what the operator does about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// NATS was unavailable, the topology could not be set up, or shutdown came before the
    /// executor was ready (see [`capstan_mesh::Error`] for each).
    #[error(transparent)]
    Mesh(#[from] capstan_mesh::Error),
    /// The work directory cannot be created: a configuration error (`--work-dir`).
    #[error("cannot create the work directory {}: {source}", path.display())]
    WorkDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The registry refused this node's registration (its labels or slots): a configuration
    /// error, named by the registry's answer.
    #[error("the registry refused this node: {0}")]
    Refused(#[source] ServiceError),
    /// `--run-as` names no user, or the executor is not root and so cannot run jobs as
    /// another user: a configuration error.
    #[error("cannot run jobs as {user}: {reason}")]
    RunAs {
        /// The user as configured.
        user: String,
        /// Why.
        reason: String,
    },
    /// The secret keys (`CAPSTAN_SECRET_KEYS` or its file) cannot be read: a configuration
    /// error, named without any key.
    #[error("{0}")]
    SecretKeys(#[from] capstan_secrets::Error),
    /// Another executor instance registered under this node id and owns the node's attempts
    /// now; this one stopped the attempts it held and left without deregistering. Nothing is
    /// misconfigured here: the node was taken (a second executor with the same id, or a
    /// replacement started while this one was still running).
    #[error("another executor instance took over node {0}")]
    Superseded(NodeId),
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use capstan_protocol::ErrorCode;

    use super::*;

    #[test]
    fn a_refusal_keeps_the_registrys_answer_as_its_source() {
        let answer = ServiceError {
            code: ErrorCode::BadRequest,
            message: "capacity must be at least 1".into(),
            field: Some("capacity".into()),
        };
        let error = Error::Refused(answer.clone());
        let source = error
            .source()
            .and_then(|source| source.downcast_ref::<ServiceError>())
            .expect("the registry's answer is the source");
        assert_eq!(source, &answer);
    }

    #[test]
    fn a_node_taken_over_says_so_and_names_the_node() {
        let node: NodeId = "exec-1".parse().expect("a valid node id");
        let error = Error::Superseded(node);
        assert_eq!(
            error.to_string(),
            "another executor instance took over node exec-1"
        );
    }
}
