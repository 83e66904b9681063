//! The cls_bpf fallback of kernels without TCX, forced with `--tc-attach=netlink`: the tc
//! programs really are netlink filters (and no TCX link exists), a restart swaps the program
//! inside the same filter under a canary, switching modes (netlink -> TCX -> netlink) loses no
//! connection and leaves one attachment per hook, and `cleanup` removes our filters. Needs
//! root.
use std::time::Duration;

use proxy_lab::{
    cluster::{Cluster, assert_canary_lost_nothing},
    lab::{LabSpec, NODES},
};

/// A pod hook as `inspect --json` lists it: interface, direction, link id (TCX), program id,
/// where the netlink filter sits (netlink).
type HookRow = (String, String, Option<u64>, u64, Option<String>);

/// Node `n`'s pod hooks.
fn hooks(c: &Cluster, n: u8) -> Vec<HookRow> {
    let v = c.inspect(n).expect("inspect");
    v["links"]
        .as_array()
        .expect("links")
        .iter()
        .map(|l| {
            (
                l["interface"].as_str().unwrap_or_default().to_owned(),
                l["direction"].as_str().unwrap_or_default().to_owned(),
                l["link_id"].as_u64(),
                l["prog_id"].as_u64().unwrap_or(0),
                l["tc_filter"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

fn tc_show(c: &Cluster, n: u8, dev: &str, dir: &str) -> String {
    c.lab
        .exec_ok(
            &c.lab.node_ns(n),
            &["tc", "filter", "show", "dev", dev, dir],
        )
        .expect("tc filter show")
}

fn pods_on(c: &Cluster, n: u8) -> usize {
    c.lab.state().pods.iter().filter(|p| p.node == n).count()
}

/// Every pod hook of node `n` is our netlink filter (tc lists it, no TCX link pin).
fn assert_netlink(c: &Cluster, n: u8, what: &str) -> Vec<(String, String, u64)> {
    let h = hooks(c, n);
    assert_eq!(h.len(), 2 * pods_on(c, n), "{what}: node{n}: {h:?}");
    let mut out = Vec::new();
    for (iface, dir, link, prog, filter) in h {
        assert_eq!(link, None, "{what}: {iface} {dir} is not a TCX link");
        assert!(
            filter.is_some_and(|f| f.starts_with("prio 3760 handle 0xeb0 bpf lb_pod_")),
            "{what}: {iface} {dir}"
        );
        let (tcdir, prog_name) = if dir == "in" {
            ("ingress", "lb_pod_in")
        } else {
            ("egress", "lb_pod_out")
        };
        let shown = tc_show(c, n, &iface, tcdir);
        assert!(
            shown.contains(prog_name)
                && shown.contains("pref 3760")
                && shown.contains("direct-action")
                && shown.contains(&format!("id {prog}")),
            "{what}: tc filter show dev {iface} {tcdir}: {shown}"
        );
        out.push((iface, dir, prog));
    }
    let pins = c.lab.bpffs(n).join("ebpf-proxy/links");
    let left: Vec<_> = std::fs::read_dir(&pins)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{what}: node{n}: TCX link pins {left:?}");
    out
}

#[test]
fn netlink_filters_swap_atomically_switch_modes_and_clean_up() {
    let spec = LabSpec::default_demo();
    let eps = proxy_lab::cluster::hostnames_endpoints(&spec);
    let netlink = vec!["--tc-attach".to_owned(), "netlink".to_owned()];
    let mut c = Cluster::up_with_agent_args(
        &proxy_lab::cluster::test_binaries(),
        &spec,
        &eps,
        &netlink,
        &|m| eprintln!("{m}"),
    )
    .expect("cluster up");
    c.start_canary_service(&eps).expect("canary service");
    let (tcp, udp) = (20, 6);
    let canary = c.start_canary("tc-netlink", tcp, udp).expect("canary");
    let mut before: Vec<_> = NODES
        .iter()
        .map(|&n| assert_netlink(&c, n, "first start"))
        .collect();
    for n in NODES {
        assert!(
            c.agent_log(n)
                .contains("tc programs attached as netlink cls_bpf filters"),
            "{}",
            c.agent_log(n)
        );
    }

    // SIGKILL + restart, three times: the same filters, each with the new agent's program.
    for cycle in 1..=3 {
        for n in NODES {
            c.kill_agent(n).expect("SIGKILL");
        }
        std::thread::sleep(Duration::from_millis(300));
        for (i, &n) in NODES.iter().enumerate() {
            assert_eq!(
                assert_netlink(&c, n, "agent dead"),
                before[i],
                "cycle {cycle}: the filters stay while no agent runs"
            );
            c.restart_agent(n, Duration::from_secs(20))
                .expect("restart");
            let after = assert_netlink(&c, n, "restarted");
            for (a, b) in after.iter().zip(&before[i]) {
                assert_eq!((&a.0, &a.1), (&b.0, &b.1));
                assert_ne!(
                    a.2, b.2,
                    "cycle {cycle}: {a:?}: program swapped in the filter"
                );
            }
            before[i] = after;
        }
    }

    // To TCX: pinned links take over and our filters go; one attachment per hook.
    c.agent_args = vec!["--tc-attach".into(), "tcx".into()];
    for n in NODES {
        c.stop_agent(n).expect("SIGTERM");
        c.restart_agent(n, Duration::from_secs(20))
            .expect("restart on tcx");
        let h = hooks(&c, n);
        assert_eq!(h.len(), 2 * pods_on(&c, n), "tcx: node{n}: {h:?}");
        for (iface, dir, link, _, filter) in &h {
            assert!(
                link.is_some() && filter.is_none(),
                "tcx: {iface} {dir}: {h:?}"
            );
            let tcdir = if dir == "in" { "ingress" } else { "egress" };
            let shown = tc_show(&c, n, iface, tcdir);
            assert!(!shown.contains("lb_pod_"), "tcx: filter left: {shown}");
        }
    }
    // And back: the filters return, the TCX pins go.
    c.agent_args = netlink;
    for n in NODES {
        c.stop_agent(n).expect("SIGTERM");
        c.restart_agent(n, Duration::from_secs(20))
            .expect("restart on netlink");
        assert_netlink(&c, n, "back on netlink");
    }
    let r = c.finish_canary(canary).expect("canary report");
    assert_canary_lost_nothing(
        &r,
        tcp as u64,
        udp as u64,
        "netlink restarts and tcx/netlink switches",
    );

    // cleanup removes our filters (pod and uplink).
    for n in NODES {
        c.stop_agent(n).expect("SIGTERM");
        let pods = hooks(&c, n);
        let out = c.cleanup(n).expect("cleanup");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for (iface, dir, ..) in pods {
            let tcdir = if dir == "in" { "ingress" } else { "egress" };
            let shown = tc_show(&c, n, &iface, tcdir);
            assert!(!shown.contains("lb_pod_"), "after cleanup: {shown}");
        }
        let up = tc_show(&c, n, "eth0", "ingress");
        assert!(
            !up.contains("lb_up_in"),
            "uplink filter after cleanup: {up}"
        );
    }
}
