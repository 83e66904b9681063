//! Keeping the pod programs attached to every port of the pod bridge, through pinned links
//! (see [`crate::links`]) so they stay attached while the agent is down.
//!
//! For each port and direction, [`Attachments::sync`]:
//! - adopts a live pinned link and swaps this agent's program into it atomically
//!   (`attach_to_link` = `BPF_LINK_UPDATE`): what a restart or an upgrade does;
//! - otherwise attaches a new TCX link and pins it;
//! - removes pins whose device is gone or is no longer a bridge port.
//!
//! Pinned links need TCX (Linux >= 6.6); on older kernels aya falls back to netlink tc filters,
//! which cannot be pinned, and attaching fails with a message saying so.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{
    SchedClassifier, TcAttachType,
    links::{FdLink, PinnedLink},
    tc::SchedClassifierLink,
};
use log::{debug, info, warn};
use proxy_common::programs;

use crate::{
    datapath::Datapath,
    links::{self, Direction},
    netlink::Iface,
};

/// How one hook got its program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachOutcome {
    /// A pinned link was adopted and this agent's program swapped in atomically.
    Replaced,
    /// A new link was attached and pinned.
    Created,
    /// Unpinned mode (no pin directory): owned by this process, detached on exit.
    Unpinned,
}

/// Counts of what [`Attachments::sync`] did, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub replaced: usize,
    pub created: usize,
    pub unpinned: usize,
    pub removed_stale: usize,
    pub failed: usize,
}

/// The ports we have attached to, with their link pins.
pub struct Attachments {
    pin_dir: Option<PathBuf>,
    ports: BTreeMap<Iface, [PathBuf; 2]>,
    /// Links of unpinned mode, owned here; dropping them detaches.
    owned: Vec<SchedClassifierLink>,
    first_sync_done: bool,
    /// Totals since start.
    pub totals: SyncStats,
}

fn program_for(dir: Direction) -> (&'static str, TcAttachType) {
    match dir {
        Direction::In => (programs::POD_INGRESS, TcAttachType::Ingress),
        Direction::Out => (programs::POD_EGRESS, TcAttachType::Egress),
    }
}

impl Attachments {
    /// Attachments pinned under `<pin_dir>/links` (`None`: unpinned, owned by this process).
    pub fn new(pin_dir: Option<&Path>) -> Self {
        Self {
            pin_dir: pin_dir.map(Path::to_owned),
            ports: BTreeMap::new(),
            owned: Vec::new(),
            first_sync_done: false,
            totals: SyncStats::default(),
        }
    }

    pub fn ports(&self) -> impl Iterator<Item = &Iface> {
        self.ports.keys()
    }

    /// Whether every port in `current` has its programs attached (health).
    pub fn covers(&self, current: &[Iface]) -> bool {
        current.iter().all(|p| self.ports.contains_key(p))
    }

    /// Attaches to new ports, adopts pinned links, and removes pins of vanished ports (the
    /// kernel already removed their links with the device). Errors on one port are logged;
    /// the others still get attached.
    pub fn sync(&mut self, dp: &mut Datapath, current: &[Iface]) -> SyncStats {
        let mut st = SyncStats::default();
        let gone: Vec<Iface> = self
            .ports
            .keys()
            .filter(|p| !current.contains(p))
            .cloned()
            .collect();
        for p in gone {
            if let Some(pins) = self.ports.remove(&p) {
                for pin in &pins {
                    if let Err(e) = links::detach_and_unpin(pin) {
                        warn!("removing link pin {}: {e}", pin.display());
                    }
                }
                info!("bridge port {} (ifindex {}) is gone", p.name, p.index);
            }
        }
        if !self.first_sync_done {
            st.removed_stale += self.remove_stale_pins(current);
        }
        self.first_sync_done = true;
        for p in current {
            if self.ports.contains_key(p) {
                continue;
            }
            match self.attach_port(dp, p) {
                Ok((pins, outcomes)) => {
                    for o in outcomes {
                        match o {
                            AttachOutcome::Replaced => st.replaced += 1,
                            AttachOutcome::Created => st.created += 1,
                            AttachOutcome::Unpinned => st.unpinned += 1,
                        }
                    }
                    let how = if outcomes.contains(&AttachOutcome::Replaced) {
                        "replaced the programs of the pinned links on"
                    } else {
                        "attached"
                    };
                    info!(
                        "{how} {} and {} {} bridge port {} (ifindex {})",
                        programs::POD_INGRESS,
                        programs::POD_EGRESS,
                        if how == "attached" { "to" } else { "of" },
                        p.name,
                        p.index
                    );
                    self.ports.insert(p.clone(), pins);
                }
                Err(e) => {
                    st.failed += 1;
                    warn!("bridge port {}: {e:#}", p.name);
                }
            }
        }
        self.totals.replaced += st.replaced;
        self.totals.created += st.created;
        self.totals.unpinned += st.unpinned;
        self.totals.removed_stale += st.removed_stale;
        self.totals.failed += st.failed;
        st
    }

    /// Pins left by an earlier agent for devices that are gone, renamed, re-created (another
    /// ifindex) or no longer bridge ports: detached and removed.
    fn remove_stale_pins(&self, current: &[Iface]) -> usize {
        let Some(pin_dir) = &self.pin_dir else {
            return 0;
        };
        let wanted: BTreeSet<String> = current
            .iter()
            .flat_map(|p| Direction::BOTH.map(|d| links::pin_name(&p.name, p.index, d)))
            .collect();
        let entries = match links::list_pinned(pin_dir) {
            Ok(e) => e,
            Err(e) => {
                warn!("listing link pins under {}: {e}", pin_dir.display());
                return 0;
            }
        };
        let mut n = 0;
        for e in entries {
            let name = e
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if wanted.contains(&name) {
                continue;
            }
            match links::detach_and_unpin(&e.path) {
                Ok(()) => {
                    n += 1;
                    info!(
                        "removed stale link pin {} (interface {} ifindex {} is not a bridge port now)",
                        e.path.display(),
                        e.ifname,
                        e.ifindex
                    );
                }
                Err(err) => warn!("removing stale link pin {}: {err}", e.path.display()),
            }
        }
        n
    }

    fn attach_port(
        &mut self,
        dp: &mut Datapath,
        p: &Iface,
    ) -> Result<([PathBuf; 2], [AttachOutcome; 2])> {
        let links_dir = match &self.pin_dir {
            Some(d) => {
                let dir = links::links_dir(d);
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                Some(dir)
            }
            None => None,
        };
        let pin = |d: Direction| {
            links_dir
                .as_ref()
                .map(|l| l.join(links::pin_name(&p.name, p.index, d)))
                .unwrap_or_default()
        };
        let pins = [pin(Direction::In), pin(Direction::Out)];
        let mut outcomes = [AttachOutcome::Created; 2];
        for (i, d) in Direction::BOTH.into_iter().enumerate() {
            outcomes[i] = self.attach_one(dp, p, d, links_dir.as_ref().map(|_| &pins[i]))?;
        }
        Ok((pins, outcomes))
    }

    /// Attaches (or adopts and replaces) one hook. Never leaves two of our links on one hook:
    /// a pin that exists but cannot be adopted is detached before a new link is made.
    fn attach_one(
        &mut self,
        dp: &mut Datapath,
        p: &Iface,
        d: Direction,
        pin: Option<&PathBuf>,
    ) -> Result<AttachOutcome> {
        let (name, tc) = program_for(d);
        let prog: &mut SchedClassifier = dp.program_mut(name)?;
        if let Some(pin) = pin
            && pin.exists()
        {
            let live = links::open_pin(pin)
                .and_then(|fd| links::link_info(&fd))
                .map(|i| i.is_tcx_on(p.index, d))
                .unwrap_or(false);
            if live {
                let old = PinnedLink::from_pin(pin)
                    .with_context(|| format!("opening link pin {}", pin.display()))?;
                let link = SchedClassifierLink::try_from(FdLink::from(old))
                    .with_context(|| format!("{} is not a tc link", pin.display()))?;
                let id = prog.attach_to_link(link).with_context(|| {
                    format!(
                        "replacing the program of pinned link {} with this agent's {name}",
                        pin.display()
                    )
                })?;
                // The pin keeps the link (and now our program) attached; release our handle
                // so exiting does not touch it.
                let link = prog.take_link(id)?;
                drop(link);
                debug!("{}: program replaced atomically", pin.display());
                return Ok(AttachOutcome::Replaced);
            }
            links::detach_and_unpin(pin)
                .with_context(|| format!("removing defunct link pin {}", pin.display()))?;
        }
        let id = prog
            .attach(&p.name, tc)
            .with_context(|| format!("attaching {name} to tc {d:?} of {}", p.name))?;
        let link = prog.take_link(id)?;
        match (pin, FdLink::try_from(link)) {
            (Some(pin), Ok(fd)) => {
                fd.pin(pin)
                    .with_context(|| format!("pinning the link at {}", pin.display()))?;
                Ok(AttachOutcome::Created)
            }
            (None, Ok(fd)) => {
                // Unpinned mode (tests): keep the link alive in this process.
                self.owned
                    .push(SchedClassifierLink::try_from(fd).context("re-wrapping the link")?);
                Ok(AttachOutcome::Unpinned)
            }
            // The link (a netlink filter) was dropped, hence detached, by the failed
            // conversion.
            (_, Err(_)) => bail!(
                "the kernel attached {name} with a netlink tc filter, which cannot be pinned: \
                 ebpf-proxy needs TCX (Linux >= 6.6) so programs stay attached across restarts"
            ),
        }
    }
}
