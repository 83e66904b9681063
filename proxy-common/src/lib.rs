//! The ABI shared by the eBPF programs and the userspace agent.
//!
//! Every type here crosses the kernel boundary: `#[repr(C)]`, fixed-width integers only,
//! explicit padding, and a compile-time size assertion. Fields holding network byte order end
//! in `_be`; conversions to `std::net` types live in the agent's `abi` module, in one place.
//! Any layout change must bump the version suffix of the map name that carries the type, so a
//! new agent never silently reuses a pinned map with an old layout.
#![no_std]

pub mod csum;

/// Map names (kernel object names are truncated at 15 characters).
pub mod maps {
    /// Services: `Svc4Key` -> `Svc4Value`. Slot 0 is the service entry, slots 1..=count
    /// hold backend IDs.
    pub const SVC4: &str = "LB4_SVC_V1";
    /// Backends: backend ID (`u32`) -> `Backend4`.
    pub const BACKEND4: &str = "LB4_BE_V1";
    /// Connection tracking (LRU): `Ct4Key` -> `Ct4Value`.
    pub const CT4: &str = "CT4_V1";
    /// Per-CPU verdict counters indexed by `counter::*`.
    pub const COUNTERS: &str = "CNT_V1";
    /// Per-node configuration: index 0 -> `NodeConfig`.
    pub const CONFIG: &str = "CFG_V1";
    /// Every map the agent pins, in the order `ebpf-proxy inspect` shows them.
    pub const ALL: [&str; 5] = [SVC4, BACKEND4, CT4, COUNTERS, CONFIG];
}

/// Program names as the kernel sees them.
pub mod programs {
    /// tc ingress on a pod's host-side veth: packets leaving the pod.
    pub const POD_INGRESS: &str = "lb_pod_in";
    /// tc egress on a pod's host-side veth: packets delivered to the pod.
    pub const POD_EGRESS: &str = "lb_pod_out";
}

/// Default map sizes; the agent can override them at load time.
pub mod sizes {
    pub const SVC4: u32 = 65_536;
    pub const BACKEND4: u32 = 65_536;
    pub const CT4: u32 = 262_144;
}

/// IP protocol numbers as they appear in the IPv4 header.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const SCTP: u8 = 132;
}

/// Indices into the per-CPU counters map. Each non-pass verdict increments exactly one.
pub mod counter {
    /// Forward packet of a new flow: endpoint selected, DNAT applied.
    pub const FWD_NEW: u32 = 0;
    /// Forward packet of a tracked flow.
    pub const FWD_ESTABLISHED: u32 = 1;
    /// Reply packet reverse-translated (source back to the service address).
    pub const REPLY: u32 = 2;
    /// Service exists but has no usable endpoint: dropped.
    pub const DROP_NO_BACKEND: u32 = 3;
    /// A service slot points at a backend ID that is not in the backend map: dropped.
    pub const DROP_BACKEND_MISSING: u32 = 4;
    /// The conntrack insert failed: dropped (the flow could not be kept sticky).
    pub const DROP_CT_FULL: u32 = 5;
    /// A packet rewrite helper failed: dropped.
    pub const DROP_REWRITE: u32 = 6;
    /// Hairpin: a pod reached itself through a service; redirected back with SNAT.
    pub const HAIRPIN: u32 = 7;
    /// A tracked flow whose backend disappeared was re-balanced to a live backend.
    pub const REBALANCED: u32 = 8;
    /// Not counted as a verdict: an IPv4 packet too short to parse (passed untouched).
    pub const PASS_MALFORMED: u32 = 9;
    /// Non-first IPv4 fragment to a service port: passed untouched (no L4 header).
    pub const PASS_FRAGMENT: u32 = 10;
    pub const MAX: u32 = 16;

    /// Human names for `inspect` and metrics, indexed by counter.
    pub const NAMES: [&str; 11] = [
        "forward_new",
        "forward_established",
        "reply_reverse_nat",
        "drop_no_backend",
        "drop_backend_missing",
        "drop_conntrack_full",
        "drop_rewrite_failed",
        "hairpin",
        "rebalanced_stale_flow",
        "pass_malformed",
        "pass_fragment",
    ];
}

/// Service-map key. `slot == 0` addresses the service entry; `1..=count` its backends.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Svc4Key {
    pub addr_be: u32,
    pub port_be: u16,
    pub slot: u16,
    pub proto: u8,
    /// 0 = all traffic; reserved for an internal/external split (traffic policies).
    pub scope: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<Svc4Key>() == 12);

impl Svc4Key {
    pub const fn new(addr_be: u32, port_be: u16, proto: u8, slot: u16) -> Self {
        Self {
            addr_be,
            port_be,
            slot,
            proto,
            scope: 0,
            _pad: [0; 2],
        }
    }
    /// The same service, another slot.
    pub const fn with_slot(self, slot: u16) -> Self {
        Self::new(self.addr_be, self.port_be, self.proto, slot)
    }
}

/// Service flags (`Svc4Value::flags` of the slot-0 entry).
pub mod svc_flags {
    /// The service is a ClusterIP.
    pub const CLUSTER_IP: u32 = 1 << 0;
}

/// Service-map value. For slot 0: `count` backends and the service's flags/ID. For slots
/// `1..=count`: `backend_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Svc4Value {
    pub backend_id: u32,
    pub count: u16,
    /// Stable per-service ID (for counters and reverse NAT).
    pub svc_id: u16,
    pub flags: u32,
    pub _reserved: u32,
}
const _: () = assert!(core::mem::size_of::<Svc4Value>() == 16);

impl Svc4Value {
    pub const fn service(count: u16, svc_id: u16, flags: u32) -> Self {
        Self {
            backend_id: 0,
            count,
            svc_id,
            flags,
            _reserved: 0,
        }
    }
    pub const fn slot(backend_id: u32, svc_id: u16) -> Self {
        Self {
            backend_id,
            count: 0,
            svc_id,
            flags: 0,
            _reserved: 0,
        }
    }
}

/// Backend-map value: where a backend ID leads.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Backend4 {
    pub addr_be: u32,
    pub port_be: u16,
    pub proto: u8,
    /// Reserved for backend state (e.g. terminating, local).
    pub flags: u8,
}
const _: () = assert!(core::mem::size_of::<Backend4>() == 8);

impl Backend4 {
    pub const fn new(addr_be: u32, port_be: u16, proto: u8) -> Self {
        Self {
            addr_be,
            port_be,
            proto,
            flags: 0,
        }
    }
}

/// Conntrack key: the 5-tuple exactly as the hook sees it, before translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ct4Key {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<Ct4Key>() == 16);

impl Ct4Key {
    pub const fn new(
        saddr_be: u32,
        daddr_be: u32,
        sport_be: u16,
        dport_be: u16,
        proto: u8,
    ) -> Self {
        Self {
            saddr_be,
            daddr_be,
            sport_be,
            dport_be,
            proto,
            _pad: [0; 3],
        }
    }
    /// The key of the opposite direction.
    pub const fn reversed(&self) -> Self {
        Self::new(
            self.daddr_be,
            self.saddr_be,
            self.dport_be,
            self.sport_be,
            self.proto,
        )
    }
}

/// Conntrack flags (`Ct4Value::flags`).
pub mod ct_flags {
    /// Rewrite the source to (`src_addr_be`, `src_port_be`).
    pub const SNAT: u16 = 1 << 0;
    /// Rewrite the destination to (`dst_addr_be`, `dst_port_be`).
    pub const DNAT: u16 = 1 << 1;
    /// Entry of the original (client -> service) direction.
    pub const FORWARD: u16 = 1 << 2;
    /// Entry of the reply (backend -> client) direction.
    pub const REPLY: u16 = 1 << 3;
    /// After rewriting, send the packet straight back out of the interface it came in on
    /// (hairpin: the client is its own backend, so the host stack must not see it).
    pub const REDIRECT_BACK: u16 = 1 << 4;
}

/// Conntrack value: the rewrite to apply to packets matching the key. One shape for both
/// directions keeps a single translate step in the datapath.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Ct4Value {
    pub src_addr_be: u32,
    pub dst_addr_be: u32,
    pub src_port_be: u16,
    pub dst_port_be: u16,
    /// Backend chosen for the flow (0 for reply entries); checked on every forward hit so a
    /// removed backend never keeps receiving a flow.
    pub backend_id: u32,
    pub flags: u16,
    pub svc_id: u16,
    pub _reserved: u32,
    /// `bpf_ktime_get_ns()` of the last packet.
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Ct4Value>() == 32);

/// Per-node configuration, written by the agent at start.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeConfig {
    /// Source address used when a pod reaches itself through a service (hairpin SNAT), in
    /// network byte order. 0 disables hairpin SNAT.
    pub hairpin_addr_be: u32,
    pub _reserved: [u32; 3],
}
const _: () = assert!(core::mem::size_of::<NodeConfig>() == 16);

/// Uniform slot choice: `rand` from `bpf_get_prandom_u32()`, `count >= 1` backends.
/// Returns a slot in `1..=count`.
#[inline(always)]
pub const fn select_slot(rand: u32, count: u16) -> u16 {
    (rand % count as u32) as u16 + 1
}

#[cfg(feature = "user")]
mod pod_impls {
    use super::*;
    // SAFETY: every type is repr(C), made of integers, with explicit padding.
    unsafe impl aya::Pod for Svc4Key {}
    unsafe impl aya::Pod for Svc4Value {}
    unsafe impl aya::Pod for Backend4 {}
    unsafe impl aya::Pod for Ct4Key {}
    unsafe impl aya::Pod for Ct4Value {}
    unsafe impl aya::Pod for NodeConfig {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_slot_covers_every_slot_and_stays_in_range() {
        let mut seen = [false; 4];
        for r in 0..1000u32 {
            let s = select_slot(r.wrapping_mul(2_654_435_761), 3);
            assert!((1..=3).contains(&s));
            seen[s as usize] = true;
        }
        assert_eq!(seen, [false, true, true, true]);
        assert_eq!(select_slot(u32::MAX, 1), 1);
    }

    #[test]
    fn ct_key_reverses() {
        let k = Ct4Key::new(1, 2, 3, 4, proto::TCP);
        assert_eq!(k.reversed(), Ct4Key::new(2, 1, 4, 3, proto::TCP));
        assert_eq!(k.reversed().reversed(), k);
    }

    #[test]
    fn names_fit_the_kernel_limit() {
        for n in maps::ALL
            .iter()
            .chain([programs::POD_INGRESS, programs::POD_EGRESS].iter())
        {
            assert!(n.len() <= 15, "{n} is longer than 15 characters");
        }
        assert!(counter::NAMES.len() as u32 <= counter::MAX);
    }
}
