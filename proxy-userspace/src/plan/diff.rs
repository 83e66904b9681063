//! [`plan`]: desired vs current -> the ordered list of map writes ([`Op`]) that gets from one
//! to the other make-before-break, with backend IDs and slots assigned.
use super::*;
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
pub(super) struct Alloc<'a> {
    pub(super) next: u32,
    /// One past the highest ID (`u32::MAX` for backends: practically unbounded).
    pub(super) limit: u32,
    /// IDs in use before this plan (answered by the model's indexes, not a copied set).
    pub(super) used: Box<dyn Fn(u32) -> bool + 'a>,
    /// At least how many IDs `used` holds: bounds the search.
    pub(super) used_count: usize,
    /// IDs this plan took.
    pub(super) taken: HashSet<u32>,
}

impl Alloc<'_> {
    pub(super) fn take(&mut self) -> Option<u32> {
        // Bounded: at most every ID is tried once (and in practice the first free one is
        // found after at most as many tries as IDs in use).
        for _ in 0..self.used_count + self.taken.len() + 2 {
            let id = self.next;
            self.next = succ_below(id, self.limit);
            if id != 0 && id < self.limit && !(self.used)(id) && self.taken.insert(id) {
                return Some(id);
            }
        }
        None
    }
}

/// Where the slots of a service go: backends already in a slot within the new count stay
/// there; the other positions get the remaining backends in `wanted` order.
pub(super) fn assign_slots(old: &[u32], wanted: &[u32]) -> Vec<u32> {
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
    plan_full(current, desired, cluster_ips).0
}

/// [`plan`], and whether every desired entry got its IDs (`false`: some service or backend
/// was skipped because its IDs ran out, so the maps will not be `desired` after it).
pub fn plan_full(
    current: &MapState,
    desired: &Desired,
    cluster_ips: &BTreeSet<Ipv4Addr>,
) -> (Plan, bool) {
    let terminating = terminating_backends(desired);
    let mut p = Planner::new(current, |b: &BackendAddr| terminating.contains(b));
    for (key, ds) in desired {
        p.entry(key, ds);
    }
    // Backends that stay but became (or stopped being) terminating: rewritten in place, same
    // ID, so their flows keep validating.
    let flag_updates: Vec<Op> = current
        .backends
        .iter()
        .filter(|(id, _)| p.referenced.contains(*id))
        .filter_map(|(id, addr)| p.flag_update(*id, addr))
        .collect();
    let delete_services = current
        .groups
        .iter()
        .filter(|(k0, _)| !p.kept.contains(*k0))
        .flat_map(|(k0, g)| delete_group(k0, g))
        .collect();
    let delete_backends = current
        .raw_backends
        .keys()
        .filter(|id| !p.referenced.contains(*id))
        .map(|id| Op::DeleteBackend { id: *id })
        .collect();
    let delete_ranges = current
        .src_ranges
        .keys()
        .filter(|r| !p.wanted_ranges.contains(*r))
        .map(|r| Op::DeleteSrcRange { key: r.key() })
        .collect();
    let wanted_vips: BTreeSet<u32> = cluster_ips.iter().map(|ip| abi::addr_be(*ip)).collect();
    let put_vips = wanted_vips
        .iter()
        .filter(|a| current.vips.get(*a) != Some(&CLUSTER_IP_VIP))
        .map(|a| Op::PutVip {
            addr_be: *a,
            value: CLUSTER_IP_VIP,
        })
        .collect();
    let delete_vips = current
        .vips
        .keys()
        .filter(|a| !wanted_vips.contains(*a))
        .map(|a| Op::DeleteVip { addr_be: *a })
        .collect();
    let complete = p.complete;
    let plan = p.finish(Rest {
        flag_updates,
        put_vips,
        delete_services,
        delete_ranges,
        delete_vips,
        delete_backends,
    });
    (plan, complete)
}

/// What changed between the desired state a model was last brought to and the new one:
/// the input of [`plan_changes`].
#[derive(Clone, Debug, Default)]
pub struct Changes {
    /// Service keys added, removed or changed.
    pub keys: BTreeSet<ServiceKey>,
    /// Every backend address in the old or new entry of a changed key.
    pub backends: HashSet<BackendAddr>,
    pub vips_added: BTreeSet<Ipv4Addr>,
    pub vips_removed: BTreeSet<Ipv4Addr>,
}

/// [`plan`] for a model that holds exactly what [`plan`] (or this) last brought it to, given
/// what changed since: only the changed keys and backends are visited, so its cost follows
/// the change, not the maps. `refs` counts the backends' uses in the new `desired`. Writes
/// the same maps as [`plan`] would; `None` when some ID ran out (then use [`plan`]).
pub fn plan_changes(
    current: &MapState,
    desired: &Desired,
    changes: &Changes,
    refs: &BackendRefs,
) -> Option<Plan> {
    let mut p = Planner::new(current, |b: &BackendAddr| refs.terminating(b));
    for key in &changes.keys {
        if let Some(ds) = desired.get(key) {
            p.entry(key, ds);
        }
    }
    if !p.complete {
        return None;
    }
    let mut flag_updates = BTreeMap::new();
    let mut delete_backends = BTreeSet::new();
    for addr in &changes.backends {
        if refs.referenced(addr) {
            if let Some(id) = current.backend_id_of(addr)
                && let Some(op) = p.flag_update(id, addr)
            {
                flag_updates.insert(id, op);
            }
        } else if let Some(ids) = current.ids_by_addr.get(addr) {
            delete_backends.extend(ids.iter().copied());
        }
    }
    let mut delete_services = BTreeMap::new();
    let mut delete_ranges = BTreeSet::new();
    for key in &changes.keys {
        let k0 = svc4_key(key, 0);
        if !p.kept.contains(&k0)
            && let Some(g) = current.groups.get(&k0)
        {
            delete_services.insert(k0, delete_group(&k0, g));
        }
        if let Some(old) = current.services.get(key) {
            let from = SrcRange {
                svc_id: old.svc_id,
                addr: Ipv4Addr::UNSPECIFIED,
                prefixlen: 0,
            };
            delete_ranges.extend(
                current
                    .src_ranges
                    .range(from..)
                    .take_while(|(r, _)| r.svc_id == old.svc_id)
                    .filter(|(r, _)| !p.wanted_ranges.contains(*r))
                    .map(|(r, _)| *r),
            );
        }
    }
    let vip = |ip: &Ipv4Addr| abi::addr_be(*ip);
    Some(
        p.finish(Rest {
            flag_updates: flag_updates.into_values().collect(),
            put_vips: changes
                .vips_added
                .iter()
                .map(|ip| Op::PutVip {
                    addr_be: vip(ip),
                    value: CLUSTER_IP_VIP,
                })
                .collect(),
            delete_services: delete_services.into_values().flatten().collect(),
            delete_ranges: delete_ranges
                .into_iter()
                .map(|r| Op::DeleteSrcRange { key: r.key() })
                .collect(),
            delete_vips: changes
                .vips_removed
                .iter()
                .map(|ip| Op::DeleteVip { addr_be: vip(ip) })
                .collect(),
            delete_backends: delete_backends
                .into_iter()
                .map(|id| Op::DeleteBackend { id })
                .collect(),
        }),
    )
}

/// How often each backend address is used by a desired state, kept up to date entry by
/// entry: whether it is referenced at all (else its backend entry goes) and whether it is
/// terminating (the [`terminating_backends`] rule).
#[derive(Clone, Debug, Default)]
pub struct BackendRefs(HashMap<BackendAddr, (u32, u32)>);

impl BackendRefs {
    pub fn new(desired: &Desired) -> Self {
        let mut r = Self::default();
        for ds in desired.values() {
            r.count(ds, true);
        }
        r
    }

    /// Counts (`add`) or uncounts one entry's backends: (as a ready backend, as a terminating
    /// one).
    pub fn count(&mut self, ds: &DesiredService, add: bool) {
        let fallback = ds.flags & svc_flags::TERMINATING_FALLBACK != 0;
        let uses = ds
            .backends
            .iter()
            .map(|b| (b, !fallback))
            .chain(ds.terminating.iter().map(|b| (b, false)));
        for (b, ready) in uses {
            let e = self.0.entry(*b).or_default();
            let n = if ready { &mut e.0 } else { &mut e.1 };
            *n = if add { *n + 1 } else { n.saturating_sub(1) };
            if *e == (0, 0) {
                self.0.remove(b);
            }
        }
    }

    pub fn referenced(&self, b: &BackendAddr) -> bool {
        self.0.contains_key(b)
    }

    pub fn terminating(&self, b: &BackendAddr) -> bool {
        self.0
            .get(b)
            .is_some_and(|(ready, term)| *ready == 0 && *term > 0)
    }
}

/// The deletes of one service's entry and slots.
fn delete_group(k0: &Svc4Key, g: &Group) -> Vec<Op> {
    g.entry
        .map(|_| Op::DeleteService { key: *k0 })
        .into_iter()
        .chain(g.slots.keys().map(|slot| Op::DeleteSlot {
            key: Svc4Key { slot: *slot, ..*k0 },
        }))
        .collect()
}

/// The writes after the per-entry ones, in the order they go after them.
struct Rest {
    flag_updates: Vec<Op>,
    put_vips: Vec<Op>,
    delete_services: Vec<Op>,
    delete_ranges: Vec<Op>,
    delete_vips: Vec<Op>,
    delete_backends: Vec<Op>,
}

/// The per-entry part of a plan, shared by [`plan_full`] and [`plan_changes`].
struct Planner<'a, T> {
    current: &'a MapState,
    terminating: T,
    backend_ids: Alloc<'a>,
    svc_ids: Alloc<'a>,
    /// Backends given an ID by this plan.
    new_ids: HashMap<BackendAddr, u32>,
    put_backends: Vec<Op>,
    put_ranges: Vec<Op>,
    wanted_ranges: HashSet<SrcRange>,
    put_slots: Vec<Op>,
    put_internal: Vec<Op>,
    put_services: Vec<Op>,
    delete_slots: Vec<Op>,
    referenced: HashSet<u32>,
    claimed_svc_ids: HashSet<u32>,
    kept: HashSet<Svc4Key>,
    /// Every entry got its IDs.
    complete: bool,
}

impl<'a, T: Fn(&BackendAddr) -> bool> Planner<'a, T> {
    fn new(current: &'a MapState, terminating: T) -> Self {
        Self {
            current,
            terminating,
            backend_ids: Alloc {
                next: current.next_backend_id,
                limit: u32::MAX,
                used: Box::new(|id| current.backend_id_used(id)),
                used_count: current.raw_backends.len() + current.backend_id_uses.len(),
                taken: HashSet::new(),
            },
            svc_ids: Alloc {
                next: current.next_svc_id,
                limit: current.svc_id_limit,
                used: Box::new(|id| current.svc_id_used(id)),
                used_count: current.svc_id_uses.len(),
                taken: HashSet::new(),
            },
            new_ids: HashMap::new(),
            put_backends: Vec::new(),
            put_ranges: Vec::new(),
            wanted_ranges: HashSet::new(),
            put_slots: Vec::new(),
            put_internal: Vec::new(),
            put_services: Vec::new(),
            delete_slots: Vec::new(),
            referenced: HashSet::new(),
            claimed_svc_ids: HashSet::new(),
            kept: HashSet::new(),
            complete: true,
        }
    }

    fn backend_value(&self, b: &BackendAddr) -> Backend4 {
        let flags = if (self.terminating)(b) {
            backend_flags::TERMINATING
        } else {
            0
        };
        backend4(b).with_flags(flags)
    }

    fn id_of(&self, b: &BackendAddr) -> Option<u32> {
        self.new_ids
            .get(b)
            .copied()
            .or_else(|| self.current.backend_id_of(b))
    }

    /// The rewrite of existing backend `id` when its terminating flag is no longer right.
    fn flag_update(&self, id: u32, addr: &BackendAddr) -> Option<Op> {
        let want = self.backend_value(addr);
        (self.current.raw_backends.get(&id) != Some(&want))
            .then_some(Op::PutBackend { id, backend: want })
    }

    /// The writes of one desired entry.
    fn entry(&mut self, key: &ServiceKey, ds: &DesiredService) {
        let current = self.current;
        let key0 = svc4_key(key, 0);
        let old = current.services.get(key);
        let svc_id = match old.map(|o| o.svc_id) {
            Some(id) if id != 0 && self.claimed_svc_ids.insert(id) => id,
            _ => match self.svc_ids.take() {
                Some(id) => {
                    self.claimed_svc_ids.insert(id);
                    id
                }
                None => {
                    log::warn!(
                        "service {key} ({}) not programmed: all service IDs are in use",
                        ds.name
                    );
                    self.complete = false;
                    return;
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
            let id = match self.id_of(b) {
                Some(id) => id,
                None => {
                    let Some(id) = self.backend_ids.take() else {
                        log::warn!(
                            "backend {b} of service {key} not programmed: all backend IDs are in use"
                        );
                        self.complete = false;
                        continue;
                    };
                    self.put_backends.push(Op::PutBackend {
                        id,
                        backend: self.backend_value(b),
                    });
                    self.new_ids.insert(*b, id);
                    id
                }
            };
            if seen.insert(id) {
                ids.push(id);
            }
        }
        self.referenced.extend(ids.iter().copied());
        // Draining (serving+terminating, not chosen) endpoints keep the backend they already
        // have, in no slot: established flows to them still validate, new ones never pick
        // them. One never programmed gets nothing (no flow can refer to it).
        for b in &ds.terminating {
            if let Some(id) = self.id_of(b) {
                self.referenced.insert(id);
            }
        }
        self.kept.insert(key0);

        if ds.flags & svc_flags::SOURCE_RANGES != 0 {
            for (net, prefix) in &ds.source_ranges {
                let r = SrcRange::new(svc_id, *net, *prefix);
                if self.wanted_ranges.insert(r)
                    && current.src_ranges.get(&r) != Some(&SRC_RANGE_ALLOWED)
                {
                    self.put_ranges.push(Op::PutSrcRange { key: r.key() });
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
                self.put_slots.push(Op::PutSlot {
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
                self.put_services.push(op);
            } else {
                self.put_internal.push(op);
            }
        }
        if let Some(g) = group {
            for slot in g.slots.range(count.saturating_add(1)..).map(|(s, _)| *s) {
                self.delete_slots.push(Op::DeleteSlot {
                    key: svc4_key(key, slot),
                });
            }
        }
    }

    fn finish(self, rest: Rest) -> Plan {
        let mut ops = self.put_backends;
        ops.extend(rest.flag_updates);
        ops.extend(self.put_ranges);
        ops.extend(self.put_slots);
        ops.extend(self.put_internal);
        ops.extend(self.put_services);
        ops.extend(rest.put_vips);
        ops.extend(self.delete_slots);
        ops.extend(rest.delete_services);
        ops.extend(rest.delete_ranges);
        ops.extend(rest.delete_vips);
        ops.extend(rest.delete_backends);
        Plan { ops }
    }
}
