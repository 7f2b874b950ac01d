//! `uvdpa`: the daemon that serves software virtio devices over vhost-user.
//!
//! `uvdpa daemon` with no arguments serves the embedded default device (`blk0`, a 256 MiB
//! RAM disk) at `<run-dir>/blk0.sock` and prints the QEMU command line that attaches it.

mod config;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use signal_hook::consts::{SIGINT, SIGTERM};
use tracing::{error, info};
use uvdpa_devices::blk::BlkDevice;
use uvdpa_vhost_user::VhostUserServer;
use uvdpa_virtio::VirtioDevice;

use crate::config::{default_devices, load_config, DeviceSpec};

/// uvdpa: vDPA devices in userspace.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
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

/// The QEMU options that attach a vhost-user-blk device served at `sock`.
fn qemu_command_line(spec: &DeviceSpec, sock: &Path) -> String {
    format!(
        "qemu-system-x86_64 -m 1G -object memory-backend-memfd,id=mem,size=1G,share=on \
         -numa node,memdev=mem -chardev socket,id={name},path={sock} \
         -device vhost-user-blk-pci,chardev={name},num-queues={q} ...",
        name = spec.name,
        sock = sock.display(),
        q = spec.blk.num_queues
    )
}

fn run_daemon(run_dir: Option<PathBuf>, config: Option<PathBuf>) -> Result<(), String> {
    let specs = match &config {
        Some(path) => load_config(path).map_err(|e| e.to_string())?,
        None => default_devices(),
    };
    if specs.is_empty() {
        return Err("The configuration declares no devices".into());
    }
    // Create every device before serving any, so a bad backend fails the start cleanly.
    let mut devices: Vec<(DeviceSpec, Arc<dyn VirtioDevice>)> = Vec::new();
    for spec in specs {
        let dev =
            BlkDevice::new(spec.blk.clone()).map_err(|e| format!("device {}: {e}", spec.name))?;
        devices.push((spec, Arc::new(dev)));
    }
    let run_dir = run_dir.unwrap_or_else(default_run_dir);
    std::fs::create_dir_all(&run_dir)
        .map_err(|e| format!("Cannot create run directory {}: {e}", run_dir.display()))?;

    // Install the handlers before serving, so a signal during start-up is not lost.
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(|e| format!("Cannot install signal handlers: {e}"))?;

    let mut servers = Vec::new();
    for (spec, dev) in &devices {
        let sock = run_dir.join(format!("{}.sock", spec.name));
        let server = VhostUserServer::start(&spec.name, &sock, dev.clone()).map_err(|e| {
            format!(
                "device {}: cannot serve on {}: {e}",
                spec.name,
                sock.display()
            )
        })?;
        println!("{}: vhost-user-blk at {}", spec.name, sock.display());
        println!("  attach with: {}", qemu_command_line(spec, &sock));
        servers.push(server);
    }
    info!(devices = servers.len(), run_dir = %run_dir.display(), "uvdpa daemon ready");

    let sig = signals.forever().next();
    info!(signal = ?sig, "shutting down");
    for s in servers {
        s.shutdown();
    }
    for (spec, dev) in &devices {
        if let Err(e) = dev.flush() {
            error!(device = %spec.name, "Final flush failed: {}", e.0);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("UVDPA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Daemon { run_dir, config } => run_daemon(run_dir, config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("uvdpa: {e}");
            ExitCode::FAILURE
        }
    }
}
