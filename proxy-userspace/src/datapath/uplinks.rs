//! The uplink hooks: `lb_up_in` on tc ingress and `lb_up_xdp` on XDP of the interfaces that
//! carry the node's addresses and its default route (or those named with `--uplink`). Links
//! are pinned under `<pins>/uplinks/` so north-south traffic keeps flowing while the agent is
//! down; a restart adopts them and swaps its programs in atomically (see
//! [`crate::datapath::attach::attach_pinned`]).
//!
//! XDP is a fast path only (decapsulation and established-flow DNAT, see
//! `proxy-ebpf/src/xdp.rs`): tc ingress always runs the full pipeline, so an interface where
//! XDP cannot be attached still works, just without the fast path.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::programs::{SchedClassifier, Xdp, XdpMode, links::FdLink};
use log::{info, warn};
use proxy_common::programs;

use super::{
    Datapath,
    attach::{AttachOutcome, Hook, TcMode, attach_pinned},
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

/// `--xdp-mode`: how the XDP fast path is attached to the uplinks.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpModeArg {
    /// Native (driver) XDP, falling back to generic XDP with a warning.
    #[default]
    Auto,
    /// Native XDP only; an uplink whose driver has none gets tc only (with a warning).
    Native,
    /// Generic (skb) XDP: works on every device, saves less.
    Generic,
    /// No XDP: tc ingress does everything (pinned XDP links of an earlier run are removed).
    Off,
}

/// The XDP modes whose pins a name can carry.
const XDP_MODES: [XdpMode; 2] = [XdpMode::Driver, XdpMode::Skb];

fn mode_suffix(m: XdpMode) -> &'static str {
    match m {
        XdpMode::Skb => "generic",
        _ => "native",
    }
}

/// What to do with the XDP hook of one uplink, given the requested mode and the mode of a
/// live pinned link left by an earlier agent (pure: unit tested).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdpPlan {
    /// Pins (by mode) to detach and remove first.
    pub remove: Vec<XdpMode>,
    /// Modes to try in order (adopting the pin of that mode when it is live); empty: no XDP.
    pub try_modes: Vec<XdpMode>,
}

pub fn plan_xdp(requested: XdpModeArg, live: Option<XdpMode>) -> XdpPlan {
    let want: Vec<XdpMode> = match requested {
        XdpModeArg::Off => Vec::new(),
        // Keep whatever mode an earlier agent got: replacing the program in place is atomic,
        // re-attaching in another mode is not.
        XdpModeArg::Auto => match live {
            Some(m) => vec![m],
            None => vec![XdpMode::Driver, XdpMode::Skb],
        },
        XdpModeArg::Native => vec![XdpMode::Driver],
        XdpModeArg::Generic => vec![XdpMode::Skb],
    };
    let remove = live.into_iter().filter(|m| !want.contains(m)).collect();
    XdpPlan {
        remove,
        try_modes: want,
    }
}

/// The pin file name of an uplink hook: `<ifname>-<ifindex>` for tc ingress (the name
/// earlier versions used, so an upgrade adopts their links), `<ifname>-<ifindex>-xdp-<mode>`
/// for XDP. Dots become '_' (bpffs refuses them).
pub fn pin_name(ifname: &str, ifindex: u32, hook: Hook) -> String {
    let base = format!("{}-{ifindex}", ifname.replace('.', "_"));
    match hook {
        Hook::Tc(_) => base,
        Hook::Xdp(m) => format!("{base}-xdp-{}", mode_suffix(m)),
    }
}

/// Parses an uplink pin name back into (ifname as written, ifindex, hook).
pub fn parse_pin_name(name: &str) -> Option<(String, u32, Hook)> {
    let (rest, hook) = if let Some(r) = name.strip_suffix("-xdp-native") {
        (r, Hook::Xdp(XdpMode::Driver))
    } else if let Some(r) = name.strip_suffix("-xdp-generic") {
        (r, Hook::Xdp(XdpMode::Skb))
    } else {
        (name, Hook::Tc(Direction::In))
    };
    let (ifname, idx) = rest.rsplit_once('-')?;
    if ifname.is_empty() {
        return None;
    }
    Some((ifname.to_owned(), idx.parse().ok()?, hook))
}

/// One uplink link pin as found on disk (for `inspect`).
#[derive(Clone, Debug)]
pub struct UplinkPin {
    pub path: PathBuf,
    pub ifname: String,
    pub ifindex: u32,
    pub hook: Option<Hook>,
    pub info: Option<links::LinkInfo>,
}

impl UplinkPin {
    pub fn is_live(&self) -> bool {
        match (self.hook, self.info) {
            (Some(h), Some(i)) => h.is_live(&i, self.ifindex),
            _ => false,
        }
    }
}

/// `<pin_dir>/uplinks`.
pub fn uplinks_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("uplinks")
}

/// Every uplink link pin under `<pin_dir>/uplinks`, with the kernel's view of each.
pub fn list_pinned(pin_dir: &Path) -> std::io::Result<Vec<UplinkPin>> {
    let rd = match std::fs::read_dir(uplinks_dir(pin_dir)) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e?;
        let path = e.path();
        let info = links::open_pin(&path)
            .and_then(|fd| links::link_info(&fd))
            .ok();
        let parsed = parse_pin_name(&e.file_name().to_string_lossy());
        let (ifname, ifindex, hook) = match parsed {
            Some((n, i, h)) => (n, i, Some(h)),
            None => (String::new(), 0, None),
        };
        out.push(UplinkPin {
            path,
            ifname,
            ifindex,
            hook,
            info,
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// The hooks one uplink got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UplinkHooks {
    /// The XDP mode of the fast path, `None` without one.
    pub xdp: Option<XdpMode>,
}

/// The uplinks we hold.
pub struct Uplinks {
    pin_dir: Option<PathBuf>,
    xdp_mode: XdpModeArg,
    tc_mode: TcMode,
    attached: BTreeMap<Iface, UplinkHooks>,
    /// Links of unpinned mode, owned here; dropping them detaches.
    owned: Vec<FdLink>,
}

impl Uplinks {
    pub fn new(pin_dir: Option<&Path>, xdp_mode: XdpModeArg, tc_mode: TcMode) -> Self {
        Self {
            pin_dir: pin_dir.map(uplinks_dir),
            xdp_mode,
            tc_mode,
            attached: BTreeMap::new(),
            owned: Vec::new(),
        }
    }

    pub fn names(&self) -> Vec<String> {
        self.attached.keys().map(|i| i.name.clone()).collect()
    }

    /// The uplinks attached so far and their hooks.
    pub fn attached(&self) -> &BTreeMap<Iface, UplinkHooks> {
        &self.attached
    }

    /// Attaches to every interface in `want` not yet attached. Errors are logged per
    /// interface: tc ingress failing leaves the uplink unattached (retried on the next
    /// sync); XDP failing leaves it on tc only.
    pub fn sync(&mut self, dp: &mut Datapath, want: &[Iface]) {
        for i in want {
            if self.attached.contains_key(i) {
                continue;
            }
            match self.attach(dp, i) {
                Ok(h) => {
                    self.attached.insert(i.clone(), h);
                }
                Err(e) => warn!("uplink {}: {e:#}", i.name),
            }
        }
    }

    fn pin(&self, i: &Iface, hook: Hook) -> Result<Option<PathBuf>> {
        match &self.pin_dir {
            Some(d) => {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
                Ok(Some(d.join(pin_name(&i.name, i.index, hook))))
            }
            None => Ok(None),
        }
    }

    fn attach(&mut self, dp: &mut Datapath, i: &Iface) -> Result<UplinkHooks> {
        let hook = Hook::Tc(Direction::In);
        let pin = self.pin(i, hook)?;
        let prog: &mut SchedClassifier = dp.program_mut(programs::UPLINK_INGRESS)?;
        let o = attach_pinned(
            prog,
            programs::UPLINK_INGRESS,
            i,
            hook,
            pin.as_deref(),
            &mut self.owned,
            self.tc_mode,
        )?;
        info!(
            "{} {} on {hook} of uplink {} (ifindex {})",
            match (self.tc_mode, o) {
                (TcMode::Netlink, AttachOutcome::Replaced) =>
                    "swapped atomically into our netlink tc filter:",
                (TcMode::Netlink, _) => "attached as a netlink tc filter:",
                _ => describe(o),
            },
            programs::UPLINK_INGRESS,
            i.name,
            i.index
        );
        let xdp = match self.attach_xdp(dp, i) {
            Ok(m) => m,
            Err(e) => {
                warn!(
                    "uplink {}: no XDP fast path, tc ingress handles everything: {e:#}",
                    i.name
                );
                None
            }
        };
        Ok(UplinkHooks { xdp })
    }

    fn attach_xdp(&mut self, dp: &mut Datapath, i: &Iface) -> Result<Option<XdpMode>> {
        let mut live = None;
        let mut pins = Vec::new();
        for m in XDP_MODES {
            if let Some(p) = self.pin(i, Hook::Xdp(m))? {
                let is_live = links::open_pin(&p)
                    .and_then(|fd| links::link_info(&fd))
                    .is_ok_and(|info| info.is_xdp_on(i.index));
                if is_live && live.is_none() {
                    live = Some(m);
                }
                pins.push((m, p));
            }
        }
        let plan = plan_xdp(self.xdp_mode, live);
        for (m, p) in &pins {
            if plan.remove.contains(m) || (Some(*m) != live && p.exists()) {
                links::detach_and_unpin(p)
                    .with_context(|| format!("removing XDP link pin {}", p.display()))?;
                info!(
                    "removed XDP link pin {} (--xdp-mode {:?})",
                    p.display(),
                    self.xdp_mode
                );
            }
        }
        for (n, m) in plan.try_modes.iter().copied().enumerate() {
            let hook = Hook::Xdp(m);
            let pin = self.pin(i, hook)?;
            let prog: &mut Xdp = dp.xdp_program_mut(programs::UPLINK_XDP)?;
            match attach_pinned(
                prog,
                programs::UPLINK_XDP,
                i,
                hook,
                pin.as_deref(),
                &mut self.owned,
                self.tc_mode,
            ) {
                Ok(o) => {
                    info!(
                        "{} {} on {hook} of uplink {} (ifindex {})",
                        describe(o),
                        programs::UPLINK_XDP,
                        i.name,
                        i.index
                    );
                    return Ok(Some(m));
                }
                Err(e) if n + 1 < plan.try_modes.len() => {
                    warn!(
                        "uplink {}: {hook} failed, trying the next mode: {e:#}",
                        i.name
                    );
                }
                Err(e) => return Err(e),
            }
        }
        // No mode to try: --xdp-mode off.
        Ok(None)
    }
}

fn describe(o: AttachOutcome) -> &'static str {
    match o {
        AttachOutcome::Replaced => "adopted the pinned link and replaced its program with",
        AttachOutcome::Created => "attached and pinned",
        AttachOutcome::Unpinned => "attached (unpinned)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xdp_plan_keeps_a_live_link_in_auto_and_switches_modes_on_request() {
        use XdpMode::{Driver, Skb};
        struct Case {
            name: &'static str,
            requested: XdpModeArg,
            live: Option<XdpMode>,
            remove: Vec<XdpMode>,
            try_modes: Vec<XdpMode>,
        }
        let cases = [
            Case {
                name: "auto, nothing yet: native then generic",
                requested: XdpModeArg::Auto,
                live: None,
                remove: vec![],
                try_modes: vec![Driver, Skb],
            },
            Case {
                name: "auto adopts a generic link",
                requested: XdpModeArg::Auto,
                live: Some(Skb),
                remove: vec![],
                try_modes: vec![Skb],
            },
            Case {
                name: "auto adopts a native link",
                requested: XdpModeArg::Auto,
                live: Some(Driver),
                remove: vec![],
                try_modes: vec![Driver],
            },
            Case {
                name: "native replaces a generic link",
                requested: XdpModeArg::Native,
                live: Some(Skb),
                remove: vec![Skb],
                try_modes: vec![Driver],
            },
            Case {
                name: "generic, nothing yet",
                requested: XdpModeArg::Generic,
                live: None,
                remove: vec![],
                try_modes: vec![Skb],
            },
            Case {
                name: "off removes a live link",
                requested: XdpModeArg::Off,
                live: Some(Driver),
                remove: vec![Driver],
                try_modes: vec![],
            },
            Case {
                name: "off, nothing there",
                requested: XdpModeArg::Off,
                live: None,
                remove: vec![],
                try_modes: vec![],
            },
        ];
        for c in cases {
            let p = plan_xdp(c.requested, c.live);
            assert_eq!(p.remove, c.remove, "{}", c.name);
            assert_eq!(p.try_modes, c.try_modes, "{}", c.name);
        }
    }

    #[test]
    fn uplink_pin_names_round_trip() {
        for (ifname, idx, hook) in [
            ("eth0", 2, Hook::Tc(Direction::In)),
            ("eth0", 2, Hook::Xdp(XdpMode::Driver)),
            ("ens-5", 7, Hook::Xdp(XdpMode::Skb)),
        ] {
            let n = pin_name(ifname, idx, hook);
            assert_eq!(
                parse_pin_name(&n),
                Some((ifname.to_owned(), idx, hook)),
                "{n}"
            );
        }
        assert_eq!(pin_name("eth0", 2, Hook::Tc(Direction::In)), "eth0-2");
        assert_eq!(
            pin_name("eth0.100", 5, Hook::Xdp(XdpMode::Driver)),
            "eth0_100-5-xdp-native"
        );
        for bad in ["eth0", "-2", "eth0-x", "eth0-2-xdp-native-", ""] {
            assert_eq!(parse_pin_name(bad), None, "{bad:?}");
        }
    }
}
