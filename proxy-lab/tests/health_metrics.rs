//! `/healthz`, `/livez` and `/metrics` of a running agent in the namespace lab. Needs root.
use std::{fs, time::Duration};

use proxy_lab::{
    cluster::{Binaries, CLUSTER_IP, Cluster, SERVICE_PORT, hostnames_endpoints},
    lab::LabSpec,
};

fn bins() -> Binaries {
    proxy_lab::cluster::test_binaries()
}

/// The value of the first sample line starting with `prefix` (name plus labels).
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn health_and_metrics_endpoints_of_a_running_agent() {
    let spec = LabSpec::default_demo();
    let eps = hostnames_endpoints(&spec);
    let c = Cluster::up(&bins(), &spec, &eps, &|m| eprintln!("{m}")).expect("cluster up");
    let p = c
        .probe("client", &format!("{CLUSTER_IP}:{SERVICE_PORT}"), false, 50)
        .expect("probe");
    assert_eq!(p.ok(), 50, "{:?}", p.0);

    for path in ["/healthz", "/livez"] {
        let (code, body) = c
            .http_get(1, &format!("http://127.0.0.1:10256{path}"))
            .expect("healthz");
        assert_eq!(code, 200, "{path}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert!(
            v["lastUpdated"].as_str().is_some_and(|s| !s.is_empty()),
            "{path}: {body}"
        );
    }

    let (code, text) = c
        .http_get(1, "http://127.0.0.1:10249/metrics")
        .expect("metrics");
    assert_eq!(code, 200, "{text}");
    let syncs = sample(&text, "kubeproxy_sync_proxy_rules_duration_seconds_count").unwrap_or(0.0);
    assert!(syncs >= 1.0, "{text}");
    assert!(
        sample(&text, "kubeproxy_sync_proxy_rules_last_timestamp_seconds ").unwrap_or(0.0) > 1.7e9,
        "{text}"
    );
    let new = sample(
        &text,
        "ebpf_proxy_datapath_packets_total{reason=\"forward_new\"}",
    )
    .unwrap_or(0.0);
    assert!(new >= 50.0, "50 new connections counted: {text}");
    assert!(
        sample(&text, "ebpf_proxy_map_entries{map=\"CT4_V3\"}").unwrap_or(0.0) >= 2.0,
        "{text}"
    );
    assert!(
        sample(&text, "ebpf_proxy_map_capacity{map=\"CT4_V3\"}").unwrap_or(0.0) > 0.0,
        "{text}"
    );
    let ports = spec.pods.iter().filter(|p| p.node == 1).count() as f64;
    assert_eq!(
        sample(&text, "ebpf_proxy_attached_links "),
        Some(2.0 * ports),
        "{text}"
    );
    println!(
        "metrics: {syncs} syncs, {new} new flows, {} conntrack entries",
        sample(&text, "ebpf_proxy_map_entries{map=\"CT4_V3\"}").unwrap_or(0.0)
    );

    // Per-service counters: every forward packet of the 50 connections (at least their SYNs)
    // counted under the service port's labels; more traffic makes them grow.
    const SVC_PKTS: &str = "ebpf_proxy_service_packets_total{namespace=\"default\",service=\"hostnames\",port=\"tcp\",protocol=\"TCP\"}";
    const SVC_BYTES: &str = "ebpf_proxy_service_bytes_total{namespace=\"default\",service=\"hostnames\",port=\"tcp\",protocol=\"TCP\"}";
    let pkts = sample(&text, SVC_PKTS).unwrap_or(0.0);
    let bytes = sample(&text, SVC_BYTES).unwrap_or(0.0);
    assert!(pkts >= 50.0, "50 connections' packets counted: {text}");
    assert!(
        bytes >= 50.0 * 40.0,
        "bytes counted (>= 40 per packet): {text}"
    );
    assert_eq!(
        sample(
            &text,
            "ebpf_proxy_service_packets_total{namespace=\"default\",service=\"hostnames\",port=\"udp\",protocol=\"UDP\"}"
        ),
        Some(0.0),
        "the UDP port is programmed, with no traffic yet: {text}"
    );
    let p = c
        .probe("client", &format!("{CLUSTER_IP}:{SERVICE_PORT}"), false, 20)
        .expect("probe");
    assert_eq!(p.ok(), 20, "{:?}", p.0);
    let (_, text) = c
        .http_get(1, "http://127.0.0.1:10249/metrics")
        .expect("metrics");
    let pkts2 = sample(&text, SVC_PKTS).unwrap_or(0.0);
    assert!(
        pkts2 >= pkts + 20.0,
        "20 more connections: {pkts} -> {pkts2} packets"
    );
    assert!(sample(&text, SVC_BYTES).unwrap_or(0.0) > bytes, "{text}");
    println!("per-service counters: {pkts} -> {pkts2} packets");

    // The cluster autoscaler marks node1 for deletion: /healthz says not eligible (503) so load
    // balancers drain it, as kube-proxy 1.30+ does; /livez stays 200 (the agent is fine).
    let nodes = fs::read_to_string(c.manifests.join("nodes.yaml")).expect("nodes.yaml");
    let tainted = {
        // node1 comes first in nodes.yaml: its `spec:` is the first one.
        let at = nodes.find("spec:\n").expect("node1 spec");
        let mut t = nodes.clone();
        t.insert_str(
            at + "spec:\n".len(),
            "  taints:\n  - key: ToBeDeletedByClusterAutoscaler\n    effect: NoSchedule\n",
        );
        t
    };
    fs::write(c.manifests.join("nodes.yaml"), &tainted).expect("taint node1");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (code, body) = c
            .http_get(1, "http://127.0.0.1:10256/healthz")
            .expect("healthz");
        if code == 503 {
            break body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "healthz still {code} 10 s after node1 was tainted for deletion: {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["nodeEligible"], serde_json::Value::Bool(false), "{body}");
    let (code, body) = c
        .http_get(1, "http://127.0.0.1:10256/livez")
        .expect("livez");
    assert_eq!(code, 200, "livez ignores node eligibility: {body}");
    fs::write(c.manifests.join("nodes.yaml"), &nodes).expect("untaint node1");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while c
        .http_get(1, "http://127.0.0.1:10256/healthz")
        .expect("healthz")
        .0
        != 200
    {
        assert!(
            std::time::Instant::now() < deadline,
            "healthz not 200 again after the taint was removed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The source goes away (an unreachable API server): nothing is queued, so still healthy.
    let away = c.lab.state_dir().join("manifests.away");
    fs::rename(&c.manifests, &away).expect("hide manifests");
    std::thread::sleep(Duration::from_secs(1));
    let (code, body) = c
        .http_get(1, "http://127.0.0.1:10256/healthz")
        .expect("healthz");
    assert_eq!(code, 200, "healthy while the source is unreachable: {body}");
    fs::rename(&away, &c.manifests).expect("restore manifests");

    // Metrics are bound to loopback by default (kube-proxy's default): not on the node IP.
    let node_ip = proxy_lab::lab::node_ip(1);
    assert!(
        c.http_get(1, &format!("http://{node_ip}:10249/metrics"))
            .is_err()
            || c.http_get(1, &format!("http://{node_ip}:10249/metrics"))
                .is_ok_and(|(code, _)| code == 0),
        "metrics must not listen on {node_ip}"
    );
    // Health listens on every address.
    let (code, _) = c
        .http_get(1, &format!("http://{node_ip}:10256/livez"))
        .expect("livez on the node IP");
    assert_eq!(code, 200);
}
