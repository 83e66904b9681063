//! A two-node "cluster" in the lab: pods serving their names, an ebpf-proxy agent in each node
//! namespace reading a manifests directory, and helpers to probe services from pods. Shared by
//! `cargo xtask demo` and the end-to-end tests.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::lab::{Lab, LabSpec, NODES, POD_SERVER_PORT};

/// The demo service's ClusterIP and port.
pub const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const SERVICE_PORT: u16 = 80;

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

/// The lab with agents running.
pub struct Cluster {
    pub lab: Lab,
    pub bin: PathBuf,
    pub manifests: PathBuf,
    agents: BTreeMap<u8, u32>,
}

impl Cluster {
    /// Brings up the lab, starts the pod servers, writes the manifests and starts both agents.
    /// Returns once both agents have programmed the service with `endpoints.len()` endpoints.
    pub fn up(
        bin: &Path,
        spec: &LabSpec,
        endpoints: &[Endpoint],
        say: &dyn Fn(&str),
    ) -> Result<Self> {
        Self::up_from(bin, spec, endpoints, None, say)
    }

    /// Like [`Cluster::up`], but copies the manifests from `src` (YAML files) instead of
    /// generating them; `endpoints` must describe what `src` holds.
    pub fn up_from(
        bin: &Path,
        spec: &LabSpec,
        endpoints: &[Endpoint],
        src: Option<&Path>,
        say: &dyn Fn(&str),
    ) -> Result<Self> {
        say("creating the lab: router, node1, node2, external client, pods on cbr0 bridges");
        let lab = Lab::up(None, spec)?;
        say("starting serve-hostname in every pod (TCP and UDP :9376)");
        lab.start_pod_servers(bin)?;
        let manifests = lab.state_dir().join("manifests");
        fs::create_dir_all(&manifests)?;
        match src {
            Some(src) => {
                say(&format!("copying the manifests from {}", src.display()));
                for e in fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
                    let p = e?.path();
                    if p.extension().is_some_and(|x| x == "yaml") {
                        fs::copy(&p, manifests.join(p.file_name().context("file name")?))?;
                    }
                }
            }
            None => {
                fs::write(manifests.join("service.yaml"), service_yaml())?;
                fs::write(manifests.join("nodes.yaml"), nodes_yaml())?;
                fs::write(manifests.join("endpointslice.yaml"), slice_yaml(endpoints))?;
            }
        }
        let mut c = Cluster {
            lab,
            bin: fs::canonicalize(bin)?,
            manifests,
            agents: BTreeMap::new(),
        };
        for n in NODES {
            c.start_agent(n)?;
        }
        say("agents started in node1 and node2; waiting for them to program the maps");
        let want = endpoints.iter().filter(|e| e.ready).count();
        for n in NODES {
            c.wait_programmed(n, want, Duration::from_secs(20))?;
        }
        Ok(c)
    }

    pub fn start_agent(&mut self, node: u8) -> Result<u32> {
        let bpffs = self.lab.bpffs(node);
        let args: Vec<String> = vec![
            self.bin.display().to_string(),
            "run".into(),
            "--manifests".into(),
            self.manifests.display().to_string(),
            "--node-name".into(),
            format!("node{node}"),
            "--bpffs".into(),
            bpffs.display().to_string(),
            "--cluster-cidr".into(),
            "10.76.0.0/16".into(),
        ];
        let pid = self.lab.spawn(&self.lab.node_ns(node), &args)?;
        self.agents.insert(node, pid);
        Ok(pid)
    }

    pub fn agent_log(&self, node: u8) -> String {
        self.agents
            .get(&node)
            .and_then(|pid| self.lab.log_path(*pid))
            .and_then(|p| fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// `ebpf-proxy inspect --json` against node `node`'s pins.
    pub fn inspect(&self, node: u8) -> Result<serde_json::Value> {
        let out = std::process::Command::new(&self.bin)
            .args(["inspect", "--json", "--bpffs"])
            .arg(self.lab.bpffs(node))
            .output()?;
        if !out.status.success() {
            bail!("inspect failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Waits until node `node`'s TCP entry of the service has `want` endpoints.
    pub fn wait_programmed(&self, node: u8, want: usize, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        let key = format!("{CLUSTER_IP}:{SERVICE_PORT}/TCP");
        loop {
            if let Some(pid) = self.agents.get(&node)
                && let Some(st) = self.lab.child_status(*pid)?
            {
                bail!(
                    "agent on node{node} exited ({st}):\n{}",
                    self.agent_log(node)
                );
            }
            if let Ok(v) = self.inspect(node) {
                let n = v["services"].as_array().and_then(|s| {
                    s.iter()
                        .find(|x| x["service"] == key.as_str())
                        .and_then(|x| x["endpoints"].as_array())
                        .map(|e| e.len())
                });
                if n == Some(want) {
                    return Ok(start.elapsed());
                }
            }
            if start.elapsed() > timeout {
                bail!(
                    "node{node} did not program {want} endpoints within {timeout:?}; agent log:\n{}",
                    self.agent_log(node)
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Rewrites the EndpointSlice (as the endpoints controller would after a scale).
    pub fn set_endpoints(&self, endpoints: &[Endpoint]) -> Result<()> {
        let path = self.manifests.join("endpointslice.yaml");
        let tmp = self.manifests.join(".endpointslice.yaml.tmp");
        fs::write(&tmp, slice_yaml(endpoints))?;
        // Atomic replace: the agent never reads a half-written file.
        fs::rename(&tmp, &path).context("replacing the EndpointSlice manifest")?;
        Ok(())
    }

    /// `ebpf-proxy probe` from inside pod `pod`.
    pub fn probe(&self, pod: &str, target: &str, udp: bool, count: u32) -> Result<Probe> {
        let mut args: Vec<String> = vec![
            self.bin.display().to_string(),
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
        let out = self.lab.exec(&self.lab.pod_ns(pod), &args)?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "probe output: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        Ok(Probe(v))
    }
}

/// A probe report (the JSON of `ebpf-proxy probe --json`).
#[derive(Debug)]
pub struct Probe(pub serde_json::Value);

impl Probe {
    fn map(&self, k: &str) -> BTreeMap<String, u64> {
        self.0[k]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default()
    }
    pub fn sent(&self) -> u64 {
        self.0["sent"].as_u64().unwrap_or(0)
    }
    pub fn ok(&self) -> u64 {
        self.0["ok"].as_u64().unwrap_or(0)
    }
    /// Pod name -> answers.
    pub fn answers(&self) -> BTreeMap<String, u64> {
        self.map("answers")
    }
    /// Address the client saw the reply come from -> count.
    pub fn reply_sources(&self) -> BTreeMap<String, u64> {
        self.map("reply_sources")
    }
    pub fn failures(&self) -> BTreeMap<String, u64> {
        self.map("failures")
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The bundled manifests are exactly what the generators produce for the demo lab, so the
    /// demo's scale step (which regenerates the slice) edits what was loaded.
    #[test]
    fn bundled_demo_manifests_match_the_generators() {
        let dir = demo_manifests_dir();
        let eps = hostnames_endpoints(&LabSpec::default_demo());
        for (file, want) in [
            ("service.yaml", service_yaml()),
            ("endpointslice.yaml", slice_yaml(&eps)),
            ("nodes.yaml", nodes_yaml()),
        ] {
            let got = fs::read_to_string(dir.join(file)).expect("bundled manifest");
            assert_eq!(
                got, want,
                "{file} differs from the generator; regenerate it"
            );
        }
    }
}
