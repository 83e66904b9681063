//! End-to-end checks of the network-namespace lab. They need root (network namespaces, veth,
//! bpffs) and iproute2; without them they fail loudly instead of skipping.
//!
//! Run: `sudo -E cargo test -p proxy-lab --test lab_topology` (as root: drop the sudo).
//! The pod-server test also needs the `ebpf-proxy` binary (`cargo xtask test` builds it and
//! sets `EBPF_PROXY_BIN`).

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use proxy_lab::lab::{self, Lab, LabSpec, PodSpec};

fn require_root() {
    if let Err(e) = lab::ensure_prereqs() {
        panic!(
            "lab tests cannot run: {e:#}\n(run them as root, e.g. `sudo -E cargo test -p proxy-lab \
             --test lab_topology`; they are never skipped silently)"
        );
    }
}

fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    let p = format!("{prefix}-");
    lab::netns_list()
        .expect("ip netns list")
        .into_iter()
        .filter(|n| n.starts_with(&p))
        .collect()
}

fn ping(lab: &Lab, from_ns: &str, to: Ipv4Addr) {
    let out = lab
        .exec(from_ns, &["ping", "-c", "1", "-W", "2", &to.to_string()])
        .expect("run ping");
    assert!(
        out.status.success(),
        "ping {to} from {from_ns} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pid_alive(pid: u32) -> bool {
    // /proc/<pid> disappears once the process is reaped; a zombie has state Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[test]
fn topology_routes_between_nodes_and_from_ext() {
    require_root();
    let lab = Lab::up(None, &LabSpec::default_demo()).expect("lab up");
    let prefix = lab.prefix().to_owned();
    let st = lab.state().clone();

    let ip = |pod: &str| lab.pod_ip(pod).expect("pod exists");
    // Same node (bridged), across nodes (via the router), ext -> pods on both nodes.
    ping(&lab, &lab.pod_ns("client"), ip("hostnames-a"));
    ping(&lab, &lab.pod_ns("client"), ip("hostnames-c"));
    ping(&lab, &lab.pod_ns("hostnames-c"), ip("hostnames-b"));
    ping(&lab, &lab.ext_ns(), ip("hostnames-a"));
    ping(&lab, &lab.ext_ns(), ip("hostnames-c"));
    ping(&lab, &lab.node_ns(1), lab::node_ip(2));
    ping(&lab, &lab.node_ns(2), lab::ROUTER_FABRIC_IP);

    // The wiring of the topology asked for (EBPF_PROXY_LAB_TOPOLOGY).
    let links = lab
        .exec_ok(&lab.node_ns(1), &["ip", "-o", "link", "show"])
        .unwrap();
    let veth = &st.pod("client").unwrap().host_veth;
    let pod_routes = lab
        .exec_ok(
            &lab.node_ns(1),
            &["ip", "route", "get", &ip("client").to_string()],
        )
        .unwrap();
    match st.spec.topology {
        lab::Topology::Bridge => {
            assert!(links.contains(&format!("{veth}@")), "{links}");
            assert!(links.contains("master cbr0"), "pods on cbr0: {links}");
            assert!(pod_routes.contains("dev cbr0"), "{pod_routes}");
        }
        lab::Topology::Routed => {
            assert!(
                !links.contains("cbr0"),
                "no bridge in the routed topology: {links}"
            );
            assert!(!links.contains("master"), "no port of anything: {links}");
            assert!(
                pod_routes.contains(&format!("dev {veth}")),
                "a /32 to the veth: {pod_routes}"
            );
            let gw = lab
                .exec_ok(&lab.pod_ns("client"), &["ip", "route", "show", "default"])
                .unwrap();
            assert!(gw.contains("via 169.254.1.1"), "link-local gateway: {gw}");
            // The gateway is answered by proxy ARP on the host side (the node's veth MAC).
            ping(&lab, &lab.pod_ns("client"), lab::node_ip(1));
            let neigh = lab
                .exec_ok(
                    &lab.pod_ns("client"),
                    &["ip", "neigh", "show", "169.254.1.1"],
                )
                .unwrap();
            let mac = lab
                .exec_ok(
                    &lab.node_ns(1),
                    &["cat", &format!("/sys/class/net/{veth}/address")],
                )
                .unwrap();
            assert!(neigh.contains(mac.trim()), "proxy ARP: {neigh} vs {mac}");
        }
    }

    // The router routes the service CIDR to node1.
    let routes = lab
        .exec_ok(&lab.router_ns(), &["ip", "route", "get", "10.96.0.10"])
        .unwrap();
    assert!(
        routes.contains("via 10.240.0.11"),
        "service CIDR route: {routes}"
    );

    // Forwarding and rp_filter as specified.
    let sysctl = |ns: &str, key: &str| {
        lab.exec_ok(ns, &["cat", &format!("/proc/sys/{key}")])
            .unwrap()
            .trim()
            .to_owned()
    };
    assert_eq!(sysctl(&lab.node_ns(1), "net/ipv4/ip_forward"), "1");
    assert_eq!(sysctl(&lab.router_ns(), "net/ipv4/ip_forward"), "1");
    assert_eq!(
        sysctl(&lab.pod_ns("client"), "net/ipv4/conf/all/rp_filter"),
        "0"
    );
    assert_eq!(
        sysctl(&lab.pod_ns("client"), "net/ipv4/conf/eth0/rp_filter"),
        "0"
    );

    // Per-node bpffs, visible inside `ip netns exec`, distinct per node.
    for node in lab::NODES {
        let fs_type = lab
            .exec_ok(
                &lab.node_ns(node),
                &["stat", "-f", "-c", "%T", lab.bpffs(node).to_str().unwrap()],
            )
            .expect("stat bpffs");
        assert_eq!(fs_type.trim(), "bpf_fs", "bpffs of node{node}");
    }

    // State file and status from "another process" view.
    let loaded = lab::LabState::load(&prefix).expect("state file");
    assert_eq!(loaded, st);
    let status = Lab::status(&prefix).expect("status");
    assert!(status.is_complete(), "status: {status}");
    assert!(lab::list_labs().unwrap().iter().any(|s| s.prefix == prefix));

    let summary = lab.down().expect("lab down");
    assert_eq!(summary.namespaces_deleted.len(), st.all_namespaces().len());
    assert!(namespaces_with_prefix(&prefix).is_empty());
    assert!(!lab::state_dir(&prefix).exists(), "state dir left behind");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.contains(&format!("/run/ebpf-proxy-lab/{prefix}/")),
        "bpffs left mounted"
    );
}

#[test]
fn drop_tears_down_even_when_the_test_panics() {
    require_root();
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let spec = LabSpec {
            pods: vec![PodSpec {
                name: "p".into(),
                node: 2,
                ip: Ipv4Addr::new(10, 76, 1, 5),
            }],
            topology: lab::Topology::from_env(),
        };
        let lab = Lab::up(None, &spec).expect("lab up");
        let pid = lab
            .spawn(&lab.pod_ns("p"), &["sleep", "1000"])
            .expect("spawn sleep");
        // And a process the lab does not track (like an agent started by another tool).
        let other = Command::new("ip")
            .args(["netns", "exec", &lab.node_ns(1), "sleep", "1000"])
            .spawn()
            .expect("spawn untracked");
        tx.send((lab.prefix().to_owned(), pid, other)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        panic!("deliberate panic with a live lab");
    });
    assert!(handle.join().is_err(), "the thread should have panicked");
    let (prefix, pid, mut other) = rx.recv().unwrap();
    assert!(
        namespaces_with_prefix(&prefix).is_empty(),
        "namespaces of {prefix} left behind"
    );
    assert!(!lab::state_dir(&prefix).exists(), "state dir left behind");
    assert!(!pid_alive(pid), "tracked child {pid} still running");
    let st = other.wait().expect("reap untracked");
    assert!(!st.success(), "untracked process should have been killed");
}

#[test]
fn kept_lab_survives_drop_and_is_torn_down_by_prefix() {
    require_root();
    let prefix = format!("eplk{}", std::process::id() % 100_000);
    // Clean up even if an assertion below fails.
    struct Guard(String);
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = lab::down_by_prefix(&self.0);
        }
    }
    let _guard = Guard(prefix.clone());
    {
        let mut lab = Lab::up(Some(&prefix), &LabSpec::default_demo()).expect("lab up");
        lab.set_keep(true);
        // The same prefix cannot be brought up twice.
        let err = Lab::up(Some(&prefix), &LabSpec::default_demo()).unwrap_err();
        assert!(format!("{err:#}").contains("already exists"), "{err:#}");
    }
    let status = Lab::status(&prefix).expect("status");
    assert!(
        status.is_complete(),
        "kept lab should still be complete: {status}"
    );

    // Another "process" attaches and uses it.
    let attached = Lab::attach(&prefix).expect("attach");
    ping(
        &attached,
        &attached.ext_ns(),
        attached.pod_ip("hostnames-c").unwrap(),
    );
    drop(attached); // attach() keeps by default
    assert!(!namespaces_with_prefix(&prefix).is_empty());

    let summary = lab::down_by_prefix(&prefix).expect("down");
    assert_eq!(summary.namespaces_deleted.len(), 8);
    assert_eq!(summary.unmounted.len(), 2);
    assert!(namespaces_with_prefix(&prefix).is_empty());
    let status = Lab::status(&prefix).expect("status");
    assert!(status.namespaces.is_empty() && !status.state_dir_exists && status.mounts.is_empty());
    // Idempotent.
    lab::down_by_prefix(&prefix).expect("second down");
}

#[test]
fn two_labs_side_by_side() {
    require_root();
    let a = Lab::up(None, &LabSpec::default_demo()).expect("lab a");
    let b = Lab::up(None, &LabSpec::default_demo()).expect("lab b");
    assert_ne!(a.prefix(), b.prefix());
    for l in [&a, &b] {
        ping(l, &l.pod_ns("client"), l.pod_ip("hostnames-c").unwrap());
    }
    let pa = a.prefix().to_owned();
    drop(a);
    assert!(namespaces_with_prefix(&pa).is_empty());
    ping(&b, &b.ext_ns(), b.pod_ip("hostnames-b").unwrap());
}

/// The lab tools binary (`ebpf-proxy-lab`): `EBPF_PROXY_LAB_BIN`, else beside the agent
/// (`EBPF_PROXY_BIN` or `target/release/ebpf-proxy`).
fn lab_tools_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("EBPF_PROXY_LAB_BIN") {
        return p.into();
    }
    let agent = std::env::var_os("EBPF_PROXY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/ebpf-proxy")
        });
    let p = proxy_lab::cluster::Binaries::beside(&agent).tools;
    assert!(
        p.exists(),
        "{} not found: build it (`cargo xtask build`) or set EBPF_PROXY_LAB_BIN",
        p.display()
    );
    p
}

#[test]
fn pod_servers_answer_across_the_lab() {
    require_root();
    let bin = lab_tools_bin();
    let lab = Lab::up(None, &LabSpec::default_demo()).expect("lab up");
    let pids = lab.start_pod_servers(&bin).expect("pod servers");
    assert_eq!(pids.len(), 4);
    let target = format!(
        "{}:{}",
        lab.pod_ip("hostnames-c").unwrap(),
        lab::POD_SERVER_PORT
    );
    for udp in [false, true] {
        let mut args = vec![
            bin.to_str().unwrap(),
            "probe",
            &target,
            "--count",
            "5",
            "--json",
        ];
        if udp {
            args.push("--udp");
        }
        let out = lab.exec(&lab.ext_ns(), &args).expect("probe");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "probe from ext failed: {stdout}");
        let report: serde_json::Value = serde_json::from_str(&stdout).expect("json report");
        assert_eq!(report["ok"], 5, "{report}");
        assert_eq!(report["answers"]["hostnames-c"], 5, "{report}");
        // No NAT in the plain lab: the pod sees the external client's address.
        assert_eq!(
            report["client_addrs_seen_by_server"]["192.0.2.10"], 5,
            "{report}"
        );
    }
}
