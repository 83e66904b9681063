//! Planning: what the service and backend maps hold + what they should hold -> the ordered map
//! writes that get from one to the other without a reader ever seeing a broken service.
//!
//! [`MapState`] mirrors the maps exactly, entry by entry, including entries that do not fit the
//! model (left over by a crash, an older agent, or a plan that stopped half way). That is what
//! lets [`plan`] compare every entry it wants with the entry that is there, write only the
//! differences, and delete everything else; and lets [`apply_plan`] stop at any error with the
//! model still describing the maps.
//!
//! Besides the service and backend maps it plans the ClusterIP set (`LB4_VIP_V1`: every
//! ClusterIP, so a hit on an unused port is rejected) and the loadBalancerSourceRanges trie
//! (`LB4_SRC_V2`, keyed by the service ID of the EXTERNAL entry carrying
//! `svc_flags::SOURCE_RANGES`).
//!
//! Ordering (make before break): new backends, then new source ranges, then slots, then
//! service entries (so a count only grows after its slots exist and only shrinks after the
//! slots below it are final; a `SOURCE_RANGES` flag only appears once its ranges exist; and
//! INTERNAL-scope entries before EXTERNAL ones, so `TWO_SCOPES` never points at a missing
//! twin), then new ClusterIPs, then slots above the new counts, then removed services (entry
//! first, so the count disappears before its slots), then source ranges no entry uses any
//! more, then removed ClusterIPs, then unreferenced backends (a backend listed in some entry's
//! `DesiredService::terminating` counts as referenced, so a draining endpoint's established
//! flows keep their backend until it stops serving or vanishes). At every step, each slot
//! `1..=count` of every service entry points at an existing backend, and every EXTERNAL entry
//! with `TWO_SCOPES` has its INTERNAL twin. While a service's ranges change, old and new ones
//! are both allowed for a moment (never neither).
//!
//! IDs: backend IDs are shared by every service slot leading to the same address, start at 1,
//! and are not reused within a run (a flow tracked with a deleted backend's ID never lands on a
//! new backend). A service keeps its ID for its life. Both allocators skip IDs in use, so they
//! stay correct should they ever wrap.
//!
//! Slot layout: a backend that stays keeps its slot when it can; removed backends' slots are
//! refilled with new ones, then with backends from above the new count. That keeps writes
//! proportional to the change (one endpoint replaced in a 1000-endpoint service is one slot
//! write) instead of shifting every slot after a removal. The datapath picks slots uniformly,
//! so the order of backends in slots carries no meaning.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::convert::Infallible;
use std::fmt;
use std::net::Ipv4Addr;

use proxy_common::{
    Backend4, SrcRange4Key, Svc4Key, Svc4Value, VipValue, backend_flags, scope, sizes, svc_flags,
    vip_flags,
};

use crate::abi::{self, Protocol};
use crate::translate::{BackendAddr, Desired, DesiredService, ServiceKey};

/// The service-map key of `key`'s slot `slot` (0 = the service entry).
pub fn svc4_key(key: &ServiceKey, slot: u16) -> Svc4Key {
    Svc4Key::scoped(
        abi::addr_be(key.ip),
        abi::port_be(key.port),
        key.protocol.number(),
        key.scope,
        slot,
    )
}

/// The service a service-map key belongs to, if it is one this agent writes (known protocol,
/// scope `EXTERNAL` or `INTERNAL`, zero padding).
pub fn service_key(key: &Svc4Key) -> Option<ServiceKey> {
    if !matches!(key.scope, scope::EXTERNAL | scope::INTERNAL) || key._pad != [0; 2] {
        return None;
    }
    Some(ServiceKey {
        ip: abi::addr_from_be(key.addr_be),
        port: abi::port_from_be(key.port_be),
        protocol: Protocol::from_number(key.proto)?,
        scope: key.scope,
    })
}

/// The ClusterIP-map value this agent writes.
pub const CLUSTER_IP_VIP: VipValue = VipValue {
    flags: vip_flags::CLUSTER_IP,
};

/// The source-range value this agent writes (1 = allowed).
pub const SRC_RANGE_ALLOWED: u8 = 1;

/// A source-range key in a sortable form (`SrcRange4Key` is a raw LPM key), lossless both
/// ways.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SrcRange {
    pub svc_id: u32,
    pub addr: Ipv4Addr,
    /// The LPM prefix length: 32 + the range's prefix length when written by this agent.
    pub prefixlen: u32,
}

impl SrcRange {
    /// The key this agent writes for range `net/prefix` of service `svc_id` (host bits of
    /// `net` cleared).
    pub fn new(svc_id: u32, net: Ipv4Addr, prefix: u8) -> Self {
        let prefix = prefix.min(32);
        let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        Self {
            svc_id,
            addr: Ipv4Addr::from(u32::from(net) & mask),
            prefixlen: 32 + u32::from(prefix),
        }
    }

    pub fn from_key(k: &SrcRange4Key) -> Self {
        Self {
            svc_id: u32::from_be(k.svc_id_be),
            addr: abi::addr_from_be(k.addr_be),
            prefixlen: k.prefixlen,
        }
    }

    pub fn key(&self) -> SrcRange4Key {
        SrcRange4Key {
            prefixlen: self.prefixlen,
            svc_id_be: self.svc_id.to_be(),
            addr_be: abi::addr_be(self.addr),
        }
    }

    /// Whether this is a key this agent could have written.
    fn is_canonical(&self) -> bool {
        (32..=64).contains(&self.prefixlen)
            && *self == Self::new(self.svc_id, self.addr, (self.prefixlen - 32) as u8)
    }
}

impl fmt::Display for SrcRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} of service ID {}",
            self.addr,
            i64::from(self.prefixlen) - 32,
            self.svc_id
        )
    }
}

/// The backend-map value for `b`.
pub fn backend4(b: &BackendAddr) -> Backend4 {
    Backend4::new(
        abi::addr_be(b.ip),
        abi::port_be(b.port),
        b.protocol.number(),
    )
}

/// The address a backend-map value leads to, if it is one this agent writes (flags other
/// than `backend_flags::TERMINATING` are not).
pub fn backend_addr(b: &Backend4) -> Option<BackendAddr> {
    let addr = BackendAddr {
        ip: abi::addr_from_be(b.addr_be),
        port: abi::port_from_be(b.port_be),
        protocol: Protocol::from_number(b.proto)?,
    };
    (backend4(&addr).with_flags(b.flags & backend_flags::TERMINATING) == *b).then_some(addr)
}

/// The slot-0 value of a desired service with `count` slots.
fn service_value(ds: &DesiredService, count: u16, svc_id: u32) -> Svc4Value {
    Svc4Value::service(count, svc_id, ds.flags).with_affinity(ds.affinity_timeout_s)
}

/// The most slots a service can have (slot numbers are `u16`, slot 0 is the entry).
pub const MAX_BACKENDS_PER_SERVICE: usize = u16::MAX as usize;

/// A service entry as programmed, read through the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgrammedService {
    pub svc_id: u32,
    pub flags: u32,
    pub affinity_timeout_s: u32,
    /// Backend ID of slot `i + 1`, for `i < count`. 0 marks a slot that is missing or does not
    /// hold `Svc4Value::slot(id, svc_id)` (only after a crash or by another writer).
    pub backend_ids: Vec<u32>,
}

/// The raw entries of one service: its key with slot 0 (scope and padding kept as found).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Group {
    entry: Option<Svc4Value>,
    slots: BTreeMap<u16, Svc4Value>,
}

/// The contents of the service and backend maps, and the ID allocators.
///
/// Change it only through [`MapState::apply`] after a successful write (as [`apply_plan`]
/// does); the views [`services`](Self::services) and [`backends`](Self::backends) are derived
/// from the raw entries and kept in step by `apply`.
#[derive(Clone, Debug)]
pub struct MapState {
    groups: BTreeMap<Svc4Key, Group>,
    raw_backends: BTreeMap<u32, Backend4>,
    /// The ClusterIP map, keyed by `addr_be`.
    vips: BTreeMap<u32, VipValue>,
    src_ranges: BTreeMap<SrcRange, u8>,
    services: BTreeMap<ServiceKey, ProgrammedService>,
    backends: BTreeMap<u32, BackendAddr>,
    next_backend_id: u32,
    next_svc_id: u32,
    /// Service IDs are `1..svc_id_limit`: they index the per-service counter map.
    svc_id_limit: u32,
}

impl Default for MapState {
    fn default() -> Self {
        Self::new()
    }
}

fn group_key(k: &Svc4Key) -> Svc4Key {
    Svc4Key { slot: 0, ..*k }
}

/// The backend ID a slot holds, if it is exactly what this agent writes for `svc_id`.
fn slot_backend(v: Option<&Svc4Value>, svc_id: u32) -> u32 {
    match v {
        Some(v) if v.backend_id != 0 && *v == Svc4Value::slot(v.backend_id, svc_id) => v.backend_id,
        _ => 0,
    }
}

fn derive(key0: &Svc4Key, g: &Group) -> Option<(ServiceKey, ProgrammedService)> {
    let key = service_key(key0)?;
    let e = g.entry?;
    let backend_ids = (1..=e.count)
        .map(|s| slot_backend(g.slots.get(&s), e.svc_id))
        .collect();
    Some((
        key,
        ProgrammedService {
            svc_id: e.svc_id,
            flags: e.flags,
            affinity_timeout_s: e.affinity_timeout_s,
            backend_ids,
        },
    ))
}

fn fmt_key(k: &Svc4Key) -> String {
    let ip = abi::addr_from_be(k.addr_be);
    let port = abi::port_from_be(k.port_be);
    let proto = match Protocol::from_number(k.proto) {
        Some(p) => p.to_string(),
        None => format!("proto {}", k.proto),
    };
    let mut s = format!("{ip}:{port}/{proto}");
    if k.scope == scope::INTERNAL && k._pad == [0; 2] {
        s.push_str(" (internal)");
    } else if k.scope != scope::EXTERNAL || k._pad != [0; 2] {
        s.push_str(&format!(" (scope {}, pad {:?})", k.scope, k._pad));
    }
    s
}

fn fmt_backend(b: &Backend4) -> String {
    match Protocol::from_number(b.proto) {
        Some(p) => format!(
            "{}:{}/{p}",
            abi::addr_from_be(b.addr_be),
            abi::port_from_be(b.port_be)
        ),
        None => format!(
            "{}:{}/proto {}",
            abi::addr_from_be(b.addr_be),
            abi::port_from_be(b.port_be),
            b.proto
        ),
    }
}

/// The ID after `id`, wrapping past the maximum to 1 (0 is never an ID).
fn succ_u32(id: u32) -> u32 {
    id.checked_add(1).unwrap_or(1)
}

/// The ID after `id`, wrapping to 1 at `limit` (service IDs index a map of `limit` entries).
fn succ_below(id: u32, limit: u32) -> u32 {
    match id.checked_add(1) {
        Some(n) if n < limit => n,
        _ => 1,
    }
}

impl MapState {
    /// Empty maps.
    pub fn new() -> Self {
        Self {
            groups: BTreeMap::new(),
            raw_backends: BTreeMap::new(),
            vips: BTreeMap::new(),
            src_ranges: BTreeMap::new(),
            services: BTreeMap::new(),
            backends: BTreeMap::new(),
            next_backend_id: 1,
            next_svc_id: 1,
            svc_id_limit: sizes::SVC_IDS,
        }
    }

    /// Empty maps whose per-service counter map has `limit` entries (`--max-services`):
    /// new service IDs stay below it.
    pub fn with_svc_id_limit(limit: u32) -> Self {
        let mut s = Self::new();
        s.set_svc_id_limit(limit);
        s
    }

    /// See [`with_svc_id_limit`](Self::with_svc_id_limit); call before planning.
    pub fn set_svc_id_limit(&mut self, limit: u32) {
        self.svc_id_limit = limit.max(2);
    }

    /// How many service IDs exist (`1..limit`).
    pub fn svc_id_limit(&self) -> u32 {
        self.svc_id_limit
    }

    /// Rebuilds the model from the maps' contents (agent restart), with a warning for every
    /// entry that is not as this agent would have written it. [`plan`] rewrites or deletes
    /// such entries. The allocators continue after the highest IDs found anywhere, including
    /// IDs that slots refer to, so no new ID can alias a stale one.
    pub fn from_maps(
        services: impl IntoIterator<Item = (Svc4Key, Svc4Value)>,
        backends: impl IntoIterator<Item = (u32, Backend4)>,
        vips: impl IntoIterator<Item = (u32, VipValue)>,
        src_ranges: impl IntoIterator<Item = (SrcRange4Key, u8)>,
    ) -> (MapState, Vec<String>) {
        let mut state = MapState::new();
        for (key, value) in services {
            let g = state.groups.entry(group_key(&key)).or_default();
            if key.slot == 0 {
                g.entry = Some(value);
            } else {
                g.slots.insert(key.slot, value);
            }
            state.bump_svc_id(value.svc_id);
            state.bump_backend_id(value.backend_id);
        }
        for (id, b) in backends {
            state.raw_backends.insert(id, b);
            state.bump_backend_id(id);
        }
        state.vips.extend(vips);
        for (k, v) in src_ranges {
            let r = SrcRange::from_key(&k);
            state.src_ranges.insert(r, v);
            state.bump_svc_id(r.svc_id);
        }
        state.services = state
            .groups
            .iter()
            .filter_map(|(k, g)| derive(k, g))
            .collect();
        state.backends = state
            .raw_backends
            .iter()
            .filter(|(id, _)| **id != 0)
            .filter_map(|(id, b)| Some((*id, backend_addr(b)?)))
            .collect();
        let warnings = state.inconsistencies();
        (state, warnings)
    }

    /// Programmed services (entries with a service entry and a key this agent writes).
    pub fn services(&self) -> &BTreeMap<ServiceKey, ProgrammedService> {
        &self.services
    }

    /// Programmed backends (entries exactly as this agent writes them).
    pub fn backends(&self) -> &BTreeMap<u32, BackendAddr> {
        &self.backends
    }

    /// Every service-map entry, as in the map.
    pub fn service_entries(&self) -> impl Iterator<Item = (Svc4Key, Svc4Value)> + '_ {
        self.groups.iter().flat_map(|(k0, g)| {
            g.entry.iter().map(move |v| (*k0, *v)).chain(
                g.slots
                    .iter()
                    .map(move |(s, v)| (Svc4Key { slot: *s, ..*k0 }, *v)),
            )
        })
    }

    /// Every backend-map entry, as in the map.
    pub fn backend_entries(&self) -> impl Iterator<Item = (u32, Backend4)> + '_ {
        self.raw_backends.iter().map(|(id, b)| (*id, *b))
    }

    /// Every ClusterIP-map entry, as in the map.
    pub fn vip_entries(&self) -> impl Iterator<Item = (u32, VipValue)> + '_ {
        self.vips.iter().map(|(a, v)| (*a, *v))
    }

    /// The ClusterIPs programmed as this agent writes them.
    pub fn cluster_ips(&self) -> BTreeSet<Ipv4Addr> {
        self.vips
            .iter()
            .filter(|(_, v)| **v == CLUSTER_IP_VIP)
            .map(|(a, _)| abi::addr_from_be(*a))
            .collect()
    }

    /// Every source-range entry, as in the map.
    pub fn src_range_entries(&self) -> impl Iterator<Item = (SrcRange4Key, u8)> + '_ {
        self.src_ranges.iter().map(|(r, v)| (r.key(), *v))
    }

    /// The allowed source ranges `(network, prefix length)` of each service ID, as this
    /// agent writes them.
    pub fn source_ranges(&self) -> BTreeMap<u32, Vec<(Ipv4Addr, u8)>> {
        let mut out: BTreeMap<u32, Vec<(Ipv4Addr, u8)>> = BTreeMap::new();
        for (r, v) in &self.src_ranges {
            if *v == SRC_RANGE_ALLOWED && r.is_canonical() {
                out.entry(r.svc_id)
                    .or_default()
                    .push((r.addr, (r.prefixlen - 32) as u8));
            }
        }
        out
    }

    /// Everything in the maps that is not as this agent would have written it, one line each.
    pub fn inconsistencies(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (id, b) in &self.raw_backends {
            if *id == 0 {
                out.push(format!(
                    "backend 0 ({}) uses the reserved ID 0",
                    fmt_backend(b)
                ));
            } else if !self.backends.contains_key(id) {
                out.push(format!(
                    "backend {id} ({}, flags {:#x}) is not a valid backend entry",
                    fmt_backend(b),
                    b.flags
                ));
            }
        }
        let mut svc_ids: HashMap<u32, &Svc4Key> = HashMap::new();
        for (k0, g) in &self.groups {
            let name = fmt_key(k0);
            if service_key(k0).is_none() {
                out.push(format!(
                    "service {name}: key with unknown protocol, scope or padding"
                ));
                continue;
            }
            let Some(e) = g.entry else {
                let slots: Vec<u16> = g.slots.keys().copied().collect();
                out.push(format!(
                    "service {name}: slots {slots:?} without a service entry (slot 0)"
                ));
                continue;
            };
            if e != Svc4Value::service(e.count, e.svc_id, e.flags)
                .with_affinity(e.affinity_timeout_s)
            {
                out.push(format!(
                    "service {name}: entry has a non-zero backend_id: {e:?}"
                ));
            }
            if k0.scope == scope::EXTERNAL && e.flags & svc_flags::TWO_SCOPES != 0 {
                let twin = self.groups.get(&k0.with_scope(scope::INTERNAL));
                if twin.and_then(|g| g.entry).is_none() {
                    out.push(format!(
                        "service {name}: flagged TWO_SCOPES without an internal entry"
                    ));
                }
            }
            if e.svc_id == 0 {
                out.push(format!("service {name}: service ID 0 is reserved"));
            } else if let Some(other) = svc_ids.insert(e.svc_id, k0) {
                out.push(format!(
                    "service {name}: service ID {} is also used by {}",
                    e.svc_id,
                    fmt_key(other)
                ));
            }
            for s in 1..=e.count {
                match g.slots.get(&s) {
                    None => out.push(format!(
                        "service {name}: slot {s} of {} is missing",
                        e.count
                    )),
                    Some(v) if slot_backend(Some(v), e.svc_id) == 0 => {
                        out.push(format!(
                            "service {name}: slot {s} is not a valid slot of service ID {}: {v:?}",
                            e.svc_id
                        ));
                    }
                    Some(v) if !self.backends.contains_key(&v.backend_id) => {
                        out.push(format!(
                            "service {name}: slot {s} refers to missing backend {}",
                            v.backend_id
                        ));
                    }
                    Some(_) => {}
                }
            }
            let extra: Vec<u16> = g
                .slots
                .range(e.count.saturating_add(1)..)
                .map(|(s, _)| *s)
                .collect();
            if !extra.is_empty() {
                out.push(format!(
                    "service {name}: slots {extra:?} are beyond its count {}",
                    e.count
                ));
            }
        }
        for (addr, v) in &self.vips {
            if *v != CLUSTER_IP_VIP || *addr == 0 {
                out.push(format!(
                    "ClusterIP {}: entry {v:?} is not a valid ClusterIP entry",
                    abi::addr_from_be(*addr)
                ));
            }
        }
        let range_owners: HashSet<u32> = self
            .groups
            .iter()
            .filter(|(k0, _)| k0.scope == scope::EXTERNAL)
            .filter_map(|(_, g)| g.entry)
            .filter(|e| e.flags & svc_flags::SOURCE_RANGES != 0)
            .map(|e| e.svc_id)
            .collect();
        for (r, v) in &self.src_ranges {
            if !r.is_canonical() || *v != SRC_RANGE_ALLOWED {
                out.push(format!(
                    "source range {r} (prefixlen {}, value {v}) is not a valid source-range entry",
                    r.prefixlen
                ));
            } else if !range_owners.contains(&r.svc_id) {
                out.push(format!(
                    "source range {r}: no service entry with SOURCE_RANGES has that ID"
                ));
            }
        }
        out
    }

    /// Records a write that succeeded.
    pub fn apply(&mut self, op: &Op) {
        match *op {
            Op::PutBackend { id, backend } => {
                self.raw_backends.insert(id, backend);
                match backend_addr(&backend).filter(|_| id != 0) {
                    Some(addr) => self.backends.insert(id, addr),
                    None => self.backends.remove(&id),
                };
                self.bump_backend_id(id);
            }
            Op::DeleteBackend { id } => {
                self.raw_backends.remove(&id);
                self.backends.remove(&id);
            }
            // The effect of a write depends on the key alone; the variant only says why.
            Op::PutSlot { key, value } | Op::PutService { key, value } => {
                self.bump_svc_id(value.svc_id);
                self.bump_backend_id(value.backend_id);
                self.update_group(&key, Some(value));
            }
            Op::DeleteSlot { key } | Op::DeleteService { key } => self.update_group(&key, None),
            Op::PutVip { addr_be, value } => {
                self.vips.insert(addr_be, value);
            }
            Op::DeleteVip { addr_be } => {
                self.vips.remove(&addr_be);
            }
            Op::PutSrcRange { key } => {
                let r = SrcRange::from_key(&key);
                self.src_ranges.insert(r, SRC_RANGE_ALLOWED);
                self.bump_svc_id(r.svc_id);
            }
            Op::DeleteSrcRange { key } => {
                self.src_ranges.remove(&SrcRange::from_key(&key));
            }
        }
    }

    fn update_group(&mut self, key: &Svc4Key, value: Option<Svc4Value>) {
        let k0 = group_key(key);
        let g = self.groups.entry(k0).or_default();
        if key.slot == 0 {
            g.entry = value;
            // The entry decides count and svc_id, so every slot's reading may change.
            match derive(&k0, g) {
                Some((sk, ps)) => self.services.insert(sk, ps),
                None => service_key(&k0).and_then(|sk| self.services.remove(&sk)),
            };
        } else {
            match value {
                Some(v) => g.slots.insert(key.slot, v),
                None => g.slots.remove(&key.slot),
            };
            // Only this slot's reading changes.
            if let (Some(sk), Some(e)) = (service_key(&k0), g.entry)
                && let Some(ps) = self.services.get_mut(&sk)
                && let Some(id) = ps.backend_ids.get_mut(usize::from(key.slot) - 1)
            {
                *id = slot_backend(g.slots.get(&key.slot), e.svc_id);
            }
        }
        if g.entry.is_none() && g.slots.is_empty() {
            self.groups.remove(&k0);
        }
    }

    fn bump_backend_id(&mut self, id: u32) {
        if id >= self.next_backend_id {
            self.next_backend_id = succ_u32(id);
        }
    }

    fn bump_svc_id(&mut self, id: u32) {
        // Past the limit, the allocator wraps to 1 on its next take.
        if id >= self.next_svc_id {
            self.next_svc_id = succ_u32(id);
        }
    }
}

/// One map write, with the ABI values ready to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    PutBackend {
        id: u32,
        backend: Backend4,
    },
    /// A backend slot (`key.slot >= 1`).
    PutSlot {
        key: Svc4Key,
        value: Svc4Value,
    },
    /// A service entry (`key.slot == 0`).
    PutService {
        key: Svc4Key,
        value: Svc4Value,
    },
    DeleteSlot {
        key: Svc4Key,
    },
    DeleteService {
        key: Svc4Key,
    },
    DeleteBackend {
        id: u32,
    },
    /// A ClusterIP (`LB4_VIP_V1`).
    PutVip {
        addr_be: u32,
        value: VipValue,
    },
    DeleteVip {
        addr_be: u32,
    },
    /// An allowed source range (`LB4_SRC_V2`); the value is always [`SRC_RANGE_ALLOWED`].
    PutSrcRange {
        key: SrcRange4Key,
    },
    DeleteSrcRange {
        key: SrcRange4Key,
    },
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::PutBackend { id, backend } => {
                write!(f, "put backend {id} = {}", fmt_backend(backend))
            }
            Op::PutSlot { key, value } => {
                write!(
                    f,
                    "put slot {} of {} = backend {}",
                    key.slot,
                    fmt_key(key),
                    value.backend_id
                )
            }
            Op::PutService { key, value } => write!(
                f,
                "put service {} = {} backends (service ID {}, flags {:#x})",
                fmt_key(key),
                value.count,
                value.svc_id,
                value.flags
            ),
            Op::DeleteSlot { key } => write!(f, "delete slot {} of {}", key.slot, fmt_key(key)),
            Op::DeleteService { key } => write!(f, "delete service {}", fmt_key(key)),
            Op::DeleteBackend { id } => write!(f, "delete backend {id}"),
            Op::PutVip { addr_be, value } => write!(
                f,
                "put ClusterIP {} (flags {:#x})",
                abi::addr_from_be(*addr_be),
                value.flags
            ),
            Op::DeleteVip { addr_be } => {
                write!(f, "delete ClusterIP {}", abi::addr_from_be(*addr_be))
            }
            Op::PutSrcRange { key } => {
                write!(f, "put source range {}", SrcRange::from_key(key))
            }
            Op::DeleteSrcRange { key } => {
                write!(f, "delete source range {}", SrcRange::from_key(key))
            }
        }
    }
}

/// The writes that turn the maps into the desired state, in a safe order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub ops: Vec<Op>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// An allocator for IDs `1..limit`: increasing from `next`, skipping IDs in use, wrapping.
struct Alloc {
    next: u32,
    /// One past the highest ID (`u32::MAX` for backends: practically unbounded).
    limit: u32,
    in_use: HashSet<u32>,
}

impl Alloc {
    fn take(&mut self) -> Option<u32> {
        // Bounded: at most every ID is tried once (and in practice the first free one is
        // found after at most `in_use.len()` tries).
        for _ in 0..self.in_use.len() + 2 {
            let id = self.next;
            self.next = succ_below(id, self.limit);
            if id != 0 && id < self.limit && self.in_use.insert(id) {
                return Some(id);
            }
        }
        None
    }
}

/// Where the slots of a service go: backends already in a slot within the new count stay
/// there; the other positions get the remaining backends in `wanted` order.
fn assign_slots(old: &[u32], wanted: &[u32]) -> Vec<u32> {
    let set: HashSet<u32> = wanted.iter().copied().collect();
    let mut placed = HashSet::new();
    let mut layout: Vec<u32> = old
        .iter()
        .take(wanted.len())
        .map(|&id| {
            if id != 0 && set.contains(&id) && placed.insert(id) {
                id
            } else {
                0
            }
        })
        .collect();
    layout.resize(wanted.len(), 0);
    let rest = wanted.iter().filter(|id| !placed.contains(*id));
    for (slot, id) in layout.iter_mut().filter(|s| **s == 0).zip(rest) {
        *slot = *id;
    }
    layout
}

/// Computes the writes from `current` to `desired` (service entries) and `cluster_ips` (the
/// ClusterIP set, `Translation::cluster_ips`). Pure; see the module docs for the order.
///
/// Source ranges are written for the entries with `svc_flags::SOURCE_RANGES`, from
/// `DesiredService::source_ranges`, keyed by that entry's service ID.
pub fn plan(current: &MapState, desired: &Desired, cluster_ips: &BTreeSet<Ipv4Addr>) -> Plan {
    let mut backend_ids = Alloc {
        next: current.next_backend_id,
        limit: u32::MAX,
        in_use: current
            .raw_backends
            .keys()
            .copied()
            .chain(current.service_entries().map(|(_, v)| v.backend_id))
            .collect(),
    };
    let mut svc_ids = Alloc {
        next: current.next_svc_id,
        limit: current.svc_id_limit,
        in_use: current.service_entries().map(|(_, v)| v.svc_id).collect(),
    };
    let terminating = terminating_backends(desired);
    let backend_value = |b: &BackendAddr| {
        let flags = if terminating.contains(b) {
            backend_flags::TERMINATING
        } else {
            0
        };
        backend4(b).with_flags(flags)
    };
    // The lowest ID wins should the maps hold one address twice; the other is cleaned up.
    let mut id_of: HashMap<BackendAddr, u32> = HashMap::new();
    for (id, addr) in &current.backends {
        id_of.entry(*addr).or_insert(*id);
    }

    let mut put_backends = Vec::new();
    let mut put_ranges = Vec::new();
    let mut wanted_ranges: HashSet<SrcRange> = HashSet::new();
    let mut put_slots = Vec::new();
    let mut put_internal = Vec::new();
    let mut put_services = Vec::new();
    let mut delete_slots = Vec::new();
    let mut referenced: HashSet<u32> = HashSet::new();
    let mut claimed_svc_ids: HashSet<u32> = HashSet::new();
    let mut kept: HashSet<Svc4Key> = HashSet::new();

    for (key, ds) in desired {
        let key0 = svc4_key(key, 0);
        let old = current.services.get(key);
        let svc_id = match old.map(|o| o.svc_id) {
            Some(id) if id != 0 && claimed_svc_ids.insert(id) => id,
            _ => match svc_ids.take() {
                Some(id) => {
                    claimed_svc_ids.insert(id);
                    id
                }
                None => {
                    log::warn!(
                        "service {key} ({}) not programmed: all service IDs are in use",
                        ds.name
                    );
                    continue;
                }
            },
        };
        if ds.backends.len() > MAX_BACKENDS_PER_SERVICE {
            log::warn!(
                "service {key} ({}) has {} backends; only the first {MAX_BACKENDS_PER_SERVICE} are programmed",
                ds.name,
                ds.backends.len()
            );
        }
        let mut ids = Vec::with_capacity(ds.backends.len().min(MAX_BACKENDS_PER_SERVICE));
        let mut seen = HashSet::new();
        for b in ds.backends.iter().take(MAX_BACKENDS_PER_SERVICE) {
            let id = match id_of.get(b) {
                Some(id) => *id,
                None => {
                    let Some(id) = backend_ids.take() else {
                        log::warn!(
                            "backend {b} of service {key} not programmed: all backend IDs are in use"
                        );
                        continue;
                    };
                    put_backends.push(Op::PutBackend {
                        id,
                        backend: backend_value(b),
                    });
                    id_of.insert(*b, id);
                    id
                }
            };
            if seen.insert(id) {
                ids.push(id);
            }
        }
        referenced.extend(ids.iter().copied());
        // Draining (serving+terminating, not chosen) endpoints keep the backend they already
        // have, in no slot: established flows to them still validate, new ones never pick
        // them. One never programmed gets nothing (no flow can refer to it).
        referenced.extend(ds.terminating.iter().filter_map(|b| id_of.get(b).copied()));
        kept.insert(key0);

        if ds.flags & svc_flags::SOURCE_RANGES != 0 {
            for (net, prefix) in &ds.source_ranges {
                let r = SrcRange::new(svc_id, *net, *prefix);
                if wanted_ranges.insert(r) && current.src_ranges.get(&r) != Some(&SRC_RANGE_ALLOWED)
                {
                    put_ranges.push(Op::PutSrcRange { key: r.key() });
                }
            }
        }

        let layout = assign_slots(
            old.map(|o| o.backend_ids.as_slice()).unwrap_or_default(),
            &ids,
        );
        let group = current.groups.get(&key0);
        for (i, id) in layout.iter().enumerate() {
            // Lossless: `layout` has at most MAX_BACKENDS_PER_SERVICE = u16::MAX entries.
            let slot = (i + 1) as u16;
            let value = Svc4Value::slot(*id, svc_id);
            if group.and_then(|g| g.slots.get(&slot)) != Some(&value) {
                put_slots.push(Op::PutSlot {
                    key: svc4_key(key, slot),
                    value,
                });
            }
        }
        let count = layout.len() as u16;
        let value = service_value(ds, count, svc_id);
        if group.and_then(|g| g.entry) != Some(value) {
            let op = Op::PutService { key: key0, value };
            if key.scope == scope::EXTERNAL {
                put_services.push(op);
            } else {
                put_internal.push(op);
            }
        }
        if let Some(g) = group {
            for slot in g.slots.range(count.saturating_add(1)..).map(|(s, _)| *s) {
                delete_slots.push(Op::DeleteSlot {
                    key: svc4_key(key, slot),
                });
            }
        }
    }

    // Backends that stay but became (or stopped being) terminating: rewritten in place, same
    // ID, so their flows keep validating.
    let mut flag_updates: Vec<Op> = current
        .backends
        .iter()
        .filter(|(id, _)| referenced.contains(*id))
        .filter_map(|(id, addr)| {
            let want = backend_value(addr);
            (current.raw_backends.get(id) != Some(&want)).then_some(Op::PutBackend {
                id: *id,
                backend: want,
            })
        })
        .collect();
    put_backends.append(&mut flag_updates);

    let mut delete_services = Vec::new();
    for (k0, g) in &current.groups {
        if kept.contains(k0) {
            continue;
        }
        if g.entry.is_some() {
            delete_services.push(Op::DeleteService { key: *k0 });
        }
        for slot in g.slots.keys() {
            delete_services.push(Op::DeleteSlot {
                key: Svc4Key { slot: *slot, ..*k0 },
            });
        }
    }
    let delete_backends = current
        .raw_backends
        .keys()
        .filter(|id| !referenced.contains(*id))
        .map(|id| Op::DeleteBackend { id: *id });
    let delete_ranges = current
        .src_ranges
        .keys()
        .filter(|r| !wanted_ranges.contains(*r))
        .map(|r| Op::DeleteSrcRange { key: r.key() });

    let wanted_vips: BTreeSet<u32> = cluster_ips.iter().map(|ip| abi::addr_be(*ip)).collect();
    let put_vips = wanted_vips
        .iter()
        .filter(|a| current.vips.get(*a) != Some(&CLUSTER_IP_VIP))
        .map(|a| Op::PutVip {
            addr_be: *a,
            value: CLUSTER_IP_VIP,
        });
    let delete_vips = current
        .vips
        .keys()
        .filter(|a| !wanted_vips.contains(*a))
        .map(|a| Op::DeleteVip { addr_be: *a });

    let mut ops = put_backends;
    ops.extend(put_ranges);
    ops.extend(put_slots);
    ops.extend(put_internal);
    ops.extend(put_services);
    ops.extend(put_vips);
    ops.extend(delete_slots);
    ops.extend(delete_services);
    ops.extend(delete_ranges);
    ops.extend(delete_vips);
    ops.extend(delete_backends);
    Plan { ops }
}

/// What the maps can hold, in the units [`fit_capacity`] counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Service-map entries: one per service entry plus one per backend slot.
    pub service_entries: usize,
    /// Backend-map entries.
    pub backends: usize,
    /// Service IDs (one per service entry): the counter map's size minus the reserved ID 0.
    pub service_ids: usize,
    /// ClusterIP-map entries.
    pub cluster_ips: usize,
    /// Source-range (LPM) entries: one per range and LoadBalancer entry.
    pub source_ranges: usize,
}

/// Admits whole Service objects into the desired state while they fit every map, smallest
/// first (so one huge or hostile object cannot crowd out many small ones), and removes the
/// rest (their entries and ClusterIPs), returning one issue per removed object that names what
/// did not fit and the flag that sizes it. No object is ever half programmed: a service port
/// with more endpoints than a service entry can index ([`MAX_BACKENDS_PER_SERVICE`]) rejects
/// its whole Service.
///
/// Counted per object: service-map entries (entry + slots), service IDs, backends (distinct
/// addresses across objects, including serving+terminating ones kept for established flows),
/// ClusterIPs (distinct, with `cluster_ips` holding any not tied to an entry up front), and
/// source ranges. A plan also holds old and new entries side by side for a moment
/// (make-before-break), so running within a few percent of capacity can make a write fail,
/// which is reported and retried.
pub fn fit_capacity(
    desired: &mut Desired,
    cluster_ips: &mut BTreeSet<Ipv4Addr>,
    cap: &Capacity,
) -> Vec<crate::translate::Issue> {
    // Object of a desired entry: its name up to the port name (`ns/name:port`).
    let object_of = |d: &DesiredService| -> String {
        let base = d.name.split(':').next().unwrap_or_default();
        format!("Service {base}")
    };
    #[derive(Default)]
    struct Need {
        keys: Vec<ServiceKey>,
        entries: usize,
        ranges: usize,
        backends: HashSet<BackendAddr>,
        vips: BTreeSet<Ipv4Addr>,
        too_many: Option<usize>,
    }
    let mut needs: BTreeMap<String, Need> = BTreeMap::new();
    for (key, d) in desired.iter() {
        let n = needs.entry(object_of(d)).or_default();
        n.keys.push(*key);
        n.entries += 1 + d.backends.len();
        n.backends.extend(d.backends.iter().copied());
        n.backends.extend(d.terminating.iter().copied());
        if d.flags & svc_flags::SOURCE_RANGES != 0 {
            n.ranges += d.source_ranges.len();
        }
        if d.flags & svc_flags::CLUSTER_IP != 0 && cluster_ips.contains(&key.ip) {
            n.vips.insert(key.ip);
        }
        if d.backends.len() > MAX_BACKENDS_PER_SERVICE {
            n.too_many = Some(d.backends.len());
        }
    }
    let tied: BTreeSet<Ipv4Addr> = needs
        .values()
        .flat_map(|n| n.vips.iter().copied())
        .collect();
    let mut used_vips: BTreeSet<Ipv4Addr> = cluster_ips.difference(&tied).copied().collect();
    let mut order: Vec<(&String, &Need)> = needs.iter().collect();
    order.sort_by_key(|(name, n)| (n.entries, *name));
    let (mut used_entries, mut used_ids, mut used_ranges) = (0usize, 0usize, 0usize);
    let mut used_backends: HashSet<BackendAddr> = HashSet::new();
    let mut issues = Vec::new();
    let mut rejected_vips = BTreeSet::new();
    for (object, n) in order {
        let new_backends = n.backends.difference(&used_backends).count();
        let new_vips = n.vips.difference(&used_vips).count();
        let mut short = Vec::new();
        let mut check = |what: &str, need: usize, used: usize, cap: usize, flag: &str| {
            if need > 0 && used + need > cap {
                short.push(format!(
                    "{need} {what} (only {} of {cap} left; {flag})",
                    cap.saturating_sub(used)
                ));
            }
        };
        check(
            "service map entries",
            n.entries,
            used_entries,
            cap.service_entries,
            "--service-map-entries",
        );
        check(
            "service IDs",
            n.keys.len(),
            used_ids,
            cap.service_ids,
            "--max-services",
        );
        check(
            "backends",
            new_backends,
            used_backends.len(),
            cap.backends,
            "--max-backends",
        );
        check(
            "ClusterIPs",
            new_vips,
            used_vips.len(),
            cap.cluster_ips,
            "--max-cluster-ips",
        );
        check(
            "source ranges",
            n.ranges,
            used_ranges,
            cap.source_ranges,
            "--max-source-ranges",
        );
        let message = if let Some(count) = n.too_many {
            Some(format!(
                "a port has {count} endpoints, more than the {MAX_BACKENDS_PER_SERVICE} a \
                 service entry can hold; the service is skipped"
            ))
        } else if !short.is_empty() {
            Some(format!(
                "does not fit the maps: needs {}; the service is skipped (raise the flag \
                 named, or remove other services)",
                short.join(", ")
            ))
        } else {
            None
        };
        match message {
            Some(message) => {
                for k in &n.keys {
                    desired.remove(k);
                }
                rejected_vips.extend(n.vips.iter().copied());
                issues.push(crate::translate::Issue {
                    object: object.clone(),
                    field: String::new(),
                    message,
                });
            }
            None => {
                used_entries += n.entries;
                used_ids += n.keys.len();
                used_ranges += n.ranges;
                used_backends.extend(n.backends.iter().copied());
                used_vips.extend(n.vips.iter().copied());
            }
        }
    }
    // A ClusterIP shared with an admitted object stays.
    cluster_ips.retain(|ip| !rejected_vips.contains(ip) || used_vips.contains(ip));
    issues
}

/// Backends written with `backend_flags::TERMINATING`: serving+terminating endpoints kept only
/// for their established flows ([`DesiredService::terminating`]), and the slots of services
/// left with nothing but serving+terminating endpoints (`svc_flags::TERMINATING_FALLBACK`).
/// The datapath's session affinity skips a terminating affine backend unless its service is in
/// that fallback.
///
/// The flag is per backend, and backends are shared by address: one that some service still
/// uses as a ready endpoint (slices disagreeing for a moment) is not flagged, so affinity to a
/// ready endpoint is never lost; the terminating side then keeps affinity a little longer.
fn terminating_backends(desired: &Desired) -> HashSet<BackendAddr> {
    let mut terminating = HashSet::new();
    let mut ready = HashSet::new();
    for ds in desired.values() {
        terminating.extend(ds.terminating.iter().copied());
        if ds.flags & svc_flags::TERMINATING_FALLBACK != 0 {
            terminating.extend(ds.backends.iter().copied());
        } else {
            ready.extend(ds.backends.iter().copied());
        }
    }
    terminating.retain(|b| !ready.contains(b));
    terminating
}

/// Writes to the maps. Slots and service entries both go through
/// `put_service`/`delete_service`. Deleting a key that is not there is `Ok`.
///
/// The ClusterIP and source-range methods have default implementations that fail with
/// [`ExtWriteError::Unsupported`], so writers written before those maps existed keep
/// compiling (and fail loudly, never silently, when a plan needs them). Their error type is
/// [`ExtWriteError`] because a default cannot build a `Self::Error`; a writer's own error
/// goes in [`ExtWriteError::Map`] (`?` converts it), and [`apply_plan`] unwraps it again so
/// [`ApplyError::source`] is the writer's error type either way.
pub trait MapWriter {
    type Error: std::error::Error + Send + Sync + 'static;
    fn put_backend(&mut self, id: u32, b: &Backend4) -> Result<(), Self::Error>;
    fn put_service(&mut self, k: &Svc4Key, v: &Svc4Value) -> Result<(), Self::Error>;
    fn delete_service(&mut self, k: &Svc4Key) -> Result<(), Self::Error>;
    fn delete_backend(&mut self, id: u32) -> Result<(), Self::Error>;
    /// `LB4_VIP_V1[addr_be] = v`.
    fn put_vip(&mut self, addr_be: u32, v: &VipValue) -> Result<(), ExtWriteError<Self::Error>> {
        let _ = (addr_be, v);
        Err(ExtWriteError::Unsupported { op: "put_vip" })
    }
    /// Removes `LB4_VIP_V1[addr_be]`.
    fn delete_vip(&mut self, addr_be: u32) -> Result<(), ExtWriteError<Self::Error>> {
        let _ = addr_be;
        Err(ExtWriteError::Unsupported { op: "delete_vip" })
    }
    /// `LB4_SRC_V2[k] = 1`.
    fn put_src_range(&mut self, k: &SrcRange4Key) -> Result<(), ExtWriteError<Self::Error>> {
        let _ = k;
        Err(ExtWriteError::Unsupported {
            op: "put_src_range",
        })
    }
    /// Zeroes the per-service counters of `svc_id` (`LB4_SCNT_V1`), before the ID is
    /// published. Writers without a counter map (in-memory ones) have nothing to reset.
    fn reset_service_counter(&mut self, svc_id: u32) -> Result<(), ExtWriteError<Self::Error>> {
        let _ = svc_id;
        Ok(())
    }
    /// Removes `LB4_SRC_V2[k]`.
    fn delete_src_range(&mut self, k: &SrcRange4Key) -> Result<(), ExtWriteError<Self::Error>> {
        let _ = k;
        Err(ExtWriteError::Unsupported {
            op: "delete_src_range",
        })
    }
}

/// The error of the [`MapWriter`] methods that have a default implementation.
#[derive(Debug, thiserror::Error)]
pub enum ExtWriteError<E> {
    /// The writer's own error.
    #[error(transparent)]
    Map(#[from] E),
    /// The writer does not implement this method.
    #[error(
        "this map writer does not implement {op}; it needs the ClusterIP and source-range maps \
         (LB4_VIP_V1, LB4_SRC_V2)"
    )]
    Unsupported { op: &'static str },
}

impl<E: std::error::Error + Send + Sync + 'static> ExtWriteError<E> {
    /// The writer's error as itself, so callers can match it by type.
    fn boxed(self) -> Box<dyn std::error::Error + Send + Sync> {
        match self {
            ExtWriteError::Map(e) => Box::new(e),
            other => Box::new(other),
        }
    }
}

/// How many writes of each kind [`apply_plan`] made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub put_backends: usize,
    pub put_slots: usize,
    pub put_services: usize,
    pub delete_slots: usize,
    pub delete_services: usize,
    pub delete_backends: usize,
    pub put_vips: usize,
    pub delete_vips: usize,
    pub put_src_ranges: usize,
    pub delete_src_ranges: usize,
}

impl ApplyStats {
    pub fn total(&self) -> usize {
        self.put_backends
            + self.put_slots
            + self.put_services
            + self.delete_slots
            + self.delete_services
            + self.delete_backends
            + self.put_vips
            + self.delete_vips
            + self.put_src_ranges
            + self.delete_src_ranges
    }

    fn count(&mut self, op: &Op) {
        match op {
            Op::PutBackend { .. } => self.put_backends += 1,
            Op::PutSlot { .. } => self.put_slots += 1,
            Op::PutService { .. } => self.put_services += 1,
            Op::DeleteSlot { .. } => self.delete_slots += 1,
            Op::DeleteService { .. } => self.delete_services += 1,
            Op::DeleteBackend { .. } => self.delete_backends += 1,
            Op::PutVip { .. } => self.put_vips += 1,
            Op::DeleteVip { .. } => self.delete_vips += 1,
            Op::PutSrcRange { .. } => self.put_src_ranges += 1,
            Op::DeleteSrcRange { .. } => self.delete_src_ranges += 1,
        }
    }
}

/// A map write failed. The writes before it were made and recorded in the state, so the next
/// plan starts from the truth; nothing after it was attempted.
#[derive(Debug, thiserror::Error)]
#[error(
    "BPF map update {} of {total} failed ({op}); the {index} before it were applied and the next sync retries the rest",
    index + 1
)]
pub struct ApplyError {
    /// 0-based position of the failed op in the plan.
    pub index: usize,
    pub total: usize,
    pub op: Op,
    /// The writes made before the failure.
    pub applied: ApplyStats,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Performs the plan's writes in order, recording each successful one in `state`. Stops at
/// the first failure.
#[expect(
    clippy::result_large_err,
    reason = "the error is built once per failed sync and read whole by the caller"
)]
pub fn apply_plan<W: MapWriter>(
    state: &mut MapState,
    plan: &Plan,
    w: &mut W,
) -> Result<ApplyStats, ApplyError> {
    let mut stats = ApplyStats::default();
    // Before any entry publishes a new ID: a new service never inherits a predecessor's counts.
    for id in fresh_service_ids(state, plan) {
        if let Err(e) = w.reset_service_counter(id) {
            // Counters only: programming the service matters more than its statistics.
            log::warn!("could not zero the packet counters of service ID {id}: {e}");
        }
    }
    for (index, op) in plan.ops.iter().enumerate() {
        let result = match op {
            Op::PutBackend { id, backend } => {
                w.put_backend(*id, backend).map_err(ExtWriteError::Map)
            }
            Op::PutSlot { key, value } | Op::PutService { key, value } => {
                w.put_service(key, value).map_err(ExtWriteError::Map)
            }
            Op::DeleteSlot { key } | Op::DeleteService { key } => {
                w.delete_service(key).map_err(ExtWriteError::Map)
            }
            Op::DeleteBackend { id } => w.delete_backend(*id).map_err(ExtWriteError::Map),
            Op::PutVip { addr_be, value } => w.put_vip(*addr_be, value),
            Op::DeleteVip { addr_be } => w.delete_vip(*addr_be),
            Op::PutSrcRange { key } => w.put_src_range(key),
            Op::DeleteSrcRange { key } => w.delete_src_range(key),
        };
        if let Err(e) = result {
            return Err(ApplyError {
                index,
                total: plan.ops.len(),
                op: *op,
                applied: stats,
                source: e.boxed(),
            });
        }
        state.apply(op);
        stats.count(op);
    }
    Ok(stats)
}

/// The service IDs `plan` publishes that no entry of `state` uses yet (new or reused IDs),
/// in order: their per-service counters must start from zero.
pub fn fresh_service_ids(state: &MapState, plan: &Plan) -> Vec<u32> {
    let in_use: HashSet<u32> = state.service_entries().map(|(_, v)| v.svc_id).collect();
    let mut seen = HashSet::new();
    plan.ops
        .iter()
        .filter_map(|op| match op {
            Op::PutService { value, .. } => Some(value.svc_id),
            _ => None,
        })
        .filter(|id| !in_use.contains(id) && seen.insert(*id))
        .collect()
}

/// In-memory maps, for tests and dry runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemMaps {
    pub services: BTreeMap<Svc4Key, Svc4Value>,
    pub backends: BTreeMap<u32, Backend4>,
    pub vips: BTreeMap<u32, VipValue>,
    pub src_ranges: HashMap<SrcRange4Key, u8>,
}

impl MemMaps {
    /// The model of these maps, as an agent restarting on them would build it.
    pub fn state(&self) -> (MapState, Vec<String>) {
        MapState::from_maps(
            self.services.iter().map(|(k, v)| (*k, *v)),
            self.backends.iter().map(|(k, v)| (*k, *v)),
            self.vips.iter().map(|(k, v)| (*k, *v)),
            self.src_ranges.iter().map(|(k, v)| (*k, *v)),
        )
    }

    /// Every service entry a reader cannot use as flagged, as messages: slots `1..=count`
    /// that do not all lead to an existing backend, or `TWO_SCOPES` without the internal
    /// entry. Empty when a reader can use every service.
    pub fn broken_services(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (k, v) in self.services.iter().filter(|(k, _)| k.slot == 0) {
            if k.scope == scope::EXTERNAL
                && v.flags & svc_flags::TWO_SCOPES != 0
                && !self.services.contains_key(&k.with_scope(scope::INTERNAL))
            {
                out.push(format!(
                    "{}: TWO_SCOPES without its internal entry",
                    fmt_key(k)
                ));
            }
            for s in 1..=v.count {
                match self.services.get(&Svc4Key { slot: s, ..*k }) {
                    None => out.push(format!("{}: slot {s} of {} missing", fmt_key(k), v.count)),
                    Some(sv) if !self.backends.contains_key(&sv.backend_id) => {
                        out.push(format!(
                            "{}: slot {s} -> missing backend {}",
                            fmt_key(k),
                            sv.backend_id
                        ));
                    }
                    Some(_) => {}
                }
            }
        }
        out
    }
}

impl MapWriter for MemMaps {
    type Error = Infallible;

    fn put_backend(&mut self, id: u32, b: &Backend4) -> Result<(), Infallible> {
        self.backends.insert(id, *b);
        Ok(())
    }

    fn put_service(&mut self, k: &Svc4Key, v: &Svc4Value) -> Result<(), Infallible> {
        self.services.insert(*k, *v);
        Ok(())
    }

    fn delete_service(&mut self, k: &Svc4Key) -> Result<(), Infallible> {
        self.services.remove(k);
        Ok(())
    }

    fn delete_backend(&mut self, id: u32) -> Result<(), Infallible> {
        self.backends.remove(&id);
        Ok(())
    }

    fn put_vip(&mut self, addr_be: u32, v: &VipValue) -> Result<(), ExtWriteError<Infallible>> {
        self.vips.insert(addr_be, *v);
        Ok(())
    }

    fn delete_vip(&mut self, addr_be: u32) -> Result<(), ExtWriteError<Infallible>> {
        self.vips.remove(&addr_be);
        Ok(())
    }

    fn put_src_range(&mut self, k: &SrcRange4Key) -> Result<(), ExtWriteError<Infallible>> {
        self.src_ranges.insert(*k, SRC_RANGE_ALLOWED);
        Ok(())
    }

    fn delete_src_range(&mut self, k: &SrcRange4Key) -> Result<(), ExtWriteError<Infallible>> {
        self.src_ranges.remove(k);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
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
            let stats =
                apply_plan(state, &Plan { ops: vec![*op] }, maps).expect("MemMaps never fails");
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
            .filter(|(_, ds)| {
                ds.flags & svc_flags::SOURCE_RANGES != 0 && !ds.source_ranges.is_empty()
            })
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
        apply_plan(&mut state, &Plan { ops: ops.to_vec() }, &mut maps)
            .expect("MemMaps never fails");
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
            format!(
                "put service 198.51.100.1:80/TCP = 1 backends (service ID 1, flags {local:#x})"
            )
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
                    value: Svc4Value::service(
                        2,
                        int_id,
                        svc_flags::NODE_PORT | svc_flags::AFFINITY
                    )
                    .with_affinity(60),
                },
                Op::PutService {
                    key: svc4_key(&x, 0),
                    value: Svc4Value::service(1, ext_id, local | svc_flags::AFFINITY)
                        .with_affinity(60),
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
}
