//! Lab tools: a serve_hostname-like pod server and a connect-per-request probe client.
//!
//! Reply line (TCP and UDP): `"<name> <peer_ip>:<peer_port>\n"`, where the peer is the client
//! address as the server saw it, so the probe can tell whether the client was SNATed.
//!
//! - `serve-hostname` ([`ServeArgs`], [`serve`]): TCP on each accepted connection writes the
//!   line without reading anything and closes; UDP answers each datagram with the line to its
//!   sender. Runs until SIGTERM/SIGINT.
//! - `probe` ([`ProbeArgs`], [`probe`], [`run_probe_cli`]): N independent requests (a new socket,
//!   hence a new source port, each), at most `--concurrency` in flight, each bounded by
//!   `--timeout-ms` (connect + reply). Results in a [`ProbeReport`].

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// The serve_hostname port.
pub const DEFAULT_PORT: u16 = 9376;
/// Longest reply line accepted by the probe.
const MAX_REPLY: usize = 512;

/// `serve-hostname`: answer every TCP connection and UDP datagram with our name and the
/// client's address.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Name to answer with (default: the hostname).
    #[arg(long)]
    pub name: Option<String>,
    /// Port for both TCP and UDP.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// Address to bind.
    #[arg(long, default_value_t = Ipv4Addr::UNSPECIFIED)]
    pub bind: Ipv4Addr,
    /// Keep TCP connections open: after the reply line, echo back everything the client
    /// sends until it closes (long-lived connections for `canary`). UDP is unchanged.
    #[arg(long)]
    pub echo: bool,
    /// UDP: answer each datagram with the reply line followed by the datagram itself, and
    /// let the kernel fragment large answers (IP_PMTUDISC_DONT). TCP is unchanged.
    #[arg(long)]
    pub udp_echo: bool,
}

/// `probe`: connect-per-request client for serve-hostname.
#[derive(Debug, Clone, clap::Args)]
pub struct ProbeArgs {
    /// Address to probe, e.g. 10.96.0.10:80.
    pub target: SocketAddrV4,
    /// Use UDP instead of TCP.
    #[arg(long)]
    pub udp: bool,
    /// Number of requests (each with a new socket, hence a new source port).
    #[arg(long, default_value_t = 1)]
    pub count: u64,
    /// Per-request timeout (TCP: connect + reply; UDP: send + reply), milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub timeout_ms: u64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// TCP only: bind every request to this source port (SO_REUSEADDR), one at a time, to
    /// reuse a tuple on purpose.
    #[arg(long, value_name = "PORT")]
    pub source_port: Option<u16>,
}

/// What a probe saw.
///
/// - `ok`: requests answered with a well-formed line from the address we sent to.
/// - `failures` by kind: `refused` (TCP RST / ICMP port unreachable; UDP uses IP_RECVERR so an
///   ICMP error is seen), `timeout`, `reset`, `unreachable` (ICMP host/net unreachable),
///   `wrong_source` (UDP reply from another address than the target), `bad_reply` (not a
///   serve-hostname line), `other` (anything else; the first few messages are in `errors`).
/// - `answers`: answering name -> count; `reply_sources`: address the reply came from (TCP: the
///   connected peer) -> count; `client_addrs_seen_by_server`: the client IP in the reply ->
///   count; these three count every parsable reply, including `wrong_source` ones.
/// - `source_port_preserved`: replies whose reported client port equals our local port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeReport {
    pub target: String,
    pub proto: String,
    pub sent: u64,
    pub ok: u64,
    pub failures: BTreeMap<String, u64>,
    pub answers: BTreeMap<String, u64>,
    pub reply_sources: BTreeMap<String, u64>,
    pub client_addrs_seen_by_server: BTreeMap<String, u64>,
    pub source_port_preserved: u64,
    /// Up to 5 distinct error messages, for diagnosis.
    pub errors: Vec<String>,
}

impl ProbeReport {
    /// True when every request succeeded.
    pub fn all_ok(&self) -> bool {
        self.sent > 0 && self.ok == self.sent
    }

    /// Prints the report (JSON or a human table) to stdout.
    pub fn print(&self, json: bool) -> Result<()> {
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(self).context("serializing report")?
            );
        } else {
            print!("{self}");
        }
        Ok(())
    }

    fn bump(map: &mut BTreeMap<String, u64>, key: impl Into<String>) {
        *map.entry(key.into()).or_default() += 1;
    }

    fn record(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Reply {
                reply,
                from,
                local_port,
            } => match parse_reply_line(&reply) {
                Some((name, client)) => {
                    Self::bump(&mut self.answers, name);
                    Self::bump(
                        &mut self.client_addrs_seen_by_server,
                        client.ip().to_string(),
                    );
                    Self::bump(&mut self.reply_sources, from.to_string());
                    if client.port() == local_port {
                        self.source_port_preserved += 1;
                    }
                    if from == SocketAddr::V4(self.target_addr()) {
                        self.ok += 1;
                    } else {
                        Self::bump(&mut self.failures, "wrong_source");
                    }
                }
                None => {
                    Self::bump(&mut self.reply_sources, from.to_string());
                    Self::bump(&mut self.failures, "bad_reply");
                    self.note_error(format!("bad reply from {from}: {reply:?}"));
                }
            },
            Outcome::Failed { kind, message } => {
                Self::bump(&mut self.failures, kind);
                self.note_error(message);
            }
        }
    }

    fn target_addr(&self) -> SocketAddrV4 {
        self.target
            .parse()
            .unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))
    }

    fn note_error(&mut self, msg: String) {
        if self.errors.len() < 5 && !self.errors.contains(&msg) {
            self.errors.push(msg);
        }
    }
}

impl fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let failed: u64 = self.failures.values().sum();
        writeln!(
            f,
            "probe {} {}: sent {}, ok {}, failed {failed}",
            self.proto, self.target, self.sent, self.ok
        )?;
        let section = |f: &mut fmt::Formatter<'_>, title: &str, m: &BTreeMap<String, u64>| {
            if m.is_empty() {
                return Ok(());
            }
            writeln!(f, "  {title}:")?;
            let w = m.keys().map(String::len).max().unwrap_or(0);
            for (k, v) in m {
                writeln!(f, "    {k:<w$}  {v:>6}")?;
            }
            Ok(())
        };
        section(f, "answers", &self.answers)?;
        section(f, "failures", &self.failures)?;
        section(f, "reply sources", &self.reply_sources)?;
        section(
            f,
            "client address seen by server",
            &self.client_addrs_seen_by_server,
        )?;
        let parsed: u64 = self.answers.values().sum();
        if parsed > 0 {
            writeln!(
                f,
                "  source port preserved: {}/{parsed}",
                self.source_port_preserved
            )?;
        }
        for e in &self.errors {
            writeln!(f, "  error: {e}")?;
        }
        Ok(())
    }
}

/// The reply line for a client.
pub fn reply_line(name: &str, peer: SocketAddr) -> String {
    format!("{name} {}:{}\n", peer.ip(), peer.port())
}

/// Parses `"<name> <ip>:<port>"` (trailing newline optional).
pub fn parse_reply_line(line: &str) -> Option<(String, SocketAddr)> {
    let line = line.strip_suffix('\n').unwrap_or(line);
    let (name, addr) = line.rsplit_once(' ')?;
    if name.is_empty() || name.contains(char::is_whitespace) {
        return None;
    }
    Some((name.to_owned(), addr.parse().ok()?))
}

/// A bound serve-hostname server (TCP listener + UDP socket on the same port).
#[derive(Debug)]
pub struct HostnameServer {
    name: String,
    tcp: TcpListener,
    udp: UdpSocket,
    echo: bool,
    udp_echo: bool,
}

impl HostnameServer {
    /// Binds TCP and UDP on `args.bind:args.port`. With port 0, TCP picks a port and UDP binds
    /// the same one (retrying a few times if that UDP port is taken).
    pub async fn bind(args: &ServeArgs) -> Result<Self> {
        let name = match &args.name {
            Some(n) => n.clone(),
            None => hostname()?,
        };
        ensure!(
            !name.is_empty() && !name.contains(char::is_whitespace),
            "name {name:?} must be non-empty without whitespace"
        );
        let mut attempts = 0;
        loop {
            attempts += 1;
            let tcp = TcpListener::bind((args.bind, args.port))
                .await
                .with_context(|| format!("binding TCP {}:{}", args.bind, args.port))?;
            let port = tcp.local_addr().context("TCP local address")?.port();
            match UdpSocket::bind((args.bind, port)).await {
                Ok(udp) => {
                    if args.udp_echo {
                        crate::conntrack::allow_fragments(udp.as_raw_fd())
                            .context("IP_MTU_DISCOVER")?;
                    }
                    return Ok(HostnameServer {
                        name,
                        tcp,
                        udp,
                        echo: args.echo,
                        udp_echo: args.udp_echo,
                    });
                }
                Err(e)
                    if args.port == 0 && attempts < 10 && e.kind() == io::ErrorKind::AddrInUse =>
                {
                    continue;
                }
                Err(e) => {
                    return Err(anyhow!(e))
                        .with_context(|| format!("binding UDP {}:{port}", args.bind));
                }
            }
        }
    }

    /// The bound address (same port for TCP and UDP).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.tcp.local_addr().context("local address")
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Serves until `shutdown` completes.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let HostnameServer {
            name,
            tcp,
            udp,
            echo,
            udp_echo,
        } = self;
        let name: Arc<str> = name.into();
        tokio::pin!(shutdown);
        let mut buf = vec![0u8; 65536];
        loop {
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                accepted = tcp.accept() => match accepted {
                    Ok((mut stream, peer)) => {
                        let line = reply_line(&name, peer);
                        tokio::spawn(async move {
                            // Best effort: the client may already be gone.
                            let _ = stream.write_all(line.as_bytes()).await;
                            if echo {
                                let (mut r, mut w) = stream.split();
                                let _ = tokio::io::copy(&mut r, &mut w).await;
                            }
                            let _ = stream.shutdown().await;
                        });
                    }
                    // Per-connection errors (e.g. ECONNABORTED) must not stop the server.
                    Err(e) => {
                        eprintln!("serve-hostname: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                received = udp.recv_from(&mut buf) => match received {
                    Ok((n, peer)) => {
                        let mut reply = reply_line(&name, peer).into_bytes();
                        if udp_echo {
                            reply.extend_from_slice(&buf[..n]);
                        }
                        if let Err(e) = udp.send_to(&reply, peer).await {
                            eprintln!("serve-hostname: UDP reply to {peer}: {e}");
                        }
                    }
                    Err(e) => eprintln!("serve-hostname: UDP receive: {e}"),
                },
            }
        }
    }
}

/// Runs serve-hostname until SIGTERM or SIGINT.
pub async fn serve(args: ServeArgs) -> Result<()> {
    let server = HostnameServer::bind(&args).await?;
    eprintln!(
        "serve-hostname: {} on {} (tcp+udp)",
        server.name(),
        server.local_addr()?
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    server.run_until(shutdown).await
}

enum Outcome {
    Reply {
        reply: String,
        from: SocketAddr,
        local_port: u16,
    },
    Failed {
        kind: &'static str,
        message: String,
    },
}

fn classify(e: &io::Error) -> &'static str {
    use io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused => "refused",
        K::TimedOut => "timeout",
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => "reset",
        K::HostUnreachable | K::NetworkUnreachable => "unreachable",
        _ => "other",
    }
}

fn failed(e: io::Error, what: &str) -> Outcome {
    Outcome::Failed {
        kind: classify(&e),
        message: format!("{what}: {e}"),
    }
}

async fn tcp_connect(target: SocketAddrV4, source_port: Option<u16>) -> io::Result<TcpStream> {
    let Some(port) = source_port else {
        return TcpStream::connect(target).await;
    };
    let s = tokio::net::TcpSocket::new_v4()?;
    s.set_reuseaddr(true)?;
    s.bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into())?;
    s.connect(target.into()).await
}

async fn tcp_request(target: SocketAddrV4, source_port: Option<u16>) -> Outcome {
    let mut stream = match tcp_connect(target, source_port).await {
        Ok(s) => s,
        Err(e) => return failed(e, "connect"),
    };
    let local_port = stream.local_addr().map(|a| a.port()).unwrap_or(0);
    let from = match stream.peer_addr() {
        Ok(a) => a,
        Err(e) => return failed(e, "peer address"),
    };
    let mut buf = Vec::with_capacity(128);
    let mut chunk = [0u8; 256];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.contains(&b'\n') || buf.len() > MAX_REPLY {
                    break;
                }
            }
            Err(e) => return failed(e, "read"),
        }
    }
    if buf.is_empty() {
        return Outcome::Failed {
            kind: "bad_reply",
            message: format!("empty reply from {from}"),
        };
    }
    Outcome::Reply {
        reply: String::from_utf8_lossy(&buf).into_owned(),
        from,
        local_port,
    }
}

async fn udp_request(target: SocketAddrV4) -> Outcome {
    // Unconnected, so recv_from tells us who really answered.
    let socket = match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await {
        Ok(s) => s,
        Err(e) => return failed(e, "bind"),
    };
    // IP_RECVERR: report ICMP errors (port unreachable...) on an unconnected socket too.
    let one: libc::c_int = 1;
    // SAFETY: valid fd, option value is a c_int of the given size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_RECVERR,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    let local_port = socket.local_addr().map(|a| a.port()).unwrap_or(0);
    if let Err(e) = socket.send_to(b"probe\n", target).await {
        return failed(e, "send");
    }
    let mut buf = [0u8; MAX_REPLY];
    match socket.recv_from(&mut buf).await {
        Ok((n, from)) => Outcome::Reply {
            reply: String::from_utf8_lossy(&buf[..n]).into_owned(),
            from,
            local_port,
        },
        Err(e) => failed(e, "receive"),
    }
}

/// Runs the probe and returns the report (errors only for unusable arguments).
pub async fn probe(args: ProbeArgs) -> Result<ProbeReport> {
    ensure!(args.count > 0, "--count must be at least 1");
    ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    ensure!(args.timeout_ms > 0, "--timeout-ms must be at least 1");
    ensure!(
        !(args.udp && args.source_port.is_some()),
        "--source-port is for TCP only"
    );
    let source_port = args.source_port;
    // One socket per port at a time.
    let concurrency = if source_port.is_some() {
        1
    } else {
        args.concurrency
    };
    let timeout = Duration::from_millis(args.timeout_ms);
    let target = args.target;
    let udp = args.udp;
    let mut report = ProbeReport {
        target: target.to_string(),
        proto: if udp { "udp" } else { "tcp" }.to_owned(),
        ..ProbeReport::default()
    };
    let mut in_flight = tokio::task::JoinSet::new();
    let mut remaining = args.count;
    loop {
        while remaining > 0 && in_flight.len() < concurrency {
            remaining -= 1;
            report.sent += 1;
            in_flight.spawn(async move {
                let request = async {
                    if udp {
                        udp_request(target).await
                    } else {
                        tcp_request(target, source_port).await
                    }
                };
                match tokio::time::timeout(timeout, request).await {
                    Ok(outcome) => outcome,
                    Err(_) => Outcome::Failed {
                        kind: "timeout",
                        message: format!("no reply within {} ms", timeout.as_millis()),
                    },
                }
            });
        }
        match in_flight.join_next().await {
            Some(Ok(outcome)) => report.record(outcome),
            Some(Err(e)) => report.record(Outcome::Failed {
                kind: "other",
                message: format!("probe task failed: {e}"),
            }),
            None => break,
        }
    }
    Ok(report)
}

/// The `probe` subcommand: runs, always prints the report, returns the process exit code
/// (0 when every request succeeded, 1 otherwise).
pub async fn run_probe_cli(args: ProbeArgs) -> Result<i32> {
    let json = args.json;
    let report = probe(args).await?;
    report.print(json)?;
    Ok(if report.all_ok() { 0 } else { 1 })
}

fn hostname() -> Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: buf is valid for buf.len() bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        bail!("gethostname: {}", io::Error::last_os_error());
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reply_line_roundtrip() {
        let peer: SocketAddr = "10.76.0.20:40000".parse().unwrap();
        let line = reply_line("hostnames-a", peer);
        assert_eq!(line, "hostnames-a 10.76.0.20:40000\n");
        assert_eq!(
            parse_reply_line(&line),
            Some(("hostnames-a".to_owned(), peer))
        );
        assert_eq!(
            parse_reply_line("x 1.2.3.4:5"),
            Some(("x".to_owned(), "1.2.3.4:5".parse().unwrap()))
        );
        assert_eq!(parse_reply_line("garbage"), None);
        assert_eq!(parse_reply_line(" 1.2.3.4:5"), None);
        assert_eq!(parse_reply_line("a 1.2.3.4"), None);
    }

    async fn start_server() -> (
        SocketAddrV4,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<()>>,
    ) {
        let args = ServeArgs {
            name: Some("test-pod".into()),
            port: 0,
            bind: Ipv4Addr::LOCALHOST,
            echo: true,
            udp_echo: false,
        };
        let server = HostnameServer::bind(&args).await.expect("bind");
        let SocketAddr::V4(addr) = server.local_addr().expect("addr") else {
            panic!("not v4")
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run_until(async move {
            let _ = rx.await;
        }));
        (addr, tx, task)
    }

    fn probe_args(target: SocketAddrV4, udp: bool, count: u64) -> ProbeArgs {
        ProbeArgs {
            target,
            udp,
            count,
            timeout_ms: 2000,
            concurrency: 8,
            json: false,
            source_port: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serve_and_probe_on_loopback() {
        let (addr, stop, task) = start_server().await;
        for udp in [false, true] {
            let report = probe(probe_args(addr, udp, 20)).await.expect("probe");
            assert!(report.all_ok(), "{report}");
            assert_eq!(report.sent, 20);
            assert_eq!(report.ok, 20);
            assert!(report.failures.is_empty(), "{report}");
            assert_eq!(report.answers.get("test-pod"), Some(&20));
            assert_eq!(report.reply_sources.get(&addr.to_string()), Some(&20));
            assert_eq!(
                report.client_addrs_seen_by_server.get("127.0.0.1"),
                Some(&20)
            );
            assert_eq!(report.source_port_preserved, 20);
            assert_eq!(report.proto, if udp { "udp" } else { "tcp" });
            // The JSON form round-trips.
            let json = serde_json::to_string(&report).unwrap();
            assert_eq!(serde_json::from_str::<ProbeReport>(&json).unwrap(), report);
        }
        stop.send(()).unwrap();
        task.await.unwrap().expect("server result");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closed_port_is_refused() {
        // Bind then drop to find a port nobody listens on.
        let (addr, stop, task) = start_server().await;
        stop.send(()).unwrap();
        task.await.unwrap().unwrap();
        for udp in [false, true] {
            let report = probe(probe_args(addr, udp, 3)).await.expect("probe");
            assert_eq!(report.ok, 0);
            assert_eq!(report.failures.get("refused"), Some(&3), "{report}");
            assert!(!report.all_ok());
        }
    }
}
