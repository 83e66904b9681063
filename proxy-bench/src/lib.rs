//! `cargo xtask bench [--quick]`: per-packet cost (BPF_PROG_TEST_RUN, via the
//! `proxy-userspace` bench `packet_cost`), connection latency/rate and control-plane speed in
//! the lab against kube-proxy's iptables/nftables layouts, and memory. Writes
//! `docs/bench/results.json`, `docs/bench/results.md`, `docs/bench/*.png`, and refreshes the
//! results section of `BENCHMARKS.md` between its markers.
//!
//! A library called by `cargo xtask bench`; like xtask it does not depend on proxy-userspace
//! (it is built before bpf-linker exists): the per-packet part runs as `cargo bench -p proxy-userspace --bench packet_cost -- --json`.
pub mod client;
mod labbench;
mod plot;
mod rules;

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use labbench::{LabOpts, Mode};
pub use proxy_lab::cluster::Binaries;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// A few minutes instead of ~25: fewer rounds, repetitions and connections, lab at 10
    /// and 1k services only (the control-plane steps at 1k).
    #[arg(long)]
    pub quick: bool,
    /// Skip the per-packet part.
    #[arg(long)]
    pub no_packet: bool,
    /// Skip the lab part.
    #[arg(long)]
    pub no_lab: bool,
    /// Use this ebpf-proxy binary instead of building one (e.g. while the tree does not build).
    #[arg(long, value_name = "PATH")]
    pub ebpf_proxy: Option<PathBuf>,
    /// The lab tools binary to use with --ebpf-proxy (default: `ebpf-proxy-lab` beside it).
    #[arg(long, value_name = "PATH", requires = "ebpf_proxy")]
    pub ebpf_proxy_lab: Option<PathBuf>,
    /// Run the packet_cost bench in this workspace (e.g. an export of a commit) instead of
    /// this one.
    #[arg(long, value_name = "DIR")]
    pub packet_workspace: Option<PathBuf>,
    /// Lab modes to run, comma-separated: ebpf, iptables_legacy, iptables_nft, nftables, routed.
    #[arg(long, value_delimiter = ',')]
    pub modes: Vec<String>,
    /// Lab service counts, comma-separated (default 10,1000,10000; `--quick` 10,1000).
    #[arg(long, value_delimiter = ',', value_name = "N,...")]
    pub services: Vec<usize>,
    /// Lab repetitions per mode (default 5; `--quick` 3).
    #[arg(long, value_name = "N")]
    pub reps: Option<usize>,
    /// Write results.{json,md} and plots here. Default: docs/bench (and the results section of
    /// BENCHMARKS.md) for a complete run; target/bench for a run narrowed with --modes,
    /// --services, --reps, --no-packet or --no-lab, so a partial run never replaces the
    /// published figures.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Extra arguments for the agent in the lab, whitespace-separated (e.g. "--xdp-mode
    /// generic"). Makes the run partial.
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub agent_args: Option<String>,
    /// Measure nothing: render results.md and the plots from this results.json (into --out,
    /// default target/bench).
    #[arg(long, value_name = "JSON")]
    pub render: Option<PathBuf>,
}

impl BenchArgs {
    /// A run narrowed to part of the benchmark.
    fn partial(&self) -> bool {
        !self.modes.is_empty()
            || !self.services.is_empty()
            || self.reps.is_some()
            || self.no_packet
            || self.no_lab
            || self.agent_args.is_some()
    }
}

const BEGIN: &str = "<!-- bench:results:begin -->";
const END: &str = "<!-- bench:results:end -->";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn machine() -> Value {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned())
        })
        .and_then(|k| k.parse::<u64>().ok())
        .unwrap_or(0);
    json!({ "cpu": cpu, "cores": cores, "kernel": kernel, "memory_gib": mem / 1024 / 1024 })
}

fn packet_cost(quick: bool, workspace: Option<&Path>) -> Result<Value> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace.map(Path::to_path_buf).unwrap_or_else(root))
        .args([
            "bench",
            "-p",
            "proxy-userspace",
            "--bench",
            "packet_cost",
            "--",
            "--json",
        ]);
    if quick {
        cmd.arg("--quick");
    }
    let out = cmd.stderr(Stdio::inherit()).output()?;
    if !out.status.success() {
        bail!("packet_cost bench failed ({})", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("packet_cost printed no JSON")?;
    Ok(serde_json::from_str(line)?)
}

/// `--render`: results.md and the plots from a results.json, nothing measured.
pub fn render(json: &Path, out: Option<&Path>) -> Result<()> {
    let text = fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
    let results: Value = serde_json::from_str(&text)?;
    let dir = out.map_or_else(|| root().join("target/bench"), Path::to_path_buf);
    fs::create_dir_all(&dir)?;
    let md = markdown(&results);
    fs::write(dir.join("results.md"), &md)?;
    plot::plots(&results, &dir)?;
    println!("{md}");
    Ok(())
}

pub fn bench(bins: &Binaries, args: &BenchArgs) -> Result<()> {
    let start = Instant::now();
    let say = |s: &str| eprintln!("bench: {s}");
    let m = machine();
    say(&format!(
        "{} ({} cores), Linux {}",
        m["cpu"].as_str().unwrap_or(""),
        m["cores"],
        m["kernel"].as_str().unwrap_or("")
    ));
    let packet = if args.no_packet {
        Value::Null
    } else {
        say("per-packet cost (BPF_PROG_TEST_RUN)");
        packet_cost(args.quick, args.packet_workspace.as_deref())?
    };
    let lab = if args.no_lab {
        Value::Null
    } else {
        let modes = if args.modes.is_empty() {
            Mode::ALL.to_vec()
        } else {
            args.modes
                .iter()
                .map(|m| Mode::parse(m).with_context(|| format!("unknown mode {m:?}")))
                .collect::<Result<Vec<_>>>()?
        };
        let agent_args: Vec<String> = args
            .agent_args
            .iter()
            .flat_map(|a| a.split_whitespace().map(String::from))
            .collect();
        let mut opts = if args.quick {
            LabOpts {
                services: vec![10, 1_000],
                reps: 3,
                count: 1_000,
                rate_count: 2_000,
                control_plane_at: Some(1_000),
                modes,
                agent_args,
            }
        } else {
            LabOpts {
                services: vec![10, 1_000, 10_000],
                reps: 5,
                count: 3_000,
                rate_count: 6_000,
                control_plane_at: Some(10_000),
                modes,
                agent_args,
            }
        };
        if !args.services.is_empty() {
            // The control-plane steps run at the largest size asked for.
            opts.control_plane_at = args.services.iter().max().copied();
            opts.services = args.services.clone();
        }
        if let Some(r) = args.reps {
            opts.reps = r.max(1);
        }
        labbench::run(bins, &opts, &say)?
    };
    let results = json!({
        "machine": m,
        "quick": args.quick,
        "elapsed_s": start.elapsed().as_secs(),
        "packet_cost": packet,
        "lab": lab,
    });
    let publish = args.out.is_none() && !args.partial();
    let dir = match &args.out {
        Some(d) => d.clone(),
        None if publish => root().join("docs/bench"),
        None => root().join("target/bench"),
    };
    fs::create_dir_all(&dir)?;
    fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&results)? + "\n",
    )?;
    let md = markdown(&results);
    fs::write(dir.join("results.md"), &md)?;
    if let Err(e) = plot::plots(&results, &dir) {
        say(&format!("plots failed: {e:#}"));
    }
    if publish {
        update_benchmarks_md(&md)?;
    }
    println!("{md}");
    say(&format!(
        "done in {:.0} s; wrote {d}/results.{{json,md}} and {d}/*.png{}",
        start.elapsed().as_secs_f64(),
        if publish { " and BENCHMARKS.md" } else { "" },
        d = dir.display()
    ));
    Ok(())
}

fn update_benchmarks_md(md: &str) -> Result<()> {
    let path = root().join("BENCHMARKS.md");
    let Ok(text) = fs::read_to_string(&path) else {
        return Ok(());
    };
    if let (Some(a), Some(b)) = (text.find(BEGIN), text.find(END)) {
        let new = format!("{}{BEGIN}\n{md}\n{}", &text[..a], &text[b..]);
        fs::write(&path, new)?;
    }
    Ok(())
}

fn f(v: &Value, digits: usize) -> String {
    match v.as_f64() {
        Some(x) => format!("{x:.digits$}"),
        None => "n/a".into(),
    }
}

fn ratio(a: &Value, b: &Value) -> String {
    match (a.as_f64(), b.as_f64()) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "n/a".into(),
    }
}

fn mib(v: &Value) -> String {
    match v.as_f64() {
        Some(x) => format!("{:.1} MiB", x / 1048576.0),
        None => "n/a".into(),
    }
}

/// The results as markdown tables.
/// The modes a lab size has results for (a run narrowed with --modes has fewer).
fn ran(size: &Value) -> impl Iterator<Item = Mode> + '_ {
    Mode::ALL.into_iter().filter(|m| {
        let v = &size["modes"][m.key()];
        v["samples"].as_array().is_some_and(|s| !s.is_empty())
    })
}

/// The rows of a connection table: the lab's per-mode figures under keys `{prefix}connect_p50_us`
/// and so on (`""`: pod to ClusterIP, with request p50 and errors; `"nodeport_"`: from
/// outside to the NodePort), with ratios to ebpf-proxy. Modes without figures are skipped.
fn connection_rows(o: &mut String, sizes: &[Value], prefix: &str) {
    let k = |name: &str| format!("{prefix}{name}");
    for s in sizes {
        let ebpf = &s["modes"]["ebpf"];
        // A mode that failed keeps its ClusterIP row (it names the errors).
        let measured =
            |m: &Mode| prefix.is_empty() || !s["modes"][m.key()][k("connect_p50_us")].is_null();
        for mode in ran(s).filter(measured) {
            let v = &s["modes"][mode.key()];
            let request = if prefix.is_empty() {
                format!(" {} |", f(&v["request_p50_us"], 0))
            } else {
                String::new()
            };
            let errors = v["errors"].as_array().is_some_and(|e| !e.is_empty());
            let _ = writeln!(
                o,
                "| {} x {} | {} | {} | {} |{request} {} | {} | {} | {}{} |",
                s["services"],
                s["endpoints_per_service"],
                mode.name(),
                f(&v[k("connect_p50_us")], 0),
                f(&v[k("connect_p99_us")], 0),
                f(&v[k("conn_per_s")], 0),
                ratio(&v[k("conn_per_s")], &ebpf[k("conn_per_s")]),
                ratio(&v[k("connect_p50_us")], &ebpf[k("connect_p50_us")]),
                v[k("failed")],
                if prefix.is_empty() && errors {
                    " (errors: see results.json)"
                } else {
                    ""
                }
            );
        }
    }
}

pub fn markdown(r: &Value) -> String {
    let mut o = String::new();
    let m = &r["machine"];
    let _ = writeln!(
        o,
        "Machine: {}, {} cores, {} GiB, Linux {}. {}run, {} s.\n",
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        m["memory_gib"],
        m["kernel"].as_str().unwrap_or("?"),
        if r["quick"].as_bool() == Some(true) {
            "`--quick` "
        } else {
            "Full "
        },
        r["elapsed_s"]
    );
    if let Some(sizes) = r["packet_cost"]["sizes"].as_array() {
        let pc = &r["packet_cost"];
        let _ = writeln!(
            o,
            "### Per-packet cost (BPF_PROG_TEST_RUN, ns per packet)\n\nMedian over {} interleaved rounds of {} runs each (repeat=1 per run, fresh packet, keys rotated). `net` = case - floor (empty tc program, same harness). 10 endpoints per service. NodePort = new flow from an external client to node address:nodePort on `lb_up_in` (externalTrafficPolicy Cluster: DNAT + masquerade to the node + FIB lookup), with NodePort entries for the services listed in its column.\n",
            pc["rounds"], pc["batch"]
        );
        o.push_str("| services | floor | new flow (net) | established (net) | reply (net) | non-service (net) | NodePort new flow (net) | floor / non-service at repeat=1000 |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for s in sizes {
            if let Some(e) = s["error"].as_str() {
                let _ = writeln!(o, "| {} | {e} | | | | | | |", s["services"]);
                continue;
            }
            let c = &s["cases"];
            let cell =
                |k: &str| format!("{} ({})", f(&c[k]["median_ns"], 0), f(&c[k]["net_ns"], 0));
            let np = if let Some(why) = c["nodeport"]["unsupported"].as_str() {
                why.to_owned()
            } else {
                let with = &c["nodeport"]["services_with_nodeport"];
                let subset = if with.is_null() || *with == s["services"] {
                    String::new()
                } else {
                    format!(", {with} services with a NodePort")
                };
                format!("{}{subset}", cell("nodeport"))
            };
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} / {} |",
                s["services"],
                f(&c["floor"]["median_ns"], 0),
                cell("new_flow"),
                cell("established"),
                cell("reply"),
                cell("non_service"),
                np,
                f(&s["repeat_1000"]["floor_ns"], 0),
                f(&s["repeat_1000"]["non_service_ns"], 0),
            );
        }
        // Results from before the XDP cases existed have none of these keys: no table then,
        // and "-" for a size that lacks them.
        let xdp_keys = [
            "xdp_established",
            "xdp_established_ipip",
            "uplink_after_xdp",
            "uplink_established",
            "uplink_established_ipip",
        ];
        if sizes
            .iter()
            .any(|s| !s["cases"]["xdp_established"].is_null())
        {
            o.push_str("\n### XDP fast path on the uplink (same runs, ns per packet)\n\nAn established external flow to a LoadBalancer IP with externalTrafficPolicy Local (the flows XDP translates: destination rewrite only, client kept; eTP Local LB IPs for up to 4096 of the services), on `lb_up_xdp`, plain and wrapped in IPIP to the node, and the same packets on tc `lb_up_in` alone. XDP always returns XDP_PASS and marks what it translated in the packet's metadata; tc `lb_up_in` then passes the packet after one bounds check and a counter (not measurable here: test-run cannot hand XDP metadata to a tc run). `tc after XDP` is tc's full pipeline on the unmarked translated packet: what each packet costs tc behind XDP where the driver drops metadata. Every XDP run is checked to have rewritten the destination and set the mark. `net` = case - empty program of the same hook (XDP floor: `r0 = XDP_PASS`; tc: the floor above).\n\n| services | XDP floor | XDP established (net) | XDP IPIP decap + established (net) | tc after XDP, no mark (net) | tc `lb_up_in` established (net) | tc `lb_up_in` IPIP decap + established (net) |\n|---:|---:|---:|---:|---:|---:|---:|\n");
            for s in sizes.iter().filter(|s| s["error"].is_null()) {
                let c = &s["cases"];
                let cell = |k: &str| {
                    if c[k]["median_ns"].is_null() {
                        "-".to_owned()
                    } else {
                        format!("{} ({})", f(&c[k]["median_ns"], 0), f(&c[k]["net_ns"], 0))
                    }
                };
                let floor = if c["xdp_floor"]["median_ns"].is_null() {
                    "-".to_owned()
                } else {
                    f(&c["xdp_floor"]["median_ns"], 0)
                };
                let _ = writeln!(
                    o,
                    "| {} | {floor} | {} |",
                    s["services"],
                    xdp_keys.map(cell).join(" | ")
                );
            }
        }
        o.push_str("\n### Map programming and BPF map memory (same runs)\n\nClusterIP entries from scratch, then NodePort entries for the same services as an incremental plan. Maps sized exactly for both.\n\n| services x endpoints | map writes | plan | apply (syscalls) | + NodePort: writes / plan / apply | service map | backend map | conntrack map (entries) |\n|---|---:|---:|---:|---:|---:|---:|---:|\n");
        for s in sizes.iter().filter(|s| s["error"].is_null()) {
            let cp = &s["control_plane"];
            let mem = &s["memory_bytes"];
            let _ = writeln!(
                o,
                "| {} x {} | {} | {} ms | {} ms | {} | {} | {} | {} ({}) |",
                s["services"],
                s["endpoints_per_service"],
                cp["map_writes"],
                f(&cp["plan_ms"], 1),
                f(&cp["apply_ms"], 1),
                if cp["nodeport_map_writes"].is_null() {
                    "-".to_owned()
                } else {
                    format!(
                        "{} / {} ms / {} ms",
                        cp["nodeport_map_writes"],
                        f(&cp["nodeport_plan_ms"], 1),
                        f(&cp["nodeport_apply_ms"], 1)
                    )
                },
                mib(&mem["services_map"]),
                mib(&mem["backends_map"]),
                mib(&mem["conntrack_map"]),
                mem["conntrack_entries"]
            );
        }
        o.push('\n');
    }
    if let Some(sizes) = r["lab"]["sizes"].as_array() {
        let _ = writeln!(
            o,
            "### Connections through a ClusterIP (lab; client pod on node1, 10 endpoints on node2)\n\nMedians over {} interleaved repetitions; each: {} sequential connect-per-request connections (latency) and {} over 2 threads (rate). The target service is the last one programmed.\n",
            r["lab"]["reps"], r["lab"]["count"], r["lab"]["rate_count"]
        );
        o.push_str("| services x endpoints | mode | connect p50 µs | connect p99 µs | request p50 µs | conn/s | conn/s vs ebpf-proxy | p50 vs ebpf-proxy | failed |\n|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
        connection_rows(&mut o, sizes, "");
        o.push_str("\n### The same service's NodePort from outside the cluster (lab; client in `ext`, node1:30080, externalTrafficPolicy Cluster)\n\nDNAT to one of the 10 endpoints on node2 and masquerade to node1's address. `routed` connects to an endpoint directly.\n\n| services x endpoints | mode | connect p50 µs | connect p99 µs | conn/s | conn/s vs ebpf-proxy | p50 vs ebpf-proxy | failed |\n|---|---|---:|---:|---:|---:|---:|---:|\n");
        connection_rows(&mut o, sizes, "nodeport_");
        o.push_str("\n### Control plane (lab, node1; ms until the client's connections are forwarded accordingly, median; command time in parentheses)\n\n| services x endpoints | mode | full programming | add one service | change one endpoint | kernel memory of the rules / BPF maps |\n|---|---|---:|---:|---:|---:|\n");
        for s in sizes {
            for mode in ran(s) {
                if mode == Mode::Routed {
                    continue;
                }
                let v = &s["modes"][mode.key()];
                let cell = |a: &str, b: &str| {
                    if v[a].is_null() {
                        "-".to_owned()
                    } else if v[b].is_null() {
                        f(&v[a], 0)
                    } else {
                        format!("{} ({})", f(&v[a], 0), f(&v[b], 0))
                    }
                };
                let memv = if mode == Mode::Ebpf {
                    format!("{} (BPF maps)", mib(&v["bpf_map_memory_bytes"]))
                } else {
                    mib(&v["kernel_memory_bytes"])
                };
                let _ = writeln!(
                    o,
                    "| {} x {} | {} | {} | {} | {} | {} |",
                    s["services"],
                    s["endpoints_per_service"],
                    mode.name(),
                    cell(
                        "full_program_until_forwarding_ms",
                        "full_program_command_ms"
                    ),
                    cell("add_service_ms", "add_service_command_ms"),
                    cell("change_endpoint_ms", "change_endpoint_command_ms"),
                    memv
                );
            }
        }
        o.push('\n');
    }
    o.push_str("Plots: `docs/bench/packet_cost.png`, `docs/bench/connect_latency.png`. Raw data: `docs/bench/results.json`.\n");
    o
}
