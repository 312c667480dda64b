//! A call an app made, passed on to etcd as it is (the gRPC API's and the JSON gateway's reads
//! outside the mirror, the cluster's state): through the pool, within a deadline, answered with
//! etcd's own status when etcd refused it (a permission, a compacted revision), else
//! `UNAVAILABLE` saying what failed: never a hang.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::proto::{PbRangeRequest, PbRangeResponse};
use etcd_client::{GetOptions, SortOrder, SortTarget};
use tonic::Status;

use crate::upstream::error::Failure;
use crate::upstream::{EndpointPool, Retry};

/// Runs `call` on etcd through `pool` within `deadline`, as [`EndpointPool::request`] does.
pub async fn forward<T, F, Fut>(
    pool: &Arc<EndpointPool>,
    retry: Retry,
    deadline: Duration,
    mut call: F,
) -> Result<T, Status>
where
    F: FnMut(etcd_client::Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let refused: Arc<Mutex<Option<Status>>> = Arc::default();
    let seen = refused.clone();
    let result = pool
        .request(retry, deadline, |client| {
            let call = call(client);
            let seen = seen.clone();
            async move {
                call.await.inspect_err(|e| {
                    if let etcd_client::Error::GRpcStatus(s) = e {
                        *seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(s.clone());
                    }
                })
            }
        })
        .await;
    result.map_err(|failed| {
        let status = refused.lock().unwrap_or_else(|p| p.into_inner()).take();
        match status {
            Some(status) if failed.kind == Failure::Refused => status,
            _ => Status::unavailable(format!("etcd: {}", failed.message)),
        }
    })
}

/// etcd's `Range`, as the app asked it, answered by etcd (a read: retried on the next member).
pub async fn range(
    pool: &Arc<EndpointPool>,
    deadline: Duration,
    r: PbRangeRequest,
) -> Result<PbRangeResponse, Status> {
    let options = get_options(&r);
    let key = r.key;
    let response = forward(pool, Retry::Read, deadline, move |mut client| {
        let (key, options) = (key.clone(), options.clone());
        async move { client.get(key, Some(options)).await }
    })
    .await?;
    Ok(response.0)
}

/// The options of etcd-client's `get` that ask what `r` asks (its key aside).
pub fn get_options(r: &PbRangeRequest) -> GetOptions {
    let mut options = GetOptions::new()
        .with_limit(r.limit)
        .with_revision(r.revision)
        .with_sort(sort_target(r.sort_target), sort_order(r.sort_order))
        .with_min_mod_revision(r.min_mod_revision)
        .with_max_mod_revision(r.max_mod_revision)
        .with_min_create_revision(r.min_create_revision)
        .with_max_create_revision(r.max_create_revision);
    if !r.range_end.is_empty() {
        options = options.with_range(r.range_end.clone());
    }
    if r.serializable {
        options = options.with_serializable();
    }
    if r.keys_only {
        options = options.with_keys_only();
    }
    if r.count_only {
        options = options.with_count_only();
    }
    options
}

fn sort_order(n: i32) -> SortOrder {
    match n {
        1 => SortOrder::Ascend,
        2 => SortOrder::Descend,
        _ => SortOrder::None,
    }
}

fn sort_target(n: i32) -> SortTarget {
    match n {
        1 => SortTarget::Version,
        2 => SortTarget::Create,
        3 => SortTarget::Mod,
        4 => SortTarget::Value,
        _ => SortTarget::Key,
    }
}
