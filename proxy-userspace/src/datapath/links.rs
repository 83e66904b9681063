//! Pinned program links: what keeps the datapath forwarding while the agent is down.
//!
//! Every tc attachment the agent makes is a TCX link (kernel >= 6.6) pinned at
//! `<bpffs>/ebpf-proxy/links/<ifindex>-<ifname>-<in|out>`. A pinned link stays attached when the
//! process that created it exits (SIGTERM, SIGKILL, crash, upgrade), and the next agent adopts
//! it and swaps its own freshly loaded program in with `BPF_LINK_UPDATE` (aya's
//! `attach_to_link`): one atomic pointer swap in the kernel, no window without a program and
//! never two programs on one hook.
//!
//! The ifindex is part of the pin name because interface names are reused (a pod restarts, its
//! new veth gets the old name) while a TCX link dies with its device: a pin for an ifindex that
//! no longer exists is stale and is removed, never adopted for the new device.
//!
//! aya 0.14 does not expose a TCX link's ifindex nor an explicit detach of a pinned link, so
//! this module makes those two calls itself (`BPF_OBJ_GET_INFO_BY_FD`, `BPF_LINK_DETACH`)
//! through [`super::sys`].
use std::{
    io,
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use super::sys;

/// Sub-directory of the pin directory holding the link pins.
pub const LINKS_DIR: &str = "links";

/// `BPF_LINK_TYPE_TCX`.
pub const LINK_TYPE_TCX: u32 = 11;
/// `BPF_LINK_TYPE_XDP`.
pub const LINK_TYPE_XDP: u32 = 6;
/// `BPF_TCX_INGRESS` / `BPF_TCX_EGRESS`.
pub const ATTACH_TCX_INGRESS: u32 = 46;
pub const ATTACH_TCX_EGRESS: u32 = 47;

/// Which tc hook of a bridge port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// tc ingress (packets from the pod): `lb_pod_in`.
    In,
    /// tc egress (packets to the pod): `lb_pod_out`.
    Out,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::In, Direction::Out];

    pub fn suffix(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }

    pub fn tcx_attach_type(self) -> u32 {
        match self {
            Direction::In => ATTACH_TCX_INGRESS,
            Direction::Out => ATTACH_TCX_EGRESS,
        }
    }
}

/// `<pin_dir>/links`.
pub fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(LINKS_DIR)
}

/// The pin file name of the link on `ifname` (index `ifindex`) in direction `dir`:
/// `<ifindex>-<ifname>-<in|out>`. bpffs refuses names containing '.' (EPERM), and interface
/// names may contain dots (VLANs: `eth0.100`), so dots become '_'; the ifindex is the identity,
/// the name is for people.
pub fn pin_name(ifname: &str, ifindex: u32, dir: Direction) -> String {
    format!("{ifindex}-{}-{}", ifname.replace('.', "_"), dir.suffix())
}

/// Parses a pin file name back into (ifname as written, ifindex, direction).
pub fn parse_pin_name(name: &str) -> Option<(String, u32, Direction)> {
    let (idx, rest) = name.split_once('-')?;
    let (ifname, dir) = rest.rsplit_once('-')?;
    let dir = match dir {
        "in" => Direction::In,
        "out" => Direction::Out,
        _ => return None,
    };
    if ifname.is_empty() {
        return None;
    }
    Some((ifname.to_owned(), idx.parse().ok()?, dir))
}

/// What the kernel says about a link (`struct bpf_link_info`, TCX part).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    /// TCX and XDP links: the device's ifindex, 0 once the device is gone (the link is
    /// defunct).
    pub ifindex: u32,
    /// TCX links: `BPF_TCX_INGRESS` or `BPF_TCX_EGRESS`.
    pub attach_type: u32,
}

impl LinkInfo {
    /// True if this is a live TCX link on `ifindex` in direction `dir`.
    pub fn is_tcx_on(&self, ifindex: u32, dir: Direction) -> bool {
        self.link_type == LINK_TYPE_TCX
            && self.ifindex == ifindex
            && self.attach_type == dir.tcx_attach_type()
    }

    /// True if this is a live XDP link on `ifindex`.
    pub fn is_xdp_on(&self, ifindex: u32) -> bool {
        self.link_type == LINK_TYPE_XDP && self.ifindex == ifindex
    }
}

/// Opens a pinned BPF object (`BPF_OBJ_GET`).
pub fn open_pin(path: &Path) -> io::Result<OwnedFd> {
    sys::obj_get(path)
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a link.
pub fn link_info(fd: &OwnedFd) -> io::Result<LinkInfo> {
    // The tcx member of the union is { ifindex, attach_type } and the xdp member { ifindex }.
    let info = sys::link_info(fd.as_fd())?;
    Ok(LinkInfo {
        link_type: info.link_type,
        id: info.id,
        prog_id: info.prog_id,
        ifindex: info.union[0] as u32,
        attach_type: (info.union[0] >> 32) as u32,
    })
}

/// `BPF_LINK_DETACH`: detaches the link now, whoever else holds it (pins, other processes).
pub fn link_detach(fd: &OwnedFd) -> io::Result<()> {
    sys::link_detach(fd.as_fd())
}

/// Detaches the link pinned at `path` and removes the pin. A missing pin is not an error; a
/// link that is already defunct (its device is gone) only needs the pin removed.
pub fn detach_and_unpin(path: &Path) -> io::Result<()> {
    match open_pin(path) {
        Ok(fd) => match link_detach(&fd) {
            // ENOLINK: already detached (device gone). EINVAL: not a link (ignore, remove).
            Ok(()) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOLINK | libc::EINVAL)) => {}
            Err(e) => return Err(e),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        // Not openable as a BPF object: still ours (it is in our directory), remove it.
        Err(_) => {}
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// One pinned link as found on disk.
#[derive(Clone, Debug)]
pub struct PinnedLinkEntry {
    pub path: PathBuf,
    pub ifname: String,
    pub ifindex: u32,
    pub dir: Direction,
    /// `None` if the pin could not be read as a link.
    pub info: Option<LinkInfo>,
}

impl PinnedLinkEntry {
    /// The link is attached to the device its name says (not defunct, not replaced by a
    /// device with the same name).
    pub fn is_live(&self) -> bool {
        self.info
            .is_some_and(|i| i.is_tcx_on(self.ifindex, self.dir))
    }
}

/// Every link pin under `<pin_dir>/links`, with the kernel's view of each. Files whose names do
/// not parse are returned with `info: None` and an empty ifname.
pub fn list_pinned(pin_dir: &Path) -> io::Result<Vec<PinnedLinkEntry>> {
    let dir = links_dir(pin_dir);
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e?;
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let info = open_pin(&path).and_then(|fd| link_info(&fd)).ok();
        match parse_pin_name(&name) {
            Some((ifname, ifindex, dir)) => out.push(PinnedLinkEntry {
                path,
                ifname,
                ifindex,
                dir,
                info,
            }),
            None => out.push(PinnedLinkEntry {
                path,
                ifname: String::new(),
                ifindex: 0,
                dir: Direction::In,
                info: None,
            }),
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Detaches and unpins every link under `<pin_dir>/links`, then removes the directory.
/// Returns how many pins were removed.
pub fn cleanup(pin_dir: &Path) -> io::Result<usize> {
    let entries = list_pinned(pin_dir)?;
    let mut n = 0;
    for e in &entries {
        detach_and_unpin(&e.path)?;
        n += 1;
    }
    let dir = links_dir(pin_dir);
    match std::fs::remove_dir(&dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(n),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_round_trip_and_never_contain_dots() {
        for (ifname, idx, dir) in [
            ("vethab12", 7, Direction::In),
            ("veth-x-y", 12, Direction::Out),
            ("a", 4_000_000_000, Direction::In),
        ] {
            let n = pin_name(ifname, idx, dir);
            assert_eq!(parse_pin_name(&n), Some((ifname.to_owned(), idx, dir)));
        }
        assert_eq!(pin_name("veth1", 3, Direction::Out), "3-veth1-out");
        // bpffs refuses dots in names.
        assert_eq!(pin_name("eth0.100", 5, Direction::In), "5-eth0_100-in");
        assert_eq!(
            parse_pin_name("5-eth0_100-in"),
            Some(("eth0_100".to_owned(), 5, Direction::In))
        );
        for bad in ["3-veth1", "x-veth1-in", "3--in", "3-veth1-sideways", ""] {
            assert_eq!(parse_pin_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn liveness_needs_tcx_type_same_ifindex_and_direction() {
        let info = LinkInfo {
            link_type: LINK_TYPE_TCX,
            id: 1,
            prog_id: 2,
            ifindex: 9,
            attach_type: ATTACH_TCX_INGRESS,
        };
        assert!(info.is_tcx_on(9, Direction::In));
        assert!(!info.is_tcx_on(9, Direction::Out));
        assert!(!info.is_tcx_on(10, Direction::In));
        let defunct = LinkInfo { ifindex: 0, ..info };
        assert!(!defunct.is_tcx_on(9, Direction::In));
        assert!(!info.is_xdp_on(9), "a TCX link is not an XDP link");
        let xdp = LinkInfo {
            link_type: LINK_TYPE_XDP,
            attach_type: 0,
            ..info
        };
        assert!(xdp.is_xdp_on(9));
        assert!(!xdp.is_xdp_on(10));
        assert!(!xdp.is_tcx_on(9, Direction::In));
    }
}
