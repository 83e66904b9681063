//! `cargo xtask demo` and `cargo xtask lab ...`.
use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use proxy_lab::{
    cluster::{
        Binaries, CLUSTER_IP, Cluster, Endpoint, SERVICE_PORT, demo_manifests_dir,
        hostnames_endpoints,
    },
    lab::{self, Lab, LabSpec, Topology},
};

pub enum LabAction {
    Up(Option<String>, Option<Topology>),
    Down(Option<String>),
    Status,
}

pub fn lab_cli(a: LabAction) -> Result<()> {
    match a {
        LabAction::Up(name, topology) => {
            let spec = spec(topology);
            let mut l = Lab::up(name.as_deref(), &spec)?;
            l.set_keep(true);
            println!("lab {} is up ({} topology):", l.prefix(), spec.topology);
            println!("{}", lab::status(l.prefix())?);
            println!(
                "pods: {}",
                l.state()
                    .pods
                    .iter()
                    .map(|p| format!("{} {} (node{})", p.name, p.ip, p.node))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            println!(
                "bpffs per node: {} {}",
                l.bpffs(1).display(),
                l.bpffs(2).display()
            );
            println!("tear down with: cargo xtask lab down --name {}", l.prefix());
        }
        LabAction::Down(name) => {
            let names: Vec<String> = match name {
                Some(n) => vec![n],
                None => lab::list_labs()?.into_iter().map(|s| s.prefix).collect(),
            };
            if names.is_empty() {
                println!("no labs");
            }
            for n in names {
                lab::down_by_prefix(&n)?;
                println!("lab {n} torn down");
            }
        }
        LabAction::Status => {
            let labs = lab::list_labs()?;
            if labs.is_empty() {
                println!("no labs");
            }
            for s in labs {
                println!("{s}");
            }
        }
    }
    Ok(())
}

fn step(t0: Instant, msg: &str) {
    println!("[{:>5.1}s] {msg}", t0.elapsed().as_secs_f64());
}

fn show_round(c: &Cluster, n: u32) -> Result<()> {
    let target = format!("{CLUSTER_IP}:{SERVICE_PORT}");
    let p = c.probe("client", &target, false, n)?;
    println!(
        "         {} of {} TCP connections to {target} answered",
        p.ok(),
        p.sent()
    );
    for (pod, k) in p.answers() {
        let bar = "#".repeat(((k * 50) / n.max(1) as u64) as usize);
        println!("         {pod:<14} {k:>4}  {bar}");
    }
    let srcs: Vec<String> = p
        .reply_sources()
        .into_iter()
        .map(|(s, k)| format!("{s} ({k})"))
        .collect();
    println!("         replies came from: {}", srcs.join(", "));
    if !p.failures().is_empty() {
        println!("         failures: {:?}", p.failures());
    }
    Ok(())
}

/// `bpftool map show` and the first entry of `bpftool map dump` verbatim, then every entry on
/// one line with the network-order fields decoded.
fn show_bpftool_dump(pin: &Path) -> Result<()> {
    let show = Command::new("bpftool")
        .args(["map", "show", "pinned"])
        .arg(pin)
        .output()
        .context("running bpftool")?;
    for line in String::from_utf8_lossy(&show.stdout).lines() {
        println!("         {line}");
    }
    let dump = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(pin)
        .output()?;
    let v: serde_json::Value =
        serde_json::from_slice(&dump.stdout).context("parsing bpftool -j output")?;
    let entries = v.as_array().cloned().unwrap_or_default();
    if let Some(first) = entries.first() {
        println!("         first entry, as bpftool prints it (BTF field names):");
        let first = first.get("formatted").unwrap_or(first);
        for line in serde_json::to_string_pretty(first)?.lines() {
            println!("           {line}");
        }
    }
    println!(
        "         all {} entries (addr_be/port_be decoded from network order):",
        entries.len()
    );
    let mut lines: Vec<String> = entries
        .iter()
        .map(|e| {
            // `bpftool -j` puts the BTF-decoded view under "formatted".
            let e = if e.get("formatted").is_some() {
                &e["formatted"]
            } else {
                e
            };
            let k = &e["key"];
            let val = &e["value"];
            let addr = k["addr_be"]
                .as_u64()
                .map(|a| std::net::Ipv4Addr::from((a as u32).to_ne_bytes()).to_string())
                .unwrap_or_default();
            let port = k["port_be"]
                .as_u64()
                .map(|p| u16::from_be(p as u16))
                .unwrap_or(0);
            let proto = if k["proto"] == 6 {
                "TCP"
            } else if k["proto"] == 17 {
                "UDP"
            } else {
                "?"
            };
            let slot = k["slot"].as_u64().unwrap_or(0);
            if slot == 0 {
                format!(
                    "{addr}:{port}/{proto} slot 0 -> service id {} with {} backends",
                    val["svc_id"], val["count"]
                )
            } else {
                format!(
                    "{addr}:{port}/{proto} slot {slot} -> backend id {}",
                    val["backend_id"]
                )
            }
        })
        .collect();
    lines.sort();
    for l in lines {
        println!("           {l}");
    }
    Ok(())
}

/// The demo's pods on `topology` (default: EBPF_PROXY_LAB_TOPOLOGY, else bridge).
fn spec(topology: Option<Topology>) -> LabSpec {
    let mut spec = LabSpec::default_demo();
    if let Some(t) = topology {
        spec.topology = t;
    }
    spec
}

pub fn demo(bins: &Binaries, connections: u32, topology: Option<Topology>) -> Result<()> {
    let t0 = Instant::now();
    let spec = spec(topology);
    let eps = hostnames_endpoints(&spec);
    let say = |m: &str| step(t0, m);
    let c = Cluster::up_from(bins, &spec, &eps, Some(&demo_manifests_dir()), &say)?;
    step(
        t0,
        &format!(
            "service default/hostnames: ClusterIP {CLUSTER_IP}:{SERVICE_PORT} -> {}",
            eps.iter()
                .map(|e| format!("{} {} (node{})", e.pod, e.ip, e.node))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    step(
        t0,
        &format!(
            "{connections} connections from pod `client` (10.76.0.20, node1) to the ClusterIP:"
        ),
    );
    show_round(&c, connections)?;

    let svc_pin = c.lab.bpffs(1).join("ebpf-proxy/LB4_SVC_V2");
    step(
        t0,
        &format!(
            "node1's service map: bpftool map show/dump pinned {}",
            svc_pin.display()
        ),
    );
    show_bpftool_dump(&svc_pin)?;
    step(t0, "ebpf-proxy inspect on node1:");
    let out = Command::new(&c.bins.agent)
        .args(["inspect", "--bpffs"])
        .arg(c.lab.bpffs(1))
        .output()?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("         {line}");
    }

    let keep: Vec<Endpoint> = eps.iter().filter(|e| e.node == 2).cloned().collect();
    step(
        t0,
        &format!(
            "scaling to 1 endpoint: rewriting the EndpointSlice to only {}",
            keep[0].pod
        ),
    );
    c.set_endpoints(&keep)?;
    let took = c.wait_programmed(1, 1, Duration::from_secs(10))?;
    step(
        t0,
        &format!("node1 reprogrammed in {} ms", took.as_millis()),
    );
    step(t0, &format!("{connections} connections again:"));
    show_round(&c, connections)?;

    step(t0, "tearing the lab down");
    c.lab.down()?;
    step(t0, "done");
    Ok(())
}
