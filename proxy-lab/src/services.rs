//! Service manifests for the north-south and policy tests: a LoadBalancer with NodePorts, an
//! externalTrafficPolicy Local one, one with loadBalancerSourceRanges, and one without
//! endpoints. All reuse the lab's `hostnames-*` pods as endpoints.
use std::{fmt::Write as _, net::Ipv4Addr, time::Duration};

use anyhow::{Result, bail};

use crate::{
    cluster::{Cluster, Endpoint},
    lab::POD_SERVER_PORT,
};

/// One test service.
pub struct Svc {
    pub name: &'static str,
    pub cluster_ip: Ipv4Addr,
    pub lb_ip: Option<Ipv4Addr>,
    pub node_port_tcp: Option<u16>,
    pub node_port_udp: Option<u16>,
    pub local: bool,
    pub source_ranges: &'static [&'static str],
    pub health_check_node_port: Option<u16>,
}

pub const WEB: Svc = Svc {
    name: "web",
    cluster_ip: Ipv4Addr::new(10, 96, 0, 20),
    lb_ip: Some(Ipv4Addr::new(203, 0, 113, 10)),
    node_port_tcp: Some(30080),
    node_port_udp: Some(30081),
    local: false,
    source_ranges: &[],
    health_check_node_port: None,
};
pub const LOCAL: Svc = Svc {
    name: "local",
    cluster_ip: Ipv4Addr::new(10, 96, 0, 30),
    lb_ip: Some(Ipv4Addr::new(203, 0, 113, 20)),
    node_port_tcp: Some(30090),
    node_port_udp: Some(30091),
    local: true,
    source_ranges: &[],
    health_check_node_port: Some(32000),
};
pub const RANGES: Svc = Svc {
    name: "ranges",
    cluster_ip: Ipv4Addr::new(10, 96, 0, 50),
    lb_ip: Some(Ipv4Addr::new(203, 0, 113, 30)),
    node_port_tcp: Some(30100),
    node_port_udp: Some(30101),
    local: false,
    source_ranges: &["198.51.100.0/24", "10.76.0.0/16"],
    health_check_node_port: None,
};
pub const EMPTY: Svc = Svc::cluster_ip_only("empty", Ipv4Addr::new(10, 96, 0, 40));

impl Svc {
    /// A plain ClusterIP service: no NodePort, LB IP, policy or source ranges.
    pub const fn cluster_ip_only(name: &'static str, ip: Ipv4Addr) -> Svc {
        Svc {
            name,
            cluster_ip: ip,
            lb_ip: None,
            node_port_tcp: None,
            node_port_udp: None,
            local: false,
            source_ranges: &[],
            health_check_node_port: None,
        }
    }

    /// The Service and its EndpointSlice, ports 80 (TCP and UDP) to the pod servers' port.
    pub fn yaml(&self, endpoints: &[Endpoint]) -> String {
        self.yaml_to(endpoints, POD_SERVER_PORT)
    }

    /// Like [`Svc::yaml`], with `target_port` as the endpoints' port. Type LoadBalancer with
    /// an LB IP, else NodePort with node ports, else ClusterIP.
    pub fn yaml_to(&self, endpoints: &[Endpoint], target_port: u16) -> String {
        let ty = if self.lb_ip.is_some() {
            "LoadBalancer"
        } else if self.node_port_tcp.is_some() || self.node_port_udp.is_some() {
            "NodePort"
        } else {
            "ClusterIP"
        };
        let mut s = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {n}\n  namespace: default\nspec:\n  type: {ty}\n\
             \x20 clusterIP: {ip}\n  clusterIPs: [\"{ip}\"]\n  externalTrafficPolicy: {etp}\n",
            n = self.name,
            ip = self.cluster_ip,
            etp = if self.local { "Local" } else { "Cluster" },
        );
        if let Some(p) = self.health_check_node_port {
            let _ = writeln!(s, "  healthCheckNodePort: {p}");
        }
        if !self.source_ranges.is_empty() {
            let _ = writeln!(
                s,
                "  loadBalancerSourceRanges: [{}]",
                self.source_ranges
                    .iter()
                    .map(|r| format!("\"{r}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        s.push_str("  ports:\n");
        for (pname, proto, np) in [
            ("tcp", "TCP", self.node_port_tcp),
            ("udp", "UDP", self.node_port_udp),
        ] {
            let _ = write!(
                s,
                "  - name: {pname}\n    protocol: {proto}\n    port: 80\n    targetPort: {target_port}\n"
            );
            if let Some(np) = np {
                let _ = writeln!(s, "    nodePort: {np}");
            }
        }
        if let Some(lb) = self.lb_ip {
            let _ = write!(
                s,
                "status:\n  loadBalancer:\n    ingress:\n    - ip: {lb}\n      ipMode: VIP\n"
            );
        }
        s.push_str("---\n");
        let _ = write!(
            s,
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {n}-abcde\n  namespace: default\n\
             \x20 labels:\n    kubernetes.io/service-name: {n}\naddressType: IPv4\nports:\n\
             - name: tcp\n  protocol: TCP\n  port: {target_port}\n- name: udp\n  protocol: UDP\n  port: {target_port}\n",
            n = self.name
        );
        if endpoints.is_empty() {
            s.push_str("endpoints: []\n");
        } else {
            s.push_str("endpoints:\n");
            for e in endpoints {
                let _ = write!(
                    s,
                    "- addresses: [\"{}\"]\n  conditions: {{ready: true}}\n  nodeName: node{}\n",
                    e.ip, e.node
                );
            }
        }
        s
    }
}

/// Writes `svc` with `endpoints` into the cluster's manifests directory.
pub fn install(c: &Cluster, svc: &Svc, endpoints: &[Endpoint]) -> Result<()> {
    install_to(c, svc, endpoints, POD_SERVER_PORT)
}

/// [`install`] with `target_port` as the endpoints' port.
pub fn install_to(c: &Cluster, svc: &Svc, endpoints: &[Endpoint], target_port: u16) -> Result<()> {
    let path = c.manifests.join(format!("{}.yaml", svc.name));
    let tmp = c.manifests.join(format!(".{}.yaml.tmp", svc.name));
    std::fs::write(&tmp, svc.yaml_to(endpoints, target_port))?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

/// Waits until node `node` has an entry for `addr:port/TCP` (any endpoint count).
pub fn wait_entry(
    c: &Cluster,
    node: u8,
    addr: Ipv4Addr,
    port: u16,
    timeout: Duration,
) -> Result<()> {
    let key = format!("{addr}:{port}/TCP");
    let start = std::time::Instant::now();
    loop {
        if let Ok(v) = c.inspect(node)
            && v["services"]
                .as_array()
                .is_some_and(|s| s.iter().any(|x| x["service"] == key.as_str()))
        {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!(
                "node{node} never programmed {key}; agent log:\n{}",
                c.agent_log(node)
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}
