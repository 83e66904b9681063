//! kube-proxy's rule layouts for the same Services, for the baselines.
//!
//! iptables (`pkg/proxy/iptables/proxier.go`): nat `KUBE-SERVICES` holds one rule per service
//! port (`-d VIP -p tcp --dport P -j KUBE-SVC-X`), `KUBE-SVC-X` marks off-cluster sources for
//! masquerade and picks an endpoint with `statistic --mode random --probability 1/(n-i)`, each
//! `KUBE-SEP-Y` marks hairpin traffic and DNATs; `KUBE-MARK-MASQ` / `KUBE-POSTROUTING` do the
//! 0x4000 mark dance and MASQUERADE. Above 1000 endpoints kube-proxy drops the per-rule
//! comments ("large cluster mode"); so do we. The same text is loaded with iptables-restore
//! (legacy) and iptables-nft-restore. Chain hashes: kube-proxy uses base32(sha256(...))[:16];
//! we use a 64-bit FNV hash spelled in the same alphabet and length (only uniqueness and
//! length matter to the kernel).
//!
//! nftables (`pkg/proxy/nftables/proxier.go`): table `ip kube-proxy`, a `service-ips` verdict
//! map keyed `ipv4_addr . inet_proto . inet_service`, one `service-*` chain per service port
//! with `numgen random mod N vmap { i : goto endpoint-* }`, one `endpoint-*` chain per endpoint
//! with the masquerade mark for hairpin and `dnat to`, plus the `mark-for-masquerade` /
//! `masquerading` chains and the nat hooks.
//!
//! NodePorts (eTP Cluster): iptables sends local-destination traffic that no ClusterIP rule
//! matched from the end of `KUBE-SERVICES` to `KUBE-NODEPORTS`, which jumps per port to a
//! `KUBE-EXT-X` chain that marks for masquerade and goes on to `KUBE-SVC-X`; nftables looks
//! the port up in the `service-nodeports` verdict map and goes to an `external-*` chain that
//! does the same.
use std::{fmt::Write as _, net::Ipv4Addr};

pub const CLUSTER_CIDR: &str = "10.76.0.0/16";
const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

#[derive(Clone, Debug)]
pub struct Svc {
    pub ns: String,
    pub name: String,
    pub ip: Ipv4Addr,
    pub port: u16,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
    /// A NodePort (type NodePort, externalTrafficPolicy Cluster).
    pub node_port: Option<u16>,
}

impl Svc {
    fn port_name(&self) -> String {
        format!("{}/{}:http", self.ns, self.name)
    }
}

fn hash16(s: &str) -> String {
    const ALPHA: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut h2 = h.rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15;
    (0..16)
        .map(|i| {
            let v = if i < 12 {
                h >> (i * 5)
            } else {
                h2 >> ((i - 12) * 5)
            };
            h2 = h2.wrapping_mul(31);
            ALPHA[(v & 31) as usize] as char
        })
        .collect()
}

pub fn svc_chain(s: &Svc) -> String {
    format!("KUBE-SVC-{}", hash16(&format!("{}tcp", s.port_name())))
}

fn ext_chain(s: &Svc) -> String {
    format!("KUBE-EXT-{}", hash16(&format!("{}tcp", s.port_name())))
}

pub fn sep_chain(s: &Svc, ep: (Ipv4Addr, u16)) -> String {
    format!(
        "KUBE-SEP-{}",
        hash16(&format!("{}tcp{}:{}", s.port_name(), ep.0, ep.1))
    )
}

fn large(svcs: &[Svc]) -> bool {
    svcs.iter().map(|s| s.endpoints.len()).sum::<usize>() > LARGE_CLUSTER_ENDPOINTS
}

fn comment(on: bool, text: &str) -> String {
    if on {
        format!("-m comment --comment \"{text}\" ")
    } else {
        String::new()
    }
}

/// `KUBE-SERVICES` rules (always rewritten in full by kube-proxy, also in partial syncs).
fn services_rules(out: &mut String, svcs: &[Svc]) {
    for s in svcs {
        let _ = writeln!(
            out,
            "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -d {}/32 -p tcp -m tcp --dport {} -j {}",
            s.port_name(),
            s.ip,
            s.port,
            svc_chain(s)
        );
    }
    let _ = writeln!(
        out,
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
    );
}

/// One service's `KUBE-SVC` chain body and its `KUBE-SEP` chains (declarations separate).
fn service_chains(out: &mut String, s: &Svc, comments: bool) {
    let svc = svc_chain(s);
    if let Some(np) = s.node_port {
        let ext = ext_chain(s);
        let _ = writeln!(
            out,
            "-A KUBE-NODEPORTS -m comment --comment {} -m tcp -p tcp --dport {np} -j {ext}",
            s.port_name()
        );
        let _ = writeln!(
            out,
            "-A {ext} -m comment --comment \"masquerade traffic for {} external destinations\" -j KUBE-MARK-MASQ",
            s.port_name()
        );
        let _ = writeln!(out, "-A {ext} -j {svc}");
    }
    let _ = writeln!(
        out,
        "-A {svc} -m comment --comment \"{} cluster IP\" -d {}/32 -p tcp -m tcp --dport {} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
        s.port_name(),
        s.ip,
        s.port
    );
    let n = s.endpoints.len();
    for (i, ep) in s.endpoints.iter().enumerate() {
        let c = comment(comments, &format!("{} -> {}:{}", s.port_name(), ep.0, ep.1));
        if i + 1 < n {
            let p = 1.0 / (n - i) as f64;
            let _ = writeln!(
                out,
                "-A {svc} {c}-m statistic --mode random --probability {p:.11} -j {}",
                sep_chain(s, *ep)
            );
        } else {
            let _ = writeln!(out, "-A {svc} {c}-j {}", sep_chain(s, *ep));
        }
    }
    for ep in &s.endpoints {
        let sep = sep_chain(s, *ep);
        let c = comment(comments, &s.port_name());
        let _ = writeln!(out, "-A {sep} {c}-s {}/32 -j KUBE-MARK-MASQ", ep.0);
        let _ = writeln!(
            out,
            "-A {sep} {c}-m tcp -p tcp -j DNAT --to-destination {}:{}",
            ep.0, ep.1
        );
    }
}

fn declare(out: &mut String, s: &Svc) {
    let _ = writeln!(out, ":{} - [0:0]", svc_chain(s));
    if s.node_port.is_some() {
        let _ = writeln!(out, ":{} - [0:0]", ext_chain(s));
    }
    for ep in &s.endpoints {
        let _ = writeln!(out, ":{} - [0:0]", sep_chain(s, *ep));
    }
}

/// The full ruleset as `iptables-restore` input (replaces the filter and nat tables: meant
/// for a node namespace that holds nothing else).
pub fn iptables_full(svcs: &[Svc]) -> String {
    let comments = !large(svcs);
    let mut o = String::with_capacity(svcs.len() * 1500);
    o.push_str("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    o.push_str(":KUBE-FORWARD - [0:0]\n:KUBE-SERVICES - [0:0]\n");
    o.push_str("-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n");
    o.push_str("-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    o.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n");
    o.push_str("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n");
    o.push_str("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
    o.push_str("COMMIT\n");
    o.push_str("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n");
    o.push_str(":KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
    for s in svcs {
        declare(&mut o, s);
    }
    o.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    o.push_str("-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    o.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    o.push_str("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n");
    o.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    o.push_str("-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n");
    o.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    services_rules(&mut o, svcs);
    for s in svcs {
        service_chains(&mut o, s, comments);
    }
    o.push_str("COMMIT\n");
    o
}

/// A partial sync as kube-proxy (MinimizeIPTablesRestore) does it, for `iptables-restore
/// --noflush`: `KUBE-SERVICES` in full, the chains of the `changed` services rewritten,
/// `gone` chains (endpoints removed) deleted.
pub fn iptables_partial(all: &[Svc], changed: &[&Svc], gone: &[String]) -> String {
    let comments = !large(all);
    let mut o = String::with_capacity(all.len() * 200);
    o.push_str("*nat\n:KUBE-SERVICES - [0:0]\n");
    for s in changed {
        declare(&mut o, s);
    }
    for g in gone {
        let _ = writeln!(o, ":{g} - [0:0]");
    }
    services_rules(&mut o, all);
    for s in changed {
        service_chains(&mut o, s, comments);
    }
    for g in gone {
        let _ = writeln!(o, "-X {g}");
    }
    o.push_str("COMMIT\n");
    o
}

fn nft_svc_chain(s: &Svc) -> String {
    format!(
        "service-{}-{}/{}/tcp/http",
        &hash16(&s.port_name())[..8],
        s.ns,
        s.name
    )
}

fn nft_ext_chain(s: &Svc) -> String {
    format!(
        "external-{}-{}/{}/tcp/http",
        &hash16(&s.port_name())[..8],
        s.ns,
        s.name
    )
}

fn nft_ep_chain(s: &Svc, ep: (Ipv4Addr, u16)) -> String {
    format!(
        "endpoint-{}-{}/{}/tcp/http__{}/{}",
        &hash16(&format!("{}{}", s.port_name(), ep.0))[..8],
        s.ns,
        s.name,
        ep.0,
        ep.1
    )
}

fn nft_service(o: &mut String, s: &Svc) {
    let chain = nft_svc_chain(s);
    let _ = writeln!(o, "add chain ip kube-proxy {chain}");
    let _ = writeln!(o, "flush chain ip kube-proxy {chain}");
    if let Some(np) = s.node_port {
        let ext = nft_ext_chain(s);
        let _ = writeln!(o, "add chain ip kube-proxy {ext}");
        let _ = writeln!(o, "flush chain ip kube-proxy {ext}");
        let _ = writeln!(o, "add rule ip kube-proxy {ext} jump mark-for-masquerade");
        let _ = writeln!(o, "add rule ip kube-proxy {ext} goto {chain}");
        let _ = writeln!(
            o,
            "add element ip kube-proxy service-nodeports {{ tcp . {np} : goto {ext} }}"
        );
    }
    let _ = writeln!(
        o,
        "add rule ip kube-proxy {chain} ip daddr {} tcp dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        s.ip, s.port
    );
    let arms: Vec<String> = s
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, ep)| format!("{i} : goto {}", nft_ep_chain(s, *ep)))
        .collect();
    for ep in &s.endpoints {
        let c = nft_ep_chain(s, *ep);
        let _ = writeln!(o, "add chain ip kube-proxy {c}");
        let _ = writeln!(o, "flush chain ip kube-proxy {c}");
        let _ = writeln!(
            o,
            "add rule ip kube-proxy {c} ip saddr {} jump mark-for-masquerade",
            ep.0
        );
        let _ = writeln!(
            o,
            "add rule ip kube-proxy {c} meta l4proto tcp dnat to {}:{}",
            ep.0, ep.1
        );
    }
    let _ = writeln!(
        o,
        "add rule ip kube-proxy {chain} numgen random mod {} vmap {{ {} }}",
        s.endpoints.len(),
        arms.join(" , ")
    );
}

fn nft_element(s: &Svc) -> String {
    format!("{} . tcp . {} : goto {}", s.ip, s.port, nft_svc_chain(s))
}

/// The full `ip kube-proxy` table as `nft -f` input (one transaction).
pub fn nft_full(svcs: &[Svc]) -> String {
    let mut o = String::with_capacity(svcs.len() * 2000);
    o.push_str("add table ip kube-proxy { comment \"rules for kube-proxy\" ; }\n");
    o.push_str(
        "add set ip kube-proxy cluster-ips { type ipv4_addr ; comment \"Active ClusterIPs\" ; }\n",
    );
    o.push_str("add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }\n");
    o.push_str("add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }\n");
    o.push_str(
        "add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }\n",
    );
    o.push_str("add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }\n");
    o.push_str(
        "add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }\n",
    );
    o.push_str(
        "add chain ip kube-proxy filter-forward { type filter hook forward priority -110 ; }\n",
    );
    o.push_str("add chain ip kube-proxy mark-for-masquerade\nadd chain ip kube-proxy masquerading\nadd chain ip kube-proxy services\n");
    o.push_str("add rule ip kube-proxy nat-prerouting jump services\n");
    o.push_str("add rule ip kube-proxy nat-output jump services\n");
    o.push_str("add rule ip kube-proxy nat-postrouting jump masquerading\n");
    o.push_str("add rule ip kube-proxy filter-forward ct state invalid drop\n");
    o.push_str("add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000\n");
    o.push_str("add rule ip kube-proxy masquerading mark and 0x4000 == 0 return\n");
    o.push_str("add rule ip kube-proxy masquerading mark set mark xor 0x4000\n");
    o.push_str("add rule ip kube-proxy masquerading masquerade fully-random\n");
    o.push_str(
        "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n",
    );
    o.push_str("add rule ip kube-proxy services fib daddr type local meta l4proto . th dport vmap @service-nodeports\n");
    for s in svcs {
        nft_service(&mut o, s);
    }
    for chunk in svcs.chunks(1000) {
        let ips: Vec<String> = chunk.iter().map(|s| s.ip.to_string()).collect();
        let _ = writeln!(
            o,
            "add element ip kube-proxy cluster-ips {{ {} }}",
            ips.join(" , ")
        );
        let els: Vec<String> = chunk.iter().map(nft_element).collect();
        let _ = writeln!(
            o,
            "add element ip kube-proxy service-ips {{ {} }}",
            els.join(" , ")
        );
    }
    o
}

/// An incremental nftables transaction: (re)write the chains of `changed`, add their
/// `service-ips` elements if `new`, delete `gone` endpoint chains.
pub fn nft_partial(changed: &[&Svc], new: bool, gone: &[String]) -> String {
    let mut o = String::new();
    for s in changed {
        nft_service(&mut o, s);
        if new {
            let _ = writeln!(o, "add element ip kube-proxy cluster-ips {{ {} }}", s.ip);
            let _ = writeln!(
                o,
                "add element ip kube-proxy service-ips {{ {} }}",
                nft_element(s)
            );
        }
    }
    for g in gone {
        let _ = writeln!(o, "delete chain ip kube-proxy {g}");
    }
    o
}

/// The endpoint chain names of `s` (nftables spelling), for deletions.
pub fn nft_endpoint_chains(s: &Svc) -> Vec<String> {
    s.endpoints.iter().map(|e| nft_ep_chain(s, *e)).collect()
}

/// The KUBE-SEP chain names of `s`, for deletions.
pub fn sep_chains(s: &Svc) -> Vec<String> {
    s.endpoints.iter().map(|e| sep_chain(s, *e)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(i: u32, n: u8) -> Svc {
        Svc {
            ns: "bench".into(),
            name: format!("svc-{i}"),
            ip: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            endpoints: (0..n)
                .map(|j| (Ipv4Addr::new(10, 76, 1, j), 9376))
                .collect(),
            node_port: None,
        }
    }

    #[test]
    fn nodeports_go_through_an_external_chain() {
        let s = Svc {
            node_port: Some(30080),
            ..svc(1, 2)
        };
        let ipt = iptables_full(std::slice::from_ref(&s));
        let ext = ext_chain(&s);
        assert!(ipt.contains(&format!(":{ext} - [0:0]")));
        assert!(ipt.contains(&format!("--dport 30080 -j {ext}")));
        assert!(ipt.contains(&format!("-A {ext} -j {}", svc_chain(&s))));
        // KUBE-NODEPORTS is reached from the end of KUBE-SERVICES only.
        let last = ipt
            .lines()
            .rfind(|l| l.starts_with("-A KUBE-SERVICES"))
            .unwrap_or_default();
        assert!(last.ends_with("--dst-type LOCAL -j KUBE-NODEPORTS"));
        let nft = nft_full(std::slice::from_ref(&s));
        assert!(nft.contains(&format!(
            "service-nodeports {{ tcp . 30080 : goto {} }}",
            nft_ext_chain(&s)
        )));
        assert!(nft.contains(&format!(
            "add rule ip kube-proxy {} goto {}",
            nft_ext_chain(&s),
            nft_svc_chain(&s)
        )));
        // Without a NodePort, neither layout mentions one.
        let plain = svc(1, 2);
        assert!(!iptables_full(std::slice::from_ref(&plain)).contains("KUBE-EXT-"));
        assert!(!nft_full(std::slice::from_ref(&plain)).contains("external-"));
    }

    #[test]
    fn iptables_layout_is_kube_proxys() {
        let s = svc(1, 3);
        let text = iptables_full(std::slice::from_ref(&s));
        let chain = svc_chain(&s);
        assert_eq!(chain.len(), "KUBE-SVC-".len() + 16);
        assert!(text.contains(&format!("--dport 80 -j {chain}")));
        // Probabilities 1/3, 1/2, then the unconditional last jump.
        assert!(text.contains("--probability 0.33333333333"));
        assert!(text.contains("--probability 0.50000000000"));
        assert_eq!(text.matches("-m statistic").count(), 2);
        assert_eq!(text.matches("-j DNAT --to-destination").count(), 3);
        assert!(text.contains("! -s 10.76.0.0/16 -j KUBE-MARK-MASQ"));
        assert!(text.ends_with("COMMIT\n"));
    }

    #[test]
    fn nft_layout_uses_the_verdict_map_and_numgen() {
        let s = svc(1, 3);
        let text = nft_full(std::slice::from_ref(&s));
        assert!(text.contains("vmap @service-ips"));
        assert!(text.contains("numgen random mod 3 vmap { 0 : goto endpoint-"));
        assert!(text.contains(&format!(
            "10.96.0.10 . tcp . 80 : goto {}",
            nft_svc_chain(&s)
        )));
    }

    #[test]
    fn chain_names_are_distinct() {
        let a = svc(1, 2);
        let b = svc(2, 2);
        assert_ne!(svc_chain(&a), svc_chain(&b));
        assert_ne!(sep_chains(&a), sep_chains(&b));
    }
}
