//! Report charts as PNG: the warm/cold AUC bars of the paper's Figure 3 and the validation
//! curves of training runs. Rendered in memory with plotters (font embedded from the `dejavu`
//! crate, so no system fonts are needed) and written atomically.

use crate::{Curve, Row};
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontStyle;
use std::path::Path;
use std::sync::Once;

const FONT: &str = "sans-serif";

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid TrueType font shipped by the crate; failing here is a bug.
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
            .unwrap_or_else(|_| panic!("the embedded DejaVu Sans font does not parse"));
    });
}

/// matplotlib's "tab20": each tab10 colour and a light one beside it, for more than 10 rows.
const TAB20: [RGBColor; 20] = [
    RGBColor(31, 119, 180),
    RGBColor(174, 199, 232),
    RGBColor(255, 127, 14),
    RGBColor(255, 187, 120),
    RGBColor(44, 160, 44),
    RGBColor(152, 223, 138),
    RGBColor(214, 39, 40),
    RGBColor(255, 152, 150),
    RGBColor(148, 103, 189),
    RGBColor(197, 176, 213),
    RGBColor(140, 86, 75),
    RGBColor(196, 156, 148),
    RGBColor(227, 119, 194),
    RGBColor(247, 182, 210),
    RGBColor(127, 127, 127),
    RGBColor(199, 199, 199),
    RGBColor(188, 189, 34),
    RGBColor(219, 219, 141),
    RGBColor(23, 190, 207),
    RGBColor(158, 218, 229),
];

/// matplotlib's default "tab10" palette (tab20's dark colours), so the charts look like the
/// paper's Python-made ones.
const TAB10: [RGBColor; 10] = {
    let mut c = [RGBColor(0, 0, 0); 10];
    let mut i = 0;
    while i < 10 {
        c[i] = TAB20[2 * i];
        i += 1;
    }
    c
};

/// The colours of `n` series: tab10 up to 10, tab20 up to 20 (then they repeat).
fn palette(n: usize) -> &'static [RGBColor] {
    if n <= TAB10.len() {
        &TAB10
    } else {
        &TAB20
    }
}

/// Renders `draw` on a `w`×`h` canvas and writes it to `path` as PNG, atomically.
fn render(
    path: &Path,
    (w, h): (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend, plotters::coord::Shift>) -> Result<()>,
) -> Result<()> {
    register_font();
    let mut rgb = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        draw(&root)?;
        root.present().map_err(plot_err)?;
    }
    let mut png = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut png, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header()?.write_image_data(&rgb)?;
    }
    collm_core::io::write_file_atomic(path, &png)
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing the chart: {e:?}")
}

/// Figure 3: for each subset (e.g. warm, cold) a group of bars, one per row, height = AUC.
/// Rows without a value for a subset leave a gap.
pub fn subset_bars(path: &Path, title: &str, rows: &[Row], subsets: &[&str]) -> Result<()> {
    let values: Vec<Vec<Option<f64>>> = subsets
        .iter()
        .map(|s| {
            rows.iter()
                .map(|r| r.report.subsets.get(*s).and_then(|m| m.auc))
                .collect()
        })
        .collect();
    let all: Vec<f64> = values.iter().flatten().flatten().copied().collect();
    if all.is_empty() {
        return Err(anyhow!("no AUC on the subsets {subsets:?} to plot"));
    }
    // Bars start below the smallest value so differences stay visible, as in the paper.
    let lo = (all.iter().copied().fold(f64::INFINITY, f64::min) - 0.05).clamp(0.0, 0.5);
    let hi = (all.iter().copied().fold(f64::NEG_INFINITY, f64::max) + 0.05).min(1.0);
    let groups = subsets.len();
    let n = rows.len().max(1);
    let colors = palette(n);
    // Each group wide enough for its bars; the legend beside the chart, one line per row, so
    // that it covers no bar however many rows there are.
    let chart_w = 140 + groups as u32 * (26 * n as u32).max(180);
    let longest = rows
        .iter()
        .map(|r| r.name.chars().count())
        .max()
        .unwrap_or(0);
    let legend_w = 50 + 9 * longest as u32;
    let h = (100 + 24 * n as u32).max(480);
    render(path, (chart_w + legend_w, h), |root| {
        let (left, legend) = root.split_horizontally(chart_w);
        let mut chart = ChartBuilder::on(&left)
            .caption(title, (FONT, 22))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..groups as f64, lo..hi)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .light_line_style(TRANSPARENT)
            .y_desc("AUC")
            .label_style((FONT, 16))
            .draw()
            .map_err(plot_err)?;
        // Subset names centred under their group of bars.
        let label = TextStyle::from((FONT, 18).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
        for (g, name) in subsets.iter().enumerate() {
            let (px, py) = chart.backend_coord(&(g as f64 + 0.5, lo));
            left.draw(&Text::new(name.to_string(), (px, py + 10), label.clone()))
                .map_err(plot_err)?;
        }
        let width = 0.8 / n as f64;
        for (ri, _) in rows.iter().enumerate() {
            let color = colors[ri % colors.len()];
            let bars = (0..groups).filter_map(|g| {
                values[g][ri].map(|v| {
                    let x0 = g as f64 + 0.1 + width * ri as f64;
                    Rectangle::new([(x0, lo), (x0 + width * 0.92, v)], color.filled())
                })
            });
            chart.draw_series(bars).map_err(plot_err)?;
        }
        let text = TextStyle::from((FONT, 15).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
        for (ri, row) in rows.iter().enumerate() {
            let y = 60 + 24 * ri as i32;
            let color = colors[ri % colors.len()];
            legend
                .draw(&Rectangle::new([(8, y - 7), (24, y + 7)], color.filled()))
                .map_err(plot_err)?;
            legend
                .draw(&Text::new(row.name.clone(), (32, y), text.clone()))
                .map_err(plot_err)?;
        }
        Ok(())
    })
}

/// Validation AUC against training progress, one panel per run (runs count progress in
/// different units, so they do not share an axis).
pub fn curves(path: &Path, curves: &[Curve]) -> Result<()> {
    let curves: Vec<&Curve> = curves.iter().filter(|c| !c.points.is_empty()).collect();
    if curves.is_empty() {
        return Err(anyhow!("no validation points to plot"));
    }
    let cols = curves.len().min(3);
    let rows = curves.len().div_ceil(cols);
    render(path, (420 * cols as u32, 320 * rows as u32), |root| {
        for (i, (c, area)) in curves
            .iter()
            .zip(root.split_evenly((rows, cols)))
            .enumerate()
        {
            let xs = c.points.iter().map(|p| p.0);
            let ys = c.points.iter().map(|p| p.1);
            let x_hi = xs.fold(1.0, f64::max);
            let y_lo = ys.clone().fold(f64::INFINITY, f64::min);
            let y_hi = ys.fold(f64::NEG_INFINITY, f64::max);
            let pad = ((y_hi - y_lo) * 0.1).max(0.01);
            let mut chart = ChartBuilder::on(&area)
                .caption(&c.name, (FONT, 18))
                .margin(12)
                .x_label_area_size(35)
                .y_label_area_size(55)
                .build_cartesian_2d(0.0..x_hi, (y_lo - pad)..(y_hi + pad))
                .map_err(plot_err)?;
            chart
                .configure_mesh()
                .x_desc(&c.x_label)
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_desc("valid AUC")
                .light_line_style(TRANSPARENT)
                .label_style((FONT, 13))
                .draw()
                .map_err(plot_err)?;
            let color = TAB10[i % TAB10.len()];
            chart
                .draw_series(LineSeries::new(
                    c.points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(plot_err)?;
            chart
                .draw_series(c.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(plot_err)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use collm_metrics::Report;

    fn report(auc: f64, warm: f64, cold: f64) -> Report {
        let mut r: Report = serde_json::from_value(serde_json::json!({
            "auc": auc, "uauc": auc, "n": 10, "uauc_users": 2, "subsets": {}
        }))
        .unwrap();
        for (k, v) in [("warm", warm), ("cold", cold)] {
            r.subsets.insert(
                k.into(),
                serde_json::from_value(
                    serde_json::json!({"auc": v, "uauc": v, "n": 5, "uauc_users": 1}),
                )
                .unwrap(),
            );
        }
        r
    }

    fn png_size(path: &Path) -> (u32, u32) {
        let dec = png::Decoder::new(std::fs::File::open(path).unwrap());
        let reader = dec.read_info().unwrap();
        let info = reader.info();
        (info.width, info.height)
    }

    #[test]
    fn bar_chart_and_curves_are_png_files_with_drawn_pixels() {
        let dir = tempfile::tempdir().unwrap();
        let rows = vec![
            Row {
                name: "MF".into(),
                report: report(0.6, 0.7, 0.5),
            },
            Row {
                name: "CoLLM-MF".into(),
                report: report(0.7, 0.75, 0.65),
            },
        ];
        let bars = dir.path().join("bars.png");
        subset_bars(&bars, "test", &rows, &["warm", "cold"]).unwrap();
        // Two groups of 180 px beside the axes, the legend beside them (8 characters).
        assert_eq!(png_size(&bars), (140 + 360 + 50 + 72, 480));
        let curves_png = dir.path().join("curves.png");
        curves(
            &curves_png,
            &[
                Curve {
                    name: "a".into(),
                    x_label: "step".into(),
                    points: vec![(10.0, 0.55), (20.0, 0.6)],
                },
                Curve {
                    name: "b".into(),
                    x_label: "epoch".into(),
                    points: vec![(1.0, 0.5), (2.0, 0.52), (3.0, 0.51)],
                },
            ],
        )
        .unwrap();
        assert_eq!(png_size(&curves_png), (840, 320));
        // Not a blank canvas: the bars' colours are present.
        let dec = png::Decoder::new(std::fs::File::open(&bars).unwrap());
        let mut reader = dec.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        reader.next_frame(&mut buf).unwrap();
        let has = |c: RGBColor| buf.chunks(3).any(|p| p == [c.0, c.1, c.2]);
        assert!(has(TAB10[0]) && has(TAB10[1]));
        // Nothing to plot is an error, not an empty picture.
        assert!(subset_bars(&bars, "t", &rows, &["seen"]).is_err());
        assert!(curves(&curves_png, &[]).is_err());
    }
}
