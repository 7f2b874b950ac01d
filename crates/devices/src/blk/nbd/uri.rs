//! NBD URIs, as the NBD URI specification (`doc/uri.md` of NetworkBlockDevice/nbd) and
//! QEMU and libnbd write them: `nbd://HOST[:PORT]/EXPORT` (TCP, port 10809 by default;
//! an IPv6 host in brackets) and `nbd+unix:///EXPORT?socket=PATH` (a Unix socket). The
//! export name is the path after the first `/`, percent-decoded; empty means the server's
//! default export. TLS schemes (`nbds`, `nbds+unix`) are refused: TLS is not supported yet.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// The IANA port of NBD.
pub const NBD_DEFAULT_PORT: u16 = 10809;
/// Longest export name, in bytes (the protocol's string limit).
pub const MAX_EXPORT_NAME: usize = 4096;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NbdAddress {
    /// TCP: a host name or address and a port.
    Tcp {
        /// Host name, IPv4 address, or IPv6 address (without brackets).
        host: String,
        /// TCP port.
        port: u16,
    },
    /// A Unix stream socket.
    Unix {
        /// Its path.
        socket: PathBuf,
    },
}

/// A parsed NBD URI: the server and the export.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NbdUri {
    /// The server.
    pub address: NbdAddress,
    /// The export name (UTF-8, at most [`MAX_EXPORT_NAME`] bytes; empty: the default export).
    pub export: String,
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} does not decode to UTF-8"))
}

fn percent_encode(s: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || b"-._~/:@!$&'()*+,;=".contains(&c) {
            write!(f, "{}", c as char)?;
        } else {
            write!(f, "%{c:02X}")?;
        }
    }
    Ok(())
}

impl FromStr for NbdUri {
    type Err = String;

    /// Parses a URI; the error says what is wrong and what is allowed.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const FORMS: &str = "nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH";
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| format!("{s:?}: not a URI ({FORMS})"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        if rest.contains('#') {
            return Err(format!("{s:?}: a fragment (#) is not allowed ({FORMS})"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(path)?;
        if export.len() > MAX_EXPORT_NAME {
            return Err(format!(
                "export name of {} bytes: at most {MAX_EXPORT_NAME}",
                export.len()
            ));
        }
        let address = match scheme {
            "nbd" | "nbd+tcp" => {
                if let Some(q) = query {
                    return Err(format!("{s:?}: unexpected query {q:?} ({FORMS})"));
                }
                let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
                    let (h, after) = v6
                        .split_once(']')
                        .ok_or_else(|| format!("{s:?}: unclosed [ in the host"))?;
                    let port = match after {
                        "" => None,
                        p => Some(
                            p.strip_prefix(':')
                                .ok_or_else(|| format!("{s:?}: junk after ]"))?,
                        ),
                    };
                    (h, port)
                } else {
                    match authority.rsplit_once(':') {
                        Some((h, p)) => (h, Some(p)),
                        None => (authority, None),
                    }
                };
                if host.is_empty() {
                    return Err(format!("{s:?}: no host ({FORMS})"));
                }
                let port = match port {
                    None => NBD_DEFAULT_PORT,
                    Some(p) => p
                        .parse::<u16>()
                        .ok()
                        .filter(|&p| p != 0)
                        .ok_or_else(|| format!("{s:?}: port {p:?} is not in 1..=65535"))?,
                };
                NbdAddress::Tcp {
                    host: host.to_string(),
                    port,
                }
            }
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(format!(
                        "{s:?}: a Unix socket URI has no host (nbd+unix:///EXPORT?socket=PATH)"
                    ));
                }
                let mut socket = None;
                for kv in query.unwrap_or("").split('&').filter(|kv| !kv.is_empty()) {
                    match kv.split_once('=') {
                        Some(("socket", v)) => socket = Some(PathBuf::from(percent_decode(v)?)),
                        _ => {
                            return Err(format!(
                                "{s:?}: unknown query parameter {kv:?} (only socket=PATH)"
                            ))
                        }
                    }
                }
                let socket = socket
                    .filter(|p| !p.as_os_str().is_empty())
                    .ok_or_else(|| format!("{s:?}: needs ?socket=PATH"))?;
                NbdAddress::Unix { socket }
            }
            "nbds" | "nbds+unix" | "nbds+tcp" => {
                return Err(format!("{s:?}: TLS (nbds) is not supported yet"))
            }
            other => return Err(format!("{s:?}: scheme {other:?} is not nbd or nbd+unix")),
        };
        Ok(Self { address, export })
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.address {
            NbdAddress::Tcp { host, port } => {
                if host.contains(':') {
                    write!(f, "nbd://[{host}]:{port}/")?;
                } else {
                    write!(f, "nbd://{host}:{port}/")?;
                }
                percent_encode(&self.export, f)
            }
            NbdAddress::Unix { socket } => {
                f.write_str("nbd+unix:///")?;
                percent_encode(&self.export, f)?;
                f.write_str("?socket=")?;
                percent_encode(&socket.to_string_lossy(), f)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
        NbdUri {
            address: NbdAddress::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
    }

    #[test]
    fn tcp_forms() {
        assert_eq!("nbd://localhost".parse(), Ok(tcp("localhost", 10809, "")));
        assert_eq!("nbd://h:1234/".parse(), Ok(tcp("h", 1234, "")));
        assert_eq!(
            "nbd://127.0.0.1:10810/disk%20a".parse(),
            Ok(tcp("127.0.0.1", 10810, "disk a"))
        );
        assert_eq!("nbd://[::1]:99/x/y".parse(), Ok(tcp("::1", 99, "x/y")));
        assert_eq!("nbd://[::1]/x".parse(), Ok(tcp("::1", 10809, "x")));
    }

    #[test]
    fn unix_form() {
        let u: NbdUri = "nbd+unix:///e1?socket=/run/nbd.sock".parse().unwrap();
        assert_eq!(
            u,
            NbdUri {
                address: NbdAddress::Unix {
                    socket: "/run/nbd.sock".into()
                },
                export: "e1".into()
            }
        );
        assert_eq!(u.to_string(), "nbd+unix:///e1?socket=/run/nbd.sock");
        let d: NbdUri = "nbd+unix://?socket=/s".parse().unwrap();
        assert_eq!(d.export, "");
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "nbd://h:1/a%20b",
            "nbd://[::1]:10809/",
            "nbd+unix:///x?socket=/tmp/a%20b",
        ] {
            let u: NbdUri = s.parse().unwrap();
            assert_eq!(u.to_string().parse::<NbdUri>().unwrap(), u, "{s}");
        }
    }

    #[test]
    fn bad_uris_say_why() {
        for (s, why) in [
            ("localhost:10809", "not a URI"),
            ("http://h/x", "scheme"),
            ("nbds://h/x", "TLS"),
            ("nbd://:10809/x", "no host"),
            ("nbd://h:0/x", "port"),
            ("nbd://h:99999/x", "port"),
            ("nbd://h:x/x", "port"),
            ("nbd://[::1/x", "unclosed"),
            ("nbd+unix:///x", "socket=PATH"),
            ("nbd+unix:///x?sock=/a", "unknown query"),
            ("nbd+unix://host/x?socket=/a", "no host"),
            ("nbd://h/%zz", "percent"),
            ("nbd://h/%ff", "UTF-8"),
            ("nbd://h/x?socket=/a", "query"),
        ] {
            let e = s.parse::<NbdUri>().unwrap_err();
            assert!(e.contains(why), "{s}: {e}");
        }
        let long = format!("nbd://h/{}", "a".repeat(MAX_EXPORT_NAME + 1));
        assert!(long.parse::<NbdUri>().is_err());
    }
}
