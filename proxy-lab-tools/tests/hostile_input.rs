//! Hostile API objects: each is rejected with a counted, per-object reason, nothing panics, no
//! map entry is left half written, and every valid object is still programmed. Most cases
//! run the agent's `reconcile` on a snapshot (the path both sources share) into in-memory
//! maps; one runs an undecodable object through the fake API server; one writes 10^4
//! endpoints into the real BPF maps (root).
mod support;

use std::{collections::BTreeMap, time::Duration};

use proxy_userspace::{
    datapath::{Datapath, LoadOptions, MapSizes},
    plan::{self, MapState, MemMaps},
    source::{Snapshot, manifests::Objects},
    sync::{Context, RejectionLog, SyncSummary, reconcile},
};
use serde_json::{Value, json};
use support::{
    fakeapi::{FakeApiServer, Kind},
    harness::{Harness, View, backend, key, view_of},
    objects::{ips, node, service, slice, strs},
};

fn parse<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("decodes as the typed object")
}

/// A snapshot holding the valid `web` service (2 endpoints) plus `services`/`slices`.
fn snapshot_with(services: Vec<Value>, slices: Vec<Value>) -> Snapshot {
    let mut s = vec![service(
        "default",
        "web",
        "10.96.0.10",
        &[("http", 80, "TCP")],
    )];
    s.extend(services);
    let mut e = vec![slice(
        "default",
        "web-1",
        "web",
        &[("http", 8080, "TCP")],
        &strs(&["10.76.0.2", "10.76.0.3"]),
    )];
    e.extend(slices);
    Snapshot {
        objects: Objects {
            services: s
                .into_iter()
                .map(|v| std::sync::Arc::new(parse(v)))
                .collect(),
            slices: e
                .into_iter()
                .map(|v| std::sync::Arc::new(parse(v)))
                .collect(),
            nodes: vec![],
        },
        unreadable: vec![],
    }
}

struct Outcome {
    summary: SyncSummary,
    view: View,
    maps: MemMaps,
}

fn run(snapshot: &Snapshot) -> Outcome {
    let mut maps = MemMaps::default();
    let mut state = MapState::new();
    let summary =
        reconcile(snapshot, &Context::new("node1"), &mut state, &mut maps).expect("in memory");
    assert!(
        maps.broken_services().is_empty(),
        "no partial entries: {:?}",
        maps.broken_services()
    );
    let (restored, warnings) = maps.state();
    assert!(warnings.is_empty(), "maps consistent: {warnings:?}");
    assert_eq!(view_of(&restored), view_of(&state));
    Outcome {
        summary,
        view: view_of(&state),
        maps,
    }
}

fn web_ok(v: &View) {
    assert_eq!(
        v.get(&key("10.96.0.10", 80)),
        Some(&vec![
            backend("10.76.0.2", 8080),
            backend("10.76.0.3", 8080)
        ]),
        "the valid service is programmed: {v:#?}"
    );
}

/// The rejected objects and the text of their problems.
fn rejected(o: &Outcome) -> BTreeMap<String, String> {
    o.summary
        .rejected
        .iter()
        .map(|(k, v)| (k.clone(), v.join(" | ")))
        .collect()
}

#[test]
fn invalid_ips() {
    let mut bad_slice = slice(
        "default",
        "x-1",
        "x",
        &[("http", 8080, "TCP")],
        &strs(&["10.76.0.9", "10.76.0.999", "banana", "::1", ""]),
    );
    bad_slice["endpoints"][4]["addresses"] = json!([]);
    let o = run(&snapshot_with(
        vec![
            service("default", "badip", "300.1.1.1", &[("http", 80, "TCP")]),
            service("default", "x", "10.96.0.11", &[("http", 80, "TCP")]),
            service("default", "zero", "0.0.0.0", &[("http", 80, "TCP")]),
        ],
        vec![bad_slice],
    ));
    web_ok(&o.view);
    // The valid endpoint of the slice is used; the bad ones are skipped.
    assert_eq!(
        o.view.get(&key("10.96.0.11", 80)),
        Some(&vec![backend("10.76.0.9", 8080)])
    );
    assert_eq!(o.view.len(), 2, "{:#?}", o.view);
    let r = rejected(&o);
    assert_eq!(o.summary.rejected_objects(), 3, "{r:#?}");
    assert!(r["Service default/badip"].contains("300.1.1.1"), "{r:#?}");
    assert!(r["Service default/zero"].contains("unspecified"), "{r:#?}");
    let s = &r["EndpointSlice default/x-1"];
    for needle in ["10.76.0.999", "banana", "::1", "no address"] {
        assert!(s.contains(needle), "{needle} in {s}");
    }
}

#[test]
fn unknown_protocols_and_bad_ports_skip_only_that_port() {
    let o = run(&snapshot_with(
        vec![service(
            "default",
            "mixed",
            "10.96.0.12",
            &[
                ("ok", 81, "TCP"),
                ("icmp", 82, "ICMP"),
                ("neg", -5, "TCP"),
                ("big", 70_000, "UDP"),
                ("zero", 0, "TCP"),
            ],
        )],
        vec![slice(
            "default",
            "mixed-1",
            "mixed",
            &[("ok", 9081, "TCP"), ("weird", 9082, "GRE")],
            &strs(&["10.76.0.5"]),
        )],
    ));
    web_ok(&o.view);
    // Decision (see docs/kubernetes.md): the unit is the service port. A bad port is skipped
    // whole; the Service's other ports work.
    assert_eq!(
        o.view.get(&key("10.96.0.12", 81)),
        Some(&vec![backend("10.76.0.5", 9081)])
    );
    assert_eq!(o.view.len(), 2, "{:#?}", o.view);
    let r = rejected(&o);
    assert_eq!(r.len(), 2, "{r:#?}");
    let s = &r["Service default/mixed"];
    for needle in ["ICMP", "-5", "70000", "invalid port 0"] {
        assert!(s.contains(needle), "{needle} in {s}");
    }
    assert!(r["EndpointSlice default/mixed-1"].contains("GRE"), "{r:#?}");
}

#[test]
fn missing_fields() {
    let no_spec = json!({"metadata": {"namespace": "default", "name": "nospec"}});
    let no_name = json!({"metadata": {"namespace": "default"},
                         "spec": {"clusterIP": "10.96.0.13", "ports": [{"port": 80}]}});
    let no_ports = json!({"metadata": {"namespace": "default", "name": "noports"},
                          "spec": {"clusterIP": "10.96.0.14"}});
    // Missing `port`: the typed object defaults it to 0, which translation rejects.
    let no_port_number = json!({"metadata": {"namespace": "default", "name": "noportnum"},
                                "spec": {"clusterIP": "10.96.0.15", "ports": [{"name": "a"}]}});
    let no_cluster_ip = json!({"metadata": {"namespace": "default", "name": "pending"},
                               "spec": {"ports": [{"port": 80}]}});
    let slice_no_endpoints = json!({
        "metadata": {"namespace": "default", "name": "pending-1",
                     "labels": {"kubernetes.io/service-name": "pending"}},
        "addressType": "IPv4"
    });
    let slice_no_label = json!({
        "metadata": {"namespace": "default", "name": "orphan"},
        "addressType": "IPv4", "endpoints": [{"addresses": ["10.76.0.8"]}]
    });
    let slice_port_without_number = json!({
        "metadata": {"namespace": "default", "name": "web-2",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "ports": [{"name": "http", "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.76.0.50"]}]
    });
    let o = run(&snapshot_with(
        vec![no_spec, no_name, no_ports, no_port_number, no_cluster_ip],
        vec![
            slice_no_endpoints,
            slice_no_label,
            slice_port_without_number,
        ],
    ));
    web_ok(&o.view);
    assert_eq!(o.view.len(), 1, "{:#?}", o.view);
    let r = rejected(&o);
    for object in [
        "Service default/nospec",
        "Service default/<unnamed>",
        "Service default/noports",
        "Service default/noportnum",
        "EndpointSlice default/web-2",
    ] {
        assert!(r.contains_key(object), "{object} rejected: {r:#?}");
    }
    assert_eq!(o.summary.rejected_objects(), 5, "{r:#?}");
}

#[test]
fn absurd_port_count_is_rejected_whole_and_the_rest_still_fits() {
    // 10^5 ports: every port number once, then duplicates. With one endpoint each port
    // needs 2 map entries, so the Service needs far more than the maps hold.
    let ports: Vec<(String, i64)> = (0..100_000i64)
        .map(|i| (format!("p{i}"), i % 65_535 + 1))
        .collect();
    let svc_ports: Vec<(&str, i64, &str)> =
        ports.iter().map(|(n, p)| (n.as_str(), *p, "TCP")).collect();
    let o = run(&snapshot_with(
        vec![
            service("default", "huge", "10.96.0.16", &svc_ports),
            service("default", "small", "10.96.0.17", &[("http", 80, "TCP")]),
        ],
        vec![
            slice(
                "default",
                "huge-1",
                "huge",
                &svc_ports,
                &strs(&["10.76.0.6"]),
            ),
            slice(
                "default",
                "small-1",
                "small",
                &[("http", 8080, "TCP")],
                &strs(&["10.76.0.7"]),
            ),
        ],
    ));
    web_ok(&o.view);
    assert_eq!(
        o.view.get(&key("10.96.0.17", 80)),
        Some(&vec![backend("10.76.0.7", 8080)])
    );
    assert!(
        !o.view.keys().any(|k| k.ip.to_string() == "10.96.0.16"),
        "no partial Service: none of its ports is programmed"
    );
    let r = rejected(&o);
    let huge = &r["Service default/huge"];
    assert!(huge.contains("service map entries"), "{huge}");
    assert!(
        huge.contains("already used"),
        "duplicates reported too: {huge}"
    );
    assert_eq!(o.maps.services.len(), 2 + 3, "web (1+2) and small (1+1)");

    // One line per object in the log, however many problems it has; repeated only when
    // they change.
    let mut log = RejectionLog::default();
    let lines = log.report(&o.summary.rejected);
    assert_eq!(lines.len(), o.summary.rejected_objects());
    let huge_line = lines
        .iter()
        .find(|l| l.contains("default/huge"))
        .expect("a line for huge");
    assert!(huge_line.contains("more problems"), "{huge_line}");
    assert!(
        huge_line.len() < 1000,
        "one readable line: {} bytes",
        huge_line.len()
    );
    assert!(log.report(&o.summary.rejected).is_empty(), "not repeated");
}

#[test]
fn ten_thousand_endpoints_in_one_slice_and_over_many() {
    let o = run(&snapshot_with(
        vec![
            service("default", "one", "10.96.1.1", &[("http", 80, "TCP")]),
            service("default", "many", "10.96.1.2", &[("http", 80, "TCP")]),
        ],
        {
            let mut v = vec![slice(
                "default",
                "one-1",
                "one",
                &[("http", 8080, "TCP")],
                &ips(10_000),
            )];
            let other = ips(30_000).split_off(10_000);
            for (i, chunk) in other.chunks(1000).enumerate() {
                v.push(slice(
                    "default",
                    &format!("many-{i}"),
                    "many",
                    &[("http", 9090, "TCP")],
                    chunk,
                ));
            }
            v
        },
    ));
    web_ok(&o.view);
    assert_eq!(o.view[&key("10.96.1.1", 80)].len(), 10_000);
    assert_eq!(o.view[&key("10.96.1.2", 80)].len(), 20_000);
    assert_eq!(o.summary.rejected_objects(), 0);
    assert_eq!(o.maps.backends.len(), 2 + 30_000);
}

#[test]
fn over_capacity_rejects_whole_services_smallest_first() {
    // 70 000 endpoints: more than a service entry can index.
    let o = run(&snapshot_with(
        vec![service(
            "default",
            "giant",
            "10.96.1.3",
            &[("http", 80, "TCP")],
        )],
        vec![slice(
            "default",
            "giant-1",
            "giant",
            &[("http", 8080, "TCP")],
            &ips(70_000),
        )],
    ));
    web_ok(&o.view);
    assert_eq!(o.view.len(), 1);
    let r = rejected(&o);
    assert!(
        r["Service default/giant"].contains("more than the"),
        "{r:#?}"
    );

    // Small maps: the big service does not fit, the small ones do.
    let snap = snapshot_with(
        vec![
            service("default", "a", "10.96.2.1", &[("http", 80, "TCP")]),
            service("default", "b", "10.96.2.2", &[("http", 80, "TCP")]),
        ],
        vec![
            slice("default", "a-1", "a", &[("http", 80, "TCP")], &ips(50)),
            slice("default", "b-1", "b", &[("http", 80, "TCP")], &ips(3)),
        ],
    );
    let mut ctx = Context::new("node1");
    ctx.map_sizes = MapSizes {
        services: 20,
        backends: 100,
        conntrack: 1024,
        ..MapSizes::default()
    };
    let mut maps = MemMaps::default();
    let mut state = MapState::new();
    let s = reconcile(&snap, &ctx, &mut state, &mut maps).expect("in memory");
    let v = view_of(&state);
    assert!(v.contains_key(&key("10.96.0.10", 80)) && v.contains_key(&key("10.96.2.2", 80)));
    assert!(!v.contains_key(&key("10.96.2.1", 80)));
    assert_eq!(s.rejected.keys().collect::<Vec<_>>(), ["Service default/a"]);
    assert!(maps.services.len() <= 20);

    // The admission is a pure function of the desired state.
    let mut d = proxy_userspace::translate::Desired::new();
    assert!(
        plan::fit_capacity(
            &mut d,
            &mut Default::default(),
            &MapSizes::default().capacity()
        )
        .is_empty()
    );
    const _: () = assert!(plan::MAX_BACKENDS_PER_SERVICE >= 10_000);
}

/// Capacity counts every map a service needs: ClusterIPs, source ranges, service IDs, and
/// backends kept for terminating endpoints; what does not fit is rejected naming the flag.
#[test]
fn capacity_counts_cluster_ips_source_ranges_ids_and_terminating_backends() {
    let reconcile_with = |snap: &Snapshot, sizes: MapSizes| {
        let mut ctx = Context::new("node1");
        ctx.map_sizes = sizes;
        let mut maps = MemMaps::default();
        let mut state = MapState::new();
        let s = reconcile(snap, &ctx, &mut state, &mut maps).expect("in memory");
        let r: BTreeMap<String, String> = s
            .rejected
            .iter()
            .map(|(k, v)| (k.clone(), v.join(" | ")))
            .collect();
        (view_of(&state), r, maps)
    };
    let two = snapshot_with(
        vec![service("default", "a", "10.96.2.1", &[("http", 80, "TCP")])],
        vec![slice(
            "default",
            "a-1",
            "a",
            &[("http", 80, "TCP")],
            &ips(3),
        )],
    );
    // ClusterIP map of 1: web (smaller) fits, a does not; its VIP is not written either.
    let (v, r, maps) = reconcile_with(
        &two,
        MapSizes {
            vips: 1,
            ..MapSizes::default()
        },
    );
    assert!(v.contains_key(&key("10.96.0.10", 80)) && !v.contains_key(&key("10.96.2.1", 80)));
    assert!(
        r["Service default/a"].contains("1 ClusterIPs (only 0 of 1 left; --max-cluster-ips)"),
        "{r:#?}"
    );
    assert_eq!(maps.vips.len(), 1);
    // Service IDs: --max-services 1 means one ID (counter map of 2 with ID 0 reserved).
    let (_, r, _) = reconcile_with(
        &two,
        MapSizes {
            svc_ids: 2,
            ..MapSizes::default()
        },
    );
    assert!(r["Service default/a"].contains("--max-services"), "{r:#?}");

    // Terminating endpoints kept for their flows need backend entries too.
    let mut term = slice("default", "a-1", "a", &[("http", 80, "TCP")], &ips(5));
    for ep in term["endpoints"]
        .as_array_mut()
        .expect("endpoints")
        .iter_mut()
        .skip(2)
    {
        ep["conditions"] = json!({"ready": false, "serving": true, "terminating": true});
    }
    let draining = snapshot_with(
        vec![service("default", "a", "10.96.2.1", &[("http", 80, "TCP")])],
        vec![term],
    );
    // a (3 entries, first by name) needs 2 ready + 3 terminating = 5 backends; web's 2 then
    // exceed 6 (counting only slots, 4 would have fit).
    let (v, r, _) = reconcile_with(
        &draining,
        MapSizes {
            backends: 6,
            ..MapSizes::default()
        },
    );
    assert!(v.contains_key(&key("10.96.2.1", 80)) && !v.contains_key(&key("10.96.0.10", 80)));
    assert!(
        r["Service default/web"].contains("2 backends (only 1 of 6 left; --max-backends)"),
        "{r:#?}"
    );
    let (v, r, _) = reconcile_with(
        &draining,
        MapSizes {
            backends: 7,
            ..MapSizes::default()
        },
    );
    assert!(
        v.contains_key(&key("10.96.2.1", 80)) && r.is_empty(),
        "{r:#?}"
    );

    // loadBalancerSourceRanges: one LPM entry per range.
    let mut lb = service("default", "lb", "10.96.3.1", &[("http", 80, "TCP")]);
    lb["spec"]["type"] = json!("LoadBalancer");
    lb["spec"]["ports"][0]["nodePort"] = json!(30080);
    lb["spec"]["loadBalancerSourceRanges"] = json!(["192.0.2.0/24", "198.51.100.0/24"]);
    lb["status"] = json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.10"}]}});
    let ranged = snapshot_with(
        vec![lb],
        vec![slice(
            "default",
            "lb-1",
            "lb",
            &[("http", 80, "TCP")],
            &ips(1),
        )],
    );
    let (_, r, _) = reconcile_with(
        &ranged,
        MapSizes {
            src_ranges: 1,
            ..MapSizes::default()
        },
    );
    assert!(
        r["Service default/lb"].contains("2 source ranges (only 1 of 1 left; --max-source-ranges)"),
        "{r:#?}"
    );
    let (v, r, maps) = reconcile_with(
        &ranged,
        MapSizes {
            src_ranges: 2,
            ..MapSizes::default()
        },
    );
    assert!(
        r.is_empty() && v.contains_key(&key("203.0.113.10", 80)),
        "{r:#?}"
    );
    assert_eq!(maps.src_ranges.len(), 2);
}

/// 100,000 services x 10 endpoints (more service ports than 16-bit IDs could number) go
/// through reconcile (translate, capacity, plan, in-memory write) with every one programmed
/// under its own ID, and an unchanged second sync writes nothing.
#[test]
fn one_hundred_thousand_services_are_programmed_with_distinct_ids() {
    const N: usize = 100_000;
    let mut services = Vec::with_capacity(N);
    let mut slices = Vec::with_capacity(N);
    for i in 0..N {
        let vip = std::net::Ipv4Addr::from(0x0a64_0000 + i as u32 + 1).to_string();
        let name = format!("s{i}");
        services.push(service("bulk", &name, &vip, &[("http", 80, "TCP")]));
        let eps: Vec<String> = (0..10)
            .map(|j| std::net::Ipv4Addr::from(0x0a80_0000 + (i * 10 + j) as u32).to_string())
            .collect();
        slices.push(slice(
            "bulk",
            &format!("{name}-1"),
            &name,
            &[("http", 8080, "TCP")],
            &eps,
        ));
    }
    let snap = snapshot_with(services, slices);
    let mut ctx = Context::new("node1");
    ctx.map_sizes = MapSizes {
        services: 1_200_000,
        backends: 1_100_000,
        svc_ids: 100_100,
        vips: 100_100,
        ..MapSizes::default()
    };
    let mut maps = MemMaps::default();
    let mut state = MapState::with_svc_id_limit(ctx.map_sizes.svc_ids);
    let started = std::time::Instant::now();
    let s = reconcile(&snap, &ctx, &mut state, &mut maps).expect("in memory");
    let took = started.elapsed();
    assert!(
        s.rejected.is_empty(),
        "{:?}",
        s.rejected.iter().take(3).collect::<Vec<_>>()
    );
    assert_eq!(state.services().len(), N + 1);
    let ids: std::collections::HashSet<u32> = state.services().values().map(|p| p.svc_id).collect();
    assert_eq!(ids.len(), N + 1, "distinct service IDs");
    assert!(ids.iter().any(|id| *id > u32::from(u16::MAX)));
    assert_eq!(maps.services.len(), (N + 1) + N * 10 + 2);
    assert_eq!(
        s.service_ids.len(),
        N + 1,
        "every ID labelled for the metrics"
    );
    let again = reconcile(&snap, &ctx, &mut state, &mut maps).expect("in memory");
    assert_eq!(again.ops, 0, "unchanged input, no writes");
    eprintln!("100k services x 10 endpoints: first sync {took:?}");
}

#[test]
fn unreadable_objects_are_counted_per_object() {
    let mut snap = snapshot_with(vec![], vec![]);
    snap.unreadable = vec![
        "Service default/a: cannot be decoded (spec.ports[0].port: invalid type)".into(),
        "EndpointSlice default/b: cannot be decoded (endpoints: invalid type)".into(),
    ];
    let o = run(&snap);
    web_ok(&o.view);
    assert_eq!(o.summary.rejected_objects(), 2);
}

/// Objects that do not fit the schema at all, over the wire: with plain typed watchers one
/// of them would fail every list for ever; here it is one rejected object.
#[tokio::test]
async fn undecodable_objects_through_the_api() {
    let api = FakeApiServer::start().await;
    api.apply_raw(Kind::Node, node("node1", "192.0.2.1"));
    api.apply_raw(
        Kind::Service,
        service("default", "web", "10.96.0.10", &[("http", 80, "TCP")]),
    );
    api.apply_raw(
        Kind::EndpointSlice,
        slice(
            "default",
            "web-1",
            "web",
            &[("http", 8080, "TCP")],
            &strs(&["10.76.0.2", "10.76.0.3"]),
        ),
    );
    api.apply_raw(
        Kind::Service,
        json!({"metadata": {"namespace": "default", "name": "strport"},
               "spec": {"clusterIP": "10.96.0.30", "ports": [{"port": "eighty"}]}}),
    );
    api.apply_raw(
        Kind::EndpointSlice,
        json!({"metadata": {"namespace": "default", "name": "web-bad",
                            "labels": {"kubernetes.io/service-name": "web"}},
               "addressType": "IPv4", "endpoints": {"not": "a list"}}),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let kc = dir.path().join("kubeconfig");
    std::fs::write(&kc, api.kubeconfig()).expect("write");
    let h = Harness::start(&kc, "node1", MemMaps::default()).await;
    h.wait_for("valid objects programmed", Duration::from_secs(30), |v| {
        v.get(&key("10.96.0.10", 80))
            == Some(&vec![
                backend("10.76.0.2", 8080),
                backend("10.76.0.3", 8080),
            ])
    })
    .await;
    // A later bad update arrives as a watch event: also rejected, nothing else disturbed.
    api.apply_raw(
        Kind::Service,
        json!({"metadata": {"namespace": "default", "name": "web"},
               "spec": {"clusterIP": 5}}),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let inner = h.inner.lock().expect("lock");
    assert_eq!(h.stats.values().watch_errors, 0, "no list or watch failed");
    let r = &inner.rejected;
    assert!(
        r.keys()
            .any(|k| k.starts_with("Service default/strport: cannot be decoded")),
        "{r:#?}"
    );
    assert!(
        r.keys()
            .any(|k| k.starts_with("EndpointSlice default/web-bad: cannot be decoded")),
        "{r:#?}"
    );
    assert!(
        r.keys()
            .any(|k| k.starts_with("Service default/web: cannot be decoded")),
        "{r:#?}"
    );
    assert!(inner.broken.is_empty(), "{:?}", inner.broken);
}

/// 10^4 endpoints through the production writer into real BPF maps. Needs root.
#[test]
fn ten_thousand_endpoints_into_real_maps() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test loads BPF maps: run it as root (cargo xtask test)");
    }
    let snap = snapshot_with(
        vec![service(
            "default",
            "one",
            "10.96.1.1",
            &[("http", 80, "TCP")],
        )],
        vec![slice(
            "default",
            "one-1",
            "one",
            &[("http", 8080, "TCP")],
            &ips(10_000),
        )],
    );
    let mut dp = Datapath::load(&LoadOptions::default()).expect("load the datapath");
    let mut state = MapState::new();
    let s = {
        let mut maps = dp.lb_maps().expect("maps");
        reconcile(&snap, &Context::new("node1"), &mut state, &mut maps).expect("written")
    };
    assert_eq!(s.rejected_objects(), 0);
    let maps = dp.lb_maps().expect("maps");
    let read = MemMaps {
        services: maps.read_services().into_iter().collect(),
        backends: maps.read_backends().into_iter().collect(),
        ..Default::default()
    };
    assert_eq!(read.backends.len(), 10_002);
    assert_eq!(read.services.len(), 10_001 + 3);
    assert!(
        read.broken_services().is_empty(),
        "{:?}",
        read.broken_services()
    );
    let (restored, _) = read.state();
    assert_eq!(view_of(&restored)[&key("10.96.1.1", 80)].len(), 10_000);
}
