//! `ebpf-proxy`: an eBPF replacement for kube-proxy.
use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::{Parser, Subcommand};
use proxy_userspace::{agent, inspect, labtools};

#[derive(Parser)]
#[command(
    name = "ebpf-proxy",
    version,
    about = "Kubernetes service load balancing in eBPF (a kube-proxy replacement)",
    long_about = "Kubernetes service load balancing in eBPF: ClusterIP DNAT with per-connection \
                  random endpoint choice, done by tc programs on the pod bridge's ports from BPF \
                  maps that the agent fills from Service and EndpointSlice objects.\n\n\
                  Start with `ebpf-proxy run --help`. Logging: RUST_LOG=debug|info|warn."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: load and attach the datapath, then keep the maps in sync with the
    /// manifests until SIGINT/SIGTERM.
    Run(agent::RunArgs),
    /// Show the programmed services, their endpoints and the datapath counters.
    Inspect {
        /// The bpffs directory the agent was started with.
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove every map the agent pinned (drops connection state). Run after stopping it.
    Cleanup {
        /// The bpffs directory the agent was started with.
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
    /// A test server like Kubernetes' serve_hostname: answers TCP and UDP with its name and
    /// the client address it saw.
    ServeHostname(labtools::ServeArgs),
    /// A connect-per-request client: N connections (or datagrams) to an address, and a count of
    /// who answered.
    Probe(labtools::ProbeArgs),
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(
        env_logger::Env::default()
            .default_filter_or("info,netlink_packet_route=error,netlink_proto=error,aya=warn"),
    )
    .format_target(false)
    .init();
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Run(args) => rt.block_on(agent::run(args))?,
        Command::Inspect { bpffs, json } => inspect::inspect(&agent::pin_dir(&bpffs), json)?,
        Command::Cleanup { bpffs } => {
            let dir = agent::pin_dir(&bpffs);
            let n = inspect::cleanup(&dir)?;
            println!("removed {n} pinned maps from {}", dir.display());
        }
        Command::ServeHostname(args) => rt.block_on(labtools::serve(args))?,
        Command::Probe(args) => {
            let code = rt.block_on(labtools::run_probe_cli(args))?;
            return Ok(ExitCode::from(code as u8));
        }
    }
    Ok(ExitCode::SUCCESS)
}
