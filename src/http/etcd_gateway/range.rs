//! `POST /v3/kv/range` from the mirror: a key, a range or every key from one on, with `limit`,
//! `keys_only`, `count_only`, sorting and revision filters, at the mirror's revision. An older
//! `revision` is answered when the history shows nothing in the range changed since it (the
//! current entries are then what etcd had); a newer one is waited for briefly, as the mirror may
//! be a moment behind a write the client just made.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{answer, code, header, int64, kv_json, request_json, GatewayError, KeyRange};
use crate::http::state::AppState;
use crate::mirror::snapshot::{Entry, Snapshot};

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
    /// Every read here is from memory: a serializable read and a linearizable one are answered
    /// alike (docs/clients.md says so).
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

pub(crate) async fn range(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<Response, GatewayError> {
    let request: RangeRequest = request_json(&state, request.into_body()).await?;
    let range = KeyRange::decode(&request.key, &request.range_end)?;
    range.check_mirrored(&state)?;
    let order = request
        .sort_order
        .index("sort_order", &["NONE", "ASCEND", "DESCEND"])?;
    let target = request
        .sort_target
        .index("sort_target", &["KEY", "VERSION", "CREATE", "MOD", "VALUE"])?;
    let snapshot = at_revision(&state, &range, request.revision).await?;
    let filtered = |e: &&Arc<Entry>| {
        let within = |n: i64, min: i64, max: i64| (min == 0 || n >= min) && (max == 0 || n <= max);
        within(
            e.mod_revision,
            request.min_mod_revision,
            request.max_mod_revision,
        ) && within(
            e.create_revision,
            request.min_create_revision,
            request.max_create_revision,
        )
    };
    let mut entries: Vec<&Arc<Entry>> = range.scan(&snapshot).filter(filtered).collect();
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
    let mut body = Map::new();
    body.insert(
        "header".into(),
        header(snapshot.cluster_id, snapshot.revision),
    );
    if !request.count_only {
        let limit = usize::try_from(request.limit).unwrap_or(0);
        let shown = if limit > 0 { count.min(limit) } else { count };
        if shown > 0 {
            let kvs: Vec<Value> = entries[..shown]
                .iter()
                .map(|e| kv_json(e, request.keys_only))
                .collect();
            body.insert("kvs".into(), Value::Array(kvs));
        }
        if shown < count {
            body.insert("more".into(), json!(true));
        }
    }
    if count > 0 {
        body.insert("count".into(), count.to_string().into());
    }
    Ok(answer(&state, &snapshot, Value::Object(body)))
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
