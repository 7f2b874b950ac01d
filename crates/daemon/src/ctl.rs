//! The daemon's control socket (the primary, seed 000): named actions over `uvdpa-ipc`,
//! each validating its payload and answering every request, errors included.
//!
//! | action | request payload | reply payload (fds) |
//! |---|---|---|
//! | `mgmtdev.show` | — | `{"mgmtdev": [MgmtdevView]}` |
//! | `dev.add` | `DeviceEntry` (a config-file `[[device]]` table as JSON) | `{"dev": DeviceView}` |
//! | `dev.del` | `{"name"}` | `{}` |
//! | `dev.show` | `{"name": null or NAME}` | `{"dev": [DeviceView]}` |
//! | `dev.config.show` | `{"name"}` | `{"config": BlkConfigView or NetConfigView}` |
//! | `dev.vstats.show` | `{"name", "qidx"}` | `{"vstats": VstatsView or NetVstatsView, "queues": N}` (+ the stats memfd) |
//! | `dev.irq.show` | `{"name"}` | `{"name", "vectors": [VectorView]}` |
//! | `dev.irq.trigger` | `{"name", "vec"}` | `{"name", "vec", "sent"}` |
//! | `dev.set` | `{"name", "qidx", "usecs", "frames"}` (coalescing) | `{}` |
//! | `dev.set` | `{"name", "capacity"}` (blk: bytes) | `{"dev": DeviceView, "notified"}` |
//! | `res.show` | `{"type": null or TYPE}` | `{"counts": {TYPE: N}, "entries": [EntryInfo]}` |
//! | `upgrade.*` | see [`crate::upgrade`] (live upgrade: `uvdpa daemon --takeover`) | |
//! | `dev.capture` | `{"name", "qidx": null or N, "snaplen": null or N}` | `{"capture": CaptureView}` (+ the capture ring's memfd: net frames, or blk request trace records); detached when this client disconnects |

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use serde_json::{json, Value};
use uvdpa_ipc::{code, IpcError, Primary, Reply, Request};
use uvdpa_restrack::{Owner, ResHandle, ResType};

use crate::config::DeviceEntry;
use crate::registry::{mgmtdevs, Registry, RegistryError, CAPTURE_DEFAULT_SNAPLEN};

/// The control socket's file name inside the run directory.
pub const CTL_NAME: &str = "uvdpa.ctl";

fn bad_payload(e: serde_json::Error) -> IpcError {
    IpcError::rejected(code::EINVAL, format!("Invalid payload: {e}"))
}

fn from_registry(e: RegistryError) -> IpcError {
    IpcError::rejected(e.code(), e.to_string())
}

fn payload<T: for<'de> Deserialize<'de>>(req: &Request) -> Result<T, IpcError> {
    serde_json::from_value(req.payload.clone()).map_err(bad_payload)
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Value, IpcError> {
    serde_json::to_value(v).map_err(|e| IpcError::rejected(code::EIO, e.to_string()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameArg {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OptNameArg {
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VstatsArg {
    name: String,
    qidx: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VecArg {
    name: String,
    vec: u32,
}

/// `dev.set`: either a queue's coalescing (`qidx`, `usecs`, `frames`) or a blk device's
/// capacity in bytes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetArg {
    name: String,
    #[serde(default)]
    qidx: Option<u32>,
    #[serde(default)]
    usecs: Option<u32>,
    #[serde(default)]
    frames: Option<u32>,
    #[serde(default)]
    capacity: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaptureArg {
    name: String,
    #[serde(default)]
    qidx: Option<u32>,
    #[serde(default)]
    snaplen: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResArg {
    #[serde(default, rename = "type")]
    ty: Option<String>,
}

/// Binds the control socket and registers every action.
///
/// # Errors
/// Binding failed (another daemon owns the run directory, permissions).
pub fn serve(run_dir: &Path, registry: Arc<Registry>) -> Result<Primary, IpcError> {
    serve_at(&run_dir.join(CTL_NAME), registry)
}

/// As [`serve`], with the socket at `path` (a daemon taking over binds beside the old
/// one's socket and moves its own over it when it has taken over).
///
/// # Errors
/// As [`serve`].
pub fn serve_at(path: &Path, registry: Arc<Registry>) -> Result<Primary, IpcError> {
    // Actions are registered before anyone is served (a CLI started right after the
    // daemon would otherwise race the registrations).
    let primary = Primary::bind_unstarted(path)?;
    let handover = crate::upgrade::register(&primary, registry.clone())?;

    // Every IPC client is a tracked resource while it is connected.
    let clients: Arc<Mutex<HashMap<u64, ResHandle>>> = Arc::default();
    let (tracker, c) = (registry.tracker().clone(), clients.clone());
    primary.on_connect(move |peer| {
        let owner = Owner::of_pid(u32::try_from(peer.pid).unwrap_or(0));
        let h = tracker.create(
            ResType::IpcClient,
            format!("client-{}", peer.client_id),
            None,
            owner,
        );
        h.add();
        c.lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer.client_id, h);
    });
    let r = registry.clone();
    primary.on_disconnect(move |peer| {
        // A capture lives as long as its client's connection: a CLI that exits, even
        // killed, closes the socket and the capture is detached here.
        r.capture_stop(peer.client_id);
        // A takeover its client began and did not commit is rolled back; a committed
        // one ends this daemon.
        handover.client_gone(peer.client_id);
        clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&peer.client_id);
    });

    primary.register("mgmtdev.show", |_, _| {
        Ok(Reply::new(json!({ "mgmtdev": mgmtdevs() })))
    })?;

    let r = registry.clone();
    primary.register("dev.add", move |req, _| {
        let entry: DeviceEntry = payload(req)?;
        let spec = entry
            .validate(0)
            .map_err(|e| IpcError::rejected(code::EINVAL, e.to_string()))?;
        let view = r.add(spec).map_err(from_registry)?;
        Ok(Reply::new(json!({ "dev": to_json(&view)? })))
    })?;

    let r = registry.clone();
    primary.register("dev.del", move |req, _| {
        let a: NameArg = payload(req)?;
        r.del(&a.name).map_err(from_registry)?;
        Ok(Reply::new(json!({})))
    })?;

    let r = registry.clone();
    primary.register("dev.show", move |req, _| {
        let a: OptNameArg = payload(req)?;
        let views = r.show(a.name.as_deref()).map_err(from_registry)?;
        Ok(Reply::new(json!({ "dev": to_json(&views)? })))
    })?;

    let r = registry.clone();
    primary.register("dev.config.show", move |req, _| {
        let a: NameArg = payload(req)?;
        let c = r.config(&a.name).map_err(from_registry)?;
        Ok(Reply::new(json!({ "config": to_json(&c)? })))
    })?;

    let r = registry.clone();
    primary.register("dev.vstats.show", move |req, _| {
        let a: VstatsArg = payload(req)?;
        let (view, fd, queues) = r.vstats(&a.name, a.qidx).map_err(from_registry)?;
        let body = json!({ "vstats": to_json(&view)?, "queues": queues });
        Ok(Reply::with_fds(body, fd.into_iter().collect()))
    })?;

    let r = registry.clone();
    primary.register("dev.irq.show", move |req, _| {
        let a: NameArg = payload(req)?;
        let v = r.irq_show(&a.name).map_err(from_registry)?;
        Ok(Reply::new(
            json!({ "name": a.name, "vectors": to_json(&v)? }),
        ))
    })?;

    let r = registry.clone();
    primary.register("dev.irq.trigger", move |req, _| {
        let a: VecArg = payload(req)?;
        let sent = r.irq_trigger(&a.name, a.vec).map_err(from_registry)?;
        Ok(Reply::new(
            json!({ "name": a.name, "vec": a.vec, "sent": sent }),
        ))
    })?;

    let r = registry.clone();
    primary.register("dev.set", move |req, _| {
        let a: SetArg = payload(req)?;
        match (a.capacity, a.qidx, a.usecs, a.frames) {
            (Some(bytes), None, None, None) => {
                let (view, notified) = r.set_capacity(&a.name, bytes).map_err(from_registry)?;
                Ok(Reply::new(
                    json!({ "dev": to_json(&view)?, "notified": notified }),
                ))
            }
            (None, Some(qidx), Some(usecs), Some(frames)) => {
                r.set_coalesce(&a.name, qidx, usecs, frames)
                    .map_err(from_registry)?;
                Ok(Reply::new(json!({})))
            }
            _ => Err(IpcError::rejected(
                code::EINVAL,
                "Invalid payload: dev.set takes {name, qidx, usecs, frames} or {name, capacity}"
                    .to_string(),
            )),
        }
    })?;

    let r = registry.clone();
    primary.register("dev.capture", move |req, peer| {
        let a: CaptureArg = payload(req)?;
        let snaplen = a.snaplen.unwrap_or(CAPTURE_DEFAULT_SNAPLEN);
        let (view, fd) = r
            .capture_start(&a.name, a.qidx, snaplen, peer.client_id, peer.pid)
            .map_err(from_registry)?;
        Ok(Reply::with_fds(
            json!({ "capture": to_json(&view)? }),
            vec![fd],
        ))
    })?;

    let tracker = registry.tracker().clone();
    primary.register("res.show", move |req, _| {
        let a: ResArg = payload(req)?;
        let filter = match a.ty.as_deref() {
            None => None,
            Some(t) => Some(
                t.parse::<ResType>()
                    .map_err(|e| IpcError::rejected(code::EINVAL, e.to_string()))?,
            ),
        };
        let counts: serde_json::Map<String, Value> = tracker
            .counts()
            .into_iter()
            .map(|(t, n)| (t.to_string(), json!(n)))
            .collect();
        Ok(Reply::new(json!({
            "counts": counts,
            "entries": to_json(&tracker.snapshot(filter))?,
        })))
    })?;
    primary.start()?;
    Ok(primary)
}
