//! virtio-blk request handling (`QueueHandler::handle` of a `BlkDevice`) over hostile chains.
//!
//! The input picks a device (RAM, null, file, or O_DIRECT file; read-only or not; 512 or
//! 4096-byte blocks; DISCARD / WRITE_ZEROES negotiated or not) of 64 KiB, then a sequence of
//! requests: header, data and writable lengths, and how the readable and writable bytes are
//! split into segments (the header may straddle segments). Each request is checked against a
//! model of virtio 1.2 §5.2.6 and a shadow copy of the disk:
//! - no panic; the handler never fails the queue;
//! - used length <= writable length, 0 without a writable byte;
//! - the status byte (the last writable byte) is 0, 1 or 2 and is the one the model expects;
//! - a successful read returns what the shadow disk holds (zeroes for the null backend);
//! - no writable byte past the reported data is touched, except the status byte.
//!
//! Input layout: `config u8`, then per request (at most 16):
//! `type u8 (+ u32 if raw), sector_mode u8, sector (u16 or u64), reserved u32, data_mode u8,
//!  data..., write_mode u8, write_len.., n_read_cuts u8, cuts [u16], n_write_cuts u8, cuts [u16]`.

#![no_main]
// `%` as the library crates write it (their MSRV predates `is_multiple_of`).
#![allow(clippy::manual_is_multiple_of)]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use uvdpa_devices::blk::{
    Aio, BackendSpec, BlkConfig, BlkDevice, BlkFeatures, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use uvdpa_fuzz::Input;
use uvdpa_virtio::{DescriptorChain, Segment, VirtioDevice, VirtioFeatures};

const CAPACITY: u64 = 64 * 1024;
const SECTOR: u64 = 512;
const SERIAL: &str = "uvdpa-fuzz-serial";
const MAX_ZERO_SECTORS: u32 = (i32::MAX as u32) >> 9;
const MAX_ZERO_SEGMENTS: usize = 256;
const SENTINEL: u8 = 0xa5;

/// Where backing files are created: not tmpfs if we can help it (O_DIRECT needs a file
/// system that supports it), so the build's `target/` when there is one. Each file is
/// unlinked as soon as the device has opened it.
fn file_path() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let target = std::env::current_dir().map(|d| d.join("target"));
        match target {
            Ok(t) if t.is_dir() => t,
            _ => std::env::temp_dir(),
        }
    });
    dir.join(format!("uvdpa-blk-fuzz-{}.img", std::process::id()))
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Ram,
    Null,
    File,
    Direct,
}

/// The disk as the model sees it: bytes, and whether each byte is known (a discarded
/// range reads back as anything).
struct Shadow {
    bytes: Vec<u8>,
    known: Vec<bool>,
}

/// Splits `buf` into pieces at `cuts` (positions folded into the buffer), dropping empty
/// pieces (a validated chain never has any).
fn split(buf: &mut [u8], cuts: &[u16]) -> Vec<Segment> {
    let len = buf.len();
    let mut at: Vec<usize> = cuts.iter().map(|&c| usize::from(c) % (len + 1)).collect();
    at.push(0);
    at.push(len);
    at.sort_unstable();
    at.dedup();
    let base = buf.as_mut_ptr();
    at.windows(2)
        .filter(|w| w[1] > w[0])
        .map(|w| Segment {
            base: base.wrapping_add(w[0]),
            len: w[1] - w[0],
        })
        .collect()
}

/// What the model expects for a request: the status and, if it succeeds, what it does.
#[derive(Debug, PartialEq, Eq)]
enum Expect {
    Fail(u8),
    Read { offset: u64, len: usize },
    Write { offset: u64, len: usize },
    Zero(Vec<(u64, u64)>),
    Discard(Vec<(u64, u64)>),
    GetId { len: usize },
    Flush,
}

struct Dev {
    read_only: bool,
    feat_discard: bool,
    feat_zeroes: bool,
    align: Option<usize>,
}

fn range(sector: u64, len: u64) -> Option<u64> {
    let off = sector.checked_mul(SECTOR)?;
    (off.checked_add(len)? <= CAPACITY).then_some(off)
}

fn model(dev: &Dev, readable: &[u8], wlen: usize) -> Expect {
    use Expect::Fail;
    if readable.len() < 16 {
        return Fail(VIRTIO_BLK_S_IOERR);
    }
    let ty = u32::from_le_bytes(readable[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(readable[8..16].try_into().unwrap());
    let rdata = readable.len() - 16;
    let wdata = wlen - 1;
    let data = |len: usize| -> Result<u64, u8> {
        if len as u64 % SECTOR != 0 {
            return Err(VIRTIO_BLK_S_IOERR);
        }
        let off = range(sector, len as u64).ok_or(VIRTIO_BLK_S_IOERR)?;
        if let Some(a) = dev.align {
            if off % a as u64 != 0 || len % a != 0 {
                return Err(VIRTIO_BLK_S_IOERR);
            }
        }
        Ok(off)
    };
    match ty {
        VIRTIO_BLK_T_IN => match data(wdata) {
            Ok(offset) => Expect::Read { offset, len: wdata },
            Err(s) => Fail(s),
        },
        VIRTIO_BLK_T_OUT if dev.read_only => Fail(VIRTIO_BLK_S_IOERR),
        VIRTIO_BLK_T_OUT => match data(rdata) {
            Ok(offset) => Expect::Write { offset, len: rdata },
            Err(s) => Fail(s),
        },
        VIRTIO_BLK_T_FLUSH => Expect::Flush,
        VIRTIO_BLK_T_GET_ID => Expect::GetId { len: wdata.min(20) },
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let wz = ty == VIRTIO_BLK_T_WRITE_ZEROES;
            let negotiated = if wz {
                dev.feat_zeroes
            } else {
                dev.feat_discard
            };
            if !negotiated || dev.read_only {
                // Not offered on a read-only device, so not negotiable either.
                return Fail(VIRTIO_BLK_S_UNSUPP);
            }
            if rdata == 0 || rdata % 16 != 0 || rdata / 16 > MAX_ZERO_SEGMENTS {
                return Fail(VIRTIO_BLK_S_IOERR);
            }
            let mut ranges = Vec::new();
            for seg in readable[16..].chunks_exact(16) {
                let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap());
                let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap());
                let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap());
                if flags & !u32::from(wz) != 0 {
                    return Fail(VIRTIO_BLK_S_UNSUPP);
                }
                if sectors > MAX_ZERO_SECTORS {
                    return Fail(VIRTIO_BLK_S_IOERR);
                }
                let len = u64::from(sectors) * SECTOR;
                match range(sector, len) {
                    Some(off) => ranges.push((off, len)),
                    None => return Fail(VIRTIO_BLK_S_IOERR),
                }
            }
            if wz {
                Expect::Zero(ranges)
            } else {
                Expect::Discard(ranges)
            }
        }
        _ => Fail(VIRTIO_BLK_S_UNSUPP),
    }
}

const TYPES: [u32; 6] = [
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_WRITE_ZEROES,
];

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let cfg = input.u8();
    let kind = [Kind::Ram, Kind::Null, Kind::File, Kind::Direct][usize::from(cfg & 3)];
    let read_only = cfg & 4 != 0;
    let lbs: u32 = if cfg & 8 != 0 { 4096 } else { 512 };
    let backend = match kind {
        Kind::Ram => BackendSpec::Ram { size: CAPACITY },
        Kind::Null => BackendSpec::Null { size: CAPACITY },
        Kind::File | Kind::Direct => {
            let path = file_path();
            let f = std::fs::File::create(&path).unwrap();
            f.set_len(CAPACITY).unwrap();
            BackendSpec::File {
                path,
                direct: kind == Kind::Direct,
                // The fuzz target drives queue handlers, which are synchronous.
                aio: Aio::Sync,
            }
        }
    };
    let dev = BlkDevice::new(BlkConfig {
        backend,
        read_only,
        num_queues: 1,
        queue_size: 256,
        serial: SERIAL.into(),
        logical_block_size: lbs,
    });
    if matches!(kind, Kind::File | Kind::Direct) {
        let _ = std::fs::remove_file(file_path());
    }
    let dev = match dev {
        Ok(d) => d,
        // This file system may refuse O_DIRECT, or need more alignment than 512 bytes.
        Err(e) if kind == Kind::Direct => {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| eprintln!("O_DIRECT devices skipped: {e}"));
            return;
        }
        Err(e) => panic!("device creation failed: {e}"),
    };
    assert_eq!(dev.capacity_bytes(), CAPACITY);
    let mut feats = VirtioFeatures::VIRTIO_F_VERSION_1;
    if cfg & 0x10 != 0 {
        feats |= VirtioFeatures::from_raw(BlkFeatures::VIRTIO_BLK_F_DISCARD.bits());
    }
    if cfg & 0x20 != 0 {
        feats |= VirtioFeatures::from_raw(BlkFeatures::VIRTIO_BLK_F_WRITE_ZEROES.bits());
    }
    let mut handler = dev.queue_handler(0, feats).expect("queue 0 exists");
    let model_dev = Dev {
        read_only,
        feat_discard: cfg & 0x10 != 0,
        feat_zeroes: cfg & 0x20 != 0,
        align: (kind == Kind::Direct).then_some(lbs as usize),
    };
    let mut shadow = Shadow {
        bytes: vec![0; CAPACITY as usize],
        known: vec![true; CAPACITY as usize],
    };
    let sectors = CAPACITY / SECTOR;

    for req in 0..16u16 {
        if input.is_empty() {
            break;
        }
        // Header.
        let t = input.u8();
        let ty = match TYPES.get(usize::from(t % 8)) {
            Some(&ty) => ty,
            None => input.u32(),
        };
        let sector_mode = input.u8();
        let sector = if sector_mode & 1 == 0 {
            u64::from(input.u16()) % (sectors + 8)
        } else {
            input.u64()
        };
        let mut readable = Vec::with_capacity(16);
        readable.extend_from_slice(&ty.to_le_bytes());
        readable.extend_from_slice(&input.u32().to_le_bytes());
        readable.extend_from_slice(&sector.to_le_bytes());
        if sector_mode & 2 != 0 {
            // A short header.
            readable.truncate(usize::from(input.u8()) % 16);
        }
        // Data (readable part after the header).
        let data_mode = input.u8();
        match data_mode % 4 {
            0 => {
                let n = usize::from(data_mode >> 2) * 512;
                let seed = input.u8();
                readable.extend((0..n).map(|i| seed.wrapping_add((i * 7 + i / 512) as u8)));
            }
            1 => {
                let n = usize::from(input.u16()) % 0x4000;
                let seed = input.u8();
                readable.extend((0..n).map(|i| seed ^ (i as u8)));
            }
            2 => {
                for _ in 0..(data_mode >> 2) % 8 {
                    let f = input.u8();
                    let s = if f & 1 == 0 {
                        u64::from(input.u16()) % (sectors + 8)
                    } else {
                        input.u64()
                    };
                    let n = if f & 2 == 0 {
                        u32::from(input.u8())
                    } else {
                        input.u32()
                    };
                    let fl = if f & 4 == 0 {
                        u32::from(f >> 7)
                    } else {
                        input.u32()
                    };
                    readable.extend_from_slice(&s.to_le_bytes());
                    readable.extend_from_slice(&n.to_le_bytes());
                    readable.extend_from_slice(&fl.to_le_bytes());
                }
            }
            _ => readable.extend_from_slice(input.bytes(usize::from(data_mode >> 2))),
        }
        // Writable part.
        let write_mode = input.u8();
        let wlen = match write_mode % 4 {
            0 => usize::from(write_mode >> 2) * 512 + 1,
            1 => usize::from(input.u16()) % 0x4000,
            2 => 0,
            _ => usize::from(write_mode >> 2) % 24,
        };
        let mut writable = vec![SENTINEL; wlen];
        let rcuts: Vec<u16> = (0..input.u8() % 8).map(|_| input.u16()).collect();
        let wcuts: Vec<u16> = (0..input.u8() % 8).map(|_| input.u16()).collect();
        let expect = (wlen > 0).then(|| model(&model_dev, &readable, wlen));
        let rsegs = split(&mut readable, &rcuts);
        let wsegs = split(&mut writable, &wcuts);
        // SAFETY: the segments point into `readable` and `writable`, which outlive the chain
        // and are not otherwise accessed until `handle` returns.
        let chain = unsafe { DescriptorChain::from_segments(req, rsegs, wsegs) };
        let used = handler
            .handle(&chain)
            .expect("a guest request never faults the queue");
        drop(chain);
        let used = used as usize;

        let Some(expect) = expect else {
            assert_eq!(used, 0, "no status byte, yet used length {used}");
            assert!(writable.is_empty());
            continue;
        };
        assert!(used <= wlen, "used {used} > writable {wlen}");
        let status = writable[wlen - 1];
        assert!(
            [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP].contains(&status),
            "status byte {status}"
        );
        let data = &writable[..wlen - 1];
        let what = format!("{expect:?}");
        let untouched = |from: usize| {
            assert!(
                data[from..].iter().all(|&b| b == SENTINEL),
                "bytes written past the {from} data bytes reported ({what})"
            )
        };
        match expect {
            Expect::Fail(s) => {
                assert_eq!(status, s, "status");
                assert_eq!(used, 1, "used length of a failed request");
                untouched(0);
            }
            ok => {
                assert_eq!(status, VIRTIO_BLK_S_OK, "status for {ok:?}");
                match ok {
                    Expect::Read { offset, len } => {
                        assert_eq!(used, len + 1);
                        let o = offset as usize;
                        for (i, &b) in data.iter().enumerate() {
                            let want = if kind == Kind::Null {
                                Some(0)
                            } else {
                                shadow.known[o + i].then_some(shadow.bytes[o + i])
                            };
                            if let Some(w) = want {
                                assert_eq!(b, w, "read byte {i} at disk offset {}", o + i);
                            }
                        }
                    }
                    Expect::Write { offset, len } => {
                        assert_eq!(used, 1);
                        untouched(0);
                        let o = offset as usize;
                        shadow.bytes[o..o + len].copy_from_slice(&readable[16..16 + len]);
                        shadow.known[o..o + len].fill(true);
                    }
                    Expect::Zero(ranges) => {
                        assert_eq!(used, 1);
                        for (off, len) in ranges {
                            let (o, n) = (off as usize, len as usize);
                            shadow.bytes[o..o + n].fill(0);
                            shadow.known[o..o + n].fill(true);
                        }
                    }
                    Expect::Discard(ranges) => {
                        assert_eq!(used, 1);
                        for (off, len) in ranges {
                            let (o, n) = (off as usize, len as usize);
                            shadow.known[o..o + n].fill(false);
                        }
                    }
                    Expect::GetId { len } => {
                        assert_eq!(used, len + 1);
                        let mut serial = [0u8; 20];
                        serial[..SERIAL.len()].copy_from_slice(SERIAL.as_bytes());
                        assert_eq!(&data[..len], &serial[..len]);
                        untouched(len);
                    }
                    Expect::Flush => {
                        assert_eq!(used, 1);
                        untouched(0);
                    }
                    Expect::Fail(_) => unreachable!(),
                }
            }
        }
    }
});
