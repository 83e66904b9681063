//! Out-of-process lab management: what exists of a lab ([`LabStatus`], [`list_labs`]) and
//! removing one by its prefix whichever process made it ([`down_by_prefix`]).
use super::*;

/// What [`down_by_prefix`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TeardownSummary {
    pub namespaces_deleted: Vec<String>,
    pub processes_killed: usize,
    pub unmounted: Vec<PathBuf>,
    /// The per-node cgroups removed, then the lab's cgroup2 mount (not in `unmounted`).
    pub cgroups_removed: Vec<PathBuf>,
    pub state_dir_removed: bool,
    /// The agents' status files for this lab's pin directories (see [`agent_status_files`]).
    pub status_files_removed: Vec<PathBuf>,
}

/// Where agents write their status files (`proxy-userspace/src/serve/status.rs`: one per pin
/// directory, named after its path with `/` as `-`).
pub const AGENT_STATUS_DIR: &str = "/run/ebpf-proxy";

/// The agents' status files of lab `prefix` (agents pinning under its state directory, e.g.
/// `run-ebpf-proxy-lab-<prefix>-bpffs-node1.json`, and a temporary file a killed writer left).
/// An agent keeps its file when it exits: it names what the pins still program, for `inspect`
/// after a crash or a stop. Whoever removes the pins removes it: `ebpf-proxy cleanup`, or the
/// lab's teardown, which unmounts the lab's bpffs.
pub fn agent_status_files(prefix: &str, dir: &Path) -> Vec<PathBuf> {
    let stem = format!(
        "{}-",
        state_dir(prefix)
            .to_string_lossy()
            .trim_matches('/')
            .replace('/', "-")
    );
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with(&stem) && name.contains(".json")
        })
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

/// What exists of a lab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LabStatus {
    pub prefix: String,
    /// Existing namespaces named `<prefix>-*`.
    pub namespaces: Vec<String>,
    /// The state file, if present and readable.
    pub state: Option<LabState>,
    /// Mount points under the lab's state directory (the per-node bpffs).
    pub mounts: Vec<PathBuf>,
    pub state_dir_exists: bool,
}

impl LabStatus {
    /// Namespaces the state file names that do not exist.
    pub fn missing_namespaces(&self) -> Vec<String> {
        self.state
            .as_ref()
            .map(|s| {
                s.all_namespaces()
                    .into_iter()
                    .filter(|ns| !self.namespaces.contains(ns))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// State file present, every namespace and every node bpffs present.
    pub fn is_complete(&self) -> bool {
        self.state.as_ref().is_some_and(|s| {
            self.missing_namespaces().is_empty()
                && s.nodes.iter().all(|n| self.mounts.contains(&n.bpffs))
        })
    }
}

impl fmt::Display for LabStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let health = if self.is_complete() {
            "up"
        } else {
            "incomplete"
        };
        writeln!(
            f,
            "lab {} ({health}), state dir {}",
            self.prefix,
            state_dir(&self.prefix).display()
        )?;
        if let Some(s) = &self.state {
            writeln!(f, "  router  {}", s.router_ns)?;
            writeln!(f, "  ext     {}  {}", s.ext_ns, s.ext_ip)?;
            for n in &s.nodes {
                writeln!(
                    f,
                    "  node{}   {}  {}  pods {}  bpffs {}",
                    n.node,
                    n.ns,
                    n.ip,
                    n.pod_cidr,
                    n.bpffs.display()
                )?;
            }
            for p in &s.pods {
                writeln!(
                    f,
                    "  pod     {}  {}  node{}  ({})",
                    p.ns, p.ip, p.node, p.host_veth
                )?;
            }
            for ns in self.missing_namespaces() {
                writeln!(f, "  MISSING namespace {ns}")?;
            }
        } else {
            writeln!(f, "  (no readable state file)")?;
            for ns in &self.namespaces {
                writeln!(f, "  namespace {ns}")?;
            }
        }
        for m in &self.mounts {
            writeln!(f, "  mount   {}", m.display())?;
        }
        Ok(())
    }
}

/// What exists of the lab `prefix` (namespaces, state file, mounts). Does not need the lab to be
/// complete; a lab that does not exist at all has no namespaces and `state_dir_exists == false`.
pub fn status(prefix: &str) -> Result<LabStatus> {
    validate_prefix(prefix)?;
    let namespaces = lab_namespaces(prefix, &netns_list()?);
    let dir = state_dir(prefix);
    Ok(LabStatus {
        prefix: prefix.to_owned(),
        namespaces,
        state: LabState::load(prefix).ok(),
        mounts: mounts_under(&dir)?,
        state_dir_exists: dir.is_dir(),
    })
}

/// Every lab that exists: a state directory under `/run/ebpf-proxy-lab`, or a `<prefix>-router`
/// namespace.
pub fn list_labs() -> Result<Vec<LabStatus>> {
    let mut prefixes = std::collections::BTreeSet::new();
    match fs::read_dir(STATE_ROOT) {
        Ok(rd) => {
            for entry in rd {
                let entry = entry.with_context(|| format!("listing {STATE_ROOT}"))?;
                if let Some(name) = entry.file_name().to_str()
                    && validate_prefix(name).is_ok()
                {
                    prefixes.insert(name.to_owned());
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(anyhow!(e).context(format!("listing {STATE_ROOT}"))),
    }
    for ns in netns_list()? {
        if let Some(p) = ns.strip_suffix("-router")
            && validate_prefix(p).is_ok()
        {
            prefixes.insert(p.to_owned());
        }
    }
    prefixes.iter().map(|p| status(p)).collect()
}

/// Removes everything of the lab `prefix`, whichever process created it: SIGTERM (then SIGKILL
/// after 2 s) every process inside a `<prefix>-*` namespace, delete those namespaces (which
/// deletes their veths), unmount everything under the state directory, remove it. Idempotent;
/// keeps going after errors and reports them all.
pub fn down_by_prefix(prefix: &str) -> Result<TeardownSummary> {
    ensure_prereqs()?;
    validate_prefix(prefix)?;
    let mut summary = TeardownSummary::default();
    let mut errors = Vec::new();
    let mut namespaces = lab_namespaces(prefix, &netns_list()?);
    // Pods first, the router last (purely cosmetic: deletion order does not matter).
    namespaces.sort_by_key(|ns| {
        let role = &ns[prefix.len() + 1..];
        match role {
            "router" => 3,
            "ext" => 2,
            "node1" | "node2" => 1,
            _ => 0,
        }
    });

    // Processes inside the namespaces.
    let me = std::process::id();
    let pids_in = |errors: &mut Vec<anyhow::Error>| -> Vec<i32> {
        let mut all = Vec::new();
        for ns in &namespaces {
            match ip(&["netns", "pids", ns]) {
                Ok(out) => all.extend(
                    out.split_whitespace()
                        .filter_map(|s| s.parse::<i32>().ok())
                        .filter(|&p| p > 1 && p as u32 != me),
                ),
                Err(e) => errors.push(e),
            }
        }
        all.sort_unstable();
        all.dedup();
        all
    };
    let initial = pids_in(&mut errors);
    summary.processes_killed = initial.len();
    if !initial.is_empty() {
        for &pid in &initial {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut ignore = Vec::new();
        loop {
            let left = pids_in(&mut ignore);
            if left.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                for &pid in &left {
                    // SAFETY: as above.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                std::thread::sleep(Duration::from_millis(100));
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    for ns in &namespaces {
        match ip(&["netns", "delete", ns]) {
            Ok(_) => summary.namespaces_deleted.push(ns.clone()),
            Err(e) => errors.push(e),
        }
    }

    for f in agent_status_files(prefix, Path::new(AGENT_STATUS_DIR)) {
        match fs::remove_file(&f) {
            Ok(()) => summary.status_files_removed.push(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => errors.push(anyhow!(e).context(format!("removing {}", f.display()))),
        }
    }

    let dir = state_dir(prefix);
    remove_node_cgroups(prefix, &mut summary, &mut errors);
    match mounts_under(&dir) {
        Ok(mut mounts) => {
            // Deepest first.
            mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
            for m in mounts {
                match umount(&m) {
                    Ok(()) => summary.unmounted.push(m),
                    Err(e) => errors.push(e),
                }
            }
        }
        Err(e) => errors.push(e),
    }
    if dir.exists() {
        // Refuse to recurse into anything still mounted (it would delete pins).
        match mounts_under(&dir) {
            Ok(m) if m.is_empty() => match fs::remove_dir_all(&dir) {
                Ok(()) => summary.state_dir_removed = true,
                Err(e) => errors.push(anyhow!(e).context(format!("removing {}", dir.display()))),
            },
            Ok(m) => errors.push(anyhow!(
                "not removing {}: still mounted: {m:?}",
                dir.display()
            )),
            Err(e) => errors.push(e),
        }
    }

    if errors.is_empty() {
        Ok(summary)
    } else {
        let msgs: Vec<String> = errors.iter().map(|e| format!("{e:#}")).collect();
        bail!(
            "tearing down lab {prefix} (partially done: {summary:?}):\n  {}",
            msgs.join("\n  ")
        )
    }
}
