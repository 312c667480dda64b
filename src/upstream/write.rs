//! Writes through the sidecar to etcd: a plain put or delete, or a compare-and-swap as one etcd
//! transaction, so that a write is either wholly applied or not at all. A failure says whether
//! etcd refused the write (not applied) or the answer was lost (unknown).

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, DeleteOptions, Txn, TxnOp, TxnOpResponse, TxnResponse};

use crate::upstream::pool::{Applied, EndpointPool, Retry};

/// What to write.
#[derive(Debug)]
pub enum WriteOp {
    /// Set `key` to `value`.
    Put {
        /// Key.
        key: String,
        /// Value.
        value: Vec<u8>,
    },
    /// Remove `key`, or every key starting with it when `prefix`.
    Delete {
        /// Key or prefix.
        key: String,
        /// Whether `key` is a prefix.
        prefix: bool,
    },
}

/// What etcd did.
#[derive(Debug)]
pub struct WriteResult {
    /// The revision of the write (the cluster's revision after it).
    pub revision: i64,
    /// Keys deleted, for deletes.
    pub deleted: i64,
}

/// Why a write did not complete.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The compare-and-swap revision did not match; nothing was written.
    #[error("the key's mod_revision is {current}, not {expected}; nothing was written")]
    PreconditionFailed {
        /// The key.
        key: String,
        /// What the request expected.
        expected: i64,
        /// What etcd has (0: the key does not exist).
        current: i64,
    },
    /// etcd refused it: nothing was written.
    #[error("{0}")]
    NotApplied(String),
    /// The answer was lost: it may or may not have been applied.
    #[error("{0}")]
    Unknown(String),
}

/// Applies `txn` as it is (the etcd gateway's writes) through `pool` within `deadline`; a member
/// that certainly did not apply it hands it to the next member.
pub async fn apply_txn(
    pool: &Arc<EndpointPool>,
    txn: Txn,
    deadline: Duration,
) -> Result<TxnResponse, WriteError> {
    pool.request(Retry::Write, deadline, |mut client| {
        let txn = txn.clone();
        async move { client.txn(txn).await }
    })
    .await
    .map_err(|failed| match failed.applied {
        Applied::No => WriteError::NotApplied(failed.message),
        Applied::Unknown => WriteError::Unknown(failed.message),
    })
}

/// Applies `op` through `pool` within `deadline`; with `expected_mod_revision`, only if the key's
/// mod_revision is that (0: the key must not exist), else `PreconditionFailed`. A member that
/// certainly did not apply it (refused connection, no leader) hands it to the next member.
pub async fn apply(
    pool: &Arc<EndpointPool>,
    op: WriteOp,
    expected_mod_revision: Option<i64>,
    deadline: Duration,
) -> Result<WriteResult, WriteError> {
    let key = match &op {
        WriteOp::Put { key, .. } | WriteOp::Delete { key, .. } => key.clone(),
    };
    let then = match op {
        WriteOp::Put { key, value } => TxnOp::put(key, value, None),
        WriteOp::Delete { key, prefix } => {
            TxnOp::delete(key, prefix.then(|| DeleteOptions::new().with_prefix()))
        }
    };
    let txn = match expected_mod_revision {
        None => Txn::new().and_then(vec![then]),
        Some(expected) => Txn::new()
            .when(vec![Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                expected,
            )])
            .and_then(vec![then])
            .or_else(vec![TxnOp::get(key.clone(), None)]),
    };
    let response = apply_txn(pool, txn, deadline).await?;
    let revision = response.header().map(|h| h.revision()).unwrap_or_default();
    let ops = response.op_responses();
    if !response.succeeded() {
        let current = ops
            .iter()
            .find_map(|op| match op {
                TxnOpResponse::Get(g) => Some(g.kvs().first().map_or(0, |kv| kv.mod_revision())),
                _ => None,
            })
            .unwrap_or_default();
        return Err(WriteError::PreconditionFailed {
            key,
            expected: expected_mod_revision.unwrap_or_default(),
            current,
        });
    }
    let deleted = ops
        .iter()
        .map(|op| match op {
            TxnOpResponse::Delete(d) => d.deleted(),
            _ => 0,
        })
        .sum();
    Ok(WriteResult { revision, deleted })
}
