//! `uvdpa monitor`: a `top`-like view of every device's per-queue rates.
//!
//! The monitor is an IPC secondary like the rest of the CLI. It lists the devices
//! (`dev.show`), maps each device's counters table from the memfd `dev.vstats.show` hands
//! over (the path `dev vstats show -w` uses), and every interval reads the counters straight
//! from shared memory: a rate is the difference of two successive samples divided by the
//! time measured between them. The device list is asked for again each interval, so
//! devices added or deleted while it runs appear or go (a new device's rates show from
//! its second sample), and a net device whose negotiated features changed has its queue
//! roles (`rx`, `tx`, `cq`) read again.
//!
//! Units: requests/s and frames/s per second, MB/s in 10^6 bytes per second. A blk queue's
//! `read` is data the device returned to the driver (IN), `written` data it took from the
//! driver (OUT); the 16-byte request header and the status byte of every request are not
//! counted. A net queue's MB/s counts its frames' bytes (Ethernet header and payload).
//! `errors` is the queue's total (errors stop a queue: a count, not a rate).

use std::collections::btree_map::{BTreeMap, Entry};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use uvdpa_ipc::Secondary;
use uvdpa_virtio::stats::{QueueStats, StatsTable};

use crate::client::{print_json, table, Output, REQUEST_TIMEOUT};
use crate::registry::vstats_view;

/// `uvdpa monitor` arguments.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MonitorArgs {
    /// Seconds between two samples (> 0).
    pub interval: Duration,
    /// Blocks to print before exiting; `None`: until interrupted.
    pub iterations: Option<u64>,
}

/// Bytes of one blk request header (virtio 1.2 §5.2.6): counted in `bytes_read`.
const BLK_HEADER: u64 = 16;

/// The counters of one queue at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Sample {
    requests: u64,
    bytes_read: u64,
    bytes_written: u64,
    kicks: u64,
    calls: u64,
    errors: u64,
    drops: u64,
}

impl Sample {
    fn of(q: &QueueStats) -> Self {
        let v = vstats_view("", 0, q);
        Self {
            requests: v.requests,
            bytes_read: v.bytes_read,
            bytes_written: v.bytes_written,
            kicks: v.kicks,
            calls: v.calls,
            errors: v.errors,
            drops: q.drops.load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

/// What a queue is, for which columns apply.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// A virtio-blk request queue.
    Blk,
    /// A virtio-net queue: `rx`, `tx`, `cq` or `unused` (as `dev vstats show`).
    Net(String),
}

/// One queue's rates over one interval.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueRates {
    /// Device.
    pub name: String,
    /// Virtqueue index.
    pub qidx: usize,
    /// `blk`, or the net queue's role (`rx`, `tx`, `cq`, `unused`).
    pub kind: String,
    /// Completed requests (blk) or frames (net) per second.
    pub per_sec: f64,
    /// blk: data returned to the driver (IN), in 10^6 bytes per second.
    pub read_mb_per_sec: f64,
    /// blk: data taken from the driver (OUT), in 10^6 bytes per second; net: the frames'
    /// bytes.
    pub written_mb_per_sec: f64,
    /// net: frames dropped per second.
    pub drops_per_sec: f64,
    /// Kicks received per second.
    pub kicks_per_sec: f64,
    /// Calls (interrupts) sent per second.
    pub calls_per_sec: f64,
    /// Errors that stopped the queue, in total.
    pub errors: u64,
}

/// The rates of a queue of `kind` between samples `a` and `b` taken `dt` seconds apart.
fn rates(name: &str, qidx: usize, kind: &Kind, a: &Sample, b: &Sample, dt: f64) -> QueueRates {
    let d = |x: u64, y: u64| y.saturating_sub(x) as f64 / dt;
    let reqs = b.requests.saturating_sub(a.requests);
    let (kind, read, written) = match kind {
        Kind::Blk => {
            // Every request has a 16-byte header (readable) and a status byte (writable).
            let rd = b
                .bytes_written
                .saturating_sub(a.bytes_written)
                .saturating_sub(reqs);
            let wr = b
                .bytes_read
                .saturating_sub(a.bytes_read)
                .saturating_sub(reqs.saturating_mul(BLK_HEADER));
            ("blk".to_string(), rd as f64 / dt, wr as f64 / dt)
        }
        Kind::Net(role) => {
            let bytes = if role == "rx" {
                d(a.bytes_written, b.bytes_written)
            } else {
                d(a.bytes_read, b.bytes_read)
            };
            (role.clone(), 0.0, bytes)
        }
    };
    QueueRates {
        name: name.to_string(),
        qidx,
        kind,
        per_sec: reqs as f64 / dt,
        read_mb_per_sec: read / 1e6,
        written_mb_per_sec: written / 1e6,
        drops_per_sec: d(a.drops, b.drops),
        kicks_per_sec: d(a.kicks, b.kicks),
        calls_per_sec: d(a.calls, b.calls),
        errors: b.errors,
    }
}

/// A device being watched: its counters table and what each queue is.
struct Watched {
    table: StatsTable,
    kinds: Vec<Kind>,
    prev: Vec<Sample>,
    /// The negotiated features the kinds were read with (a net queue's role depends on
    /// VIRTIO_NET_F_MQ): when `dev show` reports others, the kinds are read again.
    features: Value,
}

impl Watched {
    fn sample(&self) -> Vec<Sample> {
        (0..self.table.queues())
            .filter_map(|i| self.table.queue(i).map(Sample::of))
            .collect()
    }
}

fn ask(sec: &Secondary, action: &str, payload: Value) -> Result<uvdpa_ipc::Reply, String> {
    sec.request_sync(action, &payload, &[], REQUEST_TIMEOUT)
        .map_err(|e| match e {
            uvdpa_ipc::IpcError::Remote { message, .. } => message,
            other => other.to_string(),
        })
}

/// Maps device `d`'s counters (from `dev show`); `None` when it went away meanwhile.
fn watch_device(sec: &Secondary, d: &Value) -> Result<Option<Watched>, String> {
    let name = d["name"].as_str().unwrap_or_default();
    let net = d["mgmtdev"] == json!("net");
    let reply = match ask(sec, "dev.vstats.show", json!({ "name": name, "qidx": 0 })) {
        Ok(r) => r,
        // Deleted between `dev.show` and now.
        Err(_) => return Ok(None),
    };
    let queues = reply.payload["queues"].as_u64().unwrap_or(0) as usize;
    let Some(fd) = reply.fds.into_iter().next() else {
        return Err(format!("The daemon sent no counters fd for {name}"));
    };
    let table = StatsTable::open(fd, queues)
        .map_err(|e| format!("Cannot map the counters of {name}: {e}"))?;
    let Some(kinds) = kinds(sec, name, net, queues) else {
        return Ok(None);
    };
    let w = Watched {
        prev: Vec::new(),
        table,
        kinds,
        features: d["features"].clone(),
    };
    Ok(Some(Watched {
        prev: w.sample(),
        ..w
    }))
}

/// What each of the `queues` queues of device `name` is; `None` when the device went
/// away meanwhile.
fn kinds(sec: &Secondary, name: &str, net: bool, queues: usize) -> Option<Vec<Kind>> {
    if !net {
        return Some(vec![Kind::Blk; queues]);
    }
    (0..queues)
        .map(|q| {
            let r = ask(sec, "dev.vstats.show", json!({ "name": name, "qidx": q })).ok()?;
            let role = r.payload["vstats"]["queue_type"]
                .as_str()
                .unwrap_or("unused");
            Some(Kind::Net(role.to_string()))
        })
        .collect()
}

/// Runs `uvdpa monitor` against the daemon at `ctl`: prints one block of rates per
/// interval, after clearing the screen when standard output is a terminal.
///
/// # Errors
/// A message for stderr: the daemon cannot be reached or fails a request, a counters
/// table cannot be mapped, or the output cannot be written.
pub fn run(ctl: &Path, a: &MonitorArgs, o: Output) -> Result<(), String> {
    let sec = Secondary::connect(ctl)
        .map_err(|e| format!("Cannot reach the daemon at {}: {e}", ctl.display()))?;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut devices: BTreeMap<String, Watched> = BTreeMap::new();
    let mut last = Instant::now();
    let mut n = 0u64;
    let io = |e: std::io::Error| format!("Cannot write output: {e}");
    loop {
        // Devices are (re)listed first, so the first block already has rates.
        let list = ask(&sec, "dev.show", json!({ "name": null }))?;
        let listed: Vec<Value> = list.payload["dev"].as_array().cloned().unwrap_or_default();
        devices.retain(|name, _| listed.iter().any(|d| d["name"] == json!(name)));
        for d in &listed {
            let name = d["name"].as_str().unwrap_or_default().to_string();
            match devices.entry(name) {
                Entry::Vacant(slot) => {
                    if let Some(w) = watch_device(&sec, d)? {
                        slot.insert(w);
                    }
                }
                Entry::Occupied(mut w) if w.get().features != d["features"] => {
                    let net = d["mgmtdev"] == json!("net");
                    let queues = w.get().table.queues();
                    if let Some(k) = kinds(&sec, w.key(), net, queues) {
                        let w = w.get_mut();
                        (w.kinds, w.features) = (k, d["features"].clone());
                    }
                }
                Entry::Occupied(_) => {}
            }
        }
        if a.iterations.is_some_and(|c| n >= c) {
            return Ok(());
        }
        std::thread::sleep(a.interval.saturating_sub(last.elapsed()));
        let now = Instant::now();
        let dt = now.duration_since(last).as_secs_f64().max(1e-3);
        last = now;
        let mut rows = Vec::new();
        for (name, w) in devices.iter_mut() {
            let cur = w.sample();
            for (i, (b, kind)) in cur.iter().zip(&w.kinds).enumerate() {
                let a = w.prev.get(i).copied().unwrap_or(*b);
                rows.push(rates(name, i, kind, &a, b, dt));
            }
            w.prev = cur;
        }
        n += 1;
        let mut out = std::io::stdout().lock();
        if o.json {
            print_json(&mut out, &block_json(n, dt, &rows), o).map_err(io)?;
        } else {
            if tty {
                // Home and clear, then redraw: a plain ANSI clear, no curses.
                write!(out, "\x1b[H\x1b[2J").map_err(io)?;
            }
            render(&mut out, n, dt, &rows).map_err(io)?;
        }
        out.flush().map_err(io)?;
    }
}

fn block_json(n: u64, dt: f64, rows: &[QueueRates]) -> Value {
    let queues: Vec<Value> = rows
        .iter()
        .map(|r| {
            let mut v = json!({
                "name": r.name,
                "qidx": r.qidx,
                "type": r.kind,
                "kicks_per_sec": r.kicks_per_sec,
                "calls_per_sec": r.calls_per_sec,
                "errors": r.errors,
            });
            if r.kind == "blk" {
                v["requests_per_sec"] = json!(r.per_sec);
                v["read_mb_per_sec"] = json!(r.read_mb_per_sec);
                v["written_mb_per_sec"] = json!(r.written_mb_per_sec);
            } else {
                v["frames_per_sec"] = json!(r.per_sec);
                v["mb_per_sec"] = json!(r.written_mb_per_sec);
                v["drops_per_sec"] = json!(r.drops_per_sec);
            }
            v
        })
        .collect();
    json!({ "sample": n, "interval_s": dt, "queues": queues })
}

/// One block of text: a header line, then a table with one row per queue.
fn render(out: &mut impl Write, n: u64, dt: f64, rows: &[QueueRates]) -> std::io::Result<()> {
    writeln!(
        out,
        "uvdpa monitor: sample {n}, interval {dt:.3} s, {} queues",
        rows.len()
    )?;
    let mut t = vec![[
        "DEVICE",
        "QIDX",
        "TYPE",
        "REQ/s",
        "READ_MB/s",
        "WRITE_MB/s",
        "FRAMES/s",
        "NET_MB/s",
        "DROPS/s",
        "KICKS/s",
        "CALLS/s",
        "ERRORS",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect::<Vec<_>>()];
    let dash = || "-".to_string();
    for r in rows {
        let blk = r.kind == "blk";
        let num = |x: f64| format!("{x:.0}");
        let mb = |x: f64| format!("{x:.2}");
        t.push(vec![
            r.name.clone(),
            r.qidx.to_string(),
            r.kind.clone(),
            if blk { num(r.per_sec) } else { dash() },
            if blk { mb(r.read_mb_per_sec) } else { dash() },
            if blk {
                mb(r.written_mb_per_sec)
            } else {
                dash()
            },
            if blk { dash() } else { num(r.per_sec) },
            if blk {
                dash()
            } else {
                mb(r.written_mb_per_sec)
            },
            if blk { dash() } else { num(r.drops_per_sec) },
            num(r.kicks_per_sec),
            num(r.calls_per_sec),
            r.errors.to_string(),
        ]);
    }
    table(out, &t)?;
    writeln!(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blk_rates_leave_out_headers_and_status_bytes() {
        let a = Sample::default();
        // 100 writes of 4096 bytes and 50 reads of 8192 bytes over 2 s.
        let b = Sample {
            requests: 150,
            bytes_read: 150 * 16 + 100 * 4096,
            bytes_written: 150 + 50 * 8192,
            kicks: 20,
            calls: 10,
            errors: 1,
            drops: 0,
        };
        let r = rates("d", 0, &Kind::Blk, &a, &b, 2.0);
        assert_eq!(r.per_sec, 75.0);
        assert_eq!(r.written_mb_per_sec, 100.0 * 4096.0 / 2.0 / 1e6);
        assert_eq!(r.read_mb_per_sec, 50.0 * 8192.0 / 2.0 / 1e6);
        assert_eq!((r.kicks_per_sec, r.calls_per_sec, r.errors), (10.0, 5.0, 1));
    }

    #[test]
    fn net_rates_use_the_queue_direction() {
        let a = Sample::default();
        let b = Sample {
            requests: 10,
            bytes_read: 640,
            bytes_written: 1280,
            drops: 4,
            ..Sample::default()
        };
        let rx = rates("n", 0, &Kind::Net("rx".into()), &a, &b, 1.0);
        let tx = rates("n", 1, &Kind::Net("tx".into()), &a, &b, 1.0);
        assert_eq!((rx.per_sec, rx.written_mb_per_sec), (10.0, 1280.0 / 1e6));
        assert_eq!(tx.written_mb_per_sec, 640.0 / 1e6);
        assert_eq!(rx.drops_per_sec, 4.0);
        // Counters that went backwards (a table replaced) give 0, not a huge rate.
        let back = rates("n", 0, &Kind::Blk, &b, &a, 1.0);
        assert_eq!((back.per_sec, back.written_mb_per_sec), (0.0, 0.0));
    }

    #[test]
    fn text_block_has_a_header_and_one_row_per_queue() {
        let rows = vec![
            rates(
                "b0",
                0,
                &Kind::Blk,
                &Sample::default(),
                &Sample {
                    requests: 2,
                    bytes_read: 2 * 16 + 2 * 4096,
                    bytes_written: 2,
                    ..Sample::default()
                },
                1.0,
            ),
            rates(
                "n0",
                1,
                &Kind::Net("tx".into()),
                &Sample::default(),
                &Sample::default(),
                1.0,
            ),
        ];
        let mut out = Vec::new();
        render(&mut out, 1, 1.0, &rows).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("uvdpa monitor: sample 1, interval 1.000 s"));
        assert!(lines[1].starts_with("DEVICE"));
        let b0: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(b0[..6], ["b0", "0", "blk", "2", "0.00", "0.01"]);
        let n0: Vec<&str> = lines[3].split_whitespace().collect();
        assert_eq!(n0[..9], ["n0", "1", "tx", "-", "-", "-", "0", "0.00", "0"]);
        let j = block_json(1, 1.0, &rows);
        assert_eq!(j["queues"][0]["requests_per_sec"], json!(2.0));
        assert_eq!(j["queues"][1]["frames_per_sec"], json!(0.0));
    }
}
