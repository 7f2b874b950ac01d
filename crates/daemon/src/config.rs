//! Daemon configuration: the TOML file, the embedded default, and validation into device
//! specs. Every error names the device and the field, and says what is allowed.
//!
//! ```toml
//! [[device]]
//! name = "blk0"            # 1..=32 of [A-Za-z0-9_.-], unique
//! mgmtdev = "blk"          # device type; only "blk" today
//! backend = "ram"          # ram | file | null
//! size = "256M"            # bytes, or with K/M/G/T (binary) suffix; ram and null
//! path = "/var/lib/disk.img"  # file backend
//! direct = false           # file backend: O_DIRECT
//! queues = 1               # 1..=64
//! queue_size = 256         # power of two, 1..=32768
//! read_only = false
//! serial = "uvdpa-blk0"    # at most 20 bytes
//! logical_block_size = 512 # 512, 1024, 2048 or 4096
//! poll_us = 0              # busy-poll window after the ring empties, µs (0 = off)
//! mandate = ["VIRTIO_BLK_F_FLUSH"]  # features the driver must accept (FEATURES_OK)
//! coalesce_usecs = 0       # interrupt coalescing per queue vector (0 = off)
//! coalesce_frames = 0
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;
use uvdpa_devices::blk::{BackendSpec, BlkConfig};

/// Configuration errors.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("Cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown fields included).
    #[error("Invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the field and line).
        message: String,
    },
    /// A field has a value outside its range.
    #[error("device {device}: field `{field}`: {reason}")]
    Field {
        /// Device name (or its index when the name itself is wrong).
        device: String,
        /// The field.
        field: &'static str,
        /// What is allowed.
        reason: String,
    },
}

/// A size given as a number of bytes or a string with a binary suffix.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    /// Bytes.
    Bytes(u64),
    /// "256M", "1G", "4096".
    Text(String),
}

/// One `[[device]]` table as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceEntry {
    /// Device name.
    pub name: Option<String>,
    /// Device type.
    pub mgmtdev: Option<String>,
    /// Backend kind.
    pub backend: Option<String>,
    /// Capacity (ram, null).
    pub size: Option<SizeValue>,
    /// Backing file (file).
    pub path: Option<PathBuf>,
    /// O_DIRECT (file).
    pub direct: Option<bool>,
    /// Number of virtqueues.
    pub queues: Option<u16>,
    /// Queue size.
    pub queue_size: Option<u16>,
    /// Read-only.
    pub read_only: Option<bool>,
    /// Serial (GET_ID).
    pub serial: Option<String>,
    /// Logical block size in bytes.
    pub logical_block_size: Option<u32>,
    /// Busy-poll window of each queue worker after its ring runs empty, in µs (0 = off).
    pub poll_us: Option<u32>,
    /// Features the driver must accept, by spec name (seed 004: mandated at creation).
    pub mandate: Option<Vec<String>>,
    /// Interrupt coalescing of every queue vector: at most one signal per this many µs.
    pub coalesce_usecs: Option<u32>,
    /// Interrupt coalescing of every queue vector: at most one signal per this many batches.
    pub coalesce_frames: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    device: Vec<DeviceEntry>,
}

/// A validated device to create.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    /// Device name; its socket is `<run-dir>/<name>.sock`.
    pub name: String,
    /// virtio-blk configuration.
    pub blk: BlkConfig,
    /// Busy-poll window per queue worker, in µs (0 = off).
    pub poll_us: u32,
    /// Mandated feature bits (beyond VIRTIO_F_VERSION_1).
    pub mandate: u64,
    /// Initial coalescing of every queue vector: (µs, batches); (0, 0) = off.
    pub coalesce: (u32, u32),
}

/// The bit of a feature given by its spec name (`VIRTIO_F_VERSION_1`, `VIRTIO_BLK_F_FLUSH`).
pub fn feature_bit(name: &str) -> Option<u64> {
    uvdpa_virtio::VirtioFeatures::from_name(name)
        .map(|f| f.bits())
        .or_else(|| uvdpa_devices::blk::BlkFeatures::from_name(name).map(|f| f.bits()))
}

/// Parses "256M"-style sizes: digits with an optional K, M, G or T (powers of 1024).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        (i, 'T' | 't') => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    digits.parse::<u64>().ok()?.checked_mul(mult)
}

impl DeviceEntry {
    /// Validates one entry (index `i` in the file) into a [`DeviceSpec`].
    ///
    /// # Errors
    /// [`ConfigError::Field`] naming the first invalid field.
    pub fn validate(&self, i: usize) -> Result<DeviceSpec, ConfigError> {
        let name = self.name.clone().unwrap_or_default();
        let label = if name.is_empty() {
            format!("#{i}")
        } else {
            name.clone()
        };
        let err = |field: &'static str, reason: String| ConfigError::Field {
            device: label.clone(),
            field,
            reason,
        };
        if name.is_empty()
            || name.len() > 32
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            || name.starts_with('.')
        {
            return Err(err(
                "name",
                format!("{name:?}: 1 to 32 characters of A-Z a-z 0-9 _ - . (not starting with .)"),
            ));
        }
        match self.mgmtdev.as_deref() {
            Some("blk") => {}
            other => return Err(err("mgmtdev", format!("{other:?}: must be \"blk\""))),
        }
        let size = match &self.size {
            None => None,
            Some(SizeValue::Bytes(b)) => Some(*b),
            Some(SizeValue::Text(t)) => Some(parse_size(t).ok_or_else(|| {
                err(
                    "size",
                    format!("{t:?}: a byte count with optional K/M/G/T suffix"),
                )
            })?),
        };
        let need_size =
            |kind: &str| size.ok_or_else(|| err("size", format!("required for backend {kind}")));
        let backend = match self.backend.as_deref().unwrap_or("ram") {
            "ram" => BackendSpec::Ram {
                size: need_size("ram")?,
            },
            "null" => BackendSpec::Null {
                size: need_size("null")?,
            },
            "file" => BackendSpec::File {
                path: self
                    .path
                    .clone()
                    .ok_or_else(|| err("path", "required for backend file".into()))?,
                direct: self.direct.unwrap_or(false),
            },
            other => return Err(err("backend", format!("{other:?}: one of ram, file, null"))),
        };
        if self.path.is_some() && !matches!(backend, BackendSpec::File { .. }) {
            return Err(err("path", "only valid with backend file".into()));
        }
        if let Some(s) = size {
            if s == 0 || s % 512 != 0 {
                return Err(err(
                    "size",
                    format!("{s}: a positive multiple of 512 bytes"),
                ));
            }
        }
        let queues = self.queues.unwrap_or(1);
        if !(1..=64).contains(&queues) {
            return Err(err("queues", format!("{queues}: 1..=64")));
        }
        let queue_size = self.queue_size.unwrap_or(256);
        if queue_size == 0 || !queue_size.is_power_of_two() || queue_size > 32768 {
            return Err(err(
                "queue_size",
                format!("{queue_size}: a power of two, 1..=32768"),
            ));
        }
        let lbs = self.logical_block_size.unwrap_or(512);
        if !matches!(lbs, 512 | 1024 | 2048 | 4096) {
            return Err(err(
                "logical_block_size",
                format!("{lbs}: 512, 1024, 2048 or 4096"),
            ));
        }
        let poll_us = self.poll_us.unwrap_or(0);
        if poll_us > 1_000_000 {
            return Err(err(
                "poll_us",
                format!("{poll_us}: 0..=1000000 microseconds"),
            ));
        }
        let mut mandate = 0u64;
        for f in self.mandate.iter().flatten() {
            let bit = feature_bit(f).ok_or_else(|| {
                err(
                    "mandate",
                    format!("{f:?}: not a feature name (e.g. VIRTIO_BLK_F_FLUSH)"),
                )
            })?;
            mandate |= bit;
        }
        let serial = self
            .serial
            .clone()
            .unwrap_or_else(|| format!("uvdpa-{name}"));
        if serial.len() > 20 {
            return Err(err("serial", format!("{serial:?}: at most 20 bytes")));
        }
        let coalesce = (
            self.coalesce_usecs.unwrap_or(0),
            self.coalesce_frames.unwrap_or(0),
        );
        if coalesce.0 > 1_000_000 {
            return Err(err(
                "coalesce_usecs",
                format!("{}: 0..=1000000 microseconds", coalesce.0),
            ));
        }
        Ok(DeviceSpec {
            coalesce,
            mandate,
            poll_us,
            name: name.clone(),
            blk: BlkConfig {
                backend,
                read_only: self.read_only.unwrap_or(false),
                num_queues: queues,
                queue_size,
                serial,
                logical_block_size: lbs,
            },
        })
    }
}

/// The embedded default: `blk0`, a 256 MiB `ram` disk with 1 queue of 256.
pub fn default_devices() -> Vec<DeviceSpec> {
    let entry = DeviceEntry {
        name: Some("blk0".into()),
        mgmtdev: Some("blk".into()),
        backend: Some("ram".into()),
        size: Some(SizeValue::Bytes(256 << 20)),
        ..DeviceEntry::default()
    };
    // The embedded entry is valid by construction; a test checks it.
    entry.validate(0).into_iter().collect()
}

/// Parses and validates a config file's text. `path` is only used in messages.
///
/// # Errors
/// [`ConfigError::Parse`] for TOML or schema errors, [`ConfigError::Field`] for values,
/// including duplicate names.
pub fn parse_config(path: &Path, text: &str) -> Result<Vec<DeviceSpec>, ConfigError> {
    let file: ConfigFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut specs: Vec<DeviceSpec> = Vec::new();
    for (i, entry) in file.device.iter().enumerate() {
        let spec = entry.validate(i)?;
        if specs.iter().any(|s| s.name == spec.name) {
            return Err(ConfigError::Field {
                device: spec.name,
                field: "name",
                reason: "duplicate device name".into(),
            });
        }
        specs.push(spec);
    }
    Ok(specs)
}

/// Reads and validates a config file.
///
/// # Errors
/// As [`parse_config`], plus [`ConfigError::Read`].
pub fn load_config(path: &Path) -> Result<Vec<DeviceSpec>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_config(path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(text: &str) -> (&'static str, String) {
        match parse_config(Path::new("t.toml"), text) {
            Err(ConfigError::Field { field, reason, .. }) => (field, reason),
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn default_is_one_256m_ram_disk() {
        let d = default_devices();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].name, "blk0");
        assert!(matches!(d[0].blk.backend, BackendSpec::Ram { size } if size == 256 << 20));
        assert_eq!(d[0].blk.num_queues, 1);
    }

    #[test]
    fn full_entry_parses() {
        let d = parse_config(
            Path::new("t"),
            r#"
            [[device]]
            name = "a"
            mgmtdev = "blk"
            backend = "null"
            size = "1G"
            queues = 4
            queue_size = 128
            read_only = true
            serial = "S1"
            logical_block_size = 4096
            mandate = ["VIRTIO_BLK_F_FLUSH", "VIRTIO_RING_F_EVENT_IDX"]
            [[device]]
            name = "b"
            mgmtdev = "blk"
            backend = "file"
            path = "/tmp/x"
            direct = true
            "#,
        )
        .unwrap();
        assert_eq!(d.len(), 2);
        assert!(matches!(d[0].blk.backend, BackendSpec::Null { size } if size == 1 << 30));
        assert_eq!((d[0].blk.num_queues, d[0].blk.queue_size), (4, 128));
        assert!(d[0].blk.read_only);
        assert_eq!(d[0].mandate, (1 << 9) | (1 << 29));
        assert!(matches!(
            &d[1].blk.backend,
            BackendSpec::File { direct: true, .. }
        ));
    }

    #[test]
    fn each_invalid_field_is_named() {
        let base = "[[device]]\nname = \"a\"\nmgmtdev = \"blk\"\nsize = \"1M\"\n";
        for (extra, field) in [
            ("queues = 0", "queues"),
            ("queues = 65", "queues"),
            ("queue_size = 100", "queue_size"),
            ("logical_block_size = 513", "logical_block_size"),
            ("serial = \"012345678901234567890\"", "serial"),
            ("backend = \"tape\"", "backend"),
            ("path = \"/x\"", "path"),
            ("mandate = [\"VIRTIO_F_TELEPATHY\"]", "mandate"),
            ("poll_us = 2000000", "poll_us"),
            ("coalesce_usecs = 5000000", "coalesce_usecs"),
        ] {
            assert_eq!(field_of(&format!("{base}{extra}\n")).0, field, "{extra}");
        }
        assert_eq!(
            field_of("[[device]]\nname = \"a\"\nmgmtdev = \"blk\"\nsize = \"1000\"\n").0,
            "size"
        );
        assert_eq!(
            field_of("[[device]]\nname = \"a\"\nmgmtdev = \"blk\"\nsize = \"12Q\"\n").0,
            "size"
        );
        assert_eq!(
            field_of("[[device]]\nname = \"a\"\nmgmtdev = \"blk\"\n").0,
            "size"
        );
        assert_eq!(
            field_of("[[device]]\nname = \"a b\"\nmgmtdev = \"blk\"\nsize = 512\n").0,
            "name"
        );
        assert_eq!(
            field_of("[[device]]\nname = \"a\"\nmgmtdev = \"net\"\nsize = 512\n").0,
            "mgmtdev"
        );
        assert_eq!(
            field_of("[[device]]\nname = \"a\"\nmgmtdev = \"blk\"\nbackend = \"file\"\n").0,
            "path"
        );
        let dup = format!("{base}{base}");
        assert_eq!(field_of(&dup), ("name", "duplicate device name".into()));
    }

    #[test]
    fn unknown_fields_and_bad_toml_are_parse_errors() {
        for text in [
            "[[device]]\nnmae = \"a\"\n",
            "[[device]\n",
            "[[device]]\nqueues = \"x\"\n",
        ] {
            assert!(matches!(
                parse_config(Path::new("t"), text),
                Err(ConfigError::Parse { .. })
            ));
        }
    }

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("256M"), Some(256 << 20));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("1T"), Some(1 << 40));
        assert_eq!(parse_size("99999999999T"), None);
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size(""), None);
    }
}
