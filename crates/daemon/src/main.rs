//! `uvdpa`: the daemon that serves software virtio devices over vhost-user, and the CLI
//! that manages it (iproute2 `vdpa` grammar, plus `res` from `rdma`).
//!
//! `uvdpa daemon` with no arguments serves the embedded default device (`blk0`, a 256 MiB
//! RAM disk) at `<run-dir>/blk0.sock` and prints the QEMU command line that attaches it
//! (and, for a net device, the `dpdk-testpmd --vdev` argument).
//! `uvdpa [-j] [-p] [--ctl PATH] OBJECT COMMAND ...` talks to a running daemon over its
//! control socket `<run-dir>/uvdpa.ctl`.

mod cli;
mod client;
mod config;
mod ctl;
mod registry;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use signal_hook::consts::{SIGINT, SIGTERM};
use tracing::info;

use crate::config::{default_devices, load_config};
use crate::registry::Registry;

/// uvdpa: vDPA devices in userspace.
#[derive(Debug, Parser)]
#[command(version, about)]
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
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Device types: `mgmtdev show`.
    Mgmtdev {
        /// Command and arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Devices: `dev add|del|show|config show|vstats show ...`.
    Dev {
        /// Command and arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Tracked resources: `res show [TYPE]`.
    Res {
        /// Command and arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
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

fn run_daemon(run_dir: Option<PathBuf>, config: Option<PathBuf>) -> Result<(), String> {
    let specs = match &config {
        Some(path) => load_config(path).map_err(|e| e.to_string())?,
        None => default_devices(),
    };
    if specs.is_empty() {
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
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(|e| format!("Cannot install signal handlers: {e}"))?;

    let primary = ctl::serve(&run_dir, registry.clone()).map_err(|e| {
        format!(
            "Cannot open the control socket in {}: {e}",
            run_dir.display()
        )
    })?;
    for p in prepared {
        let name = p.name().to_string();
        match registry.install(p) {
            Ok(v) if v.transport == "vduse" => {
                println!("{}: VDUSE virtio-{} at {}", v.name, v.mgmtdev, v.socket);
                match (&v.vdpa, &v.kernel_dev) {
                    (Some(bus), Some(d)) => println!("  on the vDPA bus as {bus}: {d}"),
                    (Some(bus), None) => println!("  on the vDPA bus as {bus}"),
                    _ => println!("  bind with: vdpa dev add name {} mgmtdev vduse", v.name),
                }
                if !v.qemu.is_empty() {
                    println!("  attach with: {}", v.qemu);
                }
            }
            Ok(v) => {
                println!("{}: vhost-user-{} at {}", v.name, v.mgmtdev, v.socket);
                println!("  attach with: {}", v.qemu);
                if let Some(vdev) = &v.testpmd {
                    println!("  or: dpdk-testpmd --vdev '{vdev}' ...");
                }
            }
            Err(e) => {
                primary.shutdown();
                registry.del_all();
                return Err(format!("device {name}: {e}"));
            }
        }
    }
    println!("control socket: {}", primary.path().display());
    info!(run_dir = %run_dir.display(), "uvdpa daemon ready");

    let sig = signals.forever().next();
    info!(signal = ?sig, "shutting down");
    primary.shutdown();
    registry.del_all();
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Daemon { run_dir, config } => {
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
            run_daemon(run_dir, config)
        }
        Command::Mgmtdev { args } => manage(&cli.ctl, "mgmtdev", &args, cli.json, cli.pretty),
        Command::Dev { args } => manage(&cli.ctl, "dev", &args, cli.json, cli.pretty),
        Command::Res { args } => manage(&cli.ctl, "res", &args, cli.json, cli.pretty),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("uvdpa: {e}");
            ExitCode::FAILURE
        }
    }
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
