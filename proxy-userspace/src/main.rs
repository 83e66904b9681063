//! `ebpf-proxy`: an eBPF replacement for kube-proxy.
use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use proxy_userspace::{
    cmd::{cleanup, config, inspect, run, trace},
    datapath,
};

#[derive(Parser)]
#[command(
    name = "ebpf-proxy",
    version = concat!(env!("CARGO_PKG_VERSION"), " (git ", env!("EBPF_PROXY_GIT_REVISION"), ")"),
    about = "Kubernetes service load balancing in eBPF (a kube-proxy replacement)",
    long_about = "Kubernetes service load balancing in eBPF, a kube-proxy replacement: ClusterIP, \
                  NodePort, LoadBalancer IPs (plain or IPIP/GUE-wrapped, direct server return) \
                  and externalIPs, with kube-proxy's masquerade, REJECT and traffic-policy rules. \
                  tc programs on the pod bridge's ports and the uplink, and cgroup socket hooks \
                  for host processes, read BPF maps that the agent fills from Service, \
                  EndpointSlice and Node objects (Kubernetes API or a manifests directory).\n\n\
                  Start with `ebpf-proxy run --help`; `ebpf-proxy trace --help` answers \
                  \"where does this packet go\". Logging: RUST_LOG=debug|info|warn."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: load and attach the datapath, then keep the maps in sync with the
    /// Kubernetes API or a manifests directory until SIGINT/SIGTERM.
    // Boxed: the largest variant by far (clippy::large_enum_variant).
    Run(Box<config::RunArgs>),
    /// Show the programmed services, their endpoints and the datapath counters.
    Inspect {
        /// The bpffs directory the agent was started with.
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Detach the programs and remove every link and map the agent pinned (drops connection
    /// state): how ebpf-proxy is removed from a node. Stopping the agent (SIGTERM, SIGKILL)
    /// deliberately leaves the programs attached, so restarts and upgrades drop nothing; run
    /// this after stopping it for good (e.g. before handing the node back to kube-proxy).
    Cleanup {
        /// The bpffs directory the agent was started with.
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
    /// Where does this packet go? Runs the real programs on synthesized packets against
    /// private maps programmed from the manifests; prints the verdict, the endpoints reached,
    /// and whether the backend sees the client's address. Exit 0 whatever the verdict.
    Trace(trace::TraceArgs),
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(
        env_logger::Env::default()
            .default_filter_or("info,netlink_packet_route=error,netlink_proto=error,aya=warn"),
    )
    .format_target(false)
    .init();
    // Parsed through ArgMatches so `run --config` can tell flags given on the command line
    // (which override the file) from defaults.
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let run_matches = matches.subcommand_matches("run").cloned();
    match real_main(cli, run_matches.as_ref()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli, run_matches: Option<&clap::ArgMatches>) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Run(mut args) => {
            for note in config::resolve(&mut args, run_matches)? {
                log::info!("{note}");
            }
            rt.block_on(run::run(*args))?
        }
        Command::Inspect { bpffs, json } => inspect::inspect(&datapath::pin_dir(&bpffs), json)?,
        Command::Cleanup { bpffs } => {
            let dir = datapath::pin_dir(&bpffs);
            let n = cleanup::cleanup(&dir)?;
            println!(
                "detached and unpinned {} program links, removed {} pinned maps from {}",
                n.links,
                n.maps,
                dir.display()
            );
        }
        Command::Trace(args) => trace::run(&args)?,
    }
    Ok(ExitCode::SUCCESS)
}
