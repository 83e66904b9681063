//! Endpoint changes without stale flows, in the namespace lab (issue 4, item 4): when an
//! endpoint is removed or stops serving, flows to it stop within 2 s (a long-lived UDP flow
//! included, scale to zero and back included), while established TCP connections to a
//! terminating-but-serving endpoint keep working and new ones never go to it. Needs root.
use std::{
    fs,
    path::PathBuf,
    time::{Duration, Instant},
};

use proxy_lab::{
    cluster::{
        Binaries, CANARY_IP, CANARY_PORT, CLUSTER_IP, Cluster, Conditions, Endpoint, SERVICE_PORT,
    },
    lab::{LabSpec, NODES},
};

/// The bound the issue sets: flows to a removed endpoint stop within this long.
const BOUND: Duration = Duration::from_secs(2);

fn bins() -> Binaries {
    proxy_lab::cluster::test_binaries()
}

fn up() -> (Cluster, Vec<Endpoint>) {
    let spec = LabSpec::default_demo();
    let eps = proxy_lab::cluster::hostnames_endpoints(&spec);
    assert_eq!(eps.len(), 3);
    let c = Cluster::up(&bins(), &spec, &eps, &|m| eprintln!("{m}")).expect("cluster up");
    (c, eps)
}

fn vip() -> String {
    format!("{CLUSTER_IP}:{SERVICE_PORT}")
}

fn without(eps: &[Endpoint], pod: &str) -> Vec<Endpoint> {
    eps.iter().filter(|e| e.pod != pod).cloned().collect()
}

// ---- one long-lived UDP flow (one source port) -------------------------------------------

/// What one datagram of the flow got.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Answer {
    /// The pod that answered.
    Pod(String),
    /// ICMP port unreachable (the service REJECTs).
    Refused,
    /// Nothing within the timeout.
    Timeout,
    Other(String),
}

/// A UDP client in a pod (`ebpf-proxy-lab udp-flow`: its network namespace and its node's
/// cgroup, under the socket hooks as on a real node) sending a datagram to `target` every
/// 20 ms from ONE connected socket (one source port, so one flow for the datapath),
/// recording what answered.
struct UdpFlow<'a> {
    c: &'a Cluster,
    pid: u32,
    stop: PathBuf,
}

impl<'a> UdpFlow<'a> {
    fn start(c: &'a Cluster, pod: &str, target: &str) -> Self {
        let stop = c.lab.state_dir().join(format!("udp-flow-{pod}.stop"));
        let _ = fs::remove_file(&stop);
        let pid = c
            .spawn_in_pod(
                pod,
                &[
                    c.bins.tools.display().to_string(),
                    "udp-flow".into(),
                    target.into(),
                    "--until-file".into(),
                    stop.display().to_string(),
                ],
            )
            .expect("spawn udp-flow");
        UdpFlow { c, pid, stop }
    }

    /// The answers so far (times converted from the child's CLOCK_MONOTONIC, Instant's clock).
    fn log(&self) -> Vec<(Instant, Answer)> {
        let text = self
            .c
            .lab
            .log_path(self.pid)
            .and_then(|p| fs::read_to_string(p).ok())
            .unwrap_or_default();
        let (now, now_ns) = (Instant::now(), monotonic_ns());
        text.lines()
            .filter_map(|l| {
                let (t, a) = l.split_once(' ')?;
                let t: u64 = t.parse().ok()?;
                let at = now.checked_sub(Duration::from_nanos(now_ns.saturating_sub(t)))?;
                let answer = match a {
                    "REFUSED" => Answer::Refused,
                    "TIMEOUT" => Answer::Timeout,
                    a if a.starts_with("ERROR") => Answer::Other(a.to_owned()),
                    a => Answer::Pod(a.to_owned()),
                };
                Some((at, answer))
            })
            .collect()
    }

    /// Waits until the last `n` datagrams were all answered by the same pod; returns it.
    fn settled(&self, n: usize, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            let log = self.log();
            if log.len() >= n {
                let tail = &log[log.len() - n..];
                if let Answer::Pod(p) = &tail[0].1
                    && tail.iter().all(|(_, a)| *a == tail[0].1)
                {
                    return p.clone();
                }
            }
            assert!(
                start.elapsed() < timeout,
                "the UDP flow did not settle on one backend: {log:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn finish(self) -> Vec<(Instant, Answer)> {
        fs::write(&self.stop, b"").expect("stop file");
        let start = Instant::now();
        let st = loop {
            if let Some(st) = self.c.lab.child_status(self.pid).expect("udp-flow status") {
                break st;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "udp-flow does not stop"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(st.success(), "udp-flow: {st}");
        self.log()
    }
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

/// The first answer at or after `from` satisfying `pred`: its delay after `from`.
fn first_after(
    log: &[(Instant, Answer)],
    from: Instant,
    pred: impl Fn(&Answer) -> bool,
) -> Option<Duration> {
    log.iter()
        .find(|(t, a)| *t >= from && pred(a))
        .map(|(t, _)| *t - from)
}

fn summary(log: &[(Instant, Answer)], origin: Instant) -> String {
    // Runs of equal answers: "answer x count (from ms)".
    let mut out = String::new();
    let mut i = 0;
    while i < log.len() {
        let mut j = i;
        while j < log.len() && log[j].1 == log[i].1 {
            j += 1;
        }
        out.push_str(&format!(
            "  {:?} x{} (from {} ms)\n",
            log[i].1,
            j - i,
            (log[i].0 - origin).as_millis()
        ));
        i = j;
    }
    out
}

/// (a) A UDP flow from one source port sticks to endpoint X; X is removed from the slice;
/// within 2 s of the manifest write the flow's datagrams are answered by another endpoint
/// (and only by it from then on), and X never answers again.
#[test]
fn udp_flow_leaves_a_removed_endpoint_within_2s() {
    let (c, eps) = up();
    let flow = UdpFlow::start(&c, "client", &vip());
    let x = flow.settled(25, Duration::from_secs(10));
    let t0 = Instant::now();
    c.set_endpoints(&without(&eps, &x)).expect("rewrite slice");
    c.wait_programmed(1, 2, BOUND).expect("node1 reprogrammed");
    std::thread::sleep(Duration::from_millis(2500));
    let log = flow.finish();
    let origin = log[0].0;
    let text = summary(&log, origin);
    eprintln!("removed {x} at {} ms:\n{text}", (t0 - origin).as_millis());
    assert!(
        log.iter()
            .filter(|(t, _)| *t < t0)
            .all(|(_, a)| *a == Answer::Pod(x.clone())),
        "before the change the flow sticks to {x}: {text}"
    );
    let moved = first_after(&log, t0, |a| matches!(a, Answer::Pod(p) if *p != x))
        .unwrap_or_else(|| panic!("the flow never left {x}: {text}"));
    println!("UDP flow left removed endpoint {x} after {moved:?} (bound {BOUND:?})");
    assert!(moved < BOUND, "took {moved:?}: {text}");
    let after: Vec<&Answer> = log
        .iter()
        .filter(|(t, _)| *t >= t0 + moved)
        .map(|(_, a)| a)
        .collect();
    assert!(after.len() > 50, "{text}");
    assert!(
        after.iter().all(|a| *a == after[0]),
        "the re-balanced flow sticks to its new backend, X never answers again: {text}"
    );
}

// ---- scale to zero and back ----------------------------------------------------------------

/// Short-timeout probe from the client pod.
fn quick_probe(c: &Cluster, target: &str, udp: bool, n: u32) -> proxy_lab::cluster::Probe {
    c.probe_in(&c.lab.pod_ns("client"), target, udp, n, 500)
        .expect("probe")
}

/// Polls single probes until `done` holds for one; returns how long after `t0` that was.
fn until(
    c: &Cluster,
    t0: Instant,
    udp: bool,
    done: impl Fn(&proxy_lab::cluster::Probe) -> bool,
) -> Duration {
    loop {
        let p = quick_probe(c, &vip(), udp, 1);
        if done(&p) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "udp={udp}: still {:?} 10 s after the change",
            p.0
        );
    }
}

/// (b) Scale to zero: within 2 s new TCP connections and UDP requests are refused (REJECT),
/// and a long-lived UDP flow gets ICMP port unreachable; back to three endpoints: within 2 s
/// everything succeeds again, the same long-lived flow included.
#[test]
fn scale_to_zero_rejects_and_back_serves_within_2s() {
    let (c, eps) = up();
    let flow = UdpFlow::start(&c, "client", &vip());
    flow.settled(25, Duration::from_secs(10));

    let t0 = Instant::now();
    c.set_endpoints(&[]).expect("empty slice");
    let refused = |p: &proxy_lab::cluster::Probe| p.failures().get("refused") == Some(&1);
    let tcp_refused = until(&c, t0, false, refused);
    let udp_refused = until(&c, t0, true, refused);
    for udp in [false, true] {
        let p = quick_probe(&c, &vip(), udp, 20);
        assert_eq!(
            p.failures().get("refused"),
            Some(&20),
            "udp={udp}: every request to the empty service is rejected: {:?}",
            p.0
        );
    }
    c.wait_programmed(1, 0, BOUND).expect("node1: no endpoints");

    std::thread::sleep(Duration::from_millis(500));
    let t1 = Instant::now();
    c.set_endpoints(&eps).expect("slice back");
    let ok = |p: &proxy_lab::cluster::Probe| p.ok() == 1;
    let tcp_back = until(&c, t1, false, ok);
    let udp_back = until(&c, t1, true, ok);
    std::thread::sleep(Duration::from_millis(1500));
    let log = flow.finish();
    let text = summary(&log, log[0].0);
    eprintln!(
        "scaled to zero at {} ms, back at {} ms:\n{text}",
        (t0 - log[0].0).as_millis(),
        (t1 - log[0].0).as_millis()
    );
    let flow_refused = first_after(&log, t0, |a| *a == Answer::Refused)
        .unwrap_or_else(|| panic!("the UDP flow was never rejected: {text}"));
    let flow_back = first_after(&log, t1, |a| matches!(a, Answer::Pod(_)))
        .unwrap_or_else(|| panic!("the UDP flow was never answered again: {text}"));
    println!(
        "scale to zero: rejected after tcp {tcp_refused:?}, udp {udp_refused:?}, long-lived \
         UDP flow {flow_refused:?}; back: tcp {tcp_back:?}, udp {udp_back:?}, flow {flow_back:?} \
         (bound {BOUND:?})"
    );
    for (what, d) in [
        ("new TCP connections rejected", tcp_refused),
        ("new UDP requests rejected", udp_refused),
        ("the long-lived UDP flow rejected", flow_refused),
        ("new TCP connections served again", tcp_back),
        ("new UDP requests served again", udp_back),
        ("the long-lived UDP flow served again", flow_back),
    ] {
        assert!(d < BOUND, "{what} only after {d:?}: {text}");
    }
    for udp in [false, true] {
        let p = quick_probe(&c, &vip(), udp, 90);
        assert_eq!(p.ok(), 90, "udp={udp}: {:?}", p.0);
        assert_eq!(
            p.answers().len(),
            3,
            "udp={udp}: all endpoints back: {:?}",
            p.0
        );
    }
}

// ---- terminating but serving -------------------------------------------------------------

fn n(r: &serde_json::Value, proto: &str, field: &str) -> u64 {
    r[proto][field].as_u64().unwrap_or(u64::MAX)
}

fn on(r: &serde_json::Value, proto: &str, pod: &str) -> u64 {
    r[proto]["backends"][pod].as_u64().unwrap_or(0)
}

/// (c) Established connections to a terminating-but-serving endpoint X keep working (echo
/// round trips continue) while new connections never go to X; once X is removed entirely,
/// new connections are fine and flows still on X stop (re-balanced: TCP gets a reset, UDP
/// another backend).
#[test]
fn terminating_serving_endpoint_keeps_its_connections_but_gets_no_new_ones() {
    let (c, eps) = up();
    c.start_canary_service(&eps).expect("canary service");
    let (tcp, udp) = (30u64, 6u64);
    // `a` stops while X is terminating; `b` runs on past X's removal.
    let a = c
        .start_canary("a", tcp as usize, udp as usize)
        .expect("canary a");
    let b = c
        .start_canary("b", tcp as usize, udp as usize)
        .expect("canary b");
    let x = "hostnames-b";
    let canary = |f: &dyn Fn(&Endpoint) -> Option<Conditions>| -> Vec<(Endpoint, Conditions)> {
        eps.iter()
            .filter_map(|e| f(e).map(|cond| (e.clone(), cond)))
            .collect()
    };
    let target = format!("{CANARY_IP}:{CANARY_PORT}");

    c.set_canary_endpoints(&canary(&|e| {
        Some(if e.pod == x {
            Conditions::TERMINATING_SERVING
        } else {
            Conditions::READY
        })
    }))
    .expect("X terminating");
    for node in NODES {
        for proto in ["TCP", "UDP"] {
            c.wait_service_endpoints(node, &format!("{target}/{proto}"), 2, BOUND)
                .expect("X out of the slots");
        }
    }
    for udp in [false, true] {
        let p = quick_probe(&c, &target, udp, 90);
        assert_eq!(p.ok(), 90, "udp={udp}: {:?}", p.0);
        assert_eq!(
            p.answers().get(x),
            None,
            "udp={udp}: a new connection went to terminating {x}: {:?}",
            p.0
        );
        assert_eq!(p.answers().len(), 2, "udp={udp}: {:?}", p.0);
    }
    // Keep the established connections talking for a while with X terminating.
    std::thread::sleep(Duration::from_secs(3));
    let ra = c.finish_canary(a).expect("canary a report");
    println!(
        "X terminating: canary a lost {} of {} tcp and {} of {} udp; {} tcp / {} udp of them \
         on {x}; {} tcp round trips",
        n(&ra, "tcp", "lost"),
        n(&ra, "tcp", "established"),
        n(&ra, "udp", "lost"),
        n(&ra, "udp", "established"),
        on(&ra, "tcp", x),
        on(&ra, "udp", x),
        n(&ra, "tcp", "round_trips"),
    );
    assert_eq!(n(&ra, "tcp", "established"), tcp, "{ra:#}");
    assert_eq!(n(&ra, "udp", "established"), udp, "{ra:#}");
    assert_eq!(
        n(&ra, "tcp", "lost") + n(&ra, "udp", "lost"),
        0,
        "connections to a terminating-but-serving endpoint continue: {ra:#}"
    );
    assert!(
        on(&ra, "tcp", x) > 0,
        "some held connections were on {x}: {ra:#}"
    );
    assert!(n(&ra, "tcp", "round_trips") >= tcp * 15, "{ra:#}");

    // X gone entirely: new connections fine, flows still on X stop.
    let t1 = Instant::now();
    c.set_canary_endpoints(&canary(&|e| (e.pod != x).then_some(Conditions::READY)))
        .expect("X removed");
    std::thread::sleep(BOUND.saturating_sub(t1.elapsed()));
    for udp in [false, true] {
        let p = quick_probe(&c, &target, udp, 90);
        assert_eq!(p.ok(), 90, "udp={udp}: {:?}", p.0);
        assert_eq!(p.answers().get(x), None, "udp={udp}: {:?}", p.0);
    }
    let rb = c.finish_canary(b).expect("canary b report");
    println!(
        "X removed: canary b lost {} of {} tcp ({} were on {x}) and {} of {} udp ({} on {x}): {}",
        n(&rb, "tcp", "lost"),
        n(&rb, "tcp", "established"),
        on(&rb, "tcp", x),
        n(&rb, "udp", "lost"),
        n(&rb, "udp", "established"),
        on(&rb, "udp", x),
        rb["tcp"]["lost_reasons"]
    );
    assert!(on(&rb, "tcp", x) > 0, "{rb:#}");
    assert_eq!(
        n(&rb, "tcp", "lost"),
        on(&rb, "tcp", x),
        "exactly the TCP connections on the removed endpoint stop: {rb:#}"
    );
    assert_eq!(
        n(&rb, "udp", "lost"),
        on(&rb, "udp", x),
        "exactly the UDP flows on the removed endpoint move: {rb:#}"
    );
}
