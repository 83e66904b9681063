//! The conntrack lifecycle, pure part: which state a flow is in (from the flags the datapath
//! sets on both of its entries), how long it may stay idle in that state (kube-proxy's
//! `--conntrack-*` flags, netfilter's defaults), and whether it has expired. The sweeper that
//! applies this to the maps, in bounded batches, is `datapath::conntrack`.
use std::time::Duration;

use proxy_common::{Ct4Value, ct_flags, proto};

/// A flow's state as far as timeouts go (netfilter's names where they match).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum State {
    /// TCP, SYN sent, no answer yet (netfilter SYN_SENT).
    TcpSynSent,
    /// TCP, answered, no FIN or RST yet.
    TcpEstablished,
    /// TCP, a FIN one way only: half-closed, the other side may still send.
    TcpCloseWait,
    /// TCP, FIN both ways.
    TcpTimeWait,
    /// TCP, RST seen.
    TcpClose,
    /// UDP (and SCTP) not answered yet.
    UdpUnreplied,
    /// UDP (and SCTP) answered.
    UdpReplied,
}

impl State {
    pub const ALL: [State; 7] = [
        State::TcpSynSent,
        State::TcpEstablished,
        State::TcpCloseWait,
        State::TcpTimeWait,
        State::TcpClose,
        State::UdpUnreplied,
        State::UdpReplied,
    ];

    /// The metric label.
    pub const fn name(self) -> &'static str {
        match self {
            State::TcpSynSent => "tcp_syn_sent",
            State::TcpEstablished => "tcp_established",
            State::TcpCloseWait => "tcp_close_wait",
            State::TcpTimeWait => "tcp_time_wait",
            State::TcpClose => "tcp_close",
            State::UdpUnreplied => "udp_unreplied",
            State::UdpReplied => "udp_replied",
        }
    }

    /// A flow's state from its protocol and the union of both entries' flags. `answered`:
    /// found in the answered-flow table (or flagged so).
    pub const fn of(proto: u8, flags: u16, answered: bool) -> State {
        let answered = answered || flags & (ct_flags::ANSWERED | ct_flags::MIGRATED) != 0;
        if proto != proto::TCP {
            return if answered {
                State::UdpReplied
            } else {
                State::UdpUnreplied
            };
        }
        if flags & ct_flags::RST != 0 {
            State::TcpClose
        } else if ct_flags::closed(flags) {
            State::TcpTimeWait
        } else if flags & (ct_flags::FIN_FORWARD | ct_flags::FIN_REPLY) != 0 {
            State::TcpCloseWait
        } else if answered {
            State::TcpEstablished
        } else {
            State::TcpSynSent
        }
    }
}

/// Idle timeouts per state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_syn_sent: Duration,
    pub tcp_established: Duration,
    pub tcp_close_wait: Duration,
    pub tcp_time_wait: Duration,
    pub tcp_close: Duration,
    pub udp: Duration,
    pub udp_stream: Duration,
}

impl Default for Timeouts {
    /// kube-proxy's settings where it has a flag (established 24h, close-wait 1h), netfilter's
    /// defaults elsewhere.
    fn default() -> Self {
        Self {
            tcp_syn_sent: Duration::from_secs(120),
            tcp_established: Duration::from_secs(24 * 3600),
            tcp_close_wait: Duration::from_secs(3600),
            tcp_time_wait: Duration::from_secs(120),
            tcp_close: Duration::from_secs(10),
            udp: Duration::from_secs(30),
            udp_stream: Duration::from_secs(120),
        }
    }
}

impl Timeouts {
    pub const fn of(&self, s: State) -> Duration {
        match s {
            State::TcpSynSent => self.tcp_syn_sent,
            State::TcpEstablished => self.tcp_established,
            State::TcpCloseWait => self.tcp_close_wait,
            State::TcpTimeWait => self.tcp_time_wait,
            State::TcpClose => self.tcp_close,
            State::UdpUnreplied => self.udp,
            State::UdpReplied => self.udp_stream,
        }
    }
}

/// Whether a flow has been idle longer than its state allows, judged on both of its entries
/// (either direction's packet keeps it alive). `now_ns` is CLOCK_MONOTONIC, the datapath's
/// `bpf_ktime_get_ns` clock. Returns the state it expired in.
pub fn expired(
    t: &Timeouts,
    now_ns: u64,
    proto: u8,
    own: &Ct4Value,
    own_answered: bool,
    partner: Option<(&Ct4Value, bool)>,
) -> Option<State> {
    let (flags, last, answered) = match partner {
        Some((p, p_answered)) => (
            own.flags | p.flags,
            own.last_seen_ns.max(p.last_seen_ns),
            own_answered || p_answered,
        ),
        None => (own.flags, own.last_seen_ns, own_answered),
    };
    let state = State::of(proto, flags, answered);
    let idle = now_ns.saturating_sub(last);
    (u128::from(idle) > t.of(state).as_nanos()).then_some(state)
}

/// Parses a Go duration as kube-proxy's flags and config file write them: "24h0m0s", "1h",
/// "30s", "1.5h", "300ms", "0". Units: ns, us (µs), ms, s, m, h.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() || s.starts_with('-') {
        return Err(format!(
            "{s:?}: expected a duration such as 24h0m0s, 1h, 30s"
        ));
    }
    let mut total = 0f64;
    let mut rest = s.trim_start_matches('+');
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{s:?}: missing unit (ns, us, ms, s, m, h)"))?;
        let n: f64 = rest[..num_end]
            .parse()
            .map_err(|_| format!("{s:?}: bad number {:?}", &rest[..num_end]))?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            u => return Err(format!("{s:?}: unknown unit {u:?} (ns, us, ms, s, m, h)")),
        };
        total += n * scale;
        rest = &rest[unit_end..];
    }
    Duration::try_from_secs_f64(total).map_err(|e| format!("{s:?}: {e}"))
}

/// The conntrack flags of `ebpf-proxy run` (kube-proxy's names; durations in Go's format).
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct ConntrackArgs {
    /// Idle timeout of an established TCP flow (kube-proxy's flag and default; the config
    /// file's conntrack.tcpEstablishedTimeout). 0 keeps the default.
    #[arg(long, value_name = "DURATION", default_value = "24h0m0s", value_parser = parse_go_duration)]
    pub conntrack_tcp_timeout_established: Duration,
    /// Idle timeout of a TCP flow after a FIN one way (kube-proxy's flag and default: a
    /// half-closed connection; conntrack.tcpCloseWaitTimeout). 0 keeps the default.
    #[arg(long, value_name = "DURATION", default_value = "1h0m0s", value_parser = parse_go_duration)]
    pub conntrack_tcp_timeout_close_wait: Duration,
    /// Idle timeout of a TCP flow after a FIN both ways (netfilter's TIME_WAIT default). Its
    /// SNAT port is reusable at once by a new connection.
    #[arg(long, value_name = "DURATION", default_value = "2m0s", value_parser = parse_go_duration)]
    pub conntrack_tcp_timeout_time_wait: Duration,
    /// Idle timeout of a TCP flow after a RST (netfilter's CLOSE default).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_go_duration)]
    pub conntrack_tcp_timeout_close: Duration,
    /// Idle timeout of a TCP flow whose SYN was never answered (netfilter's SYN_SENT default).
    #[arg(long, value_name = "DURATION", default_value = "2m0s", value_parser = parse_go_duration)]
    pub conntrack_tcp_timeout_syn_sent: Duration,
    /// Idle timeout of a UDP flow not answered yet (kube-proxy's flag; conntrack.udpTimeout;
    /// 0 = netfilter's default, 30s).
    #[arg(long, value_name = "DURATION", default_value = "0", value_parser = parse_go_duration)]
    pub conntrack_udp_timeout: Duration,
    /// Idle timeout of an answered UDP flow (kube-proxy's flag; conntrack.udpStreamTimeout;
    /// 0 = netfilter's default, 120s).
    #[arg(long, value_name = "DURATION", default_value = "0", value_parser = parse_go_duration)]
    pub conntrack_udp_timeout_stream: Duration,
    /// kube-proxy's netfilter table sizing (accepted with a warning: ebpf-proxy's own table
    /// is sized by --conntrack-max).
    #[arg(long, value_name = "N")]
    pub conntrack_max_per_core: Option<u64>,
    /// kube-proxy's netfilter table sizing (accepted with a warning; see --conntrack-max).
    #[arg(long, value_name = "N")]
    pub conntrack_min: Option<u64>,
    /// kube-proxy's nf_conntrack_tcp_be_liberal (accepted with a warning: ebpf-proxy does
    /// not check TCP windows, so out-of-window packets are never marked invalid).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub conntrack_tcp_be_liberal: Option<bool>,
}

impl Default for ConntrackArgs {
    fn default() -> Self {
        let t = Timeouts::default();
        Self {
            conntrack_tcp_timeout_established: t.tcp_established,
            conntrack_tcp_timeout_close_wait: t.tcp_close_wait,
            conntrack_tcp_timeout_time_wait: t.tcp_time_wait,
            conntrack_tcp_timeout_close: t.tcp_close,
            conntrack_tcp_timeout_syn_sent: t.tcp_syn_sent,
            conntrack_udp_timeout: Duration::ZERO,
            conntrack_udp_timeout_stream: Duration::ZERO,
            conntrack_max_per_core: None,
            conntrack_min: None,
            conntrack_tcp_be_liberal: None,
        }
    }
}

impl ConntrackArgs {
    /// The timeouts, 0 meaning the default (kube-proxy: "leave as is").
    pub fn timeouts(&self) -> Timeouts {
        let d = Timeouts::default();
        let or = |v: Duration, def: Duration| if v.is_zero() { def } else { v };
        Timeouts {
            tcp_syn_sent: or(self.conntrack_tcp_timeout_syn_sent, d.tcp_syn_sent),
            tcp_established: or(self.conntrack_tcp_timeout_established, d.tcp_established),
            tcp_close_wait: or(self.conntrack_tcp_timeout_close_wait, d.tcp_close_wait),
            tcp_time_wait: or(self.conntrack_tcp_timeout_time_wait, d.tcp_time_wait),
            tcp_close: or(self.conntrack_tcp_timeout_close, d.tcp_close),
            udp: or(self.conntrack_udp_timeout, d.udp),
            udp_stream: or(self.conntrack_udp_timeout_stream, d.udp_stream),
        }
    }

    /// Warnings for the kube-proxy flags that size or tune netfilter's table, not ours.
    pub fn notes(&self) -> Vec<String> {
        let mut v = Vec::new();
        for (flag, set) in [
            (
                "--conntrack-max-per-core",
                self.conntrack_max_per_core.is_some(),
            ),
            ("--conntrack-min", self.conntrack_min.is_some()),
        ] {
            if set {
                v.push(format!(
                    "{flag} sizes netfilter's table, which service traffic no longer uses: \
                     ignored (ebpf-proxy's own table is sized by --conntrack-max)"
                ));
            }
        }
        if self.conntrack_tcp_be_liberal.is_some() {
            v.push(
                "--conntrack-tcp-be-liberal: ignored (ebpf-proxy does not check TCP windows, \
                 so it never marks out-of-window packets invalid)"
                    .to_owned(),
            );
        }
        v
    }
}

/// The SNAT range against the node's `net.ipv4.ip_local_port_range` (`"32768\t60999"`): a
/// warning when they overlap (a local socket and a masqueraded flow could then share a source
/// port towards the same backend).
pub fn port_range_overlap(snat: (u16, u16), local_range: &str) -> Option<String> {
    let mut it = local_range
        .split_whitespace()
        .filter_map(|s| s.parse::<u16>().ok());
    let (lo, hi) = (it.next()?, it.next()?);
    if lo <= snat.1 && snat.0 <= hi {
        Some(format!(
            "net.ipv4.ip_local_port_range {lo}-{hi} overlaps the masquerade port range {}-{}: \
             a local connection and a masqueraded flow could pick the same source port. Fix: \
             sysctl -w net.ipv4.ip_local_port_range=\"{lo} {}\" (and persist it in \
             /etc/sysctl.d/)",
            snat.0,
            snat.1,
            snat.0.saturating_sub(1).max(lo)
        ))
    } else {
        None
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn v(flags: u16, last_s: u64) -> Ct4Value {
        Ct4Value {
            flags,
            last_seen_ns: last_s * S,
            ..Default::default()
        }
    }

    #[test]
    fn states_follow_the_flags() {
        use ct_flags::*;
        let tcp = proto::TCP;
        assert_eq!(State::of(tcp, FORWARD, false), State::TcpSynSent);
        assert_eq!(State::of(tcp, FORWARD, true), State::TcpEstablished);
        assert_eq!(
            State::of(tcp, FORWARD | ANSWERED, false),
            State::TcpEstablished
        );
        assert_eq!(State::of(tcp, MIGRATED, false), State::TcpEstablished);
        assert_eq!(State::of(tcp, FIN_FORWARD, true), State::TcpCloseWait);
        assert_eq!(State::of(tcp, FIN_REPLY, true), State::TcpCloseWait);
        assert_eq!(
            State::of(tcp, FIN_FORWARD | FIN_REPLY, true),
            State::TcpTimeWait
        );
        assert_eq!(State::of(tcp, RST | FIN_FORWARD, true), State::TcpClose);
        assert_eq!(State::of(proto::UDP, FORWARD, false), State::UdpUnreplied);
        assert_eq!(State::of(proto::UDP, FORWARD, true), State::UdpReplied);
        assert_eq!(State::of(proto::SCTP, REPLY, true), State::UdpReplied);
    }

    #[test]
    fn expiry_uses_the_later_of_both_entries_and_their_flags() {
        let t = Timeouts::default();
        let now = 10_000 * S;
        let fwd = v(ct_flags::FORWARD, 10_000 - 200);
        // Alone, an unanswered TCP flow idle 200 s is past SYN_SENT's 120 s.
        assert_eq!(
            expired(&t, now, proto::TCP, &fwd, false, None),
            Some(State::TcpSynSent)
        );
        // Its reply entry was seen 10 s ago: alive.
        let rev = v(ct_flags::REPLY, 10_000 - 10);
        assert_eq!(
            expired(&t, now, proto::TCP, &fwd, false, Some((&rev, true))),
            None
        );
        // Answered and idle 200 s: established lives 24 h.
        let rev_old = v(ct_flags::REPLY, 10_000 - 200);
        assert_eq!(
            expired(&t, now, proto::TCP, &fwd, true, Some((&rev_old, true))),
            None
        );
        // A FIN both ways (flags on either entry): time-wait, 120 s.
        let fin = v(
            ct_flags::REPLY | ct_flags::FIN_FORWARD | ct_flags::FIN_REPLY,
            9_800,
        );
        assert_eq!(
            expired(&t, now, proto::TCP, &fwd, true, Some((&fin, true))),
            Some(State::TcpTimeWait)
        );
        // UDP: 30 s unreplied, 120 s replied.
        let u = v(ct_flags::FORWARD, 10_000 - 60);
        assert_eq!(
            expired(&t, now, proto::UDP, &u, false, None),
            Some(State::UdpUnreplied)
        );
        assert_eq!(expired(&t, now, proto::UDP, &u, true, None), None);
        // A clock read before the entry's stamp (racing packet) never expires it.
        assert_eq!(expired(&t, 0, proto::UDP, &u, false, None), None);
    }

    #[test]
    fn go_durations() {
        assert_eq!(
            parse_go_duration("24h0m0s"),
            Ok(Duration::from_secs(86_400))
        );
        assert_eq!(parse_go_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_go_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_go_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_go_duration("0s"), Ok(Duration::ZERO));
        assert!(parse_go_duration("10").is_err());
        assert!(parse_go_duration("-1s").is_err());
        assert!(parse_go_duration("5d").is_err());
        assert!(parse_go_duration("").is_err());
    }

    #[test]
    fn zero_means_default_as_in_kube_proxy() {
        let a = ConntrackArgs::default();
        assert_eq!(a.timeouts(), Timeouts::default());
        let a = ConntrackArgs {
            conntrack_udp_timeout: Duration::from_secs(5),
            conntrack_tcp_timeout_established: Duration::ZERO,
            ..Default::default()
        };
        assert_eq!(a.timeouts().udp, Duration::from_secs(5));
        assert_eq!(a.timeouts().tcp_established, Duration::from_secs(86_400));
    }

    #[test]
    fn port_range_overlap_is_reported_with_the_fix() {
        assert_eq!(port_range_overlap((61000, 65000), "32768\t60999"), None);
        let w = port_range_overlap((61000, 65000), "32768 65535").unwrap();
        assert!(w.contains("32768 60999"), "{w}");
        assert!(port_range_overlap((61000, 65000), "61500 61600").is_some());
        assert_eq!(port_range_overlap((61000, 65000), "garbage"), None);
    }
}
