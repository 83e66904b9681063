//! Loading the eBPF object, pinning and adopting maps, and typed access to them.
//!
//! This is the only module that talks to the BPF syscall for maps; the planner talks to it
//! through [`crate::plan::MapWriter`].
use std::{
    io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, LpmTrie, MapData, MapError, MapInfo, MapType, PerCpuArray, lpm_trie::Key,
    },
    programs::{Program, ProgramError, SchedClassifier, TestRun as _, TestRunOptions, Xdp},
};
use proxy_common::{
    Aff4Key, Aff4Value, Backend4, Ct4Key, Ct4Value, NodeConfig, SrcRange4Data, SrcRange4Key,
    Svc4Key, Svc4Value, SvcCounter, VipValue, counter, maps, sizes,
};

/// The eBPF object built by `build.rs` (aya-build, with BTF).
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "pinned map {path} has a different layout (type {found_type}, key {found_key} B, value \
         {found_value} B, {found_max} entries; this agent needs {want_type}, key {want_key} B, \
         value {want_value} B, {want_max} entries). It was left by another version of \
         ebpf-proxy; run `ebpf-proxy cleanup --bpffs ...` (drops its connection state) or \
         remove the pin, then start again"
    )]
    PinLayoutMismatch {
        path: PathBuf,
        found_type: String,
        found_key: u32,
        found_value: u32,
        found_max: u32,
        want_type: String,
        want_key: u32,
        want_value: u32,
        want_max: u32,
    },
    #[error(
        "pinned map {path} has {found} entries but this agent was asked for {want} ({flag}). \
         A pinned map cannot be resized in place: start the agent with {flag}={found} to keep \
         it, or stop the agent and run `ebpf-proxy cleanup --bpffs ...` (drops connection \
         state; Service traffic is not translated until the agent runs again) to recreate it"
    )]
    PinSizeMismatch {
        path: PathBuf,
        flag: &'static str,
        found: u32,
        want: u32,
    },
    #[error("cannot read pinned map {path}: {source}")]
    PinUnreadable { path: PathBuf, source: MapError },
    #[error("cannot create pin directory {path}: {source}")]
    PinDir { path: PathBuf, source: io::Error },
    #[error(
        "loading the eBPF programs failed: {0}. The agent needs root (CAP_BPF, CAP_NET_ADMIN) \
         and a kernel with BTF"
    )]
    Load(#[from] aya::EbpfError),
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("loading program {name} into the kernel: {source}")]
    ProgramLoad { name: String, source: ProgramError },
}

/// The expected layout of each map, checked before a pin is reused (aya does not check).
pub struct MapLayout {
    pub name: &'static str,
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    /// The agent flag that sets `max_entries`, if one does.
    pub flag: Option<&'static str>,
}

/// Map sizes, overridable at load time (agent flags; the defaults are `proxy_common::sizes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// `--service-map-entries`: service entries plus one per backend slot (`LB4_SVC_V2`).
    pub services: u32,
    /// `--max-backends` (`LB4_BE_V1`).
    pub backends: u32,
    /// `--conntrack-max` (`CT4_V2`, two entries per flow).
    pub conntrack: u32,
    /// `--max-services`: service IDs, i.e. service entries (one per address, port and
    /// protocol), and the per-service counter map indexed by them (`LB4_SCNT_V1`).
    pub svc_ids: u32,
    /// `--max-cluster-ips` (`LB4_VIP_V1`).
    pub vips: u32,
    /// `--max-source-ranges` (`LB4_SRC_V2`).
    pub src_ranges: u32,
    /// `--affinity-max` (`LB4_AFF_V2`, one per client and service with ClientIP affinity).
    pub affinity: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: sizes::SVC4,
            backends: sizes::BACKEND4,
            conntrack: sizes::CT4,
            svc_ids: sizes::SVC_IDS,
            vips: sizes::VIP4,
            src_ranges: sizes::SRC_RANGE4,
            affinity: sizes::AFFINITY4,
        }
    }
}

/// The map-size flags of `ebpf-proxy run` (defaults: `proxy_common::sizes`). Maps are sized
/// at load; a pinned map of another size is refused with a message naming the flag.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct MapSizeArgs {
    /// Maximum number of service entries, i.e. service ports on each address (ClusterIP,
    /// NodePort on each node address, LoadBalancer IP, externalIP): each gets a service ID
    /// and a per-service packet counter (LB4_SCNT_V1).
    #[arg(long, value_name = "N", default_value_t = sizes::SVC_IDS - 1)]
    pub max_services: u32,
    /// Size of the service map (LB4_SVC_V2): one entry per service entry plus one per
    /// endpoint of it, e.g. 100000 services x (1 + 10 endpoints) = 1100000.
    #[arg(long, value_name = "N", default_value_t = sizes::SVC4)]
    pub service_map_entries: u32,
    /// Maximum number of distinct endpoints (address, port, protocol) (LB4_BE_V1).
    #[arg(long, value_name = "N", default_value_t = sizes::BACKEND4)]
    pub max_backends: u32,
    /// Maximum number of connection-tracking entries for the whole node, two per connection
    /// (CT4_V2, LRU: the least recently used are evicted when full). Unlike kube-proxy's
    /// --conntrack-max-per-core this is ebpf-proxy's own table, not netfilter's.
    #[arg(long, value_name = "N", default_value_t = sizes::CT4)]
    pub conntrack_max: u32,
    /// Maximum number of ClusterIPs (LB4_VIP_V1).
    #[arg(long, value_name = "N", default_value_t = sizes::VIP4)]
    pub max_cluster_ips: u32,
    /// Maximum number of loadBalancerSourceRanges entries, one per range and LoadBalancer
    /// IP/port (LB4_SRC_V2).
    #[arg(long, value_name = "N", default_value_t = sizes::SRC_RANGE4)]
    pub max_source_ranges: u32,
    /// Maximum number of sessionAffinity ClientIP entries, one per client and service (LRU)
    /// (LB4_AFF_V2).
    #[arg(long, value_name = "N", default_value_t = sizes::AFFINITY4)]
    pub affinity_max: u32,
}

impl MapSizeArgs {
    pub fn sizes(&self) -> Result<MapSizes, String> {
        let s = MapSizes {
            services: self.service_map_entries,
            backends: self.max_backends,
            conntrack: self.conntrack_max,
            // ID 0 is reserved: N services need N + 1 counter slots.
            svc_ids: self.max_services.saturating_add(1),
            vips: self.max_cluster_ips,
            src_ranges: self.max_source_ranges,
            affinity: self.affinity_max,
        };
        for (flag, v) in [
            ("--max-services", self.max_services),
            ("--service-map-entries", s.services),
            ("--max-backends", s.backends),
            ("--conntrack-max", s.conntrack),
            ("--max-cluster-ips", s.vips),
            ("--max-source-ranges", s.src_ranges),
            ("--affinity-max", s.affinity),
        ] {
            if v == 0 {
                return Err(format!("{flag} must be at least 1"));
            }
        }
        Ok(s)
    }
}

impl MapSizes {
    /// What the service-side maps can hold (service ID 0 is reserved).
    pub fn capacity(&self) -> crate::plan::Capacity {
        crate::plan::Capacity {
            service_entries: self.services as usize,
            backends: self.backends as usize,
            service_ids: self.svc_ids.saturating_sub(1) as usize,
            cluster_ips: self.vips as usize,
            source_ranges: self.src_ranges as usize,
        }
    }

    pub fn layouts(&self) -> Vec<MapLayout> {
        use core::mem::size_of;
        vec![
            MapLayout {
                name: maps::SVC4,
                map_type: MapType::Hash,
                key_size: size_of::<Svc4Key>() as u32,
                value_size: size_of::<Svc4Value>() as u32,
                max_entries: self.services,
                flag: Some("--service-map-entries"),
            },
            MapLayout {
                name: maps::BACKEND4,
                map_type: MapType::Hash,
                key_size: 4,
                value_size: size_of::<Backend4>() as u32,
                max_entries: self.backends,
                flag: Some("--max-backends"),
            },
            MapLayout {
                name: maps::CT4,
                map_type: MapType::LruHash,
                key_size: size_of::<Ct4Key>() as u32,
                value_size: size_of::<Ct4Value>() as u32,
                max_entries: self.conntrack,
                flag: Some("--conntrack-max"),
            },
            MapLayout {
                name: maps::COUNTERS,
                map_type: MapType::PerCpuArray,
                key_size: 4,
                value_size: 8,
                max_entries: counter::MAX,
                flag: None,
            },
            MapLayout {
                name: maps::CONFIG,
                map_type: MapType::Array,
                key_size: 4,
                value_size: size_of::<NodeConfig>() as u32,
                max_entries: 1,
                flag: None,
            },
            MapLayout {
                name: maps::VIP4,
                map_type: MapType::Hash,
                key_size: 4,
                value_size: size_of::<VipValue>() as u32,
                max_entries: self.vips,
                flag: Some("--max-cluster-ips"),
            },
            MapLayout {
                name: maps::SRC_RANGE4,
                map_type: MapType::LpmTrie,
                key_size: size_of::<SrcRange4Key>() as u32,
                value_size: 1,
                max_entries: self.src_ranges,
                flag: Some("--max-source-ranges"),
            },
            MapLayout {
                name: maps::AFFINITY4,
                map_type: MapType::LruHash,
                key_size: size_of::<Aff4Key>() as u32,
                value_size: size_of::<Aff4Value>() as u32,
                max_entries: self.affinity,
                flag: Some("--affinity-max"),
            },
            // Socket-level balancing (host processes): pinned so a restart keeps showing
            // existing sockets the service address (recvmsg/getpeername).
            MapLayout {
                name: maps::SOCK_REV4,
                map_type: MapType::LruHash,
                key_size: size_of::<proxy_common::SockKey4>() as u32,
                value_size: size_of::<proxy_common::SockXlate4>() as u32,
                max_entries: proxy_common::sock::MAP_ENTRIES,
                flag: None,
            },
            MapLayout {
                name: maps::SOCK_FWD4,
                map_type: MapType::LruHash,
                key_size: size_of::<proxy_common::SockKey4>() as u32,
                value_size: size_of::<proxy_common::SockXlate4>() as u32,
                max_entries: proxy_common::sock::MAP_ENTRIES,
                flag: None,
            },
            MapLayout {
                name: maps::SVC_COUNTERS,
                map_type: MapType::PerCpuArray,
                key_size: 4,
                value_size: size_of::<SvcCounter>() as u32,
                max_entries: self.svc_ids,
                flag: Some("--max-services"),
            },
        ]
    }
}

/// Checks an existing pin against the layout this agent needs. `Ok(false)` if no pin exists.
fn check_pin(path: &Path, want: &MapLayout) -> Result<bool, DatapathError> {
    if !path.exists() {
        return Ok(false);
    }
    let info = MapInfo::from_pin(path).map_err(|source| DatapathError::PinUnreadable {
        path: path.to_owned(),
        source,
    })?;
    let found_type = info
        .map_type()
        .map(|t| format!("{t:?}"))
        .unwrap_or_else(|_| "unknown".into());
    let want_type = format!("{:?}", want.map_type);
    let same_shape = found_type == want_type
        && info.key_size() == want.key_size
        && info.value_size() == want.value_size;
    if same_shape
        && info.max_entries() != want.max_entries
        && let Some(flag) = want.flag
    {
        return Err(DatapathError::PinSizeMismatch {
            path: path.to_owned(),
            flag,
            found: info.max_entries(),
            want: want.max_entries,
        });
    }
    if !same_shape || info.max_entries() != want.max_entries {
        return Err(DatapathError::PinLayoutMismatch {
            path: path.to_owned(),
            found_type,
            found_key: info.key_size(),
            found_value: info.value_size(),
            found_max: info.max_entries(),
            want_type,
            want_key: want.key_size,
            want_value: want.value_size,
            want_max: want.max_entries,
        });
    }
    Ok(true)
}

/// Where and how to load.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Pin maps here (reusing existing, checked pins). `None` = private, unpinned maps (tests,
    /// `trace`).
    pub pin_dir: Option<PathBuf>,
    pub sizes: MapSizes,
}

/// The loaded programs and their maps.
pub struct Datapath {
    pub ebpf: Ebpf,
    /// Names of the maps that were adopted from existing pins (a restart).
    pub adopted: Vec<&'static str>,
}

impl Datapath {
    pub fn load(opts: &LoadOptions) -> Result<Self, DatapathError> {
        let mut loader = EbpfLoader::new();
        let mut adopted = Vec::new();
        let mut pin_paths = Vec::new();
        for l in opts.sizes.layouts() {
            loader.map_max_entries(l.name, l.max_entries);
            if let Some(dir) = &opts.pin_dir {
                let path = dir.join(l.name);
                if check_pin(&path, &l)? {
                    adopted.push(l.name);
                }
                pin_paths.push((l.name, path));
            }
        }
        if let Some(dir) = &opts.pin_dir {
            std::fs::create_dir_all(dir).map_err(|source| DatapathError::PinDir {
                path: dir.clone(),
                source,
            })?;
        }
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        // Load every program in the object; attaching is up to the caller.
        let names: Vec<String> = ebpf.programs().map(|(n, _)| n.to_owned()).collect();
        for name in names {
            let Some(prog) = ebpf.program_mut(&name) else {
                continue;
            };
            let r = match prog {
                Program::SchedClassifier(p) => p.load(),
                Program::Xdp(p) => p.load(),
                Program::CgroupSockAddr(p) => p.load(),
                _ => continue,
            };
            r.map_err(|source| DatapathError::ProgramLoad {
                name: name.clone(),
                source,
            })?;
        }
        Ok(Self { ebpf, adopted })
    }

    /// A program of the object as its aya type (`SchedClassifier`, `Xdp`, ...).
    fn typed<'a, P>(&'a self, name: &'static str) -> Result<&'a P, DatapathError>
    where
        &'a P: TryFrom<&'a Program, Error = ProgramError>,
    {
        self.ebpf
            .program(name)
            .ok_or(DatapathError::MissingProgram(name))?
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })
    }

    fn typed_mut<'a, P>(&'a mut self, name: &'static str) -> Result<&'a mut P, DatapathError>
    where
        &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
    {
        self.ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram(name))?
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })
    }

    /// A tc program of the object.
    pub fn program(&self, name: &'static str) -> Result<&SchedClassifier, DatapathError> {
        self.typed(name)
    }

    pub fn program_mut(
        &mut self,
        name: &'static str,
    ) -> Result<&mut SchedClassifier, DatapathError> {
        self.typed_mut(name)
    }

    /// An XDP program of the object (the uplink fast path).
    pub fn xdp_program(&self, name: &'static str) -> Result<&Xdp, DatapathError> {
        self.typed(name)
    }

    pub fn xdp_program_mut(&mut self, name: &'static str) -> Result<&mut Xdp, DatapathError> {
        self.typed_mut(name)
    }

    /// Typed handles on the service and backend maps (for the writer and for restore).
    pub fn lb_maps(&mut self) -> Result<LbMaps<'_>, DatapathError> {
        let [svc, be, vip, src, cnt] = self.ebpf.maps_disjoint_mut([
            maps::SVC4,
            maps::BACKEND4,
            maps::VIP4,
            maps::SRC_RANGE4,
            maps::SVC_COUNTERS,
        ]);
        let svc = svc.ok_or(DatapathError::MissingMap(maps::SVC4))?;
        let be = be.ok_or(DatapathError::MissingMap(maps::BACKEND4))?;
        let vip = vip.ok_or(DatapathError::MissingMap(maps::VIP4))?;
        let src = src.ok_or(DatapathError::MissingMap(maps::SRC_RANGE4))?;
        let cnt = cnt.ok_or(DatapathError::MissingMap(maps::SVC_COUNTERS))?;
        Ok(LbMaps {
            svc_counters: PerCpuArray::try_from(cnt).map_err(|source| DatapathError::Map {
                name: maps::SVC_COUNTERS,
                source,
            })?,
            vips: HashMap::try_from(vip).map_err(|source| DatapathError::Map {
                name: maps::VIP4,
                source,
            })?,
            src_ranges: LpmTrie::try_from(src).map_err(|source| DatapathError::Map {
                name: maps::SRC_RANGE4,
                source,
            })?,
            services: HashMap::try_from(svc).map_err(|source| DatapathError::Map {
                name: maps::SVC4,
                source,
            })?,
            backends: HashMap::try_from(be).map_err(|source| DatapathError::Map {
                name: maps::BACKEND4,
                source,
            })?,
        })
    }

    pub fn set_config(&mut self, cfg: &NodeConfig) -> Result<(), DatapathError> {
        let name = maps::CONFIG;
        let m = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap(name))?;
        let mut a: Array<&mut MapData, NodeConfig> =
            Array::try_from(m).map_err(|source| DatapathError::Map { name, source })?;
        a.set(0, cfg, 0)
            .map_err(|source| DatapathError::Map { name, source })
    }

    /// Verdict counters summed over CPUs, indexed by `proxy_common::counter`.
    pub fn counters(&self) -> Result<Vec<u64>, DatapathError> {
        let name = maps::COUNTERS;
        let m = self.ebpf.map(name).ok_or(DatapathError::MissingMap(name))?;
        let a: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(m).map_err(|source| DatapathError::Map { name, source })?;
        (0..counter::MAX)
            .map(|i| {
                a.get(&i, 0)
                    .map(|v| v.iter().sum())
                    .map_err(|source| DatapathError::Map { name, source })
            })
            .collect()
    }

    /// Per-service packet counters of `ids`, summed over CPUs (IDs past the map are skipped).
    pub fn service_counters(
        &self,
        ids: impl IntoIterator<Item = u32>,
    ) -> Result<Vec<(u32, SvcCounter)>, DatapathError> {
        let name = maps::SVC_COUNTERS;
        let m = self.ebpf.map(name).ok_or(DatapathError::MissingMap(name))?;
        let a: PerCpuArray<&MapData, SvcCounter> =
            PerCpuArray::try_from(m).map_err(|source| DatapathError::Map { name, source })?;
        read_service_counters(&a, ids).map_err(|source| DatapathError::Map { name, source })
    }

    /// Number of conntrack entries (both directions count).
    pub fn conntrack(&self) -> Result<Vec<(Ct4Key, Ct4Value)>, DatapathError> {
        let name = maps::CT4;
        let m = self.ebpf.map(name).ok_or(DatapathError::MissingMap(name))?;
        let h: HashMap<&MapData, Ct4Key, Ct4Value> =
            HashMap::try_from(m).map_err(|source| DatapathError::Map { name, source })?;
        Ok(h.iter().filter_map(Result::ok).collect())
    }
}

/// Sums the per-CPU counters of each ID in `ids` that the map holds.
/// One BPF_PROG_TEST_RUN of an XDP program, split the way the kernel hands the packet on:
/// the metadata in front (what tc sees between `data_meta` and `data`) and the frame.
#[derive(Debug, Clone)]
pub struct XdpTestRun {
    pub verdict: u32,
    pub frame: Vec<u8>,
    pub meta: Vec<u8>,
    /// The kernel's per-run time (averaged over `repeat`).
    pub duration: std::time::Duration,
}

impl XdpTestRun {
    /// `lb_up_xdp` translated the packet and marked it for tc (`XDP_META_TRANSLATED`).
    pub fn translated(&self) -> bool {
        self.meta == proxy_common::XDP_META_TRANSLATED.to_ne_bytes()
    }
}

/// Runs `prog` on `pkt` (`repeat` times) with an `xdp_md` context in and out, so the metadata
/// the program adds can be told apart from the frame.
pub fn xdp_test_run(prog: &Xdp, pkt: &[u8], repeat: u32) -> Result<XdpTestRun, ProgramError> {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex (u32 each). In: the frame with no metadata. Out: offsets from data_meta.
    let len = u32::try_from(pkt.len()).unwrap_or(u32::MAX);
    let mut ctx_in = [0u8; 24];
    ctx_in[4..8].copy_from_slice(&len.to_ne_bytes());
    let mut ctx_out = [0u8; 24];
    let mut out = vec![0u8; pkt.len() + 256];
    let r = prog.test_run(TestRunOptions {
        data_in: Some(pkt),
        data_out: Some(&mut out),
        ctx_in: Some(&ctx_in),
        ctx_out: Some(&mut ctx_out),
        repeat: repeat.max(1),
        ..Default::default()
    })?;
    out.truncate(r.data_size_out as usize);
    let meta_len = u32::from_ne_bytes([ctx_out[0], ctx_out[1], ctx_out[2], ctx_out[3]]) as usize;
    let frame = out.split_off(meta_len.min(out.len()));
    Ok(XdpTestRun {
        verdict: r.return_value,
        frame,
        meta: out,
        duration: r.duration,
    })
}

pub fn read_service_counters<T: std::borrow::Borrow<MapData>>(
    a: &PerCpuArray<T, SvcCounter>,
    ids: impl IntoIterator<Item = u32>,
) -> Result<Vec<(u32, SvcCounter)>, MapError> {
    let max = a.len();
    let mut out = Vec::new();
    for id in ids.into_iter().filter(|id| *id < max) {
        let v = a.get(&id, 0)?;
        let sum = v.iter().fold(SvcCounter::default(), |acc, c| SvcCounter {
            packets: acc.packets + c.packets,
            bytes: acc.bytes + c.bytes,
        });
        out.push((id, sum));
    }
    Ok(out)
}

/// Per-service counters of the maps pinned under `pin_dir` (metrics, `inspect`).
pub fn pinned_service_counters(
    pin_dir: &Path,
    ids: impl IntoIterator<Item = u32>,
) -> Result<Vec<(u32, SvcCounter)>, MapError> {
    let m = MapData::from_pin(pin_dir.join(maps::SVC_COUNTERS))?;
    let a: PerCpuArray<MapData, SvcCounter> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(m))?;
    read_service_counters(&a, ids)
}

/// Pins of map versions this agent no longer uses (`proxy_common::maps::RETIRED`) found under
/// `pin_dir`. Their layout differs (16-bit service IDs), so they are never adopted: the agent
/// reports them and removes them once its own programs are attached ([`remove_pins`]), and
/// `ebpf-proxy cleanup` removes them too.
pub fn retired_pins(pin_dir: &Path) -> Vec<PathBuf> {
    maps::RETIRED
        .iter()
        .map(|n| pin_dir.join(n))
        .filter(|p| p.exists())
        .collect()
}

/// Removes map pins (the maps are freed once no program uses them). Returns how many were
/// removed; a pin already gone is not an error.
pub fn remove_pins(pins: &[PathBuf]) -> io::Result<usize> {
    let mut n = 0;
    for p in pins {
        match std::fs::remove_file(p) {
            Ok(()) => n += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Typed service and backend maps.
pub struct LbMaps<'a> {
    /// Per-service packet counters (zeroed when a service ID is allocated).
    pub svc_counters: PerCpuArray<&'a mut MapData, SvcCounter>,
    pub services: HashMap<&'a mut MapData, Svc4Key, Svc4Value>,
    pub backends: HashMap<&'a mut MapData, u32, Backend4>,
    pub vips: HashMap<&'a mut MapData, u32, VipValue>,
    pub src_ranges: LpmTrie<&'a mut MapData, SrcRange4Data, u8>,
}

impl LbMaps<'_> {
    pub fn read_services(&self) -> Vec<(Svc4Key, Svc4Value)> {
        self.services.iter().filter_map(Result::ok).collect()
    }
    pub fn read_backends(&self) -> Vec<(u32, Backend4)> {
        self.backends.iter().filter_map(Result::ok).collect()
    }
    pub fn read_vips(&self) -> Vec<(u32, VipValue)> {
        self.vips.iter().filter_map(Result::ok).collect()
    }
    pub fn read_src_ranges(&self) -> Vec<SrcRange4Key> {
        self.src_ranges
            .iter()
            .filter_map(Result::ok)
            .map(|(k, _)| {
                let d = k.data();
                SrcRange4Key {
                    prefixlen: k.prefix_len(),
                    svc_id_be: d.svc_id_be,
                    addr_be: d.addr_be,
                }
            })
            .collect()
    }
}

fn is_enoent(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{op} in map {map}: {source}")]
pub struct WriteError {
    pub op: &'static str,
    pub map: &'static str,
    pub source: MapError,
}

use crate::plan::ExtWriteError;

impl crate::plan::MapWriter for LbMaps<'_> {
    type Error = WriteError;
    fn put_backend(&mut self, id: u32, b: &Backend4) -> Result<(), WriteError> {
        self.backends.insert(id, b, 0).map_err(|source| WriteError {
            op: "insert",
            map: maps::BACKEND4,
            source,
        })
    }
    fn put_service(&mut self, k: &Svc4Key, v: &Svc4Value) -> Result<(), WriteError> {
        self.services.insert(k, v, 0).map_err(|source| WriteError {
            op: "insert",
            map: maps::SVC4,
            source,
        })
    }
    fn delete_service(&mut self, k: &Svc4Key) -> Result<(), WriteError> {
        match self.services.remove(k) {
            Err(e) if !is_enoent(&e) => Err(WriteError {
                op: "delete",
                map: maps::SVC4,
                source: e,
            }),
            _ => Ok(()),
        }
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), WriteError> {
        match self.backends.remove(&id) {
            Err(e) if !is_enoent(&e) => Err(WriteError {
                op: "delete",
                map: maps::BACKEND4,
                source: e,
            }),
            _ => Ok(()),
        }
    }
    fn put_vip(&mut self, addr_be: u32, v: &VipValue) -> Result<(), ExtWriteError<WriteError>> {
        self.vips.insert(addr_be, v, 0).map_err(|source| {
            WriteError {
                op: "insert",
                map: maps::VIP4,
                source,
            }
            .into()
        })
    }
    fn delete_vip(&mut self, addr_be: u32) -> Result<(), ExtWriteError<WriteError>> {
        match self.vips.remove(&addr_be) {
            Err(e) if !is_enoent(&e) => Err(WriteError {
                op: "delete",
                map: maps::VIP4,
                source: e,
            }
            .into()),
            _ => Ok(()),
        }
    }
    fn put_src_range(&mut self, k: &SrcRange4Key) -> Result<(), ExtWriteError<WriteError>> {
        self.src_ranges
            .insert(&Key::new(k.prefixlen, k.data()), 1, 0)
            .map_err(|source| {
                WriteError {
                    op: "insert",
                    map: maps::SRC_RANGE4,
                    source,
                }
                .into()
            })
    }
    fn reset_service_counter(&mut self, svc_id: u32) -> Result<(), ExtWriteError<WriteError>> {
        if svc_id >= self.svc_counters.len() {
            return Ok(());
        }
        let err = |source| WriteError {
            op: "reset",
            map: maps::SVC_COUNTERS,
            source,
        };
        let sys = |call, io_error| {
            err(MapError::SyscallError(aya::sys::SyscallError {
                call,
                io_error,
            }))
        };
        let ncpus = aya::util::nr_cpus().map_err(|(call, e)| sys(call, e))?;
        let zero = aya::maps::PerCpuValues::try_from(vec![SvcCounter::default(); ncpus])
            .map_err(|e| sys("nr_cpus", e))?;
        self.svc_counters
            .set(svc_id, zero, 0)
            .map_err(|e| err(e).into())
    }
    fn delete_src_range(&mut self, k: &SrcRange4Key) -> Result<(), ExtWriteError<WriteError>> {
        match self.src_ranges.remove(&Key::new(k.prefixlen, k.data())) {
            Err(e) if !is_enoent(&e) => Err(WriteError {
                op: "delete",
                map: maps::SRC_RANGE4,
                source: e,
            }
            .into()),
            _ => Ok(()),
        }
    }
}
