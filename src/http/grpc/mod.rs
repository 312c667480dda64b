//! etcd's v3 gRPC API on a listener of its own (`--grpc-listen`), for the apps written against
//! etcd's clients (etcdctl, Go's clientv3, jetcd, etcd-client): they point at the sidecar with no
//! code change. The services are tonic's, generated from etcd's own `.proto` files (the
//! etcd-client crate's `build-server`). For now: the KV service's ranges, inside the mirrored
//! prefixes answered from memory by the JSON gateway's rules ([`crate::http::etcd_gateway::range`]),
//! so they keep answering with quorum lost or no member reachable, outside them forwarded to etcd
//! through the endpoint pool ([`kv`]); the member list, a member's status and the alarms,
//! forwarded, and every call that changes the cluster refused ([`cluster`]). Writes and the other
//! services answer `UNIMPLEMENTED`.

pub mod cluster;
pub mod kv;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::Status;

use crate::http::etcd_gateway::GatewayError;
use crate::http::state::AppState;
use crate::upstream::Retry;

/// Most bytes of one request message (etcd's default `--max-request-bytes` is 1.5 MiB; a range
/// request is far smaller).
pub const MAX_REQUEST_BYTES: usize = 2 * 1024 * 1024;
/// Most bytes of one response message: what etcd's clients accept by default (Go's clientv3
/// takes any size; etcdctl and etcd-client 2 GiB): a range of the mirror may be large.
pub const MAX_RESPONSE_BYTES: usize = usize::MAX;

/// Serves etcd's gRPC API on `listener` over `state` until `shutdown` completes.
pub async fn run(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let kv = etcd_client::proto::PbKvServer::new(kv::KvService::new(state.clone()))
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(MAX_RESPONSE_BYTES);
    let cluster = Arc::new(cluster::ClusterService::new(state));
    let members = etcd_client::proto::PbClusterServer::from_arc(cluster.clone());
    let maintenance = etcd_client::proto::PbMaintenanceServer::from_arc(cluster);
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(kv)
        .add_service(members)
        .add_service(maintenance)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// The sidecar's own refusal (the gateway's error carries gRPC's code) as a gRPC status.
pub fn status(error: GatewayError) -> Status {
    Status::new(tonic::Code::from_i32(i32::from(error.code)), error.message)
}

/// Runs `call` on etcd through the pool within the request timeout (see
/// [`crate::upstream::forward`]).
pub async fn forward<T, F, Fut>(state: &AppState, retry: Retry, call: F) -> Result<T, Status>
where
    F: FnMut(etcd_client::Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    crate::upstream::forward::forward(&state.pool, retry, state.etcd_timeout(), call).await
}
