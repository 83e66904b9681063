//! The lab's system edges: `ip` and `ip netns exec`, veth pairs, sysctls, bpffs and cgroup
//! mounts, terminating tracked children, log tails.
use super::*;

/// Creates `<prefix>`'s state dir atomically; false if the prefix is taken.
pub(super) fn claim_prefix(prefix: &str, existing_netns: &[String]) -> Result<bool> {
    if !lab_namespaces(prefix, existing_netns).is_empty() {
        return Ok(false);
    }
    let dir = state_dir(prefix);
    match fs::create_dir(&dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(anyhow!(e).context(format!("creating {}", dir.display()))),
    }
}

pub(super) fn lab_namespaces(prefix: &str, all: &[String]) -> Vec<String> {
    let p = format!("{prefix}-");
    all.iter()
        .filter(|ns| ns.starts_with(&p))
        .cloned()
        .collect()
}

/// Names from `ip netns list` (lines look like `name (id: 3)` or `name`).
pub fn netns_list() -> Result<Vec<String>> {
    let out = ip(&["netns", "list"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// `ip` with a whitespace-separated argument string (lab names never contain spaces).
pub(super) fn ipw(args: &str) -> Result<String> {
    ip(&args.split_whitespace().collect::<Vec<_>>())
}

pub(super) fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running `ip {}` ({NO_IP})", args.join(" ")))?;
    check_output(&out, &format!("`ip {}`", args.join(" ")))
}

pub(super) fn check_output(out: &Output, what: &str) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(super) fn netns_exec_command<S: AsRef<OsStr>>(ns: &str, args: &[S]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(args);
    cmd
}

pub(super) fn display_argv<S: AsRef<OsStr>>(args: &[S]) -> String {
    args.iter()
        .map(|a| a.as_ref().to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A veth pair `a_if` in namespace `a` <-> `b_if` in namespace `b`, created in place (no
/// temporary names in the host namespace).
pub(super) fn veth(a: &str, a_if: &str, b: &str, b_if: &str) -> Result<()> {
    ip(&[
        "-n", a, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b,
    ])?;
    Ok(())
}

pub(super) fn set_sysctls(ns: &str, forward: bool) -> Result<()> {
    let mut settings = vec![
        ("net/ipv4/conf/all/rp_filter", "0"),
        ("net/ipv4/conf/default/rp_filter", "0"),
        ("net/ipv4/conf/all/accept_redirects", "0"),
        ("net/ipv4/conf/default/accept_redirects", "0"),
        ("net/ipv4/conf/all/send_redirects", "0"),
        ("net/ipv4/conf/default/send_redirects", "0"),
    ];
    if forward {
        settings.push(("net/ipv4/ip_forward", "1"));
    }
    write_sysctls_in(ns, &settings)
}

/// Writes /proc/sys entries inside a network namespace from a short-lived thread that setns()es
/// into it (/proc/sys/net follows the calling thread's network namespace).
pub(super) fn write_sysctls_in(ns: &str, settings: &[(&str, &str)]) -> Result<()> {
    let path = Path::new("/run/netns").join(ns);
    let f = fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(|| -> Result<()> {
            // SAFETY: setns on a valid netns fd; it only affects this (short-lived) thread,
            // which touches nothing but /proc/sys.
            let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(anyhow!(io::Error::last_os_error()).context(format!("setns into {ns}")));
            }
            for (key, value) in settings {
                let p = Path::new("/proc/sys").join(key);
                fs::write(&p, value)
                    .with_context(|| format!("setting {} = {value} in {ns}", p.display()))?;
            }
            Ok(())
        })
        .join()
        .map_err(|_| anyhow!("sysctl thread for {ns} panicked"))?
    })
}

pub(super) fn mount_bpffs(path: &Path) -> Result<()> {
    fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    let target = CString::new(path.as_os_str().as_bytes()).context("bpffs path")?;
    // SAFETY: valid NUL-terminated strings; data may be NULL.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(anyhow!(io::Error::last_os_error()))
            .with_context(|| format!("mount -t bpf bpf {}", path.display()));
    }
    Ok(())
}

/// Mounts a filesystem without a device (`mount -t <fstype> none <path>`).
pub(super) fn mount_fs(path: &Path, fstype: &std::ffi::CStr) -> Result<()> {
    fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    let target = CString::new(path.as_os_str().as_bytes()).context("mount path")?;
    // SAFETY: valid NUL-terminated strings; data may be NULL.
    let rc = unsafe {
        libc::mount(
            c"none".as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(anyhow!(io::Error::last_os_error()))
            .with_context(|| format!("mount -t {fstype:?} none {}", path.display()));
    }
    Ok(())
}

/// Removes the lab's node cgroups (`<prefix>-*` under its cgroup2 mount; their processes are
/// already gone, and programs attached to them go with them), then unmounts that mount.
pub(super) fn remove_node_cgroups(
    prefix: &str,
    summary: &mut TeardownSummary,
    errors: &mut Vec<anyhow::Error>,
) {
    let cg = cgroup_mount(prefix);
    match mounts_under(&cg) {
        Ok(m) if m.contains(&cg) => {}
        Ok(_) => return,
        Err(e) => return errors.push(e),
    }
    let p = format!("{prefix}-");
    let dirs: Vec<PathBuf> = match fs::read_dir(&cg) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(&p))
            .map(|e| e.path())
            .collect(),
        Err(e) => return errors.push(anyhow!(e).context(format!("listing {}", cg.display()))),
    };
    for d in dirs {
        // A killed process leaves its cgroup a moment after it is reaped: EBUSY until then.
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match fs::remove_dir(&d) {
                Ok(()) => {
                    summary.cgroups_removed.push(d);
                    break;
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    errors.push(anyhow!(e).context(format!("removing cgroup {}", d.display())));
                    break;
                }
            }
        }
    }
    match umount(&cg) {
        Ok(()) => summary.cgroups_removed.push(cg),
        Err(e) => errors.push(e),
    }
}

pub(super) fn umount(path: &Path) -> Result<()> {
    let target = CString::new(path.as_os_str().as_bytes()).context("mount path")?;
    // SAFETY: valid NUL-terminated string.
    let rc = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        // Already gone (EINVAL: not a mount point, ENOENT: no such path) is fine.
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) {
            return Err(anyhow!(e).context(format!("umount {}", path.display())));
        }
    }
    Ok(())
}

/// Mount points at or below `dir`, from /proc/self/mountinfo.
pub(super) fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let text =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .filter(|m| m.starts_with(dir))
        .collect();
    v.sort();
    v.dedup();
    Ok(v)
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
pub(super) fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// SIGTERM every child, wait up to `grace`, SIGKILL the rest, reap all.
pub(super) fn terminate_children(children: &mut [Tracked], grace: Duration) {
    for t in children.iter_mut() {
        if let Ok(None) = t.child.try_wait() {
            // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
            unsafe { libc::kill(t.child.id() as i32, libc::SIGTERM) };
        }
    }
    let deadline = Instant::now() + grace;
    loop {
        let running = children
            .iter_mut()
            .map(|t| t.child.try_wait())
            .filter(|r| matches!(r, Ok(None)))
            .count();
        if running == 0 {
            return;
        }
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    for t in children.iter_mut() {
        if let Ok(None) = t.child.try_wait() {
            let _ = t.child.kill();
            let _ = t.child.wait();
        }
    }
}

pub(super) fn read_tail(path: &Path) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > LOG_TAIL_BYTES {
        let _ = f.seek(SeekFrom::Start(len - LOG_TAIL_BYTES));
    }
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}
