//! Lab tools for the conntrack end-to-end tests (`proxy-lab/tests/e2e_conntrack.rs`): plain
//! blocking sockets, one JSON report each on stdout (or `--report`).
//!
//! - `churn` ([`ChurnArgs`]): N sequential requests to a serve-hostname, each a new socket
//!   (TCP: connect, read the reply line up to the server's close, close; UDP: one datagram and
//!   its answer). Masqueraded NodePort churn and table-filling short flows.
//! - `junk-flood` ([`JunkArgs`]): raw IPv4 packets (UDP datagrams, TCP SYNs or bare ACKs) to one
//!   address, every packet from a distinct source (address, port): flows nobody answers.
//! - `idle-hold` ([`IdleArgs`]): one TCP connection to a `serve-hostname --echo` and one UDP
//!   flow, idle until a file appears, then one round trip each on the same sockets.
//! - `same-port` ([`SamePortArgs`]): one local port connected to several services at once
//!   (SO_REUSEADDR), each exchanging data.
//! - `udp-big` ([`UdpBigArgs`]): datagrams larger than the MTU (fragmented) to a
//!   `serve-hostname --udp-echo`, checking the request and the echo arrive whole.
use std::{
    collections::BTreeMap,
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use proxy_common::proto;
use proxy_userspace::packet::{self, Ipv4, tcp_flags};
use serde::{Deserialize, Serialize};

use crate::serve_probe::parse_reply_line;

/// Prints `report` as JSON to `path`, or to stdout.
fn emit<T: Serialize>(report: &T, path: Option<&PathBuf>) -> Result<()> {
    let text = serde_json::to_string_pretty(report).context("serializing report")?;
    match path {
        Some(p) => {
            let tmp = p.with_extension("tmp");
            std::fs::write(&tmp, text + "\n")
                .with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, p).with_context(|| format!("renaming to {}", p.display()))
        }
        None => {
            println!("{text}");
            Ok(())
        }
    }
}

/// The serve-hostname reply line at the start of `buf` (a `--udp-echo` answer has the
/// datagram after it): (pod name, client address the server saw).
fn reply_name(buf: &[u8]) -> Result<(String, SocketAddr), (&'static str, String)> {
    let end = buf
        .iter()
        .position(|&b| b == b'\n')
        .map_or(buf.len(), |i| i + 1);
    let text = String::from_utf8_lossy(&buf[..end]);
    parse_reply_line(&text).ok_or_else(|| ("bad_reply", format!("bad reply {text:?}")))
}

fn bump(map: &mut BTreeMap<String, u64>, key: impl Into<String>) {
    *map.entry(key.into()).or_default() += 1;
}

fn kind(e: &io::Error) -> &'static str {
    use io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused => "refused",
        K::TimedOut | K::WouldBlock => "timeout",
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => "reset",
        K::HostUnreachable | K::NetworkUnreachable => "unreachable",
        K::AddrInUse | K::AddrNotAvailable => "address",
        _ => "other",
    }
}

/// `IP_MTU_DISCOVER = IP_PMTUDISC_DONT`: the kernel fragments datagrams larger than the MTU
/// and never sets DF.
pub fn allow_fragments(fd: std::os::fd::RawFd) -> io::Result<()> {
    let v: libc::c_int = libc::IP_PMTUDISC_DONT;
    // SAFETY: a valid fd; the option value is a c_int of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&raw const v).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

// ---------------------------------------------------------------------------------------------
// churn

#[derive(Debug, Clone, clap::Args)]
pub struct ChurnArgs {
    /// serve-hostname address, e.g. 10.240.0.11:30300.
    pub target: SocketAddrV4,
    /// Requests, one after the other, each with a new socket (a new source port).
    #[arg(long, default_value_t = 1000)]
    pub count: u64,
    /// UDP instead of TCP.
    #[arg(long)]
    pub udp: bool,
    /// Per request (TCP: connect, then the whole reply), milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
}

/// What `churn` saw.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChurnReport {
    pub target: String,
    pub proto: String,
    pub sent: u64,
    pub ok: u64,
    /// Failure kind -> count.
    pub failures: BTreeMap<String, u64>,
    /// Answering pod -> count.
    pub answers: BTreeMap<String, u64>,
    /// Requests that took over a second (a retransmitted SYN, typically).
    pub slow: u64,
    pub slowest_ms: u64,
    pub elapsed_ms: u64,
    /// Up to 5 distinct error messages.
    pub errors: Vec<String>,
}

fn churn_tcp(target: SocketAddrV4, timeout: Duration) -> Result<String, (&'static str, String)> {
    let fail = |what: &str, e: io::Error| (kind(&e), format!("{what}: {e}"));
    let mut s = TcpStream::connect_timeout(&SocketAddr::V4(target), timeout)
        .map_err(|e| fail("connect", e))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| fail("timeout", e))?;
    // Until the server closes: its FIN first, then ours (both directions closed).
    let mut buf = Vec::with_capacity(64);
    let mut chunk = [0u8; 256];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > 512 {
                    return Err(("bad_reply", "reply longer than 512 bytes".into()));
                }
            }
            Err(e) => return Err(fail("read", e)),
        }
    }
    let text = String::from_utf8_lossy(&buf);
    parse_reply_line(&text)
        .map(|(name, _)| name)
        .ok_or_else(|| ("bad_reply", format!("bad reply {text:?}")))
}

fn churn_udp(target: SocketAddrV4, timeout: Duration) -> Result<String, (&'static str, String)> {
    let fail = |what: &str, e: io::Error| (kind(&e), format!("{what}: {e}"));
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(|e| fail("bind", e))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| fail("timeout", e))?;
    s.send_to(b"churn\n", target).map_err(|e| fail("send", e))?;
    let mut buf = [0u8; 512];
    let (n, from) = s.recv_from(&mut buf).map_err(|e| fail("receive", e))?;
    if from != SocketAddr::V4(target) {
        return Err(("wrong_source", format!("reply from {from}")));
    }
    reply_name(&buf[..n]).map(|(name, _)| name)
}

pub fn churn(args: &ChurnArgs) -> Result<ChurnReport> {
    ensure!(args.count > 0, "--count must be at least 1");
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let mut r = ChurnReport {
        target: args.target.to_string(),
        proto: if args.udp { "udp" } else { "tcp" }.into(),
        ..Default::default()
    };
    let start = Instant::now();
    for _ in 0..args.count {
        r.sent += 1;
        let t0 = Instant::now();
        let outcome = if args.udp {
            churn_udp(args.target, timeout)
        } else {
            churn_tcp(args.target, timeout)
        };
        let ms = t0.elapsed().as_millis() as u64;
        r.slowest_ms = r.slowest_ms.max(ms);
        if ms >= 1000 {
            r.slow += 1;
        }
        match outcome {
            Ok(name) => {
                r.ok += 1;
                bump(&mut r.answers, name);
            }
            Err((k, msg)) => {
                bump(&mut r.failures, k);
                if r.errors.len() < 5 && !r.errors.contains(&msg) {
                    r.errors.push(msg);
                }
            }
        }
    }
    r.elapsed_ms = start.elapsed().as_millis() as u64;
    Ok(r)
}

pub fn run_churn(args: ChurnArgs) -> Result<i32> {
    let r = churn(&args)?;
    emit(&r, None)?;
    Ok(i32::from(r.ok != r.sent))
}

// ---------------------------------------------------------------------------------------------
// junk-flood

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Junk {
    /// A UDP datagram.
    Udp,
    /// A TCP SYN (opens a flow nobody answers when the endpoint is silent).
    Syn,
    /// A bare TCP ACK of no connection (must create no state at all).
    Ack,
}

#[derive(Debug, Clone, clap::Args)]
pub struct JunkArgs {
    /// Destination, e.g. a ClusterIP and port.
    pub target: SocketAddrV4,
    /// Packet kinds, used in turn (e.g. `--kind udp --kind syn`).
    #[arg(long = "kind", value_enum, default_values_t = [Junk::Udp])]
    pub kinds: Vec<Junk>,
    /// Packets to send, every one from a distinct (source address, source port).
    #[arg(long, default_value_t = 10000)]
    pub count: u64,
    /// First source address (a lab address: the sources are spoofed).
    #[arg(long)]
    pub src: Ipv4Addr,
    /// Source addresses used, from `--src` on.
    #[arg(long, default_value_t = 1)]
    pub src_count: u32,
    /// Lowest source port; ports count up from here per address.
    #[arg(long, default_value_t = 10000)]
    pub sport_min: u16,
    /// Packets per second (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    pub pps: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JunkReport {
    pub target: String,
    pub sent: u64,
    /// Kind -> packets sent.
    pub by_kind: BTreeMap<String, u64>,
    /// Sends that failed even after retrying (ENOBUFS...).
    pub send_errors: u64,
    pub elapsed_ms: u64,
}

/// The `i`-th junk packet (IPv4 header included).
pub fn junk_packet(args: &JunkArgs, i: u64) -> (Junk, Vec<u8>) {
    let n = args.src_count.max(1) as u64;
    let src = Ipv4Addr::from(u32::from(args.src).wrapping_add((i % n) as u32));
    let sport = args.sport_min.wrapping_add((i / n) as u16);
    let k = args.kinds[(i % args.kinds.len() as u64) as usize];
    let dst = *args.target.ip();
    let dport = args.target.port();
    let (p, l4) = match k {
        Junk::Udp => (proto::UDP, packet::udp(sport, dport, b"junk\n")),
        Junk::Syn => (
            proto::TCP,
            packet::tcp(sport, dport, 0x1000_0000 ^ i as u32, 0, tcp_flags::SYN, &[]),
        ),
        Junk::Ack => (
            proto::TCP,
            packet::tcp(sport, dport, 0x2000_0000 ^ i as u32, 1, tcp_flags::ACK, &[]),
        ),
    };
    let ip = Ipv4::new(p, src, dst).id((i as u16) | 1);
    (k, ip.packet(&ip.with_checksum(l4)))
}

pub fn junk_flood(args: &JunkArgs) -> Result<JunkReport> {
    ensure!(!args.kinds.is_empty(), "at least one --kind");
    let per_addr = 65536 - u64::from(args.sport_min);
    ensure!(
        args.count <= per_addr * u64::from(args.src_count.max(1)),
        "{} packets need more distinct sources than {} addresses x {per_addr} ports",
        args.count,
        args.src_count
    );
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("raw socket (needs CAP_NET_RAW)");
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let dst = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(*args.target.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let mut r = JunkReport {
        target: args.target.to_string(),
        ..Default::default()
    };
    let start = Instant::now();
    for i in 0..args.count {
        if args.pps > 0 && i % 64 == 0 {
            let due = Duration::from_secs_f64(i as f64 / args.pps as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        let (k, pkt) = junk_packet(args, i);
        let mut sent = false;
        for _ in 0..200 {
            // SAFETY: valid fd, buffer and address of the given lengths.
            let rc = unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    pkt.as_ptr().cast(),
                    pkt.len(),
                    0,
                    (&raw const dst).cast(),
                    size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            if rc >= 0 {
                sent = true;
                break;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENOBUFS) | Some(libc::EAGAIN) => {
                    std::thread::sleep(Duration::from_micros(200))
                }
                _ => return Err(e).context("sendto"),
            }
        }
        if sent {
            r.sent += 1;
            bump(&mut r.by_kind, format!("{k:?}").to_lowercase());
        } else {
            r.send_errors += 1;
        }
    }
    r.elapsed_ms = start.elapsed().as_millis() as u64;
    Ok(r)
}

pub fn run_junk(args: JunkArgs) -> Result<i32> {
    let r = junk_flood(&args)?;
    emit(&r, None)?;
    Ok(i32::from(r.send_errors > 0))
}

// ---------------------------------------------------------------------------------------------
// idle-hold

#[derive(Debug, Clone, clap::Args)]
pub struct IdleArgs {
    /// A `serve-hostname --echo` service (TCP), e.g. 10.96.0.20:7.
    pub target: SocketAddrV4,
    /// Also hold a UDP flow (one socket, one source port) to this serve-hostname address.
    #[arg(long, value_name = "ADDR")]
    pub udp_target: Option<SocketAddrV4>,
    /// Stay idle until this file exists...
    #[arg(long, value_name = "FILE")]
    pub until_file: PathBuf,
    /// ... or this long at most.
    #[arg(long, default_value_t = 300)]
    pub max_idle_s: u64,
    #[arg(long, default_value_t = 3000)]
    pub timeout_ms: u64,
    /// Write the JSON report here instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdleReport {
    /// The TCP connection's backend (its hello line).
    pub tcp_backend: String,
    /// The TCP round trip after the idle time worked on the same connection.
    pub tcp_ok: bool,
    pub tcp_error: Option<String>,
    pub udp_backend_before: Option<String>,
    pub udp_backend_after: Option<String>,
    pub udp_error: Option<String>,
    pub idle_ms: u64,
}

fn read_line(s: &mut TcpStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        if s.read(&mut b)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed by peer",
            ));
        }
        line.push(b[0]);
        if line.len() > 512 {
            return Err(io::Error::other("line longer than 512 bytes"));
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

fn udp_ask(s: &UdpSocket, target: SocketAddrV4) -> Result<String, String> {
    s.send_to(b"hold\n", target)
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; 512];
    let (n, from) = s.recv_from(&mut buf).map_err(|e| format!("receive: {e}"))?;
    if from != SocketAddr::V4(target) {
        return Err(format!("reply from {from}, not {target}"));
    }
    reply_name(&buf[..n]).map(|(n, _)| n).map_err(|(_, e)| e)
}

pub fn idle_hold(args: &IdleArgs) -> Result<IdleReport> {
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let mut tcp = TcpStream::connect_timeout(&SocketAddr::V4(args.target), timeout)
        .with_context(|| format!("connecting to {}", args.target))?;
    tcp.set_read_timeout(Some(timeout))?;
    let hello = read_line(&mut tcp).context("hello line")?;
    let (tcp_backend, _) = parse_reply_line(&hello).with_context(|| format!("hello {hello:?}"))?;
    let udp = match args.udp_target {
        Some(t) => {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            s.set_read_timeout(Some(timeout))?;
            let name = udp_ask(&s, t).map_err(anyhow::Error::msg)?;
            Some((s, t, name))
        }
        None => None,
    };
    eprintln!(
        "idle-hold: established tcp {} (backend {tcp_backend}) udp {}",
        tcp.local_addr()?,
        udp.as_ref()
            .map(|(_, _, n)| format!("(backend {n})"))
            .unwrap_or_else(|| "none".into())
    );
    let idle = Instant::now();
    while !args.until_file.exists() {
        if idle.elapsed() > Duration::from_secs(args.max_idle_s) {
            bail!("{} did not appear", args.until_file.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut r = IdleReport {
        tcp_backend,
        idle_ms: idle.elapsed().as_millis() as u64,
        ..Default::default()
    };
    let ping = "ping after idle\n";
    let rt = tcp
        .write_all(ping.as_bytes())
        .and_then(|()| read_line(&mut tcp));
    match rt {
        Ok(line) if line == ping => r.tcp_ok = true,
        Ok(line) => r.tcp_error = Some(format!("wrong echo {line:?}")),
        Err(e) => r.tcp_error = Some(format!("{}: {e}", kind(&e))),
    }
    if let Some((s, t, name)) = udp {
        r.udp_backend_before = Some(name);
        match udp_ask(&s, t) {
            Ok(n) => r.udp_backend_after = Some(n),
            Err(e) => r.udp_error = Some(e),
        }
    }
    Ok(r)
}

pub fn run_idle(args: IdleArgs) -> Result<i32> {
    let r = idle_hold(&args)?;
    emit(&r, args.report.as_ref())?;
    let udp_ok = r.udp_error.is_none() && r.udp_backend_before == r.udp_backend_after;
    Ok(i32::from(!(r.tcp_ok && udp_ok)))
}

// ---------------------------------------------------------------------------------------------
// same-port

#[derive(Debug, Clone, clap::Args)]
pub struct SamePortArgs {
    /// Services to reach from the one local port (TCP: `serve-hostname --echo`).
    #[arg(required = true)]
    pub targets: Vec<SocketAddrV4>,
    /// The local port every connection (or datagram) uses.
    #[arg(long)]
    pub port: u16,
    /// UDP: one socket bound to the port sends to every target.
    #[arg(long)]
    pub udp: bool,
    #[arg(long, default_value_t = 3000)]
    pub timeout_ms: u64,
    /// Round trips per target (TCP: echoes on the connection; UDP: datagrams).
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
}

/// One target of `same-port`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamePortFlow {
    pub target: String,
    pub local: String,
    /// Where the replies came from (TCP: the connected peer).
    pub reply_from: Vec<String>,
    pub backend: String,
    /// The client address the server saw (its source port shows a remapping).
    pub seen_by_server: String,
    /// Round trips that came back intact from the target.
    pub ok_rounds: u32,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamePortReport {
    pub proto: String,
    pub flows: Vec<SamePortFlow>,
}

fn bound_tcp(port: u16) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: valid fd; a c_int option of the given size.
    if unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: 0 },
        sin_zero: [0; 8],
    };
    // SAFETY: valid fd and address of the given length.
    if unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn connect_from(port: u16, target: SocketAddrV4, timeout: Duration) -> io::Result<TcpStream> {
    let fd = bound_tcp(port)?;
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: target.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*target.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // Blocking connect, bounded by the socket's send timeout.
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: valid fd; a timeval option of the given size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    // SAFETY: valid fd and address of the given length.
    if unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    let s = TcpStream::from(fd);
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

fn same_port_tcp(args: &SamePortArgs, timeout: Duration) -> Vec<SamePortFlow> {
    // Every connection open at once: each flow is live while the others start.
    let mut conns: Vec<(SamePortFlow, Option<TcpStream>)> = args
        .targets
        .iter()
        .map(|t| {
            let mut f = SamePortFlow {
                target: t.to_string(),
                ..Default::default()
            };
            let s = match connect_from(args.port, *t, timeout) {
                Ok(s) => Some(s),
                Err(e) => {
                    f.error = Some(format!("connect: {e}"));
                    None
                }
            };
            (f, s)
        })
        .collect();
    for (f, s) in &mut conns {
        let Some(stream) = s else { continue };
        f.local = stream
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        if let Ok(p) = stream.peer_addr() {
            f.reply_from.push(p.to_string());
        }
        match read_line(stream) {
            Ok(line) => match parse_reply_line(&line) {
                Some((name, seen)) => {
                    f.backend = name;
                    f.seen_by_server = seen.to_string();
                }
                None => f.error = Some(format!("bad hello {line:?}")),
            },
            Err(e) => f.error = Some(format!("hello: {e}")),
        }
        if f.error.is_some() {
            *s = None;
        }
    }
    // Interleaved echoes: round k on every connection before round k + 1.
    for round in 0..args.rounds {
        for (i, (f, s)) in conns.iter_mut().enumerate() {
            let Some(stream) = s else { continue };
            let msg = format!("round {round} to {} on connection {i}\n", f.target);
            match stream
                .write_all(msg.as_bytes())
                .and_then(|()| read_line(stream))
            {
                Ok(line) if line == msg => f.ok_rounds += 1,
                Ok(line) => {
                    f.error = Some(format!("wrong echo {line:?}, sent {msg:?}"));
                    *s = None;
                }
                Err(e) => {
                    f.error = Some(format!("round {round}: {e}"));
                    *s = None;
                }
            }
        }
    }
    conns.into_iter().map(|(f, _)| f).collect()
}

fn same_port_udp(args: &SamePortArgs, timeout: Duration) -> Result<Vec<SamePortFlow>> {
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, args.port))
        .with_context(|| format!("binding UDP port {}", args.port))?;
    s.set_read_timeout(Some(timeout))?;
    let mut flows: Vec<SamePortFlow> = args
        .targets
        .iter()
        .map(|t| SamePortFlow {
            target: t.to_string(),
            local: format!("0.0.0.0:{}", args.port),
            ..Default::default()
        })
        .collect();
    let mut buf = [0u8; 512];
    for round in 0..args.rounds {
        // Every target first, then the replies: the flows are all live at once.
        for t in &args.targets {
            s.send_to(format!("round {round}\n").as_bytes(), t)?;
        }
        for _ in &args.targets {
            let (n, from) = match s.recv_from(&mut buf) {
                Ok(x) => x,
                Err(e) => {
                    for f in flows.iter_mut().filter(|f| f.ok_rounds <= round) {
                        f.error.get_or_insert_with(|| format!("round {round}: {e}"));
                    }
                    break;
                }
            };
            let text = String::from_utf8_lossy(&buf[..n]);
            let Some(f) = flows.iter_mut().find(|f| f.target == from.to_string()) else {
                if let Some(f) = flows.first_mut() {
                    f.error = Some(format!("reply from {from}, none of the targets: {text:?}"));
                }
                continue;
            };
            f.reply_from.push(from.to_string());
            match reply_name(&buf[..n]) {
                Ok((name, seen)) => {
                    f.backend = name;
                    f.seen_by_server = seen.to_string();
                    f.ok_rounds += 1;
                }
                Err((_, e)) => f.error = Some(e),
            }
        }
    }
    Ok(flows)
}

pub fn same_port(args: &SamePortArgs) -> Result<SamePortReport> {
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let flows = if args.udp {
        same_port_udp(args, timeout)?
    } else {
        same_port_tcp(args, timeout)
    };
    Ok(SamePortReport {
        proto: if args.udp { "udp" } else { "tcp" }.into(),
        flows,
    })
}

pub fn run_same_port(args: SamePortArgs) -> Result<i32> {
    let r = same_port(&args)?;
    emit(&r, None)?;
    let ok = r
        .flows
        .iter()
        .all(|f| f.error.is_none() && f.ok_rounds == args.rounds);
    Ok(i32::from(!ok))
}

// ---------------------------------------------------------------------------------------------
// udp-big

#[derive(Debug, Clone, clap::Args)]
pub struct UdpBigArgs {
    /// A `serve-hostname --udp-echo` address.
    pub target: SocketAddrV4,
    /// Payload bytes per datagram (more than the MTU: the kernel fragments it).
    #[arg(long, default_value_t = 8000)]
    pub size: usize,
    /// Datagrams, each from a new socket (a new flow).
    #[arg(long, default_value_t = 10)]
    pub count: u64,
    #[arg(long, default_value_t = 3000)]
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UdpBigReport {
    pub target: String,
    pub size: usize,
    pub sent: u64,
    /// Echoes from the target carrying the whole payload.
    pub ok: u64,
    pub failures: BTreeMap<String, u64>,
    pub answers: BTreeMap<String, u64>,
    /// Bytes of the largest reply.
    pub largest_reply: usize,
    pub errors: Vec<String>,
}

/// Payload of datagram `i`: a pattern no two datagrams share.
pub fn big_payload(i: u64, size: usize) -> Vec<u8> {
    let seed = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..size)
        .map(|j| (seed.rotate_left((j % 64) as u32) as u8) ^ (j as u8).wrapping_mul(31))
        .collect()
}

fn udp_big_one(
    target: SocketAddrV4,
    payload: &[u8],
    timeout: Duration,
) -> Result<(String, usize), (&'static str, String)> {
    let fail = |what: &str, e: io::Error| (kind(&e), format!("{what}: {e}"));
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(|e| fail("bind", e))?;
    allow_fragments(s.as_raw_fd()).map_err(|e| fail("IP_MTU_DISCOVER", e))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| fail("timeout", e))?;
    s.send_to(payload, target).map_err(|e| fail("send", e))?;
    let mut buf = vec![0u8; 65536];
    let (n, from) = s.recv_from(&mut buf).map_err(|e| fail("receive", e))?;
    if from != SocketAddr::V4(target) {
        return Err(("wrong_source", format!("reply from {from}")));
    }
    let reply = &buf[..n];
    let Some(nl) = reply.iter().position(|&b| b == b'\n') else {
        return Err(("bad_reply", format!("{n} bytes without a reply line")));
    };
    let line = String::from_utf8_lossy(&reply[..=nl]);
    let Some((name, _)) = parse_reply_line(&line) else {
        return Err(("bad_reply", format!("bad reply line {line:?}")));
    };
    if &reply[nl + 1..] != payload {
        return Err((
            "corrupt",
            format!(
                "echo from {name}: {} payload bytes back, {} sent, or different",
                n - nl - 1,
                payload.len()
            ),
        ));
    }
    Ok((name, n))
}

pub fn udp_big(args: &UdpBigArgs) -> Result<UdpBigReport> {
    ensure!(args.count > 0, "--count must be at least 1");
    ensure!((1..=60000).contains(&args.size), "--size must be 1..=60000");
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let mut r = UdpBigReport {
        target: args.target.to_string(),
        size: args.size,
        ..Default::default()
    };
    for i in 0..args.count {
        r.sent += 1;
        match udp_big_one(args.target, &big_payload(i, args.size), timeout) {
            Ok((name, n)) => {
                r.ok += 1;
                r.largest_reply = r.largest_reply.max(n);
                bump(&mut r.answers, name);
            }
            Err((k, msg)) => {
                bump(&mut r.failures, k);
                if r.errors.len() < 5 && !r.errors.contains(&msg) {
                    r.errors.push(msg);
                }
            }
        }
    }
    Ok(r)
}

pub fn run_udp_big(args: UdpBigArgs) -> Result<i32> {
    let r = udp_big(&args)?;
    emit(&r, None)?;
    Ok(i32::from(r.ok != r.sent))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::serve_probe::{HostnameServer, ServeArgs};

    fn junk_args(kinds: Vec<Junk>) -> JunkArgs {
        JunkArgs {
            target: "10.96.0.99:80".parse().unwrap(),
            kinds,
            count: 100,
            src: Ipv4Addr::new(10, 76, 0, 100),
            src_count: 4,
            sport_min: 60000,
            pps: 0,
        }
    }

    #[test]
    fn junk_packets_are_distinct_and_well_formed() {
        let args = junk_args(vec![Junk::Udp, Junk::Syn, Junk::Ack]);
        let mut tuples = std::collections::BTreeSet::new();
        for i in 0..args.count {
            let (k, pkt) = junk_packet(&args, i);
            let frame = packet::ethernet([0; 6], [0; 6], &pkt);
            let h = packet::headers(&frame).expect("parsable");
            assert_eq!(h.dst, (Ipv4Addr::new(10, 96, 0, 99), 80));
            assert!(tuples.insert(h.src), "tuple {i} repeats");
            assert_eq!(h.total_len, pkt.len());
            let stored = |b: &[u8], off: usize| u16::from_be_bytes([b[off], b[off + 1]]);
            assert_eq!(
                stored(&pkt, 10),
                packet::ipv4_header_checksum(&pkt[..20]),
                "IP checksum"
            );
            let l4 = &pkt[20..];
            assert_eq!(
                stored(l4, packet::l4_csum_off(h.proto)),
                packet::l4_checksum(h.src.0, h.dst.0, h.proto, l4),
                "{k:?}: L4 checksum"
            );
            match k {
                Junk::Udp => assert_eq!(h.proto, proto::UDP),
                Junk::Syn => assert_eq!(h.tcp_flags, tcp_flags::SYN),
                Junk::Ack => assert_eq!(h.tcp_flags, tcp_flags::ACK),
            }
        }
        assert_eq!(tuples.len(), 100);
    }

    #[test]
    fn junk_refuses_more_packets_than_distinct_sources() {
        let mut args = junk_args(vec![Junk::Udp]);
        args.count = 4 * 5536 + 1;
        assert!(junk_flood(&args).is_err());
    }

    #[test]
    fn big_payloads_differ() {
        assert_ne!(big_payload(1, 64), big_payload(2, 64));
        assert_eq!(big_payload(3, 8000).len(), 8000);
    }

    async fn server(echo: bool) -> (SocketAddrV4, tokio::sync::oneshot::Sender<()>) {
        let args = ServeArgs {
            name: Some("loop".into()),
            port: 0,
            bind: Ipv4Addr::LOCALHOST,
            echo,
            udp_echo: !echo,
        };
        let server = HostnameServer::bind(&args).await.expect("bind");
        let SocketAddr::V4(addr) = server.local_addr().unwrap() else {
            panic!("v4")
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(server.run_until(async move {
            let _ = rx.await;
        }));
        (addr, tx)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn churn_same_port_idle_and_udp_big_against_loopback_servers() {
        // `plain` closes after its line and echoes UDP; `echo` keeps TCP open and echoes.
        let (plain, _stop_plain) = server(false).await;
        let (echo, _stop_echo) = server(true).await;
        let dir = tempfile::tempdir().unwrap();
        let until = dir.path().join("go");
        let until2 = until.clone();
        tokio::task::spawn_blocking(move || {
            for udp in [false, true] {
                let r = churn(&ChurnArgs {
                    target: plain,
                    count: 50,
                    udp,
                    timeout_ms: 2000,
                })
                .unwrap();
                assert_eq!((r.sent, r.ok), (50, 50), "{r:?}");
                assert_eq!(r.answers.get("loop"), Some(&50));
            }
            let r = udp_big(&UdpBigArgs {
                target: plain,
                size: 8000,
                count: 3,
                timeout_ms: 2000,
            })
            .unwrap();
            assert_eq!(r.ok, 3, "{r:?}");
            for udp in [false, true] {
                let r = same_port(&SamePortArgs {
                    targets: vec![echo],
                    port: 0,
                    udp,
                    timeout_ms: 2000,
                    rounds: 2,
                })
                .unwrap();
                assert_eq!(r.flows[0].ok_rounds, 2, "udp={udp}: {r:?}");
                assert_eq!(r.flows[0].backend, "loop", "{r:?}");
            }
            let h = std::thread::spawn(move || {
                idle_hold(&IdleArgs {
                    target: echo,
                    udp_target: Some(echo),
                    until_file: until2,
                    max_idle_s: 10,
                    timeout_ms: 2000,
                    report: None,
                })
            });
            std::thread::sleep(Duration::from_millis(200));
            std::fs::write(&until, b"go").unwrap();
            let r = h.join().unwrap().unwrap();
            assert!(r.tcp_ok, "{r:?}");
            assert_eq!(r.udp_backend_after.as_deref(), Some("loop"), "{r:?}");
        })
        .await
        .unwrap();
    }
}
