//! `/api/v1/nodes`: executor nodes, and cordoning, draining and uncordoning them.

use capstan_protocol::{AuditAction, NodeCommand, NodeId, NodeRecord, subjects};
use poem_openapi::OpenApi;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;

use super::{BearerAuth, Tag, served};
use crate::auth::Permission;
use crate::model::{Node, NodeList};
use crate::problem::ApiError;

/// The nodes operations.
pub(crate) struct NodesApi(pub Option<std::sync::Arc<crate::State>>);

#[OpenApi(prefix_path = "/api/v1", tag = "Tag::Nodes")]
impl NodesApi {
    /// List executor nodes. Needs `nodes:read`.
    #[oai(path = "/nodes", method = "get", operation_id = "listNodes")]
    async fn list(&self, auth: BearerAuth) -> Result<Json<NodeList>, ApiError> {
        let state = served(&self.0)?;
        auth.allow_read(Permission::NodesRead)?;
        let mut nodes: Vec<Node> = state
            .mesh
            .nodes
            .values()
            .await?
            .into_iter()
            .map(|node| node.value.into())
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Json(NodeList { nodes }))
    }

    /// Get an executor node. Needs `nodes:read`.
    #[oai(path = "/nodes/:id", method = "get", operation_id = "getNode")]
    async fn get(
        &self,
        auth: BearerAuth,
        #[oai(validator(pattern = "^[A-Za-z0-9_-]{1,64}$"))] id: Path<String>,
    ) -> Result<Json<Node>, ApiError> {
        let state = served(&self.0)?;
        auth.allow_read(Permission::NodesRead)?;
        let node = NodeId::new(id.0.clone())
            .map_err(|e| ApiError::bad_request(e.to_string(), Some("id")))?;
        match state.mesh.nodes.get(node.as_str()).await? {
            Some(record) => Ok(Json(record.value.into())),
            None => Err(ApiError::not_found(format!("no node {node}"))),
        }
    }

    /// Cordon a node: no new jobs are placed on it; what it runs finishes normally. Needs
    /// `nodes:manage`.
    #[oai(
        path = "/nodes/:id/cordon",
        method = "post",
        operation_id = "cordonNode"
    )]
    async fn cordon(
        &self,
        auth: BearerAuth,
        #[oai(validator(pattern = "^[A-Za-z0-9_-]{1,64}$"))] id: Path<String>,
    ) -> Result<Json<Node>, ApiError> {
        auth.allow(
            Permission::NodesManage,
            AuditAction::NodeCordon,
            Some(format!("node/{}", id.0)),
        )?;
        self.set_availability(&id.0, subjects::registry::NODES_CORDON, None)
            .await
    }

    /// Uncordon a node: it takes new jobs again (also ends a drain). Needs `nodes:manage`.
    #[oai(
        path = "/nodes/:id/uncordon",
        method = "post",
        operation_id = "uncordonNode"
    )]
    async fn uncordon(
        &self,
        auth: BearerAuth,
        #[oai(validator(pattern = "^[A-Za-z0-9_-]{1,64}$"))] id: Path<String>,
    ) -> Result<Json<Node>, ApiError> {
        auth.allow(
            Permission::NodesManage,
            AuditAction::NodeUncordon,
            Some(format!("node/{}", id.0)),
        )?;
        self.set_availability(&id.0, subjects::registry::NODES_UNCORDON, None)
            .await
    }

    /// Drain a node.
    ///
    /// No new jobs are placed on it; dispatches queued for it are handed back at once and
    /// placed elsewhere; running jobs may finish until the deadline, when they are stopped
    /// and handed back for another attempt elsewhere. The node reports `drained` once it holds
    /// nothing. Needs `nodes:manage`.
    #[oai(path = "/nodes/:id/drain", method = "post", operation_id = "drainNode")]
    async fn drain(
        &self,
        auth: BearerAuth,
        #[oai(validator(pattern = "^[A-Za-z0-9_-]{1,64}$"))] id: Path<String>,
        /// Seconds running jobs may take before they are stopped and handed back (default
        /// 300).
        deadline_seconds: Query<Option<u64>>,
    ) -> Result<Json<Node>, ApiError> {
        auth.allow(
            Permission::NodesManage,
            AuditAction::NodeDrain,
            Some(format!("node/{}", id.0)),
        )?;
        self.set_availability(&id.0, subjects::registry::NODES_DRAIN, deadline_seconds.0)
            .await
    }
}

impl NodesApi {
    /// Asks the registry to change `id`'s availability.
    async fn set_availability(
        &self,
        id: &str,
        subject: &str,
        deadline_secs: Option<u64>,
    ) -> Result<Json<Node>, ApiError> {
        let state = served(&self.0)?;
        let node = NodeId::new(id.to_owned())
            .map_err(|e| ApiError::bad_request(e.to_string(), Some("id")))?;
        let command = NodeCommand {
            node,
            deadline_secs,
        };
        let answer = capstan_mesh::service::call::<_, NodeRecord>(
            &state.mesh.client,
            subject,
            &command,
            std::time::Duration::from_secs(5),
        )
        .await?;
        match answer {
            Ok(record) => Ok(Json(record.into())),
            Err(error) => Err(ApiError::from_service(error)),
        }
    }
}
