//! `uvdpa-blkbench`: a small random-I/O benchmark client for vhost-user-blk servers.
//!
//! It connects to a vhost-user-blk UNIX socket with libblkio's `virtio-blk-vhost-user`
//! driver, keeps exactly `--iodepth` requests in flight on a single queue for `--runtime`
//! seconds (after an optional `--ramp` warm-up that is not measured), records the latency of
//! every request in a preallocated histogram and prints one JSON line:
//!
//! ```text
//! {"iops":..., "p50_us":..., "p99_us":..., "ios":..., "secs":..., ...}
//! ```
//!
//! The hot loop does not allocate: buffers live in one libblkio memory region that is shared
//! with the server, per-slot submit timestamps and the completion array are allocated up front,
//! and the queue size is checked so that libblkio never has to backlog a request.

use std::fmt;
use std::mem::MaybeUninit;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, Errno, ReqFlags};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use serde::Serialize;

/// Descriptors a virtio-blk read/write request occupies in a split virtqueue (libblkio's
/// virtio-driver does not use indirect descriptors): request header, data buffer, status byte.
const DESCS_PER_REQUEST: u32 = 3;

/// Largest latency the histogram can represent exactly (60 s, in nanoseconds); larger samples
/// are clamped to it.
const HIST_MAX_NS: u64 = 60_000_000_000;

/// The I/O pattern to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Rw {
    /// Uniformly random, block-aligned reads.
    Randread,
    /// Uniformly random, block-aligned writes.
    Randwrite,
    /// Sequential reads, block after block, wrapping at the end of the span (each of the
    /// `--iodepth` requests in flight takes the next block).
    Read,
    /// Sequential writes, as [`Rw::Read`].
    Write,
    /// Write every block of the span once, sequentially (a prefill pass; `--runtime` and
    /// `--ramp` are ignored).
    Fill,
}

/// Command-line arguments.
#[derive(Debug, Parser)]
#[command(
    name = "uvdpa-blkbench",
    about = "Random-I/O benchmark for vhost-user-blk servers (libblkio client, one queue)"
)]
struct Args {
    /// Path of the vhost-user-blk UNIX socket to connect to.
    #[arg(long)]
    path: String,

    /// I/O pattern.
    #[arg(long, value_enum, default_value = "randread")]
    rw: Rw,

    /// Block size of each request in bytes.
    #[arg(long, default_value_t = 4096)]
    bs: u64,

    /// Number of requests kept in flight.
    #[arg(long, default_value_t = 1)]
    iodepth: u32,

    /// Measured run time in seconds (fractions allowed).
    #[arg(long, default_value_t = 10.0)]
    runtime: f64,

    /// Unmeasured warm-up time in seconds before the measured run.
    #[arg(long, default_value_t = 0.0)]
    ramp: f64,

    /// Only touch the first BYTES of the device (default: the whole capacity).
    #[arg(long, value_name = "BYTES")]
    size_limit: Option<u64>,

    /// Virtqueue size to negotiate (power of two; must fit iodepth * 3 descriptors).
    #[arg(long, default_value_t = 256)]
    queue_size: u32,

    /// Use a libblkio poll queue (busy-waits for completions) instead of a regular queue that
    /// sleeps on the completion eventfd.
    #[arg(long)]
    poll: bool,

    /// Give up if no request completes within this many seconds (stalled server).
    #[arg(long, default_value_t = 10.0)]
    io_timeout: f64,

    /// Seed for the offset generator.
    #[arg(long, default_value_t = 0x5eed_b10c)]
    seed: u64,
}

/// The JSON report printed on success.
#[derive(Debug, Serialize)]
struct Report {
    /// Completed requests per second in the measured window.
    iops: f64,
    /// Median latency in microseconds.
    p50_us: f64,
    /// 99th percentile latency in microseconds.
    p99_us: f64,
    /// Requests completed in the measured window.
    ios: u64,
    /// Length of the measured window in seconds.
    secs: f64,
    /// 99.9th percentile latency in microseconds.
    p999_us: f64,
    /// Mean latency in microseconds.
    mean_us: f64,
    /// Largest latency in microseconds.
    max_us: f64,
    /// Every request completed, including the ramp and the final drain (use this to
    /// normalise resource usage measured around the whole client run).
    total_ios: u64,
    /// CPU time this client process used from its start to the end of the run, in seconds
    /// (from `/proc/self/schedstat`; `null` where that file is missing).
    client_cpu_secs: Option<f64>,
    /// Time this client spent runnable but waiting for its CPU (run-queue wait) from its
    /// start to the end of the run, in seconds: a sign of other load on the client's CPU.
    client_wait_secs: Option<f64>,
    /// I/O pattern.
    rw: Rw,
    /// Block size in bytes.
    bs: u64,
    /// Requests kept in flight.
    iodepth: u32,
    /// Bytes of the device the offsets were drawn from.
    span_bytes: u64,
}

/// A fatal benchmark error: a message for the user.
#[derive(Debug)]
struct BenchError(String);

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BenchError {}

type Result<T> = std::result::Result<T, BenchError>;

/// Adds context to a libblkio error.
fn blk_err(what: &str) -> impl FnOnce(blkio::Error) -> BenchError + '_ {
    move |e| {
        let msg = e.message();
        if msg.contains("os error") {
            BenchError(format!("{what}: {msg}"))
        } else {
            BenchError(format!(
                "{what}: {msg} (os error {})",
                e.errno().raw_os_error()
            ))
        }
    }
}

/// SplitMix64: a tiny, fast, allocation-free generator; quality is ample for picking offsets.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    /// Returns the next 64 random bits.
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Returns a value in `0..n` (`n > 0`) by multiply-shift, without division.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// Validated run parameters derived from [`Args`].
#[derive(Debug, Clone, Copy)]
struct Plan {
    rw: Rw,
    bs: u64,
    iodepth: u32,
    runtime: Duration,
    ramp: Duration,
    io_timeout: Duration,
}

/// Converts a user-supplied number of seconds to a [`Duration`].
fn secs_arg(name: &str, v: f64, allow_zero: bool) -> Result<Duration> {
    if !v.is_finite() || v < 0.0 || (!allow_zero && v == 0.0) {
        return Err(BenchError(format!(
            "--{name} must be a {} number of seconds, got {v}",
            if allow_zero {
                "non-negative"
            } else {
                "positive"
            }
        )));
    }
    Duration::try_from_secs_f64(v).map_err(|e| BenchError(format!("--{name}: {e}")))
}

/// Checks the arguments that do not depend on the device.
fn plan(args: &Args) -> Result<Plan> {
    if args.bs == 0 || args.bs % 512 != 0 {
        return Err(BenchError(format!(
            "--bs must be a non-zero multiple of 512, got {}",
            args.bs
        )));
    }
    if args.iodepth == 0 {
        return Err(BenchError("--iodepth must be at least 1".into()));
    }
    if !args.queue_size.is_power_of_two() || args.queue_size > 32768 {
        return Err(BenchError(format!(
            "--queue-size must be a power of two no larger than 32768, got {}",
            args.queue_size
        )));
    }
    let needed = u64::from(args.iodepth) * u64::from(DESCS_PER_REQUEST);
    if needed > u64::from(args.queue_size) {
        return Err(BenchError(format!(
            "--iodepth {} needs {needed} descriptors but --queue-size is {}; \
             raise --queue-size to at least {}",
            args.iodepth,
            args.queue_size,
            needed.next_power_of_two()
        )));
    }
    Ok(Plan {
        rw: args.rw,
        bs: args.bs,
        iodepth: args.iodepth,
        runtime: secs_arg("runtime", args.runtime, false)?,
        ramp: secs_arg("ramp", args.ramp, true)?,
        io_timeout: secs_arg("io-timeout", args.io_timeout, false)?,
    })
}

/// Rounds `v` up to a multiple of the power of two `align`.
fn round_up_pow2(v: u64, align: u64) -> u64 {
    debug_assert!(align.is_power_of_two());
    (v + align - 1) & !(align - 1)
}

/// Nanoseconds to microseconds.
fn ns_to_us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// This process's on-CPU time and run-queue wait time so far, in seconds, from the first two
/// fields (nanoseconds) of `/proc/self/schedstat`.
fn self_schedstat() -> Option<(f64, f64)> {
    parse_schedstat(&std::fs::read_to_string("/proc/self/schedstat").ok()?)
}

/// Parses the text of a `schedstat` file: `<on-cpu ns> <wait ns> <timeslices>`.
fn parse_schedstat(text: &str) -> Option<(f64, f64)> {
    let mut it = text.split_whitespace().map(str::parse::<u64>);
    let cpu = it.next()?.ok()?;
    let wait = it.next()?.ok()?;
    Some((cpu as f64 / 1e9, wait as f64 / 1e9))
}

/// Connects to the server and runs the benchmark.
fn run(args: &Args) -> Result<Report> {
    let plan = plan(args)?;

    let mut blkio =
        Blkio::new("virtio-blk-vhost-user").map_err(blk_err("creating libblkio instance"))?;
    blkio
        .set_str("path", &args.path)
        .map_err(blk_err("setting path"))?;
    blkio
        .connect()
        .map_err(blk_err(&format!("connecting to {}", args.path)))?;

    // Queue properties can only be set between connect() and start().
    let (num_queues, num_poll_queues) = if args.poll { (0, 1) } else { (1, 0) };
    blkio
        .set_i32("num-queues", num_queues)
        .map_err(blk_err("setting num-queues"))?;
    blkio
        .set_i32("num-poll-queues", num_poll_queues)
        .map_err(blk_err("setting num-poll-queues"))?;
    let queue_size = i32::try_from(args.queue_size)
        .map_err(|_| BenchError(format!("--queue-size {} is too large", args.queue_size)))?;
    blkio
        .set_i32("queue-size", queue_size)
        .map_err(blk_err("setting queue-size"))?;

    let capacity = blkio
        .get_u64("capacity")
        .map_err(blk_err("reading capacity"))?;
    let req_align = blkio
        .get_i32("request-alignment")
        .map_err(blk_err("reading request-alignment"))?;
    if req_align <= 0 || plan.bs % req_align as u64 != 0 {
        return Err(BenchError(format!(
            "--bs {} is not a multiple of the device's request-alignment {req_align}",
            plan.bs
        )));
    }
    let span = args.size_limit.map_or(capacity, |l| l.min(capacity));
    let nblocks = span / plan.bs;
    if nblocks == 0 {
        return Err(BenchError(format!(
            "device capacity {capacity} (size limit {:?}) is smaller than one block of {}",
            args.size_limit, plan.bs
        )));
    }

    let mut outcome = blkio.start().map_err(blk_err("starting libblkio"))?;
    let mut queues = if args.poll {
        std::mem::take(&mut outcome.poll_queues)
    } else {
        std::mem::take(&mut outcome.queues)
    };
    let mut q = queues
        .pop()
        .ok_or_else(|| BenchError("libblkio started without a queue".into()))?;

    // Memory regions can only be allocated once connected and mapped once started. Each
    // in-flight slot owns one `bs`-sized buffer in a single shared-memory region.
    let mem_align = blkio
        .get_u64("mem-region-alignment")
        .map_err(blk_err("reading mem-region-alignment"))?;
    let buf_bytes = plan.bs * u64::from(plan.iodepth);
    let region_len = round_up_pow2(buf_bytes, mem_align.max(4096));
    let region_len = usize::try_from(region_len)
        .map_err(|_| BenchError("buffer region does not fit in memory".into()))?;
    let region = blkio
        .alloc_mem_region(region_len)
        .map_err(blk_err("allocating memory region"))?;
    blkio
        .map_mem_region(&region)
        .map_err(blk_err("mapping memory region"))?;
    // SAFETY: `alloc_mem_region` just mmapped `region.len` readable and writable bytes at
    // `region.addr`; it stays mapped until `blkio` and `q` are dropped (after this slice's last
    // use), and no request is in flight yet, so nothing else accesses the memory right now.
    let bufs = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, region.len) };
    // Fault the pages in (and give writes non-zero data) before measuring.
    for (i, b) in bufs.iter_mut().enumerate() {
        *b = (i as u8) ^ 0xa5;
    }
    let base = region.addr;

    let report = drive(&mut q, base, nblocks, span, &plan, args.seed)?;

    let mut report = report;
    if let Some((cpu, wait)) = self_schedstat() {
        report.client_cpu_secs = Some(cpu);
        report.client_wait_secs = Some(wait);
    }

    // Drop the queue before the instance that owns the device and memory region.
    drop(q);
    drop(queues);
    drop(blkio);
    Ok(report)
}

/// Where the next request goes.
#[derive(Debug, Clone)]
enum Offsets {
    /// Uniformly random block-aligned offsets in `0..nblocks * bs`.
    Random {
        rng: SplitMix64,
        nblocks: u64,
        bs: u64,
    },
    /// Every block of `0..nblocks * bs` once, in order.
    Sequential { next: u64, nblocks: u64, bs: u64 },
    /// Every block of `0..nblocks * bs` in order, starting over at the end.
    Wrapping { next: u64, nblocks: u64, bs: u64 },
}

impl Offsets {
    /// The offset source for `rw` over `nblocks` blocks of `bs` bytes.
    fn new(rw: Rw, nblocks: u64, bs: u64, seed: u64) -> Self {
        match rw {
            Rw::Randread | Rw::Randwrite => Offsets::Random {
                rng: SplitMix64(seed),
                nblocks,
                bs,
            },
            Rw::Fill => Offsets::Sequential {
                next: 0,
                nblocks,
                bs,
            },
            Rw::Read | Rw::Write => Offsets::Wrapping {
                next: 0,
                nblocks,
                bs,
            },
        }
    }

    /// The byte offset of the next request, or `None` once a sequential pass is complete.
    fn next_offset(&mut self) -> Option<u64> {
        match self {
            Offsets::Random { rng, nblocks, bs } => Some(rng.below(*nblocks) * *bs),
            Offsets::Sequential { next, nblocks, bs } => {
                if *next >= *nblocks {
                    return None;
                }
                let off = *next * *bs;
                *next += 1;
                Some(off)
            }
            Offsets::Wrapping { next, nblocks, bs } => {
                if *next >= *nblocks {
                    *next = 0;
                }
                let off = *next * *bs;
                *next += 1;
                Some(off)
            }
        }
    }
}

/// Enqueues one request for `slot` at `offset`, using the slot's own buffer.
fn submit(q: &mut Blkioq, plan: &Plan, base: usize, slot: usize, offset: u64) {
    let buf = (base + slot * plan.bs as usize) as *mut u8;
    let len = plan.bs as usize;
    match plan.rw {
        Rw::Randread | Rw::Read => q.read(offset, buf, len, slot, ReqFlags::empty()),
        Rw::Randwrite | Rw::Write | Rw::Fill => q.write(offset, buf, len, slot, ReqFlags::empty()),
    }
}

/// The measurement loop: keeps `iodepth` requests in flight until the window closes (or, for
/// [`Rw::Fill`], until every block has been written), then drains the remaining requests.
fn drive(
    q: &mut Blkioq,
    base: usize,
    nblocks: u64,
    span: u64,
    plan: &Plan,
    seed: u64,
) -> Result<Report> {
    let depth = plan.iodepth as usize;
    let mut hist = Histogram::<u64>::new_with_bounds(1, HIST_MAX_NS, 3)
        .map_err(|e| BenchError(format!("creating histogram: {e}")))?;
    let mut offsets = Offsets::new(plan.rw, nblocks, plan.bs, seed);
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..depth).map(|_| MaybeUninit::uninit()).collect();

    let t0 = Instant::now();
    let mut started = vec![t0; depth];
    let (measure_start, end) = if plan.rw == Rw::Fill {
        (t0, None)
    } else {
        let m = t0 + plan.ramp;
        (m, Some(m + plan.runtime))
    };

    let mut inflight = 0usize;
    for (slot, s) in started.iter_mut().enumerate() {
        let Some(offset) = offsets.next_offset() else {
            break;
        };
        *s = Instant::now();
        submit(q, plan, base, slot, offset);
        inflight += 1;
    }
    let mut ios: u64 = 0;
    let mut total_ios: u64 = 0;
    let mut last_done = measure_start;
    let mut stopping = false;

    while inflight > 0 {
        let mut timeout = plan.io_timeout;
        let n = match q.do_io(&mut completions, 1, Some(&mut timeout), None) {
            Ok(n) => n,
            Err(e) if e.errno() == Errno::TIME => {
                let secs = plan.io_timeout.as_secs_f64();
                return Err(BenchError(format!(
                    "no request completed within {secs:.1} s ({inflight} in flight); \
                     is the server stuck?"
                )));
            }
            Err(e) => return Err(blk_err("waiting for completions")(e)),
        };
        let now = Instant::now();
        stopping |= end.is_some_and(|e| now >= e);
        let measuring = !stopping && now >= measure_start;

        for c in &completions[..n] {
            // SAFETY: `do_io` returned `n`, so it initialised the first `n` elements.
            let c = unsafe { c.assume_init_ref() };
            let slot = c.user_data;
            if slot >= depth {
                return Err(BenchError(format!(
                    "completion carries unknown user_data {slot}"
                )));
            }
            if c.ret != 0 {
                let errno = Errno::from_raw_os_error(c.ret.saturating_neg());
                return Err(BenchError(format!(
                    "{:?} request failed: {errno} (ret {})",
                    plan.rw, c.ret
                )));
            }
            total_ios += 1;
            if measuring {
                let ns =
                    u64::try_from(now.duration_since(started[slot]).as_nanos()).unwrap_or(u64::MAX);
                hist.saturating_record(ns.max(1));
                ios += 1;
                last_done = now;
            }
            match offsets.next_offset() {
                Some(offset) if !stopping => {
                    started[slot] = Instant::now();
                    submit(q, plan, base, slot, offset);
                }
                _ => inflight -= 1,
            }
        }
    }

    if ios == 0 {
        return Err(BenchError(
            "no request completed inside the measured window".into(),
        ));
    }
    let secs = last_done.duration_since(measure_start).as_secs_f64();
    let secs = if secs > 0.0 {
        secs
    } else {
        plan.runtime.as_secs_f64()
    };
    Ok(Report {
        iops: ios as f64 / secs,
        p50_us: ns_to_us(hist.value_at_quantile(0.50)),
        p99_us: ns_to_us(hist.value_at_quantile(0.99)),
        ios,
        secs,
        p999_us: ns_to_us(hist.value_at_quantile(0.999)),
        mean_us: hist.mean() / 1000.0,
        max_us: ns_to_us(hist.max()),
        total_ios,
        client_cpu_secs: None,
        client_wait_secs: None,
        rw: plan.rw,
        bs: plan.bs,
        iodepth: plan.iodepth,
        span_bytes: span,
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).and_then(|r| {
        serde_json::to_string(&r).map_err(|e| BenchError(format!("encoding report: {e}")))
    }) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("uvdpa-blkbench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut v = vec!["uvdpa-blkbench", "--path", "/nonexistent.sock"];
        v.extend_from_slice(extra);
        Args::try_parse_from(v).expect("arguments parse")
    }

    #[test]
    fn below_stays_in_range() {
        let mut rng = SplitMix64(1);
        for n in [1u64, 2, 3, 7, 262_144, u64::MAX] {
            for _ in 0..1000 {
                assert!(rng.below(n) < n);
            }
        }
    }

    #[test]
    fn below_covers_small_ranges() {
        let mut rng = SplitMix64(42);
        let mut seen = [false; 8];
        for _ in 0..1000 {
            seen[rng.below(8) as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn sequential_offsets_cover_the_span_once() {
        let mut o = Offsets::new(Rw::Fill, 3, 4096, 0);
        assert_eq!(o.next_offset(), Some(0));
        assert_eq!(o.next_offset(), Some(4096));
        assert_eq!(o.next_offset(), Some(8192));
        assert_eq!(o.next_offset(), None);
        assert_eq!(o.next_offset(), None);
    }

    #[test]
    fn sequential_read_and_write_wrap_around_the_span() {
        for rw in [Rw::Read, Rw::Write] {
            let mut o = Offsets::new(rw, 3, 4096, 0);
            let got: Vec<_> = (0..7).map(|_| o.next_offset().unwrap()).collect();
            assert_eq!(got, vec![0, 4096, 8192, 0, 4096, 8192, 0]);
        }
    }

    #[test]
    fn random_offsets_are_aligned_and_in_span() {
        let mut o = Offsets::new(Rw::Randread, 10, 4096, 7);
        for _ in 0..1000 {
            let off = o.next_offset().expect("random offsets never run out");
            assert_eq!(off % 4096, 0);
            assert!(off < 10 * 4096);
        }
    }

    #[test]
    fn defaults_are_valid() {
        let p = plan(&args(&[])).expect("default plan");
        assert_eq!(p.bs, 4096);
        assert_eq!(p.iodepth, 1);
        assert_eq!(p.rw, Rw::Randread);
    }

    #[test]
    fn rejects_depth_that_overflows_the_ring() {
        let err = plan(&args(&["--iodepth", "86"])).unwrap_err();
        assert!(err.0.contains("--queue-size"), "{err}");
        assert!(plan(&args(&["--iodepth", "85"])).is_ok());
        assert!(plan(&args(&["--iodepth", "86", "--queue-size", "512"])).is_ok());
    }

    #[test]
    fn rejects_bad_numbers() {
        assert!(plan(&args(&["--bs", "1000"])).is_err());
        assert!(plan(&args(&["--bs", "0"])).is_err());
        assert!(plan(&args(&["--iodepth", "0"])).is_err());
        assert!(plan(&args(&["--runtime", "0"])).is_err());
        assert!(plan(&args(&["--ramp=-1"])).is_err());
        assert!(plan(&args(&["--queue-size", "300"])).is_err());
        assert!(
            Args::try_parse_from(["uvdpa-blkbench", "--path", "x", "--rw", "seqread"]).is_err()
        );
    }

    #[test]
    fn schedstat_parses() {
        assert_eq!(
            parse_schedstat("1500000000 250000000 42\n"),
            Some((1.5, 0.25))
        );
        assert_eq!(parse_schedstat(""), None);
        assert_eq!(parse_schedstat("12 x 3"), None);
    }

    #[test]
    fn round_up_works() {
        assert_eq!(round_up_pow2(1, 4096), 4096);
        assert_eq!(round_up_pow2(4096, 4096), 4096);
        assert_eq!(round_up_pow2(4097, 4096), 8192);
    }

    #[test]
    fn connect_failure_is_reported() {
        let a = args(&["--runtime", "0.1"]);
        let err = run(&a).unwrap_err();
        assert!(err.0.contains("/nonexistent.sock"), "{err}");
    }

    #[test]
    fn report_has_the_documented_keys() {
        let r = Report {
            iops: 1.0,
            p50_us: 2.0,
            p99_us: 3.0,
            ios: 4,
            secs: 5.0,
            p999_us: 6.0,
            mean_us: 7.0,
            max_us: 8.0,
            total_ios: 9,
            client_cpu_secs: Some(0.5),
            client_wait_secs: None,
            rw: Rw::Randread,
            bs: 4096,
            iodepth: 1,
            span_bytes: 4096,
        };
        let v: serde_json::Value = serde_json::to_value(&r).expect("serialise");
        for k in ["iops", "p50_us", "p99_us", "ios", "secs"] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        assert_eq!(v["rw"], "randread");
    }
}
