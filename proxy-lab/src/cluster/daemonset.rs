//! Agents started as the rendered DaemonSet's container ([`Cluster::up_kube_daemonset`]):
//! what each lab node gives the pod (hostPaths, the service account, its name and address)
//! and the launch in the node's namespace ([`crate::daemonset::launch_argv`]).
use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::ConfigMap};

use super::*;
use crate::daemonset::{self as ds, ContainerRun, Image, NodeContext};

/// The DaemonSet, the image its container runs and the ConfigMaps of its namespace.
#[derive(Clone, Debug)]
pub struct DaemonSetAgent {
    pub daemonset: DaemonSet,
    pub image: Image,
    pub config_maps: Vec<ConfigMap>,
}

/// The `kubernetes` Service's ClusterIP in the lab's service CIDR (its env vars only: the
/// agent must not need it).
pub const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";

/// The service account token file's content (no trailing newline, as the kubelet writes
/// it). The lab API server takes any token.
pub const LAB_SERVICE_ACCOUNT_TOKEN: &str = "lab-service-account-token";

impl Cluster {
    /// What the kubelet of lab node `node` knows: its name and address, the DaemonSet's
    /// ConfigMaps, the service account volume, and the node's paths for the hostPath volumes
    /// (`/sys/fs/bpf` is the node's own bpffs, `/sys/fs/cgroup` its cgroup).
    pub fn node_context(&self, node: u8) -> Result<NodeContext> {
        let d = self
            .daemonset
            .as_ref()
            .context("not a DaemonSet cluster (Cluster::up_kube_daemonset)")?;
        let sa = [
            ("token", LAB_SERVICE_ACCOUNT_TOKEN),
            // The lab API server speaks plain HTTP, so no CA is ever used; the file must
            // exist all the same (the kubeconfig names it).
            ("ca.crt", "# lab: the API server is plain HTTP, no CA\n"),
            ("namespace", "kube-system"),
        ];
        Ok(NodeContext {
            node_name: format!("node{node}"),
            node_ip: crate::lab::node_ip(node).to_string(),
            config_maps: d.config_maps.clone(),
            host_paths: [
                ("/sys/fs/bpf".to_owned(), self.lab.bpffs(node)),
                ("/sys/fs/cgroup".to_owned(), self.lab.node_cgroup(node)),
            ]
            .into(),
            service_account: sa
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            kubernetes_service_ip: KUBERNETES_SERVICE_IP.into(),
        })
    }

    /// The container as it runs on `node`.
    pub fn container_run(&self, node: u8) -> Result<ContainerRun> {
        let d = self
            .daemonset
            .as_ref()
            .context("not a DaemonSet cluster (Cluster::up_kube_daemonset)")?;
        ds::container_run(&d.daemonset, &d.image, &self.node_context(node)?)
    }

    /// The pod's directory on the node: `volumes/<name>` (ConfigMap files, emptyDirs),
    /// `root` (the mount point of the container's root).
    pub fn pod_dir(&self, node: u8) -> PathBuf {
        self.lab.state_dir().join(format!("daemonset-node{node}"))
    }

    /// The argv that starts the container on `node` (run in its namespace).
    pub(super) fn daemonset_launch(&self, node: u8) -> Result<Vec<String>> {
        let run = self.container_run(node)?;
        let dir = self.pod_dir(node);
        let root = dir.join("root");
        fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let binds = ds::materialize(&run, &dir.join("volumes"))?;
        ds::launch_argv(&run, &root, &self.bins.agent, &binds)
    }
}
