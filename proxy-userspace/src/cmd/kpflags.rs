//! kube-proxy's command line, as pure functions: the default subcommand (`ebpf-proxy --flags`
//! is `ebpf-proxy run --flags`, so kube-proxy's DaemonSet command line works), Go-style
//! booleans (`--flag`, `--flag=true`, `--flag=false`), the kube-proxy flags accepted and
//! ignored with one warning each, and local traffic detection (`--detect-local-mode`).
//! Nothing here touches the system.
use std::{ffi::OsString, net::Ipv4Addr};

use clap::{Arg, ArgAction, ArgMatches, Command, parser::ValueSource};
use k8s_openapi::api::core::v1::Node;
use serde::Deserialize;

use crate::sync::Cidr;

/// The subcommands of `ebpf-proxy` (and clap's `help`).
pub const SUBCOMMANDS: &[&str] = &["run", "inspect", "cleanup", "trace", "help"];

/// `ebpf-proxy --config=... --hostname-override=...` (kube-proxy's command line, no
/// subcommand) means `ebpf-proxy run --config=... ...`: inserts `run` when the first argument
/// is a flag other than help or version. No argument at all still prints the help, and a
/// first argument that is not a flag is left for clap to judge (a misspelt subcommand).
pub fn with_default_subcommand(mut argv: Vec<OsString>) -> Vec<OsString> {
    let first = argv.get(1).map(|a| a.to_string_lossy().into_owned());
    let Some(first) = first else {
        return argv;
    };
    let top_level = ["-h", "--help", "-V", "--version"];
    if first.starts_with('-') && !top_level.contains(&first.as_str()) {
        argv.insert(1, OsString::from("run"));
    }
    argv
}

/// Go's `strconv.ParseBool`, which kube-proxy's boolean flags use: `1 t T TRUE true True` and
/// `0 f F FALSE false False`.
pub fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean (true or false)")),
    }
}

/// A kube-proxy flag ebpf-proxy accepts and ignores, and why.
#[derive(Debug, Clone, Copy)]
pub struct IgnoredFlag {
    pub name: &'static str,
    /// A Go boolean (`--flag`, `--flag=false`); otherwise the flag takes a value.
    pub boolean: bool,
    pub why: &'static str,
}

const fn ignored(name: &'static str, boolean: bool, why: &'static str) -> IgnoredFlag {
    IgnoredFlag { name, boolean, why }
}

const IPVS: &str = "IPVS is not used: services are translated by BPF programs";
const SYNC: &str = "there are no rules to resync: every Service/EndpointSlice change is \
                    programmed as it arrives, and the pod interfaces are re-checked every 5 s";
const LOG_STREAMS: &str = "every log line goes unbuffered to stderr";

/// kube-proxy's flags (`cmd/kube-proxy/app/options.go` and the logging flags of
/// `k8s.io/component-base/logs`) that do not apply to ebpf-proxy. Each is accepted so a
/// kube-proxy command line starts unchanged, and named in one warning. The `--conntrack-*`
/// flags are not here: they are ebpf-proxy flags of their own.
pub const IGNORED_FLAGS: &[IgnoredFlag] = &[
    ignored(
        "feature-gates",
        false,
        "kube-proxy's feature gates switch kube-proxy code paths; what they enable is built in \
         here or does not apply",
    ),
    ignored(
        "kube-api-content-type",
        false,
        "the Kubernetes client (kube-rs) always speaks JSON",
    ),
    ignored(
        "kube-api-burst",
        false,
        "the client sends only lists and long-running watches; there is no client-side rate \
         limit to tune",
    ),
    ignored(
        "kube-api-qps",
        false,
        "the client sends only lists and long-running watches; there is no client-side rate \
         limit to tune",
    ),
    ignored(
        "bind-address",
        false,
        "the node's addresses come from its Node object; pass --node-ip to override them",
    ),
    ignored(
        "bind-address-hard-fail",
        true,
        "a health or metrics port that cannot be bound always stops ebpf-proxy (kube-proxy's \
         behaviour with this flag true)",
    ),
    ignored("profiling", true, "there is no /debug/pprof handler"),
    ignored(
        "show-hidden-metrics-for-version",
        false,
        "no metric is hidden",
    ),
    ignored(
        "proxy-mode",
        false,
        "the mode is eBPF; kube-proxy's iptables, ipvs and nftables modes do not apply",
    ),
    ignored(
        "iptables-masquerade-bit",
        false,
        "no fwmark is used: masquerading is decided and done in BPF",
    ),
    ignored(
        "iptables-localhost-nodeports",
        true,
        "NodePorts are never served on 127.0.0.1 (as in kube-proxy's nftables mode; \
         CVE-2020-8558)",
    ),
    ignored("iptables-sync-period", false, SYNC),
    ignored("iptables-min-sync-period", false, SYNC),
    ignored("ipvs-sync-period", false, SYNC),
    ignored("ipvs-min-sync-period", false, SYNC),
    ignored("ipvs-scheduler", false, IPVS),
    ignored("ipvs-exclude-cidrs", false, IPVS),
    ignored("ipvs-strict-arp", true, IPVS),
    ignored("ipvs-tcp-timeout", false, IPVS),
    ignored("ipvs-tcpfin-timeout", false, IPVS),
    ignored("ipvs-udp-timeout", false, IPVS),
    ignored(
        "config-sync-period",
        false,
        "the Kubernetes source watches continuously and relists only when a watch cannot be \
         resumed",
    ),
    ignored("log-flush-frequency", false, LOG_STREAMS),
    ignored(
        "vmodule",
        false,
        "per-file verbosity is not supported; use RUST_LOG (e.g. \
         RUST_LOG=info,proxy_userspace::source=debug)",
    ),
    ignored("log-json-split-stream", true, LOG_STREAMS),
    ignored("log-json-info-buffer-size", false, LOG_STREAMS),
    ignored("log-text-split-stream", true, LOG_STREAMS),
    ignored("log-text-info-buffer-size", false, LOG_STREAMS),
    ignored(
        "proxy-port-range",
        false,
        "a userspace-mode flag (removed from kube-proxy); no host port is consumed",
    ),
    ignored(
        "udp-timeout",
        false,
        "a userspace-mode flag (removed from kube-proxy); UDP flows age out of the BPF \
         conntrack table",
    ),
];

/// The help heading of the ignored flags (`--help` lists them, `-h` does not).
pub const IGNORED_HEADING: &str = "kube-proxy flags accepted and ignored (one warning each)";

/// Which of [`IGNORED_FLAGS`] were given (flattened into `ebpf-proxy run`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IgnoredFlags {
    /// Their names, in table order.
    pub given: Vec<&'static str>,
}

impl IgnoredFlags {
    /// One warning per ignored flag given, naming it and why it does not apply.
    pub fn warnings(&self) -> Vec<String> {
        self.given
            .iter()
            .filter_map(|n| IGNORED_FLAGS.iter().find(|f| f.name == *n))
            .map(|f| format!("--{}: ignored: {}", f.name, f.why))
            .collect()
    }
}

impl clap::FromArgMatches for IgnoredFlags {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let mut s = Self::default();
        s.update_from_arg_matches(m)?;
        Ok(s)
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        for f in IGNORED_FLAGS {
            let given = matches!(
                m.value_source(f.name),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            );
            if given && !self.given.contains(&f.name) {
                self.given.push(f.name);
            }
        }
        Ok(())
    }
}

impl clap::Args for IgnoredFlags {
    fn augment_args(mut cmd: Command) -> Command {
        for f in IGNORED_FLAGS {
            let mut a = Arg::new(f.name)
                .long(f.name)
                .action(ArgAction::Append)
                .hide_short_help(true)
                .help_heading(IGNORED_HEADING)
                .help(f.why);
            a = if f.boolean {
                a.num_args(0..=1)
                    .require_equals(true)
                    .default_missing_value("true")
                    .value_name("BOOL")
                    .value_parser(parse_go_bool)
            } else {
                a.num_args(1).value_name("VALUE").allow_hyphen_values(false)
            };
            cmd = cmd.arg(a);
        }
        cmd
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

/// kube-proxy's `--detect-local-mode` / `detectLocalMode`: how traffic from this cluster's
/// pods ("local") is told from other traffic, which decides what addressed to a ClusterIP is
/// masqueraded (docs/semantics.md, S8 and S19).
#[derive(clap::ValueEnum, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectLocalMode {
    /// Sources in --cluster-cidr are local (kube-proxy's default).
    #[default]
    #[value(name = "ClusterCIDR")]
    ClusterCIDR,
    /// Sources in this node's Node.spec.podCIDRs are local.
    #[value(name = "NodeCIDR")]
    NodeCIDR,
    /// Traffic from the pod bridge (--pod-bridge-interface) is local. Approximated: sources in
    /// the bridge's IPv4 subnet.
    #[value(name = "BridgeInterface")]
    BridgeInterface,
    /// Traffic from interfaces named --pod-interface-name-prefix* is local. Approximated:
    /// sources in the pod bridge's IPv4 subnet if one is named, else in the Node's podCIDR.
    #[value(name = "InterfaceNamePrefix")]
    InterfaceNamePrefix,
}

impl DetectLocalMode {
    /// The config file's spelling: empty means the default, as in kube-proxy.
    pub fn from_config(s: &str) -> Result<Self, String> {
        match s {
            "" | "ClusterCIDR" => Ok(Self::ClusterCIDR),
            "NodeCIDR" => Ok(Self::NodeCIDR),
            "BridgeInterface" => Ok(Self::BridgeInterface),
            "InterfaceNamePrefix" => Ok(Self::InterfaceNamePrefix),
            _ => Err(format!(
                "detectLocalMode {s:?}: expected ClusterCIDR, NodeCIDR, BridgeInterface or \
                 InterfaceNamePrefix"
            )),
        }
    }
}

/// Local traffic detection, resolved from the flags: what the datapath's one "local" IPv4
/// CIDR is, given what is only known at run time (the Node object, the bridge's subnet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalDetection {
    pub mode: DetectLocalMode,
    /// `--cluster-cidr`'s IPv4 CIDR (used by ClusterCIDR only).
    pub cluster_cidr: Cidr,
    /// `--pod-bridge-interface`.
    pub bridge: String,
    /// `--pod-interface-name-prefix`.
    pub prefix: String,
}

impl LocalDetection {
    /// The "local" CIDR the datapath compares sources with; unset (zero mask) means no local
    /// detection: then, as in kube-proxy, nothing is masqueraded because of its source.
    /// `node` is this node's Node object if known; `bridge_nets` the pod bridge's IPv4
    /// addresses with their prefix lengths.
    pub fn local_cidr(&self, node: Option<&Node>, bridge_nets: &[(Ipv4Addr, u8)]) -> Cidr {
        match self.mode {
            DetectLocalMode::ClusterCIDR => self.cluster_cidr,
            _ if self.follows_node() => node.and_then(node_pod_cidr_v4).unwrap_or_default(),
            _ => bridge_nets
                .iter()
                // A /32 is an address, not a subnet of pods.
                .find(|(_, p)| (1..=31).contains(p))
                .map(|&(a, p)| Cidr {
                    addr: Ipv4Addr::from(
                        u32::from(a) & u32::from(Cidr { addr: a, prefix: p }.mask()),
                    ),
                    prefix: p,
                })
                .unwrap_or_default(),
        }
    }

    /// Whether the local CIDR is the Node object's podCIDR: NodeCIDR, and InterfaceNamePrefix
    /// without a pod bridge (routed pods have no bridge subnet; their addresses come from
    /// the node's podCIDR).
    pub fn follows_node(&self) -> bool {
        self.mode == DetectLocalMode::NodeCIDR
            || (self.mode == DetectLocalMode::InterfaceNamePrefix && self.bridge.is_empty())
    }

    /// Checks the flags as kube-proxy's validation does and returns what to log at startup:
    /// `(info, warnings)`. Warnings say exactly where the detection is approximated.
    pub fn check(&self, cluster_cidr_given: bool) -> Result<(Vec<String>, Vec<String>), String> {
        let mut info = Vec::new();
        let mut warn = Vec::new();
        if cluster_cidr_given && self.mode != DetectLocalMode::ClusterCIDR {
            info.push(format!(
                "--cluster-cidr is not used with --detect-local-mode {:?} (as in kube-proxy)",
                self.mode
            ));
        }
        match self.mode {
            DetectLocalMode::ClusterCIDR => {
                if self.cluster_cidr.is_set() {
                    info.push(format!(
                        "local traffic (--detect-local-mode ClusterCIDR): sources in {}/{}",
                        self.cluster_cidr.addr, self.cluster_cidr.prefix
                    ));
                } else {
                    info.push(
                        "no IPv4 cluster CIDR (--cluster-cidr / clusterCIDR): as with \
                         kube-proxy, ClusterIP traffic is not masqueraded because of its source"
                            .to_owned(),
                    );
                }
            }
            DetectLocalMode::NodeCIDR => info.push(
                "local traffic (--detect-local-mode NodeCIDR): sources in this node's \
                 Node.spec.podCIDRs (IPv4 entry), read from the Node object; until it is known, \
                 nothing is masqueraded because of its source"
                    .to_owned(),
            ),
            DetectLocalMode::BridgeInterface => {
                if self.bridge.is_empty() {
                    return Err("--detect-local-mode BridgeInterface needs \
                                --pod-bridge-interface (the bridge the pods are on)"
                        .to_owned());
                }
                warn.push(format!(
                    "--detect-local-mode BridgeInterface is approximated: kube-proxy treats \
                     traffic arriving from bridge {b:?} as local; ebpf-proxy's datapath compares \
                     source addresses, so traffic whose source is in {b:?}'s IPv4 subnet is \
                     local, whatever interface it arrived on",
                    b = self.bridge
                ));
            }
            DetectLocalMode::InterfaceNamePrefix => {
                if self.prefix.is_empty() {
                    return Err("--detect-local-mode InterfaceNamePrefix needs \
                                --pod-interface-name-prefix (e.g. veth)"
                        .to_owned());
                }
                let by = if self.bridge.is_empty() {
                    "this node's Node.spec.podCIDRs (IPv4 entry)".to_owned()
                } else {
                    format!("bridge {:?}'s IPv4 subnet", self.bridge)
                };
                warn.push(format!(
                    "--detect-local-mode InterfaceNamePrefix is approximated: kube-proxy treats \
                     traffic arriving from interfaces named {p:?}* as local; ebpf-proxy's \
                     datapath compares source addresses, so traffic whose source is in {by} is \
                     local, whatever interface it arrived on (pod interfaces not named {p:?}* \
                     are reported)",
                    p = self.prefix,
                ));
            }
        }
        Ok((info, warn))
    }

    /// InterfaceNamePrefix: the pod interfaces whose names lack the prefix (kube-proxy would
    /// not treat their traffic as local; here it is, by its source address).
    pub fn ports_without_prefix<'a>(
        &self,
        ports: impl IntoIterator<Item = &'a str>,
    ) -> Vec<String> {
        if self.mode != DetectLocalMode::InterfaceNamePrefix {
            return Vec::new();
        }
        ports
            .into_iter()
            .filter(|p| !p.starts_with(&self.prefix))
            .map(str::to_owned)
            .collect()
    }
}

/// The IPv4 entry of a Node's `spec.podCIDRs` (else `spec.podCIDR`), as kube-proxy's NodeCIDR
/// detector reads it.
pub fn node_pod_cidr_v4(node: &Node) -> Option<Cidr> {
    let spec = node.spec.as_ref()?;
    spec.pod_cidrs
        .iter()
        .flatten()
        .chain(spec.pod_cidr.iter())
        .filter_map(|c| c.parse::<ipnet::Ipv4Net>().ok())
        .map(|n| Cidr {
            addr: n.network(),
            prefix: n.prefix_len(),
        })
        .next()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use k8s_openapi::api::core::v1::NodeSpec;

    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn node(pod_cidrs: &[&str]) -> Node {
        Node {
            spec: Some(NodeSpec {
                pod_cidrs: Some(pod_cidrs.iter().map(|s| (*s).to_owned()).collect()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn detection(mode: DetectLocalMode) -> LocalDetection {
        LocalDetection {
            mode,
            cluster_cidr: cidr("10.244.0.0/16"),
            bridge: "cbr0".to_owned(),
            prefix: "veth".to_owned(),
        }
    }

    #[test]
    fn default_subcommand_is_run() {
        let argv = |v: &[&str]| -> Vec<OsString> { v.iter().map(OsString::from).collect() };
        for (given, want) in [
            (
                vec!["ebpf-proxy", "--config=/c", "--hostname-override=n"],
                vec!["ebpf-proxy", "run", "--config=/c", "--hostname-override=n"],
            ),
            (
                vec!["ebpf-proxy", "-v=2"],
                vec!["ebpf-proxy", "run", "-v=2"],
            ),
            (
                vec!["ebpf-proxy", "--cleanup"],
                vec!["ebpf-proxy", "run", "--cleanup"],
            ),
            (vec!["ebpf-proxy"], vec!["ebpf-proxy"]),
            (vec!["ebpf-proxy", "--help"], vec!["ebpf-proxy", "--help"]),
            (vec!["ebpf-proxy", "-h"], vec!["ebpf-proxy", "-h"]),
            (
                vec!["ebpf-proxy", "--version"],
                vec!["ebpf-proxy", "--version"],
            ),
            (vec!["ebpf-proxy", "-V"], vec!["ebpf-proxy", "-V"]),
            (vec!["ebpf-proxy", "inspect"], vec!["ebpf-proxy", "inspect"]),
            (
                vec!["ebpf-proxy", "run", "--v=2"],
                vec!["ebpf-proxy", "run", "--v=2"],
            ),
            (vec!["ebpf-proxy", "rnu"], vec!["ebpf-proxy", "rnu"]),
        ] {
            assert_eq!(
                with_default_subcommand(argv(&given)),
                argv(&want),
                "{given:?}"
            );
        }
    }

    #[test]
    fn go_booleans() {
        for t in ["1", "t", "T", "TRUE", "true", "True"] {
            assert_eq!(parse_go_bool(t), Ok(true), "{t}");
        }
        for f in ["0", "f", "F", "FALSE", "false", "False"] {
            assert_eq!(parse_go_bool(f), Ok(false), "{f}");
        }
        for bad in ["", "yes", "tRUE", "2"] {
            assert!(parse_go_bool(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ignored_flags_are_named_once_with_a_reason() {
        let mut names: Vec<&str> = IGNORED_FLAGS.iter().map(|f| f.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), IGNORED_FLAGS.len(), "no duplicates");
        assert!(
            !names.iter().any(|n| n.starts_with("conntrack")),
            "--conntrack-* are ebpf-proxy flags of their own"
        );
        let f = IgnoredFlags {
            given: vec!["proxy-mode", "ipvs-scheduler"],
        };
        let w = f.warnings();
        assert_eq!(w.len(), 2);
        assert!(
            w[0].starts_with("--proxy-mode: ignored: the mode is eBPF"),
            "{w:?}"
        );
        assert!(w[1].starts_with("--ipvs-scheduler: ignored: IPVS"), "{w:?}");
    }

    /// The detect-local-mode matrix: what the datapath treats as local in each mode, with and
    /// without what the mode reads at run time.
    #[test]
    fn detect_local_mode_matrix() {
        use DetectLocalMode::*;
        let n = node(&["10.244.3.0/24", "fd00:3::/64"]);
        let v6_first = node(&["fd00:3::/64", "10.244.7.0/24"]);
        let legacy = Node {
            spec: Some(NodeSpec {
                pod_cidr: Some("10.244.9.0/24".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let bridge = [(Ipv4Addr::new(10, 244, 3, 1), 24)];
        let none = Cidr::default();
        for (mode, node, nets, want) in [
            (ClusterCIDR, None, &bridge[..], cidr("10.244.0.0/16")),
            (ClusterCIDR, Some(&n), &bridge[..], cidr("10.244.0.0/16")),
            (NodeCIDR, None, &bridge[..], none),
            (NodeCIDR, Some(&n), &[][..], cidr("10.244.3.0/24")),
            (NodeCIDR, Some(&v6_first), &[][..], cidr("10.244.7.0/24")),
            (NodeCIDR, Some(&legacy), &[][..], cidr("10.244.9.0/24")),
            (NodeCIDR, Some(&node(&[])), &[][..], none),
            (
                BridgeInterface,
                Some(&n),
                &bridge[..],
                cidr("10.244.3.0/24"),
            ),
            (BridgeInterface, None, &[][..], none),
            (
                InterfaceNamePrefix,
                None,
                &bridge[..],
                cidr("10.244.3.0/24"),
            ),
            (
                InterfaceNamePrefix,
                None,
                &[
                    (Ipv4Addr::new(10, 244, 3, 1), 32),
                    (Ipv4Addr::new(10, 9, 9, 1), 20),
                ][..],
                cidr("10.9.0.0/20"),
            ),
        ] {
            let got = detection(mode).local_cidr(node, nets);
            assert_eq!(got, want, "{mode:?} node={} nets={nets:?}", node.is_some());
        }
        // InterfaceNamePrefix without a pod bridge (routed pods): the Node's podCIDR.
        let mut d = detection(InterfaceNamePrefix);
        d.bridge = String::new();
        assert!(d.follows_node());
        assert_eq!(d.local_cidr(Some(&n), &[]), cidr("10.244.3.0/24"));
        assert_eq!(d.local_cidr(None, &[]), none);
        assert!(!detection(InterfaceNamePrefix).follows_node());
        // No cluster CIDR in ClusterCIDR mode: no local detection (kube-proxy's no-op detector).
        let mut d = detection(ClusterCIDR);
        d.cluster_cidr = Cidr::default();
        assert!(!d.local_cidr(Some(&n), &bridge).is_set());
    }

    #[test]
    fn detect_local_mode_checks_and_warnings() {
        use DetectLocalMode::*;
        let (info, warn) = detection(ClusterCIDR).check(true).unwrap();
        assert!(warn.is_empty());
        assert!(info[0].contains("sources in 10.244.0.0/16"), "{info:?}");
        let mut d = detection(ClusterCIDR);
        d.cluster_cidr = Cidr::default();
        let (info, _) = d.check(false).unwrap();
        assert!(
            info[0].contains("not masqueraded because of its source"),
            "{info:?}"
        );
        let (info, warn) = detection(NodeCIDR).check(true).unwrap();
        assert!(warn.is_empty());
        assert!(info[0].contains("--cluster-cidr is not used"), "{info:?}");
        assert!(info[1].contains("Node.spec.podCIDRs"), "{info:?}");
        for mode in [BridgeInterface, InterfaceNamePrefix] {
            let (_, warn) = detection(mode).check(false).unwrap();
            assert_eq!(warn.len(), 1, "{mode:?}");
            assert!(
                warn[0].contains("approximated") && warn[0].contains("IPv4 subnet"),
                "{warn:?}"
            );
        }
        let mut d = detection(InterfaceNamePrefix);
        d.prefix.clear();
        assert!(
            d.check(false)
                .unwrap_err()
                .contains("--pod-interface-name-prefix")
        );
        let mut d = detection(BridgeInterface);
        d.bridge.clear();
        assert!(
            d.check(false)
                .unwrap_err()
                .contains("--pod-bridge-interface")
        );

        let d = detection(InterfaceNamePrefix);
        assert_eq!(d.ports_without_prefix(["veth1", "eth7", "vethx"]), ["eth7"]);
        assert!(
            detection(BridgeInterface)
                .ports_without_prefix(["eth7"])
                .is_empty()
        );
        for (s, want) in [
            ("", ClusterCIDR),
            ("ClusterCIDR", ClusterCIDR),
            ("NodeCIDR", NodeCIDR),
            ("BridgeInterface", BridgeInterface),
            ("InterfaceNamePrefix", InterfaceNamePrefix),
        ] {
            assert_eq!(DetectLocalMode::from_config(s), Ok(want), "{s:?}");
        }
        assert!(
            DetectLocalMode::from_config("nodecidr").is_err(),
            "the file is exact"
        );
    }
}
