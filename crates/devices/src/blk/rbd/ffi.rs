//! The few librados and librbd C functions the `rbd` backend calls (`rados/librados.h`,
//! `rbd/librbd.h` of Ceph 16), declared by hand, and safe owners of their handles.
//!
//! Every handle is an opaque pointer owned by exactly one Rust value that releases it
//! once: [`Cluster`] (`rados_t`, shut down on drop), [`Pool`] (`rados_ioctx_t`), [`Image`]
//! (`rbd_image_t`, closed on drop, which also flushes librbd's cache). Drop order is the
//! reverse of creation because each value owns the one it was made from.

use std::ffi::{c_char, c_int, c_void, CString};
use std::io;
use std::ptr;

/// `rados_t`.
type RadosT = *mut c_void;
/// `rados_ioctx_t`.
type IoctxT = *mut c_void;
/// `rbd_image_t`.
type ImageT = *mut c_void;
/// `rbd_completion_t`.
pub(super) type CompletionT = *mut c_void;
/// `rbd_callback_t`: runs on a librbd thread when an asynchronous operation is over.
pub(super) type Callback = unsafe extern "C" fn(c: CompletionT, arg: *mut c_void);

/// `RBD_WRITE_ZEROES_FLAG_THICK_PROVISION`: the zeroed range stays allocated.
pub(super) const WRITE_ZEROES_FLAG_THICK_PROVISION: c_int = 1;

#[link(name = "rados")]
extern "C" {
    fn rados_create2(
        cluster: *mut RadosT,
        clustername: *const c_char,
        name: *const c_char,
        flags: u64,
    ) -> c_int;
    fn rados_conf_read_file(cluster: RadosT, path: *const c_char) -> c_int;
    fn rados_conf_set(cluster: RadosT, option: *const c_char, value: *const c_char) -> c_int;
    fn rados_connect(cluster: RadosT) -> c_int;
    fn rados_shutdown(cluster: RadosT);
    fn rados_ioctx_create(cluster: RadosT, pool: *const c_char, ioctx: *mut IoctxT) -> c_int;
    fn rados_ioctx_destroy(ioctx: IoctxT);
}

#[link(name = "rbd")]
extern "C" {
    fn rbd_open(io: IoctxT, name: *const c_char, image: *mut ImageT, snap: *const c_char) -> c_int;
    fn rbd_open_read_only(
        io: IoctxT,
        name: *const c_char,
        image: *mut ImageT,
        snap: *const c_char,
    ) -> c_int;
    fn rbd_close(image: ImageT) -> c_int;
    fn rbd_get_size(image: ImageT, size: *mut u64) -> c_int;
    fn rbd_aio_create_completion(
        arg: *mut c_void,
        cb: Option<Callback>,
        c: *mut CompletionT,
    ) -> c_int;
    fn rbd_aio_get_return_value(c: CompletionT) -> isize;
    fn rbd_aio_release(c: CompletionT);
    fn rbd_aio_readv(
        image: ImageT,
        iov: *const libc::iovec,
        iovcnt: c_int,
        off: u64,
        c: CompletionT,
    ) -> c_int;
    fn rbd_aio_writev(
        image: ImageT,
        iov: *const libc::iovec,
        iovcnt: c_int,
        off: u64,
        c: CompletionT,
    ) -> c_int;
    fn rbd_aio_flush(image: ImageT, c: CompletionT) -> c_int;
    fn rbd_aio_discard(image: ImageT, off: u64, len: u64, c: CompletionT) -> c_int;
    fn rbd_aio_write_zeroes(
        image: ImageT,
        off: u64,
        len: usize,
        c: CompletionT,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> c_int;
}

/// A negative errno return as an error; anything else is success.
fn check(r: c_int) -> io::Result<c_int> {
    if r < 0 {
        Err(io::Error::from_raw_os_error(r.saturating_neg()))
    } else {
        Ok(r)
    }
}

/// `s` as a C string (text with a NUL byte cannot name anything Ceph knows).
fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// A cluster handle (`rados_t`): configured, then connected.
#[derive(Debug)]
pub(super) struct Cluster(RadosT);

// SAFETY: a `rados_t` may be used from any thread (librados is thread-safe; its handles
// are not bound to the creating thread), and this wrapper has no interior state of its own.
unsafe impl Send for Cluster {}
// SAFETY: as for Send: librados serialises access to a cluster handle internally.
unsafe impl Sync for Cluster {}

impl Cluster {
    /// `rados_create2` for entity `client.ID` of cluster `ceph`.
    pub(super) fn create(id: &str) -> io::Result<Self> {
        let cluster = cstr("ceph")?;
        let name = cstr(&format!("client.{id}"))?;
        let mut h: RadosT = ptr::null_mut();
        // SAFETY: both strings are NUL-terminated and live for the call; `h` is written.
        check(unsafe { rados_create2(&mut h, cluster.as_ptr(), name.as_ptr(), 0) })?;
        if h.is_null() {
            return Err(io::Error::other("rados_create2 returned no handle"));
        }
        Ok(Self(h))
    }

    /// `rados_conf_read_file`.
    pub(super) fn read_conf(&self, path: &str) -> io::Result<()> {
        let p = cstr(path)?;
        // SAFETY: `self.0` is a live, unconnected handle; `p` is NUL-terminated.
        check(unsafe { rados_conf_read_file(self.0, p.as_ptr()) }).map(drop)
    }

    /// `rados_conf_set`.
    pub(super) fn set(&self, option: &str, value: &str) -> io::Result<()> {
        let (o, v) = (cstr(option)?, cstr(value)?);
        // SAFETY: `self.0` is a live handle; both strings are NUL-terminated.
        check(unsafe { rados_conf_set(self.0, o.as_ptr(), v.as_ptr()) }).map(drop)
    }

    /// `rados_connect` (bounded by `client_mount_timeout`).
    pub(super) fn connect(&self) -> io::Result<()> {
        // SAFETY: `self.0` is a live handle, connected at most once (by `RbdDisk::open`).
        check(unsafe { rados_connect(self.0) }).map(drop)
    }

    /// `rados_ioctx_create`: an I/O context on `pool`.
    pub(super) fn pool(self: &std::sync::Arc<Self>, pool: &str) -> io::Result<Pool> {
        let p = cstr(pool)?;
        let mut io: IoctxT = ptr::null_mut();
        // SAFETY: `self.0` is a connected handle; `p` is NUL-terminated; `io` is written.
        check(unsafe { rados_ioctx_create(self.0, p.as_ptr(), &mut io) })?;
        Ok(Pool {
            io,
            _cluster: self.clone(),
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: the handle is live and every I/O context made from it is gone (each
        // holds an `Arc` of this value).
        unsafe { rados_shutdown(self.0) }
    }
}

/// An I/O context on one pool (`rados_ioctx_t`); keeps its cluster alive.
#[derive(Debug)]
pub(super) struct Pool {
    io: IoctxT,
    _cluster: std::sync::Arc<Cluster>,
}

// SAFETY: librados I/O contexts are thread-safe; the context is only destroyed on drop.
unsafe impl Send for Pool {}
// SAFETY: as for Send.
unsafe impl Sync for Pool {}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: the context is live, and every image opened on it is gone (each holds
        // this value).
        unsafe { rados_ioctx_destroy(self.io) }
    }
}

/// An open RBD image (`rbd_image_t`); keeps its pool alive. Its asynchronous calls may be
/// made from any thread at once (librbd queues them internally).
#[derive(Debug)]
pub(super) struct Image {
    h: ImageT,
    _pool: Pool,
}

// SAFETY: librbd image handles are thread-safe for I/O (librbd serialises internally, as
// every multi-queue librbd user relies on); the handle is only closed on drop.
unsafe impl Send for Image {}
// SAFETY: as for Send.
unsafe impl Sync for Image {}

impl Image {
    /// `rbd_open` of `name` (no snapshot), or `rbd_open_read_only` (which takes no
    /// exclusive lock, so many readers can share an image).
    pub(super) fn open(pool: Pool, name: &str, read_only: bool) -> io::Result<Self> {
        let n = cstr(name)?;
        let mut h: ImageT = ptr::null_mut();
        let open = if read_only {
            rbd_open_read_only
        } else {
            rbd_open
        };
        // SAFETY: `pool.io` is a live context; `n` is NUL-terminated; `h` is written; a
        // null snapshot name is the head.
        check(unsafe { open(pool.io, n.as_ptr(), &mut h, ptr::null()) })?;
        Ok(Self { h, _pool: pool })
    }

    /// `rbd_get_size`, bytes.
    pub(super) fn size(&self) -> io::Result<u64> {
        let mut size = 0u64;
        // SAFETY: the image is open; `size` is written.
        check(unsafe { rbd_get_size(self.h, &mut size) })?;
        Ok(size)
    }

    /// Starts `op` with a completion that calls `cb(completion, arg)` when it is over.
    /// On an error return nothing was started and `cb` will not run for it.
    ///
    /// # Safety
    /// `arg` must be what `cb` expects. For [`AioOp::Readv`] and [`AioOp::Writev`] the
    /// iovec array and every buffer it describes must stay valid (writable for reads) and
    /// unmoved until `cb` has run: librbd keeps pointers to both.
    pub(super) unsafe fn aio(&self, op: AioOp, cb: Callback, arg: *mut c_void) -> io::Result<()> {
        let mut c: CompletionT = ptr::null_mut();
        // SAFETY: `c` is written; `cb` and `arg` are stored for the completion.
        check(unsafe { rbd_aio_create_completion(arg, Some(cb), &mut c) })?;
        // SAFETY: the image is open and `c` is a fresh completion; the buffer contract is
        // the caller's (see above).
        let r = unsafe {
            match op {
                AioOp::Readv { iov, iovcnt, off } => rbd_aio_readv(self.h, iov, iovcnt, off, c),
                AioOp::Writev { iov, iovcnt, off } => rbd_aio_writev(self.h, iov, iovcnt, off, c),
                AioOp::Flush => rbd_aio_flush(self.h, c),
                AioOp::Discard { off, len } => rbd_aio_discard(self.h, off, len, c),
                AioOp::WriteZeroes { off, len, thick } => {
                    let flags = if thick {
                        WRITE_ZEROES_FLAG_THICK_PROVISION
                    } else {
                        0
                    };
                    rbd_aio_write_zeroes(self.h, off, len, c, flags, 0)
                }
            }
        };
        if let Err(e) = check(r) {
            // SAFETY: the operation was refused, so librbd holds no reference to `c`.
            unsafe { rbd_aio_release(c) };
            return Err(e);
        }
        Ok(())
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: the image is open and no operation is in flight: every queue group
        // waits for its operations before it goes, and the groups hold the device
        // (and so this image) alive until then.
        let r = unsafe { rbd_close(self.h) };
        if r < 0 {
            tracing::warn!(
                "Closing the RBD image failed: {}",
                io::Error::from_raw_os_error(-r)
            );
        }
    }
}

/// One asynchronous operation.
#[derive(Debug, Clone, Copy)]
pub(super) enum AioOp {
    /// `rbd_aio_readv`.
    Readv {
        iov: *const libc::iovec,
        iovcnt: c_int,
        off: u64,
    },
    /// `rbd_aio_writev`.
    Writev {
        iov: *const libc::iovec,
        iovcnt: c_int,
        off: u64,
    },
    /// `rbd_aio_flush`.
    Flush,
    /// `rbd_aio_discard`.
    Discard { off: u64, len: u64 },
    /// `rbd_aio_write_zeroes`; `thick`: keep the range allocated.
    WriteZeroes { off: u64, len: usize, thick: bool },
}

/// Inside a completion callback: the operation's result, and the completion released.
///
/// # Safety
/// `c` must be the completion the callback was called with, and not used after this.
pub(super) unsafe fn finish(c: CompletionT) -> isize {
    // SAFETY: `c` is a completed completion (we are in its callback).
    let r = unsafe { rbd_aio_get_return_value(c) };
    // SAFETY: released once, here; librbd allows it from the callback.
    unsafe { rbd_aio_release(c) };
    r
}
