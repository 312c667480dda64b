//! Micro-benchmarks of the read path at 1k, 10k and 100k keys: one key through the fast path that
//! serves plain reads (lookup + response build) and through the whole router, a prefix listing and a tree render (uncached), applying a watch
//! batch, encoding / decoding the disk snapshot, and the wire screen over one request head. `cargo bench --bench read_path`; under
//! `cargo test` each runs once as a smoke test.

use std::sync::Arc;

use axum::body::Body;
use bytes::Bytes;
use config_sidecar::config::Config;
use config_sidecar::http::fast_path::plain_read;
use config_sidecar::http::server::screen::Framing;
use config_sidecar::http::{app, AppState};
use config_sidecar::mirror::persist;
use config_sidecar::mirror::render::{render_list, render_tree};
use config_sidecar::mirror::snapshot::{Entry, Event};
use config_sidecar::mirror::store::Store;
use config_sidecar::mode::handle::ModeHandle;
use config_sidecar::ops::run::standalone_state;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::Request;
use tower::ServiceExt;

const SIZES: [usize; 3] = [1_000, 10_000, 100_000];

/// `n` keys spread over 100 apps: `/bench/app{i%100}/key{i}`, 256-byte values.
fn filled_store(n: usize) -> Arc<Store> {
    let store = Arc::new(Store::new());
    let value = Bytes::from(vec![b'v'; 256]);
    let entries = (0..n)
        .map(|i| {
            let key = format!("/bench/app{:02}/key{i:06}", i % 100);
            Entry::new(Bytes::from(key), value.clone(), 2, 2 + i as i64, 1)
        })
        .collect();
    store.replace(n as i64 + 2, entries).unwrap();
    store
}

fn state(store: Arc<Store>) -> AppState {
    let config = Config::for_endpoints(&["http://127.0.0.1:1".into()], &["/bench/"]).unwrap();
    standalone_state(&config, store, Arc::new(ModeHandle::default()))
}

fn read_path(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for n in SIZES {
        let store = filled_store(n);
        let state = state(store.clone());
        let key = format!("/v1/kv/bench/app07/key{:06}", 7 + 100 * (n / 200));
        let request = Request::builder().uri(key.as_str()).body(()).unwrap();
        c.bench_with_input(
            BenchmarkId::new("get_key_fast_path", n),
            &request,
            |b, req| {
                b.iter(|| {
                    let resp = plain_read(&state, req).unwrap();
                    assert_eq!(resp.status(), 200);
                    resp
                })
            },
        );
        let app = app(state);
        c.bench_with_input(BenchmarkId::new("get_key", n), &key, |b, key| {
            b.to_async(&runtime).iter(|| {
                let req = Request::builder()
                    .uri(key.as_str())
                    .body(Body::empty())
                    .unwrap();
                let app = app.clone();
                async move {
                    let resp = app.oneshot(req).await.unwrap();
                    assert_eq!(resp.status(), 200);
                    resp
                }
            })
        });
        let snapshot = store.snapshot();
        c.bench_with_input(
            BenchmarkId::new("render_list_1pct", n),
            &snapshot,
            |b, s| b.iter(|| render_list(s, "/bench/app42/")),
        );
        c.bench_with_input(
            BenchmarkId::new("render_tree_1pct", n),
            &snapshot,
            |b, s| b.iter(|| render_tree(s, "/bench/app42/")),
        );
        let prefixes = vec!["/bench/".to_string()];
        let encoded = persist::encode(&snapshot, &prefixes, 1);
        c.bench_with_input(BenchmarkId::new("snapshot_encode", n), &snapshot, |b, s| {
            b.iter(|| persist::encode(s, &prefixes, 1))
        });
        c.bench_with_input(BenchmarkId::new("snapshot_decode", n), &encoded, |b, e| {
            b.iter(|| persist::decode(e).unwrap())
        });
        let mut revision = n as i64 + 2;
        c.bench_function(&format!("apply_batch_of_10/{n}"), |b| {
            b.iter(|| {
                revision += 1;
                let events = (0..10)
                    .map(|i| {
                        let key = Bytes::from(format!("/bench/app{i:02}/key{i:06}"));
                        Event::Put(Entry::new(key, Bytes::from_static(b"new"), 2, revision, 2))
                    })
                    .collect();
                store.apply(revision, events)
            })
        });
    }
}

/// The wire screen over one request head as wrk sends it: what every HTTP/1 request pays before
/// hyper parses it.
fn screen_head(c: &mut Criterion) {
    let head = b"GET /v1/kv/bench/app42/key000042 HTTP/1.1\r\nHost: 127.0.0.1:7379\r\n\r\n";
    c.bench_function("screen_head", |b| {
        b.iter(|| {
            let mut framing = Framing::default();
            framing.step(std::hint::black_box(head))
        })
    });
}

criterion_group!(benches, read_path, screen_head);
criterion_main!(benches);
