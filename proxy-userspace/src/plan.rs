//! Planning: what the service and backend maps hold + what they should hold -> the ordered map
//! writes that get from one to the other without a reader ever seeing a broken service.
//!
//! [`MapState`] mirrors the maps exactly, entry by entry, including entries that do not fit the
//! model (left over by a crash, an older agent, or a plan that stopped half way). That is what
//! lets [`plan`] compare every entry it wants with the entry that is there, write only the
//! differences, and delete everything else; and lets [`apply_plan`] stop at any error with the
//! model still describing the maps.
//!
//! Ordering (make before break): new backends, then slots, then service entries (so a count
//! only grows after its slots exist and only shrinks after the slots below it are final), then
//! slots above the new counts, then removed services (entry first, so the count disappears
//! before its slots), then unreferenced backends. At every step, each slot `1..=count` of every
//! service entry points at an existing backend.
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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::fmt;

use proxy_common::{Backend4, Svc4Key, Svc4Value, svc_flags};

use crate::abi::{self, Protocol};
use crate::translate::{BackendAddr, Desired, DesiredService, ServiceKey};

/// The service-map key of `key`'s slot `slot` (0 = the service entry).
pub fn svc4_key(key: &ServiceKey, slot: u16) -> Svc4Key {
    Svc4Key::new(
        abi::addr_be(key.ip),
        abi::port_be(key.port),
        key.protocol.number(),
        slot,
    )
}

/// The service a service-map key belongs to, if it is one this agent writes (known protocol,
/// scope 0, zero padding).
pub fn service_key(key: &Svc4Key) -> Option<ServiceKey> {
    if key.scope != 0 || key._pad != [0; 2] {
        return None;
    }
    Some(ServiceKey {
        ip: abi::addr_from_be(key.addr_be),
        port: abi::port_from_be(key.port_be),
        protocol: Protocol::from_number(key.proto)?,
    })
}

/// The backend-map value for `b`.
pub fn backend4(b: &BackendAddr) -> Backend4 {
    Backend4::new(
        abi::addr_be(b.ip),
        abi::port_be(b.port),
        b.protocol.number(),
    )
}

/// The address a backend-map value leads to, if it is one this agent writes.
pub fn backend_addr(b: &Backend4) -> Option<BackendAddr> {
    let addr = BackendAddr {
        ip: abi::addr_from_be(b.addr_be),
        port: abi::port_from_be(b.port_be),
        protocol: Protocol::from_number(b.proto)?,
    };
    (backend4(&addr) == *b).then_some(addr)
}

/// The slot-0 flags of a desired service.
fn service_flags(_: &DesiredService) -> u32 {
    // Every entry is a ClusterIP for now; NodePort/LB/externalIP entries will set their own.
    svc_flags::CLUSTER_IP
}

/// The most slots a service can have (slot numbers are `u16`, slot 0 is the entry).
pub const MAX_BACKENDS_PER_SERVICE: usize = u16::MAX as usize;

/// A service entry as programmed, read through the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgrammedService {
    pub svc_id: u16,
    pub flags: u32,
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
    services: BTreeMap<ServiceKey, ProgrammedService>,
    backends: BTreeMap<u32, BackendAddr>,
    next_backend_id: u32,
    next_svc_id: u16,
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
fn slot_backend(v: Option<&Svc4Value>, svc_id: u16) -> u32 {
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
    if k.scope != 0 || k._pad != [0; 2] {
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

fn succ_u16(id: u16) -> u16 {
    id.checked_add(1).unwrap_or(1)
}

impl MapState {
    /// Empty maps.
    pub fn new() -> Self {
        Self {
            groups: BTreeMap::new(),
            raw_backends: BTreeMap::new(),
            services: BTreeMap::new(),
            backends: BTreeMap::new(),
            next_backend_id: 1,
            next_svc_id: 1,
        }
    }

    /// Rebuilds the model from the maps' contents (agent restart), with a warning for every
    /// entry that is not as this agent would have written it. [`plan`] rewrites or deletes
    /// such entries. The allocators continue after the highest IDs found anywhere, including
    /// IDs that slots refer to, so no new ID can alias a stale one.
    pub fn from_maps(
        services: impl IntoIterator<Item = (Svc4Key, Svc4Value)>,
        backends: impl IntoIterator<Item = (u32, Backend4)>,
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
        let mut svc_ids: HashMap<u16, &Svc4Key> = HashMap::new();
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
            if e != Svc4Value::service(e.count, e.svc_id, e.flags) {
                out.push(format!(
                    "service {name}: entry has non-zero backend_id/reserved fields: {e:?}"
                ));
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

    fn bump_svc_id(&mut self, id: u16) {
        if id >= self.next_svc_id {
            self.next_svc_id = succ_u16(id);
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

/// An allocator for IDs: increasing from `next`, skipping 0 and IDs in use, wrapping.
struct Alloc<T> {
    next: T,
    in_use: HashSet<T>,
}

macro_rules! alloc_impl {
    ($t:ty, $succ:ident) => {
        impl Alloc<$t> {
            fn take(&mut self) -> Option<$t> {
                // Bounded: at most every ID is tried once.
                for _ in 0..=<$t>::MAX {
                    let id = self.next;
                    self.next = $succ(id);
                    if id != 0 && self.in_use.insert(id) {
                        return Some(id);
                    }
                }
                None
            }
        }
    };
}
alloc_impl!(u32, succ_u32);
alloc_impl!(u16, succ_u16);

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

/// Computes the writes from `current` to `desired`. Pure; see the module docs for the order.
pub fn plan(current: &MapState, desired: &Desired) -> Plan {
    let mut backend_ids = Alloc {
        next: current.next_backend_id,
        in_use: current
            .raw_backends
            .keys()
            .copied()
            .chain(current.service_entries().map(|(_, v)| v.backend_id))
            .collect(),
    };
    let mut svc_ids = Alloc {
        next: current.next_svc_id,
        in_use: current.service_entries().map(|(_, v)| v.svc_id).collect(),
    };
    // The lowest ID wins should the maps hold one address twice; the other is cleaned up.
    let mut id_of: HashMap<BackendAddr, u32> = HashMap::new();
    for (id, addr) in &current.backends {
        id_of.entry(*addr).or_insert(*id);
    }

    let mut put_backends = Vec::new();
    let mut put_slots = Vec::new();
    let mut put_services = Vec::new();
    let mut delete_slots = Vec::new();
    let mut referenced: HashSet<u32> = HashSet::new();
    let mut claimed_svc_ids: HashSet<u16> = HashSet::new();
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
                        backend: backend4(b),
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
        kept.insert(key0);

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
        let value = Svc4Value::service(count, svc_id, service_flags(ds));
        if group.and_then(|g| g.entry) != Some(value) {
            put_services.push(Op::PutService { key: key0, value });
        }
        if let Some(g) = group {
            for slot in g.slots.range(count.saturating_add(1)..).map(|(s, _)| *s) {
                delete_slots.push(Op::DeleteSlot {
                    key: svc4_key(key, slot),
                });
            }
        }
    }

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

    let mut ops = put_backends;
    ops.extend(put_slots);
    ops.extend(put_services);
    ops.extend(delete_slots);
    ops.extend(delete_services);
    ops.extend(delete_backends);
    Plan { ops }
}

/// Writes to the service and backend maps. Slots and service entries both go through
/// `put_service`/`delete_service`. Deleting a key that is not there is `Ok`.
pub trait MapWriter {
    type Error: std::error::Error + Send + Sync + 'static;
    fn put_backend(&mut self, id: u32, b: &Backend4) -> Result<(), Self::Error>;
    fn put_service(&mut self, k: &Svc4Key, v: &Svc4Value) -> Result<(), Self::Error>;
    fn delete_service(&mut self, k: &Svc4Key) -> Result<(), Self::Error>;
    fn delete_backend(&mut self, id: u32) -> Result<(), Self::Error>;
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
}

impl ApplyStats {
    pub fn total(&self) -> usize {
        self.put_backends
            + self.put_slots
            + self.put_services
            + self.delete_slots
            + self.delete_services
            + self.delete_backends
    }

    fn count(&mut self, op: &Op) {
        match op {
            Op::PutBackend { .. } => self.put_backends += 1,
            Op::PutSlot { .. } => self.put_slots += 1,
            Op::PutService { .. } => self.put_services += 1,
            Op::DeleteSlot { .. } => self.delete_slots += 1,
            Op::DeleteService { .. } => self.delete_services += 1,
            Op::DeleteBackend { .. } => self.delete_backends += 1,
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
pub fn apply_plan<W: MapWriter>(
    state: &mut MapState,
    plan: &Plan,
    w: &mut W,
) -> Result<ApplyStats, ApplyError> {
    let mut stats = ApplyStats::default();
    for (index, op) in plan.ops.iter().enumerate() {
        let result = match op {
            Op::PutBackend { id, backend } => w.put_backend(*id, backend),
            Op::PutSlot { key, value } | Op::PutService { key, value } => w.put_service(key, value),
            Op::DeleteSlot { key } | Op::DeleteService { key } => w.delete_service(key),
            Op::DeleteBackend { id } => w.delete_backend(*id),
        };
        if let Err(e) = result {
            return Err(ApplyError {
                index,
                total: plan.ops.len(),
                op: *op,
                applied: stats,
                source: Box::new(e),
            });
        }
        state.apply(op);
        stats.count(op);
    }
    Ok(stats)
}

/// In-memory maps, for tests and dry runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemMaps {
    pub services: BTreeMap<Svc4Key, Svc4Value>,
    pub backends: BTreeMap<u32, Backend4>,
}

impl MemMaps {
    /// The model of these maps, as an agent restarting on them would build it.
    pub fn state(&self) -> (MapState, Vec<String>) {
        MapState::from_maps(
            self.services.iter().map(|(k, v)| (*k, *v)),
            self.backends.iter().map(|(k, v)| (*k, *v)),
        )
    }

    /// Every service entry whose slots `1..=count` do not all lead to an existing backend,
    /// as messages. Empty when a reader can use every service.
    pub fn broken_services(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (k, v) in self.services.iter().filter(|(k, _)| k.slot == 0) {
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
        ServiceKey {
            ip: ip(ip_),
            port,
            protocol: TCP,
        }
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
            self.0.insert(
                k,
                DesiredService {
                    name: format!("test/{k}"),
                    backends,
                },
            );
            self
        }
    }

    fn put_be(id: u32, b: BackendAddr) -> Op {
        Op::PutBackend {
            id,
            backend: backend4(&b),
        }
    }
    fn put_slot(k: ServiceKey, slot: u16, backend_id: u32, svc_id: u16) -> Op {
        Op::PutSlot {
            key: svc4_key(&k, slot),
            value: Svc4Value::slot(backend_id, svc_id),
        }
    }
    fn put_svc(k: ServiceKey, count: u16, svc_id: u16) -> Op {
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
        let p = plan(&state, d);
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
        let p = plan(state, d);
        replay(state, maps, &p);
        assert_eq!(
            resolved(maps),
            wanted(d),
            "maps after the plan lead where desired"
        );
        assert_eq!(plan(state, d), Plan::default(), "a second plan is empty");
        let (restored, _) = maps.state();
        assert_eq!(
            plan(&restored, d),
            Plan::default(),
            "a restarted agent plans nothing"
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
                backend_ids: vec![1, 2]
            }
        );
        assert!(plan(&restored, &d.0).is_empty());
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

    #[test]
    fn id_allocators_wrap_and_skip_ids_in_use() {
        let a = key("10.96.0.1", 80);
        let n = key("10.96.0.9", 80);
        let maps = entries(&[
            put_be(u32::MAX, be("10.0.0.1", 80)),
            put_be(1, be("10.0.0.2", 80)),
            put_slot(a, 1, u32::MAX, u16::MAX),
            put_slot(a, 2, 1, u16::MAX),
            put_svc(a, 2, u16::MAX),
            put_svc(key("10.96.0.2", 80), 0, 1),
        ]);
        let (mut state, warnings) = maps.state();
        assert!(warnings.is_empty(), "{warnings:#?}");
        let mut maps = maps;
        let d = desired()
            .svc(a, &[be("10.0.0.1", 80), be("10.0.0.2", 80)])
            .svc(n, &[be("10.0.0.3", 80)]);
        let p = converge(&mut state, &mut maps, &d.0);
        // Backend IDs wrap past u32::MAX to 1, which is taken: 2. Service IDs likewise: 2.
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
            scope: 1,
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
                    "service 10.96.0.1:80/TCP: slot 2 is not a valid slot of service ID 1: Svc4Value { backend_id: 1, count: 0, svc_id: 9, flags: 0, _reserved: 0 }",
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
                        backend: Backend4 {
                            flags: 1,
                            ..backend4(&e1)
                        },
                    },
                    put_be(3, e1),
                    put_be(4, e1),
                ],
                expected: vec![
                    "backend 0 (10.0.0.1:80/TCP) uses the reserved ID 0",
                    "backend 1 (1.0.0.0:512/proto 99, flags 0x0) is not a valid backend entry",
                    "backend 2 (10.0.0.1:80/TCP, flags 0x1) is not a valid backend entry",
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
                    "service 10.96.0.1:80/TCP (scope 1, pad [0, 0]): key with unknown protocol, scope or padding",
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
                    "service 10.96.0.1:80/TCP: entry has non-zero backend_id/reserved fields: Svc4Value { backend_id: 5, count: 0, svc_id: 1, flags: 1, _reserved: 0 }",
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
                let p = plan(&state, &target.0);
                apply_plan(&mut state, &p, &mut maps).expect("MemMaps never fails");
                assert_model_matches(&state, &maps, c.name);
                assert_eq!(
                    resolved(&maps),
                    wanted(&target.0),
                    "{} -> target {i}: maps lead where desired",
                    c.name
                );
                assert!(
                    plan(&state, &target.0).is_empty(),
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
    }

    #[test]
    fn apply_plan_stops_at_the_first_error_with_a_true_state() {
        let a = key("10.96.0.1", 80);
        let b = key("10.96.0.2", 80);
        let (e1, e2, e3) = (be("10.0.0.1", 80), be("10.0.0.2", 80), be("10.0.0.3", 80));
        let from = desired().svc(a, &[e1, e2]).svc(b, &[e2]);
        let to = desired().svc(a, &[e3, e2]).svc(key("10.96.0.3", 80), &[e1]);
        let (maps, state) = programmed(&from.0);
        let total = plan(&state, &to.0).ops.len();
        assert!(total > 5, "the plan exercises several phases");
        for fail_at in 0..total {
            let mut w = Failing {
                inner: maps.clone(),
                writes: 0,
                fail_at,
            };
            let mut st = state.clone();
            let p = plan(&st, &to.0);
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
        let p = plan(&state, &desired().svc(a, &[be("10.0.0.3", 80)]).0);
        let stats = apply_plan(&mut state, &p, &mut maps).expect("MemMaps never fails");
        assert_eq!(
            stats,
            ApplyStats {
                put_backends: 1,
                put_slots: 1,
                put_services: 1,
                delete_slots: 1,
                delete_services: 1,
                delete_backends: 2
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
            let svc_ids_before: BTreeMap<ServiceKey, u16> = state
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
        let k = ServiceKey {
            ip: ip("10.96.0.1"),
            port: 53,
            protocol: Protocol::Udp,
        };
        let sk = svc4_key(&k, 4);
        assert_eq!(sk.addr_be.to_ne_bytes(), [10, 96, 0, 1]);
        assert_eq!(sk.port_be.to_ne_bytes(), [0, 53]);
        assert_eq!((sk.proto, sk.slot, sk.scope), (17, 4, 0));
        assert_eq!(service_key(&sk), Some(k));
        assert_eq!(service_key(&Svc4Key { scope: 1, ..sk }), None);
        assert_eq!(service_key(&Svc4Key { proto: 1, ..sk }), None);
        let b = BackendAddr {
            ip: ip("10.0.0.1"),
            port: 8080,
            protocol: Protocol::Sctp,
        };
        assert_eq!(backend_addr(&backend4(&b)), Some(b));
        assert_eq!(
            backend_addr(&Backend4 {
                flags: 1,
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
}
