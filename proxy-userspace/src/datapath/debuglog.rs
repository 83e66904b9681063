//! Datapath debug logging: the switch (`cfg_flags::DATAPATH_DEBUG` in the config map, pinned
//! so `ebpf-proxy debug on|off` can flip it while the agent runs) and the reader that turns
//! the programs' aya-log records into agent log lines naming the reason.
use std::{io, path::Path};

use aya::{
    Ebpf,
    maps::{Array, MapData},
};
use aya_log::EbpfLogger;
use log::{Log, Metadata, Record};
use proxy_common::{NodeConfig, cfg_flags, counter, maps, proto};
use tokio::io::unix::AsyncFd;

/// The log target of the datapath's lines (for `RUST_LOG` filters and log searches).
pub const TARGET: &str = "ebpf_proxy::datapath";

/// `cfg` with the debug bit taken from `current` (the map's value): the agent's config writes
/// never undo the operator's switch.
pub fn keep_switch(cfg: &NodeConfig, current: Option<&NodeConfig>) -> NodeConfig {
    let on = current.is_some_and(|c| c.flags & cfg_flags::DATAPATH_DEBUG != 0);
    with_switch(cfg, on)
}

/// `cfg` with the debug bit set to `on`.
pub fn with_switch(cfg: &NodeConfig, on: bool) -> NodeConfig {
    let mut c = *cfg;
    c.flags &= !cfg_flags::DATAPATH_DEBUG;
    if on {
        c.flags |= cfg_flags::DATAPATH_DEBUG;
    }
    c
}

/// The switch in the pinned config map under `pin_dir`, set to `set` when given; returns
/// the state before.
pub fn pinned_switch(pin_dir: &Path, set: Option<bool>) -> anyhow::Result<bool> {
    let path = pin_dir.join(maps::CONFIG);
    let md = MapData::from_pin(&path).map_err(|e| {
        anyhow::anyhow!(
            "opening {}: {e} (is ebpf-proxy running on this node, with this --bpffs?)",
            path.display()
        )
    })?;
    let mut a: Array<MapData, NodeConfig> = Array::try_from(aya::maps::Map::Array(md))?;
    let cur = a.get(&0, 0)?;
    if let Some(on) = set {
        a.set(0, with_switch(&cur, on), 0)?;
    }
    Ok(cur.flags & cfg_flags::DATAPATH_DEBUG != 0)
}

/// Rewrites a record's `reason=N proto=P` with their names: "drop_source_range TCP ...".
/// Anything else passes unchanged.
pub fn describe(msg: &str) -> String {
    let mut out = Vec::new();
    for word in msg.split(' ') {
        let named = if let Some(n) = word.strip_prefix("reason=") {
            n.parse::<usize>()
                .ok()
                .and_then(|i| counter::NAMES.get(i))
                .map(|s| (*s).to_owned())
        } else if let Some(p) = word.strip_prefix("proto=") {
            p.parse::<u8>().ok().map(|p| match p {
                proto::TCP => "TCP".to_owned(),
                proto::UDP => "UDP".to_owned(),
                proto::SCTP => "SCTP".to_owned(),
                other => format!("proto {other}"),
            })
        } else {
            None
        };
        out.push(named.unwrap_or_else(|| word.to_owned()));
    }
    out.join(" ")
}

/// Forwards the programs' records to the agent's logger, at info, named.
struct Forward;

impl Log for Forward {
    fn enabled(&self, _: &Metadata) -> bool {
        true
    }

    fn log(&self, record: &Record) {
        // "datapath:" because the text log format does not print targets.
        log::info!(target: TARGET, "datapath: {}", describe(&record.args().to_string()));
    }

    fn flush(&self) {}
}

/// Takes the programs' log ring buffer and forwards its records until the runtime stops.
/// Must be called once per loaded object, after its programs are loaded.
pub fn spawn_reader(ebpf: &mut Ebpf) -> io::Result<()> {
    let logger = EbpfLogger::init_with_logger(ebpf, Forward).map_err(io::Error::other)?;
    // SAFETY: the AsyncFd owns the logger, whose ring buffer owns the fd: the fd stays open
    // for as long as it is registered.
    let mut fd = unsafe { AsyncFd::register(logger) }?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operators_switch_survives_the_agents_config_writes() {
        let agent = NodeConfig {
            flags: cfg_flags::MASQUERADE_ALL,
            ..Default::default()
        };
        let on = with_switch(&NodeConfig::default(), true);
        let kept = keep_switch(&agent, Some(&on));
        assert_eq!(
            kept.flags,
            cfg_flags::MASQUERADE_ALL | cfg_flags::DATAPATH_DEBUG
        );
        assert_eq!(keep_switch(&kept, None).flags, cfg_flags::MASQUERADE_ALL);
        assert_eq!(with_switch(&kept, false).flags, cfg_flags::MASQUERADE_ALL);
    }

    #[test]
    fn records_name_the_reason_and_protocol() {
        let msg = format!(
            "reason={} proto=6 10.0.0.1:40000 -> 10.96.0.10:80",
            counter::DROP_SOURCE_RANGE
        );
        let want = format!(
            "{} TCP 10.0.0.1:40000 -> 10.96.0.10:80",
            counter::NAMES[counter::DROP_SOURCE_RANGE as usize]
        );
        assert_eq!(describe(&msg), want);
        assert_eq!(describe("reason=999 proto=99"), "reason=999 proto 99");
    }
}
