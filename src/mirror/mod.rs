//! etcd → memory. The [`sync::WatchTask`] loads every mirrored prefix at one revision ([`load`];
//! after a restart, only what changed since the disk snapshot), then watches from the next, and
//! publishes each revision into the [`store::Store`] as one immutable [`snapshot::Snapshot`],
//! whose recent changes the [`history`] keeps for subscribers; the sync also tells the mode
//! machine ([`crate::mode`]) what it saw. [`persist`] saves the store to disk and serves it
//! after a restart; [`render`] turns a snapshot's prefix into a listing or a tree, once per
//! revision, for the HTTP side and the rendered files alike.

pub mod history;
pub mod load;
pub mod persist;
pub mod render;
pub mod snapshot;
pub mod store;
pub mod sync;
