use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// Builds the eBPF object (nightly, -Z build-std=core, with BTF) into OUT_DIR so the agent can
/// embed it with `include_bytes_aligned!`.
fn main() -> anyhow::Result<()> {
    git_revision();
    let meta = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let pkg = meta
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "proxy-ebpf")
        .ok_or_else(|| anyhow!("proxy-ebpf package not found"))?;
    let root_dir = pkg
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent"))?
        .as_str()
        .to_owned();
    let package = Package {
        name: "proxy-ebpf",
        root_dir: &root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::Nightly)
}

/// The git revision for `ebpf_proxy_build_info` and `--version` ("unknown" outside a checkout,
/// e.g. in the container build, whose context leaves .git out).
fn git_revision() {
    let rev = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=EBPF_PROXY_GIT_REVISION={rev}");
    // The compiler, for the build-info metric and `inspect status` (cargo sets RUSTC).
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let rustc_version = std::process::Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=EBPF_PROXY_RUSTC={rustc_version}");
    // Rebuilt when HEAD moves: a checkout changes .git/HEAD, a commit the branch's ref.
    let git = std::path::Path::new("../.git");
    if let Ok(head) = std::fs::read_to_string(git.join("HEAD")) {
        println!("cargo:rerun-if-changed=../.git/HEAD");
        if let Some(r) = head.trim().strip_prefix("ref: ")
            && git.join(r).exists()
        {
            println!("cargo:rerun-if-changed=../.git/{r}");
        }
    }
}
