//! Keeping the pod programs attached to every pod interface (chosen by
//! [`crate::datapath::pods::PodSelector`]), through pinned links
//! (see [`crate::datapath::links`]) so they stay attached while the agent is down.
//!
//! For each port and direction, [`Attachments::sync`]:
//! - adopts a live pinned link and swaps this agent's program into it atomically
//!   (`attach_to_link` = `BPF_LINK_UPDATE`): what a restart or an upgrade does;
//! - otherwise attaches a new TCX link and pins it;
//! - removes pins whose device is gone or is no longer a pod interface.
//!
//! Pinned links need TCX (Linux >= 6.6). Without it (or with `--tc-attach=netlink`) the tc
//! hooks get netlink `cls_bpf` filters instead ([`TcMode::Netlink`], see
//! [`crate::datapath::tcfilter`]): they outlive the agent as well, and a restart swaps their
//! program with one `tc filter replace`.
//!
//! Switching modes on a node never runs a packet through both: a TCX program's verdict ends
//! the hook before any cls_bpf filter (our programs never return `TCX_NEXT`), so the new
//! attachment is made first and the old one removed after, and until then exactly one runs.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{
    SchedClassifier, TcAttachType, Xdp, XdpMode,
    links::{FdLink, PinnedLink},
    tc::SchedClassifierLink,
    xdp::XdpLink,
};
use log::{debug, info, warn};
use proxy_common::programs;

use super::{
    Datapath,
    links::{self, Direction},
    netlink::Iface,
    tcfilter::Tc,
};

/// `--tc-attach`: how the tc programs are attached.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TcAttachArg {
    /// TCX links when the kernel has TCX (Linux >= 6.6), else netlink cls_bpf filters.
    #[default]
    Auto,
    /// TCX links only (fails on kernels without TCX).
    Tcx,
    /// Netlink cls_bpf filters (clsact qdisc, direct action), even where TCX exists.
    Netlink,
}

/// The tc attachment mode in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcMode {
    /// Pinned TCX links (`BPF_LINK_UPDATE` on restart).
    Tcx,
    /// Netlink cls_bpf filters at our priority/handle (`tc filter replace` on restart).
    Netlink,
}

impl TcAttachArg {
    /// The mode for a kernel that has TCX or not.
    pub fn resolve(self, has_tcx: bool) -> TcMode {
        match self {
            Self::Tcx => TcMode::Tcx,
            Self::Netlink => TcMode::Netlink,
            Self::Auto if has_tcx => TcMode::Tcx,
            Self::Auto => TcMode::Netlink,
        }
    }
}

impl std::fmt::Display for TcMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tcx => "tcx",
            Self::Netlink => "netlink",
        })
    }
}

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
    mode: TcMode,
    ports: BTreeMap<Iface, [PathBuf; 2]>,
    /// Links of unpinned mode, owned here; dropping them detaches.
    owned: Vec<FdLink>,
    first_sync_done: bool,
    /// Totals since start.
    pub totals: SyncStats,
}

fn program_for(dir: Direction) -> &'static str {
    match dir {
        Direction::In => programs::POD_INGRESS,
        Direction::Out => programs::POD_EGRESS,
    }
}

impl Attachments {
    /// Attachments pinned under `<pin_dir>/links` (`None`: unpinned, owned by this process).
    pub fn new(pin_dir: Option<&Path>, mode: TcMode) -> Self {
        Self {
            pin_dir: pin_dir.map(Path::to_owned),
            mode,
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
                if self.mode == TcMode::Netlink {
                    for d in Direction::BOTH {
                        // A device that is gone took its filters with it.
                        if let Err(e) = Tc::open()
                            .and_then(|mut t| t.remove_ours(p.index, d, &[program_for(d)]))
                            && e.raw_os_error() != Some(libc::ENODEV)
                        {
                            warn!("removing the tc filter of {}: {e}", p.name);
                        }
                    }
                }
                info!(
                    "{} (ifindex {}) is no longer a pod interface (gone, or now excluded): \
                     its programs are detached",
                    p.name, p.index
                );
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
                        "{how} {} and {} {} pod interface {} (ifindex {})",
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
                    warn!("pod interface {}: {e:#}", p.name);
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
    /// ifindex) or no longer pod interfaces: detached and removed.
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
                        "removed stale link pin {} (interface {} ifindex {} is not a pod interface now)",
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

    /// Attaches (or adopts and replaces) one tc hook of a pod interface.
    fn attach_one(
        &mut self,
        dp: &mut Datapath,
        p: &Iface,
        d: Direction,
        pin: Option<&PathBuf>,
    ) -> Result<AttachOutcome> {
        let name = program_for(d);
        let prog: &mut SchedClassifier = dp.program_mut(name)?;
        attach_pinned(
            prog,
            name,
            p,
            Hook::Tc(d),
            pin.map(PathBuf::as_path),
            &mut self.owned,
            self.mode,
        )
    }
}

/// A hook a program is attached to through a pinnable bpf_link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// tc ingress or egress (a TCX link).
    Tc(Direction),
    /// XDP in the given mode (an XDP link).
    Xdp(XdpMode),
}

impl Hook {
    /// Whether a pinned link, as the kernel describes it, is live on this hook of `ifindex`.
    /// An XDP link's mode is not in its info: callers encode it in the pin name.
    pub fn is_live(self, info: &links::LinkInfo, ifindex: u32) -> bool {
        match self {
            Hook::Tc(d) => info.is_tcx_on(ifindex, d),
            Hook::Xdp(_) => info.is_xdp_on(ifindex),
        }
    }
}

impl std::fmt::Display for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hook::Tc(Direction::In) => f.write_str("tc ingress"),
            Hook::Tc(Direction::Out) => f.write_str("tc egress"),
            Hook::Xdp(XdpMode::Driver) => f.write_str("XDP (native)"),
            Hook::Xdp(XdpMode::Skb) => f.write_str("XDP (generic)"),
            Hook::Xdp(m) => write!(f, "XDP ({m:?})"),
        }
    }
}

/// The program kinds [`attach_pinned`] handles: the two differ only in aya's types.
pub trait PinnableProgram {
    /// Attaches a new link on `hook` of `iface`; `Err` if the kernel offered only an
    /// attachment that cannot be pinned (it is detached again).
    fn attach_link(&mut self, iface: &Iface, hook: Hook) -> Result<FdLink>;
    /// Swaps this program into the live link pinned at `pin` (`BPF_LINK_UPDATE`).
    fn replace_in(&mut self, pin: &Path) -> Result<()>;
    /// Creates our netlink cls_bpf filter on `dir` of `iface`, or swaps its program atomically.
    fn replace_filter(&mut self, _iface: &Iface, _dir: Direction, _name: &str) -> Result<()> {
        bail!("only tc programs attach as netlink filters")
    }
}

impl PinnableProgram for SchedClassifier {
    fn attach_link(&mut self, iface: &Iface, hook: Hook) -> Result<FdLink> {
        let tc = match hook {
            Hook::Tc(Direction::In) => TcAttachType::Ingress,
            Hook::Tc(Direction::Out) => TcAttachType::Egress,
            Hook::Xdp(_) => bail!("a tc program cannot attach to {hook}"),
        };
        let id = self.attach(&iface.name, tc)?;
        // A netlink filter (kernel < 6.6) does not convert; dropping it detaches it.
        FdLink::try_from(self.take_link(id)?).map_err(|_| {
            anyhow::anyhow!(
                "no TCX on this kernel (Linux < 6.6): run with --tc-attach=auto or netlink \
                 (netlink cls_bpf filters, docs/kernels.md)"
            )
        })
    }

    fn replace_in(&mut self, pin: &Path) -> Result<()> {
        let old = PinnedLink::from_pin(pin)?;
        let link = SchedClassifierLink::try_from(FdLink::from(old))
            .with_context(|| format!("{} is not a tc link", pin.display()))?;
        let id = self.attach_to_link(link)?;
        // The pin keeps the link (and now our program) attached; release our handle so
        // exiting does not touch it.
        drop(self.take_link(id)?);
        Ok(())
    }

    fn replace_filter(&mut self, iface: &Iface, dir: Direction, name: &str) -> Result<()> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let fd = self.fd()?;
        Tc::open()?.replace(iface.index, dir, fd.as_fd().as_raw_fd(), name)?;
        Ok(())
    }
}

impl PinnableProgram for Xdp {
    fn attach_link(&mut self, iface: &Iface, hook: Hook) -> Result<FdLink> {
        let Hook::Xdp(mode) = hook else {
            bail!("an XDP program cannot attach to {hook}");
        };
        let id = self.attach_to_if_index(iface.index, mode)?;
        // aya falls back to a netlink attachment when bpf_link_create says EINVAL; that
        // cannot be pinned (dropping it detaches it).
        FdLink::try_from(self.take_link(id)?).map_err(|_| {
            anyhow::anyhow!(
                "the kernel attached XDP through netlink, not a bpf_link, which cannot be \
                 pinned (Linux >= 5.9 needed)"
            )
        })
    }

    fn replace_in(&mut self, pin: &Path) -> Result<()> {
        let old = PinnedLink::from_pin(pin)?;
        let link = XdpLink::try_from(FdLink::from(old))
            .with_context(|| format!("{} is not an XDP link", pin.display()))?;
        let id = self.attach_to_link(link)?;
        drop(self.take_link(id)?);
        Ok(())
    }
}

/// Attaches `prog` (named `name`) on `hook` of `iface`, the one way every hook of the agent is
/// attached:
/// - a live link pinned at `pin` on that very hook is adopted and `prog` swapped in atomically
///   (`BPF_LINK_UPDATE`): a restart or an upgrade;
/// - a pin that exists but is not live there (device gone or re-created, other hook) is
///   detached and removed first, so two of our links never sit on one hook;
/// - otherwise a new link is attached and pinned at `pin`, or kept in `owned` (unpinned mode:
///   detached when this process drops it).
///
/// With [`TcMode::Netlink`], a tc hook gets our cls_bpf filter instead (see [`attach_filter`]);
/// with [`TcMode::Tcx`], a filter of ours left on the hook by a netlink-mode agent is removed
/// once the TCX link runs.
pub fn attach_pinned<P: PinnableProgram>(
    prog: &mut P,
    name: &str,
    iface: &Iface,
    hook: Hook,
    pin: Option<&Path>,
    owned: &mut Vec<FdLink>,
    mode: TcMode,
) -> Result<AttachOutcome> {
    if let (Hook::Tc(dir), TcMode::Netlink) = (hook, mode) {
        return attach_filter(prog, name, iface, dir, pin);
    }
    let outcome = attach_link(prog, name, iface, hook, pin, owned)?;
    if let Hook::Tc(dir) = hook {
        // The TCX link now decides every packet; the old filter no longer runs.
        match Tc::open().and_then(|mut t| t.remove_ours(iface.index, dir, &[name])) {
            Ok(true) => info!(
                "removed the netlink tc filter of {name} on {hook} of {} (TCX link in place)",
                iface.name
            ),
            Ok(false) => {}
            Err(e) => warn!(
                "removing the netlink tc filter of {name} on {}: {e}",
                iface.name
            ),
        }
    }
    Ok(outcome)
}

/// The netlink mode of a tc hook: `tc filter replace` of our filter (program swapped
/// atomically when it exists), then a TCX link pinned at `pin` by a TCX-mode agent, which
/// shadowed the filter until now, is detached and unpinned.
fn attach_filter<P: PinnableProgram>(
    prog: &mut P,
    name: &str,
    iface: &Iface,
    dir: Direction,
    pin: Option<&Path>,
) -> Result<AttachOutcome> {
    let hook = Hook::Tc(dir);
    let before = Tc::open()
        .and_then(|mut t| t.ours(iface.index, dir, &[name]))
        .with_context(|| format!("listing the tc filters on {hook} of {}", iface.name))?;
    prog.replace_filter(iface, dir, name).with_context(|| {
        format!(
            "attaching {name} as a netlink tc filter on {hook} of {}",
            iface.name
        )
    })?;
    if let Some(pin) = pin
        && pin.exists()
    {
        links::detach_and_unpin(pin)
            .with_context(|| format!("removing TCX link pin {}", pin.display()))?;
        info!(
            "{}: TCX link detached, the netlink filter runs {name} now",
            pin.display()
        );
    }
    Ok(match before {
        Some(f) => {
            debug!(
                "{hook} of {}: filter program {} replaced atomically",
                iface.name, f.prog_id
            );
            AttachOutcome::Replaced
        }
        None => AttachOutcome::Created,
    })
}

fn attach_link<P: PinnableProgram>(
    prog: &mut P,
    name: &str,
    iface: &Iface,
    hook: Hook,
    pin: Option<&Path>,
    owned: &mut Vec<FdLink>,
) -> Result<AttachOutcome> {
    if let Some(pin) = pin
        && pin.exists()
    {
        let live = links::open_pin(pin)
            .and_then(|fd| links::link_info(&fd))
            .map(|i| hook.is_live(&i, iface.index))
            .unwrap_or(false);
        if live {
            prog.replace_in(pin).with_context(|| {
                format!(
                    "replacing the program of pinned link {} ({hook} of {}) with this agent's \
                     {name}",
                    pin.display(),
                    iface.name
                )
            })?;
            debug!("{}: program replaced atomically", pin.display());
            return Ok(AttachOutcome::Replaced);
        }
        links::detach_and_unpin(pin)
            .with_context(|| format!("removing defunct link pin {}", pin.display()))?;
    }
    let fd = prog
        .attach_link(iface, hook)
        .with_context(|| format!("attaching {name} to {hook} of {}", iface.name))?;
    match pin {
        Some(pin) => {
            fd.pin(pin)
                .with_context(|| format!("pinning the link at {}", pin.display()))?;
            Ok(AttachOutcome::Created)
        }
        None => {
            owned.push(fd);
            Ok(AttachOutcome::Unpinned)
        }
    }
}
