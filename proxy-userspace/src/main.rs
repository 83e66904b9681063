//! `ebpf-proxy`: an eBPF replacement for kube-proxy.
use std::process::ExitCode;

use anyhow::Result;
use proxy_userspace::{
    cmd::{
        cleanup,
        cli::{self, Command},
        config, inspect, run, trace,
    },
    datapath,
    logging::{self, LogFormat},
};

fn main() -> ExitCode {
    let parsed = match cli::try_parse_from(std::env::args_os()) {
        Ok(p) => p,
        Err(e) => e.exit(),
    };
    match real_main(parsed) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(parsed: cli::Parsed) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match parsed.cli.command {
        Command::Run(mut args) => {
            // The config file may set the verbosity and format: read it before logging.
            let notes = config::resolve(&mut args, parsed.run_matches.as_ref())?;
            logging::init(args.kp.v, args.kp.logging_format.unwrap_or_default());
            for note in notes {
                if note.warning {
                    log::warn!("{note}");
                } else {
                    log::info!("{note}");
                }
            }
            if let Some(path) = &args.kp.write_config_to {
                std::fs::write(path, config::config_yaml(&args))
                    .map_err(|e| anyhow::anyhow!("--write-config-to {}: {e}", path.display()))?;
                log::info!("wrote the configuration in effect to {}", path.display());
                return Ok(ExitCode::SUCCESS);
            }
            if args.kp.cleanup {
                // kube-proxy's --cleanup: remove what we put on the node, exit 0.
                cleanup_pins(&args.bpffs)?;
                return Ok(ExitCode::SUCCESS);
            }
            if let Some(n) = args.kp.oom_score_adj {
                run::set_oom_score_adj(n);
            }
            if args.kp.init_only {
                run::init_only(&args)?;
                return Ok(ExitCode::SUCCESS);
            }
            rt.block_on(run::run(*args))?
        }
        Command::Inspect(args) => {
            logging::init(None, LogFormat::Text);
            inspect::run(&args)?
        }
        Command::Cleanup { bpffs } => {
            logging::init(None, LogFormat::Text);
            cleanup_pins(&bpffs)?
        }
        Command::Trace(args) => {
            logging::init(None, LogFormat::Text);
            trace::run(&args)?
        }
        Command::Debug { switch, bpffs } => {
            logging::init(None, LogFormat::Text);
            debug_switch(switch, &bpffs)?
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn debug_switch(switch: cli::DebugSwitch, bpffs: &std::path::Path) -> Result<()> {
    let set = match switch {
        cli::DebugSwitch::On => Some(true),
        cli::DebugSwitch::Off => Some(false),
        cli::DebugSwitch::Status => None,
    };
    let before = datapath::debuglog::pinned_switch(&datapath::pin_dir(bpffs), set)?;
    let now = set.unwrap_or(before);
    println!(
        "datapath debug logging {}{}",
        if now { "on" } else { "off" },
        if now {
            format!(
                ": the agent logs each drop and reject with its reason (target {})",
                datapath::debuglog::TARGET
            )
        } else {
            String::new()
        }
    );
    Ok(())
}

fn cleanup_pins(bpffs: &std::path::Path) -> Result<()> {
    let dir = datapath::pin_dir(bpffs);
    let n = cleanup::cleanup(&dir)?;
    // The status file `inspect` reads (not on the bpffs).
    if let Err(e) = proxy_userspace::serve::status::StatusWriter::remove(bpffs) {
        eprintln!("could not remove the status file: {e}");
    }
    println!(
        "detached and unpinned {} program links, removed {} netlink tc filters and {} pinned \
         maps from {}",
        n.links,
        n.filters,
        n.maps,
        dir.display()
    );
    Ok(())
}
