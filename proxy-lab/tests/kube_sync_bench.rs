//! The control-plane bench through the Kubernetes source (`ebpf-proxy-lab kube-sync-bench`,
//! issue 16 item 5) at a small size: the agent runs against the fake API server in its own
//! namespace and bpffs, every change must reach the pinned maps, and nothing is left behind.
//! It checks that the measurement works, not how fast it is (figures: docs/performance.md).
//!
//! Run: `cargo xtask test -- -p proxy-lab --test kube_sync_bench` (root).

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::process::Command;

use proxy_lab::{cluster::test_binaries, lab};

fn bench_namespaces() -> Vec<String> {
    lab::netns_list()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with("eplkb"))
        .collect()
}

#[test]
fn every_change_reaches_the_maps_and_is_timed() {
    let bins = test_binaries();
    let before = bench_namespaces();
    let json = std::env::temp_dir().join(format!("kube-sync-bench-{}.json", std::process::id()));
    let out = Command::new(&bins.tools)
        .arg("kube-sync-bench")
        .arg("--agent")
        .arg(&bins.agent)
        .args(["--services", "300", "--endpoints", "3", "--changes", "6"])
        .args(["--gap-ms", "120"])
        .arg("--json-out")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kube-sync-bench failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    assert_eq!(v["services"], 300, "{v}");
    let full = v["full_programming_ms"].as_f64().unwrap();
    assert!(
        full > 0.0 && full < 120_000.0,
        "full programming {full} ms: {v}"
    );
    // Three EndpointSlice changes (an endpoint replaced) and three Service changes (a port
    // moved), each seen in the maps (the bench fails after 10 s without it).
    assert_eq!(v["one_change"]["n"], 6, "{v}");
    assert_eq!(v["endpointslice_change"]["n"], 3, "{v}");
    assert_eq!(v["service_change"]["n"], 3, "{v}");
    let max = v["one_change"]["max_ms"].as_f64().unwrap();
    assert!(max > 0.0 && max < 10_000.0, "slowest change {max} ms: {v}");
    assert_eq!(
        bench_namespaces(),
        before,
        "kube-sync-bench left its namespace behind"
    );
}
