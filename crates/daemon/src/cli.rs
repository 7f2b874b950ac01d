//! The `uvdpa` command grammar, iproute2 `vdpa` style (`OBJECT COMMAND [ARGS]`), plus `res`
//! from `rdma`. Parsing is separate from execution so every error path is unit-tested.

use crate::config::{parse_size, DeviceEntry, SizeValue};

/// One parsed management command.
#[derive(Debug, Clone, PartialEq)]
pub enum Cmd {
    /// `mgmtdev show`
    MgmtdevShow,
    /// `dev add name NAME mgmtdev blk|net [ATTR VALUE | FLAG]...`: the attributes as a
    /// config-file entry, validated by the daemon with the same code as the file.
    DevAdd(Box<DeviceEntry>),
    /// `dev del NAME`
    DevDel(String),
    /// `dev show [NAME]`
    DevShow(Option<String>),
    /// `dev config show NAME`
    DevConfigShow(String),
    /// `dev vstats show NAME qidx N [-w]`
    DevVstatsShow {
        /// Device.
        name: String,
        /// Queue index.
        qidx: u32,
        /// Print live rates every second (`-w`), for `count` samples (`count N`) or until
        /// interrupted.
        watch: Option<Option<u64>>,
    },
    /// `res show [TYPE]`
    ResShow(Option<String>),
    /// `dev irq show NAME`
    DevIrqShow(String),
    /// `dev irq trigger NAME vec N`
    DevIrqTrigger {
        /// Device.
        name: String,
        /// Vector.
        vec: u32,
    },
    /// `dev set NAME qidx N coalesce usecs U frames F`
    DevSetCoalesce {
        /// Device.
        name: String,
        /// Queue (= vector).
        qidx: u32,
        /// At most one signal per this many µs (0 = off).
        usecs: u32,
        /// At most one signal per this many completion batches (0 = off).
        frames: u32,
    },
    /// `dev capture NAME [qidx N] [count N] [snaplen N] -w FILE|-`: live capture of a net
    /// device's frames to pcapng, or a blk device's completed requests as JSON lines.
    DevCapture(CaptureArgs),
    /// `dev set NAME capacity SIZE`: resize a blk device while it is served.
    DevSetCapacity {
        /// Device.
        name: String,
        /// New capacity in bytes.
        bytes: u64,
    },
}

/// The arguments of `dev capture`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureArgs {
    /// Device.
    pub name: String,
    /// One virtqueue (as in `vstats show`: even receive, odd transmit), or every data queue.
    pub qidx: Option<u32>,
    /// Stop after this many frames (net) or requests (blk).
    pub count: Option<u64>,
    /// Most bytes kept per frame (the daemon's default when unset; net only).
    pub snaplen: Option<u32>,
    /// The pcapng (net) or JSON lines (blk) file; `-` for standard output.
    pub file: String,
}

const CAPTURE_USAGE: &str =
    "usage: dev capture NAME [qidx N] [count N] [snaplen N] -w FILE.pcapng|-";

fn parse_capture(name: &str, rest: &[&str]) -> Result<Cmd, String> {
    let mut a = CaptureArgs {
        name: name.to_string(),
        qidx: None,
        count: None,
        snaplen: None,
        file: String::new(),
    };
    let mut file = None;
    let mut it = rest.iter();
    while let Some(k) = it.next() {
        let v = it
            .next()
            .ok_or_else(|| format!("Attribute {k} needs a value ({CAPTURE_USAGE})"))?;
        match *k {
            "qidx" => a.qidx = Some(number(k, v)?),
            "count" => a.count = Some(number(k, v)?),
            "snaplen" => a.snaplen = Some(number(k, v)?),
            "-w" => file = Some(v.to_string()),
            other => return Err(format!("Unknown attribute {other:?} ({CAPTURE_USAGE})")),
        }
    }
    if a.count == Some(0) {
        return Err("Attribute count: at least 1".into());
    }
    a.file = file.ok_or_else(|| format!("dev capture needs `-w FILE` ({CAPTURE_USAGE})"))?;
    Ok(Cmd::DevCapture(a))
}

fn number<T: std::str::FromStr>(attr: &str, v: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("Attribute {attr}: {v:?} is not a valid number"))
}

/// Parses the attributes of `dev add` into the config-file entry they stand for. Blk:
/// `backend size path direct aio uri connections reconnect_delay timeout pool image conf id
/// keyring ro queues queue_size serial logical_block_size`; net:
/// `backend mac mtu max_vqp (or queue_pairs) queue_size tap switch frame_len`; both:
/// `poll_us mandate unoffer coalesce_usecs coalesce_frames transport bind bounce_size
/// socket_mode socket_user socket_group max_memory`. Which attributes fit which mgmtdev
/// and their ranges are checked by [`DeviceEntry::validate`].
fn parse_dev_add(args: &[String]) -> Result<Cmd, String> {
    let mut e = DeviceEntry::default();
    let mut it = args.iter();
    while let Some(key) = it.next() {
        let k = key.as_str();
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("Attribute {k} needs a value"))
        };
        match k {
            "name" => e.name = Some(value()?),
            "mgmtdev" => e.mgmtdev = Some(value()?),
            "backend" => e.backend = Some(value()?),
            "size" => e.size = Some(SizeValue::Text(value()?)),
            "path" => e.path = Some(value()?.into()),
            "aio" => e.aio = Some(value()?),
            "uri" => e.uri = Some(value()?),
            "connections" => e.connections = Some(number(k, &value()?)?),
            "reconnect_delay" => e.reconnect_delay = Some(number(k, &value()?)?),
            "timeout" => e.timeout = Some(number(k, &value()?)?),
            "pool" => e.pool = Some(value()?),
            "image" => e.image = Some(value()?),
            "conf" => e.conf = Some(value()?.into()),
            "id" => e.id = Some(value()?),
            "keyring" => e.keyring = Some(value()?.into()),
            "serial" => e.serial = Some(value()?),
            "queues" => e.queues = Some(number(k, &value()?)?),
            "queue_size" => e.queue_size = Some(number(k, &value()?)?),
            "logical_block_size" => e.logical_block_size = Some(number(k, &value()?)?),
            "mac" => e.mac = Some(value()?),
            "mtu" => e.mtu = Some(number(k, &value()?)?),
            "max_vqp" | "queue_pairs" => e.queue_pairs = Some(number(k, &value()?)?),
            "tap" => e.tap = Some(value()?),
            "switch" => e.switch = Some(value()?),
            "frame_len" => e.frame_len = Some(number(k, &value()?)?),
            "poll_us" => e.poll_us = Some(number(k, &value()?)?),
            "mandate" => e.mandate = Some(value()?.split(',').map(String::from).collect()),
            "coalesce_usecs" => e.coalesce_usecs = Some(number(k, &value()?)?),
            "coalesce_frames" => e.coalesce_frames = Some(number(k, &value()?)?),
            "unoffer" => e.unoffer = Some(value()?.split(',').map(String::from).collect()),
            "transport" => e.transport = Some(value()?),
            "bind" => e.bind = Some(value()?),
            "bounce_size" => e.bounce_size = Some(SizeValue::Text(value()?)),
            "socket_mode" => e.socket_mode = Some(value()?),
            "socket_user" => e.socket_user = Some(value()?),
            "socket_group" => e.socket_group = Some(value()?),
            "max_memory" => e.max_memory = Some(SizeValue::Text(value()?)),
            "ro" => e.read_only = Some(true),
            "direct" => e.direct = Some(true),
            other => {
                return Err(format!(
                    "Unknown attribute {other:?} (see `uvdpa mgmtdev show` for the attributes)"
                ))
            }
        }
    }
    if e.name.is_none() {
        return Err("dev add needs `name NAME`".into());
    }
    if e.mgmtdev.is_none() {
        return Err("dev add needs `mgmtdev MGMTDEV`".into());
    }
    Ok(Cmd::DevAdd(Box::new(e)))
}

/// Parses `OBJECT COMMAND ARGS...`.
///
/// # Errors
/// A message naming the unknown object, command or attribute, or the missing argument.
pub fn parse(object: &str, args: &[String]) -> Result<Cmd, String> {
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match (object, words.as_slice()) {
        ("mgmtdev", ["show"] | []) => Ok(Cmd::MgmtdevShow),
        ("dev", ["add", ..]) => parse_dev_add(&args[1..]),
        ("dev", ["del", name]) => Ok(Cmd::DevDel(name.to_string())),
        ("dev", ["del"]) => Err("dev del needs a device name".into()),
        ("dev", ["show"] | []) => Ok(Cmd::DevShow(None)),
        ("dev", ["show", name]) => Ok(Cmd::DevShow(Some(name.to_string()))),
        ("dev", ["config", "show", name]) => Ok(Cmd::DevConfigShow(name.to_string())),
        ("dev", ["config", ..]) => Err("usage: dev config show NAME".into()),
        ("dev", ["vstats", "show", name, "qidx", q, rest @ ..]) => {
            let watch = match rest {
                [] => None,
                ["-w"] => Some(None),
                ["-w", "count", n] => Some(Some(number("count", n)?)),
                _ => return Err(format!("Unexpected arguments after qidx: {rest:?}")),
            };
            Ok(Cmd::DevVstatsShow {
                name: name.to_string(),
                qidx: number("qidx", q)?,
                watch,
            })
        }
        ("dev", ["vstats", ..]) => Err("usage: dev vstats show NAME qidx N [-w [count N]]".into()),
        ("dev", ["irq", "show", name]) => Ok(Cmd::DevIrqShow(name.to_string())),
        ("dev", ["irq", "trigger", name, "vec", v]) => Ok(Cmd::DevIrqTrigger {
            name: name.to_string(),
            vec: number("vec", v)?,
        }),
        ("dev", ["irq", ..]) => Err("usage: dev irq show NAME | dev irq trigger NAME vec N".into()),
        ("dev", ["set", name, "qidx", q, "coalesce", "usecs", u, "frames", f]) => {
            Ok(Cmd::DevSetCoalesce {
                name: name.to_string(),
                qidx: number("qidx", q)?,
                usecs: number("usecs", u)?,
                frames: number("frames", f)?,
            })
        }
        ("dev", ["set", name, "capacity", size]) => Ok(Cmd::DevSetCapacity {
            name: name.to_string(),
            bytes: parse_size(size).ok_or_else(|| {
                format!(
                    "Attribute capacity: {size:?} is not a byte count with optional K/M/G/T suffix"
                )
            })?,
        }),
        ("dev", ["capture", name, rest @ ..]) if !name.starts_with('-') => {
            parse_capture(name, rest)
        }
        ("dev", ["capture", ..]) => Err(CAPTURE_USAGE.into()),
        ("dev", ["set", ..]) => Err(
            "usage: dev set NAME qidx N coalesce usecs U frames F | dev set NAME capacity SIZE"
                .into(),
        ),
        ("res", ["show"] | []) => Ok(Cmd::ResShow(None)),
        ("res", ["show", ty]) => Ok(Cmd::ResShow(Some(ty.to_string()))),
        ("mgmtdev" | "dev" | "res", [cmd, ..]) => {
            Err(format!("Unknown command {cmd:?} for object {object}"))
        }
        (other, _) => Err(format!(
            "Unknown object {other:?} (one of: daemon, mgmtdev, dev, res)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(object: &str, s: &str) -> Result<Cmd, String> {
        let args: Vec<String> = s.split_whitespace().map(String::from).collect();
        parse(object, &args)
    }

    #[test]
    fn vdpa_grammar_parses() {
        assert_eq!(p("mgmtdev", "show"), Ok(Cmd::MgmtdevShow));
        assert_eq!(p("dev", "show"), Ok(Cmd::DevShow(None)));
        assert_eq!(p("dev", "show blk0"), Ok(Cmd::DevShow(Some("blk0".into()))));
        assert_eq!(p("dev", "del blk0"), Ok(Cmd::DevDel("blk0".into())));
        assert_eq!(
            p("dev", "config show blk0"),
            Ok(Cmd::DevConfigShow("blk0".into()))
        );
        assert_eq!(
            p("dev", "vstats show blk0 qidx 1 -w"),
            Ok(Cmd::DevVstatsShow {
                name: "blk0".into(),
                qidx: 1,
                watch: Some(None)
            })
        );
        assert_eq!(
            p("dev", "vstats show blk0 qidx 0 -w count 3"),
            Ok(Cmd::DevVstatsShow {
                name: "blk0".into(),
                qidx: 0,
                watch: Some(Some(3))
            })
        );
        assert_eq!(p("res", "show vq"), Ok(Cmd::ResShow(Some("vq".into()))));
        assert_eq!(p("dev", "irq show d"), Ok(Cmd::DevIrqShow("d".into())));
        assert_eq!(
            p("dev", "irq trigger d vec 1"),
            Ok(Cmd::DevIrqTrigger {
                name: "d".into(),
                vec: 1
            })
        );
        assert_eq!(
            p("dev", "set d qidx 0 coalesce usecs 50 frames 8"),
            Ok(Cmd::DevSetCoalesce {
                name: "d".into(),
                qidx: 0,
                usecs: 50,
                frames: 8
            })
        );
        assert_eq!(
            p("dev", "set d capacity 128M"),
            Ok(Cmd::DevSetCapacity {
                name: "d".into(),
                bytes: 128 << 20
            })
        );
        assert_eq!(
            p("dev", "set d capacity 4096"),
            Ok(Cmd::DevSetCapacity {
                name: "d".into(),
                bytes: 4096
            })
        );
        let Ok(Cmd::DevAdd(a)) = p(
            "dev",
            "add name d1 mgmtdev blk backend ram size 64M ro queues 2 queue_size 128 serial S",
        ) else {
            panic!("dev add did not parse")
        };
        assert_eq!(a.name.as_deref(), Some("d1"));
        assert_eq!(a.size, Some(SizeValue::Text("64M".into())));
        assert_eq!((a.read_only, a.direct), (Some(true), None));
        assert_eq!((a.queues, a.queue_size), (Some(2), Some(128)));
        let spec = a.validate(0).unwrap();
        assert!(spec.blk().unwrap().read_only);
        let Ok(Cmd::DevAdd(f)) = p(
            "dev",
            "add name f1 mgmtdev blk backend file path /x direct aio sync",
        ) else {
            panic!("dev add did not parse")
        };
        assert_eq!((f.direct, f.aio.as_deref()), (Some(true), Some("sync")));
    }

    #[test]
    fn net_dev_add_parses_into_the_config_entry() {
        let Ok(Cmd::DevAdd(a)) = p(
            "dev",
            "add name n1 mgmtdev net backend switch switch sw0 mac 02:00:00:00:00:07 mtu 9000 \
             max_vqp 4 queue_size 1024 poll_us 10 mandate VIRTIO_NET_F_MQ",
        ) else {
            panic!("dev add did not parse")
        };
        assert_eq!(a.queue_pairs, Some(4));
        assert_eq!(a.mtu, Some(9000));
        assert_eq!(a.switch.as_deref(), Some("sw0"));
        assert_eq!(a.read_only, None, "no blk attribute set by default");
        let spec = a.validate(0).unwrap();
        let n = spec.net().unwrap();
        assert_eq!(n.config.mac, [2, 0, 0, 0, 0, 7]);
        assert_eq!((n.config.max_queue_pairs, n.queue_size), (4, 1024));
        assert_eq!(spec.num_queues(), 9);
        let Ok(Cmd::DevAdd(b)) = p(
            "dev",
            "add name n2 mgmtdev net queue_pairs 2 backend source frame_len 128",
        ) else {
            panic!("dev add did not parse")
        };
        assert_eq!((b.queue_pairs, b.frame_len), (Some(2), Some(128)));
        // The same entry goes over the control socket as JSON.
        let json = serde_json::to_value(&*a).unwrap();
        let back: DeviceEntry = serde_json::from_value(json).unwrap();
        assert_eq!(back, *a);
    }

    #[test]
    fn capture_parses() {
        assert_eq!(
            p(
                "dev",
                "capture n0 qidx 1 count 10 snaplen 128 -w /tmp/x.pcapng"
            ),
            Ok(Cmd::DevCapture(CaptureArgs {
                name: "n0".into(),
                qidx: Some(1),
                count: Some(10),
                snaplen: Some(128),
                file: "/tmp/x.pcapng".into(),
            }))
        );
        assert_eq!(
            p("dev", "capture n0 -w -"),
            Ok(Cmd::DevCapture(CaptureArgs {
                name: "n0".into(),
                qidx: None,
                count: None,
                snaplen: None,
                file: "-".into(),
            }))
        );
        let e = |s| p("dev", s).unwrap_err();
        assert!(e("capture n0").contains("-w FILE"));
        assert!(e("capture").contains("usage"));
        assert!(e("capture -w x").contains("usage"));
        assert!(e("capture n0 -w").contains("needs a value"));
        assert!(e("capture n0 qidx x -w f").contains("qidx"));
        assert!(e("capture n0 count 0 -w f").contains("count"));
        assert!(e("capture n0 dir rx -w f").contains("dir"));
    }

    #[test]
    fn errors_name_the_problem() {
        let e = |o, s| p(o, s).unwrap_err();
        assert!(e("dev", "add name d1").contains("mgmtdev"));
        assert!(e("dev", "add mgmtdev blk").contains("name"));
        assert!(e("dev", "add name d1 mgmtdev blk colour red").contains("colour"));
        assert!(e("dev", "add name d1 mgmtdev blk queues").contains("queues needs a value"));
        assert!(e("dev", "add name d1 mgmtdev blk queues two").contains("queues"));
        assert!(e("dev", "add name n1 mgmtdev net max_vqp x").contains("max_vqp"));
        assert!(e("dev", "add name n1 mgmtdev net mac").contains("mac needs a value"));
        assert!(e("dev", "vstats show d1 qidx x").contains("qidx"));
        assert!(e("dev", "vstats show d1").contains("usage"));
        assert!(e("dev", "frobnicate").contains("frobnicate"));
        assert!(e("vm", "show").contains("vm"));
        assert!(e("dev", "del").contains("name"));
        assert!(e("dev", "irq trigger d1 vec x").contains("vec"));
        assert!(e("dev", "set d1 qidx 0 coalesce usecs 5").contains("usage"));
        assert!(e("dev", "set d1 capacity").contains("capacity SIZE"));
        assert!(e("dev", "set d1 capacity 12Q").contains("capacity"));
        assert!(e("dev", "set d1 capacity 1M extra").contains("usage"));
    }
}
