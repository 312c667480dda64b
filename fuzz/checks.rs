//! What the fuzz targets assert, shared with `tests/fuzz_corpus.rs`, which replays the committed
//! corpora on the stable toolchain so every input ever found stays a regression test.
// Each fuzz target uses one of the two checks.
#![allow(dead_code)]

use config_sidecar::keys::{decode_key_path, validate_key, Prefixes};
use config_sidecar::persist;

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
