//! The conntrack lifecycle end to end (issue 10), in the namespace lab with real sockets:
//!
//! 1. 20,000 sequential masqueraded NodePort connections to one endpoint: closed flows give
//!    their SNAT ports back (the range holds 4,001), so none fails.
//! 2. A flood of unanswered flows from distinct spoofed sources, several times
//!    `--conntrack-max`, under a canary: established connections keep their entries (and
//!    backends), bare ACKs create no state, new connections work during and after it.
//! 3. An idle established TCP connection (and UDP flow) outlives more than 2 x
//!    `--conntrack-max` new short flows.
//! 4. One client port towards two ClusterIPs sharing an endpoint: the second flow's reply
//!    tuple would be the first's, so it gets another source port; both talk to their own VIP.
//! 5. 8 kB UDP datagrams (fragmented at MTU 1500) through a ClusterIP, request and echo whole.
//!
//! Needs root.
use std::{collections::BTreeMap, fs, net::Ipv4Addr, time::Duration, time::Instant};

use proxy_lab::{
    cluster::{
        Binaries, CANARY_IP, CANARY_PORT, CLUSTER_IP, Cluster, Endpoint, SERVICE_PORT,
        assert_canary_lost_nothing, counter_delta, hostnames_endpoints,
    },
    lab::{LabSpec, PodSpec, node_ip},
    services::{self, Svc},
};

fn bins() -> Binaries {
    proxy_lab::cluster::test_binaries()
}

fn say(m: &str) {
    eprintln!("{m}");
}

/// `--conntrack-max` for the tests that overflow the tables: 4,096 entries per table, i.e.
/// about 2,048 flows (two entries each).
const SMALL_CT: u64 = 4096;

fn small_ct_args() -> Vec<String> {
    vec!["--conntrack-max".into(), SMALL_CT.to_string()]
}

/// Installs `svc` (port 80 to `target_port`) and waits until both nodes programmed it.
fn install(c: &Cluster, svc: &Svc, eps: &[Endpoint], target_port: u16) {
    services::install_to(c, svc, eps, target_port).expect("manifest");
    for n in [1, 2] {
        services::wait_entry(c, n, svc.cluster_ip, 80, Duration::from_secs(10))
            .expect("programmed");
    }
}

fn u(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

fn map(v: &serde_json::Value, k: &str) -> BTreeMap<String, u64> {
    v[k].as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

trait TcpStats {
    fn lab_tcp_stats(&self, ns: &str) -> BTreeMap<String, u64>;
}

impl TcpStats for Cluster {
    /// `Tcp:` and `TcpExt:` counters of a namespace.
    fn lab_tcp_stats(&self, ns: &str) -> BTreeMap<String, u64> {
        let mut m = self.net_stats(ns, "/proc/net/snmp", "Tcp:").expect("Tcp");
        m.extend(
            self.net_stats(ns, "/proc/net/netstat", "TcpExt:")
                .expect("TcpExt"),
        );
        m
    }
}

fn counters(c: &Cluster, node: u8) -> BTreeMap<String, u64> {
    c.counters(node).expect("counters")
}

/// Waits (bounded) for a spawned lab tool to exit and returns its log (stdout and stderr).
fn wait_exit(c: &Cluster, pid: u32, timeout: Duration, what: &str) -> String {
    let start = Instant::now();
    while c.lab.child_status(pid).expect("status").is_none() {
        assert!(
            start.elapsed() < timeout,
            "{what} still running after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = c.lab.log_path(pid).expect("log path");
    fs::read_to_string(log).unwrap_or_default()
}

// -------------------------------------------------------------------------------------------
// 1. SNAT port reuse

/// NodePort service whose only endpoint is on node2: a connection to node1's NodePort is
/// masqueraded (SNAT to node1, a port of 61000-65000).
const CHURN: Svc = Svc {
    name: "churn",
    cluster_ip: Ipv4Addr::new(10, 96, 0, 60),
    lb_ip: None,
    node_port_tcp: Some(30300),
    node_port_udp: Some(30301),
    local: false,
    source_ranges: &[],
    health_check_node_port: None,
};

/// What one masqueraded churn run saw.
struct Churn {
    n: u64,
    report: serde_json::Value,
    /// node1's datapath counters, before and after.
    before: BTreeMap<String, u64>,
    after: BTreeMap<String, u64>,
    /// TCP statistics that moved: the client's, the endpoint's.
    client_tcp: BTreeMap<String, u64>,
    server_tcp: BTreeMap<String, u64>,
    endpoint: String,
}

/// `n` sequential connections from the external client to node1's NodePort of [`CHURN`],
/// whose one endpoint is on node2 (masqueraded). `monotonic_timestamps`: the client's TCP
/// timestamps without per-connection offsets (`net.ipv4.tcp_timestamps = 2`).
fn masqueraded_churn(n: u64, monotonic_timestamps: bool) -> Churn {
    let spec = LabSpec::default_demo();
    let eps = hostnames_endpoints(&spec);
    let c = Cluster::up(&bins(), &spec, &eps, &say).expect("cluster up");
    let remote: Vec<Endpoint> = eps.iter().filter(|e| e.node == 2).cloned().collect();
    assert_eq!(remote.len(), 1, "one endpoint, on node2");
    install(&c, &CHURN, &remote, proxy_lab::lab::POD_SERVER_PORT);
    let target = format!("{}:30300", node_ip(1));
    let ext = c.lab.ext_ns();
    if monotonic_timestamps {
        c.lab
            .exec_ok(
                &ext,
                &["sh", "-c", "echo 2 > /proc/sys/net/ipv4/tcp_timestamps"],
            )
            .expect("sysctl");
    }

    // Masqueraded: the endpoint sees node1, not the external client.
    let p = c.probe_in(&ext, &target, false, 5, 2000).expect("probe");
    assert_eq!(p.ok(), 5, "{:?}", p.0);
    assert_eq!(
        p.seen_by_server().into_keys().collect::<Vec<_>>(),
        vec![node_ip(1).to_string()],
        "masqueraded to node1"
    );

    let before = counters(&c, 1);
    let server_ns = c.lab.pod_ns(&remote[0].pod);
    let (ext0, srv0) = (c.lab_tcp_stats(&ext), c.lab_tcp_stats(&server_ns));
    let start = Instant::now();
    let report = c
        .tool_json(
            &ext,
            &[
                "churn",
                &target,
                "--count",
                &n.to_string(),
                "--timeout-ms",
                "5000",
            ],
        )
        .expect("churn");
    let secs = start.elapsed().as_secs_f64();
    let after = counters(&c, 1);
    let (ext1, srv1) = (c.lab_tcp_stats(&ext), c.lab_tcp_stats(&server_ns));
    let moved = |a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>| -> BTreeMap<String, u64> {
        b.keys()
            .map(|k| (k.clone(), counter_delta(a, b, k)))
            .filter(|(_, v)| *v > 0)
            .collect()
    };
    let ch = Churn {
        n,
        report,
        client_tcp: moved(&ext0, &ext1),
        server_tcp: moved(&srv0, &srv1),
        before,
        after,
        endpoint: remote[0].pod.clone(),
    };
    let (r, d) = (&ch.report, |k: &str| {
        counter_delta(&ch.before, &ch.after, k)
    });
    println!(
        "{n} sequential masqueraded connections (client timestamps {}) in {secs:.1} s \
         ({:.0}/s): ok {}, failures {:?}, slow (>= 1 s) {}, slowest {} ms; node1: masquerade \
         {}, conntrack_closed_reused {}, drop_snat_exhausted {}; client TCP {:?}; endpoint TCP \
         {:?}",
        if monotonic_timestamps {
            "monotonic"
        } else {
            "per-connection offsets"
        },
        n as f64 / secs,
        u(r, "ok"),
        map(r, "failures"),
        u(r, "slow"),
        u(r, "slowest_ms"),
        d("masquerade"),
        d("conntrack_closed_reused"),
        d("drop_snat_exhausted"),
        ch.client_tcp,
        ch.server_tcp,
    );
    ch
}

/// Every connection answered, by the one endpoint, none dropped for want of a SNAT port.
fn assert_churn_ok(ch: &Churn) {
    let (r, n) = (&ch.report, ch.n);
    assert_eq!(
        ch.after.get("drop_snat_exhausted").copied().unwrap_or(0),
        0,
        "SNAT ports ran out (closed flows must give theirs back): {:?}",
        ch.after
    );
    assert_eq!(u(r, "sent"), n, "{r:#}");
    assert!(map(r, "failures").is_empty(), "failed connections: {r:#}");
    assert_eq!(u(r, "ok"), n, "{r:#}");
    assert_eq!(
        map(r, "answers"),
        BTreeMap::from([(ch.endpoint.clone(), n)]),
        "every connection reached the one endpoint"
    );
    let masq = counter_delta(&ch.before, &ch.after, "masquerade");
    assert!(
        masq >= n,
        "every connection was a new masqueraded flow: {masq}"
    );
}

/// 20,000 connections through 4,001 SNAT ports: each port serves ~5 of them, taken over from
/// the closed flow before it. The client's timestamps are monotonic so that the endpoint's
/// TIME_WAIT accepts a reused (node1, port) tuple (see the next test for what per-connection
/// offsets do).
#[test]
fn twenty_thousand_sequential_masqueraded_nodeport_connections_to_one_endpoint() {
    let ch = masqueraded_churn(20_000, true);
    assert_churn_ok(&ch);
    assert!(
        counter_delta(&ch.before, &ch.after, "conntrack_closed_reused") > 0,
        "SNAT ports of closed flows were taken over"
    );
}

/// Linux (6.x) gives every connection its own TCP timestamp offset, so when a SNAT port is
/// reused towards the same endpoint within that endpoint's TIME_WAIT (60 s) the new SYN is
/// PAWS-rejected about half the time (endpoint `TcpExt: PAWSTimewait`): the client waits 1 s
/// and retries. The datapath takes a closed flow's SNAT port only when 32 random probes found
/// no free one, so 3,000 connections through 4,001 ports (the kernel's default timestamps)
/// must meet almost none of this. Taking over at once, as the first version did, gave 470
/// PAWS rejects and 57 connections of 1 s or more; free ports first gives a handful (5 seen),
/// whose cause is not understood yet: the bound below is 1%.
#[test]
fn masqueraded_connections_are_rarely_paws_rejected_by_the_endpoints_time_wait() {
    let n = 3000;
    let ch = masqueraded_churn(n, false);
    assert_churn_ok(&ch);
    let get = |m: &BTreeMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
    let (paws, retrans, slow) = (
        get(&ch.server_tcp, "PAWSTimewait"),
        get(&ch.client_tcp, "TCPSynRetrans"),
        u(&ch.report, "slow"),
    );
    eprintln!(
        "{n} masqueraded connections: {paws} PAWS rejects, {retrans} SYN retransmits, {slow} >= 1 s"
    );
    assert!(
        paws <= n / 100 && retrans <= n / 100 && slow <= n / 100,
        "(endpoint PAWSTimewait, client SYN retransmits, connections >= 1 s) = \
         ({paws}, {retrans}, {slow}): over 1% of {n}"
    );
}

// -------------------------------------------------------------------------------------------
// 2. A flood of unanswered flows

/// A service whose one endpoint never answers (no such pod): every flow to it stays
/// unanswered.
const BLACKHOLE: Svc = Svc::cluster_ip_only("blackhole", Ipv4Addr::new(10, 96, 0, 70));

fn ghost() -> Endpoint {
    Endpoint {
        pod: "ghost".into(),
        ip: Ipv4Addr::new(10, 76, 1, 99),
        node: 2,
        ready: true,
    }
}

#[test]
fn junk_flood_of_unanswered_flows_evicts_no_established_connection() {
    let mut spec = LabSpec::default_demo();
    spec.pods.push(PodSpec {
        name: "flooder".into(),
        node: 1,
        ip: Ipv4Addr::new(10, 76, 0, 30),
    });
    let eps = hostnames_endpoints(&spec);
    let c = Cluster::up_with_agent_args(&bins(), &spec, &eps, &small_ct_args(), &say)
        .expect("cluster up");
    install(&c, &BLACKHOLE, &[ghost()], proxy_lab::lab::POD_SERVER_PORT);
    c.start_canary_service(&eps).expect("canary service");
    let (tcp, udp) = (20, 10);
    let canary = c.start_canary("flood", tcp, udp).expect("canary");
    let before = counters(&c, 1);

    // UDP datagrams and TCP SYNs (unanswered new flows) and bare ACKs (no flow: no state),
    // each from its own spoofed pod-CIDR source (50 addresses x ports), paced over ~2 s.
    let count = 18_000u64;
    let unanswered = count / 3 * 2;
    assert!(unanswered >= 2 * SMALL_CT, "the flood overflows the table");
    let flood = c
        .spawn_in_pod(
            "flooder",
            &[
                c.bins.tools.display().to_string(),
                "junk-flood".into(),
                format!("{}:80", BLACKHOLE.cluster_ip),
                "--kind".into(),
                "udp".into(),
                "--kind".into(),
                "syn".into(),
                "--kind".into(),
                "ack".into(),
                "--count".into(),
                count.to_string(),
                "--src".into(),
                "10.76.0.100".into(),
                "--src-count".into(),
                "50".into(),
                "--sport-min".into(),
                "20000".into(),
                "--pps".into(),
                "9000".into(),
            ],
        )
        .expect("junk-flood");

    // New connections while the flood runs.
    let vip = format!("{CLUSTER_IP}:{SERVICE_PORT}");
    let mut during = 0;
    while c.lab.child_status(flood).expect("status").is_none() {
        for udp in [false, true] {
            let p = c.probe("client", &vip, udp, 20).expect("probe");
            assert_eq!(
                p.ok(),
                20,
                "udp={udp}: new connections during the flood: {:?}",
                p.0
            );
            during += 20;
        }
    }
    let log = wait_exit(&c, flood, Duration::from_secs(30), "junk-flood");
    let report: serde_json::Value =
        serde_json::from_str(&log).unwrap_or_else(|e| panic!("junk-flood report ({e}): {log}"));
    assert_eq!(u(&report, "sent"), count, "{report:#}");
    assert!(during >= 40, "no probe ran during the flood");

    // And after it.
    for udp in [false, true] {
        let p = c.probe("client", &vip, udp, 50).expect("probe");
        assert_eq!(
            p.ok(),
            50,
            "udp={udp}: new connections after the flood: {:?}",
            p.0
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = counters(&c, 1);
    let v = c.inspect(1).expect("inspect");
    let r = c.finish_canary(canary).expect("canary report");
    let d = |k: &str| counter_delta(&before, &after, k);
    println!(
        "junk flood: {} packets in {} ms ({:?}); {during} new connections during it; node1: \
         forward_new {}, drop_tcp_no_flow {}, drop_conntrack_full {}, conntrack {}",
        u(&report, "sent"),
        u(&report, "elapsed_ms"),
        map(&report, "by_kind"),
        d("forward_new"),
        d("drop_tcp_no_flow"),
        d("drop_conntrack_full"),
        v["conntrack"],
    );
    assert_canary_lost_nothing(&r, tcp as u64, udp as u64, "junk flood");
    assert!(
        r["tcp"]["round_trips"].as_u64().unwrap_or(0) >= tcp as u64 * 5,
        "the canary kept talking: {r:#}"
    );
    assert!(
        d("forward_new") >= unanswered,
        "every UDP datagram and SYN opened a flow: {}",
        d("forward_new")
    );
    assert!(
        d("drop_tcp_no_flow") >= count / 3,
        "bare ACKs are dropped without state: {}",
        d("drop_tcp_no_flow")
    );
    assert_eq!(
        d("drop_conntrack_full"),
        0,
        "nothing dropped for lack of room"
    );
    let unanswered_entries = v["conntrack"]["unanswered_entries"].as_u64().unwrap_or(0);
    assert!(
        unanswered_entries >= SMALL_CT / 2,
        "the flood filled the unanswered table: {}",
        v["conntrack"]
    );
    assert!(
        v["conntrack"]["answered_entries"].as_u64().unwrap_or(0) >= 2 * (tcp + udp) as u64,
        "the canary's flows are in the answered table: {}",
        v["conntrack"]
    );
}

// -------------------------------------------------------------------------------------------
// 3. An idle flow outlives churn

#[test]
fn idle_established_flow_survives_more_than_twice_conntrack_max_new_flows() {
    let spec = LabSpec::default_demo();
    let eps = hostnames_endpoints(&spec);
    let c = Cluster::up_with_agent_args(&bins(), &spec, &eps, &small_ct_args(), &say)
        .expect("cluster up");
    c.start_canary_service(&eps).expect("echo service");
    let dir = c.lab.state_dir();
    let (until, report) = (dir.join("idle.go"), dir.join("idle.json"));
    let canary = format!("{CANARY_IP}:{CANARY_PORT}");
    let hold = c
        .spawn_in_pod(
            "client",
            &[
                c.bins.tools.display().to_string(),
                "idle-hold".into(),
                canary.clone(),
                "--udp-target".into(),
                canary,
                "--until-file".into(),
                until.display().to_string(),
                "--max-idle-s".into(),
                "120".into(),
                "--report".into(),
                report.display().to_string(),
            ],
        )
        .expect("idle-hold");
    let start = Instant::now();
    loop {
        let log = fs::read_to_string(c.lab.log_path(hold).expect("log")).unwrap_or_default();
        if log.contains("idle-hold: established") {
            eprintln!("{}", log.trim());
            break;
        }
        assert!(
            c.lab.child_status(hold).expect("status").is_none(),
            "idle-hold exited: {log}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "idle-hold: {log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // > 2 x --conntrack-max short flows (two entries each) from the same pod, TCP and UDP.
    let before = counters(&c, 1);
    let vip = format!("{CLUSTER_IP}:{SERVICE_PORT}");
    let (n_tcp, n_udp) = (6000u64, 3000u64);
    assert!(n_tcp + n_udp > 2 * SMALL_CT);
    for (udp, n) in [(false, n_tcp), (true, n_udp)] {
        let mut args = vec!["churn", &vip, "--timeout-ms", "3000"];
        let n_s = n.to_string();
        args.extend(["--count", &n_s]);
        if udp {
            args.push("--udp");
        }
        let r = c.tool_json(&c.lab.pod_ns("client"), &args).expect("churn");
        println!(
            "churn udp={udp}: {} of {} ok in {} ms, failures {:?}",
            u(&r, "ok"),
            u(&r, "sent"),
            u(&r, "elapsed_ms"),
            map(&r, "failures")
        );
        assert_eq!(u(&r, "ok"), n, "udp={udp}: short flows: {r:#}");
    }
    let after = counters(&c, 1);
    let v = c.inspect(1).expect("inspect");

    fs::write(&until, b"go").expect("until file");
    let log = wait_exit(&c, hold, Duration::from_secs(15), "idle-hold");
    let text = fs::read_to_string(&report).unwrap_or_else(|e| panic!("report ({e}): {log}"));
    let r: serde_json::Value = serde_json::from_str(&text).expect("report JSON");
    let d = |k: &str| counter_delta(&before, &after, k);
    println!(
        "idle {} ms across {} new flows (node1 forward_new {}, conntrack_answered_full {}, \
         conntrack {}): {r}",
        u(&r, "idle_ms"),
        n_tcp + n_udp,
        d("forward_new"),
        d("conntrack_answered_full"),
        v["conntrack"]
    );
    // (A UDP socket may get an ephemeral port an earlier flow of the churn still holds: that
    // datagram is that flow's, not a new one.)
    assert!(
        d("forward_new") > 2 * SMALL_CT,
        "more than 2 x --conntrack-max new flows went through node1's tables: {}",
        d("forward_new")
    );
    assert_eq!(
        r["tcp_ok"].as_bool(),
        Some(true),
        "the idle TCP connection broke (its conntrack entry was evicted?): {r:#}"
    );
    assert!(r["udp_error"].is_null(), "idle UDP flow: {r:#}");
    assert!(
        u(&r, "idle_ms") < 25_000,
        "the UDP flow idled past the 30 s UDP timeout; the check means nothing: {r:#}"
    );
    assert_eq!(
        r["udp_backend_after"], r["udp_backend_before"],
        "the idle UDP flow was balanced again: {r:#}"
    );
}

// -------------------------------------------------------------------------------------------
// 4. Two VIPs, one endpoint, one client port

const TWIN_A1: Svc = Svc::cluster_ip_only("twin-a1", Ipv4Addr::new(10, 96, 0, 81));
const TWIN_A2: Svc = Svc::cluster_ip_only("twin-a2", Ipv4Addr::new(10, 96, 0, 82));
const TWIN_C1: Svc = Svc::cluster_ip_only("twin-c1", Ipv4Addr::new(10, 96, 0, 83));
const TWIN_C2: Svc = Svc::cluster_ip_only("twin-c2", Ipv4Addr::new(10, 96, 0, 84));
const ECHO_PORT: u16 = 9377;

#[test]
fn one_client_port_to_two_vips_sharing_an_endpoint() {
    let spec = LabSpec::default_demo();
    let eps = hostnames_endpoints(&spec);
    let c = Cluster::up(&bins(), &spec, &eps, &say).expect("cluster up");
    let pick =
        |pod: &str| -> Vec<Endpoint> { eps.iter().filter(|e| e.pod == pod).cloned().collect() };
    c.start_pod_servers_on(&["hostnames-a", "hostnames-c"], ECHO_PORT, &["--echo"])
        .expect("echo servers");
    for (svc, pod) in [
        (&TWIN_A1, "hostnames-a"),
        (&TWIN_A2, "hostnames-a"),
        (&TWIN_C1, "hostnames-c"),
        (&TWIN_C2, "hostnames-c"),
    ] {
        install(&c, svc, &pick(pod), ECHO_PORT);
    }
    let before = counters(&c, 1);
    let client = c.lab.pod_ns("client");
    let mut cases = 0u64;
    // The endpoint on the client's node (reply on its veth) and on the other node (reply on
    // node1's uplink); TCP (both connections open at once) and UDP (one socket).
    for (pair, pod, port) in [
        ([&TWIN_A1, &TWIN_A2], "hostnames-a", 20001u16),
        ([&TWIN_C1, &TWIN_C2], "hostnames-c", 20002),
    ] {
        for udp in [false, true] {
            let t: Vec<String> = pair
                .iter()
                .map(|s| format!("{}:80", s.cluster_ip))
                .collect();
            let port_s = port.to_string();
            let mut args = vec![
                "same-port",
                &t[0],
                &t[1],
                "--port",
                &port_s,
                "--rounds",
                "3",
            ];
            if udp {
                args.push("--udp");
            }
            let r = c.tool_json(&client, &args).expect("same-port");
            let what = format!("{pod} udp={udp}");
            println!("{what}: {r}");
            let flows = r["flows"].as_array().expect("flows");
            assert_eq!(flows.len(), 2, "{what}: {r:#}");
            let mut seen_ports = Vec::new();
            for (f, target) in flows.iter().zip(&t) {
                assert!(f["error"].is_null(), "{what}: {target}: {r:#}");
                assert_eq!(f["ok_rounds"], 3, "{what}: {target}: {r:#}");
                assert_eq!(f["backend"], pod, "{what}: {target}: {r:#}");
                let from: Vec<&str> = f["reply_from"]
                    .as_array()
                    .expect("reply_from")
                    .iter()
                    .filter_map(|x| x.as_str())
                    .collect();
                assert!(
                    !from.is_empty() && from.iter().all(|a| a == target),
                    "{what}: replies to {target} came from {from:?}"
                );
                let seen = f["seen_by_server"].as_str().unwrap_or_default();
                seen_ports.push(seen.rsplit(':').next().unwrap_or_default().to_owned());
            }
            assert_ne!(
                seen_ports[0], seen_ports[1],
                "{what}: the endpoint saw both flows from one port (one reply tuple for two flows)"
            );
            assert!(
                seen_ports.contains(&port_s),
                "{what}: the first flow keeps its port: {seen_ports:?}"
            );
            cases += 1;
        }
    }
    let after = counters(&c, 1);
    let d = |k: &str| counter_delta(&before, &after, k);
    println!(
        "node1: conntrack_clash_remapped {}, drop_conntrack_clash {}",
        d("conntrack_clash_remapped"),
        d("drop_conntrack_clash")
    );
    assert!(
        d("conntrack_clash_remapped") >= cases,
        "one remapped flow per case: {}",
        d("conntrack_clash_remapped")
    );
    assert_eq!(d("drop_conntrack_clash"), 0);
}

/// A pod connected straight to an endpoint (no service: our conntrack never sees it, as
/// after an upgrade from v0.1.0, which balanced pods at the socket) and, from the same port,
/// to a ClusterIP that lands on that endpoint: the service flow must not reuse the tuple, or
/// the endpoint takes its SYN for the first connection and one of them is reset. netfilter's
/// NAT sees both and remaps; we look the tuple up among the pod's sockets.
#[test]
fn a_pod_connection_straight_to_an_endpoint_keeps_its_tuple_from_a_service_flow() {
    let spec = LabSpec::default_demo();
    let eps = hostnames_endpoints(&spec);
    let c = Cluster::up(&bins(), &spec, &eps, &say).expect("cluster up");
    c.start_pod_servers_on(&["hostnames-a", "hostnames-c"], ECHO_PORT, &["--echo"])
        .expect("echo servers");
    let client = c.lab.pod_ns("client");
    for (svc, pod, port) in [
        (&TWIN_A1, "hostnames-a", 20011u16),
        (&TWIN_C1, "hostnames-c", 20012),
    ] {
        let ep: Vec<Endpoint> = eps.iter().filter(|e| e.pod == pod).cloned().collect();
        install(&c, svc, &ep, ECHO_PORT);
        let direct = format!("{}:{ECHO_PORT}", ep[0].ip);
        let via = format!("{}:80", svc.cluster_ip);
        let port_s = port.to_string();
        let r = c
            .tool_json(
                &client,
                &[
                    "same-port",
                    &direct,
                    &via,
                    "--port",
                    &port_s,
                    "--rounds",
                    "3",
                ],
            )
            .expect("same-port");
        println!("{pod}: {r}");
        let flows = r["flows"].as_array().expect("flows");
        assert_eq!(flows.len(), 2, "{pod}: {r:#}");
        for f in flows {
            assert!(f["error"].is_null(), "{pod}: {r:#}");
            assert_eq!(f["ok_rounds"], 3, "{pod}: {r:#}");
            assert_eq!(f["backend"], pod, "{pod}: {r:#}");
        }
        let seen = |i: usize| {
            flows[i]["seen_by_server"]
                .as_str()
                .unwrap_or_default()
                .rsplit(':')
                .next()
                .unwrap_or_default()
                .to_owned()
        };
        assert_eq!(seen(0), port_s, "{pod}: the direct connection is untouched");
        assert_ne!(
            seen(1),
            port_s,
            "{pod}: the service flow took the direct connection's tuple: {r:#}"
        );
    }
}

// -------------------------------------------------------------------------------------------
// 5. Fragmented UDP

const BIGUDP: Svc = Svc::cluster_ip_only("bigudp", Ipv4Addr::new(10, 96, 0, 90));
const BIG_PORT: u16 = 9378;

#[test]
fn big_udp_datagrams_fragmented_both_ways_through_a_cluster_ip() {
    let spec = LabSpec::default_demo();
    let eps = hostnames_endpoints(&spec);
    let c = Cluster::up(&bins(), &spec, &eps, &say).expect("cluster up");
    // A 1500-byte MTU on every hop: the pods, their host-side veths, cbr0 (bridge topology)
    // and the uplinks.
    let st = c.lab.state().clone();
    let mut hops = vec![(c.lab.ext_ns(), "eth0".to_owned())];
    for p in &st.pods {
        hops.push((p.ns.clone(), p.pod_if.clone()));
        hops.push((c.lab.node_ns(p.node), p.host_veth.clone()));
    }
    for n in &st.nodes {
        hops.push((n.ns.clone(), "eth0".into()));
        if n.bridge_ip.is_some() {
            hops.push((n.ns.clone(), proxy_lab::lab::BRIDGE_IF.into()));
        }
    }
    for (ns, ifname) in &hops {
        assert_eq!(c.mtu(ns, ifname).expect("mtu"), 1500, "{ifname} in {ns}");
    }
    let pods: Vec<&str> = eps.iter().map(|e| e.pod.as_str()).collect();
    c.start_pod_servers_on(&pods, BIG_PORT, &["--udp-echo"])
        .expect("UDP echo servers");
    install(&c, &BIGUDP, &eps, BIG_PORT);

    let client = c.lab.pod_ns("client");
    let (ip0, b1, b2) = (
        c.ip_stats(&client).expect("snmp"),
        counters(&c, 1),
        counters(&c, 2),
    );
    let n = 30u64;
    let size = 8000;
    let r = c
        .tool_json(
            &client,
            &[
                "udp-big",
                &format!("{}:80", BIGUDP.cluster_ip),
                "--size",
                &size.to_string(),
                "--count",
                &n.to_string(),
            ],
        )
        .expect("udp-big");
    let (ip1, a1, a2) = (
        c.ip_stats(&client).expect("snmp"),
        counters(&c, 1),
        counters(&c, 2),
    );
    let ip = |k: &str| counter_delta(&ip0, &ip1, k);
    let (d1, d2) = (
        |k: &str| counter_delta(&b1, &a1, k),
        |k: &str| counter_delta(&b2, &a2, k),
    );
    println!(
        "{n} datagrams of {size} bytes: {r}; client: FragCreates {}, ReasmOKs {}; \
         fragment_translated node1 {} node2 {}, pass_fragment node1 {} node2 {}",
        ip("FragCreates"),
        ip("ReasmOKs"),
        d1("fragment_translated"),
        d2("fragment_translated"),
        d1("pass_fragment"),
        d2("pass_fragment"),
    );
    assert_eq!(
        u(&r, "ok"),
        n,
        "every datagram and its echo arrived whole: {r:#}"
    );
    assert!(
        u(&r, "largest_reply") > size,
        "the echo carried the datagram: {r:#}"
    );
    assert_eq!(
        map(&r, "answers").len(),
        eps.len(),
        "every endpoint (both nodes) answered: {r:#}"
    );
    // 8,008 bytes of UDP in 1,480-byte pieces: 6 fragments each way, 5 of them non-first.
    assert!(
        ip("FragCreates") >= 6 * n,
        "the client fragmented its datagrams: FragCreates {}",
        ip("FragCreates")
    );
    assert!(
        ip("ReasmOKs") >= n,
        "the client reassembled the echoes: ReasmOKs {}",
        ip("ReasmOKs")
    );
    // Requests on the client's veth, replies on the endpoints' veths (node1) or node1's
    // uplink (from node2).
    assert!(
        d1("fragment_translated") >= 10 * n,
        "node1 translated the non-first fragments both ways: {}",
        d1("fragment_translated")
    );
}
