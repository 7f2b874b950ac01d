//! Tests of late regions: a [`GuestMemory`] with a [`RegionResolver`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::*;

/// A resolver built from a closure, counting its calls.
struct FnResolver<F> {
    f: F,
    calls: AtomicUsize,
}

impl<F: Fn(u64) -> Option<MemoryRegion> + Send + Sync> RegionResolver for FnResolver<F> {
    fn resolve(&self, addr: u64) -> Option<MemoryRegion> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        (self.f)(addr)
    }
}

fn resolver<F: Fn(u64) -> Option<MemoryRegion> + Send + Sync + 'static>(
    f: F,
) -> Arc<FnResolver<F>> {
    Arc::new(FnResolver {
        f,
        calls: AtomicUsize::new(0),
    })
}

/// Serves 4 KiB pages of anonymous memory for any address in [0x1000, 0x100000).
fn pages(addr: u64) -> Option<MemoryRegion> {
    (0x1000..0x10_0000)
        .contains(&addr)
        .then(|| MemoryRegion::anonymous(addr & !0xfff, 0x1000).unwrap())
}

fn fixed() -> Vec<MemoryRegion> {
    vec![MemoryRegion::anonymous(0, 0x1000).unwrap()]
}

#[test]
fn a_miss_resolves_once_and_pieces_cross_into_late_regions() {
    let r = resolver(pages);
    let mem = GuestMemory::with_resolver(fixed(), r.clone()).unwrap();
    assert!(mem.translate(0x10, 0x10).is_ok());
    assert_eq!(
        r.calls.load(Ordering::SeqCst),
        0,
        "fixed hits never resolve"
    );
    let p = mem.translate(0x5008, 8).unwrap();
    assert_eq!(mem.translate(0x5008, 8).unwrap(), p);
    assert_eq!(r.calls.load(Ordering::SeqCst), 1);
    // One region only: a range past the end of the page fails like any other.
    assert!(mem.translate(0x5ff8, 0x10).is_err());
    // Pieces: fixed -> late -> late.
    let mut pieces = vec![];
    mem.for_each_piece(0xff0, 0x1020, |_, n| pieces.push(n))
        .unwrap();
    assert_eq!(pieces, vec![0x10, 0x1000, 0x10]);
    mem.write(0xff8, &[9u8; 0x1010]).unwrap();
    let mut back = vec![0u8; 0x1010];
    mem.read(0xff8, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 9));
    assert_eq!(
        mem.late_stats(),
        LateStats {
            active: 3,
            retired: 0,
            bytes: 0x3000,
            generation: 0
        }
    );
    // Fixed-table API is unchanged: late regions are not listed there.
    assert_eq!(mem.regions().len(), 1);
    assert_eq!(mem.total_size(), 0x1000);
}

#[test]
fn invalidate_retires_but_keeps_the_mapping() {
    let r = resolver(pages);
    let mut mem = GuestMemory::with_resolver(fixed(), r.clone()).unwrap();
    let old = mem.translate(0x2000, 8).unwrap();
    let inv = mem.invalidate(0x2000, 0x2000);
    assert_eq!(
        inv,
        Invalidated {
            retired: 1,
            fixed_overlap: false
        }
    );
    // The old pointer still points at mapped memory.
    // SAFETY: `old` came from a region that was retired, not unmapped; 8 bytes in range.
    unsafe { std::ptr::write_bytes(old, 0xab, 8) };
    // The next translation asks the resolver again and gets the new mapping.
    let new = mem.translate(0x2000, 8).unwrap();
    assert_ne!(new, old);
    assert_eq!(r.calls.load(Ordering::SeqCst), 2);
    let stats = mem.late_stats();
    assert_eq!((stats.active, stats.retired, stats.generation), (1, 1, 1));
    // Ranges: inclusive, several regions at once, fixed overlap reported.
    mem.translate(0x3000, 1).unwrap();
    let inv = mem.invalidate(0, 0x2fff);
    assert_eq!(
        inv,
        Invalidated {
            retired: 1,
            fixed_overlap: true
        }
    );
    assert_eq!(mem.invalidate(5, 4).retired, 0);
    assert_eq!(mem.invalidate(0, u64::MAX).retired, 1);
    assert_eq!(mem.purge_retired(), 3);
    assert_eq!(mem.late_stats().bytes, 0);
    // A fixed table without resolver: invalidate only reports.
    let plain = GuestMemory::new(fixed()).unwrap();
    assert_eq!(
        plain.invalidate(0, 0),
        Invalidated {
            retired: 0,
            fixed_overlap: true
        }
    );
}

#[test]
fn a_failing_resolver_gives_out_of_bounds() {
    let r = resolver(|_| None);
    let mem = GuestMemory::with_resolver(fixed(), r.clone()).unwrap();
    assert_eq!(
        mem.translate(0x9000, 4),
        Err(MemoryError::OutOfBounds {
            addr: 0x9000,
            len: 4
        })
    );
    assert_eq!(
        mem.for_each_piece(0xff0, 0x20, |_, _| {}),
        Err(MemoryError::OutOfBounds {
            addr: 0xff0,
            len: 0x20
        })
    );
    assert!(mem.write(0x9000, &[1]).is_err());
    // Each miss asks again (a later IOTLB entry may appear).
    assert_eq!(r.calls.load(Ordering::SeqCst), 3);
}

#[test]
fn overlapping_or_wrong_resolutions_are_refused() {
    // Overlaps the fixed region [0, 0x1000).
    let r = resolver(|_| Some(MemoryRegion::anonymous(0x800, 0x1000).unwrap()));
    let mem = GuestMemory::with_resolver(fixed(), r).unwrap();
    assert!(mem.translate(0x1000, 1).is_err());
    assert_eq!(mem.late_stats().active, 0);
    // Does not contain the address asked for.
    let r = resolver(|_| Some(MemoryRegion::anonymous(0x8000, 0x1000).unwrap()));
    let mem = GuestMemory::with_resolver(fixed(), r).unwrap();
    assert!(mem.translate(0x1000, 1).is_err());
    assert_eq!(mem.late_stats().active, 0);
    // Overlaps an active late region: [0x2000, 0x4000) after [0x3000, 0x4000).
    let r = resolver(|a| {
        Some(if a >= 0x3000 {
            MemoryRegion::anonymous(0x3000, 0x1000).unwrap()
        } else {
            MemoryRegion::anonymous(0x2000, 0x2000).unwrap()
        })
    });
    let mem = GuestMemory::with_resolver(fixed(), r).unwrap();
    assert!(mem.translate(0x3000, 1).is_ok());
    assert!(mem.translate(0x2000, 1).is_err());
    // insert_late applies the same checks.
    assert_eq!(
        mem.insert_late(MemoryRegion::anonymous(0x3800, 0x1000).unwrap()),
        Err(MemoryError::Overlap { gpa: 0x3800 })
    );
    assert!(mem
        .insert_late(MemoryRegion::anonymous(0x4000, 0x1000).unwrap())
        .is_ok());
    assert!(mem.translate(0x4fff, 1).is_ok());
    let plain = GuestMemory::new(fixed()).unwrap();
    assert!(plain
        .insert_late(MemoryRegion::anonymous(0x4000, 0x1000).unwrap())
        .is_err());
}

#[test]
fn late_regions_are_bounded() {
    let limits = LateLimits {
        max_regions: 2,
        max_bytes: 0x10_0000,
    };
    let mem = GuestMemory::with_resolver_limits(fixed(), resolver(pages), limits).unwrap();
    assert!(mem.translate(0x1000, 1).is_ok());
    assert!(mem.translate(0x2000, 1).is_ok());
    assert!(mem.translate(0x3000, 1).is_err());
    // Retired regions still count.
    let _ = mem.invalidate(0x1000, 0x1fff);
    assert!(mem.translate(0x1000, 1).is_err());
    let limits = LateLimits {
        max_regions: 100,
        max_bytes: 0x1800,
    };
    let mem = GuestMemory::with_resolver_limits(fixed(), resolver(pages), limits).unwrap();
    assert!(mem.translate(0x1000, 1).is_ok());
    assert!(mem.translate(0x2000, 1).is_err());
}

#[test]
fn concurrent_misses_share_one_region() {
    let r = resolver(pages);
    let mem = Arc::new(GuestMemory::with_resolver(fixed(), r.clone()).unwrap());
    let ptrs: Vec<usize> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|_| {
                let mem = &mem;
                s.spawn(move || mem.translate(0x7010, 4).unwrap() as usize)
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(ptrs.iter().all(|&p| p == ptrs[0]));
    assert_eq!(mem.late_stats().active, 1);
    assert!(r.calls.load(Ordering::SeqCst) >= 1);
}

#[test]
fn map_with_maps_from_an_aligned_offset_and_private_stays_private() {
    let fd = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, 0x30000).unwrap();
    rustix::io::pwrite(&fd, b"abcd", 0x21234).unwrap();
    let shared =
        MemoryRegion::map_with(&fd, 0x9000, 0x1000, 0x9000, 0x21234, Sharing::Shared).unwrap();
    let private =
        MemoryRegion::map_with(&fd, 0xa000, 0x1000, 0xa000, 0x21234, Sharing::Private).unwrap();
    assert_eq!(private.sharing(), Sharing::Private);
    let mem = GuestMemory::new(vec![shared, private]).unwrap();
    let mut b = [0u8; 4];
    mem.read(0x9000, &mut b).unwrap();
    assert_eq!(&b, b"abcd");
    mem.read(0xa000, &mut b).unwrap();
    assert_eq!(&b, b"abcd");
    mem.write(0xa000, b"XXXX").unwrap();
    rustix::io::pread(&fd, &mut b, 0x21234).unwrap();
    assert_eq!(&b, b"abcd", "a private write never reaches the file");
    mem.write(0x9000, b"YYYY").unwrap();
    rustix::io::pread(&fd, &mut b, 0x21234).unwrap();
    assert_eq!(&b, b"YYYY");
    // Past the end of the file is refused, as with `map`.
    assert!(matches!(
        MemoryRegion::map_with(&fd, 0, 0x20000, 0, 0x20000, Sharing::Shared),
        Err(MemoryError::PastEndOfFile { .. })
    ));
}
