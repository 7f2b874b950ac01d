//! SIGBUS containment for guest memory.
//!
//! A frontend that shrinks a memory fd it handed over (ftruncate of an unsealed memfd, a
//! file on hugetlbfs or tmpfs) makes the next access to the lost pages raise SIGBUS, which
//! by default kills the whole daemon and every device in it. Every mapping made by
//! [`crate::MemoryRegion`] is recorded in a fixed-size, lock-free registry; a process-wide
//! SIGBUS handler, installed at the first registration, looks the fault address up there.
//! Inside a registered mapping it replaces the whole mapping with a private anonymous zero
//! mapping (so the faulting access completes, reading zeros), marks the slot faulted and
//! bumps a process-wide fault generation; queue workers compare that generation once per
//! batch and fail the device that owns the region (DEVICE_NEEDS_RESET). A SIGBUS anywhere
//! else gets the default action, as before.
//!
//! The handler only uses atomics and the raw `mmap`/`sigaction`/`raise` calls, all
//! async-signal-safe. Chaining to a previously installed handler is not done: Rust's
//! runtime installs one for stack overflows, which on Linux raise SIGSEGV, not SIGBUS.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Once;

/// Most guest-memory mappings the registry tracks at once; a mapping made when it is full
/// is not protected (a fault there kills the process, as without the registry).
pub const SLOTS: usize = 4096;

/// One registered mapping. `seq` is a sequence lock: odd while the slot is being written,
/// so the handler never acts on a torn (start, len) pair.
struct Slot {
    claimed: AtomicBool,
    seq: AtomicU64,
    start: AtomicUsize,
    len: AtomicUsize,
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    claimed: AtomicBool::new(false),
    seq: AtomicU64::new(0),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};

static REGISTRY: [Slot; SLOTS] = [EMPTY; SLOTS];
/// Bumped by the handler after each contained fault.
static GENERATION: AtomicU64 = AtomicU64::new(0);
static INSTALL: Once = Once::new();

/// A mapping's place in the registry; dropping it unregisters the mapping (do so before
/// unmapping it).
#[derive(Debug)]
pub struct Registration {
    slot: usize,
}

impl Registration {
    /// Whether a SIGBUS inside the mapping was contained (the mapping now holds zeros).
    pub fn faulted(&self) -> bool {
        REGISTRY
            .get(self.slot)
            .is_some_and(|s| s.faulted.load(Ordering::Acquire))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let Some(s) = REGISTRY.get(self.slot) else {
            return;
        };
        s.seq.fetch_add(1, Ordering::AcqRel);
        s.len.store(0, Ordering::Release);
        s.start.store(0, Ordering::Release);
        s.faulted.store(false, Ordering::Release);
        s.seq.fetch_add(1, Ordering::AcqRel);
        s.claimed.store(false, Ordering::Release);
    }
}

/// Records the mapping `[start, start + len)` (installing the SIGBUS handler on first
/// use). `None` when every slot is taken or the handler could not be installed: the
/// mapping then has no containment.
pub fn register(start: *mut u8, len: usize) -> Option<Registration> {
    if len == 0 || !install() {
        return None;
    }
    let slot = REGISTRY.iter().position(|s| {
        s.claimed
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    })?;
    let s = &REGISTRY[slot];
    s.seq.fetch_add(1, Ordering::AcqRel);
    s.faulted.store(false, Ordering::Release);
    s.start.store(start as usize, Ordering::Release);
    s.len.store(len, Ordering::Release);
    s.seq.fetch_add(1, Ordering::AcqRel);
    Some(Registration { slot })
}

/// How many faults were contained so far in this process. Workers compare it once per
/// batch and only look at their regions when it changed.
#[inline]
pub fn generation() -> u64 {
    GENERATION.load(Ordering::Acquire)
}

/// The registered mapping `(slot, start, len)` containing `addr`, if any. Async-signal-safe.
pub(crate) fn lookup(addr: usize) -> Option<(usize, usize, usize)> {
    REGISTRY.iter().enumerate().find_map(|(i, s)| {
        let before = s.seq.load(Ordering::Acquire);
        if before % 2 == 1 {
            return None;
        }
        let start = s.start.load(Ordering::Acquire);
        let len = s.len.load(Ordering::Acquire);
        if s.seq.load(Ordering::Acquire) != before || len == 0 {
            return None;
        }
        (addr >= start && addr - start < len).then_some((i, start, len))
    })
}

/// Installs the handler once; whether it is installed.
fn install() -> bool {
    static OK: AtomicBool = AtomicBool::new(false);
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid value to fill in; the handler has the
        // SA_SIGINFO signature and only does async-signal-safe work.
        let ok = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) == 0
        };
        OK.store(ok, Ordering::Release);
        if !ok {
            tracing::warn!(
                "Installing the SIGBUS handler failed: a shrunk memory fd kills the daemon"
            );
        }
    });
    OK.load(Ordering::Acquire)
}

/// Restores the default SIGBUS action (the re-executed access, or `raise`, then kills).
fn default_action() {
    // SAFETY: sigaction with a zeroed (SIG_DFL) action is async-signal-safe.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = libc::SIG_DFL;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    if info.is_null() {
        default_action();
        return;
    }
    // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo_t for this delivery.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    // si_code > 0: raised by the kernel for a memory access, so si_addr is meaningful.
    if code > 0 {
        if let Some((slot, start, len)) = lookup(addr) {
            // SAFETY: [start, start+len) is a live mapping the registry owns (a region
            // unregisters before it unmaps); replacing it in place with an anonymous
            // private mapping keeps every pointer into it valid, now reading zeros.
            let p = unsafe {
                libc::mmap(
                    start as *mut libc::c_void,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                if let Some(s) = REGISTRY.get(slot) {
                    s.faulted.store(true, Ordering::Release);
                }
                GENERATION.fetch_add(1, Ordering::AcqRel);
                return;
            }
        }
        default_action();
        return;
    }
    // Sent by a process (kill, tgkill): not a fault to contain. SIGBUS is blocked while
    // the handler runs; the raised one is delivered, with the default action, on return.
    default_action();
    // SAFETY: raise is async-signal-safe.
    unsafe { libc::raise(sig) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GuestMemory, MemoryRegion};

    #[test]
    fn a_truncated_memfd_faults_into_zeros_and_flags_its_region() {
        let fd = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 0x4000).unwrap();
        let mem =
            GuestMemory::new(vec![MemoryRegion::map(&fd, 0x10000, 0x4000, 0, 0).unwrap()]).unwrap();
        mem.write(0x10000, &[7; 16]).unwrap();
        assert!(mem.faulted_region().is_none());
        let before = generation();
        rustix::fs::ftruncate(&fd, 0).unwrap();
        let mut b = [0xffu8; 16];
        mem.read(0x10000, &mut b).unwrap();
        assert_eq!(b, [0; 16], "the faulting read completes with zeros");
        assert_eq!(mem.faulted_region(), Some((0x10000, 0x4000)));
        assert!(generation() > before);
        // The replacement is ordinary memory: writes stay, no further fault.
        mem.write(0x13000, &[5; 8]).unwrap();
        mem.read(0x13000, &mut b[..8]).unwrap();
        assert_eq!(&b[..8], &[5; 8]);
        let host = mem.translate(0x10000, 1).unwrap() as usize;
        assert!(lookup(host).is_some());
        drop(mem);
        assert!(
            lookup(host).is_none(),
            "a dropped region is no longer registered"
        );
    }

    #[test]
    fn addresses_outside_guest_mappings_are_not_handled() {
        let on_stack = 0u64;
        assert!(lookup(&on_stack as *const u64 as usize).is_none());
        let heap = Box::new(0u64);
        assert!(lookup(&*heap as *const u64 as usize).is_none());
        assert!(lookup(0).is_none());
    }
}
