//! What the fuzz targets assert, shared with `tests/fuzz_corpus.rs`, which replays the committed
//! corpora on the stable toolchain so every input ever found stays a regression test.
// Each fuzz target uses one of the checks.
#![allow(dead_code)]

use config_sidecar::config::Prefixes;
use config_sidecar::http::path::{decode_key_path, validate_key};
use config_sidecar::http::server::screen::Framing;
use config_sidecar::mirror::persist;

/// A URL path after `/v1/kv`: decoding never panics, and whatever it accepts is a key that
/// cannot leave its prefix: absolute, no NUL, no empty, `.` or `..` segment, and unchanged when
/// there was nothing to decode. Prefix membership agrees with plain byte comparison.
pub fn key_path(data: &[u8]) {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(key) = decode_key_path(raw) else {
        return;
    };
    assert!(validate_key(&key).is_ok(), "{raw:?} -> {key:?}");
    assert!(key.starts_with('/') && !key.contains('\0'), "{key:?}");
    let body = key[1..].strip_suffix('/').unwrap_or(&key[1..]);
    assert!(
        body.split('/')
            .all(|s| !s.is_empty() && s != "." && s != ".."),
        "{key:?}"
    );
    if !raw.contains('%') {
        assert_eq!(&*key, raw);
    }
    let prefixes = Prefixes::new(vec!["/app/".into(), "/app/sub/".into(), "/b".into()]);
    let expected = key.starts_with("/app/") || key.starts_with("/b");
    assert_eq!(prefixes.contains(key.as_bytes()), expected, "{key:?}");
}

/// Snapshot bytes: decoding never panics, on the raw bytes (most fail the magic or checksum) and
/// on the bytes framed with the magic and a correct checksum (so the fuzzer reaches the parser).
/// What decodes keeps every entry at or below the snapshot's revision.
pub fn snapshot(data: &[u8]) {
    check_decoded(persist::decode(data));
    let mut framed = persist::MAGIC.to_vec();
    framed.extend_from_slice(data);
    let crc = crc32fast::hash(&framed);
    framed.extend_from_slice(&crc.to_le_bytes());
    check_decoded(persist::decode(&framed));
}

fn check_decoded(result: Result<persist::SnapshotFile, persist::SnapshotError>) {
    if let Ok(file) = result {
        assert!(file.entries.iter().all(|e| e.mod_revision <= file.revision));
    }
}

/// Bytes arriving on an HTTP/1 connection, the first byte choosing how they are split into
/// reads: the wire screen never panics, hands over the stream unchanged up to where it holds or
/// refuses, and reaches the same outcome (bytes handed over, refused head) however the stream
/// is split.
pub fn request_stream(data: &[u8]) {
    let Some((&split, stream)) = data.split_first() else {
        return;
    };
    let whole = screened(stream, stream.len().max(1));
    let pieces = screened(stream, usize::from(split % 16) + 1);
    assert_eq!(whole, pieces, "split into reads of {}", split % 16 + 1);
    assert!(stream.starts_with(&whole.0));
}

/// What the screen hands over of `stream` read `piece` bytes at a time, and what it refused.
fn screened(
    stream: &[u8],
    piece: usize,
) -> (Vec<u8>, Option<(u64, config_sidecar::http::error::Refusal)>) {
    let mut framing = Framing::default();
    let (mut held, mut handed) = (Vec::new(), Vec::new());
    for part in stream.chunks(piece) {
        held.extend_from_slice(part);
        let (passed, refused) = framing.screen(&held);
        handed.extend_from_slice(&held[..passed]);
        if refused.is_some() {
            return (handed, refused);
        }
        held.drain(..passed);
    }
    (handed, None)
}
