//! The tracker: per-type tables of refcounted entries (seed 003, RDMA restrack).
//!
//! ```text
//!  create ──> [created]  refs=1, in its table but hidden from lookups and snapshots
//!               │ add()
//!               v
//!             [active]   lookups find it; get()/lookup +1, dropping a ResRef -1
//!               │ del(timeout) / drop(ResHandle): hidden from lookups at once, creator ref put
//!               v
//!             [deleting] still counted and shown; no lookup can reach it any more
//!               │ last reference dropped (refs 1 -> 0)
//!               v
//!             removed from its table; a waiting del() returns Ok
//! ```
//! A created entry that is released without ever being added is never shown; it leaves
//! its table when its last reference drops, like any other.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{fence, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use thiserror::Error;
use tracing::{debug, trace, warn};

use crate::types::{EntryInfo, Owner, ResId, ResState, ResType};

/// Created, not yet added: hidden.
const CREATED: u8 = 0;
/// Added: visible and found by lookups.
const ACTIVE: u8 = 1;
/// Added, then released by its creator while references remain: visible, not found.
const DELETING: u8 = 2;
/// Released by its creator without ever being added: hidden.
const DISCARDED: u8 = 3;

/// Locks a mutex, taking over the data of a poisoned one: a panic elsewhere must not
/// turn every later tracker call into a panic. Every critical section here leaves its
/// data consistent at each step, so the data behind a poisoned lock is usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why `ResHandle::del` did not finish.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum DelError {
    /// References were still held when the timeout expired. The entry is already out of
    /// lookups; it stays in its table in the `deleting` state and leaves it on its own when
    /// the last reference drops.
    #[error(
        "Timed out deleting {ty}/{id} ({name}): {refs} references still held by {}",
        describe_holders(*.refs, .holders)
    )]
    StillHeld {
        /// Type of the entry.
        ty: ResType,
        /// Id of the entry.
        id: u32,
        /// Name of the entry.
        name: String,
        /// References still held at the timeout (the creator's is no longer among them).
        refs: usize,
        /// Labels of the labeled references still held, oldest first.
        holders: Vec<String>,
    },
}

fn describe_holders(refs: usize, holders: &[String]) -> String {
    let unlabeled = refs.saturating_sub(holders.len());
    let mut out = holders.join(", ");
    if unlabeled > 0 {
        if !out.is_empty() {
            out.push_str(" and ");
        }
        out.push_str(&format!("{unlabeled} unlabeled holder(s)"));
    }
    if out.is_empty() {
        out.push_str("nobody (released meanwhile)");
    }
    out
}

/// What the per-entry mutex guards: the labels of held references, and whether the entry
/// has left its table (what `del` waits for).
#[derive(Debug, Default)]
struct EntryLock {
    next_token: u64,
    labels: Vec<(u64, String)>,
    gone: bool,
}

/// One tracked resource. Shared by its table, its `ResHandle` and its `ResRef`s.
struct Entry {
    ty: ResType,
    id: u32,
    name: String,
    parent: Option<ResId>,
    owner: Owner,
    created_unix_ms: u64,
    /// Creator's reference plus every live `ResRef`.
    refs: AtomicUsize,
    /// CREATED/ACTIVE/DELETING/DISCARDED; written and read under the type's table lock.
    state: AtomicU8,
    lock: Mutex<EntryLock>,
    /// Signalled when `lock.gone` becomes true.
    released: Condvar,
    tracker: Weak<Inner>,
}

impl Entry {
    fn res_id(&self) -> ResId {
        ResId {
            ty: self.ty,
            id: self.id,
        }
    }

    fn info(&self, state: ResState) -> EntryInfo {
        let holders = lock(&self.lock)
            .labels
            .iter()
            .map(|(_, l)| l.clone())
            .collect();
        EntryInfo {
            ty: self.ty,
            id: self.id,
            name: self.name.clone(),
            parent: self.parent,
            owner_pid: self.owner.pid,
            owner_comm: self.owner.comm.clone(),
            created_unix_ms: self.created_unix_ms,
            refs: self.refs.load(Ordering::Acquire),
            state,
            holders,
        }
    }
}

/// Takes one reference, recording `holder` if given.
fn take_ref(entry: &Arc<Entry>, holder: Option<&str>) -> ResRef {
    // Relaxed as in `Arc::clone`: the caller already holds a reference (or the table
    // lock of an active entry), so the count cannot be zero here.
    entry.refs.fetch_add(1, Ordering::Relaxed);
    let token = holder.map(|label| {
        let mut g = lock(&entry.lock);
        let token = g.next_token;
        g.next_token = g.next_token.wrapping_add(1);
        g.labels.push((token, label.to_owned()));
        token
    });
    ResRef {
        entry: Arc::clone(entry),
        token,
    }
}

/// Drops one reference. The last one removes the entry from its table, then wakes `del`.
fn put(entry: &Arc<Entry>) {
    if entry.refs.fetch_sub(1, Ordering::Release) != 1 {
        return;
    }
    // Pairs with the Release above in every other put, as in `Arc::drop`.
    fence(Ordering::Acquire);
    if let Some(inner) = entry.tracker.upgrade() {
        let mut table = lock(inner.table(entry.ty));
        if table
            .entries
            .get(&entry.id)
            .is_some_and(|e| Arc::ptr_eq(e, entry))
        {
            table.entries.remove(&entry.id);
        }
    }
    trace!(res = %entry.res_id(), name = %entry.name, "restrack: last reference dropped");
    let mut g = lock(&entry.lock);
    g.gone = true;
    entry.released.notify_all();
}

/// One type's table.
#[derive(Default)]
struct Table {
    next_id: u32,
    wrapped: bool,
    entries: BTreeMap<u32, Arc<Entry>>,
}

impl Table {
    fn alloc_id(&mut self, ty: ResType) -> u32 {
        loop {
            let id = self.next_id;
            self.next_id = match id.checked_add(1) {
                Some(next) => next,
                None => {
                    if !self.wrapped {
                        warn!(%ty, "restrack: id space exhausted, reusing ids not in use");
                    }
                    self.wrapped = true;
                    0
                }
            };
            if !self.wrapped || !self.entries.contains_key(&id) {
                return id;
            }
        }
    }
}

#[derive(Default)]
struct Inner {
    tables: [Mutex<Table>; ResType::ALL.len()],
}

impl Inner {
    fn table(&self, ty: ResType) -> &Mutex<Table> {
        &self.tables[ty.index()]
    }
}

/// The resource tracking DB: one table per `ResType`.
///
/// A cheap handle (`Clone` shares the same DB), `Send + Sync`. Ids are allocated per type
/// from 0 upwards and are not reused while the tracker lives (after 2^32 creations of one
/// type the counter wraps and skips ids still in use).
///
/// Locking: each type's table has its own mutex, taken by `create`, `add`, `del`, lookups,
/// queries and the final put of an entry. Taking and dropping references does not touch
/// the tables: the count is an atomic, and only a labeled reference takes the entry's own
/// small mutex to record or remove its label.
#[derive(Clone, Default)]
pub struct Tracker {
    inner: Arc<Inner>,
}

impl fmt::Debug for Tracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracker")
            .field("counts", &self.counts())
            .finish()
    }
}

impl Tracker {
    /// An empty tracker.
    pub fn new() -> Tracker {
        Tracker::default()
    }

    /// Allocates an entry (seed 003 `rdma_restrack_new` + `set_task`): its id is taken now,
    /// its refcount is 1 (the returned handle's), and it stays invisible to lookups,
    /// snapshots and counts until `ResHandle::add`.
    ///
    /// `name` is free text (e.g. `blk0`, `blk0-q1`); `parent` is recorded as given, not
    /// checked.
    pub fn create(
        &self,
        ty: ResType,
        name: impl Into<String>,
        parent: Option<ResId>,
        owner: Owner,
    ) -> ResHandle {
        let created_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let mut table = lock(self.inner.table(ty));
        let id = table.alloc_id(ty);
        let entry = Arc::new(Entry {
            ty,
            id,
            name: name.into(),
            parent,
            owner,
            created_unix_ms,
            refs: AtomicUsize::new(1),
            state: AtomicU8::new(CREATED),
            lock: Mutex::new(EntryLock::default()),
            released: Condvar::new(),
            tracker: Arc::downgrade(&self.inner),
        });
        table.entries.insert(id, Arc::clone(&entry));
        drop(table);
        trace!(res = %entry.res_id(), name = %entry.name, "restrack: created");
        ResHandle {
            entry,
            released: false,
        }
    }

    /// A reference to the active entry `ty/id`, or `None` if there is none (never added,
    /// being deleted, or gone). The reference is unlabeled; take a labeled one from it
    /// with `ResRef::get` if it will be held for long.
    pub fn lookup(&self, ty: ResType, id: u32) -> Option<ResRef> {
        let table = lock(self.inner.table(ty));
        let entry = table.entries.get(&id)?;
        (entry.state.load(Ordering::Relaxed) == ACTIVE).then(|| take_ref(entry, None))
    }

    /// A reference to the active entry of type `ty` named `name`; when several share the
    /// name, the one with the lowest id. `None` if there is none. Unlabeled, as `lookup`.
    /// Linear in the size of the type's table.
    pub fn lookup_name(&self, ty: ResType, name: &str) -> Option<ResRef> {
        let table = lock(self.inner.table(ty));
        table
            .entries
            .values()
            .find(|e| e.name == name && e.state.load(Ordering::Relaxed) == ACTIVE)
            .map(|e| take_ref(e, None))
    }

    /// Number of live entries per type: `active` plus `deleting` ones (the ones a snapshot
    /// shows), but not created-and-never-added ones. Every type is present, with 0 when its
    /// table shows nothing.
    pub fn counts(&self) -> BTreeMap<ResType, usize> {
        ResType::ALL
            .into_iter()
            .map(|ty| {
                let table = lock(self.inner.table(ty));
                let n = table
                    .entries
                    .values()
                    .filter(|e| visible_state(e).is_some())
                    .count();
                (ty, n)
            })
            .collect()
    }

    /// Copies of the `active` and `deleting` entries, of type `filter` or of every type,
    /// sorted by (type in `ResType::ALL` order, id). Each type's table is copied under its
    /// own lock, so the rows of different types may come from slightly different moments.
    pub fn snapshot(&self, filter: Option<ResType>) -> Vec<EntryInfo> {
        let mut rows = Vec::new();
        for ty in ResType::ALL {
            if filter.is_some_and(|f| f != ty) {
                continue;
            }
            let table = lock(self.inner.table(ty));
            rows.extend(
                table
                    .entries
                    .values()
                    .filter_map(|e| visible_state(e).map(|s| e.info(s))),
            );
        }
        rows
    }
}

/// The state a query shows for `e`, or `None` when queries must not show it. Called under
/// the table lock. An entry whose count already reached zero is on its way out of the
/// table and is not shown.
fn visible_state(e: &Entry) -> Option<ResState> {
    if e.refs.load(Ordering::Acquire) == 0 {
        return None;
    }
    match e.state.load(Ordering::Relaxed) {
        ACTIVE => Some(ResState::Active),
        DELETING => Some(ResState::Deleting),
        _ => None,
    }
}

/// The creator's handle on an entry: holds the creator's reference, makes the entry
/// visible (`add`) and deletes it (`del`).
///
/// Dropping a handle without calling `del` releases the entry as `del` would, without
/// waiting: it leaves lookups at once, the creator's reference is dropped, and if
/// references remain it is shown as `deleting` until the last of them drops. Nothing leaks.
pub struct ResHandle {
    entry: Arc<Entry>,
    released: bool,
}

impl fmt::Debug for ResHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResHandle")
            .field("id", &self.entry.res_id())
            .field("name", &self.entry.name)
            .field("refs", &self.refs())
            .finish()
    }
}

impl ResHandle {
    /// The entry's `TYPE/ID`.
    pub fn id(&self) -> ResId {
        self.entry.res_id()
    }

    /// The entry's name.
    pub fn name(&self) -> &str {
        &self.entry.name
    }

    /// The entry's parent, as given to `Tracker::create`.
    pub fn parent(&self) -> Option<ResId> {
        self.entry.parent
    }

    /// The current reference count, the creator's included. For diagnostics and tests: it
    /// can change as soon as it is read.
    pub fn refs(&self) -> usize {
        self.entry.refs.load(Ordering::Acquire)
    }

    /// Makes the entry visible to lookups, snapshots and counts (seed 003
    /// `rdma_restrack_add`). Calling it again does nothing. If every `Tracker` handle has
    /// been dropped, there is no table to show it in and it does nothing.
    pub fn add(&self) {
        let Some(inner) = self.entry.tracker.upgrade() else {
            return;
        };
        let _table = lock(inner.table(self.entry.ty));
        if self
            .entry
            .state
            .compare_exchange(CREATED, ACTIVE, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            debug!(res = %self.entry.res_id(), name = %self.entry.name, "restrack: added");
        }
    }

    /// Takes a reference labeled `holder` (e.g. `worker blk0-q0`, `request 17`). The label
    /// is listed in snapshots and in `DelError::StillHeld` while the reference is held.
    /// Costs an atomic increment plus a short lock of this entry's label list.
    pub fn get(&self, holder: &str) -> ResRef {
        take_ref(&self.entry, Some(holder))
    }

    /// Takes an unlabeled reference: one atomic increment, no lock. Counted in `refs` but
    /// not named in snapshots or errors. For per-I/O paths.
    pub fn get_unlabeled(&self) -> ResRef {
        take_ref(&self.entry, None)
    }

    /// Deletes the entry (seed 003 `rdma_restrack_del`): it leaves lookups at once, the
    /// creator's reference is dropped, then this waits up to `timeout` for every other
    /// reference to drop. `Duration::ZERO` does not wait; `Duration::MAX` waits for ever.
    ///
    /// # Errors
    /// `DelError::StillHeld`, naming the holders, when references remain at the timeout.
    /// The entry then stays in its table as `deleting` and leaves it when its last
    /// reference drops; nothing else needs to be called.
    pub fn del(mut self, timeout: Duration) -> Result<(), DelError> {
        let entry = Arc::clone(&self.entry);
        self.release();
        drop(self);
        let deadline = Instant::now().checked_add(timeout);
        let mut g = lock(&entry.lock);
        while !g.gone {
            match deadline {
                None => {
                    g = entry
                        .released
                        .wait(g)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        let err = DelError::StillHeld {
                            ty: entry.ty,
                            id: entry.id,
                            name: entry.name.clone(),
                            refs: entry.refs.load(Ordering::Acquire),
                            holders: g.labels.iter().map(|(_, l)| l.clone()).collect(),
                        };
                        debug!(res = %entry.res_id(), "restrack: {err}");
                        return Err(err);
                    }
                    g = entry
                        .released
                        .wait_timeout(g, deadline - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            }
        }
        debug!(res = %entry.res_id(), name = %entry.name, "restrack: deleted");
        Ok(())
    }

    /// Hides the entry from lookups and drops the creator's reference, once.
    fn release(&mut self) {
        if self.released {
            return;
        }
        self.released = true;
        if let Some(inner) = self.entry.tracker.upgrade() {
            let _table = lock(inner.table(self.entry.ty));
            let next = match self.entry.state.load(Ordering::Relaxed) {
                ACTIVE | DELETING => DELETING,
                _ => DISCARDED,
            };
            self.entry.state.store(next, Ordering::Relaxed);
        }
        put(&self.entry);
    }
}

impl Drop for ResHandle {
    fn drop(&mut self) {
        if !self.released {
            debug!(
                res = %self.entry.res_id(),
                name = %self.entry.name,
                "restrack: handle dropped without del, releasing"
            );
            self.release();
        }
    }
}

/// One counted reference to an entry (seed 003 `rdma_restrack_get`); dropping it is the
/// put. While any `ResRef` lives, `del` on the entry waits.
///
/// A reference keeps the entry's accounting alive, not the resource itself: what the entry
/// stands for is owned by whoever created it.
pub struct ResRef {
    entry: Arc<Entry>,
    /// Token of this reference's label in the entry's label list, if labeled.
    token: Option<u64>,
}

impl fmt::Debug for ResRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResRef")
            .field("id", &self.entry.res_id())
            .field("name", &self.entry.name)
            .field("labeled", &self.token.is_some())
            .finish()
    }
}

impl ResRef {
    /// The entry's `TYPE/ID`.
    pub fn id(&self) -> ResId {
        self.entry.res_id()
    }

    /// The entry's name.
    pub fn name(&self) -> &str {
        &self.entry.name
    }

    /// The entry's parent, as given to `Tracker::create`.
    pub fn parent(&self) -> Option<ResId> {
        self.entry.parent
    }

    /// Takes another reference labeled `holder`, as `ResHandle::get`. Allowed while the
    /// entry is being deleted (it only makes the delete wait longer), as a `kref_get` on a
    /// held object is.
    pub fn get(&self, holder: &str) -> ResRef {
        take_ref(&self.entry, Some(holder))
    }

    /// Takes another unlabeled reference, as `ResHandle::get_unlabeled`.
    pub fn get_unlabeled(&self) -> ResRef {
        take_ref(&self.entry, None)
    }
}

impl Drop for ResRef {
    fn drop(&mut self) {
        if let Some(token) = self.token {
            let mut g = lock(&self.entry.lock);
            if let Some(pos) = g.labels.iter().position(|(t, _)| *t == token) {
                g.labels.remove(pos);
            }
        }
        put(&self.entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisoned_table_lock_does_not_cascade() {
        let tracker = Tracker::new();
        let h = tracker.create(ResType::Device, "blk0", None, Owner::of_pid(1));
        h.add();
        let t2 = tracker.clone();
        let r = std::thread::spawn(move || {
            let _g = t2.inner.table(ResType::Device).lock();
            panic!("poison the device table on purpose");
        })
        .join();
        assert!(r.is_err());
        assert!(tracker.inner.table(ResType::Device).is_poisoned());
        assert_eq!(tracker.snapshot(None).len(), 1);
        let r = tracker.lookup(ResType::Device, h.id().id).map(|r| r.id());
        assert_eq!(r, Some(h.id()));
        assert_eq!(h.del(Duration::ZERO), Ok(()));
        assert_eq!(tracker.counts()[&ResType::Device], 0);
    }

    #[test]
    fn poisoned_entry_lock_does_not_cascade() {
        let tracker = Tracker::new();
        let h = tracker.create(ResType::Worker, "w0", None, Owner::of_pid(1));
        h.add();
        let r = h.get("worker w0");
        let entry = Arc::clone(&h.entry);
        let joined = std::thread::spawn(move || {
            let _g = entry.lock.lock();
            panic!("poison the entry lock on purpose");
        })
        .join();
        assert!(joined.is_err());
        assert_eq!(tracker.snapshot(None)[0].holders, vec!["worker w0"]);
        drop(r);
        assert_eq!(h.del(Duration::ZERO), Ok(()));
    }

    #[test]
    fn id_wrap_skips_ids_in_use() {
        let tracker = Tracker::new();
        lock(tracker.inner.table(ResType::Vector)).next_id = u32::MAX - 1;
        let a = tracker.create(ResType::Vector, "a", None, Owner::of_pid(1));
        let b = tracker.create(ResType::Vector, "b", None, Owner::of_pid(1));
        assert_eq!((a.id().id, b.id().id), (u32::MAX - 1, u32::MAX));
        // The counter wraps to 0, which is free.
        let c = tracker.create(ResType::Vector, "c", None, Owner::of_pid(1));
        assert_eq!(c.id().id, 0);
        lock(tracker.inner.table(ResType::Vector)).next_id = u32::MAX;
        let d = tracker.create(ResType::Vector, "d", None, Owner::of_pid(1));
        assert_eq!(d.id().id, 1, "u32::MAX and 0 are in use");
    }
}
