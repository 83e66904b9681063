//! Kubernetes mode: `ebpf-proxy-lab lab-apiserver` serving the manifests directory to agents
//! on `--kubeconfig`, and the agents' metrics histograms (network programming latency).
use super::*;

/// Kubernetes mode ([`Cluster::up_kube`]): the lab API server.
impl Cluster {
    /// The lab API server, in Kubernetes mode.
    pub fn apiserver(&self) -> Option<&LabApiServer> {
        self.kube.as_ref()
    }

    /// Starts (again) the lab API server and waits until it answers a list from node1's
    /// namespace. A restart hands out larger resourceVersions, so watchers relist.
    pub fn start_apiserver(&mut self) -> Result<u32> {
        let kubeconfig = self
            .kube
            .as_ref()
            .context("not a Kubernetes-mode cluster (Cluster::up_kube)")?
            .kubeconfig
            .clone();
        let (ip, port) = API_SERVER_ADDR;
        let args: Vec<String> = vec![
            self.bins.tools.display().to_string(),
            "lab-apiserver".into(),
            "--manifests".into(),
            self.manifests.display().to_string(),
            "--listen".into(),
            format!("{ip}:{port}"),
            "--kubeconfig-out".into(),
            kubeconfig.display().to_string(),
        ];
        let pid = self.lab.spawn(&self.lab.router_ns(), &args)?;
        if let Some(k) = self.kube.as_mut() {
            k.pid = Some(pid);
        }
        let url = format!("http://{ip}:{port}/api/v1/nodes");
        let start = Instant::now();
        loop {
            if let Some(st) = self.lab.child_status(pid)? {
                bail!("lab-apiserver exited ({st}):\n{}", self.apiserver_log());
            }
            if kubeconfig.is_file() && matches!(self.http_get(1, &url), Ok((200, _))) {
                return Ok(pid);
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!(
                    "lab-apiserver did not answer {url} from node1 within 10 s:\n{}",
                    self.apiserver_log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs the lab API server: every watch breaks and new connections are refused.
    pub fn kill_apiserver(&mut self) -> Result<()> {
        let pid = self
            .kube
            .as_mut()
            .and_then(|k| k.pid.take())
            .context("no lab API server running")?;
        // SAFETY: kill has no memory-safety preconditions; pid is our own child.
        if unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) } != 0 {
            bail!("kill -9 {pid}: {}", std::io::Error::last_os_error());
        }
        let start = Instant::now();
        while self.lab.child_status(pid)?.is_none() {
            if start.elapsed() > Duration::from_secs(5) {
                bail!("lab-apiserver {pid} survived SIGKILL for 5 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// The lab API server's log (empty if none runs).
    pub fn apiserver_log(&self) -> String {
        self.kube
            .as_ref()
            .and_then(|k| k.pid)
            .and_then(|pid| self.lab.log_path(pid))
            .and_then(|p| fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// `(count, sum)` of a histogram on node `node`'s `/metrics` (kube-proxy's default
    /// address, 127.0.0.1:10249), e.g. `kubeproxy_network_programming_duration_seconds`.
    pub fn metrics_histogram(&self, node: u8, name: &str) -> Result<(u64, f64)> {
        let (code, text) = self.http_get(node, "http://127.0.0.1:10249/metrics")?;
        if code != 200 {
            bail!("node{node} /metrics: HTTP {code}: {text}");
        }
        let value = |suffix: &str| -> Result<f64> {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}_{suffix} ")))
                .and_then(|v| v.trim().parse().ok())
                .with_context(|| format!("no {name}_{suffix} on node{node}'s /metrics:\n{text}"))
        };
        Ok((value("count")? as u64, value("sum")?))
    }
}
