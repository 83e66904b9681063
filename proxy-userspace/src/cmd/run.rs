//! `ebpf-proxy run`: the control loop. Loads and attaches the datapath, then feeds each
//! snapshot from the source through one sync step (translate -> plan -> apply), keeps the
//! programs attached to every pod bridge port, and exits on SIGINT/SIGTERM.
use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use log::{debug, info, warn};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cmd::config::RunArgs,
    datapath::{
        self, Datapath, LoadOptions, MapSizes,
        attach::Attachments,
        bpffs,
        netlink::{LinkEvents, Netlink},
        uplinks::{self, Uplinks},
    },
    plan::MapState,
    source::{Source, kube::TriggerTimes},
    sync::{Context, Reconciler, RejectionLog},
    translate::node_addresses,
};

/// Runs the agent until SIGINT or SIGTERM (the programs stay attached and the maps pinned).
pub async fn run(args: RunArgs) -> Result<()> {
    // Fails fast on a bad source before touching the datapath; the watches start now.
    let mut source = Source::select(
        args.manifests.as_deref(),
        args.kubeconfig.as_deref(),
        &args.node_name,
        Duration::from_millis(args.poll_interval_ms.max(10)),
    )
    .await?;
    let mut ctx = Context::new(args.node_name.clone());
    ctx.node_ips = args.node_ips.clone();
    ctx.masquerade_all = args.kp.masquerade_all;
    ctx.nodeport_addresses = args.kp.nodeport_addresses.join(",");
    ctx.cluster_cidr = args
        .cluster_cidr
        .parse()
        .map_err(|e| anyhow::anyhow!("--cluster-cidr {e}"))?;
    ctx.map_sizes = args.map_sizes.sizes().map_err(anyhow::Error::msg)?;
    let mut rejection_log = RejectionLog::default();
    if bpffs::ensure(&args.bpffs)? {
        info!("mounted a BPF filesystem at {}", args.bpffs.display());
    }
    let pins = datapath::pin_dir(&args.bpffs);
    // Maps of an older layout are never adopted (their names differ); they go once this
    // agent's programs have replaced the old ones in every link (below).
    let retired = datapath::retired_pins(&pins);
    if !retired.is_empty() {
        warn!(
            "found maps of an older ebpf-proxy version ({}): their layout differs, so they are \
             not reused and their connection state is not carried over; they are removed once \
             this agent's programs are attached",
            retired
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut dp = Datapath::load(&LoadOptions {
        pin_dir: Some(pins.clone()),
        sizes: ctx.map_sizes,
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

    datapath::sockhooks::attach(&mut dp, args.cgroup_path.as_deref(), Some(&pins))?;

    // Restore what is already programmed so the first plan is a diff, not a rewrite.
    let (mut state, warnings) = {
        let maps = dp.lb_maps()?;
        MapState::from_maps(
            maps.read_services(),
            maps.read_backends(),
            maps.read_vips(),
            maps.read_src_ranges().into_iter().map(|k| (k, 1u8)),
        )
    };
    state.set_svc_id_limit(ctx.map_sizes.svc_ids);
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
    // Node addresses come with the first snapshot (Node object) unless --node-ip gave them.
    let mut node_ips_programmed: Option<Vec<Ipv4Addr>> = None;
    dp.set_config(&ctx.node_config(&ctx.node_ips, Some(hairpin)))?;
    let mut uplink_hooks = Uplinks::new(Some(&pins), args.xdp_mode);
    info!(
        "pod bridge {} (ifindex {}), hairpin source {hairpin}",
        bridge.name, bridge.index
    );

    // Links are pinned under <pins>/links: adopting them swaps this agent's programs in
    // atomically (a restart or an upgrade), and they stay attached after this process exits.
    let mut attachments = Attachments::new(Some(&pins));
    let mut link_events = LinkEvents::subscribe()?;
    let ports = nl.bridge_ports(bridge.index).await?;
    let st = attachments.sync(&mut dp, &ports);
    info!(
        "datapath on {} bridge ports: {} links adopted with their programs replaced \
         atomically, {} attached and pinned, {} stale pins removed, {} failed",
        ports.len(),
        st.replaced,
        st.created,
        st.removed_stale,
        st.failed
    );
    if !retired.is_empty() {
        // Every link now runs this agent's programs (failed ports keep old programs that
        // still hold their maps open; removing the pins only drops the names).
        match datapath::remove_pins(&retired) {
            Ok(n) => info!("removed {n} pins of older-version maps"),
            Err(e) => warn!(
                "could not remove older-version map pins under {}: {e}; remove them by hand \
                 (rm {}/<name>_V1) or with `ebpf-proxy cleanup` once the agent is stopped",
                pins.display(),
                pins.display()
            ),
        }
    }
    let (health, metrics) = start_telemetry(&args, &pins, &ctx.map_sizes).await?;
    health.set_attached(attachments.covers(&ports));
    // healthCheckNodePort responders for externalTrafficPolicy Local services, on every
    // node address (kube-proxy serves them on the node's IPs).
    let mut responders = crate::serve::health::HealthCheckResponders::new(
        std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        health.clone(),
    );
    metrics.link_replacements.inc_by(st.replaced as u64);
    metrics
        .attached_links
        .set(2 * attachments.ports().count() as i64);

    let mut node_logged = false;
    // kubeproxy_network_programming_duration_seconds, from EndpointSlice trigger times.
    let mut triggers = TriggerTimes::new(std::time::SystemTime::now());
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut resync = tokio::time::interval(Duration::from_secs(5));
    let mut reconciler = Reconciler::new();
    info!(
        "ebpf-proxy running on node {} with {source}",
        args.node_name
    );
    loop {
        tokio::select! {
            snapshot = source.next_snapshot() => {
                health.queued_update();
                metrics.queued();
                let started = Instant::now();
                let node_ips = ctx.node_addresses(&snapshot);
                triggers.note(&snapshot.objects.slices);
                let result = {
                    let mut maps = dp.lb_maps()?;
                    reconciler.reconcile(&snapshot, &ctx, &mut state, &mut maps)
                };
                match result {
                    Ok(s) => {
                        health.updated();
                        metrics.synced(started.elapsed(), Ok(()));
                        for t in triggers.programmed() {
                            metrics.observe_network_programming(t);
                        }
                        responders.sync_counts(&s.health_checks).await;
                        metrics.set_service_labels(s.service_ids.clone());
                        if node_ips_programmed.as_ref() != Some(&node_ips) {
                            // Masquerade source, IPIP/GUE decap address, uplink discovery.
                            dp.set_config(&ctx.node_config(&node_ips, Some(hairpin)))?;
                            let want = uplinks::discover(&nl, &args.uplinks, &node_ips, &args.pod_bridge).await?;
                            uplink_hooks.sync(&mut dp, &want);
                            if want.is_empty() {
                                warn!("no uplink found (no interface holds {node_ips:?} or a default route): pass --uplink IFACE");
                            }
                            node_ips_programmed = Some(node_ips);
                        }
                        rejection_log.report(&s.rejected);
                        let read = source.read_stats();
                        let st = &s.stages;
                        debug!(
                            "sync stages: read {:?} ({} files parsed, {} unchanged), translate {:?} \
                             ({} services translated, {} unchanged), capacity {:?}, plan {:?}, \
                             apply {:?} ({} map writes), total {:?}",
                            read.took, read.parsed, read.reused, st.translate, st.translated,
                            st.reused, st.capacity, st.plan, st.apply, s.ops, read.took + started.elapsed()
                        );
                        info!(
                            "synced {} service ports, {} endpoints: {} map operations in {:?}{}",
                            s.services, s.backends, s.ops, started.elapsed(),
                            if s.rejected_objects() > 0 { format!(" ({} objects rejected)", s.rejected_objects()) } else { String::new() }
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
                    Err(e) => {
                        metrics.synced(started.elapsed(), Err(&e));
                        warn!("sync failed (will retry): {e:#}");
                        source.retry();
                    }
                }
            }
            ev = link_events.next() => {
                if ev.is_none() { bail!("the rtnetlink event socket closed"); }
                let ports = nl.bridge_ports(bridge.index).await?;
                let st = attachments.sync(&mut dp, &ports);
                health.set_attached(attachments.covers(&ports));
                metrics.link_replacements.inc_by(st.replaced as u64);
                metrics.attached_links.set(2 * attachments.ports().count() as i64);
            }
            _ = resync.tick() => {
                // Belt and braces against a missed netlink event.
                let ports = nl.bridge_ports(bridge.index).await?;
                attachments.sync(&mut dp, &ports);
                health.set_attached(attachments.covers(&ports));
                metrics.attached_links.set(2 * attachments.ports().count() as i64);
                debug!("attached to {} bridge ports", attachments.ports().count());
            }
            _ = sigint.recv() => { info!("SIGINT received: exiting; programs stay attached and maps pinned under {} (remove with `ebpf-proxy cleanup`)", pins.display()); break; }
            _ = sigterm.recv() => { info!("SIGTERM received: exiting; programs stay attached and maps pinned under {} (remove with `ebpf-proxy cleanup`)", pins.display()); break; }
        }
    }
    Ok(())
}

/// Starts the health (`/healthz`, `/livez`) and metrics (`/metrics`) servers on the
/// kube-proxy bind addresses (an empty address disables one). A port that cannot be bound is
/// an error: a DaemonSet probe would fail anyway, better say why at once.
async fn start_telemetry(
    args: &RunArgs,
    pins: &Path,
    sizes: &MapSizes,
) -> Result<(
    crate::serve::health::ProxyHealth,
    crate::serve::metrics::Metrics,
)> {
    use crate::{
        cmd::config::parse_bind_address,
        serve::{health, metrics},
    };
    let h = health::ProxyHealth::new(health::DEFAULT_HEALTH_TIMEOUT);
    let m = metrics::Metrics::new(Some(pins), *sizes);
    if let Some(addr) = parse_bind_address(
        &args.kp.healthz_bind_address,
        10256,
        "--healthz-bind-address",
    )? {
        h.serve(addr).await?;
    }
    if let Some(addr) = parse_bind_address(
        &args.kp.metrics_bind_address,
        10249,
        "--metrics-bind-address",
    )? {
        m.serve(addr).await?;
    }
    Ok((h, m))
}
