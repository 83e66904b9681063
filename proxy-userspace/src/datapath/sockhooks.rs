//! Socket-level load balancing for host-network processes: attaching the four cgroup
//! `sock_addr` programs (`connect4`, `sendmsg4`, `recvmsg4`, `getpeername4`, see
//! `proxy-ebpf/src/sock.rs`) to a cgroup v2 directory.
//!
//! A program attached to a cgroup applies to every socket of every process in it and in its
//! descendants, whatever their network namespace. On a node that is the cgroup v2 root (every
//! host process, kubelet and hostNetwork pods included); in the lab it is a per-node cgroup, since
//! all lab "nodes" share one machine's cgroup hierarchy.
//!
//! Like the tc links ([`crate::datapath::links`]), the cgroup links are pinned, at
//! `<bpffs>/ebpf-proxy/sock-links/<program>`, so host processes keep reaching services while the
//! agent is down. The next agent adopts a pin that is live on the same cgroup and hook and swaps
//! its own program in with `BPF_LINK_UPDATE` (one atomic pointer swap; aya 0.14 has no
//! `attach_to_link` for cgroup programs, so this module makes that call itself). A pin on
//! another cgroup (the agent was restarted with another `--cgroup-path`) is detached first.
//! The pins live outside `links/` because [`crate::datapath::attach`] removes every pin there that is not
//! a bridge port's.
use std::{
    fs::File,
    io,
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink};
use log::{debug, info};
use proxy_common::sock_programs;

use super::{Datapath, links, sys};

/// Sub-directory of the pin directory holding the cgroup link pins.
pub const SOCK_LINKS_DIR: &str = "sock-links";

/// Where the agent looks for the cgroup v2 hierarchy when `--cgroup-path` is not given.
pub const DEFAULT_CGROUP_PATHS: [&str; 2] = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];

/// `BPF_LINK_TYPE_CGROUP`.
const LINK_TYPE_CGROUP: u32 = 3;

/// `enum bpf_attach_type` of each program (the kernel's UAPI values).
fn attach_type_of(prog: &str) -> Option<u32> {
    Some(match prog {
        sock_programs::CONNECT4 => 10,     // BPF_CGROUP_INET4_CONNECT
        sock_programs::SENDMSG4 => 14,     // BPF_CGROUP_UDP4_SENDMSG
        sock_programs::RECVMSG4 => 19,     // BPF_CGROUP_UDP4_RECVMSG
        sock_programs::GETPEERNAME4 => 29, // BPF_CGROUP_INET4_GETPEERNAME
        _ => return None,
    })
}

/// How one hook got its program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockAttachOutcome {
    /// A live pinned link was adopted and this agent's program swapped in atomically.
    Replaced,
    /// A new link was attached and pinned.
    Created,
    /// Unpinned mode (no pin directory): owned by this process, detached when it exits.
    Unpinned,
}

/// The attached socket hooks. In pinned mode dropping this changes nothing (the pins keep the
/// programs attached); in unpinned mode it owns the links and dropping it detaches them.
pub struct SockHooks {
    pub cgroup: PathBuf,
    pub outcomes: Vec<(&'static str, SockAttachOutcome)>,
    owned: Vec<FdLink>,
}

impl SockHooks {
    /// Links owned by this process (unpinned mode).
    pub fn owned_links(&self) -> usize {
        self.owned.len()
    }
}

fn is_cgroup2(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated path and a zeroed, writable statfs buffer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    // libc gives the magic the type of `f_type` on each architecture.
    rc == 0 && st.f_type == libc::CGROUP2_SUPER_MAGIC
}

/// The cgroup v2 directory to attach to: `path` if given (it must be a directory on a cgroup2
/// filesystem), else `/sys/fs/cgroup` if it is cgroup2 (unified hierarchy), else
/// `/sys/fs/cgroup/unified` (hybrid hierarchy).
pub fn resolve_cgroup_path(path: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = path {
        if !p.is_dir() {
            bail!(
                "--cgroup-path {}: no such directory; pass a cgroup v2 directory (the cgroup2 \
                 mount point to cover every host process)",
                p.display()
            );
        }
        if !is_cgroup2(p) {
            bail!(
                "--cgroup-path {}: not on a cgroup v2 filesystem; pass the cgroup2 mount point \
                 (see `mount -t cgroup2`) or a directory below it",
                p.display()
            );
        }
        return Ok(p.to_owned());
    }
    for c in DEFAULT_CGROUP_PATHS {
        let p = Path::new(c);
        if is_cgroup2(p) {
            return Ok(p.to_owned());
        }
    }
    bail!(
        "no cgroup v2 hierarchy at {} or {}: host-network processes cannot be load-balanced \
         without one. Mount it (`mount -t cgroup2 none /sys/fs/cgroup/unified`) or pass \
         --cgroup-path with a cgroup2 directory",
        DEFAULT_CGROUP_PATHS[0],
        DEFAULT_CGROUP_PATHS[1]
    )
}

/// `<pin_dir>/sock-links`.
pub fn sock_links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(SOCK_LINKS_DIR)
}

/// What the kernel says about a cgroup link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupLinkInfo {
    pub link_type: u32,
    pub prog_id: u32,
    /// 0 once the cgroup is gone (the link is defunct).
    pub cgroup_id: u64,
    pub attach_type: u32,
}

impl CgroupLinkInfo {
    /// A live link of `prog`'s hook on the cgroup with this id.
    pub fn is_live_on(&self, cgroup_id: u64, prog: &str) -> bool {
        self.link_type == LINK_TYPE_CGROUP
            && self.cgroup_id == cgroup_id
            && cgroup_id != 0
            && Some(self.attach_type) == attach_type_of(prog)
    }
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a cgroup link.
pub fn cgroup_link_info(fd: BorrowedFd<'_>) -> io::Result<CgroupLinkInfo> {
    // The cgroup member of the union is { __u64 cgroup_id; __u32 attach_type; }.
    let info = sys::link_info(fd)?;
    Ok(CgroupLinkInfo {
        link_type: info.link_type,
        prog_id: info.prog_id,
        cgroup_id: info.union[0],
        attach_type: info.union[1] as u32,
    })
}

/// `BPF_LINK_UPDATE`: replaces the link's program atomically.
fn link_update(link: &OwnedFd, prog: BorrowedFd<'_>) -> io::Result<()> {
    sys::link_update(link.as_fd(), prog)
}

/// The cgroup id of a cgroup v2 directory (its inode number on the cgroup2 filesystem).
pub fn cgroup_id(path: &Path) -> io::Result<u64> {
    std::fs::metadata(path).map(|m| m.ino())
}

/// Attaches (or adopts and replaces) the four socket programs on the cgroup v2 directory
/// `cgroup` (`None`: see [`resolve_cgroup_path`]). With `pin_dir`, links are pinned under
/// `<pin_dir>/sock-links`; without, they are owned by the returned value.
pub fn attach(
    dp: &mut Datapath,
    cgroup: Option<&Path>,
    pin_dir: Option<&Path>,
) -> Result<SockHooks> {
    let cgroup = &resolve_cgroup_path(cgroup)?;
    let cg_id = cgroup_id(cgroup).with_context(|| format!("reading {}", cgroup.display()))?;
    let links_dir = match pin_dir {
        Some(d) => {
            let dir = sock_links_dir(d);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            Some(dir)
        }
        None => None,
    };
    let mut hooks = SockHooks {
        cgroup: cgroup.to_owned(),
        outcomes: Vec::new(),
        owned: Vec::new(),
    };
    for name in sock_programs::ALL {
        let pin = links_dir.as_ref().map(|d| d.join(name));
        let outcome = attach_one(dp, name, cgroup, cg_id, pin.as_deref(), &mut hooks.owned)
            .with_context(|| format!("attaching {name} to cgroup {}", cgroup.display()))?;
        hooks.outcomes.push((name, outcome));
    }
    info!(
        "socket load balancing for host processes on cgroup {}: {}",
        cgroup.display(),
        hooks
            .outcomes
            .iter()
            .map(|(n, o)| format!("{n} {o:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(hooks)
}

fn attach_one(
    dp: &mut Datapath,
    name: &'static str,
    cgroup: &Path,
    cg_id: u64,
    pin: Option<&Path>,
    owned: &mut Vec<FdLink>,
) -> Result<SockAttachOutcome> {
    let prog: &mut CgroupSockAddr = dp
        .ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} is missing from the eBPF object"))?
        .try_into()
        .with_context(|| format!("program {name} is not a cgroup sock_addr program"))?;
    if let Some(pin) = pin
        && pin.exists()
    {
        let live = links::open_pin(pin).ok().and_then(|fd| {
            let info = cgroup_link_info(fd.as_fd()).ok()?;
            info.is_live_on(cg_id, name).then_some(fd)
        });
        if let Some(link) = live {
            link_update(&link, prog.fd()?.as_fd()).with_context(|| {
                format!(
                    "replacing the program of pinned link {} with this agent's {name}",
                    pin.display()
                )
            })?;
            debug!("{}: program replaced atomically", pin.display());
            return Ok(SockAttachOutcome::Replaced);
        }
        links::detach_and_unpin(pin)
            .with_context(|| format!("removing defunct link pin {}", pin.display()))?;
    }
    let file = File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
    let id = prog.attach(&file, CgroupAttachMode::Single)?;
    let link = prog.take_link(id)?;
    let fd = FdLink::try_from(link).map_err(|_| {
        anyhow::anyhow!(
            "the kernel attached {name} without a bpf_link (Linux < 5.7), which cannot be \
             pinned: ebpf-proxy needs Linux >= 5.7 for socket load balancing"
        )
    })?;
    match pin {
        Some(pin) => {
            fd.pin(pin)
                .with_context(|| format!("pinning the link at {}", pin.display()))?;
            Ok(SockAttachOutcome::Created)
        }
        None => {
            owned.push(fd);
            Ok(SockAttachOutcome::Unpinned)
        }
    }
}

/// The cookie of this process's network namespace (`SO_NETNS_COOKIE`, Linux >= 5.14): what
/// `bpf_get_netns_cookie` gives the socket programs for a socket of that namespace.
pub fn netns_cookie() -> io::Result<u64> {
    // SAFETY: a plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie and len outlive the call; len says how much may be written.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Detaches and unpins every link under `<pin_dir>/sock-links`, then removes the directory
/// (part of `ebpf-proxy cleanup`). Returns how many pins were removed.
pub fn cleanup(pin_dir: &Path) -> io::Result<usize> {
    let dir = sock_links_dir(pin_dir);
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut n = 0;
    for e in rd {
        links::detach_and_unpin(&e?.path())?;
        n += 1;
    }
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
    fn every_program_has_its_attach_type() {
        for p in sock_programs::ALL {
            assert!(attach_type_of(p).is_some(), "{p}");
        }
        assert_eq!(attach_type_of("lb_pod_in"), None);
    }

    #[test]
    fn liveness_needs_cgroup_type_same_cgroup_and_hook() {
        let info = CgroupLinkInfo {
            link_type: LINK_TYPE_CGROUP,
            prog_id: 1,
            cgroup_id: 42,
            attach_type: 10,
        };
        assert!(info.is_live_on(42, sock_programs::CONNECT4));
        assert!(!info.is_live_on(42, sock_programs::SENDMSG4));
        assert!(!info.is_live_on(43, sock_programs::CONNECT4));
        let defunct = CgroupLinkInfo {
            cgroup_id: 0,
            ..info
        };
        assert!(!defunct.is_live_on(0, sock_programs::CONNECT4));
    }

    #[test]
    fn an_explicit_path_must_be_a_cgroup2_directory() {
        let e = resolve_cgroup_path(Some(Path::new("/nonexistent/cg"))).unwrap_err();
        assert!(e.to_string().contains("no such directory"), "{e}");
        let e = resolve_cgroup_path(Some(Path::new("/tmp"))).unwrap_err();
        assert!(e.to_string().contains("not on a cgroup v2"), "{e}");
    }
}
