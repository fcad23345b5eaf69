//! Shared-prefix scoring (`CoLlm::predict_shared`) equals whole-prompt scoring
//! (`CoLlm::predict`) for every mode: text-only, CIE over MF, SASRec, LightGCN and DIN (whose user slot
//! depends on the item, so its prefix ends before `<UserID>`), Soft-Prompt with k = 2 tokens
//! per slot, UI-token; with users that have many candidates, rows with their own histories,
//! and batches smaller than a user's candidates.

use candle_core::Device;
use collm::experiment::{ExperimentConfig, Mode};
use collm::model::CoLlm;
use collm::train::{train, TrainOptions};
use collm_cf::train::{train as train_cf, TrainOptions as CfOptions};
use collm_cf::{CfConfig, ModelKind};
use collm_data::dataset::write_dataset;
use collm_data::sources::synthetic::{prepare, SyntheticOptions};
use collm_data::{Dataset, Interaction};
use std::path::Path;
use std::sync::OnceLock;

fn config(root: &Path, mode: Mode) -> ExperimentConfig {
    let mut c = ExperimentConfig::new(mode, &root.join("data"), &root.join("backbone"));
    c.model.cf_run = Some(root.join("cf-mf"));
    c.model.step1 = Some(root.join("step1"));
    c.model.mapper_mult = 2;
    c.model.eval_batch_size = 4;
    let t = &mut c.training;
    (t.max_steps, t.eval_every, t.eval_rows, t.batch_size) = (2, 2, 8, 4);
    c.training.lr = 0.05;
    c
}

struct Family {
    _tmp: tempfile::TempDir,
    root: std::path::PathBuf,
    ds: Dataset,
}

/// The tiny run family both tests read: a 2-layer random backbone, a synthetic dataset, MF,
/// DIN, SASRec and LightGCN runs, and a step-1 LoRA; made once.
fn family() -> &'static Family {
    static F: OnceLock<Family> = OnceLock::new();
    F.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        collm_llm::testing::write_tiny_backbone(&root.join("backbone"), 2).unwrap();
        let data = prepare(&SyntheticOptions {
            users: 16,
            items: 12,
            rows_per_user: 8.0,
            seed: 5,
            ..Default::default()
        })
        .unwrap();
        write_dataset(data, &root.join("data"), false).unwrap();
        let ds = Dataset::load(&root.join("data")).unwrap();
        for model in [
            ModelKind::Mf,
            ModelKind::Din,
            ModelKind::SasRec,
            ModelKind::LightGcn,
        ] {
            let cfg = CfConfig {
                dim: 8,
                hidden: vec![8],
                max_len: 4,
                max_epochs: 1,
                ..CfConfig::defaults(model)
            };
            let opts = CfOptions {
                resume: false,
                force: false,
                quiet: true,
            };
            train_cf(&cfg, &ds, &root.join(format!("cf-{model}")), &opts).unwrap();
        }
        // Step 1 trains a LoRA (B leaves zero), which every step-2 mode reads.
        let quiet = TrainOptions {
            resume: false,
            force: false,
            quiet: true,
            stop_after: None,
        };
        train(&config(&root, Mode::Tallrec), &root.join("step1"), &quiet).unwrap();
        Family {
            _tmp: tmp,
            root,
            ds,
        }
    })
}

#[test]
fn shared_prefix_scores_equal_whole_prompt_scores_in_every_mode() {
    let Family { root, ds, .. } = family();
    let config = |mode: Mode| config(root, mode);
    // Three users with nine candidates each (their test rows' histories), then the whole
    // test split (each row with its own history).
    let test = &ds.split("test").unwrap().rows;
    let mut rows: Vec<Interaction> = Vec::new();
    for base in test.iter().step_by(test.len() / 3).take(3) {
        for iid in 1..=9 {
            rows.push(Interaction {
                iid,
                ..base.clone()
            });
        }
    }
    rows.extend(test.iter().cloned());

    let mut cases: Vec<(&str, ExperimentConfig)> = vec![
        ("icl", config(Mode::Icl)),
        ("collm-mf", config(Mode::Collm)),
        ("uitoken", config(Mode::Uitoken)),
    ];
    let mut tallrec = config(Mode::Tallrec);
    tallrec.model.step1 = None;
    cases.push(("tallrec", tallrec));
    cases.push(("t3", config(Mode::T3)));
    let mut din = config(Mode::Collm);
    din.model.cf_run = Some(root.join("cf-din"));
    cases.push(("collm-din", din));
    for cf in ["sasrec", "lightgcn"] {
        let mut c = config(Mode::Collm);
        c.model.cf_run = Some(root.join(format!("cf-{cf}")));
        cases.push((
            if cf == "sasrec" {
                "collm-sasrec"
            } else {
                "collm-lightgcn"
            },
            c,
        ));
    }
    let mut soft = config(Mode::Softprompt);
    soft.model.tokens_per_slot = Some(2);
    cases.push(("softprompt k=2", soft));
    for (name, cfg) in cases {
        let mut m = CoLlm::build(&cfg, ds, &Device::Cpu).unwrap();
        if let Some(l) = &m.lora {
            // Non-zero B, so that the adapter changes every score.
            for (_, v) in l.trainable() {
                let r = candle_core::Tensor::randn(0f32, 0.1, v.dims(), &Device::Cpu).unwrap();
                v.set(&r).unwrap();
            }
        }
        m.score_offset = 0.25;
        let full = m.predict(&rows, &ds.titles, false).unwrap();
        let shared = m.predict_shared(&rows, &ds.titles, false).unwrap();
        let diff = full
            .iter()
            .zip(&shared)
            .map(|(a, b)| (a - b).abs())
            .fold(0f64, f64::max);
        assert!(diff <= 1e-4, "{name}: max |diff| {diff}");
        // Scores differ between candidates: the test is not comparing constants.
        let spread = full[..9].iter().cloned().fold(f64::MIN, f64::max)
            - full[..9].iter().cloned().fold(f64::MAX, f64::min);
        assert!(spread > 1e-4, "{name}: candidates' scores are all equal");
    }
}

/// The gradients of `sum(scores · r)` for a fixed `r`, per trainable parameter, by name.
fn score_grads(m: &CoLlm, rows: &[&Interaction], titles: &[String]) -> Vec<(String, Vec<f32>)> {
    // The same draws (CF dropout in t1/t2) on both paths.
    let ctx = collm_nn::TrainCtx::new(7);
    let s = m.scores(rows, titles, Some(&ctx), true).unwrap();
    let r: Vec<f32> = (0..rows.len()).map(|k| 1.0 - 0.3 * k as f32).collect();
    let r = candle_core::Tensor::from_vec(r, rows.len(), &Device::Cpu).unwrap();
    let g = s.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    m.trainable_stores()
        .into_iter()
        .flat_map(|(group, store)| {
            store
                .trainable()
                .into_iter()
                .map(move |(n, v)| (group, n, v))
        })
        .filter_map(|(group, n, v)| {
            let t = g.get(v.as_tensor())?;
            Some((
                format!("{group}.{n}"),
                t.flatten_all().unwrap().to_vec1().unwrap(),
            ))
        })
        .collect()
}

/// Step 2's training pass runs the text before the first ID slot as a cached prefix: in the
/// modes whose LoRA is frozen (CoLLM over MF and DIN, T1 and T2, which train the CF model too,
/// UI-token) every trainable parameter gets the whole prompts' gradient, on batches where rows
/// share a prefix and where they do not; the modes that train the LoRA run whole prompts.
#[test]
fn frozen_prefix_training_passes_give_the_whole_prompt_gradients() {
    let Family { root, ds, .. } = family();
    let train_rows = &ds.train().unwrap().rows;
    // Rows of several users, then one user's history with three candidates (one prefix).
    let mut rows: Vec<Interaction> = train_rows.iter().step_by(7).take(5).cloned().collect();
    let base = train_rows
        .iter()
        .rev()
        .find(|r| r.history.len() >= 2)
        .unwrap();
    for iid in [2, 5, 7] {
        rows.push(Interaction {
            iid,
            ..base.clone()
        });
    }
    // Prefix groups out of input order: row 0 shares the last rows' prefix.
    rows.insert(
        0,
        Interaction {
            iid: 9,
            ..base.clone()
        },
    );
    let refs: Vec<&Interaction> = rows.iter().collect();
    let mut cases: Vec<(&str, ExperimentConfig)> = vec![
        ("collm-mf", config(root, Mode::Collm)),
        ("t1", config(root, Mode::T1)),
        ("t2", config(root, Mode::T2)),
        ("uitoken", config(root, Mode::Uitoken)),
    ];
    let mut din = config(root, Mode::Collm);
    din.model.cf_run = Some(root.join("cf-din"));
    cases.push(("collm-din", din));
    for (name, cfg) in cases {
        let mut m = CoLlm::build(&cfg, ds, &Device::Cpu).unwrap();
        let enc = m.encode_prompts(&refs, &ds.titles).unwrap();
        let ends = m.frozen_prefix_ends(&enc).expect("a frozen prefix");
        assert!(ends.iter().all(|&e| e > 0), "{name}: {ends:?}");
        let fast = score_grads(&m, &refs, &ds.titles);
        m.frozen_prefix = false;
        assert!(m.frozen_prefix_ends(&enc).is_none());
        let whole = score_grads(&m, &refs, &ds.titles);
        assert_eq!(
            fast.iter().map(|g| &g.0).collect::<Vec<_>>(),
            whole.iter().map(|g| &g.0).collect::<Vec<_>>(),
            "{name}: the same parameters get gradients"
        );
        assert!(!whole.is_empty(), "{name}: nothing trained");
        let mut largest = 0f32;
        for ((p, a), (_, b)) in fast.iter().zip(&whole) {
            for (x, y) in a.iter().zip(b) {
                largest = largest.max(y.abs());
                assert!(
                    (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                    "{name}: {p}: {x} vs {y}"
                );
            }
        }
        assert!(largest > 1e-4, "{name}: all gradients are zero");
    }
    // Modes that train the LoRA (which acts on the prefix too) run whole prompts.
    for mode in [Mode::Tallrec, Mode::T3, Mode::Softprompt] {
        let mut cfg = config(root, mode);
        if mode == Mode::Tallrec {
            cfg.model.step1 = None;
        }
        let m = CoLlm::build(&cfg, ds, &Device::Cpu).unwrap();
        let enc = m.encode_prompts(&refs, &ds.titles).unwrap();
        assert!(m.frozen_prefix_ends(&enc).is_none(), "{}", mode.name());
    }
}
