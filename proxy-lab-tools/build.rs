use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// Builds the lab's eBPF object (nightly, -Z build-std=core, with BTF) into OUT_DIR so
/// `lab-encap` can embed it with `include_bytes_aligned!`, as proxy-userspace does for the agent.
fn main() -> anyhow::Result<()> {
    let meta = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let pkg = meta
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "proxy-lab-ebpf")
        .ok_or_else(|| anyhow!("proxy-lab-ebpf package not found"))?;
    let root_dir = pkg
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent"))?
        .as_str()
        .to_owned();
    let package = Package {
        name: "proxy-lab-ebpf",
        root_dir: &root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::Nightly)
}
