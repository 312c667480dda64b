//! `POST /v3/kv/range` from the mirror: a key, a range or every key from one on, with `limit`,
//! `keys_only`, `count_only`, sorting and revision filters, at the mirror's revision. An older
//! `revision` is answered when the history shows nothing in the range changed since it (the
//! current entries are then what etcd had); a newer one is waited for briefly, as the mirror may
//! be a moment behind a write the client just made.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use etcd_client::proto::{PbRangeRequest, PbRangeResponse};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{
    answer, code, header, int64, kv_json, pb_kv_json, request_json, unb64, GatewayError, KeyRange,
};
use crate::http::state::AppState;
use crate::mirror::snapshot::{Entry, Snapshot};
use crate::upstream::forward;

/// Longest wait for the mirror to reach a revision a range asks for.
const FUTURE_WAIT: Duration = Duration::from_secs(1);

/// etcd's `RangeRequest`, every field named (an unknown one is refused, not ignored).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RangeRequest {
    key: String,
    range_end: String,
    #[serde(deserialize_with = "int64")]
    limit: i64,
    #[serde(deserialize_with = "int64")]
    revision: i64,
    sort_order: Named,
    sort_target: Named,
    /// Every read of the mirror is from memory: a serializable read and a linearizable one are
    /// answered alike (docs/clients.md says so); a read outside it is etcd's, as asked.
    serializable: bool,
    keys_only: bool,
    count_only: bool,
    #[serde(deserialize_with = "int64")]
    min_mod_revision: i64,
    #[serde(deserialize_with = "int64")]
    max_mod_revision: i64,
    #[serde(deserialize_with = "int64")]
    min_create_revision: i64,
    #[serde(deserialize_with = "int64")]
    max_create_revision: i64,
}

/// A protobuf enum as JSON may give it: its number or its name.
#[derive(Debug, Default, Deserialize)]
#[serde(untagged)]
enum Named {
    #[default]
    Unset,
    Number(i64),
    Name(String),
}

impl Named {
    /// The value's index in `names` (the enum's names in number order).
    fn index(&self, field: &str, names: &[&str]) -> Result<usize, GatewayError> {
        let index = match self {
            Named::Unset => Some(0),
            Named::Number(n) => usize::try_from(*n).ok().filter(|&n| n < names.len()),
            Named::Name(name) => names.iter().position(|n| n.eq_ignore_ascii_case(name)),
        };
        index.ok_or_else(|| {
            GatewayError::invalid(format!("{field}: {self:?} is not one of {names:?}"))
        })
    }
}

/// What a range found in the mirror.
pub struct Found {
    /// The snapshot read (its revision and cluster are the answer's header).
    pub snapshot: Arc<Snapshot>,
    /// The entries to return: sorted, limited, none when only the count was asked for.
    pub entries: Vec<Arc<Entry>>,
    /// Every entry in the range that passed the filters.
    pub count: usize,
    /// Whether the limit left some out.
    pub more: bool,
}

/// The sort orders and targets, in protobuf number order.
pub const SORT_ORDERS: [&str; 3] = ["NONE", "ASCEND", "DESCEND"];
/// See [`SORT_ORDERS`].
pub const SORT_TARGETS: [&str; 5] = ["KEY", "VERSION", "CREATE", "MOD", "VALUE"];

/// How a range is answered: from the mirror, or by etcd when the range is not the mirror's.
pub enum Ranged {
    /// Inside one mirrored prefix: what the mirror holds.
    Mirror(Found),
    /// Elsewhere: etcd's own answer.
    Etcd(PbRangeResponse),
}

/// Answers `r`, whichever transport brought it (this JSON gateway, or etcd's gRPC API): from
/// the mirror when its range is inside one mirrored prefix, else passed on to etcd.
pub async fn route(state: &AppState, r: PbRangeRequest) -> Result<Ranged, GatewayError> {
    let range = KeyRange::new(r.key.clone(), r.range_end.clone());
    if range.check_mirrored(state).is_ok() {
        return Ok(Ranged::Mirror(select(state, &range, &r).await?));
    }
    let answer = forward::range(&state.pool, state.etcd_timeout(), r).await?;
    Ok(Ranged::Etcd(answer))
}

/// Answers `r` over `range` from the mirror.
async fn select(
    state: &AppState,
    range: &KeyRange,
    r: &PbRangeRequest,
) -> Result<Found, GatewayError> {
    let index = |field: &str, n: i32, names: &[&str]| {
        usize::try_from(n)
            .ok()
            .filter(|&i| i < names.len())
            .ok_or_else(|| GatewayError::invalid(format!("{field}: {n} is not one of {names:?}")))
    };
    let order = index("sort_order", r.sort_order, &SORT_ORDERS)?;
    let target = index("sort_target", r.sort_target, &SORT_TARGETS)?;
    let snapshot = at_revision(state, range, r.revision).await?;
    let filtered = |e: &&Arc<Entry>| {
        let within = |n: i64, min: i64, max: i64| (min == 0 || n >= min) && (max == 0 || n <= max);
        within(e.mod_revision, r.min_mod_revision, r.max_mod_revision)
            && within(
                e.create_revision,
                r.min_create_revision,
                r.max_create_revision,
            )
    };
    let mut entries: Vec<Arc<Entry>> = range.scan(&snapshot).filter(filtered).cloned().collect();
    // In key order already; etcd sorts only when asked (NONE with a target is ascending).
    if target != 0 || order == 2 {
        entries.sort_by(|a, b| {
            let by = match target {
                1 => a.version.cmp(&b.version),
                2 => a.create_revision.cmp(&b.create_revision),
                3 => a.mod_revision.cmp(&b.mod_revision),
                4 => a.value().cmp(b.value()),
                _ => a.key.cmp(&b.key),
            };
            if order == 2 {
                by.reverse()
            } else {
                by
            }
        });
    }
    let count = entries.len();
    let limit = usize::try_from(r.limit).unwrap_or(0);
    let shown = if r.count_only {
        0
    } else if limit > 0 {
        count.min(limit)
    } else {
        count
    };
    entries.truncate(shown);
    Ok(Found {
        snapshot,
        entries,
        count,
        more: !r.count_only && shown < count,
    })
}

pub(crate) async fn range(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<Response, GatewayError> {
    let request: RangeRequest = request_json(&state, request.into_body()).await?;
    let asked = PbRangeRequest {
        key: unb64("key", &request.key)?,
        range_end: unb64("range_end", &request.range_end)?,
        limit: request.limit,
        revision: request.revision,
        sort_order: request.sort_order.index("sort_order", &SORT_ORDERS)? as i32,
        sort_target: request.sort_target.index("sort_target", &SORT_TARGETS)? as i32,
        serializable: request.serializable,
        keys_only: request.keys_only,
        count_only: request.count_only,
        min_mod_revision: request.min_mod_revision,
        max_mod_revision: request.max_mod_revision,
        min_create_revision: request.min_create_revision,
        max_create_revision: request.max_create_revision,
    };
    let found = match route(&state, asked).await? {
        Ranged::Mirror(found) => found,
        // Not the mirror's: etcd's answer, as etcd's gateway would give it.
        Ranged::Etcd(answer) => return Ok(Json(etcd_range_json(&answer)).into_response()),
    };
    let mut body = Map::new();
    body.insert(
        "header".into(),
        header(found.snapshot.cluster_id, found.snapshot.revision),
    );
    if !found.entries.is_empty() {
        let kvs: Vec<Value> = found
            .entries
            .iter()
            .map(|e| kv_json(e, request.keys_only))
            .collect();
        body.insert("kvs".into(), Value::Array(kvs));
    }
    if found.more {
        body.insert("more".into(), json!(true));
    }
    if found.count > 0 {
        body.insert("count".into(), found.count.to_string().into());
    }
    Ok(answer(&state, &found.snapshot, Value::Object(body)))
}

/// etcd's own range answer in the gateway's JSON.
fn etcd_range_json(r: &PbRangeResponse) -> Value {
    let mut body = Map::new();
    if let Some(h) = &r.header {
        let mut header = Map::new();
        for (name, n) in [
            ("cluster_id", h.cluster_id),
            ("member_id", h.member_id),
            ("revision", h.revision as u64),
            ("raft_term", h.raft_term),
        ] {
            if n != 0 {
                header.insert(name.into(), n.to_string().into());
            }
        }
        body.insert("header".into(), Value::Object(header));
    }
    if !r.kvs.is_empty() {
        let kvs = r.kvs.iter().map(pb_kv_json).collect();
        body.insert("kvs".into(), Value::Array(kvs));
    }
    if r.more {
        body.insert("more".into(), json!(true));
    }
    if r.count != 0 {
        body.insert("count".into(), r.count.to_string().into());
    }
    Value::Object(body)
}

/// The snapshot that answers for `range` at `revision` (0: the current one).
async fn at_revision(
    state: &AppState,
    range: &KeyRange,
    revision: i64,
) -> Result<Arc<Snapshot>, GatewayError> {
    let mut snapshot = state.store.snapshot();
    if !snapshot.loaded {
        return Err(GatewayError::new(
            code::UNAVAILABLE,
            "the mirror has no data yet",
        ));
    }
    if revision > snapshot.revision {
        let mut revisions = state.store.subscribe();
        let reached = tokio::time::timeout(FUTURE_WAIT, revisions.wait_for(|r| *r >= revision))
            .await
            .is_ok_and(|r| r.is_ok());
        if !reached {
            return Err(GatewayError::new(
                code::OUT_OF_RANGE,
                format!(
                    "mvcc: required revision is a future revision (the mirror is at {})",
                    state.store.revision()
                ),
            ));
        }
        snapshot = state.store.snapshot();
    }
    if revision > 0 && revision < snapshot.revision {
        let unchanged = state.store.changes_since(revision).is_some_and(|sets| {
            sets.iter()
                .filter(|s| s.revision <= snapshot.revision)
                .all(|s| !s.reset && !s.changes.iter().any(|c| range.contains(c.key())))
        });
        if !unchanged {
            return Err(GatewayError::new(
                code::OUT_OF_RANGE,
                format!(
                    "the sidecar's mirror does not hold revision {revision} of this range (it \
                     changed since, and the mirror keeps only the current values; ask etcd)"
                ),
            ));
        }
    }
    Ok(snapshot)
}
