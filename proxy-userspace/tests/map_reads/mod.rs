//! Whole-map reads in batches (`datapath::batch`), as `/metrics` and `inspect` do them: the
//! same answers as key-by-key reads, at a bounded number of syscalls.
use std::os::fd::{AsFd as _, BorrowedFd};

use aya::maps::{HashMap, Map};
use proxy_common::{Backend4, maps};
use proxy_userspace::datapath::{
    MapSizes,
    batch::{self, BATCH, Shape},
};

use super::*;

fn fd<'a>(dp: &'a Datapath, name: &str) -> BorrowedFd<'a> {
    match dp.ebpf.map(name).expect("map") {
        Map::HashMap(m) | Map::LruHashMap(m) | Map::PerCpuArray(m) | Map::LpmTrie(m) => {
            m.fd().as_fd()
        }
        other => panic!("{name}: unexpected map type {other:?}"),
    }
}

/// A map's key and value sizes, from the layouts the agent checks pins against.
fn shape(name: &str) -> Shape {
    let l = MapSizes::default()
        .layouts()
        .into_iter()
        .find(|l| l.name == name)
        .expect("layout");
    Shape {
        key_size: l.key_size as usize,
        value_size: l.value_size as usize,
        per_cpu: false,
    }
}

#[test]
fn batched_counts_match_key_by_key_reads_in_a_bounded_number_of_syscalls() {
    let mut f = Fixture::new(&load_balancer(
        &[("10.76.1.10", "node1")],
        false,
        &["192.0.2.0/24"],
    ));
    // 10,000 extra backends (IDs past the fixture's).
    {
        let mut be: HashMap<_, u32, Backend4> =
            HashMap::try_from(f.dp.ebpf.map_mut(maps::BACKEND4).expect("map")).expect("hash");
        for id in 100_000..110_000u32 {
            be.insert(id, Backend4::default(), 0).expect("insert");
        }
    }
    let by_key = {
        let be: HashMap<_, u32, Backend4> =
            HashMap::try_from(f.dp.ebpf.map(maps::BACKEND4).expect("map")).expect("hash");
        be.keys().count() as u64
    };
    assert!(by_key > 10_000);
    let c = batch::count_entries(fd(&f.dp, maps::BACKEND4), shape(maps::BACKEND4)).expect("count");
    assert_eq!(c.entries, by_key);
    assert!(
        c.syscalls <= by_key / BATCH as u64 + 2,
        "{c:?}: one syscall per {BATCH} entries"
    );

    // An LPM trie has no batch lookups: counted key by key, still right.
    let ranges = batch::count_entries(fd(&f.dp, maps::SRC_RANGE4), shape(maps::SRC_RANGE4))
        .expect("count the trie");
    assert_eq!(
        ranges.entries,
        f.dp.lb_maps().expect("maps").read_src_ranges().len() as u64
    );
    assert!(ranges.entries > 0);

    // Per-CPU counters after some traffic: the batched sums equal aya's per-key reads.
    for port in 0..5u16 {
        f.run(
            programs::UPLINK_INGRESS,
            &packet(TCP, (EXT, 40000 + port), (LB_IP, 80), 0, false),
        );
    }
    let per_key = f.dp.counters().expect("counters");
    let (sums, cost) = batch::per_cpu_array_sums::<u64>(
        fd(&f.dp, maps::COUNTERS),
        8,
        counter::NAMES.len() as u32,
        |acc, v| *acc += u64::from_ne_bytes(v.try_into().expect("8 bytes")),
    )
    .expect("sums");
    assert_eq!(cost.syscalls, 1);
    assert_eq!(&sums[..], &per_key[..counter::NAMES.len()]);
    assert!(sums[counter::FWD_NEW as usize] >= 5, "{sums:?}");

    // Per-service counters (batched inside `service_counters`).
    let svc = f.dp.service_counters(0..16).expect("service counters");
    assert!(svc.iter().any(|(_, c)| c.packets >= 5), "{svc:?}");
}

/// The planner writes runs of entries with `BPF_MAP_UPDATE_BATCH`. When the map fills up
/// midway, the error names the first entry not written, the state records exactly the
/// entries the kernel took, and what was written is in the map.
#[test]
fn a_batched_write_that_fills_the_map_stops_at_the_first_entry_not_written() {
    require_root();
    let mut dp = Datapath::load(&LoadOptions {
        pin_dir: None,
        sizes: MapSizes {
            backends: 8,
            ..Default::default()
        },
    })
    .expect("load");
    let eps: Vec<String> = (1..=20).map(|i| format!("10.76.1.{i}")).collect();
    let eps: Vec<&str> = eps.iter().map(String::as_str).collect();
    let mut state = MapState::default();
    let p = plan_for(&state, &hostnames(&eps, "TCP"));
    let first_backend = p
        .ops
        .iter()
        .position(|op| matches!(op, plan::Op::PutBackend { .. }))
        .expect("backend writes");
    let mut maps = dp.lb_maps().expect("maps");
    let err = plan::apply_plan(&mut state, &p, &mut maps).expect_err("the backend map is full");
    assert_eq!(err.index, first_backend + 8, "{err}");
    assert_eq!(err.applied.put_backends, 8);
    assert!(matches!(err.op, plan::Op::PutBackend { .. }));
    assert_eq!(maps.read_backends().len(), 8);
    assert_eq!(state.backends().len(), 8);
}
