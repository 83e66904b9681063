//! `ebpf-proxy inspect`: what the agent pinned (services, backends, conntrack, counters,
//! links), named and described by the agent's status file (service names and types,
//! endpoint states, version, configuration, last sync, health; see
//! [`crate::serve::status`]), with filters by service and address. `inspect status` shows
//! the agent itself.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use proxy_common::{Backend4, Ct4Key, Svc4Key, Svc4Value, counter, ct_flags, maps, programs};

use crate::{
    abi,
    datapath::{attach::Hook, conntrack::CtEntry, links::Direction, tcfilter},
    serve::{
        process,
        status::{self, AgentStatus, ServiceInfo},
    },
};

/// Options of `ebpf-proxy inspect`.
#[derive(clap::Args, Debug, Clone)]
pub struct InspectArgs {
    /// `status`: the agent's version and git revision, the map ABI versions pinned, its
    /// configuration, last sync and health. Without it: services, endpoints, conntrack,
    /// links and counters.
    #[arg(value_enum, value_name = "VIEW")]
    pub view: Option<View>,
    /// The bpffs directory the agent was started with.
    #[arg(long, default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Only this Service's entries, endpoints and flows: NAME (any namespace) or
    /// NAMESPACE/NAME. Names come from the agent's status file.
    #[arg(long, value_name = "[NAMESPACE/]NAME")]
    pub service: Option<String>,
    /// Only service entries with this address (service address or endpoint) and flows with
    /// it (client, service, endpoint or masquerade address).
    #[arg(long, value_name = "IP")]
    pub address: Option<Ipv4Addr>,
    /// Connections listed in the readable output (`--json` lists every one that matches).
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub flows: usize,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    Status,
}

fn open(dir: &Path, name: &str) -> Result<MapData> {
    let path = dir.join(name);
    MapData::from_pin(&path).with_context(|| {
        format!(
            "opening {} (is the agent running with this --bpffs?)",
            path.display()
        )
    })
}

/// The `--service` / `--address` filter. Pure.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// (namespace if given, name).
    pub service: Option<(Option<String>, String)>,
    pub address: Option<Ipv4Addr>,
}

impl Filter {
    pub fn new(service: Option<&str>, address: Option<Ipv4Addr>) -> Self {
        Self {
            service: service.map(|s| match s.split_once('/') {
                Some((ns, n)) => (Some(ns.to_owned()), n.to_owned()),
                None => (None, s.to_owned()),
            }),
            address,
        }
    }

    /// Whether the Service `namespace/name` passes the service filter.
    pub fn service_matches(&self, namespace: &str, name: &str) -> bool {
        match &self.service {
            None => true,
            Some((ns, n)) => n == name && ns.as_deref().is_none_or(|ns| ns == namespace),
        }
    }

    /// Whether a service entry passes: its Service (from its ID's name, `None` when
    /// unknown) and its addresses (the entry's and its endpoints').
    fn entry_matches(&self, e: &Entry, name: Option<&EntryName>) -> bool {
        if self.service.is_some()
            && !name.is_some_and(|n| self.service_matches(&n.namespace, &n.name))
        {
            return false;
        }
        self.address.is_none_or(|a| {
            e.addr == a
                || e.endpoints
                    .iter()
                    .any(|ep| ep.starts_with(&format!("{a}:")))
        })
    }

    fn flow_matches(&self, f: &Flow, name: Option<&EntryName>) -> bool {
        if self.service.is_some()
            && !name.is_some_and(|n| self.service_matches(&n.namespace, &n.name))
        {
            return false;
        }
        self.address.is_none_or(|a| {
            [Some(f.client), Some(f.service), f.backend, f.snat]
                .into_iter()
                .flatten()
                .any(|s| *s.ip() == a)
        })
    }
}

/// A service ID's name split (`namespace/name:port`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryName {
    pub namespace: String,
    pub name: String,
    pub port: String,
}

impl EntryName {
    pub fn parse(s: &str) -> Self {
        let (namespace, name, port) = crate::serve::metrics::split_entry_name(s);
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            port: port.to_owned(),
        }
    }
}

/// One programmed service entry (address, port, protocol, scope) and its endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    addr: Ipv4Addr,
    port: u16,
    proto: String,
    internal: bool,
    id: u32,
    endpoints: Vec<String>,
}

impl Entry {
    /// `inspect`'s name of the entry (`ip:port/PROTO`, ` internal` for the internal twin).
    fn label(&self) -> String {
        format!(
            "{}:{}/{}{}",
            self.addr,
            self.port,
            self.proto,
            if self.internal { " internal" } else { "" }
        )
    }
}

/// One connection of the conntrack tables, from its forward entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub protocol: String,
    pub client: SocketAddrV4,
    /// The address the client connected to.
    pub service: SocketAddrV4,
    /// Where the datapath sends it (`None`: not translated, e.g. a fragment entry).
    pub backend: Option<SocketAddrV4>,
    /// The masquerade source, when the flow is source-translated.
    pub snat: Option<SocketAddrV4>,
    pub state: crate::conntrack::State,
    pub answered: bool,
    pub svc_id: u32,
    /// Seconds since the flow's last packet (forward or reply).
    pub idle_s: u64,
}

fn key_bytes(k: &Ct4Key) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&k.saddr_be.to_ne_bytes());
    b[4..8].copy_from_slice(&k.daddr_be.to_ne_bytes());
    b[8..10].copy_from_slice(&k.sport_be.to_ne_bytes());
    b[10..12].copy_from_slice(&k.dport_be.to_ne_bytes());
    b[12] = k.proto;
    b
}

/// The connections of the conntrack entries (one per forward entry, with its partner's
/// flags and last packet), sorted by client. `now_ns`: the monotonic clock. Pure.
pub fn flows(all: &[CtEntry], now_ns: u64) -> Vec<Flow> {
    let by_key: BTreeMap<[u8; 16], &CtEntry> = all.iter().map(|e| (key_bytes(&e.key), e)).collect();
    let sock = |a: u32, p: u16| SocketAddrV4::new(abi::addr_from_be(a), u16::from_be(p));
    let mut out: Vec<Flow> = all
        .iter()
        .filter(|e| e.value.flags & ct_flags::FORWARD != 0)
        .map(|e| {
            let partner = by_key.get(&key_bytes(&e.key.partner(&e.value)));
            let flags = e.value.flags | partner.map_or(0, |p| p.value.flags);
            let answered = e.answered || partner.is_some_and(|p| p.answered);
            let last = e
                .value
                .last_seen_ns
                .max(partner.map_or(0, |p| p.value.last_seen_ns));
            let v = &e.value;
            Flow {
                protocol: abi::Protocol::from_number(e.key.proto)
                    .map_or_else(|| e.key.proto.to_string(), |p| p.to_string()),
                client: sock(e.key.saddr_be, e.key.sport_be),
                service: sock(e.key.daddr_be, e.key.dport_be),
                backend: (v.flags & ct_flags::DNAT != 0)
                    .then(|| sock(v.dst_addr_be, v.dst_port_be)),
                snat: (v.flags & ct_flags::SNAT != 0).then(|| sock(v.src_addr_be, v.src_port_be)),
                state: crate::conntrack::State::of(e.key.proto, flags, answered),
                answered,
                svc_id: v.svc_id,
                idle_s: now_ns.saturating_sub(last) / 1_000_000_000,
            }
        })
        .collect();
    out.sort_by_key(|f| (f.client, f.service));
    out
}

/// Conntrack occupancy: (entries, answered entries, flows per state).
fn conntrack_summary(
    all: &[CtEntry],
    flows: &[Flow],
) -> (usize, usize, BTreeMap<crate::conntrack::State, usize>) {
    let mut by_state = BTreeMap::new();
    for f in flows {
        *by_state.entry(f.state).or_insert(0) += 1;
    }
    (
        all.len(),
        all.iter().filter(|e| e.answered).count(),
        by_state,
    )
}

/// Reads the programmed service entries with their endpoints.
fn read_entries(pin_dir: &Path) -> Result<Vec<Entry>> {
    let svc: HashMap<MapData, Svc4Key, Svc4Value> =
        HashMap::try_from(Map::HashMap(open(pin_dir, maps::SVC4)?))?;
    let be: HashMap<MapData, u32, Backend4> =
        HashMap::try_from(Map::HashMap(open(pin_dir, maps::BACKEND4)?))?;
    let backends: BTreeMap<u32, Backend4> = be.iter().filter_map(Result::ok).collect();
    let entries: BTreeMap<(u32, u16, u8, u8, u16), Svc4Value> = svc
        .iter()
        .filter_map(Result::ok)
        .map(|(k, v)| {
            (
                (
                    u32::from_be(k.addr_be),
                    u16::from_be(k.port_be),
                    k.proto,
                    k.scope,
                    k.slot,
                ),
                v,
            )
        })
        .collect();
    let mut out = Vec::new();
    for (&(addr, port, proto, scope, slot), v) in &entries {
        if slot != 0 {
            continue;
        }
        let endpoints = (1..=v.count)
            .map(|s| {
                entries
                    .get(&(addr, port, proto, scope, s))
                    .and_then(|sv| backends.get(&sv.backend_id))
                    .map(|b| {
                        format!(
                            "{}:{}",
                            abi::addr_from_be(b.addr_be),
                            u16::from_be(b.port_be)
                        )
                    })
                    .unwrap_or_else(|| format!("<slot {s} missing>"))
            })
            .collect();
        out.push(Entry {
            addr: Ipv4Addr::from(addr),
            port,
            proto: abi::Protocol::from_number(proto)
                .map_or_else(|| proto.to_string(), |p| p.to_string()),
            // The internal-scope twin (externalTrafficPolicy Local short-circuit) is marked.
            internal: scope == proxy_common::scope::INTERNAL,
            id: v.svc_id,
            endpoints,
        });
    }
    Ok(out)
}

/// The agent's status file, with a warning on stderr when there is none.
fn agent_status(bpffs: &Path) -> Option<AgentStatus> {
    match status::read(bpffs) {
        Ok(Some(s)) => Some(s),
        Ok(None) => {
            eprintln!(
                "note: no status file {} (no agent has synced with this --bpffs here, or it \
                 runs in another container): no service names, types or endpoint states",
                status::status_path(bpffs).display()
            );
            None
        }
        Err(e) => {
            eprintln!("note: {e:#}");
            None
        }
    }
}

/// `ebpf-proxy inspect [status]`.
pub fn run(args: &InspectArgs) -> Result<()> {
    let pin_dir = crate::datapath::pin_dir(&args.bpffs);
    match args.view {
        Some(View::Status) => show_status(&args.bpffs, &pin_dir, args.json),
        None => inspect(&args.bpffs, &pin_dir, args),
    }
}

fn inspect(bpffs: &Path, pin_dir: &Path, args: &InspectArgs) -> Result<()> {
    let filter = Filter::new(args.service.as_deref(), args.address);
    let entries = read_entries(pin_dir)?;
    let ct = crate::datapath::conntrack::CtTables::open_pinned(pin_dir).with_context(|| {
        format!(
            "opening the conntrack tables under {} (is the agent running with this --bpffs?)",
            pin_dir.display()
        )
    })?;
    let cnt: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(open(pin_dir, maps::COUNTERS)?))?;
    let st = agent_status(bpffs);
    let names: BTreeMap<u32, EntryName> = st
        .iter()
        .flat_map(|s| &s.service_ids)
        .map(|(id, n)| (*id, EntryName::parse(n)))
        .collect();
    let objects: BTreeMap<(String, String), &ServiceInfo> = st
        .iter()
        .flat_map(|s| &s.services)
        .map(|s| ((s.namespace.clone(), s.name.clone()), s))
        .collect();
    let object_of = |n: Option<&EntryName>| {
        n.and_then(|n| objects.get(&(n.namespace.clone(), n.name.clone())).copied())
    };

    let services: Vec<&Entry> = entries
        .iter()
        .filter(|e| filter.entry_matches(e, names.get(&e.id)))
        .collect();
    // Per-service packet counters (absent when the maps predate them).
    let svc_counts: BTreeMap<u32, proxy_common::SvcCounter> =
        crate::datapath::pinned_service_counters(pin_dir, services.iter().map(|e| e.id))
            .map(|v| v.into_iter().collect())
            .unwrap_or_default();
    let counters: Vec<(&str, u64)> = counter::NAMES
        .iter()
        .enumerate()
        .map(|(i, n)| Ok((*n, cnt.get(&(i as u32), 0)?.iter().sum())))
        .collect::<Result<_>>()?;
    let all_ct = ct.entries();
    let all_flows = flows(&all_ct, crate::datapath::conntrack::monotonic_ns());
    let (ct_entries, ct_answered, by_state) = conntrack_summary(&all_ct, &all_flows);
    let flows: Vec<&Flow> = all_flows
        .iter()
        .filter(|f| filter.flow_matches(f, names.get(&f.svc_id)))
        .collect();
    // The Service objects shown: those of the listed entries, or every one that matches.
    let shown_objects: Vec<&ServiceInfo> = objects
        .values()
        .copied()
        .filter(|o| filter.service_matches(&o.namespace, &o.name))
        .filter(|o| {
            filter.address.is_none()
                || services.iter().any(|e| {
                    names
                        .get(&e.id)
                        .is_some_and(|n| n.namespace == o.namespace && n.name == o.name)
                })
        })
        .collect();
    let links = pinned_links(pin_dir)?;
    let uplinks = pinned_uplinks(pin_dir)?;
    if args.json {
        let entry_json = |e: &Entry| {
            let c = svc_counts.get(&e.id).copied().unwrap_or_default();
            let n = names.get(&e.id);
            let o = object_of(n);
            serde_json::json!({
                "service": e.label(),
                "id": e.id,
                "endpoints": e.endpoints,
                "packets": c.packets,
                "bytes": c.bytes,
                "namespace": n.map(|n| &n.namespace),
                "name": n.map(|n| &n.name),
                "port_name": n.map(|n| &n.port),
                "type": o.map(|o| &o.type_),
                "endpoint_states": e.endpoints.iter().map(|ep| {
                    let info = o.and_then(|o| endpoint_info(o, ep));
                    serde_json::json!({
                        "endpoint": ep,
                        "state": info.map(|i| i.state()),
                        "node": info.map(|i| &i.node),
                    })
                }).collect::<Vec<_>>(),
            })
        };
        let v = serde_json::json!({
            "uplinks": uplinks,
            "services": services.iter().map(|e| entry_json(e)).collect::<Vec<_>>(),
            "service_objects": shown_objects,
            "conntrack_entries": ct_entries,
            "conntrack": {
                "answered_entries": ct_answered,
                "unanswered_entries": ct_entries - ct_answered,
                "flows_by_state": by_state.iter().map(|(s, n)| (s.name(), *n)).collect::<BTreeMap<_, _>>(),
            },
            "flows": flows.iter().map(|f| flow_json(f, names.get(&f.svc_id))).collect::<Vec<_>>(),
            "links": links,
            "counters": counters.iter().map(|(n, c)| (n.to_string(), *c)).collect::<BTreeMap<_, _>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("SERVICES ({} entries)", services.len());
    let mut by_name: BTreeMap<Option<(String, String, String)>, Vec<&Entry>> = BTreeMap::new();
    for e in &services {
        let key = names
            .get(&e.id)
            .map(|n| (n.namespace.clone(), n.name.clone(), n.port.clone()));
        by_name.entry(key).or_default().push(e);
    }
    for (key, es) in &by_name {
        match key {
            Some((ns, name, port)) => {
                let o = objects.get(&(ns.clone(), name.clone()));
                println!(
                    "  {ns}/{name}{}{} ({})",
                    if port.is_empty() { "" } else { ":" },
                    port,
                    o.map_or("?", |o| o.type_.as_str())
                );
            }
            None => println!("  (no name: not in the agent's status file)"),
        }
        for e in es {
            let c = svc_counts.get(&e.id).copied().unwrap_or_default();
            println!(
                "    {:<28} id {:<6} pkts {:<10} bytes {:<12} -> {}",
                e.label(),
                e.id,
                c.packets,
                c.bytes,
                if e.endpoints.is_empty() {
                    "(no endpoints)".into()
                } else {
                    e.endpoints.join(", ")
                }
            );
        }
    }
    if !shown_objects.is_empty() {
        println!("ENDPOINTS (from the EndpointSlices of the last sync)");
        for o in &shown_objects {
            let eps: Vec<String> = o
                .endpoints
                .iter()
                .map(|e| {
                    format!(
                        "{} ({}) {}",
                        e.addresses.join(","),
                        if e.node.is_empty() {
                            "no node"
                        } else {
                            &e.node
                        },
                        e.state()
                    )
                })
                .collect();
            println!(
                "  {}/{} {} eTP {} iTP {}: {}",
                o.namespace,
                o.name,
                o.type_,
                o.external_traffic_policy,
                o.internal_traffic_policy,
                if eps.is_empty() {
                    "(none)".to_owned()
                } else {
                    eps.join(", ")
                }
            );
        }
    }
    println!(
        "CONNTRACK ENTRIES {ct_entries} ({ct_answered} answered, {} unanswered; two per flow)",
        ct_entries - ct_answered
    );
    for (s, n) in &by_state {
        println!("  {:<16} {n} flows", s.name());
    }
    println!(
        "FLOWS ({} of {} matching; --flows N lists more)",
        flows.len().min(args.flows),
        flows.len()
    );
    for f in flows.iter().take(args.flows) {
        println!("  {}", flow_line(f, names.get(&f.svc_id)));
    }
    println!(
        "LINKS ({}, pinned under {})",
        links.len(),
        crate::datapath::links::links_dir(pin_dir).display()
    );
    for l in &links {
        print_link(l, l["direction"].as_str().unwrap_or(""), 4);
    }
    println!("UPLINKS ({})", uplinks.len());
    for l in &uplinks {
        print_link(l, l["hook"].as_str().unwrap_or("?"), 14);
    }
    println!("COUNTERS");
    let width = counters.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    for (n, c) in counters {
        println!("  {n:<width$} {c}");
    }
    Ok(())
}

/// The catalogue's endpoint of `ep` (`ip:port`), by address.
fn endpoint_info<'a>(o: &'a ServiceInfo, ep: &str) -> Option<&'a status::EndpointInfo> {
    let ip = ep.split(':').next()?;
    o.endpoints
        .iter()
        .find(|e| e.addresses.iter().any(|a| a == ip))
}

fn flow_json(f: &Flow, name: Option<&EntryName>) -> serde_json::Value {
    serde_json::json!({
        "protocol": f.protocol,
        "client": f.client.to_string(),
        "service": f.service.to_string(),
        "backend": f.backend.map(|b| b.to_string()),
        "masquerade": f.snat.map(|s| s.to_string()),
        "state": f.state.name(),
        "answered": f.answered,
        "id": f.svc_id,
        "service_name": name.map(|n| format!("{}/{}", n.namespace, n.name)),
        "idle_seconds": f.idle_s,
    })
}

/// One flow of the readable listing. Pure.
fn flow_line(f: &Flow, name: Option<&EntryName>) -> String {
    format!(
        "{} {} -> {}{}{} {} idle {}s{}",
        f.protocol,
        f.client,
        f.service,
        f.backend.map(|b| format!(" => {b}")).unwrap_or_default(),
        f.snat
            .map(|s| format!(" (masquerade {s})"))
            .unwrap_or_default(),
        f.state.name(),
        f.idle_s,
        name.map(|n| format!(" {}/{}", n.namespace, n.name))
            .unwrap_or_default()
    )
}

fn pinned_links(pin_dir: &Path) -> Result<Vec<serde_json::Value>> {
    Ok(crate::datapath::links::list_pinned(pin_dir)
        .with_context(|| {
            format!(
                "listing {}",
                crate::datapath::links::links_dir(pin_dir).display()
            )
        })?
        .iter()
        .map(|l| {
            let role = ("direction", Some(l.dir.suffix().to_owned()));
            link_json(&l.path, &l.ifname, l.ifindex, role, l.is_live(), l.info)
        })
        .chain(netlink_filters(
            &[programs::POD_INGRESS, programs::POD_EGRESS],
            |d| ("direction", Some(d.suffix().to_owned())),
        ))
        .collect())
}

/// Our netlink tc filters (`--tc-attach=netlink`), listed with the pinned links: no pin and
/// no link id (`link_id` null, `tc_filter` says where it sits), always attached.
fn netlink_filters(
    names: &[&str],
    role: impl Fn(Direction) -> (&'static str, Option<String>),
) -> Vec<serde_json::Value> {
    let Ok(found) = tcfilter::list_all_ours(names) else {
        return Vec::new();
    };
    found
        .into_iter()
        .map(|(ifindex, ifname, d, f)| {
            let mut v = serde_json::json!({
                "pin": null,
                "interface": ifname,
                "ifindex": ifindex,
                "attached": true,
                "link_id": null,
                "prog_id": f.prog_id,
                "tc_filter": format!("prio {} handle {:#x} bpf {}", f.prio, f.handle, f.name),
            });
            let (k, val) = role(d);
            v[k] = serde_json::json!(val);
            v
        })
        .collect()
}

/// The uplink hooks (tc ingress and the XDP fast path): bpftool shows neither TCX links
/// nor which XDP mode is ours, so say it here.
fn pinned_uplinks(pin_dir: &Path) -> Result<Vec<serde_json::Value>> {
    Ok(crate::datapath::uplinks::list_pinned(pin_dir)
        .with_context(|| {
            format!(
                "listing {}",
                crate::datapath::uplinks::uplinks_dir(pin_dir).display()
            )
        })?
        .iter()
        .map(|l| {
            let role = ("hook", l.hook.map(|h| h.to_string()));
            link_json(&l.path, &l.ifname, l.ifindex, role, l.is_live(), l.info)
        })
        .chain(netlink_filters(&[programs::UPLINK_INGRESS], |d| {
            ("hook", Some(Hook::Tc(d).to_string()))
        }))
        .collect())
}

/// `inspect status`: the agent (from its status file) and the pins it left.
fn show_status(bpffs: &Path, pin_dir: &Path, json: bool) -> Result<()> {
    let st = agent_status(bpffs);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let running = st
        .as_ref()
        .is_some_and(|s| Path::new(&format!("/proc/{}", s.pid)).exists());
    // The maps the agent uses, and whether each is pinned.
    let pinned: BTreeMap<String, Option<u32>> = match &st {
        Some(s) => s
            .maps
            .iter()
            .map(|(name, max)| (name.clone(), pin_dir.join(name).exists().then_some(*max)))
            .collect(),
        None => maps::ALL
            .iter()
            .map(|n| ((*n).to_owned(), pin_dir.join(n).exists().then_some(0)))
            .collect(),
    };
    let links = pinned_links(pin_dir).unwrap_or_default();
    let uplinks = pinned_uplinks(pin_dir).unwrap_or_default();
    let attached = |v: &[serde_json::Value]| v.iter().filter(|l| l["attached"] == true).count();
    if json {
        let v = serde_json::json!({
            "inspect": {"version": process::VERSION, "git_revision": process::GIT_REVISION},
            "status_file": status::status_path(bpffs),
            "agent": st,
            "agent_running": running,
            "last_sync_age_seconds": st.as_ref().filter(|s| s.last_sync_unix > 0.0).map(|s| (now - s.last_sync_unix).max(0.0)),
            "pinned_maps": pinned.iter().map(|(n, p)| (n.clone(), p.is_some())).collect::<BTreeMap<_, _>>(),
            "links": {"pinned": links.len(), "attached": attached(&links)},
            "uplinks": {"pinned": uplinks.len(), "attached": attached(&uplinks)},
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "INSPECT {} (git {})",
        process::VERSION,
        process::GIT_REVISION
    );
    match &st {
        Some(s) => {
            println!(
                "AGENT {} (git {}, {}), pid {} ({}), node {}",
                s.version,
                s.git_revision,
                s.rustc,
                s.pid,
                if running { "running" } else { "not running" },
                s.node_name
            );
            println!(
                "LAST SYNC {} ({:.0} s ago)",
                s.last_sync,
                (now - s.last_sync_unix).max(0.0)
            );
            println!(
                "HEALTH at the last sync: {}{}",
                if s.health.healthy {
                    "healthy".to_owned()
                } else {
                    format!("unhealthy: {}", s.health.reason)
                },
                if s.health.node_eligible {
                    ""
                } else {
                    ", node not eligible (being deleted)"
                }
            );
            println!(
                "SERVICES {} objects, {} programmed service IDs",
                s.services.len(),
                s.service_ids.len()
            );
            println!("CONFIG");
            let w = s.config.keys().map(String::len).max().unwrap_or(0);
            for (k, v) in &s.config {
                println!("  {k:<w$} {v}");
            }
        }
        None => println!("AGENT unknown (no status file)"),
    }
    println!(
        "MAPS (ABI version in the name; pinned under {})",
        pin_dir.display()
    );
    for (name, p) in &pinned {
        match p {
            Some(max) if *max > 0 => println!("  {name:<14} pinned, max entries {max}"),
            Some(_) => println!("  {name:<14} pinned"),
            None => println!("  {name:<14} NOT PINNED"),
        }
    }
    println!(
        "LINKS {} pinned, {} attached; UPLINKS {} pinned, {} attached",
        links.len(),
        attached(&links),
        uplinks.len(),
        attached(&uplinks)
    );
    Ok(())
}

/// One pinned link of `inspect`'s readable output; `hook` is its direction or hook name.
fn print_link(l: &serde_json::Value, hook: &str, hook_width: usize) {
    println!(
        "  {:<16} ifindex {:<5} {hook:<hook_width$} {} link {} prog {}",
        l["interface"].as_str().unwrap_or(""),
        l["ifindex"],
        if l["attached"] == true {
            "attached"
        } else {
            "DEFUNCT "
        },
        l["link_id"],
        l["prog_id"],
    );
}

/// One pinned link (pod port or uplink) as `inspect --json` lists it; `role` is its
/// direction or hook.
fn link_json(
    pin: &Path,
    ifname: &str,
    ifindex: u32,
    role: (&str, Option<String>),
    attached: bool,
    info: Option<crate::datapath::links::LinkInfo>,
) -> serde_json::Value {
    let mut v = serde_json::json!({
        "pin": pin.file_name().map(|n| n.to_string_lossy().into_owned()),
        "interface": ifname,
        "ifindex": ifindex,
        "attached": attached,
        "link_id": info.map(|i| i.id),
        "prog_id": info.map(|i| i.prog_id),
    });
    v[role.0] = serde_json::json!(role.1);
    v
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proxy_common::Ct4Value;

    use super::*;

    fn be(a: [u8; 4]) -> u32 {
        abi::addr_be(Ipv4Addr::from(a))
    }

    #[test]
    fn flows_from_entry_pairs() {
        // Client 10.76.0.5:40000 -> 10.96.0.10:80, DNAT to 10.76.1.7:9376, masqueraded to
        // 10.240.0.11:61000; the reply entry is keyed by the backend's tuple.
        let key = Ct4Key::new(
            be([10, 76, 0, 5]),
            be([10, 96, 0, 10]),
            40000u16.to_be(),
            80u16.to_be(),
            6,
        );
        let fwd = Ct4Value {
            src_addr_be: be([10, 240, 0, 11]),
            src_port_be: 61000u16.to_be(),
            dst_addr_be: be([10, 76, 1, 7]),
            dst_port_be: 9376u16.to_be(),
            flags: ct_flags::FORWARD | ct_flags::DNAT | ct_flags::SNAT | ct_flags::MASQUERADED,
            svc_id: 4,
            last_seen_ns: 5_000_000_000,
            ..Default::default()
        };
        let rkey = Ct4Key::new(
            be([10, 76, 1, 7]),
            be([10, 240, 0, 11]),
            9376u16.to_be(),
            61000u16.to_be(),
            6,
        );
        let rev = Ct4Value {
            flags: ct_flags::REPLY | ct_flags::SNAT | ct_flags::DNAT,
            last_seen_ns: 8_000_000_000,
            ..Default::default()
        };
        assert_eq!(
            key.partner(&fwd),
            rkey,
            "the fixture's reply key is its partner"
        );
        let all = [
            CtEntry {
                key,
                value: fwd,
                answered: true,
            },
            CtEntry {
                key: rkey,
                value: rev,
                answered: true,
            },
        ];
        let f = flows(&all, 10_000_000_000);
        assert_eq!(f.len(), 1, "one flow per forward entry");
        let f = &f[0];
        assert_eq!(f.client.to_string(), "10.76.0.5:40000");
        assert_eq!(f.service.to_string(), "10.96.0.10:80");
        assert_eq!(f.backend.unwrap().to_string(), "10.76.1.7:9376");
        assert_eq!(f.snat.unwrap().to_string(), "10.240.0.11:61000");
        assert_eq!(f.state, crate::conntrack::State::TcpEstablished);
        assert_eq!(f.idle_s, 2, "from the later of the two entries");
        let web = EntryName::parse("default/web:http");
        assert_eq!(
            flow_line(f, Some(&web)),
            "TCP 10.76.0.5:40000 -> 10.96.0.10:80 => 10.76.1.7:9376 (masquerade \
             10.240.0.11:61000) tcp_established idle 2s default/web"
        );

        // Filters: by service name (with or without namespace) and by any of the addresses.
        let other = EntryName::parse("kube-system/dns");
        for (filter, name, want) in [
            (Filter::new(Some("web"), None), Some(&web), true),
            (Filter::new(Some("default/web"), None), Some(&web), true),
            (Filter::new(Some("other/web"), None), Some(&web), false),
            (Filter::new(Some("web"), None), Some(&other), false),
            (Filter::new(Some("web"), None), None, false),
            (
                Filter::new(None, Some(Ipv4Addr::new(10, 240, 0, 11))),
                None,
                true,
            ),
            (
                Filter::new(None, Some(Ipv4Addr::new(10, 76, 1, 7))),
                None,
                true,
            ),
            (
                Filter::new(None, Some(Ipv4Addr::new(10, 76, 1, 8))),
                None,
                false,
            ),
            (Filter::default(), None, true),
        ] {
            assert_eq!(filter.flow_matches(f, name), want, "{filter:?} {name:?}");
        }
        let e = Entry {
            addr: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            proto: "TCP".into(),
            internal: false,
            id: 4,
            endpoints: vec!["10.76.1.7:9376".into()],
        };
        assert_eq!(e.label(), "10.96.0.10:80/TCP");
        let f = |ip: [u8; 4]| Filter::new(None, Some(Ipv4Addr::from(ip)));
        assert!(f([10, 96, 0, 10]).entry_matches(&e, None));
        assert!(f([10, 76, 1, 7]).entry_matches(&e, None));
        assert!(
            !f([10, 76, 1, 70]).entry_matches(&e, None),
            "not a prefix match"
        );
        assert!(Filter::new(Some("web"), None).entry_matches(&e, Some(&web)));
    }
}
