//! Socket-level load balancing for host processes, and with `--socket-lb=all` for pods' TCP
//! connections (cgroup v2 sock_addr hooks).
//!
//! Host-network processes (kubelet, hostNetwork pods) never cross a pod veth, so the tc
//! programs never see their traffic. Instead, four programs attached to a cgroup v2 directory
//! (the cgroup root on a real node, a per-node cgroup in the lab) rewrite the address the
//! process asked for, before any packet exists:
//!
//! ```text
//! connect(VIP:port)  --lb_sock_conn4-->  lookup_service -> select_backend -> user_ip4/port :=
//! sendto(VIP:port)   --lb_sock_send4-->  backend; remember (cookie, backend) -> VIP (LB4_RSK_V2)
//! recvfrom()         --lb_sock_recv4-->  source backend -> VIP   (via LB4_RSK_V2)
//! getpeername()      --lb_sock_peer4-->  peer backend   -> VIP   (via LB4_RSK_V2)
//! ```
//!
//! No per-packet NAT and no conntrack entry: the socket itself talks to the backend, so the
//! backend sees the node's address (what kube-proxy's masquerade would give it anyway).
//! Unconnected UDP keeps its backend per (socket, service) in LB4_FSK_V2 while that backend
//! exists, like a conntrack flow of a fixed 5-tuple.
//!
//! Which sockets: by default (`--socket-lb=host`) only those of the host network namespace.
//! The hooks sit on the cgroup root, which holds every pod's processes too; a pod's socket is
//! left untouched (its cookie differs from `NodeConfig::host_netns_cookie`) and the tc
//! programs on its veth translate its packets, with every per-packet rule kube-proxy has.
//! `--socket-lb=all` (`cfg_flags::SOCK_LB_PODS_TCP`) also translates a pod's TCP `connect()`
//! when no per-packet rule could apply (see [`pod_at_socket`]): no NAT and no conntrack for
//! that connection. Anything else a pod does is still left to tc, verdicts included.
//!
//! Verdicts: a service with no usable endpoint fails the syscall with ECONNREFUSED (what a
//! kube-proxy REJECT gives a TCP client; a UDP client sees it at `sendto` instead of on a later
//! `recv`); a Local-policy service with no local endpoint fails it with EPERM (kube-proxy drops,
//! which a client would only notice as a timeout).
use aya_ebpf::{
    bindings::{BPF_ANY, bpf_sock_addr},
    btf_maps::LruHashMap,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::{btf_map, cgroup_sock_addr},
    programs::SockAddrContext,
};
use proxy_common::{Backend4, SockKey4, SockXlate4, cfg_flags, counter, proto, sock, svc_flags};

use crate::{
    lb::{lookup_service, select_backend},
    maps::{LB4_BE_V1, LB4_VIP_V1, count, count_service, node_config},
};

/// (socket cookie, backend address) -> the service address the process asked for.
#[btf_map]
static LB4_RSK_V2: LruHashMap<SockKey4, SockXlate4, { sock::MAP_ENTRIES as usize }> =
    LruHashMap::new();

/// (socket cookie, service address) -> the backend an unconnected UDP socket keeps using.
#[btf_map]
static LB4_FSK_V2: LruHashMap<SockKey4, SockXlate4, { sock::MAP_ENTRIES as usize }> =
    LruHashMap::new();

/// Return values of cgroup sock_addr programs.
const ALLOW: i32 = 1;
const DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;
const EPERM: i32 = 1;

/// cgroup `connect4`: every IPv4 `connect()` of a socket in the cgroup (TCP, and UDP sockets
/// being connected). A service address is replaced by a backend.
#[cgroup_sock_addr(connect4)]
pub fn lb_sock_conn4(ctx: SockAddrContext) -> i32 {
    xlate_fwd(&ctx, false)
}

/// cgroup `sendmsg4`: every `sendto`/`sendmsg` with an address on an unconnected UDP socket in
/// the cgroup. A service address is replaced by a backend, the same one for the socket's life.
#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sock_send4(ctx: SockAddrContext) -> i32 {
    xlate_fwd(&ctx, true)
}

/// cgroup `recvmsg4`: the source address `recvfrom`/`recvmsg` reports for a UDP datagram. A
/// backend this socket was sent to is shown as the service address. Never rejects.
#[cgroup_sock_addr(recvmsg4)]
pub fn lb_sock_recv4(ctx: SockAddrContext) -> i32 {
    xlate_rev(&ctx);
    ALLOW
}

/// cgroup `getpeername4`: the peer `getpeername` reports. A backend this socket was connected
/// to is shown as the service address. Never rejects.
#[cgroup_sock_addr(getpeername4)]
pub fn lb_sock_peer4(ctx: SockAddrContext) -> i32 {
    xlate_rev(&ctx);
    ALLOW
}

/// Fails the syscall with `errno` (`bpf_set_retval`, Linux >= 5.18; returning 0 alone gives
/// EPERM).
#[inline(always)]
fn deny(errno: i32) -> i32 {
    // SAFETY: a helper without memory arguments.
    unsafe { bpf_set_retval(-errno) };
    DENY
}

#[inline(always)]
fn xlate_fwd(ctx: &SockAddrContext, sendmsg: bool) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the context the kernel passed; these fields are readable by this program type.
    // `user_port` holds the port in network order in its low 16 bits.
    let (addr_be, port_be, proto) =
        unsafe { ((*sa).user_ip4, (*sa).user_port as u16, (*sa).protocol as u8) };
    if proto != proto::TCP && proto != proto::UDP {
        return ALLOW;
    }
    let cfg = node_config();
    // `--socket-lb=host|all`: a pod's socket (another network namespace).
    // SAFETY: the helper only reads the context's socket.
    let pod = cfg.flags & cfg_flags::SOCK_LB_HOST_ONLY != 0
        && unsafe { bpf_get_netns_cookie(sa.cast()) } != cfg.host_netns_cookie;
    // Left alone unless `all` and a TCP connect(), so its packets meet the tc programs, which
    // apply every per-packet rule (source ranges, affinity by pod address, a connected UDP
    // socket moved off a removed endpoint). `--masquerade-all` SNATs every ClusterIP flow,
    // which a socket cannot do.
    let pods_tcp = cfg.flags & (cfg_flags::SOCK_LB_PODS_TCP | cfg_flags::MASQUERADE_ALL)
        == cfg_flags::SOCK_LB_PODS_TCP;
    if pod && !(pods_tcp && !sendmsg && proto == proto::TCP) {
        // Except an unconnected UDP socket that an earlier release balanced here: it keeps
        // its backend while that exists, so an upgrade moves no live flow.
        if sendmsg {
            // SAFETY: the helper only reads the context's socket.
            let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
            if let Some((_, b)) = sticky_backend(true, &SockKey4::new(cookie, addr_be, port_be)) {
                // SAFETY: user_ip4/user_port are writable in sendmsg4.
                unsafe {
                    (*sa).user_ip4 = b.addr_be;
                    (*sa).user_port = b.port_be as u32;
                }
                count(counter::SOCK_XLATE);
            }
        }
        return ALLOW;
    }
    // Host and pod traffic is internal: internalTrafficPolicy applies, and
    // externalTrafficPolicy Local short-circuits to every endpoint.
    let Some(svc) = lookup_service(addr_be, port_be, proto, true) else {
        if pod {
            return ALLOW;
        }
        // A ClusterIP on a port/protocol no service uses: REJECT like kube-proxy.
        // SAFETY: the value is not kept.
        if unsafe { LB4_VIP_V1.get(addr_be) }.is_some() {
            count(counter::REJECT);
            return deny(ECONNREFUSED);
        }
        return ALLOW;
    };
    // A pod's verdicts (REJECT, DROP) stay tc's, per packet, as with `--socket-lb=host`.
    if pod && (svc.count == 0 || !pod_at_socket(svc.flags)) {
        return ALLOW;
    }
    if svc.count == 0 {
        if svc.flags & svc_flags::DROP_IF_EMPTY != 0 {
            count(counter::DROP_NO_LOCAL_BACKEND);
            return deny(EPERM);
        }
        count(counter::REJECT);
        return deny(ECONNREFUSED);
    }
    // SAFETY: the helper only reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    let fwd_key = SockKey4::new(cookie, addr_be, port_be);
    let (backend_id, b) = match sticky_backend(sendmsg, &fwd_key) {
        Some(x) => x,
        // Every host process has the node's address as its client (sessionAffinity; a pod
        // gets here only without it).
        None => match select_backend(&svc, cfg.node_addr_be) {
            Some(x) => x,
            None if pod => return ALLOW,
            None => {
                count(counter::DROP_BACKEND_MISSING);
                return deny(ECONNREFUSED);
            }
        },
    };
    // The reverse entry first: a process must never see a backend's address.
    let rev_key = SockKey4::new(cookie, b.addr_be, b.port_be);
    let rev = SockXlate4::new(addr_be, port_be, svc.svc_id, backend_id);
    if LB4_RSK_V2.insert(rev_key, rev, BPF_ANY as u64).is_err() {
        if pod {
            return ALLOW;
        }
        count(counter::DROP_CT_FULL);
        return deny(EPERM);
    }
    if sendmsg {
        let fwd = SockXlate4::new(b.addr_be, b.port_be, svc.svc_id, backend_id);
        // Best effort: without it the next datagram is balanced afresh.
        let _ = LB4_FSK_V2.insert(fwd_key, fwd, BPF_ANY as u64);
    }
    // SAFETY: user_ip4/user_port are writable in connect4/sendmsg4 (4-byte stores).
    unsafe {
        (*sa).user_ip4 = b.addr_be;
        (*sa).user_port = b.port_be as u32;
    }
    count(counter::SOCK_XLATE);
    // One per connect/sendmsg: the socket hooks never see the packets (no byte count).
    count_service(svc.svc_id, 0);
    ALLOW
}

/// `--socket-lb=all`: whether a pod's TCP connection to this service entry may be balanced at
/// the socket, i.e. no per-packet rule applies to it. Not with loadBalancerSourceRanges (the
/// source is checked per packet) or sessionAffinity (keyed by the pod's address, unknown
/// before connect), nor for a NodePort, externalIP or LoadBalancer entry with
/// externalTrafficPolicy Cluster, which kube-proxy masquerades even from pods. Pods are
/// assumed to be inside `--cluster-cidr`, so a ClusterIP is never masqueraded for its source.
#[inline(always)]
fn pod_at_socket(flags: u32) -> bool {
    let per_packet = svc_flags::SOURCE_RANGES | svc_flags::AFFINITY;
    let masqueraded = flags & svc_flags::EXTERNAL_KINDS != 0 && flags & svc_flags::ETP_LOCAL == 0;
    flags & per_packet == 0 && !masqueraded
}

/// The backend this UDP socket already uses for this service, while it still exists.
#[inline(always)]
fn sticky_backend(sendmsg: bool, key: &SockKey4) -> Option<(u32, Backend4)> {
    if !sendmsg {
        return None;
    }
    // SAFETY: values are copied out immediately.
    let f = *unsafe { LB4_FSK_V2.get(key) }?;
    let b = *unsafe { LB4_BE_V1.get(f.backend_id) }?;
    (b.addr_be == f.addr_be && b.port_be == f.port_be).then_some((f.backend_id, b))
}

#[inline(always)]
fn xlate_rev(ctx: &SockAddrContext) {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the context the kernel passed; the helper only reads its socket.
    let (addr_be, port_be, cookie) = unsafe {
        (
            (*sa).user_ip4,
            (*sa).user_port as u16,
            bpf_get_socket_cookie(sa.cast()),
        )
    };
    let key = SockKey4::new(cookie, addr_be, port_be);
    // SAFETY: the value is copied out immediately.
    if let Some(v) = unsafe { LB4_RSK_V2.get(key) } {
        let (a, p) = (v.addr_be, v.port_be);
        // SAFETY: user_ip4/user_port are writable in recvmsg4/getpeername4.
        unsafe {
            (*sa).user_ip4 = a;
            (*sa).user_port = p as u32;
        }
    }
}
