//! Upgrades keep connections: a lab whose agents (and so programs and pinned maps) come from a
//! past release is upgraded, node by node as a DaemonSet rolling update does it, to the tree's
//! agent under canaries, and no connection may be lost. The releases are the repository's
//! `RELEASES` entries named in `proxy_lab::releases::UPGRADE_TESTED`; `cargo xtask test` builds
//! them (cached) and passes their agents in `EBPF_PROXY_<NAME>_BIN`. Needs root.
//!
//! The test checks connections only, never map layouts: whether the new agent adopts the old
//! conntrack maps as they are, migrates them, or reads both layouts during the changeover, an
//! established flow must keep its backend and its masquerade binding.
use std::{
    collections::BTreeMap,
    net::SocketAddrV4,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use proxy_lab::{
    cluster::{
        CANARY_IP, CANARY_NP_TCP, CANARY_NP_UDP, CANARY_PORT, Cluster, Probe,
        assert_canary_lost_nothing, hostnames_endpoints, test_binaries, test_release_agent,
    },
    lab::{Lab, LabSpec, NODES, Topology, node_ip},
    releases::UPGRADE_TESTED,
};

/// The releases this file has a test for: keep in step with `UPGRADE_TESTED`.
const COVERED: &[&str] = &["v0.1.0"];

#[test]
fn every_release_the_upgrade_test_covers_has_a_test() {
    assert_eq!(
        UPGRADE_TESTED, COVERED,
        "proxy_lab::releases::UPGRADE_TESTED and the tests in proxy-lab/tests/upgrade.rs differ: \
         add a test calling upgrade_from(NAME) for each tested release"
    );
}

#[test]
fn upgrade_from_v0_1_0_under_a_canary_loses_no_connection() {
    upgrade_from("v0.1.0");
}

/// One hook as `inspect --json` lists it: (list, pin name) -> (link id, prog id, attached,
/// netlink tc filter). A netlink filter (the tree's agent on `EBPF_PROXY_LAB_TC_ATTACH=netlink`)
/// has no pin: it is keyed by the pin name its TCX link had (`<ifindex>-<ifname>-<in|out>`
/// for pod interfaces, `<ifname>-<ifindex>` for an uplink's tc ingress).
type LinkView = BTreeMap<(String, String), (u64, u64, bool, bool)>;

fn links(c: &Cluster, node: u8) -> LinkView {
    let v = c.inspect(node).expect("inspect");
    let mut out = LinkView::new();
    for list in ["links", "uplinks"] {
        for l in v[list].as_array().into_iter().flatten() {
            let filter = l["tc_filter"].is_string();
            let pin = match l["pin"].as_str() {
                Some(p) => p.to_owned(),
                None => {
                    let (ifname, ifindex) = (
                        l["interface"]
                            .as_str()
                            .unwrap_or_default()
                            .replace('.', "_"),
                        l["ifindex"].as_u64().unwrap_or(0),
                    );
                    if list == "links" {
                        let dir = l["direction"].as_str().unwrap_or_default();
                        format!("{ifindex}-{ifname}-{dir}")
                    } else {
                        format!("{ifname}-{ifindex}")
                    }
                }
            };
            out.insert(
                (list.to_owned(), pin),
                (
                    l["link_id"].as_u64().unwrap_or(0),
                    l["prog_id"].as_u64().unwrap_or(0),
                    l["attached"].as_bool().unwrap_or(false),
                    filter,
                ),
            );
        }
    }
    out
}

/// The executable of a running process.
fn exe(pid: u32) -> std::path::PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).expect("read /proc/PID/exe")
}

/// Fresh connections (a new socket each) made continuously while the upgrade runs, by a
/// thread of their own with its own handle on the lab.
#[derive(Debug, Default)]
struct Fresh {
    sent: u64,
    ok: u64,
    failures: BTreeMap<String, u64>,
    answers: BTreeMap<String, u64>,
    seen_by_server: BTreeMap<String, u64>,
}

/// Stops (and waits for) the fresh-connection thread when the test ends, failed or not, before
/// the lab is torn down.
struct StopOnDrop {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<BTreeMap<&'static str, Fresh>>>,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct FreshTarget {
    what: &'static str,
    ns: String,
    target: String,
    udp: bool,
}

fn fresh_connections(
    prefix: String,
    tools: std::path::PathBuf,
    targets: Vec<FreshTarget>,
    stop: Arc<AtomicBool>,
) -> BTreeMap<&'static str, Fresh> {
    let lab = Lab::attach(&prefix).expect("second handle on the lab");
    let mut out: BTreeMap<&'static str, Fresh> = BTreeMap::new();
    while !stop.load(Ordering::Relaxed) {
        for t in &targets {
            let mut args: Vec<String> = vec![
                tools.display().to_string(),
                "probe".into(),
                t.target.clone(),
                "--count".into(),
                "4".into(),
                "--timeout-ms".into(),
                "2000".into(),
                "--json".into(),
            ];
            if t.udp {
                args.push("--udp".into());
            }
            let o = lab.exec(&t.ns, &args).expect("probe");
            let parsed = serde_json::from_slice(&o.stdout);
            if parsed.is_err() && stop.load(Ordering::Relaxed) {
                // The test failed elsewhere and is tearing the lab down.
                return out;
            }
            let p = Probe(parsed.unwrap_or_else(|e| {
                panic!(
                    "{}: probe output ({e}): {}{}",
                    t.what,
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            }));
            let f = out.entry(t.what).or_default();
            f.sent += p.sent();
            f.ok += p.ok();
            for (k, v) in p.failures() {
                *f.failures.entry(k).or_default() += v;
            }
            for (k, v) in p.answers() {
                *f.answers.entry(k).or_default() += v;
            }
            for (k, v) in p.seen_by_server() {
                *f.seen_by_server.entry(k).or_default() += v;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    out
}

/// The lab on `name`'s agents, canaries from a pod to a ClusterIP and from outside to each
/// node's masqueraded NodePort (TCP and UDP), fresh connections all along, then node by node:
/// SIGTERM the old agent, start the tree's on the same pins. Nothing may be lost.
fn upgrade_from(name: &str) {
    let started = Instant::now();
    let mut bins = test_binaries();
    let release = test_release_agent(name);
    let old_agent = std::fs::canonicalize(&release.agent).expect("release agent path");
    bins.release = Some(release.clone());
    // Bridge only, whatever EBPF_PROXY_LAB_TOPOLOGY says: v0.1.0 finds pods only as the ports
    // of a bridge (its --pod-bridge, default cbr0), so it cannot run on the routed topology.
    let spec = LabSpec {
        topology: Topology::Bridge,
        ..LabSpec::default_demo()
    };
    let eps = hostnames_endpoints(&spec);
    let say = |m: &str| eprintln!("[{:>5.1}s] {m}", started.elapsed().as_secs_f64());
    say(&format!(
        "lab up with {name}'s agents ({})",
        old_agent.display()
    ));
    let mut c = Cluster::up(&bins, &spec, &eps, &say).unwrap_or_else(|e| {
        panic!(
            "lab up on {name}'s agents: {e:#}\n(an `unexpected argument` in the agent log means \
             the lab passes a flag {name} predates: list it in \
             proxy_lab::releases::UNKNOWN_RUN_FLAGS)"
        )
    });

    // The release is started with every flag of today's lab it knows and none it does not:
    // check the unknown-flags table against its own `run --help`.
    let help = std::process::Command::new(&old_agent)
        .args(["run", "--help"])
        .output()
        .expect("release's run --help");
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let words: Vec<&str> = help
        .split(|ch: char| ch.is_whitespace() || ",=[]<>".contains(ch))
        .collect();
    for flag in c.agent_command(1).iter().filter(|a| a.starts_with("--")) {
        let known = words.contains(&flag.as_str());
        let listed = release.unknown_flags.iter().any(|(f, _)| f == flag);
        assert!(
            known != listed,
            "{name}'s `run --help` {} {flag}, and proxy_lab::releases::UNKNOWN_RUN_FLAGS {} it: \
             fix the table",
            if known { "knows" } else { "does not know" },
            if listed { "lists" } else { "does not list" },
        );
    }

    let mut before = BTreeMap::new();
    for n in NODES {
        let pid = c.agent_pid(n).expect("agent running");
        assert_eq!(exe(pid), old_agent, "node{n} runs {name}'s agent");
        let l = links(&c, n);
        assert!(!l.is_empty(), "node{n}: {name} pinned links");
        assert!(l.values().all(|x| x.2), "node{n}: all attached: {l:?}");
        before.insert(n, l);
    }

    c.start_canary_service(&eps).expect("canary service");
    c.start_canary_nodeport(&eps)
        .expect("NodePort canary service");
    let ext = c.lab.ext_ns();
    // (what, canary, TCP connections, UDP flows): from the client pod (node1) to the canary
    // ClusterIP, and from outside to each node's NodePort (masqueraded to that node, and
    // forwarded to the other node for the endpoints there).
    let mut canaries = vec![(
        "pod -> ClusterIP".to_owned(),
        c.start_canary("upgrade-pod", 40, 10)
            .expect("pod -> ClusterIP canary"),
        40,
        10,
    )];
    for n in NODES {
        let ip = node_ip(n);
        canaries.push((
            format!("external -> node{n}'s NodePort"),
            c.start_canary_in(
                &ext,
                &format!("upgrade-ext{n}"),
                SocketAddrV4::new(ip, CANARY_NP_TCP),
                SocketAddrV4::new(ip, CANARY_NP_UDP),
                20,
                8,
            )
            .expect("external -> NodePort canary"),
            20,
            8,
        ));
    }
    say("canaries established: pod -> ClusterIP and external -> each node's NodePort, TCP and UDP");

    let stop = Arc::new(AtomicBool::new(false));
    let targets = vec![
        FreshTarget {
            what: "pod -> ClusterIP tcp",
            ns: c.lab.pod_ns("client"),
            target: format!("{CANARY_IP}:{CANARY_PORT}"),
            udp: false,
        },
        FreshTarget {
            what: "pod -> ClusterIP udp",
            ns: c.lab.pod_ns("client"),
            target: format!("{CANARY_IP}:{CANARY_PORT}"),
            udp: true,
        },
        FreshTarget {
            what: "external -> node1's NodePort tcp",
            ns: ext.clone(),
            target: format!("{}:{CANARY_NP_TCP}", node_ip(1)),
            udp: false,
        },
        FreshTarget {
            what: "external -> node1's NodePort udp",
            ns: ext.clone(),
            target: format!("{}:{CANARY_NP_UDP}", node_ip(1)),
            udp: true,
        },
        FreshTarget {
            what: "external -> node2's NodePort tcp",
            ns: ext.clone(),
            target: format!("{}:{CANARY_NP_TCP}", node_ip(2)),
            udp: false,
        },
        FreshTarget {
            what: "external -> node2's NodePort udp",
            ns: ext.clone(),
            target: format!("{}:{CANARY_NP_UDP}", node_ip(2)),
            udp: true,
        },
    ];
    let mut fresh = {
        let (prefix, tools, stop) = (
            c.lab.prefix().to_owned(),
            c.bins.tools.clone(),
            stop.clone(),
        );
        StopOnDrop {
            stop: stop.clone(),
            thread: Some(std::thread::spawn(move || {
                fresh_connections(prefix, tools, targets, stop)
            })),
        }
    };
    std::thread::sleep(Duration::from_secs(2));

    // The rolling update: one node at a time, the old pod terminated (SIGTERM; the grace
    // period ends in SIGKILL) before the new one starts on the same host paths.
    for n in NODES {
        let ct = c.inspect(n).expect("inspect")["conntrack_entries"].clone();
        say(&format!(
            "node{n}: stopping {name}'s agent (SIGTERM), {ct} conntrack entries"
        ));
        let st = c.stop_agent(n).expect("SIGTERM the old agent");
        assert!(st.success(), "node{n}: {name}'s agent exits cleanly: {st}");
        std::thread::sleep(Duration::from_millis(500));
        c.use_tree_agent(n);
        let pid = c
            .restart_agent(n, Duration::from_secs(30))
            .expect("the tree's agent starts on the old pins");
        assert_eq!(
            exe(pid),
            std::fs::canonicalize(&c.bins.agent).expect("agent"),
            "node{n} runs the tree's agent"
        );
        // Bridge ports are swapped before the agent logs "datapath on"; the uplink hooks once
        // the first snapshot has named the node's addresses.
        let deadline = Instant::now() + Duration::from_secs(15);
        let after = loop {
            let after = links(&c, n);
            let all_replaced = before[&n]
                .iter()
                .all(|(k, (_, prog, _, _))| after.get(k).is_some_and(|a| a.1 != *prog));
            if all_replaced || Instant::now() > deadline {
                break after;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        for (k, (link, prog, attached, _)) in &before[&n] {
            let (new_link, new_prog, new_attached, filter) = after
                .get(k)
                .unwrap_or_else(|| panic!("node{n}: {k:?} is gone after the upgrade: {after:?}"));
            assert!(*attached && *new_attached, "node{n} {k:?} attached");
            // On netlink tc filters, the TCX link was replaced by our filter on the same hook
            // (filter first, then the link detached: docs/kernels.md).
            assert_eq!(
                *filter,
                proxy_lab::lab::tc_attach_from_env().as_deref() == Some("netlink")
                    && !k.1.contains("-xdp-"),
                "node{n} {k:?}: the attachment mode asked for: {after:?}"
            );
            if !filter {
                assert_eq!(
                    new_link, link,
                    "node{n} {k:?}: {name}'s pinned link was adopted"
                );
            }
            assert_ne!(
                new_prog, prog,
                "node{n} {k:?}: the tree's program replaced {name}'s in the link"
            );
        }
        let ct = c.inspect(n).expect("inspect")["conntrack_entries"].clone();
        say(&format!(
            "node{n}: upgraded; links adopted with the new programs, {ct} conntrack entries"
        ));
        std::thread::sleep(Duration::from_secs(2));
    }
    say("both nodes upgraded; traffic keeps going");
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let fresh = fresh
        .thread
        .take()
        .expect("thread")
        .join()
        .expect("fresh-connection thread");

    let reports: Vec<(String, serde_json::Value, u64, u64)> = canaries
        .into_iter()
        .map(|(what, run, tcp, udp)| {
            let r = c.finish_canary(run).expect("canary report");
            (what, r, tcp, udp)
        })
        .collect();
    for (what, f) in &fresh {
        println!(
            "{what}: fresh connections {} of {} answered (failures {:?}, answers {:?})",
            f.ok, f.sent, f.failures, f.answers
        );
        assert!(f.sent >= 40, "{what}: too few fresh connections: {f:?}");
        assert_eq!(f.ok, f.sent, "{what}: fresh connections failed: {f:?}");
    }
    for n in NODES {
        for proto in ["tcp", "udp"] {
            let what = format!("external -> node{n}'s NodePort {proto}");
            let f = &fresh[what.as_str()];
            assert_eq!(
                f.seen_by_server.keys().collect::<Vec<_>>(),
                [&node_ip(n).to_string()],
                "{what}: externalTrafficPolicy Cluster masquerades to node{n}: {f:?}",
            );
        }
    }
    for (what, r, tcp, udp) in &reports {
        assert_canary_lost_nothing(
            r,
            *tcp,
            *udp,
            &format!("upgrade from {name} to the tree on both nodes, {what}"),
        );
        // Every connection opened before the upgrade kept talking through it (a round trip
        // every 100 ms for well over 10 s).
        assert!(
            r["tcp"]["round_trips"].as_u64().unwrap_or(0) >= tcp * 50,
            "{what} canary: too few round trips: {r:#}"
        );
    }
    // Some external connections crossed to the other node's endpoints (masqueraded, forwarded).
    for (n, other_node_pods) in [
        (1, &["hostnames-c"][..]),
        (2, &["hostnames-a", "hostnames-b"]),
    ] {
        let (what, r, ..) = &reports[n];
        let crossed: u64 = other_node_pods
            .iter()
            .map(|p| r["tcp"]["backends"][*p].as_u64().unwrap_or(0))
            .sum();
        assert!(
            crossed > 0,
            "{what}: no connection went to the other node's endpoints: {r:#}"
        );
    }
    say("done");
}
