//! `cargo xtask`: developer tasks (bootstrap, build, lint, test, demo) and the command lines
//! of the lab (`proxy-lab`) and the bench (`proxy-bench`), which are libraries.
use anyhow::Result;
use clap::{Parser, Subcommand};
use proxy_bench as bench;
use proxy_lab::lab::Topology;

mod bootstrap;
mod build;
mod demo;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "ebpf-proxy developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (Debian packages, nightly rust-src,
    /// bpf-linker against the nightly libLLVM). Quick when already done.
    Bootstrap,
    /// Build the eBPF object (with BTF).
    BuildEbpf,
    /// Build everything (eBPF object embedded in the ebpf-proxy binary).
    Build,
    /// Build a past release's agent (a name in RELEASES) from its commit with its own
    /// `cargo xtask build`, into ~/.cache/ebpf-proxy/releases/<name>-<sha>/bin (reused when
    /// there; about 8 min cold). Without a name: every release the upgrade test covers.
    BuildRelease {
        /// e.g. v0.1.0.
        name: Option<String>,
    },
    /// cargo fmt --check and clippy -D warnings.
    Lint,
    /// Run every test: unit, packet fixtures through BPF_PROG_TEST_RUN, lab end to end (root).
    /// The lab tests (proxy-lab) run twice, once per lab topology (bridge, then routed), unless
    /// EBPF_PROXY_LAB_TOPOLOGY names one.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The network-namespace lab (two nodes, router, external client, pods).
    Lab {
        #[command(subcommand)]
        action: LabCmd,
    },
    /// The demo: ClusterIP load balancing across pods on two nodes, in the lab.
    Demo {
        /// Connections per round.
        #[arg(long, default_value_t = 300)]
        connections: u32,
        /// How pods are wired: bridge (cbr0) or routed (no bridge, /32 routes). Default:
        /// EBPF_PROXY_LAB_TOPOLOGY, else bridge.
        #[arg(long, value_parser = topology)]
        topology: Option<Topology>,
    },
    /// Benchmarks: per-packet cost, connection latency/rate and control-plane speed against
    /// kube-proxy's iptables/nftables layouts, memory; writes BENCHMARKS.md results (root).
    Bench(bench::BenchArgs),
    /// The bench's connect-per-request client (run inside a pod namespace by `bench`).
    #[command(hide = true)]
    BenchClient {
        #[command(subcommand)]
        cmd: bench::client::ClientCmd,
    },
}

#[derive(Subcommand)]
enum LabCmd {
    /// Create a lab and leave it running (pods serve their names on :9376).
    Up {
        /// Lab name prefix (short; default: generated).
        #[arg(long)]
        name: Option<String>,
        /// How pods are wired: bridge (cbr0) or routed (no bridge, /32 routes). Default:
        /// EBPF_PROXY_LAB_TOPOLOGY, else bridge.
        #[arg(long, value_parser = topology)]
        topology: Option<Topology>,
    },
    /// Tear down a lab (all labs if no name is given).
    Down {
        #[arg(long)]
        name: Option<String>,
    },
    /// List labs and their namespaces.
    Status,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Bootstrap => bootstrap::bootstrap(),
        Cmd::BuildEbpf => {
            bootstrap::bootstrap()?;
            build::build_ebpf().map(|_| ())
        }
        Cmd::Build => {
            bootstrap::bootstrap()?;
            build::build_all().map(|_| ())
        }
        Cmd::BuildRelease { name } => {
            bootstrap::bootstrap()?;
            let names: Vec<String> = match name {
                Some(n) => vec![n],
                None => proxy_lab::releases::UPGRADE_TESTED
                    .iter()
                    .map(|n| (*n).to_owned())
                    .collect(),
            };
            for n in names {
                let agent = build::build_release(&n)?;
                println!("{}", agent.display());
            }
            Ok(())
        }
        Cmd::Lint => {
            bootstrap::bootstrap()?;
            build::lint()
        }
        Cmd::Test { args } => {
            bootstrap::bootstrap()?;
            build::test(&args)
        }
        Cmd::Lab { action } => demo::lab_cli(action_to_args(action)),
        Cmd::Demo {
            connections,
            topology,
        } => {
            bootstrap::bootstrap()?;
            let bins = build::build_all()?;
            demo::demo(&bins, connections, topology)
        }
        Cmd::Bench(args) => {
            if let Some(json) = &args.render {
                return bench::render(json, args.out.as_deref());
            }
            bootstrap::bootstrap()?;
            let bins = match &args.ebpf_proxy {
                Some(p) => {
                    let mut bins = bench::Binaries::beside(p);
                    if let Some(t) = &args.ebpf_proxy_lab {
                        bins.tools = t.clone();
                    }
                    bins
                }
                None => build::build_all()?,
            };
            bench::bench(&bins, &args)
        }
        Cmd::BenchClient { cmd } => bench::client::run(cmd),
    }
}

fn action_to_args(a: LabCmd) -> demo::LabAction {
    match a {
        LabCmd::Up { name, topology } => demo::LabAction::Up(name, topology),
        LabCmd::Down { name } => demo::LabAction::Down(name),
        LabCmd::Status => demo::LabAction::Status,
    }
}

fn topology(s: &str) -> Result<Topology, String> {
    Topology::parse(s)
}
