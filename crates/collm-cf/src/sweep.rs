//! A grid search over learning rate, weight decay and embedding size (the paper's search
//! space by default), selecting by valid AUC. Each point is a full run under `OUT/runs/`.

use crate::train::{train, TrainMetrics, TrainOptions};
use crate::CfConfig;
use anyhow::Result;
use collm_data::Dataset;
use serde::Serialize;
use std::path::Path;

pub const PAPER_LRS: [f64; 3] = [1e-2, 1e-3, 1e-4];
pub const PAPER_WDS: [f64; 6] = [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7];
pub const PAPER_DIMS: [usize; 3] = [64, 128, 256];

#[derive(Debug, Clone, Serialize)]
pub struct SweepPoint {
    pub name: String,
    pub lr: f64,
    pub weight_decay: f64,
    pub dim: usize,
    pub best_epoch: Option<usize>,
    pub valid_auc: Option<f64>,
    pub valid_uauc: Option<f64>,
}

pub struct Grid {
    pub lrs: Vec<f64>,
    pub weight_decays: Vec<f64>,
    pub dims: Vec<usize>,
}

impl Default for Grid {
    fn default() -> Self {
        Self {
            lrs: PAPER_LRS.to_vec(),
            weight_decays: PAPER_WDS.to_vec(),
            dims: PAPER_DIMS.to_vec(),
        }
    }
}

/// Runs every grid point (resuming finished or interrupted ones), writes `results.tsv`,
/// `results.md` and `best.toml` into `out`, and returns the points best first.
pub fn sweep(base: &CfConfig, grid: &Grid, ds: &Dataset, out: &Path) -> Result<Vec<SweepPoint>> {
    std::fs::create_dir_all(out.join("runs"))?;
    let mut points = Vec::new();
    for &dim in &grid.dims {
        for &lr in &grid.lrs {
            for &wd in &grid.weight_decays {
                let cfg = CfConfig {
                    dim,
                    lr,
                    weight_decay: wd,
                    ..base.clone()
                };
                let name = format!("{}-d{dim}-lr{lr:e}-wd{wd:e}", cfg.model);
                let run = out.join("runs").join(&name);
                let resume = run.join(crate::run::CONFIG_FILE).is_file();
                tracing::info!("sweep point {name}");
                let m: TrainMetrics = train(
                    &cfg,
                    ds,
                    &run,
                    &TrainOptions {
                        resume,
                        ..Default::default()
                    },
                )?;
                let best = m.best_valid.as_ref();
                points.push((
                    cfg,
                    SweepPoint {
                        name,
                        lr,
                        weight_decay: wd,
                        dim,
                        best_epoch: m.best_epoch,
                        valid_auc: best.and_then(|r| r.auc),
                        valid_uauc: best.and_then(|r| r.uauc),
                    },
                ));
            }
        }
    }
    let f = collm_metrics::fmt_metric;
    write_results(
        out,
        &[
            ("name", "run"),
            ("dim", "d"),
            ("lr", "lr"),
            ("weight_decay", "wd"),
            ("best_epoch", "best epoch"),
            ("valid_auc", "valid AUC"),
            ("valid_uauc", "valid UAUC"),
        ],
        &mut points,
        |p| p.valid_auc,
        |p| {
            vec![
                p.name.clone(),
                p.dim.to_string(),
                format!("{:e}", p.lr),
                format!("{:e}", p.weight_decay),
                p.best_epoch.unwrap_or(0).to_string(),
                f(p.valid_auc),
                f(p.valid_uauc),
            ]
        },
        |cfg| cfg.to_toml(),
    )?;
    Ok(points.into_iter().map(|(_, p)| p).collect())
}

/// Sorts a sweep's `(config, point)` pairs by valid AUC, best first (a point without one last),
/// and writes `results.tsv` (the columns' first names) and `results.md` (their second names),
/// a row a point, and `best.toml` (the best point's config) into `out`. Shared by every sweep.
pub fn write_results<C, P>(
    out: &Path,
    columns: &[(&str, &str)],
    points: &mut [(C, P)],
    auc: impl Fn(&P) -> Option<f64>,
    cells: impl Fn(&P) -> Vec<String>,
    to_toml: impl Fn(&C) -> Result<String>,
) -> Result<()> {
    points.sort_by(|a, b| {
        auc(&b.1)
            .unwrap_or(f64::MIN)
            .total_cmp(&auc(&a.1).unwrap_or(f64::MIN))
    });
    let names = |k: fn(&(&str, &str)) -> String| columns.iter().map(k).collect::<Vec<_>>();
    let mut tsv = names(|c| c.0.to_string()).join("\t") + "\n";
    let mut md = format!(
        "| {} |\n|{}\n",
        names(|c| c.1.to_string()).join(" | "),
        "---|".repeat(columns.len())
    );
    for (_, p) in points.iter() {
        let row = cells(p);
        tsv += &(row.join("\t") + "\n");
        md += &format!("| {} |\n", row.join(" | "));
    }
    collm_core::io::write_file_atomic(&out.join("results.tsv"), tsv.as_bytes())?;
    collm_core::io::write_file_atomic(&out.join("results.md"), md.as_bytes())?;
    if let Some((cfg, _)) = points.first() {
        collm_core::io::write_file_atomic(&out.join("best.toml"), to_toml(cfg)?.as_bytes())?;
    }
    Ok(())
}
