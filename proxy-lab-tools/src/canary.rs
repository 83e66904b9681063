//! `ebpf-proxy-lab canary`: long-lived TCP connections and UDP flows through a service, checked
//! continuously, to prove that agent restarts and program replacements drop nothing.
//!
//! - TCP: `--tcp N` connections to a `serve-hostname --echo` service. Each reads the server's
//!   name line, then every `--interval-ms` sends `ping <seq>` and expects the same line back
//!   within `--timeout-ms`. A connection is *lost* on any error, timeout or wrong echo.
//! - UDP: `--udp M` flows (one socket, hence one source port, each) to a serve-hostname UDP
//!   port. Every interval each sends a datagram and expects the name line back from the
//!   target address. A flow is *lost* if a request goes unanswered or the answering backend
//!   changes (the flow was re-balanced: its conntrack entry was lost).
//!
//! Runs until `--until-file` exists or `--duration-s` passes, then writes a [`CanaryReport`]
//! (JSON) to `--report` or stdout. Prints `canary: established ...` to stderr once every
//! connection is up, so a test can start disturbing the datapath.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpStream, UdpSocket},
    task::JoinSet,
};

use crate::serve_probe::parse_reply_line;

#[derive(Debug, Clone, clap::Args)]
pub struct CanaryArgs {
    /// TCP target (a service whose endpoints run `serve-hostname --echo`), e.g. 10.96.0.20:7.
    pub target: SocketAddrV4,
    /// UDP target (serve-hostname UDP); default: the TCP target.
    #[arg(long, value_name = "ADDR")]
    pub udp_target: Option<SocketAddrV4>,
    /// Long-lived TCP connections to hold.
    #[arg(long, default_value_t = 50)]
    pub tcp: usize,
    /// UDP flows to keep going.
    #[arg(long, default_value_t = 10)]
    pub udp: usize,
    /// Time between requests on each connection and flow.
    #[arg(long, default_value_t = 100)]
    pub interval_ms: u64,
    /// Longest wait for any reply.
    #[arg(long, default_value_t = 2000)]
    pub timeout_ms: u64,
    /// Stop after this long at the latest.
    #[arg(long, default_value_t = 120)]
    pub duration_s: u64,
    /// Stop as soon as this file exists.
    #[arg(long, value_name = "FILE")]
    pub until_file: Option<PathBuf>,
    /// Write the JSON report here instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
}

/// What one TCP connection or UDP flow went through.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowResult {
    /// The backend that answered first.
    pub backend: String,
    pub round_trips: u64,
    /// `None` while healthy; why it was lost otherwise.
    pub lost: Option<String>,
    /// UDP: requests without a reply within the timeout.
    pub missed: u64,
    /// Slowest round trip, milliseconds.
    pub max_rtt_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Connections (flows) that were established.
    pub established: u64,
    /// Of those, lost before the end.
    pub lost: u64,
    /// Could not be established at all.
    pub failed_to_establish: u64,
    pub round_trips: u64,
    pub max_rtt_ms: u64,
    /// Backend name -> connections (flows) it served.
    pub backends: BTreeMap<String, u64>,
    /// Loss reason -> count.
    pub lost_reasons: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanaryReport {
    pub tcp: Summary,
    pub udp: Summary,
    pub duration_ms: u64,
}

impl CanaryReport {
    pub fn total(&self) -> u64 {
        self.tcp.established + self.udp.established
    }
    pub fn lost(&self) -> u64 {
        self.tcp.lost + self.udp.lost
    }
}

fn summarize(results: &[Result<FlowResult, String>]) -> Summary {
    let mut s = Summary::default();
    for r in results {
        match r {
            Ok(f) => {
                s.established += 1;
                s.round_trips += f.round_trips;
                s.max_rtt_ms = s.max_rtt_ms.max(f.max_rtt_ms);
                *s.backends.entry(f.backend.clone()).or_default() += 1;
                if let Some(why) = &f.lost {
                    s.lost += 1;
                    *s.lost_reasons.entry(why.clone()).or_default() += 1;
                }
            }
            Err(why) => {
                s.failed_to_establish += 1;
                *s.lost_reasons
                    .entry(format!("establish: {why}"))
                    .or_default() += 1;
            }
        }
    }
    s
}

async fn tcp_open(
    target: SocketAddrV4,
    timeout: Duration,
) -> Result<(BufReader<TcpStream>, String), String> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(target))
        .await
        .map_err(|_| "connect timeout".to_owned())?
        .map_err(|e| format!("connect: {e}"))?;
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    tokio::time::timeout(timeout, r.read_line(&mut line))
        .await
        .map_err(|_| "hello timeout".to_owned())?
        .map_err(|e| format!("hello: {e}"))?;
    let (name, _) = parse_reply_line(&line).ok_or_else(|| format!("bad hello {line:?}"))?;
    Ok((r, name))
}

async fn tcp_hold(
    mut r: BufReader<TcpStream>,
    backend: String,
    interval: Duration,
    timeout: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> FlowResult {
    let mut f = FlowResult {
        backend,
        ..Default::default()
    };
    let mut seq = 0u64;
    let mut line = String::new();
    loop {
        tokio::select! {
            _ = stop.changed() => return f,
            () = tokio::time::sleep(interval) => {}
        }
        seq += 1;
        let ping = format!("ping {seq}\n");
        let t0 = Instant::now();
        let rt = async {
            r.get_mut().write_all(ping.as_bytes()).await?;
            line.clear();
            r.read_line(&mut line).await
        };
        match tokio::time::timeout(timeout, rt).await {
            Err(_) => {
                f.lost = Some("timeout".into());
                return f;
            }
            Ok(Err(e)) => {
                f.lost = Some(format!("io: {}", e.kind()));
                return f;
            }
            Ok(Ok(0)) => {
                f.lost = Some("closed by peer".into());
                return f;
            }
            Ok(Ok(_)) if line != ping => {
                f.lost = Some("wrong echo".into());
                return f;
            }
            Ok(Ok(_)) => {
                f.round_trips += 1;
                f.max_rtt_ms = f.max_rtt_ms.max(t0.elapsed().as_millis() as u64);
            }
        }
    }
}

async fn udp_request(
    sock: &UdpSocket,
    target: SocketAddrV4,
    timeout: Duration,
) -> Result<Option<String>, String> {
    sock.send_to(b"canary\n", target)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; 512];
    match tokio::time::timeout(timeout, sock.recv_from(&mut buf)).await {
        Err(_) => Ok(None),
        Ok(Err(e)) => Err(format!("receive: {e}")),
        Ok(Ok((n, from))) => {
            if from != SocketAddr::V4(target) {
                return Err(format!("reply from {from}, not {target}"));
            }
            let text = String::from_utf8_lossy(&buf[..n]);
            match parse_reply_line(&text) {
                Some((name, _)) => Ok(Some(name)),
                None => Err(format!("bad reply {text:?}")),
            }
        }
    }
}

async fn udp_flow(
    target: SocketAddrV4,
    interval: Duration,
    timeout: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
    ready: tokio::sync::mpsc::Sender<Result<(), String>>,
) -> Result<FlowResult, String> {
    let established = async {
        let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
            .await
            .map_err(|e| format!("bind: {e}"))?;
        match udp_request(&sock, target, timeout).await? {
            Some(name) => Ok((sock, name)),
            None => Err("no reply".to_owned()),
        }
    }
    .await;
    let (sock, backend) = match established {
        Ok(x) => {
            let _ = ready.send(Ok(())).await;
            x
        }
        Err(e) => {
            let _ = ready.send(Err(e.clone())).await;
            return Err(e);
        }
    };
    let mut f = FlowResult {
        backend,
        round_trips: 1,
        ..Default::default()
    };
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(f),
            () = tokio::time::sleep(interval) => {}
        }
        let t0 = Instant::now();
        match udp_request(&sock, target, timeout).await {
            Ok(Some(name)) if name == f.backend => {
                f.round_trips += 1;
                f.max_rtt_ms = f.max_rtt_ms.max(t0.elapsed().as_millis() as u64);
            }
            Ok(Some(name)) => {
                f.lost = Some(format!("backend changed to {name}"));
                return Ok(f);
            }
            Ok(None) => {
                f.missed += 1;
                f.lost.get_or_insert_with(|| "request unanswered".into());
            }
            Err(e) => {
                f.lost = Some(e);
                return Ok(f);
            }
        }
    }
}

/// Runs the canary (see the module docs).
pub async fn run(args: CanaryArgs) -> Result<CanaryReport> {
    ensure!(args.interval_ms > 0, "--interval-ms must be at least 1");
    let interval = Duration::from_millis(args.interval_ms);
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let started = Instant::now();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    // Establish every TCP connection first (a few at a time), then the UDP flows.
    let mut opens = JoinSet::new();
    for i in 0..args.tcp {
        let target = args.target;
        opens.spawn(async move { (i, tcp_open(target, timeout).await) });
    }
    let mut tcp_failed = Vec::new();
    let mut holds = JoinSet::new();
    while let Some(r) = opens.join_next().await {
        let (_, r) = r.context("TCP open task")?;
        match r {
            Ok((stream, name)) => {
                let stop = stop_rx.clone();
                holds.spawn(tcp_hold(stream, name, interval, timeout, stop));
            }
            Err(e) => tcp_failed.push(Err(e)),
        }
    }
    let udp_target = args.udp_target.unwrap_or(args.target);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(args.udp.max(1));
    let mut flows = JoinSet::new();
    for _ in 0..args.udp {
        flows.spawn(udp_flow(
            udp_target,
            interval,
            timeout,
            stop_rx.clone(),
            ready_tx.clone(),
        ));
    }
    drop(ready_tx);
    let mut udp_ok = 0;
    for _ in 0..args.udp {
        match ready_rx.recv().await {
            Some(r) => udp_ok += usize::from(r.is_ok()),
            None => break,
        }
    }
    // Say why opens failed: the test harness shows this line when establishment falls short.
    let mut why: BTreeMap<&str, usize> = BTreeMap::new();
    for e in tcp_failed.iter().filter_map(|r| r.as_ref().err()) {
        *why.entry(e.as_str()).or_default() += 1;
    }
    eprintln!(
        "canary: established {} of {} tcp connections and {udp_ok} of {} udp flows{}",
        holds.len(),
        args.tcp,
        args.udp,
        if why.is_empty() {
            String::new()
        } else {
            format!(" (tcp failures: {why:?})")
        }
    );

    let deadline = started + Duration::from_secs(args.duration_s);
    loop {
        if Instant::now() >= deadline || args.until_file.as_ref().is_some_and(|f| f.exists()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_tx.send(true);
    let mut tcp: Vec<Result<FlowResult, String>> = tcp_failed;
    while let Some(r) = holds.join_next().await {
        tcp.push(Ok(r.context("TCP hold task")?));
    }
    let mut udp = Vec::new();
    while let Some(r) = flows.join_next().await {
        udp.push(r.context("UDP flow task")?);
    }
    let report = CanaryReport {
        tcp: summarize(&tcp),
        udp: summarize(&udp),
        duration_ms: started.elapsed().as_millis() as u64,
    };
    Ok(report)
}

/// The `canary` subcommand: runs, writes the report, prints the loss line; exit code 0 only if
/// nothing was lost and everything was established.
pub async fn run_cli(args: CanaryArgs) -> Result<i32> {
    let out = args.report.clone();
    let report = run(args).await?;
    let json = serde_json::to_string_pretty(&report)?;
    match out {
        Some(p) => std::fs::write(&p, &json).with_context(|| format!("writing {}", p.display()))?,
        None => println!("{json}"),
    }
    eprintln!(
        "canary: connections lost: {} of {} (tcp {} of {}, udp {} of {}); not established: {}",
        report.lost(),
        report.total(),
        report.tcp.lost,
        report.tcp.established,
        report.udp.lost,
        report.udp.established,
        report.tcp.failed_to_establish + report.udp.failed_to_establish
    );
    let clean = report.lost() == 0
        && report.tcp.failed_to_establish == 0
        && report.udp.failed_to_establish == 0;
    Ok(if clean { 0 } else { 1 })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::serve_probe::{HostnameServer, ServeArgs};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn canary_holds_connections_to_an_echo_server_and_notices_it_going_away() {
        let server = HostnameServer::bind(&ServeArgs {
            name: Some("pod-a".into()),
            port: 0,
            bind: Ipv4Addr::LOCALHOST,
            echo: true,
            udp_echo: false,
        })
        .await
        .unwrap();
        let SocketAddr::V4(addr) = server.local_addr().unwrap() else {
            panic!("v4")
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run_until(async move {
            let _ = rx.await;
        }));
        let args = CanaryArgs {
            target: addr,
            udp_target: None,
            tcp: 5,
            udp: 3,
            interval_ms: 20,
            timeout_ms: 1000,
            duration_s: 1,
            until_file: None,
            report: None,
        };
        let r = run(args.clone()).await.unwrap();
        assert_eq!(r.tcp.established, 5, "{r:?}");
        assert_eq!(r.udp.established, 3, "{r:?}");
        assert_eq!(r.lost(), 0, "{r:?}");
        assert!(r.tcp.round_trips >= 5 * 10, "{r:?}");
        assert_eq!(r.tcp.backends.get("pod-a"), Some(&5));

        tx.send(()).unwrap();
        task.await.unwrap().unwrap();

        // A server that says hello and hangs up after 300 ms: every connection is lost.
        let l = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let SocketAddr::V4(addr) = l.local_addr().unwrap() else {
            panic!("v4")
        };
        tokio::spawn(async move {
            while let Ok((mut s, peer)) = l.accept().await {
                tokio::spawn(async move {
                    let _ = s
                        .write_all(crate::serve_probe::reply_line("pod-b", peer).as_bytes())
                        .await;
                    let (mut rd, mut wr) = s.split();
                    let _ = tokio::time::timeout(
                        Duration::from_millis(300),
                        tokio::io::copy(&mut rd, &mut wr),
                    )
                    .await;
                    // Hang up with a FIN, then drain: closing with unread data would send an
                    // RST instead, and the client would see "reset" rather than "closed".
                    let _ = wr.shutdown().await;
                    let _ = tokio::io::copy(&mut rd, &mut tokio::io::sink()).await;
                });
            }
        });
        let r = run(CanaryArgs {
            target: addr,
            udp: 0,
            ..args
        })
        .await
        .unwrap();
        assert_eq!(r.tcp.established, 5, "{r:?}");
        assert_eq!(r.tcp.lost, 5, "{r:?}");
        assert_eq!(r.tcp.lost_reasons.get("closed by peer"), Some(&5), "{r:?}");
    }
}
