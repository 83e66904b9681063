//! Interface discovery over rtnetlink: interfaces with the facts pod selection reads, addresses,
//! and link events so pod interfaces that appear later get attached.
use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context as _, Result, anyhow};
use futures::{StreamExt as _, TryStreamExt as _, channel::mpsc::UnboundedReceiver};
use netlink_packet_route::{
    address::AddressAttribute,
    link::{LinkAttribute, LinkInfo, LinkMessage},
};
use netlink_sys::AsyncSocket as _;
use rtnetlink::Handle;

use super::pods::LinkFacts;

/// A network interface by index and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Iface {
    pub index: u32,
    pub name: String,
}

fn link_name(m: &LinkMessage) -> Option<String> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

fn link_controller(m: &LinkMessage) -> Option<u32> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(c) => Some(*c),
        _ => None,
    })
}

/// A netlink client for queries.
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    pub fn connect() -> Result<Self> {
        let (conn, handle, _) =
            rtnetlink::new_connection().context("opening an rtnetlink socket")?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// The interface called `name`, if it exists.
    pub async fn link_by_name(&self, name: &str) -> Result<Option<Iface>> {
        let mut s = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match s.try_next().await {
            Ok(Some(m)) => Ok(Some(Iface {
                index: m.header.index,
                name: name.to_owned(),
            })),
            Ok(None) => Ok(None),
            // The kernel answers ENODEV for a name that does not exist.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(anyhow!(e)).with_context(|| format!("looking up interface {name}")),
        }
    }

    /// Every interface with what pod selection needs to know of it
    /// ([`crate::datapath::pods`]).
    pub async fn link_facts(&self) -> Result<Vec<LinkFacts>> {
        let mut s = self.handle.link().get().execute();
        let mut out = Vec::new();
        while let Some(m) = s.try_next().await.context("listing interfaces")? {
            let Some(name) = link_name(&m) else { continue };
            let kind = m.attributes.iter().find_map(|a| match a {
                LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                    LinkInfo::Kind(k) => Some(k.to_string()),
                    _ => None,
                }),
                _ => None,
            });
            let peer_netns = m.attributes.iter().find_map(|a| match a {
                LinkAttribute::LinkNetNsId(id) => Some(*id),
                _ => None,
            });
            out.push(LinkFacts {
                iface: Iface {
                    index: m.header.index,
                    name,
                },
                controller: link_controller(&m),
                kind,
                peer_netns,
            });
        }
        Ok(out)
    }

    /// Every interface in this network namespace.
    pub async fn all_links(&self) -> Result<Vec<Iface>> {
        let mut s = self.handle.link().get().execute();
        let mut out = Vec::new();
        while let Some(m) = s.try_next().await.context("listing interfaces")? {
            if let Some(name) = link_name(&m) {
                out.push(Iface {
                    index: m.header.index,
                    name,
                });
            }
        }
        out.sort();
        Ok(out)
    }

    /// The IPv4 addresses of an interface with their prefix lengths (the subnets it is on).
    pub async fn ipv4_nets(&self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>> {
        self.nets(Some(index)).await
    }

    /// The IPv4 addresses of every interface with their prefix lengths.
    pub async fn all_ipv4_nets(&self) -> Result<Vec<(Ipv4Addr, u8)>> {
        self.nets(None).await
    }

    async fn nets(&self, index: Option<u32>) -> Result<Vec<(Ipv4Addr, u8)>> {
        let mut req = self.handle.address().get();
        if let Some(i) = index {
            req = req.set_link_index_filter(i);
        }
        let mut s = req.execute();
        let mut out = Vec::new();
        while let Some(m) = s.try_next().await.context("listing addresses")? {
            let prefix = m.header.prefix_len;
            for a in &m.attributes {
                if let AddressAttribute::Local(IpAddr::V4(ip))
                | AddressAttribute::Address(IpAddr::V4(ip)) = a
                    && !out.iter().any(|(o, _)| o == ip)
                {
                    out.push((*ip, prefix));
                }
            }
        }
        Ok(out)
    }

    /// The IPv4 addresses on interface `index`.
    pub async fn ipv4_addrs(&self, index: u32) -> Result<Vec<Ipv4Addr>> {
        Ok(self
            .ipv4_nets(index)
            .await?
            .into_iter()
            .map(|(ip, _)| ip)
            .collect())
    }
}

/// The directed broadcast address of each subnet in `nets` (none for /31 and /32, which have
/// no broadcast address), sorted, without duplicates.
pub fn subnet_broadcasts(nets: &[(Ipv4Addr, u8)]) -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = nets
        .iter()
        .filter(|(_, len)| *len < 31)
        .map(|(ip, len)| Ipv4Addr::from(u32::from(*ip) | (u32::MAX >> len)))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A stream that yields whenever a link is added, changed or removed.
pub struct LinkEvents {
    rx: UnboundedReceiver<(
        netlink_packet_core::NetlinkMessage<netlink_packet_route::RouteNetlinkMessage>,
        netlink_sys::SocketAddr,
    )>,
}

impl LinkEvents {
    pub fn subscribe() -> Result<Self> {
        const RTMGRP_LINK: u32 = 1;
        let (mut conn, _handle, rx) =
            rtnetlink::new_connection().context("opening an rtnetlink socket for link events")?;
        conn.socket_mut()
            .socket_mut()
            .bind(&netlink_sys::SocketAddr::new(0, RTMGRP_LINK))
            .context("subscribing to rtnetlink link events")?;
        tokio::spawn(conn);
        Ok(Self { rx })
    }

    /// Waits for the next link event; `None` if the socket closed.
    pub async fn next(&mut self) -> Option<()> {
        self.rx.next().await.map(|_| ())
    }
}

#[cfg(test)]
mod broadcast_tests {
    use super::*;

    #[test]
    fn broadcasts_of_the_node_subnets() {
        let nets = [
            (Ipv4Addr::new(10, 240, 0, 11), 24),
            (Ipv4Addr::new(10, 76, 0, 1), 24),
            (Ipv4Addr::new(10, 240, 0, 12), 24),
            (Ipv4Addr::new(192, 0, 2, 1), 31),
            (Ipv4Addr::new(127, 0, 0, 1), 8),
            (Ipv4Addr::new(172, 16, 5, 9), 20),
        ];
        assert_eq!(
            subnet_broadcasts(&nets),
            [
                Ipv4Addr::new(10, 76, 0, 255),
                Ipv4Addr::new(10, 240, 0, 255),
                Ipv4Addr::new(127, 255, 255, 255),
                Ipv4Addr::new(172, 16, 15, 255),
            ]
        );
    }
}
