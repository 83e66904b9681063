//! `ebpf-proxy-lab udp-flow`: one connected UDP socket (one source port, so one flow for the
//! datapath) sending a datagram to a `serve-hostname` service every `--interval-ms`, printing
//! one line per datagram: `<CLOCK_MONOTONIC ns> <answer>`, where the answer is the name of the
//! pod that replied, `REFUSED` (ICMP port unreachable), `TIMEOUT`, or `ERROR <text>`.
//!
//! A separate process rather than a test thread, so the lab can place it in a pod's cgroup,
//! where a node's socket hooks see it (a thread cannot leave its process's cgroup).
use std::{
    io::{ErrorKind, Write as _},
    net::{SocketAddrV4, UdpSocket},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

#[derive(Debug, Clone, clap::Args)]
pub struct UdpFlowArgs {
    /// The service address, e.g. 10.96.0.10:80.
    pub target: SocketAddrV4,
    /// Time between datagrams.
    #[arg(long, default_value_t = 20)]
    pub interval_ms: u64,
    /// How long to wait for each reply.
    #[arg(long, default_value_t = 300)]
    pub timeout_ms: u64,
    /// Stop after this long at most.
    #[arg(long, default_value_t = 120)]
    pub duration_s: u64,
    /// Stop as soon as this file exists.
    #[arg(long)]
    pub until_file: Option<PathBuf>,
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Runs the flow (see the module docs) until the deadline or the stop file.
pub fn run(args: UdpFlowArgs) -> Result<()> {
    let sock = UdpSocket::bind("0.0.0.0:0").context("bind")?;
    // Connected: ICMP errors surface as ECONNREFUSED, and only the service address may answer.
    sock.connect(args.target)
        .with_context(|| format!("connect {}", args.target))?;
    sock.set_read_timeout(Some(Duration::from_millis(args.timeout_ms.max(1))))?;
    let deadline = Instant::now() + Duration::from_secs(args.duration_s);
    let mut out = std::io::stdout().lock();
    let mut buf = [0u8; 512];
    while Instant::now() < deadline && !args.until_file.as_ref().is_some_and(|f| f.exists()) {
        let t = monotonic_ns();
        let answer = match sock.send(b"flow\n") {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => "REFUSED".to_owned(),
            Err(e) => format!("ERROR send: {e}"),
            Ok(_) => match sock.recv(&mut buf) {
                Ok(n) => match String::from_utf8_lossy(&buf[..n]).split_whitespace().next() {
                    Some(name) => name.to_owned(),
                    None => "ERROR empty reply".to_owned(),
                },
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => "REFUSED".to_owned(),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    "TIMEOUT".to_owned()
                }
                Err(e) => format!("ERROR recv: {e}"),
            },
        };
        writeln!(out, "{t} {answer}")?;
        out.flush()?;
        std::thread::sleep(Duration::from_millis(args.interval_ms));
    }
    Ok(())
}
