//! Field-level helpers shared by the readers: the issue collector and the sloppy IP, port and
//! protocol parsers kube-proxy's reading requires; object names for messages.
use super::*;
/// Where issues go, and which object they are about.
pub(super) struct Ctx<'a> {
    pub(super) object: String,
    pub(super) issues: &'a mut Vec<Issue>,
}

impl Ctx<'_> {
    pub(super) fn issue(&mut self, field: &str, message: impl Into<String>) {
        self.issues.push(Issue {
            object: self.object.clone(),
            field: field.to_owned(),
            message: message.into(),
        });
    }
}

pub(super) enum Ip {
    Empty,
    V4(Ipv4Addr),
    V6,
    /// With an explanation suffix (may be empty).
    Invalid(&'static str),
}

/// Parses an address like kube-proxy's `ParseIPSloppy`: dotted decimal with 1 to 3 digits per
/// octet, leading zeros read as decimal. Anything with a `:` is treated as IPv6 (validated
/// with std, which is strict as Go's parser is for IPv6).
pub(super) fn parse_ip(s: &str) -> Ip {
    if s.is_empty() {
        return Ip::Empty;
    }
    if s.contains(':') {
        return match s.parse::<std::net::Ipv6Addr>() {
            Ok(_) => Ip::V6,
            Err(_) => Ip::Invalid(""),
        };
    }
    match parse_octets(s) {
        None => Ip::Invalid(""),
        Some(ip) if ip.is_unspecified() => Ip::Invalid(" (unspecified address)"),
        Some(ip) => Ip::V4(ip),
    }
}

/// Dotted decimal, 1 to 3 digits per octet, leading zeros read as decimal; 0.0.0.0 allowed.
pub(super) fn parse_octets(s: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *octet = part.parse::<u8>().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Ipv4Addr::from(octets))
}

/// Protocol of a port; the API default is TCP.
pub(super) fn parse_protocol(p: Option<&str>, field: &str, ctx: &mut Ctx) -> Option<Protocol> {
    match p {
        None | Some("") => Some(Protocol::Tcp),
        Some(p) => match p.parse() {
            Ok(p) => Some(p),
            Err(e) => {
                ctx.issue(field, format!("{e}; the port is skipped"));
                None
            }
        },
    }
}

pub(super) fn parse_port(p: Option<i32>, field: &str, ctx: &mut Ctx) -> Option<u16> {
    match p {
        None => {
            ctx.issue(field, "missing; the port is skipped");
            None
        }
        Some(p) => match u16::try_from(p) {
            Ok(p) if p != 0 => Some(p),
            _ => {
                ctx.issue(
                    field,
                    format!("invalid port {p} (must be 1-65535); the port is skipped"),
                );
                None
            }
        },
    }
}

/// The namespace an object is in; objects without one are in `default`, as the API server
/// (and the manifest loader) would place them.
pub(super) fn namespace(meta: &ObjectMeta) -> &str {
    meta.namespace
        .as_deref()
        .filter(|ns| !ns.is_empty())
        .unwrap_or("default")
}

/// Sort key: `(namespace, name)`.
pub(super) fn object_id(meta: &ObjectMeta) -> (&str, &str) {
    (namespace(meta), meta.name.as_deref().unwrap_or_default())
}

pub(super) fn display_id(meta: &ObjectMeta) -> String {
    match meta.name.as_deref().filter(|n| !n.is_empty()) {
        Some(name) => format!("{}/{name}", namespace(meta)),
        None => format!("{}/<unnamed>", namespace(meta)),
    }
}
