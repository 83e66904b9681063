//! Restart and upgrade safety in the namespace lab: the programs hang off pinned links, so the
//! datapath keeps forwarding while the agent is down, and each new agent swaps its freshly
//! loaded programs into the existing links atomically (BPF_LINK_UPDATE). A canary holds
//! long-lived TCP connections and UDP flows through a ClusterIP the whole time. Needs root.
use std::{
    collections::BTreeMap,
    fs,
    path::PathBuf,
    time::{Duration, Instant},
};

use xtask::{
    cluster::{CANARY_IP, CANARY_PORT, CLUSTER_IP, Cluster, Endpoint, SERVICE_PORT},
    lab::{LabSpec, NODES},
};

fn bin() -> PathBuf {
    xtask::cluster::test_binary()
}

fn endpoints(spec: &LabSpec) -> Vec<Endpoint> {
    xtask::cluster::hostnames_endpoints(spec)
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

struct Canary {
    pid: u32,
    stop: PathBuf,
    report: PathBuf,
}

fn start_canary(c: &Cluster, tcp: usize, udp: usize) -> Canary {
    let dir = c.lab.state_dir();
    let stop = dir.join("canary.stop");
    let report = dir.join("canary.json");
    let _ = fs::remove_file(&stop);
    let _ = fs::remove_file(&report);
    let pid = c
        .spawn_in_pod(
            "client",
            &[
                c.bin.display().to_string(),
                "canary".into(),
                format!("{CANARY_IP}:{CANARY_PORT}"),
                "--tcp".into(),
                tcp.to_string(),
                "--udp".into(),
                udp.to_string(),
                "--interval-ms".into(),
                "100".into(),
                "--timeout-ms".into(),
                "3000".into(),
                "--duration-s".into(),
                "600".into(),
                "--until-file".into(),
                stop.display().to_string(),
                "--report".into(),
                report.display().to_string(),
            ],
        )
        .expect("spawn canary");
    let start = Instant::now();
    loop {
        let log = c
            .lab
            .log_path(pid)
            .and_then(|p| fs::read_to_string(p).ok())
            .unwrap_or_default();
        if log.contains("canary: established") {
            eprintln!("{}", log.trim());
            assert!(
                log.contains(&format!("established {tcp} of {tcp} tcp"))
                    && log.contains(&format!("{udp} of {udp} udp")),
                "every canary connection is established: {log}"
            );
            break;
        }
        if let Some(st) = c.lab.child_status(pid).expect("status") {
            panic!("canary exited early ({st}): {log}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "canary did not establish its connections: {log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Canary { pid, stop, report }
}

fn finish_canary(c: &Cluster, k: Canary) -> serde_json::Value {
    fs::write(&k.stop, b"stop").expect("stop file");
    let start = Instant::now();
    while c.lab.child_status(k.pid).expect("status").is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "canary did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = c
        .lab
        .log_path(k.pid)
        .and_then(|p| fs::read_to_string(p).ok())
        .unwrap_or_default();
    eprintln!("{}", log.trim());
    let text = fs::read_to_string(&k.report).expect("canary report");
    serde_json::from_str(&text).expect("canary report JSON")
}

fn check_report(r: &serde_json::Value, tcp: u64, udp: u64, what: &str) {
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
    // Every connection kept talking throughout (100 ms interval; the runs last seconds).
    assert!(n("tcp", "round_trips") >= tcp * 5, "{what}: {r:#}");
}

/// ≥ 10 SIGKILL/restart cycles of both agents (three of them with the manifests directory
/// gone, standing in for an unreachable API server) under a canary of 60 TCP connections and
/// 12 UDP flows; every restart must replace the programs inside the same links.
#[test]
fn sigkill_and_restart_agents_drops_no_connection() {
    let spec = LabSpec::default_demo();
    let eps = endpoints(&spec);
    let mut c = Cluster::up(&bin(), &spec, &eps, &|m| eprintln!("{m}")).expect("cluster up");
    c.start_canary_service(&eps).expect("canary service");
    let (tcp, udp) = (60, 12);
    let canary = start_canary(&c, tcp, udp);

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
                    .contains("links adopted with their programs replaced"),
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
    let r = finish_canary(&c, canary);
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
    let mut c = Cluster::up(&bin(), &spec, &eps, &|m| eprintln!("{m}")).expect("cluster up");
    c.start_canary_service(&eps).expect("canary service");
    let canary = start_canary(&c, 50, 10);
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
    let r = finish_canary(&c, canary);
    check_report(&r, 50, 10, "across SIGTERM of both agents");

    for n in NODES {
        let out = std::process::Command::new(&c.bin)
            .args(["cleanup", "--bpffs"])
            .arg(c.lab.bpffs(n))
            .output()
            .expect("cleanup");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "cleanup: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("node{n}: {}", text.trim());
        let ports = spec.pods.iter().filter(|p| p.node == n).count();
        let unpinned: usize = text
            .split("unpinned ")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        // Two tc links per bridge port, plus any cgroup (socket) links.
        assert!(unpinned >= 2 * ports, "{text}");
        let pin_dir = c.lab.bpffs(n).join("ebpf-proxy");
        assert!(!pin_dir.exists(), "{} removed", pin_dir.display());
    }
    let p = c.probe("client", &vip, false, 5).expect("probe");
    assert_eq!(p.ok(), 0, "no service translation after cleanup: {:?}", p.0);
}
