//! The Kubernetes source end to end over HTTP: the real kube client (built from a kubeconfig
//! file), kube-runtime watchers, the source's stores and debounce, and the agent's
//! `reconcile`, against the loopback fake API server (`proxy_lab_tools::fakeapi`). The maps are
//! in memory and checked after every single write (no service entry ever points at a
//! missing slot or backend).
mod support;

use std::{path::PathBuf, time::Duration};

use proxy_userspace::{
    plan::{MapState, MemMaps},
    source::{Snapshot, manifests::Objects},
    sync::{Context, reconcile},
};
use serde_json::Value;
use support::{
    fakeapi::{FakeApiServer, GoneMode, Kind},
    harness::{Harness, View, backend, histogram, key},
    objects::{ips, node, service, slice, strs},
};

const WAIT: Duration = Duration::from_secs(45);

fn kubeconfig(api: &FakeApiServer) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, api.kubeconfig()).expect("write kubeconfig");
    (dir, path)
}

/// Two services with endpoints, a node, and objects the agent must not program.
fn populate(api: &FakeApiServer) {
    api.apply_raw(Kind::Node, node("node1", "192.0.2.1"));
    api.apply_raw(Kind::Node, node("node2", "192.0.2.2"));
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
        service("kube-system", "dns", "10.96.0.53", &[("dns", 53, "TCP")]),
    );
    api.apply_raw(
        Kind::EndpointSlice,
        slice(
            "kube-system",
            "dns-1",
            "dns",
            &[("dns", 5353, "TCP")],
            &strs(&["10.76.1.5"]),
        ),
    );
    // Handed to another proxy: filtered out by the label selector.
    let mut other = service("default", "other", "10.96.0.99", &[("x", 99, "TCP")]);
    other["metadata"]["labels"] =
        serde_json::json!({"service.kubernetes.io/service-proxy-name": "someone-else"});
    api.apply_raw(Kind::Service, other);
}

fn expected_initial() -> View {
    [
        (
            key("10.96.0.10", 80),
            vec![backend("10.76.0.2", 8080), backend("10.76.0.3", 8080)],
        ),
        (key("10.96.0.53", 53), vec![backend("10.76.1.5", 5353)]),
    ]
    .into_iter()
    .collect()
}

#[tokio::test]
async fn initial_sync_programs_everything() {
    let api = FakeApiServer::start().await;
    populate(&api);
    // More services than one list page (the watcher asks for 500 at a time).
    for i in 0..600u32 {
        let ip = format!("10.97.{}.{}", i / 250, i % 250 + 1);
        api.apply_raw(
            Kind::Service,
            service("bulk", &format!("s{i}"), &ip, &[("p", 80, "TCP")]),
        );
    }
    let (_dir, kc) = kubeconfig(&api);
    let h = Harness::start(&kc, "node1", MemMaps::default()).await;
    h.wait_for("initial sync", WAIT, |v| v.len() == 602).await;
    let v = h.view();
    for (k, b) in expected_initial() {
        assert_eq!(v.get(&k), Some(&b), "{k}");
    }
    assert!(
        !v.contains_key(&key("10.96.0.99", 99)),
        "service-proxy-name label ignored"
    );

    let inner = h.inner.lock().expect("lock");
    assert!(inner.broken.is_empty(), "{:?}", inner.broken);
    drop(inner);
    let reqs = api.requests();
    assert!(
        reqs.iter()
            .any(|r| r.contains("/api/v1/nodes?")
                && r.contains("fieldSelector=metadata.name%3Dnode1")),
        "node watched by name: {reqs:#?}"
    );
    assert!(
        reqs.iter()
            .any(|r| r.contains("/api/v1/services?") && r.contains("continue=")),
        "second page of services listed: {reqs:#?}"
    );
    assert!(
        reqs.iter()
            .any(|r| r.contains("watch=true") && r.contains("allowWatchBookmarks=true")),
        "{reqs:#?}"
    );
    assert_eq!(h.stats.values().watch_errors, 0);
    assert!(h.stats.values().synced);
}

/// kube-proxy's `--master`: the API server URL overrides the kubeconfig's server (here one
/// nothing listens on); alone, it is the whole client configuration.
#[tokio::test]
async fn master_overrides_the_kubeconfig_server() {
    let api = FakeApiServer::start().await;
    populate(&api);
    let dir = tempfile::tempdir().expect("tempdir");
    let kc = dir.path().join("kubeconfig");
    // Port 1 on loopback: nothing listens there.
    let dead = api.kubeconfig().replace(&api.url(), "http://127.0.0.1:1");
    assert_ne!(dead, api.kubeconfig());
    std::fs::write(&kc, dead).expect("write kubeconfig");
    let url = api.url();
    let with_kc =
        Harness::start_with_master(Some(&kc), Some(&url), "node1", MemMaps::default()).await;
    with_kc
        .wait_for("sync through --master", WAIT, |v| v == &expected_initial())
        .await;
    let alone = Harness::start_with_master(None, Some(&url), "node2", MemMaps::default()).await;
    alone
        .wait_for("sync through --master alone", WAIT, |v| {
            v == &expected_initial()
        })
        .await;
    let reqs = api.requests();
    for n in ["node1", "node2"] {
        assert!(
            reqs.iter()
                .any(|r| r.contains(&format!("fieldSelector=metadata.name%3D{n}"))),
            "{n}'s Node watched through --master: {reqs:#?}"
        );
    }
}

#[tokio::test]
async fn updates_deletes_and_bookmarks_propagate() {
    let api = FakeApiServer::start().await;
    populate(&api);
    let (_dir, kc) = kubeconfig(&api);
    let h = Harness::start(&kc, "node1", MemMaps::default()).await;
    h.wait_for("initial sync", WAIT, |v| *v == expected_initial())
        .await;

    // Scale web to one endpoint, on a slow stream (each event line in pieces).
    api.set_slow(Some(Duration::from_millis(20)));
    api.apply_raw(
        Kind::EndpointSlice,
        slice(
            "default",
            "web-1",
            "web",
            &[("http", 8080, "TCP")],
            &strs(&["10.76.0.3"]),
        ),
    );
    h.wait_for("web scaled down", WAIT, |v| {
        v.get(&key("10.96.0.10", 80)) == Some(&vec![backend("10.76.0.3", 8080)])
    })
    .await;
    api.set_slow(None);

    // A new service port and a second slice.
    api.apply_raw(
        Kind::Service,
        service(
            "default",
            "web",
            "10.96.0.10",
            &[("http", 80, "TCP"), ("https", 443, "TCP")],
        ),
    );
    api.apply_raw(
        Kind::EndpointSlice,
        slice(
            "default",
            "web-2",
            "web",
            &[("http", 8080, "TCP"), ("https", 8443, "TCP")],
            &strs(&["10.76.1.9"]),
        ),
    );
    h.wait_for("web grows", WAIT, |v| {
        v.get(&key("10.96.0.10", 80))
            == Some(&vec![
                backend("10.76.0.3", 8080),
                backend("10.76.1.9", 8080),
            ])
            && v.get(&key("10.96.0.10", 443)) == Some(&vec![backend("10.76.1.9", 8443)])
    })
    .await;

    // Bookmarks move the watch forward; a reconnect then resumes from the bookmark without
    // a relist.
    for k in Kind::ALL {
        api.bookmark(k);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let relists = h.stats.values().relists;
    api.disconnect_all();
    api.delete(Kind::Service, "kube-system", "dns");
    h.wait_for("dns deleted", WAIT, |v| {
        !v.contains_key(&key("10.96.0.53", 53))
    })
    .await;
    assert_eq!(h.stats.values().relists, relists, "resumed, not relisted");

    // Deleting the slices leaves the service with no endpoints (an entry that rejects).
    api.delete(Kind::EndpointSlice, "default", "web-1");
    api.delete(Kind::EndpointSlice, "default", "web-2");
    h.wait_for("web without endpoints", WAIT, |v| {
        v.get(&key("10.96.0.10", 80)) == Some(&vec![])
    })
    .await;
    let inner = h.inner.lock().expect("lock");
    assert!(inner.broken.is_empty(), "{:?}", inner.broken);
}

/// 410 Gone, three ways; each must relist and converge without the stores (and so the maps)
/// ever dropping the services that stayed valid.
async fn gone_case(how: &str) {
    let api = FakeApiServer::start().await;
    populate(&api);
    let (_dir, kc) = kubeconfig(&api);
    let h = Harness::start(&kc, "node1", MemMaps::default()).await;
    h.wait_for("initial sync", WAIT, |v| *v == expected_initial())
        .await;
    let errors = h.stats.values().watch_errors;

    // The relist's first attempts fail, so the old store contents must carry on meanwhile.
    api.fail_next_lists(Kind::Service, &[500]);
    match how {
        "event on open watch" => {
            api.compact();
            api.expire_watches();
        }
        "event on reconnect" => {
            api.set_gone_mode(GoneMode::WatchEvent);
            api.compact();
            api.disconnect_all();
        }
        "http status on reconnect" => {
            api.set_gone_mode(GoneMode::HttpStatus);
            api.compact();
            api.disconnect_all();
        }
        other => unreachable!("{other}"),
    }
    // A change the watches can only learn from the relist (its event was compacted away
    // before the watches got to see it, or they see it after relisting: both converge).
    api.apply_raw(
        Kind::EndpointSlice,
        slice(
            "kube-system",
            "dns-1",
            "dns",
            &[("dns", 5353, "TCP")],
            &strs(&["10.76.1.5", "10.76.1.6"]),
        ),
    );
    api.compact();
    h.wait_for(&format!("converged after 410 ({how})"), WAIT, |v| {
        v.get(&key("10.96.0.53", 53))
            == Some(&vec![
                backend("10.76.1.5", 5353),
                backend("10.76.1.6", 5353),
            ])
            && v.get(&key("10.96.0.10", 80)) == expected_initial().get(&key("10.96.0.10", 80))
    })
    .await;
    let s = h.stats.values();
    assert!(s.relists >= 1, "{how}: relisted: {s:?}");
    assert!(s.watch_errors > errors, "{how}: errors counted: {s:?}");
    let inner = h.inner.lock().expect("lock");
    assert!(
        inner.deleted_services.is_empty(),
        "{how}: nothing valid was removed: {:?}",
        inner.deleted_services
    );
    assert!(inner.broken.is_empty(), "{:?}", inner.broken);
}

#[tokio::test]
async fn gone_as_watch_error_event_on_open_watch() {
    gone_case("event on open watch").await;
}

#[tokio::test]
async fn gone_as_watch_error_event_on_reconnect() {
    gone_case("event on reconnect").await;
}

#[tokio::test]
async fn gone_as_http_status_on_reconnect() {
    gone_case("http status on reconnect").await;
}

#[tokio::test]
async fn failing_lists_are_retried() {
    let api = FakeApiServer::start().await;
    populate(&api);
    api.fail_next_lists(Kind::EndpointSlice, &[410, 503]);
    api.fail_next_lists(Kind::Node, &[403]);
    let (_dir, kc) = kubeconfig(&api);
    let h = Harness::start(&kc, "node1", MemMaps::default()).await;
    h.wait_for("sync despite failing lists", WAIT, |v| {
        *v == expected_initial()
    })
    .await;
    assert!(h.stats.values().watch_errors >= 3, "{:?}", h.stats.values());
}

/// What the maps hold after an earlier run: web with two endpoints and a service that was
/// since deleted from the cluster.
fn earlier_maps() -> MemMaps {
    fn parse<T: serde::de::DeserializeOwned>(v: Value) -> std::sync::Arc<T> {
        std::sync::Arc::new(serde_json::from_value(v).expect("typed"))
    }
    let snapshot = Snapshot {
        objects: Objects {
            services: vec![
                parse(service(
                    "default",
                    "web",
                    "10.96.0.10",
                    &[("http", 80, "TCP")],
                )),
                parse(service(
                    "default",
                    "gone",
                    "10.96.0.77",
                    &[("http", 80, "TCP")],
                )),
            ],
            slices: vec![
                parse(slice(
                    "default",
                    "web-1",
                    "web",
                    &[("http", 8080, "TCP")],
                    &strs(&["10.76.0.2", "10.76.0.3"]),
                )),
                parse(slice(
                    "default",
                    "gone-1",
                    "gone",
                    &[("http", 8080, "TCP")],
                    &strs(&["10.76.0.7"]),
                )),
            ],
            nodes: vec![],
        },
        unreadable: vec![],
    };
    let mut maps = MemMaps::default();
    let mut state = MapState::new();
    reconcile(&snapshot, &Context::new("node1"), &mut state, &mut maps).expect("in memory");
    maps
}

#[tokio::test]
async fn api_server_down_at_start_prunes_nothing_until_synced() {
    let api = FakeApiServer::stopped().await;
    populate(&api);
    let (_dir, kc) = kubeconfig(&api);
    let before = earlier_maps();
    let h = Harness::start(&kc, "node1", before.clone()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = h.stats.values();
    assert!(
        s.watch_errors >= 3,
        "every watch failed at least once: {s:?}"
    );
    assert!(!s.synced);
    assert_eq!(h.syncs(), 0, "no reconcile before the initial lists");
    assert_eq!(
        h.maps(),
        before,
        "maps untouched while the API server is down"
    );

    api.resume().await;
    h.wait_for("synced once the API server is up", WAIT, |v| {
        *v == expected_initial()
    })
    .await;
    assert!(h.stats.values().synced);
    let inner = h.inner.lock().expect("lock");
    assert_eq!(
        inner.deleted_services.len(),
        1,
        "only the service that is gone from the cluster was removed: {:?}",
        inner.deleted_services
    );
    assert!(inner.broken.is_empty(), "{:?}", inner.broken);
}

#[tokio::test]
async fn api_server_killed_mid_stream_then_restarted() {
    let api = FakeApiServer::start().await;
    populate(&api);
    let (_dir, kc) = kubeconfig(&api);
    let h = Harness::start(&kc, "node1", MemMaps::default()).await;
    h.wait_for("initial sync", WAIT, |v| *v == expected_initial())
        .await;

    // Slow events, and the server dies while one is on the wire.
    api.set_slow(Some(Duration::from_millis(200)));
    api.apply_raw(
        Kind::EndpointSlice,
        slice(
            "default",
            "web-1",
            "web",
            &[("http", 8080, "TCP")],
            &strs(&["10.76.0.2", "10.76.0.3", "10.76.0.4"]),
        ),
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    api.stop();
    let during = h.view();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        h.view(),
        during,
        "nothing changes while the API server is down"
    );
    for k in expected_initial().keys() {
        assert!(during.contains_key(k), "{k} kept");
    }
    assert!(h.stats.values().watch_errors >= 1);

    // Changes made while it was down (they are in etcd) arrive after the restart.
    api.set_slow(None);
    api.apply_raw(
        Kind::Service,
        service("default", "new", "10.96.0.20", &[("http", 80, "TCP")]),
    );
    api.apply_raw(
        Kind::EndpointSlice,
        slice(
            "default",
            "new-1",
            "new",
            &[("http", 8080, "TCP")],
            &strs(&["10.76.0.9"]),
        ),
    );
    api.resume().await;
    h.wait_for("converged after the restart", WAIT, |v| {
        v.get(&key("10.96.0.10", 80))
            == Some(&vec![
                backend("10.76.0.2", 8080),
                backend("10.76.0.3", 8080),
                backend("10.76.0.4", 8080),
            ])
            && v.get(&key("10.96.0.20", 80)) == Some(&vec![backend("10.76.0.9", 8080)])
            && v.contains_key(&key("10.96.0.53", 53))
    })
    .await;
    let inner = h.inner.lock().expect("lock");
    assert!(
        inner.deleted_services.is_empty(),
        "{:?}",
        inner.deleted_services
    );
    assert!(inner.broken.is_empty(), "{:?}", inner.broken);
}

#[tokio::test]
async fn many_endpoints_over_the_wire() {
    let api = FakeApiServer::start().await;
    api.apply_raw(Kind::Node, node("node1", "192.0.2.1"));
    api.apply_raw(
        Kind::Service,
        service("default", "big", "10.96.1.1", &[("http", 80, "TCP")]),
    );
    let all = ips(12_000);
    for (i, chunk) in all.chunks(1000).enumerate() {
        api.apply_raw(
            Kind::EndpointSlice,
            slice(
                "default",
                &format!("big-{i}"),
                "big",
                &[("http", 8080, "TCP")],
                chunk,
            ),
        );
    }
    let (_dir, kc) = kubeconfig(&api);
    let h = Harness::start(&kc, "node1", MemMaps::default()).await;
    h.wait_for("12000 endpoints", WAIT, |v| {
        v.get(&key("10.96.1.1", 80)).map(Vec::len) == Some(12_000)
    })
    .await;
    let maps = h.maps();
    assert_eq!(maps.backends.len(), 12_000);
    assert_eq!(maps.services.len(), 12_001);
}

const PROGRAMMING: &str = "kubeproxy_network_programming_duration_seconds";

/// `web-1` with `ips` and the EndpointSlice controller's trigger-time annotation `ago` before now.
fn triggered_slice(ips: &[&str], ago: Duration) -> Value {
    let mut v = slice(
        "default",
        "web-1",
        "web",
        &[("http", 8080, "TCP")],
        &strs(ips),
    );
    let t = k8s_openapi::chrono::Utc::now() - ago;
    v["metadata"]["annotations"] = serde_json::json!({
        "endpoints.kubernetes.io/last-change-trigger-time":
            t.to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Nanos, true)
    });
    v
}

/// kubeproxy_network_programming_duration_seconds, as kube-proxy observes it: from the
/// slice's trigger time to programmed, once per change, never for changes triggered before
/// the agent started, never again on a relist or an unrelated change.
#[tokio::test]
async fn network_programming_latency_from_trigger_times() {
    let api = FakeApiServer::start().await;
    populate(&api);
    // Triggered an hour before the agent starts: a restart must not report it.
    api.apply_raw(
        Kind::EndpointSlice,
        triggered_slice(&["10.76.0.2", "10.76.0.3"], Duration::from_secs(3600)),
    );
    let (_dir, kc) = kubeconfig(&api);
    let h = Harness::start(&kc, "node1", MemMaps::default()).await;
    h.wait_for("initial sync", WAIT, |v| *v == expected_initial())
        .await;
    assert_eq!(histogram(&h.metrics.encode(), PROGRAMMING).0, 0);

    // An endpoint change triggered 500 ms ago (after the agent started).
    tokio::time::sleep(Duration::from_millis(700)).await;
    api.apply_raw(
        Kind::EndpointSlice,
        triggered_slice(&["10.76.0.3"], Duration::from_millis(500)),
    );
    h.wait_for("web scaled down", WAIT, |v| {
        v.get(&key("10.96.0.10", 80)) == Some(&vec![backend("10.76.0.3", 8080)])
    })
    .await;
    let (count, sum) = histogram(&h.metrics.encode(), PROGRAMMING);
    assert_eq!(count, 1, "one change, one observation");
    assert!(
        (0.5..10.0).contains(&sum),
        "measured from the trigger time (500 ms before the change was made): {sum}"
    );

    // Unrelated changes, the same slice written again unchanged, bookmarks, and a relist:
    // nothing new to observe.
    let relists = h.stats.values().relists;
    api.apply_raw(
        Kind::Service,
        service("kube-system", "dns", "10.96.0.54", &[("dns", 53, "TCP")]),
    );
    for k in Kind::ALL {
        api.bookmark(k);
    }
    h.wait_for("dns moved", WAIT, |v| {
        v.contains_key(&key("10.96.0.54", 53))
    })
    .await;
    api.compact();
    api.expire_watches();
    let start = std::time::Instant::now();
    while h.stats.values().relists < relists + 3 {
        assert!(start.elapsed() < WAIT, "no relist: {:?}", h.stats.values());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(histogram(&h.metrics.encode(), PROGRAMMING).0, 1);

    // The next change is observed once more.
    api.apply_raw(
        Kind::EndpointSlice,
        triggered_slice(&["10.76.0.3", "10.76.0.4"], Duration::ZERO),
    );
    h.wait_for("web scaled up", WAIT, |v| {
        v.get(&key("10.96.0.10", 80)).map(Vec::len) == Some(2)
    })
    .await;
    assert_eq!(histogram(&h.metrics.encode(), PROGRAMMING).0, 2);
}
