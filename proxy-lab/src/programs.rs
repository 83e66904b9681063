//! Every program the build, lint, tests, demo and bench run, with the Debian package that
//! provides it. `cargo xtask bootstrap` installs from this table, and the lab refuses to run a
//! program missing from it, so a test fails here too, not only on a fresh machine.
use std::ffi::OsStr;

use anyhow::{Result, bail};

/// (command that must exist, Debian package providing it).
pub const PROGRAMS: &[(&str, &str)] = &[
    // The lab: namespaces, veths, bridges, routes (`ip netns exec` runs every lab process).
    ("ip", "iproute2"),
    // tc_netlink lists the netlink tc filters of --tc-attach=netlink (`tc filter show`).
    ("tc", "iproute2"),
    // Map dumps in the demo, cgroup program checks in e2e_hostnet, an agent's map contents in
    // health_metrics (`bpftool_json`), `inspect`-style debugging.
    ("bpftool", "bpftool"),
    // e2e_external turns tx checksum offload off on the uplinks (partial-checksum packets).
    ("ethtool", "ethtool"),
    // Lab topology checks.
    ("ping", "iputils-ping"),
    // The bench's kube-proxy nftables layout.
    ("nft", "nftables"),
    // The bench's kube-proxy iptables layouts (legacy and nft backends, `*-restore`).
    ("iptables", "iptables"),
    ("iptables-legacy-restore", "iptables"),
    ("iptables-nft-restore", "iptables"),
    // The bench flushes netfilter conntrack between modes and reports its statistics.
    ("conntrack", "conntrack"),
    // `lint` renders the deploy overlays (`kubectl kustomize`).
    ("kubectl", "kubectl"),
    // proxy-userspace/build.rs names the git revision (`--version`, build-info metric).
    // The upgrade test's release builds extract a release commit (`git archive | tar -x`).
    ("git", "git"),
    ("tar", "tar"),
    // health_metrics: /healthz and /metrics from inside a node namespace.
    ("curl", "curl"),
    // e2e_external's socket scripts; `lint` validates the deploy manifests with a pip package.
    ("python3", "python3"),
    ("pip3", "python3-pip"),
    // e2e_daemonset: the container's capability set and no_new_privs (util-linux is
    // essential, named here all the same).
    ("setpriv", "util-linux"),
];

/// Programs of Debian's essential packages (coreutils, dash, util-linux), always installed.
pub const ESSENTIAL: &[&str] = &[
    "sh", "cat", "sleep", "true", "false", "echo", "env", "timeout", "test", "mkdir", "rm", "ls",
    "head", "tail", "tee", "stat", "nproc", "mount", "umount", "nsenter", "unshare", "cp", "ln",
    "touch", "chroot",
];

/// Programs the toolchain brings (rustup) or that install the rest (apt-get).
pub const TOOLCHAIN: &[&str] = &["cargo", "rustc", "rustup", "apt-get"];

/// Fails, naming the fix, when `program` is neither in [`PROGRAMS`] nor always present. Paths
/// (our own binaries, given by path) are not checked.
pub fn ensure_known(program: &OsStr) -> Result<()> {
    let name = program.to_string_lossy();
    if name.contains('/') || is_known(&name) {
        return Ok(());
    }
    bail!(
        "the lab runs `{name}`, which bootstrap does not install: add it with its Debian package \
         to proxy_lab::programs::PROGRAMS (proxy-lab/src/programs.rs)"
    )
}

/// `bpftool -j ARGS`, parsed. Errors name bpftool's stderr.
pub fn bpftool_json<S: AsRef<OsStr>>(args: &[S]) -> Result<serde_json::Value> {
    let out = std::process::Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .map_err(|e| anyhow::anyhow!("bpftool (apt-get install bpftool): {e}"))?;
    if !out.status.success() {
        bail!(
            "bpftool {:?}: {}",
            args.iter().map(|a| a.as_ref()).collect::<Vec<_>>(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn is_known(name: &str) -> bool {
    PROGRAMS.iter().any(|(c, _)| *c == name)
        || ESSENTIAL.contains(&name)
        || TOOLCHAIN.contains(&name)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    #[test]
    fn unknown_programs_are_refused_with_the_fix() {
        let e =
            ensure_known(OsStr::new("not-a-real-program")).expect_err("unknown program accepted");
        assert!(e.to_string().contains("proxy-lab/src/programs.rs"), "{e}");
        assert!(ensure_known(OsStr::new("ethtool")).is_ok());
        assert!(ensure_known(OsStr::new("/work/target/release/ebpf-proxy")).is_ok());
    }

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                rust_files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    /// Every program literal given to `Command::new` in the crates that run programs is known
    /// (the lab's `exec`/`spawn` check the programs they run inside namespaces at run time).
    #[test]
    fn every_program_the_code_starts_is_in_the_table() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut files = Vec::new();
        for krate in [
            "proxy-lab",
            "proxy-lab-tools",
            "proxy-bench",
            "xtask",
            "proxy-userspace",
        ] {
            rust_files(&root.join(krate), &mut files);
        }
        assert!(files.len() > 20, "found only {} source files", files.len());
        let needle = "Command::new(\"";
        let mut seen = 0;
        for f in &files {
            let text = std::fs::read_to_string(f).expect("read");
            for (i, _) in text.match_indices(needle) {
                let rest = &text[i + needle.len()..];
                let name = &rest[..rest.find('"').expect("closing quote")];
                seen += 1;
                assert!(
                    is_known(name),
                    "{} starts `{name}`, which is not in proxy_lab::programs::PROGRAMS",
                    f.display()
                );
            }
        }
        assert!(
            seen > 5,
            "found only {seen} Command::new calls: the scan is broken"
        );
    }
}
