//! End to end in the lab: NodePort, LoadBalancer IP (plain and IPIP/GUE-wrapped DSR),
//! externalTrafficPolicy Local, loadBalancerSourceRanges and REJECT, with real connections
//! from the external client and from pods. Needs root.
use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use xtask::{
    cluster::{Cluster, Endpoint, hostnames_endpoints},
    lab::{LabSpec, node_ip},
    services::{self, EMPTY, LOCAL, RANGES, WEB},
};

fn bin() -> PathBuf {
    xtask::cluster::test_binary()
}

const EXT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

/// The lab with `web`, `local` (endpoint only on node2), `ranges` and `empty` installed.
fn up() -> (Cluster, Vec<Endpoint>) {
    let spec = LabSpec::default_demo();
    let eps = hostnames_endpoints(&spec);
    let c = Cluster::up(&bin(), &spec, &eps, &|m| eprintln!("{m}")).expect("cluster up");
    let node2: Vec<Endpoint> = eps.iter().filter(|e| e.node == 2).cloned().collect();
    services::install(&c, &WEB, &eps).expect("web");
    services::install(&c, &LOCAL, &node2).expect("local");
    services::install(&c, &RANGES, &eps).expect("ranges");
    services::install(&c, &EMPTY, &[]).expect("empty");
    for n in [1, 2] {
        for s in [&WEB, &LOCAL, &RANGES, &EMPTY] {
            services::wait_entry(&c, n, s.cluster_ip, 80, Duration::from_secs(10))
                .expect("programmed");
        }
    }
    (c, eps)
}

fn keys(m: std::collections::BTreeMap<String, u64>) -> Vec<String> {
    m.into_keys().collect()
}

#[test]
fn nodeport_from_outside_reaches_local_and_remote_endpoints_masqueraded() {
    let (c, eps) = up();
    let ext = c.lab.ext_ns();
    for udp in [false, true] {
        let port = if udp { 30081 } else { 30080 };
        let target = format!("{}:{port}", node_ip(1));
        let p = c.probe_in(&ext, &target, udp, 90, 2000).expect("probe");
        assert_eq!(p.ok(), 90, "udp={udp}: every request answered: {:?}", p.0);
        assert_eq!(
            keys(p.reply_sources()),
            vec![target.clone()],
            "udp={udp}: replies come from the NodePort"
        );
        for e in &eps {
            assert!(
                p.answers().get(&e.pod).copied().unwrap_or(0) > 5,
                "udp={udp}: {} never answered: {:?}",
                e.pod,
                p.0
            );
        }
        // externalTrafficPolicy Cluster: the backend sees node1's address, never the client's.
        assert_eq!(
            keys(p.seen_by_server()),
            vec![node_ip(1).to_string()],
            "udp={udp}: masqueraded"
        );
    }
}

#[test]
fn nodeport_from_a_pod() {
    let (c, eps) = up();
    let target = format!("{}:30080", node_ip(1));
    let p = c.probe("client", &target, false, 60).expect("probe");
    assert_eq!(p.ok(), 60, "{:?}", p.0);
    assert_eq!(p.answers().len(), eps.len(), "{:?}", p.0);
    assert_eq!(keys(p.reply_sources()), vec![target]);
}

#[test]
fn load_balancer_ip_plain_dsr_replies_from_the_vip() {
    let (c, eps) = up();
    let target = format!("{}:80", WEB.lb_ip.expect("lb ip"));
    let p = c
        .probe_in(&c.lab.ext_ns(), &target, false, 90, 2000)
        .expect("probe");
    assert_eq!(p.ok(), 90, "{:?}", p.0);
    assert_eq!(
        keys(p.reply_sources()),
        vec![target],
        "replies come from the LB IP"
    );
    assert_eq!(p.answers().len(), eps.len(), "{:?}", p.0);
}

#[test]
fn external_traffic_policy_local_preserves_the_client_and_drops_without_local_endpoints() {
    let (c, _) = up();
    let ext = c.lab.ext_ns();
    let on_node2 = format!("{}:30090", node_ip(2));
    let p = c.probe_in(&ext, &on_node2, false, 30, 2000).expect("probe");
    assert_eq!(p.ok(), 30, "{:?}", p.0);
    assert_eq!(keys(p.answers()), vec!["hostnames-c".to_owned()]);
    assert_eq!(
        keys(p.seen_by_server()),
        vec![EXT.to_string()],
        "client address preserved"
    );
    // node1 has no local endpoint: dropped (a timeout, not a refusal).
    let on_node1 = format!("{}:30090", node_ip(1));
    let p = c.probe_in(&ext, &on_node1, false, 3, 500).expect("probe");
    assert_eq!(p.ok(), 0, "{:?}", p.0);
    assert_eq!(
        p.failures().get("timeout").copied(),
        Some(3),
        "dropped, not rejected: {:?}",
        p.0
    );
    // A pod on node1 short-circuits to the cluster-wide endpoints.
    let p = c.probe("client", &on_node1, false, 10).expect("probe");
    assert_eq!(p.ok(), 10, "pods use every endpoint: {:?}", p.0);
}

#[test]
fn load_balancer_source_ranges_drop_other_sources() {
    let (c, _) = up();
    let target = format!("{}:80", RANGES.lb_ip.expect("lb ip"));
    let p = c
        .probe_in(&c.lab.ext_ns(), &target, false, 3, 500)
        .expect("probe");
    assert_eq!(
        p.failures().get("timeout").copied(),
        Some(3),
        "192.0.2.10 is outside the ranges: {:?}",
        p.0
    );
    // The NodePort of the same service is not subject to the ranges.
    let np = format!("{}:30100", node_ip(1));
    let p = c
        .probe_in(&c.lab.ext_ns(), &np, false, 10, 2000)
        .expect("probe");
    assert_eq!(p.ok(), 10, "{:?}", p.0);
}

#[test]
fn no_endpoints_is_refused_and_so_is_an_unused_cluster_ip_port() {
    let (c, _) = up();
    for udp in [false, true] {
        let p = c
            .probe("client", &format!("{}:80", EMPTY.cluster_ip), udp, 5)
            .expect("probe");
        assert_eq!(
            p.failures().get("refused").copied(),
            Some(5),
            "udp={udp}: {:?}",
            p.0
        );
    }
    let p = c
        .probe("client", &format!("{}:81", WEB.cluster_ip), false, 5)
        .expect("probe");
    assert_eq!(
        p.failures().get("refused").copied(),
        Some(5),
        "unused port of a ClusterIP: {:?}",
        p.0
    );
}

#[test]
fn load_balancer_ip_wrapped_in_ipip_and_gue_keeps_the_vip() {
    let (c, eps) = up();
    let vip = WEB.lb_ip.expect("lb ip");
    let target = format!("{vip}:80");
    for mode in ["ipip", "gue"] {
        let args: Vec<String> = [
            c.bin.display().to_string(),
            "lab-encap".into(),
            "--iface".into(),
            "eth0".into(),
            "--vip".into(),
            vip.to_string(),
            "--from".into(),
            EXT.to_string(),
            "--to".into(),
            node_ip(1).to_string(),
            "--mode".into(),
            mode.into(),
        ]
        .to_vec();
        let pid = c.lab.spawn(&c.lab.ext_ns(), &args).expect("lab-encap");
        std::thread::sleep(Duration::from_millis(700));
        let p = c
            .probe_in(&c.lab.ext_ns(), &target, false, 40, 2000)
            .expect("probe");
        c.lab.stop(pid).expect("stop lab-encap");
        assert_eq!(p.ok(), 40, "{mode}: {:?}", p.0);
        assert_eq!(
            keys(p.reply_sources()),
            vec![target.clone()],
            "{mode}: the reply comes from the VIP"
        );
        assert_eq!(p.answers().len(), eps.len(), "{mode}: {:?}", p.0);
        let decap = c.inspect(1).expect("inspect")["counters"]["decapsulated"]
            .as_u64()
            .unwrap_or(0);
        assert!(decap > 0, "{mode}: node1 decapsulated nothing");
    }
}

/// Path-MTU discovery through a ClusterIP: the router's link to node2 gets a small MTU, so
/// the client's full-size segments to the VIP (translated to a backend on node2) draw ICMP
/// "fragmentation needed" errors that quote the translated packet. Only if those errors are
/// translated back to the VIP does the client's socket lower its MSS and the transfer finish.
#[test]
fn icmp_fragmentation_needed_through_a_vip() {
    let (c, eps) = up();
    let c_pod = eps
        .iter()
        .find(|e| e.node == 2)
        .expect("an endpoint on node2")
        .clone();
    let echo = xtask::services::Svc {
        name: "echo",
        cluster_ip: Ipv4Addr::new(10, 96, 0, 200),
        lb_ip: None,
        node_port_tcp: None,
        node_port_udp: None,
        local: false,
        source_ranges: &[],
        health_check_node_port: None,
    };
    let args: Vec<String> = [
        c.bin.display().to_string(),
        "serve-hostname".into(),
        "--name".into(),
        c_pod.pod.clone(),
        "--port".into(),
        "9377".into(),
        "--echo".into(),
    ]
    .to_vec();
    c.lab
        .spawn(&c.lab.pod_ns(&c_pod.pod), &args)
        .expect("echo server");
    let yaml = echo
        .yaml(std::slice::from_ref(&c_pod))
        .replace("9376", "9377");
    std::fs::write(c.manifests.join("echo.yaml"), yaml).expect("manifest");
    services::wait_entry(&c, 1, echo.cluster_ip, 80, Duration::from_secs(10)).expect("programmed");
    // Shrink the router's fabric (both directions through the router).
    c.lab
        .exec_ok(
            &c.lab.router_ns(),
            &["ip", "link", "set", "dev", "node2", "mtu", "1200"],
        )
        .expect("mtu");
    c.lab
        .exec_ok(
            &c.lab.router_ns(),
            &["ip", "link", "set", "dev", "fabric", "mtu", "1200"],
        )
        .expect("mtu");
    let script = r#"
import socket, sys
s = socket.create_connection(("10.96.0.200", 80), timeout=15)
buf = b""
while b"\n" not in buf:
    buf += s.recv(4096)
buf = buf.split(b"\n", 1)[1]
data = b"x" * 20000
s.sendall(data)
while len(buf) < len(data):
    chunk = s.recv(65536)
    if not chunk:
        break
    buf += chunk
print(len(buf))
"#;
    let out = c
        .lab
        .exec(&c.lab.pod_ns("client"), &["python3", "-c", script])
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(
        stdout,
        "20000",
        "the 20 kB echo through the VIP must complete: stdout {stdout:?} stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n = c.inspect(1).expect("inspect")["counters"]["icmp_error_translated"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        n > 0,
        "node1 translated no ICMP error: the MTU was never hit"
    );
}
