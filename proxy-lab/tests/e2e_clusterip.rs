//! End to end in the namespace lab: real TCP and UDP connections from pods to a ClusterIP
//! whose endpoints are on both nodes, through the real agent and programs. Needs root.
use std::time::{Duration, Instant};

use proxy_lab::{
    cluster::{Binaries, CLUSTER_IP, Cluster, Endpoint, SERVICE_PORT},
    lab::LabSpec,
};

fn bins() -> Binaries {
    proxy_lab::cluster::test_binaries()
}

fn endpoints(spec: &LabSpec) -> Vec<Endpoint> {
    spec.pods
        .iter()
        .filter(|p| p.name.starts_with("hostnames-"))
        .map(|p| Endpoint {
            pod: p.name.clone(),
            ip: p.ip,
            node: p.node,
            ready: true,
        })
        .collect()
}

fn up() -> (Cluster, Vec<Endpoint>) {
    let spec = LabSpec::default_demo();
    let eps = endpoints(&spec);
    assert_eq!(eps.len(), 3);
    assert_eq!(
        eps.iter().filter(|e| e.node == 1).count(),
        2,
        "two endpoints on node1, one on node2"
    );
    let c = Cluster::up(&bins(), &spec, &eps, &|m| eprintln!("{m}")).expect("cluster up");
    (c, eps)
}

fn vip() -> String {
    format!("{CLUSTER_IP}:{SERVICE_PORT}")
}

#[test]
fn tcp_connections_to_a_cluster_ip_reach_every_endpoint_on_both_nodes() {
    let (c, eps) = up();
    let n = 240;
    let p = c.probe("client", &vip(), false, n).expect("probe");
    assert_eq!(p.sent(), n as u64);
    assert_eq!(p.ok(), n as u64, "every connection succeeds: {:?}", p.0);
    let answers = p.answers();
    for e in &eps {
        let k = answers.get(&e.pod).copied().unwrap_or(0);
        // Uniform would be 80 each; 40 is far outside random variation.
        assert!(k >= 40, "{} answered only {k} of {n}: {answers:?}", e.pod);
    }
    assert_eq!(
        p.reply_sources().keys().cloned().collect::<Vec<_>>(),
        vec![vip()],
        "the client sees only the VIP as the peer"
    );
    // The agents' status files (what `inspect` names services from) go with the lab.
    let prefix = c.lab.prefix().to_owned();
    let status_dir = std::path::Path::new(proxy_lab::lab::AGENT_STATUS_DIR);
    let files = proxy_lab::lab::agent_status_files(&prefix, status_dir);
    assert_eq!(
        files.len(),
        2,
        "one status file per node's agent: {files:?}"
    );
    drop(c);
    let left = proxy_lab::lab::agent_status_files(&prefix, status_dir);
    assert!(
        left.is_empty(),
        "status files left after teardown: {left:?}"
    );
}

#[test]
fn udp_request_response_through_a_cluster_ip() {
    let (c, eps) = up();
    let n = 90;
    let p = c.probe("client", &vip(), true, n).expect("probe");
    assert_eq!(p.ok(), n as u64, "every UDP request answered: {:?}", p.0);
    assert_eq!(
        p.reply_sources().keys().cloned().collect::<Vec<_>>(),
        vec![vip()],
        "replies come from the VIP"
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

#[test]
fn a_pod_reaches_itself_through_its_service() {
    let (c, eps) = up();
    let n = 90;
    // Mixed: some connections hairpin, the others go to the other endpoints.
    let p = c.probe("hostnames-a", &vip(), false, n).expect("probe");
    assert_eq!(
        p.ok(),
        n as u64,
        "hairpin and non-hairpin connections all succeed: {:?}",
        p.0
    );
    assert!(
        p.answers().get("hostnames-a").copied().unwrap_or(0) > 5,
        "hostnames-a should sometimes answer itself: {:?}",
        p.0
    );
    assert_eq!(
        p.reply_sources().keys().cloned().collect::<Vec<_>>(),
        vec![vip()]
    );
    // Only itself: every connection hairpins, TCP and UDP.
    let me: Vec<Endpoint> = eps
        .iter()
        .filter(|e| e.pod == "hostnames-a")
        .cloned()
        .collect();
    c.set_endpoints(&me).expect("rewrite slice");
    c.wait_programmed(1, 1, Duration::from_secs(5))
        .expect("node1 reprogrammed");
    for udp in [false, true] {
        let p = c.probe("hostnames-a", &vip(), udp, 40).expect("probe");
        assert_eq!(p.ok(), 40, "udp={udp}: {:?}", p.0);
        assert_eq!(
            p.answers().keys().cloned().collect::<Vec<_>>(),
            vec!["hostnames-a".to_owned()]
        );
        assert_eq!(
            p.reply_sources().keys().cloned().collect::<Vec<_>>(),
            vec![vip()],
            "udp={udp}"
        );
        // The server saw the hairpin address (node1's address, as kube-proxy masquerades it,
        // on either topology), never its own address.
        let seen: Vec<String> = p.0["client_addrs_seen_by_server"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        assert_eq!(
            seen,
            vec![proxy_lab::lab::node_ip(1).to_string()],
            "udp={udp}: hairpin SNAT to the node's address"
        );
    }
}

#[test]
fn removing_an_endpoint_is_followed_within_a_second() {
    let (c, eps) = up();
    let removed = eps
        .iter()
        .find(|e| e.pod == "hostnames-b")
        .expect("hostnames-b")
        .clone();
    let rest: Vec<Endpoint> = eps
        .iter()
        .filter(|e| e.pod != removed.pod)
        .cloned()
        .collect();
    let t0 = Instant::now();
    c.set_endpoints(&rest).expect("rewrite slice");
    c.wait_programmed(1, 2, Duration::from_secs(5))
        .expect("node1 reprogrammed");
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "the agent took {took:?} to follow the manifest change"
    );
    for udp in [false, true] {
        let p = c.probe("client", &vip(), udp, 120).expect("probe");
        assert_eq!(p.ok(), 120, "udp={udp}: {:?}", p.0);
        assert_eq!(
            p.answers().get(&removed.pod),
            None,
            "udp={udp}: removed endpoint still answered: {:?}",
            p.0
        );
        assert_eq!(
            p.answers().len(),
            2,
            "udp={udp}: both remaining endpoints answer: {:?}",
            p.0
        );
    }
    // And back: the endpoint returns.
    c.set_endpoints(&eps).expect("rewrite slice");
    c.wait_programmed(1, 3, Duration::from_secs(5))
        .expect("node1 reprogrammed");
    let p = c.probe("client", &vip(), false, 150).expect("probe");
    assert!(
        p.answers().get(&removed.pod).copied().unwrap_or(0) > 10,
        "endpoint back in rotation: {:?}",
        p.0
    );
}

/// kube-proxy's flags on the real agent: `--detect-local-mode=NodeCIDR` programs this node's
/// Node.spec.podCIDR as the local range (pods are not masqueraded: the backend sees the
/// client's own address), `--v=4` turns debug logs on, `--logging-format=json` writes one JSON
/// object per line, and a flag that cannot apply is named in a warning, never a refusal.
#[test]
fn kube_proxy_flags_on_the_real_agent() {
    let (mut c, _eps) = up();
    c.agent_args = [
        "--detect-local-mode=NodeCIDR",
        "--v=4",
        "--logging-format=json",
        "--proxy-mode=iptables",
        "--masquerade-all=false",
    ]
    .map(String::from)
    .to_vec();
    for n in proxy_lab::lab::NODES {
        c.stop_agent(n).expect("SIGTERM");
        c.restart_agent(n, Duration::from_secs(20))
            .expect("restart with kube-proxy's flags");
        let want = format!(
            "local traffic (NodeCIDR): sources in {}",
            proxy_lab::lab::node_pod_cidr(n)
        );
        c.wait_agent_log(n, &want, Duration::from_secs(10))
            .expect("the Node's podCIDR programmed as local");
        let log = c.agent_log(n);
        let lines: Vec<serde_json::Value> = log
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        for l in &lines {
            for k in ["ts", "level", "msg", "target"] {
                assert!(l[k].is_string(), "{k} missing: {l}");
            }
        }
        assert!(
            lines.iter().any(|l| l["level"] == "warn"
                && l["msg"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("--proxy-mode: ignored"))),
            "node{n}: {log}"
        );
        assert!(
            lines.iter().any(|l| l["level"] == "debug"),
            "node{n}: --v=4 logs debug: {log}"
        );
    }
    let spec = LabSpec::default_demo();
    let client = spec
        .pods
        .iter()
        .find(|p| p.name == "client")
        .expect("client pod");
    let p = c.probe("client", &vip(), false, 30).expect("probe");
    assert_eq!(p.ok(), 30, "{:?}", p.0);
    let seen: Vec<String> = p.0["client_addrs_seen_by_server"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    assert_eq!(
        seen,
        vec![client.ip.to_string()],
        "a pod inside the node's podCIDR is local: not masqueraded"
    );
}
