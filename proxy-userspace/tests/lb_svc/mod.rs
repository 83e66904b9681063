//! Per-service packet counters and session affinity vs terminating endpoints, through the
//! real programs with maps programmed by translate -> plan -> writer (the parent's harness).
use super::*;
use proxy_userspace::translate::ServiceKey;

/// The service ID the plan gave `ip:port/TCP`.
fn svc_id(f: &Fixture, ip: Ipv4Addr, port: u16) -> u32 {
    f.state.services()[&ServiceKey::external(ip, port, abi::Protocol::Tcp)].svc_id
}

fn svc_count(f: &Fixture, id: u32) -> proxy_common::SvcCounter {
    let v = f.dp.service_counters([id]).expect("service counters");
    assert_eq!(v.len(), 1, "service ID {id} is inside the counter map");
    v[0].1
}

#[test]
fn per_service_counters_count_every_translated_forward_packet() {
    let mut f = Fixture::new(&hostnames(&EPS, "TCP"));
    let id = svc_id(&f, VIP, 80);
    assert_eq!(
        svc_count(&f, id),
        Default::default(),
        "a new service starts at zero"
    );
    let a = packet(TCP, (CLIENT, 41000), (VIP, 80), 0, false);
    let b = packet(TCP, (CLIENT, 41001), (VIP, 80), 0, false);
    // Two new flows, five established packets.
    let (_, out) = f.run(programs::POD_INGRESS, &a);
    let backend = parse_checked(&out).dst;
    for _ in 0..4 {
        assert_eq!(f.run(programs::POD_INGRESS, &a).0, TC_ACT_OK);
    }
    f.run(programs::POD_INGRESS, &b);
    f.run(programs::POD_INGRESS, &b);
    // Not counted: replies, traffic to no service.
    f.run(
        programs::POD_EGRESS,
        &packet(TCP, backend, (CLIENT, 41000), 0, false),
    );
    f.run(
        programs::POD_INGRESS,
        &packet(
            TCP,
            (CLIENT, 41002),
            (Ipv4Addr::new(10, 97, 0, 1), 80),
            0,
            false,
        ),
    );
    let c = svc_count(&f, id);
    assert_eq!(c.packets, 7, "2 new + 5 established");
    assert_eq!(c.bytes, 7 * (a.len() as u64 - 14), "L3 bytes");
    assert_eq!(
        f.counter(counter::FWD_NEW) + f.counter(counter::FWD_ESTABLISHED),
        7
    );

    // Only one service ID exists: once the service is gone, the next service reuses ID 1
    // and must not inherit the counts.
    f.state.set_svc_id_limit(2);
    assert_eq!(id, 1);
    let other = hostnames(&EPS, "TCP")
        .replace("name: hostnames,", "name: other,")
        .replace("service-name: hostnames", "service-name: other")
        .replace(&VIP.to_string(), "10.96.0.77");
    f.program(&other);
    f.program(&other);
    let vip2 = Ipv4Addr::new(10, 96, 0, 77);
    assert_eq!(svc_id(&f, vip2, 80), 1, "ID 1 reused");
    assert_eq!(svc_count(&f, 1), Default::default(), "zeroed on reuse");
    f.run(
        programs::POD_INGRESS,
        &packet(TCP, (CLIENT, 41003), (vip2, 80), 0, false),
    );
    assert_eq!(svc_count(&f, 1).packets, 1);
}

/// `web` with sessionAffinity ClientIP over endpoints given as (address, terminating).
fn affine(endpoints: &[(&str, bool)]) -> String {
    let eps: String = endpoints
        .iter()
        .map(|(ip, terminating)| {
            let cond = if *terminating {
                "{ready: false, serving: true, terminating: true}"
            } else {
                "{ready: true}"
            };
            format!("\n  - addresses: [\"{ip}\"]\n    conditions: {cond}")
        })
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\n\
         spec:\n  clusterIP: {VIP}\n  sessionAffinity: ClientIP\n  ports:\n  - {{name: web, port: 80, targetPort: 9376, protocol: TCP}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: web-abc\n  namespace: default\n  labels: {{kubernetes.io/service-name: web}}\n\
         addressType: IPv4\nports:\n- {{name: web, port: 9376, protocol: TCP}}\nendpoints:{eps}"
    )
}

const A: &str = "10.76.0.10";
const B: &str = "10.76.0.11";

/// New flows of `CLIENT` from ports `base..base + n`: where each one went.
fn new_flows(f: &Fixture, base: u16, n: u16) -> Vec<String> {
    (base..base + n)
        .map(|port| {
            let (rc, out) = f.run(
                programs::POD_INGRESS,
                &packet(TCP, (CLIENT, port), (VIP, 80), 0, false),
            );
            assert_eq!(rc, TC_ACT_OK);
            parse_checked(&out).dst.0.to_string()
        })
        .collect()
}

#[test]
fn affinity_does_not_send_new_flows_to_a_terminating_endpoint_while_ready_ones_exist() {
    let mut f = Fixture::new(&affine(&[(A, false), (B, false)]));
    let first = new_flows(&f, 42000, 1).remove(0);
    assert!(
        new_flows(&f, 42001, 10).iter().all(|d| *d == first),
        "ClientIP affinity sticks while both are ready"
    );
    let other = if first == A { B } else { A };
    // The affine endpoint starts terminating (still serving): its backend stays for the
    // established flow, but affinity must not steer new flows to it.
    f.program(&affine(&[(first.as_str(), true), (other, false)]));
    let established = packet(TCP, (CLIENT, 42000), (VIP, 80), 0, false);
    let (_, out) = f.run(programs::POD_INGRESS, &established);
    assert_eq!(
        parse_checked(&out).dst.0.to_string(),
        first,
        "the established flow continues"
    );
    let now = new_flows(&f, 42100, 10);
    assert!(
        now.iter().all(|d| d == other),
        "new flows go to the ready endpoint, not the terminating affine one: {now:?}"
    );
}

#[test]
fn affinity_to_a_terminating_endpoint_holds_when_only_terminating_ones_are_left() {
    let mut f = Fixture::new(&affine(&[(A, false), (B, false)]));
    let first = new_flows(&f, 43000, 1).remove(0);
    // Both terminating, no ready one: kube-proxy falls back to serving+terminating endpoints,
    // and affinity among them is kept.
    f.program(&affine(&[(A, true), (B, true)]));
    let now = new_flows(&f, 43100, 24);
    assert!(
        now.iter().all(|d| *d == first),
        "affinity kept in the terminating fallback (random choice would split): {now:?}"
    );
}
