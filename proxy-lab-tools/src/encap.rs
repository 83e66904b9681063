//! `ebpf-proxy-lab lab-encap` (lab tooling): plays a Katran-style balancer by wrapping every
//! packet to a VIP in IPIP or GUE towards one node, from a tc egress program (proxy-lab-ebpf's
//! object) on a client interface. Runs until SIGINT/SIGTERM; the attachment goes with the process.
use std::{net::Ipv4Addr, process::Command};

use anyhow::{Context as _, Result, bail};
use aya::{
    maps::Array,
    programs::{SchedClassifier, TcAttachType},
};
use log::info;
use proxy_common::lab::{ENCAP_MAP, ENCAP_PROGRAM, EncapConfig, MODE_GUE, MODE_IPIP};
use tokio::signal::unix::{SignalKind, signal};

use proxy_userspace::abi;

/// The lab's eBPF object built by `build.rs` (aya-build, with BTF).
static LAB_EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-lab-ebpf"));

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Mode {
    Ipip,
    Gue,
}

#[derive(clap::Args, Debug, Clone)]
pub struct EncapArgs {
    /// Interface whose egress gets the encapsulator.
    #[arg(long, default_value = "eth0")]
    pub iface: String,
    /// Packets to this address are wrapped.
    #[arg(long)]
    pub vip: Ipv4Addr,
    /// Outer source address (this client's address).
    #[arg(long)]
    pub from: Ipv4Addr,
    /// Outer destination: the node that decapsulates.
    #[arg(long)]
    pub to: Ipv4Addr,
    #[arg(long, value_enum, default_value = "ipip")]
    pub mode: Mode,
    /// MTU to set on the interface, leaving room for the outer headers.
    #[arg(long, default_value_t = 1400)]
    pub mtu: u32,
}

pub async fn run(args: EncapArgs) -> Result<()> {
    let mut ebpf = aya::Ebpf::load(LAB_EBPF_OBJECT).context("loading the lab eBPF object")?;
    let cfg = EncapConfig {
        vip_be: abi::addr_be(args.vip),
        outer_src_be: abi::addr_be(args.from),
        outer_dst_be: abi::addr_be(args.to),
        mode: match args.mode {
            Mode::Ipip => MODE_IPIP,
            Mode::Gue => MODE_GUE,
        },
    };
    {
        let m = ebpf.map_mut(ENCAP_MAP).context("encap map missing")?;
        let mut a: Array<_, EncapConfig> = Array::try_from(m)?;
        a.set(0, cfg, 0)?;
    }
    let st = Command::new("ip")
        .args([
            "link",
            "set",
            "dev",
            &args.iface,
            "mtu",
            &args.mtu.to_string(),
        ])
        .status()
        .context("running ip")?;
    if !st.success() {
        bail!("setting the MTU of {} failed", args.iface);
    }
    let prog: &mut SchedClassifier = ebpf
        .program_mut(ENCAP_PROGRAM)
        .context("encap program missing")?
        .try_into()?;
    prog.load()
        .with_context(|| format!("loading {ENCAP_PROGRAM}"))?;
    prog.attach(&args.iface, TcAttachType::Egress)
        .with_context(|| format!("attaching {ENCAP_PROGRAM} to {}", args.iface))?;
    info!(
        "wrapping packets to {} in {:?} towards {} on {}",
        args.vip, args.mode, args.to, args.iface
    );
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
