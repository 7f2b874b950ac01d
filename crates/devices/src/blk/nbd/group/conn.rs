//! The connection of [`NbdGroup`]: losing it, reconnecting with backoff, request
//! timeouts and the reconnect window, the timer armed at the next deadline, and the
//! flush sent on its own at stop.

use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use rustix::event::epoll;
use rustix::time::{timerfd_settime, Itimerspec, TimerfdTimerFlags};
use uvdpa_virtio::worker::{WorkerCtl, WorkerQueue};

use super::super::super::request::VIRTIO_BLK_S_IOERR;
use super::super::handshake;
use super::super::proto::{encode_request, Cmd, TransmissionFlags, REQUEST_LEN, SIMPLE_REPLY_LEN};
use super::super::RECONNECT_HANDSHAKE_TIMEOUT;
use super::{
    timespec, Conn, Done, Lost, NbdGroup, PartState, Rx, BACKOFF_MAX, BACKOFF_START, EV_SOCKET,
    INTERNAL_COOKIE,
};

impl NbdGroup {
    /// Drops the connection: every unanswered part goes back to waiting.
    pub(super) fn lose(&mut self, why: &str) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        let _ = epoll::delete(&self.ep, &conn.fd);
        let healthy = conn.healthy;
        drop(conn);
        self.tx.clear();
        self.tx_off = 0;
        self.rx = Rx::Header {
            have: 0,
            need: SIMPLE_REPLY_LEN,
        };
        for slot in &mut self.slots {
            if slot.cmd.is_none() {
                continue;
            }
            for p in &mut slot.parts {
                if p.state != PartState::Done {
                    p.state = PartState::Queued;
                    p.received = 0;
                }
            }
        }
        if self.internal == Some(None) {
            self.internal = None;
        }
        let now = Instant::now();
        self.down_since = Some(now);
        if healthy {
            self.next_attempt = now;
            self.backoff = BACKOFF_START;
        } else {
            self.next_attempt = now + self.backoff;
            self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        }
        self.attempts = 0;
        tracing::warn!(
            uri = %self.spec.uri,
            in_flight = self.busy,
            reconnect_delay = ?self.spec.reconnect_delay,
            "NBD connection lost: {why}; reconnecting"
        );
    }

    /// Tries to connect (blocking at most `limit`); on success queues every unanswered
    /// part again, oldest request first.
    pub(super) fn reconnect(&mut self, limit: Duration) {
        let now = Instant::now();
        let timeout = RECONNECT_HANDSHAKE_TIMEOUT
            .min(self.spec.timeout)
            .min(limit);
        if timeout.is_zero() {
            return;
        }
        match handshake::connect(&self.spec.uri, timeout) {
            Ok((fd, info)) => {
                if let Err(e) = epoll::add(
                    &self.ep,
                    &fd,
                    epoll::EventData::new_u64(EV_SOCKET),
                    epoll::EventFlags::IN,
                ) {
                    tracing::warn!(uri = %self.spec.uri, "Watching the NBD socket failed: {e}");
                    self.next_attempt = now + self.backoff;
                    return;
                }
                let capacity = self.blk.limits().capacity;
                if info.size < capacity {
                    tracing::warn!(
                        uri = %self.spec.uri,
                        size = info.size,
                        capacity,
                        "the NBD export shrank: requests past its end will fail"
                    );
                }
                if self.connected_once {
                    tracing::info!(uri = %self.spec.uri, requeued = self.busy, "NBD connection re-established");
                } else {
                    tracing::debug!(uri = %self.spec.uri, "NBD connection established");
                }
                self.connected_once = true;
                self.info = info;
                self.conn = Some(Conn {
                    fd,
                    info,
                    want_out: false,
                    healthy: false,
                });
                self.down_since = None;
                self.attempts = 0;
                let mut order: Vec<(Instant, usize)> = self
                    .slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.cmd.is_some())
                    .map(|(i, s)| (s.started.unwrap_or(now), i))
                    .collect();
                order.sort_unstable();
                for (_, i) in order {
                    let n = self.slots.get(i).map_or(0, |s| s.parts.len());
                    for k in 0..n {
                        if self
                            .slots
                            .get(i)
                            .and_then(|s| s.parts.get(k))
                            .is_some_and(|p| p.state == PartState::Queued)
                        {
                            self.tx.push_back((i, k));
                        }
                    }
                }
            }
            Err(e) => {
                self.attempts += 1;
                tracing::debug!(uri = %self.spec.uri, attempts = self.attempts, "NBD reconnect failed: {}", error_chain(&e));
                if self.attempts == 1 || self.attempts % 10 == 0 {
                    tracing::warn!(
                        uri = %self.spec.uri,
                        attempts = self.attempts,
                        "NBD reconnect failed: {}",
                        error_chain(&e)
                    );
                }
                self.next_attempt = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
            }
        }
    }

    /// Timeouts, the reconnect window, reconnect attempts. `limit` bounds the blocking
    /// time of a reconnect attempt.
    pub(super) fn maintain(
        &mut self,
        queues: &mut [WorkerQueue],
        done: &mut Done,
        limit: Duration,
    ) {
        let now = Instant::now();
        let timeout = self.spec.timeout;
        let expired: Vec<usize> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                s.cmd.is_some() && s.started.is_some_and(|t| now.duration_since(t) >= timeout)
            })
            .map(|(i, _)| i)
            .collect();
        if !expired.is_empty() {
            for &i in &expired {
                let head = self.slots.get(i).map_or(0, |s| s.chain.head());
                self.blk.log_failure(
                    head,
                    &super::super::super::request::RequestError::Io(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no NBD reply within {timeout:?}"),
                    )),
                );
                self.complete(i, VIRTIO_BLK_S_IOERR, Some(queues), done);
            }
            if self.conn.is_some() {
                self.lose(&format!(
                    "{} request(s) timed out after {timeout:?}",
                    expired.len()
                ));
            }
        }
        if self.conn.is_none() && self.busy > 0 {
            if Instant::now() >= self.next_attempt {
                self.reconnect(limit);
            }
            if self.conn.is_none() {
                let over = self
                    .down_since
                    .map_or(true, |t| Instant::now() >= t + self.spec.reconnect_delay);
                if over {
                    let waiting = self.waiting_slots();
                    for i in waiting {
                        self.complete(i, VIRTIO_BLK_S_IOERR, Some(queues), done);
                    }
                }
            }
        }
    }

    /// Arms the timer at the next deadline (or disarms it).
    pub(super) fn arm_timer(&self) {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        let mut at = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        for s in &self.slots {
            if let (Some(_), Some(t)) = (s.cmd, s.started) {
                at(t + self.spec.timeout);
            }
        }
        if self.conn.is_none() && self.busy > 0 {
            at(self.next_attempt);
            if let Some(t) = self.down_since {
                at(t + self.spec.reconnect_delay);
            }
        }
        let value = match next {
            None => Duration::ZERO,
            Some(t) => t
                .saturating_duration_since(now)
                .max(Duration::from_millis(1)),
        };
        let spec = Itimerspec {
            it_interval: timespec(Duration::ZERO),
            it_value: timespec(value),
        };
        let _ = timerfd_settime(&self.timer, TimerfdTimerFlags::empty(), &spec);
        // Reading clears an expiry that happened before the new setting.
        let mut b = [0u8; 8];
        let _ = rustix::io::read(&self.timer, &mut b);
    }

    /// At stop: the group's own flush, if it wrote since the last one.
    pub(super) fn final_flush(
        &mut self,
        queues: &mut [WorkerQueue],
        ctl: &WorkerCtl,
        end: Instant,
    ) {
        let flushes = self
            .conn
            .as_ref()
            .is_some_and(|c| c.info.flags.contains(TransmissionFlags::SEND_FLUSH));
        if !self.dirty || !flushes {
            return;
        }
        let mut hdr = [0u8; REQUEST_LEN];
        encode_request(&mut hdr, 0, Cmd::Flush, INTERNAL_COOKIE, 0, 0);
        self.internal = Some(None);
        self.internal_sent = false;
        let fd = match self.conn.as_ref() {
            Some(c) => c.fd.as_raw_fd(),
            None => return,
        };
        // Blocking is fine here: a 28-byte write to a socket whose queue was drained.
        let mut off = 0;
        while off < REQUEST_LEN && Instant::now() < end {
            let Some(rest) = hdr.get(off..) else { break };
            // SAFETY: `rest` is a live byte slice.
            let n = unsafe {
                libc::send(
                    fd,
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                off += n as usize;
            } else if io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN) {
                self.ep_wait(Duration::from_millis(10));
            } else {
                break;
            }
        }
        self.internal_sent = off == REQUEST_LEN;
        while self.internal == Some(None)
            && self.internal_sent
            && Instant::now() < end
            && !ctl.abandoned()
        {
            self.ep_wait(
                end.saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(50)),
            );
            let mut done = Done::default();
            if let Err(Lost(why)) = self.receive(queues, &mut done) {
                self.lose(&why);
            }
        }
        match self.internal {
            Some(Some(true)) => self.dirty = false,
            _ => {
                tracing::warn!(uri = %self.spec.uri, "Flushing the NBD export at queue stop failed or timed out")
            }
        }
        self.internal = None;
        self.internal_sent = false;
    }
}

/// `e` and its sources, `: `-separated.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
