//! The value types of the tracker: resource types, ids, owners, and the rows that
//! `uvdpa res show` prints (seed 003, `rdma res show`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The kind of a tracked resource; each kind has its own table and its own id space.
///
/// The short name (`dev`, `session`, `mr`, `vq`, `irq`, `worker`, `ipc`, `capture`) is what
/// `Display`/`FromStr`, serde and the CLI (`uvdpa res show TYPE`) use. The order of the
/// variants is the order of `ResType::ALL`, of `Tracker::counts` and of snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ResType {
    /// A virtio device (`dev`).
    #[serde(rename = "dev")]
    Device,
    /// A vhost-user session, one connected frontend (`session`).
    #[serde(rename = "session")]
    Session,
    /// A guest memory region mapped from the frontend's memory table (`mr`).
    #[serde(rename = "mr")]
    MemRegion,
    /// A virtqueue (`vq`).
    #[serde(rename = "vq")]
    Virtqueue,
    /// An interrupt vector: a call eventfd and its trigger (`irq`).
    #[serde(rename = "irq")]
    Vector,
    /// A worker thread (`worker`).
    #[serde(rename = "worker")]
    Worker,
    /// A connected IPC client, a secondary such as the CLI (`ipc`).
    #[serde(rename = "ipc")]
    IpcClient,
    /// A live capture attached to a net device by a secondary (`capture`).
    #[serde(rename = "capture")]
    Capture,
}

impl ResType {
    /// Every resource type, in table order.
    pub const ALL: [ResType; 8] = [
        ResType::Device,
        ResType::Session,
        ResType::MemRegion,
        ResType::Virtqueue,
        ResType::Vector,
        ResType::Worker,
        ResType::IpcClient,
        ResType::Capture,
    ];

    /// The short name: `dev`, `session`, `mr`, `vq`, `irq`, `worker`, `ipc` or `capture`.
    pub fn as_str(self) -> &'static str {
        match self {
            ResType::Device => "dev",
            ResType::Session => "session",
            ResType::MemRegion => "mr",
            ResType::Virtqueue => "vq",
            ResType::Vector => "irq",
            ResType::Worker => "worker",
            ResType::IpcClient => "ipc",
            ResType::Capture => "capture",
        }
    }

    /// Position of this type in `ALL` (the index of its table).
    pub(crate) fn index(self) -> usize {
        match self {
            ResType::Device => 0,
            ResType::Session => 1,
            ResType::MemRegion => 2,
            ResType::Virtqueue => 3,
            ResType::Vector => 4,
            ResType::Worker => 5,
            ResType::IpcClient => 6,
            ResType::Capture => 7,
        }
    }
}

impl fmt::Display for ResType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no resource type or id.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ParseError {
    /// The type name is not one of the short names of `ResType`.
    #[error(
        "Unknown resource type {0:?} (expected dev, session, mr, vq, irq, worker, ipc or capture)"
    )]
    UnknownType(String),
    /// The string is not of the form `TYPE/ID` with a decimal `u32` id.
    #[error("Malformed resource id {0:?} (expected TYPE/ID, e.g. dev/3)")]
    MalformedId(String),
}

impl FromStr for ResType {
    type Err = ParseError;

    /// Parses a short name (`dev`, `session`, `mr`, `vq`, `irq`, `worker`, `ipc`,
    /// `capture`); exact match.
    ///
    /// # Errors
    /// `ParseError::UnknownType` for anything else.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ResType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| ParseError::UnknownType(s.to_owned()))
    }
}

/// The identity of one entry: its type and its id within that type's table.
///
/// Displayed, parsed and serialized as `TYPE/ID`, e.g. `dev/3`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct ResId {
    /// The table the entry lives in.
    pub ty: ResType,
    /// The id, unique within `ty` (see `Tracker` for the allocation rule).
    pub id: u32,
}

impl fmt::Display for ResId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ty, self.id)
    }
}

impl FromStr for ResId {
    type Err = ParseError;

    /// Parses `TYPE/ID`, e.g. `dev/3`.
    ///
    /// # Errors
    /// `ParseError::UnknownType` for an unknown type name, `ParseError::MalformedId` when
    /// the `/` or a decimal `u32` id is missing.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ty, id) = s
            .split_once('/')
            .ok_or_else(|| ParseError::MalformedId(s.to_owned()))?;
        let ty = ty.parse()?;
        let id = id
            .parse()
            .map_err(|_| ParseError::MalformedId(s.to_owned()))?;
        Ok(ResId { ty, id })
    }
}

impl From<ResId> for String {
    fn from(id: ResId) -> String {
        id.to_string()
    }
}

impl TryFrom<String> for ResId {
    type Error = ParseError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// The process an entry is accounted to (seed 003: the owner task of a restrack entry).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Owner {
    /// Process id.
    pub pid: u32,
    /// Command name as in `/proc/PID/comm` (at most 15 bytes on Linux), `?` if unknown.
    pub comm: String,
}

impl Owner {
    /// This process: `std::process::id()` and `/proc/self/comm` (the name of the main
    /// thread, whichever thread calls this; `?` if unreadable).
    pub fn current() -> Owner {
        Owner {
            pid: std::process::id(),
            comm: read_comm("/proc/self/comm"),
        }
    }

    /// Another process, e.g. an IPC peer identified by SO_PEERCRED. The command name is
    /// read from `/proc/PID/comm` now; it is `?` when that file cannot be read (the process
    /// is gone, or /proc is not mounted). Never fails.
    pub fn of_pid(pid: u32) -> Owner {
        Owner {
            pid,
            comm: read_comm(&format!("/proc/{pid}/comm")),
        }
    }
}

fn read_comm(path: &str) -> String {
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let s = s.trim_end_matches('\n');
            if s.is_empty() {
                "?".to_owned()
            } else {
                s.to_owned()
            }
        }
        Err(_) => "?".to_owned(),
    }
}

/// Life state of an entry as shown by snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResState {
    /// Added and not deleted: found by lookups (`active`).
    Active,
    /// Deleted (or its handle dropped) while references are still held: no longer found
    /// by lookups, still counted, gone when the last reference drops (`deleting`).
    Deleting,
}

impl fmt::Display for ResState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ResState::Active => "active",
            ResState::Deleting => "deleting",
        })
    }
}

/// One row of `uvdpa res show`: a copy of an entry taken by `Tracker::snapshot`.
///
/// The JSON form (`-j`) is this struct through serde; its field names are stable:
/// `type` (short type name, e.g. `"dev"`), `id`, `name`, `parent` (`"TYPE/ID"` or `null`),
/// `owner_pid`, `owner_comm`, `created_unix_ms`, `refs`, `state` (`"active"` or
/// `"deleting"`), `holders` (array of strings).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryInfo {
    /// Resource type (JSON key `type`).
    #[serde(rename = "type")]
    pub ty: ResType,
    /// Id within the type's table.
    pub id: u32,
    /// Name given at creation (e.g. `blk0`, `blk0-q0`); not necessarily unique.
    pub name: String,
    /// The entry this one belongs to, if any (e.g. a virtqueue's device).
    pub parent: Option<ResId>,
    /// Owner process id.
    pub owner_pid: u32,
    /// Owner command name.
    pub owner_comm: String,
    /// Creation time, milliseconds since the Unix epoch (wall clock).
    pub created_unix_ms: u64,
    /// References held at the time of the snapshot. While the entry is `active` this
    /// includes the creator's own reference (the `ResHandle`), so an idle entry shows 1.
    pub refs: usize,
    /// `active` or `deleting`.
    pub state: ResState,
    /// Labels of the labeled references currently held, oldest first. References taken
    /// without a label (`get_unlabeled`, lookups) are counted in `refs` but not listed.
    pub holders: Vec<String>,
}

impl EntryInfo {
    /// The entry's `TYPE/ID`.
    pub fn res_id(&self) -> ResId {
        ResId {
            ty: self.ty,
            id: self.id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn res_type_names_round_trip() {
        for ty in ResType::ALL {
            assert_eq!(ty.to_string().parse::<ResType>(), Ok(ty));
            assert_eq!(ResType::ALL[ty.index()], ty);
        }
        let names: Vec<String> = ResType::ALL.iter().map(|t| t.to_string()).collect();
        assert_eq!(
            names,
            ["dev", "session", "mr", "vq", "irq", "worker", "ipc", "capture"]
        );
        assert_eq!(
            "device".parse::<ResType>(),
            Err(ParseError::UnknownType("device".into()))
        );
    }

    #[test]
    fn res_id_display_parse() {
        let id = ResId {
            ty: ResType::Device,
            id: 3,
        };
        assert_eq!(id.to_string(), "dev/3");
        assert_eq!("dev/3".parse::<ResId>(), Ok(id));
        assert_eq!("vq/4294967295".parse::<ResId>().map(|r| r.id), Ok(u32::MAX));
        for bad in ["dev", "dev/", "dev/-1", "dev/4294967296", "dev/3/4"] {
            assert_eq!(
                bad.parse::<ResId>(),
                Err(ParseError::MalformedId(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(
            "nic/3".parse::<ResId>(),
            Err(ParseError::UnknownType("nic".into()))
        );
    }

    #[test]
    fn res_state_display_matches_serde() {
        assert_eq!(ResState::Active.to_string(), "active");
        assert_eq!(ResState::Deleting.to_string(), "deleting");
    }

    #[test]
    fn owner_of_unknown_pid_is_question_mark() {
        // Linux pids are below 2^22, so this one never exists.
        let o = Owner::of_pid(u32::MAX);
        assert_eq!(o.pid, u32::MAX);
        assert_eq!(o.comm, "?");
    }
}
