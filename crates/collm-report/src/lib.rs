//! Reports: a Table-2-style markdown table (AUC, UAUC, relative improvement over the best
//! baseline), warm/cold columns like Figure 3, and the training curves read from run
//! directories. Charts are in [`plot`]. Apart from the model crates: reports need evaluations
//! and run files, not the models.

pub mod plot;

use anyhow::Context;
use collm_metrics::Report;
use serde::Deserialize;
use std::fmt::Write as _;
use std::path::Path;

/// One row of a report: a run's name and its evaluation.
pub struct Row {
    pub name: String,
    pub report: Report,
}

use collm_metrics::fmt_metric as f;

/// Markdown table; the last row is compared with the best of the others ("RelaImpr" as in the
/// paper: relative improvement of AUC − 0.5 and UAUC − 0.5).
pub fn table(rows: &[Row], subsets: &[&str]) -> String {
    let mut s = String::from("| model | AUC | UAUC |");
    for sub in subsets {
        let _ = write!(s, " {sub} AUC | {sub} UAUC |");
    }
    s.push_str("\n|---|---|---|");
    for _ in subsets {
        s.push_str("---|---|");
    }
    s.push('\n');
    for r in rows {
        let _ = write!(
            s,
            "| {} | {} | {} |",
            r.name,
            f(r.report.auc),
            f(r.report.uauc)
        );
        for sub in subsets {
            let m = r.report.subsets.get(*sub);
            let _ = write!(
                s,
                " {} | {} |",
                f(m.and_then(|m| m.auc)),
                f(m.and_then(|m| m.uauc))
            );
        }
        s.push('\n');
    }
    if rows.len() >= 2 {
        let last = &rows[rows.len() - 1];
        let best = |g: fn(&Report) -> Option<f64>| {
            rows[..rows.len() - 1]
                .iter()
                .filter_map(|r| g(&r.report))
                .fold(f64::NAN, f64::max)
        };
        let rel = |x: Option<f64>, b: f64| relaimpr(x, b);
        let _ = writeln!(
            s,
            "\nRelaImpr of {} over the best other row: AUC {}, UAUC {}",
            last.name,
            rel(last.report.auc, best(|r| r.auc)),
            rel(last.report.uauc, best(|r| r.uauc))
        );
    }
    s
}

/// RelaImpr of `x` over the baseline `b`: `(x − b) / (b − 0.5)`, as a signed percentage. Only
/// defined for a baseline above chance: at or below 0.5 the denominator is not an improvement
/// over chance (it would flip the sign or divide by ~0), and that is said instead.
fn relaimpr(x: Option<f64>, b: f64) -> String {
    match x {
        Some(_) if b.is_finite() && b <= 0.5 => {
            format!("undefined (the best other row's {b:.4} is no better than chance)")
        }
        Some(v) if b.is_finite() => {
            let r = 100.0 * (v - b) / (b - 0.5);
            // No "-0.00%" for a difference that rounds to nothing.
            let r = if r.abs() < 0.005 { 0.0 } else { r };
            format!("{r:+.2}%")
        }
        _ => "-".into(),
    }
}

pub use collm_metrics::RunKind;

/// One point of a validation curve as either trainer writes it in `metrics.json`.
#[derive(Debug, Clone, Deserialize)]
struct CurvePoint {
    #[serde(default)]
    epoch: Option<usize>,
    #[serde(default)]
    step: Option<usize>,
    valid_auc: Option<f64>,
}

/// The part of `metrics.json` that reports read.
#[derive(Debug, Clone, Deserialize)]
struct MetricsFile {
    #[serde(default)]
    kind: Option<RunKind>,
    curve: Vec<CurvePoint>,
}

/// One training run's validation curve.
#[derive(Debug, Clone)]
pub struct Curve {
    pub name: String,
    /// "step" (CoLLM runs) or "epoch" (collaborative-model runs).
    pub x_label: String,
    /// (x, valid AUC)
    pub points: Vec<(f64, f64)>,
}

/// The validation curve of a run directory, read from its metrics.json; None when the run has
/// no validation points yet.
pub fn run_curve(run: &Path, name: &str) -> anyhow::Result<Option<Curve>> {
    let path = run.join("metrics.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let m: MetricsFile = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a run's metrics", path.display()))?;
    // Files written before "kind" was recorded: the config says.
    let kind = match m.kind {
        Some(k) => k,
        None => RunKind::of_run(run)?,
    };
    let points: Vec<(f64, f64)> = m
        .curve
        .iter()
        .filter_map(|p| {
            let x = match kind {
                RunKind::Cf => p.epoch?,
                RunKind::Collm => p.step?,
            };
            Some((x as f64, p.valid_auc?))
        })
        .collect();
    Ok((!points.is_empty()).then(|| Curve {
        name: name.to_string(),
        x_label: kind.x_label().into(),
        points,
    }))
}

#[cfg(test)]
mod relaimpr_tests {
    use super::relaimpr;

    #[test]
    fn relaimpr_is_undefined_at_or_below_chance_and_never_minus_zero() {
        assert_eq!(relaimpr(Some(0.7), 0.6), "+100.00%");
        assert_eq!(relaimpr(Some(0.55), 0.6), "-50.00%");
        assert!(relaimpr(Some(0.4625), 0.4125).starts_with("undefined"));
        assert!(relaimpr(Some(0.6), 0.5).starts_with("undefined"));
        assert_eq!(relaimpr(Some(0.6 - 1e-9), 0.6), "+0.00%");
        assert_eq!(relaimpr(None, 0.6), "-");
        assert_eq!(relaimpr(Some(0.6), f64::NAN), "-");
    }
}
