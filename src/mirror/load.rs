//! Reading the mirrored prefixes from etcd at one revision, page by page: all of them (a full
//! load), or, to bring data held at an older revision up to date (a disk snapshot after a
//! restart, the mirror itself after its watch's resume point was compacted), only what changed
//! since it: every key's name and mod_revision (keys only), and the values of the keys modified
//! after the held revision (one by one when they are few, else by etcd's `min_mod_revision`). A
//! key held and missing from the listing was deleted. No watch history is needed, so compaction
//! does not matter, and etcd sends a small part of a full load when little changed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use etcd_client::{GetOptions, KeyValue, KvClient, Txn, TxnOp, TxnOpResponse};
use tokio::time::timeout;

use crate::config::{prefix_range_end, Prefixes};
use crate::liveness::Heartbeat;
use crate::mirror::persist::SnapshotFile;
use crate::mirror::snapshot::{Entry, Snapshot};
use crate::mirror::store::Store;

/// Most changed keys a catch-up reads one by one (in one transaction, under etcd's default
/// limit of 128 operations); past it, one filtered scan of every prefix is cheaper.
pub const POINT_READS_AT_MOST: usize = 64;

/// Why a read did not complete.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// etcd failed the call.
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    /// One page did not come within the deadline.
    #[error("range read timed out")]
    Timeout,
}

/// What one read of every prefix found, all at one revision.
pub struct Pages {
    /// The revision every page was read at.
    pub revision: i64,
    /// The cluster that answered.
    pub cluster: u64,
    /// Every key found, in prefix order then key order.
    pub kvs: Vec<KeyValue>,
}

/// Reads every prefix in pages at one revision.
pub struct Reader<'a> {
    /// The client's KV service, with the decode limit raised.
    pub kv: KvClient,
    /// What to read.
    pub prefixes: &'a Prefixes,
    /// Keys per page.
    pub page_size: i64,
    /// The deadline of one page.
    pub deadline: Duration,
    /// Beaten at each page, for the liveness watchdog.
    pub heartbeat: &'a Heartbeat,
}

impl Reader<'_> {
    /// Every key of every prefix as `shape` asks (keys only, a minimum mod revision), at
    /// `revision`, or at the revision of the first page when that is 0.
    pub async fn read(
        &mut self,
        shape: impl Fn(GetOptions) -> GetOptions,
        mut revision: i64,
    ) -> Result<Pages, ReadError> {
        let mut cluster = 0u64;
        let mut kvs = Vec::new();
        for prefix in self.prefixes.as_slice() {
            let end = prefix_range_end(prefix.as_bytes()).unwrap_or_else(|| vec![0]);
            let mut start = prefix.as_bytes().to_vec();
            loop {
                let mut opts = shape(
                    GetOptions::new()
                        .with_range(end.clone())
                        .with_limit(self.page_size),
                );
                if revision > 0 {
                    opts = opts.with_revision(revision);
                }
                let mut resp = timeout(self.deadline, self.kv.get(start.clone(), Some(opts)))
                    .await
                    .map_err(|_| ReadError::Timeout)??;
                if revision == 0 {
                    revision = resp.header().map(|h| h.revision()).unwrap_or_default();
                }
                if cluster == 0 {
                    cluster = resp.header().map(|h| h.cluster_id()).unwrap_or_default();
                }
                self.heartbeat.beat();
                let more = resp.more();
                let page = resp.take_kvs();
                let Some(last) = page.last() else { break };
                let mut next_start = last.key().to_vec();
                next_start.push(0);
                kvs.extend(page);
                if !more {
                    break;
                }
                start = next_start;
            }
        }
        Ok(Pages {
            revision,
            cluster,
            kvs,
        })
    }

    /// The keys `keys` with their values at `revision`, in one transaction of point reads.
    /// etcd reads every key of a range it filters by mod revision (values included), so when
    /// few keys changed this costs it far less than [`Reader::read`] with `min_mod_revision`:
    /// a catch-up then scans the prefixes once (the listing), not twice.
    pub async fn read_keys(
        &mut self,
        keys: &[Bytes],
        revision: i64,
    ) -> Result<Vec<KeyValue>, ReadError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let at = || Some(GetOptions::new().with_revision(revision));
        let gets: Vec<TxnOp> = keys.iter().map(|k| TxnOp::get(k.to_vec(), at())).collect();
        let answer = timeout(self.deadline, self.kv.txn(Txn::new().and_then(gets)))
            .await
            .map_err(|_| ReadError::Timeout)??;
        self.heartbeat.beat();
        let mut kvs = Vec::with_capacity(keys.len());
        for response in answer.op_responses() {
            if let TxnOpResponse::Get(mut get) = response {
                kvs.extend(get.take_kvs());
            }
        }
        Ok(kvs)
    }
}

/// The entries of `kvs` (read with their values).
pub fn entries(kvs: Vec<KeyValue>) -> Vec<Entry> {
    kvs.into_iter()
        .map(|kv| {
            let (create, modr, version) = (kv.create_revision(), kv.mod_revision(), kv.version());
            let (k, v) = kv.into_key_value();
            Entry::new(Bytes::from(k), v, create, modr, version)
        })
        .collect()
}

/// The entries held, `base` (at `base_revision`: a disk snapshot's, or the mirror's own),
/// brought to the revision of `listing` (every key with its mod_revision then) and `changed` (the
/// keys modified after `base_revision`, with their values). `None` when what is held does not
/// fit: a key the listing names unchanged since then is missing from it or has another
/// mod_revision (data from elsewhere); then only a full load will do.
pub fn bring_up_to_date<'a>(
    base: impl IntoIterator<Item = &'a Entry>,
    base_revision: i64,
    listing: &[(Bytes, i64)],
    changed: Vec<Entry>,
) -> Option<Vec<Entry>> {
    let base: HashMap<&[u8], &Entry> = base.into_iter().map(|e| (&e.key[..], e)).collect();
    let mut changed: HashMap<Bytes, Entry> =
        changed.into_iter().map(|e| (e.key.clone(), e)).collect();
    listing
        .iter()
        .map(|(key, mod_revision)| match changed.remove(key) {
            Some(entry) => Some(entry),
            None if *mod_revision <= base_revision => base
                .get(&key[..])
                .filter(|e| e.mod_revision == *mod_revision)
                .map(|e| (*e).clone()),
            // Changed after the snapshot but not among the changed values: the two reads
            // disagree, which one revision for both rules out; refuse rather than guess.
            None => None,
        })
        .collect()
}

/// Data the sidecar holds at one revision of one cluster, from which a load catches up instead
/// of reading every value again.
pub enum Held {
    /// What the mirror serves: etcd's data, or the disk snapshot it fell back to.
    Mirror(Arc<Snapshot>),
    /// The disk snapshot found at start, not yet served.
    File(Arc<SnapshotFile>),
}

impl Held {
    /// What `store` holds, or else the disk snapshot `file`; `None` when there is nothing to
    /// catch up from (bundled defaults are no etcd data: they have no cluster or revision).
    pub fn now(store: &Store, file: &Option<Arc<SnapshotFile>>) -> Option<Held> {
        let mirror = store.snapshot();
        if mirror.loaded && mirror.cluster_id != 0 && mirror.revision > 0 {
            return Some(Held::Mirror(mirror));
        }
        file.clone().map(Held::File)
    }

    /// Its cluster and revision.
    pub fn at(&self) -> (u64, i64) {
        match self {
            Held::Mirror(s) => (s.cluster_id, s.revision),
            Held::File(f) => (f.cluster_id, f.revision),
        }
    }

    /// For the log.
    pub fn what(&self) -> &'static str {
        match self {
            Held::Mirror(_) => "mirror",
            Held::File(_) => "disk snapshot",
        }
    }

    /// See [`bring_up_to_date`].
    pub fn bring_up_to_date(
        &self,
        listing: &[(Bytes, i64)],
        changed: Vec<Entry>,
    ) -> Option<Vec<Entry>> {
        let (_, revision) = self.at();
        match self {
            Held::Mirror(s) => {
                bring_up_to_date(s.iter().map(|e| e.as_ref()), revision, listing, changed)
            }
            Held::File(f) => bring_up_to_date(&f.entries, revision, listing, changed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, value: &str, mod_revision: i64) -> Entry {
        Entry::new(
            Bytes::from(key.to_string()),
            Bytes::from(value.to_string()),
            1,
            mod_revision,
            1,
        )
    }

    fn keyed(entries: &[Entry]) -> Vec<(String, String, i64)> {
        entries
            .iter()
            .map(|e| {
                (
                    String::from_utf8_lossy(&e.key).into_owned(),
                    String::from_utf8_lossy(e.value()).into_owned(),
                    e.mod_revision,
                )
            })
            .collect()
    }

    #[test]
    fn a_snapshot_is_brought_up_to_date_from_the_listing_and_the_changes() {
        let base = [
            entry("/a", "1", 2),
            entry("/b", "1", 3),
            entry("/c", "1", 4),
        ];
        // At revision 9: /a unchanged, /b changed at 7, /c deleted, /d created at 8.
        let listing = [
            (Bytes::from("/a"), 2),
            (Bytes::from("/b"), 7),
            (Bytes::from("/d"), 8),
        ];
        let changed = vec![entry("/b", "2", 7), entry("/d", "new", 8)];
        let now = bring_up_to_date(&base, 5, &listing, changed).unwrap();
        assert_eq!(
            keyed(&now),
            [
                ("/a".into(), "1".into(), 2),
                ("/b".into(), "2".into(), 7),
                ("/d".into(), "new".into(), 8),
            ]
        );
        // A key the snapshot should hold unchanged but holds differently: no guessing.
        let other = [entry("/a", "1", 1)];
        assert!(bring_up_to_date(&other, 5, &listing[..1], vec![]).is_none());
        // A change the second read did not bring: no guessing either.
        assert!(bring_up_to_date(&base, 5, &listing, vec![]).is_none());
    }
}
