//! CoLLM end to end on tiny synthetic data with a tiny backbone: every mode and baseline runs;
//! gradients reach exactly what each mode trains; the injected rows, and only they, carry the
//! slot vectors; a resumed run ends with the same weights as an uninterrupted one.

use candle_core::{Device, Tensor};
use collm::experiment::{ExperimentConfig, Mode};
use collm::recommend::Recommender;
use collm::run::build_model;
use collm::testing::{quiet, Family, Spec};
use collm::train::{train, TrainOptions};
use collm_cf::ModelKind;
use collm_data::sources::synthetic::SyntheticOptions;
use collm_data::{Dataset, Interaction};
use collm_nn::TrainCtx;
use std::path::Path;

/// A fresh family per test (each trains into it): MF and DIN runs over synthetic data and a
/// 1-layer random backbone.
fn setup() -> Family {
    Family::build(Spec {
        data: SyntheticOptions {
            users: 24,
            items: 20,
            rows_per_user: 8.0,
            seed: 9,
            ..Default::default()
        },
        cf: vec![ModelKind::Mf, ModelKind::Din],
        cf_epochs: 2,
        step1: false,
        step2: vec![],
        steps: 4,
        eval_every: 2,
        eval_rows: 20,
        warmup_steps: Some(1),
        lr: Some(0.01),
        eval_batch_size: None,
        ..Spec::default()
    })
    .unwrap()
}

/// The family's config, over the step-1 run a test trains into `run-tallrec`.
fn config(s: &Family, mode: Mode) -> ExperimentConfig {
    let mut c = s.config(mode);
    c.model.step1 = Some(s.root.join("run-tallrec"));
    c.validate().unwrap();
    c
}

fn rows(ds: &Dataset, n: usize) -> Vec<&Interaction> {
    ds.train().unwrap().rows.iter().take(n).collect()
}

#[test]
fn every_mode_trains_and_evaluates_end_to_end() {
    let s = setup();
    // Step 1 first: the step-2 modes load its LoRA.
    let order = [
        Mode::Tallrec,
        Mode::Icl,
        Mode::Collm,
        Mode::T1,
        Mode::T2,
        Mode::T3,
        Mode::Softprompt,
        Mode::Uitoken,
    ];
    for mode in order {
        let cfg = config(&s, mode);
        let run = s.root.join(format!("run-{}", mode.name()));
        let st = train(&cfg, &run, &quiet()).unwrap();
        if mode == Mode::Icl {
            assert!(st.curve.is_empty());
        } else {
            assert_eq!(st.step, 4, "{mode:?}");
            assert_eq!(st.curve.len(), 2, "{mode:?}");
            assert!(st.best_valid.is_some(), "{mode:?}");
        }
        let (scores, report) = Recommender::open(&run, None)
            .unwrap()
            .evaluate("test", false)
            .unwrap();
        assert_eq!(scores.len(), report.n);
        assert!(scores.iter().all(|x| x.is_finite()), "{mode:?}");
        assert!(report.subsets.contains_key("warm"));
    }
    // A CoLLM run over DIN (u = 3e) works too.
    let mut cfg = config(&s, Mode::Collm);
    cfg.model.cf_run = Some(s.root.join("cf-din"));
    train(&cfg, &s.root.join("run-collm-din"), &quiet()).unwrap();
}

/// Which parameter groups get gradients in a mode, and that frozen ones get none.
#[test]
fn gradients_reach_what_is_trained_and_nothing_frozen() {
    let s = setup();
    train(
        &config(&s, Mode::Tallrec),
        &s.root.join("run-tallrec"),
        &quiet(),
    )
    .unwrap();
    let ds = Dataset::load(&s.root.join("data")).unwrap();
    let batch = rows(&ds, 4);
    for (mode, trained) in [
        (Mode::Tallrec, vec!["lora"]),
        (Mode::Collm, vec!["mapper"]),
        (Mode::T1, vec!["mapper", "cf"]),
        (Mode::T2, vec!["mapper", "cf"]),
        (Mode::T3, vec!["lora", "mapper"]),
        (Mode::Softprompt, vec!["lora", "soft_prompt"]),
        (Mode::Uitoken, vec!["ui_token"]),
    ] {
        let m = build_model(&config(&s, mode), &ds, &Device::Cpu).unwrap();
        let groups: Vec<&str> = m.trainable_stores().iter().map(|(g, _)| *g).collect();
        assert_eq!(groups, trained, "{mode:?}");
        let ctx = TrainCtx::new(1);
        let loss = m
            .scores(&batch, &ds.titles, Some(&ctx), true)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        for (g, store) in m.trainable_stores() {
            for (name, var) in store.trainable() {
                // LoRA A of a fresh adapter has a zero gradient while B is zero (PEFT's init).
                if name.contains("lora_A") {
                    continue;
                }
                let grad = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{mode:?}: no gradient for {g}.{name}"));
                let v = grad.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert!(
                    v.iter().any(|x| *x != 0.0),
                    "{mode:?}: zero gradient for {g}.{name}"
                );
            }
        }
        // Frozen: the step-1 LoRA in step-2 modes, the CF model in collm/t3.
        if !mode.trains_lora() {
            if let Some(l) = &m.lora {
                for (name, var) in l.trainable() {
                    assert!(
                        grads.get(var.as_tensor()).is_none(),
                        "{mode:?}: frozen LoRA {name} got a gradient"
                    );
                }
            }
        }
        if let collm::cie::SlotSource::Cie {
            cf,
            cf_trainable: false,
            ..
        } = &m.slots
        {
            for (name, var) in cf.params().trainable() {
                assert!(
                    grads.get(var.as_tensor()).is_none(),
                    "{mode:?}: frozen CF {name} got a gradient"
                );
            }
        }
    }
}

#[test]
fn only_the_injected_rows_change() {
    let s = setup();
    train(
        &config(&s, Mode::Tallrec),
        &s.root.join("run-tallrec"),
        &quiet(),
    )
    .unwrap();
    let ds = Dataset::load(&s.root.join("data")).unwrap();
    let m = build_model(&config(&s, Mode::Collm), &ds, &Device::Cpu).unwrap();
    let batch = rows(&ds, 3);
    let (before, mask) = m.embed_batch(&batch, &ds.titles, None).unwrap();
    // Change the mapper: the slot vectors change, nothing else may.
    let collm::cie::SlotSource::Cie { mapper, .. } = &m.slots else {
        panic!()
    };
    for (_, v) in mapper.params.trainable() {
        v.set(&(v.as_tensor() + 0.5).unwrap()).unwrap();
    }
    let (after, _) = m.embed_batch(&batch, &ds.titles, None).unwrap();
    let diff = (after - &before)
        .unwrap()
        .abs()
        .unwrap()
        .sum(2)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let enc = m.encode_prompts(&batch, &ds.titles).unwrap();
    let t = mask.seq;
    for (r, e) in enc.iter().enumerate() {
        let offset = t - e.ids.len();
        let slots: Vec<usize> = e
            .user_slots
            .iter()
            .chain(&e.item_slots)
            .map(|p| p + offset)
            .collect();
        assert_eq!(slots.len(), 2);
        for (pos, d) in diff[r].iter().enumerate() {
            if slots.contains(&pos) {
                assert!(*d > 0.0, "row {r}: slot {pos} did not change");
            } else {
                assert_eq!(*d, 0.0, "row {r}: non-slot position {pos} changed");
            }
        }
    }
    // The placeholder token may also occur in the text: positions come from encoding, not search.
    let unk = m.backbone.tokenizer.unk_id.unwrap();
    assert!(enc
        .iter()
        .all(|e| e.ids.iter().filter(|&&i| i == unk).count() == 2));
}

fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let t = candle_core::safetensors::load(dir, &Device::Cpu).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = t
        .into_iter()
        .map(|(k, x)| (k, x.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn resume_gives_the_same_weights_as_an_uninterrupted_run() {
    let s = setup();
    let mut cfg = config(&s, Mode::T3);
    cfg.training.max_steps = 6;
    cfg.training.eval_every = 2;
    cfg.training.patience = 100;
    cfg.training.grad_accum = 2;
    let straight = s.root.join("straight");
    train(&cfg, &straight, &quiet()).unwrap();
    let resumed = s.root.join("resumed");
    // "Killed" after the first validation (step 2, right after its checkpoint), then resumed.
    train(
        &cfg,
        &resumed,
        &TrainOptions {
            stop_after: Some(1),
            ..quiet()
        },
    )
    .unwrap();
    let st = train(
        &cfg,
        &resumed,
        &TrainOptions {
            resume: true,
            force: false,
            ..quiet()
        },
    )
    .unwrap();
    assert_eq!(st.step, 6);
    for g in ["lora", "mapper"] {
        let ck = |run: &Path| collm_nn::run::current_checkpoint(run).unwrap().unwrap();
        let a = weights(&collm::run::group_file(&ck(&straight), g));
        let b = weights(&collm::run::group_file(&ck(&resumed), g));
        assert_eq!(a, b, "{g}");
    }
    // A different config cannot resume this run.
    let mut other = cfg.clone();
    other.training.lr = 0.5;
    let e = train(
        &other,
        &resumed,
        &TrainOptions {
            resume: true,
            force: false,
            ..quiet()
        },
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("differ"));
    let _ = Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu);
}

/// `calibrate`: the run measures the mean raw score of training rows under the initial weights
/// once, and every later score of the run (training loss, validation, eval) is shifted by it.
#[test]
fn calibration_shifts_every_score_by_the_initial_mean() {
    let s = setup();
    let ds = Dataset::load(&s.root.join("data")).unwrap();
    let mut cfg = config(&s, Mode::Tallrec);
    cfg.training.max_steps = 2;
    cfg.model.calibrate = true;
    // LoRA B starts at zero, so the initial scores are the base model's.
    let base = build_model(&cfg, &ds, &Device::Cpu).unwrap();
    assert_eq!(base.score_offset, 0.0);
    let initial = base
        .predict(&ds.train().unwrap().rows, &ds.titles, false)
        .unwrap();
    let (lo, hi) = initial
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        });
    assert!(hi > lo);

    let run = s.root.join("run-calibrated");
    let st = train(&cfg, &run, &quiet()).unwrap();
    assert!(st.score_offset != 0.0 && (lo..=hi).contains(&st.score_offset));
    let (_, _, mut model) = collm::run::load_run(&run).unwrap();
    assert_eq!(model.score_offset, st.score_offset);
    let (scores, _) = Recommender::open(&run, None)
        .unwrap()
        .evaluate("test", false)
        .unwrap();
    model.score_offset = 0.0;
    let raw = model
        .predict(&ds.split("test").unwrap().rows, &ds.titles, false)
        .unwrap();
    for (a, b) in scores.iter().zip(&raw) {
        assert!((a - (b - st.score_offset)).abs() < 1e-4, "{a} vs {b}");
    }

    cfg.model.calibrate = false;
    let st = train(&cfg, &s.root.join("run-raw"), &quiet()).unwrap();
    assert_eq!(st.score_offset, 0.0);
}
