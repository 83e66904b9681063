//! `ebpf-proxy inspect`: read what the agent pinned (services, backends, counters, links).
use std::{collections::BTreeMap, path::Path};

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use proxy_common::{Backend4, Ct4Key, Svc4Key, Svc4Value, counter, maps};

use crate::abi;

fn open(dir: &Path, name: &str) -> Result<MapData> {
    let path = dir.join(name);
    MapData::from_pin(&path).with_context(|| {
        format!(
            "opening {} (is the agent running with this --bpffs?)",
            path.display()
        )
    })
}

/// Prints services with their backends, and the verdict counters.
pub fn inspect(pin_dir: &Path, json: bool) -> Result<()> {
    let svc: HashMap<MapData, Svc4Key, Svc4Value> =
        HashMap::try_from(Map::HashMap(open(pin_dir, maps::SVC4)?))?;
    let be: HashMap<MapData, u32, Backend4> =
        HashMap::try_from(Map::HashMap(open(pin_dir, maps::BACKEND4)?))?;
    let ct = crate::datapath::conntrack::CtTables::open_pinned(pin_dir).with_context(|| {
        format!(
            "opening the conntrack tables under {} (is the agent running with this --bpffs?)",
            pin_dir.display()
        )
    })?;
    let cnt: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(open(pin_dir, maps::COUNTERS)?))?;

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
    let mut services = Vec::new();
    for (&(addr, port, proto, scope, slot), v) in &entries {
        if slot != 0 {
            continue;
        }
        let mut eps = Vec::new();
        for s in 1..=v.count {
            let ep = entries
                .get(&(addr, port, proto, scope, s))
                .and_then(|sv| backends.get(&sv.backend_id))
                .map(|b| {
                    format!(
                        "{}:{}",
                        abi::addr_from_be(b.addr_be),
                        u16::from_be(b.port_be)
                    )
                })
                .unwrap_or_else(|| format!("<slot {s} missing>"));
            eps.push(ep);
        }
        let proto = abi::Protocol::from_number(proto)
            .map(|p| p.to_string())
            .unwrap_or_else(|| proto.to_string());
        // The internal-scope twin (externalTrafficPolicy Local short-circuit) is marked.
        let internal = if scope == proxy_common::scope::INTERNAL {
            " internal"
        } else {
            ""
        };
        services.push((
            format!(
                "{}:{port}/{proto}{internal}",
                std::net::Ipv4Addr::from(addr)
            ),
            v.svc_id,
            eps,
        ));
    }
    // Per-service packet counters (absent when the maps predate them).
    let svc_counts: BTreeMap<u32, proxy_common::SvcCounter> =
        crate::datapath::pinned_service_counters(pin_dir, services.iter().map(|(_, id, _)| *id))
            .map(|v| v.into_iter().collect())
            .unwrap_or_default();
    let counters: Vec<(&str, u64)> = counter::NAMES
        .iter()
        .enumerate()
        .map(|(i, n)| Ok((*n, cnt.get(&(i as u32), 0)?.iter().sum())))
        .collect::<Result<_>>()?;
    let conntrack = conntrack_summary(&ct.entries());
    let links: Vec<serde_json::Value> = crate::datapath::links::list_pinned(pin_dir)
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
        .collect();
    // The uplink hooks (tc ingress and the XDP fast path): bpftool shows neither TCX links
    // nor which XDP mode is ours, so say it here.
    let uplinks: Vec<serde_json::Value> = crate::datapath::uplinks::list_pinned(pin_dir)
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
        .collect();
    if json {
        let v = serde_json::json!({
            "uplinks": uplinks,
            "services": services.iter().map(|(s, id, eps)| {
                let c = svc_counts.get(id).copied().unwrap_or_default();
                serde_json::json!({"service": s, "id": id, "endpoints": eps, "packets": c.packets, "bytes": c.bytes})
            }).collect::<Vec<_>>(),
            "conntrack_entries": conntrack.entries,
            "conntrack": {
                "answered_entries": conntrack.answered,
                "unanswered_entries": conntrack.entries - conntrack.answered,
                "flows_by_state": conntrack.by_state.iter().map(|(s, n)| (s.name(), *n)).collect::<BTreeMap<_, _>>(),
            },
            "links": links,
            "counters": counters.iter().map(|(n, c)| (n.to_string(), *c)).collect::<BTreeMap<_, _>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("SERVICES ({})", services.len());
        for (s, id, eps) in &services {
            let c = svc_counts.get(id).copied().unwrap_or_default();
            println!(
                "  {s:<28} id {id:<6} pkts {:<10} bytes {:<12} -> {}",
                c.packets,
                c.bytes,
                if eps.is_empty() {
                    "(no endpoints)".into()
                } else {
                    eps.join(", ")
                }
            );
        }
        println!(
            "CONNTRACK ENTRIES {} ({} answered, {} unanswered; two per flow)",
            conntrack.entries,
            conntrack.answered,
            conntrack.entries - conntrack.answered
        );
        for (s, n) in &conntrack.by_state {
            println!("  {:<16} {n} flows", s.name());
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
    }
    Ok(())
}

/// Conntrack occupancy and flows per state (from their forward entries; the exhaustion
/// counters are among the COUNTERS).
struct CtSummary {
    entries: usize,
    answered: usize,
    by_state: BTreeMap<crate::conntrack::State, usize>,
}

fn conntrack_summary(all: &[crate::datapath::conntrack::CtEntry]) -> CtSummary {
    let by_key: BTreeMap<[u8; 16], &crate::datapath::conntrack::CtEntry> =
        all.iter().map(|e| (key_bytes(&e.key), e)).collect();
    let mut by_state = BTreeMap::new();
    for e in all
        .iter()
        .filter(|e| e.value.flags & proxy_common::ct_flags::FORWARD != 0)
    {
        let partner = by_key.get(&key_bytes(&e.key.partner(&e.value)));
        let flags = e.value.flags | partner.map_or(0, |p| p.value.flags);
        let answered = e.answered || partner.is_some_and(|p| p.answered);
        *by_state
            .entry(crate::conntrack::State::of(e.key.proto, flags, answered))
            .or_insert(0) += 1;
    }
    CtSummary {
        entries: all.len(),
        answered: all.iter().filter(|e| e.answered).count(),
        by_state,
    }
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
