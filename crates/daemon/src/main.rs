//! `uvdpa`: the daemon that serves software virtio devices over vhost-user, and the CLI
//! that manages it (iproute2 `vdpa` grammar, plus `res` from `rdma`).
//!
//! `uvdpa daemon` with no arguments serves the embedded default device (`blk0`, a 256 MiB
//! RAM disk) at `<run-dir>/blk0.sock` and prints the QEMU command line that attaches it
//! (and, for a net device, the `dpdk-testpmd --vdev` argument).
//! `uvdpa [-j] [-p] [--ctl PATH] OBJECT COMMAND ...` talks to a running daemon over its
//! control socket `<run-dir>/uvdpa.ctl`.
//!
//! The `///` comments of the command-line types below are `--help` text (clap), written
//! for a terminal, not for rustdoc.
#![allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]

mod capture;
mod cli;
mod client;
mod config;
mod ctl;
mod metrics;
mod monitor;
mod privs;
mod registry;
mod service;
mod trace;
mod upgrade;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{CommandFactory, Parser, Subcommand};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tracing::{info, warn};

use crate::config::{default_devices, load_daemon_config, DeviceSpec};
use crate::registry::{DeviceView, Registry};

/// uvdpa: vDPA devices in userspace.
#[derive(Debug, Parser)]
#[command(name = "uvdpa", version, about)]
struct Cli {
    /// Print JSON.
    #[arg(short = 'j', long = "json", global = true)]
    json: bool,
    /// Pretty-print JSON.
    #[arg(short = 'p', long = "pretty", global = true)]
    pretty: bool,
    /// The daemon's control socket [default: <run-dir>/uvdpa.ctl].
    #[arg(long, global = true)]
    ctl: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon (the primary): serve the configured devices until SIGINT/SIGTERM.
    Daemon {
        /// Directory for sockets [default: /run/uvdpa as root, else $XDG_RUNTIME_DIR/uvdpa].
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// TOML file listing the devices; without it the embedded default is served.
        /// SIGHUP re-reads it: devices added to it are added, devices removed from it are
        /// removed, changed ones are re-created, unchanged ones are left alone.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Serve OpenMetrics/Prometheus text at http://ADDR/metrics (e.g.
        /// 127.0.0.1:9464); overrides the config file's `metrics`.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<SocketAddr>,
        /// Validate FILE as a config file and exit (0: valid; 1: the error), serving
        /// nothing.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["config", "metrics", "run_dir"])]
        check_config: Option<PathBuf>,
        /// Live upgrade: take every device over from the daemon running in the run
        /// directory (its frontends stay connected), then run as the daemon; the old one
        /// exits. Devices come from the old daemon; --config is only read on SIGHUP.
        #[arg(long)]
        takeover: bool,
        /// What a queue worker's seccomp filter does with a system call outside its
        /// allow-list: trap (the call fails with EPERM and the worker's device is failed,
        /// with an error line naming the call), log (allowed; the kernel logs it), kill
        /// (the process is killed), off (no filter). Overrides the config file's
        /// `seccomp` [default: trap].
        #[arg(long, value_name = "MODE", value_parser = ["trap", "log", "kill", "off"])]
        seccomp: Option<String>,
        /// Run as USER[:GROUP] (names or numbers) once the devices, sockets and metrics
        /// port of the start-up exist: the daemon must start as root, chowns its run
        /// directory to USER and drops root for good. VDUSE and tap devices added later
        /// then fail (they need root). Overrides the config file's `user`.
        #[arg(long, value_name = "USER[:GROUP]")]
        user: Option<String>,
    },
    /// Device types: `mgmtdev show`.
    Mgmtdev {
        /// Command and arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Devices: `dev add|del|show|config show|vstats show|capture ...`.
    Dev {
        /// Command and arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Per-queue rates of every device, like `top`: requests/s, MB/s read and written
    /// (blk), frames/s, MB/s and drops/s (net), kicks/s, calls/s, errors.
    Monitor {
        /// Seconds between samples (a decimal number, at least 0.1).
        #[arg(short = 'i', long = "interval", default_value_t = 1.0)]
        interval: f64,
        /// Print this many samples and exit [default: until interrupted].
        #[arg(short = 'n', long = "iterations")]
        iterations: Option<u64>,
    },
    /// Tracked resources: `res show [TYPE]`.
    Res {
        /// Command and arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Print a completion script for SHELL to stdout, generated from these definitions
    /// (e.g. `uvdpa completions bash > /etc/bash_completion.d/uvdpa`). It completes the
    /// subcommands and options; the words after `dev`, `mgmtdev` and `res` (iproute2-style
    /// arguments) are not completed.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the uvdpa(1) man page (roff) to stdout, generated from these definitions
    /// (e.g. `uvdpa man > uvdpa.1; man -l uvdpa.1`).
    Man,
}

fn default_run_dir() -> PathBuf {
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/run/uvdpa");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("uvdpa"),
        _ => std::env::temp_dir().join(format!("uvdpa-{}", rustix::process::geteuid().as_raw())),
    }
}

/// Prints what a served device is and how to attach it.
fn print_device(v: &DeviceView) {
    if v.transport == "vduse" {
        println!("{}: VDUSE virtio-{} at {}", v.name, v.mgmtdev, v.socket);
        match (&v.vdpa, &v.kernel_dev) {
            (Some(bus), Some(d)) => println!("  on the vDPA bus as {bus}: {d}"),
            (Some(bus), None) => println!("  on the vDPA bus as {bus}"),
            _ => println!("  bind with: vdpa dev add name {} mgmtdev vduse", v.name),
        }
        if !v.qemu.is_empty() {
            println!("  attach with: {}", v.qemu);
        }
    } else {
        println!("{}: vhost-user-{} at {}", v.name, v.mgmtdev, v.socket);
        println!("  attach with: {}", v.qemu);
        if let Some(vdev) = &v.testpmd {
            println!("  or: dpdk-testpmd --vdev '{vdev}' ...");
        }
    }
}

/// `uvdpa daemon --check-config FILE`.
fn check_config(path: &std::path::Path) -> Result<(), String> {
    let cfg = load_daemon_config(path).map_err(|e| service::error_chain(&e))?;
    let names: Vec<&str> = cfg.devices.iter().map(|(_, s)| s.name.as_str()).collect();
    println!(
        "{}: valid: {} device(s){}{}",
        path.display(),
        names.len(),
        if names.is_empty() { "" } else { ": " },
        names.join(", ")
    );
    if let Some(m) = cfg.metrics {
        println!("  metrics at http://{m}/metrics");
    }
    Ok(())
}

/// How `uvdpa daemon` hardens itself (`--seccomp`, `--user`).
struct Hardening {
    seccomp: Option<String>,
    user: Option<String>,
}

fn run_daemon(
    run_dir: Option<PathBuf>,
    config: Option<PathBuf>,
    metrics_addr: Option<SocketAddr>,
    takeover: bool,
    hardening: Hardening,
) -> Result<(), String> {
    let (specs, entries, file_metrics, file_seccomp, file_user): (Vec<DeviceSpec>, _, _, _, _) =
        match &config {
            Some(path) => {
                let cfg = load_daemon_config(path).map_err(|e| service::error_chain(&e))?;
                let entries = cfg.devices.iter().map(|(e, _)| e.clone()).collect();
                let specs = cfg.devices.into_iter().map(|(_, s)| s).collect();
                (specs, entries, cfg.metrics, cfg.seccomp, cfg.user)
            }
            None => (default_devices(), Vec::new(), None, None, None),
        };
    let seccomp = match hardening.seccomp {
        Some(m) => m.parse().map_err(|e| format!("--seccomp: {e}"))?,
        None => file_seccomp.unwrap_or_default(),
    };
    // Before the first device (and so the first queue worker) exists.
    uvdpa_virtio::sandbox::set_mode(seccomp);
    info!(mode = %seccomp, "queue workers' seccomp filter");
    let run_as = hardening
        .user
        .or(file_user)
        .map(|u| privs::resolve(&u).map_err(|e| e.to_string()))
        .transpose()?;
    if let Some(to) = &run_as {
        if !rustix::process::geteuid().is_root() && rustix::process::geteuid().as_raw() != to.uid {
            return Err(privs::PrivsError::NotRoot(
                to.spec.clone(),
                rustix::process::geteuid().as_raw(),
            )
            .to_string());
        }
    }
    // A takeover serves the old daemon's devices; the file is for later reloads.
    let specs = if takeover { Vec::new() } else { specs };
    if specs.is_empty() && !takeover {
        info!("no devices configured: add them with `uvdpa dev add`");
    }
    let run_dir = run_dir.unwrap_or_else(default_run_dir);
    let registry = Arc::new(Registry::new(&run_dir, uvdpa_restrack::Tracker::new()));
    // Set up every backend before serving any device, so a bad one fails the start cleanly.
    let prepared = specs
        .into_iter()
        .map(|s| registry.prepare(s).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    std::fs::create_dir_all(&run_dir)
        .map_err(|e| format!("Cannot create run directory {}: {e}", run_dir.display()))?;

    // Install the handlers before serving, so a signal during start-up is not lost.
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(|e| format!("Cannot install signal handlers: {e}"))?;

    let primary = if takeover {
        let t = upgrade::takeover(&run_dir, &registry, |p| ctl::serve_at(p, registry.clone()))
            .map_err(|e| format!("Takeover failed: {e}"))?;
        println!(
            "takeover: {} devices from pid {}, pause {:.3} ms",
            t.devices,
            t.from_pid,
            t.pause.as_secs_f64() * 1e3
        );
        for v in registry.show(None).unwrap_or_default() {
            print_device(&v);
        }
        service::notify_main_pid();
        t.primary
    } else {
        ctl::serve(&run_dir, registry.clone()).map_err(|e| {
            format!(
                "Cannot open the control socket in {}: {e}",
                run_dir.display()
            )
        })?
    };
    let metrics = match metrics_addr.or(file_metrics) {
        Some(addr) => match serve_metrics(addr, &registry, takeover) {
            Ok(m) => Some(m),
            Err(e) => {
                primary.shutdown();
                registry.del_all();
                return Err(format!("Cannot serve metrics on {addr}: {e}"));
            }
        },
        None => None,
    };
    for p in prepared {
        let name = p.name().to_string();
        match registry.install(p) {
            Ok(v) => print_device(&v),
            Err(e) => {
                primary.shutdown();
                registry.del_all();
                return Err(format!("device {name}: {e}"));
            }
        }
    }
    if let Some(to) = &run_as {
        // Everything that needs root exists now: sockets, VDUSE devices, taps, the
        // control socket, the metrics port.
        if let Err(e) = privs::drop_to(to, &run_dir) {
            primary.shutdown();
            registry.del_all();
            return Err(e.to_string());
        }
        info!(user = %to.spec, uid = to.uid, gid = to.gid, "dropped root");
    }
    println!("control socket: {}", primary.path().display());
    if let Some(m) = &metrics {
        println!("metrics: http://{}/metrics", m.addr());
    }
    info!(run_dir = %run_dir.display(), "uvdpa daemon ready");
    let mut declared = service::Declared::new(entries);
    service::notify_ready(&registry);

    let mut stop = None;
    for sig in signals.forever() {
        if sig != SIGHUP {
            stop = Some(sig);
            break;
        }
        let Some(path) = &config else {
            info!("SIGHUP: no config file to reload (the daemon runs the embedded default)");
            continue;
        };
        service::notify_reloading();
        match load_daemon_config(path) {
            Ok(cfg) => {
                if cfg.metrics != file_metrics && metrics_addr.is_none() {
                    warn!("SIGHUP: a changed `metrics` address takes effect at the next start");
                }
                let report = declared.reload(&registry, cfg.devices);
                for v in &report.added {
                    print_device(v);
                }
                info!(
                    path = %path.display(),
                    added = report.added.len(),
                    removed = report.removed.len(),
                    failed = report.failed.len(),
                    "config reloaded"
                );
            }
            Err(e) => warn!(
                path = %path.display(),
                "SIGHUP: config not reloaded, devices unchanged: {}",
                service::error_chain(&e)
            ),
        }
        service::notify_ready(&registry);
    }
    if upgrade::handed_over() {
        // Everything belongs to the new daemon now: its sockets, its control socket
        // (moved over ours, so ours is not removed), the devices' files.
        info!("devices handed over: exiting");
        if let Some(m) = metrics {
            m.shutdown();
        }
        primary.shutdown();
        return Ok(());
    }
    info!(signal = ?stop, "shutting down");
    service::notify_stopping();
    if let Some(m) = metrics {
        m.shutdown();
    }
    primary.shutdown();
    registry.del_all();
    Ok(())
}

/// Serves metrics at `addr`; after a takeover the old daemon may hold the port for a few
/// moments more, so binding is retried for up to 5 s.
fn serve_metrics(
    addr: SocketAddr,
    registry: &Arc<Registry>,
    takeover: bool,
) -> Result<metrics::MetricsServer, String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match metrics::serve(addr, registry.clone()) {
            Ok(m) => return Ok(m),
            Err(e) if !takeover || std::time::Instant::now() >= deadline => {
                return Err(e.to_string())
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Daemon {
            check_config: Some(path),
            ..
        } => check_config(&path),
        Command::Daemon {
            run_dir,
            config,
            metrics,
            check_config: None,
            takeover,
            seccomp,
            user,
        } => {
            // Before anything of ours opens an fd.
            privs::close_inherited_fds();
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env("UVDPA_LOG")
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .with_writer(std::io::stderr)
                // Colour only on a terminal (and not with NO_COLOR): a log redirected to
                // a file or a journal stays plain text.
                .with_ansi(
                    std::io::IsTerminal::is_terminal(&std::io::stderr())
                        && std::env::var_os("NO_COLOR").is_none(),
                )
                .init();
            run_daemon(
                run_dir,
                config,
                metrics,
                takeover,
                Hardening { seccomp, user },
            )
        }
        Command::Mgmtdev { args } => manage(&cli.ctl, "mgmtdev", &args, cli.json, cli.pretty),
        Command::Dev { args } => manage(&cli.ctl, "dev", &args, cli.json, cli.pretty),
        Command::Res { args } => manage(&cli.ctl, "res", &args, cli.json, cli.pretty),
        Command::Monitor {
            interval,
            iterations,
        } => run_monitor(&cli.ctl, interval, iterations, cli.json, cli.pretty),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "uvdpa", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .map_err(|e| format!("Writing the man page failed: {e}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("uvdpa: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_monitor(
    ctl: &Option<PathBuf>,
    interval: f64,
    iterations: Option<u64>,
    json: bool,
    pretty: bool,
) -> Result<(), String> {
    if !(0.1..=86_400.0).contains(&interval) {
        return Err(format!("Invalid interval {interval}: seconds, 0.1..=86400"));
    }
    let ctl = ctl
        .clone()
        .unwrap_or_else(|| default_run_dir().join(ctl::CTL_NAME));
    monitor::run(
        &ctl,
        &monitor::MonitorArgs {
            interval: std::time::Duration::from_secs_f64(interval),
            iterations,
        },
        client::Output {
            json: json || pretty,
            pretty,
        },
    )
}

fn manage(
    ctl: &Option<PathBuf>,
    object: &str,
    args: &[String],
    json: bool,
    pretty: bool,
) -> Result<(), String> {
    let cmd = cli::parse(object, args)?;
    let ctl = ctl
        .clone()
        .unwrap_or_else(|| default_run_dir().join(ctl::CTL_NAME));
    client::run(
        &ctl,
        &cmd,
        client::Output {
            json: json || pretty,
            pretty,
        },
    )
}
