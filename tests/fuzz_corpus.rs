//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) through the same checks the
//! `cargo fuzz` targets run, on the stable toolchain: what a fuzzer found once stays tested.
//! Fuzzing itself: `scripts/fuzz.sh`.

#[path = "../fuzz/checks.rs"]
mod checks;

use std::path::Path;

/// Runs `check` over every file of the corpus of `target`; returns how many there were.
fn replay(target: &str, check: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(outcome.is_ok(), "{} fails its check", path.display());
        n += 1;
    }
    n
}

#[test]
fn key_path_corpus_holds() {
    assert!(replay("key_path", checks::key_path) >= 20);
}

#[test]
fn request_stream_corpus_holds() {
    assert!(replay("request_stream", checks::request_stream) >= 20);
}

#[test]
fn snapshot_decode_corpus_holds() {
    assert!(replay("snapshot_decode", checks::snapshot) >= 6);
}
