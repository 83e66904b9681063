//! The standard `process_*` metrics every Prometheus client exports (CPU, memory, file
//! descriptors, start time), read from /proc/self at scrape time, and a build-info metric, so
//! dashboards written for kube-proxy and other Go components work unchanged.
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::ConstCounter,
        gauge::{ConstGauge, Gauge},
    },
    registry::Registry,
};

/// The agent's version and the git revision it was built from (`unknown` outside a checkout).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const GIT_REVISION: &str = env!("EBPF_PROXY_GIT_REVISION");
/// `rustc --version` of the compiler that built the agent.
pub const RUSTC: &str = env!("EBPF_PROXY_RUSTC");

/// What /proc/self/stat tells, in the units the metrics use.
#[derive(Debug, PartialEq)]
pub struct ProcStat {
    pub cpu_seconds: f64,
    pub virtual_bytes: u64,
    pub resident_bytes: u64,
    pub start_time_seconds: f64,
}

/// Parses /proc/self/stat (proc(5)): fields after the parenthesised command name, which may
/// itself contain spaces and parentheses. `boot_time` from /proc/stat's `btime`.
pub fn parse_stat(
    stat: &str,
    ticks_per_second: f64,
    page_size: u64,
    boot_time: f64,
) -> Option<ProcStat> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime = 14, stime = 15, starttime = 22, vsize = 23,
    // rss = 24 (1-based proc(5) numbering), so index = field - 3.
    let num = |field: usize| f.get(field - 3)?.parse::<u64>().ok();
    Some(ProcStat {
        cpu_seconds: (num(14)? + num(15)?) as f64 / ticks_per_second,
        virtual_bytes: num(23)?,
        resident_bytes: num(24)? * page_size,
        start_time_seconds: boot_time + num(22)? as f64 / ticks_per_second,
    })
}

/// `btime` from /proc/stat: boot time in seconds since the epoch.
pub fn parse_boot_time(proc_stat: &str) -> Option<f64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// The soft limit of "Max open files" from /proc/self/limits.
pub fn parse_max_fds(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[derive(Debug)]
struct ProcessCollector;

impl ProcessCollector {
    fn read() -> Option<(ProcStat, u64, Option<u64>)> {
        // SAFETY: sysconf has no memory-safety preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        // SAFETY: as above.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        let boot = parse_boot_time(&std::fs::read_to_string("/proc/stat").ok()?)?;
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let st = parse_stat(&stat, ticks, page, boot)?;
        let fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        let max = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|l| parse_max_fds(&l));
        Some((st, fds, max))
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some((st, fds, max)) = Self::read() else {
            return Ok(());
        };
        let e = encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(st.cpu_seconds).encode(e)?;
        let gauges: [(&str, &str, f64); 4] = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                st.resident_bytes as f64,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                st.virtual_bytes as f64,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                st.start_time_seconds,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                fds as f64,
            ),
        ];
        for (name, help, v) in gauges {
            let e = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(v).encode(e)?;
        }
        if let Some(max) = max {
            let e = encoder.encode_descriptor(
                "process_max_fds",
                "Maximum number of open file descriptors",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(max as f64).encode(e)?;
        }
        Ok(())
    }
}

/// Registers the process collector and `ebpf_proxy_build_info{version,git_revision,rustc} 1`.
pub fn register(root: &mut Registry) {
    root.register_collector(Box::new(ProcessCollector));
    let info =
        prometheus_client::metrics::family::Family::<Vec<(String, String)>, Gauge>::default();
    info.get_or_create(&vec![
        ("version".to_owned(), VERSION.to_owned()),
        ("git_revision".to_owned(), GIT_REVISION.to_owned()),
        ("rustc".to_owned(), RUSTC.to_owned()),
    ])
    .set(1);
    root.register(
        "ebpf_proxy_build_info",
        "The agent's version, the git revision and the compiler it was built from; always 1",
        info,
    );
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_command_name_with_spaces_and_parens() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        // utime stime cutime cstime priority nice threads itrealvalue starttime vsize rss ...
        let stat = "42 (ebpf (pr) xy) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 1000 \
                    123456789 300 18446744073709551615";
        let st = parse_stat(stat, 100.0, 4096, 1_700_000_000.0).unwrap();
        assert_eq!(
            st,
            ProcStat {
                cpu_seconds: 3.0,
                virtual_bytes: 123_456_789,
                resident_bytes: 300 * 4096,
                start_time_seconds: 1_700_000_010.0,
            }
        );
        assert_eq!(parse_stat("garbage", 100.0, 4096, 0.0), None);
    }

    #[test]
    fn boot_time_and_fd_limit() {
        assert_eq!(
            parse_boot_time("cpu 1 2 3\nbtime 1700000000\n"),
            Some(1.7e9)
        );
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(parse_max_fds(limits), Some(1024));
    }

    #[test]
    fn the_live_process_is_exported() {
        let mut r = Registry::default();
        register(&mut r);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_start_time_seconds ",
            "process_virtual_memory_bytes ",
            "process_max_fds ",
            "ebpf_proxy_build_info{version=\"",
            ",rustc=\"rustc ",
        ] {
            assert!(out.contains(name), "{name} missing:\n{out}");
        }
    }
}
