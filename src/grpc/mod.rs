//! etcd's v3 gRPC API on a listener of its own (`--grpc-listen`), for the apps written against
//! etcd's clients (etcdctl, Go's clientv3, jetcd, etcd-client): they point at the sidecar with no
//! code change. The services are tonic's, generated from etcd's own `.proto` files (the
//! etcd-client crate's `build-server`). For now the KV service's ranges: inside the mirrored
//! prefixes answered from memory by the JSON gateway's rules ([`crate::http::etcd_gateway::range`]),
//! so they keep answering with quorum lost or no member reachable; outside them forwarded to etcd
//! through the endpoint pool ([`kv`]). Writes and the other services answer `UNIMPLEMENTED`.

pub mod kv;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::Status;

use crate::http::etcd_gateway::GatewayError;
use crate::http::AppState;
use crate::upstream::RequestFailed;

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
    let kv = etcd_client::proto::PbKvServer::new(kv::KvService::new(state))
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(MAX_RESPONSE_BYTES);
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(kv)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// The sidecar's own refusal (the gateway's error carries gRPC's code) as a gRPC status.
pub fn status(error: GatewayError) -> Status {
    Status::new(tonic::Code::from_i32(i32::from(error.code)), error.message)
}

/// A call etcd did not answer as a gRPC status: etcd's own when it refused the call, else
/// `UNAVAILABLE` (no member answered in time), never a hang.
pub fn forwarded(error: RequestFailed) -> Status {
    Status::unavailable(format!("etcd: {}", error.message))
}
