//! How desired services become map entries: the ABI keys and values of services, backends,
//! ClusterIPs and source ranges, and back (reading the maps at startup).
use super::*;
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
    pub(super) fn is_canonical(&self) -> bool {
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
pub(super) fn service_value(ds: &DesiredService, count: u16, svc_id: u32) -> Svc4Value {
    Svc4Value::service(count, svc_id, ds.flags).with_affinity(ds.affinity_timeout_s)
}

/// The most slots a service can have (slot numbers are `u16`, slot 0 is the entry).
pub const MAX_BACKENDS_PER_SERVICE: usize = u16::MAX as usize;
