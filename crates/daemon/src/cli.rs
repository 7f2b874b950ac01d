//! The `uvdpa` command grammar, iproute2 `vdpa` style (`OBJECT COMMAND [ARGS]`), plus `res`
//! from `rdma`. Parsing is separate from execution so every error path is unit-tested.

use crate::config::{DeviceEntry, SizeValue};

/// One parsed management command.
#[derive(Debug, Clone, PartialEq)]
pub enum Cmd {
    /// `mgmtdev show`
    MgmtdevShow,
    /// `dev add name NAME mgmtdev blk [ATTR VALUE | FLAG]...`
    DevAdd(Box<DeviceEntryArgs>),
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
}

/// The attributes of `dev add`, as they will be validated by the daemon.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct DeviceEntryArgs {
    /// Device name.
    pub name: Option<String>,
    /// mgmtdev.
    pub mgmtdev: Option<String>,
    /// Backend.
    pub backend: Option<String>,
    /// Size text ("64M").
    pub size: Option<String>,
    /// File path.
    pub path: Option<String>,
    /// O_DIRECT.
    pub direct: bool,
    /// Read-only.
    pub ro: bool,
    /// Queues.
    pub queues: Option<u16>,
    /// Queue size.
    pub queue_size: Option<u16>,
    /// Serial.
    pub serial: Option<String>,
    /// Logical block size.
    pub logical_block_size: Option<u32>,
    /// Busy-poll window in µs.
    pub poll_us: Option<u32>,
    /// Mandated features by name.
    pub mandate: Option<Vec<String>>,
    /// Initial coalescing, µs.
    pub coalesce_usecs: Option<u32>,
    /// Initial coalescing, batches.
    pub coalesce_frames: Option<u32>,
}

impl DeviceEntryArgs {
    /// The config-file entry these attributes stand for (validated by the same code).
    pub fn to_entry(&self) -> DeviceEntry {
        DeviceEntry {
            name: self.name.clone(),
            mgmtdev: self.mgmtdev.clone(),
            backend: self.backend.clone(),
            size: self.size.clone().map(SizeValue::Text),
            path: self.path.clone().map(Into::into),
            direct: Some(self.direct),
            queues: self.queues,
            queue_size: self.queue_size,
            read_only: Some(self.ro),
            serial: self.serial.clone(),
            logical_block_size: self.logical_block_size,
            poll_us: self.poll_us,
            mandate: self.mandate.clone(),
            coalesce_usecs: self.coalesce_usecs,
            coalesce_frames: self.coalesce_frames,
        }
    }
}

fn number<T: std::str::FromStr>(attr: &str, v: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("Attribute {attr}: {v:?} is not a valid number"))
}

fn parse_dev_add(args: &[String]) -> Result<Cmd, String> {
    let mut a = DeviceEntryArgs::default();
    let mut it = args.iter();
    while let Some(key) = it.next() {
        let mut value = |k: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("Attribute {k} needs a value"))
        };
        match key.as_str() {
            "name" => a.name = Some(value("name")?),
            "mgmtdev" => a.mgmtdev = Some(value("mgmtdev")?),
            "backend" => a.backend = Some(value("backend")?),
            "size" => a.size = Some(value("size")?),
            "path" => a.path = Some(value("path")?),
            "serial" => a.serial = Some(value("serial")?),
            "queues" => a.queues = Some(number("queues", &value("queues")?)?),
            "queue_size" => a.queue_size = Some(number("queue_size", &value("queue_size")?)?),
            "logical_block_size" => {
                a.logical_block_size =
                    Some(number("logical_block_size", &value("logical_block_size")?)?)
            }
            "poll_us" => a.poll_us = Some(number("poll_us", &value("poll_us")?)?),
            "mandate" => a.mandate = Some(value("mandate")?.split(',').map(String::from).collect()),
            "coalesce_usecs" => {
                a.coalesce_usecs = Some(number("coalesce_usecs", &value("coalesce_usecs")?)?)
            }
            "coalesce_frames" => {
                a.coalesce_frames = Some(number("coalesce_frames", &value("coalesce_frames")?)?)
            }
            "ro" => a.ro = true,
            "direct" => a.direct = true,
            other => {
                return Err(format!(
                    "Unknown attribute {other:?} (see `uvdpa mgmtdev show` for the attributes)"
                ))
            }
        }
    }
    if a.name.is_none() {
        return Err("dev add needs `name NAME`".into());
    }
    if a.mgmtdev.is_none() {
        return Err("dev add needs `mgmtdev MGMTDEV`".into());
    }
    Ok(Cmd::DevAdd(Box::new(a)))
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
        ("dev", ["set", ..]) => Err("usage: dev set NAME qidx N coalesce usecs U frames F".into()),
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
        let Ok(Cmd::DevAdd(a)) = p(
            "dev",
            "add name d1 mgmtdev blk backend ram size 64M ro queues 2 queue_size 128 serial S",
        ) else {
            panic!("dev add did not parse")
        };
        assert_eq!(a.name.as_deref(), Some("d1"));
        assert_eq!(a.size.as_deref(), Some("64M"));
        assert!(a.ro && !a.direct);
        assert_eq!((a.queues, a.queue_size), (Some(2), Some(128)));
        let spec = a.to_entry().validate(0).unwrap();
        assert!(spec.blk.read_only);
    }

    #[test]
    fn errors_name_the_problem() {
        let e = |o, s| p(o, s).unwrap_err();
        assert!(e("dev", "add name d1").contains("mgmtdev"));
        assert!(e("dev", "add mgmtdev blk").contains("name"));
        assert!(e("dev", "add name d1 mgmtdev blk colour red").contains("colour"));
        assert!(e("dev", "add name d1 mgmtdev blk queues").contains("queues needs a value"));
        assert!(e("dev", "add name d1 mgmtdev blk queues two").contains("queues"));
        assert!(e("dev", "vstats show d1 qidx x").contains("qidx"));
        assert!(e("dev", "vstats show d1").contains("usage"));
        assert!(e("dev", "frobnicate").contains("frobnicate"));
        assert!(e("vm", "show").contains("vm"));
        assert!(e("dev", "del").contains("name"));
        assert!(e("dev", "irq trigger d1 vec x").contains("vec"));
        assert!(e("dev", "set d1 qidx 0 coalesce usecs 5").contains("usage"));
    }
}
