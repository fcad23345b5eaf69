//! Every collaborative model on tiny data: shapes, gradients, overfitting, LightGCN against a
//! dense reference, determinism, resume, reload, and bad inputs.

use candle_core::{Device, Tensor};
use collm_cf::lightgcn::{Graph, LightGcn};
use collm_cf::nn::bce_with_logits;
use collm_cf::optim::{Adam, Decay};
use collm_cf::run::load_model;
use collm_cf::train::{predict, train, TrainOptions};
use collm_cf::{build_model, CfBatch, CfConfig, ModelKind, TrainCtx};
use collm_data::dataset::write_dataset;
use collm_data::sources::synthetic::{prepare, SyntheticOptions};
use collm_data::{Dataset, Interaction};
use collm_metrics::auc;

fn tiny(dir: &std::path::Path, seed: u64) -> Dataset {
    let data = prepare(&SyntheticOptions {
        users: 40,
        items: 30,
        rows_per_user: 15.0,
        seed,
        ..Default::default()
    })
    .unwrap();
    write_dataset(data, &dir.join(format!("data{seed}")), false).unwrap()
}

fn small_config(model: ModelKind) -> CfConfig {
    CfConfig {
        dim: 8,
        hidden: vec![16, 8],
        batch_size: 64,
        max_len: 5,
        max_epochs: 3,
        patience: 10,
        ..CfConfig::defaults(model)
    }
}

#[test]
fn shapes_and_gradients_reach_every_parameter() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = tiny(tmp.path(), 1);
    let dev = Device::Cpu;
    let rows: Vec<&Interaction> = ds.train().unwrap().rows.iter().take(50).collect();
    for kind in ModelKind::ALL {
        let cfg = small_config(kind);
        let model = build_model(&cfg, &ds, &dev).unwrap();
        let b = CfBatch::new(&rows, model.history_len(), &dev).unwrap();
        let ctx = TrainCtx::new(1);
        let out = model.forward(&b, Some(&ctx)).unwrap();
        assert_eq!(out.score.dims(), &[50], "{kind}");
        assert_eq!(out.user.dims(), &[50, model.dim()], "{kind}");
        assert_eq!(out.item.dims(), &[50, model.dim()], "{kind}");
        let d1 = if kind == ModelKind::Din { 24 } else { 8 };
        assert_eq!(model.dim(), d1, "{kind}");
        let loss = bce_with_logits(&out.score, &b.labels).unwrap();
        let grads = loss.backward().unwrap();
        for (name, var) in model.params().trainable() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{kind}: no gradient for {name}"));
            let v = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{kind}: {name} not finite");
            // DIN's Dice alphas start at 0 but still get gradients; every tensor must move.
            assert!(
                v.iter().any(|x| *x != 0.0),
                "{kind}: zero gradient for {name}"
            );
        }
    }
}

#[test]
fn every_model_overfits_a_tiny_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = tiny(tmp.path(), 2);
    let dev = Device::Cpu;
    let rows: Vec<&Interaction> = ds.train().unwrap().rows.iter().take(120).collect();
    let labels: Vec<u8> = rows.iter().map(|r| r.label).collect();
    for kind in ModelKind::ALL {
        let cfg = CfConfig {
            lr: 3e-2,
            weight_decay: 0.0,
            dropout: 0.0,
            init_std: 0.1,
            ..small_config(kind)
        };
        let model = build_model(&cfg, &ds, &dev).unwrap();
        let params = model
            .params()
            .trainable()
            .into_iter()
            .map(|(n, v)| (n, v, 0.0))
            .collect();
        let mut opt = Adam::new(params, cfg.lr, Decay::L2).unwrap();
        let b = CfBatch::new(&rows, model.history_len(), &dev).unwrap();
        for step in 0..300 {
            let ctx = TrainCtx::new(step);
            let out = model.forward(&b, Some(&ctx)).unwrap();
            let loss = bce_with_logits(&out.score, &b.labels).unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
        }
        let owned: Vec<Interaction> = rows.iter().map(|r| (*r).clone()).collect();
        let scores = predict(model.as_ref(), &owned, 1000, &dev).unwrap();
        let a = auc(&labels, &scores).unwrap();
        assert!(a > 0.95, "{kind}: train AUC {a} after 300 steps");
    }
}

#[test]
fn lightgcn_propagation_equals_a_dense_reference() {
    // 2 users, 3 items; a duplicate positive pair and a negative (ignored).
    let row = |uid, iid, label| Interaction {
        uid,
        iid,
        label,
        timestamp: 0,
        history: vec![],
    };
    let train = vec![
        row(1, 1, 1),
        row(1, 2, 1),
        row(1, 2, 1),
        row(2, 2, 1),
        row(2, 3, 0),
    ];
    let (nu, ni) = (3, 4); // padding ids included
    let g = Graph::from_train(nu, ni, &train);
    let a = g.dense();
    // Degrees: user1 = 3 (1 + 2), user2 = 1, item1 = 1, item2 = 3 (2 + 1).
    let (u1, u2, i1, i2) = (1, 2, nu + 1, nu + 2);
    assert!((a[u1][i1] - 1.0 / (3f32 * 1.0).sqrt()).abs() < 1e-6);
    assert!((a[i2][u1] - 2.0 / (3f32 * 3.0).sqrt()).abs() < 1e-6);
    assert!((a[u2][i2] - 1.0 / (1f32 * 3.0).sqrt()).abs() < 1e-6);
    assert_eq!(a[u2][nu + 3], 0.0); // negatives make no edge
    assert_eq!(a[u1][u1], 0.0); // no self-loops

    let tmp = tempfile::tempdir().unwrap();
    let cfg = CfConfig {
        dim: 4,
        layers: 2,
        ..CfConfig::defaults(ModelKind::LightGcn)
    };
    let dev = Device::Cpu;
    let model = LightGcn::new(&cfg, nu, ni, &train, &dev).unwrap();
    let got = model.propagate().unwrap().to_vec2::<f32>().unwrap();
    // Dense: E0 = [users; items]; mean of E0, A E0, A A E0.
    let ps = collm_cf::CollaborativeModel::params(&model);
    let users = ps
        .get("user_embedding.weight")
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let items = ps
        .get("item_embedding.weight")
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let e0: Vec<Vec<f32>> = users.into_iter().chain(items).collect();
    let mul = |e: &Vec<Vec<f32>>| -> Vec<Vec<f32>> {
        (0..e.len())
            .map(|r| {
                (0..4)
                    .map(|c| (0..e.len()).map(|k| a[r][k] * e[k][c]).sum())
                    .collect()
            })
            .collect()
    };
    let e1 = mul(&e0);
    let e2 = mul(&e1);
    for r in 0..e0.len() {
        for c in 0..4 {
            let want = (e0[r][c] + e1[r][c] + e2[r][c]) / 3.0;
            assert!((got[r][c] - want).abs() < 1e-5, "node {r} dim {c}");
        }
    }
    drop(tmp);
}

#[test]
fn same_seed_same_metrics_resume_matches_and_reload_reproduces_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = tiny(tmp.path(), 3);
    let dev = Device::Cpu;
    for kind in [ModelKind::Mf, ModelKind::SasRec, ModelKind::Din] {
        let cfg = CfConfig {
            max_epochs: 4,
            ..small_config(kind)
        };
        let quiet = TrainOptions {
            quiet: true,
            ..TrainOptions::default()
        };
        let a = train(&cfg, &ds, &tmp.path().join(format!("{kind}-a")), &quiet).unwrap();
        let b = train(&cfg, &ds, &tmp.path().join(format!("{kind}-b")), &quiet).unwrap();
        let strip = |m: &collm_cf::train::TrainMetrics| -> Vec<(Option<f64>, f64)> {
            m.curve
                .iter()
                .map(|r| (r.valid_auc, r.train_loss))
                .collect()
        };
        assert_eq!(strip(&a), strip(&b), "{kind}: same seed, different curve");

        // 2 epochs, "killed", then resumed to 4: the same curve as 4 straight.
        let c_dir = tmp.path().join(format!("{kind}-c"));
        let two = CfConfig {
            max_epochs: 2,
            ..cfg.clone()
        };
        train(&two, &ds, &c_dir, &quiet).unwrap();
        // Pretend the process died after epoch 2: clear the "stopped" mark and resume.
        let state = collm_nn::run::current_checkpoint(&c_dir)
            .unwrap()
            .unwrap()
            .join(collm_nn::run::STATE_FILE);
        let mut s: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
        s["stopped"] = serde_json::Value::Null;
        std::fs::write(&state, s.to_string()).unwrap();
        let cfg_text = std::fs::read_to_string(c_dir.join("config.toml"))
            .unwrap()
            .replace("max_epochs = 2", "max_epochs = 4");
        std::fs::write(c_dir.join("config.toml"), cfg_text).unwrap();
        let c = train(
            &cfg,
            &ds,
            &c_dir,
            &TrainOptions {
                resume: true,
                quiet: true,
                ..TrainOptions::default()
            },
        )
        .unwrap();
        assert_eq!(strip(&a), strip(&c), "{kind}: resume differs");

        // Reloading the run gives the best epoch's valid scores again.
        let (_, model) = load_model(&tmp.path().join(format!("{kind}-a")), &ds, &dev).unwrap();
        let valid = &ds.split("valid").unwrap().rows;
        let scores = predict(model.as_ref(), valid, 512, &dev).unwrap();
        let labels: Vec<u8> = valid.iter().map(|r| r.label).collect();
        let best = a.best_valid.as_ref().unwrap().auc.unwrap();
        assert!(
            (auc(&labels, &scores).unwrap() - best).abs() < 1e-9,
            "{kind}"
        );
    }
}

#[test]
fn bad_runs_fail_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = tiny(tmp.path(), 4);
    let other = tiny(tmp.path(), 5);
    let dev = Device::Cpu;
    let run = tmp.path().join("run");
    let cfg = CfConfig {
        max_epochs: 1,
        ..small_config(ModelKind::Mf)
    };
    let quiet = TrainOptions {
        quiet: true,
        ..TrainOptions::default()
    };
    train(&cfg, &ds, &run, &quiet).unwrap();
    let msg = |r: anyhow::Result<_>| format!("{:#}", r.expect_err("should fail"));

    // Training into an existing run without --resume.
    assert!(msg(train(&cfg, &ds, &run, &quiet).map(|_| ())).contains("already holds a run"));
    // A run evaluated on another dataset.
    let e = msg(load_model(&run, &other, &dev).map(|_| ()));
    assert!(e.contains("was trained on dataset"), "{e}");
    // Missing files.
    let e = msg(load_model(&tmp.path().join("nothing"), &ds, &dev).map(|_| ()));
    assert!(
        e.contains("config.toml") && e.contains("cannot read"),
        "{e}"
    );
    let copy = tmp.path().join("copy");
    std::fs::create_dir_all(&copy).unwrap();
    std::fs::copy(run.join("config.toml"), copy.join("config.toml")).unwrap();
    let e = msg(load_model(&copy, &ds, &dev).map(|_| ()));
    assert!(
        e.contains("model.safetensors") && e.contains("not found"),
        "{e}"
    );
    // Weights of another shape.
    let bigger = CfConfig {
        dim: 16,
        ..cfg.clone()
    };
    let m = build_model(&bigger, &ds, &dev).unwrap();
    m.params().save(&copy.join("model.safetensors")).unwrap();
    let e = msg(load_model(&copy, &ds, &dev).map(|_| ()));
    assert!(
        e.contains("has shape") && e.contains("_embedding.weight"),
        "{e}"
    );
    // Unknown model in a config, and an unknown field.
    let e = msg(CfConfig::from_toml("model = \"ncf\"", "x.toml").map(|_| ()));
    assert!(e.contains("unknown model 'ncf'"), "{e}");
    // Corrupt config.
    std::fs::write(copy.join("config.toml"), "cf = 3").unwrap();
    let e = msg(load_model(&copy, &ds, &dev).map(|_| ()));
    assert!(e.contains("invalid run config"), "{e}");
    let _ = Tensor::zeros(1, candle_core::DType::F32, &dev);
}

// The benchmark is behind the `bench` feature (on in workspace builds: collm-cli enables it).
#[cfg(feature = "bench")]
#[test]
fn bench_times_real_training_against_a_forward_pass() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = tiny(tmp.path(), 5);
    let train_rows = ds.train().unwrap().rows.len();
    for kind in ModelKind::ALL {
        let cfg = CfConfig {
            lr: 1e-2,
            ..small_config(kind)
        };
        let one = collm_cf::bench::measure(&cfg, &ds, 1).unwrap();
        let four = collm_cf::bench::measure(&cfg, &ds, 4).unwrap();
        assert_eq!(four.train_rows, train_rows);
        assert_eq!(four.model, kind.name());
        assert!(four.epoch_seconds > 0.0 && four.forward_seconds > 0.0);
        assert!(
            (four.train_samples_per_second * four.epoch_seconds - train_rows as f64).abs() < 1e-6
        );
        assert!(four.epoch_over_forward.is_finite() && four.score_samples_per_second > 0.0);
        // The timed epochs are real training: the loss falls.
        assert!(
            four.last_train_loss < one.last_train_loss,
            "{kind}: loss {} after 4 epochs vs {} after 1",
            four.last_train_loss,
            one.last_train_loss
        );
    }
    let err = collm_cf::bench::measure(&small_config(ModelKind::Mf), &ds, 0).unwrap_err();
    assert!(format!("{err}").contains("--epochs"));
}

#[test]
fn sasrec_starts_from_the_reference_initialisation() {
    // The reference's SASRec keeps PyTorch's defaults: N(0, 1) embeddings with a zero padding
    // row, zero attention biases. Its slow, 200-epoch training depends on that scale.
    let tmp = tempfile::tempdir().unwrap();
    let ds = tiny(tmp.path(), 6);
    let cfg = CfConfig {
        dim: 32,
        ..small_config(ModelKind::SasRec)
    };
    let model = build_model(&cfg, &ds, &Device::Cpu).unwrap();
    let get = |n: &str| {
        model
            .params()
            .get(n)
            .unwrap_or_else(|| panic!("{n}"))
            .as_tensor()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
    };
    let items = get("item_emb.weight").to_vec2::<f32>().unwrap();
    assert!(items[0].iter().all(|&x| x == 0.0), "padding row");
    let rest: Vec<f32> = items[1..].iter().flatten().copied().collect();
    let var = rest.iter().map(|x| x * x).sum::<f32>() / rest.len() as f32;
    assert!((0.8..1.2).contains(&var), "item embedding variance {var}");
    let pos: Vec<f32> = get("pos_emb.weight")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let var = pos.iter().map(|x| x * x).sum::<f32>() / pos.len() as f32;
    assert!(
        (0.7..1.3).contains(&var),
        "position embedding variance {var}"
    );
    for b in ["in_proj", "out_proj"] {
        let bias: Vec<f32> = get(&format!("attention_layers.0.{b}.bias"))
            .to_vec1()
            .unwrap();
        assert!(bias.iter().all(|&x| x == 0.0), "{b} bias");
    }
}
