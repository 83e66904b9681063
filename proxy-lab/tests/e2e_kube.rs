//! End to end in the namespace lab in Kubernetes mode: both nodes' agents run `ebpf-proxy run
//! --kubeconfig` against `ebpf-proxy-lab lab-apiserver` (in the router namespace, serving the
//! lab's manifests directory over list/watch), so every change reaches the maps through the
//! real kube client, watches and stores. Needs root.
use std::time::{Duration, Instant};

use proxy_lab::{
    cluster::{
        Binaries, CANARY_IP, CANARY_LB_IP, CANARY_NP_TCP, CANARY_PORT, CLUSTER_IP, Cluster,
        Endpoint, SERVICE_PORT, assert_canary_lost_nothing,
    },
    lab::{LabSpec, NODES},
};

const PROGRAMMING: &str = "kubeproxy_network_programming_duration_seconds";

fn bins() -> Binaries {
    proxy_lab::cluster::test_binaries()
}

fn up() -> (Cluster, Vec<Endpoint>) {
    let spec = LabSpec::default_demo();
    let eps = proxy_lab::cluster::hostnames_endpoints(&spec);
    assert!(
        eps.iter().any(|e| e.node == 1) && eps.iter().any(|e| e.node == 2),
        "endpoints on both nodes: {eps:?}"
    );
    let c = Cluster::up_kube(&bins(), &spec, &eps, &|m| eprintln!("{m}")).expect("cluster up");
    for n in NODES {
        let log = c.agent_log(n);
        assert!(
            log.contains("with the Kubernetes API"),
            "node{n}'s agent watches the API server: {log}"
        );
        // What it waits for before programming anything is said at the default level.
        assert!(
            log.contains("waiting for the initial lists of Services, EndpointSlices, Node"),
            "node{n} says what it waits for: {log}"
        );
        // Addresses from its Node object (field selector metadata.name=nodeN), not a flag.
        // Logged after the first sync's map writes, which is what `up_kube` waited for.
        let want = format!("node node{n} addresses: [{}]", proxy_lab::lab::node_ip(n));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !c.agent_log(n).contains(&want) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = c.agent_log(n);
        assert!(log.contains(&want), "node{n}: {want:?} in {log}");
    }
    (c, eps)
}

/// `ebpf-proxy trace --kubeconfig` from node1's namespace (where the lab API server is
/// reachable): TCP from the `client` pod to the ClusterIP, JSON.
fn trace_live(c: &Cluster, timeout_s: u32) -> std::process::Output {
    let client = c.lab.pod_ip("client").expect("client pod").to_string();
    let argv: Vec<String> = vec![
        c.bins.agent.display().to_string(),
        "trace".into(),
        "--kubeconfig".into(),
        c.kubeconfig().expect("kube mode").display().to_string(),
        "--timeout".into(),
        timeout_s.to_string(),
        "--node-name".into(),
        "node1".into(),
        "--node-ip".into(),
        proxy_lab::lab::node_ip(1).to_string(),
        "--cluster-cidr".into(),
        "10.76.0.0/16".into(),
        "--protocol".into(),
        "tcp".into(),
        "--source".into(),
        client,
        "--destination".into(),
        vip(),
        "--json".into(),
    ];
    c.lab.exec(&c.lab.node_ns(1), &argv).expect("trace")
}

fn vip() -> String {
    format!("{CLUSTER_IP}:{SERVICE_PORT}")
}

/// Probes the ClusterIP from `pod` (`n` TCP connections) and returns pod -> answers.
fn spread(c: &Cluster, pod: &str, n: u32) -> std::collections::BTreeMap<String, u64> {
    let p = c.probe(pod, &vip(), false, n).expect("probe");
    assert_eq!(
        p.ok(),
        n as u64,
        "every connection from {pod} succeeds: {:?}",
        p.0
    );
    p.answers()
}

/// The service is programmed from the API server; connections from a pod on each node are
/// balanced over the endpoints of both nodes; an endpoint removed through the API server is
/// gone from both nodes' maps within 2 s and traffic stops reaching it; the change shows in
/// kubeproxy_network_programming_duration_seconds. With the API server down, a manifest edit
/// changes nothing (the agents really read the API, not the directory); once it is back, the
/// agents relist and converge.
#[test]
fn cluster_ip_and_endpoint_changes_through_the_api_server() {
    let (mut c, eps) = up();
    // node1's agent serves `client`, node2's serves `hostnames-c`.
    for pod in ["client", "hostnames-c"] {
        let answers = spread(&c, pod, 90);
        for e in &eps {
            let k = answers.get(&e.pod).copied().unwrap_or(0);
            // Uniform is 30 each; 8 is far outside random variation.
            assert!(
                k >= 8,
                "from {pod}: {} answered {k} of 90: {answers:?}",
                e.pod
            );
        }
    }
    let udp = c.probe("client", &vip(), true, 30).expect("udp probe");
    assert_eq!(udp.ok(), 30, "UDP through the ClusterIP: {:?}", udp.0);

    let before: Vec<(u64, f64)> = NODES
        .iter()
        .map(|&n| c.metrics_histogram(n, PROGRAMMING).expect("metrics"))
        .collect();
    let removed = eps
        .iter()
        .find(|e| e.pod == "hostnames-b")
        .expect("hostnames-b")
        .clone();
    let kept: Vec<Endpoint> = eps
        .iter()
        .filter(|e| e.pod != removed.pod)
        .cloned()
        .collect();
    let t0 = Instant::now();
    c.set_endpoints(&kept).expect("edit the EndpointSlice");
    for n in NODES {
        c.wait_programmed(n, kept.len(), Duration::from_secs(10))
            .expect("endpoint removal programmed");
    }
    let took = t0.elapsed();
    println!("endpoint removal through the API server programmed on both nodes in {took:?}");
    assert!(
        took <= Duration::from_secs(2),
        "an endpoint change takes effect within 2 s, took {took:?}"
    );
    for pod in ["client", "hostnames-c"] {
        let answers = spread(&c, pod, 30);
        assert!(
            !answers.contains_key(&removed.pod),
            "from {pod}: the removed endpoint gets no new connection: {answers:?}"
        );
    }
    for (i, n) in NODES.into_iter().enumerate() {
        // Observed right after the write, so it is there once the maps show the change.
        let after = c.metrics_histogram(n, PROGRAMMING).expect("metrics");
        println!(
            "node{n}: {PROGRAMMING} count {} -> {}, sum {:.3} s -> {:.3} s",
            before[i].0, after.0, before[i].1, after.1
        );
        assert_eq!(
            after.0,
            before[i].0 + 1,
            "node{n}: one endpoint change, one network programming observation"
        );
        let latency = after.1 - before[i].1;
        assert!(
            (0.0..5.0).contains(&latency),
            "node{n}: programming latency {latency} s"
        );
    }

    // `trace --kubeconfig` reads the same live objects: the kept endpoints only, and it
    // names the Service; with the API server down it says so instead of tracing nothing.
    let t = trace_live(&c, 30);
    assert!(
        t.status.success(),
        "trace: {}",
        String::from_utf8_lossy(&t.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&t.stdout).expect("trace JSON");
    let mut want: Vec<String> = kept.iter().map(|e| format!("{}:9376", e.ip)).collect();
    want.sort();
    assert_eq!(r["verdict"], "forward", "{r}");
    assert_eq!(
        r["endpoints"],
        serde_json::json!(want),
        "the live endpoints: {r}"
    );
    assert_eq!(r["service"], "default/hostnames:tcp", "{r}");
    assert_eq!(r["service_address"], "ClusterIP", "{r}");
    println!("trace --kubeconfig: {r}");
    // Per-service series are opt-in (--metrics-per-service, not given here).
    let (_, text) = c
        .http_get(1, "http://127.0.0.1:10249/metrics")
        .expect("metrics");
    assert!(
        text.contains("ebpf_proxy_datapath_verdicts_total")
            && !text.contains("ebpf_proxy_service_packets_total"),
        "no per-service series by default: {text}"
    );

    // API server down: a manifest edit reaches nobody.
    c.kill_apiserver().expect("kill the API server");
    let t = trace_live(&c, 3);
    let err = String::from_utf8_lossy(&t.stderr);
    assert!(!t.status.success(), "trace without an API server fails");
    assert!(err.contains("--kubeconfig"), "says why: {err}");
    c.set_endpoints(&eps).expect("restore the EndpointSlice");
    std::thread::sleep(Duration::from_millis(1500));
    for n in NODES {
        let got = c
            .programmed_endpoints(n, &format!("{}/TCP", vip()))
            .expect("inspect");
        assert_eq!(
            got.map(|e| e.len()),
            Some(kept.len()),
            "node{n}: nothing changes while the API server is down"
        );
        let (code, body) = c
            .http_get(n, "http://127.0.0.1:10256/healthz")
            .expect("healthz");
        assert_eq!(
            code, 200,
            "node{n}: healthy with the API server down: {body}"
        );
    }
    c.start_apiserver().expect("restart the API server");
    for n in NODES {
        // Reconnecting waits out the watch backoff (up to 30 s) and relists (410 Gone).
        c.wait_programmed(n, eps.len(), Duration::from_secs(45))
            .expect("converged after the API server came back");
    }
}

/// No connection lost, and every one kept talking throughout (100 ms interval; the run lasts
/// a minute).
fn check_report(r: &serde_json::Value, tcp: u64, udp: u64, what: &str) {
    assert_canary_lost_nothing(r, tcp, udp, what);
    let n = |k: &str, f: &str| r[k][f].as_u64().unwrap_or(0);
    assert!(n("tcp", "round_trips") >= tcp * 50, "{what}: {r:#}");
    assert!(n("udp", "round_trips") >= udp * 50, "{what}: {r:#}");
}

/// Every service entry (with its id) and its endpoints on `node`, as `inspect` shows them
/// (without the traffic counters).
fn programmed(c: &Cluster, node: u8) -> serde_json::Value {
    let v = c.inspect(node).expect("inspect");
    v["services"]
        .as_array()
        .expect("inspect lists services")
        .iter()
        .map(|s| serde_json::json!([s["service"], s["id"], s["endpoints"]]))
        .collect()
}

/// The restart canary in Kubernetes mode: 60 TCP connections and 12 UDP flows through a
/// ClusterIP, 12 SIGKILL/restart cycles of both agents, the API server killed for cycles 4-7
/// (agents restart while it is unreachable, so they start without any source). Nothing may
/// be lost, nothing pruned, and /healthz stays 200 throughout.
#[test]
fn sigkill_restarts_with_the_api_server_down_drop_nothing() {
    let (mut c, eps) = up();
    c.start_canary_service(&eps).expect("canary service");
    // New flows from outside need the node's identity (masquerade source, decapsulation
    // address): checked in every cycle, the API server down or not.
    c.start_canary_nodeport(&eps).expect("NodePort canary");
    let encap = c
        .lab
        .spawn(
            &c.lab.ext_ns(),
            &[
                c.bins.tools.display().to_string(),
                "lab-encap".into(),
                "--iface".into(),
                "eth0".into(),
                "--vip".into(),
                CANARY_LB_IP.to_string(),
                "--from".into(),
                proxy_lab::lab::EXT_IP.to_string(),
                "--to".into(),
                proxy_lab::lab::node_ip(1).to_string(),
                "--mode".into(),
                "ipip".into(),
            ],
        )
        .expect("lab-encap");
    let from_outside = |c: &Cluster, what: &str| {
        let ext = c.lab.ext_ns();
        let np = format!("{}:{CANARY_NP_TCP}", proxy_lab::lab::node_ip(1));
        let p = c.probe_in(&ext, &np, false, 5, 2000).expect("probe");
        assert_eq!(p.ok(), 5, "{what}: NodePort from outside: {:?}", p.0);
        assert!(
            !p.seen_by_server()
                .contains_key(&proxy_lab::lab::EXT_IP.to_string()),
            "{what}: NodePort flows masqueraded: {:?}",
            p.0
        );
        let lb = format!("{CANARY_LB_IP}:{CANARY_PORT}");
        let p = c.probe_in(&ext, &lb, false, 5, 2000).expect("probe");
        assert_eq!(p.ok(), 5, "{what}: IPIP-wrapped LB IP: {:?}", p.0);
        assert_eq!(
            p.reply_sources().keys().cloned().collect::<Vec<_>>(),
            vec![lb],
            "{what}: replies from the LB IP"
        );
    };
    let (tcp, udp) = (60, 12);
    let canary = c.start_canary("kube", tcp, udp).expect("canary");
    let service_key = format!("{CANARY_IP}:{CANARY_PORT}/TCP");
    let baseline: Vec<serde_json::Value> = NODES.iter().map(|&n| programmed(&c, n)).collect();
    assert_eq!(
        baseline[0].as_array().map(Vec::len),
        Some(10),
        "hostnames, the canary and canary-np (ClusterIP, NodePort, LB IP), TCP and UDP: {}",
        baseline[0]
    );
    let healthy = |c: &Cluster, n: u8, what: &str| {
        // The health server starts right after the datapath is attached.
        let start = Instant::now();
        loop {
            match c.http_get(n, "http://127.0.0.1:10256/healthz") {
                Ok((200, _)) => return,
                // 0: curl could not connect (the server is not listening yet).
                Ok((code, body)) if code != 0 => {
                    panic!("{what}: node{n} /healthz {code}: {body}")
                }
                r if start.elapsed() > Duration::from_secs(5) => {
                    panic!("{what}: node{n} /healthz: {r:?}\n{}", c.agent_log(n))
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    };

    let cycles = 12;
    let down = 4..=7;
    let mut down_cycles = 0;
    for cycle in 1..=cycles {
        if cycle == *down.start() {
            c.kill_apiserver().expect("kill the API server");
        }
        let unreachable = down.contains(&cycle);
        for n in NODES {
            c.kill_agent(n).expect("kill -9 agent");
        }
        std::thread::sleep(Duration::from_millis(300));
        for n in NODES {
            c.restart_agent(n, Duration::from_secs(20))
                .expect("restart agent");
        }
        for n in NODES {
            healthy(&c, n, &format!("cycle {cycle}"));
        }
        from_outside(&c, &format!("cycle {cycle}"));
        if unreachable {
            down_cycles += 1;
            std::thread::sleep(Duration::from_millis(700));
            for (i, n) in NODES.into_iter().enumerate() {
                let log = c.agent_log(n);
                assert!(
                    !log.contains("synced "),
                    "cycle {cycle}: node{n} synced with the API server down:\n{log}"
                );
                assert_eq!(
                    programmed(&c, n),
                    baseline[i],
                    "cycle {cycle}: node{n} pruned nothing with the API server down"
                );
                healthy(&c, n, &format!("cycle {cycle}, API server down"));
            }
        } else {
            for n in NODES {
                // Back to normal: the new agent synced from the API (a no-op plan).
                c.wait_agent_log(n, "synced ", Duration::from_secs(45))
                    .expect("synced from the API server");
                c.wait_service_endpoints(n, &service_key, eps.len(), Duration::from_secs(5))
                    .expect("canary endpoints programmed");
            }
        }
        if cycle == *down.end() {
            c.start_apiserver().expect("restart the API server");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    c.lab.stop(encap).expect("stop lab-encap");
    let decap: u64 = NODES
        .iter()
        .map(|&n| {
            let v = c.inspect(n).expect("inspect");
            v["counters"]["xdp_decapsulated"].as_u64().unwrap_or(0)
                + v["counters"]["decapsulated"].as_u64().unwrap_or(0)
        })
        .sum();
    assert!(
        decap >= 5,
        "the LB IP probes were wrapped: {decap} decapsulated"
    );
    assert!(
        down_cycles >= 3,
        "{down_cycles} cycles with the API server down"
    );
    for (i, n) in NODES.into_iter().enumerate() {
        assert_eq!(programmed(&c, n), baseline[i], "node{n} ends as it began");
    }
    let r = c.finish_canary(canary).expect("canary report");
    check_report(
        &r,
        tcp as u64,
        udp as u64,
        &format!(
            "{cycles} SIGKILL+restart cycles of both agents ({down_cycles} with the API server \
             down)"
        ),
    );
}
