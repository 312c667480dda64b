//! One etcd revision of the mirror as readers hold it: the [`Snapshot`] of [`Entry`]s, and the
//! [`Change`]s and [`Event`]s that lead from one revision to the next.
//!
//! The map is persistent (`imbl::OrdSet` of entries ordered by key): a new revision shares every
//! untouched node with the previous one, so applying a small change to a large mirror is cheap,
//! and prefix reads are ordered range scans. Only the [`crate::mirror::store`] builds snapshots.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::ops::Bound;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::HeaderValue;
use imbl::OrdSet;

/// One key as etcd last reported it. Cloning it bumps reference counts; nothing is copied.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The etcd key.
    pub key: Bytes,
    /// The `ETag` (the quoted mod revision) followed by the value, in one allocation made when
    /// the entry is applied: a response slices both out of it (a reference count each, no copy,
    /// no formatting), and the mirror pays for one buffer per key and no header value beside it.
    buf: Bytes,
    /// Length of the `ETag` at the start of `buf`.
    tag_len: u8,
    /// Whether the value is not UTF-8 (served as `application/octet-stream`, else as text); one
    /// byte here rather than a header value per key keeps the mirror's memory near its data.
    pub binary: bool,
    /// Revision of the key's creation (etcd `create_revision`).
    pub create_revision: i64,
    /// Revision of the key's last modification; also its `ETag`.
    pub mod_revision: i64,
    /// Number of modifications since creation (etcd `version`).
    pub version: i64,
}

impl Entry {
    /// Builds an entry and prepares its `ETag`. The value is copied once, into a buffer of exactly
    /// the size needed that also holds the `ETag`.
    pub fn new(
        key: Bytes,
        value: impl AsRef<[u8]>,
        create_revision: i64,
        mod_revision: i64,
        version: i64,
    ) -> Self {
        let value = value.as_ref();
        let binary = std::str::from_utf8(value).is_err();
        let digits = mod_revision.to_string();
        let mut buf = Vec::with_capacity(digits.len() + 2 + value.len());
        buf.push(b'"');
        buf.extend_from_slice(digits.as_bytes());
        buf.push(b'"');
        // At most 22 bytes: an i64 and two quotes.
        let tag_len = buf.len() as u8;
        buf.extend_from_slice(value);
        Entry {
            key,
            buf: Bytes::from(buf),
            tag_len,
            binary,
            create_revision,
            mod_revision,
            version,
        }
    }

    /// The value.
    pub fn value(&self) -> &[u8] {
        &self.buf[self.tag_len as usize..]
    }

    /// The value as a shared handle, for a response body (no copy).
    pub fn value_bytes(&self) -> Bytes {
        self.buf.slice(self.tag_len as usize..)
    }

    /// The `ETag`: the quoted mod revision.
    pub fn etag(&self) -> HeaderValue {
        HeaderValue::from_maybe_shared(self.buf.slice(..self.tag_len as usize))
            .expect("a quoted integer is a valid header value")
    }

    /// The `Content-Type` of the raw value.
    pub fn content_type(&self) -> HeaderValue {
        if self.binary {
            HeaderValue::from_static("application/octet-stream")
        } else {
            HeaderValue::from_static("text/plain; charset=utf-8")
        }
    }

    /// Bytes this entry accounts for in the mirror (key plus value).
    pub fn size(&self) -> u64 {
        (self.key.len() + self.value().len()) as u64
    }
}

/// A change to one key, as applied to the store. Returned by every write to the store so that later
/// consumers (change notifications) see exactly what readers see, deletions from resyncs included.
#[derive(Debug, Clone)]
pub enum Change {
    /// The key now has this entry.
    Put(Arc<Entry>),
    /// The key was removed at `revision`.
    Delete {
        /// The removed key.
        key: Bytes,
        /// The revision the deletion belongs to.
        revision: i64,
    },
}

impl Change {
    /// The key changed.
    pub fn key(&self) -> &Bytes {
        match self {
            Change::Put(e) => &e.key,
            Change::Delete { key, .. } => key,
        }
    }
}

/// An event from the watch, before it is applied.
#[derive(Debug)]
pub enum Event {
    /// A put of a whole entry.
    Put(Entry),
    /// A deletion of `key` at `revision`.
    Delete {
        /// The deleted key.
        key: Bytes,
        /// The revision of the deletion.
        revision: i64,
    },
}

/// An entry as a snapshot holds it: ordered and looked up by its key, so the set stores one
/// pointer per key rather than a map node with a second copy of the key beside the entry (which
/// cost about 100 bytes per key: the key handle, its shared count and the wider node slots).
#[derive(Debug, Clone)]
pub(super) struct Keyed(pub(super) Arc<Entry>);

impl PartialEq for Keyed {
    fn eq(&self, other: &Self) -> bool {
        self.0.key == other.0.key
    }
}

impl Eq for Keyed {}

impl PartialOrd for Keyed {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Keyed {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.key.cmp(&other.0.key)
    }
}

/// Lookups by key bytes; consistent with `Ord`, which compares the same bytes.
impl Borrow<[u8]> for Keyed {
    fn borrow(&self) -> &[u8] {
        &self.0.key
    }
}

/// The mirror at one etcd revision. Immutable once published.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The etcd revision this snapshot reflects: every key in the mirrored prefixes is as etcd had
    /// it at this revision.
    pub revision: i64,
    /// Whether a complete load has happened; before it, "absent" means "unknown", not "missing".
    pub loaded: bool,
    /// The etcd cluster the data came from (0: unknown); a snapshot from another cluster is
    /// replaced wholesale.
    pub cluster_id: u64,
    /// The entries, ordered by key bytes.
    pub(super) entries: OrdSet<Keyed>,
    /// Sum of key and value bytes, kept incrementally for status and memory budgets.
    pub bytes: u64,
    /// Wall-clock time this snapshot was published.
    pub published_at: SystemTime,
    /// Where its data came from: etcd, or a fallback while etcd gave nothing.
    pub source: Source,
}

/// Where a snapshot's data came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// etcd: a load or the watch.
    Etcd,
    /// The disk snapshot, after a restart, until etcd answers.
    Snapshot,
    /// The bundled defaults file, when there was no usable snapshot either.
    Defaults,
}

impl Source {
    /// The name in `X-Config-Source` and `/v1/status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Etcd => "etcd",
            Source::Snapshot => "snapshot",
            Source::Defaults => "defaults",
        }
    }
}

impl Snapshot {
    pub(super) fn empty() -> Self {
        Snapshot {
            revision: 0,
            loaded: false,
            cluster_id: 0,
            entries: OrdSet::new(),
            bytes: 0,
            published_at: SystemTime::now(),
            source: Source::Etcd,
        }
    }

    /// The entry for `key`, if present.
    pub fn get(&self, key: &[u8]) -> Option<&Arc<Entry>> {
        self.entries.get(key).map(|k| &k.0)
    }

    /// Every entry, in key order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Entry>> {
        self.entries.iter().map(|k| &k.0)
    }

    /// Every entry whose key starts with `prefix`, in key order.
    pub fn scan_prefix<'a>(
        &'a self,
        prefix: &'a [u8],
    ) -> impl Iterator<Item = &'a Arc<Entry>> + 'a {
        self.entries
            .range::<_, [u8]>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(move |k| k.0.key.starts_with(prefix))
            .map(|k| &k.0)
    }

    /// Every entry from `key` on, in key order.
    pub fn from_key<'a>(&'a self, key: &'a [u8]) -> impl Iterator<Item = &'a Arc<Entry>> + 'a {
        self.entries
            .range::<_, [u8]>((Bound::Included(key), Bound::Unbounded))
            .map(|k| &k.0)
    }

    /// Number of keys mirrored.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the mirror holds no key.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The snapshot as published at `revision` by etcd's data (a load or the watch).
    pub(super) fn publishable(mut self, revision: i64) -> Self {
        self.revision = revision;
        self.published_at = SystemTime::now();
        self.source = Source::Etcd;
        self
    }
}
