//! Which interfaces are pod interfaces (they get `lb_pod_in`/`lb_pod_out`): one mechanism,
//! three selectors, after kube-proxy's `--detect-local-mode` flags and what CNIs build:
//! - [`PodSelector::Bridge`]: the ports of a pod bridge (`--pod-bridge-interface`: the bridge
//!   plugin, flannel's cni0, kubenet's cbr0);
//! - [`PodSelector::Prefix`]: interfaces whose name starts with a prefix
//!   (`--pod-interface-name-prefix`: `veth`, `cali`, `lxc`, `eni`...);
//! - [`PodSelector::PeerNetns`] (the default): every veth or netkit device whose peer lives in
//!   another network namespace, which is what a pod's host-side interface is whatever the CNI
//!   (kindnet, Calico, Cilium, the AWS VPC CNI route such veths without a bridge).
//!
//! The uplinks are never pod interfaces (in a lab, or a node that is itself a container, the
//! uplink can be a veth whose peer is in another namespace). Pure: the facts come from
//! [`crate::datapath::netlink::Netlink::link_facts`].
use super::netlink::Iface;

/// How pod interfaces are found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodSelector {
    /// The ports of this bridge.
    Bridge(String),
    /// Interfaces whose name starts with this prefix.
    Prefix(String),
    /// veth/netkit devices whose peer is in another network namespace.
    PeerNetns,
}

impl PodSelector {
    /// From the flags: a named bridge wins, then a name prefix, else the default.
    pub fn from_flags(bridge: &str, prefix: &str) -> Self {
        if !bridge.is_empty() {
            Self::Bridge(bridge.to_owned())
        } else if !prefix.is_empty() {
            Self::Prefix(prefix.to_owned())
        } else {
            Self::PeerNetns
        }
    }

    /// The bridge, for the selector that has one.
    pub fn bridge(&self) -> Option<&str> {
        match self {
            Self::Bridge(b) => Some(b),
            _ => None,
        }
    }

    /// Which interfaces of `links` are pod interfaces (by ifindex), never one named in `uplinks`,
    /// never the bridge itself. `bridge_index` is the named bridge's ifindex (`None`: it does
    /// not exist, so it has no ports).
    pub fn select(
        &self,
        links: &[LinkFacts],
        bridge_index: Option<u32>,
        uplinks: &[String],
    ) -> Vec<Iface> {
        let mut out: Vec<Iface> = links
            .iter()
            .filter(|l| !uplinks.contains(&l.iface.name) && l.iface.name != "lo")
            .filter(|l| match self {
                Self::Bridge(_) => bridge_index.is_some() && l.controller == bridge_index,
                Self::Prefix(p) => l.iface.name.starts_with(p.as_str()),
                Self::PeerNetns => {
                    matches!(l.kind.as_deref(), Some("veth" | "netkit")) && l.peer_netns.is_some()
                }
            })
            .map(|l| l.iface.clone())
            .collect();
        out.sort();
        out
    }
}

/// The network namespace ID of the pod behind each selected interface (`maps::POD_NETNS`):
/// where the datapath looks up the pod's own sockets. Interfaces without a peer namespace
/// (a bridge port of a non-veth kind) are left out.
pub fn pod_netns(links: &[LinkFacts], ports: &[Iface]) -> Vec<(u32, i32)> {
    links
        .iter()
        .filter(|l| ports.iter().any(|p| p.index == l.iface.index))
        .filter_map(|l| Some((l.iface.index, l.peer_netns.filter(|n| *n >= 0)?)))
        .collect()
}

impl std::fmt::Display for PodSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Bridge(b) => write!(f, "the ports of bridge {b} (--pod-bridge-interface)"),
            Self::Prefix(p) => write!(
                f,
                "interfaces named {p}* (--pod-interface-name-prefix), uplinks excluded"
            ),
            Self::PeerNetns => f.write_str(
                "veth/netkit devices whose peer is in another network namespace, uplinks \
                 excluded (the default; --pod-bridge-interface or --pod-interface-name-prefix \
                 choose otherwise)",
            ),
        }
    }
}

/// What rtnetlink says about one interface, as far as pod selection cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkFacts {
    pub iface: Iface,
    /// IFLA_MASTER: the bridge (or bond, VRF) it is enslaved to.
    pub controller: Option<u32>,
    /// IFLA_INFO_KIND: `veth`, `netkit`, `bridge`, `vxlan`... (`None` for physical devices).
    pub kind: Option<String>,
    /// IFLA_LINK_NETNSID: set when the device's peer (or lower device) lives in another
    /// network namespace.
    pub peer_netns: Option<i32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(
        index: u32,
        name: &str,
        kind: Option<&str>,
        ctl: Option<u32>,
        ns: Option<i32>,
    ) -> LinkFacts {
        LinkFacts {
            iface: Iface {
                index,
                name: name.to_owned(),
            },
            controller: ctl,
            kind: kind.map(str::to_owned),
            peer_netns: ns,
        }
    }

    /// A node with a bridge (cbr0, 3) holding two pod veths, a routed Calico veth, a netkit
    /// pod device, Cilium's host veth pair (both ends here), a VXLAN device, and an uplink
    /// that is itself a veth to another namespace (a lab or a kind node).
    fn node() -> Vec<LinkFacts> {
        vec![
            link(1, "lo", None, None, None),
            link(2, "eth0", Some("veth"), None, Some(0)),
            link(3, "cbr0", Some("bridge"), None, None),
            link(4, "veth1", Some("veth"), Some(3), Some(1)),
            link(5, "veth2", Some("veth"), Some(3), Some(2)),
            link(6, "cali0a1b", Some("veth"), None, Some(3)),
            link(7, "nk0", Some("netkit"), None, Some(4)),
            link(8, "cilium_host", Some("veth"), None, None),
            link(9, "cilium_net", Some("veth"), None, None),
            link(10, "flannel.1", Some("vxlan"), None, None),
            link(11, "vethdown", Some("veth"), None, None),
        ]
    }

    fn names(v: Vec<Iface>) -> Vec<String> {
        v.into_iter().map(|i| i.name).collect()
    }

    #[test]
    fn flags_choose_the_selector() {
        assert_eq!(
            PodSelector::from_flags("cbr0", "veth"),
            PodSelector::Bridge("cbr0".into())
        );
        assert_eq!(
            PodSelector::from_flags("", "cali"),
            PodSelector::Prefix("cali".into())
        );
        assert_eq!(PodSelector::from_flags("", ""), PodSelector::PeerNetns);
        assert_eq!(PodSelector::Bridge("b".into()).bridge(), Some("b"));
        assert_eq!(PodSelector::PeerNetns.bridge(), None);
    }

    #[test]
    fn bridge_selects_its_ports_only() {
        let s = PodSelector::Bridge("cbr0".into());
        assert_eq!(names(s.select(&node(), Some(3), &[])), ["veth1", "veth2"]);
        assert!(
            s.select(&node(), None, &[]).is_empty(),
            "no bridge, no ports"
        );
    }

    #[test]
    fn prefix_selects_by_name_without_uplinks() {
        let s = PodSelector::Prefix("veth".into());
        assert_eq!(
            names(s.select(&node(), None, &["veth2".into()])),
            ["veth1", "vethdown"]
        );
        let s = PodSelector::Prefix("cali".into());
        assert_eq!(names(s.select(&node(), None, &[])), ["cali0a1b"]);
    }

    #[test]
    fn default_selects_veth_and_netkit_with_a_peer_elsewhere_but_no_uplink() {
        let s = PodSelector::PeerNetns;
        assert_eq!(
            names(s.select(&node(), None, &["eth0".into()])),
            ["veth1", "veth2", "cali0a1b", "nk0"]
        );
        // Without the uplink list, the veth uplink would be taken: callers always pass it.
        assert!(names(s.select(&node(), None, &[])).contains(&"eth0".to_owned()));
    }
}
