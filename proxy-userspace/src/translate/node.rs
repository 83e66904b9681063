//! Node-level inputs of translation: this node's zone and addresses (from its Node object)
//! and the addresses NodePorts are served on (`--nodeport-addresses`).
use super::*;

/// The node's zone: its `topology.kubernetes.io/zone` label, if set and non-empty.
pub fn node_zone(node: &Node) -> Option<String> {
    node.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(ZONE_LABEL))
        .filter(|z| !z.is_empty())
        .cloned()
}

/// kube-proxy's `--nodeport-addresses`: which node addresses serve NodePorts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Unset or empty: every node address.
    #[default]
    All,
    /// `primary`: the node's primary (first) address.
    Primary,
    /// The node addresses inside any of these IPv4 CIDRs `(network, prefix length)`. IPv6
    /// CIDRs are accepted (dual-stack flags) and match no IPv4 address.
    Cidrs(Vec<(Ipv4Addr, u8)>),
}

/// A `--nodeport-addresses` value that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodePortAddressesError {
    #[error(
        "--nodeport-addresses: {entry:?} is not a CIDR ({reason}); expected comma-separated \
         CIDRs such as 10.0.0.0/8,192.168.1.10/32, or the single word \"primary\""
    )]
    InvalidCidr { entry: String, reason: String },
    #[error(
        "--nodeport-addresses: empty entry in {0:?}; expected comma-separated CIDRs such as \
         10.0.0.0/8,192.168.1.10/32, or the single word \"primary\""
    )]
    EmptyEntry(String),
    #[error(
        "--nodeport-addresses: \"primary\" cannot be combined with CIDRs ({0:?}); pass either \
         \"primary\" or a list of CIDRs"
    )]
    PrimaryWithCidrs(String),
}

impl FromStr for NodePortAddresses {
    type Err = NodePortAddressesError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(Self::All);
        }
        let entries: Vec<&str> = s.split(',').map(str::trim).collect();
        if entries.contains(&"primary") {
            return if entries.len() == 1 {
                Ok(Self::Primary)
            } else {
                Err(NodePortAddressesError::PrimaryWithCidrs(s.to_owned()))
            };
        }
        let mut cidrs = Vec::new();
        for entry in entries {
            if entry.is_empty() {
                return Err(NodePortAddressesError::EmptyEntry(s.to_owned()));
            }
            match parse_cidr(entry) {
                Ok(Cidr::V4(net, prefix)) => cidrs.push((net, prefix)),
                Ok(Cidr::V6) => {}
                Err(reason) => {
                    return Err(NodePortAddressesError::InvalidCidr {
                        entry: entry.to_owned(),
                        reason,
                    });
                }
            }
        }
        Ok(Self::Cidrs(cidrs))
    }
}

/// The node addresses NodePorts listen on: `node_ips` (primary first) filtered by the flag,
/// in order, without duplicates, and never a loopback address (CVE-2020-8558: a NodePort on
/// 127.0.0.1 is reachable by neighbours that route 127/8 to the node).
pub fn nodeport_addresses(node_ips: &[Ipv4Addr], flag: &NodePortAddresses) -> Vec<Ipv4Addr> {
    let chosen: Vec<Ipv4Addr> = match flag {
        NodePortAddresses::All => node_ips.to_vec(),
        NodePortAddresses::Primary => node_ips.first().copied().into_iter().collect(),
        NodePortAddresses::Cidrs(cidrs) => node_ips
            .iter()
            .copied()
            .filter(|ip| cidrs.iter().any(|(net, p)| in_cidr(*ip, *net, *p)))
            .collect(),
    };
    let mut seen = HashSet::new();
    chosen
        .into_iter()
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified() && seen.insert(*ip))
        .collect()
}

pub(super) fn mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

pub(super) fn in_cidr(ip: Ipv4Addr, net: Ipv4Addr, prefix: u8) -> bool {
    u32::from(ip) & mask(prefix) == u32::from(net)
}

pub(super) enum Cidr {
    /// Network (host bits cleared) and prefix length.
    V4(Ipv4Addr, u8),
    V6,
}

/// Parses a CIDR like kube-proxy's `ParseCIDRSloppy`; host bits are cleared. The error is a
/// reason to show after the value.
pub(super) fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let Some((addr, prefix)) = s.split_once('/') else {
        return Err("no /prefix-length; a single address is written like 10.0.0.1/32".into());
    };
    if addr.contains(':') {
        let ok = addr.parse::<std::net::Ipv6Addr>().is_ok()
            && prefix.bytes().all(|b| b.is_ascii_digit())
            && prefix.parse::<u8>().is_ok_and(|p| p <= 128);
        return if ok {
            Ok(Cidr::V6)
        } else {
            Err("invalid IPv6 CIDR".into())
        };
    }
    let Some(ip) = parse_octets(addr) else {
        return Err(format!("invalid IPv4 address {addr:?}"));
    };
    let prefix = match prefix.parse::<u8>() {
        Ok(p) if p <= 32 && !prefix.is_empty() && prefix.bytes().all(|b| b.is_ascii_digit()) => p,
        _ => return Err(format!("invalid prefix length {prefix:?} (must be 0-32)")),
    };
    Ok(Cidr::V4(
        Ipv4Addr::from(u32::from(ip) & mask(prefix)),
        prefix,
    ))
}

/// The node's own IPv4 addresses from its Node object (InternalIP first).
pub fn node_addresses(node: &k8s_openapi::api::core::v1::Node) -> Vec<Ipv4Addr> {
    let mut addrs: Vec<(u8, Ipv4Addr)> = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|a| {
            let rank = match a.type_.as_str() {
                "InternalIP" => 0,
                "ExternalIP" => 1,
                _ => return None,
            };
            a.address.parse().ok().map(|ip| (rank, ip))
        })
        .collect();
    addrs.sort();
    addrs.into_iter().map(|(_, ip)| ip).collect()
}

/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Whether load balancers should keep sending new traffic to this node: kube-proxy's
/// `nodeEligible` in `/healthz` (1.30+), false once the node is being deleted or the cluster
/// autoscaler has tainted it for deletion, so health checks drain it first.
pub fn node_eligible(node: &Node) -> bool {
    let deleting = node.metadata.deletion_timestamp.is_some();
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
    !deleting && !tainted
}

#[cfg(test)]
mod eligibility_tests {
    use k8s_openapi::{
        api::core::v1::{NodeSpec, Taint},
        apimachinery::pkg::apis::meta::v1::Time,
    };

    use super::*;

    #[test]
    fn deleting_or_autoscaler_tainted_nodes_are_not_eligible() {
        let mut node = Node::default();
        assert!(node_eligible(&node));
        node.spec = Some(NodeSpec {
            taints: Some(vec![Taint {
                key: "node.kubernetes.io/unschedulable".into(),
                effect: "NoSchedule".into(),
                ..Taint::default()
            }]),
            ..NodeSpec::default()
        });
        assert!(node_eligible(&node), "other taints do not matter");
        let mut tainted = node.clone();
        if let Some(t) = tainted.spec.as_mut().and_then(|s| s.taints.as_mut()) {
            t.push(Taint {
                key: TO_BE_DELETED_TAINT.into(),
                effect: "NoSchedule".into(),
                ..Taint::default()
            });
        }
        assert!(!node_eligible(&tainted));
        node.metadata.deletion_timestamp = Some(Time(k8s_openapi::chrono::DateTime::UNIX_EPOCH));
        assert!(!node_eligible(&node));
    }
}
