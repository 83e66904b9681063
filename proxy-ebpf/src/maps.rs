//! The maps, declared once. Names come from `proxy_common::maps` (checked by the agent at
//! load time); sizes are defaults the agent may override with `map_max_entries`.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    macros::btf_map,
};
use proxy_common::{
    Aff4Key, Aff4Value, Backend4, Ct4Key, Ct4Value, Frag4Key, Frag4Value, NodeConfig, RejectBucket,
    Scratch, SrcRange4Data, Svc4Key, Svc4Value, SvcCounter, VipValue, counter, reject_limit, sizes,
};

#[btf_map]
pub static LB4_SVC_V2: HashMap<Svc4Key, Svc4Value, { sizes::SVC4 as usize }> = HashMap::new();

#[btf_map]
pub static LB4_BE_V1: HashMap<u32, Backend4, { sizes::BACKEND4 as usize }> = HashMap::new();

/// Answered flows: a plain hash, so nothing evicts them; the agent's sweeper removes them when
/// they time out.
#[btf_map]
pub static CT4_V3: HashMap<Ct4Key, Ct4Value, { sizes::CT4 as usize }> = HashMap::new();

/// Flows not answered yet: LRU, so a flood of unanswered packets only evicts its own kind.
#[btf_map]
pub static CT4N_V1: LruHashMap<Ct4Key, Ct4Value, { sizes::CT4 as usize }> = LruHashMap::new();

/// The earlier release's conntrack table during an upgrade (`maps::CT4_PREVIOUS`): the agent
/// binds this name to that release's pin at load; read on a miss only while the config says
/// so. Otherwise a private map of one entry that stays empty.
#[btf_map]
pub static CT4_PREV: HashMap<Ct4Key, Ct4Value, 1> = HashMap::new();

/// First fragments' ports, for the fragments that follow (LRU: short-lived by nature).
#[btf_map]
pub static LB4_FRG_V1: LruHashMap<Frag4Key, Frag4Value, { sizes::FRAG4 as usize }> =
    LruHashMap::new();

#[btf_map]
pub static CNT_V2: PerCpuArray<u64, { counter::MAX as usize }> = PerCpuArray::new();

#[btf_map]
pub static CFG_V2: Array<NodeConfig, 1> = Array::new();

#[btf_map]
pub static LB4_VIP_V1: HashMap<u32, VipValue, { sizes::VIP4 as usize }> = HashMap::new();

#[btf_map]
pub static LB4_SRC_V2: LpmTrie<SrcRange4Data, u8, { sizes::SRC_RANGE4 as usize }> = LpmTrie::new();

/// Outer sources IPIP/GUE decapsulation accepts (`--decap-allowed-sources`), read only when
/// the config says the sources are restricted.
#[btf_map]
pub static LB4_DSRC_V1: LpmTrie<u32, u8, { sizes::DECAP_SRC4 as usize }> = LpmTrie::new();

#[btf_map]
pub static LB4_AFF_V2: LruHashMap<Aff4Key, Aff4Value, { sizes::AFFINITY4 as usize }> =
    LruHashMap::new();

#[btf_map]
pub static LB4_SCNT_V1: PerCpuArray<SvcCounter, { sizes::SVC_IDS as usize }> = PerCpuArray::new();

#[btf_map]
pub static LB4_RJB_V1: PerCpuArray<RejectBucket, 1> = PerCpuArray::new();

/// Per-CPU scratch space (not pinned: it holds nothing between packets).
#[btf_map]
pub static SCRATCH_V2: PerCpuArray<Scratch, 1> = PerCpuArray::new();

/// Pod interfaces' network namespace IDs (`maps::POD_NETNS`).
#[btf_map]
pub static PODNS_V1: HashMap<u32, i32, { sizes::POD_NETNS as usize }> = HashMap::new();

/// The node's subnet broadcast addresses (`maps::BROADCAST4`).
#[btf_map]
pub static BCAST4_V1: HashMap<u32, u8, { sizes::BROADCAST4 as usize }> = HashMap::new();

/// Whether `addr_be` is the broadcast address of one of the node's subnets.
#[inline(always)]
pub fn is_subnet_broadcast(addr_be: u32) -> bool {
    // SAFETY: only presence is read.
    unsafe { BCAST4_V1.get(addr_be) }.is_some()
}

/// This CPU's scratch space.
#[inline(always)]
pub fn scratch() -> Option<*mut Scratch> {
    SCRATCH_V2.get_ptr_mut(0)
}

/// The node config's flags, read without copying the whole config.
#[inline(always)]
pub fn config_flags() -> u32 {
    CFG_V2.get(0).map_or(0, |c| c.flags)
}

/// Takes one REJECT reply from this CPU's token bucket; `false`: over the limit, don't reply.
/// Per-CPU so it needs no atomics (documented in docs/security.md).
#[inline(always)]
pub fn reject_allowed() -> bool {
    let Some(b) = LB4_RJB_V1.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    let cap = reject_limit::BURST * reject_limit::COST_NS;
    // SAFETY: a per-CPU slot that only this CPU writes.
    unsafe {
        let credit = ((*b).credit_ns + now.saturating_sub((*b).last_ns)).min(cap);
        (*b).last_ns = now;
        if credit < reject_limit::COST_NS {
            (*b).credit_ns = credit;
            return false;
        }
        (*b).credit_ns = credit - reject_limit::COST_NS;
    }
    true
}

/// Counts one translated forward packet of `bytes` (L3 length) for service `svc_id`. IDs past
/// the map's size (the agent never allocates them) are not counted.
#[inline(always)]
pub fn count_service(svc_id: u32, bytes: u32) {
    if let Some(c) = LB4_SCNT_V1.get_ptr_mut(svc_id) {
        // SAFETY: a per-CPU slot that only this CPU writes.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes as u64;
        }
    }
}

/// Counts one verdict. Per-CPU, so no atomics; the agent sums at read time.
#[inline(always)]
pub fn count(reason: u32) {
    if let Some(c) = CNT_V2.get_ptr_mut(reason) {
        // SAFETY: a per-CPU slot that only this CPU writes.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn node_config() -> NodeConfig {
    match CFG_V2.get(0) {
        Some(c) => *c,
        None => NodeConfig::default(),
    }
}

/// Whether `src_be` is inside one of the `--decap-allowed-sources` CIDRs.
#[inline(always)]
pub fn decap_source_allowed(src_be: u32) -> bool {
    LB4_DSRC_V1.get(&Key::new(32, src_be)).is_some()
}

/// Whether `src` is allowed by the service's loadBalancerSourceRanges.
#[inline(always)]
pub fn source_allowed(svc_id: u32, src_be: u32) -> bool {
    let key = Key::new(64, SrcRange4Data::new(svc_id, src_be));
    LB4_SRC_V2.get(&key).is_some()
}
