//! etcd → memory. The [`sync::WatchTask`] loads every mirrored prefix at one revision ([`load`];
//! after a restart, only what changed since the disk snapshot), then watches from the next, and
//! publishes each revision into the [`store::Store`] as one immutable snapshot, whose recent
//! changes the [`history`] keeps for subscribers. The serving [`mode`] is set by a state machine fed by the sync and the probes;
//! [`persist`] saves the store to disk and serves it after a restart; [`render`] turns a
//! snapshot's prefix into a listing or a tree, once per revision; [`files`] renders prefixes
//! into files (in the [`formats`] apps read) for apps that read files, and [`actions`] tells
//! the app when one changed.

pub mod history;
pub mod load;
pub mod persist;
pub mod render;
pub mod store;
pub mod sync;
