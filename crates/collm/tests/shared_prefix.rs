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

#[test]
fn shared_prefix_scores_equal_whole_prompt_scores_in_every_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    collm_llm::testing::write_tiny_backbone(&root.join("backbone"), 1).unwrap();
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
    let config = |mode: Mode| {
        let mut c = ExperimentConfig::new(mode, &root.join("data"), &root.join("backbone"));
        c.model.cf_run = Some(root.join("cf-mf"));
        c.model.step1 = Some(root.join("step1"));
        c.model.mapper_mult = 2;
        c.model.eval_batch_size = 4;
        let t = &mut c.training;
        (t.max_steps, t.eval_every, t.eval_rows, t.batch_size) = (2, 2, 8, 4);
        c.training.lr = 0.05;
        c
    };
    // Step 1 trains a LoRA (B leaves zero), which every step-2 mode reads.
    let quiet = TrainOptions {
        resume: false,
        force: false,
        quiet: true,
        stop_after: None,
    };
    train(&config(Mode::Tallrec), &root.join("step1"), &quiet).unwrap();

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
        let mut m = CoLlm::build(&cfg, &ds, &Device::Cpu).unwrap();
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
