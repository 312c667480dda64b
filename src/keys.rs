//! Keys and prefixes: turning a URL path into an etcd key, and the byte ranges that etcd uses for
//! prefixes.
//!
//! All key handling that could let a request escape the mirrored prefixes lives here, so that the
//! rules (decode once, no empty, `.` or `..` segments, no NUL) are checked in one place.

use std::borrow::Cow;
use std::fmt;

/// Why a URL path is not an acceptable key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// `%` not followed by two hex digits.
    #[error("invalid percent-encoding in the key")]
    BadPercentEncoding,
    /// The decoded bytes are not UTF-8.
    #[error("the key is not valid UTF-8 after percent-decoding")]
    NotUtf8,
    /// Nothing after the route prefix.
    #[error("the key is empty")]
    Empty,
    /// `//` inside the key.
    #[error("the key has an empty segment")]
    EmptySegment,
    /// A `.` or `..` segment, encoded or not.
    #[error("the key has a '.' or '..' segment")]
    DotSegment,
    /// A NUL byte, which no config key should carry and which C-string consumers would truncate.
    #[error("the key contains a NUL byte")]
    Nul,
}

/// Decodes the part of a URL path that names a key (everything after `/v1/kv`, with its leading
/// `/`) into the etcd key. Percent-encoding is decoded exactly once; the result is validated after
/// decoding, so `%2e%2e` and `%2F` cannot smuggle in what a plain path may not carry.
///
/// A trailing `/` is allowed (prefix reads such as `/config/app/`), empty segments elsewhere are not.
///
/// A path without `%` is the key as it stands and is borrowed, not copied: the common read costs
/// no allocation here.
pub fn decode_key_path(raw: &str) -> Result<Cow<'_, str>, KeyError> {
    if !raw.contains('%') {
        validate_key(raw)?;
        return Ok(Cow::Borrowed(raw));
    }
    let bytes = percent_decode(raw.as_bytes())?;
    let key = String::from_utf8(bytes).map_err(|_| KeyError::NotUtf8)?;
    validate_key(&key)?;
    Ok(Cow::Owned(key))
}

/// Checks a decoded key against the rules of [`decode_key_path`].
pub fn validate_key(key: &str) -> Result<(), KeyError> {
    if !key.starts_with('/') {
        // The route always supplies the leading slash; a key without one cannot be addressed.
        return Err(KeyError::Empty);
    }
    if key.as_bytes().contains(&0) {
        return Err(KeyError::Nul);
    }
    let body = &key[1..];
    if body.is_empty() {
        return Err(KeyError::Empty);
    }
    let body = body.strip_suffix('/').unwrap_or(body);
    for segment in body.split('/') {
        match segment {
            "" => return Err(KeyError::EmptySegment),
            "." | ".." => return Err(KeyError::DotSegment),
            _ => {}
        }
    }
    Ok(())
}

fn percent_decode(input: &[u8]) -> Result<Vec<u8>, KeyError> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        let b = input[i];
        if b == b'%' {
            let hi = input.get(i + 1).and_then(|c| hex_value(*c));
            let lo = input.get(i + 2).and_then(|c| hex_value(*c));
            match (hi, lo) {
                (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                _ => return Err(KeyError::BadPercentEncoding),
            }
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    Ok(out)
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

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
    fn decodes_once_and_validates_after_decoding() {
        assert_eq!(decode_key_path("/config/app/db").unwrap(), "/config/app/db");
        assert_eq!(decode_key_path("/config/a%20b").unwrap(), "/config/a b");
        // %25 decodes to a literal '%', not to a second round of decoding.
        assert_eq!(decode_key_path("/config/%2541").unwrap(), "/config/%41");
        assert_eq!(decode_key_path("/config/app/").unwrap(), "/config/app/");
        assert_eq!(
            decode_key_path("/config/%2e%2e/x"),
            Err(KeyError::DotSegment)
        );
        assert_eq!(decode_key_path("/config/../x"), Err(KeyError::DotSegment));
        assert_eq!(decode_key_path("/config/./x"), Err(KeyError::DotSegment));
        assert_eq!(
            decode_key_path("/config/%2F/x"),
            Err(KeyError::EmptySegment)
        );
        assert_eq!(decode_key_path("/config//x"), Err(KeyError::EmptySegment));
        assert_eq!(
            decode_key_path("/config/%zz"),
            Err(KeyError::BadPercentEncoding)
        );
        assert_eq!(
            decode_key_path("/config/%4"),
            Err(KeyError::BadPercentEncoding)
        );
        assert_eq!(decode_key_path("/config/%ff"), Err(KeyError::NotUtf8));
        assert_eq!(decode_key_path("/config/a%00"), Err(KeyError::Nul));
        assert_eq!(decode_key_path("/"), Err(KeyError::Empty));
        assert_eq!(decode_key_path(""), Err(KeyError::Empty));
    }

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
