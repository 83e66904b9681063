//! Toolchain bootstrap: idempotent, quick when already done, and loud about what it changes.
//!
//! - Debian packages for every program the lab, tests, demo and bench run (iproute2, bpftool,
//!   ethtool, ...: [`PACKAGES`]), installed with apt-get.
//! - The nightly toolchain's `rust-src` (eBPF builds use `-Z build-std=core`).
//! - bpf-linker, linked against the nightly rustc's own libLLVM (no LLVM package of the right
//!   major exists here). Versions and file names are derived from the installed toolchain.
use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
// Every program the build, lint, tests, demo and bench run -> its Debian package: one table,
// shared with the lab, which refuses to run a program missing from it.
use proxy_lab::programs::PROGRAMS as PACKAGES;

/// bpf-linker release known to build against LLVM 22 with the `llvm-22` feature.
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn have_command(cmd: &str) -> bool {
    env::var_os("PATH")
        .map(|p| env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        .unwrap_or(false)
        || Path::new("/usr/sbin").join(cmd).is_file()
        || Path::new("/sbin").join(cmd).is_file()
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn cache_dir() -> PathBuf {
    let home = env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache").join("ebpf-proxy")
}

fn cargo_bin_dir() -> PathBuf {
    if let Some(h) = env::var_os("CARGO_HOME") {
        return PathBuf::from(h).join("bin");
    }
    let home = env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cargo").join("bin")
}

fn debian_packages() -> Result<()> {
    let mut missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(c, _)| !have_command(c))
        .map(|(_, p)| *p)
        .collect();
    // One package can provide several commands.
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!(
        "bootstrap: installing Debian packages: {}",
        missing.join(" ")
    );
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "missing packages {} and not root: run `sudo apt-get install {}`",
            missing.join(" "),
            missing.join(" ")
        );
    }
    run(Command::new("apt-get").args(["update", "-qq"]))
        .context("apt-get update failed; check network access to the Debian mirrors")?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .with_context(|| format!("apt-get install {} failed", missing.join(" ")))
}

fn nightly() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is required (https://rustup.rs)")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        eprintln!("bootstrap: installing the nightly toolchain");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let comps = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if !comps.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("bootstrap: adding rust-src to nightly (for -Z build-std=core)");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

/// The nightly rustc's libLLVM: (path of the real shared object, LLVM major version).
fn nightly_llvm() -> Result<(PathBuf, u32)> {
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.trim().parse().ok())
        .context("`rustc +nightly -vV` printed no LLVM version")?;
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    // The real library is `libLLVM.so.<ver>-rust-<rustc ver>`; `libLLVM-<major>-rust-*.so` is
    // only a linker script pointing at it.
    let so = fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {}: reinstall the nightly toolchain",
                lib.display()
            )
        })?;
    Ok((so, major))
}

fn bpf_linker() -> Result<()> {
    let (so, major) = nightly_llvm()?;
    let file = so
        .file_name()
        .and_then(|n| n.to_str())
        .context("libLLVM name")?
        .to_owned();
    let stamp_text = format!("{BPF_LINKER_VERSION} {file}\n");
    let stamp = cache_dir().join("bpf-linker.stamp");
    let bin = cargo_bin_dir().join("bpf-linker");
    if bin.is_file() && fs::read_to_string(&stamp).ok().as_deref() == Some(stamp_text.as_str()) {
        return Ok(());
    }
    eprintln!(
        "bootstrap: building bpf-linker {BPF_LINKER_VERSION} against {file} (LLVM {major}, about a minute)"
    );
    // bpf-linker links libLLVM dynamically from LLVM_PREFIX/lib and records an rpath to it,
    // so this directory must stay.
    let prefix = cache_dir().join(format!("llvm-{file}"));
    let libdir = prefix.join("lib");
    fs::create_dir_all(&libdir)?;
    for name in ["libLLVM.so", file.as_str()] {
        let link = libdir.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&so, &link)
            .with_context(|| format!("symlinking {}", link.display()))?;
    }
    run(Command::new("cargo")
        .args([
            "+stable",
            "install",
            "--force",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix))
    .context("building bpf-linker failed")?;
    fs::create_dir_all(cache_dir())?;
    fs::write(&stamp, stamp_text)?;
    Ok(())
}

/// Makes this machine able to build and test ebpf-proxy.
pub fn bootstrap() -> Result<()> {
    debian_packages()?;
    nightly()?;
    bpf_linker()?;
    // aya-build finds bpf-linker through PATH.
    let bin = cargo_bin_dir();
    if let Some(path) = env::var_os("PATH")
        && !env::split_paths(&path).any(|p| p == bin)
    {
        let mut paths: Vec<PathBuf> = env::split_paths(&path).collect();
        paths.insert(0, bin);
        // SAFETY: single-threaded at this point of xtask.
        unsafe { env::set_var("PATH", env::join_paths(paths)?) };
    }
    Ok(())
}
