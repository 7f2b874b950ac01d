//! Lifecycle, concurrency and query tests of the tracker, through the public API only.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use proptest::prelude::*;
use uvdpa_restrack::{
    DelError, EntryInfo, Owner, ResHandle, ResId, ResRef, ResState, ResType, Tracker,
};

const LONG: Duration = Duration::from_secs(30);

fn owner() -> Owner {
    Owner {
        pid: 4242,
        comm: "uvdpa".into(),
    }
}

fn counts_of(tracker: &Tracker, ty: ResType) -> usize {
    tracker.counts()[&ty]
}

#[test]
fn tracker_types_are_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<Tracker>();
    check::<ResHandle>();
    check::<ResRef>();
}

#[test]
fn created_entry_is_invisible_until_add() {
    let tracker = Tracker::new();
    let h = tracker.create(ResType::Device, "blk0", None, owner());
    assert_eq!(h.refs(), 1);
    assert!(tracker.lookup(ResType::Device, h.id().id).is_none());
    assert!(tracker.lookup_name(ResType::Device, "blk0").is_none());
    assert!(tracker.snapshot(None).is_empty());
    assert_eq!(counts_of(&tracker, ResType::Device), 0);

    h.add();
    h.add(); // idempotent
    let r = tracker
        .lookup(ResType::Device, h.id().id)
        .expect("visible after add");
    assert_eq!(r.id(), h.id());
    assert_eq!(r.name(), "blk0");
    drop(r);
    let rows = tracker.snapshot(None);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].state, ResState::Active);
    assert_eq!(rows[0].refs, 1, "only the creator's reference");
    assert_eq!(counts_of(&tracker, ResType::Device), 1);
    assert_eq!(h.del(Duration::ZERO), Ok(()));
    assert!(tracker.snapshot(None).is_empty());
}

#[test]
fn counts_list_every_type() {
    let tracker = Tracker::new();
    let counts = tracker.counts();
    assert_eq!(counts.keys().copied().collect::<Vec<_>>(), ResType::ALL);
    assert!(counts.values().all(|&n| n == 0));
}

#[test]
fn del_without_other_refs_returns_at_once() {
    let tracker = Tracker::new();
    let h = tracker.create(ResType::Session, "s0", None, owner());
    h.add();
    let id = h.id();
    assert_eq!(h.del(Duration::ZERO), Ok(()));
    assert!(tracker.lookup(id.ty, id.id).is_none());
    assert_eq!(counts_of(&tracker, ResType::Session), 0);
}

#[test]
fn del_hides_entry_at_once_and_keeps_it_deleting_until_last_put() {
    let tracker = Tracker::new();
    let h = tracker.create(ResType::Device, "blk0", None, owner());
    h.add();
    let id = h.id();
    let held = h.get("request 17");

    let err = h.del(Duration::ZERO).unwrap_err();
    assert!(
        matches!(err, DelError::StillHeld { refs: 1, .. }),
        "{err:?}"
    );
    assert!(
        tracker.lookup(id.ty, id.id).is_none(),
        "no lookup after del"
    );
    assert!(tracker.lookup_name(id.ty, "blk0").is_none());
    let rows = tracker.snapshot(None);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].state, ResState::Deleting);
    assert_eq!(rows[0].refs, 1);
    assert_eq!(rows[0].holders, ["request 17"]);
    assert_eq!(
        counts_of(&tracker, ResType::Device),
        1,
        "deleting entries count"
    );

    // A held reference may still take more while the entry is deleting.
    let more = held.get_unlabeled();
    drop(held);
    assert_eq!(tracker.snapshot(None)[0].refs, 1);
    drop(more);
    assert!(tracker.snapshot(None).is_empty());
    assert_eq!(counts_of(&tracker, ResType::Device), 0);
}

#[test]
fn del_waits_for_the_last_reference() {
    let tracker = Tracker::new();
    let h = tracker.create(ResType::Device, "blk0", None, owner());
    h.add();
    let r = h.get("worker blk0-q0");
    let dropped = Arc::new(AtomicBool::new(false));
    let dropper = {
        let dropped = Arc::clone(&dropped);
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            dropped.store(true, Ordering::SeqCst);
            drop(r);
        })
    };
    assert_eq!(h.del(LONG), Ok(()));
    assert!(
        dropped.load(Ordering::SeqCst),
        "del returned before the last reference was dropped"
    );
    assert!(tracker.snapshot(None).is_empty(), "gone once del returns");
    dropper.join().unwrap();
}

#[test]
fn del_timeout_names_the_holders() {
    let tracker = Tracker::new();
    let h = tracker.create(ResType::Device, "blk0", None, owner());
    h.add();
    let id = h.id();
    let labeled = h.get("worker blk0-q0");
    let unlabeled = h.get_unlabeled();
    let err = h.del(Duration::from_millis(20)).unwrap_err();
    assert_eq!(
        err,
        DelError::StillHeld {
            ty: ResType::Device,
            id: id.id,
            name: "blk0".into(),
            refs: 2,
            holders: vec!["worker blk0-q0".into()],
        }
    );
    assert_eq!(
        err.to_string(),
        format!(
            "Timed out deleting dev/{} (blk0): 2 references still held by worker blk0-q0 \
             and 1 unlabeled holder(s)",
            id.id
        )
    );
    drop(labeled);
    drop(unlabeled);
    assert_eq!(counts_of(&tracker, ResType::Device), 0);
}

#[test]
fn holder_labels_follow_their_references() {
    let tracker = Tracker::new();
    let h = tracker.create(ResType::Virtqueue, "blk0-q0", None, owner());
    h.add();
    let a = h.get("request 1");
    let b = h.get("request 2");
    let c = a.get("request 3");
    let holders = |t: &Tracker| t.snapshot(None)[0].holders.clone();
    assert_eq!(holders(&tracker), ["request 1", "request 2", "request 3"]);
    drop(b);
    assert_eq!(holders(&tracker), ["request 1", "request 3"]);
    drop(a);
    assert_eq!(holders(&tracker), ["request 3"]);
    assert_eq!(tracker.snapshot(None)[0].refs, 2);
    drop(c);
    assert!(holders(&tracker).is_empty());
    assert_eq!(h.del(Duration::ZERO), Ok(()));
}

#[test]
fn dropping_a_handle_releases_the_entry() {
    let tracker = Tracker::new();
    let h = tracker.create(ResType::Worker, "w0", None, owner());
    h.add();
    drop(h);
    assert!(tracker.snapshot(None).is_empty());

    let h = tracker.create(ResType::Worker, "w1", None, owner());
    h.add();
    let id = h.id();
    let r = h.get("epoll loop");
    drop(h);
    assert!(tracker.lookup(id.ty, id.id).is_none());
    assert_eq!(tracker.snapshot(None)[0].state, ResState::Deleting);
    drop(r);
    assert!(tracker.snapshot(None).is_empty());
}

#[test]
fn never_added_entry_is_never_shown() {
    let tracker = Tracker::new();
    let h = tracker.create(ResType::MemRegion, "mr0", None, owner());
    let r = h.get("mapping");
    assert!(h.del(Duration::ZERO).is_err());
    assert!(tracker.snapshot(None).is_empty());
    assert_eq!(counts_of(&tracker, ResType::MemRegion), 0);
    drop(r);
    // Ids are still not reused.
    let h2 = tracker.create(ResType::MemRegion, "mr1", None, owner());
    assert_eq!(h2.id().id, 1);
}

#[test]
fn handles_outliving_the_tracker_do_not_panic() {
    let tracker = Tracker::new();
    let h = tracker.create(ResType::IpcClient, "cli", None, owner());
    h.add();
    let r = h.get("request 1");
    drop(tracker);
    let late = tracker_less_add();
    drop(r);
    assert_eq!(h.del(Duration::ZERO), Ok(()));
    drop(late);

    fn tracker_less_add() -> ResHandle {
        let t = Tracker::new();
        let h = t.create(ResType::IpcClient, "orphan", None, owner());
        drop(t);
        h.add();
        h
    }
}

#[test]
fn ids_are_unique_per_type_and_not_reused() {
    let tracker = Tracker::new();
    let d0 = tracker.create(ResType::Device, "a", None, owner());
    let d1 = tracker.create(ResType::Device, "b", None, owner());
    let q0 = tracker.create(ResType::Virtqueue, "a-q0", Some(d0.id()), owner());
    assert_eq!(d0.id().to_string(), "dev/0");
    assert_eq!(d1.id().to_string(), "dev/1");
    assert_eq!(q0.id().to_string(), "vq/0");
    assert_eq!(q0.parent(), Some(d0.id()));
    assert_eq!(d0.del(Duration::ZERO), Ok(()));
    let d2 = tracker.create(ResType::Device, "c", None, owner());
    assert_eq!(d2.id().to_string(), "dev/2");
}

#[test]
fn lookup_name_finds_the_lowest_active_id() {
    let tracker = Tracker::new();
    let a = tracker.create(ResType::Virtqueue, "q0", None, owner());
    let b = tracker.create(ResType::Virtqueue, "q0", None, owner());
    let c = tracker.create(ResType::Virtqueue, "q1", None, owner());
    b.add();
    c.add();
    let found = tracker
        .lookup_name(ResType::Virtqueue, "q0")
        .map(|r| r.id());
    assert_eq!(found, Some(b.id()), "a is not added");
    a.add();
    let found = tracker
        .lookup_name(ResType::Virtqueue, "q0")
        .map(|r| r.id());
    assert_eq!(found, Some(a.id()));
    assert!(tracker.lookup_name(ResType::Device, "q0").is_none());
    assert_eq!(a.del(Duration::ZERO), Ok(()));
    let found = tracker
        .lookup_name(ResType::Virtqueue, "q0")
        .map(|r| r.id());
    assert_eq!(found, Some(b.id()));
}

#[test]
fn counts_return_to_baseline_after_concurrent_cycles() {
    let tracker = Tracker::new();
    let keep = tracker.create(ResType::Device, "keep", None, owner());
    keep.add();
    let baseline = tracker.counts();

    let workers: Vec<_> = (0..2)
        .map(|t| {
            let tracker = tracker.clone();
            let parent = keep.id();
            thread::spawn(move || {
                let mut ids = Vec::with_capacity(500);
                for i in 0..500 {
                    let ty = ResType::ALL[i % ResType::ALL.len()];
                    let h = tracker.create(ty, format!("t{t}-{i}"), Some(parent), owner());
                    h.add();
                    let labeled = h.get("cycle");
                    let looked = tracker.lookup(ty, h.id().id).expect("added entry is found");
                    let fast = looked.get_unlabeled();
                    drop(looked);
                    drop(labeled);
                    drop(fast);
                    ids.push(h.id());
                    h.del(LONG).expect("no reference left");
                }
                ids
            })
        })
        .collect();
    let mut seen = HashSet::new();
    for w in workers {
        for id in w.join().unwrap() {
            assert!(seen.insert(id), "{id} allocated twice");
        }
    }
    assert_eq!(seen.len(), 1000);
    assert_eq!(tracker.counts(), baseline);
    assert_eq!(tracker.snapshot(None).len(), 1);
}

#[test]
fn snapshot_is_sorted_and_filtered() {
    let tracker = Tracker::new();
    let mut handles = Vec::new();
    for (ty, name) in [
        (ResType::Virtqueue, "blk0-q0"),
        (ResType::Device, "blk0"),
        (ResType::Virtqueue, "blk0-q1"),
        (ResType::Vector, "blk0-v0"),
        (ResType::Device, "net0"),
    ] {
        let h = tracker.create(ty, name, None, owner());
        h.add();
        handles.push(h);
    }
    let all: Vec<String> = tracker
        .snapshot(None)
        .iter()
        .map(|e| format!("{} {}", e.res_id(), e.name))
        .collect();
    assert_eq!(
        all,
        [
            "dev/0 blk0",
            "dev/1 net0",
            "vq/0 blk0-q0",
            "vq/1 blk0-q1",
            "irq/0 blk0-v0"
        ]
    );
    let vqs = tracker.snapshot(Some(ResType::Virtqueue));
    assert_eq!(vqs.len(), 2);
    assert!(vqs.iter().all(|e| e.ty == ResType::Virtqueue));
    assert!(tracker.snapshot(Some(ResType::Worker)).is_empty());
    let counts = tracker.counts();
    assert_eq!(counts[&ResType::Device], 2);
    assert_eq!(counts[&ResType::Virtqueue], 2);
    assert_eq!(counts[&ResType::Vector], 1);
}

#[test]
fn snapshot_records_owner_parent_and_time() {
    let tracker = Tracker::new();
    let dev = tracker.create(ResType::Device, "blk0", None, Owner::current());
    let vq = tracker.create(ResType::Virtqueue, "blk0-q0", Some(dev.id()), owner());
    dev.add();
    vq.add();
    let rows = tracker.snapshot(None);
    assert_eq!(rows[0].owner_pid, std::process::id());
    assert_eq!(rows[1].owner_pid, 4242);
    assert_eq!(rows[1].owner_comm, "uvdpa");
    assert_eq!(rows[1].parent, Some(dev.id()));
    // 2020-01-01 in ms: the clock is read, not left at 0.
    assert!(rows[0].created_unix_ms > 1_577_836_800_000);
}

#[test]
fn entry_info_golden_json() {
    let info = EntryInfo {
        ty: ResType::Virtqueue,
        id: 3,
        name: "blk0-q1".into(),
        parent: Some(ResId {
            ty: ResType::Device,
            id: 0,
        }),
        owner_pid: 4242,
        owner_comm: "uvdpa".into(),
        created_unix_ms: 1_700_000_000_123,
        refs: 2,
        state: ResState::Deleting,
        holders: vec!["worker blk0-q1".into()],
    };
    let golden = r#"{"type":"vq","id":3,"name":"blk0-q1","parent":"dev/0","owner_pid":4242,"owner_comm":"uvdpa","created_unix_ms":1700000000123,"refs":2,"state":"deleting","holders":["worker blk0-q1"]}"#;
    assert_eq!(serde_json::to_string(&info).unwrap(), golden);
    let back: EntryInfo = serde_json::from_str(golden).unwrap();
    assert_eq!(back, info);

    let root = EntryInfo {
        parent: None,
        state: ResState::Active,
        ..info
    };
    let json = serde_json::to_string(&root).unwrap();
    assert!(json.contains(r#""parent":null"#), "{json}");
    assert!(json.contains(r#""state":"active""#), "{json}");
    assert!(serde_json::from_str::<EntryInfo>(&json.replace("\"vq\"", "\"nic\"")).is_err());
}

#[test]
fn snapshot_json_round_trip() {
    let tracker = Tracker::new();
    let h = tracker.create(ResType::IpcClient, "uvdpa", None, Owner::current());
    h.add();
    let _r = h.get("request 9");
    let rows = tracker.snapshot(None);
    let json = serde_json::to_string(&rows).unwrap();
    let back: Vec<EntryInfo> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, rows);
}

#[test]
fn owner_current_is_this_process() {
    let me = Owner::current();
    assert_eq!(me.pid, std::process::id());
    assert!(!me.comm.is_empty());
    assert_ne!(me.comm, "?", "/proc/self/comm is readable on Linux");
    assert_eq!(Owner::of_pid(me.pid), me);
}

/// One step of the model-based test.
#[derive(Debug, Clone)]
enum Op {
    Create(usize),
    Add(usize),
    Get(usize, bool),
    Put(usize),
    Del(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..7usize).prop_map(Op::Create),
        (0..8usize).prop_map(Op::Add),
        (0..8usize, any::<bool>()).prop_map(|(i, l)| Op::Get(i, l)),
        (0..8usize).prop_map(Op::Put),
        (0..8usize).prop_map(Op::Del),
    ]
}

/// Model of one entry: handle (None once deleted), held references, added flag.
struct Model {
    id: ResId,
    handle: Option<ResHandle>,
    refs: Vec<ResRef>,
    added: bool,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any sequence of create/add/get/put/del keeps counts, lookups and snapshots in line
    /// with a simple model, and everything is gone once all references are dropped.
    #[test]
    fn model_matches(ops in proptest::collection::vec(op(), 1..60)) {
        let tracker = Tracker::new();
        let mut entries: Vec<Model> = Vec::new();
        for op in ops {
            match op {
                Op::Create(t) => {
                    let h = tracker.create(ResType::ALL[t], "x", None, owner());
                    entries.push(Model { id: h.id(), handle: Some(h), refs: Vec::new(), added: false });
                }
                Op::Add(i) => if let Some(m) = entries.get_mut(i) {
                    if let Some(h) = &m.handle { h.add(); m.added = true; }
                },
                Op::Get(i, labeled) => if let Some(m) = entries.get_mut(i) {
                    let r = match (&m.handle, m.refs.first()) {
                        (Some(h), _) if labeled => Some(h.get("p")),
                        (Some(h), _) => Some(h.get_unlabeled()),
                        (None, Some(r)) => Some(r.get("p")),
                        (None, None) => None,
                    };
                    m.refs.extend(r);
                },
                Op::Put(i) => if let Some(m) = entries.get_mut(i) { m.refs.pop(); },
                Op::Del(i) => if let Some(m) = entries.get_mut(i) {
                    if let Some(h) = m.handle.take() {
                        let res = h.del(Duration::ZERO);
                        prop_assert_eq!(res.is_ok(), m.refs.is_empty());
                    }
                },
            }
            let mut want: BTreeMap<ResType, usize> = ResType::ALL.iter().map(|&t| (t, 0)).collect();
            for m in &entries {
                let alive = m.handle.is_some() || !m.refs.is_empty();
                if m.added && alive {
                    *want.entry(m.id.ty).or_default() += 1;
                }
                let found = tracker.lookup(m.id.ty, m.id.id).is_some();
                prop_assert_eq!(found, m.added && m.handle.is_some());
            }
            prop_assert_eq!(tracker.counts(), want);
            for row in tracker.snapshot(None) {
                let m = entries.iter().find(|m| m.id == row.res_id()).unwrap();
                let creator = usize::from(m.handle.is_some());
                prop_assert_eq!(row.refs, m.refs.len() + creator);
            }
        }
        drop(entries);
        prop_assert!(tracker.snapshot(None).is_empty());
    }
}
