//! The CLI side (a secondary): sends one action to the daemon and prints the reply as
//! aligned text, or as JSON with `-j` (`-p` pretty). The JSON is the reply payload itself,
//! whose schema the daemon's views define (see `ctl.rs`).

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use uvdpa_ipc::Secondary;
use uvdpa_virtio::stats::StatsTable;

use crate::cli::Cmd;
use crate::registry::vstats_view;

/// How long the CLI waits for the daemon's reply.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Output options.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    /// JSON instead of text.
    pub json: bool,
    /// Pretty JSON.
    pub pretty: bool,
}

fn request(ctl: &Path, action: &str, payload: Value) -> Result<(Value, Vec<OwnedFd>), String> {
    let sec = Secondary::connect(ctl)
        .map_err(|e| format!("Cannot reach the daemon at {}: {e}", ctl.display()))?;
    let reply = sec
        .request_sync(action, &payload, &[], REQUEST_TIMEOUT)
        .map_err(|e| match e {
            uvdpa_ipc::IpcError::Remote { message, .. } => message,
            other => other.to_string(),
        })?;
    Ok((reply.payload, reply.fds))
}

fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(x)) => x.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(Value::Array(a)) if a.is_empty() => "-".into(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map_or_else(|| x.to_string(), String::from))
            .collect::<Vec<_>>()
            .join(" "),
        Some(x) => x.to_string(),
    }
}

pub(crate) fn print_json(out: &mut impl Write, v: &Value, o: Output) -> std::io::Result<()> {
    let text = if o.pretty {
        serde_json::to_string_pretty(v)
    } else {
        serde_json::to_string(v)
    }
    .unwrap_or_default();
    writeln!(out, "{text}")
}

/// Aligned columns: each row's cells padded to the widest in their column.
pub(crate) fn table(out: &mut impl Write, rows: &[Vec<String>]) -> std::io::Result<()> {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(String::len)
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, cell)| format!("{cell:<w$}", w = widths.get(i).copied().unwrap_or(0)))
            .collect();
        writeln!(out, "{}", line.join("  ").trim_end())?;
    }
    Ok(())
}

/// Formats a reply as text.
pub fn render_text(out: &mut impl Write, cmd: &Cmd, v: &Value) -> std::io::Result<()> {
    match cmd {
        Cmd::MgmtdevShow => {
            for m in v["mgmtdev"].as_array().into_iter().flatten() {
                writeln!(
                    out,
                    "{}: device_id {} transports {}",
                    s(m, "name"),
                    s(m, "device_id"),
                    s(m, "transports")
                )?;
                let rows: Vec<Vec<String>> = m["attributes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| {
                        vec![
                            format!("  {}", s(a, "name")),
                            s(a, "range"),
                            format!("default {}", s(a, "default")),
                        ]
                    })
                    .collect();
                table(out, &rows)?;
            }
        }
        Cmd::DevAdd(_) => render_dev(out, &v["dev"])?,
        Cmd::DevShow(_) => {
            for d in v["dev"].as_array().into_iter().flatten() {
                render_dev(out, d)?;
            }
        }
        Cmd::DevDel(_) | Cmd::DevSetCoalesce { .. } | Cmd::DevCapture(_) => {}
        Cmd::DevSetCapacity { .. } => {
            let d = &v["dev"];
            let bytes = d["capacity"].as_u64().unwrap_or(0);
            writeln!(
                out,
                "{}: capacity {bytes} ({} sectors), {}",
                s(d, "name"),
                bytes / 512,
                if v["notified"] == json!(true) {
                    "driver notified"
                } else {
                    "driver not notified (no frontend, or no backend channel)"
                }
            )?;
        }
        Cmd::DevIrqTrigger { .. } => {
            writeln!(
                out,
                "{} vec {}: {}",
                s(v, "name"),
                s(v, "vec"),
                if v["sent"] == json!(true) {
                    "signalled"
                } else {
                    "not signalled (no trigger or masked)"
                }
            )?;
        }
        Cmd::DevIrqShow(_) => {
            let cols = [
                "vec",
                "trigger",
                "masked",
                "pending",
                "coalesce_usecs",
                "coalesce_frames",
                "signals",
                "suppressed_event_idx",
                "suppressed_coalesced",
                "suppressed_masked",
            ];
            let mut rows = vec![cols.iter().map(|c| c.to_string()).collect::<Vec<_>>()];
            for x in v["vectors"].as_array().into_iter().flatten() {
                rows.push(cols.iter().map(|k| s(x, k)).collect());
            }
            table(out, &rows)?;
        }
        Cmd::DevConfigShow(_) => {
            let c = &v["config"];
            writeln!(out, "{}:", s(c, "name"))?;
            let rows: Vec<Vec<String>> = c
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| *k != "name")
                .map(|(k, _)| vec![format!("  {k}"), s(c, k)])
                .collect();
            table(out, &rows)?;
        }
        Cmd::DevVstatsShow { .. } => {
            let q = &v["vstats"];
            let keys: &[&str] = if q.get("queue_type").is_some() {
                writeln!(
                    out,
                    "{} qidx {} {}:",
                    s(q, "name"),
                    s(q, "qidx"),
                    s(q, "queue_type")
                )?;
                &["packets", "bytes", "drops", "kicks", "calls", "errors"]
            } else {
                writeln!(out, "{} qidx {}:", s(q, "name"), s(q, "qidx"))?;
                &[
                    "requests",
                    "bytes_read",
                    "bytes_written",
                    "kicks",
                    "calls",
                    "calls_suppressed",
                    "errors",
                ]
            };
            let rows: Vec<Vec<String>> = keys
                .iter()
                .map(|k| vec![format!("  {k}"), s(q, k)])
                .collect();
            table(out, &rows)?;
        }
        Cmd::ResShow(None) => {
            let rows: Vec<Vec<String>> = v["counts"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, n)| vec![k.clone(), n.to_string()])
                .collect();
            table(out, &rows)?;
        }
        Cmd::ResShow(Some(_)) => {
            let mut rows = vec![[
                "type", "id", "name", "parent", "pid", "comm", "refs", "state", "holders",
            ]
            .iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()];
            for e in v["entries"].as_array().into_iter().flatten() {
                rows.push(
                    [
                        "type",
                        "id",
                        "name",
                        "parent",
                        "owner_pid",
                        "owner_comm",
                        "refs",
                        "state",
                        "holders",
                    ]
                    .iter()
                    .map(|k| s(e, k))
                    .collect(),
                );
            }
            table(out, &rows)?;
        }
    }
    Ok(())
}

fn render_dev(out: &mut impl Write, d: &Value) -> std::io::Result<()> {
    let head = format!(
        "{}: mgmtdev {} backend {} state {}",
        s(d, "name"),
        s(d, "mgmtdev"),
        s(d, "backend"),
        s(d, "state"),
    );
    if d["mgmtdev"] == json!("net") {
        writeln!(
            out,
            "{head} mac {} mtu {} max_vqp {} queue_size {}",
            s(d, "mac"),
            s(d, "mtu"),
            s(d, "max_vqp"),
            s(d, "queue_size"),
        )?;
    } else {
        writeln!(
            out,
            "{head} capacity {} queues {} queue_size {}{}{}",
            s(d, "capacity"),
            s(d, "queues"),
            s(d, "queue_size"),
            if d["read_only"] == json!(true) {
                " ro"
            } else {
                ""
            },
            match d.get("aio") {
                Some(_) => format!(" aio {}", s(d, "aio")),
                None => String::new(),
            }
        )?;
    }
    let mut rows = vec![
        vec!["  socket".to_string(), s(d, "socket")],
        vec!["  status".to_string(), s(d, "status")],
        vec!["  features".to_string(), s(d, "features")],
        vec!["  frontend_pid".to_string(), s(d, "frontend_pid")],
        vec!["  qemu".to_string(), s(d, "qemu")],
    ];
    if d.get("testpmd").is_some() {
        rows.push(vec!["  testpmd".to_string(), s(d, "testpmd")]);
    }
    if d.get("max_memory").is_some() {
        rows.push(vec!["  max_memory".to_string(), s(d, "max_memory")]);
    }
    table(out, &rows)
}

/// Runs one management command against the daemon at `ctl`.
///
/// # Errors
/// A message for stderr: the daemon's error reply, or why it could not be reached.
pub fn run(ctl: &Path, cmd: &Cmd, o: Output) -> Result<(), String> {
    let (action, payload) = match cmd {
        Cmd::MgmtdevShow => ("mgmtdev.show", json!({})),
        Cmd::DevAdd(a) => (
            "dev.add",
            serde_json::to_value(a).map_err(|e| e.to_string())?,
        ),
        Cmd::DevDel(n) => ("dev.del", json!({ "name": n })),
        Cmd::DevShow(n) => ("dev.show", json!({ "name": n })),
        Cmd::DevConfigShow(n) => ("dev.config.show", json!({ "name": n })),
        Cmd::DevVstatsShow { name, qidx, .. } => {
            ("dev.vstats.show", json!({ "name": name, "qidx": qidx }))
        }
        Cmd::ResShow(t) => ("res.show", json!({ "type": t })),
        Cmd::DevIrqShow(n) => ("dev.irq.show", json!({ "name": n })),
        Cmd::DevIrqTrigger { name, vec } => {
            ("dev.irq.trigger", json!({ "name": name, "vec": vec }))
        }
        Cmd::DevSetCoalesce {
            name,
            qidx,
            usecs,
            frames,
        } => (
            "dev.set",
            json!({ "name": name, "qidx": qidx, "usecs": usecs, "frames": frames }),
        ),
        Cmd::DevSetCapacity { name, bytes } => {
            ("dev.set", json!({ "name": name, "capacity": bytes }))
        }
        // Not one request and a reply: the connection stays open while it runs.
        Cmd::DevCapture(a) => return crate::capture::run(ctl, a),
    };
    let (reply, fds) = request(ctl, action, payload)?;
    let mut out = std::io::stdout().lock();
    let io = |e: std::io::Error| format!("Cannot write output: {e}");
    if let Cmd::DevVstatsShow {
        name,
        qidx,
        watch: Some(count),
    } = cmd
    {
        let queues = reply["queues"].as_u64().unwrap_or(0) as usize;
        let fd = fds
            .into_iter()
            .next()
            .ok_or("The daemon sent no counters fd")?;
        let table =
            StatsTable::open(fd, queues).map_err(|e| format!("Cannot map counters: {e}"))?;
        return watch(&mut out, name, *qidx, &table, *count, o).map_err(io);
    }
    if o.json {
        print_json(&mut out, &reply, o).map_err(io)
    } else {
        render_text(&mut out, cmd, &reply).map_err(io)
    }
}

/// Prints per-second rates from the shared counters, with no request per sample.
fn watch(
    out: &mut impl Write,
    name: &str,
    qidx: u32,
    table: &StatsTable,
    count: Option<u64>,
    o: Output,
) -> std::io::Result<()> {
    let q = table
        .queue(qidx as usize)
        .ok_or_else(|| std::io::Error::other("queue index outside the counters table"))?;
    let mut prev = vstats_view(name, qidx, q);
    let mut t0 = Instant::now();
    let mut n = 0u64;
    while count.is_none_or(|c| n < c) {
        std::thread::sleep(Duration::from_secs(1));
        let cur = vstats_view(name, qidx, q);
        let dt = t0.elapsed().as_secs_f64().max(1e-3);
        t0 = Instant::now();
        let rate = |a: u64, b: u64| (a.saturating_sub(b)) as f64 / dt;
        let v = json!({
            "name": name, "qidx": qidx,
            "requests_per_sec": rate(cur.requests, prev.requests).round(),
            "read_bytes_per_sec": rate(cur.bytes_read, prev.bytes_read).round(),
            "written_bytes_per_sec": rate(cur.bytes_written, prev.bytes_written).round(),
            "kicks_per_sec": rate(cur.kicks, prev.kicks).round(),
            "calls_per_sec": rate(cur.calls, prev.calls).round(),
            "requests": cur.requests,
        });
        if o.json {
            print_json(out, &v, o)?;
        } else {
            writeln!(
                out,
                "{name} qidx {qidx}: {} req/s  read {} B/s  written {} B/s  kicks {}/s  calls {}/s  (total {})",
                v["requests_per_sec"], v["read_bytes_per_sec"], v["written_bytes_per_sec"],
                v["kicks_per_sec"], v["calls_per_sec"], cur.requests
            )?;
        }
        out.flush()?;
        prev = cur;
        n += 1;
    }
    Ok(())
}
