//! Reports: a Table-2-style markdown table (AUC, UAUC, relative improvement over the best
//! baseline), warm/cold columns like Figure 3, and the training curves.

use collm_metrics::Report;
use std::fmt::Write as _;

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
        let rel = |x: Option<f64>, b: f64| match x {
            Some(v) if b.is_finite() && b != 0.5 => format!("{:+.2}%", 100.0 * (v - b) / (b - 0.5)),
            _ => "-".into(),
        };
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

/// The validation curve of a run directory, CoLLM (`step`) or collaborative model (`epoch`),
/// read from its metrics.json; None when the run has no validation points yet.
pub fn run_curve(run: &std::path::Path, name: &str) -> anyhow::Result<Option<crate::plot::Curve>> {
    use anyhow::Context;
    let path = run.join("metrics.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let Some(points) = v.get("curve").and_then(|c| c.as_array()) else {
        anyhow::bail!("{}: no \"curve\" list", path.display());
    };
    let x_label = if points.iter().any(|p| p.get("epoch").is_some()) {
        "epoch"
    } else {
        "step"
    };
    let points: Vec<(f64, f64)> = points
        .iter()
        .filter_map(|p| Some((p.get(x_label)?.as_f64()?, p.get("valid_auc")?.as_f64()?)))
        .collect();
    Ok((!points.is_empty()).then(|| crate::plot::Curve {
        name: name.to_string(),
        x_label: x_label.into(),
        points,
    }))
}
