//! etcd's KV service. `Range` inside one mirrored prefix is answered from memory (the JSON
//! gateway's [`route`]: the same rules for revisions, filters, sorting and limits, and it keeps
//! answering in every mode); a range outside them is forwarded to etcd through the endpoint
//! pool (a read, retried on the next member), answered with etcd's own response or error.
//! `Put`, `DeleteRange`, `Txn` and `Compact` are not served yet (`UNIMPLEMENTED`).

use std::sync::Arc;

use etcd_client::proto::{
    PbCompactionRequest, PbCompactionResponse, PbDeleteRequest, PbDeleteResponse, PbKeyValue,
    PbKvService, PbPutRequest, PbPutResponse, PbRangeRequest, PbRangeResponse,
    PbRangeStreamResponse, PbResponseHeader, PbTxnRequest, PbTxnResponse,
};
use tonic::{Request, Response, Status};

use crate::http::etcd_gateway::range::{route, Ranged};
use crate::http::state::AppState;
use crate::mirror::snapshot::Entry;

/// etcd's KV service over the mirror and the pool.
pub struct KvService {
    /// The mirror, the pool and the settings.
    state: Arc<AppState>,
}

impl KvService {
    /// The service over `state`.
    pub fn new(state: Arc<AppState>) -> Self {
        KvService { state }
    }
}

/// An entry as etcd's protobuf `KeyValue` (the mirror keeps no lease: 0).
fn key_value(entry: &Entry, keys_only: bool) -> PbKeyValue {
    PbKeyValue {
        key: entry.key.to_vec(),
        create_revision: entry.create_revision,
        mod_revision: entry.mod_revision,
        version: entry.version,
        value: if keys_only {
            Vec::new()
        } else {
            entry.value().to_vec()
        },
        lease: 0,
    }
}

#[tonic::async_trait]
impl PbKvService for KvService {
    async fn range(
        &self,
        request: Request<PbRangeRequest>,
    ) -> Result<Response<PbRangeResponse>, Status> {
        let r = request.into_inner();
        let keys_only = r.keys_only;
        let found = match route(&self.state, r).await.map_err(super::status)? {
            Ranged::Mirror(found) => found,
            Ranged::Etcd(answer) => return Ok(Response::new(answer)),
        };
        Ok(Response::new(PbRangeResponse {
            header: Some(PbResponseHeader {
                cluster_id: found.snapshot.cluster_id,
                revision: found.snapshot.revision,
                ..Default::default()
            }),
            kvs: found
                .entries
                .iter()
                .map(|e| key_value(e, keys_only))
                .collect(),
            more: found.more,
            count: found.count as i64,
        }))
    }

    async fn put(&self, _: Request<PbPutRequest>) -> Result<Response<PbPutResponse>, Status> {
        Err(not_yet("Put"))
    }

    async fn delete_range(
        &self,
        _: Request<PbDeleteRequest>,
    ) -> Result<Response<PbDeleteResponse>, Status> {
        Err(not_yet("DeleteRange"))
    }

    async fn txn(&self, _: Request<PbTxnRequest>) -> Result<Response<PbTxnResponse>, Status> {
        Err(not_yet("Txn"))
    }

    async fn compact(
        &self,
        _: Request<PbCompactionRequest>,
    ) -> Result<Response<PbCompactionResponse>, Status> {
        Err(not_yet("Compact"))
    }

    /// etcd 3.6's streamed range: not in the 3.4 API the sidecar answers like.
    type RangeStreamStream = std::pin::Pin<
        Box<dyn futures_util::Stream<Item = Result<PbRangeStreamResponse, Status>> + Send>,
    >;

    async fn range_stream(
        &self,
        _: Request<PbRangeRequest>,
    ) -> Result<Response<Self::RangeStreamStream>, Status> {
        Err(not_yet("RangeStream"))
    }
}

fn not_yet(method: &str) -> Status {
    Status::unimplemented(format!(
        "the sidecar's gRPC API does not serve KV.{method} yet; use its HTTP API or etcd"
    ))
}
