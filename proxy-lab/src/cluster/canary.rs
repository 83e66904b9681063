//! Canaries: `ebpf-proxy-lab canary` in the `client` pod (or any lab namespace), long-lived
//! connections through the canary service (or the NodePort canary `canary-np`), and the
//! "connections lost: 0" check on its report.
use std::net::SocketAddrV4;

use super::*;

/// A canary (`ebpf-proxy-lab canary`) running in the `client` pod against the canary service.
#[derive(Debug)]
pub struct CanaryRun {
    pub pid: u32,
    pub tcp: usize,
    pub udp: usize,
    stop: PathBuf,
    report: PathBuf,
}

impl Cluster {
    /// Starts a canary named `name` (several may run at once) holding `tcp` TCP connections
    /// and `udp` UDP flows through the canary ClusterIP (after
    /// [`Cluster::start_canary_service`]); returns once all are established.
    pub fn start_canary(&self, name: &str, tcp: usize, udp: usize) -> Result<CanaryRun> {
        let target = SocketAddrV4::new(CANARY_IP, CANARY_PORT);
        self.start_canary_in(&self.lab.pod_ns("client"), name, target, target, tcp, udp)
    }

    /// Like [`Cluster::start_canary`], from namespace `ns` (a pod, a node, `ext`) to `target`
    /// (TCP) and `udp_target` (e.g. the NodePorts of [`Cluster::start_canary_nodeport`]).
    pub fn start_canary_in(
        &self,
        ns: &str,
        name: &str,
        target: SocketAddrV4,
        udp_target: SocketAddrV4,
        tcp: usize,
        udp: usize,
    ) -> Result<CanaryRun> {
        let dir = self.lab.state_dir();
        let stop = dir.join(format!("canary-{name}.stop"));
        let report = dir.join(format!("canary-{name}.json"));
        let _ = fs::remove_file(&stop);
        let _ = fs::remove_file(&report);
        let pid = self.lab.spawn(
            ns,
            &[
                self.bins.tools.display().to_string(),
                "canary".into(),
                target.to_string(),
                "--udp-target".into(),
                udp_target.to_string(),
                "--tcp".into(),
                tcp.to_string(),
                "--udp".into(),
                udp.to_string(),
                "--interval-ms".into(),
                "100".into(),
                "--timeout-ms".into(),
                "3000".into(),
                "--duration-s".into(),
                "900".into(),
                "--until-file".into(),
                stop.display().to_string(),
                "--report".into(),
                report.display().to_string(),
            ],
        )?;
        let start = Instant::now();
        loop {
            let log = self
                .lab
                .log_path(pid)
                .and_then(|p| fs::read_to_string(p).ok())
                .unwrap_or_default();
            if log.contains("canary: established") {
                if !(log.contains(&format!("established {tcp} of {tcp} tcp"))
                    && log.contains(&format!("{udp} of {udp} udp")))
                {
                    bail!("not every canary connection was established: {log}");
                }
                return Ok(CanaryRun {
                    pid,
                    tcp,
                    udp,
                    stop,
                    report,
                });
            }
            if let Some(st) = self.lab.child_status(pid)? {
                bail!("canary exited early ({st}): {log}");
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!("canary {name} did not establish its connections: {log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the canary and returns its JSON report.
    pub fn finish_canary(&self, run: CanaryRun) -> Result<serde_json::Value> {
        fs::write(&run.stop, b"stop")?;
        let start = Instant::now();
        while self.lab.child_status(run.pid)?.is_none() {
            if start.elapsed() > Duration::from_secs(15) {
                bail!("canary did not stop");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = self
            .lab
            .log_path(run.pid)
            .and_then(|p| fs::read_to_string(p).ok())
            .unwrap_or_default();
        eprintln!("{}", log.trim());
        let text = fs::read_to_string(&run.report)
            .with_context(|| format!("canary report; canary log:\n{log}"))?;
        Ok(serde_json::from_str(&text)?)
    }
}

/// Prints a canary report's "connections lost: L of N" line and asserts that all `tcp` and
/// `udp` connections were established and none was lost.
pub fn assert_canary_lost_nothing(r: &serde_json::Value, tcp: u64, udp: u64, what: &str) {
    let n = |k: &str, f: &str| r[k][f].as_u64().unwrap_or(u64::MAX);
    let total = n("tcp", "established") + n("udp", "established");
    let lost = n("tcp", "lost") + n("udp", "lost");
    println!(
        "{what}: connections lost: {lost} of {total} (tcp {} of {}, udp {} of {}; {} TCP round \
         trips, slowest {} ms; {} UDP round trips)",
        n("tcp", "lost"),
        n("tcp", "established"),
        n("udp", "lost"),
        n("udp", "established"),
        n("tcp", "round_trips"),
        n("tcp", "max_rtt_ms"),
        n("udp", "round_trips"),
    );
    assert_eq!(n("tcp", "established"), tcp, "{what}: {r:#}");
    assert_eq!(n("udp", "established"), udp, "{what}: {r:#}");
    assert_eq!(lost, 0, "{what}: connections lost: {r:#}");
}
