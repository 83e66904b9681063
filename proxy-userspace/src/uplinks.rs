//! The uplink hook: `lb_up_in` on tc ingress of the interfaces that carry the node's
//! addresses and its default route (or those named with `--uplink`). Links are pinned under
//! `<pins>/uplinks/` so north-south traffic keeps flowing while the agent is down; a restart
//! adopts them and swaps its program in atomically.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::programs::{
    SchedClassifier, TcAttachType,
    links::{FdLink, PinnedLink},
    tc::SchedClassifierLink,
};
use log::{info, warn};
use proxy_common::programs;

use crate::{
    datapath::Datapath,
    links::{self, Direction},
    netlink::{Iface, Netlink},
};

/// Interfaces with a default route, from /proc/net/route (which follows the caller's network
/// namespace).
pub fn default_route_ifaces() -> Vec<String> {
    let Ok(t) = std::fs::read_to_string("/proc/net/route") else {
        return Vec::new();
    };
    t.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_owned())
        })
        .collect()
}

/// Chooses the uplinks: `explicit` if given, else every interface holding one of `node_ips`
/// plus every default-route interface, never the pod bridge or loopback.
pub async fn discover(
    nl: &Netlink,
    explicit: &[String],
    node_ips: &[Ipv4Addr],
    bridge: &str,
) -> Result<Vec<Iface>> {
    let all = nl.all_links().await?;
    if !explicit.is_empty() {
        let mut out = Vec::new();
        for name in explicit {
            let i = all.iter().find(|i| &i.name == name).with_context(|| {
                format!("--uplink {name}: no such interface in this network namespace")
            })?;
            out.push(i.clone());
        }
        return Ok(out);
    }
    let defaults = default_route_ifaces();
    let mut out = Vec::new();
    for i in &all {
        if i.name == "lo" || i.name == bridge {
            continue;
        }
        let has_ip = !node_ips.is_empty()
            && nl
                .ipv4_addrs(i.index)
                .await?
                .iter()
                .any(|a| node_ips.contains(a));
        if has_ip || defaults.contains(&i.name) {
            out.push(i.clone());
        }
    }
    Ok(out)
}

/// The uplinks we hold.
pub struct Uplinks {
    pin_dir: Option<PathBuf>,
    attached: BTreeMap<Iface, Option<PathBuf>>,
    owned: Vec<SchedClassifierLink>,
}

impl Uplinks {
    pub fn new(pin_dir: Option<&Path>) -> Self {
        Self {
            pin_dir: pin_dir.map(|d| d.join("uplinks")),
            attached: BTreeMap::new(),
            owned: Vec::new(),
        }
    }

    pub fn names(&self) -> Vec<String> {
        self.attached.keys().map(|i| i.name.clone()).collect()
    }

    /// Attaches to every interface in `want` not yet attached. Errors are logged per
    /// interface.
    pub fn sync(&mut self, dp: &mut Datapath, want: &[Iface]) {
        for i in want {
            if self.attached.contains_key(i) {
                continue;
            }
            match self.attach(dp, i) {
                Ok((pin, how)) => {
                    info!(
                        "{how} {} on tc ingress of uplink {} (ifindex {})",
                        programs::UPLINK_INGRESS,
                        i.name,
                        i.index
                    );
                    self.attached.insert(i.clone(), pin);
                }
                Err(e) => warn!("uplink {}: {e:#}", i.name),
            }
        }
    }

    fn attach(&mut self, dp: &mut Datapath, i: &Iface) -> Result<(Option<PathBuf>, &'static str)> {
        let prog: &mut SchedClassifier = dp.program_mut(programs::UPLINK_INGRESS)?;
        let pin = match &self.pin_dir {
            Some(d) => {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
                Some(d.join(format!("{}-{}", i.name, i.index)))
            }
            None => None,
        };
        if let Some(pin) = &pin
            && pin.exists()
        {
            let live = links::open_pin(pin)
                .and_then(|fd| links::link_info(&fd))
                .map(|l| l.is_tcx_on(i.index, Direction::In))
                .unwrap_or(false);
            if live {
                let old = PinnedLink::from_pin(pin)
                    .with_context(|| format!("opening {}", pin.display()))?;
                let link = SchedClassifierLink::try_from(FdLink::from(old))
                    .with_context(|| format!("{} is not a tc link", pin.display()))?;
                let id = prog
                    .attach_to_link(link)
                    .context("replacing the uplink program")?;
                drop(prog.take_link(id)?);
                return Ok((Some(pin.clone()), "adopted the pinned link and replaced"));
            }
            links::detach_and_unpin(pin).with_context(|| format!("removing {}", pin.display()))?;
        }
        let id = prog
            .attach(&i.name, TcAttachType::Ingress)
            .with_context(|| format!("attaching {} to {}", programs::UPLINK_INGRESS, i.name))?;
        let link = prog.take_link(id)?;
        let fd = FdLink::try_from(link)
            .context("the uplink link is not a TCX link (Linux >= 6.6 needed)")?;
        match &pin {
            Some(p) => {
                fd.pin(p)
                    .with_context(|| format!("pinning {}", p.display()))?;
            }
            None => self.owned.push(SchedClassifierLink::try_from(fd)?),
        }
        Ok((pin, "attached"))
    }
}
