//! The gateway's writes, forwarded to etcd under `--allow-writes` with the token and mode rules
//! of the sidecar's own writes: `POST /v3/kv/put`, `/v3/kv/deleterange` and `/v3/kv/txn`. Every
//! key they name (compares included) must be inside the mirrored prefixes. Each is one etcd
//! transaction, answered with etcd's own response once the mirror has applied it, so a range
//! after it sees it. Leases and nested transactions are not served.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use etcd_client::proto::PbRangeRequest;
use etcd_client::{
    Compare, CompareOp, DeleteOptions, KeyValue, PutOptions, ResponseHeader, Txn, TxnOp,
    TxnOpResponse, TxnResponse,
};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{b64, code, int64, request_json, unb64, GatewayError, KeyRange};
use crate::http::state::AppState;
use crate::http::write::{admit, mirrored_by, write_failed};
use crate::upstream::forward::get_options;
use crate::upstream::write::apply_txn;

/// etcd's `PutRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PutRequest {
    key: String,
    value: String,
    #[serde(deserialize_with = "int64")]
    lease: i64,
    prev_kv: bool,
    ignore_value: bool,
    ignore_lease: bool,
}

/// etcd's `DeleteRangeRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct DeleteRequest {
    key: String,
    range_end: String,
    prev_kv: bool,
}

/// The part of etcd's `RangeRequest` a transaction may carry here.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct TxnRangeRequest {
    key: String,
    range_end: String,
    #[serde(deserialize_with = "int64")]
    limit: i64,
    #[serde(deserialize_with = "int64")]
    revision: i64,
    serializable: bool,
    keys_only: bool,
    count_only: bool,
}

/// etcd's `RequestOp`: one of its members.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RequestOp {
    request_range: Option<TxnRangeRequest>,
    request_put: Option<PutRequest>,
    request_delete_range: Option<DeleteRequest>,
    request_txn: Option<Value>,
}

/// etcd's `Compare`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct CompareRequest {
    key: String,
    range_end: String,
    result: Value,
    target: Value,
    #[serde(deserialize_with = "int64")]
    version: i64,
    #[serde(deserialize_with = "int64")]
    create_revision: i64,
    #[serde(deserialize_with = "int64")]
    mod_revision: i64,
    value: String,
    #[serde(deserialize_with = "int64")]
    lease: i64,
}

/// etcd's `TxnRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct TxnRequest {
    compare: Vec<CompareRequest>,
    success: Vec<RequestOp>,
    failure: Vec<RequestOp>,
}

pub(crate) async fn put(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<Response, GatewayError> {
    admit(&state, request.headers())?;
    let put: PutRequest = request_json(&state, request.into_body()).await?;
    let op = put_op(&state, put)?;
    let response = forward(&state, Txn::new().and_then(vec![op])).await?;
    Ok(Json(op_body(response.op_responses().remove(0)).1).into_response())
}

pub(crate) async fn delete_range(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<Response, GatewayError> {
    admit(&state, request.headers())?;
    let delete: DeleteRequest = request_json(&state, request.into_body()).await?;
    let op = delete_op(&state, delete)?;
    let response = forward(&state, Txn::new().and_then(vec![op])).await?;
    Ok(Json(op_body(response.op_responses().remove(0)).1).into_response())
}

pub(crate) async fn txn(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<Response, GatewayError> {
    admit(&state, request.headers())?;
    let txn: TxnRequest = request_json(&state, request.into_body()).await?;
    let compares = txn
        .compare
        .into_iter()
        .map(|c| compare(&state, c))
        .collect::<Result<Vec<_>, _>>()?;
    let ops = |ops: Vec<RequestOp>| -> Result<Vec<TxnOp>, GatewayError> {
        ops.into_iter().map(|op| request_op(&state, op)).collect()
    };
    let request = Txn::new()
        .when(compares)
        .and_then(ops(txn.success)?)
        .or_else(ops(txn.failure)?);
    let response = forward(&state, request).await?;
    let mut body = Map::new();
    body.insert("header".into(), header_json(response.header()));
    if response.succeeded() {
        body.insert("succeeded".into(), json!(true));
    }
    let responses: Vec<Value> = response
        .op_responses()
        .into_iter()
        .map(|op| {
            let (name, body) = op_body(op);
            json!({ name: body })
        })
        .collect();
    if !responses.is_empty() {
        body.insert("responses".into(), Value::Array(responses));
    }
    Ok(Json(Value::Object(body)).into_response())
}

/// Sends `txn` to etcd, then waits for the mirror to apply it.
async fn forward(state: &AppState, txn: Txn) -> Result<TxnResponse, GatewayError> {
    let response = apply_txn(&state.pool, txn, state.etcd_timeout())
        .await
        .map_err(|e| GatewayError::from(write_failed(e)))?;
    let revision = response.header().map_or(0, ResponseHeader::revision);
    mirrored_by(state, revision).await;
    Ok(response)
}

/// A mirrored key range from base64 fields.
fn mirrored_range(state: &AppState, key: &str, end: &str) -> Result<KeyRange, GatewayError> {
    let range = KeyRange::decode(key, end)?;
    range.check_mirrored(state)?;
    Ok(range)
}

fn put_op(state: &AppState, put: PutRequest) -> Result<TxnOp, GatewayError> {
    if put.lease != 0 || put.ignore_lease {
        return Err(GatewayError::new(
            code::UNIMPLEMENTED,
            "leases are not served by the sidecar",
        ));
    }
    let range = mirrored_range(state, &put.key, "")?;
    let value = unb64("value", &put.value)?;
    let mut options = PutOptions::new();
    if put.prev_kv {
        options = options.with_prev_key();
    }
    if put.ignore_value {
        options = options.with_ignore_value();
    }
    Ok(TxnOp::put(range.key, value, Some(options)))
}

fn delete_op(state: &AppState, delete: DeleteRequest) -> Result<TxnOp, GatewayError> {
    let range = mirrored_range(state, &delete.key, &delete.range_end)?;
    let mut options = DeleteOptions::new();
    if let Some(end) = range.end {
        options = options.with_range(end);
    }
    if delete.prev_kv {
        options = options.with_prev_key();
    }
    Ok(TxnOp::delete(range.key, Some(options)))
}

fn request_op(state: &AppState, op: RequestOp) -> Result<TxnOp, GatewayError> {
    match op {
        RequestOp {
            request_put: Some(put),
            request_range: None,
            request_delete_range: None,
            request_txn: None,
        } => put_op(state, put),
        RequestOp {
            request_delete_range: Some(delete),
            request_range: None,
            request_put: None,
            request_txn: None,
        } => delete_op(state, delete),
        RequestOp {
            request_range: Some(get),
            request_put: None,
            request_delete_range: None,
            request_txn: None,
        } => {
            let range = mirrored_range(state, &get.key, &get.range_end)?;
            let asked = PbRangeRequest {
                range_end: unb64("range_end", &get.range_end)?,
                limit: get.limit,
                revision: get.revision,
                serializable: get.serializable,
                keys_only: get.keys_only,
                count_only: get.count_only,
                ..PbRangeRequest::default()
            };
            Ok(TxnOp::get(range.key, Some(get_options(&asked))))
        }
        RequestOp {
            request_txn: Some(_),
            ..
        } => Err(GatewayError::new(
            code::UNIMPLEMENTED,
            "nested transactions are not served by the sidecar",
        )),
        _ => Err(GatewayError::invalid(
            "a request op holds exactly one of request_range, request_put, request_delete_range",
        )),
    }
}

/// A protobuf enum value given by number or name, as its index in `names`.
fn enum_index(field: &str, value: &Value, names: &[&str]) -> Result<usize, GatewayError> {
    let index = match value {
        Value::Null => Some(0),
        Value::Number(n) => n.as_u64().map(|n| n as usize).filter(|&n| n < names.len()),
        Value::String(s) => names.iter().position(|n| n.eq_ignore_ascii_case(s)),
        _ => None,
    };
    index.ok_or_else(|| GatewayError::invalid(format!("{field}: {value} is not one of {names:?}")))
}

fn compare(state: &AppState, c: CompareRequest) -> Result<Compare, GatewayError> {
    let range = mirrored_range(state, &c.key, &c.range_end)?;
    let op = match enum_index(
        "result",
        &c.result,
        &["EQUAL", "GREATER", "LESS", "NOT_EQUAL"],
    )? {
        0 => CompareOp::Equal,
        1 => CompareOp::Greater,
        2 => CompareOp::Less,
        _ => CompareOp::NotEqual,
    };
    let key = range.key;
    let compare = match enum_index(
        "target",
        &c.target,
        &["VERSION", "CREATE", "MOD", "VALUE", "LEASE"],
    )? {
        0 => Compare::version(key, op, c.version),
        1 => Compare::create_revision(key, op, c.create_revision),
        2 => Compare::mod_revision(key, op, c.mod_revision),
        3 => Compare::value(key, op, unb64("value", &c.value)?),
        _ => Compare::lease(key, op, c.lease),
    };
    Ok(match range.end {
        Some(end) => compare.with_range(end),
        None => compare,
    })
}

/// etcd's response header, zero fields left out.
fn header_json(header: Option<&ResponseHeader>) -> Value {
    let mut h = Map::new();
    if let Some(header) = header {
        for (name, n) in [
            ("cluster_id", header.cluster_id()),
            ("member_id", header.member_id()),
            ("raft_term", header.raft_term()),
        ] {
            if n != 0 {
                h.insert(name.into(), n.to_string().into());
            }
        }
        if header.revision() != 0 {
            h.insert("revision".into(), header.revision().to_string().into());
        }
    }
    Value::Object(h)
}

/// A key-value etcd returned, as the gateway writes it.
fn etcd_kv_json(kv: &KeyValue) -> Value {
    let mut out = Map::new();
    out.insert("key".into(), b64(kv.key()).into());
    for (name, n) in [
        ("create_revision", kv.create_revision()),
        ("mod_revision", kv.mod_revision()),
        ("version", kv.version()),
        ("lease", kv.lease()),
    ] {
        if n != 0 {
            out.insert(name.into(), n.to_string().into());
        }
    }
    if !kv.value().is_empty() {
        out.insert("value".into(), b64(kv.value()).into());
    }
    Value::Object(out)
}

/// One operation's response and its name inside a transaction's `responses`.
fn op_body(response: TxnOpResponse) -> (&'static str, Value) {
    match response {
        TxnOpResponse::Put(put) => {
            let mut body = Map::new();
            body.insert("header".into(), header_json(put.header()));
            if let Some(prev) = put.prev_key() {
                body.insert("prev_kv".into(), etcd_kv_json(prev));
            }
            ("response_put", Value::Object(body))
        }
        TxnOpResponse::Delete(delete) => {
            let mut body = Map::new();
            body.insert("header".into(), header_json(delete.header()));
            if delete.deleted() != 0 {
                body.insert("deleted".into(), delete.deleted().to_string().into());
            }
            if !delete.prev_kvs().is_empty() {
                let prev: Vec<Value> = delete.prev_kvs().iter().map(etcd_kv_json).collect();
                body.insert("prev_kvs".into(), Value::Array(prev));
            }
            ("response_delete_range", Value::Object(body))
        }
        TxnOpResponse::Get(get) => {
            let mut body = Map::new();
            body.insert("header".into(), header_json(get.header()));
            if !get.kvs().is_empty() {
                let kvs: Vec<Value> = get.kvs().iter().map(etcd_kv_json).collect();
                body.insert("kvs".into(), Value::Array(kvs));
            }
            if get.more() {
                body.insert("more".into(), json!(true));
            }
            if get.count() != 0 {
                body.insert("count".into(), get.count().to_string().into());
            }
            ("response_range", Value::Object(body))
        }
        TxnOpResponse::Txn(_) => ("response_txn", json!({})),
    }
}
