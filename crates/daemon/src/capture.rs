//! `uvdpa dev capture`: the CLI side of a live capture (the daemon side is
//! `uvdpa_devices::net::capture` and `Registry::capture_start`). On a blk device the same
//! ring carries request trace records, written out as JSON lines ([`crate::trace`]).
//!
//! The CLI asks the daemon (`dev.capture`) to mirror a net device's frames into a
//! shared-memory ring whose memfd comes back with the reply, then drains the ring and
//! writes pcapng (with the `pcap-file` crate): a section header, one interface per
//! captured virtqueue (`NAME-rxP` / `NAME-txP`, nanosecond timestamps), and one enhanced
//! packet block per frame with its direction in `epb_flags` (receive queue: inbound to the
//! driver, transmit queue: outbound). The capture lasts as long as the CLI's IPC
//! connection: when it exits, whatever the reason, the daemon sees the socket close and
//! detaches the ring.

use std::borrow::Cow;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pcap_file::pcapng::blocks::enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption};
use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption,
};
use pcap_file::pcapng::blocks::section_header::{SectionHeaderBlock, SectionHeaderOption};
use pcap_file::pcapng::PcapNgWriter;
use pcap_file::{DataLink, Endianness, PcapError};
use serde_json::json;
use uvdpa_devices::net::capture::{CaptureRing, RecordInfo};
use uvdpa_ipc::Secondary;

use crate::cli::CaptureArgs;
use crate::client::REQUEST_TIMEOUT;
use crate::registry::CaptureView;
use crate::trace::TraceOut;

/// Pause after each pass over the rings. The rings hold milliseconds of traffic (8 MiB is
/// ~36 ms of 64-byte frames at 1.3 Mpps each way), so draining in bursts loses nothing
/// and leaves the CPU (on a small machine, often a busy-polling worker's) alone between
/// them.
const PASS_SLEEP: Duration = Duration::from_millis(1);

/// `epb_flags` direction bits (pcapng §4.3.1): inbound, outbound.
const EPB_INBOUND: u32 = 1;
const EPB_OUTBOUND: u32 = 2;

/// The pcapng interface of virtqueue `q` of device `name`: `NAME-rxP` or `NAME-txP`.
pub fn interface_name(name: &str, q: u16) -> String {
    let dir = if q.is_multiple_of(2) { "rx" } else { "tx" };
    format!("{name}-{dir}{}", q / 2)
}

fn pcap_err(e: PcapError) -> String {
    match e {
        PcapError::IoError(e) => format!("Cannot write the capture: {e}"),
        other => format!("Cannot write the capture: {other}"),
    }
}

/// Writes frames as pcapng, one interface per captured virtqueue.
pub struct PcapngOut<W: Write> {
    w: PcapNgWriter<W>,
    /// Interface id of each virtqueue index (`u32::MAX`: not captured).
    iface: Vec<u32>,
}

impl<W: Write> PcapngOut<W> {
    /// Writes the section header and the interfaces of `view`.
    ///
    /// # Errors
    /// The output cannot be written.
    pub fn new(out: W, view: &CaptureView) -> Result<Self, String> {
        let shb = SectionHeaderBlock {
            endianness: Endianness::native(),
            options: vec![SectionHeaderOption::UserApplication(Cow::Owned(format!(
                "uvdpa {} dev capture",
                env!("CARGO_PKG_VERSION")
            )))],
            ..Default::default()
        };
        let mut w = PcapNgWriter::with_section_header(out, shb).map_err(pcap_err)?;
        let top = view.queues.iter().copied().max().map_or(0, usize::from);
        let mut iface = vec![u32::MAX; top + 1];
        for (id, &q) in view.queues.iter().enumerate() {
            let dir = if q.is_multiple_of(2) {
                "receive"
            } else {
                "transmit"
            };
            let idb = InterfaceDescriptionBlock {
                linktype: DataLink::ETHERNET,
                snaplen: view.snaplen,
                options: vec![
                    InterfaceDescriptionOption::IfName(Cow::Owned(interface_name(&view.name, q))),
                    InterfaceDescriptionOption::IfDescription(Cow::Owned(format!(
                        "uvdpa net device {} virtqueue {q} ({dir} queue of pair {})",
                        view.name,
                        q / 2
                    ))),
                    // pcap-file writes EPB timestamps in nanoseconds.
                    InterfaceDescriptionOption::IfTsResol(9),
                ],
            };
            w.write_pcapng_block(idb).map_err(pcap_err)?;
            if let Some(slot) = iface.get_mut(usize::from(q)) {
                *slot = id as u32;
            }
        }
        Ok(Self { w, iface })
    }

    /// Writes one frame seen on virtqueue `qidx`; a queue that is not captured is skipped.
    ///
    /// # Errors
    /// The output cannot be written.
    pub fn frame(
        &mut self,
        qidx: u16,
        ts_ns: u64,
        orig_len: u32,
        data: &[u8],
    ) -> Result<bool, PcapError> {
        let Some(&id) = self
            .iface
            .get(usize::from(qidx))
            .filter(|&&i| i != u32::MAX)
        else {
            return Ok(false);
        };
        let dir = if qidx.is_multiple_of(2) {
            EPB_INBOUND
        } else {
            EPB_OUTBOUND
        };
        self.w.write_pcapng_block(EnhancedPacketBlock {
            interface_id: id,
            timestamp: Duration::from_nanos(ts_ns),
            original_len: orig_len,
            data: Cow::Borrowed(data),
            options: vec![EnhancedPacketOption::Flags(dir)],
        })?;
        Ok(true)
    }

    /// The writer.
    pub fn get_mut(&mut self) -> &mut W {
        self.w.get_mut()
    }
}

/// Where drained records go: pcapng frames (net) or JSON lines (a blk request trace).
enum Sink<W: Write> {
    Pcapng(PcapngOut<W>),
    Trace(TraceOut<W>),
}

impl<W: Write> Sink<W> {
    /// Writes one record; `Ok(false)` when it was not for this output.
    fn record(&mut self, info: RecordInfo, data: &[u8]) -> Result<bool, PcapError> {
        match self {
            Sink::Pcapng(p) => p.frame(info.qidx, info.ts_ns, info.orig_len, data),
            Sink::Trace(t) => Ok(t.record(info.qidx, info.ts_ns, data)),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Pcapng(p) => p.get_mut().flush(),
            Sink::Trace(t) => t.flush(),
        }
    }
}

fn is_broken_pipe(e: &PcapError) -> bool {
    matches!(e, PcapError::IoError(io) if io.kind() == io::ErrorKind::BrokenPipe)
}

/// Runs `dev capture` against the daemon at `ctl` until `count` frames (net) or requests
/// (blk), SIGINT/SIGTERM, the reader of `-w -` going away, or the daemon ending the
/// capture.
///
/// # Errors
/// A message for stderr: the daemon refused, the output cannot be written.
pub fn run(ctl: &Path, a: &CaptureArgs) -> Result<(), String> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| format!("Cannot install signal handlers: {e}"))?;
    }
    // The connection stays open for the whole capture: it is what keeps it attached.
    let sec = Secondary::connect(ctl)
        .map_err(|e| format!("Cannot reach the daemon at {}: {e}", ctl.display()))?;
    let reply = sec
        .request_sync(
            "dev.capture",
            &json!({ "name": a.name, "qidx": a.qidx, "snaplen": a.snaplen }),
            &[],
            REQUEST_TIMEOUT,
        )
        .map_err(|e| match e {
            uvdpa_ipc::IpcError::Remote { message, .. } => message,
            other => other.to_string(),
        })?;
    let view: CaptureView = serde_json::from_value(reply.payload["capture"].clone())
        .map_err(|e| format!("Unexpected reply from the daemon: {e}"))?;
    let fd = reply
        .fds
        .into_iter()
        .next()
        .ok_or("The daemon sent no capture ring")?;
    let ring = CaptureRing::open(fd).map_err(|e| format!("Cannot map the capture ring: {e}"))?;
    // The output is created once the daemon accepted: a refused capture leaves no empty
    // file behind (a path that cannot be written ends the capture at once: exiting closes
    // the connection, which detaches it).
    let out: Box<dyn Write> = if a.file == "-" {
        Box::new(io::stdout().lock())
    } else {
        Box::new(
            std::fs::File::create(&a.file).map_err(|e| format!("Cannot create {}: {e}", a.file))?,
        )
    };
    let out = BufWriter::with_capacity(1 << 20, out);
    let blk = view.mgmtdev == "blk";
    let mut sink = if blk {
        Sink::Trace(TraceOut::new(out))
    } else {
        Sink::Pcapng(PcapngOut::new(out, &view)?)
    };
    sink.flush()
        .map_err(|e| format!("Cannot write the capture: {e}"))?;
    let to = if a.file == "-" {
        "standard output"
    } else {
        &a.file
    };
    if blk {
        let queues: Vec<String> = view.queues.iter().map(u16::to_string).collect();
        eprintln!(
            "uvdpa: tracing requests of {} (queues {}), to {to}",
            view.name,
            queues.join(" ")
        );
    } else {
        let names: Vec<String> = view
            .queues
            .iter()
            .map(|&q| interface_name(&view.name, q))
            .collect();
        eprintln!(
            "uvdpa: capturing on {} ({}), snaplen {} bytes, to {to}",
            view.name,
            names.join(" "),
            view.snaplen,
        );
    }

    let mut written: u64 = 0;
    let mut failure: Option<PcapError> = None;
    let mut ended_by_daemon = false;
    let drain = |sink: &mut Sink<_>, written: &mut u64, failure: &mut Option<PcapError>| {
        let mut got = 0;
        for r in 0..ring.rings() {
            got += ring.drain(r, |info, data| {
                if failure.is_some() || a.count.is_some_and(|c| *written >= c) {
                    return;
                }
                match sink.record(info, data) {
                    Ok(true) => *written += 1,
                    Ok(false) => {}
                    Err(e) => *failure = Some(e),
                }
            });
        }
        got
    };
    loop {
        let got = drain(&mut sink, &mut written, &mut failure);
        if failure.is_some() || a.count.is_some_and(|c| written >= c) {
            break;
        }
        if got > 0 {
            if let Err(e) = sink.flush() {
                failure = Some(PcapError::IoError(e));
                break;
            }
            std::thread::sleep(PASS_SLEEP);
            continue;
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if ring.is_detached() || sec.is_closed() {
            // One last pass for what was written before the daemon stopped.
            ended_by_daemon = true;
            drain(&mut sink, &mut written, &mut failure);
            break;
        }
        std::thread::sleep(PASS_SLEEP);
    }
    let flushed = sink.flush();
    let drops: u64 = (0..ring.rings()).map(|r| ring.counters(r).drops).sum();
    // Detach now (the daemon sees the connection close), not when the process exits.
    drop(sec);
    if blk {
        eprintln!("uvdpa: {written} requests traced, {drops} dropped (trace ring full)");
    } else {
        eprintln!("uvdpa: {written} frames captured, {drops} dropped (capture ring full)");
    }
    match failure {
        Some(e) if is_broken_pipe(&e) => Ok(()),
        Some(e) => Err(pcap_err(e)),
        None => match flushed {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
            Err(e) => Err(format!("Cannot write the capture: {e}")),
            Ok(()) if ended_by_daemon => Err(format!(
                "The daemon ended the capture of {} (device deleted or daemon stopped)",
                view.name
            )),
            Ok(()) => Ok(()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcap_file::pcapng::{Block, PcapNgReader};

    #[test]
    fn pcapng_has_one_interface_per_queue_and_direction_flags() {
        let view = CaptureView {
            name: "n0".into(),
            mgmtdev: "net".into(),
            queues: vec![0, 1, 2, 3],
            rings: 2,
            ring_size: 1 << 20,
            snaplen: 128,
            res: "capture/0".into(),
        };
        let mut out = PcapngOut::new(Vec::new(), &view).unwrap();
        assert!(out
            .frame(1, 1_500_000_000_123_456_789, 64, &[1; 64])
            .unwrap());
        assert!(out
            .frame(2, 1_500_000_000_123_456_790, 200, &[2; 128])
            .unwrap());
        assert!(
            !out.frame(4, 1, 60, &[0; 60]).unwrap(),
            "the control queue is no interface"
        );
        let bytes = out.get_mut().clone();
        let mut r = PcapNgReader::new(&bytes[..]).unwrap();
        let mut idbs = Vec::new();
        let mut epbs = Vec::new();
        while let Some(b) = r.next_block() {
            match b.unwrap() {
                Block::InterfaceDescription(i) => idbs.push(i.into_owned()),
                Block::EnhancedPacket(e) => epbs.push(e.into_owned()),
                _ => {}
            }
        }
        assert_eq!(idbs.len(), 4);
        assert!(idbs[3]
            .options
            .contains(&InterfaceDescriptionOption::IfName("n0-tx1".into())));
        assert_eq!(epbs.len(), 2);
        assert_eq!((epbs[0].interface_id, epbs[0].original_len), (1, 64));
        assert_eq!(epbs[0].options, [EnhancedPacketOption::Flags(EPB_OUTBOUND)]);
        assert_eq!(
            epbs[0].timestamp,
            Duration::from_nanos(1_500_000_000_123_456_789)
        );
        assert_eq!((epbs[1].interface_id, epbs[1].data.len()), (2, 128));
        assert_eq!(epbs[1].options, [EnhancedPacketOption::Flags(EPB_INBOUND)]);
    }
}
