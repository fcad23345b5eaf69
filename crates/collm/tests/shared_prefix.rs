//! Shared-prefix scoring (`CoLlm::predict_shared`) equals whole-prompt scoring
//! (`CoLlm::predict`) for every mode: text-only, CIE over MF, SASRec, LightGCN and DIN (whose user slot
//! depends on the item, so its prefix ends before `<UserID>`), Soft-Prompt with k = 2 tokens
//! per slot, UI-token; with users that have many candidates, rows with their own histories,
//! and batches smaller than a user's candidates.

use candle_core::Device;
use collm::experiment::{ExperimentConfig, Mode};
use collm::model::CoLlm;
use collm::run::build_model;
use collm::testing::{Family, Spec};
use collm_cf::ModelKind;
use collm_data::sources::synthetic::SyntheticOptions;
use collm_data::Interaction;
use std::sync::OnceLock;

/// The tiny run family both tests read: a random backbone (seed 2), a synthetic dataset, MF,
/// DIN, SASRec and LightGCN runs, and a step-1 LoRA; made once.
fn family() -> &'static Family {
    static F: OnceLock<Family> = OnceLock::new();
    F.get_or_init(|| {
        Family::build(Spec {
            backbone_seed: 2,
            data: SyntheticOptions {
                users: 16,
                items: 12,
                rows_per_user: 8.0,
                seed: 5,
                ..Default::default()
            },
            cf: vec![
                ModelKind::Mf,
                ModelKind::Din,
                ModelKind::SasRec,
                ModelKind::LightGcn,
            ],
            step2: vec![],
            lr: Some(0.05),
            eval_batch_size: Some(4),
            ..Spec::default()
        })
        .unwrap()
    })
}

#[test]
fn shared_prefix_scores_equal_whole_prompt_scores_in_every_mode() {
    let Family { root, ds, .. } = family();
    let config = |mode: Mode| family().config(mode);
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
    // Each mode with suffix batches of `eval_batch_size` rows (smaller than a user's
    // candidates) and with the default token budget (all of a window's suffixes at once).
    let cases: Vec<(String, ExperimentConfig)> = cases
        .into_iter()
        .flat_map(|(name, cfg)| {
            [0, cfg.model.eval_suffix_tokens].map(|budget| {
                let mut c = cfg.clone();
                c.model.eval_suffix_tokens = budget;
                (format!("{name}, suffix tokens {budget}"), c)
            })
        })
        .collect();
    for (name, cfg) in cases {
        let mut m = build_model(&cfg, ds, &Device::Cpu).unwrap();
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
        ("collm-mf", family().config(Mode::Collm)),
        ("t1", family().config(Mode::T1)),
        ("t2", family().config(Mode::T2)),
        ("uitoken", family().config(Mode::Uitoken)),
    ];
    let mut din = family().config(Mode::Collm);
    din.model.cf_run = Some(root.join("cf-din"));
    cases.push(("collm-din", din));
    // Each mode with suffix batches of `eval_batch_size` rows (smaller than a user's
    // candidates) and with the default token budget (all of a window's suffixes at once).
    let cases: Vec<(String, ExperimentConfig)> = cases
        .into_iter()
        .flat_map(|(name, cfg)| {
            [0, cfg.model.eval_suffix_tokens].map(|budget| {
                let mut c = cfg.clone();
                c.model.eval_suffix_tokens = budget;
                (format!("{name}, suffix tokens {budget}"), c)
            })
        })
        .collect();
    for (name, cfg) in cases {
        let mut m = build_model(&cfg, ds, &Device::Cpu).unwrap();
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
        let mut cfg = family().config(mode);
        if mode == Mode::Tallrec {
            cfg.model.step1 = None;
        }
        let m = build_model(&cfg, ds, &Device::Cpu).unwrap();
        let enc = m.encode_prompts(&refs, &ds.titles).unwrap();
        assert!(m.frozen_prefix_ends(&enc).is_none(), "{}", mode.name());
    }
}

/// The scheduler asks its caller before each model call (`predict_shared_until`, what the
/// server's worker uses to stop work nobody waits for): one user's candidates share one prefix
/// window whatever their number, a stop keeps exactly what was scored (equal to the
/// uninterrupted scores), and the rows whose prefix nobody shares (run whole) are asked about
/// too.
#[test]
fn the_scheduler_asks_before_each_model_call_and_a_stop_keeps_what_was_scored() {
    let Family { ds, .. } = family();
    let mut cfg = family().config(Mode::Collm);
    cfg.model.eval_suffix_tokens = 0;
    let m = build_model(&cfg, ds, &Device::Cpu).unwrap();
    let test = &ds.split("test").unwrap().rows;
    // One user with 9 candidates (eval_batch_size 4, no token budget: 3 suffix calls after
    // one prefill).
    let one: Vec<Interaction> = (1..=9)
        .map(|iid| Interaction {
            iid,
            ..test[0].clone()
        })
        .collect();
    let want = m.predict_shared(&one, &ds.titles, false).unwrap();
    let mut asked: Vec<usize> = Vec::new();
    let got = m
        .predict_shared_until(&one, &ds.titles, false, &mut |done: &[Option<f64>]| {
            asked.push(done.iter().flatten().count());
            true
        })
        .unwrap();
    assert_eq!(
        asked,
        vec![0, 4, 8],
        "one question before each of the 3 model calls"
    );
    assert_eq!(got, want.iter().map(|&v| Some(v)).collect::<Vec<_>>());

    // Stopped before the second call: the first 4 rows scored (the shortest suffixes first),
    // equal to the full run's, the other 5 not.
    let mut calls = 0;
    let got = m
        .predict_shared_until(&one, &ds.titles, false, &mut |_: &[Option<f64>]| {
            calls += 1;
            calls < 2
        })
        .unwrap();
    let scored: Vec<usize> = (0..9).filter(|&r| got[r].is_some()).collect();
    assert_eq!(scored.len(), 4, "{got:?}");
    for &r in &scored {
        assert_eq!(got[r], Some(want[r]));
    }

    // With a token budget the suffixes share model calls beyond `eval_batch_size` rows: all
    // 9 in one call where the budget holds them, 2 calls where it holds 5 (of the longest).
    let longest = {
        let refs: Vec<&Interaction> = one.iter().collect();
        let enc = m.encode_prompts(&refs, &ds.titles).unwrap();
        enc.iter()
            .map(|e| e.ids.len() - m.split_point(e))
            .max()
            .unwrap()
    };
    for (budget, calls) in [(9 * longest, 1), (5 * longest, 2)] {
        cfg.model.eval_suffix_tokens = budget;
        let wide = build_model(&cfg, ds, &Device::Cpu).unwrap();
        let mut asked = 0;
        let got = wide
            .predict_shared_until(&one, &ds.titles, false, &mut |_: &[Option<f64>]| {
                asked += 1;
                true
            })
            .unwrap();
        assert_eq!(asked, calls, "budget {budget}");
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g.unwrap() - w).abs() <= 1e-4,
                "budget {budget}: {g:?} vs {w}"
            );
        }
    }

    // Rows that share no prefix run whole (`predict_until`), asked about per batch of 4 too;
    // stopped at once, nothing is scored.
    let alone: Vec<Interaction> = test.iter().take(6).cloned().collect();
    let mut asked = 0;
    let got = m
        .predict_shared_until(&alone, &ds.titles, false, &mut |_: &[Option<f64>]| {
            asked += 1;
            true
        })
        .unwrap();
    assert!(got.iter().all(Option::is_some));
    assert!(asked >= 2, "asked {asked} times for 6 rows in batches of 4");
    let got = m
        .predict_shared_until(&alone, &ds.titles, false, &mut |_: &[Option<f64>]| false)
        .unwrap();
    assert!(got.iter().all(Option::is_none), "{got:?}");
}
