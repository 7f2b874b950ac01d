//! A device's interrupt vector table: vector → eventfd trigger, masking, coalescing.
//!
//! This is the userspace counterpart of the VFIO mdev interrupt library (seed 001,
//! `mdev_set_msix_trigger`): a device has `nvec` vectors, each with an optional eventfd
//! *trigger* that the driver side (a vhost-user frontend's call fd, a KVM irqfd) waits on.
//! The control path configures a range of vectors with [`VectorTable::set_irqs`], using the
//! three data kinds of `VFIO_DEVICE_SET_IRQS` with `VFIO_IRQ_SET_ACTION_TRIGGER`:
//!
//! * [`IrqAction::Eventfd`] (`VFIO_IRQ_SET_DATA_EVENTFD`): install (`Some`) or remove
//!   (`None`, fd `-1` in VFIO) the trigger of every vector of the range. The range either
//!   fully succeeds or is left exactly as it was (the seed tore the range down on failure;
//!   we restore the previous triggers).
//! * [`IrqAction::None`] (`VFIO_IRQ_SET_DATA_NONE`): signal every vector of the range.
//! * [`IrqAction::Bool`] (`VFIO_IRQ_SET_DATA_BOOL`): signal the vectors whose bool is set.
//!
//! # Data path
//!
//! A queue worker calls [`VectorTable::fire`] (or [`VectorHandle::fire`]) once per batch
//! that needs a notification, and [`VectorTable::note_event_idx_suppressed`] for a batch
//! that does not (VIRTIO_RING_F_EVENT_IDX / VRING_AVAIL_F_NO_INTERRUPT). A fire passes,
//! in order:
//!
//! 1. the trigger: a vector without one drops the fire (the driver polls);
//! 2. the mask: a masked vector records the fire in its *pending* bit instead of
//!    signalling, and [`VectorTable::unmask`] delivers one signal if it is pending (the
//!    MSI-X Pending Bit Array, PCIe MSI-X "Vector Control");
//! 3. coalescing ([`VectorTable::set_coalesce`]): at most one signal per `max_delay_us`
//!    microseconds or per `max_batch` fires, whichever comes first; the fires in between are
//!    *held*.
//!
//! **A held fire is never lost**: the worker must call [`VectorTable::flush`] when its queue
//! goes idle, before it sleeps in epoll. `flush` sends one signal if any fire is held, so a
//! coalesced completion reaches the driver at the latest when the queue goes idle:
//!
//! ```text
//! loop {
//!     process the ring; per batch:
//!         if queue.needs_notification() { vector.fire() } else { vector.note_event_idx_suppressed() }
//!     vector.flush();          // the queue is idle: deliver what coalescing held back
//!     epoll_wait(kick);
//! }
//! ```
//!
//! # Concurrency
//!
//! The table is `Send + Sync` and shared as `Arc<VectorTable>`. Every operation but
//! [`VectorTable::set_irqs`] and [`VectorTable::trigger_fd`] is lock-free: a fire is a few
//! atomic operations on the vector's own cache line plus one `write(2)`. `set_irqs` takes the
//! table's control mutex (control operations are serialised) and **may run while workers
//! fire**, because workers never see a trigger's fd: each vector signals through an fd the
//! table owns, whose *number* is fixed for the table's lifetime. `set_irqs` points that fd at
//! the new eventfd with `dup3(2)` (atomic in the kernel), and at a private sink eventfd when
//! a trigger is removed, so a concurrent fire writes to the old or the new eventfd, never to
//! a closed or reused fd number. A fire racing a trigger change may thus land on the old
//! trigger, as an MSI already posted before the guest rewrote the vector's address. Masking
//! likewise: a fire that read the vector as unmasked just before [`VectorTable::mask`] still
//! signals. The cost is one extra fd per vector that ever had a trigger, plus one sink fd per
//! table.
//!
//! # Injected interrupts (VDUSE)
//!
//! A transport without eventfd triggers (VDUSE delivers a virtqueue interrupt with the
//! `VDUSE_VQ_INJECT_IRQ` ioctl) makes its table with [`VectorTable::with_injector`]: every
//! vector is armed from the start and signalling vector `i` calls the injector with `i`
//! instead of writing an fd; masking, coalescing and counters work as above. Such a table
//! refuses eventfd triggers.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use rustix::event::{eventfd, EventfdFlags};
use rustix::fs::{FileType, OFlags};
use rustix::io::{DupFlags, Errno};
use thiserror::Error;
use tracing::warn;

#[cfg(test)]
mod tests;

/// Errors of [`VectorTable`] operations. Every error leaves the table as it was.
#[derive(Debug, Error)]
pub enum IrqError {
    /// The vector range `start..start + count` is not inside the table of `nvec` vectors.
    /// A single-vector operation reports `count == 1`.
    #[error("Vectors {start}..{start}+{count} are outside the table of {nvec} vectors")]
    OutOfRange {
        /// First vector of the range.
        start: u16,
        /// Number of vectors in the range.
        count: u16,
        /// Number of vectors in the table.
        nvec: u16,
    },
    /// The action's data does not have one entry per vector of the range (VFIO's `argsz`
    /// check).
    #[error("Expected {expected} data entries for the vector range, got {got}")]
    DataLength {
        /// `count` of the request.
        expected: usize,
        /// Entries supplied.
        got: usize,
    },
    /// The fd offered as the trigger of vector `vec` is not a writable eventfd.
    #[error("Vector {vec}: the trigger is refused: {reason}")]
    BadTrigger {
        /// The vector.
        vec: u16,
        /// What is wrong with the fd.
        reason: String,
    },
    /// Duplicating the trigger into the table's fd for vector `vec` failed (for example
    /// EMFILE), or so did creating the table's sink eventfd.
    #[error("Vector {vec}: installing the trigger failed")]
    Install {
        /// The vector.
        vec: u16,
        /// The system call's error.
        #[source]
        source: Errno,
    },
}

/// What `VFIO_DEVICE_SET_IRQS` does to a range of vectors (its `VFIO_IRQ_SET_DATA_*` kind,
/// with `VFIO_IRQ_SET_ACTION_TRIGGER`). See [`VectorTable::set_irqs`].
#[derive(Debug, Clone)]
pub enum IrqAction {
    /// `DATA_NONE`: signal every vector of the range. With `count == 0`: remove every
    /// trigger of the table (VFIO disables the interrupt index).
    None,
    /// `DATA_BOOL`: signal the vectors whose entry is `true`; one entry per vector.
    Bool(Vec<bool>),
    /// `DATA_EVENTFD`: one entry per vector: `Some(eventfd)` installs it as the vector's
    /// trigger, `None` (VFIO's fd `-1`) removes the trigger. With `count == 0` (and no
    /// entries): remove every trigger of the table.
    Eventfd(Vec<Option<Arc<OwnedFd>>>),
}

/// What became of one [`VectorTable::fire`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fired {
    /// The trigger was signalled.
    Sent,
    /// Held back by coalescing; a later signal or [`VectorTable::flush`] delivers it.
    Coalesced,
    /// The vector is masked; the pending bit is set and [`VectorTable::unmask`] delivers it.
    Masked,
    /// The vector has no trigger; nothing was recorded (the driver polls).
    NoTrigger,
}

/// Per-vector counters, all since the table was created. Each [`VectorTable::fire`] counts
/// in exactly one of `sent`, `suppressed_masked`, `suppressed_coalesced` and
/// `dropped_no_trigger` (see [`VectorCounters::fires`]); every write to the trigger counts
/// in exactly one of `sent`, `sent_deferred` and `sent_injected` (see
/// [`VectorCounters::signals`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VectorCounters {
    /// Fires that signalled the trigger at once.
    pub sent: u64,
    /// Fires that found the vector masked (they set the pending bit).
    pub suppressed_masked: u64,
    /// Fires held back by coalescing.
    pub suppressed_coalesced: u64,
    /// Fires dropped because the vector had no trigger.
    pub dropped_no_trigger: u64,
    /// Batches the worker did not notify because of EVENT_IDX or NO_INTERRUPT, as reported
    /// with [`VectorTable::note_event_idx_suppressed`]. Not fires.
    pub suppressed_event_idx: u64,
    /// Signals sent later for held-back fires: by [`VectorTable::unmask`] (pending) or
    /// [`VectorTable::flush`] (coalesced).
    pub sent_deferred: u64,
    /// Signals sent by hand: [`VectorTable::trigger`], [`IrqAction::None`],
    /// [`IrqAction::Bool`].
    pub sent_injected: u64,
}

impl VectorCounters {
    /// Number of [`VectorTable::fire`] calls: the sum of their four outcomes.
    pub fn fires(&self) -> u64 {
        self.sent
            .wrapping_add(self.suppressed_masked)
            .wrapping_add(self.suppressed_coalesced)
            .wrapping_add(self.dropped_no_trigger)
    }

    /// Number of writes to the trigger eventfd (each adds 1 to its counter).
    pub fn signals(&self) -> u64 {
        self.sent
            .wrapping_add(self.sent_deferred)
            .wrapping_add(self.sent_injected)
    }
}

/// One vector's state, as `uvdpa dev irq show` prints it (from [`VectorTable::snapshot`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VectorInfo {
    /// Vector number.
    pub index: u16,
    /// A trigger eventfd is installed.
    pub has_trigger: bool,
    /// The vector is masked.
    pub masked: bool,
    /// A signal is pending (held while masked).
    pub pending: bool,
    /// Coalescing window in microseconds; 0 = no time-based coalescing.
    pub max_delay_us: u32,
    /// Coalescing batch in fires; 0 = no count-based coalescing.
    pub max_batch: u32,
    /// Fires currently held by coalescing (delivered by the next signal or flush).
    pub held: u64,
    /// Counters.
    pub counters: VectorCounters,
}

/// Flag bits of [`Vector::flags`]. Invariant: `PENDING` implies `MASKED`.
const ARMED: u8 = 1;
const MASKED: u8 = 2;
const PENDING: u8 = 4;

/// `last_signal` value meaning "never signalled".
const NEVER: u64 = 0;

/// The lock-free state of one vector, on its own cache lines so that workers of different
/// vectors do not share one.
#[repr(align(64))]
#[derive(Debug, Default)]
struct Vector {
    /// `ARMED | MASKED | PENDING`.
    flags: AtomicU8,
    /// The table-owned fd the vector signals through; -1 until a trigger is first
    /// installed, then fixed (only its target changes, with dup3).
    fd: AtomicI32,
    max_delay_us: AtomicU32,
    max_batch: AtomicU32,
    /// Fires held by coalescing since the last signal.
    held: AtomicU64,
    /// Nanoseconds since the table's epoch of the last signal, plus one; `NEVER` = 0.
    last_signal: AtomicU64,
    sent: AtomicU64,
    suppressed_masked: AtomicU64,
    suppressed_coalesced: AtomicU64,
    dropped_no_trigger: AtomicU64,
    suppressed_event_idx: AtomicU64,
    sent_deferred: AtomicU64,
    sent_injected: AtomicU64,
}

impl Vector {
    fn new() -> Self {
        Self {
            fd: AtomicI32::new(-1),
            ..Self::default()
        }
    }

    /// Writes 1 to the trigger. Call only after reading `ARMED` (Acquire).
    fn signal(&self) {
        let raw = self.fd.load(Ordering::Acquire);
        if raw < 0 {
            return;
        }
        // SAFETY: `raw` was published (Release) before ARMED was first set and is the
        // table-owned fd of this vector, which is closed only when the table is dropped,
        // i.e. after every `&self` borrow ends. set_irqs only retargets it with dup3, which
        // never leaves the number closed.
        let fd = unsafe { BorrowedFd::borrow_raw(raw) };
        // An eventfd write fails only when its counter would overflow (2^64 - 1 pending
        // signals): the driver has plenty to wake it.
        let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
    }

    /// If the vector is masked, sets the pending bit and returns true.
    fn hold_if_masked(&self, mut flags: u8) -> bool {
        loop {
            if flags & MASKED == 0 {
                return false;
            }
            if flags & PENDING != 0 {
                return true;
            }
            match self.flags.compare_exchange_weak(
                flags,
                flags | PENDING,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => flags = now,
            }
        }
    }
}

/// The control state, behind the table's mutex.
#[derive(Debug, Default)]
struct Control {
    /// Per vector: the installed trigger (identity as given to `set_irqs`) and the table-owned
    /// fd that workers signal (a dup of the trigger, or of `sink` when there is none).
    slots: Vec<Slot>,
    /// An eventfd nobody reads, the target of a vector's fd while it has no trigger.
    sink: Option<OwnedFd>,
}

#[derive(Debug, Default)]
struct Slot {
    trigger: Option<Arc<OwnedFd>>,
    fd: Option<OwnedFd>,
}

impl std::fmt::Debug for VectorTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VectorTable")
            .field("nvec", &self.vectors.len())
            .field("injector", &self.injector.is_some())
            .finish_non_exhaustive()
    }
}

/// Signals vector `i` of a table without eventfd triggers (see "Injected interrupts" in the
/// module documentation). Called on the data path: it must not block.
pub type Injector = Arc<dyn Fn(u16) + Send + Sync>;

/// A device's interrupt vector table (see the module documentation).
pub struct VectorTable {
    vectors: Box<[Vector]>,
    control: Mutex<Control>,
    /// Time origin of `Vector::last_signal`.
    epoch: Instant,
    /// Signals a vector by index instead of its fd, if set.
    injector: Option<Injector>,
}

impl VectorTable {
    /// A table of `nvec` vectors, none with a trigger, all unmasked, coalescing off.
    pub fn new(nvec: u16) -> Self {
        Self {
            vectors: (0..nvec).map(|_| Vector::new()).collect(),
            control: Mutex::new(Control {
                slots: (0..nvec).map(|_| Slot::default()).collect(),
                sink: None,
            }),
            epoch: Instant::now(),
            injector: None,
        }
    }

    /// A table of `nvec` vectors signalled through `injector` (VDUSE), all armed and
    /// unmasked, coalescing off.
    pub fn with_injector(nvec: u16, injector: Injector) -> Self {
        let mut t = Self::new(nvec);
        for v in t.vectors.iter() {
            v.flags.fetch_or(ARMED, Ordering::AcqRel);
        }
        t.injector = Some(injector);
        t
    }

    /// Signals `v` through the injector, or its fd.
    fn signal(&self, v: &Vector) {
        match &self.injector {
            Some(inject) => {
                let base = self.vectors.as_ptr() as usize;
                let i = (v as *const Vector as usize - base) / std::mem::size_of::<Vector>();
                inject(u16::try_from(i).unwrap_or(u16::MAX));
            }
            None => v.signal(),
        }
    }

    /// Number of vectors.
    pub fn nvec(&self) -> u16 {
        // `new` takes a u16 count.
        u16::try_from(self.vectors.len()).unwrap_or(u16::MAX)
    }

    /// A worker's handle on vector `vec`: the same operations without the bounds check.
    ///
    /// # Errors
    /// [`IrqError::OutOfRange`] if `vec >= nvec`.
    pub fn handle(self: &Arc<Self>, vec: u16) -> Result<VectorHandle, IrqError> {
        self.vector(vec)?;
        Ok(VectorHandle {
            table: self.clone(),
            vec: usize::from(vec),
        })
    }

    /// `VFIO_DEVICE_SET_IRQS` with `ACTION_TRIGGER` on vectors `start..start + count`:
    /// installs or removes triggers ([`IrqAction::Eventfd`]) or signals vectors by hand
    /// ([`IrqAction::None`], [`IrqAction::Bool`]; see [`VectorTable::trigger`] for how a
    /// manual signal meets masking). `count == 0` with `Eventfd` or `None` removes every
    /// trigger of the table (VFIO: disable); `start` must still be at most `nvec`.
    ///
    /// Installing an eventfd that is already the vector's trigger changes nothing. Installing
    /// or removing keeps the mask, pending bit, coalescing settings and counters. A manual
    /// signal skips vectors without a trigger, as the seed does.
    ///
    /// May run while workers fire (see the module's "Concurrency" section).
    ///
    /// # Errors
    /// Nothing is changed on any error:
    /// * [`IrqError::OutOfRange`]: the range is not inside the table;
    /// * [`IrqError::DataLength`]: the data does not have `count` entries;
    /// * [`IrqError::BadTrigger`]: an fd is not a writable eventfd;
    /// * [`IrqError::Install`]: duplicating an fd failed.
    ///
    /// The last two can happen part-way through the range: the vectors already changed are
    /// then restored to their previous triggers (the same eventfds).
    pub fn set_irqs(&self, start: u16, count: u16, action: IrqAction) -> Result<(), IrqError> {
        let nvec = self.nvec();
        if u32::from(start) + u32::from(count) > u32::from(nvec) {
            return Err(IrqError::OutOfRange { start, count, nvec });
        }
        let expected = usize::from(count);
        let got = match &action {
            IrqAction::None => expected,
            IrqAction::Bool(b) => b.len(),
            IrqAction::Eventfd(fds) => fds.len(),
        };
        if got != expected {
            return Err(IrqError::DataLength { expected, got });
        }
        // Checked above: the range is inside the table.
        let range = self
            .vectors
            .get(usize::from(start)..usize::from(start) + expected)
            .unwrap_or(&[]);
        match action {
            IrqAction::None | IrqAction::Eventfd(_) if count == 0 => {
                self.teardown();
                Ok(())
            }
            IrqAction::None => {
                for v in range {
                    self.inject(v);
                }
                Ok(())
            }
            IrqAction::Bool(bools) => {
                for (v, _) in range.iter().zip(bools).filter(|(_, b)| *b) {
                    self.inject(v);
                }
                Ok(())
            }
            IrqAction::Eventfd(fds) => self.set_triggers(start, fds),
        }
    }

    /// Signals vector `vec` by hand (a tool's `DATA_NONE` on one vector). Bypasses
    /// coalescing (and delivers what it held) but not the mask: a masked vector gets its
    /// pending bit set instead. Counted in [`VectorCounters::sent_injected`] when sent.
    ///
    /// Returns whether the trigger was signalled (false: no trigger, or masked).
    ///
    /// # Errors
    /// [`IrqError::OutOfRange`] if `vec >= nvec`.
    pub fn trigger(&self, vec: u16) -> Result<bool, IrqError> {
        Ok(self.inject(self.vector(vec)?))
    }

    /// Masks vector `vec` (MSI-X Vector Control mask bit): until [`VectorTable::unmask`],
    /// fires set the pending bit instead of signalling. Masking a masked vector does nothing.
    ///
    /// # Errors
    /// [`IrqError::OutOfRange`] if `vec >= nvec`.
    pub fn mask(&self, vec: u16) -> Result<(), IrqError> {
        self.vector(vec)?.flags.fetch_or(MASKED, Ordering::AcqRel);
        Ok(())
    }

    /// Unmasks vector `vec`. If a signal was pending, sends exactly one (however many fires
    /// found the vector masked) to the trigger installed now, and clears the pending bit, as
    /// MSI-X does with its Pending Bit Array. Returns whether a signal was sent (false: nothing
    /// pending, or no trigger any more).
    ///
    /// # Errors
    /// [`IrqError::OutOfRange`] if `vec >= nvec`.
    pub fn unmask(&self, vec: u16) -> Result<bool, IrqError> {
        let v = self.vector(vec)?;
        let prev = v.flags.fetch_and(!(MASKED | PENDING), Ordering::AcqRel);
        if prev & PENDING == 0 || v.flags.load(Ordering::Acquire) & ARMED == 0 {
            return Ok(false);
        }
        self.deliver(v, Instant::now);
        v.sent_deferred.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Sets vector `vec`'s interrupt coalescing: at most one signal per `max_delay_us`
    /// microseconds or per `max_batch` fires, whichever comes first; 0 turns that limit off
    /// (0/0 = every fire signals). Fires in between are held until the next signal or
    /// [`VectorTable::flush`]. Held fires stay held across a change.
    ///
    /// # Errors
    /// [`IrqError::OutOfRange`] if `vec >= nvec`.
    pub fn set_coalesce(
        &self,
        vec: u16,
        max_delay_us: u32,
        max_batch: u32,
    ) -> Result<(), IrqError> {
        let v = self.vector(vec)?;
        v.max_delay_us.store(max_delay_us, Ordering::Relaxed);
        v.max_batch.store(max_batch, Ordering::Relaxed);
        Ok(())
    }

    /// A worker's notification for vector `vec`: call it once per batch of used entries that
    /// needs one (`SplitQueue::needs_notification`). Applies the trigger, the mask, then
    /// coalescing (module documentation); lock-free. Returns what became of the fire.
    ///
    /// # Errors
    /// [`IrqError::OutOfRange`] if `vec >= nvec`.
    pub fn fire(&self, vec: u16) -> Result<Fired, IrqError> {
        Ok(self.fire_with(self.vector(vec)?, Instant::now))
    }

    /// Delivers what coalescing held back on vector `vec`: if any fire is held, sends one
    /// signal (whatever `max_delay_us` says), or sets the pending bit if the vector is masked.
    /// Returns whether a signal was sent. A worker calls this when its queue goes idle,
    /// before sleeping, so a coalesced completion is never delayed past that point. Costs one
    /// atomic load when nothing is held.
    ///
    /// # Errors
    /// [`IrqError::OutOfRange`] if `vec >= nvec`.
    pub fn flush(&self, vec: u16) -> Result<bool, IrqError> {
        Ok(self.flush_with(self.vector(vec)?, Instant::now))
    }

    /// Counts a batch that vector `vec` did not signal because the driver asked not to be
    /// notified (VIRTIO_RING_F_EVENT_IDX `used_event`, or VRING_AVAIL_F_NO_INTERRUPT).
    ///
    /// # Errors
    /// [`IrqError::OutOfRange`] if `vec >= nvec`.
    pub fn note_event_idx_suppressed(&self, vec: u16) -> Result<(), IrqError> {
        self.vector(vec)?
            .suppressed_event_idx
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The trigger installed on vector `vec`: the same `Arc` that was given to
    /// [`VectorTable::set_irqs`]. Takes the control mutex.
    ///
    /// # Errors
    /// [`IrqError::OutOfRange`] if `vec >= nvec`.
    pub fn trigger_fd(&self, vec: u16) -> Result<Option<Arc<OwnedFd>>, IrqError> {
        self.vector(vec)?;
        Ok(self
            .lock()
            .slots
            .get(usize::from(vec))
            .and_then(|s| s.trigger.clone()))
    }

    /// The state of every vector, in order. Lock-free: each vector's fields are read one by
    /// one while workers may be firing, so a line can be a few events behind another.
    pub fn snapshot(&self) -> Vec<VectorInfo> {
        self.vectors
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let flags = v.flags.load(Ordering::Acquire);
                let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
                VectorInfo {
                    index: u16::try_from(i).unwrap_or(u16::MAX),
                    has_trigger: flags & ARMED != 0,
                    masked: flags & MASKED != 0,
                    pending: flags & PENDING != 0,
                    max_delay_us: v.max_delay_us.load(Ordering::Relaxed),
                    max_batch: v.max_batch.load(Ordering::Relaxed),
                    held: c(&v.held),
                    counters: VectorCounters {
                        sent: c(&v.sent),
                        suppressed_masked: c(&v.suppressed_masked),
                        suppressed_coalesced: c(&v.suppressed_coalesced),
                        dropped_no_trigger: c(&v.dropped_no_trigger),
                        suppressed_event_idx: c(&v.suppressed_event_idx),
                        sent_deferred: c(&v.sent_deferred),
                        sent_injected: c(&v.sent_injected),
                    },
                }
            })
            .collect()
    }

    /// [`VectorTable::fire`] at a given time (tests use synthetic instants).
    #[cfg(test)]
    pub(crate) fn fire_at(&self, vec: u16, now: Instant) -> Result<Fired, IrqError> {
        Ok(self.fire_with(self.vector(vec)?, || now))
    }

    /// [`VectorTable::flush`] at a given time.
    #[cfg(test)]
    pub(crate) fn flush_at(&self, vec: u16, now: Instant) -> Result<bool, IrqError> {
        Ok(self.flush_with(self.vector(vec)?, || now))
    }

    fn vector(&self, vec: u16) -> Result<&Vector, IrqError> {
        self.vectors
            .get(usize::from(vec))
            .ok_or(IrqError::OutOfRange {
                start: vec,
                count: 1,
                nvec: self.nvec(),
            })
    }

    fn lock(&self) -> MutexGuard<'_, Control> {
        // Every field of the control state is assigned whole, so it is consistent even if a
        // holder panicked: a poisoned lock is still usable.
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `last_signal` encoding of `now`.
    fn stamp(&self, now: Instant) -> u64 {
        let ns = now.saturating_duration_since(self.epoch).as_nanos();
        u64::try_from(ns).unwrap_or(u64::MAX - 1).saturating_add(1)
    }

    fn fire_with(&self, v: &Vector, now: impl FnOnce() -> Instant) -> Fired {
        let flags = v.flags.load(Ordering::Acquire);
        if flags & ARMED == 0 {
            v.dropped_no_trigger.fetch_add(1, Ordering::Relaxed);
            return Fired::NoTrigger;
        }
        if v.hold_if_masked(flags) {
            v.suppressed_masked.fetch_add(1, Ordering::Relaxed);
            return Fired::Masked;
        }
        let batch = v.max_batch.load(Ordering::Relaxed);
        let delay_us = v.max_delay_us.load(Ordering::Relaxed);
        if batch == 0 && delay_us == 0 {
            // Coalescing is off; this signal also covers fires held before it was turned off.
            if v.held.load(Ordering::Relaxed) != 0 {
                v.held.store(0, Ordering::Release);
            }
        } else {
            let held = v.held.fetch_add(1, Ordering::AcqRel).wrapping_add(1);
            let mut due = batch != 0 && held >= u64::from(batch);
            let mut stamp = NEVER;
            if delay_us != 0 {
                stamp = self.stamp(now());
                let last = v.last_signal.load(Ordering::Relaxed);
                due |= last == NEVER || stamp.saturating_sub(last) >= u64::from(delay_us) * 1000;
            }
            // Claim the held fires; if another thread's signal already took them (ours
            // included), that signal came after our batch was published and covers it.
            if !due || v.held.swap(0, Ordering::AcqRel) == 0 {
                v.suppressed_coalesced.fetch_add(1, Ordering::Relaxed);
                return Fired::Coalesced;
            }
            if stamp != NEVER {
                v.last_signal.store(stamp, Ordering::Relaxed);
            }
        }
        self.signal(v);
        v.sent.fetch_add(1, Ordering::Relaxed);
        Fired::Sent
    }

    fn flush_with(&self, v: &Vector, now: impl FnOnce() -> Instant) -> bool {
        if v.held.load(Ordering::Acquire) == 0 {
            return false;
        }
        let flags = v.flags.load(Ordering::Acquire);
        if flags & ARMED == 0 {
            v.held.store(0, Ordering::Release);
            return false;
        }
        if v.hold_if_masked(flags) {
            // The pending bit now stands for the held fires; unmask delivers them.
            v.held.store(0, Ordering::Release);
            return false;
        }
        if v.held.swap(0, Ordering::AcqRel) == 0 {
            return false;
        }
        self.stamp_signal(v, now);
        self.signal(v);
        v.sent_deferred.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// A manual signal: honours the mask, bypasses (and resets) coalescing.
    fn inject(&self, v: &Vector) -> bool {
        let flags = v.flags.load(Ordering::Acquire);
        if flags & ARMED == 0 || v.hold_if_masked(flags) {
            return false;
        }
        self.deliver(v, Instant::now);
        v.sent_injected.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Signals `v`, which covers every fire it held.
    fn deliver(&self, v: &Vector, now: impl FnOnce() -> Instant) {
        v.held.swap(0, Ordering::AcqRel);
        self.stamp_signal(v, now);
        self.signal(v);
    }

    fn stamp_signal(&self, v: &Vector, now: impl FnOnce() -> Instant) {
        if v.max_delay_us.load(Ordering::Relaxed) != 0 {
            v.last_signal.store(self.stamp(now()), Ordering::Relaxed);
        }
    }

    /// Removes every trigger (count 0).
    fn teardown(&self) {
        if self.injector.is_some() {
            // The injector is the trigger of every vector, for the table's lifetime.
            return;
        }
        let mut ctl = self.lock();
        let Control { slots, sink } = &mut *ctl;
        for (v, slot) in self.vectors.iter().zip(slots.iter_mut()) {
            Self::remove(v, slot, sink.as_ref());
        }
    }

    /// `DATA_EVENTFD` on `start..start + fds.len()` (range and length already checked).
    fn set_triggers(&self, start: u16, fds: Vec<Option<Arc<OwnedFd>>>) -> Result<(), IrqError> {
        if self.injector.is_some() {
            return Err(IrqError::BadTrigger {
                vec: start,
                reason: "this table signals by injection (VDUSE), not through eventfds".into(),
            });
        }
        let mut ctl = self.lock();
        let Control { slots, sink } = &mut *ctl;
        let first = usize::from(start);
        // Previous triggers of the vectors changed so far, to restore on failure.
        let mut undo: Vec<(usize, Option<Arc<OwnedFd>>)> = Vec::with_capacity(fds.len());
        let mut failure = None;
        for (i, new) in (first..).zip(fds) {
            let (Some(v), Some(slot)) = (self.vectors.get(i), slots.get_mut(i)) else {
                break;
            };
            let same = match (&slot.trigger, &new) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if same {
                continue;
            }
            let vec = u16::try_from(i).unwrap_or(u16::MAX);
            let old = slot.trigger.clone();
            let done = match new {
                Some(fd) => check_eventfd(&fd)
                    .map_err(|reason| IrqError::BadTrigger { vec, reason })
                    .and_then(|()| Self::install(v, slot, sink, fd, vec)),
                None => {
                    Self::remove(v, slot, sink.as_ref());
                    Ok(())
                }
            };
            match done {
                Ok(()) => undo.push((i, old)),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let Some(e) = failure else {
            return Ok(());
        };
        for (i, old) in undo.into_iter().rev() {
            let (Some(v), Some(slot)) = (self.vectors.get(i), slots.get_mut(i)) else {
                continue;
            };
            let vec = u16::try_from(i).unwrap_or(u16::MAX);
            match old {
                // A dup3 onto our own fd of an fd that was installed before cannot fail
                // short of a kernel out of memory; then the vector is left without trigger.
                Some(fd) => {
                    if let Err(re) = Self::install(v, slot, sink, fd, vec) {
                        warn!(vector = vec, "restoring the previous trigger failed: {re}");
                        Self::remove(v, slot, sink.as_ref());
                    }
                }
                None => Self::remove(v, slot, sink.as_ref()),
            }
        }
        Err(e)
    }

    /// Points `v`'s fd at `trigger` and arms it.
    fn install(
        v: &Vector,
        slot: &mut Slot,
        sink: &mut Option<OwnedFd>,
        trigger: Arc<OwnedFd>,
        vec: u16,
    ) -> Result<(), IrqError> {
        let err = |source| IrqError::Install { vec, source };
        if sink.is_none() {
            *sink = Some(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).map_err(err)?);
        }
        match &mut slot.fd {
            Some(fd) => rustix::io::dup3(&*trigger, fd, DupFlags::CLOEXEC).map_err(err)?,
            None => {
                let fd = rustix::io::fcntl_dupfd_cloexec(&*trigger, 0).map_err(err)?;
                v.fd.store(fd.as_raw_fd(), Ordering::Release);
                slot.fd = Some(fd);
            }
        }
        slot.trigger = Some(trigger);
        v.flags.fetch_or(ARMED, Ordering::AcqRel);
        Ok(())
    }

    /// Disarms `v` and points its fd at the sink, releasing the trigger. Cannot fail: if the
    /// dup3 did (it does not on an fd we own), the disarmed fd is just not written to.
    fn remove(v: &Vector, slot: &mut Slot, sink: Option<&OwnedFd>) {
        v.flags.fetch_and(!ARMED, Ordering::AcqRel);
        if slot.trigger.take().is_none() {
            return;
        }
        if let (Some(fd), Some(sink)) = (&mut slot.fd, sink) {
            if let Err(e) = rustix::io::dup3(sink, fd, DupFlags::CLOEXEC) {
                warn!("detaching a removed trigger failed: {e}");
            }
        }
    }
}

/// Checks that `fd` can serve as a trigger: a writable eventfd. Its link in `/proc/self/fd`
/// names an eventfd exactly; where `/proc` is not mounted, `fstat` can at least refuse what
/// is not an anonymous inode (files, pipes, sockets, devices).
fn check_eventfd(fd: &OwnedFd) -> Result<(), String> {
    let fl = rustix::fs::fcntl_getfl(fd).map_err(|e| format!("F_GETFL failed: {e}"))?;
    if fl & OFlags::RWMODE == OFlags::RDONLY {
        return Err("it is open read-only".into());
    }
    match std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())) {
        Ok(target) if target.as_os_str() == "anon_inode:[eventfd]" => Ok(()),
        Ok(target) => Err(format!("it is not an eventfd but {}", target.display())),
        Err(_) => {
            let st = rustix::fs::fstat(fd).map_err(|e| format!("fstat failed: {e}"))?;
            match FileType::from_raw_mode(st.st_mode) {
                FileType::Unknown => Ok(()),
                kind => Err(format!("it is not an eventfd but a {kind:?}")),
            }
        }
    }
}

/// A worker's handle on one vector of a shared [`VectorTable`] (from
/// [`VectorTable::handle`]): the data-path operations without a bounds check per call.
#[derive(Debug, Clone)]
pub struct VectorHandle {
    table: Arc<VectorTable>,
    /// Checked against the table in `VectorTable::handle`.
    vec: usize,
}

impl VectorHandle {
    /// The vector number.
    pub fn index(&self) -> u16 {
        u16::try_from(self.vec).unwrap_or(u16::MAX)
    }

    /// The table.
    pub fn table(&self) -> &Arc<VectorTable> {
        &self.table
    }

    fn v(&self) -> Option<&Vector> {
        self.table.vectors.get(self.vec)
    }

    /// As [`VectorTable::fire`].
    pub fn fire(&self) -> Fired {
        self.v()
            .map_or(Fired::NoTrigger, |v| self.table.fire_with(v, Instant::now))
    }

    /// As [`VectorTable::flush`].
    pub fn flush(&self) -> bool {
        self.v()
            .is_some_and(|v| self.table.flush_with(v, Instant::now))
    }

    /// As [`VectorTable::note_event_idx_suppressed`].
    pub fn note_event_idx_suppressed(&self) {
        if let Some(v) = self.v() {
            v.suppressed_event_idx.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The raw number of a vector's signalling fd (tests check that it never changes).
#[cfg(test)]
impl VectorTable {
    pub(crate) fn raw_signal_fd(&self, vec: u16) -> std::os::fd::RawFd {
        self.vectors
            .get(usize::from(vec))
            .map_or(-1, |v| v.fd.load(Ordering::Acquire))
    }

    pub(crate) fn sink_fd(&self) -> Option<std::os::fd::RawFd> {
        self.lock().sink.as_ref().map(AsRawFd::as_raw_fd)
    }
}
