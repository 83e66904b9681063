//! The layout each map must have (checked before a pin is reused, since aya does not), the
//! map sizes the agent flags set, and the pins of retired map versions.
use std::{
    io,
    path::{Path, PathBuf},
};

use aya::maps::{MapInfo, MapType};
use proxy_common::{
    Aff4Key, Aff4Value, Backend4, Ct4Key, Ct4Value, NodeConfig, SrcRange4Key, Svc4Key, Svc4Value,
    SvcCounter, VipValue, counter, maps, sizes,
};

use super::DatapathError;

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
    /// `--conntrack-max`: each of the two conntrack tables (`CT4_V3` answered flows,
    /// `CT4N_V1` unanswered), two entries per flow.
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
    /// Size of each of the node's two connection-tracking tables, two entries per connection:
    /// answered flows (CT4_V3, never evicted; removed when they time out) and flows not
    /// answered yet (CT4N_V1, LRU: a flood of unanswered packets only evicts its own kind).
    /// Unlike kube-proxy's --conntrack-max-per-core this is ebpf-proxy's own table, not
    /// netfilter's.
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
                map_type: MapType::Hash,
                key_size: size_of::<Ct4Key>() as u32,
                value_size: size_of::<Ct4Value>() as u32,
                max_entries: self.conntrack,
                flag: Some("--conntrack-max"),
            },
            MapLayout {
                name: maps::CT4_NEW,
                map_type: MapType::LruHash,
                key_size: size_of::<Ct4Key>() as u32,
                value_size: size_of::<Ct4Value>() as u32,
                max_entries: self.conntrack,
                flag: Some("--conntrack-max"),
            },
            MapLayout {
                name: maps::FRAG4,
                map_type: MapType::LruHash,
                key_size: size_of::<proxy_common::Frag4Key>() as u32,
                value_size: size_of::<proxy_common::Frag4Value>() as u32,
                max_entries: sizes::FRAG4,
                flag: None,
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
                name: maps::DECAP_SRC4,
                map_type: MapType::LpmTrie,
                // Prefix length + IPv4 address.
                key_size: 8,
                value_size: 1,
                max_entries: sizes::DECAP_SRC4,
                flag: None,
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
            MapLayout {
                name: maps::REJECT_BUCKET,
                map_type: MapType::PerCpuArray,
                key_size: 4,
                value_size: size_of::<proxy_common::RejectBucket>() as u32,
                max_entries: 1,
                flag: None,
            },
        ]
    }
}

/// Checks an existing pin against the layout this agent needs. `Ok(false)` if no pin exists.
pub(super) fn check_pin(path: &Path, want: &MapLayout) -> Result<bool, DatapathError> {
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
