//! End to end in the lab: NodePort, LoadBalancer IP (plain and IPIP/GUE-wrapped DSR),
//! externalTrafficPolicy Local, loadBalancerSourceRanges and REJECT, with real connections
//! from the external client and from pods. Needs root.
use std::{net::Ipv4Addr, time::Duration};

use proxy_lab::{
    cluster::{Binaries, Cluster, Endpoint, hostnames_endpoints},
    lab::{LabSpec, node_ip},
    services::{self, EMPTY, LOCAL, RANGES, WEB},
};

fn bins() -> Binaries {
    proxy_lab::cluster::test_binaries()
}

const EXT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

/// The lab with `web`, `local` (endpoint only on node2), `ranges` and `empty` installed.
fn up() -> (Cluster, Vec<Endpoint>) {
    let spec = LabSpec::default_demo();
    let eps = hostnames_endpoints(&spec);
    let c = Cluster::up(&bins(), &spec, &eps, &|m| eprintln!("{m}")).expect("cluster up");
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
            c.bins.tools.display().to_string(),
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
        // Probes sent before the encapsulator is attached would go plain (and still work).
        let start = std::time::Instant::now();
        while !std::fs::read_to_string(c.lab.log_path(pid).expect("log"))
            .unwrap_or_default()
            .contains("wrapping packets")
        {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{mode}: lab-encap did not attach"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
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
        // XDP (on by default) strips the outer header before tc sees the packet.
        let decap = c.inspect(1).expect("inspect")["counters"]["xdp_decapsulated"]
            .as_u64()
            .unwrap_or(0);
        assert!(decap > 0, "{mode}: node1's XDP decapsulated nothing");
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
    let echo = proxy_lab::services::Svc::cluster_ip_only("echo", Ipv4Addr::new(10, 96, 0, 200));
    c.start_pod_servers_on(&[c_pod.pod.as_str()], 9377, &["--echo"])
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

// ---- The XDP fast path on the uplinks (lb_up_xdp) ----

/// An externalTrafficPolicy Local LoadBalancer whose endpoints (on both nodes) run
/// `serve-hostname --echo` on 9377: every LB flow, whichever node ECMP picks, is DNATed without
/// masquerade, the kind of flow XDP translates once established.
const XECHO: services::Svc = services::Svc {
    name: "xecho",
    cluster_ip: Ipv4Addr::new(10, 96, 0, 210),
    lb_ip: Some(Ipv4Addr::new(203, 0, 113, 50)),
    node_port_tcp: Some(30210),
    node_port_udp: Some(30211),
    local: true,
    source_ranges: &[],
    health_check_node_port: Some(32010),
};

fn start_xecho(c: &Cluster, eps: &[Endpoint]) {
    let pods: Vec<&str> = eps.iter().map(|e| e.pod.as_str()).collect();
    c.start_pod_servers_on(&pods, 9377, &["--echo"])
        .expect("echo servers");
    let yaml = XECHO.yaml(eps).replace("9376", "9377");
    std::fs::write(c.manifests.join("xecho.yaml"), yaml).expect("manifest");
    for n in [1, 2] {
        services::wait_entry(c, n, XECHO.cluster_ip, 80, Duration::from_secs(10))
            .expect("programmed");
    }
}

/// `conns` connections from the external client to `target`, each echoing `chunks` chunks
/// of 16 kB of random bytes one after the other: prints `ok <n> bad <m> names <a,b,..>`.
const BULK_ECHO: &str = r#"
import os, socket, sys
host, port = sys.argv[1].rsplit(":", 1)
conns, chunks = int(sys.argv[2]), int(sys.argv[3])
ok = bad = 0
names = set()
for i in range(conns):
    try:
        s = socket.create_connection((host, int(port)), timeout=10)
        buf = b""
        while b"\n" not in buf:
            buf += s.recv(4096)
        name, buf = buf.split(b"\n", 1)
        names.add(name.decode().split()[0])
        good = True
        for _ in range(chunks):
            data = os.urandom(16384)
            s.sendall(data)
            while len(buf) < len(data):
                more = s.recv(65536)
                if not more:
                    break
                buf += more
            good = good and buf[:len(data)] == data
            buf = buf[len(data):]
        s.close()
        ok, bad = (ok + 1, bad) if good else (ok, bad + 1)
    except Exception as e:
        print("error", e, file=sys.stderr)
        bad += 1
print("ok", ok, "bad", bad, "names", ",".join(sorted(names)))
"#;

/// Runs [`BULK_ECHO`] in the external namespace: (connections intact, broken, pods reached).
fn bulk_echo(c: &Cluster, target: &str, conns: u32, chunks: u32) -> (u32, u32, String) {
    let out = c
        .lab
        .exec(
            &c.lab.ext_ns(),
            &[
                "python3",
                "-c",
                BULK_ECHO,
                target,
                &conns.to_string(),
                &chunks.to_string(),
            ],
        )
        .expect("python3");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let f: Vec<&str> = text.split_whitespace().collect();
    assert!(
        f.len() >= 4 && f[0] == "ok",
        "bulk echo: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        f[1].parse().expect("ok"),
        f[3].parse().expect("bad"),
        f.get(5).copied().unwrap_or("").to_owned(),
    )
}

fn counter(c: &Cluster, node: u8, name: &str) -> u64 {
    c.inspect(node).expect("inspect")["counters"][name]
        .as_u64()
        .unwrap_or(0)
}

fn counter_sum(c: &Cluster, name: &str) -> u64 {
    counter(c, 1, name) + counter(c, 2, name)
}

/// TCP segments with a bad checksum the namespace's stack discarded (`Tcp: InCsumErrors`).
fn tcp_csum_errors(c: &Cluster, ns: &str) -> u64 {
    let snmp = c
        .lab
        .exec_ok(ns, &["cat", "/proc/net/snmp"])
        .expect("/proc/net/snmp");
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (
        tcp.next().expect("Tcp header"),
        tcp.next().expect("Tcp values"),
    );
    let i = names
        .split_whitespace()
        .position(|n| n == "InCsumErrors")
        .expect("InCsumErrors");
    values
        .split_whitespace()
        .nth(i)
        .expect("value")
        .parse()
        .expect("number")
}

/// The uplink's XDP link as `inspect` shows it: (hook, link ID, program ID).
fn xdp_link(c: &Cluster, node: u8) -> (String, u64, u64) {
    let v = c.inspect(node).expect("inspect");
    let l = v["uplinks"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|l| l["hook"].as_str().is_some_and(|h| h.starts_with("XDP")))
        })
        .unwrap_or_else(|| panic!("node{node}: no XDP link pinned: {}", v["uplinks"]))
        .clone();
    assert_eq!(l["interface"], "eth0", "node{node}: {l}");
    assert_eq!(l["attached"], true, "node{node}: {l}");
    (
        l["hook"].as_str().unwrap_or("").to_owned(),
        l["link_id"].as_u64().unwrap_or(0),
        l["prog_id"].as_u64().unwrap_or(0),
    )
}

/// What `ip link` says about the uplink (it shows `prog/xdp` while an XDP program is on).
fn uplink_ip_link(c: &Cluster, node: u8) -> String {
    c.lab
        .exec_ok(
            &c.lab.node_ns(node),
            &["ip", "-d", "link", "show", "dev", "eth0"],
        )
        .expect("ip link")
}

/// The router hands the nodes complete checksums, as a NIC does (no CHECKSUM_PARTIAL skbs
/// across the veth): the only way XDP on a veth can rewrite established flows.
fn router_tx_checksums_in_software(c: &Cluster) {
    for n in [1, 2] {
        c.lab
            .exec_ok(
                &c.lab.router_ns(),
                &["ethtool", "-K", &format!("node{n}"), "tx", "off"],
            )
            .expect("ethtool");
    }
}

/// XDP is attached on both uplinks; established eTP Local LB flows are DNATed there and the
/// data arrives intact (the pods' TCP stacks verify every checksum XDP rewrote). Packets that
/// reach XDP with only a pseudo-header checksum (the lab's default: the router's veth hands
/// over CHECKSUM_PARTIAL skbs) are left to tc, and are intact too.
#[test]
fn xdp_fast_path_translates_established_flows_with_data_intact() {
    let (c, eps) = up();
    for n in [1, 2] {
        let (hook, _, _) = xdp_link(&c, n);
        eprintln!("node{n}: {hook}");
        assert!(
            uplink_ip_link(&c, n).contains("prog/xdp"),
            "node{n}: ip link shows no XDP program: {}",
            uplink_ip_link(&c, n)
        );
    }
    start_xecho(&c, &eps);
    let target = format!("{}:80", XECHO.lb_ip.expect("lb ip"));
    let pod_ns: Vec<String> = eps.iter().map(|e| c.lab.pod_ns(&e.pod)).collect();
    let errors_before: u64 = pod_ns.iter().map(|ns| tcp_csum_errors(&c, ns)).sum();

    // 1. Partial checksums (the lab's default): tc translates, XDP stays out of the way.
    let (fast0, partial0) = (
        counter_sum(&c, "xdp_forward_established"),
        counter_sum(&c, "xdp_pass_partial_checksum"),
    );
    let (ok, bad, names) = bulk_echo(&c, &target, 8, 16);
    assert_eq!((ok, bad), (8, 0), "partial checksums: every echo intact");
    let partial = counter_sum(&c, "xdp_pass_partial_checksum") - partial0;
    let fast = counter_sum(&c, "xdp_forward_established") - fast0;
    eprintln!("partial checksums: {partial} packets left to tc, {fast} fast-pathed, pods {names}");
    assert!(
        partial > 100,
        "the router's CHECKSUM_PARTIAL packets were not recognised ({partial})"
    );
    assert_eq!(
        fast, 0,
        "no partial-checksum packet may be rewritten at XDP"
    );

    // 2. Complete checksums (a NIC's view): XDP translates established flows.
    router_tx_checksums_in_software(&c);
    let fast0 = counter_sum(&c, "xdp_forward_established");
    let tc0 = counter_sum(&c, "forward_established");
    let skip0 = counter_sum(&c, "tc_pass_xdp_translated");
    let (ok, bad, names) = bulk_echo(&c, &target, 8, 16);
    assert_eq!((ok, bad), (8, 0), "complete checksums: every echo intact");
    let fast = counter_sum(&c, "xdp_forward_established") - fast0;
    let tc = counter_sum(&c, "forward_established") - tc0;
    let skipped = counter_sum(&c, "tc_pass_xdp_translated") - skip0;
    // XDP's metadata mark reaches tc on every packet XDP translated, and tc stops there.
    assert_eq!(
        skipped, fast,
        "tc passed {skipped} XDP-marked packets, XDP translated {fast}"
    );
    eprintln!(
        "complete checksums: {fast} packets fast-pathed at XDP, {tc} established at tc, pods {names}"
    );
    // 8 connections x 256 kB up: well over 8 x 180 full-size segments plus ACKs.
    assert!(
        fast > 8 * 180,
        "the XDP fast path translated only {fast} packets"
    );
    assert!(
        tc < fast / 10,
        "established packets should not reach tc's translation: tc {tc}, xdp {fast}"
    );
    assert!(
        names.split(',').count() >= 2,
        "ECMP spread the flows over both nodes' endpoints: {names}"
    );
    let errors: u64 = pod_ns.iter().map(|ns| tcp_csum_errors(&c, ns)).sum();
    assert_eq!(
        errors, errors_before,
        "the pods' TCP stacks found bad checksums in XDP-rewritten segments"
    );
}

/// A long-lived TCP connection through the LB IP that echoes a chunk every 50 ms and prints
/// `ok <n>` or `broken at <i>` when done.
const LONG_ECHO: &str = r#"
import os, socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
rounds = int(sys.argv[2])
s = socket.create_connection((host, int(port)), timeout=5)
buf = b""
while b"\n" not in buf:
    buf += s.recv(4096)
buf = buf.split(b"\n", 1)[1]
for i in range(rounds):
    data = os.urandom(4096)
    try:
        s.sendall(data)
        while len(buf) < len(data):
            more = s.recv(65536)
            if not more:
                raise IOError("closed")
            buf += more
    except Exception as e:
        print("broken at", i, e, flush=True)
        sys.exit(1)
    if buf[:len(data)] != data:
        print("broken at", i, "corrupt", flush=True)
        sys.exit(1)
    buf = buf[len(data):]
    time.sleep(0.05)
print("ok", rounds, flush=True)
"#;

/// A SIGKILLed and restarted agent adopts the pinned XDP link (same link, new program) while
/// an established connection keeps flowing through it; `cleanup` removes XDP from the uplink.
#[test]
fn xdp_link_survives_restarts_and_cleanup_removes_it() {
    let (mut c, eps) = up();
    start_xecho(&c, &eps);
    router_tx_checksums_in_software(&c);
    let target = format!("{}:80", XECHO.lb_ip.expect("lb ip"));
    let before: Vec<(String, u64, u64)> = [1, 2].map(|n| xdp_link(&c, n)).to_vec();
    let pid = c
        .lab
        .spawn(
            &c.lab.ext_ns(),
            &["python3", "-c", LONG_ECHO, target.as_str(), "160"],
        )
        .expect("long-lived client");
    std::thread::sleep(Duration::from_secs(1));
    let fast0 = counter_sum(&c, "xdp_forward_established");
    for n in [1, 2] {
        c.kill_agent(n).expect("SIGKILL");
    }
    std::thread::sleep(Duration::from_secs(1));
    for n in [1, 2] {
        c.restart_agent(n, Duration::from_secs(20))
            .expect("restart");
        c.wait_agent_log(
            n,
            "adopted the pinned link and replaced its program with lb_up_xdp",
            Duration::from_secs(20),
        )
        .expect("XDP link adopted");
    }
    for (i, n) in [1u8, 2].into_iter().enumerate() {
        let after = xdp_link(&c, n);
        assert_eq!(after.0, before[i].0, "node{n}: same XDP mode");
        assert_eq!(after.1, before[i].1, "node{n}: the same link was adopted");
        assert_ne!(
            after.2, before[i].2,
            "node{n}: with the new agent's program in it"
        );
    }
    let start = std::time::Instant::now();
    while c.lab.child_status(pid).expect("status").is_none() {
        assert!(start.elapsed() < Duration::from_secs(30), "client hung");
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = std::fs::read_to_string(c.lab.log_path(pid).expect("log")).unwrap_or_default();
    assert_eq!(log.trim(), "ok 160", "the connection survived the restarts");
    assert!(
        counter_sum(&c, "xdp_forward_established") > fast0 + 100,
        "the connection kept using the XDP fast path"
    );

    for n in [1, 2] {
        let st = c.stop_agent(n).expect("SIGTERM");
        assert!(st.success(), "{st}");
        assert!(
            uplink_ip_link(&c, n).contains("prog/xdp"),
            "XDP stays after SIGTERM"
        );
        let out = c.cleanup(n).expect("cleanup");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let link = uplink_ip_link(&c, n);
        assert!(
            !link.contains("prog/xdp"),
            "node{n}: XDP still attached after cleanup: {link}"
        );
    }
}

/// `--xdp-mode generic` swaps the native link for a generic one on restart and the fast path
/// still translates (with data intact); `--xdp-mode off` removes XDP and tc does it all.
#[test]
fn xdp_mode_generic_and_off() {
    let (mut c, eps) = up();
    start_xecho(&c, &eps);
    let target = format!("{}:80", XECHO.lb_ip.expect("lb ip"));
    for (mode, expect) in [("generic", Some("XDP (generic)")), ("off", None)] {
        c.agent_args = vec!["--xdp-mode".into(), mode.into()];
        for n in [1, 2] {
            c.stop_agent(n).expect("SIGTERM");
            c.restart_agent(n, Duration::from_secs(20))
                .expect("restart");
        }
        if mode == "generic" {
            // Generic XDP runs on the skb too: the router's CHECKSUM_PARTIAL packets (here
            // GSO-sized: generic XDP does not turn the peer's GSO off) are recognised and
            // every established one is left to tc, exactly as in native mode.
            let count = |c: &Cluster| {
                [
                    "xdp_pass_partial_checksum",
                    "xdp_forward_established",
                    "forward_established",
                ]
                .map(|n| counter_sum(c, n))
            };
            let before = count(&c);
            let (ok, bad, _) = bulk_echo(&c, &target, 2, 8);
            assert_eq!((ok, bad), (2, 0), "generic, partial checksums: intact");
            let after = count(&c);
            let [partial, fast, tc] = [0, 1, 2].map(|i| after[i] - before[i]);
            eprintln!(
                "generic, partial checksums: {partial} left to tc, {fast} at XDP, {tc} at tc"
            );
            assert!(
                partial > 10,
                "generic: partial checksums not recognised ({partial})"
            );
            // Every established packet went to tc: those with a partial checksum, and the
            // FIN/RST of each of the 2 connections, which XDP leaves to tc before looking
            // at checksums (they change the flow's state).
            assert_eq!(fast, 0, "generic: nothing translated at XDP");
            assert!(
                (partial..=partial + 4).contains(&tc),
                "generic: every established packet went to tc ({tc} at tc, {partial} partial)"
            );
            router_tx_checksums_in_software(&c);
        }
        let (fast0, tc0) = (
            counter_sum(&c, "xdp_forward_established"),
            counter_sum(&c, "forward_established"),
        );
        let (ok, bad, _) = bulk_echo(&c, &target, 4, 16);
        assert_eq!((ok, bad), (4, 0), "{mode}: every echo intact");
        let fast = counter_sum(&c, "xdp_forward_established") - fast0;
        let tc = counter_sum(&c, "forward_established") - tc0;
        eprintln!("--xdp-mode {mode}: {fast} packets at XDP, {tc} established at tc");
        for n in [1, 2] {
            let link = uplink_ip_link(&c, n);
            match expect {
                Some(hook) => {
                    assert_eq!(xdp_link(&c, n).0, hook, "node{n}");
                    assert!(link.contains("xdpgeneric"), "node{n}: {link}");
                }
                None => {
                    assert!(!link.contains("prog/xdp"), "node{n}: {link}");
                    let v = c.inspect(n).expect("inspect");
                    assert!(
                        v["uplinks"].as_array().is_some_and(|a| a
                            .iter()
                            .all(|l| !l["hook"].as_str().unwrap_or("").starts_with("XDP"))),
                        "node{n}: XDP pin left: {}",
                        v["uplinks"]
                    );
                }
            }
        }
        if expect.is_some() {
            assert!(fast > 4 * 180, "{mode}: fast path translated only {fast}");
        } else {
            assert_eq!(fast, 0, "{mode}: no XDP");
            assert!(tc > 4 * 180, "{mode}: tc translated only {tc}");
        }
    }
}
