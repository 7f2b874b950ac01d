//! Taking requests into [`NbdGroup`]: popping chains from the rings into slots, making
//! each request's parts (NBD commands, with their cookies and encoded headers), and
//! completing slots into the used rings.

use std::io;
use std::time::Instant;

use uvdpa_virtio::worker::{WorkerCtl, WorkerError, WorkerQueue};

use super::super::super::request::{
    parse, zero_segment, Request, HEADER_LEN, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
};
use super::super::proto::{encode_request, Cmd, TransmissionFlags, CMD_FLAG_DF, CMD_FLAG_NO_HOLE};
use super::{append_range, Done, NbdGroup, Part, Slot, Started, MAX_PARTS};

fn cookie(gen: u16, slot: usize, part: usize) -> u64 {
    (u64::from(gen) << 48) | ((slot as u64 & 0xffff) << 32) | (part as u64 & 0xffff_ffff)
}

impl NbdGroup {
    /// Takes a free slot for a request of queue `queue`, if the queue has room.
    fn take_slot(&mut self, q: &WorkerQueue) -> Option<usize> {
        if self.busy_of(q.index) >= Self::depth(q)
            || self.slots.len() >= u16::MAX as usize && self.free.is_empty()
        {
            return None;
        }
        if let Some(i) = self.free.pop() {
            return Some(i);
        }
        self.slots.push(Slot::default());
        Some(self.slots.len() - 1)
    }

    /// Writes slot `i`'s status byte, adds its used entry to `done`, frees it.
    pub(super) fn complete(
        &mut self,
        i: usize,
        status: u8,
        queues: Option<&mut [WorkerQueue]>,
        done: &mut Done,
    ) {
        let Some(slot) = self.slots.get_mut(i) else {
            return;
        };
        if !slot.in_use {
            return;
        }
        slot.in_use = false;
        slot.cmd = None;
        let queue = slot.queue;
        let started = slot.started.take();
        let written = if status == VIRTIO_BLK_S_OK {
            slot.read_len
        } else {
            0
        };
        let used = match slot.chain.writable_len().checked_sub(1) {
            Some(status_at) => {
                slot.chain.write_at(status_at as usize, &[status]);
                if let Some(t) = started {
                    self.blk.traced(queue, &slot.chain, t, status);
                }
                u32::try_from(written).unwrap_or(status_at).min(status_at) + 1
            }
            None => 0,
        };
        slot.parts.clear();
        slot.pending = 0;
        if let Some(queues) = queues {
            if let Some(q) = queues.iter_mut().find(|q| q.index == queue) {
                q.queue.add_used(&slot.chain, used);
                done.add(queue, u64::from(slot.chain.readable_len()), u64::from(used));
            }
            if let Some(t) = started {
                self.blk.record_latency(t);
            }
        }
        self.busy = self.busy.saturating_sub(1);
        self.add_busy(queue, -1);
        self.free.push(i);
    }

    /// Sets up the parts of the request just popped into slot `i`; returns its status when
    /// it is already complete (GET_ID, a request that fails parsing, an empty transfer, a
    /// flush or discard the export does not need).
    fn start(&mut self, i: usize) -> Result<Started, WorkerError> {
        let limits = self.blk.limits();
        let info = self.conn.as_ref().map_or(self.info, |c| c.info);
        let Some(slot) = self.slots.get_mut(i) else {
            return Ok(Started::Done(VIRTIO_BLK_S_IOERR));
        };
        slot.gen = slot.gen.wrapping_add(1);
        slot.parts.clear();
        slot.read_len = 0;
        slot.started = Some(Instant::now());
        let req = match slot.chain.writable_len() {
            0 => None,
            _ => parse(&slot.chain, &limits).ok(),
        };
        let min = u64::from(info.min_block.max(1));
        let aligned = |o: u64, l: u64| o % min == 0 && l % min == 0;
        let cmd = match req {
            Some(Request::In { offset, len } | Request::Out { offset, len }) => {
                if len == 0 {
                    return Ok(Started::Done(VIRTIO_BLK_S_OK));
                }
                if !aligned(offset, len as u64) {
                    self.blk.log_failure(
                        slot.chain.head(),
                        &super::super::super::request::RequestError::Io(io::Error::other(format!(
                            "offset {offset} or length {len} is not a multiple of the export's minimum block size {min}"
                        ))),
                    );
                    return Ok(Started::Done(VIRTIO_BLK_S_IOERR));
                }
                let read = matches!(req, Some(Request::In { .. }));
                slot.iov.clear();
                if read {
                    append_range(&mut slot.iov, slot.chain.writable(), 0, len);
                    slot.read_len = len;
                } else {
                    append_range(&mut slot.iov, slot.chain.readable(), HEADER_LEN, len);
                }
                slot.data_offset = offset;
                let step = u64::from(info.max_payload.max(1));
                if (len as u64).div_ceil(step) > MAX_PARTS {
                    self.blk.log_failure(
                        slot.chain.head(),
                        &super::super::super::request::RequestError::Io(io::Error::other(format!(
                            "length {len} needs more than {MAX_PARTS} commands of the export's maximum payload {step}"
                        ))),
                    );
                    return Ok(Started::Done(VIRTIO_BLK_S_IOERR));
                }
                let mut at = 0u64;
                while at < len as u64 {
                    let n = step.min(len as u64 - at);
                    slot.parts.push(Part {
                        offset: offset + at,
                        len: n as u32,
                        flags: if read && info.flags.contains(TransmissionFlags::SEND_DF) {
                            CMD_FLAG_DF
                        } else {
                            0
                        },
                        ..Part::default()
                    });
                    at += n;
                }
                if read {
                    Cmd::Read
                } else {
                    Cmd::Write
                }
            }
            Some(Request::Flush) => {
                if !info.flags.contains(TransmissionFlags::SEND_FLUSH) {
                    // No cache at the server: nothing to flush.
                    return Ok(Started::Done(VIRTIO_BLK_S_OK));
                }
                slot.parts.push(Part::default());
                Cmd::Flush
            }
            Some(Request::Discard { count } | Request::WriteZeroes { count }) => {
                let write_zeroes = matches!(req, Some(Request::WriteZeroes { .. }));
                let needed = if write_zeroes {
                    TransmissionFlags::SEND_WRITE_ZEROES
                } else {
                    TransmissionFlags::SEND_TRIM
                };
                if !info.flags.contains(needed) {
                    // A discard is a hint; write-zeroes must not silently do nothing.
                    return Ok(Started::Done(if write_zeroes {
                        VIRTIO_BLK_S_IOERR
                    } else {
                        VIRTIO_BLK_S_OK
                    }));
                }
                for seg in 0..count {
                    let r = match zero_segment(&slot.chain, seg, write_zeroes, &limits) {
                        Ok(r) => r,
                        Err(e) => {
                            self.blk.log_failure(slot.chain.head(), &e);
                            return Ok(Started::Done(super::super::super::request::status(&e)));
                        }
                    };
                    let (offset, len) = if write_zeroes {
                        if !aligned(r.offset, r.len) {
                            return Ok(Started::Done(VIRTIO_BLK_S_IOERR));
                        }
                        (r.offset, r.len)
                    } else {
                        // A trim may shrink to the blocks it covers entirely.
                        let start = r.offset.div_ceil(min) * min;
                        let end = (r.offset + r.len) / min * min;
                        (start, end.saturating_sub(start))
                    };
                    if len == 0 {
                        continue;
                    }
                    slot.parts.push(Part {
                        offset,
                        len: u32::try_from(len).unwrap_or(u32::MAX),
                        flags: if write_zeroes && !r.unmap {
                            CMD_FLAG_NO_HOLE
                        } else {
                            0
                        },
                        ..Part::default()
                    });
                }
                if slot.parts.is_empty() {
                    return Ok(Started::Done(VIRTIO_BLK_S_OK));
                }
                if write_zeroes {
                    Cmd::WriteZeroes
                } else {
                    Cmd::Trim
                }
            }
            Some(Request::GetId { .. }) | None => {
                // GET_ID, or a request that fails parsing: the synchronous path answers
                // (it writes the status byte itself).
                let used = self.blk.handle_on(slot.queue, &slot.chain);
                return Ok(Started::Sync(used));
            }
        };
        slot.cmd = Some(cmd);
        slot.pending = slot.parts.len();
        let gen = slot.gen;
        for (k, p) in slot.parts.iter_mut().enumerate() {
            encode_request(&mut p.hdr, p.flags, cmd, cookie(gen, i, k), p.offset, p.len);
        }
        if self.conn.is_some() {
            for k in 0..self.slots.get(i).map_or(0, |s| s.parts.len()) {
                self.tx.push_back((i, k));
            }
        }
        Ok(Started::InFlight)
    }

    /// Pops chains into free slots and starts them; returns how many were popped.
    pub(super) fn fill(
        &mut self,
        queues: &mut [WorkerQueue],
        ctl: &WorkerCtl,
        done: &mut Done,
    ) -> Result<usize, WorkerError> {
        let mut popped = 0;
        for qi in 0..queues.len() {
            while let Some(q) = queues.get_mut(qi) {
                let Some(i) = self.take_slot(q) else { break };
                let got = match self.slots.get_mut(i) {
                    Some(slot) => q.queue.pop(&mut slot.chain),
                    None => Ok(false),
                };
                match got {
                    Ok(true) => {}
                    Ok(false) => {
                        self.free.push(i);
                        break;
                    }
                    Err(e) => {
                        self.free.push(i);
                        return Err(e.into());
                    }
                }
                popped += 1;
                let index = q.index;
                if let Some(slot) = self.slots.get_mut(i) {
                    slot.queue = index;
                    slot.in_use = true;
                    slot.cmd = None;
                }
                self.busy += 1;
                self.add_busy(index, 1);
                match self.start(i)? {
                    Started::InFlight => {}
                    Started::Sync(used) => {
                        if ctl.abandoned() {
                            return Err(WorkerError::Abandoned);
                        }
                        self.finish_sync(i, used, queues, done);
                    }
                    Started::Done(status) => {
                        if status != VIRTIO_BLK_S_OK {
                            if let Some(slot) = self.slots.get_mut(i) {
                                slot.read_len = 0;
                            }
                        }
                        self.complete(i, status, Some(queues), done);
                    }
                }
            }
        }
        Ok(popped)
    }

    /// Completes slot `i`, answered by
    /// [`BlkQueue::handle_on`](super::super::super::queue::BlkQueue::handle_on) (status written;
    /// `used` is the used length it returned, its latency counted).
    fn finish_sync(&mut self, i: usize, used: u32, queues: &mut [WorkerQueue], done: &mut Done) {
        let Some(slot) = self.slots.get_mut(i) else {
            return;
        };
        slot.in_use = false;
        slot.started = None;
        let queue = slot.queue;
        if let Some(q) = queues.iter_mut().find(|q| q.index == queue) {
            q.queue.add_used(&slot.chain, used);
            done.add(queue, u64::from(slot.chain.readable_len()), u64::from(used));
        }
        self.busy = self.busy.saturating_sub(1);
        self.add_busy(queue, -1);
        self.free.push(i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_name_generation_slot_and_part() {
        let c = cookie(0xbeef, 513, 7);
        assert_eq!(c >> 48, 0xbeef);
        assert_eq!((c >> 32) & 0xffff, 513);
        assert_eq!(c & 0xffff_ffff, 7);
        assert_ne!(cookie(u16::MAX, 0xffff, 0xffff_ffff), 0);
    }
}
