//! Everything that touches the kernel: loading the eBPF object, pinning and adopting maps
//! (this file), map layouts and sizes, typed map access, and attaching programs (pod ports,
//! uplinks, socket hooks) through netlink, bpffs and raw bpf(2) where aya has no API.
//!
//! This is the only room that talks to the BPF syscall for maps; the planner talks to it
//! through [`crate::plan::MapWriter`], which [`service_maps::LbMaps`] implements.
pub mod attach;
pub mod batch;
pub mod bpffs;
pub mod conntrack;
pub mod debuglog;
pub mod features;
pub mod layout;
pub mod links;
pub mod netlink;
pub mod pods;
pub mod service_maps;
pub mod sockhooks;
pub mod sys;
pub mod tcfilter;
pub mod uplinks;

// The load options name these, and the tests, the bench and `trace` use them with `Datapath`.
use layout::check_pin;
pub use layout::{MapLayout, MapSizeArgs, MapSizes, remove_pins, retired_pins};
pub use service_maps::{LbMaps, WriteError, pinned_service_counters, read_service_counters};
use std::{
    io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray},
    programs::{Program, ProgramError, SchedClassifier, TestRun as _, TestRunOptions, Xdp},
};
use proxy_common::{NodeConfig, SvcCounter, counter, maps};

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
    /// An earlier release's conntrack table is bound to `maps::CT4_PREVIOUS` (an upgrade):
    /// the config says so to the programs until [`Datapath::end_previous_ct`].
    previous_ct: bool,
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
        // An upgrade: our programs read the earlier release's table on a miss until it is
        // retired (a pin that exists is opened, never replaced).
        let previous = opts
            .pin_dir
            .as_deref()
            .and_then(|d| migrate_pins(d).into_iter().next());
        if let Some(p) = &previous {
            loader.map_pin_path(maps::CT4_PREVIOUS, p.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        // Load every program in the object; attaching is up to the caller. Each load is a
        // verification of its own (most of an agent's start: ~1 s for the four large
        // programs), and the kernel verifies privileged loads in parallel: one thread each.
        let results: Vec<(String, Result<(), ProgramError>, Duration)> = std::thread::scope(|s| {
            let handles: Vec<_> = ebpf
                .programs_mut()
                .map(|(name, prog)| {
                    let name = name.to_owned();
                    s.spawn(move || {
                        let t = Instant::now();
                        let r = match prog {
                            Program::SchedClassifier(p) => p.load(),
                            Program::Xdp(p) => p.load(),
                            Program::CgroupSockAddr(p) => p.load(),
                            _ => Ok(()),
                        };
                        let socket = matches!(prog, Program::CgroupSockAddr(_));
                        (name, socket, r, t.elapsed())
                    })
                })
                .collect();
            handles
                .into_iter()
                .filter_map(|h| h.join().ok())
                .filter_map(|(name, socket, r, took)| match r {
                    // The socket programs need newer helpers (bpf_set_retval: 5.18) than the
                    // tc ones: without them the agent still runs with --socket-lb=off, and
                    // attaching them (any other --socket-lb) fails with the load error.
                    Err(e) if socket => {
                        log::warn!(
                            "socket program {name} did not load ({e}): socket-level balancing \
                             is unavailable on this kernel, run with --socket-lb=off \
                             (docs/kernels.md)"
                        );
                        None
                    }
                    r => Some((name, r, took)),
                })
                .collect()
        });
        for (name, r, took) in results {
            log::debug!("program {name} loaded and verified in {took:?}");
            r.map_err(|source| DatapathError::ProgramLoad { name, source })?;
        }
        let mut dp = Self {
            ebpf,
            adopted,
            previous_ct: previous.is_some(),
        };
        if dp.previous_ct {
            // Before any program of ours is attached.
            dp.set_config(&dp.config().unwrap_or_default())?;
        }
        Ok(dp)
    }

    /// Whether our programs read an earlier release's conntrack table on a miss (an upgrade
    /// under way).
    pub fn reads_previous_ct(&self) -> bool {
        self.previous_ct
    }

    /// The upgrade is over (every link runs our programs, the table was copied a last time):
    /// the programs stop reading the earlier release's table.
    pub fn end_previous_ct(&mut self) -> Result<(), DatapathError> {
        self.previous_ct = false;
        self.set_config(&self.config()?)
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

    /// Writes the node config. The debug switch is the operator's (`ebpf-proxy debug`):
    /// whatever the map holds is kept.
    pub fn set_config(&mut self, cfg: &NodeConfig) -> Result<(), DatapathError> {
        let mut cfg = debuglog::keep_switch(cfg, self.config().ok().as_ref());
        cfg.flags &= !proxy_common::cfg_flags::CT_PREVIOUS;
        if self.previous_ct {
            cfg.flags |= proxy_common::cfg_flags::CT_PREVIOUS;
        }
        self.write_config(&cfg)
    }

    /// Makes `maps::POD_NETNS` hold exactly `entries` (ifindex, namespace ID).
    pub fn set_pod_netns(&mut self, entries: &[(u32, i32)]) -> Result<(), DatapathError> {
        self.replace_hash(maps::POD_NETNS, entries)
    }

    /// Makes `maps::BROADCAST4` hold exactly these addresses.
    pub fn set_broadcasts(&mut self, addrs: &[Ipv4Addr]) -> Result<(), DatapathError> {
        let entries: Vec<(u32, u8)> = addrs.iter().map(|a| (crate::abi::addr_be(*a), 1)).collect();
        self.replace_hash(maps::BROADCAST4, &entries)
    }

    /// Makes the hash map `name` hold exactly `entries`: stale keys removed, the rest written.
    fn replace_hash<K, V>(
        &mut self,
        name: &'static str,
        entries: &[(K, V)],
    ) -> Result<(), DatapathError>
    where
        K: aya::Pod + PartialEq,
        V: aya::Pod,
    {
        let m = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap(name))?;
        let mut h: HashMap<&mut MapData, K, V> =
            HashMap::try_from(m).map_err(|source| DatapathError::Map { name, source })?;
        let stale: Vec<K> = h
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !entries.iter().any(|(e, _)| e == k))
            .collect();
        for k in stale {
            let _ = h.remove(&k);
        }
        for (k, v) in entries {
            h.insert(k, v, 0)
                .map_err(|source| DatapathError::Map { name, source })?;
        }
        Ok(())
    }

    /// Turns datapath debug logging on or off (`cfg_flags::DATAPATH_DEBUG`).
    pub fn set_datapath_debug(&mut self, on: bool) -> Result<(), DatapathError> {
        let cfg = debuglog::with_switch(&self.config()?, on);
        self.write_config(&cfg)
    }

    fn write_config(&mut self, cfg: &NodeConfig) -> Result<(), DatapathError> {
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

    /// The outer-source CIDRs IPIP/GUE decapsulation accepts (`maps::DECAP_SRC4`), as pinned.
    pub fn decap_sources(&self) -> Result<Vec<ipnet::Ipv4Net>, DatapathError> {
        let name = maps::DECAP_SRC4;
        let m = self.ebpf.map(name).ok_or(DatapathError::MissingMap(name))?;
        let t: LpmTrie<&MapData, u32, u8> =
            LpmTrie::try_from(m).map_err(|source| DatapathError::Map { name, source })?;
        Ok(t.keys()
            .filter_map(Result::ok)
            .filter_map(|k| {
                let addr = crate::abi::addr_from_be(k.data());
                ipnet::Ipv4Net::new(addr, u8::try_from(k.prefix_len()).ok()?).ok()
            })
            .collect())
    }

    /// Adds (`allow`) or removes one outer-source CIDR of decapsulation. Removing a missing
    /// one is not an error.
    pub fn set_decap_source(
        &mut self,
        net: ipnet::Ipv4Net,
        allow: bool,
    ) -> Result<(), DatapathError> {
        let name = maps::DECAP_SRC4;
        let m = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap(name))?;
        let mut t: LpmTrie<&mut MapData, u32, u8> =
            LpmTrie::try_from(m).map_err(|source| DatapathError::Map { name, source })?;
        let key = aya::maps::lpm_trie::Key::new(
            u32::from(net.prefix_len()),
            crate::abi::addr_be(net.network()),
        );
        let r = if allow {
            t.insert(&key, 1, 0)
        } else {
            t.remove(&key)
        };
        match r {
            Err(MapError::KeyNotFound) if !allow => Ok(()),
            Err(MapError::SyscallError(e))
                if !allow && e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            r => r.map_err(|source| DatapathError::Map { name, source }),
        }
    }

    /// The node config the programs read (the pinned one on a restart, before it is set).
    pub fn config(&self) -> Result<NodeConfig, DatapathError> {
        let name = maps::CONFIG;
        let m = self.ebpf.map(name).ok_or(DatapathError::MissingMap(name))?;
        let a: Array<&MapData, NodeConfig> =
            Array::try_from(m).map_err(|source| DatapathError::Map { name, source })?;
        a.get(&0, 0)
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
        let m = match self.ebpf.map(name) {
            Some(aya::maps::Map::PerCpuArray(m)) => m,
            _ => return Err(DatapathError::MissingMap(name)),
        };
        read_service_counters(m, ids).map_err(|source| DatapathError::Map { name, source })
    }

    /// Both conntrack tables (answered and unanswered flows) of the loaded object.
    pub fn ct_tables(&mut self) -> Result<conntrack::CtTables<&mut MapData>, DatapathError> {
        let [a, n] = self.ebpf.maps_disjoint_mut([maps::CT4, maps::CT4_NEW]);
        fn table<'a>(
            m: Option<&'a mut aya::maps::Map>,
            name: &'static str,
        ) -> Result<conntrack::CtTable<&'a mut MapData>, DatapathError> {
            let m = m.ok_or(DatapathError::MissingMap(name))?;
            conntrack::CtTable::from_map(m).map_err(|source| DatapathError::Map { name, source })
        }
        Ok(conntrack::CtTables {
            answered: table(a, maps::CT4)?,
            new: table(n, maps::CT4_NEW)?,
        })
    }

    /// The size of each conntrack table (`--conntrack-max`).
    pub fn ct_capacity(&self) -> u32 {
        self.ebpf
            .map(maps::CT4)
            .and_then(|m| match m {
                aya::maps::Map::HashMap(md) => md.info().ok().map(|i| i.max_entries()),
                _ => None,
            })
            .unwrap_or(0)
    }

    /// Every conntrack entry (both directions of each flow, both tables).
    pub fn conntrack(&mut self) -> Result<Vec<conntrack::CtEntry>, DatapathError> {
        Ok(self.ct_tables()?.entries())
    }

    /// Carries an earlier release's conntrack table (`maps::CT4_MIGRATE`) pinned under
    /// `pin_dir` over into this one. Run before this agent's programs replace the old ones and
    /// again after, so flows the old programs created meanwhile come along too; then
    /// [`retire_migrated`] removes the old pin. `None`: no old table.
    pub fn migrate_conntrack(
        &mut self,
        pin_dir: &Path,
    ) -> Result<Option<conntrack::Migrated>, DatapathError> {
        let Some(path) = migrate_pins(pin_dir).into_iter().next() else {
            return Ok(None);
        };
        let old =
            conntrack::CtTable::from_pin(&path).map_err(|source| DatapathError::PinUnreadable {
                path: path.clone(),
                source,
            })?;
        Ok(Some(conntrack::migrate(&old, &mut self.ct_tables()?)))
    }
}

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

/// Pins of earlier releases' conntrack tables under `pin_dir` (`maps::CT4_MIGRATE`) whose
/// layout this agent can read (same key and value sizes).
pub fn migrate_pins(pin_dir: &Path) -> Vec<PathBuf> {
    maps::CT4_MIGRATE
        .iter()
        .map(|n| pin_dir.join(n))
        .filter(|p| {
            aya::maps::MapInfo::from_pin(p).is_ok_and(|i| {
                i.key_size() as usize == size_of::<proxy_common::Ct4Key>()
                    && i.value_size() as usize == size_of::<proxy_common::Ct4Value>()
            })
        })
        .collect()
}

/// Removes the migrated tables' pins (the maps are freed once the old programs are gone).
pub fn retire_migrated(pin_dir: &Path) -> io::Result<usize> {
    let pins: Vec<PathBuf> = maps::CT4_MIGRATE.iter().map(|n| pin_dir.join(n)).collect();
    remove_pins(&pins)
}

/// Where the agent pins its maps inside the bpffs directory.
pub fn pin_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("ebpf-proxy")
}
