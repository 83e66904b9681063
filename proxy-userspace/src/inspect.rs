//! `ebpf-proxy inspect` and `ebpf-proxy cleanup`: read what the agent pinned.
use std::{collections::BTreeMap, path::Path};

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use proxy_common::{Backend4, Ct4Key, Ct4Value, Svc4Key, Svc4Value, counter, maps};

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
    let ct: HashMap<MapData, Ct4Key, Ct4Value> =
        HashMap::try_from(Map::LruHashMap(open(pin_dir, maps::CT4)?))?;
    let cnt: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(open(pin_dir, maps::COUNTERS)?))?;

    let backends: BTreeMap<u32, Backend4> = be.iter().filter_map(Result::ok).collect();
    let entries: BTreeMap<(u32, u16, u8, u16), Svc4Value> = svc
        .iter()
        .filter_map(Result::ok)
        .map(|(k, v)| {
            (
                (
                    u32::from_be(k.addr_be),
                    u16::from_be(k.port_be),
                    k.proto,
                    k.slot,
                ),
                v,
            )
        })
        .collect();
    let mut services = Vec::new();
    for (&(addr, port, proto, slot), v) in &entries {
        if slot != 0 {
            continue;
        }
        let mut eps = Vec::new();
        for s in 1..=v.count {
            let ep = entries
                .get(&(addr, port, proto, s))
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
        services.push((
            format!("{}:{port}/{proto}", std::net::Ipv4Addr::from(addr)),
            v.svc_id,
            eps,
        ));
    }
    let counters: Vec<(&str, u64)> = counter::NAMES
        .iter()
        .enumerate()
        .map(|(i, n)| Ok((*n, cnt.get(&(i as u32), 0)?.iter().sum())))
        .collect::<Result<_>>()?;
    let flows = ct.keys().filter_map(Result::ok).count();
    if json {
        let v = serde_json::json!({
            "services": services.iter().map(|(s, id, eps)| serde_json::json!({"service": s, "id": id, "endpoints": eps})).collect::<Vec<_>>(),
            "conntrack_entries": flows,
            "counters": counters.iter().map(|(n, c)| (n.to_string(), *c)).collect::<BTreeMap<_, _>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("SERVICES ({})", services.len());
        for (s, id, eps) in &services {
            println!(
                "  {s:<28} id {id:<5} -> {}",
                if eps.is_empty() {
                    "(no endpoints)".into()
                } else {
                    eps.join(", ")
                }
            );
        }
        println!("CONNTRACK ENTRIES {flows}");
        println!("COUNTERS");
        for (n, c) in counters {
            println!("  {n:<24} {c}");
        }
    }
    Ok(())
}

/// Removes every pin the agent owns under `pin_dir`.
pub fn cleanup(pin_dir: &Path) -> Result<usize> {
    let mut removed = 0;
    for name in maps::ALL {
        let p = pin_dir.join(name);
        if p.exists() {
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            removed += 1;
        }
    }
    if pin_dir.exists() {
        let _ = std::fs::remove_dir(pin_dir);
    }
    Ok(removed)
}
