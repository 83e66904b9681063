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
    programs::{Program, ProgramError, SchedClassifier},
};
use proxy_common::{
    Aff4Key, Aff4Value, Backend4, Ct4Key, Ct4Value, NodeConfig, SrcRange4Data, SrcRange4Key,
    Svc4Key, Svc4Value, VipValue, counter, maps, sizes,
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
}

/// Map sizes, overridable at load time.
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    pub services: u32,
    pub backends: u32,
    pub conntrack: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: sizes::SVC4,
            backends: sizes::BACKEND4,
            conntrack: sizes::CT4,
        }
    }
}

impl MapSizes {
    pub fn layouts(&self) -> Vec<MapLayout> {
        use core::mem::size_of;
        vec![
            MapLayout {
                name: maps::SVC4,
                map_type: MapType::Hash,
                key_size: size_of::<Svc4Key>() as u32,
                value_size: size_of::<Svc4Value>() as u32,
                max_entries: self.services,
            },
            MapLayout {
                name: maps::BACKEND4,
                map_type: MapType::Hash,
                key_size: 4,
                value_size: size_of::<Backend4>() as u32,
                max_entries: self.backends,
            },
            MapLayout {
                name: maps::CT4,
                map_type: MapType::LruHash,
                key_size: size_of::<Ct4Key>() as u32,
                value_size: size_of::<Ct4Value>() as u32,
                max_entries: self.conntrack,
            },
            MapLayout {
                name: maps::COUNTERS,
                map_type: MapType::PerCpuArray,
                key_size: 4,
                value_size: 8,
                max_entries: counter::MAX,
            },
            MapLayout {
                name: maps::CONFIG,
                map_type: MapType::Array,
                key_size: 4,
                value_size: size_of::<NodeConfig>() as u32,
                max_entries: 1,
            },
            MapLayout {
                name: maps::VIP4,
                map_type: MapType::Hash,
                key_size: 4,
                value_size: size_of::<VipValue>() as u32,
                max_entries: sizes::VIP4,
            },
            MapLayout {
                name: maps::SRC_RANGE4,
                map_type: MapType::LpmTrie,
                key_size: size_of::<SrcRange4Key>() as u32,
                value_size: 1,
                max_entries: sizes::SRC_RANGE4,
            },
            MapLayout {
                name: maps::AFFINITY4,
                map_type: MapType::LruHash,
                key_size: size_of::<Aff4Key>() as u32,
                value_size: size_of::<Aff4Value>() as u32,
                max_entries: sizes::AFFINITY4,
            },
            // Socket-level balancing (host processes): pinned so a restart keeps showing
            // existing sockets the service address (recvmsg/getpeername).
            MapLayout {
                name: maps::SOCK_REV4,
                map_type: MapType::LruHash,
                key_size: size_of::<proxy_common::SockKey4>() as u32,
                value_size: size_of::<proxy_common::SockXlate4>() as u32,
                max_entries: proxy_common::sock::MAP_ENTRIES,
            },
            MapLayout {
                name: maps::SOCK_FWD4,
                map_type: MapType::LruHash,
                key_size: size_of::<proxy_common::SockKey4>() as u32,
                value_size: size_of::<proxy_common::SockXlate4>() as u32,
                max_entries: proxy_common::sock::MAP_ENTRIES,
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
    if found_type != want_type
        || info.key_size() != want.key_size
        || info.value_size() != want.value_size
        || info.max_entries() != want.max_entries
    {
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

    pub fn program(&self, name: &'static str) -> Result<&SchedClassifier, DatapathError> {
        self.ebpf
            .program(name)
            .ok_or(DatapathError::MissingProgram(name))?
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })
    }

    pub fn program_mut(
        &mut self,
        name: &'static str,
    ) -> Result<&mut SchedClassifier, DatapathError> {
        self.ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram(name))?
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })
    }

    /// Typed handles on the service and backend maps (for the writer and for restore).
    pub fn lb_maps(&mut self) -> Result<LbMaps<'_>, DatapathError> {
        let [svc, be, vip, src] =
            self.ebpf
                .maps_disjoint_mut([maps::SVC4, maps::BACKEND4, maps::VIP4, maps::SRC_RANGE4]);
        let svc = svc.ok_or(DatapathError::MissingMap(maps::SVC4))?;
        let be = be.ok_or(DatapathError::MissingMap(maps::BACKEND4))?;
        let vip = vip.ok_or(DatapathError::MissingMap(maps::VIP4))?;
        let src = src.ok_or(DatapathError::MissingMap(maps::SRC_RANGE4))?;
        Ok(LbMaps {
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

    /// Number of conntrack entries (both directions count).
    pub fn conntrack(&self) -> Result<Vec<(Ct4Key, Ct4Value)>, DatapathError> {
        let name = maps::CT4;
        let m = self.ebpf.map(name).ok_or(DatapathError::MissingMap(name))?;
        let h: HashMap<&MapData, Ct4Key, Ct4Value> =
            HashMap::try_from(m).map_err(|source| DatapathError::Map { name, source })?;
        Ok(h.iter().filter_map(Result::ok).collect())
    }
}

/// Typed service and backend maps.
pub struct LbMaps<'a> {
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
                    _pad: 0,
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
