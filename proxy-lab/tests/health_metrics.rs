//! `/healthz`, `/livez` and `/metrics` of a running agent in the namespace lab. Needs root.
use std::{fs, time::Duration};

use proxy_lab::{
    cluster::{Binaries, CLUSTER_IP, Cluster, SERVICE_PORT, hostnames_endpoints},
    lab::{LabSpec, node_pod_net},
};

fn bins() -> Binaries {
    proxy_lab::cluster::test_binaries()
}

/// The value of the first sample line starting with `prefix` (name plus labels).
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A scrape of node1's /metrics with curl's `--compressed` (Accept-Encoding: gzip, decoded) and
/// an optional Accept header: (response head, decoded body, bytes on the wire).
fn scrape(c: &Cluster, accept: Option<&str>) -> (String, String, u64) {
    let mut argv = vec![
        "curl".to_owned(),
        "-sS".into(),
        "--max-time".into(),
        "5".into(),
        "--compressed".into(),
        "-D".into(),
        "/dev/stderr".into(),
        "-w".into(),
        "\n%{size_download}".into(),
    ];
    if let Some(a) = accept {
        argv.extend(["-H".into(), format!("Accept: {a}")]);
    }
    argv.push("http://127.0.0.1:10249/metrics".into());
    let out = c.lab.exec(&c.lab.node_ns(1), &argv).expect("curl");
    assert!(out.status.success(), "curl: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, size) = text.rsplit_once('\n').expect("size line");
    (
        String::from_utf8_lossy(&out.stderr).to_ascii_lowercase(),
        body.to_owned(),
        size.trim().parse().expect("size_download"),
    )
}

/// kube-proxy's metric families, formats and compression; `text` is a plain scrape.
fn kube_proxy_metrics(c: &Cluster, text: &str) {
    // Both exposition formats, gzipped on request.
    let (head, om, wire) = scrape(c, Some("application/openmetrics-text;version=1.0.0"));
    assert!(head.contains("content-encoding: gzip"), "{head}");
    assert!(
        head.contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(om.ends_with("# EOF\n"), "OpenMetrics ends with # EOF: {om}");
    assert!(
        (wire as usize) * 3 < om.len(),
        "gzip: {wire} bytes on the wire for {} of text",
        om.len()
    );
    let (head, prom, _) = scrape(c, Some("text/plain;version=0.0.4"));
    assert!(head.contains("content-encoding: gzip"), "{head}");
    assert!(
        head.contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert!(!prom.contains("# EOF"), "{prom}");
    assert!(
        prom.contains("# TYPE kubeproxy_sync_proxy_rules_endpoint_changes_total counter"),
        "Prometheus text names counters by their samples: {prom}"
    );
    println!("metrics: {} bytes of OpenMetrics, {wire} gzipped", om.len());
    // kube-proxy's buckets.
    for b in [
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.001\"}",
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"16.384\"}",
        "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{le=\"0.001\"}",
        "kubeproxy_sync_partial_proxy_rules_duration_seconds_bucket{le=\"16.384\"}",
        "kubeproxy_network_programming_duration_seconds_bucket{le=\"0.25\"}",
        "kubeproxy_network_programming_duration_seconds_bucket{le=\"300.0\"}",
    ] {
        assert!(sample(text, b).is_some(), "no {b}: {text}");
    }
    for (name, min) in [
        (
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
            1.0,
        ),
        ("kubeproxy_sync_proxy_rules_service_changes_total", 1.0),
        ("kubeproxy_sync_proxy_rules_endpoint_changes_total", 1.0),
        (
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            1.7e9,
        ),
        ("kubeproxy_proxy_healthz_total{code=\"200\"}", 1.0),
        ("kubeproxy_proxy_livez_total{code=\"200\"}", 1.0),
        (
            "ebpf_proxy_datapath_verdicts_total{verdict=\"forward\"}",
            50.0,
        ),
        ("process_resident_memory_bytes", 1e6),
        ("process_open_fds", 3.0),
        ("process_max_fds", 3.0),
        ("process_start_time_seconds", 1.7e9),
        ("process_cpu_seconds_total", 0.0),
        ("process_virtual_memory_bytes", 1e6),
    ] {
        let v = sample(text, name).unwrap_or(-1.0);
        assert!(v >= min, "{name} = {v}, want >= {min}: {text}");
    }
    for zero in [
        "kubeproxy_sync_proxy_rules_service_changes_pending",
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"internal\"}",
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"external\"}",
        "ebpf_proxy_datapath_verdicts_total{verdict=\"drop\"}",
    ] {
        assert_eq!(sample(text, zero), Some(0.0), "{zero}: {text}");
    }
    assert!(
        text.lines().any(|l| l.starts_with("ebpf_proxy_build_info{")
            && l.contains("git_revision=\"")
            && l.contains("rustc=\"rustc ")),
        "{text}"
    );
}

/// A ClusterIP service without endpoints, beside the demo's.
const EXTRA_SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: extra\n  namespace: default\nspec:\n  clusterIP: 10.96.0.99\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n";

/// `ebpf-proxy inspect ARGS --bpffs <node1's>`: stdout (fails on a non-zero exit).
fn inspect(c: &Cluster, args: &[&str]) -> String {
    let out = std::process::Command::new(c.node_agent_binary(1))
        .arg("inspect")
        .args(args)
        .arg("--bpffs")
        .arg(c.lab.bpffs(1))
        .output()
        .expect("inspect");
    assert!(
        out.status.success(),
        "inspect {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn inspect_json(c: &Cluster, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    serde_json::from_str(&inspect(c, &a)).expect("inspect JSON")
}

/// `inspect` of node1 with its filters and `inspect status`, against the running agent: the
/// demo service `default/hostnames` and `default/extra` are programmed, 70 connections made.
fn inspect_filters(c: &Cluster) {
    let entries = |v: &serde_json::Value| v["services"].as_array().expect("services").clone();
    let names = |v: &serde_json::Value| -> Vec<String> {
        entries(v)
            .iter()
            .map(|e| {
                format!(
                    "{}/{}",
                    e["namespace"].as_str().unwrap_or("?"),
                    e["name"].as_str().unwrap_or("?")
                )
            })
            .collect()
    };
    // The status file follows the last sync within a second (MIN_WRITE_INTERVAL).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let all = loop {
        let all = inspect_json(c, &[]);
        if names(&all).contains(&"default/extra".to_owned()) || std::time::Instant::now() > deadline
        {
            break all;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        names(&all).contains(&"default/hostnames".to_owned()),
        "{all}"
    );
    assert!(names(&all).contains(&"default/extra".to_owned()), "{all}");
    let hn = inspect_json(c, &["--service", "hostnames"]);
    assert!(!entries(&hn).is_empty());
    assert!(names(&hn).iter().all(|n| n == "default/hostnames"), "{hn}");
    for e in entries(&hn) {
        assert_eq!(e["type"], "ClusterIP", "{e}");
        for s in e["endpoint_states"].as_array().expect("states") {
            assert_eq!(s["state"], "ready", "{e}");
        }
    }
    let objects = hn["service_objects"].as_array().expect("service_objects");
    assert_eq!(objects.len(), 1, "{hn}");
    assert!(
        !objects[0]["endpoints"]
            .as_array()
            .expect("endpoints")
            .is_empty()
    );
    let flows = hn["flows"].as_array().expect("flows");
    assert!(!flows.is_empty(), "70 connections to hostnames: {hn}");
    assert!(
        flows
            .iter()
            .all(|f| f["service_name"] == "default/hostnames"),
        "{hn}"
    );
    let extra = inspect_json(c, &["--service", "default/extra"]);
    assert_eq!(names(&extra), ["default/extra"], "{extra}");
    assert!(
        extra["flows"].as_array().expect("flows").is_empty(),
        "{extra}"
    );
    assert_eq!(
        names(&inspect_json(c, &["--service", "other/hostnames"])),
        Vec::<String>::new()
    );
    // By address: the extra service's ClusterIP; a client's address selects its flows only.
    let by_vip = inspect_json(c, &["--address", "10.96.0.99"]);
    assert_eq!(names(&by_vip), ["default/extra"], "{by_vip}");
    let client = flows[0]["client"].as_str().expect("client");
    let client_ip = client.split(':').next().expect("ip");
    let by_client = inspect_json(c, &["--address", client_ip]);
    let cf = by_client["flows"].as_array().expect("flows");
    assert!(!cf.is_empty());
    assert!(
        cf.iter().all(|f| f["client"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("{client_ip}:")))
            || f["backend"]
                .as_str()
                .is_some_and(|a| a.starts_with(&format!("{client_ip}:")))),
        "{by_client}"
    );
    // The readable form names the service and lists flows.
    let text = inspect(c, &["--service", "hostnames", "--flows", "3"]);
    assert!(text.contains("default/hostnames:tcp (ClusterIP)"), "{text}");
    assert!(text.contains("FLOWS (3 of"), "{text}");
    assert!(text.contains(" ready"), "{text}");

    // The agent itself.
    let st = inspect_json(c, &["status"]);
    assert_eq!(st["agent_running"], true, "{st}");
    assert_eq!(st["agent"]["node_name"], "node1", "{st}");
    assert_eq!(st["agent"]["config"]["hostname-override"], "node1", "{st}");
    assert_eq!(st["agent"]["config"]["metrics-per-service"], "true", "{st}");
    assert!(
        st["agent"]["git_revision"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{st}"
    );
    assert_eq!(st["agent"]["health"]["healthy"], true, "{st}");
    assert_eq!(st["pinned_maps"]["CT4_V3"], true, "{st}");
    assert_eq!(st["pinned_maps"]["LB4_SVC_V2"], true, "{st}");
    assert!(
        st["last_sync_age_seconds"]
            .as_f64()
            .is_some_and(|a| a < 60.0),
        "{st}"
    );
    let text = inspect(c, &["status"]);
    for want in [
        "AGENT 0.",
        "running",
        "LAST SYNC",
        "HEALTH at the last sync: healthy",
        "CT4_V3",
        "cluster-cidr",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }
    println!("inspect status:\n{text}");
}

/// `ebpf-proxy debug ARG --bpffs <node1's>`: stdout (fails on a non-zero exit).
fn debug(c: &Cluster, arg: &str) -> String {
    let out = std::process::Command::new(c.node_agent_binary(1))
        .args(["debug", arg, "--bpffs"])
        .arg(c.lab.bpffs(1))
        .output()
        .expect("debug");
    assert!(
        out.status.success(),
        "debug {arg}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Datapath debug logging through the running agent: silent while off; `debug on` and the
/// agent's log says why the client's connections to `extra` (no endpoints) were rejected.
fn datapath_debug_log(c: &Cluster) {
    const LINE: &str = "datapath: reject TCP 10.76.0.20:";
    assert!(debug(c, "status").starts_with("datapath debug logging off"));
    let p = c.probe("client", "10.96.0.99:80", false, 3).expect("probe");
    assert_eq!(p.ok(), 0, "extra has no endpoints: {:?}", p.0);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !c.agent_log(1).contains("datapath: reject"),
        "logged while off:\n{}",
        c.agent_log(1)
    );
    assert!(debug(c, "on").starts_with("datapath debug logging on"));
    let p = c.probe("client", "10.96.0.99:80", false, 3).expect("probe");
    assert_eq!(p.ok(), 0, "{:?}", p.0);
    c.wait_agent_log(1, LINE, Duration::from_secs(5))
        .expect("the reject, named, in the agent's log");
    assert!(
        c.agent_log(1).contains(" -> 10.96.0.99:80"),
        "{}",
        c.agent_log(1)
    );
    assert!(debug(c, "off").starts_with("datapath debug logging off"));
}

fn bpftool(args: &[&str]) -> serde_json::Value {
    proxy_lab::programs::bpftool_json(args).expect("bpftool")
}

/// The addresses in the unpinned map `name` of the process `pid` (found through its file
/// descriptors: the map IDs in their fdinfo), keys of IPv4 addresses in network order.
fn address_map_of(pid: u32, name: &str) -> Vec<std::net::Ipv4Addr> {
    let ids = fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .expect("fdinfo")
        .filter_map(|e| fs::read_to_string(e.ok()?.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("map_id:"))
                .and_then(|v| v.trim().parse::<u32>().ok())
        });
    for id in ids {
        let id = id.to_string();
        if bpftool(&["map", "show", "id", &id])["name"] != name {
            continue;
        }
        let entries = bpftool(&["map", "dump", "id", &id]);
        return entries
            .as_array()
            .expect("entries")
            .iter()
            .map(|e| {
                // Raw bytes ("0x0a", ...) as stored: the address in network order.
                let b: Vec<u8> = e["key"]
                    .as_array()
                    .expect("raw key bytes")
                    .iter()
                    .map(|x| {
                        let hex = x.as_str().expect("a hex byte");
                        u8::from_str_radix(hex.trim_start_matches("0x"), 16).expect("hex")
                    })
                    .collect();
                std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3])
            })
            .collect();
    }
    panic!("no map {name} among the descriptors of process {pid}");
}

/// REJECT's directed-broadcast sources include the node's pod CIDR broadcast, from the Node
/// object, whether or not an interface holds an address in it (the routed topology has none).
fn broadcast_sources(c: &Cluster) {
    let pid = c.agent_pid(1).expect("node1's agent");
    let want = std::net::Ipv4Addr::from(u32::from(node_pod_net(1)) | 0xff);
    let got = address_map_of(pid, "BCAST4_V1");
    assert!(got.contains(&want), "{want} in {got:?}");
}

#[test]
fn health_and_metrics_endpoints_of_a_running_agent() {
    let spec = LabSpec::default_demo();
    let eps = hostnames_endpoints(&spec);
    // Per-service series are opt-in.
    let c = Cluster::up_with_agent_args(
        &bins(),
        &spec,
        &eps,
        &["--metrics-per-service".to_owned()],
        &|m| eprintln!("{m}"),
    )
    .expect("cluster up");
    let p = c
        .probe("client", &format!("{CLUSTER_IP}:{SERVICE_PORT}"), false, 50)
        .expect("probe");
    assert_eq!(p.ok(), 50, "{:?}", p.0);
    broadcast_sources(&c);

    for path in ["/healthz", "/livez"] {
        let (code, body) = c
            .http_get(1, &format!("http://127.0.0.1:10256{path}"))
            .expect("healthz");
        assert_eq!(code, 200, "{path}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert!(
            v["lastUpdated"].as_str().is_some_and(|s| !s.is_empty()),
            "{path}: {body}"
        );
    }

    let (code, text) = c
        .http_get(1, "http://127.0.0.1:10249/metrics")
        .expect("metrics");
    assert_eq!(code, 200, "{text}");
    let syncs = sample(&text, "kubeproxy_sync_proxy_rules_duration_seconds_count").unwrap_or(0.0);
    assert!(syncs >= 1.0, "{text}");
    assert!(
        sample(&text, "kubeproxy_sync_proxy_rules_last_timestamp_seconds ").unwrap_or(0.0) > 1.7e9,
        "{text}"
    );
    let new = sample(
        &text,
        "ebpf_proxy_datapath_packets_total{reason=\"forward_new\"}",
    )
    .unwrap_or(0.0);
    assert!(new >= 50.0, "50 new connections counted: {text}");
    assert!(
        sample(&text, "ebpf_proxy_map_entries{map=\"CT4_V3\"}").unwrap_or(0.0) >= 2.0,
        "{text}"
    );
    assert!(
        sample(&text, "ebpf_proxy_map_capacity{map=\"CT4_V3\"}").unwrap_or(0.0) > 0.0,
        "{text}"
    );
    let ports = spec.pods.iter().filter(|p| p.node == 1).count() as f64;
    assert_eq!(
        sample(&text, "ebpf_proxy_attached_links "),
        Some(2.0 * ports),
        "{text}"
    );
    println!(
        "metrics: {syncs} syncs, {new} new flows, {} conntrack entries",
        sample(&text, "ebpf_proxy_map_entries{map=\"CT4_V3\"}").unwrap_or(0.0)
    );

    // Per-service counters: every forward packet of the 50 connections (at least their SYNs)
    // counted under the service port's labels; more traffic makes them grow.
    const SVC_PKTS: &str = "ebpf_proxy_service_packets_total{namespace=\"default\",service=\"hostnames\",port=\"tcp\",protocol=\"TCP\"}";
    const SVC_BYTES: &str = "ebpf_proxy_service_bytes_total{namespace=\"default\",service=\"hostnames\",port=\"tcp\",protocol=\"TCP\"}";
    let pkts = sample(&text, SVC_PKTS).unwrap_or(0.0);
    let bytes = sample(&text, SVC_BYTES).unwrap_or(0.0);
    assert!(pkts >= 50.0, "50 connections' packets counted: {text}");
    assert!(
        bytes >= 50.0 * 40.0,
        "bytes counted (>= 40 per packet): {text}"
    );
    assert_eq!(
        sample(
            &text,
            "ebpf_proxy_service_packets_total{namespace=\"default\",service=\"hostnames\",port=\"udp\",protocol=\"UDP\"}"
        ),
        Some(0.0),
        "the UDP port is programmed, with no traffic yet: {text}"
    );
    let p = c
        .probe("client", &format!("{CLUSTER_IP}:{SERVICE_PORT}"), false, 20)
        .expect("probe");
    assert_eq!(p.ok(), 20, "{:?}", p.0);
    let (_, text) = c
        .http_get(1, "http://127.0.0.1:10249/metrics")
        .expect("metrics");
    let pkts2 = sample(&text, SVC_PKTS).unwrap_or(0.0);
    assert!(
        pkts2 >= pkts + 20.0,
        "20 more connections: {pkts} -> {pkts2} packets"
    );
    assert!(sample(&text, SVC_BYTES).unwrap_or(0.0) > bytes, "{text}");
    println!("per-service counters: {pkts} -> {pkts2} packets");
    kube_proxy_metrics(&c, &text);
    let syncs = sample(&text, "kubeproxy_sync_proxy_rules_duration_seconds_count").unwrap_or(0.0);

    // The cluster autoscaler marks node1 for deletion: /healthz says not eligible (503) so load
    // balancers drain it, as kube-proxy 1.30+ does; /livez stays 200 (the agent is fine).
    let nodes = fs::read_to_string(c.manifests.join("nodes.yaml")).expect("nodes.yaml");
    let tainted = {
        // node1 comes first in nodes.yaml: its `spec:` is the first one.
        let at = nodes.find("spec:\n").expect("node1 spec");
        let mut t = nodes.clone();
        t.insert_str(
            at + "spec:\n".len(),
            "  taints:\n  - key: ToBeDeletedByClusterAutoscaler\n    effect: NoSchedule\n",
        );
        t
    };
    fs::write(c.manifests.join("nodes.yaml"), &tainted).expect("taint node1");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (code, body) = c
            .http_get(1, "http://127.0.0.1:10256/healthz")
            .expect("healthz");
        if code == 503 {
            break body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "healthz still {code} 10 s after node1 was tainted for deletion: {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["nodeEligible"], serde_json::Value::Bool(false), "{body}");
    // That change was a sync: the sync histogram counted it, and the 503 answer.
    let (_, text) = c
        .http_get(1, "http://127.0.0.1:10249/metrics")
        .expect("metrics");
    let after = sample(&text, "kubeproxy_sync_proxy_rules_duration_seconds_count").unwrap_or(0.0);
    assert!(after > syncs, "a sync moved the count: {syncs} -> {after}");
    assert!(
        sample(&text, "kubeproxy_proxy_healthz_total{code=\"503\"}").unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    println!("syncs: {syncs} -> {after}");
    let (code, body) = c
        .http_get(1, "http://127.0.0.1:10256/livez")
        .expect("livez");
    assert_eq!(code, 200, "livez ignores node eligibility: {body}");
    fs::write(c.manifests.join("nodes.yaml"), &nodes).expect("untaint node1");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while c
        .http_get(1, "http://127.0.0.1:10256/healthz")
        .expect("healthz")
        .0
        != 200
    {
        assert!(
            std::time::Instant::now() < deadline,
            "healthz not 200 again after the taint was removed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // A second service: its sync translates it and reuses the unchanged one (partial).
    let partial = "kubeproxy_sync_partial_proxy_rules_duration_seconds_count";
    let before = sample(&text, partial).unwrap_or(0.0);
    let tmp = c.manifests.join("extra.tmp");
    fs::write(&tmp, EXTRA_SERVICE).expect("extra service");
    fs::rename(&tmp, c.manifests.join("extra.yaml")).expect("extra service");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, text) = c
            .http_get(1, "http://127.0.0.1:10249/metrics")
            .expect("metrics");
        if sample(&text, partial).unwrap_or(0.0) > before {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no partial sync 10 s after a second service was added: {text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    inspect_filters(&c);
    datapath_debug_log(&c);

    // The source goes away (an unreachable API server): nothing is queued, so still healthy.
    let away = c.lab.state_dir().join("manifests.away");
    fs::rename(&c.manifests, &away).expect("hide manifests");
    std::thread::sleep(Duration::from_secs(1));
    let (code, body) = c
        .http_get(1, "http://127.0.0.1:10256/healthz")
        .expect("healthz");
    assert_eq!(code, 200, "healthy while the source is unreachable: {body}");
    fs::rename(&away, &c.manifests).expect("restore manifests");

    // Metrics are bound to loopback by default (kube-proxy's default): not on the node IP.
    let node_ip = proxy_lab::lab::node_ip(1);
    assert!(
        c.http_get(1, &format!("http://{node_ip}:10249/metrics"))
            .is_err()
            || c.http_get(1, &format!("http://{node_ip}:10249/metrics"))
                .is_ok_and(|(code, _)| code == 0),
        "metrics must not listen on {node_ip}"
    );
    // Health listens on every address.
    let (code, _) = c
        .http_get(1, &format!("http://{node_ip}:10256/livez"))
        .expect("livez on the node IP");
    assert_eq!(code, 200);
}
