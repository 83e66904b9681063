//! `ebpf-proxy run`: the control loop. Loads and attaches the datapath, then feeds each
//! snapshot from the source through one sync step (translate -> plan -> apply), keeps the
//! programs attached to every pod interface (see [`crate::datapath::pods`]), and exits on
//! SIGINT/SIGTERM.
use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use log::{debug, info, warn};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cmd::{
        config::{ForeignTunnels, RunArgs, SocketLb, local_detection, parse_bind_address},
        kpflags::LocalDetection,
    },
    datapath::{
        self, Datapath, LoadOptions, MapSizes,
        attach::{Attachments, TcMode},
        bpffs,
        netlink::{self, Iface, LinkEvents, Netlink},
        pods::{self, PodSelector},
        sockhooks,
        uplinks::{self, Uplinks},
    },
    plan::MapState,
    serve::{
        health::{self, HealthCheckResponders, ProxyHealth},
        metrics::Metrics,
        status::StatusWriter,
    },
    source::{Snapshot, Source, triggers::TriggerTimes},
    sync::{Context, Reconciler, RejectionLog, SyncSummary},
    translate::node_addresses,
};

/// Runs the agent until SIGINT or SIGTERM (the programs stay attached and the maps pinned).
pub async fn run(args: RunArgs) -> Result<()> {
    // Fails fast on a bad source before touching the datapath; the watches start now.
    let mut source = Source::select(
        args.manifests.as_deref(),
        args.kubeconfig.as_deref(),
        args.kp.master.as_deref(),
        &args.node_name,
        Duration::from_millis(args.poll_interval_ms.max(10)),
    )
    .await?;
    let ctx = context(&args)?;
    let (mut agent, mut link_events) = Agent::start(&args, ctx).await?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut resync = tokio::time::interval(Duration::from_secs(5));
    info!(
        "ebpf-proxy running on node {} with {source}",
        args.node_name
    );
    let pins = agent.pins.clone();
    let stopped = |sig: &str| {
        info!(
            "{sig} received: exiting; programs stay attached and maps pinned under {} (remove \
             with `ebpf-proxy cleanup`)",
            pins.display()
        )
    };
    loop {
        tokio::select! {
            // source -> sync (translate -> plan -> apply).
            snapshot = source.next_snapshot() => agent.sync(&snapshot, &mut source).await?,
            ev = link_events.next() => {
                if ev.is_none() { bail!("the rtnetlink event socket closed"); }
                agent.ports_changed().await?;
            }
            // Belt and braces against a missed netlink event.
            _ = resync.tick() => agent.resync_ports().await?,
            _ = sigint.recv() => { stopped("SIGINT"); break; }
            _ = sigterm.recv() => { stopped("SIGTERM"); break; }
        }
    }
    Ok(())
}

/// What translation needs beyond the API objects, from the flags.
fn context(args: &RunArgs) -> Result<Context> {
    let mut ctx = Context::new(args.node_name.clone());
    ctx.node_ips = args.node_ips.clone();
    ctx.masquerade_all = args.kp.masquerade_all;
    ctx.nodeport_addresses = args.kp.nodeport_addresses.join(",");
    ctx.cluster_cidr = args
        .cluster_cidr
        .parse()
        .map_err(|e| anyhow::anyhow!("--cluster-cidr {e}"))?;
    ctx.map_sizes = args.map_sizes.sizes().map_err(anyhow::Error::msg)?;
    ctx.decap_sources = crate::sync::decap_sources(&args.decap_allowed_sources).0;
    ctx.foreign_tunnels_pass = args.foreign_tunnels == ForeignTunnels::Pass;
    ctx.host_netns_cookie = match args.socket_lb {
        SocketLb::Off => None,
        SocketLb::Host | SocketLb::All => match sockhooks::netns_cookie() {
            Ok(c) => Some(c),
            // Without it the hooks could not tell pods from host processes: none rather
            // than pods losing the per-packet rules.
            Err(e) => {
                warn!(
                    "socket load balancing off: this kernel cannot name a socket's network                      namespace (SO_NETNS_COOKIE, Linux >= 5.14): {e}; host-network processes                      cannot reach ClusterIPs"
                );
                None
            }
        },
    };
    ctx.socket_lb_pods_tcp = args.socket_lb == SocketLb::All && ctx.host_netns_cookie.is_some();
    if ctx.socket_lb_pods_tcp && ctx.masquerade_all {
        warn!(
            "--socket-lb=all with --masquerade-all: pods' connections stay on the tc path \
             (the socket cannot masquerade); only host processes are balanced at the socket"
        );
    }
    if ctx
        .decap_sources
        .as_ref()
        .is_some_and(|v| v.len() > proxy_common::sizes::DECAP_SRC4 as usize)
    {
        bail!(
            "--decap-allowed-sources: more than {} IPv4 CIDRs",
            proxy_common::sizes::DECAP_SRC4
        );
    }
    Ok(ctx)
}

/// The running agent: the loaded datapath with its map model, and everything that follows
/// the snapshots (node config, uplinks, health checks, metrics) and the pod interfaces.
struct Agent {
    ctx: Context,
    node_name: String,
    /// `--node-ip` as given (only for the log line naming the node's addresses).
    node_ip_flags: Vec<Ipv4Addr>,
    uplink_flags: Vec<String>,
    /// How pod interfaces are found, and the named bridge's ifindex.
    pods: PodSelector,
    bridge_index: Option<u32>,
    /// The uplinks as last discovered: never pod interfaces.
    uplink_names: Vec<String>,
    /// `--detect-local-mode` and what it needs: the datapath's "local" CIDR follows the Node
    /// object (NodeCIDR) or the bridge's subnet (BridgeInterface, InterfaceNamePrefix).
    local: LocalDetection,
    bridge_nets: Vec<(Ipv4Addr, u8)>,
    /// The local CIDR last logged (at start, then on every change).
    local_logged: crate::sync::Cidr,
    pins: PathBuf,
    dp: Datapath,
    state: MapState,
    reconciler: Reconciler,
    rejection_log: RejectionLog,
    nl: Netlink,
    /// `--hairpin-ip`; else the node's first address.
    hairpin_flag: Option<Ipv4Addr>,
    /// Node addresses come with the first snapshot (Node object) unless --node-ip gave them;
    /// the local CIDR too with --detect-local-mode NodeCIDR.
    node_config_programmed: Option<(Vec<Ipv4Addr>, crate::sync::Cidr)>,
    /// The node's addresses as last known (flags, Node object, or the pinned config at
    /// start): kept while a snapshot has no Node object.
    known_ips: Vec<Ipv4Addr>,
    /// An earlier release's conntrack table is still pinned: copied again once the uplinks
    /// run our programs too, then unpinned.
    ct_migrating: bool,
    uplink_hooks: Uplinks,
    attachments: Attachments,
    health: ProxyHealth,
    metrics: Metrics,
    /// What `inspect` reads (names, endpoint states, config, last sync, health).
    status: StatusWriter,
    responders: HealthCheckResponders,
    /// kubeproxy_network_programming_duration_seconds, from EndpointSlice trigger times.
    triggers: TriggerTimes,
    node_logged: bool,
    /// The IPv4 podCIDR of this node's Node object, once read: its broadcast address is a
    /// directed broadcast REJECT must not answer even where no interface holds an address in
    /// it (routed pod networks).
    node_pod_cidr: Option<crate::sync::Cidr>,
}

impl Agent {
    /// Loads (or adopts) the datapath, restores the map model, attaches the programs to the
    /// pod interfaces and starts the health and metrics servers. The link events are
    /// subscribed before the interfaces are listed, so no change falls in between.
    async fn start(args: &RunArgs, mut ctx: Context) -> Result<(Self, LinkEvents)> {
        let rejection_log = RejectionLog::default();
        // Off the runtime's one thread: the program verification (about a second) then
        // overlaps the initial lists the watches are already fetching.
        let (a, c) = (args.clone(), ctx.clone());
        let (mut dp, state, pins, retired) =
            tokio::task::spawn_blocking(move || load_datapath(&a, &c))
                .await
                .context("loading the datapath")??;

        let nl = Netlink::connect()?;
        let pods = PodSelector::from_flags(&args.pod_bridge, &args.kp.pod_interface_name_prefix);
        let bridge_index = pod_bridge(&nl, &pods).await?;
        let local = local_detection(args);
        let bridge_nets = match bridge_index {
            Some(i) => nl.ipv4_nets(i).await?,
            None => Vec::new(),
        };
        // What the previous agent knew of this node stays until a snapshot says otherwise
        // (the API server may be down for the whole restart): its address, which masquerade
        // and IPIP/GUE decapsulation need, and its NodeCIDR.
        let pinned = Remembered::from_config(dp.config().ok());
        // NodeCIDR: otherwise unset until the Node object is read (the first snapshot).
        ctx.cluster_cidr = pinned.local(&local, local.local_cidr(None, &bridge_nets), false);
        log_local(&local, ctx.cluster_cidr);
        let known_ips = pinned.node_ips(&ctx.node_ips);
        // Decapsulation sources: new CIDRs before the config that may start checking them,
        // old ones after the config that may stop.
        let decap_wanted = ctx.decap_sources.clone().unwrap_or_default();
        let (add, remove) = crate::sync::decap_source_changes(&dp.decap_sources()?, &decap_wanted);
        for n in add {
            dp.set_decap_source(n, true)?;
        }
        let hairpin = hairpin_source(args.hairpin_ip, &known_ips);
        dp.set_config(&ctx.node_config(&known_ips, hairpin))?;
        for n in remove {
            dp.set_decap_source(n, false)?;
        }
        if ctx.foreign_tunnels_pass {
            info!(
                "IPIP/GUE to this node that is not decapsulated goes to the kernel still wrapped \
                 (--foreign-tunnels=pass)"
            );
        }
        match &ctx.decap_sources {
            None => info!("IPIP/GUE decapsulated from any outer source"),
            Some(v) => info!(
                "IPIP/GUE decapsulated only from outer sources {}",
                if v.is_empty() {
                    "(none)".to_owned()
                } else {
                    v.iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                }
            ),
        }
        let features = crate::datapath::features::probe();
        for line in features.missing() {
            warn!("{line}");
        }
        let tc_mode = args.tc_attach.resolve(features.has("tcx"));
        info!(
            "kernel {}.{}.{}: tc programs attached as {} (--tc-attach {:?})",
            features.kernel.0,
            features.kernel.1,
            features.kernel.2,
            match tc_mode {
                TcMode::Tcx => "pinned TCX links",
                TcMode::Netlink => "netlink cls_bpf filters",
            },
            args.tc_attach
        );
        let uplink_hooks = Uplinks::new(Some(&pins), args.xdp_mode, tc_mode);
        info!("pod interfaces: {pods}");
        match (args.hairpin_ip, hairpin) {
            (Some(ip), _) => info!("hairpin source {ip} (--hairpin-ip)"),
            (None, Some(ip)) => info!("hairpin source {ip} (the node's address)"),
            (None, None) => info!(
                "hairpin source: the node's address, once known (until then a pod reaching \
                 itself through a service is dropped)"
            ),
        }
        // The uplinks are never pod interfaces: known before any pod program is attached.
        let uplink_names = iface_names(
            &uplinks::discover(&nl, &args.uplinks, &known_ips, pods.bridge().unwrap_or("")).await?,
        );

        // Links are pinned under <pins>/links: adopting them swaps this agent's programs in
        // atomically (a restart or an upgrade), and they stay attached after this process exits.
        let mut attachments = Attachments::new(Some(&pins), tc_mode);
        let link_events = LinkEvents::subscribe()?;
        let facts = nl.link_facts().await?;
        let ports = pods.select(&facts, bridge_index, &uplink_names);
        dp.set_pod_netns(&pods::pod_netns(&facts, &ports))?;
        dp.set_broadcasts(&netlink::subnet_broadcasts(&nl.all_ipv4_nets().await?))?;
        let unprefixed = local.ports_without_prefix(ports.iter().map(|p| p.name.as_str()));
        if !unprefixed.is_empty() {
            warn!(
                "--detect-local-mode InterfaceNamePrefix: pod interfaces not named {:?}*: {}; \
                 kube-proxy would not treat their traffic as local, ebpf-proxy does when its \
                 source is in the local CIDR",
                local.prefix,
                unprefixed.join(", ")
            );
        }
        let st = attachments.sync(&mut dp, &ports);
        let what = match tc_mode {
            TcMode::Tcx => "links",
            TcMode::Netlink => "tc filters",
        };
        info!(
            "datapath on {} pod interfaces ({}): {} {what} adopted with their programs replaced \
             atomically, {} attached{}, {} stale pins removed, {} failed",
            ports.len(),
            iface_names(&ports).join(", "),
            st.replaced,
            st.created,
            if tc_mode == TcMode::Tcx {
                " and pinned"
            } else {
                ""
            },
            st.removed_stale,
            st.failed
        );
        if !retired.is_empty() {
            remove_retired(&retired, &pins);
        }
        // The pod ports now run our programs: what the old ones created meanwhile.
        let migrated = migrate_conntrack(&mut dp, &pins, "after the pod programs were replaced");
        check_local_port_range();
        let (health, metrics) = start_telemetry(args, &pins, &ctx.map_sizes).await?;
        metrics.ct_migrated.inc_by(migrated.unwrap_or(0));
        start_sweeper(&pins, args.conntrack.timeouts(), metrics.clone())?;
        health.set_attached(attachments.covers(&ports));
        // healthCheckNodePort responders for externalTrafficPolicy Local services, on every
        // node address (kube-proxy serves them on the node's IPs).
        let responders =
            HealthCheckResponders::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), health.clone());
        metrics.link_replacements.inc_by(st.replaced as u64);
        metrics
            .attached_links
            .set(2 * attachments.ports().count() as i64);
        let local_logged = ctx.cluster_cidr;
        let summary = crate::cmd::config::summary(args);
        let status = StatusWriter::new(&args.bpffs, &args.node_name, summary, &ctx.map_sizes);
        let known_local = ctx.cluster_cidr;
        let mut agent = Self {
            ctx,
            node_name: args.node_name.clone(),
            node_ip_flags: args.node_ips.clone(),
            uplink_flags: args.uplinks.clone(),
            pods,
            bridge_index,
            uplink_names,
            local_logged,
            local,
            bridge_nets,
            pins,
            dp,
            state,
            reconciler: Reconciler::new(),
            rejection_log,
            nl,
            hairpin_flag: args.hairpin_ip,
            node_config_programmed: None,
            known_ips: known_ips.clone(),
            ct_migrating: migrated.is_some(),
            uplink_hooks,
            attachments,
            health,
            metrics,
            status,
            responders,
            triggers: TriggerTimes::new(SystemTime::now()),
            node_logged: false,
            node_pod_cidr: None,
        };
        if !known_ips.is_empty() {
            // Known already (--node-ip, or remembered): the uplinks get our programs now,
            // not at the first snapshot.
            if agent.node_ip_flags.is_empty() {
                info!(
                    "node address {} remembered from the pinned config until the Node object \
                     is read",
                    known_ips[0]
                );
            }
            agent.program_node(known_ips, known_local).await?;
        }
        Ok((agent, link_events))
    }

    /// One snapshot through the sync step (translate -> plan -> apply). A failed write is
    /// logged and the source asked for the snapshot again; other errors end the agent.
    async fn sync(&mut self, snapshot: &Snapshot, source: &mut Source) -> Result<()> {
        self.health.queued_update();
        self.metrics.queued_now();
        let started = Instant::now();
        let node_ips = self.ctx.node_addresses(snapshot);
        let node = snapshot
            .objects
            .nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(self.node_name.as_str()));
        let mut local = self.local.local_cidr(node, &self.bridge_nets);
        if node.is_none() && self.local.follows_node() {
            // No Node object in this snapshot: keep the NodeCIDR we had.
            local = self.ctx.cluster_cidr;
        }
        let node_ips = if node_ips.is_empty() {
            self.known_ips.clone()
        } else {
            node_ips
        };
        self.health
            .set_node_eligible(self.ctx.node_eligible(snapshot));
        let prepared = started.elapsed();
        let result = {
            let mut maps = self.dp.lb_maps()?;
            self.reconciler
                .reconcile(snapshot, &self.ctx, &mut self.state, &mut maps)
        };
        // Bookkeeping over every object, after the maps are written: it must not delay a
        // change on its way to the datapath (issue 16: event -> maps in milliseconds).
        self.metrics.count_changes(&snapshot.objects);
        self.triggers.note_shared(&snapshot.objects.slices);
        match result {
            Ok(s) => {
                let (objects, ids) = (&snapshot.objects, &s.service_ids);
                self.status.synced(objects, ids, &self.health);
                self.synced(&s, (started, prepared), (node_ips, local), source)
                    .await
            }
            Err(e) => {
                self.metrics.synced(started.elapsed(), Err(&e));
                warn!("sync failed (will retry): {e:#}");
                source.retry();
                Ok(())
            }
        }
    }

    /// After a sync: health and metrics, the health-check responders, the node's addresses
    /// in the datapath config and the uplinks when they changed, and the logs.
    async fn synced(
        &mut self,
        s: &SyncSummary,
        (started, prepared): (Instant, std::time::Duration),
        (node_ips, local): (Vec<Ipv4Addr>, crate::sync::Cidr),
        source: &Source,
    ) -> Result<()> {
        self.health.updated();
        self.metrics.synced(started.elapsed(), Ok(s));
        for t in self.triggers.programmed() {
            self.metrics.observe_network_programming(t);
        }
        self.responders.sync_counts(&s.health_checks).await;
        self.metrics.set_service_labels(s.service_ids.clone());
        self.program_node(node_ips, local).await?;
        let pod_cidr = s
            .node
            .as_ref()
            .and_then(crate::cmd::kpflags::node_pod_cidr_v4)
            .filter(|c| c.is_set());
        if pod_cidr.is_some() && pod_cidr != self.node_pod_cidr {
            // Kept while a snapshot has no Node object, like the node's addresses.
            self.node_pod_cidr = pod_cidr;
            self.refresh_broadcasts().await?;
        }
        self.rejection_log.report(&s.rejected);
        let read = source.read_stats();
        let st = &s.stages;
        debug!(
            "sync stages: read {:?} ({} files parsed, {} unchanged), prepare {:?}, translate {:?} \
             ({} services translated, {} unchanged), capacity {:?}, plan {:?} ({}), \
             apply {:?} ({} map writes), total {:?}",
            read.took,
            read.parsed,
            read.reused,
            prepared,
            st.translate,
            st.translated,
            st.reused,
            st.capacity,
            st.plan,
            if st.incremental {
                "changes only"
            } else {
                "full"
            },
            st.apply,
            s.ops,
            read.took + started.elapsed()
        );
        info!(
            "synced {} service ports, {} endpoints: {} map operations in {:?}{}",
            s.services,
            s.backends,
            s.ops,
            started.elapsed(),
            if s.rejected_objects() > 0 {
                format!(" ({} objects rejected)", s.rejected_objects())
            } else {
                String::new()
            }
        );
        if !self.node_logged {
            self.node_logged = true;
            let ips = if !self.node_ip_flags.is_empty() {
                self.node_ip_flags.clone()
            } else {
                s.node.as_ref().map(node_addresses).unwrap_or_default()
            };
            if ips.is_empty() {
                warn!(
                    "no Node object named {:?} and no --node-ip: node addresses unknown",
                    self.node_name
                );
            } else {
                info!("node {} addresses: {ips:?}", self.node_name);
            }
        }
        Ok(())
    }

    /// The node's addresses and local CIDR into the datapath config, and the uplinks, when
    /// they changed (masquerade source, local CIDR, IPIP/GUE decap address, uplink discovery).
    async fn program_node(
        &mut self,
        node_ips: Vec<Ipv4Addr>,
        local: crate::sync::Cidr,
    ) -> Result<()> {
        let programmed = self.node_config_programmed.as_ref();
        let ips_changed = programmed.is_none_or(|(ips, _)| *ips != node_ips);
        let local_changed = programmed.is_none_or(|(_, l)| *l != local);
        if ips_changed || local_changed {
            self.ctx.cluster_cidr = local;
            let hairpin = hairpin_source(self.hairpin_flag, &node_ips);
            self.dp
                .set_config(&self.ctx.node_config(&node_ips, hairpin))?;
            if local != self.local_logged {
                log_local(&self.local, local);
                self.local_logged = local;
            }
        }
        if ips_changed {
            if !node_ips.is_empty() {
                self.known_ips = node_ips.clone();
            }
            let want = uplinks::discover(
                &self.nl,
                &self.uplink_flags,
                &node_ips,
                self.pods.bridge().unwrap_or(""),
            )
            .await?;
            if iface_names(&want) != self.uplink_names {
                // An interface that is now an uplink loses the pod programs first.
                self.uplink_names = iface_names(&want);
                self.ports_changed().await?;
            }
            self.uplink_hooks.sync(&mut self.dp, &want);
            if want.is_empty() {
                warn!(
                    "no uplink found (no interface holds {node_ips:?} or a default route): pass \
                     --uplink IFACE"
                );
            }
            if self.ct_migrating {
                self.ct_migrating = false;
                let n = migrate_conntrack(
                    &mut self.dp,
                    &self.pins,
                    "after the uplink programs were replaced",
                );
                self.metrics.ct_migrated.inc_by(n.unwrap_or(0));
                // Every link runs our programs and nothing writes the old table any more.
                if let Err(e) = self.dp.end_previous_ct() {
                    warn!("could not tell the programs the upgrade is over: {e}");
                }
                match datapath::retire_migrated(&self.pins) {
                    Ok(n) if n > 0 => info!("removed the earlier release's conntrack pin"),
                    Ok(_) => {}
                    Err(e) => warn!(
                        "could not remove the earlier release's conntrack pin under {}: {e}",
                        self.pins.display()
                    ),
                }
            }
        }
        if ips_changed || local_changed {
            self.node_config_programmed = Some((node_ips, local));
        }
        Ok(())
    }

    /// The pod interfaces now, by the selector, with their pods' namespace IDs and the node's
    /// subnet broadcast addresses recorded for the datapath.
    async fn pod_interfaces(&mut self) -> Result<Vec<Iface>> {
        let links = self.nl.link_facts().await?;
        let ports = self
            .pods
            .select(&links, self.bridge_index, &self.uplink_names);
        self.dp.set_pod_netns(&pods::pod_netns(&links, &ports))?;
        self.refresh_broadcasts().await?;
        Ok(ports)
    }

    /// REJECT's list of directed-broadcast sources: the node's subnets (addresses change with
    /// links, e.g. a bridge getting its address) and its podCIDR.
    async fn refresh_broadcasts(&mut self) -> Result<()> {
        let mut nets = self.nl.all_ipv4_nets().await?;
        nets.extend(self.node_pod_cidr.map(|c| (c.addr, c.prefix)));
        self.dp.set_broadcasts(&netlink::subnet_broadcasts(&nets))?;
        Ok(())
    }

    /// A link came, went or changed (rtnetlink event): attach to the new pod interfaces.
    async fn ports_changed(&mut self) -> Result<()> {
        let ports = self.pod_interfaces().await?;
        let st = self.attachments.sync(&mut self.dp, &ports);
        self.health.set_attached(self.attachments.covers(&ports));
        self.metrics.link_replacements.inc_by(st.replaced as u64);
        self.metrics
            .attached_links
            .set(2 * self.attachments.ports().count() as i64);
        Ok(())
    }

    /// The periodic check of the pod interfaces (a missed event).
    async fn resync_ports(&mut self) -> Result<()> {
        let ports = self.pod_interfaces().await?;
        self.attachments.sync(&mut self.dp, &ports);
        self.health.set_attached(self.attachments.covers(&ports));
        self.metrics
            .attached_links
            .set(2 * self.attachments.ports().count() as i64);
        debug!(
            "attached to {} pod interfaces",
            self.attachments.ports().count()
        );
        Ok(())
    }
}

/// Datapath debug logging: on with --datapath-debug, else as the pinned config says (an
/// operator's `ebpf-proxy debug on` survives a restart); its records go to our log either way.
fn debug_switch(dp: &mut Datapath, flag: bool) -> Result<()> {
    if flag {
        dp.set_datapath_debug(true)?;
    }
    if dp
        .config()
        .is_ok_and(|c| c.flags & proxy_common::cfg_flags::DATAPATH_DEBUG != 0)
    {
        info!(
            "datapath debug logging is on: drops and rejects are logged with their reason \
             (target {}; `ebpf-proxy debug off` stops it)",
            datapath::debuglog::TARGET
        );
    }
    datapath::debuglog::spawn_reader(&mut dp.ebpf).context("reading the datapath's log buffer")
}

/// Mounts the bpffs if needed, loads the programs with maps created or adopted under the pin
/// directory, attaches the socket hooks and restores the map model from the maps, so the
/// first plan is a diff, not a rewrite. Also returns the pins of retired map versions.
fn load_datapath(
    args: &RunArgs,
    ctx: &Context,
) -> Result<(Datapath, MapState, PathBuf, Vec<PathBuf>)> {
    if bpffs::ensure(&args.bpffs)? {
        info!("mounted a BPF filesystem at {}", args.bpffs.display());
    }
    let pins = datapath::pin_dir(&args.bpffs);
    // Maps of an older layout are never adopted (their names differ); they go once this
    // agent's programs have replaced the old ones in every link (see `remove_retired`).
    let retired = datapath::retired_pins(&pins);
    if !retired.is_empty() {
        warn!(
            "found maps of an older ebpf-proxy version ({}): their layout differs, so they are \
             not reused and their contents (connection state, verdict counters) are not carried \
             over; they are removed once this agent's programs are attached",
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
    // An earlier release's conntrack table: copied in now, before our programs replace its
    // programs, and again after (see `Agent::migrate_conntrack`).
    migrate_conntrack(&mut dp, &pins, "before the programs are replaced");
    if dp.adopted.is_empty() {
        info!("created maps pinned under {}", pins.display());
    } else {
        info!(
            "adopted pinned maps {:?} under {} (connection state kept)",
            dp.adopted,
            pins.display()
        );
    }
    debug_switch(&mut dp, args.datapath_debug)?;

    match ctx.host_netns_cookie {
        Some(cookie) => {
            // The host-only filter before the programs that read it: the hooks sit on the
            // cgroup every pod is in, and must never translate a pod's socket.
            // `--socket-lb=all` sets the pods' TCP flag too; `host` clears one a previous
            // `all` run left.
            let mut cfg = dp.config().unwrap_or_default();
            let pods = proxy_common::cfg_flags::SOCK_LB_PODS_TCP;
            cfg.flags = (cfg.flags & !pods)
                | proxy_common::cfg_flags::SOCK_LB_HOST_ONLY
                | if ctx.socket_lb_pods_tcp { pods } else { 0 };
            cfg.host_netns_cookie = cookie;
            dp.set_config(&cfg)?;
            sockhooks::attach(&mut dp, args.cgroup_path.as_deref(), Some(&pins))?;
        }
        None => {
            let n = sockhooks::cleanup(&pins).context("removing the socket hooks")?;
            info!("socket load balancing off (--socket-lb=off): {n} socket hook links removed");
        }
    }

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
    Ok((dp, state, pins, retired))
}

/// Says which sources the datapath now treats as local (`--detect-local-mode`).
fn log_local(local: &LocalDetection, cidr: crate::sync::Cidr) {
    if cidr.is_set() {
        info!(
            "local traffic ({:?}): sources in {}/{}",
            local.mode, cidr.addr, cidr.prefix
        );
    } else if local.mode != crate::cmd::kpflags::DetectLocalMode::ClusterCIDR {
        warn!(
            "local traffic ({:?}): not known yet (no IPv4 {}); nothing is masqueraded because \
             of its source until it is",
            local.mode,
            if local.follows_node() {
                "podCIDR in this node's Node object"
            } else {
                "address on the pod bridge"
            }
        );
    }
}

/// kube-proxy's `--oom-score-adj`: written to /proc/self/oom_score_adj; a failure is a
/// warning (an unprivileged run may not lower it).
pub fn set_oom_score_adj(n: i32) {
    match std::fs::write("/proc/self/oom_score_adj", n.to_string()) {
        Ok(()) => info!("oom_score_adj set to {n}"),
        Err(e) => warn!("--oom-score-adj {n}: writing /proc/self/oom_score_adj: {e}"),
    }
}

/// kube-proxy's `--init-only`: what needs full privileges, then return. Mounts the BPF
/// filesystem if missing and creates (or adopts) the pinned maps; attaches nothing.
pub fn init_only(args: &RunArgs) -> Result<()> {
    if bpffs::ensure(&args.bpffs)? {
        info!("mounted a BPF filesystem at {}", args.bpffs.display());
    }
    let pins = datapath::pin_dir(&args.bpffs);
    let sizes = args.map_sizes.sizes().map_err(anyhow::Error::msg)?;
    let dp = Datapath::load(&LoadOptions {
        pin_dir: Some(pins.clone()),
        sizes,
    })?;
    info!(
        "--init-only: maps pinned under {} ({} adopted); nothing attached, exiting",
        pins.display(),
        dp.adopted.len()
    );
    Ok(())
}

/// The named pod bridge's ifindex (`--pod-bridge-interface`); `None` for the other
/// selectors. A named bridge that does not exist is an error: the flag says the pods are there.
async fn pod_bridge(nl: &Netlink, pods: &PodSelector) -> Result<Option<u32>> {
    let Some(name) = pods.bridge() else {
        return Ok(None);
    };
    match nl.link_by_name(name).await? {
        Some(b) => Ok(Some(b.index)),
        None => bail!(
            "pod bridge {name:?} does not exist in this network namespace; pass \
             --pod-bridge-interface with the bridge that holds the pods' veths, or leave it \
             out to find pod interfaces without a bridge"
        ),
    }
}

/// The hairpin source (a pod reaching itself through a service must see another source than
/// its own): `--hairpin-ip`, else the node's first address, as kube-proxy masquerades it to
/// the outgoing address. Pure.
fn hairpin_source(flag: Option<Ipv4Addr>, node_ips: &[Ipv4Addr]) -> Option<Ipv4Addr> {
    flag.or_else(|| node_ips.first().copied())
}

fn iface_names(v: &[Iface]) -> Vec<String> {
    v.iter().map(|i| i.name.clone()).collect()
}

/// What the pinned config of the previous agent (same build or an earlier release) says
/// about this node. Pure.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Remembered {
    node_addr: Option<Ipv4Addr>,
    local: Option<crate::sync::Cidr>,
}

impl Remembered {
    fn from_config(c: Option<proxy_common::NodeConfig>) -> Self {
        let Some(c) = c else {
            return Self::default();
        };
        let mask = u32::from_be(c.cluster_mask_be);
        Self {
            node_addr: (c.node_addr_be != 0).then(|| crate::abi::addr_from_be(c.node_addr_be)),
            local: (mask != 0).then(|| crate::sync::Cidr {
                addr: crate::abi::addr_from_be(c.cluster_cidr_be),
                prefix: mask.count_ones() as u8,
            }),
        }
    }

    /// `--node-ip` if given, else the remembered address, else none (the Node object's).
    fn node_ips(&self, flags: &[Ipv4Addr]) -> Vec<Ipv4Addr> {
        if !flags.is_empty() {
            return flags.to_vec();
        }
        self.node_addr.into_iter().collect()
    }

    /// The local CIDR to program: `now`, unless the local CIDR follows the Node object
    /// (NodeCIDR; InterfaceNamePrefix without a bridge) and that is not known yet
    /// (`node_known` false), then the remembered one.
    fn local(
        &self,
        d: &LocalDetection,
        now: crate::sync::Cidr,
        node_known: bool,
    ) -> crate::sync::Cidr {
        match (node_known, self.local) {
            (false, Some(l)) if d.follows_node() && !now.is_set() => l,
            _ => now,
        }
    }
}

/// Copies an earlier release's conntrack table into ours (`when` says at which step), so
/// its connections keep their backends and NAT across the upgrade. Returns whether one was
/// found.
fn migrate_conntrack(dp: &mut Datapath, pins: &Path, when: &str) -> Option<u64> {
    match dp.migrate_conntrack(pins) {
        Ok(None) => None,
        Ok(Some(m)) => {
            info!(
                "conntrack of an earlier release ({}) carried over {when}: {} entries copied, \
                 {} already present, {} failed",
                proxy_common::maps::CT4_MIGRATE.join(", "),
                m.copied,
                m.present,
                m.failed
            );
            if m.failed > 0 {
                warn!(
                    "{} conntrack entries of the earlier release did not fit (--conntrack-max \
                     {}): those connections are balanced again on their next packet",
                    m.failed,
                    dp.ct_capacity()
                );
            }
            Some(m.copied as u64)
        }
        Err(e) => {
            warn!("could not read the earlier release's conntrack table: {e}");
            None
        }
    }
}

/// Warns when the node's local port range overlaps the masquerade port range.
fn check_local_port_range() {
    let path = "/proc/sys/net/ipv4/ip_local_port_range";
    match std::fs::read_to_string(path) {
        Ok(r) => {
            if let Some(w) = crate::conntrack::port_range_overlap(crate::sync::SNAT_PORTS, &r) {
                warn!("{w}");
            }
        }
        Err(e) => debug!("{path}: {e}"),
    }
}

/// The conntrack sweeper: a thread of its own (map syscalls block), with its own descriptors
/// on the pinned tables. Each run looks at a bounded batch of entries per table; the runs
/// follow each other every `SWEEP_INTERVAL`, so a full pass over two full default tables
/// takes about 2 x 262144 / SWEEP_BATCH runs.
fn start_sweeper(pins: &Path, t: crate::conntrack::Timeouts, metrics: Metrics) -> Result<()> {
    use crate::datapath::conntrack::{CtTables, Sweeper, monotonic_ns};
    const SWEEP_INTERVAL: Duration = Duration::from_millis(500);
    const SWEEP_BATCH: usize = 16_384;
    let mut ct = CtTables::open_pinned(pins).context("opening the conntrack tables")?;
    info!(
        "conntrack sweeper: timeouts tcp established {:?}, close-wait {:?}, time-wait {:?}, \
         close {:?}, syn-sent {:?}, udp {:?}, udp stream {:?}",
        t.tcp_established,
        t.tcp_close_wait,
        t.tcp_time_wait,
        t.tcp_close,
        t.tcp_syn_sent,
        t.udp,
        t.udp_stream
    );
    std::thread::Builder::new()
        .name("ct-sweeper".into())
        .spawn(move || {
            let mut sw = Sweeper::new(SWEEP_BATCH);
            loop {
                std::thread::sleep(SWEEP_INTERVAL);
                let st = sw.run(&mut ct, &t, monotonic_ns());
                metrics.swept(&st);
                if st.removed_total() > 0 {
                    debug!(
                        "conntrack sweep: {} scanned, {} flows expired",
                        st.scanned,
                        st.removed_total()
                    );
                }
            }
        })
        .context("starting the conntrack sweeper thread")?;
    Ok(())
}

/// Removes the pins of retired map versions once every link runs this agent's programs
/// (failed ports keep old programs that still hold their maps open; removing the pins only
/// drops the names).
fn remove_retired(retired: &[PathBuf], pins: &Path) {
    match datapath::remove_pins(retired) {
        Ok(n) => info!("removed {n} pins of older-version maps"),
        Err(e) => warn!(
            "could not remove older-version map pins under {}: {e}; remove them by hand \
             (rm {}/<name>_V1) or with `ebpf-proxy cleanup` once the agent is stopped",
            pins.display(),
            pins.display()
        ),
    }
}

/// Starts the health (`/healthz`, `/livez`) and metrics (`/metrics`) servers on the
/// kube-proxy bind addresses (an empty address disables one). A port that cannot be bound is
/// an error: a DaemonSet probe would fail anyway, better say why at once.
async fn start_telemetry(
    args: &RunArgs,
    pins: &Path,
    sizes: &MapSizes,
) -> Result<(ProxyHealth, Metrics)> {
    let mut h = ProxyHealth::new(health::DEFAULT_HEALTH_TIMEOUT);
    let m = Metrics::new(Some(pins), *sizes, args.metrics_per_service);
    h.count_probes(m.healthz_total.clone(), m.livez_total.clone());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{cmd::kpflags::DetectLocalMode, sync::Cidr};

    fn cidr(a: [u8; 4], prefix: u8) -> Cidr {
        Cidr {
            addr: Ipv4Addr::from(a),
            prefix,
        }
    }

    #[test]
    fn the_hairpin_source_is_the_flag_else_the_node_address() {
        let node = [Ipv4Addr::new(10, 240, 0, 11), Ipv4Addr::new(192, 0, 2, 7)];
        let flag = Ipv4Addr::new(10, 76, 0, 1);
        assert_eq!(hairpin_source(Some(flag), &node), Some(flag));
        assert_eq!(hairpin_source(None, &node), Some(node[0]));
        assert_eq!(hairpin_source(None, &[]), None, "unknown until the node is");
    }

    #[test]
    fn the_pinned_config_remembers_the_node_until_a_snapshot_knows_it() {
        let cfg = proxy_common::NodeConfig {
            node_addr_be: crate::abi::addr_be(Ipv4Addr::new(10, 240, 0, 11)),
            cluster_cidr_be: crate::abi::addr_be(Ipv4Addr::new(10, 76, 1, 0)),
            cluster_mask_be: crate::abi::addr_be(Ipv4Addr::new(255, 255, 255, 0)),
            ..Default::default()
        };
        let r = Remembered::from_config(Some(cfg));
        assert_eq!(r.node_ips(&[]), [Ipv4Addr::new(10, 240, 0, 11)]);
        let flag = [Ipv4Addr::new(192, 0, 2, 1)];
        assert_eq!(r.node_ips(&flag), flag, "--node-ip wins");
        let mut d = LocalDetection {
            mode: DetectLocalMode::NodeCIDR,
            cluster_cidr: Cidr::default(),
            bridge: String::new(),
            prefix: String::new(),
        };
        let unset = Cidr::default();
        assert_eq!(r.local(&d, unset, false), cidr([10, 76, 1, 0], 24));
        let node = cidr([10, 76, 2, 0], 24);
        assert_eq!(r.local(&d, node, true), node, "the Node object wins");
        d.mode = DetectLocalMode::ClusterCIDR;
        assert_eq!(
            r.local(&d, unset, false),
            unset,
            "only NodeCIDR is remembered"
        );
        // InterfaceNamePrefix without a bridge follows the Node too.
        d.mode = DetectLocalMode::InterfaceNamePrefix;
        assert_eq!(r.local(&d, unset, false), cidr([10, 76, 1, 0], 24));
        // A fresh node: nothing pinned, nothing remembered.
        let none = Remembered::from_config(Some(proxy_common::NodeConfig::default()));
        assert!(none.node_ips(&[]).is_empty());
        assert_eq!(Remembered::from_config(None), Remembered::default());
    }
}
