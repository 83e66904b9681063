//! The ABI shared by the eBPF programs and the userspace agent.
//!
//! Every type here crosses the kernel boundary: `#[repr(C)]`, fixed-width integers only,
//! explicit padding, and a compile-time size assertion. Fields holding network byte order end
//! in `_be`; conversions to `std::net` types live in the agent's `abi` module, in one place.
//! Any layout change must bump the version suffix of the map name that carries the type, so a
//! new agent never silently reuses a pinned map with an old layout.
#![no_std]

pub mod crc32c;
pub mod csum;
pub mod wire;

/// Map names (kernel object names are truncated at 15 characters).
pub mod maps {
    /// Services: `Svc4Key` -> `Svc4Value`. Slot 0 is the service entry, slots 1..=count
    /// hold backend IDs.
    pub const SVC4: &str = "LB4_SVC_V2";
    /// Backends: backend ID (`u32`) -> `Backend4`.
    pub const BACKEND4: &str = "LB4_BE_V1";
    /// Connection tracking of answered flows (hash, never evicted: entries leave by timeout,
    /// through the agent's sweeper): `Ct4Key` -> `Ct4Value`.
    pub const CT4: &str = "CT4_V3";
    /// Connection tracking of flows not answered yet (LRU: under pressure the oldest
    /// unanswered flows are evicted, never an answered one). A flow moves to `CT4` with its
    /// first reply.
    pub const CT4_NEW: &str = "CT4N_V1";
    /// Per-CPU verdict counters indexed by `counter::*` (`counter::MAX` slots; `CNT_V1`, 32
    /// slots, was full).
    pub const COUNTERS: &str = "CNT_V2";
    /// Per-node configuration: index 0 -> `NodeConfig`.
    pub const CONFIG: &str = "CFG_V2";
    /// ClusterIPs (`u32` address, network order) -> `VipValue`: a ClusterIP hit on a port no
    /// service uses is rejected, not passed.
    pub const VIP4: &str = "LB4_VIP_V1";
    /// loadBalancerSourceRanges (LPM trie): `SrcRange4Key` -> `u8` (1 = allowed).
    pub const SRC_RANGE4: &str = "LB4_SRC_V2";
    /// sessionAffinity ClientIP (LRU): `Aff4Key` -> `Aff4Value`.
    pub const AFFINITY4: &str = "LB4_AFF_V2";
    /// Socket-level balancing, reverse (LRU): `SockKey4` (socket cookie, backend) ->
    /// `SockXlate4` (the service address the process asked for).
    pub const SOCK_REV4: &str = "LB4_RSK_V2";
    /// Socket-level balancing, forward (LRU): `SockKey4` (socket cookie, service address) ->
    /// `SockXlate4` (the backend an unconnected UDP socket keeps using).
    pub const SOCK_FWD4: &str = "LB4_FSK_V2";
    /// Per-service packet counters (per-CPU array indexed by service ID): `SvcCounter`.
    pub const SVC_COUNTERS: &str = "LB4_SCNT_V1";
    /// REJECT reply rate limit: a per-CPU token bucket, index 0 -> `RejectBucket`.
    pub const REJECT_BUCKET: &str = "LB4_RJB_V1";
    /// Per-CPU scratch space (`Scratch`): the REJECT reply being built, the reason noted for
    /// the debug log. Never pinned: it holds nothing between packets.
    pub const SCRATCH: &str = "SCRATCH_V2";
    /// Pod interfaces: host-side ifindex (`u32`) -> the network namespace ID (`i32`, as
    /// IFLA_LINK_NETNSID gives it) of the pod behind it, where a new flow's tuple is looked
    /// up among the pod's own sockets. Filled by the agent as it attaches; not pinned.
    pub const POD_NETNS: &str = "PODNS_V1";
    /// The broadcast addresses of the node's subnets (`u32`, network order) -> `u8` (1): REJECT
    /// never answers them (a directed broadcast source). Filled by the agent; not pinned.
    pub const BROADCAST4: &str = "BCAST4_V1";
    /// Fragments (LRU): `Frag4Key` (addresses, protocol, IP ID before translation) ->
    /// `Frag4Value` (the first fragment's ports), so later fragments get its translation.
    pub const FRAG4: &str = "LB4_FRG_V1";
    /// Outer sources IPIP/GUE decapsulation accepts (LPM trie, `--decap-allowed-sources`):
    /// (prefix length, IPv4 address in network order) -> `u8` (1). Only read when
    /// `NodeConfig::flags` has `cfg_flags::DECAP_SOURCES_RESTRICTED`.
    pub const DECAP_SRC4: &str = "LB4_DSRC_V1";
    /// Every map the agent pins, in the order `ebpf-proxy inspect` shows them.
    pub const ALL: [&str; 15] = [
        SVC4,
        BACKEND4,
        CT4,
        CT4_NEW,
        COUNTERS,
        CONFIG,
        VIP4,
        SRC_RANGE4,
        AFFINITY4,
        SOCK_REV4,
        SOCK_FWD4,
        SVC_COUNTERS,
        REJECT_BUCKET,
        FRAG4,
        DECAP_SRC4,
    ];
    /// Conntrack maps of earlier releases that the agent carries over (same key and value
    /// layout, one LRU map for both answered and unanswered flows): their entries are copied
    /// into `CT4` before and again after the agent's programs replace the old ones, then the
    /// pin is removed. `CT4_V2` is v0.1.0's.
    pub const CT4_MIGRATE: [&str; 1] = ["CT4_V2"];
    /// The earlier release's conntrack table as our programs see it during an upgrade: bound
    /// at load to that release's pin (`CT4_MIGRATE`), and read on a miss while
    /// `cfg_flags::CT_PREVIOUS` is set, so a flow its programs opened after the agent's last
    /// copy keeps its translation. Otherwise a private, empty one-entry map. Never pinned.
    pub const CT4_PREVIOUS: &str = "CT4_PREV";
    /// Names earlier versions pinned (layouts this agent cannot read: `svc_id` was 16-bit;
    /// `CNT_V1` had 32 counter slots, so counters restart at zero on upgrade).
    /// The agent reports them and removes them once its own programs are attached;
    /// `ebpf-proxy cleanup` removes them too.
    pub const RETIRED: [&str; 8] = [
        "LB4_SVC_V1",
        "CT4_V1",
        "LB4_SRC_V1",
        "LB4_AFF_V1",
        "LB4_RSK_V1",
        "LB4_FSK_V1",
        "CFG_V1",
        "CNT_V1",
    ];
}

/// Program names as the kernel sees them.
pub mod programs {
    /// tc ingress on a pod's host-side veth: packets leaving the pod.
    pub const POD_INGRESS: &str = "lb_pod_in";
    /// tc egress on a pod's host-side veth: packets delivered to the pod.
    pub const POD_EGRESS: &str = "lb_pod_out";
    /// tc ingress on the node's uplink(s): traffic from outside the node (NodePort, LB IPs,
    /// externalIPs, IPIP/GUE-wrapped DSR traffic, replies of masqueraded flows).
    pub const UPLINK_INGRESS: &str = "lb_up_in";
    /// XDP on the node's uplink(s), before `lb_up_in`: IPIP/GUE decapsulation and the
    /// established-flow DNAT fast path; everything else passes to tc untouched.
    pub const UPLINK_XDP: &str = "lb_up_xdp";
    /// The tc programs (what `cleanup` looks for in netlink tc filters).
    pub const TC: [&str; 3] = [POD_INGRESS, POD_EGRESS, UPLINK_INGRESS];
}

/// GUE (Katran style) UDP destination port of encapsulated service traffic.
pub const GUE_PORT: u16 = 6080;

/// Default map sizes; the agent can override them at load time.
pub mod sizes {
    pub const SVC4: u32 = 65_536;
    pub const BACKEND4: u32 = 65_536;
    pub const CT4: u32 = 262_144;
    /// Datagrams in flight as fragments.
    pub const FRAG4: u32 = 8_192;
    pub const VIP4: u32 = 16_384;
    pub const SRC_RANGE4: u32 = 16_384;
    pub const AFFINITY4: u32 = 65_536;
    /// `--decap-allowed-sources` CIDRs.
    pub const DECAP_SRC4: u32 = 1_024;
    /// Pod interfaces per node whose namespace ID is known (`maps::POD_NETNS`).
    pub const POD_NETNS: u32 = 16_384;
    /// Subnet broadcast addresses of the node (`maps::BROADCAST4`).
    pub const BROADCAST4: u32 = 256;
    /// Entries of the per-service counter map; service IDs stay below it.
    pub const SVC_IDS: u32 = 65_536;
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
    /// The conntrack insert (into the unanswered-flow table) failed: dropped.
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
    /// Service (or ClusterIP) exists but no endpoint anywhere: TCP RST / ICMP unreachable.
    pub const REJECT: u32 = 11;
    /// externalTrafficPolicy/internalTrafficPolicy Local with no local endpoint: dropped.
    pub const DROP_NO_LOCAL_BACKEND: u32 = 12;
    /// Source outside loadBalancerSourceRanges: dropped.
    pub const DROP_SOURCE_RANGE: u32 = 13;
    /// No free SNAT port for a masqueraded flow: dropped.
    pub const DROP_SNAT_EXHAUSTED: u32 = 14;
    /// IPIP/GUE packet for a service decapsulated.
    pub const DECAP: u32 = 15;
    /// Masqueraded (SNAT to a node address) new flow.
    pub const MASQUERADE: u32 = 16;
    /// ICMP error about a translated flow, translated back.
    pub const ICMP_ERROR_XLATED: u32 = 17;
    /// Socket-level (cgroup hook) translation of a host process's connect/sendmsg.
    pub const SOCK_XLATE: u32 = 18;
    /// XDP on the uplink: forward packet of a tracked flow DNATed there (never reaches the
    /// tc pipeline's translation; tc counts nothing for it).
    pub const XDP_FWD_ESTABLISHED: u32 = 19;
    /// XDP on the uplink: IPIP/GUE packet for this node decapsulated.
    pub const XDP_DECAP: u32 = 20;
    /// XDP on the uplink: a tracked flow's packet left to tc because its L4 checksum field
    /// holds only the pseudo-header sum (a CHECKSUM_PARTIAL skb, e.g. from a veth peer):
    /// XDP cannot see `ip_summed`, the tc helpers handle it.
    pub const XDP_PASS_PARTIAL_CSUM: u32 = 21;
    /// tc on the uplink: a packet XDP already translated (marked in its metadata), passed
    /// without running the pipeline a second time.
    pub const TC_PASS_XDP_TRANSLATED: u32 = 22;
    /// A packet we would forward by redirect (FIB redirect, hairpin) arrived with TTL <= 1:
    /// dropped, as a router drops it, instead of leaving with TTL 0.
    pub const DROP_TTL_EXCEEDED: u32 = 23;
    /// A packet to a service without endpoints from a source a REJECT must never answer
    /// (0.0.0.0/8, 127/8, multicast 224/4, class E 240/4 with broadcast): dropped, no reply.
    pub const DROP_REJECT_BAD_SOURCE: u32 = 24;
    /// A REJECT reply suppressed by the rate limit (`reject_limit`): the packet is dropped.
    pub const DROP_REJECT_RATE_LIMITED: u32 = 25;
    /// A TCP packet other than a SYN to a service, of no tracked flow: dropped without
    /// creating state (a mid-stream packet or junk; only a SYN opens a flow).
    pub const DROP_TCP_NO_FLOW: u32 = 26;
    /// Not a verdict: a flow's first reply found the answered-flow table (`CT4`) full, so the
    /// flow stays in the table of unanswered ones, where it can be evicted.
    pub const CT_ANSWERED_FULL: u32 = 27;
    /// Not a verdict: a new flow's reply tuple belonged to another live flow (a client port
    /// reused towards two services sharing an endpoint): its source port was remapped.
    pub const CT_CLASH_REMAPPED: u32 = 28;
    /// A new flow whose reply tuple clashed and no free source port was found: dropped.
    pub const DROP_CT_CLASH: u32 = 29;
    /// Not a verdict: a closed flow's tuple (FIN both ways, or RST) was taken over by a new
    /// flow: a SYN reopening it, or a SNAT port it held.
    pub const CT_CLOSED_REUSED: u32 = 30;
    /// A non-first fragment of a translated datagram, translated like its first fragment.
    pub const FRAG_TRANSLATED: u32 = 31;
    /// An IPIP/GUE packet for this node whose outer source is outside
    /// `--decap-allowed-sources`: dropped, not decapsulated.
    pub const DROP_DECAP_SOURCE: u32 = 32;
    /// An IPIP/GUE packet for this node whose inner packet is not for a LoadBalancer IP or
    /// externalIP service port this node serves: dropped, not decapsulated.
    pub const DROP_DECAP_NOT_SERVED: u32 = 33;
    /// A flow found only in the earlier release's conntrack table during an upgrade, copied
    /// into ours by the datapath (`maps::CT4_PREVIOUS`).
    pub const CT_ADOPTED_PREVIOUS: u32 = 34;
    /// Slots of the counter map (`maps::COUNTERS`); indices above the last name are spare.
    pub const MAX: u32 = 64;

    /// Human names for `inspect` and metrics, indexed by counter.
    pub const NAMES: [&str; 35] = [
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
        "reject",
        "drop_no_local_backend",
        "drop_source_range",
        "drop_snat_exhausted",
        "decapsulated",
        "masquerade",
        "icmp_error_translated",
        "socket_translated",
        "xdp_forward_established",
        "xdp_decapsulated",
        "xdp_pass_partial_checksum",
        "tc_pass_xdp_translated",
        "drop_ttl_exceeded",
        "drop_reject_bad_source",
        "drop_reject_rate_limited",
        "drop_tcp_no_flow",
        "conntrack_answered_full",
        "conntrack_clash_remapped",
        "drop_conntrack_clash",
        "conntrack_closed_reused",
        "fragment_translated",
        "drop_decap_source_not_allowed",
        "drop_decap_inner_not_served",
        "conntrack_adopted_from_previous_release",
    ];
}

/// XDP metadata (4 bytes in front of the frame, `data_meta`) with which `lb_up_xdp` marks a
/// packet it translated, so the uplink's tc program passes it at once instead of parsing it
/// and missing every map again. Only XDP programs can write metadata, and on our uplinks
/// that is ours.
pub const XDP_META_TRANSLATED: u32 = 0x5844_5054;
/// Length of that metadata.
pub const XDP_META_LEN: usize = 4;

/// Value of the per-service counter map (`maps::SVC_COUNTERS`), one per CPU: forward packets
/// the datapath translated for the service and their bytes (L3 length as received).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SvcCounter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<SvcCounter>() == 16);

/// REJECT reply rate limit, like the kernel's `icmp_msgs_per_sec` / `icmp_msgs_burst`: replies
/// per second and the burst, per CPU (so the node-wide bound is this times the CPU count).
pub mod reject_limit {
    pub const PER_SEC: u64 = 1000;
    pub const BURST: u64 = 50;
    /// Credit one reply costs, in nanoseconds of elapsed time.
    pub const COST_NS: u64 = 1_000_000_000 / PER_SEC;
}

/// Value of the REJECT rate-limit map (`maps::REJECT_BUCKET`), one per CPU: the credit in
/// nanoseconds (capped at `BURST * COST_NS`) and when it was last refilled. All zero (a new map)
/// means a full bucket at the first reply.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RejectBucket {
    pub credit_ns: u64,
    pub last_ns: u64,
}
const _: () = assert!(core::mem::size_of::<RejectBucket>() == 16);

/// Per-CPU scratch space for the packet being processed; nothing survives between packets.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scratch {
    /// A REJECT reply: Ethernet, IPv4 and ICMP headers (42 bytes), the quoted IPv4 header with
    /// options (up to 60; sized for 80 so every offset the verifier sees from a masked header
    /// length is in bounds) and 8 bytes of its L4 header.
    pub reject: [u8; 136],
    /// With `cfg_flags::DATAPATH_DEBUG`: the `counter::*` reason the packet was dropped or
    /// rejected for, plus one (0: none), and its tuple, for the log line the program writes
    /// once the verdict is known.
    pub noted_reason: u32,
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub _pad: [u8; 7],
    /// The FIB lookup request of a packet we route ourselves (`struct bpf_fib_lookup`, 64
    /// bytes): here only its input fields need writing, where a stack copy must be zeroed
    /// whole (a byte loop of ~400 instructions on BPF) before the helper may read it.
    pub fib: [u32; 16],
}
const _: () = assert!(core::mem::size_of::<Scratch>() == 224);

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

/// `Svc4Key::scope` values. Every service address has an `EXTERNAL` entry; an `INTERNAL`
/// entry exists only when traffic from inside the node (pods, host processes) may use a
/// different endpoint set (externalTrafficPolicy Local: the short-circuit to all endpoints),
/// and the external entry then carries `svc_flags::TWO_SCOPES`.
pub mod scope {
    pub const EXTERNAL: u8 = 0;
    pub const INTERNAL: u8 = 1;
}

impl Svc4Key {
    pub const fn new(addr_be: u32, port_be: u16, proto: u8, slot: u16) -> Self {
        Self::scoped(addr_be, port_be, proto, scope::EXTERNAL, slot)
    }
    pub const fn scoped(addr_be: u32, port_be: u16, proto: u8, scope: u8, slot: u16) -> Self {
        Self {
            addr_be,
            port_be,
            slot,
            proto,
            scope,
            _pad: [0; 2],
        }
    }
    /// The same service, another slot.
    pub const fn with_slot(self, slot: u16) -> Self {
        Self::scoped(self.addr_be, self.port_be, self.proto, self.scope, slot)
    }
    /// The same service address, another scope, slot 0.
    pub const fn with_scope(self, scope: u8) -> Self {
        Self::scoped(self.addr_be, self.port_be, self.proto, scope, 0)
    }
}

/// Service flags (`Svc4Value::flags` of the slot-0 entry).
pub mod svc_flags {
    /// A ClusterIP entry.
    pub const CLUSTER_IP: u32 = 1 << 0;
    /// A NodePort entry (keyed by a node address and the nodePort).
    pub const NODE_PORT: u32 = 1 << 1;
    /// An externalIPs entry.
    pub const EXTERNAL_IP: u32 = 1 << 2;
    /// A LoadBalancer ingress IP entry.
    pub const LOAD_BALANCER: u32 = 1 << 3;
    /// externalTrafficPolicy: Local (this entry's endpoints are the node's own).
    pub const ETP_LOCAL: u32 = 1 << 4;
    /// internalTrafficPolicy: Local.
    pub const ITP_LOCAL: u32 = 1 << 5;
    /// sessionAffinity: ClientIP (timeout in `Svc4Value::affinity_timeout_s`).
    pub const AFFINITY: u32 = 1 << 6;
    /// loadBalancerSourceRanges apply: the source must match `LB4_SRC_V2` for this svc_id.
    pub const SOURCE_RANGES: u32 = 1 << 7;
    /// `count == 0` because a Local policy left no local endpoint: DROP, not REJECT.
    pub const DROP_IF_EMPTY: u32 = 1 << 8;
    /// An `INTERNAL` scope entry exists for this address (see `scope`).
    pub const TWO_SCOPES: u32 = 1 << 9;
    /// No ready endpoint: the slots hold serving+terminating ones, so session affinity to a
    /// `backend_flags::TERMINATING` backend is fine.
    pub const TERMINATING_FALLBACK: u32 = 1 << 10;
    /// Any of the "external destination" kinds (masquerade rules differ from ClusterIP).
    pub const EXTERNAL_KINDS: u32 = NODE_PORT | EXTERNAL_IP | LOAD_BALANCER;
}

/// `VipValue::flags`.
pub mod vip_flags {
    pub const CLUSTER_IP: u32 = 1 << 0;
}

/// Value of the ClusterIP map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipValue {
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<VipValue>() == 4);

/// LPM key of the source-range map. The first 32 bits of data (svc_id and padding) always
/// match fully (the service ID), so `prefixlen = 32 + range prefix length`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SrcRange4Key {
    pub prefixlen: u32,
    pub svc_id_be: u32,
    pub addr_be: u32,
}
const _: () = assert!(core::mem::size_of::<SrcRange4Key>() == 12);

impl SrcRange4Key {
    pub const fn new(svc_id: u32, addr_be: u32, prefix: u8) -> Self {
        Self {
            prefixlen: 32 + prefix as u32,
            svc_id_be: svc_id.to_be(),
            addr_be,
        }
    }
    /// The LPM data part (what follows `prefixlen`).
    pub const fn data(&self) -> SrcRange4Data {
        SrcRange4Data {
            svc_id_be: self.svc_id_be,
            addr_be: self.addr_be,
        }
    }
}

/// The data part of `SrcRange4Key`, for LPM APIs that carry the prefix length separately.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SrcRange4Data {
    pub svc_id_be: u32,
    pub addr_be: u32,
}
const _: () = assert!(core::mem::size_of::<SrcRange4Data>() == 8);

impl SrcRange4Data {
    pub const fn new(svc_id: u32, addr_be: u32) -> Self {
        Self {
            svc_id_be: svc_id.to_be(),
            addr_be,
        }
    }
}

/// Session-affinity key: service and client address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Aff4Key {
    pub svc_id: u32,
    pub client_be: u32,
}
const _: () = assert!(core::mem::size_of::<Aff4Key>() == 8);

impl Aff4Key {
    pub const fn new(svc_id: u32, client_be: u32) -> Self {
        Self { svc_id, client_be }
    }
}

/// Session-affinity value: the backend a client was given and when it last used it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Aff4Value {
    pub backend_id: u32,
    pub _pad: u32,
    pub last_used_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Aff4Value>() == 16);

/// Service-map value. For slot 0: `count` backends and the service's flags/ID. For slots
/// `1..=count`: `backend_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Svc4Value {
    pub backend_id: u32,
    pub count: u16,
    pub _pad: u16,
    /// Stable per-service ID (for counters, affinity and source ranges); 32-bit so more than
    /// 65,535 service ports fit.
    pub svc_id: u32,
    pub flags: u32,
    /// sessionAffinity timeout (slot 0 with `svc_flags::AFFINITY`).
    pub affinity_timeout_s: u32,
}
const _: () = assert!(core::mem::size_of::<Svc4Value>() == 20);

impl Svc4Value {
    pub const fn service(count: u16, svc_id: u32, flags: u32) -> Self {
        Self {
            backend_id: 0,
            count,
            _pad: 0,
            svc_id,
            flags,
            affinity_timeout_s: 0,
        }
    }
    pub const fn with_affinity(mut self, timeout_s: u32) -> Self {
        self.affinity_timeout_s = timeout_s;
        self
    }
    pub const fn slot(backend_id: u32, svc_id: u32) -> Self {
        Self {
            backend_id,
            count: 0,
            _pad: 0,
            svc_id,
            flags: 0,
            affinity_timeout_s: 0,
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
    /// `backend_flags`.
    pub flags: u8,
}
const _: () = assert!(core::mem::size_of::<Backend4>() == 8);

/// `Backend4::flags`.
pub mod backend_flags {
    /// The endpoint is terminating (serving, being deleted). It stays in the backend map so
    /// established flows continue; session affinity must not send new flows to it unless the
    /// service has nothing else (`svc_flags::TERMINATING_FALLBACK`).
    pub const TERMINATING: u8 = 1 << 0;
}

impl Backend4 {
    pub const fn new(addr_be: u32, port_be: u16, proto: u8) -> Self {
        Self {
            addr_be,
            port_be,
            proto,
            flags: 0,
        }
    }
    pub const fn with_flags(mut self, flags: u8) -> Self {
        self.flags = flags;
        self
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
        // Built from whole words: initialising the 3-byte padding field alone compiles to a
        // call of a byte-loop memset on BPF, once per packet (docs/performance.md).
        let (s, d) = (sport_be.to_ne_bytes(), dport_be.to_ne_bytes());
        let words = [
            saddr_be,
            daddr_be,
            u32::from_ne_bytes([s[0], s[1], d[0], d[1]]),
            u32::from_ne_bytes([proto, 0, 0, 0]),
        ];
        // SAFETY: `Ct4Key` is `repr(C)`, 16 bytes of plain integers with no implicit padding
        // (asserted above), aligned like `u32`; any bit pattern is a valid value.
        unsafe { core::mem::transmute::<[u32; 4], Self>(words) }
    }
    /// The reply entry's key of the forward entry `v` at `self`: the backend answering to the
    /// client as the backend sees it (after SNAT, if any).
    pub const fn reply_key(&self, v: &Ct4Value) -> Self {
        let (addr, port) = if v.flags & ct_flags::SNAT != 0 {
            (v.src_addr_be, v.src_port_be)
        } else {
            (self.saddr_be, self.sport_be)
        };
        Self::new(v.dst_addr_be, addr, v.dst_port_be, port, self.proto)
    }
    /// The forward entry's key of the reply entry `v` at `self`: the client (the reply's
    /// DNAT target, or its destination) towards the service address (the reply's SNAT).
    pub const fn forward_key(&self, v: &Ct4Value) -> Self {
        let (addr, port) = if v.flags & ct_flags::DNAT != 0 {
            (v.dst_addr_be, v.dst_port_be)
        } else {
            (self.daddr_be, self.dport_be)
        };
        Self::new(addr, v.src_addr_be, port, v.src_port_be, self.proto)
    }
    /// The key of the other entry of the same flow.
    pub const fn partner(&self, v: &Ct4Value) -> Self {
        if v.flags & ct_flags::REPLY != 0 {
            self.forward_key(v)
        } else {
            self.reply_key(v)
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
    /// After rewriting, route the packet ourselves (FIB lookup + redirect): its source is now
    /// a node address, which the host stack would drop as martian on forward.
    pub const FIB_REDIRECT: u16 = 1 << 5;
    /// The flow was masqueraded (SNAT to a node address with an allocated port).
    pub const MASQUERADED: u16 = 1 << 6;
    /// TCP state, set on both entries of a flow: a FIN was seen from the client.
    pub const FIN_FORWARD: u16 = 1 << 7;
    /// A FIN was seen from the backend.
    pub const FIN_REPLY: u16 = 1 << 8;
    /// A RST was seen (either way).
    pub const RST: u16 = 1 << 9;
    /// Carried over from an earlier release's table, whose TCP state is unknown.
    pub const MIGRATED: u16 = 1 << 10;
    /// The flow was answered: the entry lives in the answered-flow table (`maps::CT4`).
    pub const ANSWERED: u16 = 1 << 11;

    /// A TCP flow that is over: RST, or FIN both ways. Its tuple (and SNAT port) may be
    /// reused by a new flow at once, as netfilter reopens a TIME_WAIT connection.
    #[inline(always)]
    pub const fn closed(flags: u16) -> bool {
        flags & RST != 0 || flags & (FIN_FORWARD | FIN_REPLY) == FIN_FORWARD | FIN_REPLY
    }
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
    pub _pad: u16,
    pub svc_id: u32,
    /// `bpf_ktime_get_ns()` of the last packet.
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Ct4Value>() == 32);

/// Fragment-map key: a datagram as its fragments carry it (before translation).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Frag4Key {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub id_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<Frag4Key>() == 12);

/// Fragment-map value: the ports of the datagram's first fragment (the conntrack key's).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Frag4Value {
    pub sport_be: u16,
    pub dport_be: u16,
}
const _: () = assert!(core::mem::size_of::<Frag4Value>() == 4);

/// `NodeConfig::flags`.
pub mod cfg_flags {
    /// `--masquerade-all`: every service flow is masqueraded.
    pub const MASQUERADE_ALL: u32 = 1 << 0;
    /// `--decap-allowed-sources` was given: IPIP/GUE is decapsulated only from outer sources
    /// in `maps::DECAP_SRC4` (unset: from any source).
    pub const DECAP_SOURCES_RESTRICTED: u32 = 1 << 1;
    /// `--socket-lb=host`: the socket programs translate only sockets of the network namespace
    /// whose cookie is `NodeConfig::host_netns_cookie`; pods' sockets are left to tc.
    pub const SOCK_LB_HOST_ONLY: u32 = 1 << 2;
    /// `--foreign-tunnels=pass`: IPIP/GUE to the node that the decapsulation policy refuses
    /// (a source not allowed, an inner destination not served) goes to the kernel still
    /// wrapped, for the node's own tunnel devices (Calico or flannel IPIP), instead of being
    /// dropped.
    pub const FOREIGN_TUNNELS_PASS: u32 = 1 << 3;
    /// Datapath debug logging (`--datapath-debug`, `ebpf-proxy debug on|off`): the tc programs
    /// log, through aya-log, why a flow was dropped or rejected. Checked only on those paths,
    /// so it costs nothing when off. Owned by the operator's switch: the agent's config writes
    /// keep whatever value the map holds.
    pub const DATAPATH_DEBUG: u32 = 1 << 4;
    /// An upgrade is under way: `maps::CT4_PREVIOUS` holds the earlier release's conntrack
    /// table, read when a packet misses ours. Set by the agent from load until every link runs
    /// our programs and the table has been copied a last time.
    pub const CT_PREVIOUS: u32 = 1 << 5;
    /// `--socket-lb=all` (always with `SOCK_LB_HOST_ONLY`): a pod's TCP `connect()` to a
    /// service without loadBalancerSourceRanges or sessionAffinity, that kube-proxy would not
    /// masquerade, is translated at the socket too; every other pod socket is left to tc. An
    /// older program that does not know this bit still sees `SOCK_LB_HOST_ONLY`.
    pub const SOCK_LB_PODS_TCP: u32 = 1 << 6;
}

/// Per-node configuration, written by the agent at start.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeConfig {
    /// Source address used when a pod reaches itself through a service (hairpin SNAT) and for
    /// masquerading towards local pods (the pod bridge's address). 0 disables hairpin SNAT.
    pub hairpin_addr_be: u32,
    /// The node's primary address: the masquerade source towards other nodes.
    pub node_addr_be: u32,
    /// The cluster (pod) CIDR: sources inside it are pods. A zero mask means none is
    /// configured: then no ClusterIP traffic is masqueraded because of its source.
    pub cluster_cidr_be: u32,
    pub cluster_mask_be: u32,
    pub flags: u32,
    /// SNAT port range for masqueraded flows (host byte order, inclusive).
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// The host network namespace's cookie (`SO_NETNS_COOKIE`), with
    /// `cfg_flags::SOCK_LB_HOST_ONLY`. Was reserved (zero) before: same size, same offsets.
    pub host_netns_cookie: u64,
}
const _: () = assert!(core::mem::size_of::<NodeConfig>() == 32);

impl NodeConfig {
    /// Whether `addr_be` is inside the cluster CIDR.
    #[inline(always)]
    pub const fn in_cluster(&self, addr_be: u32) -> bool {
        self.cluster_mask_be != 0 && addr_be & self.cluster_mask_be == self.cluster_cidr_be
    }
}

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
    unsafe impl aya::Pod for VipValue {}
    unsafe impl aya::Pod for SrcRange4Key {}
    unsafe impl aya::Pod for SrcRange4Data {}
    unsafe impl aya::Pod for Aff4Key {}
    unsafe impl aya::Pod for Aff4Value {}
    unsafe impl aya::Pod for SvcCounter {}
    unsafe impl aya::Pod for Frag4Key {}
    unsafe impl aya::Pod for Frag4Value {}
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
    fn ct_key_new_sets_every_field_and_zero_padding() {
        let k = Ct4Key::new(0x0102_0304, 0x0506_0708, 0x090a, 0x0b0c, proto::SCTP);
        let fields = Ct4Key {
            saddr_be: 0x0102_0304,
            daddr_be: 0x0506_0708,
            sport_be: 0x090a,
            dport_be: 0x0b0c,
            proto: proto::SCTP,
            _pad: [0; 3],
        };
        assert_eq!(k, fields);
    }

    #[test]
    fn ct_key_reverses() {
        let k = Ct4Key::new(1, 2, 3, 4, proto::TCP);
        assert_eq!(k.reversed(), Ct4Key::new(2, 1, 4, 3, proto::TCP));
        assert_eq!(k.reversed().reversed(), k);
    }

    /// Each entry of a flow finds the other: plain, masqueraded (SNAT to the node, the
    /// client restored by the reply's DNAT) and clash-remapped (source port only).
    #[test]
    fn ct_entries_find_their_partner() {
        let (client, vip, node, be) = (0x0a4c_0005u32, 0x0a60_000au32, 0x0a00_0001, 0x0a4c_0107);
        let (cport, vport, bport, snat) = (40000u16, 80u16, 8080u16, 61001u16);
        let fwd_key = Ct4Key::new(client, vip, cport, vport, proto::TCP);
        let plain = Ct4Value {
            dst_addr_be: be,
            dst_port_be: bport,
            flags: ct_flags::FORWARD | ct_flags::DNAT,
            ..Ct4Value::default()
        };
        let rev_key = fwd_key.reply_key(&plain);
        assert_eq!(rev_key, Ct4Key::new(be, client, bport, cport, proto::TCP));
        let rev = Ct4Value {
            src_addr_be: vip,
            src_port_be: vport,
            flags: ct_flags::REPLY | ct_flags::SNAT,
            ..Ct4Value::default()
        };
        assert_eq!(rev_key.partner(&rev), fwd_key);
        assert_eq!(fwd_key.partner(&plain), rev_key);
        for (src, sport) in [(node, snat), (client, snat)] {
            let fwd = Ct4Value {
                src_addr_be: src,
                src_port_be: sport,
                flags: plain.flags | ct_flags::SNAT,
                ..plain
            };
            let rev_key = fwd_key.reply_key(&fwd);
            assert_eq!(rev_key, Ct4Key::new(be, src, bport, sport, proto::TCP));
            let rev = Ct4Value {
                dst_addr_be: client,
                dst_port_be: cport,
                flags: rev.flags | ct_flags::DNAT,
                ..rev
            };
            assert_eq!(rev_key.forward_key(&rev), fwd_key);
        }
    }

    #[test]
    fn a_tcp_flow_is_closed_after_rst_or_fin_both_ways() {
        use ct_flags::*;
        assert!(!closed(FORWARD | FIN_FORWARD));
        assert!(!closed(REPLY | FIN_REPLY));
        assert!(closed(FIN_FORWARD | FIN_REPLY));
        assert!(closed(FORWARD | RST));
    }

    #[test]
    fn service_ids_are_32_bit_in_every_type_that_carries_one() {
        use core::mem::{offset_of, size_of};
        let id = 70_000u32;
        assert_eq!(Svc4Value::service(3, id, 0).svc_id, id);
        assert_eq!(Svc4Value::slot(9, id).svc_id, id);
        assert_eq!(Aff4Key::new(id, 1).svc_id, id);
        assert_eq!(u32::from_be(SrcRange4Key::new(id, 1, 8).svc_id_be), id);
        assert_eq!(u32::from_be(SrcRange4Data::new(id, 1).svc_id_be), id);
        assert_eq!(SockXlate4::new(1, 2, id, 3).svc_id, id);
        // Field offsets are the ABI the eBPF side and bpftool read.
        assert_eq!(offset_of!(Svc4Value, svc_id), 8);
        assert_eq!(offset_of!(Svc4Value, flags), 12);
        assert_eq!(offset_of!(Svc4Value, affinity_timeout_s), 16);
        assert_eq!(offset_of!(Ct4Value, svc_id), 20);
        assert_eq!(offset_of!(Ct4Value, last_seen_ns), 24);
        assert_eq!(offset_of!(SrcRange4Key, addr_be), 8);
        assert_eq!(offset_of!(SockXlate4, svc_id), 8);
        assert_eq!(size_of::<SvcCounter>(), 16);
        // LPM data: the 32-bit ID is the fully matched prefix part.
        assert_eq!(SrcRange4Key::new(id, 0, 24).prefixlen, 56);
        assert_eq!(
            SrcRange4Key::new(id, 5, 24).data(),
            SrcRange4Data::new(id, 5)
        );
    }

    #[test]
    fn retired_map_names_are_not_reused() {
        for r in maps::RETIRED {
            assert!(!maps::ALL.contains(&r), "{r} is both current and retired");
        }
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

    /// `CNT_V2` grew the counter map; every index of `CNT_V1` keeps its meaning, so
    /// dashboards and `inspect` read the same names.
    #[test]
    fn counters_grew_without_moving_an_index() {
        assert_eq!(maps::COUNTERS, "CNT_V2");
        assert!(maps::RETIRED.contains(&"CNT_V1"));
        assert_eq!(counter::MAX, 64);
        assert_eq!(counter::NAMES[counter::FWD_NEW as usize], "forward_new");
        assert_eq!(counter::NAMES[counter::DECAP as usize], "decapsulated");
        assert_eq!(
            counter::NAMES[counter::FRAG_TRANSLATED as usize],
            "fragment_translated"
        );
        assert_eq!(counter::FRAG_TRANSLATED, 31);
        assert_eq!(
            counter::NAMES[counter::DROP_DECAP_SOURCE as usize],
            "drop_decap_source_not_allowed"
        );
        assert_eq!(
            counter::NAMES[counter::DROP_DECAP_NOT_SERVED as usize],
            "drop_decap_inner_not_served"
        );
        assert_eq!(
            counter::NAMES[counter::CT_ADOPTED_PREVIOUS as usize],
            "conntrack_adopted_from_previous_release"
        );
        assert_eq!(counter::NAMES.len(), 35);
    }
}

/// Socket-level load balancing for host processes (cgroup v2 `connect4`/`sendmsg4`/
/// `recvmsg4`/`getpeername4` hooks): the keys and values of `maps::SOCK_REV4` and
/// `maps::SOCK_FWD4`, and their sizes. The socket cookie (`bpf_get_socket_cookie`, unique per
/// socket for the kernel's life) ties an entry to one socket, like Cilium's
/// `cilium_lb4_reverse_sk`.
pub mod sock {
    /// Default size of `maps::SOCK_REV4` and `maps::SOCK_FWD4`.
    pub const MAP_ENTRIES: u32 = 65_536;
}

/// Key of the socket-level maps: a socket and an address/port. In `SOCK_REV4` the address is
/// the backend the socket was sent to; in `SOCK_FWD4` the service address it asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey4 {
    pub cookie: u64,
    pub addr_be: u32,
    pub port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SockKey4>() == 16);

impl SockKey4 {
    pub const fn new(cookie: u64, addr_be: u32, port_be: u16) -> Self {
        Self {
            cookie,
            addr_be,
            port_be,
            _pad: 0,
        }
    }
}

/// Value of the socket-level maps: the address/port to show (`SOCK_REV4`: the service) or to
/// use (`SOCK_FWD4`: the backend, with its ID so a removed backend is noticed).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockXlate4 {
    pub addr_be: u32,
    pub port_be: u16,
    pub _pad: u16,
    pub svc_id: u32,
    pub backend_id: u32,
}
const _: () = assert!(core::mem::size_of::<SockXlate4>() == 16);

impl SockXlate4 {
    pub const fn new(addr_be: u32, port_be: u16, svc_id: u32, backend_id: u32) -> Self {
        Self {
            addr_be,
            port_be,
            _pad: 0,
            svc_id,
            backend_id,
        }
    }
}

/// Program names of the socket-level hooks (see `programs` for the tc ones).
pub mod sock_programs {
    /// cgroup `connect4`: TCP and connected-UDP sockets to a service address.
    pub const CONNECT4: &str = "lb_sock_conn4";
    /// cgroup `sendmsg4`: unconnected UDP datagrams to a service address.
    pub const SENDMSG4: &str = "lb_sock_send4";
    /// cgroup `recvmsg4`: UDP datagrams from a backend, shown as from the service.
    pub const RECVMSG4: &str = "lb_sock_recv4";
    /// cgroup `getpeername4`: the connected peer, shown as the service.
    pub const GETPEERNAME4: &str = "lb_sock_peer4";
    pub const ALL: [&str; 4] = [CONNECT4, SENDMSG4, RECVMSG4, GETPEERNAME4];
}

#[cfg(feature = "user")]
mod sock_pod_impls {
    use super::*;
    // SAFETY: repr(C), integers only, explicit padding.
    unsafe impl aya::Pod for SockKey4 {}
    unsafe impl aya::Pod for SockXlate4 {}
}

#[cfg(test)]
mod sock_tests {
    use super::*;

    #[test]
    fn sock_names_fit_the_kernel_limit_and_keys_have_no_hidden_padding() {
        for n in sock_programs::ALL
            .iter()
            .chain([maps::SOCK_REV4, maps::SOCK_FWD4].iter())
        {
            assert!(n.len() <= 15, "{n} is longer than 15 characters");
        }
        let k = SockKey4::new(u64::MAX, 0x0a60_000a, 80u16.to_be());
        assert_eq!(k._pad, 0);
        assert_ne!(k, SockKey4::new(u64::MAX - 1, k.addr_be, k.port_be));
    }
}

/// Lab tooling only: the encapsulating "load balancer" used to test IPIP/GUE ingress.
pub mod lab {
    /// Map of the lab encapsulator: index 0 -> `EncapConfig`.
    pub const ENCAP_MAP: &str = "LAB_ENC_V1";
    /// The encapsulating tc egress program.
    pub const ENCAP_PROGRAM: &str = "lab_encap";
    pub const MODE_IPIP: u32 = 1;
    pub const MODE_GUE: u32 = 2;

    /// Packets to `vip_be` leave wrapped in an outer header `outer_src_be -> outer_dst_be`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct EncapConfig {
        pub vip_be: u32,
        pub outer_src_be: u32,
        pub outer_dst_be: u32,
        pub mode: u32,
    }
    const _: () = assert!(core::mem::size_of::<EncapConfig>() == 16);

    #[cfg(feature = "user")]
    // SAFETY: repr(C) integers, no padding.
    unsafe impl aya::Pod for EncapConfig {}
}
