//! Logging as kube-proxy is configured: klog's verbosity (`--v`) mapped onto log levels, and
//! `--logging-format=text|json`. `RUST_LOG`, when set, wins over `--v`. The mapping and the
//! JSON line are pure functions; [`init`] installs the logger.
use std::io::Write as _;

use log::{Level, LevelFilter};

/// `--logging-format`: kube-proxy's `text` (the default) or `json` (one JSON object per line).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl LogFormat {
    /// The config file's `logging.format` (empty = text, as in kube-proxy).
    pub fn from_config(s: &str) -> Result<Self, String> {
        match s {
            "" | "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(format!(
                "logging.format {s:?}: expected \"text\" or \"json\""
            )),
        }
    }
}

/// Crates whose own logs are noise at the levels operators use.
const QUIET: &str = "netlink_packet_route=error,netlink_proto=error,aya=warn";

/// klog verbosity -> level: 0-3 info (kube-proxy logs its routine messages at 2), 4-5 debug,
/// 6 and above trace.
pub fn level_for_verbosity(v: u32) -> LevelFilter {
    match v {
        0..=3 => LevelFilter::Info,
        4..=5 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    }
}

/// The env_logger filter for a verbosity: the level for everything, with the noisy netlink and
/// aya crates kept quiet below 8 (klog's "everything" level).
pub fn filter_for_verbosity(v: u32) -> String {
    let level = level_for_verbosity(v).as_str().to_lowercase();
    if v >= 8 {
        level
    } else {
        format!("{level},{QUIET}")
    }
}

/// The filter in effect: `RUST_LOG` if set and not empty, else `--v`'s (0 when not given).
pub fn effective_filter(rust_log: Option<&str>, v: Option<u32>) -> String {
    match rust_log.map(str::trim) {
        Some(s) if !s.is_empty() => s.to_owned(),
        _ => filter_for_verbosity(v.unwrap_or(0)),
    }
}

/// One JSON log line (without the newline): `ts` (RFC 3339, UTC), `level`, `msg`, `target`
/// (the Rust module that logged).
pub fn json_line(ts: &str, level: Level, target: &str, msg: &str) -> String {
    let s = |v: &str| serde_json::Value::from(v).to_string();
    format!(
        "{{\"ts\":{},\"level\":{},\"msg\":{},\"target\":{}}}",
        s(ts),
        s(&level.as_str().to_lowercase()),
        s(msg),
        s(target)
    )
}

/// Installs the logger (stderr). Call once, early.
pub fn init(v: Option<u32>, format: LogFormat) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let mut b = env_logger::Builder::new();
    b.parse_filters(&effective_filter(rust_log.as_deref(), v));
    if let Ok(style) = std::env::var("RUST_LOG_STYLE") {
        b.parse_write_style(&style);
    }
    match format {
        LogFormat::Text => {
            b.format_target(false);
        }
        LogFormat::Json => {
            b.format(|buf, r| {
                let ts = buf.timestamp_micros().to_string();
                let line = json_line(&ts, r.level(), r.target(), &r.args().to_string());
                writeln!(buf, "{line}")
            });
        }
    }
    let _ = b.try_init();
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn klog_verbosity_maps_onto_levels() {
        for (v, want) in [
            (0, LevelFilter::Info),
            (1, LevelFilter::Info),
            (2, LevelFilter::Info),
            (3, LevelFilter::Info),
            (4, LevelFilter::Debug),
            (5, LevelFilter::Debug),
            (6, LevelFilter::Trace),
            (10, LevelFilter::Trace),
        ] {
            assert_eq!(level_for_verbosity(v), want, "--v={v}");
        }
        assert_eq!(filter_for_verbosity(2), format!("info,{QUIET}"));
        assert_eq!(filter_for_verbosity(4), format!("debug,{QUIET}"));
        assert_eq!(filter_for_verbosity(9), "trace");
    }

    #[test]
    fn rust_log_wins_over_v() {
        assert_eq!(effective_filter(Some("warn"), Some(6)), "warn");
        assert_eq!(
            effective_filter(Some(" "), Some(4)),
            filter_for_verbosity(4)
        );
        assert_eq!(effective_filter(None, Some(4)), filter_for_verbosity(4));
        assert_eq!(effective_filter(None, None), filter_for_verbosity(0));
    }

    #[test]
    fn json_line_shape() {
        let l = json_line(
            "2026-01-02T03:04:05.000006Z",
            Level::Warn,
            "proxy_userspace::cmd::run",
            "a \"quoted\" message\nsecond line",
        );
        assert!(!l.contains('\n'), "one line: {l}");
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        let o = v.as_object().unwrap();
        assert_eq!(
            o.keys().map(String::as_str).collect::<Vec<_>>().len(),
            4,
            "{l}"
        );
        assert_eq!(o["ts"], "2026-01-02T03:04:05.000006Z");
        assert_eq!(o["level"], "warn");
        assert_eq!(o["msg"], "a \"quoted\" message\nsecond line");
        assert_eq!(o["target"], "proxy_userspace::cmd::run");
        assert!(l.starts_with("{\"ts\":"), "ts first: {l}");
    }

    #[test]
    fn formats_from_the_config_file() {
        assert_eq!(LogFormat::from_config("").unwrap(), LogFormat::Text);
        assert_eq!(LogFormat::from_config("json").unwrap(), LogFormat::Json);
        assert!(LogFormat::from_config("yaml").is_err());
    }
}
