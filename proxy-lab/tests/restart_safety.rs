//! Restart and upgrade safety in the namespace lab: the programs hang off pinned links, so the
//! datapath keeps forwarding while the agent is down, and each new agent swaps its freshly
//! loaded programs into the existing links atomically (BPF_LINK_UPDATE). A canary holds
//! long-lived TCP connections and UDP flows through a ClusterIP the whole time. Needs root.
use std::{collections::BTreeMap, fs, time::Duration};

use proxy_lab::{
    cluster::{Binaries, CLUSTER_IP, Cluster, Endpoint, SERVICE_PORT, assert_canary_lost_nothing},
    lab::{LabSpec, NODES},
};

fn bins() -> Binaries {
    proxy_lab::cluster::test_binaries()
}

fn endpoints(spec: &LabSpec) -> Vec<Endpoint> {
    proxy_lab::cluster::hostnames_endpoints(spec)
}

/// (interface, direction) -> (link id, prog id, attached) from `inspect --json`.
type LinkView = BTreeMap<(String, String), (u64, u64, bool)>;

fn links(c: &Cluster, node: u8) -> LinkView {
    let v = c.inspect(node).expect("inspect");
    v["links"]
        .as_array()
        .expect("inspect lists links")
        .iter()
        .map(|l| {
            (
                (
                    l["interface"].as_str().unwrap_or_default().to_owned(),
                    l["direction"].as_str().unwrap_or_default().to_owned(),
                ),
                (
                    l["link_id"].as_u64().unwrap_or(0),
                    l["prog_id"].as_u64().unwrap_or(0),
                    l["attached"].as_bool().unwrap_or(false),
                ),
            )
        })
        .collect()
}

fn assert_all_attached(c: &Cluster, node: u8, what: &str) -> LinkView {
    let l = links(c, node);
    let ports = c.lab.state().pods.iter().filter(|p| p.node == node).count();
    assert_eq!(
        l.len(),
        2 * ports,
        "{what}: node{node} has a pinned link per pod port and direction: {l:?}"
    );
    assert!(
        l.values().all(|(_, _, attached)| *attached),
        "{what}: every pinned link on node{node} is attached: {l:?}"
    );
    l
}

/// No connection lost, and every one kept talking throughout (100 ms interval; the runs last
/// seconds).
fn check_report(r: &serde_json::Value, tcp: u64, udp: u64, what: &str) {
    assert_canary_lost_nothing(r, tcp, udp, what);
    assert!(
        r["tcp"]["round_trips"].as_u64().unwrap_or(0) >= tcp * 5,
        "{what}: {r:#}"
    );
}

/// ≥ 10 SIGKILL/restart cycles of both agents (three of them with the manifests directory
/// gone, standing in for an unreachable API server) under a canary of 60 TCP connections and
/// 12 UDP flows; every restart must replace the programs inside the same links.
#[test]
fn sigkill_and_restart_agents_drops_no_connection() {
    let spec = LabSpec::default_demo();
    let eps = endpoints(&spec);
    let mut c = Cluster::up(&bins(), &spec, &eps, &|m| eprintln!("{m}")).expect("cluster up");
    c.start_canary_service(&eps).expect("canary service");
    let (tcp, udp) = (60, 12);
    let canary = c.start_canary("restart", tcp, udp).expect("canary");

    let mut before: BTreeMap<u8, LinkView> = NODES
        .iter()
        .map(|&n| (n, assert_all_attached(&c, n, "initially")))
        .collect();
    let away = c.lab.state_dir().join("manifests.away");
    let cycles = 12;
    let mut replaced = 0;
    for cycle in 1..=cycles {
        let unreachable = (5..=7).contains(&cycle);
        for n in NODES {
            c.kill_agent(n).expect("kill -9 agent");
        }
        if cycle == 5 {
            fs::rename(&c.manifests, &away).expect("hide manifests");
        }
        // The datapath alone, without any agent: links are pinned, so it forwards.
        for n in NODES {
            let l = assert_all_attached(&c, n, &format!("cycle {cycle}, agents dead"));
            assert_eq!(l, before[&n], "nothing changes while no agent runs");
        }
        if cycle == 2 {
            // New connections work too while no agent runs.
            let p = c
                .probe("client", &format!("{CLUSTER_IP}:{SERVICE_PORT}"), false, 30)
                .expect("probe");
            assert_eq!(
                p.ok(),
                30,
                "new connections with the agents down: {:?}",
                p.0
            );
        } else {
            std::thread::sleep(Duration::from_millis(300));
        }
        for n in NODES {
            c.restart_agent(n, Duration::from_secs(20))
                .expect("restart agent");
        }
        for n in NODES {
            let after = assert_all_attached(&c, n, &format!("cycle {cycle}, restarted"));
            for (k, (link, prog, _)) in &after {
                let (old_link, old_prog, _) = before[&n][k];
                assert_eq!(
                    *link, old_link,
                    "cycle {cycle}: node{n} {k:?} kept the same pinned link"
                );
                assert_ne!(
                    *prog, old_prog,
                    "cycle {cycle}: node{n} {k:?}: the new agent's program replaced the old one"
                );
                replaced += 1;
            }
            assert!(
                c.agent_log(n)
                    .contains("adopted with their programs replaced"),
                "{}",
                c.agent_log(n)
            );
            before.insert(n, after);
        }
        if unreachable {
            // No source: the agent must not have touched the programmed state.
            let v = c.inspect(1).expect("inspect");
            assert_eq!(
                v["services"].as_array().map(Vec::len),
                Some(4),
                "cycle {cycle}: services kept while the source is unreachable: {v}"
            );
        }
        if cycle == 7 {
            fs::rename(&away, &c.manifests).expect("restore manifests");
            for n in NODES {
                c.wait_programmed(n, eps.len(), Duration::from_secs(10))
                    .expect("resynced after the source came back");
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let r = c.finish_canary(canary).expect("canary report");
    check_report(
        &r,
        tcp as u64,
        udp as u64,
        &format!("{cycles} SIGKILL+restart cycles of both agents, {replaced} program replacements"),
    );
}

/// SIGTERM leaves the datapath in place (a rolling update must not drop anything); `cleanup`
/// detaches and unpins everything, after which the ClusterIP no longer works.
#[test]
fn sigterm_keeps_forwarding_and_cleanup_removes_the_datapath() {
    let spec = LabSpec::default_demo();
    let eps = endpoints(&spec);
    let mut c = Cluster::up(&bins(), &spec, &eps, &|m| eprintln!("{m}")).expect("cluster up");
    c.start_canary_service(&eps).expect("canary service");
    let canary = c.start_canary("sigterm", 50, 10).expect("canary");
    for n in NODES {
        let st = c.stop_agent(n).expect("SIGTERM");
        assert!(st.success(), "agent exits cleanly on SIGTERM: {st}");
    }
    std::thread::sleep(Duration::from_secs(1));
    for n in NODES {
        assert_all_attached(&c, n, "after SIGTERM");
    }
    let vip = format!("{CLUSTER_IP}:{SERVICE_PORT}");
    let p = c.probe("client", &vip, false, 30).expect("probe");
    assert_eq!(p.ok(), 30, "forwarding after SIGTERM: {:?}", p.0);
    let r = c.finish_canary(canary).expect("canary report");
    check_report(&r, 50, 10, "across SIGTERM of both agents");

    for n in NODES {
        let out = c.cleanup(n).expect("cleanup");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "cleanup: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("node{n}: {}", text.trim());
        let ports = spec.pods.iter().filter(|p| p.node == n).count();
        let count = |after: &str| -> usize {
            text.split(after)
                .nth(1)
                .and_then(|t| t.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        // Two tc links (or netlink tc filters) per pod interface (bridge port or routed veth),
        // plus any cgroup (socket) links.
        let removed = count("unpinned ") + count("removed ");
        assert!(removed >= 2 * ports, "{text}");
        let pin_dir = c.lab.bpffs(n).join("ebpf-proxy");
        assert!(!pin_dir.exists(), "{} removed", pin_dir.display());
    }
    let p = c.probe("client", &vip, false, 5).expect("probe");
    assert_eq!(p.ok(), 0, "no service translation after cleanup: {:?}", p.0);
}
