//! The cluster's API objects as YAML: the demo and canary Services, EndpointSlices (with
//! explicit endpoint conditions) and Nodes, and rewriting them under running agents.
use super::*;

/// The canary Service and its EndpointSlice (TCP and UDP, `endpoints` all ready).
pub fn canary_yaml(endpoints: &[Endpoint]) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: canary\n  namespace: default\n\
         spec:\n  type: ClusterIP\n  clusterIP: {CANARY_IP}\n  clusterIPs: [\"{CANARY_IP}\"]\n\
         \x20 ports:\n  - name: tcp\n    protocol: TCP\n    port: {CANARY_PORT}\n    targetPort: {CANARY_POD_PORT}\n\
         \x20 - name: udp\n    protocol: UDP\n    port: {CANARY_PORT}\n    targetPort: {CANARY_POD_PORT}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: canary-abcde\n  namespace: default\n\
         \x20 labels:\n    kubernetes.io/service-name: canary\naddressType: IPv4\nports:\n\
         - name: tcp\n  protocol: TCP\n  port: {CANARY_POD_PORT}\n- name: udp\n  protocol: UDP\n  port: {CANARY_POD_PORT}\nendpoints:\n"
    );
    for e in endpoints {
        let _ = write!(
            s,
            "- addresses: [\"{}\"]\n  conditions: {{ready: true, serving: true, terminating: false}}\n  nodeName: node{}\n",
            e.ip, e.node
        );
    }
    s
}

/// The NodePort canary `canary-np` ([`CANARY_NP_IP`], NodePorts [`CANARY_NP_TCP`] and
/// [`CANARY_NP_UDP`], externalTrafficPolicy Cluster) and its EndpointSlice: the canary's echo
/// pods `endpoints` (all ready).
pub fn canary_np_yaml(endpoints: &[Endpoint]) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: canary-np\n  namespace: default\n\
         spec:\n  type: LoadBalancer\n  clusterIP: {CANARY_NP_IP}\n  clusterIPs: [\"{CANARY_NP_IP}\"]\n\
         \x20 externalTrafficPolicy: Cluster\n\
         \x20 ports:\n  - name: tcp\n    protocol: TCP\n    port: {CANARY_PORT}\n    targetPort: {CANARY_POD_PORT}\n    nodePort: {CANARY_NP_TCP}\n\
         \x20 - name: udp\n    protocol: UDP\n    port: {CANARY_PORT}\n    targetPort: {CANARY_POD_PORT}\n    nodePort: {CANARY_NP_UDP}\n\
         status:\n  loadBalancer:\n    ingress:\n    - ip: {CANARY_LB_IP}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: canary-np-abcde\n  namespace: default\n\
         \x20 labels:\n    kubernetes.io/service-name: canary-np\naddressType: IPv4\nports:\n\
         - name: tcp\n  protocol: TCP\n  port: {CANARY_POD_PORT}\n- name: udp\n  protocol: UDP\n  port: {CANARY_POD_PORT}\nendpoints:\n"
    );
    for e in endpoints {
        let _ = write!(
            s,
            "- addresses: [\"{}\"]\n  conditions: {{ready: true, serving: true, terminating: false}}\n  nodeName: node{}\n",
            e.ip, e.node
        );
    }
    s
}

/// One endpoint of the `hostnames` service.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub pod: String,
    pub ip: Ipv4Addr,
    pub node: u8,
    pub ready: bool,
}

/// The Service (TCP and UDP on port 80 -> 9376), as `kubectl expose` would make it.
pub fn service_yaml() -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: hostnames\n  namespace: default\n\
         spec:\n  type: ClusterIP\n  clusterIP: {CLUSTER_IP}\n  clusterIPs: [\"{CLUSTER_IP}\"]\n  selector:\n    app: hostnames\n\
         \x20 ports:\n  - name: tcp\n    protocol: TCP\n    port: {SERVICE_PORT}\n    targetPort: {POD_SERVER_PORT}\n\
         \x20 - name: udp\n    protocol: UDP\n    port: {SERVICE_PORT}\n    targetPort: {POD_SERVER_PORT}\n"
    )
}

/// The EndpointSlice the endpoints controller would write for `endpoints`.
pub fn slice_yaml(endpoints: &[Endpoint]) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: hostnames-x7k2p\n  namespace: default\n\
         \x20 labels:\n    kubernetes.io/service-name: hostnames\naddressType: IPv4\nports:\n\
         - name: tcp\n  protocol: TCP\n  port: {POD_SERVER_PORT}\n- name: udp\n  protocol: UDP\n  port: {POD_SERVER_PORT}\n"
    );
    if endpoints.is_empty() {
        s.push_str("endpoints: []\n");
        return s;
    }
    s.push_str("endpoints:\n");
    for e in endpoints {
        let _ = write!(
            s,
            "- addresses: [\"{}\"]\n  conditions: {{ready: {}, serving: {}, terminating: false}}\n  nodeName: node{}\n  targetRef: {{kind: Pod, namespace: default, name: {}}}\n",
            e.ip, e.ready, e.ready, e.node, e.pod
        );
    }
    s
}

/// Node objects for both lab nodes.
pub fn nodes_yaml() -> String {
    NODES
        .iter()
        .map(|n| {
            format!(
                "apiVersion: v1\nkind: Node\nmetadata:\n  name: node{n}\n  labels:\n    topology.kubernetes.io/zone: zone-{n}\n\
                 spec:\n  podCIDR: {}\nstatus:\n  addresses:\n  - type: InternalIP\n    address: {}\n  - type: Hostname\n    address: node{n}\n",
                crate::lab::node_pod_cidr(*n),
                crate::lab::node_ip(*n)
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// The demo's endpoints: the `hostnames-*` pods of a lab spec, all ready.
pub fn hostnames_endpoints(spec: &LabSpec) -> Vec<Endpoint> {
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

/// Where the bundled demo manifests live.
pub fn demo_manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/demo")
}

/// The `conditions` of one endpoint in a generated EndpointSlice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conditions {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Conditions {
    pub const READY: Self = Self {
        ready: true,
        serving: true,
        terminating: false,
    };
    /// What the EndpointSlice controller writes for a pod in graceful shutdown that still
    /// passes its readiness probe.
    pub const TERMINATING_SERVING: Self = Self {
        ready: false,
        serving: true,
        terminating: true,
    };
    /// A terminating pod that stopped serving.
    pub const TERMINATING_NOT_SERVING: Self = Self {
        ready: false,
        serving: false,
        terminating: true,
    };

    /// What [`slice_yaml`] writes for `e`.
    pub const fn of(e: &Endpoint) -> Self {
        Self {
            ready: e.ready,
            serving: e.ready,
            terminating: false,
        }
    }
}

fn endpoints_yaml(s: &mut String, endpoints: &[(Endpoint, Conditions)]) {
    if endpoints.is_empty() {
        s.push_str("endpoints: []\n");
        return;
    }
    s.push_str("endpoints:\n");
    for (e, c) in endpoints {
        let _ = write!(
            s,
            "- addresses: [\"{}\"]\n  conditions: {{ready: {}, serving: {}, terminating: {}}}\n  nodeName: node{}\n  targetRef: {{kind: Pod, namespace: default, name: {}}}\n",
            e.ip, c.ready, c.serving, c.terminating, e.node, e.pod
        );
    }
}

/// [`slice_yaml`] with explicit conditions per endpoint.
pub fn slice_yaml_with(endpoints: &[(Endpoint, Conditions)]) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: hostnames-x7k2p\n  namespace: default\n\
         \x20 labels:\n    kubernetes.io/service-name: hostnames\naddressType: IPv4\nports:\n\
         - name: tcp\n  protocol: TCP\n  port: {POD_SERVER_PORT}\n- name: udp\n  protocol: UDP\n  port: {POD_SERVER_PORT}\n"
    );
    endpoints_yaml(&mut s, endpoints);
    s
}

/// The canary's EndpointSlice alone, with explicit conditions per endpoint (the Service is
/// in [`canary_yaml`]).
pub fn canary_slice_yaml_with(endpoints: &[(Endpoint, Conditions)]) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: canary-abcde\n  namespace: default\n\
         \x20 labels:\n    kubernetes.io/service-name: canary\naddressType: IPv4\nports:\n\
         - name: tcp\n  protocol: TCP\n  port: {CANARY_POD_PORT}\n- name: udp\n  protocol: UDP\n  port: {CANARY_POD_PORT}\n"
    );
    endpoints_yaml(&mut s, endpoints);
    s
}

/// Endpoint-condition changes (terminating endpoints) for the end-to-end tests.
impl Cluster {
    pub(crate) fn write_manifest(&self, name: &str, text: &str) -> Result<()> {
        let tmp = self.manifests.join(format!(".{name}.tmp"));
        fs::write(&tmp, text)?;
        // Atomic replace: the agent never reads a half-written file.
        fs::rename(&tmp, self.manifests.join(name))
            .with_context(|| format!("replacing the {name} manifest"))
    }

    /// [`Cluster::set_endpoints`] with explicit conditions per endpoint.
    pub fn set_endpoints_with(&self, endpoints: &[(Endpoint, Conditions)]) -> Result<()> {
        self.write_manifest("endpointslice.yaml", &slice_yaml_with(endpoints))
    }

    /// Rewrites the canary's EndpointSlice (after [`Cluster::start_canary_service`]): its
    /// Service stays, its slice becomes `endpoints`.
    pub fn set_canary_endpoints(&self, endpoints: &[(Endpoint, Conditions)]) -> Result<()> {
        let service = canary_yaml(&[]);
        let service = service
            .split("---\n")
            .next()
            .context("canary Service manifest")?;
        self.write_manifest(
            "canary.yaml",
            &format!("{service}---\n{}", canary_slice_yaml_with(endpoints)),
        )
    }

    /// The endpoints (`ip:port`, one per slot) node `node` programmed for `service`
    /// (`ip:port/PROTO` as `inspect` names it); `None` when there is no such entry.
    pub fn programmed_endpoints(&self, node: u8, service: &str) -> Result<Option<Vec<String>>> {
        let v = self.inspect(node)?;
        Ok(v["services"].as_array().and_then(|s| {
            s.iter()
                .find(|x| x["service"] == service)
                .and_then(|x| x["endpoints"].as_array())
                .map(|e| {
                    e.iter()
                        .map(|x| x.as_str().unwrap_or_default().to_owned())
                        .collect()
                })
        }))
    }

    /// Waits until node `node` programmed `service` with exactly `want` endpoints.
    pub fn wait_service_endpoints(
        &self,
        node: u8,
        service: &str,
        want: usize,
        timeout: Duration,
    ) -> Result<Duration> {
        let start = Instant::now();
        loop {
            if let Ok(Some(eps)) = self.programmed_endpoints(node, service)
                && eps.len() == want
            {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!(
                    "node{node} did not program {want} endpoints for {service} within {timeout:?}; agent log:\n{}",
                    self.agent_log(node)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
