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
pub(super) struct Alloc {
    pub(super) next: u32,
    /// One past the highest ID (`u32::MAX` for backends: practically unbounded).
    pub(super) limit: u32,
    pub(super) in_use: HashSet<u32>,
}

impl Alloc {
    pub(super) fn take(&mut self) -> Option<u32> {
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
