//! The queue workers' seccomp-bpf sandbox.
//!
//! Each queue worker thread installs, before it touches a ring, a seccomp filter that
//! allows only the system calls the data path makes: reads and writes on eventfds, tap
//! and socket fds, io_uring submission, the file backend's synchronous calls, epoll,
//! futex, memory management for the allocator and the SIGBUS containment of
//! [`crate::fault`], and what Rust's runtime needs to log, panic and end a thread. A
//! backend that needs more says so with [`Needs`] (the `nbd` backend reconnects from its
//! worker, the `rbd` backend calls into librbd). The filter is installed per thread,
//! without `SECCOMP_FILTER_FLAG_TSYNC`: the daemon's control threads and threads that are
//! not ours (librbd's) are not filtered. `PR_SET_NO_NEW_PRIVS` is set on the worker first,
//! as seccomp requires.
//!
//! What happens on a call outside the list is the process-wide [`Mode`], set once by the
//! daemon ([`set_mode`]) before it starts workers:
//!
//! - [`Mode::Trap`] (the default): the kernel raises SIGSYS; a handler (atomics only)
//!   makes the call return `EPERM` and records its number in the calling thread. The
//!   worker sees it at its next batch ([`take_forbidden`]) and fails its device with an
//!   error naming the call (DEVICE_NEEDS_RESET, like a contained memory fault); the
//!   daemon and the other devices go on.
//! - [`Mode::Log`]: the call is allowed and the kernel logs it (audit, `dmesg`), for
//!   finding what a new backend needs.
//! - [`Mode::Kill`]: the whole process is killed (`SECCOMP_RET_KILL_PROCESS`).
//! - [`Mode::Off`]: no filter.
//!
//! What the filter does not cover: threads of one process share one fd table, so a
//! worker can use any fd the daemon holds (the filter stops it from opening new ones:
//! no `open`, `socket` or `connect` outside [`Needs::CONNECT`]); and operations submitted
//! through io_uring are not system calls, so seccomp does not see them.
//!
//! The filter exists for x86_64 only; elsewhere [`worker_filter`] returns `None` (as
//! [`Mode::Off`]).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Once};

use bitflags::bitflags;
use thiserror::Error;

#[cfg(target_arch = "x86_64")]
mod syscalls_x86_64;

/// What a queue worker's filter does with a system call outside its allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// SIGSYS: the call fails with EPERM and the worker's device is failed (the default).
    #[default]
    Trap,
    /// The call is allowed and logged by the kernel (`SECCOMP_RET_LOG`).
    Log,
    /// The process is killed (`SECCOMP_RET_KILL_PROCESS`).
    Kill,
    /// No filter.
    Off,
}

impl Mode {
    fn to_u8(self) -> u8 {
        match self {
            Self::Trap => 0,
            Self::Log => 1,
            Self::Kill => 2,
            Self::Off => 3,
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Log,
            2 => Self::Kill,
            3 => Self::Off,
            _ => Self::Trap,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Trap => "trap",
            Self::Log => "log",
            Self::Kill => "kill",
            Self::Off => "off",
        })
    }
}

/// A seccomp mode name that is none of `trap`, `log`, `kill`, `off`.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("Unknown seccomp mode {0:?}: one of trap, log, kill, off")]
pub struct UnknownMode(pub String);

impl FromStr for Mode {
    type Err = UnknownMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "trap" => Ok(Self::Trap),
            "log" => Ok(Self::Log),
            "kill" => Ok(Self::Kill),
            "off" => Ok(Self::Off),
            _ => Err(UnknownMode(s.to_string())),
        }
    }
}

bitflags! {
    /// System calls a worker needs beyond the common data path, declared by its handler
    /// ([`crate::worker::GroupHandler::sandbox_needs`]).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Needs: u8 {
        /// Connects sockets from the worker (the `nbd` backend reconnects there): `socket`
        /// (AF_UNIX, AF_INET, AF_INET6 only), `connect`, socket options, `fcntl`, and
        /// read-only `openat` and `stat` calls for name resolution (`/etc/hosts`, ...).
        const CONNECT = 1;
        /// Calls into librbd (`rbd` backend). Its aio submission and completion polling
        /// need nothing beyond the common list today (measured with the rbd tests under
        /// trap mode); librbd's own threads are not ours and are never filtered.
        const LIBRBD = 2;
    }
}

/// Installing a worker's filter failed.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum SandboxError {
    /// seccompiler refused the rules (a bug in the allow-list).
    #[error("Building the seccomp filter failed: {0}")]
    Build(String),
    /// prctl(PR_SET_NO_NEW_PRIVS) or seccomp(SECCOMP_SET_MODE_FILTER) failed.
    #[error("Installing the seccomp filter failed: {0} (the daemon's `--seccomp off` runs workers without it)")]
    Install(String),
}

/// A system call a worker was stopped from making ([`Mode::Trap`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forbidden {
    /// The system call number (x86_64).
    pub nr: i64,
}

impl Forbidden {
    /// The system call's name (`"unknown"` for a number not in the table).
    pub fn name(&self) -> &'static str {
        syscall_name(self.nr)
    }
}

impl fmt::Display for Forbidden {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.nr, self.name())
    }
}

static MODE: AtomicU8 = AtomicU8::new(0);
/// Forbidden calls trapped in the process since it started.
static TRAPPED: AtomicU64 = AtomicU64::new(0);
/// The number of the last one.
static LAST: AtomicI64 = AtomicI64::new(-1);
static INSTALL: Once = Once::new();

thread_local! {
    /// The first forbidden call of this thread not yet taken by [`take_forbidden`]; -1 if
    /// none. Const-initialised without a destructor, so the signal handler's access is a
    /// plain thread-local load and store.
    static PENDING: AtomicI64 = const { AtomicI64::new(-1) };
}

/// Sets the mode of the filters installed from now on (workers already running keep
/// theirs). Call it once at start-up, before the first worker.
pub fn set_mode(mode: Mode) {
    MODE.store(mode.to_u8(), Ordering::Release);
}

/// The mode new workers get.
pub fn mode() -> Mode {
    Mode::from_u8(MODE.load(Ordering::Acquire))
}

/// How many forbidden system calls were trapped in the whole process, and the number of
/// the last one (-1 if none).
pub fn trapped() -> (u64, i64) {
    (
        TRAPPED.load(Ordering::Acquire),
        LAST.load(Ordering::Relaxed),
    )
}

/// Takes the calling thread's pending forbidden call, if it made one since the last
/// call: one thread-local load when there is none.
pub fn take_forbidden() -> Option<Forbidden> {
    let nr = PENDING.with(|p| {
        if p.load(Ordering::Relaxed) < 0 {
            -1
        } else {
            p.swap(-1, Ordering::Relaxed)
        }
    });
    (nr >= 0).then_some(Forbidden { nr })
}

/// The name of x86_64 system call `nr`, or `"unknown"`.
pub fn syscall_name(nr: i64) -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if let Ok(i) = syscalls_x86_64::NAMES.binary_search_by_key(&nr, |&(n, _)| n) {
            if let Some(&(_, name)) = syscalls_x86_64::NAMES.get(i) {
                return name;
            }
        }
    }
    let _ = nr;
    "unknown"
}

/// A compiled worker filter, shared by every worker of the same mode and needs.
#[derive(Debug)]
pub struct Filter {
    mode: Mode,
    #[cfg(target_arch = "x86_64")]
    program: seccompiler::BpfProgram,
}

impl Filter {
    /// The mode the filter was built for.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Installs the filter on the calling thread (after `PR_SET_NO_NEW_PRIVS`), and in
    /// [`Mode::Trap`] the process-wide SIGSYS handler. Irreversible for the thread.
    ///
    /// # Errors
    /// [`SandboxError::Install`]: the kernel refused it (no seccomp support, or the
    /// thread's filter stack is full).
    pub fn apply(&self) -> Result<(), SandboxError> {
        if self.mode == Mode::Trap {
            install_sigsys_handler()?;
        }
        #[cfg(target_arch = "x86_64")]
        seccompiler::apply_filter(&self.program)
            .map_err(|e| SandboxError::Install(e.to_string()))?;
        Ok(())
    }
}

type Cache = Vec<((u8, Needs), Arc<Filter>)>;
static CACHE: Mutex<Cache> = Mutex::new(Vec::new());

/// The filter a worker with `needs` installs in the current [`mode`]; `None` in
/// [`Mode::Off`] (and on architectures without a filter). Compiled once per mode and
/// needs, then shared.
///
/// # Errors
/// [`SandboxError::Build`]: the rules did not compile (a bug).
pub fn worker_filter(needs: Needs) -> Result<Option<Arc<Filter>>, SandboxError> {
    let mode = mode();
    if mode == Mode::Off || !cfg!(target_arch = "x86_64") {
        return Ok(None);
    }
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let key = (mode.to_u8(), needs);
    if let Some((_, f)) = cache.iter().find(|(k, _)| *k == key) {
        return Ok(Some(f.clone()));
    }
    let f = Arc::new(build(mode, needs)?);
    cache.push((key, f.clone()));
    Ok(Some(f))
}

#[cfg(not(target_arch = "x86_64"))]
fn build(mode: Mode, _needs: Needs) -> Result<Filter, SandboxError> {
    Ok(Filter { mode })
}

/// VDUSE_VQ_INJECT_IRQ, `_IOW(0x81, 0x17, __u32)`: a VDUSE queue's interrupt, injected by
/// its worker (checked against the VDUSE crate's definition in its tests).
pub const VDUSE_VQ_INJECT_IRQ: u32 = 0x4004_8117;
/// VDUSE_DEV_INJECT_CONFIG_IRQ, `_IO(0x81, 0x13)`: the config-change interrupt a failing
/// worker sends for DEVICE_NEEDS_RESET.
pub const VDUSE_DEV_INJECT_CONFIG_IRQ: u32 = 0x8113;
/// VDUSE_IOTLB_GET_FD, `_IOWR(0x81, 0x10, struct vduse_iotlb_entry)`: a VDUSE worker maps
/// an IOTLB entry it misses (the VDUSE crate's `IotlbResolver`).
pub const VDUSE_IOTLB_GET_FD: u32 = 0xc020_8110;

#[cfg(target_arch = "x86_64")]
fn build(mode: Mode, needs: Needs) -> Result<Filter, SandboxError> {
    use seccompiler::{
        SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond,
        SeccompFilter, SeccompRule, TargetArch,
    };

    let err = |e: seccompiler::BackendError| SandboxError::Build(e.to_string());
    let cond = |arg: u8, op: Op, v: u64| Cond::new(arg, Len::Dword, op, v).map_err(err);
    let rule = |c: Vec<Cond>| SeccompRule::new(c).map_err(err);
    // Argument `arg` equals one of `values`.
    let one_of = |arg: u8, values: &[u64]| -> Result<Vec<SeccompRule>, SandboxError> {
        values
            .iter()
            .map(|&v| rule(vec![cond(arg, Op::Eq, v)?]))
            .collect()
    };
    // Memory protections never include PROT_EXEC (argument 2 of mmap and mprotect).
    let no_exec = || -> Result<Vec<SeccompRule>, SandboxError> {
        let exec = libc::PROT_EXEC as u64;
        Ok(vec![rule(vec![cond(2, Op::MaskedEq(exec), 0)?])?])
    };

    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let always = [
        // eventfds (kicks, calls, wake-ups), tap and socket fds, the file backend's
        // synchronous mode, log lines to stderr.
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_preadv2,
        libc::SYS_pwritev2,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_fallocate,
        // Dropping what a worker owns (an abandoned worker drops its handler).
        libc::SYS_close,
        // Waiting: the worker's epoll set, a backend's own (nbd), poll on sockets.
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_ctl,
        libc::SYS_poll,
        libc::SYS_ppoll,
        // The file backend's io_uring (set up by the control thread).
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        // nbd requests and replies; vhost-user backend messages (config change).
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
        libc::SYS_sendto,
        libc::SYS_recvfrom,
        libc::SYS_shutdown,
        // nbd request deadlines.
        libc::SYS_timerfd_settime,
        libc::SYS_timerfd_gettime,
        // Locks, condition variables, sleeps, time.
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_clock_gettime,
        libc::SYS_clock_getres,
        libc::SYS_gettimeofday,
        // The allocator (mmap/mprotect below, without PROT_EXEC) and dropping mappings.
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_brk,
        // Signal handlers (SIGSYS here, SIGBUS in `fault`), a thread's alternate signal
        // stack (Rust's stack overflow handler frees it when the thread ends).
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigaction,
        libc::SYS_sigaltstack,
        libc::SYS_getpid,
        libc::SYS_gettid,
        // std's per-thread HashMap keys.
        libc::SYS_getrandom,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ];
    for nr in always {
        rules.insert(nr, Vec::new());
    }
    // Rust's debug builds check that an fd is open before closing it (F_GETFD); an IOTLB
    // fd from VDUSE_IOTLB_GET_FD is made close-on-exec (F_SETFD).
    let getters = [libc::F_GETFD, libc::F_GETFL, libc::F_SETFD].map(|c| c as u64);
    rules.insert(libc::SYS_fcntl, one_of(1, &getters)?);
    rules.insert(libc::SYS_mmap, no_exec()?);
    rules.insert(libc::SYS_mprotect, no_exec()?);
    // Re-raising a signal whose handler gave up (abort, SIGBUS outside guest memory, a
    // SIGSYS that did not come from seccomp).
    let fatal = [libc::SIGABRT, libc::SIGBUS, libc::SIGSEGV, libc::SIGSYS].map(|s| s as u64);
    rules.insert(libc::SYS_tgkill, one_of(2, &fatal)?);
    // A VDUSE queue's interrupt, the config interrupt of a failing device, and an IOTLB
    // entry a VDUSE worker maps on a miss (then checked with fstat and mapped).
    let mut ioctls = vec![
        u64::from(VDUSE_VQ_INJECT_IRQ),
        u64::from(VDUSE_DEV_INJECT_CONFIG_IRQ),
        u64::from(VDUSE_IOTLB_GET_FD),
    ];
    if needs.contains(Needs::CONNECT) {
        // std's set_nonblocking (connect_timeout) is ioctl(FIONBIO).
        ioctls.push(libc::FIONBIO);
    }
    rules.insert(libc::SYS_ioctl, one_of(1, &ioctls)?);
    rules.insert(libc::SYS_fstat, Vec::new());
    let empty_path = libc::AT_EMPTY_PATH as u64;
    rules.insert(
        libc::SYS_newfstatat,
        vec![rule(vec![cond(3, Op::MaskedEq(empty_path), empty_path)?])?],
    );
    if needs.contains(Needs::CONNECT) {
        let domains = [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6].map(|d| d as u64);
        rules.insert(libc::SYS_socket, one_of(0, &domains)?);
        for nr in [
            libc::SYS_connect,
            libc::SYS_setsockopt,
            libc::SYS_getsockopt,
            libc::SYS_getsockname,
            libc::SYS_getpeername,
            libc::SYS_fcntl,
            libc::SYS_sendmmsg,
            libc::SYS_newfstatat,
            libc::SYS_fstat,
            libc::SYS_statx,
            libc::SYS_lseek,
            libc::SYS_uname,
        ] {
            rules.insert(nr, Vec::new());
        }
        // Name resolution reads /etc/hosts, /etc/resolv.conf, ...: read-only opens.
        let readonly = (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC) as u64;
        rules.insert(
            libc::SYS_openat,
            vec![rule(vec![cond(2, Op::MaskedEq(readonly), 0)?])?],
        );
    }
    // Needs::LIBRBD adds nothing: librbd's aio submission and completion polling, run on
    // the worker by the rbd tests under trap mode, stay within the common list (futex,
    // eventfd and pipe writes, clocks, memory). The flag keeps the place for what a
    // future librbd may need.
    let mismatch = match mode {
        Mode::Trap => SeccompAction::Trap,
        Mode::Log => SeccompAction::Log,
        Mode::Kill | Mode::Off => SeccompAction::KillProcess,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(err)?;
    let program: seccompiler::BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| err(e))?;
    Ok(Filter { mode, program })
}

/// `siginfo_t` as the kernel fills it for SIGSYS (x86_64: the `_sigsys` member of the
/// union, which starts at offset 16).
#[cfg(target_arch = "x86_64")]
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// `si_code` of a SIGSYS raised by a seccomp filter.
#[cfg(target_arch = "x86_64")]
const SYS_SECCOMP: libc::c_int = 1;

fn install_sigsys_handler() -> Result<(), SandboxError> {
    let mut result = Ok(());
    INSTALL.call_once(|| {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: a zeroed sigaction is a valid value to fill in; the handler has the
            // SA_SIGINFO signature and only uses atomics, thread-local atomics and
            // async-signal-safe calls.
            let ok = unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_sigsys as *const () as usize;
                sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) == 0
            };
            if !ok {
                result = Err(SandboxError::Install(format!(
                    "sigaction(SIGSYS): {}",
                    std::io::Error::last_os_error()
                )));
            }
        }
    });
    result
}

/// The SIGSYS handler: a forbidden call of a filtered thread returns EPERM and is
/// recorded in that thread; any other SIGSYS gets the default action (a core dump).
#[cfg(target_arch = "x86_64")]
extern "C" fn on_sigsys(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler; SigsysInfo
    // matches its layout for SIGSYS on x86_64.
    let (code, nr) = unsafe {
        let i = &*(info as *const SigsysInfo);
        (i.code, i64::from(i.syscall))
    };
    if code != SYS_SECCOMP || ctx.is_null() {
        // SAFETY: sigaction with a zeroed (SIG_DFL) action and raise are
        // async-signal-safe; raise is allowed by the filter for SIGSYS.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
            libc::raise(sig);
        }
        return;
    }
    // SAFETY: `ctx` is the ucontext_t of the interrupted thread; on return the kernel
    // restores its registers from it, so the call appears to return -EPERM.
    unsafe {
        let uc = &mut *(ctx as *mut libc::ucontext_t);
        uc.uc_mcontext.gregs[libc::REG_RAX as usize] = -i64::from(libc::EPERM);
    }
    LAST.store(nr, Ordering::Relaxed);
    TRAPPED.fetch_add(1, Ordering::Release);
    // The first one is the cause worth reporting; later ones follow from its EPERM.
    let _ = PENDING.try_with(|p| {
        let _ = p.compare_exchange(-1, nr, Ordering::Relaxed, Ordering::Relaxed);
    });
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// Runs `f` on a new thread that installed the worker filter in trap mode.
    fn in_trapped_worker<T: Send + 'static>(
        needs: Needs,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let filter = Arc::new(build(Mode::Trap, needs).unwrap());
        std::thread::spawn(move || {
            filter.apply().unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    #[test]
    fn a_forbidden_call_fails_with_eperm_and_is_recorded_in_its_thread() {
        let (before, _) = trapped();
        let (r, errno, pending, again) = in_trapped_worker(Needs::empty(), || {
            // SAFETY: socket() takes integers and returns an fd or -1.
            let r = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            let errno = std::io::Error::last_os_error().raw_os_error();
            (r, errno, take_forbidden(), take_forbidden())
        });
        assert_eq!(r, -1);
        assert_eq!(errno, Some(libc::EPERM));
        let f = pending.expect("the forbidden call was not recorded");
        assert_eq!(f.nr, libc::SYS_socket);
        assert_eq!(f.to_string(), "41 (socket)");
        assert_eq!(again, None, "taking it clears it");
        let (after, last) = trapped();
        assert!(after > before);
        assert!(last >= 0);
        // The thread that did not make it has nothing pending.
        assert_eq!(take_forbidden(), None);
    }

    #[test]
    fn opening_files_executable_memory_and_other_signals_are_forbidden() {
        let (open, exec_map, kill, fork) = in_trapped_worker(Needs::empty(), || {
            let open = std::fs::File::open("/etc/hostname").map_err(|e| e.raw_os_error());
            let first = take_forbidden();
            // SAFETY: an anonymous mapping request; the result is checked, never used.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            let exec_map = (p == libc::MAP_FAILED, take_forbidden());
            // SAFETY: kill with signal 0 only checks permissions.
            let kill = (unsafe { libc::kill(1, 0) }, take_forbidden());
            // SAFETY: fork is refused before it does anything (EPERM); had it succeeded,
            // the child exits at once.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: _exit is async-signal-safe and ends the child.
                unsafe { libc::_exit(0) };
            }
            ((open, first), exec_map, kill, (pid, take_forbidden()))
        });
        assert_eq!(open.0.unwrap_err(), Some(libc::EPERM));
        assert_eq!(open.1.map(|f| f.nr), Some(libc::SYS_openat));
        assert!(exec_map.0);
        assert_eq!(exec_map.1.map(|f| f.nr), Some(libc::SYS_mmap));
        assert_eq!(kill.0, -1);
        assert_eq!(kill.1.map(|f| f.name()), Some("kill"));
        assert_eq!(fork.0, -1);
        assert!(fork.1.is_some());
    }

    #[test]
    fn the_data_path_calls_are_allowed() {
        let efd = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
        // Made by the owner, as `QueueWorker::spawn` does.
        let ep = rustix::event::epoll::create(rustix::event::epoll::CreateFlags::CLOEXEC).unwrap();
        let region = crate::MemoryRegion::anonymous(0, 1 << 20).unwrap();
        let (efd, pending) = in_trapped_worker(Needs::empty(), move || {
            // eventfd write/read, epoll, allocation (large: mmap), a mapping, time, locks.
            rustix::io::write(&efd, &1u64.to_ne_bytes()).unwrap();
            let mut b = [0u8; 8];
            rustix::io::read(&efd, &mut b).unwrap();
            rustix::event::epoll::add(
                &ep,
                efd.as_fd(),
                rustix::event::epoll::EventData::new_u64(1),
                rustix::event::epoll::EventFlags::IN,
            )
            .unwrap();
            let v = vec![7u8; 64 << 20];
            assert_eq!(v[(32 << 20) + 1], 7);
            drop(v);
            // Unmapping guest memory (an abandoned worker drops the last reference).
            drop(region);
            let _ = std::time::Instant::now();
            let lock = Mutex::new(1);
            *lock.lock().unwrap() += 1;
            let map: std::collections::HashMap<u8, u8> = [(1, 2)].into();
            assert_eq!(map[&1], 2);
            std::thread::sleep(std::time::Duration::from_millis(1));
            eprintln!("a log line from a filtered thread");
            drop(ep);
            (efd, take_forbidden())
        });
        assert_eq!(pending, None);
        drop(efd);
    }

    #[test]
    fn io_uring_submission_is_allowed_in_a_filtered_thread() {
        use io_uring::{opcode, types, IoUring};
        use std::os::fd::AsRawFd;
        // Set up outside the filter, as the file backend's control thread does.
        let mut ring = IoUring::new(8).unwrap();
        let file = std::fs::File::open("/proc/self/stat").unwrap();
        let pending = in_trapped_worker(Needs::empty(), move || {
            let mut buf = vec![0u8; 64];
            let e = opcode::Read::new(types::Fd(file.as_raw_fd()), buf.as_mut_ptr(), 64)
                .build()
                .user_data(9);
            // SAFETY: `buf` outlives the request, which completes before it is dropped.
            unsafe { ring.submission().push(&e).unwrap() };
            ring.submit_and_wait(1).unwrap();
            let c = ring.completion().next().unwrap();
            assert_eq!(c.user_data(), 9);
            assert!(c.result() > 0);
            take_forbidden()
        });
        assert_eq!(pending, None);
    }

    #[test]
    fn connect_needs_allow_sockets_of_the_three_families_only() {
        let (unix, packet) = in_trapped_worker(Needs::CONNECT, || {
            let unix = std::os::unix::net::UnixStream::pair().map(|_| ());
            let _ = take_forbidden();
            // SAFETY: socket() takes integers and returns an fd or -1.
            let r = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
            (unix, (r, take_forbidden()))
        });
        // socketpair is not in the list: CONNECT is about connect().
        assert!(unix.is_err());
        assert_eq!(packet.0, -1);
        assert_eq!(packet.1.map(|f| f.nr), Some(libc::SYS_socket));
        let tcp = in_trapped_worker(Needs::CONNECT, || {
            let l = std::net::TcpListener::bind("127.0.0.1:0");
            (l.is_ok(), take_forbidden())
        });
        // bind is not allowed either; a listener needs it.
        assert!(!tcp.0);
        let connect = in_trapped_worker(Needs::CONNECT, || {
            let r = std::net::TcpStream::connect("127.0.0.1:1");
            (
                r.map(|_| ()).map_err(|e| e.raw_os_error()),
                take_forbidden(),
            )
        });
        assert_eq!(connect.0, Err(Some(libc::ECONNREFUSED)));
        assert_eq!(connect.1, None);
    }

    /// Forks a child that installs a filter of `mode` and calls socket(); returns its wait
    /// status. The filter is built before the fork (the child only makes system calls).
    fn forked_socket_call(mode: Mode) -> libc::c_int {
        let filter = build(mode, Needs::empty()).unwrap();
        // SAFETY: the child only calls async-signal-safe functions (setrlimit, prctl and
        // seccomp via apply_filter, which does not allocate, socket, _exit) before it exits.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                // No core file from the SIGSYS kill.
                let none = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::setrlimit(libc::RLIMIT_CORE, &none);
                if seccompiler::apply_filter(&filter.program).is_err() {
                    libc::_exit(2);
                }
                let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
                libc::_exit(if fd >= 0 { 0 } else { 1 });
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            status
        }
    }

    #[test]
    fn kill_mode_kills_the_process_and_log_mode_lets_the_call_through() {
        let killed = forked_socket_call(Mode::Kill);
        assert!(libc::WIFSIGNALED(killed), "status {killed:#x}");
        assert_eq!(libc::WTERMSIG(killed), libc::SIGSYS);
        let logged = forked_socket_call(Mode::Log);
        assert!(libc::WIFEXITED(logged), "status {logged:#x}");
        assert_eq!(libc::WEXITSTATUS(logged), 0, "the call was refused");
    }

    #[test]
    fn modes_parse_and_print() {
        for m in [Mode::Trap, Mode::Log, Mode::Kill, Mode::Off] {
            assert_eq!(m.to_string().parse::<Mode>().unwrap(), m);
        }
        assert!("strict".parse::<Mode>().is_err());
        assert_eq!(Mode::default(), Mode::Trap);
        assert_eq!(syscall_name(0), "read");
        assert_eq!(syscall_name(100_000), "unknown");
    }
}
