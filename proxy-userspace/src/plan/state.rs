//! [`MapState`]: the model of what the maps hold, entry by entry (including entries that do
//! not fit the model), the ID allocators, and the services it derives from the entries.
use super::*;
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
pub(super) struct Group {
    pub(super) entry: Option<Svc4Value>,
    pub(super) slots: BTreeMap<u16, Svc4Value>,
}

/// The contents of the service and backend maps, and the ID allocators.
///
/// Change it only through [`MapState::apply`] after a successful write (as [`apply_plan`]
/// does); the views [`services`](Self::services) and [`backends`](Self::backends) are derived
/// from the raw entries and kept in step by `apply`.
#[derive(Clone, Debug)]
pub struct MapState {
    pub(super) groups: BTreeMap<Svc4Key, Group>,
    pub(super) raw_backends: BTreeMap<u32, Backend4>,
    /// The ClusterIP map, keyed by `addr_be`.
    pub(super) vips: BTreeMap<u32, VipValue>,
    pub(super) src_ranges: BTreeMap<SrcRange, u8>,
    pub(super) services: BTreeMap<ServiceKey, ProgrammedService>,
    pub(super) backends: BTreeMap<u32, BackendAddr>,
    pub(super) next_backend_id: u32,
    pub(super) next_svc_id: u32,
    /// Service IDs are `1..svc_id_limit`: they index the per-service counter map.
    pub(super) svc_id_limit: u32,
    /// Indexes kept in step with the entries, so a plan for a few services never walks all
    /// of them: how many service-map values carry each service ID and each backend ID, and
    /// the IDs of each backend address ([`backends`](Self::backends) inverted).
    pub(super) svc_id_uses: HashMap<u32, u32>,
    pub(super) backend_id_uses: HashMap<u32, u32>,
    pub(super) ids_by_addr: HashMap<BackendAddr, BTreeSet<u32>>,
    /// Bumped by every recorded write: a caller that remembers it knows whether anyone else
    /// changed the model since (`sync::Reconciler` plans incrementally only then).
    pub(super) writes: u64,
}

/// Adds `delta` (+1/-1) to `id`'s count, dropping it at zero.
fn count_use(uses: &mut HashMap<u32, u32>, id: u32, add: bool) {
    if add {
        *uses.entry(id).or_default() += 1;
    } else if let Some(n) = uses.get_mut(&id) {
        *n -= 1;
        if *n == 0 {
            uses.remove(&id);
        }
    }
}

impl Default for MapState {
    fn default() -> Self {
        Self::new()
    }
}

pub(super) fn group_key(k: &Svc4Key) -> Svc4Key {
    Svc4Key { slot: 0, ..*k }
}

/// The backend ID a slot holds, if it is exactly what this agent writes for `svc_id`.
pub(super) fn slot_backend(v: Option<&Svc4Value>, svc_id: u32) -> u32 {
    match v {
        Some(v) if v.backend_id != 0 && *v == Svc4Value::slot(v.backend_id, svc_id) => v.backend_id,
        _ => 0,
    }
}

pub(super) fn derive(key0: &Svc4Key, g: &Group) -> Option<(ServiceKey, ProgrammedService)> {
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

pub(super) fn fmt_key(k: &Svc4Key) -> String {
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

pub(super) fn fmt_backend(b: &Backend4) -> String {
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
pub(super) fn succ_u32(id: u32) -> u32 {
    id.checked_add(1).unwrap_or(1)
}

/// The ID after `id`, wrapping to 1 at `limit` (service IDs index a map of `limit` entries).
pub(super) fn succ_below(id: u32, limit: u32) -> u32 {
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
            svc_id_uses: HashMap::new(),
            backend_id_uses: HashMap::new(),
            ids_by_addr: HashMap::new(),
            writes: 0,
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
        let values: Vec<Svc4Value> = state.service_entries().map(|(_, v)| v).collect();
        for v in values {
            count_use(&mut state.svc_id_uses, v.svc_id, true);
            count_use(&mut state.backend_id_uses, v.backend_id, true);
        }
        for (id, addr) in &state.backends {
            state.ids_by_addr.entry(*addr).or_default().insert(*id);
        }
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

    /// How many writes were recorded ([`apply`](Self::apply)) since this model was made.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Whether some service-map value carries service ID `id`.
    pub(super) fn svc_id_used(&self, id: u32) -> bool {
        self.svc_id_uses.contains_key(&id)
    }

    /// Whether backend ID `id` has an entry or some service-map value refers to it.
    pub(super) fn backend_id_used(&self, id: u32) -> bool {
        self.raw_backends.contains_key(&id) || self.backend_id_uses.contains_key(&id)
    }

    /// The backend ID of `addr` a plan uses: the lowest, should the maps hold it twice.
    pub(super) fn backend_id_of(&self, addr: &BackendAddr) -> Option<u32> {
        self.ids_by_addr.get(addr)?.first().copied()
    }

    fn set_backend(&mut self, id: u32, addr: Option<BackendAddr>) {
        if let Some(old) = self.backends.remove(&id)
            && let Some(ids) = self.ids_by_addr.get_mut(&old)
        {
            ids.remove(&id);
            if ids.is_empty() {
                self.ids_by_addr.remove(&old);
            }
        }
        if let Some(addr) = addr {
            self.backends.insert(id, addr);
            self.ids_by_addr.entry(addr).or_default().insert(id);
        }
    }

    /// Records a write that succeeded.
    pub fn apply(&mut self, op: &Op) {
        self.writes += 1;
        match *op {
            Op::PutBackend { id, backend } => {
                self.raw_backends.insert(id, backend);
                self.set_backend(id, backend_addr(&backend).filter(|_| id != 0));
                self.bump_backend_id(id);
            }
            Op::DeleteBackend { id } => {
                self.raw_backends.remove(&id);
                self.set_backend(id, None);
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

    pub(super) fn update_group(&mut self, key: &Svc4Key, value: Option<Svc4Value>) {
        let k0 = group_key(key);
        let g = self.groups.entry(k0).or_default();
        let old = if key.slot == 0 {
            g.entry
        } else {
            g.slots.get(&key.slot).copied()
        };
        for (v, add) in [(old, false), (value, true)] {
            if let Some(v) = v {
                count_use(&mut self.svc_id_uses, v.svc_id, add);
                count_use(&mut self.backend_id_uses, v.backend_id, add);
            }
        }
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

    pub(super) fn bump_backend_id(&mut self, id: u32) {
        if id >= self.next_backend_id {
            self.next_backend_id = succ_u32(id);
        }
    }

    pub(super) fn bump_svc_id(&mut self, id: u32) {
        // Past the limit, the allocator wraps to 1 on its next take.
        if id >= self.next_svc_id {
            self.next_svc_id = succ_u32(id);
        }
    }
}
