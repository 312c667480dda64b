//! etcd's KV service. `Range` inside one mirrored prefix is answered from memory (the JSON
//! gateway's [`select`]: the same rules for revisions, filters, sorting and limits, and it keeps
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

use crate::http::etcd_gateway::range::{select, RangeQuery, SORT_ORDERS, SORT_TARGETS};
use crate::http::etcd_gateway::{GatewayError, KeyRange};
use crate::http::state::AppState;
use crate::mirror::snapshot::Entry;
use crate::upstream::forward;

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

    /// A range of the mirror.
    async fn range_of_mirror(
        &self,
        range: KeyRange,
        r: &PbRangeRequest,
    ) -> Result<PbRangeResponse, Status> {
        let index = |field: &str, n: i32, names: &[&str]| {
            usize::try_from(n)
                .ok()
                .filter(|&i| i < names.len())
                .ok_or_else(|| {
                    super::status(GatewayError::invalid(format!(
                        "{field}: {n} is not one of {names:?}"
                    )))
                })
        };
        let query = RangeQuery {
            range,
            limit: r.limit,
            revision: r.revision,
            sort_order: index("sort_order", r.sort_order, &SORT_ORDERS)?,
            sort_target: index("sort_target", r.sort_target, &SORT_TARGETS)?,
            count_only: r.count_only,
            min_mod_revision: r.min_mod_revision,
            max_mod_revision: r.max_mod_revision,
            min_create_revision: r.min_create_revision,
            max_create_revision: r.max_create_revision,
        };
        let found = select(&self.state, &query).await.map_err(super::status)?;
        Ok(PbRangeResponse {
            header: Some(PbResponseHeader {
                cluster_id: found.snapshot.cluster_id,
                revision: found.snapshot.revision,
                ..Default::default()
            }),
            kvs: found
                .entries
                .iter()
                .map(|e| key_value(e, r.keys_only))
                .collect(),
            more: found.more,
            count: found.count as i64,
        })
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
        let range = KeyRange::new(r.key.clone(), r.range_end.clone());
        let response = if range.check_mirrored(&self.state).is_ok() {
            self.range_of_mirror(range, &r).await?
        } else {
            forward::range(&self.state.pool, self.state.etcd_timeout(), r).await?
        };
        Ok(Response::new(response))
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
