//! Builders for the API objects the tests feed to the agent, as JSON (so hostile variants
//! that no typed struct can hold are easy to make).
#![allow(dead_code, reason = "each test binary uses a different part")]

use serde_json::{Value, json};

/// A ClusterIP Service `ns/name` with one IP and `(port name, port, protocol)` ports.
pub fn service(ns: &str, name: &str, cluster_ip: &str, ports: &[(&str, i64, &str)]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto, "targetPort": p}))
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": ns, "name": name},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                 "ports": ports}
    })
}

/// An IPv4 EndpointSlice `ns/name` of Service `service` with ready endpoints at `ips`.
pub fn slice(
    ns: &str,
    name: &str,
    service: &str,
    ports: &[(&str, i64, &str)],
    ips: &[String],
) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto}))
        .collect();
    let endpoints: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": "node1"}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": ns, "name": name,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints
    })
}

/// A Node with one InternalIP.
pub fn node(name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]}
    })
}

/// `n` distinct addresses in 10.200.0.0/16 and up, starting at `10.200.0.1`.
pub fn ips(n: usize) -> Vec<String> {
    (1..=n)
        .map(|i| {
            let i = i as u32 + (10 << 24 | 200 << 16);
            std::net::Ipv4Addr::from(i).to_string()
        })
        .collect()
}

pub fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}
