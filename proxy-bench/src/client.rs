//! The connect-per-request client, run inside a pod namespace by re-invoking the xtask binary
//! (`xtask bench-client ...`, hidden). Blocking sockets, one connection at a time for latency,
//! a few threads for the rate; every connection is closed with SO_LINGER 0 (RST) so the
//! client never piles up TIME_WAIT sockets and runs out of ports.
//!
//! The `wait` probes bind source ports below the ephemeral range. A probe sent before the
//! rule-based modes' rules exist leaves a netfilter conntrack entry without NAT (SYN_SENT,
//! 120 s); a later connection that happened to reuse its source port would match that
//! entry, skip the DNAT and be lost. With disjoint ports the probes never poison the
//! measured connections.
use std::{
    io::Read as _,
    net::{SocketAddr, SocketAddrV4, TcpStream},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use serde_json::json;

#[derive(clap::Subcommand, Debug)]
pub enum ClientCmd {
    /// Latency (sequential connections) and rate (parallel connections) to one address.
    Run {
        #[arg(long)]
        target: SocketAddrV4,
        /// Sequential connections for the latency percentiles.
        #[arg(long, default_value_t = 2000)]
        count: usize,
        /// Connections for the rate phase, spread over `threads`.
        #[arg(long, default_value_t = 4000)]
        rate_count: usize,
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Connects until a reply starting with `expect` (any reply if empty) arrives; prints the
    /// CLOCK_MONOTONIC time of that success in ns.
    Wait {
        #[arg(long)]
        target: SocketAddrV4,
        #[arg(long, default_value = "")]
        expect: String,
        #[arg(long, default_value_t = 120_000)]
        timeout_ms: u64,
    },
}

/// CLOCK_MONOTONIC in ns: the same clock in every network namespace, so the orchestrator can
/// compare it with its own reading.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn linger0(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            size_of::<libc::linger>() as u32,
        )
    };
}

/// Source ports of the `wait` probes: below the default ephemeral range (32768-60999), and
/// enough of them that a port comes round again only after conntrack's 120 s SYN_SENT
/// timeout at the probe rate (one per ~11 ms when nothing answers).
const PROBE_PORTS: std::ops::Range<u16> = 10_000..32_000;

/// Connects from `src_port` (0: an ephemeral one).
fn connect(target: SocketAddr, src_port: u16, timeout: Duration) -> std::io::Result<TcpStream> {
    if src_port == 0 {
        return TcpStream::connect_timeout(&target, timeout);
    }
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&SocketAddr::from(([0, 0, 0, 0], src_port)).into())?;
    s.connect_timeout(&target.into(), timeout)?;
    Ok(s.into())
}

/// One request: connect, read the whole reply, RST. Returns (connect, total) durations.
fn one(target: SocketAddr, timeout: Duration) -> std::io::Result<(Duration, Duration, String)> {
    one_from(target, 0, timeout)
}

fn one_from(
    target: SocketAddr,
    src_port: u16,
    timeout: Duration,
) -> std::io::Result<(Duration, Duration, String)> {
    let t0 = Instant::now();
    let mut s = connect(target, src_port, timeout)?;
    let t1 = t0.elapsed();
    linger0(&s);
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    Ok((t1, t0.elapsed(), reply))
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

pub fn run(cmd: ClientCmd) -> Result<()> {
    match cmd {
        ClientCmd::Run {
            target,
            count,
            rate_count,
            threads,
        } => {
            let target = SocketAddr::V4(target);
            let timeout = Duration::from_secs(1);
            // Warm up (ARP, caches, first-packet paths).
            for _ in 0..50 {
                let _ = one(target, timeout);
            }
            let mut connect = Vec::with_capacity(count);
            let mut total = Vec::with_capacity(count);
            let mut failed = 0usize;
            for _ in 0..count {
                match one(target, timeout) {
                    Ok((c, t, _)) => {
                        connect.push(c.as_secs_f64() * 1e6);
                        total.push(t.as_secs_f64() * 1e6);
                    }
                    Err(_) => failed += 1,
                }
            }
            let threads = threads.max(1);
            let per = rate_count.div_ceil(threads);
            let start = Instant::now();
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    std::thread::spawn(move || {
                        let mut ok = 0usize;
                        for _ in 0..per {
                            if one(target, timeout).is_ok() {
                                ok += 1;
                            }
                        }
                        ok
                    })
                })
                .collect();
            let mut rate_ok = 0;
            for h in handles {
                rate_ok += h.join().unwrap_or(0);
            }
            let secs = start.elapsed().as_secs_f64();
            let ok = connect.len();
            println!(
                "{}",
                json!({
                    "ok": ok,
                    "failed": failed,
                    "connect_p50_us": pct(&mut connect, 0.5),
                    "connect_p99_us": pct(&mut connect, 0.99),
                    "request_p50_us": pct(&mut total, 0.5),
                    "request_p99_us": pct(&mut total, 0.99),
                    "rate_ok": rate_ok,
                    "rate_failed": per * threads - rate_ok,
                    "conn_per_s": rate_ok as f64 / secs,
                })
            );
            Ok(())
        }
        ClientCmd::Wait {
            target,
            expect,
            timeout_ms,
        } => {
            let deadline = Instant::now() + Duration::from_millis(timeout_ms);
            let target = SocketAddr::V4(target);
            let mut ports = PROBE_PORTS.cycle();
            loop {
                let port = ports.next().unwrap_or(0);
                if let Ok((_, _, reply)) = one_from(target, port, Duration::from_millis(10))
                    && reply.starts_with(expect.as_str())
                {
                    println!("{}", monotonic_ns());
                    return Ok(());
                }
                if Instant::now() > deadline {
                    bail!("{target} did not answer {expect:?} within {timeout_ms} ms");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}
