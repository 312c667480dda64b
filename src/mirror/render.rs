//! Rendering prefix listings and tree views, and the cache of rendered bodies.
//!
//! Rendering a large prefix costs far more than serving it, so bodies are cached in a moka cache
//! bounded by weight (body bytes), one body per view and prefix: the newest rendered, served with
//! the snapshot it came from, so a response always reports the revision of the body it carries.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use moka::sync::Cache;
use serde_json::{Map, Value};

use crate::mirror::snapshot::{Entry, Snapshot};

/// What a cached body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum View {
    /// `?recurse` listing: a JSON array of entries.
    List,
    /// `/v1/tree`: a nested JSON object.
    Tree,
}

/// Cache key: the view and the prefix. The revision is in the value: a path holds one body, the
/// latest rendered, so a body of a revision no request will ask for again goes as soon as a newer
/// one is rendered, rather than sitting out its turn in the byte budget.
type CacheKey = (View, Arc<str>);

/// Rendered bodies, at most one per view and prefix, bounded by total bytes.
pub struct RenderCache {
    /// The bodies, each with the snapshot it was rendered from: a response reports its revision,
    /// and holding it costs only the values changed since (the rest is shared with the current).
    cache: Cache<CacheKey, (Arc<Snapshot>, Bytes)>,
    /// Bytes of every body this cache rendered that is still alive anywhere: in the cache, in a
    /// response being written, or in a request that rendered its own older revision. Under churn
    /// this, not the cache's weight, is what rendering costs in memory.
    alive: Arc<AtomicU64>,
    /// Lookups answered from the cache, for metrics.
    hits: AtomicU64,
    /// Lookups that rendered, for metrics.
    misses: AtomicU64,
}

impl RenderCache {
    /// A cache holding at most about `max_bytes` of bodies.
    pub fn new(max_bytes: u64) -> Self {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|key: &CacheKey, (_, body): &(Arc<Snapshot>, Bytes)| {
                u32::try_from(body.len() + key.1.len() + 40).unwrap_or(u32::MAX)
            })
            .build();
        RenderCache {
            cache,
            alive: Arc::new(AtomicU64::new(0)),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The body of `view` over `prefix` at the snapshot's revision or a newer one, with the
    /// snapshot it was rendered from (whose revision the response must report). Rendered at most
    /// once per revision: concurrent misses wait for one render, and a request whose snapshot is
    /// older than the cached body is answered with the newer body rather than rendering its own,
    /// since a reader never needs an older revision than the newest the mirror holds. Under churn
    /// that is most requests: each waited for a render that started after its snapshot was taken.
    pub fn get(&self, view: View, prefix: &str, snapshot: Arc<Snapshot>) -> (Arc<Snapshot>, Bytes) {
        let revision = snapshot.revision;
        let key: CacheKey = (view, Arc::from(prefix));
        let entry = self.cache.entry(key).or_insert_with_if(
            || {
                let body = match view {
                    View::List => render_list(&snapshot, prefix),
                    View::Tree => render_tree(&snapshot, prefix),
                };
                (Arc::clone(&snapshot), Alive::track(body, &self.alive))
            },
            |(cached, _)| cached.revision < revision,
        );
        if entry.is_fresh() {
            self.misses.fetch_add(1, Ordering::Relaxed);
            // moka keeps each insert and hit in its logs until its next maintenance, and every
            // logged entry holds its body: under churn that is dozens of replaced bodies of a
            // large prefix. Maintenance now lets the replaced body go when its last reader does.
            self.cache.run_pending_tasks();
        } else {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        entry.into_value()
    }

    /// Bytes of rendered bodies still alive (see the field).
    pub fn alive_bytes(&self) -> u64 {
        self.alive.load(Ordering::Relaxed)
    }

    /// Bodies held and their bytes (as weighed), for status and tests.
    pub fn held(&self) -> (u64, u64) {
        self.cache.run_pending_tasks();
        (self.cache.entry_count(), self.cache.weighted_size())
    }

    /// Lookups answered from the cache and lookups that rendered, since start.
    pub fn hits_and_misses(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }
}

/// A rendered body that counts itself in the cache's `alive` bytes until its last clone drops.
struct Alive {
    /// The body.
    body: Bytes,
    /// The counter it is in.
    alive: Arc<AtomicU64>,
}

impl Alive {
    fn track(body: Bytes, alive: &Arc<AtomicU64>) -> Bytes {
        alive.fetch_add(body.len() as u64, Ordering::Relaxed);
        Bytes::from_owner(Alive {
            body,
            alive: Arc::clone(alive),
        })
    }
}

impl AsRef<[u8]> for Alive {
    fn as_ref(&self) -> &[u8] {
        &self.body
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.alive
            .fetch_sub(self.body.len() as u64, Ordering::Relaxed);
    }
}

/// One entry as JSON: `{create_revision, key, mod_revision, value, version}` (fields by name),
/// written straight from the entry with no JSON value copying its key and value first (a
/// listing or a change event is made of these). A key or value that is not UTF-8 is base64 and
/// carries `key_encoding` / `value_encoding: "base64"`.
pub struct EntryJson<'a>(pub &'a Entry);

impl serde::Serialize for EntryJson<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let entry = self.0;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("create_revision", &entry.create_revision)?;
        bytes_field(&mut map, "key", "key_encoding", &entry.key)?;
        map.serialize_entry("mod_revision", &entry.mod_revision)?;
        bytes_field(&mut map, "value", "value_encoding", entry.value())?;
        map.serialize_entry("version", &entry.version)?;
        map.end()
    }
}

/// A deleted key as JSON: `{key, mod_revision}`, the key as [`EntryJson`] writes it.
pub struct DeletionJson<'a> {
    /// The key deleted.
    pub key: &'a [u8],
    /// The revision of the deletion.
    pub revision: i64,
}

impl serde::Serialize for DeletionJson<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(None)?;
        bytes_field(&mut map, "key", "key_encoding", self.key)?;
        map.serialize_entry("mod_revision", &self.revision)?;
        map.end()
    }
}

/// `name: text`, or `name: base64` followed by `marker: "base64"` for bytes that are not UTF-8:
/// how every JSON body that carries keys or values writes them.
fn bytes_field<M: serde::ser::SerializeMap>(
    map: &mut M,
    name: &str,
    marker: &str,
    bytes: &[u8],
) -> Result<(), M::Error> {
    match std::str::from_utf8(bytes) {
        Ok(text) => map.serialize_entry(name, text),
        Err(_) => {
            let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
            map.serialize_entry(name, &encoded)?;
            map.serialize_entry(marker, "base64")
        }
    }
}

/// `[{key, value, create_revision, mod_revision, version}, ...]` for every key starting with
/// `prefix`, sorted by key. A key or value that is not UTF-8 is base64 and carries
/// `key_encoding` / `value_encoding: "base64"`.
pub fn render_list(snapshot: &Snapshot, prefix: &str) -> Bytes {
    use serde::Serializer as _;
    let mut out = Vec::with_capacity(64);
    (&mut serde_json::Serializer::new(&mut out))
        .collect_seq(
            snapshot
                .scan_prefix(prefix.as_bytes())
                .map(|e| EntryJson(e)),
        )
        .expect("entries serialise");
    Bytes::from(out)
}

/// How a value appears inside a tree: JSON when it parses as JSON, a string when it is UTF-8,
/// otherwise `{"encoding": "base64", "value": "..."}`.
fn tree_value(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.into())),
        Err(_) => {
            let mut obj = Map::new();
            obj.insert("encoding".into(), "base64".into());
            obj.insert(
                "value".into(),
                base64::engine::general_purpose::STANDARD
                    .encode(bytes)
                    .into(),
            );
            Value::Object(obj)
        }
    }
}

/// Deepest nesting of a tree: the segments of a key beyond it stay together as one member name.
/// etcd takes keys up to its request size (1.5 MiB), hundreds of thousands of segments, and
/// serialising (or dropping) nesting that deep would exhaust a thread's stack.
pub const MAX_TREE_DEPTH: usize = 64;

/// One nested object for the subtree under `dir` (which ends with `/`): each `/`-separated segment
/// of the rest of a key is one level. Empty segments are skipped. A key that is both a value and a
/// parent of other keys keeps its own value under the member `""`. Below [`MAX_TREE_DEPTH`]
/// levels the rest of a key is one member, its segments joined by `/`.
pub fn render_tree(snapshot: &Snapshot, dir: &str) -> Bytes {
    Bytes::from(serde_json::to_vec(&tree(snapshot, dir)).expect("JSON values serialise"))
}

/// The tree of `dir` in `snapshot` as a JSON value: what [`render_tree`] serialises and rendered
/// files (YAML, templates) are made from.
pub fn tree(snapshot: &Snapshot, dir: &str) -> Value {
    let mut root = Map::new();
    for entry in snapshot.scan_prefix(dir.as_bytes()) {
        let rest = String::from_utf8_lossy(&entry.key[dir.len()..]);
        let deepest: String;
        let mut segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        if segments.len() > MAX_TREE_DEPTH {
            deepest = segments[MAX_TREE_DEPTH - 1..].join("/");
            segments.truncate(MAX_TREE_DEPTH - 1);
            segments.push(&deepest);
        }
        let value = tree_value(entry.value());
        let Some((leaf, parents)) = segments.split_last() else {
            // The key is the directory itself (`/config/app/`): its value sits under "".
            root.insert(String::new(), value);
            continue;
        };
        let mut node = &mut root;
        for segment in parents {
            let slot = node
                .entry(segment.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if !slot.is_object() {
                let own = std::mem::replace(slot, Value::Object(Map::new()));
                slot.as_object_mut()
                    .expect("just made an object")
                    .insert(String::new(), own);
            }
            node = slot.as_object_mut().expect("checked above");
        }
        match node.get_mut(*leaf) {
            Some(Value::Object(children)) if !children.is_empty() => {
                children.insert(String::new(), value);
            }
            _ => {
                node.insert(leaf.to_string(), value);
            }
        }
    }
    Value::Object(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference the direct writers must equal: `bytes` into `obj` under `field` as text, or
    /// as base64 with a `{field}_encoding: "base64"` marker when they are not UTF-8, through a
    /// JSON map (as entries and deletions were written before `EntryJson`).
    fn put_bytes(obj: &mut Map<String, Value>, field: &str, bytes: &[u8]) {
        match std::str::from_utf8(bytes) {
            Ok(text) => {
                obj.insert(field.into(), Value::String(text.into()));
            }
            Err(_) => {
                obj.insert(
                    field.into(),
                    Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
                );
                obj.insert(format!("{field}_encoding"), Value::String("base64".into()));
            }
        }
    }

    /// One entry as JSON: `{key, value, create_revision, mod_revision, version}`, with base64 and an
    /// `_encoding` marker for bytes that are not UTF-8.
    fn entry_json(entry: &Entry) -> Value {
        let mut obj = Map::new();
        put_bytes(&mut obj, "key", &entry.key);
        put_bytes(&mut obj, "value", entry.value());
        obj.insert("create_revision".into(), entry.create_revision.into());
        obj.insert("mod_revision".into(), entry.mod_revision.into());
        obj.insert("version".into(), entry.version.into());
        Value::Object(obj)
    }

    /// The direct writers give the JSON map's bytes, for text and for bytes that are not UTF-8
    /// (base64 with the `_encoding` markers).
    #[test]
    fn entry_json_text_is_the_values_text() {
        for (key, value) in [
            (&b"/a/k"[..], &b"plain \"quoted\" \n text"[..]),
            (&b"/a/\xff"[..], &b"{\"json\": 1}"[..]),
            (&b"/a/b"[..], &b"\x00\xfe binary"[..]),
        ] {
            let entry = Entry::new(
                Bytes::copy_from_slice(key),
                Bytes::copy_from_slice(value),
                3,
                7,
                2,
            );
            assert_eq!(
                serde_json::to_string(&EntryJson(&entry)).unwrap(),
                entry_json(&entry).to_string()
            );
            let mut deletion = Map::new();
            put_bytes(&mut deletion, "key", key);
            deletion.insert("mod_revision".into(), 9.into());
            assert_eq!(
                serde_json::to_string(&DeletionJson { key, revision: 9 }).unwrap(),
                Value::Object(deletion).to_string()
            );
        }
    }
    use crate::mirror::store::Store;

    fn snapshot(pairs: &[(&str, &[u8])]) -> Arc<Snapshot> {
        let store = Store::new();
        let entries = pairs
            .iter()
            .enumerate()
            .map(|(i, (k, v))| {
                Entry::new(
                    Bytes::copy_from_slice(k.as_bytes()),
                    Bytes::copy_from_slice(v),
                    i as i64 + 2,
                    i as i64 + 2,
                    1,
                )
            })
            .collect();
        store.replace(10, entries).unwrap();
        store.snapshot()
    }

    #[test]
    fn tree_nests_segments_and_embeds_json() {
        let snap = snapshot(&[
            ("/c/app/db", b"primary"),
            ("/c/app/db/host", b"h1"),
            ("/c/app/db/port", b"5432"),
            ("/c/app/flags", b"{\"beta\":true}"),
            ("/c/app/raw", b"\xff\x00"),
            ("/c/other", b"x"),
        ]);
        let tree: Value = serde_json::from_slice(&render_tree(&snap, "/c/app/")).unwrap();
        assert_eq!(
            tree,
            serde_json::json!({
                "db": {"": "primary", "host": "h1", "port": 5432},
                "flags": {"beta": true},
                "raw": {"encoding": "base64", "value": "/wA="},
            })
        );
    }

    /// A key hundreds of thousands of segments deep (etcd takes keys up to its 1.5 MiB request
    /// size) and deeply nested JSON values render without exhausting the stack: the tree stops
    /// nesting at `MAX_TREE_DEPTH` and values nested deeper than the JSON parser's limit stay
    /// strings.
    #[test]
    fn hostile_depth_renders_within_limits() {
        let deep_key = format!("/c/{}", "a/".repeat(300_000));
        let deep_json = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let snap = snapshot(&[
            (deep_key.as_str(), b"bottom"),
            ("/c/deep-json", deep_json.as_bytes()),
            ("/c/bad-json", b"{\"a\": [1, 2"),
        ]);
        // Run on a thread with a worker thread's stack: an overflow aborts the whole test run.
        let rendered = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || render_tree(&snap, "/c/"))
            .unwrap()
            .join()
            .unwrap();
        let tree: Value = serde_json::from_slice(&rendered).unwrap();
        assert_eq!(tree["deep-json"], Value::String(deep_json));
        assert_eq!(tree["bad-json"], "{\"a\": [1, 2");
        let (mut node, mut depth) = (&tree["a"], 1);
        while let Some(next) = node.get("a") {
            (node, depth) = (next, depth + 1);
        }
        assert_eq!(depth + 1, MAX_TREE_DEPTH, "nesting stops at the limit");
        let rest = node.as_object().unwrap();
        assert_eq!(rest.len(), 1, "the rest of the key is one member: {rest:?}");
        let (name, value) = rest.iter().next().unwrap();
        assert_eq!(name.split('/').count(), 300_000 - depth);
        assert_eq!(value, "bottom");
    }

    #[test]
    fn list_is_sorted_and_marks_binary_values() {
        let snap = snapshot(&[("/c/b", b"2"), ("/c/a", b"1"), ("/c/z", b"\xfe")]);
        let list: Value = serde_json::from_slice(&render_list(&snap, "/c/")).unwrap();
        let keys: Vec<&str> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["key"].as_str().unwrap())
            .collect();
        assert_eq!(keys, ["/c/a", "/c/b", "/c/z"]);
        assert_eq!(list[2]["value"], "/g==");
        assert_eq!(list[2]["value_encoding"], "base64");
        assert!(list[0].get("value_encoding").is_none());
        assert_eq!(list[0]["mod_revision"], 3);
    }

    #[test]
    fn cache_never_serves_another_revision() {
        let store = Store::new();
        let cache = RenderCache::new(1 << 20);
        let e = |v: &str, r| {
            Entry::new(
                Bytes::from_static(b"/c/k"),
                Bytes::from(v.to_string()),
                2,
                r,
                1,
            )
        };
        store.replace(2, vec![e("old", 2)]).unwrap();
        let (at, first) = cache.get(View::List, "/c/", store.snapshot());
        assert_eq!(at.revision, 2);
        store.replace(3, vec![e("new", 3)]).unwrap();
        let (at, second) = cache.get(View::List, "/c/", store.snapshot());
        assert_eq!(at.revision, 3);
        assert_ne!(first, second);
        assert!(std::str::from_utf8(&second).unwrap().contains("new"));
    }

    #[test]
    fn cache_holds_only_the_latest_body_of_a_path() {
        let store = Store::new();
        let cache = RenderCache::new(1 << 20);
        let e = |r: i64| {
            Entry::new(
                Bytes::from_static(b"/c/k"),
                Bytes::from(format!("value {r} {}", "x".repeat(1000))),
                2,
                r,
                1,
            )
        };
        store.replace(2, vec![e(2)]).unwrap();
        let old = store.snapshot();
        for r in 3..50 {
            store.replace(r, vec![e(r)]).unwrap();
            cache.get(View::Tree, "/c/", store.snapshot());
        }
        // Nothing but the cache holds a body now: every replaced one is gone, though nothing
        // asked moka to tidy up (`held` would).
        let (_, current) = cache.get(View::Tree, "/c/", store.snapshot());
        assert_eq!(
            cache.alive_bytes(),
            current.len() as u64,
            "only the current body is alive"
        );
        let (bodies, bytes) = cache.held();
        assert_eq!(
            bodies, 1,
            "one body per path, whatever the revisions rendered"
        );
        assert!(bytes < 1200, "{bytes} bytes held");
        // A request still on an older snapshot gets the newer body, with the snapshot it is of.
        let (at, body) = cache.get(View::Tree, "/c/", old);
        assert_eq!(at.revision, 49);
        assert!(std::str::from_utf8(&body).unwrap().contains("value 49 "));
        assert_eq!(
            cache.alive_bytes(),
            current.len() as u64,
            "no second render"
        );
        let (hits, misses) = cache.hits_and_misses();
        assert_eq!((hits, misses), (2, 47));
    }
}
