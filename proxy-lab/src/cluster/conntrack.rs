//! Helpers for the conntrack end-to-end tests: datapath counters, the lab tools that print a
//! JSON report (`churn`, `junk-flood`, `same-port`, `udp-big`, `idle-hold`), extra pod
//! servers, interface MTUs and the kernel's IP statistics of a namespace.
use super::*;

impl Cluster {
    /// The datapath verdict counters of node `node` (`inspect --json`), name -> packets.
    pub fn counters(&self, node: u8) -> Result<BTreeMap<String, u64>> {
        let v = self.inspect(node)?;
        let m = v["counters"]
            .as_object()
            .with_context(|| format!("inspect has no counters: {v}"))?;
        Ok(m.iter()
            .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
            .collect())
    }

    /// Runs `ebpf-proxy-lab <args...>` in namespace `ns` to completion and parses its stdout
    /// as JSON (whatever the exit status: the report says what failed).
    pub fn tool_json(&self, ns: &str, args: &[&str]) -> Result<serde_json::Value> {
        let mut argv: Vec<String> = vec![self.bins.tools.display().to_string()];
        argv.extend(args.iter().map(|a| (*a).to_owned()));
        let out = self.lab.exec(ns, &argv)?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "ebpf-proxy-lab {} in {ns} ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Starts `serve-hostname --port <port> <flags...>` in each pod of `pods` and waits (10 s
    /// at most) until each answers a TCP connection from inside its pod. Returns the pids.
    pub fn start_pod_servers_on(
        &self,
        pods: &[&str],
        port: u16,
        flags: &[&str],
    ) -> Result<Vec<u32>> {
        let mut pids = Vec::new();
        for pod in pods {
            let mut args: Vec<String> = vec![
                self.bins.tools.display().to_string(),
                "serve-hostname".into(),
                "--name".into(),
                (*pod).to_owned(),
                "--port".into(),
                port.to_string(),
            ];
            args.extend(flags.iter().map(|f| (*f).to_owned()));
            pids.push(self.spawn_in_pod(pod, &args)?);
        }
        for (pod, pid) in pods.iter().zip(&pids) {
            let ip = self
                .lab
                .state()
                .pod(pod)
                .with_context(|| format!("no pod {pod}"))?
                .ip;
            let start = Instant::now();
            loop {
                if let Some(st) = self.lab.child_status(*pid)? {
                    bail!("serve-hostname on {pod}:{port} exited ({st})");
                }
                let p = self.probe_in(
                    &self.lab.pod_ns(pod),
                    &format!("{ip}:{port}"),
                    false,
                    1,
                    300,
                )?;
                if p.ok() == 1 {
                    break;
                }
                if start.elapsed() > Duration::from_secs(10) {
                    bail!("serve-hostname on {pod}:{port} does not answer: {:?}", p.0);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(pids)
    }

    /// The MTU of interface `ifname` in namespace `ns`.
    pub fn mtu(&self, ns: &str, ifname: &str) -> Result<u32> {
        let text = self
            .lab
            .exec_ok(ns, &["cat", &format!("/sys/class/net/{ifname}/mtu")])?;
        text.trim()
            .parse()
            .with_context(|| format!("MTU of {ifname} in {ns}: {text:?}"))
    }

    /// The kernel's `Ip:` statistics of namespace `ns` (`/proc/net/snmp`: FragCreates,
    /// ReasmOKs, ...).
    pub fn ip_stats(&self, ns: &str) -> Result<BTreeMap<String, u64>> {
        self.net_stats(ns, "/proc/net/snmp", "Ip:")
    }

    /// One group of a namespace's network statistics: `file` is `/proc/net/snmp` or
    /// `/proc/net/netstat`, `group` e.g. `Ip:`, `Tcp:`, `TcpExt:`.
    pub fn net_stats(&self, ns: &str, file: &str, group: &str) -> Result<BTreeMap<String, u64>> {
        let snmp = self.lab.exec_ok(ns, &["cat", file])?;
        let mut ip = snmp.lines().filter(|l| l.starts_with(group));
        let (names, values) = (
            ip.next()
                .with_context(|| format!("no {group} header in {file}"))?,
            ip.next()
                .with_context(|| format!("no {group} values in {file}"))?,
        );
        Ok(names
            .split_whitespace()
            .zip(values.split_whitespace())
            .skip(1)
            .map(|(n, v)| (n.to_owned(), v.parse().unwrap_or(0)))
            .collect())
    }
}

/// `after[name] - before[name]` (0 when missing).
pub fn counter_delta(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
    name: &str,
) -> u64 {
    after
        .get(name)
        .copied()
        .unwrap_or(0)
        .saturating_sub(before.get(name).copied().unwrap_or(0))
}
