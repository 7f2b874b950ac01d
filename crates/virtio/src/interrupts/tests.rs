use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::{eventfd, EventfdFlags};

use super::*;

fn efd() -> Arc<OwnedFd> {
    Arc::new(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).unwrap())
}

/// Reads and resets an eventfd's counter (0 if it was not signalled).
fn count(fd: &OwnedFd) -> u64 {
    let mut b = [0u8; 8];
    match rustix::io::read(fd, &mut b) {
        Ok(8) => u64::from_ne_bytes(b),
        Ok(n) => panic!("short eventfd read {n}"),
        Err(rustix::io::Errno::AGAIN) => 0,
        Err(e) => panic!("eventfd read: {e}"),
    }
}

fn table_with(nvec: u16, fds: &[Option<Arc<OwnedFd>>]) -> Arc<VectorTable> {
    let t = Arc::new(VectorTable::new(nvec));
    let n = u16::try_from(fds.len()).unwrap();
    t.set_irqs(0, n, IrqAction::Eventfd(fds.to_vec())).unwrap();
    t
}

fn same(a: &Option<Arc<OwnedFd>>, b: &Option<Arc<OwnedFd>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

fn triggers(t: &VectorTable) -> Vec<Option<Arc<OwnedFd>>> {
    (0..t.nvec()).map(|v| t.trigger_fd(v).unwrap()).collect()
}

fn assert_triggers(t: &VectorTable, want: &[Option<Arc<OwnedFd>>]) {
    let got = triggers(t);
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(same(g, w), "vector {i}: trigger changed");
        assert_eq!(t.snapshot()[i].has_trigger, w.is_some(), "vector {i}");
    }
}

/// A writable fd that is not an eventfd (a socket).
fn not_an_eventfd() -> Arc<OwnedFd> {
    let (s, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    Arc::new(OwnedFd::from(s))
}

#[test]
fn a_new_table_has_no_triggers_and_every_vector_in_its_snapshot() {
    let t = VectorTable::new(3);
    assert_eq!(t.nvec(), 3);
    let snap = t.snapshot();
    assert_eq!(snap.len(), 3);
    for (i, info) in snap.iter().enumerate() {
        assert_eq!(
            *info,
            VectorInfo {
                index: u16::try_from(i).unwrap(),
                ..VectorInfo::default()
            }
        );
    }
    assert_eq!(t.fire(0).unwrap(), Fired::NoTrigger);
    assert!(!t.trigger(1).unwrap());
    assert!(!t.flush(2).unwrap());
    assert_eq!(t.snapshot()[0].counters.dropped_no_trigger, 1);
    assert!(VectorTable::new(0).snapshot().is_empty());
}

#[test]
fn eventfd_action_installs_and_removes_triggers() {
    let (a, b) = (efd(), efd());
    let t = table_with(3, &[Some(a.clone()), None, Some(b.clone())]);
    assert_triggers(&t, &[Some(a.clone()), None, Some(b.clone())]);
    assert_eq!(t.fire(0).unwrap(), Fired::Sent);
    assert_eq!(t.fire(1).unwrap(), Fired::NoTrigger);
    assert_eq!(t.fire(2).unwrap(), Fired::Sent);
    assert_eq!((count(&a), count(&b)), (1, 1));

    // Replace vector 0, install vector 1, remove vector 2.
    let (c, d) = (efd(), efd());
    let fd0 = t.raw_signal_fd(0);
    t.set_irqs(
        0,
        3,
        IrqAction::Eventfd(vec![Some(c.clone()), Some(d.clone()), None]),
    )
    .unwrap();
    assert_triggers(&t, &[Some(c.clone()), Some(d.clone()), None]);
    // Workers keep signalling through the same fd number.
    assert_eq!(t.raw_signal_fd(0), fd0);
    for v in 0..3 {
        let _ = t.fire(v).unwrap();
    }
    assert_eq!((count(&a), count(&b), count(&c), count(&d)), (0, 0, 1, 1));
    // The caller's handle is the only one left on a removed trigger... and the table's dup
    // was retargeted at the sink, so b is no longer referenced by the table.
    assert_eq!(Arc::strong_count(&b), 1);
    assert!(t.sink_fd().is_some());

    // Installing the same eventfd again changes nothing.
    t.set_irqs(1, 1, IrqAction::Eventfd(vec![Some(d.clone())]))
        .unwrap();
    assert_triggers(&t, &[Some(c), Some(d.clone()), None]);
    assert_eq!(t.fire(1).unwrap(), Fired::Sent);
    assert_eq!(count(&d), 1);
}

#[test]
fn count_zero_tears_down_every_trigger() {
    for action in [IrqAction::Eventfd(vec![]), IrqAction::None] {
        let (a, b) = (efd(), efd());
        let t = table_with(2, &[Some(a.clone()), Some(b.clone())]);
        t.mask(1).unwrap();
        t.set_coalesce(0, 0, 4).unwrap();
        t.set_irqs(0, 0, action).unwrap();
        assert_triggers(&t, &[None, None]);
        assert_eq!(t.fire(0).unwrap(), Fired::NoTrigger);
        assert_eq!((count(&a), count(&b)), (0, 0));
        // Mask and coalescing settings are not triggers: they stay.
        let snap = t.snapshot();
        assert!(snap[1].masked);
        assert_eq!(snap[0].max_batch, 4);
    }
    // Bool with count 0 signals nothing and removes nothing.
    let a = efd();
    let t = table_with(1, &[Some(a.clone())]);
    t.set_irqs(0, 0, IrqAction::Bool(vec![])).unwrap();
    assert_triggers(&t, &[Some(a.clone())]);
    assert_eq!(count(&a), 0);
    // start may be nvec (an empty range at the end), not beyond.
    t.set_irqs(1, 0, IrqAction::Eventfd(vec![])).unwrap();
    assert!(matches!(
        t.set_irqs(2, 0, IrqAction::Eventfd(vec![])),
        Err(IrqError::OutOfRange {
            start: 2,
            count: 0,
            nvec: 1
        })
    ));
}

#[test]
fn data_none_fires_every_vector_in_the_range() {
    let fds: Vec<_> = (0..4).map(|_| efd()).collect();
    let t = table_with(
        5,
        &[
            Some(fds[0].clone()),
            Some(fds[1].clone()),
            Some(fds[2].clone()),
            Some(fds[3].clone()),
            None,
        ],
    );
    t.set_irqs(1, 4, IrqAction::None).unwrap();
    t.set_irqs(1, 2, IrqAction::None).unwrap();
    let counts: Vec<u64> = fds.iter().map(|f| count(f)).collect();
    assert_eq!(counts, [0, 2, 2, 1]);
    let snap = t.snapshot();
    assert_eq!(snap[1].counters.sent_injected, 2);
    // Vector 4 has no trigger: skipped, not an error, not a fire.
    assert_eq!(snap[4].counters, VectorCounters::default());
}

#[test]
fn data_bool_fires_only_the_vectors_whose_bool_is_set() {
    let fds: Vec<_> = (0..4).map(|_| efd()).collect();
    let t = table_with(4, &fds.iter().cloned().map(Some).collect::<Vec<_>>());
    t.set_irqs(0, 4, IrqAction::Bool(vec![true, false, true, false]))
        .unwrap();
    t.set_irqs(2, 2, IrqAction::Bool(vec![false, true]))
        .unwrap();
    let counts: Vec<u64> = fds.iter().map(|f| count(f)).collect();
    assert_eq!(counts, [1, 0, 1, 1]);
}

#[test]
fn out_of_range_and_wrong_length_are_errors_that_change_nothing() {
    let (a, b) = (efd(), efd());
    let t = table_with(2, &[Some(a.clone()), None]);
    let before = t.snapshot();
    let bad = [
        (1, 2, IrqAction::Eventfd(vec![None, None])),
        (3, 0, IrqAction::Eventfd(vec![])),
        (0, 3, IrqAction::None),
        (u16::MAX, 2, IrqAction::None),
        (0, 2, IrqAction::Eventfd(vec![None])),
        (
            0,
            1,
            IrqAction::Eventfd(vec![Some(b.clone()), Some(b.clone())]),
        ),
        (0, 2, IrqAction::Bool(vec![true])),
        (0, 0, IrqAction::Eventfd(vec![None])),
    ];
    for (start, count, action) in bad {
        let err = t.set_irqs(start, count, action).unwrap_err();
        match err {
            IrqError::OutOfRange { nvec, .. } => assert_eq!(nvec, 2),
            IrqError::DataLength { expected, got } => assert_ne!(expected, got),
            e => panic!("unexpected error {e}"),
        }
    }
    assert!(matches!(
        t.set_irqs(1, 2, IrqAction::None),
        Err(IrqError::OutOfRange {
            start: 1,
            count: 2,
            nvec: 2
        })
    ));
    assert!(matches!(
        t.set_irqs(0, 2, IrqAction::Bool(vec![true])),
        Err(IrqError::DataLength {
            expected: 2,
            got: 1
        })
    ));
    assert_triggers(&t, &[Some(a.clone()), None]);
    assert_eq!(t.snapshot(), before);
    assert_eq!(count(&a), 0);

    // Single-vector operations.
    let oor = |r: Result<(), IrqError>| {
        assert!(matches!(
            r,
            Err(IrqError::OutOfRange {
                start: 2,
                count: 1,
                nvec: 2
            })
        ))
    };
    oor(t.fire(2).map(drop));
    oor(t.trigger(2).map(drop));
    oor(t.flush(2).map(drop));
    oor(t.mask(2));
    oor(t.unmask(2).map(drop));
    oor(t.set_coalesce(2, 1, 1));
    oor(t.note_event_idx_suppressed(2));
    oor(t.trigger_fd(2).map(drop));
    oor(t.handle(2).map(drop));
    assert_eq!(t.snapshot(), before);
}

#[test]
fn a_failure_mid_range_restores_exactly_the_previous_triggers() {
    let (a, b, c) = (efd(), efd(), efd());
    let t = table_with(
        5,
        &[Some(a.clone()), Some(b.clone()), None, Some(c.clone())],
    );
    let previous = [
        Some(a.clone()),
        Some(b.clone()),
        None,
        Some(c.clone()),
        None,
    ];
    let raw: Vec<_> = (0..5).map(|v| t.raw_signal_fd(v)).collect();
    let (d, e) = (efd(), efd());
    // Vectors 0..3 change (replace, remove, install); vector 3 gets a socket: refused.
    let err = t
        .set_irqs(
            0,
            5,
            IrqAction::Eventfd(vec![
                Some(d.clone()),
                None,
                Some(e.clone()),
                Some(not_an_eventfd()),
                None,
            ]),
        )
        .unwrap_err();
    match err {
        IrqError::BadTrigger { vec, reason } => {
            assert_eq!(vec, 3);
            assert!(reason.contains("not an eventfd"), "{reason}");
        }
        e => panic!("unexpected error {e}"),
    }
    assert_triggers(&t, &previous);
    let after: Vec<_> = (0..5).map(|v| t.raw_signal_fd(v)).collect();
    assert_eq!(after[..2], raw[..2]);
    assert_eq!(after[3], raw[3]);
    // The data side signals the previous eventfds again, never the refused range's.
    for v in 0..5 {
        let _ = t.fire(v).unwrap();
    }
    assert_eq!((count(&a), count(&b), count(&c)), (1, 1, 1));
    assert_eq!((count(&d), count(&e)), (0, 0));
    assert_eq!(Arc::strong_count(&d), 1);
    assert_eq!(Arc::strong_count(&e), 1);
    let snap = t.snapshot();
    assert_eq!(snap[2].counters.dropped_no_trigger, 1);
    assert_eq!(snap[4].counters.dropped_no_trigger, 1);
}

#[test]
fn fds_that_are_not_writable_eventfds_are_refused() {
    let t = VectorTable::new(1);
    let epoll =
        Arc::new(rustix::event::epoll::create(rustix::event::epoll::CreateFlags::CLOEXEC).unwrap());
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .unwrap();
    let read_only = std::fs::File::open("/proc/self/stat").unwrap();
    for bad in [not_an_eventfd(), epoll, Arc::new(OwnedFd::from(null))] {
        let err = t
            .set_irqs(0, 1, IrqAction::Eventfd(vec![Some(bad)]))
            .unwrap_err();
        match err {
            IrqError::BadTrigger { vec: 0, reason } => {
                assert!(reason.contains("not an eventfd"), "{reason}")
            }
            e => panic!("unexpected error {e}"),
        }
    }
    let err = t
        .set_irqs(
            0,
            1,
            IrqAction::Eventfd(vec![Some(Arc::new(OwnedFd::from(read_only)))]),
        )
        .unwrap_err();
    assert!(err.to_string().contains("read-only"), "{err}");
    assert_triggers(&t, &[None]);
    // A refused first install allocates no signalling fd.
    assert_eq!(t.raw_signal_fd(0), -1);
}

#[test]
fn masked_fires_set_pending_and_unmask_delivers_exactly_one() {
    let a = efd();
    let t = table_with(1, &[Some(a.clone())]);
    t.mask(0).unwrap();
    t.mask(0).unwrap();
    for _ in 0..5 {
        assert_eq!(t.fire(0).unwrap(), Fired::Masked);
    }
    assert!(!t.trigger(0).unwrap());
    assert_eq!(count(&a), 0);
    let info = t.snapshot()[0];
    assert!(info.masked && info.pending);
    assert!(t.unmask(0).unwrap());
    assert_eq!(count(&a), 1);
    let info = t.snapshot()[0];
    assert!(!info.masked && !info.pending);
    assert_eq!(info.counters.suppressed_masked, 5);
    assert_eq!(info.counters.sent_deferred, 1);
    // Nothing pending any more.
    assert!(!t.unmask(0).unwrap());
    assert_eq!(count(&a), 0);
    // Mask and unmask with no fire in between: no signal.
    t.mask(0).unwrap();
    assert!(!t.unmask(0).unwrap());
    assert_eq!(count(&a), 0);
    assert_eq!(t.fire(0).unwrap(), Fired::Sent);
    assert_eq!(count(&a), 1);
}

#[test]
fn a_pending_signal_goes_to_the_trigger_installed_at_unmask_time() {
    let (a, b) = (efd(), efd());
    let t = table_with(1, &[Some(a.clone())]);
    t.mask(0).unwrap();
    assert_eq!(t.fire(0).unwrap(), Fired::Masked);
    t.set_irqs(0, 1, IrqAction::Eventfd(vec![Some(b.clone())]))
        .unwrap();
    assert!(t.snapshot()[0].pending);
    assert!(t.unmask(0).unwrap());
    assert_eq!((count(&a), count(&b)), (0, 1));
    // Removed while pending: nowhere to deliver.
    t.mask(0).unwrap();
    assert_eq!(t.fire(0).unwrap(), Fired::Masked);
    t.set_irqs(0, 1, IrqAction::Eventfd(vec![None])).unwrap();
    assert!(!t.unmask(0).unwrap());
    assert_eq!(count(&b), 0);
}

#[test]
fn coalescing_by_batch_signals_every_nth_fire() {
    let a = efd();
    let t = table_with(1, &[Some(a.clone())]);
    t.set_coalesce(0, 0, 4).unwrap();
    let mut outcomes = Vec::new();
    for _ in 0..10 {
        outcomes.push(t.fire(0).unwrap());
    }
    let sent: Vec<usize> = outcomes
        .iter()
        .enumerate()
        .filter(|(_, o)| **o == Fired::Sent)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(sent, [3, 7]);
    assert_eq!(count(&a), 2);
    assert_eq!(t.snapshot()[0].held, 2);
    // The queue goes idle: the two held fires are delivered once.
    assert!(t.flush(0).unwrap());
    assert_eq!(count(&a), 1);
    assert!(!t.flush(0).unwrap());
    assert_eq!(count(&a), 0);
    let c = t.snapshot()[0].counters;
    assert_eq!((c.sent, c.suppressed_coalesced, c.sent_deferred), (2, 8, 1));
    // Off again: every fire signals.
    t.set_coalesce(0, 0, 0).unwrap();
    assert_eq!(t.fire(0).unwrap(), Fired::Sent);
    assert_eq!(t.fire(0).unwrap(), Fired::Sent);
    assert_eq!(count(&a), 2);
}

#[test]
fn coalescing_by_delay_follows_the_clock() {
    let a = efd();
    let t = table_with(1, &[Some(a.clone())]);
    t.set_coalesce(0, 100, 0).unwrap();
    let t0 = Instant::now();
    let at = |us: u64| t0 + Duration::from_micros(us);
    // Never signalled: the first fire goes at once.
    assert_eq!(t.fire_at(0, at(0)).unwrap(), Fired::Sent);
    assert_eq!(t.fire_at(0, at(10)).unwrap(), Fired::Coalesced);
    assert_eq!(t.fire_at(0, at(99)).unwrap(), Fired::Coalesced);
    assert_eq!(count(&a), 1);
    // 100 µs after the last signal: this fire carries the held ones.
    assert_eq!(t.fire_at(0, at(100)).unwrap(), Fired::Sent);
    assert_eq!(t.snapshot()[0].held, 0);
    assert_eq!(t.fire_at(0, at(150)).unwrap(), Fired::Coalesced);
    assert_eq!(count(&a), 1);
    // Idle at 160 µs: flush sends before the window ends, and restarts it.
    assert!(t.flush_at(0, at(160)).unwrap());
    assert_eq!(count(&a), 1);
    assert_eq!(t.fire_at(0, at(200)).unwrap(), Fired::Coalesced);
    assert_eq!(t.fire_at(0, at(260)).unwrap(), Fired::Sent);
    assert_eq!(count(&a), 1);
}

#[test]
fn coalescing_by_batch_or_delay_whichever_comes_first() {
    let a = efd();
    let t = table_with(1, &[Some(a.clone())]);
    t.set_coalesce(0, 1000, 3).unwrap();
    let t0 = Instant::now();
    let at = |us: u64| t0 + Duration::from_micros(us);
    assert_eq!(t.fire_at(0, at(0)).unwrap(), Fired::Sent);
    // The batch fills first.
    assert_eq!(t.fire_at(0, at(1)).unwrap(), Fired::Coalesced);
    assert_eq!(t.fire_at(0, at(2)).unwrap(), Fired::Coalesced);
    assert_eq!(t.fire_at(0, at(3)).unwrap(), Fired::Sent);
    // The delay runs out first.
    assert_eq!(t.fire_at(0, at(500)).unwrap(), Fired::Coalesced);
    assert_eq!(t.fire_at(0, at(1003)).unwrap(), Fired::Sent);
    assert_eq!(count(&a), 3);
}

#[test]
fn flush_on_a_masked_vector_leaves_the_signal_pending() {
    let a = efd();
    let t = table_with(1, &[Some(a.clone())]);
    t.set_coalesce(0, 0, 8).unwrap();
    assert_eq!(t.fire(0).unwrap(), Fired::Coalesced);
    t.mask(0).unwrap();
    assert!(!t.flush(0).unwrap());
    let info = t.snapshot()[0];
    assert!(info.pending);
    assert_eq!(info.held, 0);
    assert_eq!(count(&a), 0);
    assert!(t.unmask(0).unwrap());
    assert_eq!(count(&a), 1);
}

#[test]
fn a_manual_trigger_bypasses_coalescing_and_covers_held_fires() {
    let a = efd();
    let t = table_with(2, &[Some(a.clone())]);
    t.set_coalesce(0, 0, 8).unwrap();
    assert_eq!(t.fire(0).unwrap(), Fired::Coalesced);
    assert!(t.trigger(0).unwrap());
    assert_eq!(count(&a), 1);
    assert!(
        !t.flush(0).unwrap(),
        "the manual signal covered the held fire"
    );
    assert!(!t.trigger(1).unwrap(), "no trigger on vector 1");
    assert_eq!(t.snapshot()[0].counters.sent_injected, 1);
}

#[test]
fn counters_add_up() {
    let a = efd();
    let t = table_with(2, &[Some(a.clone())]);
    t.set_coalesce(0, 0, 3).unwrap();
    let mut fires = 0u64;
    let mut fire = |v: u16| {
        fires += 1;
        t.fire(v).unwrap()
    };
    for _ in 0..7 {
        fire(0);
    }
    t.mask(0).unwrap();
    for _ in 0..4 {
        fire(0);
    }
    fire(1);
    t.unmask(0).unwrap();
    fire(0);
    t.flush(0).unwrap();
    t.trigger(0).unwrap();
    t.set_irqs(0, 1, IrqAction::None).unwrap();
    for _ in 0..3 {
        t.note_event_idx_suppressed(0).unwrap();
    }
    let snap = t.snapshot();
    let (c0, c1) = (snap[0].counters, snap[1].counters);
    assert_eq!(c0.fires() + c1.fires(), fires);
    assert_eq!(c0.suppressed_masked, 4);
    assert_eq!(c1.dropped_no_trigger, 1);
    assert_eq!(c0.suppressed_event_idx, 3);
    assert_eq!(c0.sent_injected, 2);
    assert_eq!(count(&a), c0.signals());
    assert_eq!(snap[0].held, 0);
}

#[test]
fn concurrent_fires_from_two_threads_count_correctly() {
    const PER_THREAD: u64 = 20_000;
    let a = efd();
    let t = table_with(1, &[Some(a.clone())]);
    t.set_coalesce(0, 0, 4).unwrap();
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let h = t.handle(0).unwrap();
            std::thread::spawn(move || {
                for _ in 0..PER_THREAD {
                    h.fire();
                    h.note_event_idx_suppressed();
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    t.flush(0).unwrap();
    let info = t.snapshot()[0];
    assert_eq!(info.counters.fires(), 2 * PER_THREAD);
    assert_eq!(info.counters.suppressed_event_idx, 2 * PER_THREAD);
    assert_eq!(info.held, 0);
    assert!(info.counters.sent >= 1);
    // The first three fires can only be held (racing claims make the exact split vary).
    assert!(info.counters.suppressed_coalesced >= 3);
    assert_eq!(count(&a), info.counters.signals());
}

#[test]
fn triggers_can_be_swapped_while_a_worker_fires() {
    const FIRES: u64 = 20_000;
    let (a, b) = (efd(), efd());
    let t = table_with(1, &[Some(a.clone())]);
    let fd = t.raw_signal_fd(0);
    let h = t.handle(0).unwrap();
    let worker = std::thread::spawn(move || {
        for _ in 0..FIRES {
            assert_eq!(h.fire(), Fired::Sent);
        }
    });
    let mut n = 0u64;
    while !worker.is_finished() || n < 2 {
        let next = if n & 1 == 0 { &b } else { &a };
        t.set_irqs(0, 1, IrqAction::Eventfd(vec![Some(next.clone())]))
            .unwrap();
        n += 1;
    }
    worker.join().unwrap();
    assert_eq!(t.raw_signal_fd(0), fd);
    // Every signal landed on one of the two triggers: none was lost or misdirected.
    assert_eq!(count(&a) + count(&b), FIRES);
}

#[test]
fn a_handle_fires_like_the_table() {
    let a = efd();
    let t = table_with(3, &[None, None, Some(a.clone())]);
    let h = t.handle(2).unwrap();
    assert_eq!(h.index(), 2);
    assert!(Arc::ptr_eq(h.table(), &t));
    t.set_coalesce(2, 0, 2).unwrap();
    assert_eq!(h.fire(), Fired::Coalesced);
    assert!(h.flush());
    assert!(!h.flush());
    assert_eq!(h.fire(), Fired::Coalesced);
    assert_eq!(h.fire(), Fired::Sent);
    h.note_event_idx_suppressed();
    assert_eq!(count(&a), 2);
    let c = t.snapshot()[2].counters;
    assert_eq!((c.sent, c.sent_deferred, c.suppressed_event_idx), (1, 1, 1));
}

#[test]
fn errors_say_what_failed() {
    let e = IrqError::OutOfRange {
        start: 3,
        count: 2,
        nvec: 4,
    };
    assert_eq!(
        e.to_string(),
        "Vectors 3..3+2 are outside the table of 4 vectors"
    );
    let e = IrqError::DataLength {
        expected: 2,
        got: 1,
    };
    assert_eq!(
        e.to_string(),
        "Expected 2 data entries for the vector range, got 1"
    );
}

#[test]
fn injector_table_signals_by_index_through_mask_and_coalescing() {
    use std::sync::Mutex as StdMutex;
    let seen: Arc<StdMutex<Vec<u16>>> = Arc::new(StdMutex::new(Vec::new()));
    let log = seen.clone();
    let t = VectorTable::with_injector(
        3,
        Arc::new(move |i| log.lock().unwrap_or_else(|e| e.into_inner()).push(i)),
    );
    let taken = |s: &Arc<StdMutex<Vec<u16>>>| std::mem::take(&mut *s.lock().unwrap());
    assert_eq!(t.fire(2).unwrap(), Fired::Sent);
    assert_eq!(t.fire(0).unwrap(), Fired::Sent);
    assert_eq!(taken(&seen), vec![2, 0]);
    // Masked: held as pending, delivered once by unmask.
    t.mask(1).unwrap();
    assert_eq!(t.fire(1).unwrap(), Fired::Masked);
    assert!(taken(&seen).is_empty());
    assert!(t.unmask(1).unwrap());
    assert_eq!(taken(&seen), vec![1]);
    // Count coalescing: one injection per 2 fires.
    t.set_coalesce(2, 0, 2).unwrap();
    assert_eq!(t.fire(2).unwrap(), Fired::Coalesced);
    assert_eq!(t.fire(2).unwrap(), Fired::Sent);
    assert_eq!(taken(&seen), vec![2]);
    // No eventfd triggers on such a table, and a teardown keeps it armed.
    let efd = Arc::new(eventfd(0, EventfdFlags::CLOEXEC).unwrap());
    assert!(matches!(
        t.set_irqs(0, 1, IrqAction::Eventfd(vec![Some(efd)])),
        Err(IrqError::BadTrigger { .. })
    ));
    t.set_irqs(0, 0, IrqAction::Eventfd(Vec::new())).unwrap();
    assert_eq!(t.fire(0).unwrap(), Fired::Sent);
    assert_eq!(taken(&seen), vec![0]);
}
