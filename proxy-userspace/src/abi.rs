//! The one place that converts between `std::net` types and the kernel ABI in `proxy-common`.
//!
//! ABI fields ending in `_be` hold network byte order. An address is stored as the four octets
//! in memory order (`u32::from_ne_bytes(octets)`), so the datapath can compare it with the raw
//! header field; a port is stored as its big-endian representation (`port.to_be()`).

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use proxy_common::proto;

/// `Ipv4Addr` -> ABI address (network byte order in memory).
pub const fn addr_be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// ABI address (network byte order in memory) -> `Ipv4Addr`.
pub const fn addr_from_be(addr_be: u32) -> Ipv4Addr {
    let [a, b, c, d] = addr_be.to_ne_bytes();
    Ipv4Addr::new(a, b, c, d)
}

/// Host port -> ABI port (network byte order in memory).
pub const fn port_be(port: u16) -> u16 {
    port.to_be()
}

/// ABI port (network byte order in memory) -> host port.
pub const fn port_from_be(port_be: u16) -> u16 {
    u16::from_be(port_be)
}

/// The transport protocols a Kubernetes service port can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// The IP protocol number as it appears in the IPv4 header (and in the ABI).
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => proto::TCP,
            Protocol::Udp => proto::UDP,
            Protocol::Sctp => proto::SCTP,
        }
    }

    /// The protocol with that IP protocol number, if it is one a service can use.
    pub const fn from_number(number: u8) -> Option<Self> {
        match number {
            proto::TCP => Some(Protocol::Tcp),
            proto::UDP => Some(Protocol::Udp),
            proto::SCTP => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// The name the Kubernetes API uses ("TCP", "UDP", "SCTP").
    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A protocol name that is not TCP, UDP or SCTP.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown protocol {0:?} (expected TCP, UDP or SCTP)")]
pub struct UnknownProtocol(pub String);

impl FromStr for Protocol {
    type Err = UnknownProtocol;

    /// Case-insensitive: the API spells protocols in upper case, people on the command line
    /// often do not.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Protocol::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownProtocol(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_stored_in_network_order() {
        let ip = Ipv4Addr::new(10, 96, 0, 1);
        let be = addr_be(ip);
        assert_eq!(be.to_ne_bytes(), [10, 96, 0, 1]);
        assert_eq!(addr_from_be(be), ip);
        assert_eq!(addr_be(Ipv4Addr::UNSPECIFIED), 0);
    }

    #[test]
    fn ports_are_stored_in_network_order() {
        let be = port_be(8080);
        assert_eq!(be.to_ne_bytes(), [0x1f, 0x90]);
        assert_eq!(port_from_be(be), 8080);
        for p in [0, 1, 80, 443, 65535] {
            assert_eq!(port_from_be(port_be(p)), p);
        }
    }

    #[test]
    fn protocol_numbers_round_trip() {
        struct Case {
            name: &'static str,
            input: u8,
            expected: Option<Protocol>,
        }
        let cases = [
            Case {
                name: "tcp",
                input: 6,
                expected: Some(Protocol::Tcp),
            },
            Case {
                name: "udp",
                input: 17,
                expected: Some(Protocol::Udp),
            },
            Case {
                name: "sctp",
                input: 132,
                expected: Some(Protocol::Sctp),
            },
            Case {
                name: "icmp is not a service protocol",
                input: 1,
                expected: None,
            },
            Case {
                name: "zero",
                input: 0,
                expected: None,
            },
        ];
        for c in cases {
            assert_eq!(Protocol::from_number(c.input), c.expected, "{}", c.name);
            if let Some(p) = c.expected {
                assert_eq!(p.number(), c.input, "{}", c.name);
            }
        }
    }

    #[test]
    fn protocol_names_parse_case_insensitively() {
        struct Case {
            name: &'static str,
            input: &'static str,
            expected: Result<Protocol, UnknownProtocol>,
        }
        let cases = [
            Case {
                name: "upper",
                input: "TCP",
                expected: Ok(Protocol::Tcp),
            },
            Case {
                name: "lower",
                input: "udp",
                expected: Ok(Protocol::Udp),
            },
            Case {
                name: "mixed",
                input: "Sctp",
                expected: Ok(Protocol::Sctp),
            },
            Case {
                name: "unknown",
                input: "ICMP",
                expected: Err(UnknownProtocol("ICMP".into())),
            },
            Case {
                name: "empty",
                input: "",
                expected: Err(UnknownProtocol(String::new())),
            },
        ];
        for c in cases {
            assert_eq!(c.input.parse::<Protocol>(), c.expected, "{}", c.name);
        }
        for p in Protocol::ALL {
            assert_eq!(p.to_string().parse::<Protocol>(), Ok(p));
        }
        assert_eq!(
            "x".parse::<Protocol>()
                .expect_err("not a protocol")
                .to_string(),
            "unknown protocol \"x\" (expected TCP, UDP or SCTP)"
        );
    }
}
