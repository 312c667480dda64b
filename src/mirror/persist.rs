//! The disk snapshot: the mirror saved to one file, so that a sidecar restarted while etcd is
//! unreachable still serves the last known configuration. Persistence only reads the store.
//!
//! File layout (little-endian), version 1:
//!
//! ```text
//! magic    8 bytes  "CSSNAP\0\x01"
//! hlen     u32      length of the JSON header
//! header   hlen     {"cluster_id", "revision", "prefixes", "confirmed_at_unix_ms", "entries"}
//! entries  repeated {klen u32, key, vlen u32, value, create_revision i64, mod_revision i64, version i64}
//! crc32    u32      CRC-32 of every byte before it
//! ```
//!
//! It is written atomically (temp file in the same directory, fsync, rename, fsync of the
//! directory) with mode 0600. A file that fails any check (magic, lengths, checksum, entry count,
//! prefixes) is rejected whole: it is never served in part.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::liveness::Heartbeat;
use crate::mirror::snapshot::{Entry, Snapshot};
use crate::mirror::store::Store;
use crate::mode::handle::ModeHandle;
use crate::mode::unix_ms;

/// The first bytes of every snapshot file: the format's name and version.
pub const MAGIC: &[u8; 8] = b"CSSNAP\0\x01";
/// Debounce of snapshot writes: at most about one per this period.
pub const WRITE_EVERY: Duration = Duration::from_secs(1);

/// The JSON header.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Header {
    cluster_id: u64,
    revision: i64,
    prefixes: Vec<String>,
    confirmed_at_unix_ms: u64,
    entries: u64,
}

/// A decoded snapshot file.
#[derive(Debug)]
pub struct SnapshotFile {
    /// Cluster the data came from.
    pub cluster_id: u64,
    /// Revision of the data.
    pub revision: i64,
    /// Prefixes it mirrors.
    pub prefixes: Vec<String>,
    /// When the data was last confirmed current (Unix ms).
    pub confirmed_at_unix_ms: u64,
    /// The entries.
    pub entries: Vec<Entry>,
}

/// Why a snapshot file is not used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Cannot be read.
    #[error("cannot read the snapshot: {0}")]
    Io(#[from] io::Error),
    /// Not a snapshot file of this format.
    #[error("not a config-sidecar snapshot (bad magic)")]
    BadMagic,
    /// Shorter than its own lengths say.
    #[error("snapshot is truncated")]
    Truncated,
    /// The checksum does not match.
    #[error("snapshot checksum mismatch (corrupt)")]
    Checksum,
    /// The header is not valid.
    #[error("snapshot header is invalid: {0}")]
    Header(String),
    /// Written for other prefixes.
    #[error("snapshot mirrors {found:?}, this sidecar mirrors {expected:?}")]
    ForeignPrefixes {
        /// In the file.
        found: Vec<String>,
        /// Configured.
        expected: Vec<String>,
    },
}

/// Encodes `snapshot` into memory (tests and small mirrors; the writer streams instead).
pub fn encode(snapshot: &Snapshot, prefixes: &[String], confirmed_at_unix_ms: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(snapshot.bytes as usize + snapshot.len() * 40 + 256);
    encode_into(&mut out, snapshot, prefixes, confirmed_at_unix_ms)
        .expect("writing to memory does not fail");
    out
}

/// A writer that keeps the CRC-32 of everything written through it.
struct Checksummed<W> {
    inner: W,
    crc: crc32fast::Hasher,
}

impl<W: Write> Write for Checksummed<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Streams `snapshot` in the file format to `out`, so that saving a large mirror never holds a
/// second copy of it in memory.
pub fn encode_into(
    out: &mut impl Write,
    snapshot: &Snapshot,
    prefixes: &[String],
    confirmed_at_unix_ms: u64,
) -> io::Result<()> {
    let header = serde_json::to_vec(&Header {
        cluster_id: snapshot.cluster_id,
        revision: snapshot.revision,
        prefixes: prefixes.to_vec(),
        confirmed_at_unix_ms,
        entries: snapshot.len() as u64,
    })
    .expect("header serialises");
    let mut w = Checksummed {
        inner: out,
        crc: crc32fast::Hasher::new(),
    };
    w.write_all(MAGIC)?;
    w.write_all(&(header.len() as u32).to_le_bytes())?;
    w.write_all(&header)?;
    for entry in snapshot.iter() {
        w.write_all(&(entry.key.len() as u32).to_le_bytes())?;
        w.write_all(&entry.key)?;
        w.write_all(&(entry.value().len() as u32).to_le_bytes())?;
        w.write_all(entry.value())?;
        w.write_all(&entry.create_revision.to_le_bytes())?;
        w.write_all(&entry.mod_revision.to_le_bytes())?;
        w.write_all(&entry.version.to_le_bytes())?;
    }
    let crc = w.crc.finalize();
    w.inner.write_all(&crc.to_le_bytes())?;
    w.inner.flush()
}

/// A cursor over the file's bytes that fails with `Truncated` instead of panicking.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        let end = self.at.checked_add(n).ok_or(SnapshotError::Truncated)?;
        let slice = self
            .bytes
            .get(self.at..end)
            .ok_or(SnapshotError::Truncated)?;
        self.at = end;
        Ok(slice)
    }

    fn u32(&mut self) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn i64(&mut self) -> Result<i64, SnapshotError> {
        Ok(i64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
}

/// Decodes and checks a snapshot file's bytes.
pub fn decode(bytes: &[u8]) -> Result<SnapshotFile, SnapshotError> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    if bytes.len() < MAGIC.len() + 8 {
        return Err(SnapshotError::Truncated);
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err(SnapshotError::Checksum);
    }
    let mut r = Reader {
        bytes: body,
        at: MAGIC.len(),
    };
    let hlen = r.u32()? as usize;
    let header: Header =
        serde_json::from_slice(r.take(hlen)?).map_err(|e| SnapshotError::Header(e.to_string()))?;
    let mut entries = Vec::with_capacity(header.entries.min(1 << 20) as usize);
    while r.at < body.len() {
        let klen = r.u32()? as usize;
        let key = Bytes::copy_from_slice(r.take(klen)?);
        let vlen = r.u32()? as usize;
        let value = r.take(vlen)?;
        let (create, modr, version) = (r.i64()?, r.i64()?, r.i64()?);
        if modr > header.revision {
            return Err(SnapshotError::Header(format!(
                "an entry's revision {modr} is above the snapshot's {}",
                header.revision
            )));
        }
        entries.push(Entry::new(key, value, create, modr, version));
    }
    if entries.len() as u64 != header.entries {
        return Err(SnapshotError::Header(format!(
            "header says {} entries, file has {}",
            header.entries,
            entries.len()
        )));
    }
    Ok(SnapshotFile {
        cluster_id: header.cluster_id,
        revision: header.revision,
        prefixes: header.prefixes,
        confirmed_at_unix_ms: header.confirmed_at_unix_ms,
        entries,
    })
}

/// Reads the snapshot at `path` for a sidecar mirroring `prefixes`. `Ok(None)` when there is no
/// file.
pub fn load(path: &Path, prefixes: &[String]) -> Result<Option<SnapshotFile>, SnapshotError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let file = decode(&bytes)?;
    if file.prefixes != prefixes {
        return Err(SnapshotError::ForeignPrefixes {
            found: file.prefixes,
            expected: prefixes.to_vec(),
        });
    }
    Ok(Some(file))
}

/// Writes `path` atomically with what `fill` writes, with permission bits `mode` (whatever the
/// umask): a temp file in the same directory, fsync, rename over `path`, fsync of the directory.
pub fn write_atomic_with(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut io::BufWriter<&mut File>) -> io::Result<()>,
) -> io::Result<()> {
    let dir = crate::config::directory_of(path);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut options = OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut f = options.open(&tmp)?;
        #[cfg(unix)]
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        let mut buffered = io::BufWriter::with_capacity(1 << 20, &mut f);
        fill(&mut buffered)?;
        buffered.flush()?;
        drop(buffered);
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Saves the mirror after changes, at most about once per [`WRITE_EVERY`], and once more at
/// shutdown.
pub struct SnapshotWriter {
    /// What to save.
    store: Arc<Store>,
    /// Where.
    path: PathBuf,
    /// Recorded in the file with the data.
    prefixes: Vec<String>,
    /// Freshness to record.
    mode: Arc<ModeHandle>,
    /// Writes and failures, for metrics and health, and the revision on disk (written, or of
    /// the loaded file), to skip writes that change nothing.
    stats: Arc<WriterStats>,
    /// Beaten while idle and after each write: a write that hangs (a wedged disk or network file
    /// system) silences it, and liveness fails.
    heartbeat: Arc<Heartbeat>,
}

/// What the snapshot writer has done, shared with metrics and health checks.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Snapshot files written.
    writes: AtomicU64,
    /// Writes that failed.
    failures: AtomicU64,
    /// Whether the last write failed.
    failing: AtomicBool,
    /// The revision the file on disk holds (written, or found at start; 0: none yet): what a
    /// restart now would serve and catch up from.
    revision: AtomicI64,
}

impl WriterStats {
    /// Snapshot files written since start.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Writes that failed since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Whether the last write failed.
    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// The revision the file on disk holds (0: none yet).
    pub fn revision(&self) -> i64 {
        self.revision.load(Ordering::Relaxed)
    }

    fn record(&self, ok: bool) {
        let counter = if ok { &self.writes } else { &self.failures };
        counter.fetch_add(1, Ordering::Relaxed);
        self.failing.store(!ok, Ordering::Relaxed);
    }
}

impl SnapshotWriter {
    /// A writer for `store` to `path`; `written` is the revision already on disk; a write that
    /// takes longer than `write_timeout` counts as a stalled task.
    pub fn new(
        store: Arc<Store>,
        path: PathBuf,
        prefixes: Vec<String>,
        mode: Arc<ModeHandle>,
        written: i64,
        write_timeout: Duration,
    ) -> Self {
        SnapshotWriter {
            store,
            path,
            prefixes,
            mode,
            stats: Arc::new(WriterStats {
                revision: AtomicI64::new(written),
                ..WriterStats::default()
            }),
            heartbeat: Heartbeat::new(write_timeout + WRITE_EVERY * 2),
        }
    }

    /// Its sign of life.
    pub fn heartbeat(&self) -> Arc<Heartbeat> {
        self.heartbeat.clone()
    }

    /// Its record of writes and failures.
    pub fn stats(&self) -> Arc<WriterStats> {
        self.stats.clone()
    }

    /// Writes now if the mirror moved since the last write.
    pub async fn write_if_changed(&mut self) {
        let snapshot = self.store.snapshot();
        // Defaults are not etcd's data: they never reach the disk, where a restart would take
        // them for a snapshot of etcd.
        if !snapshot.loaded
            || snapshot.revision == self.stats.revision()
            || snapshot.source == crate::mirror::snapshot::Source::Defaults
        {
            return;
        }
        let confirmed = self
            .mode
            .staleness(SystemTime::now())
            .map(|s| unix_ms(SystemTime::now()).saturating_sub(s.as_millis() as u64))
            .unwrap_or_default();
        let path = self.path.clone();
        let prefixes = self.prefixes.clone();
        let revision = snapshot.revision;
        let result = tokio::task::spawn_blocking(move || {
            write_atomic_with(&path, 0o600, |out| {
                encode_into(out, &snapshot, &prefixes, confirmed)
            })
        })
        .await;
        match result {
            Ok(Ok(())) => {
                self.stats.revision.store(revision, Ordering::Relaxed);
                self.stats.record(true);
                tracing::debug!(revision, "snapshot written");
            }
            Ok(Err(e)) => {
                self.stats.record(false);
                tracing::error!(path = %self.path.display(), error = %e, "snapshot write failed")
            }
            Err(e) => {
                self.stats.record(false);
                tracing::error!(error = %e, "snapshot writer task failed")
            }
        }
    }

    /// Writes after each change, debounced, until `stop` completes; then writes a last time.
    pub async fn run(mut self, stop: impl std::future::Future<Output = ()>) {
        let mut stop = std::pin::pin!(stop);
        let mut revisions = self.store.subscribe();
        loop {
            // Nothing to write: only a change wakes the writer, and the wait is no stall.
            self.heartbeat.wait_for_work();
            tokio::select! {
                changed = revisions.changed() => {
                    self.heartbeat.beat();
                    if changed.is_err() {
                        break;
                    }
                    tokio::select! {
                        () = tokio::time::sleep(WRITE_EVERY) => {}
                        () = &mut stop => break,
                    }
                    self.write_if_changed().await;
                }
                () = &mut stop => break,
            }
        }
        self.write_if_changed().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Store {
        let store = Store::new();
        let entries = vec![
            Entry::new(
                Bytes::from_static(b"/p/a"),
                Bytes::from_static(b"1"),
                2,
                2,
                1,
            ),
            Entry::new(
                Bytes::from_static(b"/p/b"),
                Bytes::from_static(b"\xff"),
                3,
                5,
                2,
            ),
        ];
        store.replace_from(77, 6, entries).unwrap();
        store
    }

    #[test]
    fn round_trip_keeps_everything() {
        let s = store().snapshot();
        let bytes = encode(&s, &["/p/".into()], 123);
        let f = decode(&bytes).unwrap();
        assert_eq!(
            (f.cluster_id, f.revision, f.confirmed_at_unix_ms),
            (77, 6, 123)
        );
        assert_eq!(f.entries.len(), 2);
        assert_eq!(f.entries[1].value(), b"\xff");
        assert_eq!(
            (
                f.entries[1].create_revision,
                f.entries[1].mod_revision,
                f.entries[1].version
            ),
            (3, 5, 2)
        );
    }

    #[test]
    fn every_truncation_and_bit_flip_is_rejected() {
        let bytes = encode(&store().snapshot(), &["/p/".into()], 1);
        for len in 0..bytes.len() {
            assert!(
                decode(&bytes[..len]).is_err(),
                "truncated to {len} accepted"
            );
        }
        for i in 0..bytes.len() {
            for bit in [0x01u8, 0x80] {
                let mut b = bytes.clone();
                b[i] ^= bit;
                assert!(decode(&b).is_err(), "flip at {i} accepted");
            }
        }
    }

    #[test]
    fn atomic_write_is_private_and_load_checks_prefixes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mirror.snap");
        assert!(load(&path, &["/p/".into()]).unwrap().is_none());
        let bytes = encode(&store().snapshot(), &["/p/".into()], 1);
        write_atomic_with(&path, 0o600, |f| f.write_all(&bytes)).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        assert_eq!(
            load(&path, &["/p/".into()]).unwrap().unwrap().entries.len(),
            2
        );
        assert!(matches!(
            load(&path, &["/q/".into()]),
            Err(SnapshotError::ForeignPrefixes { .. })
        ));
        // Only the snapshot is left in the directory: no temp files.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        // The streamed write is byte for byte the in-memory encoding.
        let snap = store().snapshot();
        write_atomic_with(&path, 0o600, |out| {
            encode_into(out, &snap, &["/p/".into()], 1)
        })
        .unwrap();
        assert_eq!(fs::read(&path).unwrap(), encode(&snap, &["/p/".into()], 1));
    }
}
