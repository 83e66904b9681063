//! `ebpf-proxy cleanup`: detach every program link and remove every pin the agent made, which
//! is how ebpf-proxy is removed from a node (stopping the agent deliberately leaves both).
use std::path::Path;

use anyhow::{Context as _, Result};

use proxy_common::programs;

use crate::datapath::{links, sockhooks, tcfilter};

/// What `cleanup` removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Cleanup {
    pub links: usize,
    /// Netlink cls_bpf filters of ours (`--tc-attach=netlink`, or kernels without TCX).
    pub filters: usize,
    pub maps: usize,
}

/// Detaches and unpins every program link, then removes every map pin the agent owns under
/// `pin_dir`. Links go first so no program is left running against maps that are gone.
/// Everything under `pin_dir` is the agent's: link pins in any sub-directory (`links/`,
/// `sock-links/`, and those of other hooks such as `uplinks/`) are detached explicitly
/// (`BPF_LINK_DETACH`) before being removed; files at the top are maps, those of older
/// versions (`proxy_common::maps::RETIRED`) included.
///
/// Our netlink tc filters (they have no pins) go first: found on every interface by our
/// priority/handle and program names.
pub fn cleanup(pin_dir: &Path) -> Result<Cleanup> {
    let filters = tcfilter::cleanup_all(&programs::TC)
        .context("removing the netlink tc filters of ebpf-proxy")?;
    let mut links = links::cleanup(pin_dir).with_context(|| {
        format!(
            "detaching the program links pinned under {}",
            links::links_dir(pin_dir).display()
        )
    })?;
    links += sockhooks::cleanup(pin_dir).with_context(|| {
        format!(
            "detaching the cgroup links pinned under {}",
            sockhooks::sock_links_dir(pin_dir).display()
        )
    })?;
    // Other link directories (every sub-directory holds link pins), before any map goes.
    let mut entries: Vec<std::path::PathBuf> = std::fs::read_dir(pin_dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    entries.sort_by_key(|p| !p.is_dir());
    let mut maps = 0;
    for p in entries {
        if p.is_dir() {
            for f in std::fs::read_dir(&p)
                .with_context(|| format!("reading {}", p.display()))?
                .flatten()
            {
                links::detach_and_unpin(&f.path())
                    .with_context(|| format!("detaching {}", f.path().display()))?;
                links += 1;
            }
            std::fs::remove_dir(&p).with_context(|| format!("removing {}", p.display()))?;
        } else {
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            maps += 1;
        }
    }
    match std::fs::remove_dir(pin_dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", pin_dir.display()))?
        }
        _ => {}
    }
    Ok(Cleanup {
        links,
        filters,
        maps,
    })
}
