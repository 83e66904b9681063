//! Building the eBPF object and the agent.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use proxy_lab::{
    cluster::Binaries,
    lab::{TC_ATTACH_ENV, TOPOLOGY_ENV},
    releases,
};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Builds the eBPF object the same way aya-build does for the agent (nightly, build-std=core,
/// BTF), and checks that it carries BTF. Returns its path.
pub fn build_ebpf() -> Result<PathBuf> {
    let root = workspace_root();
    eprintln!("build: eBPF object (nightly, bpfel-unknown-none, with BTF)");
    run(Command::new("cargo")
        .current_dir(&root)
        .args([
            "+nightly",
            "build",
            "--release",
            "--package",
            "proxy-ebpf",
            "--bins",
        ])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [
                "--cfg=bpf_target_arch=\"x86_64\"",
                "-Cdebuginfo=2",
                "-Clink-arg=--btf",
            ]
            .join("\x1f"),
        ))?;
    let obj = root.join("target/bpfel-unknown-none/release/proxy-ebpf");
    let bytes = std::fs::read(&obj).with_context(|| format!("reading {}", obj.display()))?;
    if !bytes.windows(5).any(|w| w == b".BTF\0") {
        bail!(
            "{} has no .BTF section: bpftool could not show map fields",
            obj.display()
        );
    }
    eprintln!(
        "build: {} ({} bytes, BTF present)",
        obj.display(),
        bytes.len()
    );
    Ok(obj)
}

/// Builds the agent (its build.rs embeds the eBPF object) and the lab tools (theirs embeds the
/// lab's eBPF object). Returns both binaries' paths.
pub fn build_all() -> Result<Binaries> {
    let root = workspace_root();
    build_ebpf()?;
    eprintln!("build: ebpf-proxy, ebpf-proxy-lab and xtask (release)");
    run(Command::new("cargo")
        .current_dir(&root)
        .args(["build", "--release", "--bins"]))?;
    let bins = Binaries::beside(&root.join("target/release/ebpf-proxy"));
    for bin in [&bins.agent, &bins.tools] {
        if !bin.is_file() {
            bail!("{} was not produced", bin.display());
        }
    }
    Ok(bins)
}

pub fn lint() -> Result<()> {
    /// The crates built for `bpfel-unknown-none`, clippy'd below.
    const EBPF_CRATES: &[&str] = &["proxy-ebpf", "proxy-lab-ebpf"];
    let root = workspace_root();
    eprintln!("lint: cargo fmt --check");
    run(Command::new("cargo")
        .current_dir(&root)
        .args(["fmt", "--all", "--check"]))?;
    eprintln!("lint: cargo clippy --all-targets -- -D warnings");
    run(Command::new("cargo").current_dir(&root).args([
        "clippy",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The eBPF crates are not workspace default members and only build for the BPF target,
    // so the run above skips them: clippy them the way the object is built (nightly,
    // build-std, the bpf_target_arch cfg aya-ebpf needs).
    for krate in EBPF_CRATES {
        eprintln!(
            "lint: cargo +nightly clippy -p {krate} --target bpfel-unknown-none -- -D warnings"
        );
        run(Command::new("cargo")
            .current_dir(&root)
            .args(["+nightly", "clippy", "--package", krate])
            .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
            .args(["--", "-D", "warnings"])
            .env(
                "CARGO_ENCODED_RUSTFLAGS",
                "--cfg=bpf_target_arch=\"x86_64\"",
            ))?;
    }
    validate_deploy_manifests(&root)?;
    check_container_context(&root)?;
    Ok(())
}

/// The `kubernetes-validate` version the deploy manifests are checked with (PyPI).
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

/// Validates every Kubernetes manifest under `deploy/kubernetes` against the API schemas
/// with `kubernetes-validate --strict` (unknown fields are errors), installing it with pip
/// first if it is missing (idempotent: an installed copy is reused).
/// The image build (deploy/Containerfile, context = the repository root) must not send the
/// build output or git history to the builder: gigabytes, and stale binaries in the image.
fn check_container_context(root: &Path) -> Result<()> {
    let path = root.join(".dockerignore");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    for needed in ["target", ".git"] {
        if !text
            .lines()
            .map(|l| l.trim().trim_start_matches('/').trim_end_matches('/'))
            .any(|l| l == needed)
        {
            bail!(
                "{} does not exclude `{needed}`: the container build context would carry it",
                path.display()
            );
        }
    }
    eprintln!("lint: .dockerignore excludes target and .git");
    Ok(())
}

fn validate_deploy_manifests(root: &Path) -> Result<()> {
    let dir = root.join("deploy/kubernetes");
    // What users apply: every overlay as `kubectl kustomize` renders it, and the Jobs.
    let out_dir = root.join("target/deploy-rendered");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut files: Vec<PathBuf> = Vec::new();
    let overlays = dir.join("overlays");
    let mut names: Vec<_> = std::fs::read_dir(&overlays)
        .with_context(|| format!("reading {}", overlays.display()))?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    names.sort();
    for name in names {
        let out = Command::new("kubectl")
            .arg("kustomize")
            .arg(overlays.join(&name))
            .output()
            .context("running `kubectl kustomize` (Debian package kubectl)")?;
        if !out.status.success() {
            bail!(
                "kubectl kustomize {}: {}",
                overlays.join(&name).display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let rendered = out_dir.join(format!("{}.yaml", name.to_string_lossy()));
        std::fs::write(&rendered, &out.stdout)
            .with_context(|| format!("writing {}", rendered.display()))?;
        files.push(rendered);
    }
    let jobs = dir.join("jobs");
    let mut job_files: Vec<PathBuf> = std::fs::read_dir(&jobs)
        .with_context(|| format!("reading {}", jobs.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    job_files.sort();
    files.extend(job_files);
    if files.len() < 3 {
        bail!("expected overlays and jobs under {}", dir.display());
    }
    // A private --target directory: Debian's system Python refuses `pip install` into itself
    // (PEP 668, "externally-managed-environment"), and --target leaves it alone.
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    let site = home
        .join(".cache/ebpf-proxy/pip")
        .join(KUBERNETES_VALIDATE.replace("==", "-"));
    let python = || {
        let mut c = Command::new("python3");
        c.env("PYTHONPATH", &site);
        c
    };
    let have = python()
        .args(["-m", "kubernetes_validate", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        eprintln!(
            "lint: installing {KUBERNETES_VALIDATE} (pip, into {})",
            site.display()
        );
        run(python()
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--upgrade",
                "--target",
            ])
            .arg(&site)
            .arg(KUBERNETES_VALIDATE))
        .context(
            "installing kubernetes-validate with pip (needs python3 with pip and access to PyPI)",
        )?;
    }
    eprintln!(
        "lint: kubernetes-validate --strict: rendered overlays and jobs ({} files)",
        files.len()
    );
    run(python()
        .args(["-m", "kubernetes_validate", "--strict", "--quiet"])
        .args(&files))
}

/// Builds release `name`'s agent (from `RELEASES`) into the release cache, or reuses it.
pub fn build_release(name: &str) -> Result<PathBuf> {
    let rel = releases::release(name)?;
    releases::build(&workspace_root(), &rel, &|m| {
        eprintln!("build-release: {m}")
    })
}

/// The README's test command: unit tests, packet-fixture tests (BPF_PROG_TEST_RUN) and lab
/// end-to-end tests, with every release the upgrade test covers built (or taken from the
/// release cache) first. Needs root.
pub fn test(extra: &[String]) -> Result<()> {
    let root = workspace_root();
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the test suite loads BPF programs and builds network namespaces: run it as root (sudo -E cargo xtask test)"
        );
    }
    let bins = build_all()?;
    let mut release_env = Vec::new();
    for name in releases::UPGRADE_TESTED {
        release_env.push((releases::bin_env_var(name), build_release(name)?));
    }
    let cargo_test = |args: &[String], topology: &str, tc_attach: Option<&str>| {
        let mut cmd = Command::new("cargo");
        if let Some(m) = tc_attach {
            cmd.env(TC_ATTACH_ENV, m);
        }
        cmd.current_dir(&root)
            .args(["test", "--release", "--no-fail-fast"])
            .args(args)
            .env("EBPF_PROXY_BIN", &bins.agent)
            .env("EBPF_PROXY_LAB_BIN", &bins.tools)
            .env(TOPOLOGY_ENV, topology)
            .envs(release_env.clone());
        let t0 = std::time::Instant::now();
        run(&mut cmd)?;
        Ok::<_, anyhow::Error>(t0.elapsed())
    };
    // Every default member (all crates but the eBPF ones, which only build for bpfel).
    if let Ok(t) = std::env::var(TOPOLOGY_ENV) {
        eprintln!(
            "test: cargo test --release (unit, packet fixtures, lab end-to-end on the {t} \
             topology, from {TOPOLOGY_ENV})"
        );
        let took = cargo_test(extra, &t, None)?;
        eprintln!(
            "test: all passed ({t} topology, {:.0} s)",
            took.as_secs_f64()
        );
        return Ok(());
    }
    eprintln!(
        "test: cargo test --release (unit, packet fixtures, lab end-to-end) [bridge topology]"
    );
    let bridge = cargo_test(extra, "bridge", None)?;
    eprintln!("test: bridge pass passed in {:.0} s", bridge.as_secs_f64());
    match routed_pass_args(extra) {
        Some(args) => {
            eprintln!(
                "test: the lab end-to-end tests again [routed topology: no bridge, /32 routes; \
                 the upgrade test is bridge-only]: cargo test --release {}",
                args.join(" ")
            );
            let routed = cargo_test(&args, "routed", None)?;
            eprintln!(
                "test: routed pass passed in {:.0} s (bridge pass {:.0} s)",
                routed.as_secs_f64(),
                bridge.as_secs_f64()
            );
        }
        None => eprintln!("test: no proxy-lab test selected: no routed pass"),
    }
    // Kernels without TCX (< 6.6): the same lab tests with every agent on netlink cls_bpf
    // filters (--tc-attach=netlink), on the bridge topology. Not the upgrade from v0.1.0: that
    // release attached only with TCX, so no node upgrades from it into netlink mode, and the
    // forced switch is flaky (UDP NodePort flows lost; an open defect, docs/kernels.md).
    if let Some(args) = lab_pass_args(extra, true) {
        eprintln!(
            "test: the lab end-to-end tests again [bridge topology, {TC_ATTACH_ENV}=netlink: tc \
             programs as netlink cls_bpf filters; the upgrade test is TCX-only]: cargo test \
             --release {}",
            args.join(" ")
        );
        let netlink = cargo_test(&args, "bridge", Some("netlink"))?;
        eprintln!(
            "test: netlink pass passed in {:.0} s",
            netlink.as_secs_f64()
        );
    }
    eprintln!("test: all passed");
    Ok(())
}

/// The `cargo test` arguments of the routed-topology pass, from the bridge pass's `extra`:
/// only proxy-lab (the other crates do not build labs), without the upgrade test (v0.1.0
/// knows only bridges; it pins the bridge topology and already ran). `None` when `extra`
/// selects packages without proxy-lab. Pure.
pub fn routed_pass_args(extra: &[String]) -> Option<Vec<String>> {
    lab_pass_args(extra, true)
}

/// The `cargo test` arguments of a lab-only pass (see [`routed_pass_args`]), keeping the
/// upgrade test unless `skip_upgrade`.
pub fn lab_pass_args(extra: &[String], skip_upgrade: bool) -> Option<Vec<String>> {
    let split = extra.iter().position(|a| a == "--").unwrap_or(extra.len());
    let (cargo, harness) = extra.split_at(split);
    let mut packages = Vec::new();
    let mut it = cargo.iter();
    while let Some(a) = it.next() {
        if a == "-p" || a == "--package" {
            packages.extend(it.next().cloned());
        } else if let Some(p) = a.strip_prefix("--package=").or(a.strip_prefix("-p")) {
            packages.push(p.to_owned());
        }
    }
    let mut out: Vec<String> = Vec::new();
    if packages.is_empty() {
        out.extend(["-p".to_owned(), "proxy-lab".to_owned()]);
        out.extend(cargo.iter().filter(|a| *a != "--workspace").cloned());
    } else if packages.iter().any(|p| p == "proxy-lab") {
        out.extend(cargo.iter().cloned());
    } else {
        return None;
    }
    out.push("--".to_owned());
    out.extend(harness.iter().skip(1).cloned());
    if skip_upgrade {
        out.extend(["--skip".to_owned(), "upgrade_from_".to_owned()]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::{lab_pass_args, routed_pass_args};

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn the_routed_pass_runs_only_the_lab_tests() {
        assert_eq!(
            routed_pass_args(&[]),
            Some(v(&["-p", "proxy-lab", "--", "--skip", "upgrade_from_"]))
        );
        assert_eq!(
            routed_pass_args(&v(&[
                "-p",
                "proxy-lab",
                "--test",
                "e2e_clusterip",
                "--",
                "hairpin"
            ])),
            Some(v(&[
                "-p",
                "proxy-lab",
                "--test",
                "e2e_clusterip",
                "--",
                "hairpin",
                "--skip",
                "upgrade_from_"
            ]))
        );
        assert_eq!(routed_pass_args(&v(&["-p", "proxy-userspace"])), None);
        // A lab pass that keeps the upgrade test.
        assert_eq!(
            lab_pass_args(&[], false),
            Some(v(&["-p", "proxy-lab", "--"]))
        );
        assert_eq!(routed_pass_args(&v(&["--package=proxy-userspace"])), None);
        assert_eq!(
            routed_pass_args(&v(&["--workspace"])),
            Some(v(&["-p", "proxy-lab", "--", "--skip", "upgrade_from_"]))
        );
    }
}
