//! Live upgrade: `uvdpa daemon --takeover` hands every device of a running daemon to a new
//! daemon process (a new binary) without its frontends seeing a disconnect.
//!
//! The new daemon connects to the running one's control socket as an IPC secondary (seed
//! 000) and drives these actions, all refused to any other client while one takeover runs:
//!
//! | action | payload | reply (fds) |
//! |---|---|---|
//! | `upgrade.begin` | `{"version"}` | `{"version", "pid", "devices": [DeviceEntry]}` |
//! | `upgrade.backend` | `{"name"}` | `{}` (+ a ram disk's memfd) |
//! | `upgrade.quiesce` | `{}` | `{"devices": {NAME: parts}}`: every device paused |
//! | `upgrade.state` | `{"name", "part"}` | [`StatePart`] (+ up to 8 fds) |
//! | `upgrade.commit` | `{}` | `{}`: the old daemon lets the devices go |
//! | `upgrade.abort` | `{}` | `{}`: the devices resume |
//!
//! The new daemon sets up every backend first (files opened, ram disks mapped from the old
//! daemon's memfds), then asks for the quiesce: the old daemon's sessions stop between two
//! requests with their vrings held (popped requests completed) and leave images of
//! themselves ([`uvdpa_vhost_user::handover`]). The new daemon fetches each device's state
//! in parts (8 fds at most per message), rebuilds every session paused, and commits. Only
//! then does it move its control socket over the old one's and start the vrings: the
//! guest-visible pause runs from the quiesce to that start. The old daemon exits when the
//! new one's IPC connection closes after the commit.
//!
//! Rollback: until the commit, the old daemon owns everything. If the new daemon fails,
//! aborts, or dies (its IPC connection closes), the old one resumes every device where it
//! stopped. After the commit the new daemon owns the devices; if it dies then, frontends
//! see a backend crash, as with any daemon crash (QEMU's `reconnect` and the inflight
//! buffer recover from that).

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tracing::{info, warn};
use uvdpa_ipc::{code, IpcError, Primary, Reply, Secondary};
use uvdpa_vduse::server::{VduseHandover, VduseState};
use uvdpa_vhost_user::handover::{from_wire, to_wire, WireRequest, HANDOVER_VERSION};
use uvdpa_vhost_user::{ServerHandover, SessionHandover};

use crate::config::DeviceEntry;
use crate::registry::{Handed, Registry, RegistryError};

/// How long the old daemon waits for every device to pause.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(5);
/// Timeout of each request the new daemon sends.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests carried by one [`StatePart`].
const REQUESTS_PER_PART: usize = 256;
/// How long the old daemon waits, after the commit, for the new one to hang up before it
/// exits anyway.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// Set once this daemon handed its devices over: it exits without removing anything.
static HANDED_OVER: AtomicBool = AtomicBool::new(false);

/// Whether this daemon handed its devices over to a new one (it is exiting).
pub fn handed_over() -> bool {
    HANDED_OVER.load(Ordering::Acquire)
}

/// One part of a device's state (`upgrade.state`): counters and session facts (in every
/// part), a slice of the session image's requests, and the fds of this part, in this
/// order across parts: for a vhost-user device the listening socket, the stats memfd, the
/// connected socket, then the image's fds; for a VDUSE device the device fd, the stats
/// memfd, then the kick eventfds.
#[derive(Debug, Serialize, Deserialize)]
pub struct StatePart {
    /// Session counters: (connects, disconnects, refused).
    pub counters: (u64, u64, u64),
    /// A frontend is connected (its socket is the third fd).
    pub session: bool,
    /// The frontend's pid.
    pub frontend_pid: Option<u32>,
    /// Requests of the session image in all parts.
    pub requests_total: usize,
    /// Fds in all parts.
    pub fds_total: usize,
    /// This part's requests.
    pub requests: Vec<WireRequest>,
    /// A VDUSE device's state (vhost-user devices: `None`).
    pub vduse: Option<VduseState>,
}

/// A device's state as the old daemon keeps it until it is fetched.
struct DeviceState {
    counters: (u64, u64, u64),
    session: bool,
    frontend_pid: Option<u32>,
    requests: Vec<WireRequest>,
    fds: Vec<OwnedFd>,
    vduse: Option<VduseState>,
}

impl DeviceState {
    fn new(h: Handed) -> Self {
        let h = match h {
            Handed::VhostUser(h) => h,
            Handed::Vduse(v) => {
                let mut fds = vec![v.dev, v.stats];
                fds.extend(v.kicks);
                return Self {
                    counters: (0, 0, 0),
                    session: false,
                    frontend_pid: None,
                    requests: Vec::new(),
                    fds,
                    vduse: Some(v.state),
                };
            }
        };
        let mut fds = vec![h.listener, h.stats];
        let (session, frontend_pid, requests) = match h.session {
            Some(s) => {
                fds.push(s.stream);
                let (wire, image_fds) = to_wire(s.image);
                fds.extend(image_fds);
                (true, s.frontend_pid, wire)
            }
            None => (false, None, Vec::new()),
        };
        Self {
            counters: h.counters,
            session,
            frontend_pid,
            requests,
            fds,
            vduse: None,
        }
    }

    fn parts(&self) -> usize {
        self.fds
            .len()
            .div_ceil(uvdpa_ipc::MAX_FDS)
            .max(self.requests.len().div_ceil(REQUESTS_PER_PART))
            .max(1)
    }

    fn part(&self, k: usize) -> Result<Reply, IpcError> {
        if k >= self.parts() {
            return Err(IpcError::rejected(
                code::EINVAL,
                format!("no part {k} (there are {})", self.parts()),
            ));
        }
        let reqs = self
            .requests
            .iter()
            .skip(k * REQUESTS_PER_PART)
            .take(REQUESTS_PER_PART)
            .cloned()
            .collect();
        let fds = self
            .fds
            .iter()
            .skip(k * uvdpa_ipc::MAX_FDS)
            .take(uvdpa_ipc::MAX_FDS)
            .map(OwnedFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| IpcError::rejected(code::EIO, format!("cannot duplicate: {e}")))?;
        let part = StatePart {
            counters: self.counters,
            session: self.session,
            frontend_pid: self.frontend_pid,
            requests_total: self.requests.len(),
            fds_total: self.fds.len(),
            requests: reqs,
            vduse: self.vduse.clone(),
        };
        let v = serde_json::to_value(&part)
            .map_err(|e| IpcError::rejected(code::EIO, e.to_string()))?;
        Ok(Reply::with_fds(v, fds))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Begun,
    Quiesced,
    Committed,
}

struct Active {
    client: u64,
    pid: i32,
    phase: Phase,
    states: BTreeMap<String, DeviceState>,
}

/// The old daemon's side: the takeover in progress, if any.
pub struct Handover {
    registry: Arc<Registry>,
    active: Mutex<Option<Active>>,
}

fn from_registry(e: RegistryError) -> IpcError {
    IpcError::rejected(e.code(), e.to_string())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BeginArg {
    version: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameArg {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PartArg {
    name: String,
    part: usize,
}

fn payload<T: for<'de> Deserialize<'de>>(v: &Value) -> Result<T, IpcError> {
    serde_json::from_value(v.clone())
        .map_err(|e| IpcError::rejected(code::EINVAL, format!("Invalid payload: {e}")))
}

impl Handover {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Active>> {
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the takeover of `client` if it is in `phase`.
    fn with_active<T>(
        &self,
        client: u64,
        phase: Phase,
        f: impl FnOnce(&mut Active) -> Result<T, IpcError>,
    ) -> Result<T, IpcError> {
        let mut g = self.lock();
        match g.as_mut() {
            Some(a) if a.client == client && a.phase == phase => f(a),
            Some(a) if a.client == client => Err(IpcError::rejected(
                code::EINVAL,
                format!("takeover is at {:?}, not {phase:?}", a.phase),
            )),
            _ => Err(IpcError::rejected(
                code::EINVAL,
                "no takeover begun by this client (upgrade.begin first)",
            )),
        }
    }

    /// The client `client` disconnected: a takeover it began and did not commit is
    /// abandoned (the devices resume); one it committed ends this daemon.
    pub fn client_gone(&self, client: u64) {
        let mut g = self.lock();
        let Some(a) = g.as_ref().filter(|a| a.client == client) else {
            return;
        };
        match a.phase {
            Phase::Begun => {
                info!(pid = a.pid, "takeover abandoned before the quiesce");
                *g = None;
            }
            Phase::Quiesced => {
                warn!(
                    pid = a.pid,
                    "Takeover abandoned: the new daemon went away; resuming every device"
                );
                *g = None;
                drop(g);
                self.registry.resume_all();
            }
            Phase::Committed => {
                info!(pid = a.pid, "handed over to pid {}", a.pid);
                exit_now();
            }
        }
    }
}

/// Ends this daemon after a handover (its main loop sees SIGTERM and skips every cleanup
/// that would touch the devices).
fn exit_now() {
    HANDED_OVER.store(true, Ordering::Release);
    let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::TERM);
}

/// Registers the `upgrade.*` actions on the control socket; call
/// [`Handover::client_gone`] from the primary's disconnect hook.
///
/// # Errors
/// An action could not be registered.
pub fn register(primary: &Primary, registry: Arc<Registry>) -> Result<Arc<Handover>, IpcError> {
    let h = Arc::new(Handover {
        registry,
        active: Mutex::new(None),
    });

    let hh = h.clone();
    primary.register("upgrade.begin", move |req, peer| {
        let a: BeginArg = payload(&req.payload)?;
        if a.version != HANDOVER_VERSION {
            return Err(IpcError::rejected(
                code::EINVAL,
                format!(
                    "handover state version {} is not this daemon's ({HANDOVER_VERSION})",
                    a.version
                ),
            ));
        }
        let mut g = hh.lock();
        if let Some(other) = g.as_ref() {
            return Err(IpcError::rejected(
                -(rustix::io::Errno::BUSY.raw_os_error()),
                format!("a takeover by pid {} is in progress", other.pid),
            ));
        }
        let devices = hh.registry.handover_entries().map_err(from_registry)?;
        *g = Some(Active {
            client: peer.client_id,
            pid: peer.pid,
            phase: Phase::Begun,
            states: BTreeMap::new(),
        });
        info!(pid = peer.pid, devices = devices.len(), "takeover begun");
        Ok(Reply::new(json!({
            "version": HANDOVER_VERSION,
            "pid": std::process::id(),
            "devices": devices,
        })))
    })?;

    let hh = h.clone();
    primary.register("upgrade.backend", move |req, peer| {
        let a: NameArg = payload(&req.payload)?;
        hh.with_active(peer.client_id, Phase::Begun, |_| {
            let fd = hh.registry.ram_fd(&a.name).map_err(from_registry)?;
            Ok(Reply::with_fds(json!({}), fd.into_iter().collect()))
        })
    })?;

    let hh = h.clone();
    primary.register("upgrade.quiesce", move |_, peer| {
        hh.with_active(peer.client_id, Phase::Begun, |a| {
            let t = Instant::now();
            let all = hh
                .registry
                .quiesce_all(QUIESCE_TIMEOUT)
                .map_err(from_registry)?;
            let mut parts = serde_json::Map::new();
            for (name, s) in all {
                let st = DeviceState::new(s);
                parts.insert(name.clone(), json!(st.parts()));
                a.states.insert(name, st);
            }
            a.phase = Phase::Quiesced;
            info!(
                pid = a.pid,
                quiesce_us = t.elapsed().as_micros() as u64,
                "devices paused for takeover"
            );
            Ok(Reply::new(json!({ "devices": parts })))
        })
    })?;

    let hh = h.clone();
    primary.register("upgrade.state", move |req, peer| {
        let a: PartArg = payload(&req.payload)?;
        hh.with_active(peer.client_id, Phase::Quiesced, |act| {
            act.states
                .get(&a.name)
                .ok_or_else(|| IpcError::rejected(code::EINVAL, format!("no device {:?}", a.name)))?
                .part(a.part)
        })
    })?;

    let hh = h.clone();
    primary.register("upgrade.commit", move |_, peer| {
        hh.with_active(peer.client_id, Phase::Quiesced, |a| {
            a.phase = Phase::Committed;
            a.states.clear();
            hh.registry.detach_all();
            info!(pid = a.pid, "takeover committed: devices let go");
            Ok(())
        })?;
        // The new daemon hangs up once it serves; exit then, or after a grace period.
        std::thread::spawn(|| {
            std::thread::sleep(EXIT_GRACE);
            exit_now();
        });
        Ok(Reply::new(json!({})))
    })?;

    let hh = h.clone();
    primary.register("upgrade.abort", move |_, peer| {
        let mut g = hh.lock();
        if g.as_ref()
            .is_some_and(|a| a.client == peer.client_id && a.phase != Phase::Committed)
        {
            *g = None;
            drop(g);
            hh.registry.resume_all();
            info!(pid = peer.pid, "takeover aborted: devices resumed");
            return Ok(Reply::new(json!({})));
        }
        Err(IpcError::rejected(
            code::EINVAL,
            "no takeover of this client to abort",
        ))
    })?;
    Ok(h)
}

/// What a takeover did.
pub struct TakenOver {
    /// The old daemon's pid.
    pub from_pid: u32,
    /// Devices taken over.
    pub devices: usize,
    /// From the quiesce request to the vrings started here: the guest-visible pause.
    pub pause: Duration,
    /// This daemon's control socket, moved to the run directory's `uvdpa.ctl`.
    pub primary: Primary,
}

fn ipc(what: &str) -> impl Fn(IpcError) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// The new daemon's side: takes every device over from the daemon serving `run_dir`, into
/// `registry`, and serves the control socket (made by `serve_ctl` at a temporary path,
/// moved over the old one's). Returns when the devices run here.
///
/// # Errors
/// Why the takeover failed; the old daemon then goes on serving everything.
pub fn takeover(
    run_dir: &Path,
    registry: &Arc<Registry>,
    serve_ctl: impl FnOnce(&Path) -> Result<Primary, IpcError>,
) -> Result<TakenOver, String> {
    let ctl = run_dir.join(crate::ctl::CTL_NAME);
    let old = Secondary::connect(&ctl)
        .map_err(|e| format!("Cannot reach the running daemon at {}: {e}", ctl.display()))?;
    let call = |action: &str, v: Value| old.request_sync(action, &v, &[], REQUEST_TIMEOUT);
    let begin = call("upgrade.begin", json!({ "version": HANDOVER_VERSION }))
        .map_err(ipc("upgrade.begin refused"))?;
    let from_pid = begin.payload["pid"].as_u64().unwrap_or(0) as u32;
    let entries: Vec<DeviceEntry> = serde_json::from_value(begin.payload["devices"].clone())
        .map_err(|e| format!("upgrade.begin: bad device list: {e}"))?;
    info!(from_pid, devices = entries.len(), "taking over");

    // Backends first, while the old daemon still serves.
    let mut prepared = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        let spec = entry
            .validate(i)
            .map_err(|e| format!("device {i} from the old daemon: {e}"))?;
        let ram = call("upgrade.backend", json!({ "name": spec.name }))
            .map_err(ipc("upgrade.backend"))?
            .fds
            .into_iter()
            .next();
        prepared.push(
            registry
                .prepare_with(spec, ram)
                .map_err(|e| e.to_string())?,
        );
    }
    let tmp: PathBuf = run_dir.join(format!(
        "{}.takeover-{}",
        crate::ctl::CTL_NAME,
        std::process::id()
    ));
    let primary = serve_ctl(&tmp)
        .map_err(|e| format!("Cannot open a control socket at {}: {e}", tmp.display()))?;

    let t0 = Instant::now();
    let q = call("upgrade.quiesce", json!({})).map_err(ipc("upgrade.quiesce refused"))?;
    let adopted = adopt_all(&old, registry, prepared, &q.payload);
    let adopted = adopted.and_then(|n| {
        if std::env::var("UVDPA_TAKEOVER_ABORT").as_deref() == Ok("quiesced") {
            eprintln!("UVDPA_TAKEOVER_ABORT=quiesced: aborting before the commit");
            std::process::abort();
        }
        call("upgrade.commit", json!({}))
            .map_err(ipc("upgrade.commit refused"))
            .map(|_| n)
    });
    let devices = match adopted {
        Ok(n) => n,
        Err(e) => {
            // Give up without touching the frontends; the old daemon resumes them.
            registry.detach_all();
            let _ = call("upgrade.abort", json!({}));
            return Err(e);
        }
    };
    if let Err(e) = primary.move_to(&ctl) {
        warn!(
            "Control socket not moved to {}: {e}; it stays at {}",
            ctl.display(),
            tmp.display()
        );
    }
    registry.resume_all();
    let pause = t0.elapsed();
    drop(old);
    info!(
        from_pid,
        devices,
        pause_us = pause.as_micros() as u64,
        "takeover complete"
    );
    Ok(TakenOver {
        from_pid,
        devices,
        pause,
        primary,
    })
}

/// Fetches each paused device's state and rebuilds it here, paused. Returns the number of
/// devices.
fn adopt_all(
    old: &Secondary,
    registry: &Arc<Registry>,
    prepared: Vec<crate::registry::Prepared>,
    quiesced: &Value,
) -> Result<usize, String> {
    let n = prepared.len();
    for p in prepared {
        let name = p.name().to_string();
        let parts = quiesced["devices"][&name]
            .as_u64()
            .ok_or_else(|| format!("the old daemon did not pause {name}"))?;
        let (mut requests, mut fds) = (Vec::new(), Vec::new());
        let mut head: Option<StatePart> = None;
        for k in 0..parts {
            let r = old
                .request_sync(
                    "upgrade.state",
                    &json!({ "name": name, "part": k }),
                    &[],
                    REQUEST_TIMEOUT,
                )
                .map_err(ipc("upgrade.state"))?;
            let mut part: StatePart = serde_json::from_value(r.payload)
                .map_err(|e| format!("{name}: bad state part {k}: {e}"))?;
            requests.append(&mut part.requests);
            fds.extend(r.fds);
            head.get_or_insert(part);
        }
        let head = head.ok_or_else(|| format!("{name}: no state"))?;
        if fds.len() != head.fds_total || requests.len() != head.requests_total {
            return Err(format!(
                "{name}: state incomplete ({} of {} fds, {} of {} requests)",
                fds.len(),
                head.fds_total,
                requests.len(),
                head.requests_total
            ));
        }
        let need = 2 + usize::from(head.session);
        if fds.len() < need {
            return Err(format!(
                "{name}: {} fds, at least {need} expected",
                fds.len()
            ));
        }
        let mut fds = fds.into_iter();
        let (Some(first), Some(stats)) = (fds.next(), fds.next()) else {
            return Err(format!("{name}: no listener/device or stats fd"));
        };
        if let Some(state) = head.vduse {
            let h = VduseHandover {
                dev: first,
                kicks: fds.collect(),
                stats,
                state,
            };
            registry
                .adopt(p, Handed::Vduse(h))
                .map_err(|e| e.to_string())?;
            continue;
        }
        let listener = first;
        let session = match head.session {
            true => {
                let stream = fds
                    .next()
                    .ok_or_else(|| format!("{name}: no session socket"))?;
                let image =
                    from_wire(requests, fds.collect()).map_err(|e| format!("{name}: {e}"))?;
                Some(SessionHandover {
                    stream,
                    image,
                    frontend_pid: head.frontend_pid,
                })
            }
            false => None,
        };
        let h = ServerHandover {
            listener,
            stats,
            counters: head.counters,
            session,
        };
        registry
            .adopt(p, Handed::VhostUser(h))
            .map_err(|e| e.to_string())?;
    }
    Ok(n)
}
