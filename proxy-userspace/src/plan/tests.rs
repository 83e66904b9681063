//! Table tests of planning: diffs, ordering invariants checked after every write, ID and slot
//! allocation, capacity, and restoring the model from the maps.
use super::*;
use std::net::Ipv4Addr;

// ---- fixtures -------------------------------------------------------------------------

const TCP: Protocol = Protocol::Tcp;
const CIP: u32 = svc_flags::CLUSTER_IP;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("test IP")
}

fn key(ip_: &str, port: u16) -> ServiceKey {
    ServiceKey::external(ip(ip_), port, TCP)
}

/// Plans the service entries only (no ClusterIP set).
fn plan_d(state: &MapState, d: &Desired) -> Plan {
    plan(state, d, &BTreeSet::new())
}

fn be(ip_: &str, port: u16) -> BackendAddr {
    BackendAddr {
        ip: ip(ip_),
        port,
        protocol: TCP,
    }
}

/// Desired state builder: `.svc(key, &[backends])`.
#[derive(Clone, Default)]
struct D(Desired);

fn desired() -> D {
    D::default()
}

impl D {
    fn svc(mut self, k: ServiceKey, backends: &[BackendAddr]) -> Self {
        let mut backends = backends.to_vec();
        backends.sort();
        backends.dedup();
        self.0
            .insert(k, DesiredService::new(format!("test/{k}"), backends, CIP));
        self
    }

    /// Marks `terminating` as draining endpoints of the (already added) service `k`.
    fn drain(mut self, k: ServiceKey, terminating: &[BackendAddr]) -> Self {
        let ds = self.0.get_mut(&k).expect("drain after svc");
        ds.terminating = terminating.to_vec();
        self
    }
}

fn put_be(id: u32, b: BackendAddr) -> Op {
    Op::PutBackend {
        id,
        backend: backend4(&b),
    }
}
/// A backend written (or rewritten in place) as terminating.
fn put_be_term(id: u32, b: BackendAddr) -> Op {
    Op::PutBackend {
        id,
        backend: backend4(&b).with_flags(backend_flags::TERMINATING),
    }
}
fn put_slot(k: ServiceKey, slot: u16, backend_id: u32, svc_id: u32) -> Op {
    Op::PutSlot {
        key: svc4_key(&k, slot),
        value: Svc4Value::slot(backend_id, svc_id),
    }
}
fn put_svc(k: ServiceKey, count: u16, svc_id: u32) -> Op {
    Op::PutService {
        key: svc4_key(&k, 0),
        value: Svc4Value::service(count, svc_id, CIP),
    }
}
fn del_slot(k: ServiceKey, slot: u16) -> Op {
    Op::DeleteSlot {
        key: svc4_key(&k, slot),
    }
}
fn del_svc(k: ServiceKey) -> Op {
    Op::DeleteService {
        key: svc4_key(&k, 0),
    }
}
fn del_be(id: u32) -> Op {
    Op::DeleteBackend { id }
}

/// Programs `d` onto empty maps and returns the maps and the state.
fn programmed(d: &Desired) -> (MemMaps, MapState) {
    let mut maps = MemMaps::default();
    let mut state = MapState::new();
    let p = plan_d(&state, d);
    replay(&mut state, &mut maps, &p);
    (maps, state)
}

/// Applies `p` one op at a time, checking after every op that no service a reader could
/// use became unusable (maps restored from a crash may start out broken) and that the
/// model equals what a restart would read from the maps.
fn replay(state: &mut MapState, maps: &mut MemMaps, p: &Plan) {
    let broken_at_start = maps.broken_services();
    for (i, op) in p.ops.iter().enumerate() {
        let before = maps.clone();
        let stats = apply_plan(state, &Plan { ops: vec![*op] }, maps).expect("MemMaps never fails");
        assert_eq!(stats.total(), 1);
        let broken: Vec<String> = maps
            .broken_services()
            .into_iter()
            .filter(|b| !broken_at_start.contains(b))
            .collect();
        assert!(
            broken.is_empty(),
            "after op {i} ({op}) of {:#?}\nfrom {before:#?}:\n{broken:#?}",
            p.ops
        );
        assert_model_matches(state, maps, &format!("after op {i} ({op})"));
    }
}

fn assert_model_matches(state: &MapState, maps: &MemMaps, ctx: &str) {
    let services: BTreeMap<_, _> = state.service_entries().collect();
    let backends: BTreeMap<_, _> = state.backend_entries().collect();
    assert_eq!(services, maps.services, "{ctx}: raw service entries");
    assert_eq!(backends, maps.backends, "{ctx}: raw backend entries");
    let vips: BTreeMap<_, _> = state.vip_entries().collect();
    assert_eq!(vips, maps.vips, "{ctx}: raw ClusterIP entries");
    let ranges: HashMap<_, _> = state.src_range_entries().collect();
    assert_eq!(ranges, maps.src_ranges, "{ctx}: raw source-range entries");
    let (restored, _) = maps.state();
    assert_eq!(
        state.services(),
        restored.services(),
        "{ctx}: services view"
    );
    assert_eq!(
        state.backends(),
        restored.backends(),
        "{ctx}: backends view"
    );
}

/// What the maps lead to, per service: sorted backend addresses.
fn resolved(maps: &MemMaps) -> BTreeMap<ServiceKey, Vec<BackendAddr>> {
    let (state, warnings) = maps.state();
    assert!(warnings.is_empty(), "{warnings:#?}");
    state
        .services()
        .iter()
        .map(|(k, ps)| {
            let mut addrs: Vec<BackendAddr> = ps
                .backend_ids
                .iter()
                .map(|id| state.backends()[id])
                .collect();
            addrs.sort();
            (*k, addrs)
        })
        .collect()
}

fn wanted(d: &Desired) -> BTreeMap<ServiceKey, Vec<BackendAddr>> {
    d.iter().map(|(k, ds)| (*k, ds.backends.clone())).collect()
}

/// Plans, replays with checks, and checks the result: maps lead exactly where `d` says,
/// are all canonical, and planning again gives nothing.
fn converge(state: &mut MapState, maps: &mut MemMaps, d: &Desired) -> Plan {
    converge_with(state, maps, d, &BTreeSet::new())
}

/// [`converge`] with a ClusterIP set; also checks the ClusterIPs and source ranges.
fn converge_with(
    state: &mut MapState,
    maps: &mut MemMaps,
    d: &Desired,
    vips: &BTreeSet<Ipv4Addr>,
) -> Plan {
    let plan_d = |s: &MapState, d: &Desired| plan(s, d, vips);
    let p = plan_d(state, d);
    replay(state, maps, &p);
    assert_eq!(
        resolved(maps),
        wanted(d),
        "maps after the plan lead where desired"
    );
    assert_eq!(plan_d(state, d), Plan::default(), "a second plan is empty");
    let (restored, _) = maps.state();
    assert_eq!(
        plan_d(&restored, d),
        Plan::default(),
        "a restarted agent plans nothing"
    );
    assert_eq!(&state.cluster_ips(), vips, "ClusterIPs");
    let want_ranges: BTreeMap<u32, Vec<(Ipv4Addr, u8)>> = d
        .iter()
        .filter(|(_, ds)| ds.flags & svc_flags::SOURCE_RANGES != 0 && !ds.source_ranges.is_empty())
        .map(|(k, ds)| (state.services()[k].svc_id, ds.source_ranges.clone()))
        .collect();
    assert_eq!(
        state.source_ranges(),
        want_ranges,
        "source ranges by service ID"
    );
    p
}

// ---- plan table -----------------------------------------------------------------------

struct Case {
    name: &'static str,
    /// (what is programmed, what is desired)
    input: (D, D),
    expected: Vec<Op>,
}

#[test]
fn plan_table() {
    let a = key("10.96.0.1", 80);
    let b = key("10.96.0.2", 53);
    let (e1, e2, e3, e4) = (
        be("10.0.0.1", 8080),
        be("10.0.0.2", 8080),
        be("10.0.0.3", 8080),
        be("10.0.0.4", 8080),
    );
    let cases = vec![
        Case {
            name: "empty to empty",
            input: (desired(), desired()),
            expected: vec![],
        },
        Case {
            name: "unchanged input gives an empty plan",
            input: (
                desired()
                    .svc(a, &[e1, e2, e3])
                    .svc(b, &[e2, e4])
                    .svc(key("10.96.0.3", 1), &[]),
                desired()
                    .svc(a, &[e1, e2, e3])
                    .svc(b, &[e2, e4])
                    .svc(key("10.96.0.3", 1), &[]),
            ),
            expected: vec![],
        },
        Case {
            name: "new service: backends, then slots, then the entry",
            input: (desired(), desired().svc(a, &[e1, e2])),
            expected: vec![
                put_be(1, e1),
                put_be(2, e2),
                put_slot(a, 1, 1, 1),
                put_slot(a, 2, 2, 1),
                put_svc(a, 2, 1),
            ],
        },
        Case {
            name: "new service without endpoints: an entry with count 0",
            input: (desired(), desired().svc(a, &[])),
            expected: vec![put_svc(a, 0, 1)],
        },
        Case {
            name: "services share backend IDs for the same address",
            input: (desired(), desired().svc(a, &[e1, e2]).svc(b, &[e2, e3])),
            expected: vec![
                put_be(1, e1),
                put_be(2, e2),
                put_be(3, e3),
                put_slot(a, 1, 1, 1),
                put_slot(a, 2, 2, 1),
                put_slot(b, 1, 2, 2),
                put_slot(b, 2, 3, 2),
                put_svc(a, 2, 1),
                put_svc(b, 2, 2),
            ],
        },
        Case {
            name: "added backend: its slot before the count grows",
            input: (
                desired().svc(a, &[e1, e2]).svc(b, &[e1]),
                desired().svc(a, &[e1, e2, e3]).svc(b, &[e1]),
            ),
            expected: vec![put_be(3, e3), put_slot(a, 3, 3, 1), put_svc(a, 3, 1)],
        },
        Case {
            name: "backend removed from the middle: last one moves in, count shrinks, tail slot goes",
            input: (desired().svc(a, &[e1, e2, e3]), desired().svc(a, &[e1, e3])),
            expected: vec![
                put_slot(a, 2, 3, 1),
                put_svc(a, 2, 1),
                del_slot(a, 3),
                del_be(2),
            ],
        },
        Case {
            name: "first backend removed: one slot write, not a shift of all",
            input: (
                desired().svc(a, &[e1, e2, e3, e4]),
                desired().svc(a, &[e2, e3, e4]),
            ),
            expected: vec![
                put_slot(a, 1, 4, 1),
                put_svc(a, 3, 1),
                del_slot(a, 4),
                del_be(1),
            ],
        },
        Case {
            name: "endpoint replaced: new backend into the old slot; other service untouched",
            input: (
                desired().svc(a, &[e1, e2]).svc(b, &[e1]),
                desired().svc(a, &[e1, e3]).svc(b, &[e1]),
            ),
            expected: vec![put_be(3, e3), put_slot(a, 2, 3, 1), del_be(2)],
        },
        Case {
            name: "backend still used by another service is kept",
            input: (
                desired().svc(a, &[e1, e2]).svc(b, &[e2]),
                desired().svc(a, &[e1]).svc(b, &[e2]),
            ),
            expected: vec![put_svc(a, 1, 1), del_slot(a, 2)],
        },
        Case {
            name: "all endpoints gone: count 0 first, then slots, then backends",
            input: (desired().svc(a, &[e1, e2]), desired().svc(a, &[])),
            expected: vec![
                put_svc(a, 0, 1),
                del_slot(a, 1),
                del_slot(a, 2),
                del_be(1),
                del_be(2),
            ],
        },
        Case {
            name: "service removed: entry first, then its slots, then unshared backends",
            input: (
                desired().svc(a, &[e1, e2]).svc(b, &[e2]),
                desired().svc(b, &[e2]),
            ),
            expected: vec![del_svc(a), del_slot(a, 1), del_slot(a, 2), del_be(1)],
        },
        Case {
            name: "endpoint turns terminating while others are ready: out of the slots, its backend kept",
            input: (
                desired().svc(a, &[e1, e2, e3]),
                desired().svc(a, &[e1, e3]).drain(a, &[e2]),
            ),
            expected: vec![
                put_be_term(2, e2),
                put_slot(a, 2, 3, 1),
                put_svc(a, 2, 1),
                del_slot(a, 3),
            ],
        },
        Case {
            name: "a draining endpoint never programmed gets no backend",
            input: (desired(), desired().svc(a, &[e1]).drain(a, &[e2])),
            expected: vec![put_be(1, e1), put_slot(a, 1, 1, 1), put_svc(a, 1, 1)],
        },
        Case {
            name: "draining for one service keeps the backend another service dropped",
            input: (
                desired().svc(a, &[e1, e2]).svc(b, &[e2, e3]),
                desired().svc(a, &[e1]).svc(b, &[e3]).drain(b, &[e2]),
            ),
            expected: vec![
                put_be_term(2, e2),
                put_slot(b, 1, 3, 2),
                put_svc(a, 1, 1),
                put_svc(b, 1, 2),
                del_slot(a, 2),
                del_slot(b, 2),
            ],
        },
        Case {
            name: "service replaced by another: new one made before the old one goes",
            input: (desired().svc(a, &[e1]), desired().svc(b, &[e2])),
            expected: vec![
                put_be(2, e2),
                put_slot(b, 1, 2, 2),
                put_svc(b, 1, 2),
                del_svc(a),
                del_slot(a, 1),
                del_be(1),
            ],
        },
    ];
    for c in cases {
        let (from, to) = c.input;
        let (mut maps, mut state) = programmed(&from.0);
        let p = converge(&mut state, &mut maps, &to.0);
        assert_eq!(
            p.ops,
            c.expected,
            "{}:\n{}",
            c.name,
            p.ops.iter().map(|o| format!("  {o}\n")).collect::<String>()
        );
    }
}

/// The terminating flag follows every service that uses a backend: a backend still ready
/// in one service is not flagged although another drains it or has only terminating ones.
#[test]
fn a_backend_ready_in_any_service_is_not_flagged_terminating() {
    let (a, b, c) = (
        key("10.96.0.1", 80),
        key("10.96.0.2", 80),
        key("10.96.0.3", 80),
    );
    let (e1, e2) = (be("10.0.0.1", 8080), be("10.0.0.2", 8080));
    let mut d = desired().svc(a, &[e1, e2]).svc(b, &[e2]).drain(b, &[e1]);
    let mut fallback = DesiredService::new("test/c", vec![e1, e2], CIP);
    fallback.flags |= svc_flags::TERMINATING_FALLBACK;
    d.0.insert(c, fallback);
    assert!(
        terminating_backends(&d.0).is_empty(),
        "e1 and e2 are ready in a"
    );
    let d = desired().svc(b, &[e2]).drain(b, &[e1]);
    assert_eq!(terminating_backends(&d.0), HashSet::from([e1]));
}

/// An endpoint's life through termination: ready -> terminating+serving (out of the
/// slots, backend and ID kept: established flows still validate) -> unchanged (nothing
/// to do, also after a restart) -> ready again (same ID, no new backend) -> terminating
/// -> no longer serving (backend deleted last, flows re-balance).
#[test]
fn draining_endpoints_keep_their_backend_until_they_stop_serving() {
    let a = key("10.96.0.1", 80);
    let (e1, e2, e3) = (
        be("10.0.0.1", 8080),
        be("10.0.0.2", 8080),
        be("10.0.0.3", 8080),
    );
    let all = desired().svc(a, &[e1, e2, e3]);
    let (mut maps, mut state) = programmed(&all.0);
    assert_eq!(state.backends()[&2], e2);
    let draining = desired().svc(a, &[e1, e3]).drain(a, &[e2]);
    let p = converge(&mut state, &mut maps, &draining.0);
    assert_eq!(
        p.ops,
        vec![
            put_be_term(2, e2),
            put_slot(a, 2, 3, 1),
            put_svc(a, 2, 1),
            del_slot(a, 3)
        ]
    );
    assert_eq!(state.backends()[&2], e2, "backend kept with its ID");
    assert_eq!(
        maps.state().0.backends()[&2],
        e2,
        "also as a restart reads it"
    );
    // Unchanged input: empty plan (converge also checks a restarted agent's plan).
    assert!(converge(&mut state, &mut maps, &draining.0).is_empty());
    // Back to ready: the same ID goes into a slot, its flag cleared in place.
    let p = converge(&mut state, &mut maps, &all.0);
    assert_eq!(
        p.ops,
        vec![put_be(2, e2), put_slot(a, 3, 2, 1), put_svc(a, 3, 1)]
    );
    converge(&mut state, &mut maps, &draining.0);
    // No longer serving (or gone): the backend goes, after everything else.
    let gone = desired().svc(a, &[e1, e3]);
    let p = converge(&mut state, &mut maps, &gone.0);
    assert_eq!(p.ops, vec![del_be(2)]);
}

#[test]
fn ids_are_not_reused_and_services_keep_theirs() {
    let a = key("10.96.0.1", 80);
    let b = key("10.96.0.2", 80);
    let c = key("10.96.0.3", 80);
    let (e1, e2, e3) = (be("10.0.0.1", 80), be("10.0.0.2", 80), be("10.0.0.3", 80));
    let mut maps = MemMaps::default();
    let mut state = MapState::new();
    converge(
        &mut state,
        &mut maps,
        &desired().svc(a, &[e1, e2]).svc(b, &[e1]).0,
    );
    // Backend 2 and service ID 2 (b) go away.
    converge(&mut state, &mut maps, &desired().svc(a, &[e1]).0);
    // A new address gets 3, not the freed 2; a re-created service gets 3, not 2; a keeps 1.
    let p = converge(
        &mut state,
        &mut maps,
        &desired().svc(a, &[e1, e3]).svc(c, &[e2]).0,
    );
    assert_eq!(
        p.ops,
        vec![
            put_be(3, e3),
            put_be(4, e2),
            put_slot(a, 2, 3, 1),
            put_slot(c, 1, 4, 3),
            put_svc(a, 2, 1),
            put_svc(c, 1, 3),
        ]
    );
}

// ---- restart: from_maps ---------------------------------------------------------------

fn entries(ops: &[Op]) -> MemMaps {
    let mut maps = MemMaps::default();
    let mut state = MapState::new();
    apply_plan(&mut state, &Plan { ops: ops.to_vec() }, &mut maps).expect("MemMaps never fails");
    maps
}

#[test]
fn from_maps_restores_a_consistent_state() {
    let a = key("10.96.0.1", 80);
    let d = desired()
        .svc(a, &[be("10.0.0.1", 80), be("10.0.0.2", 80)])
        .svc(key("10.96.0.2", 80), &[]);
    let (maps, state) = programmed(&d.0);
    let (restored, warnings) = maps.state();
    assert!(warnings.is_empty(), "{warnings:#?}");
    assert_eq!(restored.services(), state.services());
    assert_eq!(restored.backends(), state.backends());
    assert_eq!(
        restored.services()[&a],
        ProgrammedService {
            svc_id: 1,
            flags: CIP,
            affinity_timeout_s: 0,
            backend_ids: vec![1, 2]
        }
    );
    assert!(plan_d(&restored, &d.0).is_empty());
}

#[test]
fn from_maps_continues_ids_after_the_highest_seen() {
    let a = key("10.96.0.1", 80);
    let n = key("10.96.0.9", 80);
    // Backend 7 exists; a slot refers to a missing backend 9; service IDs up to 5.
    let maps = entries(&[
        put_be(7, be("10.0.0.7", 80)),
        put_slot(a, 1, 7, 5),
        put_slot(a, 2, 9, 5),
        put_svc(a, 2, 5),
    ]);
    let (mut state, warnings) = maps.state();
    assert_eq!(
        warnings,
        vec!["service 10.96.0.1:80/TCP: slot 2 refers to missing backend 9".to_string()]
    );
    let mut maps = maps;
    let p = converge(
        &mut state,
        &mut maps,
        &desired()
            .svc(a, &[be("10.0.0.7", 80)])
            .svc(n, &[be("10.0.0.8", 80)])
            .0,
    );
    assert_eq!(
        p.ops,
        vec![
            put_be(10, be("10.0.0.8", 80)),
            put_slot(n, 1, 10, 6),
            put_svc(a, 1, 5),
            put_svc(n, 1, 6),
            del_slot(a, 2),
        ]
    );
}

/// Service IDs are 32-bit: more than 65,535 service entries get distinct IDs, a restart
/// restores IDs above 65,535 and continues after them, and the allocator stays below the
/// counter map's size.
#[test]
fn service_ids_go_past_16_bits_and_survive_a_restart() {
    let n = 70_000u32;
    let keys: Vec<ServiceKey> = (0..n)
        .map(|i| ServiceKey::external(Ipv4Addr::from(0x0a60_0000 + i), 80, Protocol::Tcp))
        .collect();
    let mut d = desired();
    for k in &keys {
        d = d.svc(*k, &[be("10.0.0.1", 80)]);
    }
    let mut maps = MemMaps::default();
    let mut state = MapState::with_svc_id_limit(100_000);
    let p = plan(&state, &d.0, &BTreeSet::new());
    apply_plan(&mut state, &p, &mut maps).expect("MemMaps never fails");
    let ids: HashSet<u32> = state.services().values().map(|s| s.svc_id).collect();
    assert_eq!(ids.len(), n as usize, "every entry has its own ID");
    assert_eq!(ids.iter().max(), Some(&n));
    // Restart: IDs above 65,535 come back as they were; the next new one follows them.
    let (mut restored, warnings) = maps.state();
    assert!(warnings.is_empty(), "{warnings:?}");
    restored.set_svc_id_limit(100_000);
    assert_eq!(restored.services(), state.services());
    let extra = key("10.200.0.1", 80);
    let p = plan(
        &restored,
        &d.svc(extra, &[be("10.0.0.1", 80)]).0,
        &BTreeSet::new(),
    );
    assert_eq!(
        p.ops,
        vec![put_slot(extra, 1, 1, n + 1), put_svc(extra, 1, n + 1)]
    );
    assert_eq!(fresh_service_ids(&restored, &p), vec![n + 1]);
    // With a counter map of 70,001 entries the next ID wraps to the lowest free one.
    restored.set_svc_id_limit(n + 1);
    let mut d2 = desired();
    for k in &keys[1..] {
        d2 = d2.svc(*k, &[be("10.0.0.1", 80)]);
    }
    // While its ID is still published (deleted after the new entries), 1 is in use.
    let with_extra = d2.clone().svc(extra, &[be("10.0.0.1", 80)]);
    let p = plan(&restored, &with_extra.0, &BTreeSet::new());
    assert!(!p.ops.iter().any(|o| matches!(o, Op::PutService { .. })));
    apply_plan(&mut restored, &p, &mut maps).expect("MemMaps never fails");
    let p = plan(&restored, &with_extra.0, &BTreeSet::new());
    assert_eq!(p.ops, vec![put_slot(extra, 1, 1, 1), put_svc(extra, 1, 1)]);
    assert_eq!(
        fresh_service_ids(&restored, &p),
        vec![1],
        "a reused ID is zeroed"
    );
}

#[test]
fn fresh_service_ids_are_new_or_reused_ids_only() {
    let a = key("10.96.0.1", 80);
    let b = key("10.96.0.2", 80);
    let (mut maps, mut state) = programmed(&desired().svc(a, &[be("10.0.0.1", 80)]).0);
    // Unchanged service: its ID is in use, nothing to zero.
    let d = desired().svc(a, &[be("10.0.0.2", 80)]).svc(b, &[]);
    let p = plan(&state, &d.0, &BTreeSet::new());
    assert_eq!(fresh_service_ids(&state, &p), vec![2]);
    replay(&mut state, &mut maps, &p);
    // a goes; a new service at another address reuses nothing yet (IDs move on), but
    // once the allocator wraps it would: any ID not in use counts as fresh.
    let p = plan(&state, &desired().svc(b, &[]).0, &BTreeSet::new());
    assert!(fresh_service_ids(&state, &p).is_empty());
}

#[test]
fn id_allocators_wrap_and_skip_ids_in_use() {
    let a = key("10.96.0.1", 80);
    let n = key("10.96.0.9", 80);
    // The highest service ID the default counter map can count.
    let top = sizes::SVC_IDS - 1;
    let maps = entries(&[
        put_be(u32::MAX, be("10.0.0.1", 80)),
        put_be(1, be("10.0.0.2", 80)),
        put_slot(a, 1, u32::MAX, top),
        put_slot(a, 2, 1, top),
        put_svc(a, 2, top),
        put_svc(key("10.96.0.2", 80), 0, 1),
    ]);
    let (mut state, warnings) = maps.state();
    assert!(warnings.is_empty(), "{warnings:#?}");
    let mut maps = maps;
    let d = desired()
        .svc(a, &[be("10.0.0.1", 80), be("10.0.0.2", 80)])
        .svc(n, &[be("10.0.0.3", 80)]);
    let p = converge(&mut state, &mut maps, &d.0);
    // Backend IDs wrap past u32::MAX to 1, which is taken: 2. Service IDs wrap at the
    // counter map's size likewise: 2.
    assert_eq!(
        p.ops,
        vec![
            put_be(2, be("10.0.0.3", 80)),
            put_slot(n, 1, 2, 2),
            put_svc(n, 1, 2),
            del_svc(key("10.96.0.2", 80))
        ]
    );
}

#[test]
fn from_maps_reports_and_plan_repairs_inconsistent_entries() {
    struct Case {
        name: &'static str,
        input: Vec<Op>,
        expected: Vec<&'static str>,
    }
    let a = key("10.96.0.1", 80);
    let b = key("10.96.0.2", 80);
    let e1 = be("10.0.0.1", 80);
    let odd_key = Svc4Key {
        scope: 7,
        ..svc4_key(&a, 0)
    };
    let cases = vec![
        Case {
            name: "slots without an entry (a plan stopped half way)",
            input: vec![put_be(1, e1), put_slot(a, 1, 1, 1), put_slot(a, 2, 1, 1)],
            expected: vec![
                "service 10.96.0.1:80/TCP: slots [1, 2] without a service entry (slot 0)",
            ],
        },
        Case {
            name: "slots beyond the count",
            input: vec![
                put_be(1, e1),
                put_slot(a, 1, 1, 1),
                put_slot(a, 3, 1, 1),
                put_svc(a, 1, 1),
            ],
            expected: vec!["service 10.96.0.1:80/TCP: slots [3] are beyond its count 1"],
        },
        Case {
            name: "missing slot and slot of another service ID",
            input: vec![
                put_be(1, e1),
                put_slot(a, 2, 1, 9),
                put_svc(a, 3, 1),
                put_slot(a, 3, 1, 1),
            ],
            expected: vec![
                "service 10.96.0.1:80/TCP: slot 1 of 3 is missing",
                "service 10.96.0.1:80/TCP: slot 2 is not a valid slot of service ID 1: Svc4Value { backend_id: 1, count: 0, _pad: 0, svc_id: 9, flags: 0, affinity_timeout_s: 0 }",
            ],
        },
        Case {
            name: "service ID 0 and a duplicate service ID",
            input: vec![
                put_svc(a, 0, 0),
                put_svc(b, 0, 3),
                put_svc(key("10.96.0.3", 80), 0, 3),
            ],
            expected: vec![
                "service 10.96.0.1:80/TCP: service ID 0 is reserved",
                "service 10.96.0.3:80/TCP: service ID 3 is also used by 10.96.0.2:80/TCP",
            ],
        },
        Case {
            name: "backends: ID 0, unknown protocol, flags set, same address twice",
            input: vec![
                put_be(0, e1),
                Op::PutBackend {
                    id: 1,
                    backend: Backend4::new(1, 2, 99),
                },
                Op::PutBackend {
                    id: 2,
                    // A flag this agent never writes (TERMINATING is 0x1).
                    backend: Backend4 {
                        flags: 0x80,
                        ..backend4(&e1)
                    },
                },
                put_be(3, e1),
                put_be(4, e1),
            ],
            expected: vec![
                "backend 0 (10.0.0.1:80/TCP) uses the reserved ID 0",
                "backend 1 (1.0.0.0:512/proto 99, flags 0x0) is not a valid backend entry",
                "backend 2 (10.0.0.1:80/TCP, flags 0x80) is not a valid backend entry",
            ],
        },
        Case {
            name: "a key this agent never writes",
            input: vec![
                Op::PutService {
                    key: odd_key,
                    value: Svc4Value::service(1, 4, 0),
                },
                Op::PutSlot {
                    key: Svc4Key { slot: 1, ..odd_key },
                    value: Svc4Value::slot(1, 4),
                },
                Op::PutService {
                    key: Svc4Key {
                        proto: 99,
                        ..svc4_key(&b, 0)
                    },
                    value: Svc4Value::service(0, 5, 0),
                },
            ],
            expected: vec![
                "service 10.96.0.1:80/TCP (scope 7, pad [0, 0]): key with unknown protocol, scope or padding",
                "service 10.96.0.2:80/proto 99: key with unknown protocol, scope or padding",
            ],
        },
        Case {
            name: "entry with stray fields",
            input: vec![Op::PutService {
                key: svc4_key(&a, 0),
                value: Svc4Value {
                    backend_id: 5,
                    ..Svc4Value::service(0, 1, CIP)
                },
            }],
            expected: vec![
                "service 10.96.0.1:80/TCP: entry has a non-zero backend_id: Svc4Value { backend_id: 5, count: 0, _pad: 0, svc_id: 1, flags: 1, affinity_timeout_s: 0 }",
            ],
        },
    ];
    let targets = [
        desired(),
        desired().svc(a, &[e1]),
        desired()
            .svc(a, &[e1, be("10.0.0.2", 80)])
            .svc(b, &[e1])
            .svc(key("10.96.0.3", 80), &[]),
    ];
    for c in cases {
        let maps = entries(&c.input);
        let (_, warnings) = maps.state();
        assert_eq!(warnings, c.expected, "{}", c.name);
        for (i, target) in targets.iter().enumerate() {
            let mut maps = maps.clone();
            let (mut state, _) = maps.state();
            // The replay checks are not meaningful before the repair: only check the end.
            let p = plan_d(&state, &target.0);
            apply_plan(&mut state, &p, &mut maps).expect("MemMaps never fails");
            assert_model_matches(&state, &maps, c.name);
            assert_eq!(
                resolved(&maps),
                wanted(&target.0),
                "{} -> target {i}: maps lead where desired",
                c.name
            );
            assert!(
                plan_d(&state, &target.0).is_empty(),
                "{} -> target {i}: converged",
                c.name
            );
        }
    }
}

// ---- apply_plan -----------------------------------------------------------------------

/// Fails the `fail_at`-th write (0-based) with an I/O error.
struct Failing {
    inner: MemMaps,
    writes: usize,
    fail_at: usize,
}

impl Failing {
    fn step(&mut self) -> Result<(), std::io::Error> {
        let n = self.writes;
        self.writes += 1;
        if n == self.fail_at {
            Err(std::io::Error::from_raw_os_error(libc::E2BIG))
        } else {
            Ok(())
        }
    }
}

impl MapWriter for Failing {
    type Error = std::io::Error;
    fn put_backend(&mut self, id: u32, b: &Backend4) -> Result<(), Self::Error> {
        self.step()?;
        self.inner.put_backend(id, b).map_err(|e| match e {})
    }
    fn put_service(&mut self, k: &Svc4Key, v: &Svc4Value) -> Result<(), Self::Error> {
        self.step()?;
        self.inner.put_service(k, v).map_err(|e| match e {})
    }
    fn delete_service(&mut self, k: &Svc4Key) -> Result<(), Self::Error> {
        self.step()?;
        self.inner.delete_service(k).map_err(|e| match e {})
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), Self::Error> {
        self.step()?;
        self.inner.delete_backend(id).map_err(|e| match e {})
    }
    fn put_vip(&mut self, a: u32, v: &VipValue) -> Result<(), ExtWriteError<Self::Error>> {
        self.step()?;
        self.inner
            .put_vip(a, v)
            .map_err(|_| unreachable!("MemMaps never fails"))
    }
    fn delete_vip(&mut self, a: u32) -> Result<(), ExtWriteError<Self::Error>> {
        self.step()?;
        self.inner
            .delete_vip(a)
            .map_err(|_| unreachable!("MemMaps never fails"))
    }
    fn put_src_range(&mut self, k: &SrcRange4Key) -> Result<(), ExtWriteError<Self::Error>> {
        self.step()?;
        self.inner
            .put_src_range(k)
            .map_err(|_| unreachable!("MemMaps never fails"))
    }
    fn delete_src_range(&mut self, k: &SrcRange4Key) -> Result<(), ExtWriteError<Self::Error>> {
        self.step()?;
        self.inner
            .delete_src_range(k)
            .map_err(|_| unreachable!("MemMaps never fails"))
    }
}

#[test]
fn apply_plan_stops_at_the_first_error_with_a_true_state() {
    let a = key("10.96.0.1", 80);
    let b = key("10.96.0.2", 80);
    let (e1, e2, e3) = (be("10.0.0.1", 80), be("10.0.0.2", 80), be("10.0.0.3", 80));
    let from = desired().svc(a, &[e1, e2]).svc(b, &[e2]);
    let to = desired().svc(a, &[e3, e2]).svc(key("10.96.0.3", 80), &[e1]);
    let (maps, state) = programmed(&from.0);
    let total = plan_d(&state, &to.0).ops.len();
    assert!(total > 5, "the plan exercises several phases");
    for fail_at in 0..total {
        let mut w = Failing {
            inner: maps.clone(),
            writes: 0,
            fail_at,
        };
        let mut st = state.clone();
        let p = plan_d(&st, &to.0);
        let err = apply_plan(&mut st, &p, &mut w).expect_err("injected failure");
        assert_eq!(err.index, fail_at);
        assert_eq!(err.applied.total(), fail_at);
        assert_eq!(err.op, p.ops[fail_at]);
        assert_eq!(
            err.source
                .downcast_ref::<std::io::Error>()
                .and_then(|e| e.raw_os_error()),
            Some(libc::E2BIG),
            "the writer's error is kept by type"
        );
        assert!(err.to_string().starts_with(&format!(
            "BPF map update {} of {total} failed (",
            fail_at + 1
        )));
        assert!(
            w.inner.broken_services().is_empty(),
            "fail at {fail_at}: {:#?}",
            w.inner.broken_services()
        );
        assert_model_matches(&st, &w.inner, &format!("fail at {fail_at}"));
        // The next sync finishes the job, from the kept state or from a restart.
        let mut maps2 = w.inner.clone();
        let (mut restarted, _) = maps2.state();
        converge(&mut restarted, &mut maps2, &to.0);
        let mut maps = w.inner;
        converge(&mut st, &mut maps, &to.0);
    }
}

#[test]
fn apply_plan_counts_by_kind() {
    let a = key("10.96.0.1", 80);
    let (mut maps, mut state) = programmed(
        &desired()
            .svc(a, &[be("10.0.0.1", 80), be("10.0.0.2", 80)])
            .svc(key("10.96.0.2", 1), &[])
            .0,
    );
    let p = plan_d(&state, &desired().svc(a, &[be("10.0.0.3", 80)]).0);
    let stats = apply_plan(&mut state, &p, &mut maps).expect("MemMaps never fails");
    assert_eq!(
        stats,
        ApplyStats {
            put_backends: 1,
            put_slots: 1,
            put_services: 1,
            delete_slots: 1,
            delete_services: 1,
            delete_backends: 2,
            ..Default::default()
        }
    );
    assert_eq!(stats.total(), p.ops.len());
}

// ---- long replay ----------------------------------------------------------------------

/// A small deterministic generator (no extra dependency).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[test]
fn random_changes_keep_every_service_usable_and_converge() {
    let mut rng = Lcg(42);
    let services: Vec<ServiceKey> = (1..=6).map(|i| key(&format!("10.96.0.{i}"), 80)).collect();
    let pool: Vec<BackendAddr> = (1..=12).map(|i| be(&format!("10.0.0.{i}"), 8080)).collect();
    let mut maps = MemMaps::default();
    let mut state = MapState::new();
    let mut max_backend_id = 0;
    for step in 0..200 {
        let mut d = desired();
        for k in &services {
            if rng.next(5) == 0 {
                continue; // service absent this round
            }
            let n = rng.next(7) as usize;
            let backends: Vec<BackendAddr> = (0..n)
                .map(|_| pool[rng.next(pool.len() as u64) as usize])
                .collect();
            d = d.svc(*k, &backends);
        }
        let svc_ids_before: BTreeMap<ServiceKey, u32> = state
            .services()
            .iter()
            .map(|(k, s)| (*k, s.svc_id))
            .collect();
        let p = converge(&mut state, &mut maps, &d.0);
        for op in &p.ops {
            if let Op::PutBackend { id, .. } = op {
                assert!(
                    *id > max_backend_id,
                    "step {step}: backend ID {id} reused or not increasing"
                );
                max_backend_id = *id;
            }
        }
        for (k, s) in state.services() {
            if let Some(before) = svc_ids_before.get(k) {
                assert_eq!(s.svc_id, *before, "step {step}: {k} kept its service ID");
            }
        }
    }
}

#[test]
fn op_display() {
    let a = key("10.96.0.1", 80);
    assert_eq!(
        put_be(3, be("10.0.0.1", 8080)).to_string(),
        "put backend 3 = 10.0.0.1:8080/TCP"
    );
    assert_eq!(
        put_slot(a, 2, 3, 1).to_string(),
        "put slot 2 of 10.96.0.1:80/TCP = backend 3"
    );
    assert_eq!(
        put_svc(a, 2, 1).to_string(),
        "put service 10.96.0.1:80/TCP = 2 backends (service ID 1, flags 0x1)"
    );
    assert_eq!(
        del_slot(a, 3).to_string(),
        "delete slot 3 of 10.96.0.1:80/TCP"
    );
    assert_eq!(del_svc(a).to_string(), "delete service 10.96.0.1:80/TCP");
    assert_eq!(del_be(3).to_string(), "delete backend 3");
}

#[test]
fn abi_conversions_round_trip() {
    let k = ServiceKey::external(ip("10.96.0.1"), 53, Protocol::Udp);
    let sk = svc4_key(&k, 4);
    assert_eq!(sk.addr_be.to_ne_bytes(), [10, 96, 0, 1]);
    assert_eq!(sk.port_be.to_ne_bytes(), [0, 53]);
    assert_eq!((sk.proto, sk.slot, sk.scope), (17, 4, 0));
    assert_eq!(service_key(&sk), Some(k));
    assert_eq!(service_key(&Svc4Key { scope: 1, ..sk }), Some(k.internal()));
    assert_eq!(
        svc4_key(&k.internal(), 0),
        Svc4Key {
            scope: 1,
            slot: 0,
            ..sk
        }
    );
    assert_eq!(service_key(&Svc4Key { scope: 2, ..sk }), None);
    assert_eq!(service_key(&Svc4Key { _pad: [0, 1], ..sk }), None);
    assert_eq!(service_key(&Svc4Key { proto: 1, ..sk }), None);
    let b = BackendAddr {
        ip: ip("10.0.0.1"),
        port: 8080,
        protocol: Protocol::Sctp,
    };
    assert_eq!(backend_addr(&backend4(&b)), Some(b));
    assert_eq!(
        backend_addr(&backend4(&b).with_flags(backend_flags::TERMINATING)),
        Some(b),
        "terminating is a flag this agent writes"
    );
    assert_eq!(
        backend_addr(&Backend4 {
            flags: 2,
            ..backend4(&b)
        }),
        None
    );
}

#[test]
fn slot_assignment_keeps_positions() {
    struct Case {
        name: &'static str,
        input: (Vec<u32>, Vec<u32>),
        expected: Vec<u32>,
    }
    let cases = [
        Case {
            name: "fresh",
            input: (vec![], vec![1, 2, 3]),
            expected: vec![1, 2, 3],
        },
        Case {
            name: "same",
            input: (vec![3, 1, 2], vec![1, 2, 3]),
            expected: vec![3, 1, 2],
        },
        Case {
            name: "grow",
            input: (vec![2], vec![1, 2, 3]),
            expected: vec![2, 1, 3],
        },
        Case {
            name: "tail moves into hole",
            input: (vec![1, 2, 3], vec![1, 3]),
            expected: vec![1, 3],
        },
        Case {
            name: "replace",
            input: (vec![1, 2, 3], vec![1, 3, 4]),
            expected: vec![1, 4, 3],
        },
        Case {
            name: "invalid and duplicate slots refilled",
            input: (vec![0, 1, 1], vec![1, 2, 3]),
            expected: vec![2, 1, 3],
        },
        Case {
            name: "to empty",
            input: (vec![1, 2], vec![]),
            expected: vec![],
        },
    ];
    for c in cases {
        assert_eq!(
            assign_slots(&c.input.0, &c.input.1),
            c.expected,
            "{}",
            c.name
        );
    }
}

// ---- scopes, flags, ClusterIPs, source ranges ------------------------------------------

fn ipset(ips: &[&str]) -> BTreeSet<Ipv4Addr> {
    ips.iter().map(|s| ip(s)).collect()
}

fn entry(k: ServiceKey, backends: &[BackendAddr], flags: u32) -> (ServiceKey, DesiredService) {
    (
        k,
        DesiredService::new(format!("test/{k}"), backends.to_vec(), flags),
    )
}

fn put_vip(a: &str) -> Op {
    Op::PutVip {
        addr_be: abi::addr_be(ip(a)),
        value: CLUSTER_IP_VIP,
    }
}
fn del_vip(a: &str) -> Op {
    Op::DeleteVip {
        addr_be: abi::addr_be(ip(a)),
    }
}
fn put_range(svc_id: u32, a: &str, p: u8) -> Op {
    Op::PutSrcRange {
        key: SrcRange4Key::new(svc_id, abi::addr_be(ip(a)), p),
    }
}
fn del_range(svc_id: u32, a: &str, p: u8) -> Op {
    Op::DeleteSrcRange {
        key: SrcRange4Key::new(svc_id, abi::addr_be(ip(a)), p),
    }
}

/// An LB entry with the given allowed ranges.
fn lb(
    k: ServiceKey,
    backends: &[BackendAddr],
    ranges: &[(&str, u8)],
) -> (ServiceKey, DesiredService) {
    let (k, mut d) = entry(
        k,
        backends,
        svc_flags::LOAD_BALANCER | svc_flags::SOURCE_RANGES,
    );
    d.source_ranges = ranges.iter().map(|(a, p)| (ip(a), *p)).collect();
    (k, d)
}

#[test]
fn two_scopes_flags_and_affinity() {
    let x = key("198.51.100.1", 80);
    let (e1, e2) = (be("10.0.0.1", 8080), be("10.0.0.2", 8080));
    let local = svc_flags::NODE_PORT | svc_flags::ETP_LOCAL | svc_flags::TWO_SCOPES;
    let d_local: Desired = [
        entry(x, &[e1], local),
        entry(x.internal(), &[e1, e2], svc_flags::NODE_PORT),
    ]
    .into();
    let d_cluster: Desired = [entry(x, &[e1, e2], svc_flags::NODE_PORT)].into();
    let mut maps = MemMaps::default();
    let mut state = MapState::new();
    // New: the internal twin's entry is written before the external one that points at it.
    let p = converge(&mut state, &mut maps, &d_local);
    let internal = Svc4Key::scoped(
        abi::addr_be(ip("198.51.100.1")),
        abi::port_be(80),
        6,
        scope::INTERNAL,
        0,
    );
    assert_eq!(
        p.ops,
        vec![
            put_be(1, e1),
            put_be(2, e2),
            put_slot(x, 1, 1, 1),
            Op::PutSlot {
                key: internal.with_slot(1),
                value: Svc4Value::slot(1, 2)
            },
            Op::PutSlot {
                key: internal.with_slot(2),
                value: Svc4Value::slot(2, 2)
            },
            Op::PutService {
                key: internal,
                value: Svc4Value::service(2, 2, svc_flags::NODE_PORT)
            },
            Op::PutService {
                key: svc4_key(&x, 0),
                value: Svc4Value::service(1, 1, local)
            },
        ]
    );
    assert_eq!(
        p.ops[6].to_string(),
        format!("put service 198.51.100.1:80/TCP = 1 backends (service ID 1, flags {local:#x})")
    );
    assert_eq!(
        p.ops[5].to_string(),
        "put service 198.51.100.1:80/TCP (internal) = 2 backends (service ID 2, flags 0x2)"
    );
    // Local -> Cluster: the external entry drops TWO_SCOPES before the twin goes.
    let p = converge(&mut state, &mut maps, &d_cluster);
    assert_eq!(
        p.ops,
        vec![
            put_slot(x, 2, 2, 1),
            Op::PutService {
                key: svc4_key(&x, 0),
                value: Svc4Value::service(2, 1, svc_flags::NODE_PORT)
            },
            Op::DeleteService { key: internal },
            Op::DeleteSlot {
                key: internal.with_slot(1)
            },
            Op::DeleteSlot {
                key: internal.with_slot(2)
            },
        ]
    );
    // Back again (replay checks TWO_SCOPES never lacks its twin), then a flags/affinity
    // change alone is one service-entry write.
    converge(&mut state, &mut maps, &d_local);
    let mut d_aff = d_local.clone();
    for d in d_aff.values_mut() {
        d.flags |= svc_flags::AFFINITY;
        d.affinity_timeout_s = 60;
    }
    let p = converge(&mut state, &mut maps, &d_aff);
    let ext_id = state.services()[&x].svc_id;
    let int_id = state.services()[&x.internal()].svc_id;
    assert_eq!(
        p.ops,
        vec![
            Op::PutService {
                key: internal,
                value: Svc4Value::service(2, int_id, svc_flags::NODE_PORT | svc_flags::AFFINITY)
                    .with_affinity(60),
            },
            Op::PutService {
                key: svc4_key(&x, 0),
                value: Svc4Value::service(1, ext_id, local | svc_flags::AFFINITY).with_affinity(60),
            },
        ]
    );
    assert_eq!(state.services()[&x].affinity_timeout_s, 60);
    // Removing the service: external entry first, then the twin.
    let p = converge(&mut state, &mut maps, &Desired::new());
    let deleted: Vec<Op> = p
        .ops
        .iter()
        .copied()
        .filter(|o| matches!(o, Op::DeleteService { .. }))
        .collect();
    assert_eq!(
        deleted,
        vec![
            Op::DeleteService {
                key: svc4_key(&x, 0)
            },
            Op::DeleteService { key: internal }
        ]
    );
}

#[test]
fn cluster_ip_set_follows_the_translation() {
    let a = key("10.96.0.1", 80);
    let d: Desired = [entry(a, &[], CIP)].into();
    let mut maps = MemMaps::default();
    let mut state = MapState::new();
    // New ClusterIPs after the service entries; one without any entry still gets its VIP.
    let p = converge_with(
        &mut state,
        &mut maps,
        &d,
        &ipset(&["10.96.0.1", "10.96.0.9"]),
    );
    assert_eq!(
        p.ops,
        vec![put_svc(a, 0, 1), put_vip("10.96.0.1"), put_vip("10.96.0.9")]
    );
    assert_eq!(p.ops[1].to_string(), "put ClusterIP 10.96.0.1 (flags 0x1)");
    // Unchanged: nothing.
    assert!(
        converge_with(
            &mut state,
            &mut maps,
            &d,
            &ipset(&["10.96.0.1", "10.96.0.9"])
        )
        .is_empty()
    );
    // Service and ClusterIP removed: entry first, VIP after.
    let p = converge_with(
        &mut state,
        &mut maps,
        &Desired::new(),
        &ipset(&["10.96.0.9"]),
    );
    assert_eq!(p.ops, vec![del_svc(a), del_vip("10.96.0.1")]);
    assert_eq!(p.ops[1].to_string(), "delete ClusterIP 10.96.0.1");
    // A foreign value is rewritten; a foreign address deleted; both reported on restart.
    maps.vips
        .insert(abi::addr_be(ip("10.96.0.9")), VipValue { flags: 0 });
    maps.vips
        .insert(abi::addr_be(ip("10.96.0.7")), CLUSTER_IP_VIP);
    let (mut restored, warnings) = maps.state();
    assert_eq!(
        warnings,
        vec![
            "ClusterIP 10.96.0.9: entry VipValue { flags: 0 } is not a valid ClusterIP entry"
                .to_string()
        ]
    );
    let p = converge_with(
        &mut restored,
        &mut maps,
        &Desired::new(),
        &ipset(&["10.96.0.9"]),
    );
    assert_eq!(p.ops, vec![put_vip("10.96.0.9"), del_vip("10.96.0.7")]);
}

#[test]
fn source_ranges_are_made_before_and_broken_after_the_entry() {
    let x = key("198.51.100.1", 443);
    let mut maps = MemMaps::default();
    let mut state = MapState::new();
    // New: ranges (keyed by the entry's service ID, host bits cleared) before the entry.
    let p = converge(
        &mut state,
        &mut maps,
        &[lb(x, &[], &[("10.0.0.0", 8), ("192.168.7.0", 24)])].into(),
    );
    let flags = svc_flags::LOAD_BALANCER | svc_flags::SOURCE_RANGES;
    assert_eq!(
        p.ops,
        vec![
            put_range(1, "10.0.0.0", 8),
            put_range(1, "192.168.7.0", 24),
            Op::PutService {
                key: svc4_key(&x, 0),
                value: Svc4Value::service(0, 1, flags)
            },
        ]
    );
    assert_eq!(
        p.ops[0].to_string(),
        "put source range 10.0.0.0/8 of service ID 1"
    );
    // Ranges changed, entry unchanged: the new one before the old one goes.
    let p = converge(
        &mut state,
        &mut maps,
        &[lb(x, &[], &[("10.0.0.0", 8), ("172.16.0.0", 12)])].into(),
    );
    assert_eq!(
        p.ops,
        vec![
            put_range(1, "172.16.0.0", 12),
            del_range(1, "192.168.7.0", 24)
        ]
    );
    // An empty list with SOURCE_RANGES: no range, every source dropped (fail closed).
    let p = converge(&mut state, &mut maps, &[lb(x, &[], &[])].into());
    assert_eq!(
        p.ops,
        vec![del_range(1, "10.0.0.0", 8), del_range(1, "172.16.0.0", 12)]
    );
    converge(
        &mut state,
        &mut maps,
        &[lb(x, &[], &[("10.0.0.0", 8)])].into(),
    );
    // Restrictions lifted: the flag goes first, then the ranges.
    let p = converge(
        &mut state,
        &mut maps,
        &[entry(x, &[], svc_flags::LOAD_BALANCER)].into(),
    );
    assert_eq!(
        p.ops,
        vec![
            Op::PutService {
                key: svc4_key(&x, 0),
                value: Svc4Value::service(0, 1, svc_flags::LOAD_BALANCER)
            },
            del_range(1, "10.0.0.0", 8),
        ]
    );
    // Ranges without the flag are not written.
    let (k, mut d) = entry(x, &[], svc_flags::LOAD_BALANCER);
    d.source_ranges = vec![(ip("10.0.0.0"), 8)];
    assert!(converge(&mut state, &mut maps, &[(k, d)].into()).is_empty());
    // Service removed: the entry, then its ranges.
    converge(
        &mut state,
        &mut maps,
        &[lb(x, &[], &[("10.0.0.0", 8)])].into(),
    );
    let p = converge(&mut state, &mut maps, &Desired::new());
    assert_eq!(
        p.ops,
        vec![
            Op::DeleteService {
                key: svc4_key(&x, 0)
            },
            del_range(1, "10.0.0.0", 8)
        ]
    );
}

#[test]
fn source_range_entries_this_agent_never_writes_are_reported_and_removed() {
    let x = key("198.51.100.1", 443);
    let (mut maps, _) = programmed(&[lb(x, &[], &[("10.0.0.0", 8)])].into());
    // Host bits set, a range of an unknown service ID, a wrong value.
    let host_bits = SrcRange4Key::new(1, abi::addr_be(ip("10.1.0.0")), 8);
    let orphan = SrcRange4Key::new(9, abi::addr_be(ip("10.0.0.0")), 8);
    maps.src_ranges.insert(host_bits, 1);
    maps.src_ranges.insert(orphan, 1);
    maps.src_ranges
        .insert(SrcRange4Key::new(1, abi::addr_be(ip("10.0.0.0")), 8), 2);
    let (mut state, warnings) = maps.state();
    assert_eq!(
            warnings,
            vec![
                "source range 10.0.0.0/8 of service ID 1 (prefixlen 40, value 2) is not a valid source-range entry".to_string(),
                "source range 10.1.0.0/8 of service ID 1 (prefixlen 40, value 1) is not a valid source-range entry".to_string(),
                "source range 10.0.0.0/8 of service ID 9: no service entry with SOURCE_RANGES has that ID".to_string(),
            ]
        );
    let p = converge(
        &mut state,
        &mut maps,
        &[lb(x, &[], &[("10.0.0.0", 8)])].into(),
    );
    assert_eq!(
        p.ops,
        vec![
            put_range(1, "10.0.0.0", 8),
            Op::DeleteSrcRange { key: host_bits },
            Op::DeleteSrcRange { key: orphan },
        ]
    );
    let (_, warnings) = maps.state();
    assert!(warnings.is_empty(), "{warnings:#?}");
    // Within the run, a new service gets an ID past every ID seen, including the orphan
    // range's (a stale range can never apply to it).
    let d: Desired = [
        lb(x, &[], &[("10.0.0.0", 8)]),
        lb(key("198.51.100.2", 443), &[], &[("10.0.0.0", 8)]),
    ]
    .into();
    let p = plan(&state, &d, &BTreeSet::new());
    assert_eq!(p.ops[0], put_range(10, "10.0.0.0", 8));
}

/// A writer from before the ClusterIP and source-range maps.
struct OldWriter(MemMaps);
impl MapWriter for OldWriter {
    type Error = Infallible;
    fn put_backend(&mut self, id: u32, b: &Backend4) -> Result<(), Infallible> {
        self.0.put_backend(id, b)
    }
    fn put_service(&mut self, k: &Svc4Key, v: &Svc4Value) -> Result<(), Infallible> {
        self.0.put_service(k, v)
    }
    fn delete_service(&mut self, k: &Svc4Key) -> Result<(), Infallible> {
        self.0.delete_service(k)
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), Infallible> {
        self.0.delete_backend(id)
    }
}

#[test]
fn writers_without_the_new_maps_fail_loudly() {
    let a = key("10.96.0.1", 80);
    let d: Desired = [entry(a, &[], CIP)].into();
    let mut state = MapState::new();
    let mut w = OldWriter(MemMaps::default());
    let p = plan(&state, &d, &ipset(&["10.96.0.1"]));
    let err = apply_plan(&mut state, &p, &mut w).expect_err("no put_vip");
    assert_eq!(err.index, 1);
    assert!(matches!(
        err.source.downcast_ref::<ExtWriteError<Infallible>>(),
        Some(ExtWriteError::Unsupported { op: "put_vip" })
    ));
    assert_eq!(
        err.source.to_string(),
        "this map writer does not implement put_vip; it needs the ClusterIP and source-range maps (LB4_VIP_V1, LB4_SRC_V2)"
    );
    // Service entries alone still work through it.
    let mut state = MapState::new();
    let p = plan_d(&state, &d);
    apply_plan(&mut state, &p, &mut w).expect("service entries only");
}

#[test]
fn random_scopes_ranges_and_cluster_ips_converge() {
    let mut rng = Lcg(7);
    let addrs: Vec<Ipv4Addr> = (1..=5).map(|i| Ipv4Addr::new(10, 96, 0, i)).collect();
    let pool: Vec<BackendAddr> = (1..=8).map(|i| be(&format!("10.0.0.{i}"), 8080)).collect();
    let range_pool = [
        ("10.0.0.0", 8),
        ("192.168.0.0", 16),
        ("172.16.4.0", 24),
        ("1.2.3.4", 32),
    ];
    let mut maps = MemMaps::default();
    let mut state = MapState::new();
    for _ in 0..150 {
        let mut d = Desired::new();
        let mut vips = BTreeSet::new();
        for a in &addrs {
            if rng.next(3) == 0 {
                vips.insert(*a);
            }
            if rng.next(4) == 0 {
                continue;
            }
            let k = ServiceKey::external(*a, 80, TCP);
            let backends: Vec<BackendAddr> = {
                let mut b: Vec<BackendAddr> = (0..rng.next(4))
                    .map(|_| pool[rng.next(8) as usize])
                    .collect();
                b.sort();
                b.dedup();
                b
            };
            let mut flags = svc_flags::LOAD_BALANCER;
            let mut ranges = Vec::new();
            if rng.next(2) == 0 {
                flags |= svc_flags::SOURCE_RANGES;
                for _ in 0..rng.next(3) {
                    let (n, p) = range_pool[rng.next(4) as usize];
                    ranges.push((ip(n), p));
                }
                ranges.sort();
                ranges.dedup();
            }
            if rng.next(2) == 0 {
                flags |= svc_flags::ETP_LOCAL | svc_flags::TWO_SCOPES;
                d.insert(
                    k.internal(),
                    DesiredService::new(
                        "t",
                        pool[..rng.next(3) as usize].to_vec(),
                        svc_flags::LOAD_BALANCER,
                    ),
                );
            }
            let mut ds = DesiredService::new("t", backends, flags);
            ds.source_ranges = ranges;
            if rng.next(3) == 0 {
                ds.flags |= svc_flags::AFFINITY;
                ds.affinity_timeout_s = 1 + rng.next(100) as u32;
            }
            d.insert(k, ds);
        }
        converge_with(&mut state, &mut maps, &d, &vips);
    }
}
