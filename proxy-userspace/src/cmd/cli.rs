//! The `ebpf-proxy` command line: subcommands, and kube-proxy's command line (no subcommand)
//! taken as `run`.
use std::{ffi::OsString, path::PathBuf};

use clap::{ArgMatches, CommandFactory as _, FromArgMatches as _, Parser, Subcommand};

use crate::cmd::{config, inspect, kpflags, trace};

#[derive(Parser, Debug)]
#[command(
    name = "ebpf-proxy",
    version = concat!(env!("CARGO_PKG_VERSION"), " (git ", env!("EBPF_PROXY_GIT_REVISION"), ")"),
    about = "Kubernetes service load balancing in eBPF (a kube-proxy replacement)",
    long_about = "Kubernetes service load balancing in eBPF, a kube-proxy replacement: ClusterIP, \
                  NodePort, LoadBalancer IPs (plain or IPIP/GUE-wrapped, direct server return) \
                  and externalIPs, with kube-proxy's masquerade, REJECT and traffic-policy rules. \
                  tc programs on the pods' interfaces (any CNI) and XDP and tc on the uplinks, \
                  and cgroup socket hooks for host processes, read BPF maps that the agent fills from Service, \
                  EndpointSlice and Node objects (Kubernetes API or a manifests directory).\n\n\
                  Start with `ebpf-proxy run --help`; `ebpf-proxy trace --help` answers \
                  \"where does this packet go\".\n\n\
                  kube-proxy's command line works as is: flags without a subcommand mean `run` \
                  (`ebpf-proxy --config=/var/lib/kube-proxy/config.conf \
                  --hostname-override=$(NODE_NAME)`). kube-proxy's flags keep kube-proxy's \
                  meaning; those that cannot apply are accepted and named in a warning \
                  (`ebpf-proxy run --help` lists them; docs/migration-from-kube-proxy.md has the \
                  table).\n\n\
                  Logging: `run --v=N` (kube-proxy's verbosity: 0-3 info, 4-5 debug, 6+ trace), \
                  `run --logging-format=json`; RUST_LOG=debug|info|warn (or per module) wins \
                  when set."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent: load and attach the datapath, then keep the maps in sync with the
    /// Kubernetes API or a manifests directory until SIGINT/SIGTERM. The default when the
    /// command line starts with a flag (kube-proxy's command line).
    // Boxed: the largest variant by far (clippy::large_enum_variant).
    Run(Box<config::RunArgs>),
    /// Show the programmed services (names, types, endpoints and their states), the
    /// connections in conntrack, the pinned links and the datapath counters; `inspect status`
    /// shows the agent: version, map ABI versions, configuration, last sync, health.
    Inspect(inspect::InspectArgs),
    /// Detach the programs and remove every link and map the agent pinned (drops connection
    /// state): how ebpf-proxy is removed from a node. Stopping the agent (SIGTERM, SIGKILL)
    /// deliberately leaves the programs attached, so restarts and upgrades drop nothing; run
    /// this after stopping it for good (e.g. before handing the node back to kube-proxy).
    /// `ebpf-proxy --cleanup` (kube-proxy's flag) does the same.
    Cleanup {
        /// The bpffs directory the agent was started with.
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
    /// Where does this packet go? Runs the real programs on synthesized packets against
    /// private maps programmed from manifests or from the live API server (--kubeconfig);
    /// prints the Service matched, the verdict, the endpoints reached, and whether the backend
    /// sees the client's address. Exit 0 whatever the verdict.
    Trace(trace::TraceArgs),
    /// Datapath debug logging on this node: `on` makes the programs say why each flow is
    /// dropped or rejected (reason, protocol, addresses) in the running agent's log, at info
    /// with target ebpf_proxy::datapath; `off` stops it; `status` shows it. Kept in the pinned
    /// config map, so it takes effect at once and survives agent restarts.
    Debug {
        #[arg(value_enum)]
        switch: DebugSwitch,
        /// The bpffs directory the agent was started with.
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
}

/// `ebpf-proxy debug`'s argument.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DebugSwitch {
    On,
    Off,
    Status,
}

/// A parsed command line, with `run`'s matches (`run --config` needs them to tell flags given
/// on the command line, which override the file, from defaults).
#[derive(Debug)]
pub struct Parsed {
    pub cli: Cli,
    pub run_matches: Option<ArgMatches>,
}

/// Parses a command line (`argv[0]` first), kube-proxy's included (see
/// [`kpflags::with_default_subcommand`]).
pub fn try_parse_from<I, T>(argv: I) -> Result<Parsed, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let argv = kpflags::with_default_subcommand(argv.into_iter().map(Into::into).collect());
    let matches = Cli::command().try_get_matches_from(argv)?;
    let cli = Cli::from_arg_matches(&matches)?;
    let run_matches = matches.subcommand_matches("run").cloned();
    Ok(Parsed { cli, run_matches })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;

    use clap::error::ErrorKind;

    use super::*;
    use crate::cmd::{
        config::{RunArgs, resolve},
        kpflags::{DetectLocalMode, IGNORED_FLAGS},
    };
    use crate::logging::LogFormat;

    /// kube-proxy's flags that ebpf-proxy honours (or approximates), with a sample value
    /// (`None`: a Go boolean given bare). `--conntrack-*` are listed apart ([`conntrack`]).
    fn honoured() -> Vec<(&'static str, Option<String>)> {
        let kubeadm = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/kubeadm/config.conf");
        vec![
            ("config", Some(kubeadm.display().to_string())),
            ("write-config-to", Some("/tmp/never-written".into())),
            ("cleanup", Some("false".into())),
            ("init-only", Some("false".into())),
            ("kubeconfig", Some("/etc/kube/kubeconfig".into())),
            ("master", Some("https://10.0.0.1:6443".into())),
            ("hostname-override", Some("node-a".into())),
            ("healthz-bind-address", Some("0.0.0.0:10256".into())),
            ("metrics-bind-address", Some("127.0.0.1:10249".into())),
            ("masquerade-all", None),
            ("detect-local-mode", Some("ClusterCIDR".into())),
            ("pod-bridge-interface", Some("cbr0".into())),
            ("pod-interface-name-prefix", Some("veth".into())),
            ("cluster-cidr", Some("10.244.0.0/16,fd00::/48".into())),
            ("nodeport-addresses", Some("primary".into())),
            ("oom-score-adj", Some("-999".into())),
            ("healthz-port", Some("10256".into())),
            ("metrics-port", Some("10249".into())),
            ("v", Some("2".into())),
            ("logging-format", Some("text".into())),
        ]
    }

    /// kube-proxy's `--conntrack-*` flags (`crate::conntrack::ConntrackArgs`: the timeouts
    /// apply to ebpf-proxy's table, the sizing ones are warned about).
    fn conntrack() -> Vec<(&'static str, Option<String>)> {
        vec![
            ("conntrack-max-per-core", Some("32768".into())),
            ("conntrack-min", Some("131072".into())),
            ("conntrack-tcp-timeout-established", Some("24h0m0s".into())),
            ("conntrack-tcp-timeout-close-wait", Some("1h0m0s".into())),
            ("conntrack-udp-timeout", Some("30s".into())),
            ("conntrack-udp-timeout-stream", Some("2m0s".into())),
            ("conntrack-tcp-be-liberal", None),
        ]
    }

    fn sample(name: &str) -> &'static str {
        match name {
            "feature-gates" => "AllAlpha=false,TopologyAwareHints=true",
            "kube-api-content-type" => "application/vnd.kubernetes.protobuf",
            "kube-api-burst" => "10",
            "kube-api-qps" => "5",
            "bind-address" => "0.0.0.0",
            "show-hidden-metrics-for-version" => "1.31",
            "proxy-mode" => "iptables",
            "iptables-masquerade-bit" => "14",
            "ipvs-scheduler" => "rr",
            "ipvs-exclude-cidrs" => "10.0.0.0/8,192.168.0.0/16",
            "vmodule" => "proxier*=5",
            "proxy-port-range" => "30000-32767",
            "log-json-info-buffer-size" => "0",
            "log-text-info-buffer-size" => "0",
            "iptables-sync-period"
            | "iptables-min-sync-period"
            | "ipvs-sync-period"
            | "ipvs-min-sync-period"
            | "ipvs-tcp-timeout"
            | "ipvs-tcpfin-timeout"
            | "ipvs-udp-timeout"
            | "config-sync-period"
            | "log-flush-frequency"
            | "udp-timeout" => "1m30s",
            other => panic!("no sample value for --{other}"),
        }
    }

    fn run_args(argv: &[String]) -> (RunArgs, Vec<crate::cmd::config::Note>) {
        let p = try_parse_from(argv).unwrap();
        let Command::Run(mut a) = p.cli.command else {
            panic!("not run: {argv:?}");
        };
        let notes = resolve(&mut a, p.run_matches.as_ref()).unwrap();
        (*a, notes)
    }

    /// Every kube-proxy flag (options.go and the logging flags) parses, with no subcommand, in
    /// `--flag=value` form; each ignored one gets exactly one warning naming it.
    #[test]
    fn every_kube_proxy_flag_parses() {
        let mut argv = vec!["ebpf-proxy".to_owned()];
        for (name, v) in honoured().into_iter().chain(conntrack()) {
            argv.push(match v {
                Some(v) => format!("--{name}={v}"),
                None => format!("--{name}"),
            });
        }
        for f in IGNORED_FLAGS {
            argv.push(if f.boolean {
                format!("--{}", f.name)
            } else {
                format!("--{}={}", f.name, sample(f.name))
            });
        }
        let (a, notes) = run_args(&argv);
        assert_eq!(a.node_name, "node-a");
        assert!(a.kp.masquerade_all);
        assert_eq!(a.kp.master.as_deref(), Some("https://10.0.0.1:6443"));
        assert_eq!(a.kp.v, Some(2));
        assert_eq!(a.kp.pod_interface_name_prefix, "veth");
        assert_eq!(a.ignored.given.len(), IGNORED_FLAGS.len());
        for f in IGNORED_FLAGS {
            let named: Vec<_> = notes
                .iter()
                .filter(|n| n.starts_with(&format!("--{}: ignored: ", f.name)))
                .collect();
            assert_eq!(named.len(), 1, "--{}: {notes:?}", f.name);
            assert!(named[0].warning);
        }

        // The same with `--flag value` (pflag's other form) for every valued flag.
        let mut argv = vec!["ebpf-proxy".to_owned()];
        for (name, v) in honoured().into_iter().chain(conntrack()) {
            if let Some(v) = v.filter(|_| !matches!(name, "cleanup" | "init-only")) {
                argv.extend([format!("--{name}"), v]);
            }
        }
        for f in IGNORED_FLAGS.iter().filter(|f| !f.boolean) {
            argv.extend([format!("--{}", f.name), sample(f.name).to_owned()]);
        }
        let (a, _) = run_args(&argv);
        assert_eq!(
            a.ignored.given.len(),
            IGNORED_FLAGS.iter().filter(|f| !f.boolean).count()
        );
    }

    /// What `run --help` shows: the honoured kube-proxy flags in the short help, the ignored
    /// ones in the long help only; `--hostname-override` listed.
    #[test]
    fn help_lists_kube_proxy_flags() {
        let mut cmd = Cli::command();
        let run = cmd.find_subcommand_mut("run").unwrap();
        let short = run.render_help().to_string();
        let long = run.render_long_help().to_string();
        for (name, _) in honoured() {
            assert!(short.contains(&format!("--{name}")), "-h lacks --{name}");
        }
        assert!(short.contains("-v, --v <LEVEL>"), "{short}");
        for f in IGNORED_FLAGS {
            assert!(
                !short.contains(&format!("--{}", f.name)),
                "-h shows --{}",
                f.name
            );
            assert!(
                long.contains(&format!("--{}", f.name)),
                "--help lacks --{}",
                f.name
            );
        }
        assert!(
            !short.contains("--pod-bridge "),
            "--pod-bridge is a hidden alias"
        );
    }

    #[test]
    fn no_subcommand_is_run_and_subcommands_still_work() {
        let p = try_parse_from(["ebpf-proxy", "--config=/c", "--hostname-override=n1"]).unwrap();
        assert!(matches!(p.cli.command, Command::Run(_)));
        assert!(p.run_matches.is_some());
        let p = try_parse_from(["ebpf-proxy", "inspect", "--json"]).unwrap();
        assert!(matches!(p.cli.command, Command::Inspect(ref a) if a.json && a.view.is_none()));
        let p = try_parse_from([
            "ebpf-proxy",
            "inspect",
            "status",
            "--bpffs=/b",
            "--service=default/web",
            "--address=10.0.0.1",
        ])
        .unwrap();
        let Command::Inspect(a) = p.cli.command else {
            panic!("not inspect");
        };
        assert_eq!(a.view, Some(inspect::View::Status));
        assert_eq!(a.service.as_deref(), Some("default/web"));
        assert_eq!(a.address, Some(std::net::Ipv4Addr::new(10, 0, 0, 1)));
        let p = try_parse_from(["ebpf-proxy", "cleanup"]).unwrap();
        assert!(matches!(p.cli.command, Command::Cleanup { .. }));
        let kind = |argv: &[&str]| try_parse_from(argv).unwrap_err().kind();
        assert_eq!(
            kind(&["ebpf-proxy"]),
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        );
        assert_eq!(
            kind(&["ebpf-proxy", "--version"]),
            ErrorKind::DisplayVersion
        );
        assert_eq!(kind(&["ebpf-proxy", "--help"]), ErrorKind::DisplayHelp);
        assert_eq!(
            kind(&["ebpf-proxy", "--no-such-flag"]),
            ErrorKind::UnknownArgument
        );
        assert_eq!(kind(&["ebpf-proxy", "rnu"]), ErrorKind::InvalidSubcommand);
        // The old flag name still works.
        let (a, _) = run_args(&[
            "x".into(),
            "--node-name=n".into(),
            "--pod-bridge=br9".into(),
        ]);
        assert_eq!(a.pod_bridge, "br9");
    }

    #[test]
    fn go_style_booleans_and_verbosity_forms() {
        let s = |v: &[&str]| -> Vec<String> {
            ["ebpf-proxy", "--node-name=n"]
                .iter()
                .chain(v)
                .map(|s| (*s).to_owned())
                .collect()
        };
        for (flags, want) in [
            (vec![], false),
            (vec!["--masquerade-all"], true),
            (vec!["--masquerade-all=true"], true),
            (vec!["--masquerade-all=True"], true),
            (vec!["--masquerade-all=1"], true),
            (vec!["--masquerade-all=false"], false),
            (vec!["--masquerade-all=F"], false),
        ] {
            let (a, _) = run_args(&s(&flags));
            assert_eq!(a.kp.masquerade_all, want, "{flags:?}");
        }
        for (flags, cleanup, init) in [
            (vec!["--cleanup"], true, false),
            (vec!["--cleanup=false"], false, false),
            (vec!["--init-only=true"], false, true),
            (vec!["--init-only", "--cleanup=0"], false, true),
        ] {
            let (a, _) = run_args(&s(&flags));
            assert_eq!((a.kp.cleanup, a.kp.init_only), (cleanup, init), "{flags:?}");
        }
        assert!(try_parse_from(s(&["--masquerade-all=yes"])).is_err());
        // Go booleans take no separate value: `--cleanup true` leaves a stray argument.
        assert!(try_parse_from(s(&["--cleanup", "true"])).is_err());
        for flags in [
            vec!["--v=4"],
            vec!["--v", "4"],
            vec!["-v=4"],
            vec!["-v", "4"],
            vec!["-v4"],
        ] {
            let (a, _) = run_args(&s(&flags));
            assert_eq!(a.kp.v, Some(4), "{flags:?}");
        }
        let (a, _) = run_args(&s(&["--logging-format=json"]));
        assert_eq!(a.kp.logging_format, Some(LogFormat::Json));
        assert!(try_parse_from(s(&["--logging-format=yaml"])).is_err());
        let (a, _) = run_args(&s(&[
            "--detect-local-mode=BridgeInterface",
            "--pod-bridge-interface=cbr0",
        ]));
        assert_eq!(
            a.kp.detect_local_mode,
            Some(DetectLocalMode::BridgeInterface)
        );
        // As kube-proxy: BridgeInterface names the bridge (there is no default one).
        let p = try_parse_from(s(&["--detect-local-mode=BridgeInterface"])).unwrap();
        let Command::Run(mut a) = p.cli.command else {
            panic!("not run");
        };
        assert!(resolve(&mut a, p.run_matches.as_ref()).is_err());
        // Ignored Go booleans too.
        let (a, _) = run_args(&s(&["--profiling=false", "--ipvs-strict-arp"]));
        assert_eq!(a.ignored.given, ["profiling", "ipvs-strict-arp"]);
    }
}
