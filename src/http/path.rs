//! URL path → etcd key: decoded exactly once, then validated.
//!
//! All key handling that could let a request escape the mirrored prefixes lives here, so that the
//! rules (decode once, no empty, `.` or `..` segments, no NUL) are checked in one place.

use std::borrow::Cow;

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

/// A query parameter's value, percent-decoded (not a key: no key rules apply).
pub fn decode_query_value(raw: &str) -> Result<String, KeyError> {
    String::from_utf8(percent_decode(raw.as_bytes())?).map_err(|_| KeyError::NotUtf8)
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
}
