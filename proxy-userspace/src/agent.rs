//! `ebpf-proxy run`: the control loop. Manifests -> translate (pure) -> plan (pure) -> map
//! writer, plus keeping the programs attached to every pod bridge port.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::core::v1::Node;
use log::{debug, info, warn};
use proxy_common::NodeConfig;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    abi,
    attach::Attachments,
    bpffs,
    datapath::{Datapath, LoadOptions},
    manifests,
    netlink::{LinkEvents, Netlink},
    plan::{self, MapState},
    translate,
};

/// Options of `ebpf-proxy run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Directory of Service, EndpointSlice and Node manifests (YAML or JSON, multi-document).
    /// Reloaded whenever a file changes.
    #[arg(long, value_name = "DIR")]
    pub manifests: PathBuf,
    /// This node's name: selects its Node object (addresses) and local endpoints.
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    pub node_name: String,
    /// This node's address(es); overrides the Node object's InternalIP/ExternalIP addresses.
    #[arg(long = "node-ip", value_name = "IP")]
    pub node_ips: Vec<Ipv4Addr>,
    /// The pod network's CIDR (traffic from outside it is external; used for masquerade rules).
    #[arg(long, value_name = "CIDR", default_value = "10.76.0.0/16")]
    pub cluster_cidr: String,
    /// The bridge holding the pods' veths; every port gets the pod programs.
    #[arg(long, value_name = "IFACE", default_value = "cbr0")]
    pub pod_bridge: String,
    /// A BPF filesystem directory; maps are pinned under DIR/ebpf-proxy. Mounted if missing.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,
    /// Source address used when a pod reaches itself through a service (hairpin).
    /// Default: the pod bridge's first IPv4 address.
    #[arg(long, value_name = "IP")]
    pub hairpin_ip: Option<Ipv4Addr>,
    /// How often the manifests directory is checked for changes.
    #[arg(long, value_name = "MS", default_value_t = 200)]
    pub poll_interval_ms: u64,
}

/// Where the agent pins its maps inside the bpffs directory.
pub fn pin_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("ebpf-proxy")
}

/// The node's own IPv4 addresses from its Node object (InternalIP first).
pub fn node_addresses(node: &Node) -> Vec<Ipv4Addr> {
    let mut addrs: Vec<(u8, Ipv4Addr)> = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|a| {
            let rank = match a.type_.as_str() {
                "InternalIP" => 0,
                "ExternalIP" => 1,
                _ => return None,
            };
            a.address.parse().ok().map(|ip| (rank, ip))
        })
        .collect();
    addrs.sort();
    addrs.into_iter().map(|(_, ip)| ip).collect()
}

/// One reconciliation: read the manifests, translate, plan, write. Bad objects are logged
/// and skipped; everything valid is programmed.
pub fn sync_once<W: plan::MapWriter>(
    dir: &Path,
    node_name: &str,
    state: &mut MapState,
    writer: &mut W,
) -> Result<SyncSummary> {
    let (objects, errors) = manifests::load_dir(dir)?;
    for e in &errors {
        warn!("skipping invalid manifest: {e}");
    }
    let t = translate::translate(&translate::Input {
        services: &objects.services,
        slices: &objects.slices,
        node_name,
    });
    for i in &t.issues {
        warn!("skipping invalid field: {i}");
    }
    let p = plan::plan(state, &t.desired);
    let ops = p.ops.len();
    plan::apply_plan(state, &p, writer).context("writing the service maps")?;
    let node = objects
        .nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(node_name))
        .cloned();
    Ok(SyncSummary {
        services: t.desired.len(),
        backends: t.desired.values().map(|s| s.backends.len()).sum(),
        ops,
        invalid: errors.len() + t.issues.len(),
        node,
    })
}

pub struct SyncSummary {
    pub services: usize,
    pub backends: usize,
    pub ops: usize,
    pub invalid: usize,
    pub node: Option<Node>,
}

pub async fn run(args: RunArgs) -> Result<()> {
    if !args.manifests.is_dir() {
        bail!("--manifests {}: not a directory", args.manifests.display());
    }
    if bpffs::ensure(&args.bpffs)? {
        info!("mounted a BPF filesystem at {}", args.bpffs.display());
    }
    let pins = pin_dir(&args.bpffs);
    let mut dp = Datapath::load(&LoadOptions {
        pin_dir: Some(pins.clone()),
        ..Default::default()
    })?;
    if dp.adopted.is_empty() {
        info!("created maps pinned under {}", pins.display());
    } else {
        info!(
            "adopted pinned maps {:?} under {} (connection state kept)",
            dp.adopted,
            pins.display()
        );
    }

    // Restore what is already programmed so the first plan is a diff, not a rewrite.
    let (mut state, warnings) = {
        let maps = dp.lb_maps()?;
        MapState::from_maps(maps.read_services(), maps.read_backends())
    };
    for w in warnings {
        warn!("restoring map state: {w}");
    }

    let nl = Netlink::connect()?;
    let Some(bridge) = nl.link_by_name(&args.pod_bridge).await? else {
        bail!(
            "pod bridge {:?} does not exist in this network namespace; pass --pod-bridge with \
             the bridge that holds the pods' veths",
            args.pod_bridge
        );
    };
    let hairpin = match args.hairpin_ip {
        Some(ip) => ip,
        None => nl
            .ipv4_addrs(bridge.index)
            .await?
            .first()
            .copied()
            .with_context(|| {
                format!("{} has no IPv4 address; pass --hairpin-ip", args.pod_bridge)
            })?,
    };
    dp.set_config(&NodeConfig {
        hairpin_addr_be: abi::addr_be(hairpin),
        ..Default::default()
    })?;
    info!(
        "pod bridge {} (ifindex {}), hairpin source {hairpin}",
        bridge.name, bridge.index
    );

    let mut attachments = Attachments::default();
    let mut link_events = LinkEvents::subscribe()?;
    let ports = nl.bridge_ports(bridge.index).await?;
    attachments.sync(&mut dp, &ports);

    let mut last_fp = None;
    let mut node_logged = false;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_millis(args.poll_interval_ms.max(10)));
    let mut resync = tokio::time::interval(Duration::from_secs(5));
    info!(
        "ebpf-proxy running on node {} with manifests from {}",
        args.node_name,
        args.manifests.display()
    );
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let fp = match manifests::fingerprint(&args.manifests) {
                    Ok(fp) => fp,
                    Err(e) => { warn!("reading {}: {e}", args.manifests.display()); continue; }
                };
                if last_fp == Some(fp) { continue; }
                let started = Instant::now();
                let mut maps = dp.lb_maps()?;
                match sync_once(&args.manifests, &args.node_name, &mut state, &mut maps) {
                    Ok(s) => {
                        last_fp = Some(fp);
                        info!(
                            "synced {} service ports, {} endpoints: {} map operations in {:?}{}",
                            s.services, s.backends, s.ops, started.elapsed(),
                            if s.invalid > 0 { format!(" ({} invalid objects skipped)", s.invalid) } else { String::new() }
                        );
                        if !node_logged {
                            node_logged = true;
                            let ips = if !args.node_ips.is_empty() { args.node_ips.clone() }
                                else { s.node.as_ref().map(node_addresses).unwrap_or_default() };
                            if ips.is_empty() {
                                warn!("no Node object named {:?} and no --node-ip: node addresses unknown", args.node_name);
                            } else {
                                info!("node {} addresses: {ips:?}", args.node_name);
                            }
                        }
                    }
                    Err(e) => warn!("sync failed (will retry): {e:#}"),
                }
            }
            ev = link_events.next() => {
                if ev.is_none() { bail!("the rtnetlink event socket closed"); }
                let ports = nl.bridge_ports(bridge.index).await?;
                attachments.sync(&mut dp, &ports);
            }
            _ = resync.tick() => {
                // Belt and braces against a missed netlink event.
                let ports = nl.bridge_ports(bridge.index).await?;
                attachments.sync(&mut dp, &ports);
                debug!("attached to {} bridge ports", attachments.ports().count());
            }
            _ = sigint.recv() => { info!("SIGINT received: detaching programs and exiting; maps stay pinned under {}", pins.display()); break; }
            _ = sigterm.recv() => { info!("SIGTERM received: detaching programs and exiting; maps stay pinned under {}", pins.display()); break; }
        }
    }
    Ok(())
}
