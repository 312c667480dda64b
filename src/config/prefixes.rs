//! The mirrored prefixes, normalised, and the etcd key ranges they cover.

use std::fmt;

/// The exclusive end of the etcd range holding every key that starts with `prefix`: the prefix
/// with its last byte below 0xff incremented (etcd's own `GetPrefixRangeEnd`). `None` means "to the
/// end of the keyspace", which etcd spells as `\0`.
pub fn prefix_range_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// The configured prefixes, normalised: sorted, deduplicated, and with any prefix that another one
/// already covers removed (mirroring `/config/` and `/config/app/` is mirroring `/config/`).
#[derive(Clone, PartialEq, Eq)]
pub struct Prefixes {
    /// Sorted, none a prefix of another.
    list: Vec<String>,
}

impl Prefixes {
    /// Builds the set; the caller has validated that each prefix starts with `/`.
    pub fn new(mut prefixes: Vec<String>) -> Self {
        prefixes.sort();
        prefixes.dedup();
        let mut list: Vec<String> = Vec::with_capacity(prefixes.len());
        for p in prefixes {
            // Sorted order puts a covering prefix right before everything it covers.
            if list.last().is_some_and(|q| p.starts_with(q.as_str())) {
                continue;
            }
            list.push(p);
        }
        Prefixes { list }
    }

    /// The prefixes, sorted.
    pub fn as_slice(&self) -> &[String] {
        &self.list
    }

    /// Whether `key` lies inside a mirrored prefix.
    pub fn contains(&self, key: &[u8]) -> bool {
        self.list.iter().any(|p| key.starts_with(p.as_bytes()))
    }

    /// The configured prefix that `path` names without its trailing slash (`/config/app/` for
    /// `/config/app`): what a newcomer means by a prefix request for `path` when the mirror does
    /// not hold everything starting with `path` itself (`/config/apple/` too).
    pub fn named_without_slash(&self, path: &str) -> Option<&str> {
        self.list
            .iter()
            .find(|p| p.strip_suffix('/') == Some(path))
            .map(String::as_str)
    }

    /// The single etcd key range `[start, end)` covering every prefix. One watch over this range
    /// delivers each revision's events, across all prefixes, in one response, which is what lets the
    /// store apply a transaction atomically; events for keys between the prefixes are dropped by
    /// [`Prefixes::contains`].
    pub fn covering_range(&self) -> (Vec<u8>, Option<Vec<u8>>) {
        let first = self
            .list
            .first()
            .map(|p| p.as_bytes().to_vec())
            .unwrap_or_default();
        let last = self.list.last().map(|p| p.as_bytes()).unwrap_or_default();
        (first, prefix_range_end(last))
    }
}

impl fmt::Debug for Prefixes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.list).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_range_end_matches_etcd() {
        assert_eq!(prefix_range_end(b"/a/"), Some(b"/a0".to_vec()));
        assert_eq!(prefix_range_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_range_end(b"\xff\xff"), None);
    }

    #[test]
    fn prefixes_drop_covered_ones_and_cover_all() {
        let p = Prefixes::new(vec![
            "/config/app/".into(),
            "/config/".into(),
            "/other/".into(),
            "/other/".into(),
        ]);
        assert_eq!(
            p.as_slice(),
            &["/config/".to_string(), "/other/".to_string()]
        );
        assert!(p.contains(b"/config/app/x"));
        assert!(!p.contains(b"/configx"));
        assert_eq!(p.named_without_slash("/other"), Some("/other/"));
        assert_eq!(p.named_without_slash("/config"), Some("/config/"));
        assert_eq!(
            p.named_without_slash("/config/app"),
            None,
            "covered, not named"
        );
        assert_eq!(
            p.named_without_slash("/othe"),
            None,
            "shorter than a prefix"
        );
        assert_eq!(p.named_without_slash("/otherx"), None, "a different prefix");
        assert_eq!(p.named_without_slash("/other/"), None);
        let (start, end) = p.covering_range();
        assert_eq!(start, b"/config/".to_vec());
        assert_eq!(end, Some(b"/other0".to_vec()));
    }
}
