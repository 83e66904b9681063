//! `ebpf-proxy-lab`: the lab's tools as one binary (pod servers, probes, canaries, the fake API
//! server, the encapsulator), so the shipped `ebpf-proxy` carries only the product.
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use proxy_lab_tools::{canary, conntrack, encap, fakeapi, kubebench, serve_probe, udpflow};

#[derive(Parser)]
#[command(
    name = "ebpf-proxy-lab",
    version,
    about = "Lab tooling for ebpf-proxy's tests, demo and bench (not part of the product)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A test server like Kubernetes' serve_hostname: answers TCP and UDP with its name and
    /// the client address it saw.
    ServeHostname(serve_probe::ServeArgs),
    /// A connect-per-request client: N connections (or datagrams) to an address, and a count of
    /// who answered.
    Probe(serve_probe::ProbeArgs),
    /// Long-lived TCP connections and UDP flows through a service, checked continuously;
    /// reports "connections lost: L of N" (exit 1 if any was lost).
    Canary(canary::CanaryArgs),
    /// Wrap packets to a VIP in IPIP/GUE towards a node (a stand-in for a Katran-style
    /// balancer).
    LabEncap(encap::EncapArgs),
    /// A stand-in Kubernetes API server serving a manifests directory (Services,
    /// EndpointSlices, Nodes) over list/watch, for agents run with --kubeconfig.
    LabApiserver(fakeapi::LabApiArgs),
    /// The control plane's speed through the Kubernetes source: full programming from agent
    /// start, and watch event -> BPF maps for single changes (needs root; private namespace
    /// and bpffs).
    KubeSyncBench(kubebench::KubeBenchArgs),
    /// Sequential short connections (or datagrams), each from a new source port: connect,
    /// read the reply up to the server's close, close. JSON report.
    Churn(conntrack::ChurnArgs),
    /// Raw packets (UDP, TCP SYN, bare TCP ACK) from many spoofed lab sources, each from a
    /// distinct source address and port: flows nobody answers. JSON report.
    JunkFlood(conntrack::JunkArgs),
    /// One TCP connection and one UDP flow held idle until a file appears, then used again.
    IdleHold(conntrack::IdleArgs),
    /// One local port connected to several services at once, each exchanging data.
    SamePort(conntrack::SamePortArgs),
    /// Datagrams larger than the MTU to a `serve-hostname --udp-echo`; checks they come back
    /// whole.
    UdpBig(conntrack::UdpBigArgs),
    /// One connected UDP socket sending to a service every few ms; prints each datagram's
    /// time (CLOCK_MONOTONIC ns) and who answered.
    UdpFlow(udpflow::UdpFlowArgs),
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(
        env_logger::Env::default()
            .default_filter_or("info,netlink_packet_route=error,netlink_proto=error,aya=warn"),
    )
    .format_target(false)
    .init();
    match real_main(Cli::parse()) {
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
        Command::ServeHostname(args) => rt.block_on(serve_probe::serve(args))?,
        Command::Canary(args) => {
            let code = rt.block_on(canary::run_cli(args))?;
            return Ok(ExitCode::from(code as u8));
        }
        Command::Probe(args) => {
            let code = rt.block_on(serve_probe::run_probe_cli(args))?;
            return Ok(ExitCode::from(code as u8));
        }
        Command::LabEncap(args) => rt.block_on(encap::run(args))?,
        Command::LabApiserver(args) => rt.block_on(fakeapi::run_lab(args))?,
        Command::KubeSyncBench(args) => kubebench::run(args)?,
        Command::Churn(args) => return Ok(exit(conntrack::run_churn(args)?)),
        Command::JunkFlood(args) => return Ok(exit(conntrack::run_junk(args)?)),
        Command::IdleHold(args) => return Ok(exit(conntrack::run_idle(args)?)),
        Command::SamePort(args) => return Ok(exit(conntrack::run_same_port(args)?)),
        Command::UdpBig(args) => return Ok(exit(conntrack::run_udp_big(args)?)),
        Command::UdpFlow(args) => udpflow::run(args)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(code as u8)
}
