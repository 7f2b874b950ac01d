//! The `rbd` backend: a virtio-blk device whose sectors are a Ceph RBD image, reached
//! through librbd (Debian's `librbd-dev`, Ceph 16 on Debian 12).
//!
//! # Why a binding of our own
//! No maintained Rust binding covers librbd's asynchronous API: the `ceph` crate
//! (ceph-rust) wraps librados and admin sockets only; `librbd-sys` 0.1.0 is a single,
//! long-unmaintained release of generated bindings. The backend needs nineteen C
//! functions, so `ffi` declares exactly those by hand (signatures from
//! `rbd/librbd.h` and `rados/librados.h`), each call with its safety argument, and
//! owns the three handles (cluster, pool, image) in drop order.
//!
//! # The device
//! `RbdDisk::open` (at `dev add`) reads `conf`, authenticates as `client.ID` (with
//! `keyring` when given, otherwise what the conf names), connects, opens the pool and the
//! image (read-only, without taking the image's exclusive lock, for a `ro` device); any
//! step that fails makes `dev add` fail with the step and librados' errno
//! ("Opening RBD image rbd/foo failed: rbd_open failed: No such file or directory").
//! Connecting is bounded: `client_mount_timeout` and `rados_mon_op_timeout` are
//! [`CONNECT_TIMEOUT`], so a dead monitor cannot hang `dev add`; `rados_osd_op_timeout` is
//! the `timeout` attribute, so no request (and no open against dead OSDs) waits longer
//! for an OSD. The capacity is the image size rounded down to the logical block size.
//! The device offers FLUSH, DISCARD and WRITE_ZEROES.
//!
//! One image handle serves every queue (librbd handles are thread-safe); each queue has
//! its own worker and `group::RbdGroup`, with many requests in flight.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

mod ffi;
pub(super) mod group;

use super::BlkError;

/// Default `timeout`: an OSD operation not answered within it fails (IOERR).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connecting to the monitors may take at `dev add`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The default cephx user (`client.admin`).
pub const DEFAULT_ID: &str = "admin";

/// The attributes of an `rbd` backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdSpec {
    /// The pool holding the image.
    pub pool: String,
    /// The image name.
    pub image: String,
    /// The ceph.conf to read (monitors, auth settings).
    pub conf: PathBuf,
    /// The cephx user, without `client.` (default `admin`).
    pub id: String,
    /// The keyring file; `None`: whatever the conf says (`keyring = ...`).
    pub keyring: Option<PathBuf>,
    /// `rados_osd_op_timeout`: the longest an operation waits for an OSD.
    pub timeout: Duration,
}

impl RbdSpec {
    /// `POOL/IMAGE`, for messages.
    pub fn name(&self) -> String {
        format!("{}/{}", self.pool, self.image)
    }
}

/// Which step of opening an RBD image failed, with librados' or librbd's errno.
#[derive(Debug, Error)]
#[error("{step} failed")]
pub struct RbdError {
    /// The call and what it was given, e.g. `rbd_open`.
    pub step: String,
    /// The errno.
    #[source]
    pub source: io::Error,
}

/// An open RBD image as a disk, shared by the queue workers.
#[derive(Debug)]
pub(crate) struct RbdDisk {
    image: Arc<ffi::Image>,
    /// Capacity in bytes (the image size rounded down to the logical block size).
    size: u64,
}

impl RbdDisk {
    /// Connects to the cluster and opens the image (see the module docs).
    ///
    /// # Errors
    /// [`BlkError::Rbd`] naming the step that failed, [`BlkError::RbdImage`] when the
    /// image is smaller than one block.
    pub(crate) fn open(
        spec: &RbdSpec,
        logical_block_size: u32,
        read_only: bool,
    ) -> Result<Self, BlkError> {
        let err = |step: String| {
            move |source: io::Error| BlkError::Rbd {
                name: spec.name(),
                source: RbdError { step, source },
            }
        };
        let conf = spec.conf.display().to_string();
        let cluster = ffi::Cluster::create(&spec.id)
            .map_err(err(format!("rados_create2 (client.{})", spec.id)))?;
        cluster
            .read_conf(&conf)
            .map_err(err(format!("Reading {conf}")))?;
        if let Some(k) = &spec.keyring {
            cluster
                .set("keyring", &k.display().to_string())
                .map_err(err("Setting keyring".into()))?;
        }
        let secs = |d: Duration| d.as_secs().max(1).to_string();
        for (option, value) in [
            ("client_mount_timeout", secs(CONNECT_TIMEOUT)),
            ("rados_mon_op_timeout", secs(CONNECT_TIMEOUT)),
            ("rados_osd_op_timeout", secs(spec.timeout)),
        ] {
            cluster
                .set(option, &value)
                .map_err(err(format!("Setting {option}")))?;
        }
        cluster.connect().map_err(err(format!(
            "Connecting to the cluster of {conf} as client.{}",
            spec.id
        )))?;
        let cluster = Arc::new(cluster);
        let pool = cluster
            .pool(&spec.pool)
            .map_err(err(format!("Opening pool {}", spec.pool)))?;
        let step = if read_only {
            "rbd_open_read_only"
        } else {
            "rbd_open"
        };
        let image = ffi::Image::open(pool, &spec.image, read_only).map_err(err(step.into()))?;
        let bytes = image.size().map_err(err("rbd_get_size".into()))?;
        let lbs = u64::from(logical_block_size);
        let size = bytes / lbs * lbs;
        if size == 0 {
            return Err(BlkError::RbdImage {
                name: spec.name(),
                reason: format!("it is {bytes} bytes, less than one {lbs}-byte block"),
            });
        }
        if size != bytes {
            tracing::warn!(
                image = %spec.name(),
                image_size = bytes,
                capacity = size,
                "RBD image size is not a multiple of the logical block size: the tail is not served"
            );
        }
        tracing::info!(image = %spec.name(), conf, id = %spec.id, size, read_only, "RBD image opened");
        Ok(Self {
            image: Arc::new(image),
            size,
        })
    }

    /// Capacity in bytes.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(conf: &str) -> RbdSpec {
        RbdSpec {
            pool: "rbd".into(),
            image: "img".into(),
            conf: conf.into(),
            id: DEFAULT_ID.into(),
            keyring: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Every open error names the image and the step, and keeps librados' errno.
    #[test]
    fn a_missing_conf_fails_open_naming_the_step_and_errno() {
        let e = RbdDisk::open(&spec("/nonexistent/ceph.conf"), 512, false).unwrap_err();
        let BlkError::Rbd { name, source } = &e else {
            panic!("{e:?}");
        };
        assert_eq!(name, "rbd/img");
        assert_eq!(source.step, "Reading /nonexistent/ceph.conf");
        assert_eq!(source.source.raw_os_error(), Some(libc::ENOENT));
        assert_eq!(e.to_string(), "Opening RBD image rbd/img failed");
        assert_eq!(
            std::error::Error::source(&e).map(ToString::to_string),
            Some("Reading /nonexistent/ceph.conf failed".into())
        );
    }

    /// A conf that names no monitor fails at connect, at once (nothing to wait for).
    #[test]
    fn a_conf_without_monitors_fails_at_connect() {
        let dir = std::env::temp_dir().join(format!("uvdpa-rbd-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("ceph.conf");
        std::fs::write(&conf, "[global]\nauth client required = none\n").unwrap();
        let t = std::time::Instant::now();
        let e = RbdDisk::open(&spec(conf.to_str().unwrap()), 512, true).unwrap_err();
        let _ = std::fs::remove_dir_all(&dir);
        let BlkError::Rbd { source, .. } = &e else {
            panic!("{e:?}");
        };
        assert!(
            source.step.starts_with("Connecting to the cluster of"),
            "{}",
            source.step
        );
        assert!(t.elapsed() < CONNECT_TIMEOUT * 3, "{:?}", t.elapsed());
    }
}
