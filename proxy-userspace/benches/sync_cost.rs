//! Control-plane cost of one reconciliation, without the kernel: the agent's own
//! [`Reconciler`] on in-memory maps, at N services x 10 endpoints (issue 16 item 5).
//!
//! `cargo bench -p proxy-userspace --bench sync_cost -- [--services 10000,100000]
//! [--changes 100] [--json]`
//!
//! For each N: a full reconciliation from empty maps (the first sync after start), then
//! `changes` single-object edits, alternating one EndpointSlice (one endpoint replaced) and one
//! Service (a label added, which changes nothing in the maps, then its port moved), each
//! followed by one reconciliation of the whole snapshot (objects in namespace/name order, as
//! the sources list them), timed end to end and by stage
//! (`SyncStages`). Prints medians and p99 in ms (JSON with `--json`).
use std::{sync::Arc, time::Instant};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use proxy_userspace::{
    plan::{MapState, MemMaps},
    source::Snapshot,
    sync::{Context, Reconciler},
};

fn service(i: usize) -> Service {
    serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": "bench", "name": format!("s{i:06}")},
        "spec": {"clusterIP": ip(10 << 24 | 96 << 16, i), "ports": [{"port": 80, "protocol": "TCP"}]}
    }))
    .expect("service")
}

fn slice(i: usize, round: usize) -> EndpointSlice {
    let eps: Vec<_> = (0..10)
        .map(|e| {
            let n = i * 10 + e + if e == 0 { round * 7_919_999 } else { 0 };
            serde_json::json!({"addresses": [ip(10 << 24 | 128 << 16, n % (1 << 22))], "conditions": {"ready": true}})
        })
        .collect();
    serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": "bench", "name": format!("s{i:06}-abc"),
                     "labels": {"kubernetes.io/service-name": format!("s{i:06}")}},
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"port": 8080, "protocol": "TCP"}]
    }))
    .expect("slice")
}

fn ip(base: u32, i: usize) -> String {
    std::net::Ipv4Addr::from(base + 1 + i as u32).to_string()
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let counts: Vec<usize> = arg("--services")
        .unwrap_or_else(|| "10000".into())
        .split(',')
        .map(|s| s.parse().expect("--services"))
        .collect();
    let changes: usize = arg("--changes").map_or(100, |s| s.parse().expect("--changes"));
    let json = args.iter().any(|a| a == "--json");
    let mut report = Vec::new();
    for n in counts {
        let mut ctx = Context::new("node1");
        ctx.map_sizes.services = (n * 12).max(1024) as u32;
        ctx.map_sizes.backends = (n * 12).max(1024) as u32;
        ctx.map_sizes.svc_ids = (n * 2).max(1024) as u32;
        ctx.map_sizes.vips = (n * 2).max(1024) as u32;
        let mut snap = Snapshot::default();
        snap.objects.services = (0..n).map(|i| Arc::new(service(i))).collect();
        snap.objects.slices = (0..n).map(|i| Arc::new(slice(i, 0))).collect();
        let mut state = MapState::with_svc_id_limit(ctx.map_sizes.svc_ids);
        let mut maps = MemMaps::default();
        let mut rec = Reconciler::new();
        let t = Instant::now();
        rec.reconcile(&snap, &ctx, &mut state, &mut maps)
            .expect("full sync");
        let full_ms = t.elapsed().as_secs_f64() * 1e3;
        let (mut total, mut tr, mut cap, mut pl, mut ap) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for c in 0..changes {
            let i = (c * 7919) % n;
            if c % 2 == 0 {
                snap.objects.slices[i] = Arc::new(slice(i, c + 1));
            } else {
                let mut s = service(i);
                s.spec
                    .as_mut()
                    .expect("spec")
                    .ports
                    .as_mut()
                    .expect("ports")[0]
                    .port = 1000 + (c % 50000) as i32;
                snap.objects.services[i] = Arc::new(s);
            }
            let t = Instant::now();
            let s = rec
                .reconcile(&snap, &ctx, &mut state, &mut maps)
                .expect("sync");
            total.push(t.elapsed().as_secs_f64() * 1e3);
            let st = s.stages;
            tr.push(st.translate.as_secs_f64() * 1e3);
            cap.push(st.capacity.as_secs_f64() * 1e3);
            pl.push(st.plan.as_secs_f64() * 1e3);
            ap.push(st.apply.as_secs_f64() * 1e3);
            assert!(s.ops > 0, "change {c} wrote nothing");
        }
        let row = serde_json::json!({
            "services": n,
            "full_sync_ms": full_ms,
            "change_p50_ms": pct(&mut total, 0.5),
            "change_p99_ms": pct(&mut total, 0.99),
            "translate_p50_ms": pct(&mut tr, 0.5),
            "capacity_p50_ms": pct(&mut cap, 0.5),
            "plan_p50_ms": pct(&mut pl, 0.5),
            "apply_p50_ms": pct(&mut ap, 0.5),
        });
        if !json {
            println!("{row}");
        }
        report.push(row);
    }
    if json {
        println!("{}", serde_json::Value::Array(report));
    }
}
