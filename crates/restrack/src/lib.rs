//! uvdpa's resource tracking DB, after the RDMA restrack (seed 003): every device,
//! vhost-user session, guest memory region, virtqueue, interrupt vector, worker thread and
//! IPC client is an entry with a type, an id, a name, an owner process and a refcount.
//!
//! The lifecycle follows the seed: `Tracker::create` (refcount 1, hidden) →
//! `ResHandle::add` (visible) → `ResHandle::get` / drop of `ResRef` (refcount ±1) →
//! `ResHandle::del`, which hides the entry at once and waits, bounded by a timeout, until
//! the last reference drops. `Tracker::snapshot` gives the rows of `uvdpa res show`.
//!
//! ```
//! use std::time::Duration;
//! use uvdpa_restrack::{Owner, ResType, Tracker};
//!
//! let tracker = Tracker::new();
//! let dev = tracker.create(ResType::Device, "blk0", None, Owner::current());
//! dev.add();
//! let busy = dev.get("worker blk0-q0");
//! assert_eq!(tracker.snapshot(None)[0].holders, ["worker blk0-q0"]);
//! drop(busy);
//! dev.del(Duration::from_secs(1)).unwrap();
//! assert!(tracker.snapshot(None).is_empty());
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod tracker;
mod types;

pub use tracker::{DelError, ResHandle, ResRef, Tracker};
pub use types::{EntryInfo, Owner, ParseError, ResId, ResState, ResType};
