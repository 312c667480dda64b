//! memory → files, for apps that read configuration from files on a shared volume: each
//! `--render` target is rewritten from the store, in one of the [`formats`] apps read, whenever
//! its content changes. Like the disk
//! snapshot, it only reads the store: a file holds one whole revision (rendered from one
//! snapshot), is written only once the mirror holds a complete state (from etcd, the disk
//! snapshot or the defaults), atomically (temp file, fsync, rename, fsync of the directory), and
//! not at all when the rendered bytes did not change, so the file keeps its inode and the app
//! sees no needless change. A burst of revisions is coalesced into one write of the latest
//! within [`COALESCE`]. After a write the target's `on_change` runs ([`actions`]); one that
//! failed is run again after the next change, whatever it changed, until it succeeds. The read
//! path never waits for any of it.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::config::RenderTarget;
use crate::mirror::persist::write_atomic_with;
use crate::mirror::snapshot::Snapshot;
use crate::mirror::store::Store;
use crate::mode::unix_ms;
use formats::{FormatError, Shape};

pub mod actions;
pub mod formats;

/// How long after a change the files are rendered: the changes of a burst land in one write.
pub const COALESCE: Duration = Duration::from_millis(100);

/// What `/v1/status` says of one rendered file.
#[derive(Debug, Clone, Serialize)]
pub struct FileStatus {
    /// The file.
    pub path: String,
    /// The mirrored directory it renders.
    pub prefix: String,
    /// The revision last rendered (written, or found unchanged); 0 before the first.
    pub revision: i64,
    /// Times the file was written.
    pub writes: u64,
    /// Renders whose bytes were unchanged, so nothing was written.
    pub unchanged: u64,
    /// Renders, writes or `on_change` actions that failed.
    pub failures: u64,
    /// `on_change` actions that succeeded.
    pub actions: u64,
    /// The last failure, if the last render failed.
    pub error: Option<String>,
    /// When the file was last written (Unix ms).
    pub written_at_unix_ms: Option<u64>,
}

/// Every rendered file's status, shared with the operator's side.
pub type FileStatuses = Arc<Mutex<Vec<FileStatus>>>;

/// One rendered file as the renderer keeps it.
struct Target {
    /// What the configuration says of it.
    spec: RenderTarget,
    /// How its bytes are made.
    shape: Result<Shape, FormatError>,
    /// The bytes the file holds now (read at start, so an unchanged file is not rewritten after
    /// a restart either).
    on_disk: Option<Vec<u8>>,
    /// Whether its `on_change` still has to run: the file changed and the action has not
    /// succeeded since.
    action_owed: bool,
}

/// The rendering task.
pub struct FileRenderer {
    /// What is rendered.
    store: Arc<Store>,
    /// The targets.
    targets: Vec<Target>,
    /// Their status.
    statuses: FileStatuses,
}

impl FileRenderer {
    /// A renderer of `targets` from `store`.
    pub fn new(store: Arc<Store>, targets: Vec<RenderTarget>) -> Self {
        let statuses = targets
            .iter()
            .map(|t| FileStatus {
                path: t.path.display().to_string(),
                prefix: t.prefix.clone(),
                revision: 0,
                writes: 0,
                unchanged: 0,
                failures: 0,
                actions: 0,
                error: None,
                written_at_unix_ms: None,
            })
            .collect();
        let targets = targets
            .into_iter()
            .map(|spec| Target {
                shape: Shape::new(&spec),
                on_disk: std::fs::read(&spec.path).ok(),
                spec,
                action_owed: false,
            })
            .collect();
        FileRenderer {
            store,
            targets,
            statuses: Arc::new(Mutex::new(statuses)),
        }
    }

    /// The files' status.
    pub fn statuses(&self) -> FileStatuses {
        self.statuses.clone()
    }

    /// Renders after every change of the store, until the store is gone.
    pub async fn run(mut self) {
        let mut revisions = self.store.subscribe();
        loop {
            let snapshot = self.store.snapshot();
            if snapshot.loaded {
                // File IO blocks: off the runtime's threads.
                let renderer = self;
                self = tokio::task::spawn_blocking(move || {
                    let mut renderer = renderer;
                    renderer.render_all(&snapshot);
                    renderer
                })
                .await
                .expect("rendering does not panic");
                self.run_actions().await;
            }
            if revisions.changed().await.is_err() {
                return;
            }
            tokio::time::sleep(COALESCE).await;
        }
    }

    /// Renders every target from `snapshot`, writing those whose bytes changed.
    fn render_all(&mut self, snapshot: &Snapshot) {
        for (i, target) in self.targets.iter_mut().enumerate() {
            let outcome = target
                .shape
                .as_ref()
                .map_err(|e| e.to_string())
                .and_then(|shape| {
                    shape
                        .render(snapshot, &target.spec.prefix)
                        .map_err(|e| e.to_string())
                })
                .and_then(|bytes| {
                    if target.on_disk.as_deref() == Some(&bytes[..]) {
                        return Ok(false);
                    }
                    write(&target.spec, &bytes).map_err(|e| format!("writing: {e}"))?;
                    target.on_disk = Some(bytes);
                    target.action_owed = target.spec.on_change.is_some();
                    Ok(true)
                });
            let target = &target.spec;
            let mut statuses = self.statuses.lock().unwrap_or_else(|e| e.into_inner());
            let status = &mut statuses[i];
            match outcome {
                Ok(written) => {
                    status.revision = snapshot.revision;
                    status.error = None;
                    if written {
                        status.writes += 1;
                        status.written_at_unix_ms = Some(unix_ms(SystemTime::now()));
                        tracing::info!(path = %target.path.display(), revision = snapshot.revision, "file rendered");
                    } else {
                        status.unchanged += 1;
                    }
                }
                Err(e) => {
                    status.failures += 1;
                    tracing::warn!(path = %target.path.display(), revision = snapshot.revision, error = %e, "file not rendered");
                    status.error = Some(e);
                }
            }
        }
    }
}

impl FileRenderer {
    /// Runs the `on_change` of every file that changed (or whose last action failed), in order.
    async fn run_actions(&mut self) {
        for (i, target) in self.targets.iter_mut().enumerate() {
            let Some(action) = target
                .spec
                .on_change
                .as_ref()
                .filter(|_| target.action_owed)
            else {
                continue;
            };
            let outcome = actions::run(action, &target.spec.path).await;
            let mut statuses = self.statuses.lock().unwrap_or_else(|e| e.into_inner());
            let status = &mut statuses[i];
            match outcome {
                Ok(()) => {
                    target.action_owed = false;
                    status.actions += 1;
                }
                Err(e) => {
                    status.failures += 1;
                    status.error = Some(e);
                }
            }
        }
    }
}

/// Writes `bytes` to the target's file atomically, with its permission.
fn write(target: &RenderTarget, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_with(&target.path, target.mode, |out| out.write_all(bytes))
}
