//! The remote systems as `nats` users and the metrics see them: the listing served on
//! `capstan.systems.list` (and on each client's own subject), without credentials, and the
//! health gauges of the scrape.

use async_nats::service::{Service, endpoint::Endpoint};
use capstan_mesh::Mesh;
use capstan_mesh::service::{self, NoArgs};
use capstan_protocol::subjects::{self, ClientCall};
use capstan_protocol::{ErrorCode, ServiceError, SystemSummary};
use tokio_util::sync::CancellationToken;

/// Every system in the catalogue, with what its gateways found, by name.
pub(crate) async fn summaries(mesh: &Mesh) -> Result<Vec<SystemSummary>, capstan_mesh::Error> {
    let mut listed = Vec::new();
    for system in mesh.systems.values().await? {
        let status = mesh.system_status.get(&system.value.name).await?;
        listed.push(SystemSummary::of(
            &system.value,
            status.as_ref().map(|s| &s.value),
        ));
    }
    listed.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(listed)
}

/// The listing endpoints on the API's micro service: the plain subject (for the mesh's own
/// identities and servers without identities) and the clients' (see `ClientCall`).
pub(crate) async fn endpoints(micro: &Service) -> Result<[Endpoint; 2], capstan_mesh::Error> {
    Ok([
        service::endpoint(micro, "systems-list", subjects::SYSTEMS_LIST).await?,
        service::endpoint(
            micro,
            "systems-list-from",
            &ClientCall::ListSystems.from_all(),
        )
        .await?,
    ])
}

/// Answers listing requests on `endpoint` until `shutdown`, in the request's encoding.
pub(crate) async fn serve(endpoint: Endpoint, mesh: Mesh, shutdown: CancellationToken) {
    let mesh = &mesh;
    service::serve_raw(endpoint, shutdown, 8, |request| async move {
        let encoding = match service::decode_request::<NoArgs>(&request) {
            Ok((NoArgs, encoding)) => encoding,
            Err((error, encoding)) => {
                let refused = ServiceError::new(ErrorCode::BadRequest, error.to_string());
                return (request, encoding, Err(refused));
            }
        };
        let listed = summaries(mesh).await.map_err(|error| {
            ServiceError::new(
                ErrorCode::Unavailable,
                format!("cannot read the catalogue: {error}"),
            )
        });
        (request, encoding, listed)
    })
    .await;
}
