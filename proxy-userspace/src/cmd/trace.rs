//! `ebpf-proxy trace`: "where does this packet go?", answered by the real programs.
//!
//! The eBPF object is loaded with private, unpinned maps; the maps are programmed from the
//! manifests, or from the live objects of an API server (`--kubeconfig`), by the production
//! reconcile path (translate -> plan -> writer); then synthesized
//! packets (one per sample, each with its own source port) run through the program of the hook
//! the source implies, with BPF_PROG_TEST_RUN. The verdict, the rewritten headers and the
//! counters the run moved say what happened.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{TestRun as _, TestRunOptions};
use proxy_common::{counter, programs};
use serde::Serialize;

use crate::{
    abi::Protocol,
    datapath::{self, Datapath, LoadOptions},
    packet::{self, Ipv4, tcp_flags},
    plan::MapState,
    source::{self, Snapshot},
    sync::{self, Cidr, Context},
    translate::ServiceKey,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_PASS: u32 = 2;

/// Options of `ebpf-proxy trace`.
#[derive(clap::Args, Debug, Clone)]
pub struct TraceArgs {
    /// Directory of Service, EndpointSlice and Node manifests.
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "kubeconfig",
        conflicts_with = "kubeconfig"
    )]
    pub manifests: Option<PathBuf>,
    /// Read the Services, EndpointSlices and this node's Node object from the API server this
    /// kubeconfig names (one list of each, as the agent does at start), instead of manifests.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// With --kubeconfig: give up when the API server has not answered every list by then.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub timeout: u64,
    /// The node whose view to trace (local endpoints, traffic policies).
    #[arg(long, value_name = "NAME")]
    pub node_name: String,
    /// The node's address(es) (NodePorts listen on them; masquerade uses the first).
    #[arg(long = "node-ip", value_name = "IP", required = true)]
    pub node_ips: Vec<Ipv4Addr>,
    /// The pod network's CIDR: sources inside it are pods (traced through the pod hook).
    /// Default: none, as for `run`: every source that is not a node address is external.
    #[arg(
        long,
        value_name = "CIDR",
        default_value = "",
        hide_default_value = true
    )]
    pub cluster_cidr: Cidr,
    /// Masquerade every service flow (kube-proxy's --masquerade-all).
    #[arg(long)]
    pub masquerade_all: bool,
    /// Addresses NodePorts listen on: CIDRs (comma-separated) or `primary`. Default: all node
    /// addresses.
    #[arg(long, value_name = "CIDR,...|primary", default_value = "")]
    pub nodeport_addresses: String,
    /// tcp, udp or sctp.
    #[arg(long, value_name = "PROTO")]
    pub protocol: Protocol,
    /// Client address, optionally with a port (default: samples use ports from 40000).
    #[arg(long, value_name = "IP[:PORT]")]
    pub source: String,
    /// Service address and port.
    #[arg(long, value_name = "IP:PORT")]
    pub destination: SocketAddrV4,
    /// Packets to send, each from a different source port; endpoints reached are collected.
    #[arg(long, default_value_t = 64)]
    pub samples: u32,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct TraceResult {
    pub verdict: &'static str,
    pub endpoints: Vec<String>,
    pub masquerade: bool,
    pub origin: &'static str,
    /// The service port the destination matched (`namespace/name:port`, or `namespace/name`
    /// for an unnamed port); `None`: no service has that address, port and protocol.
    pub service: Option<String>,
    /// Which of its addresses matched: ClusterIP, NodePort, LoadBalancer or externalIP.
    pub service_address: Option<&'static str>,
    #[serde(skip)]
    pub explanation: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Origin {
    Pod,
    Host,
    External,
}

fn parse_source(s: &str) -> Result<(Ipv4Addr, Option<u16>)> {
    if let Ok(a) = s.parse::<SocketAddrV4>() {
        return Ok((*a.ip(), Some(a.port())));
    }
    let ip = s
        .parse::<Ipv4Addr>()
        .with_context(|| format!("--source {s:?}: expected IP or IP:PORT"))?;
    Ok((ip, None))
}

/// Builds Ethernet + IPv4 + TCP SYN/UDP/SCTP common header with correct checksums.
fn packet(proto: Protocol, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    let ip = Ipv4::new(proto.number(), src.0, dst.0)
        .id(1)
        .dont_fragment();
    let l4 = match proto {
        Protocol::Tcp => packet::tcp(src.1, dst.1, 0x1000, 0, tcp_flags::SYN, &[]),
        Protocol::Udp => packet::udp(src.1, dst.1, b"trac"),
        Protocol::Sctp => packet::sctp(src.1, dst.1, 0, &[]),
    };
    let l4 = ip.with_checksum(l4);
    packet::ethernet([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], &ip.packet(&l4))
}

/// The objects to trace against: the manifests, or one list of each kind from the API server.
fn read_snapshot(args: &TraceArgs) -> Result<Snapshot> {
    if let Some(dir) = &args.manifests {
        return source::load_manifests(dir);
    }
    let kubeconfig = args.kubeconfig.as_deref();
    let timeout = Duration::from_secs(args.timeout.max(1));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut src = source::Source::select(
            None,
            kubeconfig,
            None,
            &args.node_name,
            Duration::from_millis(100),
        )
        .await?;
        tokio::time::timeout(timeout, src.next_snapshot())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "--kubeconfig: the API server did not list Services, EndpointSlices and \
                     Node {} within {timeout:?} (--timeout)",
                    args.node_name
                )
            })
    })
}

/// The service entry a packet to `dst` meets, as the datapath looks it up: pods and host
/// processes meet the internal-scope twin first. Returns (name, which address). Pure.
fn matched_service(
    state: &MapState,
    ids: &crate::serve::metrics::ServiceIds,
    dst: (Ipv4Addr, u16),
    protocol: Protocol,
    inside: bool,
) -> Option<(String, &'static str)> {
    use proxy_common::svc_flags;
    let key = ServiceKey::external(dst.0, dst.1, protocol);
    let ps = inside
        .then(|| state.services().get(&key.internal()))
        .flatten()
        .or_else(|| state.services().get(&key))?;
    let kind = [
        (svc_flags::CLUSTER_IP, "ClusterIP"),
        (svc_flags::NODE_PORT, "NodePort"),
        (svc_flags::LOAD_BALANCER, "LoadBalancer"),
        (svc_flags::EXTERNAL_IP, "externalIP"),
    ]
    .into_iter()
    .find(|(f, _)| ps.flags & f != 0)
    .map_or("?", |(_, k)| k);
    Some((ids.get(&ps.svc_id)?.entry_name(), kind))
}

pub fn trace(args: &TraceArgs) -> Result<TraceResult> {
    let (src_ip, src_port) = parse_source(&args.source)?;
    if args.samples == 0 {
        bail!("--samples must be at least 1");
    }
    let mut ctx = Context::new(args.node_name.clone());
    ctx.node_ips = args.node_ips.clone();
    ctx.cluster_cidr = args.cluster_cidr;
    ctx.masquerade_all = args.masquerade_all;
    ctx.nodeport_addresses = args.nodeport_addresses.clone();
    let snapshot = read_snapshot(args)?;
    let mut dp = Datapath::load(&LoadOptions::default())?;
    let mut state = MapState::default();
    let summary = {
        let mut maps = dp.lb_maps()?;
        sync::reconcile(&snapshot, &ctx, &mut state, &mut maps)?
    };
    // The hairpin source is the pod bridge's address; in a trace it only has to be a node
    // address distinct from the pods, so use the node's first address.
    dp.set_config(&ctx.node_config(&args.node_ips, args.node_ips.first().copied()))?;

    let origin = if ctx.cluster_cidr.is_set() && ctx.cluster_cidr.contains(src_ip) {
        Origin::Pod
    } else if args.node_ips.contains(&src_ip) || src_ip.is_loopback() {
        Origin::Host
    } else {
        Origin::External
    };
    let (prog, hook) = match origin {
        // Host processes are balanced at connect()/sendmsg() by the cgroup hooks, with the
        // same service lookup (internal scope) as pods: the pod program stands in for them,
        // and the backend always sees the node's address.
        Origin::Pod | Origin::Host => (
            programs::POD_INGRESS,
            "tc ingress on the pod's bridge port (lb_pod_in)",
        ),
        Origin::External => (
            programs::UPLINK_INGRESS,
            "XDP on the uplink (lb_up_xdp), then tc ingress on the uplink (lb_up_in)",
        ),
    };
    // From outside, packets meet the XDP fast path first and tc gets what XDP passes on.
    let xdp_first = origin == Origin::External;
    let (mut by_xdp, mut by_tc) = (0u32, 0u32);
    let dst = (*args.destination.ip(), args.destination.port());
    let matched = matched_service(
        &state,
        &summary.service_ids,
        dst,
        args.protocol,
        origin != Origin::External,
    );
    let mut explanation = vec![
        format!("objects skipped as invalid: {}", summary.rejected.len()),
        format!("origin: {origin:?} ({src_ip}), hook: {hook}"),
    ];
    let before = dp.counters()?;
    let node_ips: BTreeSet<Ipv4Addr> = args.node_ips.iter().copied().collect();
    let mut endpoints = BTreeSet::new();
    let (mut fwd, mut rej, mut drop, mut pass, mut masq) = (0u32, 0u32, 0u32, 0u32, false);
    for i in 0..args.samples {
        let sport = match src_port {
            Some(p) if i == 0 => p,
            Some(p) => p.wrapping_add(i as u16).max(1),
            None => 40000u16.wrapping_add(i as u16),
        };
        let mut pkt = packet(args.protocol, (src_ip, sport), dst);
        // A packet XDP translated carries its mark to tc, which passes it as it is.
        let mut tc_runs = true;
        if xdp_first {
            let r = datapath::xdp_test_run(dp.xdp_program(programs::UPLINK_XDP)?, &pkt, 1)?;
            if r.verdict != XDP_PASS {
                drop += 1;
                continue;
            }
            if r.translated() {
                by_xdp += 1;
                tc_runs = false;
            }
            pkt = r.frame;
        }
        let before_tc = packet::headers(&pkt).map(|o| o.dst);
        let (rc, out) = if tc_runs {
            let mut out = vec![0u8; pkt.len() + 256];
            let r = dp.program(prog)?.test_run(TestRunOptions {
                data_in: Some(&pkt),
                data_out: Some(&mut out),
                ..Default::default()
            })?;
            out.truncate(r.data_size_out as usize);
            (r.return_value, out)
        } else {
            (TC_ACT_OK, pkt)
        };
        let o = packet::headers(&out);
        match rc {
            TC_ACT_SHOT => drop += 1,
            TC_ACT_OK | TC_ACT_REDIRECT => match o {
                Some(o) if o.proto == 1 || (o.proto == 6 && o.tcp_flags & 0x04 != 0) => rej += 1,
                Some(o) if (o.dst.0, o.dst.1) != dst => {
                    fwd += 1;
                    if before_tc != Some(o.dst) {
                        by_tc += 1;
                    }
                    endpoints.insert(format!("{}:{}", o.dst.0, o.dst.1));
                    if node_ips.contains(&o.src.0) || o.src.0 != src_ip {
                        masq = true;
                    }
                }
                _ => pass += 1,
            },
            rc => bail!("unexpected program return code {rc}"),
        }
    }
    if origin == Origin::Host && fwd > 0 {
        masq = true;
    }
    if xdp_first && fwd > 0 {
        explanation.push(format!(
            "translated by XDP (lb_up_xdp): {by_xdp}, by tc (lb_up_in): {by_tc} of {fwd} \
             forwarded samples (XDP translates only established flows; each sample is a new \
             flow)"
        ));
    }
    let after = dp.counters()?;
    for (i, name) in counter::NAMES.iter().enumerate() {
        let d = after[i].saturating_sub(before[i]);
        if d > 0 {
            explanation.push(format!("counter {name}: +{d}"));
        }
    }
    let verdict = if fwd > 0 {
        "forward"
    } else if rej > 0 {
        "reject"
    } else if drop > 0 {
        "drop"
    } else {
        "pass"
    };
    if fwd + rej + drop > 0 && pass > 0 {
        explanation.push(format!(
            "{pass} of {} samples passed untouched",
            args.samples
        ));
    }
    Ok(TraceResult {
        verdict,
        endpoints: endpoints.into_iter().collect(),
        masquerade: masq,
        origin: match origin {
            Origin::Pod => "pod",
            Origin::Host => "host",
            Origin::External => "external",
        },
        service_address: matched.as_ref().map(|m| m.1),
        service: matched.map(|m| m.0),
        explanation,
    })
}

pub fn run(args: &TraceArgs) -> Result<()> {
    let r = trace(args)?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!(
        "{} {} -> {}: {}",
        args.protocol,
        args.source,
        args.destination,
        r.verdict.to_uppercase()
    );
    match (&r.service, r.service_address) {
        (Some(s), Some(a)) => println!("  service: {s} (its {a} address)"),
        _ => println!("  service: none has this address, port and protocol"),
    }
    if !r.endpoints.is_empty() {
        println!(
            "  endpoints reached over {} samples: {}",
            args.samples,
            r.endpoints.join(", ")
        );
    }
    println!(
        "  backend sees: {}",
        if r.masquerade {
            "a node address (masqueraded)"
        } else {
            "the client's address"
        }
    );
    for e in &r.explanation {
        println!("  {e}");
    }
    Ok(())
}
