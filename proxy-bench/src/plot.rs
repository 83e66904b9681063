//! Bar charts of the results (PNG, plotters' bitmap backend; text via ab_glyph with a system
//! TTF when one is found, otherwise bars only).
use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;
use serde_json::Value;

use super::labbench::Mode;

const FONTS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

fn register_font() -> bool {
    for p in FONTS {
        if let Ok(bytes) = std::fs::read(p) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    false
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Grouped bars: one group per x label, one bar per series.
fn grouped(
    path: &Path,
    title: &str,
    y_label: &str,
    groups: &[String],
    series: &[(String, Vec<Option<f64>>)],
    text: bool,
) -> Result<()> {
    let root = BitMapBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().flatten())
        .cloned()
        .fold(0.0f64, f64::max)
        * 1.15;
    let n = series.len().max(1) as f64;
    let mut b = ChartBuilder::on(&root);
    b.margin(15);
    if text {
        b.caption(title, ("sans-serif", 22))
            .x_label_area_size(40)
            .y_label_area_size(70);
    }
    let mut chart = b
        .build_cartesian_2d(0f64..groups.len() as f64, 0f64..max.max(1.0))
        .map_err(|e| anyhow!("{e}"))?;
    if text {
        let g = groups.to_vec();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(groups.len() * 2 + 1)
            .x_label_formatter(&move |x| {
                let i = x.floor() as usize;
                if (x - x.floor() - 0.5).abs() < 0.26 {
                    g.get(i).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc(y_label)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    for (si, (name, vals)) in series.iter().enumerate() {
        let color = COLORS[si % COLORS.len()];
        let w = 0.8 / n;
        let bars = vals.iter().enumerate().filter_map(|(gi, v)| {
            v.map(|v| {
                let x0 = gi as f64 + 0.1 + si as f64 * w;
                Rectangle::new([(x0, 0.0), (x0 + w * 0.9, v)], color.filled())
            })
        });
        let drawn = chart.draw_series(bars).map_err(|e| anyhow!("{e}"))?;
        if text {
            drawn.label(name.as_str()).legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
            });
        }
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

pub fn plots(r: &Value, dir: &Path) -> Result<()> {
    let text = register_font();
    if let Some(sizes) = r["packet_cost"]["sizes"].as_array() {
        let groups: Vec<String> = sizes
            .iter()
            .map(|s| format!("{} services", s["services"]))
            .collect();
        let series: Vec<(String, Vec<Option<f64>>)> = [
            ("floor", "empty program (floor)"),
            ("new_flow", "new flow"),
            ("established", "established"),
            ("reply", "reply (reverse NAT)"),
            ("non_service", "non-service"),
            ("nodeport", "NodePort new flow (masquerade)"),
        ]
        .iter()
        .map(|(k, label)| {
            (
                (*label).to_owned(),
                sizes
                    .iter()
                    .map(|s| s["cases"][*k]["median_ns"].as_f64())
                    .collect(),
            )
        })
        .collect();
        grouped(
            &dir.join("packet_cost.png"),
            "ebpf-proxy per-packet cost (BPF_PROG_TEST_RUN, median ns)",
            "ns per packet",
            &groups,
            &series,
            text,
        )?;
    }
    if let Some(sizes) = r["lab"]["sizes"].as_array() {
        let groups: Vec<String> = sizes
            .iter()
            .map(|s| format!("{} x {}", s["services"], s["endpoints_per_service"]))
            .collect();
        let series: Vec<(String, Vec<Option<f64>>)> = Mode::ALL
            .iter()
            .map(|m| {
                (
                    m.name().to_owned(),
                    sizes
                        .iter()
                        .map(|s| s["modes"][m.key()]["connect_p50_us"].as_f64())
                        .collect(),
                )
            })
            .collect();
        grouped(
            &dir.join("connect_latency.png"),
            "TCP connect p50 through a ClusterIP (lab, µs, lower is better)",
            "µs",
            &groups,
            &series,
            text,
        )?;
    }
    Ok(())
}
