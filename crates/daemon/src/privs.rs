//! The daemon's process-wide hardening at start-up: closing inherited fds, and dropping
//! root for `--user USER[:GROUP]` once what needs root exists (the queue workers' seccomp
//! filter is [`uvdpa_virtio::sandbox`]).
//!
//! After the drop the daemon keeps every fd and socket it made as root (device sockets,
//! VDUSE devices, taps, the control socket, the metrics port) and owns its run directory
//! (so `dev add`/`dev del` of vhost-user devices can make and remove sockets there), but
//! it can no longer make what needs privileges: a VDUSE device (`/dev/vduse/control` is
//! root's) or a tap interface (CAP_NET_ADMIN) added at run time fails with
//! [`RuntimePrivilegeError`]'s message.

use std::os::fd::RawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use thiserror::Error;

/// The uid the daemon dropped to (`u32::MAX` while it has not).
static DROPPED_TO: AtomicU32 = AtomicU32::new(u32::MAX);

/// Who `--user` names, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// What was given (`nobody`, `uvdpa:kvm`), for messages.
    pub spec: String,
    /// The user's uid.
    pub uid: u32,
    /// The group: GROUP if given, else the user's primary group.
    pub gid: u32,
}

/// A `--user` that cannot be used.
#[derive(Debug, Error)]
pub enum PrivsError {
    /// USER is neither a user name nor a number.
    #[error("Unknown user {0:?}")]
    UnknownUser(String),
    /// GROUP is neither a group name nor a number.
    #[error("Unknown group {0:?}")]
    UnknownGroup(String),
    /// Changing identity needs root.
    #[error("--user {0} needs the daemon to start as root (it runs as uid {1})")]
    NotRoot(String, u32),
    /// A step of the drop failed (the daemon exits: it must not serve half-dropped).
    #[error("Dropping to {spec} failed at {step}: {source}")]
    Drop {
        /// `--user` as given.
        spec: String,
        /// `setgroups`, `setgid`, `setuid`, `chown run directory`.
        step: &'static str,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
    /// After the drop, root could be regained (a bug, or a kernel that ignores setuid).
    #[error("Dropped to {0} but root can be regained; refusing to run")]
    Regained(String),
}

/// An operation that needs the root the daemon dropped at start-up.
#[derive(Debug, Error)]
#[error("{what} needs root, and the daemon runs as uid {uid} (--user) since start-up: declare it in the config file, which is set up before the drop")]
pub struct RuntimePrivilegeError {
    /// What was asked (`A VDUSE device`, `A tap device`).
    pub what: &'static str,
    /// The uid the daemon runs as.
    pub uid: u32,
}

/// Fails with [`RuntimePrivilegeError`] if the daemon dropped root (`--user`): for the
/// operations that need it (`what` names one).
///
/// # Errors
/// As above.
pub fn needs_root(what: &'static str) -> Result<(), RuntimePrivilegeError> {
    match DROPPED_TO.load(Ordering::Acquire) {
        u32::MAX => Ok(()),
        uid => Err(RuntimePrivilegeError { what, uid }),
    }
}

/// Resolves `USER[:GROUP]` (names or numbers).
///
/// # Errors
/// [`PrivsError::UnknownUser`], [`PrivsError::UnknownGroup`].
pub fn resolve(spec: &str) -> Result<RunAs, PrivsError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let (uid, primary) = match uzers::get_user_by_name(user) {
        Some(u) => (u.uid(), u.primary_group_id()),
        None => match user.parse::<u32>() {
            Ok(uid) => match uzers::get_user_by_uid(uid) {
                Some(u) => (uid, u.primary_group_id()),
                None => (uid, uid),
            },
            Err(_) => return Err(PrivsError::UnknownUser(user.to_string())),
        },
    };
    let gid = match group {
        None => primary,
        Some(g) => match uzers::get_group_by_name(g) {
            Some(g) => g.gid(),
            None => g
                .parse::<u32>()
                .map_err(|_| PrivsError::UnknownGroup(g.to_string()))?,
        },
    };
    Ok(RunAs {
        spec: spec.to_string(),
        uid,
        gid,
    })
}

/// Makes `run_dir` (and the device sockets, reconnect logs and control socket in it)
/// belong to `to`, then sets the groups, gid and uid of every thread of the process to
/// it (glibc's setxid broadcast), and checks that root cannot be regained. Also sets
/// `PR_SET_NO_NEW_PRIVS` on the calling thread (threads it starts inherit it).
///
/// # Errors
/// [`PrivsError`]; the caller must exit on any.
pub fn drop_to(to: &RunAs, run_dir: &Path) -> Result<(), PrivsError> {
    let own = rustix::process::geteuid().as_raw();
    if own != 0 {
        if own == to.uid {
            return Ok(());
        }
        return Err(PrivsError::NotRoot(to.spec.clone(), own));
    }
    let fail = |step: &'static str| {
        let source = std::io::Error::last_os_error();
        PrivsError::Drop {
            spec: to.spec.clone(),
            step,
            source,
        }
    };
    let chown = |p: &Path| {
        std::os::unix::fs::lchown(p, Some(to.uid), Some(to.gid)).map_err(|source| {
            PrivsError::Drop {
                spec: to.spec.clone(),
                step: "chown run directory",
                source,
            }
        })
    };
    chown(run_dir)?;
    if let Ok(entries) = std::fs::read_dir(run_dir) {
        for e in entries.flatten() {
            chown(&e.path())?;
        }
    }
    let groups = [to.gid];
    // SAFETY: setgroups reads `groups.len()` gids from a live array; setgid and setuid
    // take integers. glibc applies each to every thread of the process.
    unsafe {
        if libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
            return Err(fail("setgroups"));
        }
        if libc::setgid(to.gid) != 0 {
            return Err(fail("setgid"));
        }
        if libc::setuid(to.uid) != 0 {
            return Err(fail("setuid"));
        }
    }
    if to.uid != 0 {
        // SAFETY: setuid and setgid take integers; both must fail now.
        let regained = unsafe { libc::setuid(0) == 0 || libc::setgid(0) == 0 };
        if regained || rustix::process::geteuid().is_root() {
            return Err(PrivsError::Regained(to.spec.clone()));
        }
    }
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(fail("prctl(PR_SET_NO_NEW_PRIVS)"));
    }
    DROPPED_TO.store(to.uid, Ordering::Release);
    Ok(())
}

/// Closes every fd the daemon inherited except stdin, stdout and stderr (close_range):
/// run first thing, before any thread or fd of our own exists. The daemon takes nothing
/// from its parent through fds (a live upgrade receives the old daemon's fds over the
/// control socket; systemd socket activation is not used), so an fd left open by a
/// careless parent would only leak into devices.
pub fn close_inherited_fds() {
    const FIRST: RawFd = 3;
    // SAFETY: nothing in the process owns an fd above 2 yet (this runs before anything
    // opens one), so no OwnedFd is invalidated.
    let r = unsafe { libc::syscall(libc::SYS_close_range, FIRST as u32, u32::MAX, 0u32) };
    if r != 0 {
        // Kernels before 5.9: close what /proc says is open.
        let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        for fd in fds.into_iter().filter(|&fd| fd >= FIRST) {
            // SAFETY: as above; the read_dir's own fd is closed already (EBADF, ignored).
            unsafe { libc::close(fd) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_groups_resolve_by_name_and_number() {
        let root = resolve("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        let nobody = resolve("nobody").unwrap();
        assert_ne!(nobody.uid, 0);
        assert_eq!(resolve("65534:0").unwrap().gid, 0);
        assert_eq!(resolve("root:root").unwrap().gid, 0);
        assert!(matches!(
            resolve("no-such-user-here"),
            Err(PrivsError::UnknownUser(_))
        ));
        assert!(matches!(
            resolve("root:no-such-group-here"),
            Err(PrivsError::UnknownGroup(_))
        ));
        assert!(needs_root("A VDUSE device").is_ok());
    }
}
