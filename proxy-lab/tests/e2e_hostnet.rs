//! End to end in the namespace lab: host-network processes (run in node1's network namespace
//! and inside node1's cgroup, like kubelet or a hostNetwork pod) reach a ClusterIP through the
//! socket-level programs (cgroup connect4/sendmsg4/recvmsg4/getpeername4). Needs root.
use std::{
    fs,
    time::{Duration, Instant},
};

use proxy_lab::{
    cluster::{Binaries, CLUSTER_IP, Cluster, Endpoint, Probe, SERVICE_PORT},
    lab::{LabSpec, node_ip},
};

fn bins() -> Binaries {
    proxy_lab::cluster::test_binaries()
}

fn up() -> (Cluster, Vec<Endpoint>) {
    let spec = LabSpec::default_demo();
    let eps = proxy_lab::cluster::hostnames_endpoints(&spec);
    assert_eq!(eps.len(), 3);
    let c = Cluster::up(&bins(), &spec, &eps, &|m| eprintln!("{m}")).expect("cluster up");
    (c, eps)
}

fn vip() -> String {
    format!("{CLUSTER_IP}:{SERVICE_PORT}")
}

/// `ebpf-proxy-lab probe` as a host process of `node` (its namespace and its cgroup).
fn host_probe(c: &Cluster, node: u8, target: &str, udp: bool, count: u32) -> Probe {
    let mut args: Vec<String> = vec![
        c.bins.tools.display().to_string(),
        "probe".into(),
        target.into(),
        "--count".into(),
        count.to_string(),
        "--timeout-ms".into(),
        "2000".into(),
        "--json".into(),
    ];
    if udp {
        args.push("--udp".into());
    }
    let out = c.lab.exec_host(node, &args).expect("exec probe");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "probe output ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    Probe(v)
}

fn sock_xlated(c: &Cluster, node: u8) -> u64 {
    let v = c.inspect(node).expect("inspect");
    v["counters"]["socket_translated"]
        .as_u64()
        .unwrap_or_else(|| panic!("no socket_translated counter in {v}"))
}

fn keys(m: std::collections::BTreeMap<String, u64>) -> Vec<String> {
    m.keys().cloned().collect()
}

/// TCP: every connection lands on one of the endpoints (on both nodes), `getpeername` shows the
/// VIP, each connect is translated exactly once, and the backend sees a node address (the
/// socket's own source: no masquerade needed). A process of the node that is not in its cgroup
/// is not touched (the programs are attached to the node's cgroup, not the machine's root).
#[test]
fn host_tcp_connections_to_a_cluster_ip_reach_every_endpoint_and_see_the_vip() {
    let (c, eps) = up();
    let n = 240;
    let before = sock_xlated(&c, 1);
    let before2 = sock_xlated(&c, 2);
    let p = host_probe(&c, 1, &vip(), false, n);
    assert_eq!(p.sent(), n as u64);
    assert_eq!(p.ok(), n as u64, "every connection succeeds: {:?}", p.0);
    let answers = p.answers();
    for e in &eps {
        let k = answers.get(&e.pod).copied().unwrap_or(0);
        // Uniform would be 80 each; 40 is far outside random variation.
        assert!(k >= 40, "{} answered only {k} of {n}: {answers:?}", e.pod);
    }
    assert_eq!(
        keys(p.reply_sources()),
        vec![vip()],
        "getpeername shows the VIP, never a backend"
    );
    let seen: Vec<String> = p.0["client_addrs_seen_by_server"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    // Its uplink address, or (bridge topology) the bridge's, which the route to a local pod
    // prefers.
    let mut node1_addrs = vec![node_ip(1).to_string()];
    node1_addrs.extend(
        c.lab
            .state()
            .node(1)
            .and_then(|n| n.bridge_ip)
            .map(|ip| ip.to_string()),
    );
    assert!(
        !seen.is_empty() && seen.iter().all(|a| node1_addrs.contains(a)),
        "backends see node1's own addresses {node1_addrs:?}, saw {seen:?}"
    );
    assert_eq!(
        sock_xlated(&c, 1) - before,
        n as u64,
        "one socket translation per connect on node1"
    );
    assert_eq!(sock_xlated(&c, 2), before2, "node2's hooks saw nothing");

    // Outside the cgroup: the same namespace, but the hooks do not apply.
    let before = sock_xlated(&c, 1);
    let _ = c.lab.exec(
        &c.lab.node_ns(1),
        &[
            c.bins.tools.display().to_string(),
            "probe".into(),
            vip(),
            "--udp".into(),
            "--count".into(),
            "1".into(),
            "--timeout-ms".into(),
            "300".into(),
        ],
    );
    assert_eq!(
        sock_xlated(&c, 1),
        before,
        "a process outside node1's cgroup is not translated"
    );

    // node2's host processes go through node2's own agent and cgroup.
    let p = host_probe(&c, 2, &vip(), false, 60);
    assert_eq!(p.ok(), 60, "node2 host process: {:?}", p.0);
    assert_eq!(keys(p.reply_sources()), vec![vip()]);
    assert!(sock_xlated(&c, 2) >= before2 + 60);
}

fn counter(c: &Cluster, node: u8, name: &str) -> u64 {
    let v = c.inspect(node).expect("inspect");
    v["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} counter in {v}"))
}

/// On a real node the hooks sit on the cgroup root, above every pod; the lab puts each pod's
/// processes in its node's cgroup likewise. With `--socket-lb=host` (the default) a pod's
/// sockets are left alone (another network namespace) and the tc programs on its interface
/// translate its packets: no socket translation, one tc new flow per connection or
/// datagram, and the service still answers from its VIP.
#[test]
fn pod_sockets_under_the_hooks_are_left_to_tc() {
    let (c, _eps) = up();
    let cg = c
        .lab
        .exec_ok(&c.lab.pod_ns("client"), &["cat", "/proc/self/cgroup"])
        .expect("read the pod process's cgroup");
    let node1_cg = c.lab.node_cgroup(1);
    let node1_cg = node1_cg.file_name().and_then(|n| n.to_str()).expect("name");
    assert!(
        cg.trim().ends_with(&format!("/{node1_cg}")),
        "a pod's process runs in its node's hooked cgroup: {cg}"
    );
    for udp in [false, true] {
        let (sock, fwd) = (sock_xlated(&c, 1), counter(&c, 1, "forward_new"));
        let p = c.probe("client", &vip(), udp, 30).expect("probe");
        assert_eq!(p.ok(), 30, "udp={udp}: {:?}", p.0);
        assert_eq!(keys(p.reply_sources()), vec![vip()], "udp={udp}");
        assert_eq!(
            sock_xlated(&c, 1),
            sock,
            "udp={udp}: the socket hooks leave a pod's sockets alone"
        );
        assert!(
            counter(&c, 1, "forward_new") >= fwd + 30,
            "udp={udp}: tc translated each of the pod's flows"
        );
    }
}

/// UDP on an unconnected socket: sendto(VIP) is translated by sendmsg4, recvfrom shows the
/// VIP as the source (recvmsg4), and every endpoint answers over many sockets.
#[test]
fn host_udp_request_response_through_a_cluster_ip_comes_from_the_vip() {
    let (c, eps) = up();
    let n = 90;
    let p = host_probe(&c, 1, &vip(), true, n);
    assert_eq!(p.ok(), n as u64, "every UDP request answered: {:?}", p.0);
    assert_eq!(
        keys(p.reply_sources()),
        vec![vip()],
        "recvfrom reports the VIP as the source"
    );
    let answers = p.answers();
    for e in &eps {
        assert!(
            answers.get(&e.pod).copied().unwrap_or(0) > 5,
            "{} never answered: {answers:?}",
            e.pod
        );
    }
}

/// A service with no endpoint: connect() and sendto() fail with ECONNREFUSED, what a
/// kube-proxy REJECT gives a client ("connection refused"), instantly.
#[test]
fn host_connections_to_a_service_without_endpoints_are_refused() {
    let (c, _) = up();
    let empty_ip = "10.96.0.11";
    fs::write(
        c.manifests.join("empty.yaml"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: empty\n  namespace: default\n\
             spec:\n  type: ClusterIP\n  clusterIP: {empty_ip}\n  clusterIPs: [\"{empty_ip}\"]\n\
             \x20 ports:\n  - name: tcp\n    protocol: TCP\n    port: 80\n\
             \x20 - name: udp\n    protocol: UDP\n    port: 80\n"
        ),
    )
    .expect("write manifest");
    let key = format!("{empty_ip}:80/TCP");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = c.inspect(1).expect("inspect");
        let found = v["services"]
            .as_array()
            .is_some_and(|s| s.iter().any(|x| x["service"] == key.as_str()));
        if found {
            break;
        }
        assert!(Instant::now() < deadline, "{key} never programmed: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
    for udp in [false, true] {
        let t0 = Instant::now();
        let p = host_probe(&c, 1, &format!("{empty_ip}:80"), udp, 10);
        assert_eq!(p.ok(), 0, "udp={udp}: {:?}", p.0);
        assert_eq!(
            p.failures().get("refused").copied(),
            Some(10),
            "udp={udp}: refused, not timed out: {:?}",
            p.0
        );
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "udp={udp}: refused at once"
        );
    }
    // The VIP itself still works.
    let p = host_probe(&c, 1, &vip(), false, 10);
    assert_eq!(p.ok(), 10, "{:?}", p.0);
}

/// The programs attached to node `node`'s cgroup, from `bpftool cgroup show` (JSON).
fn cgroup_programs(c: &Cluster, node: u8) -> Vec<serde_json::Value> {
    let cgroup = c.lab.node_cgroup(node);
    let v = proxy_lab::programs::bpftool_json(&[
        std::ffi::OsStr::new("cgroup"),
        "show".as_ref(),
        cgroup.as_os_str(),
    ])
    .expect("bpftool cgroup show");
    serde_json::from_value(v).expect("a JSON list")
}

/// The cgroup links are pinned: host processes keep reaching the service while the agent is
/// dead (SIGKILL), and a new agent swaps its programs into the pinned links (one program per
/// hook, never two).
#[test]
fn host_processes_keep_working_across_an_agent_restart() {
    let (mut c, _) = up();
    let progs = cgroup_programs(&c, 1);
    assert_eq!(progs.len(), 4, "four hooks on node1's cgroup: {progs:?}");
    c.kill_agent(1).expect("kill agent");
    for udp in [false, true] {
        let p = host_probe(&c, 1, &vip(), udp, 30);
        assert_eq!(p.ok(), 30, "agent down, udp={udp}: {:?}", p.0);
        assert_eq!(keys(p.reply_sources()), vec![vip()], "udp={udp}");
    }
    c.restart_agent(1, Duration::from_secs(20))
        .expect("restart agent");
    c.wait_agent_log(1, "lb_sock_conn4 Replaced", Duration::from_secs(5))
        .expect("the new agent adopted the pinned cgroup links");
    let after = cgroup_programs(&c, 1);
    assert_eq!(after.len(), 4, "still one program per hook: {after:?}");
    let ids = |v: &[serde_json::Value]| -> Vec<u64> {
        let mut ids: Vec<u64> = v.iter().filter_map(|p| p["id"].as_u64()).collect();
        ids.sort_unstable();
        ids
    };
    assert_ne!(
        ids(&progs),
        ids(&after),
        "the new agent's programs are the ones attached"
    );
    for udp in [false, true] {
        let p = host_probe(&c, 1, &vip(), udp, 30);
        assert_eq!(p.ok(), 30, "after restart, udp={udp}: {:?}", p.0);
        assert_eq!(keys(p.reply_sources()), vec![vip()], "udp={udp}");
    }
}

/// The demo lab with every agent run with `--socket-lb=all`.
fn up_socket_lb_all() -> (Cluster, Vec<Endpoint>) {
    let spec = LabSpec::default_demo();
    let eps = proxy_lab::cluster::hostnames_endpoints(&spec);
    let args = ["--socket-lb".to_owned(), "all".to_owned()];
    let c = Cluster::up_with_agent_args(&bins(), &spec, &eps, &args, &|m| eprintln!("{m}"))
        .expect("cluster up");
    (c, eps)
}

/// `svc` with sessionAffinity ClientIP, written into the manifests directory.
fn install_with_affinity(c: &Cluster, svc: &proxy_lab::services::Svc, eps: &[Endpoint]) {
    let yaml = svc
        .yaml(eps)
        .replacen("spec:\n", "spec:\n  sessionAffinity: ClientIP\n", 1);
    fs::write(c.manifests.join(format!("{}.yaml", svc.name)), yaml).expect("write manifest");
}

/// A LoadBalancer with externalTrafficPolicy Local: ClusterIP 10.96.0.`n`, LB IP
/// 203.0.113.`n`, node ports 30000 + 10`n` and the next.
fn local_lb(
    name: &'static str,
    n: u8,
    source_ranges: &'static [&'static str],
) -> proxy_lab::services::Svc {
    let np = 30_000 + 10 * u16::from(n);
    proxy_lab::services::Svc {
        name,
        cluster_ip: std::net::Ipv4Addr::new(10, 96, 0, n),
        lb_ip: Some(std::net::Ipv4Addr::new(203, 0, 113, n)),
        node_port_tcp: Some(np),
        node_port_udp: Some(np + 1),
        local: true,
        source_ranges,
        health_check_node_port: Some(32_000 + u16::from(n)),
    }
}

/// Counters of node1 around a probe from the `client` pod (on node1): (socket translations,
/// tc new flows, the probe).
fn pod_probe_counted(c: &Cluster, target: &str, udp: bool, n: u32) -> (u64, u64, Probe) {
    let (sock, fwd) = (sock_xlated(c, 1), counter(c, 1, "forward_new"));
    let p = c.probe("client", target, udp, n).expect("probe");
    assert_eq!(p.ok(), n as u64, "{target} udp={udp}: {:?}", p.0);
    (
        sock_xlated(c, 1) - sock,
        counter(c, 1, "forward_new") - fwd,
        p,
    )
}

/// `--socket-lb=all`: a pod's TCP connect() to a ClusterIP is balanced at the socket (one
/// socket translation per connection, no tc new flow, so no NAT and no conntrack entry),
/// `getpeername` in the pod shows the ClusterIP, and the backend sees the pod's own address
/// (kube-proxy does not masquerade pod -> ClusterIP either). Everything a per-packet rule could
/// apply to stays on tc: the same pod's UDP, a service with sessionAffinity, one with
/// loadBalancerSourceRanges, and an externalTrafficPolicy Cluster LB IP (masqueraded). An
/// externalTrafficPolicy Local LB IP, not masqueraded from pods, is balanced at the socket.
/// Run with `--socket-lb=host`, the first assertion fails (no socket translation).
#[test]
fn socket_lb_all_balances_pods_tcp_at_the_socket_and_leaves_the_rest_to_tc() {
    use proxy_lab::services::{self, Svc, WEB};
    use std::net::Ipv4Addr;
    let (c, eps) = up_socket_lb_all();
    let client = c.lab.pod_ip("client").expect("client pod").to_string();

    let n = 60;
    let (sock, fwd, p) = pod_probe_counted(&c, &vip(), false, n);
    assert_eq!(
        (sock, fwd),
        (n as u64, 0),
        "each TCP connect translated at the socket, none by tc: {:?}",
        p.0
    );
    assert_eq!(
        keys(p.reply_sources()),
        vec![vip()],
        "getpeername in the pod shows the ClusterIP"
    );
    assert!(
        p.answers().len() >= 2,
        "balanced over the endpoints: {:?}",
        p.answers()
    );
    assert_eq!(
        keys(p.seen_by_server()),
        vec![client.clone()],
        "backends see the pod's own address"
    );
    let (sock, fwd, p) = pod_probe_counted(&c, &vip(), true, 30);
    assert_eq!(sock, 0, "the pod's UDP is left to tc");
    assert!(fwd >= 30, "tc translated each datagram's flow ({fwd})");
    assert_eq!(
        keys(p.reply_sources()),
        vec![vip()],
        "UDP replies from the VIP"
    );

    // Services a per-packet rule applies to.
    let sticky = Svc::cluster_ip_only("sticky", Ipv4Addr::new(10, 96, 0, 61));
    install_with_affinity(&c, &sticky, &eps);
    // The pods' CIDR: allowed, but checked per packet.
    let ranges = local_lb("rlocal", 62, &["10.76.0.0/16"]);
    let local = local_lb("elocal", 63, &[]);
    for s in [&ranges, &local, &WEB] {
        services::install(&c, s, &eps).expect("install");
    }
    for s in [&sticky, &ranges, &local, &WEB] {
        services::wait_entry(&c, 1, s.cluster_ip, 80, Duration::from_secs(10)).expect("entry");
    }
    let lb = |s: &Svc| format!("{}:80", s.lb_ip.expect("LB IP"));
    let (sock, fwd, p) = pod_probe_counted(&c, &format!("{}:80", sticky.cluster_ip), false, 30);
    assert_eq!(sock, 0, "sessionAffinity: left to tc");
    assert!(fwd >= 30, "sessionAffinity: tc translated ({fwd})");
    assert_eq!(p.answers().len(), 1, "affinity held: {:?}", p.answers());
    for (what, target) in [
        ("loadBalancerSourceRanges", lb(&ranges)),
        ("externalTrafficPolicy Cluster LB IP", lb(&WEB)),
    ] {
        let (sock, fwd, _) = pod_probe_counted(&c, &target, false, 20);
        assert_eq!(sock, 0, "{what}: left to tc");
        assert!(fwd >= 20, "{what}: tc translated ({fwd})");
    }
    let (sock, fwd, p) = pod_probe_counted(&c, &lb(&local), false, 20);
    assert_eq!(
        (sock, fwd),
        (20, 0),
        "externalTrafficPolicy Local LB IP: at the socket"
    );
    assert_eq!(keys(p.reply_sources()), vec![lb(&local)]);
}

/// `probe --source-port` from the `client` pod: one TCP request from that port.
fn pod_probe_from_port(c: &Cluster, target: &str, port: u16) -> Probe {
    let args: Vec<String> = vec![
        c.bins.tools.display().to_string(),
        "probe".into(),
        target.into(),
        "--source-port".into(),
        port.to_string(),
        "--timeout-ms".into(),
        "2000".into(),
        "--json".into(),
    ];
    let out = c
        .lab
        .exec(&c.lab.pod_ns("client"), &args)
        .expect("exec probe");
    Probe(serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "probe output ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }))
}

/// `--socket-lb=all`: a pod reaches one endpoint both through tc (a sessionAffinity service)
/// and at the socket (a plain one), from the same source port, one after the other. The
/// socket path connects straight to the endpoint, so if the tc flow had kept the pod's port
/// both would be the same connection to the endpoint (and tc would rewrite the second one's
/// replies as the first's). tc's flows therefore take a port out of the pod's ephemeral
/// range (the SNAT range), and every request is answered.
#[test]
fn socket_lb_all_tc_and_socket_flows_of_a_pod_never_share_a_tuple() {
    use proxy_lab::services::{self, Svc};
    use std::net::Ipv4Addr;
    let (c, eps) = up_socket_lb_all();
    let one = &eps[..1];
    let sticky = Svc::cluster_ip_only("sticky1", Ipv4Addr::new(10, 96, 0, 64));
    install_with_affinity(&c, &sticky, one);
    let solo = Svc::cluster_ip_only("solo", Ipv4Addr::new(10, 96, 0, 65));
    services::install(&c, &solo, one).expect("install");
    for s in [&sticky, &solo] {
        services::wait_entry(&c, 1, s.cluster_ip, 80, Duration::from_secs(10)).expect("entry");
    }
    let port = 40_123;
    for round in 0..3 {
        let (sock, fwd) = (sock_xlated(&c, 1), counter(&c, 1, "forward_new"));
        // Via tc from another port; at the socket from the pod's own.
        for (svc, how, preserved) in [(&sticky, "via tc", 0), (&solo, "at the socket", 1)] {
            let p = pod_probe_from_port(&c, &format!("{}:80", svc.cluster_ip), port);
            assert_eq!(p.ok(), 1, "round {round}, {how}: {:?}", p.0);
            assert_eq!(
                p.0["source_port_preserved"].as_u64(),
                Some(preserved),
                "round {round}, {how}: the source port the endpoint saw: {:?}",
                p.0
            );
        }
        assert_eq!(
            (
                sock_xlated(&c, 1) - sock,
                counter(&c, 1, "forward_new") - fwd
            ),
            (1, 1),
            "round {round}: one flow by tc, one at the socket"
        );
    }
}
